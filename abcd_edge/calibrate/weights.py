"""Stage 2, the weight generator: one small network that places the searched schedules in every context.

For a context (budget, device FLOP/s, rho), the planned step count n and the sampler, the
generator's density places n steps by inverse CDF. It is fitted so that at every searched
step count its placement reproduces the searched schedule (squared log-sigma error, over
random budgets, profiles and rho: the searched optimum depends on n and the sampler, which
the generator must learn to read from its input); between searched step counts it
interpolates, and the gate (``calibrate.gate``) checks it on held-out noises.
"""
from __future__ import annotations

import math

import numpy as np

from abcd_edge.calibrate.state import BUDGET_RANGE_MS, CalibrationState


def training_rows(state: CalibrationState, searched: dict, count: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """``count`` rows of the generator's input [c, log n, z] (random context) with their target log-sigmas."""
    from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS
    from abcd_edge.formats.controller import wg_features

    rows, targets = [], []
    keys = [(s, n) for s in searched for n in searched[s]]
    for _ in range(count):
        sampler, n = keys[int(state.rng.integers(len(keys)))]
        profile = state.profiles[int(state.rng.integers(len(state.profiles)))]
        budget = float(math.exp(state.rng.uniform(*map(math.log, BUDGET_RANGE_MS))))
        ctx = state.context(budget, profile, float(state.rng.uniform(0, 1)))
        rows.append(wg_features(ctx, int(n), SAMPLER_DESCRIPTORS[sampler])[0])
        targets.append(np.log(np.asarray(searched[sampler][n]["sigmas"], np.float64)))
    return np.stack(rows), targets


def fit_generator(state: CalibrationState, searched: dict) -> None:
    """Fit ``state.model.wg`` to the searched schedules (``cfg.wg_iters`` Adam steps, 32 contexts each)."""
    import torch

    from abcd_edge.core.placement import sigmas_from_density

    cfg, spec, model = state.cfg, state.spec, state.model
    top = math.log(state.schedule.sigma_max)
    opt = torch.optim.Adam(model.wg.parameters(), lr=cfg.wg_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.wg_iters)
    losses = state.curves.setdefault("wg_loss", [])
    bar = state.bar(cfg.wg_iters, "generator")
    for _ in range(cfg.wg_iters):
        rows, targets = training_rows(state, searched, 32)
        density = model.normalised_density(torch.from_numpy(rows))
        errs = []
        for d, target in zip(density, targets):
            log_sig = sigmas_from_density(d.double(), len(target), spec.log_sigma_min, top, xp=torch).log()
            errs.append(((log_sig - torch.from_numpy(target)) ** 2).mean())
        loss = torch.stack(errs).mean()
        state.optimiser_step(opt, loss, losses, bar, clip=(model.wg.parameters(), 1.0))
        sched.step()
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    bar.close()
