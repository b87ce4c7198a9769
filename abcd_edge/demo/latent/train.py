"""Train the latent demo model (a StableDiffusionPipeline folder) on CPU, resumably.

    python -m abcd_edge.demo.latent.train --stage all --work export/.demo-latent-work --out export/demo-latent-model

Stages: ``vae`` (the autoencoder, :mod:`.train_vae`), ``unet`` (text encoder + UNet on the VAE's latents,
:mod:`.train_unet`; writes ``--out`` at every checkpoint), ``save`` (rewrite ``--out`` from the last checkpoint),
``all`` (vae, then unet). Checkpoints live in ``--work`` and are written atomically: rerunning the same command
resumes where it stopped (Ctrl-C writes a checkpoint first); a finished stage is skipped. A larger ``--vae-steps`` /
``--unet-steps`` continues training from the last checkpoint.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields
from pathlib import Path

if __name__ == "__main__":   # a runtime-only install: one line naming the extra, not a ModuleNotFoundError
    from abcd_edge.extras import TRAIN_MODULES, require_or_exit

    require_or_exit("python -m abcd_edge.demo.latent.train", "train", *TRAIN_MODULES, "transformers")

from abcd_edge.demo.latent import models  # noqa: E402
from abcd_edge.demo.latent.common import Options, check_work_config  # noqa: E402

STAGES = ("vae", "unet", "save", "all")


def save_from_checkpoint(work: Path, out: Path, opts: Options, cfg: dict) -> dict:
    """Rewrite ``out`` from the UNet stage's last checkpoint (EMA weights) and the VAE stage's VAE."""
    import json

    from abcd_edge.demo.latent import save
    from abcd_edge.demo.latent.common import load_state_dict
    from abcd_edge.demo.latent.train_unet import load_vae, tokenizer_folder

    ckpt = work / "unet.ckpt"
    if not (ckpt / "state.json").is_file():
        raise SystemExit(f"{ckpt} has no checkpoint: run the unet stage first (--stage unet)")
    vae = load_vae(work)
    text, unet = models.build_text_encoder(cfg), models.build_unet(cfg)
    load_state_dict(text, ckpt / "ema_text_encoder.safetensors")
    load_state_dict(unet, ckpt / "ema_unet.safetensors")
    tokenizer_folder(work)
    stage = work / "unet_stage.json"
    info = {**json.loads(stage.read_text()), "final": True} if stage.is_file() else {
        "steps": json.loads((ckpt / "state.json").read_text())["step"], "note": "saved from a checkpoint",
        "final": False}
    return save.save_pipeline(out, work, vae, text.eval(), unet.eval(), info)


def run(stage: str, work: Path, out: Path, opts: Options, command: str) -> None:
    if stage not in STAGES:
        raise SystemExit(f"--stage {stage!r}: accepted {', '.join(STAGES)}")
    cfg = models.preset(opts.preset)
    work = Path(work)
    check_work_config(work, cfg, opts.preset)
    if stage in ("vae", "all"):
        from abcd_edge.demo.latent.train_vae import train_vae

        train_vae(work, opts, cfg, command)
    if stage in ("unet", "all"):
        from abcd_edge.demo.latent.train_unet import train_unet

        train_unet(work, Path(out), opts, cfg, command)
    if stage == "save":
        save_from_checkpoint(work, Path(out), opts, cfg)
        print(f"wrote {out}", flush=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m abcd_edge.demo.latent.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=STAGES, default="all")
    ap.add_argument("--work", type=Path, default=Path("export/.demo-latent-work"))
    ap.add_argument("--out", type=Path, default=Path("export/demo-latent-model"))
    defaults = Options()
    for f in fields(Options):
        if f.name == "progress":
            continue
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                        default=getattr(defaults, f.name), choices=list(models.PRESETS) if f.name == "preset" else None)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar or step lines")
    a = ap.parse_args(argv)
    opts = Options(**{f.name: getattr(a, f.name) for f in fields(Options) if f.name != "progress"},
                   progress=not a.no_progress)
    command = "python -m abcd_edge.demo.latent.train " + shlex.join(argv)
    run(a.stage, a.work, a.out, opts, command)


if __name__ == "__main__":
    main()
