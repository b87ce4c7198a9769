"""Stage 5, the cost predictor: next-step and finishing tail latency from a profile's statistics and the
running correction, trained on the profiles' raw samples with the pinball loss at q = spec.quantile (0.99)."""
from __future__ import annotations

import math

import numpy as np

from abcd_edge.calibrate.state import CalibrationState


def train_cost(state: CalibrationState) -> None:
    import torch

    opt = torch.optim.Adam(state.model.cost.parameters(), lr=3e-3)
    losses = state.curves.setdefault("cost_loss", [])
    q = state.spec.quantile
    rng = state.rng
    bar = state.bar(state.cfg.cost_iters, "cost")
    for _ in range(state.cfg.cost_iters):
        feats, targets = [], []
        for _ in range(32):
            p = state.profiles[int(rng.integers(len(state.profiles)))]
            corr = float(math.exp(rng.uniform(math.log(0.5), math.log(2.0))))
            feats.append(p.cost_features(corr)[0])
            targets.append([corr * float(rng.choice(p.step_samples_ms)), float(rng.choice(p.finish_samples_ms))])
        pred = state.model.cost_log(torch.from_numpy(np.stack(feats))).exp()
        err = torch.tensor(targets, dtype=torch.float32) - pred
        loss = torch.maximum(q * err, (q - 1) * err).mean()
        state.optimiser_step(opt, loss, losses, bar)
    bar.close()


def cost_error(state: CalibrationState) -> dict:
    """Cost predictor vs each profile's measured step samples (correction 1)."""
    ctl = state.numpy_controller()
    out = {}
    for p in state.profiles:
        pred, _ = ctl.predict_cost_ms(p.cost_features(1.0))
        s = p.step_samples_ms
        p99 = float(np.quantile(s, 0.99))
        out[p.name] = {"predicted_tail_ms": pred, "measured_p99_ms": p99, "coverage": float(np.mean(s <= pred)),
                       "tail_error": float(pred / p99 - 1), "within_10pct": bool(abs(pred / p99 - 1) <= 0.10)}
    return out
