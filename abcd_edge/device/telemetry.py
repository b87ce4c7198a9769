"""Power meters: jtop (Jetson), NVML (NVIDIA dGPU), RAPL (Linux CPU package), none — and choosing one.

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

from abcd_edge.device import meters
from abcd_edge.device.power import MeterUnavailable, NoneMeter, PowerMeter, _one_line
from abcd_edge.errors import UserError

METER_CHOICES = ("auto", "jtop", "nvml", "rapl", "none")
AUTO_ORDER = ("jtop", "nvml", "rapl")
_INFO_HINT = "`abcd-edge info` lists the power meters this machine offers"


# -- choosing ------------------------------------------------------------------
def _make(name: str, interval_s: float) -> PowerMeter:
    return {"jtop": meters.JtopMeter, "nvml": meters.NvmlMeter, "rapl": meters.RaplMeter}[name](interval_s)


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
