"""The latent demo's consistency-distilled twin: latent consistency distillation (LCM) of the base model.

The student is the base UNet with a guidance embedding (``time_cond_proj_dim``): LatentConsistencyModelPipeline
feeds it ``w = guidance_scale - 1`` as ``timestep_cond``, so classifier-free guidance is baked in and one branch
runs per step. One training step, as in the LCM paper (Luo et al. 2023) and diffusers' LCM distillation script:

* a data latent x0 with its caption, a guidance w ~ U[w_min, w_max], a skipping DDIM pair t_{n+k} > t_n on the
  solver grid (``SOLVER_STEPS`` DDIM timesteps over the 1000 train steps);
* x_{t_{n+k}} = the forward-noised x0; the frozen teacher takes one guided DDIM step to x_{t_n}
  (eps_w = eps_c + w (eps_c - eps_u), the same for x0);
* the student's consistency function f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t) (LCMScheduler's boundary
  scalings, timestep_scaling 10, sigma_data 0.5) at (x_{t_{n+k}}, t_{n+k}) is pulled (pseudo-Huber) towards
  the EMA target's f at (x_{t_n}, t_n).

Text encoder and VAE are the base model's, frozen. Resumable like the other trainers (checkpoint every
``--ckpt-every`` steps, atomically); the twin is saved in the same folder layout as the base with an
LCMScheduler and the EMA target's UNet:

    python -m abcd_edge.demo.latent.distill --base export/demo-latent-model --out export/demo-latent-lcm \\
        --work export/.demo-latent-work/distill --steps 3000 --threads 2
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

if __name__ == "__main__":   # a runtime-only install: one line naming the extra, not a ModuleNotFoundError
    from abcd_edge.extras import TRAIN_MODULES, require_or_exit

    require_or_exit("python -m abcd_edge.demo.latent.distill", "train", *TRAIN_MODULES)

import numpy as np  # noqa: E402

from abcd_edge.io import atomic_dir, atomic_path  # noqa: E402

SOLVER_STEPS = 50            # the DDIM grid the teacher steps on (k = 1000 / 50 = 20 train steps)
TIME_COND_DIM = 256          # the guidance embedding's width (LCM: 256 for SD 1.5)
TIMESTEP_SCALING = 10.0      # LCMScheduler's default: c_skip / c_out of 10 t
SIGMA_DATA = 0.5
HUBER_C = 1e-3
DATA_SEED = 4242             # the images (and captions) the twin is distilled on


def boundary_scalings(t, timestep_scaling: float = TIMESTEP_SCALING):
    """LCMScheduler.get_scalings_for_boundary_condition_discrete: (c_skip, c_out) at train timestep t."""
    s = t * timestep_scaling
    return SIGMA_DATA ** 2 / (s ** 2 + SIGMA_DATA ** 2), s / (s ** 2 + SIGMA_DATA ** 2) ** 0.5


def guidance_embedding(w, dim: int = TIME_COND_DIM):
    """LatentConsistencyModelPipeline.get_guidance_scale_embedding (torch), of w (= guidance_scale - 1)."""
    import torch

    w = w * 1000.0
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w.float()[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def student_from(teacher, time_cond_dim: int = TIME_COND_DIM):
    """The teacher UNet's config and weights plus a guidance-embedding projection (new, randomly initialised)."""
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel(**{**teacher.config, "time_cond_proj_dim": time_cond_dim})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise RuntimeError(f"student/teacher mismatch: missing {missing}, unexpected {unexpected}")
    return student


class Distiller:
    """The pieces of one distillation step (teacher, student, EMA target, the solver grid)."""

    def __init__(self, teacher, student, target, alphas_cumprod, w_range=(2.0, 10.0), solver_steps=SOLVER_STEPS):
        import torch

        self.teacher, self.student, self.target = teacher, student, target
        self.ac = torch.as_tensor(np.asarray(alphas_cumprod), dtype=torch.float32)
        T = len(self.ac)
        self.k = T // solver_steps
        self.grid = torch.arange(1, solver_steps + 1) * self.k - 1          # 19, 39, ..., 999
        self.w_range = w_range

    def _x0_eps(self, eps, x, t):
        a = self.ac[t].view(-1, 1, 1, 1)
        return (x - (1 - a).sqrt() * eps) / a.sqrt(), eps

    def _f(self, unet, x, t, w_emb, cond):
        eps = unet(x, t, encoder_hidden_states=cond, timestep_cond=w_emb, return_dict=False)[0]
        x0, _ = self._x0_eps(eps, x, t)
        c_skip, c_out = boundary_scalings(t.float())
        return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * x0

    def loss(self, latents, cond, uncond, gen):
        """The consistency distillation loss of one batch (``gen``: a torch.Generator)."""
        import torch

        b = latents.shape[0]
        idx = torch.randint(0, len(self.grid), (b,), generator=gen)
        t_start = self.grid[idx]
        t_prev = (t_start - self.k).clamp(min=0)
        w = self.w_range[0] + (self.w_range[1] - self.w_range[0]) * torch.rand(b, generator=gen)
        w_emb = guidance_embedding(w, self.student.config.time_cond_proj_dim)
        noise = torch.randn(latents.shape, generator=gen)
        a = self.ac[t_start].view(-1, 1, 1, 1)
        x_start = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = self._f(self.student, x_start, t_start, w_emb, cond)
        with torch.no_grad():
            both = self.teacher(torch.cat([x_start, x_start]), torch.cat([t_start, t_start]),
                                encoder_hidden_states=torch.cat([uncond.expand(b, -1, -1), cond]),
                                return_dict=False)[0]
            eps_u, eps_c = both[:b], both[b:]
            x0_u, _ = self._x0_eps(eps_u, x_start, t_start)
            x0_c, _ = self._x0_eps(eps_c, x_start, t_start)
            wv = w.view(-1, 1, 1, 1)
            x0_w = x0_c + wv * (x0_c - x0_u)
            eps_w = eps_c + wv * (eps_c - eps_u)
            a_prev = self.ac[t_prev].view(-1, 1, 1, 1)
            x_prev = a_prev.sqrt() * x0_w + (1 - a_prev).sqrt() * eps_w
            target = self._f(self.target, x_prev, t_prev, w_emb, cond)
        return (torch.sqrt((pred.float() - target.float()) ** 2 + HUBER_C ** 2) - HUBER_C).mean()


def data_latents(vae, n: int, cache: Path, scaling: float, batch: int = 64) -> tuple[np.ndarray, list[str]]:
    """``n`` procedural 128 x 128 images (seed DATA_SEED) encoded by the VAE (its mean x scaling) with their
    captions, cached in ``cache`` (npz)."""
    import torch

    from abcd_edge.core.images import to_model_space
    from abcd_edge.demo.captions import captioned

    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        if len(z["latents"]) == n and float(z["scaling"]) == scaling:
            return z["latents"], [str(c) for c in z["captions"]]
    lat, caps = [], []
    res = int(vae.config.sample_size)
    for i in range(0, n, batch):
        ex = [captioned(DATA_SEED, j, res) for j in range(i, min(n, i + batch))]
        x = torch.from_numpy(to_model_space(np.stack([e[0] for e in ex])))
        with torch.no_grad():
            lat.append((vae.encode(x).latent_dist.mean * scaling).numpy())
        caps += [e[2] for e in ex]
    latents = np.concatenate(lat).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp, open(tmp, "wb") as f:
        np.savez(f, latents=latents, captions=np.asarray(caps), scaling=scaling)
    return latents, caps


def save_twin(base: Path, student, out: Path, info: dict) -> None:
    """The twin's folder: the base's text encoder, tokenizer and VAE, the distilled UNet, an LCMScheduler."""
    from diffusers import LCMScheduler

    with atomic_dir(out) as tmp:
        for part in ("text_encoder", "tokenizer", "vae"):
            shutil.copytree(base / part, tmp / part)
        student.save_pretrained(tmp / "unet", safe_serialization=True)
        cfg = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
        keep = {k: v for k, v in cfg.items() if not k.startswith("_")}
        LCMScheduler.from_config({**keep, "timestep_scaling": TIMESTEP_SCALING,
                                  "original_inference_steps": SOLVER_STEPS}).save_pretrained(tmp / "scheduler")
        index = json.loads((base / "model_index.json").read_text())
        index.update({"_class_name": "LatentConsistencyModelPipeline", "scheduler": ["diffusers", "LCMScheduler"]})
        index.pop("image_encoder", None)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(twin_readme(info))


def twin_readme(info: dict) -> str:
    """The twin's README: what it is, how it was distilled (from ``training.json``)."""
    return "\n".join([
        "# abcd-edge latent demo: the consistency twin", "",
        "The base latent demo (`export/demo-latent-model`) distilled for 1-8 steps: LCM-style latent consistency "
        "distillation, guidance baked in through `timestep_cond`, the base's text encoder, tokenizer and VAE "
        "unchanged, an `LCMScheduler`.", "",
        "    from diffusers import LatentConsistencyModelPipeline",
        "    pipe = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None)",
        "    abcd-edge export --model <folder> --out <artifact>", "",
        "## Distillation (`make demo-latent-lcm`)", "",
        f"`{info['command']}`: {info['method']}; {info['steps']} steps, batch {info['batch']}, lr {info['lr']}, "
        f"target EMA {info['ema']}, guidance w drawn from {info['w_range']}, {info['images']} training images "
        f"(data seed {info['data_seed']}), {info['wall_minutes']} min on {info['threads']} thread(s); last-100 mean "
        f"loss {info['final_loss_mean_last_100']}. Recorded in `training.json`.", ""])


def main(argv=None) -> None:
    import copy

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from tqdm import tqdm
    from transformers import CLIPTextModel, CLIPTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="the base model folder (StableDiffusionPipeline layout)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True, help="checkpoint and cache folder (resumable)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--ema", type=float, default=0.95, help="EMA decay of the target network (LCM: 0.95)")
    ap.add_argument("--w-min", type=float, default=2.0)
    ap.add_argument("--w-max", type=float, default=10.0)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    t_start = time.monotonic()

    teacher = UNet2DConditionModel.from_pretrained(a.base / "unet").eval().requires_grad_(False)
    text = CLIPTextModel.from_pretrained(a.base / "text_encoder").eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(a.base / "tokenizer")
    vae = AutoencoderKL.from_pretrained(a.base / "vae").eval().requires_grad_(False)
    sched = json.loads((a.base / "scheduler" / "scheduler_config.json").read_text())
    from abcd_edge.core.noise import NoiseSchedule

    alphas = NoiseSchedule.from_config(sched).alphas_cumprod
    latents, captions = data_latents(vae, a.images, a.work / f"latents_{a.images}.npz",
                                     float(vae.config.scaling_factor))

    def embed(texts: list[str]):
        ids = tokenizer(texts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            return text(ids, return_dict=False)[0]

    vocab = sorted(set(captions))
    table = embed(vocab)
    row_of = {c: i for i, c in enumerate(vocab)}
    cap_rows = torch.as_tensor([row_of[c] for c in captions])
    uncond = embed([""])

    student = student_from(teacher)
    target = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=a.lr, weight_decay=0.0)
    dist = Distiller(teacher, student, target, alphas, (a.w_min, a.w_max))
    gen = torch.Generator().manual_seed(a.seed)
    step, losses, wall = 0, [], 0.0
    ckpt = a.work / "distill.ckpt.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        student.load_state_dict(state["student"])
        target.load_state_dict(state["target"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        step, losses, wall = state["step"], state["losses"], state["wall"]
    bar = tqdm(total=a.steps, initial=step, desc="distill")
    data = torch.from_numpy(latents)
    while step < a.steps:
        idx = torch.randint(0, len(data), (a.batch,), generator=gen)
        loss = dist.loss(data[idx], table[cap_rows[idx]], uncond, gen)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for pt, ps in zip(target.parameters(), student.parameters()):
                pt.mul_(a.ema).add_(ps.detach(), alpha=1 - a.ema)
        losses.append(float(loss))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if step % a.ckpt_every == 0 or step == a.steps:
            a.work.mkdir(parents=True, exist_ok=True)
            with atomic_path(ckpt) as tmp:
                torch.save({"student": student.state_dict(), "target": target.state_dict(), "opt": opt.state_dict(),
                            "gen": gen.get_state(), "step": step, "losses": losses,
                            "wall": wall + time.monotonic() - t_start}, tmp)
    bar.close()
    info = {"command": "python -m abcd_edge.demo.latent.distill " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()),
            "method": "latent consistency distillation (LCM): guided DDIM teacher on a "
                      f"{SOLVER_STEPS}-step grid, pseudo-Huber consistency loss to an EMA target",
            "steps": step, "batch": a.batch, "lr": a.lr, "ema": a.ema, "w_range": [a.w_min, a.w_max],
            "time_cond_proj_dim": TIME_COND_DIM, "images": a.images, "data_seed": DATA_SEED,
            "wall_minutes": round((wall + time.monotonic() - t_start) / 60, 2),
            "final_loss_mean_last_100": round(float(np.mean(losses[-100:])), 5) if losses else None,
            "threads": a.threads, "torch": torch.__version__}
    save_twin(a.base, target, a.out, info)
    print(f"twin -> {a.out} ({step} steps, loss {info['final_loss_mean_last_100']})")


if __name__ == "__main__":
    main()
