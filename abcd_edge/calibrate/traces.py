"""Stage 3, traces: the x0 estimate after every step for many random contexts, with the learned schedules.

Each trace records, per image and step, the teacher distance d_t and the change of x0
(``quality.x0_change``; the first step's change is from zeros, the loop's x0 before any
step), with the elapsed time and the cost of stopping there as the runtime would see them
(each step at the profile's p50 plus the sampler's and the decision's tails). The exit
policy is trained on them.
"""
from __future__ import annotations

import json

import numpy as np

from abcd_edge.calibrate.state import CalibrationState
from abcd_edge.io import atomic_path


def step_distances(x0s: list[np.ndarray], teacher: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(teacher MSE d [B, n], x0 change [B, n]) of the x0 after each of n steps, per image."""
    from abcd_edge.quality import teacher_distance, x0_change

    d = np.stack([teacher_distance(x0, teacher).mse for x0 in x0s], 1)
    prev = [np.zeros_like(x0s[0]), *x0s[:-1]]
    change = np.stack([x0_change(p, x0) for p, x0 in zip(prev, x0s)], 1)
    return d, change


def traces(state: CalibrationState) -> list[dict]:
    """x0 after every step for ``cfg.trace_contexts`` contexts (ONNX Runtime), from the checkpoint if there."""
    from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS

    cfg, data = state.cfg, state.teachers
    f = state.ckpt_file("traces.npz")
    if f.exists():
        z = np.load(f, allow_pickle=False)
        return json.loads(str(z["meta"]))
    ctl = state.numpy_controller()
    out = []
    bar = state.bar(cfg.trace_contexts, "traces")
    for _ in range(cfg.trace_contexts):
        sampler, profile, budget, rho, n_fit = state.sample_context()
        # plan beyond what fits now and then, so the budget term has something to teach
        n_plan = int(np.clip(round(n_fit * state.rng.uniform(0.8, 1.5)), 1, cfg.trace_max_steps))
        ctx = state.context(budget, profile, rho)
        sigmas = ctl.plan_sigmas(ctx, SAMPLER_DESCRIPTORS[sampler], n_plan)
        idx = state.rng.choice(len(data.noise_train), cfg.trace_batch, replace=False)
        _, x0s = state.run_ort(sampler, sigmas, data.noise_train[idx], keep_x0=True)
        d, change = step_distances(x0s, data.train[sampler][idx])
        cost = profile.cost_model(sampler)
        per_step = cost.step_p50_ms + cost.sampler_tail_ms + cost.decision_tail_ms
        elapsed = per_step * np.arange(1, n_plan + 1)
        out.append({"sampler": sampler, "budget": budget, "rho": rho, "context": ctx,
                    "sigmas": list(map(float, sigmas)), "d": d.tolist(), "change": change.tolist(),
                    "elapsed": elapsed.tolist(),
                    "cost": (elapsed + cost.finish_tail_ms + (cost.step_tail_ms - cost.step_p50_ms)).tolist()})
        bar.update(1)
    bar.close()
    with atomic_path(f) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, meta=np.array(json.dumps(out)))
    return out
