"""Stage 1: the AutoencoderKL (128 x 128 x 3 <-> 16 x 16 x 4) on procedural images.

Fully convolutional (no mid-block attention), so it trains on random ``crop`` x ``crop`` crops of the 128 px pool
images (with flips and quarter turns) and is evaluated on whole held-out 128 px images. Loss: mean L1 reconstruction
+ ``kl_weight`` x KL (summed over the latent, divided by the crop's pixel values: the weighting of the LDM
autoencoders, where both terms are sums). AdamW, warm-up then cosine decay to 10 % at ``vae_steps``. At the end,
``scaling_factor = 1 / std(latents)`` over ``scale_images`` pool images (as Stable Diffusion's 0.18215 was found)
goes into the VAE's config, and the VAE is written to ``work/vae/`` (atomically) with ``work/vae_stage.json``.
Each checkpoint also writes ``work/vae_recon.png``: held-out originals (top) over their reconstructions (bottom).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from abcd_edge.demo.latent import models
from abcd_edge.demo.latent.common import (Options, Progress, finished, resume, save_state_dict, save_torch,
                                          write_json)
from abcd_edge.demo.latent.pool import held_out, pool

EVAL_IMAGES = 16
WARMUP = 100


def to_model(images_u8):
    """uint8 NHWC (numpy or torch) -> float32 NCHW in [-1, 1]."""
    import torch

    x = torch.as_tensor(np.asarray(images_u8)) if not isinstance(images_u8, torch.Tensor) else images_u8
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(x) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    return ((x.detach().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def random_crops(data, n: int, crop: int, gen):
    """``n`` random crops of the uint8 NHWC tensor ``data``, randomly flipped and turned -> float NCHW."""
    import torch

    size = data.shape[1]
    idx = torch.randint(0, data.shape[0], (n,), generator=gen)
    offs = torch.randint(0, size - crop + 1, (n, 2), generator=gen)
    flips = torch.randint(0, 2, (n,), generator=gen)
    turns = torch.randint(0, 4, (n,), generator=gen)
    out = []
    for i in range(n):
        y, x = int(offs[i, 0]), int(offs[i, 1])
        c = data[int(idx[i]), y:y + crop, x:x + crop]
        if flips[i]:
            c = c.flip(1)
        out.append(torch.rot90(c, int(turns[i]), dims=(0, 1)))
    return to_model(torch.stack(out))


def lr_at(step: int, steps: int, lr: float) -> float:
    if step < WARMUP:
        return lr * (step + 1) / WARMUP
    frac = min(1.0, (step - WARMUP) / max(steps - WARMUP, 1))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def evaluate(vae, images_u8: np.ndarray) -> tuple[dict, np.ndarray]:
    """Whole-image reconstruction (posterior mean) of held-out images: {l1, psnr_db} on 0..255, and the
    reconstructions (uint8 NHWC)."""
    import torch

    with torch.no_grad():
        x = to_model(images_u8)
        rec = to_uint8(vae.decode(vae.encode(x).latent_dist.mode()).sample)
    err = rec.astype(np.float64) - images_u8.astype(np.float64)
    mse = float(np.mean(err ** 2))
    return {"l1_0_255": round(float(np.mean(np.abs(err))), 3),
            "psnr_db": round(10 * math.log10(255 ** 2 / max(mse, 1e-12)), 2)}, rec


def recon_grid(originals: np.ndarray, recons: np.ndarray, path: Path, cols: int = 8, scale: int = 2) -> None:
    """Originals (top row) over reconstructions (next row), ``cols`` per row pair, upscaled ``scale`` times."""
    from abcd_edge.core.images import png_bytes
    from abcd_edge.io import atomic_path

    rows = []
    for k in range(0, len(originals), cols):
        a, b = originals[k:k + cols], recons[k:k + cols]
        rows += [np.concatenate(list(a), axis=1), np.concatenate(list(b), axis=1),
                 np.full((4, a.shape[0] * a.shape[2], 3), 255, np.uint8)]
    grid = np.concatenate(rows[:-1], axis=0)
    with atomic_path(path) as p:
        p.write_bytes(png_bytes(grid, scale=scale))


def scaling_factor(vae, images_u8: np.ndarray, gen, batch: int = 16) -> dict:
    """1 / std of sampled latents of ``images_u8`` (whole images), with per-channel mean / std for the record."""
    import torch

    zs = []
    with torch.no_grad():
        for k in range(0, len(images_u8), batch):
            zs.append(vae.encode(to_model(images_u8[k:k + batch])).latent_dist.sample(generator=gen))
    z = torch.cat(zs)
    std = float(z.std())
    return {"scaling_factor": 1.0 / std, "latent_std": std, "latent_mean": float(z.mean()),
            "channel_mean": [round(float(v), 4) for v in z.mean(dim=(0, 2, 3))],
            "channel_std": [round(float(v), 4) for v in z.std(dim=(0, 2, 3))], "images": len(images_u8)}


def train_vae(work: Path, opts: Options, cfg: dict, command: str) -> dict:
    """Train (or resume) the VAE stage; returns what ``work/vae_stage.json`` records."""
    import torch

    from abcd_edge.io import atomic_dir

    torch.manual_seed(opts.seed)
    torch.set_num_threads(opts.threads)
    res, steps = cfg["resolution"], opts.vae_steps
    ckpt = work / "vae.ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    state_file = ckpt / "state.json"
    final, stage_file = work / "vae", work / "vae_stage.json"

    vae = models.build_vae(cfg)
    opt = torch.optim.AdamW(vae.parameters(), lr=opts.vae_lr, weight_decay=0.0)
    step, wall, hist = 0, 0.0, {"loss": [], "l1": [], "kl": []}
    evals: list[dict] = []
    state = resume(ckpt, {"model": vae}, opt, "vae")
    if state is not None:
        step, wall, hist, evals = state["step"], state["wall_s"], state["history"], state["evals"]
    done = finished(stage_file, step, steps, final / "config.json", "vae")
    if done is not None:
        return done

    images, _ = pool(work, opts.vae_images, res, progress=opts.progress)
    data = torch.from_numpy(images)
    ev_images, _ = held_out(EVAL_IMAGES, res)

    def checkpoint() -> None:
        nonlocal wall, t_last
        now = time.monotonic()
        wall += now - t_last
        t_last = now
        vae.eval()
        ev, rec = evaluate(vae, ev_images)
        vae.train()
        evals.append({"step": step, **ev})
        recon_grid(ev_images, rec, work / "vae_recon.png")
        save_state_dict(vae, ckpt / "model.safetensors")
        save_torch(opt.state_dict(), ckpt / "optim.pt")
        write_json(state_file, {"step": step, "wall_s": wall, "history": hist, "evals": evals})
        bar.write(f"vae: checkpoint at step {step}: held-out L1 {ev['l1_0_255']} (0..255), PSNR {ev['psnr_db']} dB")

    gen = torch.Generator().manual_seed(opts.seed + step)
    bar = Progress("vae", steps, step, opts.progress)
    t_last = time.monotonic()
    vae.train()
    try:
        while step < steps:
            x = random_crops(data, opts.vae_batch, opts.crop, gen)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, opts.vae_lr)
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=gen)).sample
            l1 = (rec - x).abs().mean()
            kl = post.kl().mean() / x[0].numel()
            loss = l1 + opts.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            step += 1
            for k, v in (("loss", loss), ("l1", l1), ("kl", kl)):
                hist[k].append(round(v.item(), 6))
            bar.update(step, loss=f"{np.mean(hist['loss'][-50:]):.4f}", l1=f"{np.mean(hist['l1'][-50:]):.4f}",
                       kl=f"{np.mean(hist['kl'][-50:]):.3f}")
            if step % opts.ckpt_every == 0 or step == steps:
                checkpoint()
    except KeyboardInterrupt:
        if not state_file.exists() or json.loads(state_file.read_text())["step"] != step:
            checkpoint()
        bar.close()
        raise SystemExit(f"vae: interrupted; checkpoint at step {step} in {ckpt} (rerun the command to resume)")
    bar.close()

    vae.eval()
    scale = scaling_factor(vae, images[:opts.scale_images], torch.Generator().manual_seed(opts.seed))
    vae.register_to_config(scaling_factor=scale["scaling_factor"])
    with atomic_dir(final) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
    info = {"command": command, "steps": step, "batch": opts.vae_batch, "crop": opts.crop, "lr": opts.vae_lr,
            "lr_schedule": f"warm-up {WARMUP} steps, cosine to 10 % at {steps}", "kl_weight": opts.kl_weight,
            "loss": "mean L1 + kl_weight * KL (summed over the latent) / pixel values of the crop",
            "augment": "random crops, horizontal flips, quarter turns", "images": opts.vae_images,
            "wall_minutes": round(wall / 60, 2), "threads": opts.threads,
            "final_loss_mean_last_100": round(float(np.mean(hist["loss"][-100:])), 5),
            "final_l1_mean_last_100": round(float(np.mean(hist["l1"][-100:])), 5),
            "first_losses": hist["loss"][:5], "held_out": evals[-1] if evals else None,
            "held_out_images": EVAL_IMAGES, "latents": scale, "parameters": models.n_params(vae)}
    write_json(stage_file, info)
    print(f"vae: done, scaling_factor {scale['scaling_factor']:.4f} (latent std {scale['latent_std']:.4f}); "
          f"written {final}", flush=True)
    return info
