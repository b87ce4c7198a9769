"""The teacher of the AYS-like baseline: per sampler, its own many-step result from fixed training noises.

With x0 clipping (clip_sample) the samplers integrate slightly different dynamics (DDIM
keeps the raw noise direction as diffusers does; the multistep and Euler updates use the
clipped x0), so each is compared with its own converged result, not with DDIM's.
"""
from __future__ import annotations

import numpy as np

from abcd_edge.calibrate.state import CalibrationState, TeacherData
from abcd_edge.io import atomic_path

TEACHER_STEPS = 200   # capped at the model's train timesteps (a consistency model may have 40)


def teacher_steps(state: CalibrationState) -> int:
    """The teacher's step count: TEACHER_STEPS, or every train timestep of a model with fewer."""
    return min(TEACHER_STEPS, state.schedule.num_train_timesteps)


def teacher(state: CalibrationState) -> TeacherData:
    """The noises and each sampler's 200-step time-uniform result (ONNX Runtime; fewer steps where the model
    has fewer train timesteps), from the checkpoint if there."""
    from abcd_edge.core.placement import time_uniform_sigmas

    cfg = state.cfg
    f = state.ckpt_file("teacher.npz")
    if f.exists():
        z = np.load(f, allow_pickle=False)
        return TeacherData(z["noise_train"], {s: z[f"train_{s}"] for s in cfg.samplers})
    rng = np.random.default_rng(cfg.seed + 200)
    noise_train = rng.standard_normal((cfg.train_noises, *state.shape)).astype(np.float32)
    sigmas = time_uniform_sigmas(state.schedule, teacher_steps(state))
    data = TeacherData(noise_train, train={s: state.x0(s, sigmas, noise_train, "train") for s in cfg.samplers})
    with atomic_path(f) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, noise_train=data.noise_train, **{f"train_{s}": v for s, v in data.train.items()})
    return data
