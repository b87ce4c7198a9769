"""The latent demo's output: a StableDiffusionPipeline folder, and sample grids.

    model_index.json   StableDiffusionPipeline; safety_checker / feature_extractor null, requires_safety_checker false
    unet/ vae/ text_encoder/   safetensors weights (the UNet stage's EMA weights; the VAE stage's VAE)
    tokenizer/         the caption tokenizer (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)
    scheduler/         DDIMScheduler as SD 1.5 ships it (scaled_linear 0.00085..0.012, set_alpha_to_one false,
                       steps_offset 1, epsilon)
    training.json      both stages: commands, steps, wall time, losses, held-out VAE reconstruction, parameters
    README.md          the same in words
    samples.png        the latest sample grid (reference images of held-out prompts over generated ones)

``StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)`` loads it; ``abcd-edge export --model folder``
exports it. The folder is written atomically (``abcd_edge.io.atomic_dir``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from abcd_edge.demo.captions import PROMPT_SEED, captioned, prompt_set
from abcd_edge.demo.latent import models
from abcd_edge.io import atomic_dir, atomic_path

COMPONENTS = ("unet", "vae", "text_encoder")
SAMPLE_STEPS = 25


def sample_prompts() -> list[tuple[int, str]]:
    """Held-out prompts (the shipped prompt seed, not a training seed): 3 easy, 3 medium, 2 hard."""
    return prompt_set("easy", 3) + prompt_set("medium", 3) + prompt_set("hard", 2)


def pipeline(vae, text, unet, tokenizer):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=models.build_sampling_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_grid(vae, text, unet, tokenizer, path: Path, guidance: float = 5.0, steps: int = SAMPLE_STEPS,
                per_prompt: int = 2, scale: int = 1) -> None:
    """PNG: per held-out prompt a column, the prompt's reference image on top, ``per_prompt`` samples (DDIM
    ``steps`` steps, guidance ``guidance``, seed 0) below."""
    import torch

    from abcd_edge.core.images import png_bytes

    prompts = sample_prompts()
    res = vae.config.sample_size
    refs = [captioned(PROMPT_SEED, i, res)[0] for i, _ in prompts]
    with torch.no_grad():
        out = pipeline(vae, text, unet, tokenizer)(
            [c for _, c in prompts], num_inference_steps=steps, guidance_scale=guidance,
            num_images_per_prompt=per_prompt, generator=torch.Generator().manual_seed(0), output_type="np",
            height=res, width=res).images
    gen = (np.clip(out, 0, 1) * 255).round().astype(np.uint8).reshape(len(prompts), per_prompt, res, res, 3)
    rows = [np.concatenate(refs, axis=1)] + [np.concatenate(list(gen[:, k]), axis=1) for k in range(per_prompt)]
    grid = np.concatenate(rows, axis=0)
    with atomic_path(path) as p:
        p.write_bytes(png_bytes(grid, scale=scale))
    with atomic_path(path.with_suffix(".txt")) as p:
        p.write_text("".join(f"column {k}: {c}\n" for k, (_, c) in enumerate(prompts)) +
                     f"rows: reference image, then {per_prompt} samples (DDIM {steps} steps, guidance {guidance})\n")


def model_index() -> dict:
    import diffusers

    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
            "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def latest_samples(work: Path) -> Path | None:
    found = sorted(work.glob("samples_*.png"))
    return found[-1] if found else None


def save_pipeline(out: Path, work: Path, vae, text, unet, unet_info: dict, samples: Path | None = None) -> dict:
    """Write the pipeline folder ``out`` (see the module docstring); returns its training.json."""
    out = Path(out)
    samples = samples or latest_samples(work)
    vae_info = json.loads((work / "vae_stage.json").read_text()) if (work / "vae_stage.json").is_file() else None
    with atomic_dir(out) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        text.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        shutil.copytree(work / "tokenizer", tmp / "tokenizer")
        models.build_sampling_scheduler().save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps(model_index(), indent=2))
        components = {}
        for name, module in zip(COMPONENTS, (unet, vae, text)):
            size = sum(f.stat().st_size for f in (tmp / name).glob("*.safetensors"))
            components[name] = {"class": type(module).__name__, "parameters": models.n_params(module),
                                "safetensors_mb": round(size / 1e6, 2)}
        config = json.loads((work / "config.json").read_text()) if (work / "config.json").is_file() else {}
        info = {"model": "abcd-edge latent demo: text-to-image latent diffusion on the procedural shapes data set",
                "preset": config.get("preset"), "resolution": int(vae.config.sample_size),
                "latent": [int(unet.config.in_channels), int(unet.config.sample_size), int(unet.config.sample_size)],
                "scaling_factor": float(vae.config.scaling_factor),
                "data": {"generator": "abcd_edge.demo.captions.captioned", "seed": 1234,
                         "held_out_prompts": f"abcd_edge.demo.captions.prompt_set (seed {PROMPT_SEED})"},
                "components": components,
                "total_safetensors_mb": round(sum(c["safetensors_mb"] for c in components.values()), 2),
                "vae_stage": vae_info, "unet_stage": unet_info,
                "samples": "samples.png" if samples else None}
        (tmp / "training.json").write_text(json.dumps(info, indent=2))
        (tmp / "README.md").write_text(readme(info))
        if samples is not None:
            shutil.copy2(samples, tmp / "samples.png")
            if samples.with_suffix(".txt").is_file():
                shutil.copy2(samples.with_suffix(".txt"), tmp / "samples.txt")
    return info


def readme(info: dict) -> str:
    v, u = info.get("vae_stage") or {}, info.get("unet_stage") or {}
    comp = "\n".join(f"| {n} | {c['class']} | {c['parameters']:,} | {c['safetensors_mb']} |"
                     for n, c in info["components"].items())
    held = v.get("held_out") or {}
    lines = [
        "# abcd-edge latent demo model",
        "",
        "A tiny text-to-image latent diffusion model in the `StableDiffusionPipeline` layout, trained from scratch on",
        "CPU on the procedural shapes data set (`abcd_edge.demo.captions`: captions such as \"two red circles and a",
        f"blue triangle\"). {info['resolution']} x {info['resolution']} images, latents "
        f"{' x '.join(map(str, info['latent']))}, scaling_factor {info['scaling_factor']:.5f}.",
        "",
        "    from diffusers import StableDiffusionPipeline",
        "    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)",
        "    abcd-edge export --model <folder> --out <artifact>",
        "",
        "| component | class | parameters | safetensors MB |",
        "|---|---|---|---|",
        comp,
        "",
        f"Total {info['total_safetensors_mb']} MB (fp32).",
        "",
        "## Training (`abcd_edge.demo.latent.train`)",
        "",
        f"VAE stage: `{v.get('command')}`: {v.get('steps')} steps, batch {v.get('batch')} crops of {v.get('crop')} px, "
        f"{v.get('images')} images, {v.get('wall_minutes')} min on {v.get('threads')} thread(s); loss "
        f"{v.get('loss')}; last-100 mean loss {v.get('final_loss_mean_last_100')}; held-out whole-image "
        f"reconstruction L1 {held.get('l1_0_255')} (0..255), PSNR {held.get('psnr_db')} dB.",
        "",
        f"UNet + text encoder stage: `{u.get('command')}`: {u.get('steps')} steps, batch {u.get('batch')}, "
        f"{u.get('images')} images, {u.get('wall_minutes')} min on {u.get('threads')} thread(s); {u.get('loss')}; "
        f"caption dropout {u.get('cfg_drop')}; EMA {u.get('ema_decay')} (saved weights); last-200 mean loss "
        f"{u.get('final_loss_mean_last_200')} (unweighted MSE {u.get('final_mse_mean_last_200')}).",
        "" if u.get("final") else "\n(Written at a checkpoint while training was still running.)",
        "",
        "`samples.png`: held-out prompts (`samples.txt`), their reference images on top, generated samples below."
        if info.get("samples") else "",
        "",
        "Everything above is recorded in `training.json`.",
        "",
    ]
    return "\n".join(lines)
