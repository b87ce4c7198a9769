"""Stage 4, the exit policy, trained on the traces with the joint loss of DESIGN.md.

Q_t (the normalised quality of the current x0) is 1 - d_t / d_0, d_t the teacher MSE of x0
after step t and d_0 after the first step, clipped to [0, 1]. The teacher term is weighted
by rho: the quality knob sets how much closeness to the teacher is worth against the step
penalty.
"""
from __future__ import annotations

import numpy as np

from abcd_edge.calibrate.state import CalibrationConfig, CalibrationState
from abcd_edge.formats.controller import decision_features


def policy_tensors(traces: list[dict]):
    """Per trace: features [B, n, POLICY_DIM] and the loss terms' inputs."""
    import torch

    from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS

    rows = []
    for tr in traces:
        d = np.asarray(tr["d"])
        b, n = d.shape
        descriptor = SAMPLER_DESCRIPTORS[tr["sampler"]]
        feats = np.zeros((b, n, len(decision_features(1, 0, 0, 0, tr["context"], descriptor)[0])), np.float32)
        for j in range(b):
            for t in range(n):
                feats[j, t] = decision_features(tr["sigmas"][t], tr["change"][j][t], (t + 1) / n,
                                                tr["elapsed"][t] / tr["budget"], tr["context"], descriptor)[0]
        quality = np.clip(1 - d / np.maximum(d[:, :1], 1e-12), 0, 1)
        rows.append(dict(feats=torch.from_numpy(feats), d=torch.from_numpy(d / np.maximum(d[:, :1], 1e-12)).float(),
                         q=torch.from_numpy(quality).float(), rho=tr["rho"],
                         over=torch.tensor([max(0.0, c - tr["budget"]) / tr["budget"] for c in tr["cost"]]),
                         steps=torch.arange(1, n + 1, dtype=torch.float32)))
    return rows


def policy_loss(model, cfg: CalibrationConfig, row: dict, temperature: float = 0.5, gumbel: bool = True):
    """The joint loss over one trace, survival-weighted by the stop probabilities.

    q_t = S_t p_t (S_t = prod_{s<t} (1 - p_s)), the last step forced to stop; per step:
    rho * d_t/d_0 + l2 * over_t^2 + l3 * max(0, rho - Q_t) + l4 * t / K_max.
    """
    import torch

    logits = model.policy_logit(row["feats"])[..., 0]          # [B, n]
    if gumbel:
        u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
        logits = logits + (u.log() - (-u).log1p())
    p = torch.sigmoid(logits / temperature)
    p = torch.cat([p[:, :-1], torch.ones_like(p[:, -1:])], 1)
    survive = torch.cumprod(torch.cat([torch.ones_like(p[:, :1]), 1 - p[:, :-1]], 1), 1)
    q = survive * p
    per_step = (row["rho"] * row["d"] + cfg.l2_budget * row["over"] ** 2
                + cfg.l3_quality * torch.clamp(row["rho"] - row["q"], min=0)
                + cfg.l4_steps * row["steps"] / cfg.trace_max_steps)
    return (q * per_step).sum(1).mean()


def train_policy(state: CalibrationState, traces: list[dict]) -> None:
    import torch

    rows = policy_tensors(traces)
    opt = torch.optim.Adam(state.model.policy.parameters(), lr=3e-3)
    losses = state.curves.setdefault("policy_loss", [])
    bar = state.bar(state.cfg.policy_iters, "policy")
    for _ in range(state.cfg.policy_iters):
        batch = [rows[k] for k in state.rng.choice(len(rows), min(16, len(rows)), replace=False)]
        loss = sum(policy_loss(state.model, state.cfg, r) for r in batch) / len(batch)
        state.optimiser_step(opt, loss, losses, bar)
    bar.close()
