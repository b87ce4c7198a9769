"""Stage 1, the teacher: per sampler, its own many-step result from each fixed training / validation noise.

With x0 clipping (clip_sample) the samplers integrate slightly different dynamics (DDIM
keeps the raw noise direction as diffusers does; the multistep and Euler updates use the
clipped x0), so each is compared with its own converged result, not with DDIM's.
"""
from __future__ import annotations

import numpy as np

from abcd_edge.calibrate.state import CalibrationState, TeacherData
from abcd_edge.io import atomic_path

TEACHER_STEPS = 200


def teacher(state: CalibrationState) -> TeacherData:
    """The noises and each sampler's 200-step time-uniform result (ONNX Runtime), from the checkpoint if there."""
    from abcd_edge.core.placement import time_uniform_sigmas

    cfg = state.cfg
    f = state.ckpt_file("teacher.npz")
    if f.exists():
        z = np.load(f, allow_pickle=False)
        return TeacherData(z["noise_train"], z["noise_val"], {s: z[f"train_{s}"] for s in cfg.samplers},
                           {s: z[f"val_{s}"] for s in cfg.samplers})
    rng = np.random.default_rng(cfg.seed + 100)
    noise_train = rng.standard_normal((cfg.train_noises, *state.shape)).astype(np.float32)
    noise_val = rng.standard_normal((cfg.val_noises, *state.shape)).astype(np.float32)
    sigmas = time_uniform_sigmas(state.schedule, TEACHER_STEPS)
    data = TeacherData(noise_train, noise_val,
                       train={s: state.run_ort(s, sigmas, noise_train)[0] for s in cfg.samplers},
                       val={s: state.run_ort(s, sigmas, noise_val)[0] for s in cfg.samplers})
    with atomic_path(f) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, noise_train=data.noise_train, noise_val=data.noise_val,
                 **{f"train_{s}": v for s, v in data.train.items()},
                 **{f"val_{s}": v for s, v in data.val.items()})
    return data
