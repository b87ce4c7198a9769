"""Denoisers: one call interface over ONNX Runtime and TensorRT plans.

``denoiser(sample, timestep) -> prediction``. A call in flight can be abandoned
from another thread (``abandon()``): ONNX Runtime checks ``RunOptions.terminate``
between kernels; a TensorRT call is simply not waited for. An abandoned call
raises :class:`Abandoned` in the caller. Nothing here imports torch: calibration
drives the diffusers UNet in torch directly (``abcd_edge.calibrate.state.load_torch_unet``).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from abcd_edge.errors import UserError

BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "trt")
_ORT_PROVIDERS = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-trt": "TensorrtExecutionProvider",
}


class Abandoned(RuntimeError):
    """The denoiser call was abandoned by the deadline guard."""


class Denoiser(Protocol):
    backend: str

    def __call__(self, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray: ...

    def abandon(self) -> None: ...


def backend_unavailable_reason(backend: str) -> str | None:
    """None when this machine can run ``backend``, else why not."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}"
    if backend == "trt":
        try:
            import tensorrt  # noqa: F401
        except Exception as exc:  # ImportError, or a broken CUDA install
            return f"TensorRT is not importable here ({exc.__class__.__name__}: {exc})"
        return None
    import onnxruntime as ort

    provider = _ORT_PROVIDERS[backend]
    if provider not in ort.get_available_providers():
        return (f"ONNX Runtime here has no {provider} (available: {', '.join(ort.get_available_providers())}); "
                "see `abcd-edge info`")
    return None


def _preload_cuda_libraries(ort) -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels, if present (onnxruntime >= 1.21 documents this)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:  # libraries installed system-wide instead: the session finds them itself
            pass


class OrtComponent:
    """An ONNX Runtime session over one ONNX file (a pipeline's text encoder or VAE decoder, or the base of
    :class:`OrtDenoiser`); one call at a time per instance, abandonable from another thread."""

    def __init__(self, onnx_path: str | Path, backend: str = "ort-cpu", threads: int | None = None,
                 provider_options: dict | None = None, spinning: bool = True):
        import onnxruntime as ort

        reason = backend_unavailable_reason(backend)
        if reason or backend == "trt":
            raise UserError(reason or "backend 'trt' runs a TensorRT plan, not an ONNX file")
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise UserError(f"ONNX file {str(onnx_path)!r} does not exist")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if not spinning:    # one of several sessions taking turns on the same cores (a pipeline's components):
            # an idle session's workers would spin on the cores the next component needs
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        provider = _ORT_PROVIDERS[backend]
        providers = [(provider, provider_options or {})]
        if backend != "ort-cpu":
            providers.append(("CPUExecutionProvider", {}))
            _preload_cuda_libraries(ort)
        try:
            self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
        except Exception as exc:
            raise UserError(f"ONNX Runtime cannot load {str(onnx_path)!r}: {str(exc).splitlines()[0]}") from None
        if self.session.get_providers()[0] != provider:
            # ONNX Runtime falls back to the CPU, with only a log line, when a GPU
            # provider cannot start (missing CUDA/cuDNN libraries, no device).
            raise UserError(f"ONNX Runtime could not start {provider} for backend {backend!r} "
                            f"(session providers: {', '.join(self.session.get_providers())}); "
                            "check the CUDA/cuDNN libraries with `abcd-edge info`")
        self.backend = backend
        self.threads = threads
        self.provider_options = provider_options or {}
        self.path = onnx_path
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._lock = threading.Lock()
        self._run_options: ort.RunOptions | None = None
        self._ort = ort

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def run(self, feeds: dict[str, np.ndarray], output: str | None = None) -> np.ndarray:
        """One call: the output named ``output`` (default: the first)."""
        run_options = self._ort.RunOptions()
        with self._lock:
            self._run_options = run_options
        try:
            names = None if output is None else [output]
            return self.session.run(names, feeds, run_options)[0]
        except Exception as exc:
            if run_options.terminate:
                raise Abandoned(f"{self.path.parent.name or 'model'} call abandoned by the deadline guard") from None
            raise RuntimeError(f"{self.path} call failed: {exc}") from exc
        finally:
            with self._lock:
                self._run_options = None

    def abandon(self) -> None:
        with self._lock:
            if self._run_options is not None:
                self._run_options.terminate = True


class OrtDenoiser(OrtComponent):
    """An ONNX Runtime session over ``denoiser.onnx`` (or a pipeline's ``unet/model.onnx``); one call at a
    time per instance. Inputs the graph has beyond sample and timestep (``encoder_hidden_states``,
    ``timestep_cond`` of a pipeline UNet) are passed as keyword arguments."""

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, class_labels: np.ndarray | None = None,
                 **inputs: np.ndarray) -> np.ndarray:
        feeds = {"sample": np.ascontiguousarray(sample, np.float32),
                 "timestep": np.ascontiguousarray(timestep, np.float32)}
        if "class_labels" in self._inputs:
            if class_labels is None:
                class_labels = np.zeros(sample.shape[0], np.int64)
            feeds["class_labels"] = np.ascontiguousarray(class_labels, np.int64)
        for name, value in inputs.items():
            if name not in self._inputs:
                raise ValueError(f"the denoiser graph has no input {name!r} (inputs: {', '.join(self._inputs)})")
            feeds[name] = np.ascontiguousarray(value, np.float32)
        run_options = self._ort.RunOptions()
        with self._lock:
            self._run_options = run_options
        try:
            return self.session.run(None, feeds, run_options)[0]
        except Exception as exc:
            if run_options.terminate:
                raise Abandoned("denoiser call abandoned by the deadline guard") from None
            raise RuntimeError(f"denoiser call failed: {exc}") from exc
        finally:
            with self._lock:
                self._run_options = None


class TrtDenoiser:
    """A serialized TensorRT engine (``denoiser.plan``), executed on its own CUDA stream.

    Lazy imports: ``tensorrt`` and ``cuda`` (cuda-python's runtime bindings). The
    plan's recorded TensorRT version and GPU must match this machine (checked by
    :func:`abcd_edge.device.tensorrt.check_trt_plan` before deserialising). Abandoning a call means
    no longer waiting on the stream: the caller returns at once and the work
    finishes in the background before the next call reuses the buffers.
    """

    def __init__(self, plan_path: str | Path, poll_s: float = 2e-4):
        try:
            import tensorrt as trt
            from cuda import cudart
        except Exception as exc:
            raise UserError(f"backend 'trt' needs tensorrt and cuda-python ({exc.__class__.__name__}: {exc})") from None
        self.backend = "trt"
        self._trt, self._cudart = trt, cudart
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT could not deserialise {str(plan_path)!r} (built for another GPU or version?)")
        self.context = self.engine.create_execution_context()
        self.stream = self._check(cudart.cudaStreamCreate())
        self.poll_s = poll_s
        self._abandon = threading.Event()
        self._buffers: dict[str, tuple[int, int]] = {}

    def _check(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise RuntimeError(f"CUDA error {err}")
        return rest[0] if len(rest) == 1 else rest

    def _device_buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self._check(self._cudart.cudaFree(ptr))
            ptr = self._check(self._cudart.cudaMalloc(nbytes))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def __call__(self, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        import time

        cudart = self._cudart
        self._check(cudart.cudaStreamSynchronize(self.stream))  # a previously abandoned call must be done
        self._abandon.clear()
        sample = np.ascontiguousarray(sample, np.float32)
        timestep = np.ascontiguousarray(timestep, np.float32)
        out = np.empty_like(sample)
        kind_h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name, arr in (("sample", sample), ("timestep", timestep)):
            ptr = self._device_buffer(name, arr.nbytes)
            self.context.set_input_shape(name, arr.shape)
            self._check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, kind_h2d, self.stream))
            self.context.set_tensor_address(name, ptr)
        out_ptr = self._device_buffer("prediction", out.nbytes)
        self.context.set_tensor_address("prediction", out_ptr)
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        self._check(cudart.cudaMemcpyAsync(out.ctypes.data, out_ptr, out.nbytes,
                                           cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        while True:
            status = cudart.cudaStreamQuery(self.stream)[0]
            if int(status) == 0:
                return out
            if self._abandon.is_set():
                raise Abandoned("TensorRT call abandoned by the deadline guard (stream not waited on)")
            time.sleep(self.poll_s)

    def abandon(self) -> None:
        self._abandon.set()


def open_denoiser(artifact_dir: str | Path, backend: str = "ort-cpu", threads: int | None = None,
                  precision: str = "fp32") -> Denoiser:
    """The runtime's entry point: the artifact's ONNX (or plan) on the chosen backend.

    ``precision`` "fp16" opens ``denoiser.fp16.onnx`` (``abcd-edge export --fp16``), refused in one line
    when the artifact has none or its measured drift marked it unusable."""
    from abcd_edge.device.tensorrt import check_trt_plan, load_trt_plan_meta
    from abcd_edge.formats.manifest import load_manifest

    check_precision(precision)
    artifact_dir = Path(artifact_dir)
    manifest = load_manifest(artifact_dir)
    if backend == "trt":
        if getattr(manifest, "pipeline", None) is not None:
            raise UserError(f"backend 'trt' runs a pixel-space artifact's denoiser.plan; loading a pipeline "
                            f"artifact's per-component plans (`export --trt`) is not implemented yet: run "
                            f"{str(artifact_dir)!r} on ort-cpu, ort-cuda or ort-trt")
        if precision != "fp32":
            raise UserError(f"--precision {precision} applies to the ONNX Runtime backends; backend 'trt' runs "
                            "denoiser.plan, whose precision was fixed when it was built (fp16 where the GPU has it)")
        meta = load_trt_plan_meta(artifact_dir, manifest)
        check_trt_plan(manifest)
        return TrtDenoiser(meta["plan_path"])
    name = getattr(manifest, "denoiser_file", "denoiser.onnx")
    if precision == "fp16" and manifest.pipeline is not None:     # per component (export --fp16)
        manifest.check_pipeline_precision(precision, str(artifact_dir))
        name = manifest.component_file("unet", precision)
    elif precision == "fp16":
        fp16 = manifest.fp16
        if not fp16:
            raise UserError(f"--precision fp16: artifact {str(artifact_dir)!r} has no denoiser.fp16.onnx; export it "
                            "with `abcd-edge export --fp16`, or use --precision fp32")
        if not fp16.get("usable"):
            raise UserError(f"--precision fp16: artifact {str(artifact_dir)!r}'s denoiser.fp16.onnx drifts "
                            f"{fp16.get('drift_max_abs', float('nan')):.3g} from fp32 (bound "
                            f"{fp16.get('bound', float('nan')):g}), so its export marked it unusable; use --precision fp32")
        name = fp16.get("file") or "denoiser.fp16.onnx"
    return OrtDenoiser(artifact_dir / name, backend=backend, threads=threads,
                       spinning=getattr(manifest, "pipeline", None) is None)


PRECISIONS = ("fp32", "fp16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} is unknown; accepted: {', '.join(PRECISIONS)}")
