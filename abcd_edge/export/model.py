"""Which model to export, loaded: ``"demo"``, a local diffusers folder, or a Hugging Face id.

:func:`load_model` resolves the name to a UNet folder (a bare ``UNet2DModel`` folder or
a pipeline folder with ``unet/`` + ``scheduler/``), loads the UNet as fp32 in eval mode
and reads its scheduler config (the DDPM default when the folder has none).
:func:`weights_hash` is the ``source_hash`` the manifest ties an artifact to its weights with.
torch and diffusers are imported inside functions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from abcd_edge.errors import UserError
from abcd_edge.export.errors import first_line
from abcd_edge.export.sd_layout import read_json
from abcd_edge.formats.manifest import sha256_file

DEFAULT_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 1e-4,
                     "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon"}
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_WEIGHTS = "diffusion_pytorch_model"
ACCEPTED_MODELS = ("'demo', a local diffusers folder (a UNet2DModel folder with config.json, or a pipeline "
                   "folder with unet/ + scheduler/: pixel UNet2DModel, LDM (+ vae/) or Stable-Diffusion-style "
                   "text-to-image / LCM (+ vae/, text_encoder/, tokenizer/)), or a Hugging Face id such as "
                   "google/ddpm-cifar10-32")


@dataclass
class LoadedModel:
    unet: object                      # diffusers.UNet2DModel, eval mode, fp32, CPU
    source: str
    source_hash: str
    source_weights: list[str]
    scheduler_config: dict
    scheduler_source: str
    model_kind: str
    prediction_type: str
    timestep_convention: str
    unet_dir: Path | None = None
    root: Path | None = None          # the model folder as given (pipeline root or bare UNet folder)
    notes: list[str] = field(default_factory=list)


def _weights_files(unet_dir: Path) -> list[str]:
    """The weights file(s) ``from_pretrained`` loads from ``unet_dir`` (relative names)."""
    st = unet_dir / f"{_WEIGHTS}.safetensors"
    if st.is_file():
        return [st.name]
    index = unet_dir / f"{_WEIGHTS}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if shards and all((unet_dir / s).is_file() for s in shards):
            return shards
    binf = unet_dir / f"{_WEIGHTS}.bin"
    if binf.is_file():
        return [binf.name]
    raise UserError(f"{unet_dir} has a UNet config.json but no weights ({_WEIGHTS}.safetensors or .bin)")


def weights_hash(unet_dir: Path, files: list[str]) -> str:
    """sha256 of the single weights file; for sharded weights, sha256 over "name sha256" lines."""
    if len(files) == 1:
        return sha256_file(unet_dir / files[0])
    import hashlib

    lines = "".join(f"{f} {sha256_file(unet_dir / f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _fetch_hf(repo_id: str) -> Path:
    """A local snapshot of a Hugging Face model (cache first); offline or unknown -> UserError."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise UserError(f"{repo_id!r} is not a local folder, and huggingface_hub is not installed to fetch it; "
                        f"accepted: {ACCEPTED_MODELS}") from None
    kw = dict(allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"],   # .txt: a CLIP tokenizer's merges
              ignore_patterns=["*.fp16.*", "*non_ema*", "*.ckpt", "*.msgpack", "*.h5", "*.onnx*"])
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **kw))
    except Exception:  # noqa: BLE001 - not in the cache: fall through to the network
        pass
    if getattr(constants, "HF_HUB_OFFLINE", False):
        raise UserError(f"could not reach the Hugging Face Hub for {repo_id!r} (offline: HF_HUB_OFFLINE is set) and "
                        "it is not in the local cache; pass a local diffusers folder (download it where there is "
                        "network)")
    try:
        return Path(snapshot_download(repo_id, etag_timeout=10, **kw))
    except Exception as exc:  # noqa: BLE001 - RepositoryNotFound, connection errors, gated repos ...
        name = exc.__class__.__name__
        unreachable = _unreachable(exc)   # before "NotFound": offline, the Hub client raises LocalEntryNotFoundError
        if unreachable:
            raise UserError(f"could not reach the Hugging Face Hub for {repo_id!r} (offline? "
                            f"{first_line(unreachable[-1])[:160]}); pass a local diffusers folder (download it "
                            "where there is network)") from None
        if "NotFound" in name:
            raise UserError(f"no model {repo_id!r} on the Hugging Face Hub (or it is private); "
                            f"accepted: {ACCEPTED_MODELS}") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else name
        raise UserError(f"cannot fetch {repo_id!r} from the Hugging Face Hub (offline? {name}: {first}); "
                        "download it where there is network and pass the folder") from None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or during (``__cause__`` / ``__context__``)."""
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 10:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _unreachable(exc: BaseException) -> list[BaseException]:
    """The exceptions in ``exc``'s chain that say the Hub was not reached (not "no such model"): connection,
    DNS and timeout errors of the OS, requests and httpx, and huggingface_hub's offline errors (offline, it
    raises LocalEntryNotFoundError from the connection error); empty when none does."""
    import importlib
    import socket

    kinds: list[type] = [ConnectionError, TimeoutError, socket.gaierror]
    for module, names in (("requests.exceptions", ("ConnectionError", "Timeout")), ("httpx", ("TransportError",)),
                          ("huggingface_hub.errors", ("LocalEntryNotFoundError", "OfflineModeIsEnabled"))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        kinds += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return [e for e in _chain(exc) if isinstance(e, tuple(kinds))]


def resolve_root(model: str) -> tuple[Path, str]:
    """(model folder, source label) for ``model``: "demo", a local folder, or a Hugging Face id (fetched)."""
    from abcd_edge.paths import DEMO_MODEL_DIR

    if not isinstance(model, str) or not model.strip():
        raise UserError(f"--model must be {ACCEPTED_MODELS}")
    if model == "demo":
        if not (DEMO_MODEL_DIR / "unet" / "config.json").is_file():
            raise UserError(f"the demo model is not built yet ({DEMO_MODEL_DIR} has no unet/); train it with "
                            "`python -m abcd_edge.demo.train`")
        root, source = DEMO_MODEL_DIR, "demo"
    else:
        p = Path(model).expanduser()
        if p.exists():
            root, source = p, model
        elif _HF_ID.match(model) and not model.startswith((".", "~")):
            root, source = _fetch_hf(model), model
        else:
            raise UserError(f"--model {model!r}: no such folder; accepted: {ACCEPTED_MODELS}")
    if not root.is_dir():
        raise UserError(f"--model {model!r} is a file, not a diffusers model folder; accepted: {ACCEPTED_MODELS}")
    return root, source


def _resolve_folder(model: str) -> tuple[Path, Path | None, str, Path]:
    """(unet folder, scheduler_config.json or None, source label, model root) for ``model``."""
    root, source = resolve_root(model)
    sched = None
    if (root / "unet" / "config.json").is_file():
        unet_dir = root / "unet"
        if (root / "scheduler" / "scheduler_config.json").is_file():
            sched = root / "scheduler" / "scheduler_config.json"
    elif (root / "config.json").is_file():
        unet_dir = root
    else:
        raise UserError(f"--model {model!r} is not a diffusers model folder (no config.json, no unet/config.json); "
                        f"accepted: {ACCEPTED_MODELS}")
    unet_config = read_json(unet_dir / "config.json")
    cls = unet_config.get("_class_name")
    if cls != "UNet2DModel":
        raise UserError(f"--model {model!r}: {unet_dir / 'config.json'} describes {cls or 'no _class_name'}, "
                        "not a UNet2DModel (text-conditioned UNet2DConditionModel and other models are not supported)")
    _refuse_latent(model, root, unet_dir, unet_config)
    return unet_dir, sched, source, root


PIXEL_CHANNELS = (1, 3)            # what the runtime turns into an image: grey or RGB
ACCEPTED_SPACE = ("accepted: pixel-space UNet2DModel (3 channels, or 1 for greyscale), or a latent pipeline folder "
                  "(unet/ + vae/ + scheduler/ [+ text_encoder/ + tokenizer/]: abcd_edge/export/sd_pipeline.py)")


def _refuse_latent(model: str, root: Path, unet_dir: Path, unet_config: dict) -> None:
    """Refuse a latent diffusion model (the LDM layout: a vae/ or vqvae/ beside the UNet, or model_index.json
    naming one) and any UNet whose samples are not 1 or 3 channels: its output is latents, not an image, and
    decoding them (the VAE) is not supported yet."""
    channels = unet_config.get("in_channels", 3)
    vae = None
    if root != unet_dir:
        index = root / "model_index.json"
        listed = read_json(index) if index.is_file() else {}
        vae = next((name for name in ("vqvae", "vae") if listed.get(name)
                    or (root / name / "config.json").is_file()), None)
    if vae is not None:
        raise UserError(f"--model {model!r}: latent UNet2DModel with a {vae}/ (LDM layout, {channels}-channel "
                        f"latents): latent models need a VAE decode, not supported yet; {ACCEPTED_SPACE}")
    if channels not in PIXEL_CHANNELS:
        raise UserError(f"--model {model!r}: the UNet2DModel's samples have {channels} channels, not an image's "
                        f"(a latent model? export its pipeline folder, with the vae/ beside unet/ and scheduler/: "
                        f"the LDM layout); {ACCEPTED_SPACE}")


def alphas_cumprod(config: dict) -> list[float] | None:
    """The training schedule's alphas_cumprod, computed by diffusers from ``config`` (None for sigma schedules)."""
    import diffusers

    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    for candidate in (cls, diffusers.DDPMScheduler):
        if candidate is None:
            continue
        try:
            sched = candidate.from_config(config)
        except Exception:  # noqa: BLE001 - a scheduler that cannot take this config: try DDPM's reading
            continue
        ac = getattr(sched, "alphas_cumprod", None)
        if ac is not None:
            return [float(f"{float(v):.9g}") for v in np.asarray(ac, dtype=np.float64)]
    return None


def load_model(model: str) -> LoadedModel:
    """Resolve and load ``model`` ("demo", a folder, or a Hugging Face id) as an fp32 eval UNet2DModel."""
    if not isinstance(model, str) or not model.strip():
        raise UserError(f"--model must be {ACCEPTED_MODELS}")
    unet_dir, sched_path, source, root = _resolve_folder(model)
    files = _weights_files(unet_dir)
    from diffusers import UNet2DModel

    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), low_cpu_mem_usage=False)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot load the UNet from {unet_dir}: {exc.__class__.__name__}: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
    notes = []
    if files[0].endswith(".bin"):
        notes.append("weights read from a pickle .bin (no safetensors); source_hash is over the .bin")
    if sched_path is not None:
        sc = read_json(sched_path)
        sched_source = f"{sched_path.parent.name}/{sched_path.name} of the model folder"
    else:
        sc = dict(DEFAULT_SCHEDULER)
        sched_source = "default DDPM (1000 linear betas 1e-4..0.02, epsilon): the model folder had no scheduler/"
        notes.append("no scheduler in the model folder: assumed the DDPM default (1000 linear betas 1e-4..0.02, "
                     "epsilon prediction)")
    sc = {k: v for k, v in sc.items() if k != "_diffusers_version"}
    if sc.get("_class_name") == "CMStochasticIterativeScheduler":
        kind, prediction, convention = "consistency", "consistency", "cm-log-sigma"
    else:
        kind = "class-conditional" if unet.config.num_class_embeds else "unconditional"
        prediction, convention = str(sc.get("prediction_type") or "epsilon"), "ddpm-index"
        sc.setdefault("prediction_type", prediction)
    sc.setdefault("num_train_timesteps", 1000)
    import torch

    if unet.class_embedding is not None and not isinstance(unet.class_embedding, torch.nn.Embedding):
        raise UserError(f"--model {model!r}: class_embed_type {unet.config.class_embed_type!r} is not supported "
                        "(only num_class_embeds, i.e. integer class labels)")
    if unet.config.num_class_embeds and kind == "consistency":
        notes.append("class-conditional consistency model: input class_labels int64 [B]")
    return LoadedModel(unet=unet.eval().float(), source=source, source_hash=weights_hash(unet_dir, files),
                       source_weights=files, scheduler_config=sc, scheduler_source=sched_source, model_kind=kind,
                       prediction_type=prediction, timestep_convention=convention, unet_dir=unet_dir, root=root, notes=notes)
