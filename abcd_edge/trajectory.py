"""A plain fixed-schedule sampling run (no budget): evaluation, baselines, oracle and traces.

The anytime loop lives in runtime.py; this is the loop without a clock.
"""
from __future__ import annotations

import numpy as np


def sample(denoiser, sampler, noise: np.ndarray, rng: np.random.Generator | None = None,
           keep_x0: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run every step of ``sampler`` from ``noise``; return (final x0 estimate, x0 after each step if asked)."""
    rng = rng or np.random.default_rng(0)
    x = sampler.prepare(noise)
    x0 = np.zeros_like(noise)
    history = []
    for i in range(len(sampler)):
        model_in, t = sampler.model_input(x, i)
        out = denoiser(np.asarray(model_in, np.float32), np.asarray(t, np.float32))
        step_noise = rng.standard_normal(noise.shape).astype(np.float32) if sampler.stochastic else None
        x, x0 = sampler.step(x, i, out, noise=step_noise)
        if keep_x0:
            history.append(np.asarray(x0, np.float32))
    return np.asarray(x0, np.float32), history
