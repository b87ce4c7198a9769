"""The AYS-like baseline: one static density per (sampler, n), optimised against the many-step teacher
(``calibrate.teacher``) with no budget conditioning, plus l1 * KL(w || anchor) — the bench's ``ays`` method.

The n-step result of the frozen denoiser (torch) is compared with the teacher and the loss is
backpropagated through the sampler into the sigmas and so into the density. The rollout is the
package's one step loop (``core.loop.run_steps``) over torch tensors, through :class:`TorchDenoiser`.
"""
from __future__ import annotations

import json

from abcd_edge.calibrate.state import CalibrationState
from abcd_edge.io import atomic_path


class TorchDenoiser:
    """The frozen diffusers UNet as the loop's denoiser: float32 into the UNet, float64 out,
    differentiable in its inputs (so in the sigmas that made them)."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, sample, timestep):
        return self.unet(sample.float(), timestep.float()).sample.double()


def rollout_mse(state: CalibrationState, sampler: str, sigmas):
    """Teacher MSE of the n-step result from a random batch of training noises, differentiable in sigmas."""
    import torch

    from abcd_edge.core.loop import run_steps
    from abcd_edge.core.samplers import make_sampler

    data = state.teachers
    idx = torch.from_numpy(state.rng.choice(len(data.noise_train), state.cfg.wg_batch, replace=False))
    smp = make_sampler(sampler, state.schedule, sigmas, state.manifest.prediction_type)
    x0 = run_steps(TorchDenoiser(state.unet), smp, torch.from_numpy(data.noise_train)[idx].double()).x0
    return ((x0 - torch.from_numpy(data.train[sampler])[idx].double()) ** 2).mean()


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
