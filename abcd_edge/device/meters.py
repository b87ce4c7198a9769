"""The hardware power meters: jtop (Jetson board rail), NVML (one NVIDIA GPU), RAPL (CPU package).

Their libraries (jtop, pynvml) are imported inside functions: importing this
module needs only the standard library.
"""
from __future__ import annotations

import re
from pathlib import Path

from abcd_edge.device.power import MeterUnavailable, PowerMeter, PowerReading, _missing, _one_line

DEFAULT_RAPL_ROOT = "/sys/class/powercap"
# The jtop *service* polls every sensor of the board at the interval its first
# client asks for; asking it for 20 Hz would load the very device we measure.
JTOP_MIN_INTERVAL_S = 0.1
# NVML's energy counter is refreshed every ~20-100 ms (driver dependent).
NVML_COUNTER_RESOLUTION_S = 0.1


def _import_meter_library(module: str, label: str, missing: str):
    """Import a meter's optional library, or raise MeterUnavailable saying why in one line."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MeterUnavailable(_missing(missing, module, exc)) from None
    except Exception as exc:
        raise MeterUnavailable(f"{label} failed to import: {type(exc).__name__}: {_one_line(exc)}") from None


# -- jtop (jetson-stats 4.x) ---------------------------------------------------
class JtopMeter(PowerMeter):
    """Jetson board power from jetson-stats: ``jetson.power['tot']['power']`` (mW).

    jtop's total is the board input rail (VDD_IN / POM_5V_IN) where the board
    has one, else jtop's sum of the rails. The jtop service updates at its own
    interval (``jetson.interval``); between updates the last value is held.
    """

    name = "jtop"

    def __init__(self, interval_s: float = 0.05) -> None:
        super().__init__(interval_s)
        jtop_module = _import_meter_library(
            "jtop", "jetson-stats", "jetson-stats is not installed (pip install jetson-stats; it needs its jtop.service)")
        self._jetson = None
        try:
            jetson = jtop_module.jtop(interval=max(self.interval_s, JTOP_MIN_INTERVAL_S))
            jetson.start()
        except Exception as exc:  # JtopException: service absent / no permission / version mismatch
            raise MeterUnavailable(f"jtop cannot connect to jtop.service ({type(exc).__name__}: {_one_line(exc)})")
        self._jetson = jetson
        try:
            tot = jetson.power["tot"]
            float(tot["power"])
            self.scope = f"board total power ({tot.get('name', 'sum of rails')}) via jtop"
        except Exception as exc:
            self._close_resource()
            raise MeterUnavailable(f"jtop reports no total power on this board ({type(exc).__name__}: {_one_line(exc)})")
        server = getattr(jetson, "interval", None)
        self.service_interval_s = float(server) if isinstance(server, (int, float)) else None

    def _poll(self, edge: bool) -> tuple[float | None, float | None]:
        if not self._jetson.ok(spin=True):  # raises the client thread's stored error, if any
            raise RuntimeError("jtop client is no longer running (jtop.service stopped?)")
        return float(self._jetson.power["tot"]["power"]) / 1000.0, None

    def _stop(self) -> PowerReading:
        reading = super()._stop()
        si = self.service_interval_s
        if reading.ok and si and reading.duration_s < si:
            reading.warnings.append(
                f"window {reading.duration_s:.3f}s is shorter than the jtop service interval {si:g}s: "
                "energy is the last held board power times the window")
        return reading

    def rails(self) -> dict[str, float]:
        """Current power of each rail jtop lists, in watts."""
        out = {}
        for name, rail in dict(self._jetson.power.get("rail", {})).items():
            try:
                out[str(name)] = float(rail["power"]) / 1000.0
            except Exception:
                continue
        return out

    def board_info(self) -> dict:
        """Board model, L4T/JetPack, nvpmodel mode and jetson_clocks state (None where unknown)."""
        return _jtop_board_info(self._jetson)

    def _close_resource(self) -> None:
        if self._jetson is not None:
            try:
                self._jetson.close()
            finally:
                self._jetson = None


def _jtop_board_info(jetson) -> dict:
    info: dict = {"model": None, "module": None, "soc": None, "l4t": None, "jetpack": None,
                  "nvpmodel": None, "nvpmodel_id": None, "jetson_clocks": None, "jetson_clocks_status": None,
                  "source": "jtop"}
    try:
        hw = dict(jetson.board.get("hardware", {}))
    except Exception:
        hw = {}
    for key, src in (("model", "Model"), ("module", "Module"), ("soc", "SoC"), ("l4t", "L4T"), ("jetpack", "Jetpack")):
        if hw.get(src) not in (None, ""):
            info[key] = str(hw[src])
    try:
        nvp = jetson.nvpmodel
        if nvp is not None:
            info["nvpmodel"] = str(nvp.name)
            info["nvpmodel_id"] = int(nvp.id)
    except Exception:
        pass
    try:
        jc = jetson.jetson_clocks
        if jc is not None:
            info["jetson_clocks"] = bool(jc)
            status = getattr(jc, "status", None)
            info["jetson_clocks_status"] = None if status is None else str(status)
    except Exception:
        pass
    return info


def jtop_board_info(interval_s: float = 0.5) -> dict | None:
    """Jetson board info through a short-lived jtop connection; None when jtop is unavailable."""
    try:
        meter = JtopMeter(interval_s)
    except MeterUnavailable:
        return None
    try:
        return meter.board_info()
    finally:
        meter.close()


# -- NVML (nvidia-ml-py) -------------------------------------------------------
class NvmlMeter(PowerMeter):
    """One NVIDIA GPU through NVML (GPU power only, not the host).

    Energy: difference of ``nvmlDeviceGetTotalEnergyConsumption`` (mJ, Volta and
    newer) read at start and stop; else the trapezoid of
    ``nvmlDeviceGetPowerUsage`` (mW) samples. Power samples are always taken
    (``samples()``, ``peak_w``); on recent GPUs the driver may average them.
    ``device_index`` is NVML's index (PCI order), which can differ from CUDA's.
    """

    name = "nvml"
    counter_refresh_s = NVML_COUNTER_RESOLUTION_S

    def __init__(self, interval_s: float = 0.05, device_index: int = 0) -> None:
        super().__init__(interval_s)
        pynvml = _import_meter_library("pynvml", "pynvml", "nvidia-ml-py is not installed (pip install nvidia-ml-py)")
        self._nvml = pynvml
        self._inited = False
        try:
            pynvml.nvmlInit()
        except Exception as exc:
            raise MeterUnavailable(f"NVML did not initialise (no NVIDIA driver?): {_one_line(exc)}")
        self._inited = True
        try:
            count = int(pynvml.nvmlDeviceGetCount())
            if not 0 <= device_index < count:
                raise MeterUnavailable(f"NVML sees {count} GPU(s); device index {device_index} does not exist")
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.gpu_name = name.decode() if isinstance(name, bytes) else str(name)
            try:
                float(pynvml.nvmlDeviceGetPowerUsage(self._handle))
            except Exception as exc:
                raise MeterUnavailable(f"GPU {device_index} ({self.gpu_name}) gives no power reading through NVML: {_one_line(exc)}")
            try:
                float(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
                self.has_energy_counter = True
            except Exception:
                self.has_energy_counter = False
        except MeterUnavailable:
            self._close_resource()
            raise
        except Exception as exc:
            self._close_resource()
            raise MeterUnavailable(f"NVML query failed: {type(exc).__name__}: {_one_line(exc)}")
        self.device_index = device_index
        how = "energy counter" if self.has_energy_counter else "integrated power samples"
        self.scope = f"GPU {device_index} ({self.gpu_name}) only, via NVML {how}"

    def _poll(self, edge: bool) -> tuple[float | None, float | None]:
        watts = float(self._nvml.nvmlDeviceGetPowerUsage(self._handle)) / 1000.0
        counter = None
        if edge and self.has_energy_counter:
            try:
                counter = float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
            except Exception as exc:
                self._warn(f"NVML energy counter read failed ({_one_line(exc)}); using power samples")
        return watts, counter

    def _stop(self) -> PowerReading:
        reading = super()._stop()
        if reading.ok and self.has_energy_counter and reading.duration_s < NVML_COUNTER_RESOLUTION_S:
            reading.warnings.append(
                f"window {reading.duration_s:.3f}s is shorter than NVML's energy counter refresh (~20-100 ms): "
                "energy from the power samples at its edges")
        return reading

    def _close_resource(self) -> None:
        if self._inited:
            self._inited = False
            self._nvml.nvmlShutdown()


# -- RAPL (Linux powercap; Intel and AMD) --------------------------------------
_RAPL_DOMAIN = re.compile(r"^intel-rapl:(\d+)$")


def _read_text(path: Path) -> str:
    """Every RAPL sysfs read goes through here (tests replace it)."""
    with open(path, "r") as fh:
        return fh.read()


class RaplReader:
    """Sum of the CPU package energy counters under a powercap root, made monotonic.

    Reads the top-level ``intel-rapl:N`` zones whose ``name`` is ``package-*``
    (not their subzones, not ``psys``, not the ``intel-rapl-mmio`` duplicate).
    AMD Zen CPUs expose the same tree. Each counter wraps at its
    ``max_energy_range_uj``; a wrap between two reads is corrected, so reads
    must come more often than one wrap period (minutes at full load).
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(DEFAULT_RAPL_ROOT if root is None else root)
        if not self.root.is_dir():
            raise MeterUnavailable(f"{self.root} does not exist (no Linux powercap/RAPL driver here: a VM, a non-x86 CPU, or the intel_rapl module not loaded)")
        self.domains: list[tuple[Path, str, float | None]] = []
        for entry in sorted(self.root.iterdir(), key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p.name)]):
            if not _RAPL_DOMAIN.match(entry.name) or not (entry / "energy_uj").exists():
                continue
            try:
                name = _read_text(entry / "name").strip()
            except OSError:
                name = entry.name
            if not (name.startswith("package") or name == entry.name):
                continue
            try:
                max_range = float(_read_text(entry / "max_energy_range_uj").strip())
            except (OSError, ValueError):
                max_range = None
            self.domains.append((entry, name, max_range))
        if not self.domains:
            raise MeterUnavailable(f"no RAPL package domain (intel-rapl:N with name package-*) under {self.root}")
        try:
            self._last = [self._read_uj(d) for d, _, _ in self.domains]
        except PermissionError:
            raise MeterUnavailable(
                f"{self.domains[0][0] / 'energy_uj'} is readable by root only (Linux restricts RAPL since CVE-2020-8694); "
                f"run as root or `sudo chmod o+r {self.root}/intel-rapl:*/energy_uj` (undone at reboot)")
        except (OSError, ValueError) as exc:
            raise MeterUnavailable(f"cannot read RAPL energy_uj: {type(exc).__name__}: {_one_line(exc)}")
        self._total_uj = 0.0

    @staticmethod
    def _read_uj(domain: Path) -> float:
        return float(_read_text(domain / "energy_uj").strip())

    def read_mj(self) -> float:
        """Energy in mJ accumulated since this reader was made (monotonic across wraps)."""
        for i, (domain, name, max_range) in enumerate(self.domains):
            cur = self._read_uj(domain)
            prev = self._last[i]
            if cur >= prev:
                delta = cur - prev
            elif max_range:
                delta = (max_range - prev) + cur
            else:
                raise RuntimeError(f"RAPL counter {name} went backwards and its max_energy_range_uj is unknown")
            self._total_uj += delta
            self._last[i] = cur
        return self._total_uj / 1000.0

    @property
    def names(self) -> list[str]:
        return [name for _, name, _ in self.domains]


class RaplMeter(PowerMeter):
    """CPU package energy (all packages summed) from Linux powercap RAPL."""

    name = "rapl"

    def __init__(self, interval_s: float = 0.05, root: str | Path | None = None) -> None:
        super().__init__(interval_s)
        self._reader = RaplReader(root)
        self.scope = f"CPU package(s) only ({', '.join(self._reader.names)}) via RAPL"

    def _poll(self, edge: bool) -> tuple[float | None, float | None]:
        return None, self._reader.read_mj()
