"""The staged export: a model in, an artifact folder out (ONNX [+ fp16] [+ TensorRT plan] + manifest.json).

    export_model("demo", Path("export/demo"))                       # denoiser.onnx + manifest.json
    export_model("path/to/unet_or_pipeline", out, batches=(1, 4), fp16=True)
    export_model("demo", out, trt=True)                             # + denoiser.plan where TensorRT is

Stages (one tqdm bar): load, trace, export, check, flops, fp16, trt, write. Everything
is built in a temporary folder beside ``out`` and swapped in only when the fp32 ONNX
passes parity against torch (ORT CPU, max abs <= ``parity_tol``); a failed or refused
export leaves an existing ``out`` untouched.

The stages' work lives in :mod:`~abcd_edge.export.model` (load),
:mod:`~abcd_edge.export.onnx_export` (trace, export, check, fp16),
:mod:`~abcd_edge.export.flops` and :mod:`~abcd_edge.export.tensorrt`. torch, onnx,
onnxruntime and diffusers are imported inside functions, so importing this module is cheap.
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from abcd_edge.errors import UserError
from abcd_edge.export.errors import ExportError, first_line
from abcd_edge.export.flops import count_flops
from abcd_edge.export.model import LoadedModel, alphas_cumprod, load_model
from abcd_edge.export.onnx_export import (
    FP16_DRIFT_BOUND, EXTERNAL_DATA_BYTES, PARITY_TIMESTEPS, PARITY_TOL, compare_outputs, denoiser_module,
    export_fp16, export_onnx, io_spec, ort_session, parity_inputs, torch_flops, torch_inputs, torch_run)
from abcd_edge.export.tensorrt import build_trt_plan, import_tensorrt
from abcd_edge.formats.manifest import MANIFEST_NAME, SCHEMA_VERSION, Manifest, sha256_file
from abcd_edge.io import atomic_dir

FLOPS_TOL = 0.05                           # ONNX count vs torch.utils.flop_counter, relative
STAGES = ("load", "trace", "export", "check", "flops", "fp16", "trt", "write")
ONNX_NAME, FP16_NAME, PLAN_NAME, TIMING_CACHE_NAME = ("denoiser.onnx", "denoiser.fp16.onnx", "denoiser.plan",
                                                      "denoiser.timing.cache")


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


def _versions() -> dict:
    import diffusers
    import onnx
    import onnxruntime
    import torch

    from abcd_edge import __version__

    return dict(abcd_edge_version=__version__, torch_version=torch.__version__, onnx_version=onnx.__version__,
                onnxruntime_version=onnxruntime.__version__, diffusers_version=diffusers.__version__)


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
        import_tensorrt()  # fail fast, before minutes of work
    bar = StageBar(progress)
    try:
        bar.stage("load")
        from abcd_edge.export.model import resolve_root
        from abcd_edge.export.sd_pipeline import export_latent_pipeline, latent_pipeline_kind

        root, source = resolve_root(model)
        kind = latent_pipeline_kind(root, model)    # SD / LCM / LDM folders; None: the pixel UNet2DModel path
        if kind is not None:
            _check_out(out, protect=root)
            from abcd_edge.export.sd_pipeline import EXTERNAL_DATA_BYTES as PIPE_EXTERNAL

            external_bytes = {None: PIPE_EXTERNAL, True: 0, False: sys.maxsize}[external_data]
            return export_latent_pipeline(kind, root, source, out, batch_list, opset=opset, bar=bar, name=name,
                                          threads=threads, resolution=resolution, fp16=fp16, trt=trt,
                                          external_bytes=external_bytes)
        loaded = load_model(model)
        _check_out(out, protect=loaded.root)
        return export_loaded(loaded, out, resolution, batch_list, fp16=fp16, trt=trt, opset=opset, bar=bar,
                             name=name, threads=threads, parity_tol=parity_tol, fp16_bound=fp16_bound,
                             external_data=external_data)
    finally:
        bar.close()


class StageBar:
    """One tqdm bar over :data:`STAGES` (on stderr; off when ``progress`` is False)."""

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


def export_loaded(loaded: LoadedModel, out: Path, resolution: int | None, batch_list: list[int], *, fp16: bool,
                  trt: bool, opset: int, bar: StageBar, name: str | None, threads: int | None, parity_tol: float,
                  fp16_bound: float, external_data: bool | None) -> Manifest:
    """The stages after "load" for an already loaded model (``batch_list`` checked); writes ``out`` atomically."""
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
    inputs, outputs = io_spec(loaded, res)
    input_names = [i["name"] for i in inputs]
    params = sum(p.numel() for p in unet.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES if external_data is None else bool(external_data)
    module = denoiser_module(unet, class_cond)
    old_cache = out / TIMING_CACHE_NAME

    with atomic_dir(out) as tmp:
        bar.stage("trace")
        trace_args = torch_inputs(loaded, res, 2)
        try:
            with torch.no_grad():
                module(*trace_args)  # a model that cannot run at this resolution fails here, with its reason
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"the UNet does not run at resolution {res} in torch: {first_line(exc)}") from None
        bar.stage("export")
        exporter = export_onnx(module, trace_args, tmp / ONNX_NAME, input_names, opset, external)
        if "dynamo=True" in exporter:
            notes.append("exported with the dynamo exporter (the TorchScript exporter failed)")

        bar.stage("check")
        session = ort_session(tmp / ONNX_NAME, threads)
        cases = parity_inputs(loaded, res, checked, PARITY_TIMESTEPS)
        refs = [torch_run(module, feed) for feed in cases]
        try:
            outs = [session.run(None, feed)[0] for feed in cases]
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"ONNX Runtime cannot run the exported model: {first_line(exc)}") from None
        max_abs, max_rel = compare_outputs(outs, refs)
        if not max_abs <= parity_tol:
            worst = max(range(len(cases)), key=lambda i: float(np.max(np.abs(outs[i] - refs[i]))))
            raise ExportError(f"parity failed: ONNX Runtime vs torch max abs error {max_abs:.3g} > {parity_tol:g} "
                              f"(batch {cases[worst]['sample'].shape[0]}, t={cases[worst]['timestep'][0]:g}); "
                              f"nothing was written to {out}")
        parity = {"timesteps": list(PARITY_TIMESTEPS), "batches": checked, "max_abs": max_abs, "max_rel": max_rel,
                  "tol": parity_tol, "passed": True, "provider": "CPUExecutionProvider", "seed": 0,
                  "rel_convention": "max|ort - torch| / max|torch|"}

        bar.stage("flops")
        counted = count_flops(tmp / ONNX_NAME, batch=1)
        flops_t = torch_flops(module, torch_inputs(loaded, res, 1))
        rel = abs(counted["total"] - flops_t) / flops_t if flops_t else float("inf")
        if rel > FLOPS_TOL:
            msg = (f"FLOPs from the ONNX graph ({counted['total']:.4g}) and torch.utils.flop_counter ({flops_t:.4g}) "
                   f"differ by {rel:.1%} (> {FLOPS_TOL:.0%})")
            warnings.warn(msg, stacklevel=2)
            notes.append(msg)

        fp16_rec = None
        if fp16:
            bar.stage("fp16")
            fp16_rec = export_fp16(loaded, tmp / FP16_NAME, trace_args, input_names, opset, external, threads, cases,
                                   outs, fp16_bound)
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
            alphas_cumprod=alphas_cumprod(loaded.scheduler_config) if loaded.model_kind != "consistency" else None,
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
