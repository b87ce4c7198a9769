"""ONNX -> a serialized TensorRT engine (``denoiser.plan``; a pipeline artifact's ``<component>/model.plan``,
:mod:`abcd_edge.export.sd_pipeline`) with the TensorRT Python API, on the target device.

A plan only loads on the TensorRT version that built it and is tuned for one GPU, so
its record names both (the GPU from :func:`abcd_edge.device.tensorrt.detect_gpu`);
:func:`abcd_edge.device.tensorrt.check_trt_plan` refuses it anywhere else.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from abcd_edge.device import tensorrt as trt_device
from abcd_edge.export.errors import ExportError
from abcd_edge.io import atomic_path, write_bytes_atomic

TRT_WORKSPACE_BYTES = 1 << 30
TRT_MISSING = "--trt needs a machine with TensorRT (JetPack or pip tensorrt)"


def import_tensorrt():
    """The ``tensorrt`` module; UserError naming why not (before minutes of export work)."""
    return trt_device.import_tensorrt(TRT_MISSING)


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
    trt = import_tensorrt()
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
        raise ExportError(f"TensorRT could not build an engine from {source.name} (see the TensorRT log above)")
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(bytes(memoryview(serialized)))
    if timing_cache_out is not None:
        write_bytes_atomic(timing_cache_out, bytes(memoryview(config.get_timing_cache().serialize())))
    gpu = trt_device.detect_gpu()
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
