"""The power-meter interface every meter implements: windows sampled in a background thread.

See device/telemetry.py for choosing a meter and the rules every meter keeps;
device/meters.py holds the jtop, NVML and RAPL meters.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator

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
