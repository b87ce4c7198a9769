"""What the latent demo's stages share: options, the work folder's layout, checkpoints, EMA, learning rate.

Work folder (``--work``)::

    config.json                 preset + its component configs (a resumed run must match)
    pool_<seed>_<res>/<start>-<stop>.npz   the procedural training images and captions, 500 per file (:mod:`.pool`)
    tokenizer/                  the caption tokenizer (:mod:`.tokenizer`)
    vae.ckpt/  vae/  vae_recon.png  vae_stage.json        the VAE stage (:mod:`.train_vae`)
    latents_<vae hash>_<n>.npz  posterior mean / std of the UNet stage's images (encoded once)
    unet.ckpt/  samples_<step>.png  unet_stage.json       the UNet + text encoder stage (:mod:`.train_unet`)

Every checkpoint file is written atomically (``abcd_edge.io.atomic_path``), so an interrupted run (Ctrl-C, a killed
process) leaves the last complete checkpoint; rerunning the same command resumes from it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from abcd_edge.io import atomic_path

DATA_SEED = 1234            # the diffusion models' training seed (the pixel demo trains on it too)
HELDOUT_START = 1_000_000   # held-out images: the same generator seed, indices the pools never reach


@dataclass
class Options:
    preset: str = "full"
    threads: int = 1
    seed: int = 0
    ckpt_every: int = 250
    # VAE stage
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_images: int = 4000
    crop: int = 64
    vae_lr: float = 5e-4
    kl_weight: float = 1e-5
    scale_images: int = 256
    # UNet + text encoder stage
    unet_steps: int = 3600
    unet_batch: int = 32
    unet_images: int = 12000
    unet_lr: float = 3e-4
    cfg_drop: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.999
    sample_every: int = 1000
    sample_steps: int = 25
    guidance: float = 5.0
    progress: bool = True

    def to_json(self) -> dict:
        return asdict(self)


def write_json(path: Path, data) -> None:
    with atomic_path(path) as p:
        p.write_text(json.dumps(data, indent=2))


def check_work_config(work: Path, cfg: dict, preset: str) -> None:
    """Record the preset's configs in ``work/config.json``; refuse a work folder made with other configs."""
    path = work / "config.json"
    want = json.loads(json.dumps({"preset": preset, **cfg}))
    if path.is_file():
        have = json.loads(path.read_text())
        if have != want:
            raise SystemExit(f"{work} was made with preset {have.get('preset')!r} / other component configs than "
                             f"preset {preset!r}: use another --work folder (or remove it to start over)")
        return
    work.mkdir(parents=True, exist_ok=True)
    write_json(path, want)


def save_state_dict(module_or_sd, path: Path) -> None:
    from safetensors.torch import save_file

    sd = module_or_sd if isinstance(module_or_sd, dict) else module_or_sd.state_dict()
    with atomic_path(path) as p:
        save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(p))


def load_state_dict(module, path: Path) -> None:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)))


def save_torch(obj, path: Path) -> None:
    import torch

    with atomic_path(path) as p:
        torch.save(obj, p)


def resume(ckpt: Path, modules: dict, opt, label: str) -> dict | None:
    """Load a stage's checkpoint (``state.json``, ``<name>.safetensors`` per module, ``optim.pt``) into
    ``modules`` and ``opt``; its state dict, or None when there is none yet."""
    import torch

    state_file = ckpt / "state.json"
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    for name, module in modules.items():
        load_state_dict(module, ckpt / f"{name}.safetensors")
    opt.load_state_dict(torch.load(ckpt / "optim.pt", weights_only=True))
    print(f"{label}: resumed at step {state['step']} ({state['wall_s'] / 60:.1f} min so far)", flush=True)
    return state


def finished(stage_file: Path, step: int, steps: int, output: Path, label: str) -> dict | None:
    """The stage's record when it already ran all ``steps`` and wrote ``output``; else None."""
    if step >= steps and stage_file.is_file() and output.is_file():
        done = json.loads(stage_file.read_text())
        if done.get("steps") == step:
            print(f"{label}: done ({step} steps, {output.parent})", flush=True)
            return done
    return None


def ema_update(ema, model, step: int, max_decay: float) -> None:
    """EMA with warm-up: decay min(max_decay, (1 + step) / (10 + step))."""
    import torch

    decay = min(max_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.lerp_(p, 1 - decay)


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Progress:
    """A tqdm bar on a terminal; on a log file (nohup) one plain line every ``every`` steps instead."""

    def __init__(self, desc: str, total: int, initial: int, enabled: bool = True, every: int = 50):
        import sys
        import time

        self.desc, self.total, self.every, self.enabled = desc, total, every, enabled
        self.bar = None
        self.t0, self.s0 = time.monotonic(), initial
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step")

    def update(self, step: int, **shown) -> None:
        import time

        text = " ".join(f"{k} {v}" for k, v in shown.items())
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif self.enabled and (step % self.every == 0 or step == self.total):
            rate = (time.monotonic() - self.t0) / max(step - self.s0, 1)
            print(f"{self.desc} step {step}/{self.total} {text} ({rate:.2f} s/step)", flush=True)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        elif self.enabled:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
