"""Which latent pipeline folder is this, and is it one the exporter takes? (:func:`latent_pipeline_kind`)

"text-to-image" (the StableDiffusionPipeline layout, LCM included), "ldm" (a latent UNet2DModel + vae/ or vqvae/),
or None (the pixel UNet2DModel path of :mod:`abcd_edge.export.model`). Everything else it recognizes is refused
in one line naming the class found and what is accepted, from the configs alone (before any weights load):
transformer backbones (PixArt, SANA, SD3, Flux), SDXL's second text encoder, inpainting / upscaler / SDXL UNets,
other text encoders or VAEs, a missing component.
"""
from __future__ import annotations

import json
from pathlib import Path

from abcd_edge.errors import UserError

TINY_VAE_FOLDERS = ("vae_tiny", "taesd", "vae_decoder_tiny")
ACCEPTED = ("accepted: a StableDiffusionPipeline-layout folder (model_index.json; unet/ UNet2DConditionModel, "
            "text_encoder/ CLIPTextModel, tokenizer/ CLIP BPE, vae/ AutoencoderKL, scheduler/; LCM UNets with "
            "time_cond_proj_dim included; optional vae_tiny/ AutoencoderTiny), the LDM layout (latent UNet2DModel "
            "+ vae/ AutoencoderKL or vqvae/ VQModel + scheduler/), or a pixel-space UNet2DModel folder")
TEXT_ENCODERS = ("CLIPTextModel",)
VAES = ("AutoencoderKL",)
LDM_VAES = ("AutoencoderKL", "VQModel")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def class_of(folder: Path) -> str | None:
    """The class a component folder's config.json names (diffusers ``_class_name``, transformers
    ``architectures[0]``), None when the folder has no config.json."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    data = read_json(cfg)
    arch = data.get("architectures")
    return data.get("_class_name") or (arch[0] if isinstance(arch, list) and arch else None) or "an unnamed class"


def _listed(index: dict, name: str) -> str | None:
    """The class model_index.json gives component ``name`` (None when absent or null)."""
    entry = index.get(name)
    if isinstance(entry, list) and len(entry) == 2 and entry[1]:
        return str(entry[1])
    return None


def latent_pipeline_kind(root: Path, model: str) -> str | None:
    """"text-to-image" or "ldm" for the folders this module exports, None for the pixel UNet2DModel path.

    Raises a one-line UserError for a pipeline it recognizes but does not take (see the module docstring)."""
    root = Path(root)
    index_path = root / "model_index.json"
    index = read_json(index_path) if index_path.is_file() else {}
    pipe = index.get("_class_name", "a pipeline")
    where = f"--model {model!r}"
    for name in ("transformer", "prior", "decoder", "unet_2"):
        cls = class_of(root / name) or _listed(index, name)
        if cls or (root / name).is_dir():
            what = cls or f"a {name}/ folder"
            raise UserError(f"{where}: {pipe} with a {name}/ backbone ({what}: transformer backbones such as "
                            f"PixArt, SANA, SD3, Flux are not supported); {ACCEPTED}")
    for name in ("text_encoder_2", "text_encoder_3", "tokenizer_2"):
        cls = class_of(root / name) or _listed(index, name)
        if cls or (root / name).is_dir():
            raise UserError(f"{where}: {pipe} has a second text encoder {name}/ ({cls or 'present'}; the SDXL "
                            f"layout), not supported; {ACCEPTED}")
    unet_cls = class_of(root / "unet") or (class_of(root) if not index else None)
    listed_unet = _listed(index, "unet")
    if unet_cls is None and listed_unet:
        raise UserError(f"{where}: model_index.json lists unet ({listed_unet}) but the folder has no unet/config.json "
                        f"(missing component); {ACCEPTED}")
    if unet_cls == "UNet2DConditionModel":
        if not index and not (root / "unet").is_dir():
            raise UserError(f"{where}: {root / 'config.json'} describes UNet2DConditionModel, not a UNet2DModel: "
                            "a bare text-conditioned UNet; export its whole pipeline folder (model_index.json with "
                            f"unet/, text_encoder/, tokenizer/, vae/, scheduler/); {ACCEPTED}")
        _check_sd_layout(root, index, where)
        return "text-to-image"
    if unet_cls == "UNet2DModel":
        vae = next((n for n in ("vae", "vqvae") if (root / n).is_dir() or _listed(index, n)), None)
        if vae is None or not (root / "unet").is_dir():
            return None            # the pixel path (export/model.py) takes it, or refuses it in its own words
        cls = class_of(root / vae)
        if cls is None:
            raise UserError(f"{where}: latent UNet2DModel with a {vae}/ listed but no {vae}/config.json (missing "
                            f"component); {ACCEPTED}")
        if cls not in LDM_VAES:
            raise UserError(f"{where}: the LDM layout's {vae}/ is {cls}; accepted decoders: {', '.join(LDM_VAES)}")
        if not (root / "scheduler" / "scheduler_config.json").is_file():
            raise UserError(f"{where}: latent UNet2DModel folder without scheduler/scheduler_config.json (missing "
                            f"component); {ACCEPTED}")
        return "ldm"
    if unet_cls is not None and unet_cls != "UNet2DModel":
        raise UserError(f"{where}: {(root / 'unet' / 'config.json') if (root / 'unet').is_dir() else root / 'config.json'}"
                        f" describes {unet_cls}, which is not supported; {ACCEPTED}")
    if index and unet_cls is None:
        raise UserError(f"{where}: {pipe} (model_index.json) has no unet/ component; {ACCEPTED}")
    return None


def _check_sd_layout(root: Path, index: dict, where: str) -> None:
    need = {"unet": ("config.json",), "text_encoder": ("config.json",), "vae": ("config.json",),
            "scheduler": ("scheduler_config.json",), "tokenizer": ()}
    missing = [n for n, files in need.items() if not (root / n).is_dir() or not all((root / n / f).is_file()
                                                                                   for f in files)]
    if missing:
        raise UserError(f"{where}: the pipeline folder lacks {', '.join(m + '/' for m in missing)} (missing "
                        f"component); a StableDiffusionPipeline folder needs unet/, text_encoder/, tokenizer/, vae/, "
                        "scheduler/")
    tok = root / "tokenizer"
    if not (all((tok / f).is_file() for f in ("vocab.json", "merges.txt")) or (tok / "tokenizer.json").is_file()):
        raise UserError(f"{where}: tokenizer/ has neither vocab.json + merges.txt (the CLIP BPE files) nor "
                        "tokenizer.json (missing component)")
    te = class_of(root / "text_encoder")
    if te not in TEXT_ENCODERS:
        raise UserError(f"{where}: text_encoder/ is {te}; accepted: {', '.join(TEXT_ENCODERS)} (SD 1.x / 2.x)")
    vae = class_of(root / "vae")
    if vae not in VAES:
        raise UserError(f"{where}: vae/ is {vae}; accepted: {', '.join(VAES)}")
    ucfg = read_json(root / "unet" / "config.json")
    for key, why in (("addition_embed_type", "SDXL-style added conditioning"),
                     ("class_embed_type", "class / noise-level conditioning (e.g. the SD x4 upscaler)"),
                     ("encoder_hid_dim_type", "an image / text projection (IP-adapter, Kandinsky)")):
        if ucfg.get(key) is not None:
            raise UserError(f"{where}: the UNet2DConditionModel has {key}={ucfg[key]!r} ({why}), not supported; "
                            f"{ACCEPTED}")
    if ucfg.get("num_class_embeds"):
        raise UserError(f"{where}: the UNet2DConditionModel has num_class_embeds (class-conditioned), not supported; "
                        f"{ACCEPTED}")
    if ucfg.get("in_channels", 4) != ucfg.get("out_channels", 4):
        raise UserError(f"{where}: the UNet2DConditionModel takes {ucfg.get('in_channels')} channels and gives "
                        f"{ucfg.get('out_channels')} (an inpainting / depth / instruct-pix2pix UNet?): "
                        f"not supported; {ACCEPTED}")


def tiny_vae_folder(root: Path) -> Path | None:
    for name in TINY_VAE_FOLDERS:
        if class_of(root / name) == "AutoencoderTiny":
            return root / name
    return None
