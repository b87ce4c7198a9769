"""ORT CPU vs torch eager: median step latency of an exported UNet at batch 1 (``abcd-edge export --bench``).

:func:`export_bench` exports the demo UNet and a CIFAR-10-sized UNet (google/ddpm-cifar10-32's
config, random weights) to a temporary folder and times both runtimes in one process on
the same threads; :func:`format_bench` renders the results as a Markdown table.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from abcd_edge.device.hardware import cpu_model
from abcd_edge.errors import UserError
from abcd_edge.export.model import DEFAULT_SCHEDULER, LoadedModel, load_model
from abcd_edge.export.onnx_export import (FP16_DRIFT_BOUND, PARITY_TOL, denoiser_module, ort_session, parity_inputs,
                                          torch_run)
from abcd_edge.export.pipeline import ONNX_NAME, StageBar, export_loaded

CIFAR10_UNET_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32,
    act_fn="silu", attention_head_dim=None, center_input_sample=False, mid_block_scale_factor=1,
    time_embedding_type="positional")


def _bench_model(which: str) -> tuple[LoadedModel, str]:
    """The bench's model and a word on its weights: the trained demo UNet, or a CIFAR-10-sized one, random."""
    if which == "demo":
        from abcd_edge.paths import DEMO_MODEL_DIR

        loaded = load_model("demo")  # a UserError naming how to build it when export/demo-model is not there
        try:
            steps = json.loads((DEMO_MODEL_DIR / "training.json").read_text())["steps"]
        except (OSError, ValueError, KeyError):
            steps = "?"
        return loaded, f"trained ({steps} steps, export/demo-model)"
    if which != "cifar10-shaped":
        raise UserError(f"unknown bench model {which!r}; accepted: demo, cifar10-shaped")
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**CIFAR10_UNET_CONFIG)
    return LoadedModel(unet=unet.eval(), source=f"{which} (built from config)", source_hash="0" * 64,
                       source_weights=[], scheduler_config=dict(DEFAULT_SCHEDULER),
                       scheduler_source="default DDPM", model_kind="unconditional", prediction_type="epsilon",
                       timestep_convention="ddpm-index"), "random"


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
            bar = StageBar(progress)
            try:
                manifest = export_loaded(loaded, out, None, [1], fp16=False, trt=False, opset=17, bar=bar,
                                         name=which, threads=threads, parity_tol=PARITY_TOL,
                                         fp16_bound=FP16_DRIFT_BOUND, external_data=None)
            finally:
                bar.close()
            session = ort_session(out / ONNX_NAME, threads, spinning=False)
            module = denoiser_module(loaded.unet, False)
            load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            feed = parity_inputs(loaded, manifest.resolution, [1], (500.5,))[0]
            t_ort, t_torch = [], []
            for i in range(warmup + runs):
                t0 = time.perf_counter()
                session.run(None, feed)
                t1 = time.perf_counter()
                torch_run(module, feed)
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
            "threads": threads, "runs": runs, "batch": 1, "cpu": cpu_model(), "cores": os.cpu_count(),
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
