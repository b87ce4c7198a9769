"""What this machine offers (``abcd-edge info``) and the device ids profiles are filed under.

Standard library + numpy only; onnxruntime, tensorrt, pynvml and jtop are
imported inside functions and their absence is reported, not raised.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

CPUINFO = "/proc/cpuinfo"
MEMINFO = "/proc/meminfo"
DT_MODEL = "/proc/device-tree/model"
TEGRA_RELEASE = "/etc/nv_tegra_release"
CMD_TIMEOUT_S = 5.0
# A backend whose name holds one of these runs the denoiser on the GPU.
GPU_BACKEND_MARKERS = ("cuda", "trt", "tensorrt", "gpu")


def _read(path: str | Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return None


def device_tree_model(path: str | None = None) -> str:
    """The device-tree board model (``/proc/device-tree/model``: a Jetson's name), NULs dropped; "" where none."""
    return (_read(path or DT_MODEL) or "").replace("\x00", "").strip()


# -- CPU / memory ----------------------------------------------------------------
def cpu_model(cpuinfo_path: str | None = None, dt_model_path: str | None = None) -> str:
    """CPU model: /proc/cpuinfo "model name"; on ARM (no such line) the cpuinfo
    "Hardware"/"Model" line or the device-tree board model (Jetson); else
    platform.processor() or the machine type."""
    text = _read(cpuinfo_path or CPUINFO) or ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if sep and value and key not in fields:
            fields[key] = value
    for key in ("model name", "hardware", "model", "cpu model", "processor"):
        value = fields.get(key, "")
        if value and not value.isdigit():  # ARM "processor : 0" is an index
            return value
    dt = device_tree_model(dt_model_path)
    if dt:
        return dt
    return platform.processor() or platform.machine() or "unknown"


def memory_total_bytes(meminfo_path: str | None = None) -> int | None:
    text = _read(meminfo_path or MEMINFO) or ""
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.M)
    if m:
        return int(m.group(1)) * 1024
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def cpu_counts() -> tuple[int, int]:
    """(logical cores, cores this process may run on)."""
    logical = os.cpu_count() or 1
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = logical
    return logical, usable


# -- libraries -----------------------------------------------------------------
def _onnxruntime() -> tuple[str | None, list[str], str | None]:
    try:
        import onnxruntime as ort
    except Exception as exc:
        return None, [], f"{type(exc).__name__}: {exc}"
    try:
        return str(ort.__version__), list(ort.get_available_providers()), None
    except Exception as exc:
        return str(getattr(ort, "__version__", "?")), [], f"{type(exc).__name__}: {exc}"


def _tensorrt() -> dict:
    try:
        import tensorrt as trt
    except Exception as exc:
        return {"importable": False, "version": None, "error": " ".join(f"{type(exc).__name__}: {exc}".split())}
    return {"importable": True, "version": str(getattr(trt, "__version__", "unknown")), "error": None}


# -- GPU -----------------------------------------------------------------------
def _nvml(read):
    """``read(pynvml)`` between nvmlInit and nvmlShutdown; None when NVML is not importable or fails."""
    try:
        import pynvml
    except Exception:
        return None
    try:
        pynvml.nvmlInit()
        try:
            return read(pynvml)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def _nvidia_smi(query: str) -> list[list[str]] | None:
    """Rows of ``nvidia-smi --query-gpu=<query> --format=csv,noheader`` split into stripped cells;
    None when nvidia-smi is not on PATH, cannot run or fails."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return [[c.strip() for c in line.split(",")] for line in out.stdout.splitlines() if line.strip()]


def gpu_info() -> dict | None:
    """First NVIDIA GPU and driver: NVML if importable, else nvidia-smi; None if neither finds one."""
    def read(nv):
        names = []
        for i in range(int(nv.nvmlDeviceGetCount())):
            name = nv.nvmlDeviceGetName(nv.nvmlDeviceGetHandleByIndex(i))
            names.append(name.decode() if isinstance(name, bytes) else str(name))
        driver = nv.nvmlSystemGetDriverVersion()
        return names, driver.decode() if isinstance(driver, bytes) else str(driver)

    found = _nvml(read)
    if found is not None and found[0]:
        names, driver = found
        return {"name": names[0], "names": names, "count": len(names), "driver": driver, "source": "nvml"}
    rows = [r for r in _nvidia_smi("name,driver_version") or [] if len(r) >= 2 and r[0]]
    if rows:
        names = [r[0] for r in rows]
        return {"name": names[0], "names": names, "count": len(names), "driver": rows[0][1], "source": "nvidia-smi"}
    return None


def gpu_compute_capability() -> str | None:
    """Compute capability of GPU 0 ("8.7"): NVML, else nvidia-smi's compute_cap; None when neither tells."""
    def read(nv):
        major, minor = nv.nvmlDeviceGetCudaComputeCapability(nv.nvmlDeviceGetHandleByIndex(0))
        return f"{major}.{minor}"

    cc = _nvml(read)
    if cc:
        return cc
    rows = _nvidia_smi("compute_cap")
    return rows[0][0] if rows and rows[0] and rows[0][0] else None


# -- Jetson --------------------------------------------------------------------
def _l4t_release(path: str | None = None) -> str | None:
    text = _read(path or TEGRA_RELEASE)
    if not text:
        return None
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _nvpmodel_query() -> str | None:
    """Current power mode name from ``nvpmodel -q`` (what jtop reads too)."""
    exe = shutil.which("nvpmodel")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"NV Power Mode:\s*(.+)", out.stdout)
    return m.group(1).strip() if m else None


def jetson_info(use_jtop: bool = True, dt_model_path: str | None = None, release_path: str | None = None) -> dict | None:
    """Jetson board facts, from jtop where it runs, else device tree / nv_tegra_release / nvpmodel. None off-Jetson."""
    dt = device_tree_model(dt_model_path)
    l4t = _l4t_release(release_path)
    board = None
    if use_jtop:
        from abcd_edge.device.meters import jtop_board_info
        board = jtop_board_info()
    if board is None:
        if not l4t and "jetson" not in dt.lower():
            return None
        board = {"model": dt or None, "module": None, "soc": None, "l4t": l4t, "jetpack": None,
                 "nvpmodel": _nvpmodel_query(), "nvpmodel_id": None, "jetson_clocks": None,
                 "jetson_clocks_status": None, "source": "sysfs"}
    else:
        board.setdefault("model", None)
        board["model"] = board.get("model") or dt or None
        board["l4t"] = board.get("l4t") or l4t
    return board


# -- everything ----------------------------------------------------------------
def machine_info() -> dict:
    """What this machine offers, for ``abcd-edge info`` and for device ids."""
    import numpy
    from abcd_edge.device.telemetry import available_meters

    ort_version, providers, ort_error = _onnxruntime()
    logical, usable = cpu_counts()
    meters = available_meters()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "numpy": numpy.__version__,
        "onnxruntime": ort_version,
        "ort_providers": providers,
        "onnxruntime_error": ort_error,
        "tensorrt": _tensorrt(),
        "power_meters": meters,
        "cpu_model": cpu_model(),
        "cpu_logical_cores": logical,
        "cpu_affinity": usable,
        "memory_total_bytes": memory_total_bytes(),
        "gpu": gpu_info(),
        "jetson": jetson_info(use_jtop=meters.get("jtop") is None),
    }


def format_info(info: dict) -> str:
    """Readable multi-line text of ``machine_info()``."""
    lines = []

    def row(label: str, value: object) -> None:
        lines.append(f"{label:<14}{value}")

    row("python", f"{info.get('python')}  ({info.get('platform')})")
    row("numpy", info.get("numpy"))
    if info.get("onnxruntime"):
        row("onnxruntime", info["onnxruntime"])
        row("  providers", ", ".join(info.get("ort_providers") or []) or "(none)")
    else:
        row("onnxruntime", f"not importable ({info.get('onnxruntime_error')})")
    trt = info.get("tensorrt") or {}
    row("tensorrt", trt.get("version") if trt.get("importable") else f"not importable ({trt.get('error')})")
    mem = info.get("memory_total_bytes")
    row("cpu", f"{info.get('cpu_model')}  ({info.get('cpu_logical_cores')} logical cores, "
               f"{info.get('cpu_affinity')} usable by this process)")
    row("memory", f"{mem / 2**30:.1f} GiB" if mem else "unknown")
    gpu = info.get("gpu")
    if gpu:
        extra = f" (+{gpu['count'] - 1} more)" if gpu.get("count", 1) > 1 else ""
        row("gpu", f"{gpu.get('name')}{extra}, driver {gpu.get('driver')}  [{gpu.get('source')}]")
    else:
        row("gpu", "none found (no NVML, no nvidia-smi)")
    jet = info.get("jetson")
    if jet:
        row("jetson", f"{jet.get('model')}  L4T {jet.get('l4t') or '?'}  JetPack {jet.get('jetpack') or '?'}")
        jc = jet.get("jetson_clocks")
        row("  power mode", f"nvpmodel {jet.get('nvpmodel') or '?'}, jetson_clocks "
                            f"{'?' if jc is None else ('on' if jc else 'off')}  [{jet.get('source')}]")
    lines.append("power meters (auto picks the first usable of jtop, nvml, rapl):")
    for name, reason in (info.get("power_meters") or {}).items():
        lines.append(f"  {name:<6} {'usable' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


# -- device ids ------------------------------------------------------------------
_NOISE = re.compile(r"\((r|tm|c)\)|\b(cpu|processor|with radeon graphics|\d+-core)\b", re.I)


def slug(text: object, max_len: int = 48) -> str:
    """Lowercase [a-z0-9-] slug of any text: 'ORT CPU' -> 'ort-cpu'."""
    s = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-")
    s = re.sub(r"-{2,}", "-", s)
    return s[:max_len].strip("-") or "unknown"


def hw_slug(text: object, max_len: int = 48) -> str:
    """Slug of a hardware name without marketing noise: 'Intel(R) Xeon(R) CPU @ 2.20GHz' -> 'intel-xeon-2-20ghz'."""
    return slug(_NOISE.sub(" ", str(text)), max_len)


def backend_uses_gpu(backend: str) -> bool:
    b = str(backend).lower()
    return any(marker in b for marker in GPU_BACKEND_MARKERS)


def _id_facts() -> dict:
    """The few facts a device id needs, without the slow probes of machine_info().

    Jetson facts come from jtop when it runs (as in machine_info), so both give one id.
    """
    logical, usable = cpu_counts()
    return {"cpu_model": cpu_model(), "cpu_affinity": usable, "cpu_logical_cores": logical,
            "gpu": None, "jetson": jetson_info(use_jtop=True)}


def device_id(backend: str, threads: int | None, info: dict | None = None, precision: str = "fp32") -> str:
    """Stable, filesystem-safe id from hardware + configuration (never the host name).

    ``<cpu|gpu|jetson>-<hardware slugs>-<usable cores>c-<backend>[-fp16][-<threads>t]``, e.g.
    ``cpu-amd-epyc-7b13-2c-ort-cpu-2t``. The GPU name enters only when the
    backend uses the GPU; on a Jetson the board model and its power mode
    (nvpmodel, ``-jc`` when jetson_clocks is on) replace the CPU/GPU names.
    ``threads`` None or 0 means the backend's default and is left out.
    ``precision`` "fp16" (the artifact's denoiser.fp16.onnx) adds ``-fp16``: its steps cost differently,
    so an fp32 profile never plans fp16 steps (fp32 ids are as before).
    """
    if threads is not None and int(threads) < 0:
        raise ValueError(f"threads must be >= 0 or None, got {threads}")
    facts = info if info is not None else _id_facts()
    uses_gpu = backend_uses_gpu(backend)
    cores = facts.get("cpu_affinity") or facts.get("cpu_logical_cores") or cpu_counts()[1]
    jet = facts.get("jetson")
    parts: list[str]
    if jet and jet.get("model"):
        parts = ["jetson", hw_slug(re.sub(r"(?i)\bnvidia\b|\bjetson\b", " ", jet["model"]))]
        if jet.get("nvpmodel"):
            parts.append(slug(jet["nvpmodel"], 24))
        if jet.get("jetson_clocks"):
            parts.append("jc")
        parts.append(f"{cores}c")
    else:
        parts = []
        if uses_gpu:
            gpu = facts.get("gpu") if info is not None else gpu_info()
            if gpu and gpu.get("name"):
                parts += ["gpu", hw_slug(re.sub(r"(?i)\bnvidia\b", " ", gpu["name"]))]
        parts += ["cpu", hw_slug(facts.get("cpu_model") or "unknown"), f"{cores}c"]
    parts.append(slug(backend, 32))
    if precision != "fp32":
        parts.append(slug(precision, 8))
    if threads:
        parts.append(f"{int(threads)}t")
    out = "-".join(p for p in parts if p)
    return re.sub(r"-{2,}", "-", out).strip("-")[:160]
