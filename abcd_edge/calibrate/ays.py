"""The AYS-like baseline: one static density per (sampler, n), optimised against the teacher with no
budget conditioning (the bench's ``ays`` method). Same rollout and KL anchor as the weight generator."""
from __future__ import annotations

import json

from abcd_edge.calibrate.state import CalibrationState
from abcd_edge.calibrate.weights import rollout_mse
from abcd_edge.io import atomic_path


def train_ays(state: CalibrationState) -> dict:
    """{sampler: {str(n): {"density": [...], "sigmas": [...]}}}, checkpointed after each (sampler, n)."""
    import torch

    from abcd_edge.core.placement import sigmas_from_density

    cfg, spec = state.cfg, state.spec
    f = state.ckpt_file("ays.json")
    table = json.loads(f.read_text()) if f.exists() else {}
    anchor = torch.as_tensor(state.anchor(), dtype=torch.float64)
    todo = [(s, n) for s in cfg.samplers for n in cfg.ays_steps if str(n) not in table.get(s, {})]
    bar = state.bar(len(todo) * cfg.ays_iters, "ays")
    for sampler, n in todo:
        logits = anchor.log().clone().requires_grad_(True)
        opt = torch.optim.Adam([logits], lr=0.05)
        for _ in range(cfg.ays_iters):
            density = logits.softmax(0)
            sigmas = sigmas_from_density(density, n, spec.log_sigma_min, spec.log_sigma_max, xp=torch)
            kl = (density * (density / anchor).log()).sum()
            loss = rollout_mse(state, sampler, sigmas).log() + cfg.l1_kl * kl
            state.optimiser_step(opt, loss, None, bar)
        density = logits.softmax(0).detach().numpy()
        sig = sigmas_from_density(density, n, spec.log_sigma_min, spec.log_sigma_max)
        table.setdefault(sampler, {})[str(n)] = {"density": density.tolist(), "sigmas": sig.tolist()}
        with atomic_path(f) as p:
            p.write_text(json.dumps(table))
    bar.close()
    return table
