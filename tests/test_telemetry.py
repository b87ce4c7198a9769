"""Power meters against stand-ins: a fake powercap tree, a pynvml module, a jtop module.

The stand-ins follow the documented interfaces: pynvml (nvmlInit, nvmlDeviceGetPowerUsage in mW,
nvmlDeviceGetTotalEnergyConsumption in mJ, NVMLError), jetson-stats 4.x (jtop(interval=...),
start/close/ok(spin), power['tot']['power'] in mW, power['rail'], board['hardware'],
nvpmodel.name/.id, bool(jetson_clocks), JtopException), and Linux powercap
(intel-rapl:N/{name,energy_uj,max_energy_range_uj}).
"""
from __future__ import annotations

import json
import os
import sys
import time
import types
from pathlib import Path

import pytest

from abcd_edge.device import meters, telemetry
from abcd_edge.errors import UserError
from abcd_edge.device.meters import RaplReader
from abcd_edge.device.power import PowerReading
from abcd_edge.device.telemetry import open_meter, available_meters

WINDOW_S = 0.12
FAST = 0.01


@pytest.fixture(autouse=True)
def no_real_meters(monkeypatch, tmp_path):
    """Each test starts with no jtop, no pynvml and no powercap tree, whatever this host has."""
    monkeypatch.setitem(sys.modules, "jtop", None)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(meters, "DEFAULT_RAPL_ROOT", str(tmp_path / "no-powercap"))


# -- stand-ins --------------------------------------------------------------------------
def make_pynvml(power_mw=25_000.0, counter=None, init_error=False, counter_fail_after=None):
    """counter: callable -> mJ, or None for a GPU without the energy counter (NotSupported)."""
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    class NVMLError_DriverNotLoaded(NVMLError):
        pass

    state = {"init": 0, "counter_calls": 0}

    def nvmlInit():
        if init_error:
            raise NVMLError_DriverNotLoaded("Driver Not Loaded")
        state["init"] += 1

    def nvmlShutdown():
        state["init"] -= 1

    def nvmlDeviceGetTotalEnergyConsumption(handle):
        if counter is None:
            raise NVMLError_NotSupported("Not Supported")
        state["counter_calls"] += 1
        if counter_fail_after is not None and state["counter_calls"] > counter_fail_after:
            raise NVMLError("Unknown Error")
        return int(counter())

    mod.NVMLError = NVMLError
    mod.NVMLError_NotSupported = NVMLError_NotSupported
    mod.nvmlInit = nvmlInit
    mod.nvmlShutdown = nvmlShutdown
    mod.nvmlDeviceGetCount = lambda: 1
    mod.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    mod.nvmlDeviceGetName = lambda h: "NVIDIA H100 80GB HBM3"
    mod.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    mod.nvmlDeviceGetPowerUsage = lambda h: int(power_mw)
    mod.nvmlDeviceGetTotalEnergyConsumption = nvmlDeviceGetTotalEnergyConsumption
    mod.state = state
    return mod


def make_jtop(tot_mw=5_000, init_error=False, start_error=False, service_interval=1.0):
    mod = types.ModuleType("jtop")

    class JtopException(Exception):
        pass

    cfg = types.SimpleNamespace(lost=False, tot_mw=tot_mw, closed=0)

    class NVPModel:
        name, id = "MAXN", 0

    class JetsonClocks:
        status = "running"

        def __bool__(self):
            return True

    class jtop:  # noqa: N801 - the real class is lower case
        def __init__(self, interval=1.0):
            if init_error:
                raise JtopException("I can't access jtop.service.\nPlease logout or reboot this board.")
            self._interval = float(interval)
            self._running = False

        def start(self):
            if start_error:
                raise JtopException("The jtop.service is not active. Please run:\nsudo systemctl restart jtop.service")
            self._running = True

        def ok(self, spin=False):
            if cfg.lost:
                raise JtopException("Lost connection with jtop server")
            return self._running

        def close(self):
            cfg.closed += 1
            self._running = False

        @property
        def interval(self):
            return service_interval

        @property
        def power(self):
            return {"rail": {"VDD_CPU_CV": {"online": True, "volt": 5000, "curr": 400, "power": 2000, "avg": 2000},
                             "VDD_GPU_SOC": {"online": True, "volt": 5000, "curr": 300, "power": 1500, "avg": 1500}},
                    "tot": {"online": True, "volt": 5000, "curr": 1000, "power": cfg.tot_mw, "avg": cfg.tot_mw,
                            "name": "VDD_IN"}}

        @property
        def board(self):
            return {"platform": {"Machine": "aarch64"},
                    "hardware": {"Model": "NVIDIA Jetson AGX Orin Developer Kit", "Module": "NVIDIA Jetson AGX Orin (64GB ram)",
                                 "SoC": "tegra234", "L4T": "35.4.1", "Jetpack": "5.1.2"},
                    "libraries": {}}

        nvpmodel = NVPModel()
        jetson_clocks = JetsonClocks()

    mod.jtop = jtop
    mod.JtopException = JtopException
    mod.cfg = cfg
    return mod


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: the sampling thread never sees a half-written file


def make_rapl(root: Path, packages: dict[int, int], max_range: int | None = 1_000_000) -> Path:
    for i, uj in packages.items():
        d = root / f"intel-rapl:{i}"
        d.mkdir(parents=True)
        (d / "name").write_text(f"package-{i}\n")
        (d / "energy_uj").write_text(f"{uj}\n")
        if max_range is not None:
            (d / "max_energy_range_uj").write_text(f"{max_range}\n")
        sub = d / f"intel-rapl:{i}:0"  # core subzone: must not be counted again
        sub.mkdir()
        (sub / "name").write_text("core\n")
        (sub / "energy_uj").write_text("7\n")
    psys = root / f"intel-rapl:{len(packages)}"  # platform domain: not a package
    psys.mkdir()
    (psys / "name").write_text("psys\n")
    (psys / "energy_uj").write_text("100\n")
    mmio = root / "intel-rapl-mmio:0"  # same package through MMIO: must not double count
    mmio.mkdir()
    (mmio / "name").write_text("package-0\n")
    (mmio / "energy_uj").write_text("100\n")
    return root


def set_uj(root: Path, zone: str, value: int) -> None:
    _write(root / zone / "energy_uj", f"{value}\n")


# -- RAPL ----------------------------------------------------------------------------------
def test_rapl_reader_sums_packages_only_and_corrects_wrap(tmp_path):
    root = make_rapl(tmp_path / "powercap", {0: 999_000, 1: 10})
    reader = RaplReader(root)
    assert reader.names == ["package-0", "package-1"]
    assert reader.read_mj() == 0.0
    set_uj(root, "intel-rapl:0", 1_000)           # wrapped: (1_000_000 - 999_000) + 1_000 = 2_000 uJ
    set_uj(root, "intel-rapl:1", 510)             # 500 uJ
    set_uj(root, "intel-rapl:2", 10**9)           # psys moves: ignored
    set_uj(root, "intel-rapl:0/intel-rapl:0:0", 10**9)  # subzone moves: ignored
    set_uj(root, "intel-rapl-mmio:0", 10**9)      # mmio duplicate moves: ignored
    assert reader.read_mj() == pytest.approx(2.5)
    set_uj(root, "intel-rapl:0", 4_000)
    assert reader.read_mj() == pytest.approx(5.5)


def test_rapl_backwards_without_range_is_an_error(tmp_path):
    root = make_rapl(tmp_path / "powercap", {0: 5_000}, max_range=None)
    reader = RaplReader(root)
    set_uj(root, "intel-rapl:0", 1_000)
    with pytest.raises(RuntimeError, match="max_energy_range_uj"):
        reader.read_mj()


def test_rapl_meter_energy_is_counter_difference_across_wrap(tmp_path):
    root = make_rapl(tmp_path / "powercap", {0: 990_000})
    meter = meters.RaplMeter(FAST, root=root)
    with meter.measure() as m:
        for value in (995_000, 2_000, 7_000):  # 5_000 + 7_000 (wrap) + 5_000 uJ = 17 mJ
            time.sleep(0.03)
            set_uj(root, "intel-rapl:0", value)
        time.sleep(0.03)
    meter.close()
    r = m.reading
    assert r.meter == "rapl" and r.ok, r.warnings
    assert r.energy_mj == pytest.approx(17.0)
    assert r.avg_w == pytest.approx(r.energy_mj / 1000 / r.duration_s)
    assert r.n_samples >= 3 and "CPU package" in r.scope
    assert all(w >= 0 for _, w in meter.samples())
    assert r.peak_w == max(w for _, w in meter.samples())


def test_rapl_permission_denied_is_a_clear_reason(tmp_path, monkeypatch):
    root = make_rapl(tmp_path / "powercap", {0: 1})
    monkeypatch.setattr(meters, "DEFAULT_RAPL_ROOT", str(root))
    real = meters._read_text

    def denied(path):
        if Path(path).name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(meters, "_read_text", denied)
    reason = available_meters()["rapl"]
    assert "root only" in reason and "chmod o+r" in reason and str(root) in reason
    with pytest.raises(UserError) as ei:
        open_meter("rapl")
    msg = str(ei.value)
    assert "\n" not in msg and "'rapl'" in msg and "root only" in msg and "abcd-edge info" in msg
    assert open_meter("auto").name == "none"


def test_rapl_missing_tree_is_unavailable(tmp_path):
    reason = available_meters()["rapl"]
    assert "does not exist" in reason
    (tmp_path / "empty").mkdir()
    with pytest.raises(telemetry.MeterUnavailable, match="no RAPL package domain"):
        RaplReader(tmp_path / "empty")


def test_rapl_read_failing_mid_run_degrades_to_no_reading(tmp_path, monkeypatch):
    root = make_rapl(tmp_path / "powercap", {0: 1_000})
    meter = meters.RaplMeter(FAST, root=root)
    meter.start()
    time.sleep(0.03)

    def broken(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(meters, "_read_text", broken)
    time.sleep(0.05)
    r = meter.stop()  # must not raise
    meter.close()
    assert r.energy_mj is None and r.avg_w is None and not r.ok
    assert any("rapl read failed" in w and "Input/output error" in w for w in r.warnings)


# -- NVML ----------------------------------------------------------------------------------
def test_nvml_constant_power_integrates_to_power_times_time(monkeypatch):
    fake = make_pynvml(power_mw=25_000, counter=None)  # no energy counter: trapezoid of samples
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    meter = open_meter("nvml", interval_s=FAST)
    assert meter.name == "nvml" and not meter.has_energy_counter
    with meter.measure() as m:
        time.sleep(WINDOW_S)
    meter.close()
    r = m.reading
    assert r.ok and r.n_samples >= 3
    assert WINDOW_S * 0.9 < r.duration_s < WINDOW_S + 1.0
    assert r.energy_mj == pytest.approx(25.0 * r.duration_s * 1000.0, rel=1e-9)
    assert r.avg_w == pytest.approx(25.0) and r.peak_w == pytest.approx(25.0)
    assert fake.state["init"] == 0  # nvmlShutdown balanced nvmlInit
    json.dumps(r.to_dict())


def test_nvml_prefers_energy_counter_over_power_samples(monkeypatch):
    # The counter says 100 W, the (driver-averaged) power samples say 40 W: energy must follow the counter.
    fake = make_pynvml(power_mw=40_000, counter=lambda: 100.0 * time.monotonic() * 1000.0)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    meter = open_meter("nvml", interval_s=FAST)
    assert meter.has_energy_counter and "GPU 0" in meter.scope
    with meter.measure() as m:
        time.sleep(WINDOW_S)
    meter.close()
    r = m.reading
    assert r.energy_mj == pytest.approx(100.0 * r.duration_s * 1000.0, rel=0.02)
    assert r.peak_w == pytest.approx(40.0)


def test_nvml_counter_failing_at_stop_falls_back_to_samples(monkeypatch):
    fake = make_pynvml(power_mw=40_000, counter=lambda: 100.0 * time.monotonic() * 1000.0, counter_fail_after=2)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    meter = open_meter("nvml", interval_s=FAST)  # probe = call 1, start = call 2, stop = call 3 fails
    with meter.measure() as m:
        time.sleep(0.05)
    meter.close()
    r = m.reading
    assert r.energy_mj == pytest.approx(40.0 * r.duration_s * 1000.0, rel=1e-9)
    assert any("energy counter read failed" in w for w in r.warnings)


def test_nvml_unavailable_paths(monkeypatch):
    assert "nvidia-ml-py is not installed" in available_meters()["nvml"]
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml(init_error=True))
    reason = available_meters()["nvml"]
    assert "NVML did not initialise" in reason and "Driver Not Loaded" in reason
    with pytest.raises(UserError, match="'nvml' is not available"):
        open_meter("nvml")


# -- jtop ----------------------------------------------------------------------------------
def test_jtop_constant_board_power_and_board_info(monkeypatch):
    fake = make_jtop(tot_mw=5_000)
    monkeypatch.setitem(sys.modules, "jtop", fake)
    meter = open_meter("jtop", interval_s=FAST)
    assert meter.name == "jtop" and "VDD_IN" in meter.scope
    with meter.measure() as m:
        time.sleep(WINDOW_S)
    r = m.reading
    assert r.ok and r.energy_mj == pytest.approx(5.0 * r.duration_s * 1000.0, rel=1e-9)
    assert r.avg_w == pytest.approx(5.0)
    # the fake service runs at 1 s (another client chose it): the window is shorter, and the reading says so
    assert any("jtop service interval" in w for w in r.warnings)
    assert meter.rails() == {"VDD_CPU_CV": 2.0, "VDD_GPU_SOC": 1.5}
    info = meter.board_info()
    assert info["nvpmodel"] == "MAXN" and info["nvpmodel_id"] == 0 and info["jetson_clocks"] is True
    assert info["model"] == "NVIDIA Jetson AGX Orin Developer Kit"
    assert info["l4t"] == "35.4.1" and info["jetpack"] == "5.1.2"
    meter.close()
    assert fake.cfg.closed == 1


@pytest.mark.parametrize("kw", [{"start_error": True}, {"init_error": True}])
def test_jtop_service_absent_is_unavailable_not_a_crash(monkeypatch, kw):
    monkeypatch.setitem(sys.modules, "jtop", make_jtop(**kw))
    reason = available_meters()["jtop"]
    assert reason and "jtop" in reason and "\n" not in reason
    with pytest.raises(UserError) as ei:
        open_meter("jtop")
    assert "\n" not in str(ei.value) and "abcd-edge info" in str(ei.value)
    assert meters.jtop_board_info() is None


def test_jtop_lost_mid_run_degrades_to_no_reading(monkeypatch):
    fake = make_jtop()
    monkeypatch.setitem(sys.modules, "jtop", fake)
    meter = open_meter("jtop", interval_s=FAST)
    meter.start()
    time.sleep(0.03)
    fake.cfg.lost = True
    time.sleep(0.05)
    r = meter.stop()  # must not raise
    meter.close()
    assert r.energy_mj is None and r.avg_w is None
    assert any("mid-run" in w and "Lost connection with jtop server" in w for w in r.warnings)


# -- choosing ------------------------------------------------------------------------------
def test_auto_order_jtop_then_nvml_then_rapl_then_none(monkeypatch, tmp_path):
    root = make_rapl(tmp_path / "powercap", {0: 1})
    monkeypatch.setattr(meters, "DEFAULT_RAPL_ROOT", str(root))
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml())
    monkeypatch.setitem(sys.modules, "jtop", make_jtop())
    assert available_meters() == {"jtop": None, "nvml": None, "rapl": None, "none": None}
    with open_meter() as m:
        assert m.name == "jtop"
    monkeypatch.setitem(sys.modules, "jtop", make_jtop(start_error=True))
    with open_meter("auto") as m:
        assert m.name == "nvml"
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml(init_error=True))
    with open_meter("auto") as m:
        assert m.name == "rapl"
    monkeypatch.setattr(meters, "DEFAULT_RAPL_ROOT", str(tmp_path / "gone"))
    with open_meter("auto") as m:
        assert m.name == "none"
        with m.measure() as h:
            time.sleep(0.01)
    r = h.reading
    assert r.meter == "none" and r.energy_mj is None and r.duration_s > 0
    assert len(r.warnings) == 1 and all(k in r.warnings[0] for k in ("jtop:", "nvml:", "rapl:"))


def test_explicit_none_and_bad_choice():
    with open_meter("none") as m:
        m.start()
        r = m.stop()
    assert r.meter == "none" and r.energy_mj is None and r.warnings == []
    with pytest.raises(UserError, match="choose one of"):
        open_meter("watts")
    assert telemetry.METER_CHOICES == ("auto", "jtop", "nvml", "rapl", "none")


def test_measure_sets_reading_when_body_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml(power_mw=10_000))
    meter = open_meter("nvml", interval_s=FAST)
    with pytest.raises(KeyError):
        with meter.measure() as m:
            time.sleep(0.02)
            raise KeyError("boom")
    meter.close()
    assert isinstance(m.reading, PowerReading) and m.reading.ok


def test_stop_without_start_is_a_reading_not_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", make_pynvml())
    with open_meter("nvml") as meter:
        r = meter.stop()
    assert r.energy_mj is None and "without start" in r.warnings[0]


def test_nvml_window_shorter_than_counter_refresh_uses_power_samples(monkeypatch):
    # NVML's counter refreshes every ~100 ms: a 10 ms window would read 0 J or a whole refresh (10 J at 100 W).
    fake = make_pynvml(power_mw=40_000, counter=lambda: 100.0 * (time.monotonic() // 0.1) * 0.1 * 1000.0)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    meter = open_meter("nvml", interval_s=FAST)
    with meter.measure() as m:
        time.sleep(0.01)
    meter.close()
    r = m.reading
    assert r.duration_s < 0.1
    assert r.energy_mj == pytest.approx(40.0 * r.duration_s * 1000.0, rel=1e-6)
    assert any("power samples at its edges" in w for w in r.warnings)
