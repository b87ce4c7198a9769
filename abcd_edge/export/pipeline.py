"""Export a frozen diffusers UNet to deployable artifacts: ONNX (+ fp16, + TensorRT plan) and a manifest.

    export_model("demo", Path("export/demo"))                       # denoiser.onnx + manifest.json
    export_model("path/to/unet_or_pipeline", out, batches=(1, 4), fp16=True)
    export_model("demo", out, trt=True)                             # + denoiser.plan where TensorRT is

Stages (one tqdm bar): load, trace, export, check, flops, fp16, trt, write. Everything
is built in a temporary folder beside ``out`` and swapped in only when the fp32 ONNX
passes parity against torch (ORT CPU, max abs <= ``parity_tol``); a failed or refused
export leaves an existing ``out`` untouched.

This module imports torch, onnx, onnxruntime and diffusers lazily (inside functions),
so ``from abcd_edge.export.pipeline import check_trt_plan`` stays torch-free; the TensorRT plan
checks themselves live in :mod:`abcd_edge.formats.manifest`.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from abcd_edge.errors import UserError
from abcd_edge.io import atomic_dir, atomic_path, write_bytes_atomic
from abcd_edge.formats.manifest import (  # noqa: F401  (re-exported: check_trt_plan, load_trt_plan_meta)
    FLOPS_CONVENTION, MANIFEST_NAME, SCHEMA_VERSION, Manifest, check_trt_plan, detect_gpu,
    load_trt_plan_meta, sha256_file)

PARITY_TIMESTEPS = (999.0, 500.5, 10.0)   # non-integer on purpose: the runtime passes continuous t
PARITY_TOL = 1e-4                          # fp32 ORT vs torch, max abs
FP16_DRIFT_BOUND = 5e-2                    # fp16 ORT vs fp32 ORT, max abs; over it fp16 is marked unusable
FLOPS_TOL = 0.05                           # ONNX count vs torch.utils.flop_counter, relative
EXTERNAL_DATA_BYTES = 1_800_000_000        # weights above this go to denoiser.onnx.data (protobuf limit 2 GB)
TRT_WORKSPACE_BYTES = 1 << 30
STAGES = ("load", "trace", "export", "check", "flops", "fp16", "trt", "write")
ONNX_NAME, FP16_NAME, PLAN_NAME, TIMING_CACHE_NAME = ("denoiser.onnx", "denoiser.fp16.onnx", "denoiser.plan",
                                                      "denoiser.timing.cache")
DEFAULT_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 1e-4,
                     "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon"}
# google/ddpm-cifar10-32's unet/config.json (35.7 M parameters), for the benchmark with random weights
CIFAR10_UNET_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
    act_fn="silu", attention_head_dim=None, center_input_sample=False, mid_block_scale_factor=1,
    time_embedding_type="positional")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_WEIGHTS = "diffusion_pytorch_model"
ACCEPTED_MODELS = ("'demo', a local diffusers folder (a UNet2DModel folder with config.json, or a pipeline "
                   "folder with unet/ + scheduler/), or a Hugging Face id such as google/ddpm-cifar10-32")


class ExportError(UserError):
    """The export ran but its result is refused (ONNX export failure, parity over tolerance)."""


# ====================================================================================== load
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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def _weights_files(unet_dir: Path) -> list[str]:
    """The weights file(s) ``from_pretrained`` loads from ``unet_dir`` (relative names)."""
    st = unet_dir / f"{_WEIGHTS}.safetensors"
    if st.is_file():
        return [st.name]
    index = unet_dir / f"{_WEIGHTS}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
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
    kw = dict(allow_patterns=["*.json", "*.safetensors", "*.bin"],
              ignore_patterns=["*.fp16.*", "*non_ema*", "*.ckpt", "*.msgpack", "*.h5", "*.onnx*"])
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **kw))
    except Exception:  # noqa: BLE001 - not in the cache: fall through to the network
        pass
    if getattr(constants, "HF_HUB_OFFLINE", False):
        raise UserError(f"{repo_id!r} is not a local folder and not in the Hugging Face cache, and this machine is "
                        "offline (HF_HUB_OFFLINE); download it where there is network and pass the folder")
    try:
        return Path(snapshot_download(repo_id, etag_timeout=10, **kw))
    except Exception as exc:  # noqa: BLE001 - RepositoryNotFound, connection errors, gated repos ...
        name = exc.__class__.__name__
        if "NotFound" in name:
            raise UserError(f"no model {repo_id!r} on the Hugging Face Hub (or it is private); "
                            f"accepted: {ACCEPTED_MODELS}") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else name
        raise UserError(f"cannot fetch {repo_id!r} from the Hugging Face Hub (offline? {name}: {first}); "
                        "download it where there is network and pass the folder") from None


def _resolve_folder(model: str) -> tuple[Path, Path | None, str, Path]:
    """(unet folder, scheduler_config.json or None, source label, model root) for ``model``."""
    from abcd_edge.paths import DEMO_MODEL_DIR

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
    cls = _read_json(unet_dir / "config.json").get("_class_name")
    if cls != "UNet2DModel":
        raise UserError(f"--model {model!r}: {unet_dir / 'config.json'} describes {cls or 'no _class_name'}, "
                        "not a UNet2DModel (text-conditioned UNet2DConditionModel and other models are not supported)")
    return unet_dir, sched, source, root


def _alphas_cumprod(config: dict) -> list[float] | None:
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
        sc = _read_json(sched_path)
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


# ================================================================================ validation
def _check_batches(batches) -> list[int]:
    try:
        items = list(batches)
    except TypeError:
        items = [batches]
    if not items:
        raise UserError("--batch needs at least one batch size, e.g. --batch 1 or --batch 1,4")
    out = []
    for b in items:
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise UserError(f"--batch {','.join(map(str, items))}: batch sizes must be integers >= 1 (got {b!r})")
        out.append(int(b))
    return sorted(set(out))


def _down_factor(unet) -> int:
    return 2 ** (len(unet.config.block_out_channels) - 1)


def _check_resolution(unet, resolution) -> int:
    ss = unet.config.sample_size
    if resolution is None:
        if isinstance(ss, (list, tuple)):
            if len(set(ss)) != 1:
                raise UserError(f"the UNet's sample_size {list(ss)} is not square; pass --resolution")
            ss = ss[0]
        resolution = int(ss)
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise UserError(f"--resolution {resolution!r} must be a positive integer")
    f = _down_factor(unet)
    if resolution % f:
        raise UserError(f"--resolution {resolution} is not a multiple of {f}, which this UNet needs "
                        f"({len(unet.config.block_out_channels)} levels, {len(unet.config.block_out_channels) - 1} "
                        f"downsamplings); try {max(f, resolution // f * f)} or {(resolution // f + 1) * f}")
    return int(resolution)


def _check_out(out: Path, protect: Path | None = None) -> Path:
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if protect is not None:
        o, p = out.resolve(), protect.resolve()
        if o == p or p in o.parents or o in p.parents:
            raise UserError(f"--out {out} overlaps the model folder {protect}; choose another --out")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UserError(f"cannot write --out {out}: {exc.strerror or exc}") from None
    return out


def _import_tensorrt():
    try:
        import tensorrt  # type: ignore
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA install
        raise UserError(f"TensorRT is not installed here (import tensorrt failed: {exc}); --trt needs a machine "
                        "with TensorRT (JetPack or pip tensorrt)") from None
    return tensorrt


# ==================================================================================== torch
def _wrapper(unet, class_conditional: bool, half: bool = False):
    """nn.Module (sample, timestep[, class_labels]) -> prediction, float32 I/O (fp16 inside when ``half``)."""
    import torch

    class Denoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, class_labels=None):
            x = sample.half() if half else sample
            out = self.unet(x, timestep, class_labels=class_labels).sample
            return out.float() if half else out

    return Denoiser().eval()


def _io_spec(loaded: LoadedModel, resolution: int) -> tuple[list[dict], list[dict]]:
    cfg = loaded.unet.config
    inputs = [{"name": "sample", "dtype": "float32", "shape": ["batch", cfg.in_channels, resolution, resolution]},
              {"name": "timestep", "dtype": "float32", "shape": ["batch"]}]
    if cfg.num_class_embeds:
        inputs.append({"name": "class_labels", "dtype": "int64", "shape": ["batch"]})
    outputs = [{"name": "prediction", "dtype": "float32", "shape": ["batch", cfg.out_channels, resolution, resolution]}]
    return inputs, outputs


def _torch_inputs(loaded: LoadedModel, resolution: int, batch: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    cfg = loaded.unet.config
    args = [torch.randn(batch, cfg.in_channels, resolution, resolution, generator=g),
            torch.tensor([500.5, 10.0] * batch, dtype=torch.float32)[:batch]]
    if cfg.num_class_embeds:
        args.append(torch.arange(batch, dtype=torch.int64) % cfg.num_class_embeds)
    return tuple(args)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0] if text else ''}"[:400]


def _export_onnx(module, args, path: Path, input_names: list[str], opset: int, external: bool) -> str:
    """torch -> ONNX at ``path`` (weights in ``path.name + '.data'`` when ``external``); returns the exporter used."""
    import onnx
    import torch

    scratch = path.parent / f".{path.name}.trace"
    scratch.mkdir()
    raw = scratch / path.name
    dyn = {n: {0: "batch"} for n in input_names + ["prediction"]}
    errors = []
    used = None
    try:
        for dynamo in (False, True):
            try:
                with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
                    warnings.simplefilter("ignore")
                    if not dynamo:
                        torch.onnx.export(module, args, str(raw), dynamo=False, input_names=input_names,
                                          output_names=["prediction"], dynamic_axes=dyn, opset_version=opset,
                                          do_constant_folding=True)
                    else:
                        batch = torch.export.Dim("batch", min=1, max=4096)
                        shapes = {"sample": {0: batch}, "timestep": {0: batch}}
                        if len(args) > 2:
                            shapes["class_labels"] = {0: batch}
                        torch.onnx.export(module, args, str(raw), dynamo=True, input_names=input_names,
                                          output_names=["prediction"], dynamic_shapes=shapes,
                                          opset_version=opset, external_data=True)
                used = "torch.onnx.export(dynamo=True)" if dynamo else "torch.onnx.export(dynamo=False)"
                break
            except Exception as exc:  # noqa: BLE001 - unsupported op or opset: try the other exporter
                errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {_first_line(exc)}")
                for f in scratch.iterdir():
                    f.unlink()
        if used is None:
            raise ExportError(f"ONNX export failed at opset {opset}: " + "; ".join(errors))
        m = onnx.load(str(raw))  # pulls in any external data the exporter wrote
        for f in (path, path.parent / (path.name + ".data")):
            if f.exists():
                f.unlink()
        if external:
            onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(m, str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return used


def _ort_session(path: Path, threads: int, spinning: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spinning:  # idle ORT workers would otherwise spin on the cores torch's next call needs
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _parity_inputs(loaded: LoadedModel, resolution: int, batches: list[int], timesteps) -> list[dict]:
    rng = np.random.default_rng(0)
    cfg = loaded.unet.config
    cases = []
    for b in batches:
        x = rng.standard_normal((b, cfg.in_channels, resolution, resolution)).astype(np.float32)
        labels = rng.integers(0, cfg.num_class_embeds, b).astype(np.int64) if cfg.num_class_embeds else None
        for t in timesteps:
            feed = {"sample": x, "timestep": np.full(b, t, np.float32)}
            if labels is not None:
                feed["class_labels"] = labels
            cases.append(feed)
    return cases


def _torch_run(module, feed: dict) -> np.ndarray:
    import torch

    with torch.no_grad():
        args = [torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"])]
        if "class_labels" in feed:
            args.append(torch.from_numpy(feed["class_labels"]))
        return module(*args).numpy()


def _compare(outs: list[np.ndarray], refs: list[np.ndarray]) -> tuple[float, float]:
    max_abs = max(float(np.max(np.abs(o.astype(np.float64) - r))) for o, r in zip(outs, refs))
    scale = max(float(np.max(np.abs(r))) for r in refs)
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else 1e30)
    return max_abs, min(rel, 1e30)


def torch_flops(module, args) -> int:
    """FLOPs of one forward by ``torch.utils.flop_counter`` (CPU SDPA counted like the CUDA kernels)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa(query_shape, key_shape, value_shape, *a, out_shape=None, **kw):
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    custom = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        custom[op] = sdpa
    with FlopCounterMode(display=False, custom_mapping=custom) as fc, torch.no_grad():
        module(*args)
    return int(fc.get_total_flops())


def _versions() -> dict:
    import diffusers
    import onnx
    import onnxruntime
    import torch

    from abcd_edge import __version__

    return dict(abcd_edge_version=__version__, torch_version=torch.__version__, onnx_version=onnx.__version__,
                onnxruntime_version=onnxruntime.__version__, diffusers_version=diffusers.__version__)


# ================================================================================= TensorRT
def build_trt_plan(onnx_path: Path, plan_path: Path, *, shapes: dict[str, tuple], batch_min: int, batch_opt: int,
                   batch_max: int, fp16: bool = True, fp16_onnx: Path | None = None,
                   workspace_bytes: int = TRT_WORKSPACE_BYTES, timing_cache_in: Path | None = None,
                   timing_cache_out: Path | None = None) -> dict:
    """Build a serialized TensorRT engine from ``onnx_path`` with the TensorRT Python API.

    ``shapes`` maps each input to its shape without the batch axis. FP16 by the builder
    flag where this TensorRT has one (<= 10.x); TensorRT 11 removed weak typing, so
    there the fp16 ONNX (``fp16_onnx``, strongly typed) is parsed instead when given.
    The timing cache is loaded from ``timing_cache_in`` when present and saved to
    ``timing_cache_out``. Returns the manifest's ``trt`` record (without the plan hash).
    """
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(str(trt.__version__).split(".")[0])
    flags = 0
    if major < 10 and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    precision, source = "fp32", onnx_path
    if fp16:
        if hasattr(trt.BuilderFlag, "FP16"):
            if getattr(builder, "platform_has_fast_fp16", True):
                config.set_flag(trt.BuilderFlag.FP16)
                precision = "fp16 (builder flag)"
        elif fp16_onnx is not None:
            source, precision = fp16_onnx, f"fp16 (strongly typed, from {fp16_onnx.name})"
    if not parser.parse_from_file(str(source)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT's ONNX parser rejected {source.name}: " + "; ".join(errs[:3]))
    profile = builder.create_optimization_profile()
    for name, shape in shapes.items():
        profile.set_shape(name, (batch_min, *shape), (batch_opt, *shape), (batch_max, *shape))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache_in.read_bytes() if timing_cache_in is not None and timing_cache_in.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError("TensorRT could not build an engine from denoiser.onnx (see the TensorRT log above)")
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(bytes(memoryview(serialized)))
    if timing_cache_out is not None:
        write_bytes_atomic(timing_cache_out, bytes(memoryview(config.get_timing_cache().serialize())))
    gpu = detect_gpu()
    if gpu["gpu_name"] is None:
        raise ExportError("built a TensorRT plan but cannot tell which GPU this is (no NVML, nvidia-smi or Jetson "
                          "device-tree model); a plan must record its GPU")
    return {"plan": plan_path.name, "tensorrt_version": str(trt.__version__), "gpu_name": gpu["gpu_name"],
            "compute_capability": gpu["compute_capability"], "gpu_detected_by": gpu["how"],
            "precision": precision, "built_from": source.name, "batch_min": batch_min, "batch_opt": batch_opt,
            "batch_max": batch_max, "workspace_bytes": int(workspace_bytes),
            "timing_cache": timing_cache_out.name if timing_cache_out is not None else None,
            "timing_cache_reused": bool(cache_bytes),
            "built_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "parity": "not checked at export (needs the GPU runtime); `abcd-edge profile --backend trt` runs it"}


# =================================================================================== export
def export_model(model: str, out: Path, resolution: int | None = None, batches: tuple[int, ...] = (1,),
                 fp16: bool = False, trt: bool = False, opset: int = 17, progress: bool = True,
                 name: str | None = None, threads: int | None = None, parity_tol: float = PARITY_TOL,
                 fp16_bound: float = FP16_DRIFT_BOUND, external_data: bool | None = None) -> Manifest:
    """Export ``model`` to ``out`` (denoiser.onnx + manifest.json [+ denoiser.fp16.onnx] [+ denoiser.plan]).

    ``batches``: the batch sizes to serve; the artifact's range is min..max and parity is
    checked at every size in it (or at the listed sizes plus min and max when the range
    is over 8 wide). ``external_data`` None = only when the weights exceed ~1.8 GB.
    Raises UserError (ExportError) on bad input or a refused result; ``out`` is then untouched.
    """
    batch_list = _check_batches(batches)
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 17:
        raise UserError(f"--opset {opset!r}: must be an integer >= 17")
    out = _check_out(Path(out))
    if trt:
        _import_tensorrt()  # fail fast, before minutes of work
    bar = _Stages(progress)
    try:
        bar.stage("load")
        loaded = load_model(model)
        _check_out(out, protect=loaded.root)
        return _export_loaded(loaded, out, resolution, batch_list, fp16=fp16, trt=trt, opset=opset, bar=bar,
                              name=name, threads=threads, parity_tol=parity_tol, fp16_bound=fp16_bound,
                              external_data=external_data)
    finally:
        bar.close()


class _Stages:
    def __init__(self, progress: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=len(STAGES), desc="export", unit="stage", disable=not progress, file=sys.stderr,
                        leave=False)
        self.done = 0

    def stage(self, name: str) -> None:
        i = STAGES.index(name)
        if i > self.done:
            self.bar.update(i - self.done)
            self.done = i
        self.bar.set_description(f"export: {name}")

    def finish(self) -> None:
        self.bar.update(len(STAGES) - self.done)
        self.done = len(STAGES)
        self.bar.set_description("export: done")

    def close(self) -> None:
        self.bar.close()


def _export_loaded(loaded: LoadedModel, out: Path, resolution: int | None, batch_list: list[int], *, fp16: bool,
                   trt: bool, opset: int, bar: _Stages, name: str | None, threads: int | None, parity_tol: float,
                   fp16_bound: float, external_data: bool | None) -> Manifest:
    import torch

    threads = threads or torch.get_num_threads()
    unet = loaded.unet
    cfg = unet.config
    res = _check_resolution(unet, resolution)
    notes = list(loaded.notes)
    if res != (cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]):
        notes.append(f"exported at resolution {res}; the UNet was trained at sample_size {cfg.sample_size}")
    bmin, bmax = batch_list[0], batch_list[-1]
    checked = list(range(bmin, bmax + 1)) if bmax - bmin < 8 else sorted(set(batch_list) | {bmin, bmax})
    class_cond = bool(cfg.num_class_embeds)
    inputs, outputs = _io_spec(loaded, res)
    input_names = [i["name"] for i in inputs]
    params = sum(p.numel() for p in unet.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES if external_data is None else bool(external_data)
    module = _wrapper(unet, class_cond)
    old_cache = out / TIMING_CACHE_NAME

    with atomic_dir(out) as tmp:
        bar.stage("trace")
        trace_args = _torch_inputs(loaded, res, 2)
        try:
            with torch.no_grad():
                module(*trace_args)  # a model that cannot run at this resolution fails here, with its reason
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"the UNet does not run at resolution {res} in torch: {_first_line(exc)}") from None
        bar.stage("export")
        exporter = _export_onnx(module, trace_args, tmp / ONNX_NAME, input_names, opset, external)
        if "dynamo=True" in exporter:
            notes.append("exported with the dynamo exporter (the TorchScript exporter failed)")

        bar.stage("check")
        session = _ort_session(tmp / ONNX_NAME, threads)
        cases = _parity_inputs(loaded, res, checked, PARITY_TIMESTEPS)
        refs = [_torch_run(module, feed) for feed in cases]
        try:
            outs = [session.run(None, feed)[0] for feed in cases]
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"ONNX Runtime cannot run the exported model: {_first_line(exc)}") from None
        max_abs, max_rel = _compare(outs, refs)
        if not max_abs <= parity_tol:
            worst = max(range(len(cases)), key=lambda i: float(np.max(np.abs(outs[i] - refs[i]))))
            raise ExportError(f"parity failed: ONNX Runtime vs torch max abs error {max_abs:.3g} > {parity_tol:g} "
                              f"(batch {cases[worst]['sample'].shape[0]}, t={cases[worst]['timestep'][0]:g}); "
                              f"nothing was written to {out}")
        parity = {"timesteps": list(PARITY_TIMESTEPS), "batches": checked, "max_abs": max_abs, "max_rel": max_rel,
                  "tol": parity_tol, "passed": True, "provider": "CPUExecutionProvider", "seed": 0,
                  "rel_convention": "max|ort - torch| / max|torch|"}

        bar.stage("flops")
        from abcd_edge.export.flops import count_flops

        counted = count_flops(tmp / ONNX_NAME, batch=1)
        flops_t = torch_flops(module, _torch_inputs(loaded, res, 1))
        rel = abs(counted["total"] - flops_t) / flops_t if flops_t else float("inf")
        if rel > FLOPS_TOL:
            msg = (f"FLOPs from the ONNX graph ({counted['total']:.4g}) and torch.utils.flop_counter ({flops_t:.4g}) "
                   f"differ by {rel:.1%} (> {FLOPS_TOL:.0%})")
            warnings.warn(msg, stacklevel=2)
            notes.append(msg)

        fp16_rec = None
        if fp16:
            bar.stage("fp16")
            fp16_rec = _export_fp16(loaded, tmp, trace_args, input_names, opset, external, threads, cases, outs,
                                    fp16_bound)
            if not fp16_rec["usable"]:
                notes.append(f"fp16 drift {fp16_rec['drift_max_abs']:.3g} exceeds the bound {fp16_bound:g}: "
                             "denoiser.fp16.onnx is kept for inspection but marked unusable")

        trt_rec = None
        if trt:
            bar.stage("trt")
            shapes = {"sample": (cfg.in_channels, res, res), "timestep": ()}
            if class_cond:
                shapes["class_labels"] = ()
            fp16_onnx = tmp / FP16_NAME if fp16_rec and fp16_rec["usable"] else None
            trt_rec = build_trt_plan(tmp / ONNX_NAME, tmp / PLAN_NAME, shapes=shapes, batch_min=bmin, batch_opt=bmin,
                                     batch_max=bmax, fp16=True, fp16_onnx=fp16_onnx,
                                     timing_cache_in=old_cache if old_cache.is_file() else None,
                                     timing_cache_out=tmp / TIMING_CACHE_NAME)
            trt_rec["plan_sha256"] = sha256_file(tmp / PLAN_NAME)

        bar.stage("write")
        files = {}
        for fname in (ONNX_NAME, ONNX_NAME + ".data", FP16_NAME, FP16_NAME + ".data"):
            if (tmp / fname).is_file():
                files[fname] = sha256_file(tmp / fname)
        manifest = Manifest(
            schema_version=SCHEMA_VERSION, name=name or out.resolve().name, source=loaded.source,
            source_hash=loaded.source_hash, source_weights=loaded.source_weights, model_kind=loaded.model_kind,
            num_class_embeds=int(cfg.num_class_embeds) if cfg.num_class_embeds else None,
            prediction_type=loaded.prediction_type, timestep_convention=loaded.timestep_convention,
            scheduler_config=loaded.scheduler_config, scheduler_source=loaded.scheduler_source,
            alphas_cumprod=_alphas_cumprod(loaded.scheduler_config) if loaded.model_kind != "consistency" else None,
            resolution=res, channels=int(cfg.in_channels), out_channels=int(cfg.out_channels), batch_min=bmin,
            batch_max=bmax, batches_checked=checked, inputs=inputs, outputs=outputs, opset=opset,
            external_data=external, files=files, params=int(params), flops_per_step=int(counted["total"]),
            flops_torch=int(flops_t), flops_rel_diff=float(rel), flops_by_op=counted["by_op"], parity=parity,
            fp16=fp16_rec, trt=trt_rec, created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            notes=notes + [f"exporter: {exporter}; FLOPs shape inference: {counted['shape_inference']}"],
            **_versions())
        manifest = Manifest.from_json(manifest.to_json(), where="new manifest")  # validate before swapping in
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700; an artifact folder is as readable as any other
    bar.finish()
    return manifest


def _export_fp16(loaded, tmp: Path, trace_args, input_names, opset, external, threads, cases, fp32_outs,
                 bound) -> dict:
    """denoiser.fp16.onnx by torch half export (float32 I/O, casts inside); drift vs fp32 ORT on the parity inputs."""
    half_unet = copy.deepcopy(loaded.unet).half()
    module = _wrapper(half_unet, bool(loaded.unet.config.num_class_embeds), half=True)
    try:
        exporter = _export_onnx(module, trace_args, tmp / FP16_NAME, input_names, opset, external)
    except ExportError as exc:
        raise ExportError(f"fp16 export failed ({exc}); export without --fp16") from None
    session = _ort_session(tmp / FP16_NAME, threads)
    outs = [session.run(None, feed)[0] for feed in cases]
    finite = all(np.isfinite(o).all() for o in outs)
    drift_abs, drift_rel = _compare(outs, fp32_outs) if finite else (float("inf"), float("inf"))
    drift_abs_json = drift_abs if math.isfinite(drift_abs) else 1e30
    return {"file": FP16_NAME, "method": f"torch half export ({exporter}), weights and activations fp16",
            "io_dtype": "float32", "timestep_embedding": "float32 sinusoid, cast to fp16 by diffusers",
            "drift_vs": "fp32 ONNX on ORT CPU, parity inputs", "drift_max_abs": drift_abs_json,
            "drift_max_rel": drift_rel if math.isfinite(drift_rel) else 1e30, "bound": float(bound),
            "usable": bool(finite and drift_abs <= bound)}


# ==================================================================================== bench
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _bench_model(which: str) -> tuple[LoadedModel, str]:
    import torch
    from diffusers import UNet2DModel

    from abcd_edge.paths import DEMO_MODEL_DIR

    if which == "demo":
        if (DEMO_MODEL_DIR / "unet" / "config.json").is_file():
            try:
                steps = json.loads((DEMO_MODEL_DIR / "training.json").read_text())["steps"]
            except (OSError, ValueError, KeyError):
                steps = "?"
            return load_model("demo"), f"trained ({steps} steps, export/demo-model)"
        from abcd_edge.demo.train import UNET_CONFIG, build_unet

        torch.manual_seed(0)
        unet, cfg, weights = build_unet(), UNET_CONFIG, "random (export/demo-model not built yet)"
    elif which == "cifar10-shaped":
        torch.manual_seed(0)
        unet, cfg, weights = UNet2DModel(**CIFAR10_UNET_CONFIG), CIFAR10_UNET_CONFIG, "random"
    else:
        raise UserError(f"unknown bench model {which!r}; accepted: demo, cifar10-shaped")
    return LoadedModel(unet=unet.eval(), source=f"{which} (built from config)", source_hash="0" * 64,
                       source_weights=[], scheduler_config=dict(DEFAULT_SCHEDULER),
                       scheduler_source="default DDPM", model_kind="unconditional", prediction_type="epsilon",
                       timestep_convention="ddpm-index"), weights


def export_bench(models=("demo", "cifar10-shaped"), threads: int = 2, runs: int = 30, warmup: int = 5,
                 progress: bool = True) -> list[dict]:
    """ORT CPU vs torch eager median step latency (batch 1, same process and threads), FLOPs/step, parity.

    Calls are interleaved (ORT, torch, ORT, ...) so background load hits both alike, and
    ORT's idle workers do not spin (they would steal the cores torch's next call needs).
    The 1-minute load average before and after is recorded: on a busy machine the
    absolute figures mean little, the ratio somewhat more.
    """
    import onnxruntime
    import torch

    torch.set_num_threads(threads)
    results = []
    for which in models:
        loaded, weights = _bench_model(which)
        with tempfile.TemporaryDirectory(prefix="abcd-bench-") as d:
            out = Path(d) / which
            bar = _Stages(progress)
            try:
                manifest = _export_loaded(loaded, out, None, [1], fp16=False, trt=False, opset=17, bar=bar,
                                          name=which, threads=threads, parity_tol=PARITY_TOL,
                                          fp16_bound=FP16_DRIFT_BOUND, external_data=None)
            finally:
                bar.close()
            session = _ort_session(out / ONNX_NAME, threads, spinning=False)
            module = _wrapper(loaded.unet, False)
            load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            feed = _parity_inputs(loaded, manifest.resolution, [1], (500.5,))[0]
            t_ort, t_torch = [], []
            for i in range(warmup + runs):
                t0 = time.perf_counter()
                session.run(None, feed)
                t1 = time.perf_counter()
                _torch_run(module, feed)
                t2 = time.perf_counter()
                if i >= warmup:
                    t_ort.append((t1 - t0) * 1e3)
                    t_torch.append((t2 - t1) * 1e3)
        ort_ms, torch_ms = statistics.median(t_ort), statistics.median(t_torch)
        results.append({
            "model": which, "weights": weights, "params": manifest.params, "resolution": manifest.resolution,
            "flops_per_step": manifest.flops_per_step, "flops_torch": manifest.flops_torch,
            "flops_rel_diff": manifest.flops_rel_diff, "parity_max_abs": manifest.parity["max_abs"],
            "parity_max_rel": manifest.parity["max_rel"], "ort_median_ms": ort_ms, "torch_median_ms": torch_ms,
            "ort_over_torch": ort_ms / torch_ms, "ort_gflops_per_s": manifest.flops_per_step / ort_ms / 1e6,
            "threads": threads, "runs": runs, "batch": 1, "cpu": _cpu_name(), "cores": os.cpu_count(),
            "ort_spinning": False, "load_avg_1min": [load_before, os.getloadavg()[0] if load_before is not None else None],
            "torch_version": torch.__version__, "onnxruntime_version": onnxruntime.__version__,
        })
    return results


def format_bench(results: list[dict]) -> str:
    """A Markdown table of :func:`export_bench` results."""
    rows = ["| model | weights | params | FLOPs/step | ORT CPU median ms | torch eager median ms | ORT/torch | "
            "parity max abs | FLOPs ONNX vs torch |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| {r['model']} | {r['weights']} | {r['params'] / 1e6:.2f} M | {r['flops_per_step'] / 1e9:.3f} G "
                    f"| {r['ort_median_ms']:.2f} | {r['torch_median_ms']:.2f} | {r['ort_over_torch']:.2f} "
                    f"| {r['parity_max_abs']:.1e} | {r['flops_rel_diff']:.2%} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m abcd_edge.export.pipeline --bench  (the CLI wires `abcd-edge export`)
    import argparse

    ap = argparse.ArgumentParser(description="export bench (ORT CPU vs torch eager)")
    ap.add_argument("--bench", action="store_true", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    res = export_bench(threads=a.threads, runs=a.runs)
    print(format_bench(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
