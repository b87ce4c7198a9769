"""torch -> ONNX for a loaded UNet, and how well the ONNX matches: parity against torch, fp16 with its drift.

The exported graph takes ``sample`` float32 [B, C, H, W], ``timestep`` float32 [B]
(continuous t) and, for a class-conditional UNet, ``class_labels`` int64 [B]; it
returns ``prediction`` float32. The batch axis is dynamic. Weights go to
``<name>.data`` (ONNX external data) when asked, as they must above protobuf's 2 GB.
torch, onnx and onnxruntime are imported inside functions.
"""
from __future__ import annotations

import contextlib
import copy
import math
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np

from abcd_edge.export.errors import ExportError, first_line
from abcd_edge.export.model import LoadedModel

PARITY_TIMESTEPS = (999.0, 500.5, 10.0)   # non-integer on purpose: the runtime passes continuous t
PARITY_TOL = 1e-4                          # fp32 ORT vs torch, max abs
FP16_DRIFT_BOUND = 5e-2                    # fp16 ORT vs fp32 ORT, max abs; over it fp16 is marked unusable
EXTERNAL_DATA_BYTES = 1_800_000_000        # weights above this go to denoiser.onnx.data (protobuf limit 2 GB)


def denoiser_module(unet, class_conditional: bool, half: bool = False):
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


def io_spec(loaded: LoadedModel, resolution: int) -> tuple[list[dict], list[dict]]:
    """The manifest's ``inputs`` and ``outputs``: [{"name", "dtype", "shape"}], the batch axis named "batch"."""
    cfg = loaded.unet.config
    inputs = [{"name": "sample", "dtype": "float32", "shape": ["batch", cfg.in_channels, resolution, resolution]},
              {"name": "timestep", "dtype": "float32", "shape": ["batch"]}]
    if cfg.num_class_embeds:
        inputs.append({"name": "class_labels", "dtype": "int64", "shape": ["batch"]})
    outputs = [{"name": "prediction", "dtype": "float32", "shape": ["batch", cfg.out_channels, resolution, resolution]}]
    return inputs, outputs


def torch_inputs(loaded: LoadedModel, resolution: int, batch: int, seed: int = 0):
    """Seeded example inputs (sample, timestep[, class_labels]) as torch tensors, for tracing and FLOP counting."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cfg = loaded.unet.config
    args = [torch.randn(batch, cfg.in_channels, resolution, resolution, generator=g),
            torch.tensor([500.5, 10.0] * batch, dtype=torch.float32)[:batch]]
    if cfg.num_class_embeds:
        args.append(torch.arange(batch, dtype=torch.int64) % cfg.num_class_embeds)
    return tuple(args)


def export_onnx(module, args, path: Path, input_names: list[str], opset: int, external: bool,
                output_names: tuple[str, ...] | list[str] = ("prediction",)) -> str:
    """torch -> ONNX at ``path`` with a dynamic batch axis on every input and output (weights in
    ``path.name + '.data'`` beside it when ``external``); the TorchScript exporter first, dynamo when it
    fails. Returns the exporter used; both failing is one ExportError naming each one's first line."""
    import onnx
    import torch

    out_names = list(output_names)
    scratch = path.parent / f".{path.name}.trace"
    scratch.mkdir(parents=True)
    raw = scratch / path.name
    errors, used = [], None
    try:
        for dynamo in (False, True):
            try:
                with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
                    warnings.simplefilter("ignore")
                    if not dynamo:
                        torch.onnx.export(module, args, str(raw), dynamo=False, input_names=input_names,
                                          output_names=out_names, opset_version=opset, do_constant_folding=True,
                                          dynamic_axes={n: {0: "batch"} for n in input_names + out_names})
                    else:
                        batch = torch.export.Dim("batch", min=1, max=4096)
                        torch.onnx.export(module, args, str(raw), dynamo=True, input_names=input_names,
                                          output_names=out_names, opset_version=opset, external_data=True,
                                          dynamic_shapes=tuple({0: batch} for _ in args))
                used = "torch.onnx.export(dynamo=True)" if dynamo else "torch.onnx.export(dynamo=False)"
                break
            except Exception as exc:  # noqa: BLE001 - unsupported op or opset: try the other exporter
                errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {first_line(exc)}")
                for f in scratch.iterdir():
                    f.unlink()
        if used is None:
            raise ExportError(f"ONNX export failed at opset {opset} ({path.parent.name}/{path.name}): "
                              + "; ".join(errors))
        m = onnx.load(str(raw))  # pulls in any external data the exporter wrote
        data = path.parent / (path.name + ".data")
        for f in (path, data):
            if f.exists():
                f.unlink()
        if external:
            onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
        else:
            onnx.save_model(m, str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return used


def ort_session(path: Path, threads: int, spinning: bool = True):
    """An ONNX Runtime CPU session on ``threads`` intra-op threads (one inter-op), warnings silenced."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spinning:  # idle ORT workers would otherwise spin on the cores torch's next call needs
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def parity_inputs(loaded: LoadedModel, resolution: int, batches: list[int], timesteps) -> list[dict]:
    """ORT feeds for every (batch, timestep) pair, seeded: the parity and fp16 drift checks run on these."""
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


def torch_run(module, feed: dict) -> np.ndarray:
    """``module`` on an ORT feed, without gradients, as a numpy array."""
    import torch

    with torch.no_grad():
        args = [torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"])]
        if "class_labels" in feed:
            args.append(torch.from_numpy(feed["class_labels"]))
        return module(*args).numpy()


def compare_outputs(outs: list[np.ndarray], refs: list[np.ndarray]) -> tuple[float, float]:
    """(max abs error, max abs error / max |ref|) over all output pairs; the relative one capped at 1e30."""
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



def export_fp16(loaded: LoadedModel, path: Path, trace_args, input_names, opset, external, threads, cases,
                fp32_outs, bound) -> dict:
    """An fp16 ONNX at ``path`` by torch half export (float32 I/O, casts inside); drift vs fp32 ORT on the parity
    inputs. Returns the manifest's ``fp16`` record (``usable`` False when the drift is over ``bound``)."""
    half_unet = copy.deepcopy(loaded.unet).half()
    module = denoiser_module(half_unet, bool(loaded.unet.config.num_class_embeds), half=True)
    try:
        exporter = export_onnx(module, trace_args, path, input_names, opset, external)
    except ExportError as exc:
        raise ExportError(f"fp16 export failed ({exc}); export without --fp16") from None
    session = ort_session(path, threads)
    outs = [session.run(None, feed)[0] for feed in cases]
    finite = all(np.isfinite(o).all() for o in outs)
    drift_abs, drift_rel = compare_outputs(outs, fp32_outs) if finite else (float("inf"), float("inf"))
    drift_abs_json = drift_abs if math.isfinite(drift_abs) else 1e30
    return {"file": path.name, "method": f"torch half export ({exporter}), weights and activations fp16",
            "io_dtype": "float32", "timestep_embedding": "float32 sinusoid, cast to fp16 by diffusers",
            "drift_vs": "fp32 ONNX on ORT CPU, parity inputs", "drift_max_abs": drift_abs_json,
            "drift_max_rel": drift_rel if math.isfinite(drift_rel) else 1e30, "bound": float(bound),
            "usable": bool(finite and drift_abs <= bound)}
