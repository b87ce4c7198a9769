"""TensorRT plans on this machine: which GPU this is, and whether an artifact's plan may load here.

Torch-free (stdlib + the manifest reader), for the runtime on a Jetson; ``tensorrt`` is
imported only where a check needs its version. The GPU comes from
:mod:`abcd_edge.device.hardware` (NVML, then ``nvidia-smi``); on a Jetson with neither,
the device-tree board model stands in for the GPU name.
"""
from __future__ import annotations

import os
from pathlib import Path

from abcd_edge.device import hardware
from abcd_edge.errors import UserError
from abcd_edge.formats.manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_file


def import_tensorrt(why: str):
    """The ``tensorrt`` module, or a one-line UserError ending in ``why`` (what needed it)."""
    try:
        import tensorrt  # type: ignore
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA install
        raise UserError(f"TensorRT is not installed here (import tensorrt failed: {exc}); {why}") from None
    return tensorrt


def _norm_gpu(name: str) -> str:
    return " ".join(str(name).replace("NVIDIA ", "").split()).casefold()


def detect_gpu() -> dict:
    """{"gpu_name", "compute_capability", "how"} of GPU 0, best effort, torch-free; name None when unknown.

    ``how`` is where the name came from: "nvml" or "nvidia-smi" (:func:`hardware.gpu_info`), else
    "device-tree" (the Jetson board model, compute capability unknown), else "none".
    """
    gpu = hardware.gpu_info()
    if gpu is not None:
        return {"gpu_name": gpu["name"], "compute_capability": hardware.gpu_compute_capability(),
                "how": gpu["source"]}
    board = hardware.device_tree_model()
    if board:
        return {"gpu_name": board, "compute_capability": None, "how": "device-tree"}
    return {"gpu_name": None, "compute_capability": None, "how": "none"}


def load_trt_plan_meta(artifact_dir: str | os.PathLike, manifest: Manifest | None = None) -> dict:
    """The manifest's ``trt`` record with ``plan_path`` added; refuses an artifact without a usable plan."""
    artifact_dir = Path(artifact_dir)
    m = manifest if manifest is not None else load_manifest(artifact_dir, verify_hashes=False)
    if m.trt is None:
        raise UserError(f"artifact {str(artifact_dir)!r} has no TensorRT plan; build one on the target device "
                        f"with `abcd-edge export --trt --out {artifact_dir}`")
    plan = artifact_dir / m.trt["plan"]
    if not plan.is_file():
        raise UserError(f"{plan} is listed in the manifest but missing (plans are device-specific and not "
                        f"committed); rebuild it with `abcd-edge export --trt --out {artifact_dir}`")
    if sha256_file(plan) != m.trt["plan_sha256"]:
        raise UserError(f"{plan} does not match its sha256 in {MANIFEST_NAME}; rebuild it with --trt")
    return dict(m.trt, plan_path=str(plan))


def check_trt_plan(manifest: Manifest, tensorrt_version: str | None = None, gpu_name: str | None = None,
                   compute_capability: str | None = None) -> dict:
    """Refuse (UserError) a plan built for another GPU or TensorRT version; return the trt record if fine.

    Pure over the manifest when ``tensorrt_version`` and ``gpu_name`` are given; when
    left out they are taken from this machine (``import tensorrt``, :func:`detect_gpu`).
    A serialized TensorRT engine only loads on the TensorRT version that built it and
    is tuned for one GPU, so both must match exactly (GPU names compared ignoring case,
    spacing and an "NVIDIA " prefix; compute capability too when both sides know it).
    """
    trt = manifest.trt
    if trt is None:
        raise UserError(f"artifact {manifest.name!r} has no TensorRT plan; build one on the target device with "
                        "`abcd-edge export --trt`")
    if tensorrt_version is None:
        tensorrt_version = import_tensorrt(f"the plan in {manifest.name!r} needs TensorRT "
                                           f"{trt['tensorrt_version']}").__version__
    if gpu_name is None:
        info = detect_gpu()
        gpu_name = info["gpu_name"]
        compute_capability = compute_capability or info["compute_capability"]
        if gpu_name is None:
            raise UserError(f"cannot tell which GPU this is (no NVML, nvidia-smi or Jetson model); the plan in "
                            f"{manifest.name!r} was built for {trt['gpu_name']!r}")
    if str(tensorrt_version) != str(trt["tensorrt_version"]):
        raise UserError(f"the TensorRT plan in {manifest.name!r} was built with TensorRT {trt['tensorrt_version']} "
                        f"but this machine has TensorRT {tensorrt_version}; rebuild it here with "
                        "`abcd-edge export --trt`")
    if _norm_gpu(gpu_name) != _norm_gpu(trt["gpu_name"]):
        raise UserError(f"the TensorRT plan in {manifest.name!r} was built for GPU {trt['gpu_name']!r} but this "
                        f"machine has {gpu_name!r}; rebuild it here with `abcd-edge export --trt`")
    built_cc = trt.get("compute_capability")
    if built_cc and compute_capability and str(built_cc) != str(compute_capability):
        raise UserError(f"the TensorRT plan in {manifest.name!r} was built for compute capability {built_cc} but "
                        f"this GPU has {compute_capability}; rebuild it here with `abcd-edge export --trt`")
    return trt
