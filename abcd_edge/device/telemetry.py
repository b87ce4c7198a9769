"""Power meters: jtop (Jetson), NVML (NVIDIA dGPU), RAPL (Linux CPU package), none.

One small interface. A meter is opened once (``open_meter``), then measures any
number of windows, each with a background sampling thread::

    with open_meter("auto") as meter:
        with meter.measure() as m:
            run_something()
        print(m.reading.energy_mj, m.reading.avg_w)

Rules this module keeps:

* Nothing is invented. A meter that cannot read gives ``energy_mj=None`` with
  the reason in ``PowerReading.warnings``; ``stop()`` never raises.
* Energy is the difference of a hardware energy counter where the meter has one
  (RAPL ``energy_uj``, NVML ``nvmlDeviceGetTotalEnergyConsumption``), else the
  trapezoid integral of the power samples. Both include a read at the instant of
  ``start()`` and of ``stop()``.
* Each meter measures a different thing (``PowerReading.scope``): jtop the board
  input rail, NVML one GPU only, RAPL the CPU package(s) only (no DRAM, no GPU).
* The optional libraries (jtop, pynvml) are imported inside functions, so the
  runtime imports only the standard library here.
"""
from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from abcd_edge.errors import UserError

METER_CHOICES = ("auto", "jtop", "nvml", "rapl", "none")
AUTO_ORDER = ("jtop", "nvml", "rapl")
DEFAULT_RAPL_ROOT = "/sys/class/powercap"
# The jtop *service* polls every sensor of the board at the interval its first
# client asks for; asking it for 20 Hz would load the very device we measure.
JTOP_MIN_INTERVAL_S = 0.1
# NVML's energy counter is refreshed every ~20-100 ms (driver dependent).
NVML_COUNTER_RESOLUTION_S = 0.1

_INFO_HINT = "`abcd-edge info` lists the power meters this machine offers"


class MeterUnavailable(Exception):
    """A meter cannot be used here; the message says why (one line)."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _missing(message: str, module: str, exc: ImportError) -> str:
    """The plain message when the module itself is absent; with the error when it failed inside."""
    if isinstance(exc, ModuleNotFoundError) and exc.name == module:
        return message
    return f"{message}: {type(exc).__name__}: {_one_line(exc)}"


@dataclass
class PowerReading:
    """What one measured window gave. ``energy_mj is None`` means no reading."""

    meter: str
    energy_mj: float | None
    avg_w: float | None
    peak_w: float | None
    duration_s: float
    n_samples: int
    interval_s: float
    warnings: list[str] = field(default_factory=list)
    scope: str = ""  # what the meter measures (board, one GPU, CPU package)

    @property
    def ok(self) -> bool:
        return self.energy_mj is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["warnings"] = list(self.warnings)
        return d


class Measurement:
    """Handle yielded by ``PowerMeter.measure()``; ``reading`` is set on exit."""

    def __init__(self) -> None:
        self.reading: PowerReading | None = None


class PowerMeter:
    """Base meter: a background thread polls ``_poll`` every ``interval_s``.

    Subclasses implement ``_poll(edge)`` returning ``(watts, counter_mj)``,
    either of which may be None. ``edge`` is True for the reads at ``start()``
    and ``stop()``. ``counter_mj`` must be monotonic (the subclass handles
    wrap-around). Where a poll gives a counter but no watts, the watts of the
    interval since the previous poll are derived from the counter.
    """

    name = "base"
    scope = ""
    counter_refresh_s = 0.0   # windows shorter than this integrate power samples instead of the counter

    def __init__(self, interval_s: float = 0.05) -> None:
        interval_s = float(interval_s)
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._stop_evt = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._reset()

    # -- subclass hook -------------------------------------------------------
    def _poll(self, edge: bool) -> tuple[float | None, float | None]:  # pragma: no cover
        raise NotImplementedError

    def _close_resource(self) -> None:
        pass

    # -- sampling ------------------------------------------------------------
    def _reset(self) -> None:
        self._samples: list[tuple[float, float]] = []
        self._counter: list[tuple[float, float]] = []
        self._polls: list[float] = []
        self._warnings: list[str] = []
        self._failure: str | None = None
        self._t_start: float | None = None

    def _warn(self, text: str) -> None:
        text = _one_line(text)
        with self._lock:
            if text not in self._warnings:
                self._warnings.append(text)

    def _record(self, edge: bool) -> None:
        t0 = time.monotonic()
        watts, counter = self._poll(edge)
        t = 0.5 * (t0 + time.monotonic())
        with self._lock:
            if counter is not None:
                if watts is None and self._counter:
                    tp, cp = self._counter[-1]
                    if t > tp:
                        watts = (counter - cp) / 1000.0 / (t - tp)
                self._counter.append((t, float(counter)))
            if watts is not None:
                self._samples.append((t, float(watts)))
            self._polls.append(t)

    def _fail(self, where: str, exc: BaseException) -> None:
        msg = f"{self.name} read failed {where}: {type(exc).__name__}: {_one_line(exc)}; no energy reading for this window"
        with self._lock:
            if self._failure is None:
                self._failure = msg

    def _run(self) -> None:
        while not self._stop_evt.wait(self.interval_s):
            try:
                self._record(edge=False)
            except Exception as exc:  # a meter failing mid-run degrades, never crashes
                self._fail("mid-run", exc)
                return

    def _halt_thread(self) -> None:
        self._stop_evt.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 10 * self.interval_s))
        self._thread = None

    def start(self) -> None:
        """Begin a window: read now, then sample in the background."""
        if self._closed:
            raise RuntimeError(f"{self.name} meter is closed")
        self._halt_thread()
        self._reset()
        self._stop_evt = threading.Event()
        self._t_start = time.monotonic()
        try:
            self._record(edge=True)
        except Exception as exc:
            self._fail("at start", exc)
            return
        self._thread = threading.Thread(target=self._run, name=f"abcd-edge-{self.name}-meter", daemon=True)
        self._thread.start()

    def stop(self) -> PowerReading:
        """End the window (reads once more) and return its reading. Never raises."""
        try:
            return self._stop()
        except Exception as exc:  # last line of defence: a reading, not a crash
            return PowerReading(self.name, None, None, None, 0.0, 0, self.interval_s,
                                [f"{self.name} meter failed while stopping: {type(exc).__name__}: {_one_line(exc)}"],
                                self.scope)

    def _stop(self) -> PowerReading:
        t_stop_call = time.monotonic()
        self._halt_thread()
        if self._t_start is None:
            return PowerReading(self.name, None, None, None, 0.0, 0, self.interval_s,
                                ["stop() without start(): no window was measured"], self.scope)
        if self._failure is None:
            try:
                self._record(edge=True)
            except Exception as exc:
                self._fail("at stop", exc)
        with self._lock:
            samples = list(self._samples)
            counter = list(self._counter)
            polls = list(self._polls)
            warnings = list(self._warnings)
            failure = self._failure
        n = len(polls)
        if len(polls) >= 2:
            t_first, t_last = polls[0], polls[-1]
        else:
            t_first, t_last = self._t_start, t_stop_call
        duration = max(0.0, t_last - t_first)
        if failure is not None:
            return PowerReading(self.name, None, None, None, duration, n, self.interval_s,
                                warnings + [failure], self.scope)
        energy_mj = None
        if duration < self.counter_refresh_s and len(samples) >= 2:
            pass   # a counter that refreshes less often than the window reads 0 or a whole refresh: use samples
        elif len(counter) >= 2 and counter[0][0] == t_first and counter[-1][0] == t_last:
            delta = counter[-1][1] - counter[0][1]
            if delta >= 0:
                energy_mj = delta
            else:
                warnings.append(f"{self.name} energy counter went backwards ({delta:.0f} mJ); using power samples")
        if energy_mj is None:
            if len(samples) >= 2:
                energy_mj = 1000.0 * _trapezoid(samples)
            elif len(samples) == 1 and duration == 0.0:
                energy_mj = 0.0
            else:
                warnings.append(f"{self.name}: fewer than two power samples in the window; no energy reading")
        peak_w = max((w for _, w in samples), default=None)
        if energy_mj is None:
            avg_w = None
        elif duration > 0:
            avg_w = energy_mj / 1000.0 / duration
        else:
            avg_w = samples[-1][1] if samples else None
        return PowerReading(self.name, energy_mj, avg_w, peak_w, duration, n, self.interval_s, warnings, self.scope)

    @contextmanager
    def measure(self) -> Iterator[Measurement]:
        """Measure the body of a ``with`` block; the handle's ``.reading`` is set on exit."""
        handle = Measurement()
        self.start()
        try:
            yield handle
        finally:
            handle.reading = self.stop()

    def samples(self) -> list[tuple[float, float]]:
        """(time.monotonic(), watts) of the current or last window."""
        with self._lock:
            return list(self._samples)

    def close(self) -> None:
        if self._closed:
            return
        self._halt_thread()
        self._closed = True
        try:
            self._close_resource()
        except Exception:
            pass

    def __enter__(self) -> "PowerMeter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} interval={self.interval_s}s>"


def _trapezoid(samples: list[tuple[float, float]]) -> float:
    """Integral of watts over seconds, in joules."""
    total = 0.0
    for (t0, w0), (t1, w1) in zip(samples, samples[1:]):
        total += 0.5 * (w0 + w1) * (t1 - t0)
    return total


# -- none ---------------------------------------------------------------------
class NoneMeter(PowerMeter):
    """No meter: windows are timed, energy is None."""

    name = "none"
    scope = "nothing (no power meter)"

    def __init__(self, interval_s: float = 0.05, reasons: dict[str, str] | None = None) -> None:
        super().__init__(interval_s)
        self.reasons = dict(reasons or {})

    def start(self) -> None:
        self._reset()
        self._t_start = time.monotonic()

    def stop(self) -> PowerReading:
        duration = 0.0 if self._t_start is None else time.monotonic() - self._t_start
        warnings = []
        if self.reasons:
            warnings.append("no power meter available (" + "; ".join(f"{k}: {v}" for k, v in self.reasons.items()) + ")")
        return PowerReading("none", None, None, None, duration, 0, self.interval_s, warnings, self.scope)


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
        try:
            import jtop as jtop_module
        except ImportError as exc:
            raise MeterUnavailable(_missing("jetson-stats is not installed (pip install jetson-stats; it needs its jtop.service)", "jtop", exc))
        except Exception as exc:
            raise MeterUnavailable(f"jetson-stats failed to import: {type(exc).__name__}: {_one_line(exc)}")
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
        try:
            import pynvml
        except ImportError as exc:
            raise MeterUnavailable(_missing("nvidia-ml-py is not installed (pip install nvidia-ml-py)", "pynvml", exc))
        except Exception as exc:
            raise MeterUnavailable(f"pynvml failed to import: {type(exc).__name__}: {_one_line(exc)}")
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


# -- choosing ------------------------------------------------------------------
_METERS = {"jtop": JtopMeter, "nvml": NvmlMeter, "rapl": RaplMeter}


def _make(name: str, interval_s: float) -> PowerMeter:
    return _METERS[name](interval_s)


def available_meters() -> dict[str, str | None]:
    """name -> None if usable here, else the reason (one line). Opens and closes each meter."""
    out: dict[str, str | None] = {}
    for name in AUTO_ORDER:
        try:
            _make(name, 0.5).close()
            out[name] = None
        except MeterUnavailable as exc:
            out[name] = str(exc)
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {_one_line(exc)}"
    out["none"] = None
    return out


def open_meter(choice: str = "auto", interval_s: float = 0.05) -> PowerMeter:
    """Open a meter. ``auto``: the first usable of jtop, nvml, rapl, else ``none``.

    An explicitly requested meter that cannot be used raises ``UserError``.
    """
    key = str(choice or "auto").strip().lower()
    if key not in METER_CHOICES:
        raise UserError(f"unknown power meter {choice!r}; choose one of: {', '.join(METER_CHOICES)}")
    if key == "none":
        return NoneMeter(interval_s)
    if key == "auto":
        reasons: dict[str, str] = {}
        for name in AUTO_ORDER:
            try:
                return _make(name, interval_s)
            except MeterUnavailable as exc:
                reasons[name] = str(exc)
            except Exception as exc:
                reasons[name] = f"{type(exc).__name__}: {_one_line(exc)}"
        return NoneMeter(interval_s, reasons=reasons)
    try:
        return _make(key, interval_s)
    except MeterUnavailable as exc:
        raise UserError(f"power meter '{key}' is not available: {_one_line(exc)} ({_INFO_HINT})") from None
