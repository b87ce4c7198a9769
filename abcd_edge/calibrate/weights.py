"""Stage 2, the weight generator, LD3/AYS-style.

For a random feasible context the generator's density places n steps (inverse CDF); the
n-step result of the frozen denoiser (torch) from a batch of training noises is compared
with the teacher and the loss is backpropagated through the sampler into the sigmas and
so into the density; plus l1 * KL(w || anchor). The rollout is the package's one step
loop (``core.loop.run_steps``) over torch tensors, through :class:`TorchDenoiser`.
"""
from __future__ import annotations

import json

import numpy as np

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


def train_weights(state: CalibrationState) -> None:
    """Train ``state.model.wg`` for ``cfg.wg_iters`` iterations, resuming from the checkpoint (every 25)."""
    import torch
    from safetensors.torch import load_file, save_file

    from abcd_edge.core.placement import sigmas_from_density
    from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS

    cfg, spec, model = state.cfg, state.spec, state.model
    progress = state.ckpt_file("wg.json")
    done = json.loads(progress.read_text())["iter"] if progress.exists() else 0
    if done:
        model.load_state_dict(load_file(str(state.ckpt_file("model.safetensors"))))
        state.curves["wg_loss"] = json.loads(progress.read_text())["losses"]
    losses = state.curves.setdefault("wg_loss", [])
    opt = torch.optim.Adam(model.wg.parameters(), lr=cfg.wg_lr)
    anchor = torch.as_tensor(state.anchor(), dtype=torch.float32)
    bar = state.bar(cfg.wg_iters, "weights")
    bar.update(done)
    for it in range(done, cfg.wg_iters):
        sampler, profile, budget, rho, n = state.sample_context()
        n = min(n, cfg.n_train_max)
        cz = torch.tensor([[*state.context(budget, profile, rho), *SAMPLER_DESCRIPTORS[sampler]]])
        density = model.normalised_density(cz)[0]
        sigmas = sigmas_from_density(density.double(), n, spec.log_sigma_min, spec.log_sigma_max, xp=torch)
        mse = rollout_mse(state, sampler, sigmas)
        w = density / density.sum()
        kl = (w * (w / anchor).log()).sum()
        loss = mse.log() + cfg.l1_kl * kl
        state.optimiser_step(opt, loss, losses, bar, clip=(model.wg.parameters(), 1.0))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if (it + 1) % 25 == 0 or it + 1 == cfg.wg_iters:
            with atomic_path(state.ckpt_file("model.safetensors")) as p:
                save_file(model.state_dict(), str(p))
            with atomic_path(progress) as p:
                p.write_text(json.dumps({"iter": it + 1, "losses": losses}))
    bar.close()
