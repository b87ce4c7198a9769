"""Train the shipped demo denoiser (a diffusers UNet2DModel) on the procedural data set.

CPU only, resumable: a checkpoint (model, EMA, optimiser, step) is written
atomically every ``--ckpt-every`` steps; rerunning the same command resumes.
The EMA weights are saved as a diffusers pipeline-style folder
(``unet/`` + ``scheduler/``) with a ``training.json`` of what was done.

    python -m abcd_edge.demo.train --out export/demo-model --steps 6000
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

if __name__ == "__main__":   # a runtime-only install: one line naming the extra, not a ModuleNotFoundError
    from abcd_edge.extras import TRAIN_MODULES, require_or_exit

    require_or_exit("python -m abcd_edge.demo.train", "train", *TRAIN_MODULES)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from abcd_edge.core.images import to_model_space  # noqa: E402
from abcd_edge.demo.data import make_images  # noqa: E402
from abcd_edge.io import atomic_dir, atomic_path  # noqa: E402

DATA_SEED = 1234
UNET_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=16,
    attention_head_dim=32,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                        beta_schedule="linear", prediction_type="epsilon", clip_sample=True)


def build_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def save_pipeline_folder(unet, out: Path, info: dict) -> None:
    """Write unet/ + scheduler/ + training.json atomically as one folder."""
    with atomic_dir(out) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        build_scheduler().save_pretrained(tmp / "scheduler")
        (tmp / "training.json").write_text(json.dumps(info, indent=2))


def train(out: Path, steps: int, batch: int, lr: float, n_images: int, ckpt_every: int,
          threads: int, seed: int) -> None:
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    ckpt_dir = out.parent / (out.name + ".ckpt")
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    print(f"generating {n_images} training images (seed {DATA_SEED}) ...", flush=True)
    data = torch.from_numpy(to_model_space(make_images(DATA_SEED, n_images)))
    unet = build_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    alphas_cumprod = build_scheduler().alphas_cumprod
    step, wall, losses = 0, 0.0, []
    state_file = ckpt_dir / "state.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        step, wall, losses = state["step"], state["wall_s"], state["losses"]
        unet.load_state_dict(load_file(ckpt_dir / "model.safetensors"))
        ema.load_state_dict(load_file(ckpt_dir / "ema.safetensors"))
        opt.load_state_dict(torch.load(ckpt_dir / "optim.pt", weights_only=True))
        print(f"resumed at step {step} ({wall / 60:.1f} min so far)", flush=True)

    gen = torch.Generator().manual_seed(seed + step)
    bar = tqdm(total=steps, initial=step, desc="demo-model", unit="step")
    t_last = time.monotonic()
    while step < steps:
        idx = torch.randint(0, n_images, (batch,), generator=gen)
        x0 = data[idx]
        flip = torch.rand(batch, generator=gen) < 0.5
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 200)
        loss = torch.nn.functional.mse_loss(unet(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
        if step % ckpt_every == 0 or step == steps:
            now = time.monotonic()
            wall += now - t_last
            t_last = now
            with atomic_path(ckpt_dir / "model.safetensors") as p:
                save_file(unet.state_dict(), str(p))
            with atomic_path(ckpt_dir / "ema.safetensors") as p:
                save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(p))
            with atomic_path(ckpt_dir / "optim.pt") as p:
                torch.save(opt.state_dict(), p)
            with atomic_path(state_file) as p:
                p.write_text(json.dumps({"step": step, "wall_s": wall, "losses": losses}))
            info = {
                "command": f"python -m abcd_edge.demo.train --out {out} --steps {steps} --batch {batch} "
                           f"--lr {lr} --images {n_images} --threads {threads} --seed {seed}",
                "steps": step, "batch": batch, "lr": lr, "images": n_images, "data_seed": DATA_SEED,
                "wall_minutes": round(wall / 60, 2), "threads": threads,
                "final_loss_mean_last_200": round(float(np.mean(losses[-200:])), 5),
                "parameters": sum(p.numel() for p in unet.parameters()),
                "ema": "decay min(0.999, (1+step)/(10+step))",
            }
            save_pipeline_folder(ema, out, info)
    bar.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("export/demo-model"))
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--images", type=int, default=40000)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    train(a.out, a.steps, a.batch, a.lr, a.images, a.ckpt_every, a.threads, a.seed)


if __name__ == "__main__":
    main()
