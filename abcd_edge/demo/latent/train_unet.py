"""Stage 2: the text encoder and the UNet, trained jointly on (caption, VAE latent x scaling_factor) pairs.

Needs the VAE stage's ``work/vae/``. The pool's ``unet_images`` images are encoded once (posterior mean and std,
cached as ``work/latents_<vae hash>_<n>.npz``), so a step costs only the text encoder and the UNet: a latent is
sampled from the cached posterior, scaled by the VAE's ``scaling_factor``, noised with Stable Diffusion's schedule
(DDPM, scaled_linear 0.00085..0.012, 1000 steps) and the UNet predicts the noise (epsilon) from the caption's hidden
states. ``cfg_drop`` of the captions are replaced by "" (classifier-free guidance). Loss: MSE on epsilon, weighted
per sample by min(SNR, ``snr_gamma``) / SNR (Min-SNR; 0 turns it off). AdamW with a linear warm-up, gradient
clipping at 1, EMA of both networks (the saved weights). Every checkpoint also writes the pipeline folder ``out``
from the EMA weights (:mod:`.save`); every ``sample_every`` steps and at the end a sample grid.
"""
from __future__ import annotations

import copy
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from abcd_edge.demo.latent import models
from abcd_edge.demo.latent.common import (Options, Progress, ema_update, finished, resume, save_state_dict, save_torch,
                                          sha256_file, write_json)
from abcd_edge.demo.latent.pool import pool
from abcd_edge.demo.latent.tokenizer import load_tokenizer, write_tokenizer
from abcd_edge.io import atomic_path

WARMUP = 200


def load_vae(work: Path):
    from diffusers import AutoencoderKL

    folder = work / "vae"
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} does not exist: run the vae stage first (--stage vae)")
    return AutoencoderKL.from_pretrained(str(folder), low_cpu_mem_usage=False).eval()


def tokenizer_folder(work: Path) -> Path:
    folder = work / "tokenizer"
    if not (folder / "vocab.json").is_file():
        write_tokenizer(folder)
    return folder


def encoded_latents(work: Path, vae, images: np.ndarray, progress: bool, batch: int = 16
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and std (float32 [n, C, h, w]) of ``images`` under ``vae``, cached per VAE weights."""
    import torch

    from abcd_edge.demo.latent.train_vae import to_model

    key = sha256_file(work / "vae" / "diffusion_pytorch_model.safetensors")[:12]
    path = work / f"latents_{key}_{len(images)}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["mean"], z["std"]
    for old in work.glob("latents_*_*.npz"):          # this stage's caches of an earlier VAE (only its own names)
        if re.fullmatch(r"latents_[0-9a-f]{12}_\d+", old.stem):
            old.unlink()
    bar = None
    if progress:
        from tqdm import tqdm

        print(f"encoding {len(images)} images with the VAE (once; cached in {path.name}) ...", flush=True)
        bar = tqdm(total=len(images), desc="latents", unit="img", mininterval=0.1 if sys.stderr.isatty() else 30)
    means, stds = [], []
    with torch.no_grad():
        for k in range(0, len(images), batch):
            d = vae.encode(to_model(images[k:k + batch])).latent_dist
            means.append(d.mean.numpy())
            stds.append(d.std.numpy())
            if bar is not None:
                bar.update(len(means[-1]))
    if bar is not None:
        bar.close()
    mean, std = np.concatenate(means), np.concatenate(stds)
    with atomic_path(path) as p:
        with open(p, "wb") as f:
            np.savez(f, mean=mean, std=std)
    return mean, std


def train_unet(work: Path, out: Path, opts: Options, cfg: dict, command: str) -> dict:
    """Train (or resume) the text encoder + UNet stage, writing ``out`` at every checkpoint; returns what
    ``work/unet_stage.json`` records."""
    import torch

    from abcd_edge.demo.latent import save

    torch.manual_seed(opts.seed)
    torch.set_num_threads(opts.threads)
    res, steps = cfg["resolution"], opts.unet_steps
    ckpt = work / "unet.ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    state_file = ckpt / "state.json"
    stage_file = work / "unet_stage.json"

    vae = load_vae(work)
    sf = float(vae.config.scaling_factor)
    tok = load_tokenizer(tokenizer_folder(work))
    text, unet = models.build_text_encoder(cfg), models.build_unet(cfg)
    ema_text, ema_unet = copy.deepcopy(text).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=opts.unet_lr, weight_decay=0.0)
    step, wall, hist = 0, 0.0, {"loss": [], "mse": []}
    state = resume(ckpt, {"unet": unet, "text_encoder": text, "ema_unet": ema_unet,
                          "ema_text_encoder": ema_text}, opt, "unet")
    if state is not None:
        step, wall, hist = state["step"], state["wall_s"], state["history"]
    done = finished(stage_file, step, steps, out / "model_index.json", "unet")
    if done is not None:
        return done

    images, caps = pool(work, opts.unet_images, res, progress=opts.progress)
    mean, std = encoded_latents(work, vae, images, opts.progress)
    del images
    mean, std = torch.from_numpy(mean), torch.from_numpy(std)
    length = tok.model_max_length
    ids = tok(caps, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    alphas_cumprod = models.build_noise_scheduler().alphas_cumprod

    def info() -> dict:
        return {"command": command, "steps": step, "batch": opts.unet_batch, "lr": opts.unet_lr,
                "lr_schedule": f"linear warm-up {WARMUP} steps, then constant", "images": opts.unet_images,
                "cfg_drop": opts.cfg_drop, "snr_gamma": opts.snr_gamma, "ema_decay": opts.ema_decay,
                "scaling_factor": sf, "wall_minutes": round(wall / 60, 2), "threads": opts.threads,
                "loss": "epsilon MSE" + (f", Min-SNR-{opts.snr_gamma:g} weighted" if opts.snr_gamma > 0 else ""),
                "final_loss_mean_last_200": round(float(np.mean(hist["loss"][-200:])), 5) if hist["loss"] else None,
                "final_mse_mean_last_200": round(float(np.mean(hist["mse"][-200:])), 5) if hist["mse"] else None,
                "first_losses": hist["loss"][:5],
                "loss_curve_mean_per_ckpt": [round(float(np.mean(hist["loss"][k:k + opts.ckpt_every])), 5)
                                             for k in range(0, len(hist["loss"]), opts.ckpt_every)]}

    def checkpoint(final: bool = False) -> None:
        nonlocal wall, t_last
        now = time.monotonic()
        wall += now - t_last
        t_last = now
        for module, name in ((unet, "unet"), (text, "text_encoder"), (ema_unet, "ema_unet"),
                             (ema_text, "ema_text_encoder")):
            save_state_dict(module, ckpt / f"{name}.safetensors")
        save_torch(opt.state_dict(), ckpt / "optim.pt")
        write_json(state_file, {"step": step, "wall_s": wall, "history": hist})
        grid = None
        if final or (opts.sample_every and step % opts.sample_every == 0):
            grid = work / f"samples_{step:06d}.png"
            save.sample_grid(vae, ema_text, ema_unet, tok, grid, guidance=opts.guidance,
                             steps=opts.sample_steps)
        save.save_pipeline(out, work, vae, ema_text, ema_unet, {**info(), "final": final}, samples=grid)
        t_last = time.monotonic()     # sampling and saving are not training time
        bar.write(f"unet: checkpoint at step {step}; wrote {out}" + (f" and {grid.name}" if grid else ""))

    gen = torch.Generator().manual_seed(opts.seed + step)
    bar = Progress("unet", steps, step, opts.progress)
    t_last = time.monotonic()
    final_written = False
    unet.train()
    text.train()
    try:
        while step < steps:
            b = opts.unet_batch
            idx = torch.randint(0, len(ids), (b,), generator=gen)
            z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * sf
            drop = torch.rand(b, generator=gen) < opts.cfg_drop
            batch_ids = torch.where(drop[:, None], empty, ids[idx])
            t = torch.randint(0, len(alphas_cumprod), (b,), generator=gen)
            noise = torch.randn(z0.shape, generator=gen)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
            for g in opt.param_groups:
                g["lr"] = opts.unet_lr * min(1.0, (step + 1) / WARMUP)
            hidden = text(batch_ids)[0]
            pred = unet(zt, t, hidden).sample
            mse = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
            if opts.snr_gamma > 0:
                snr = a.view(-1) / (1 - a.view(-1))
                loss = (mse * snr.clamp(max=opts.snr_gamma) / snr).mean()
            else:
                loss = mse.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            ema_update(ema_unet, unet, step, opts.ema_decay)
            ema_update(ema_text, text, step, opts.ema_decay)
            step += 1
            hist["loss"].append(round(loss.item(), 6))
            hist["mse"].append(round(mse.mean().item(), 6))
            bar.update(step, loss=f"{np.mean(hist['loss'][-100:]):.4f}", mse=f"{np.mean(hist['mse'][-100:]):.4f}")
            if step % opts.ckpt_every == 0 or step == steps:
                checkpoint(final=step == steps)
                final_written = step == steps
    except KeyboardInterrupt:
        if not state_file.exists() or json.loads(state_file.read_text())["step"] != step:
            checkpoint()
        bar.close()
        raise SystemExit(f"unet: interrupted; checkpoint at step {step} in {ckpt} (rerun the command to resume)")
    bar.close()
    if not final_written:        # resumed past the last step, or a run stopped between its checkpoint and here
        checkpoint(final=True)
    done = info()
    write_json(stage_file, done)
    print(f"unet: done ({step} steps); pipeline folder {out}", flush=True)
    return done
