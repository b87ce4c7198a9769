"""machine_info / format_info on this machine; device ids; CPU/GPU/Jetson detection against stand-in files."""
from __future__ import annotations

import platform
import re
import socket
import sys
import types

import pytest

from abcd_edge.device import hardware, meters
from abcd_edge.device.hardware import device_id, format_info, hw_slug, machine_info, slug

SAFE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


@pytest.fixture(autouse=True)
def no_optional_modules(monkeypatch, tmp_path):
    """Same answers whatever this host has installed: no jtop, no pynvml, no powercap, no Jetson files."""
    monkeypatch.setitem(sys.modules, "jtop", None)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(meters, "DEFAULT_RAPL_ROOT", str(tmp_path / "no-powercap"))
    monkeypatch.setattr(hardware, "DT_MODEL", str(tmp_path / "no-dt-model"))
    monkeypatch.setattr(hardware, "TEGRA_RELEASE", str(tmp_path / "no-tegra-release"))


def test_machine_info_keys_and_types_here():
    info = machine_info()
    assert isinstance(info["python"], str) and info["python"] == platform.python_version()
    assert isinstance(info["numpy"], str)
    assert isinstance(info["onnxruntime"], str) and "CPUExecutionProvider" in info["ort_providers"]
    assert set(info["tensorrt"]) >= {"importable", "version"} and isinstance(info["tensorrt"]["importable"], bool)
    assert set(info["power_meters"]) == {"jtop", "nvml", "rapl", "none"} and info["power_meters"]["none"] is None
    assert all(v is None or isinstance(v, str) for v in info["power_meters"].values())
    assert isinstance(info["cpu_model"], str) and info["cpu_model"]
    assert isinstance(info["cpu_logical_cores"], int) and 1 <= info["cpu_affinity"] <= info["cpu_logical_cores"]
    assert info["memory_total_bytes"] is None or info["memory_total_bytes"] > 0
    assert info["gpu"] is None or isinstance(info["gpu"]["name"], str)
    assert info["jetson"] is None


def test_format_info_lists_providers_and_meters():
    info = machine_info()
    text = format_info(info)
    for provider in info["ort_providers"]:
        assert provider in text
    assert "power meters" in text and "jtop" in text and "rapl" in text
    assert len(text.splitlines()) >= 8


def test_device_id_stable_and_not_the_hostname(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "alpha-host")
    monkeypatch.setattr(platform, "node", lambda: "alpha-host")
    a = device_id("ort-cpu", 2)
    monkeypatch.setattr(socket, "gethostname", lambda: "beta-host")
    monkeypatch.setattr(platform, "node", lambda: "beta-host")
    b = device_id("ort-cpu", 2)
    assert a == b and SAFE.match(a)
    assert "host" not in a and "alpha" not in a
    assert a.startswith("cpu-") and a.endswith("-ort-cpu-2t")
    assert f"-{hardware.cpu_counts()[1]}c-" in a
    assert device_id("ort-cpu", None) == a[: -len("-2t")]
    assert device_id("ort-cpu", 2, machine_info()) == a  # full info and the quick path agree


def test_device_id_from_info_dicts():
    cpu = {"cpu_model": "AMD EPYC 7B13 64-Core Processor", "cpu_affinity": 2, "cpu_logical_cores": 2,
           "gpu": {"name": "NVIDIA H100 80GB HBM3", "driver": "550"}, "jetson": None}
    assert device_id("ort-cpu", 2, cpu) == "cpu-amd-epyc-7b13-2c-ort-cpu-2t"
    gpu_id = device_id("ort-cuda", None, cpu)
    assert gpu_id == "gpu-h100-80gb-hbm3-cpu-amd-epyc-7b13-2c-ort-cuda"
    assert "h100" not in device_id("torch-cpu", 4, cpu)
    jet = {"cpu_model": "ARMv8 Processor rev 1 (v8l)", "cpu_affinity": 12, "gpu": None,
           "jetson": {"model": "NVIDIA Jetson AGX Orin Developer Kit", "nvpmodel": "MAXN", "jetson_clocks": True}}
    assert device_id("ort-trt", 1, jet) == "jetson-agx-orin-developer-kit-maxn-jc-12c-ort-trt-1t"
    jet["jetson"] = dict(jet["jetson"], nvpmodel="15W", jetson_clocks=False)
    assert device_id("ort-trt", 1, jet) == "jetson-agx-orin-developer-kit-15w-12c-ort-trt-1t"
    for d in (cpu, jet):
        assert SAFE.match(device_id("../We!rd Backend/..", 3, d))
    with pytest.raises(ValueError):
        device_id("ort-cpu", -1, cpu)


@pytest.mark.parametrize("text, expected", [
    ("Intel(R) Xeon(R) CPU @ 2.20GHz", "intel-xeon-2-20ghz"),
    ("AMD EPYC 7B13 64-Core Processor", "amd-epyc-7b13"),
    ("AMD Ryzen 7 7840U w/ Radeon  780M Graphics", "amd-ryzen-7-7840u-w-radeon-780m-graphics"),
    ("", "unknown"),
    ("../../", "unknown"),
])
def test_hw_slug(text, expected):
    assert hw_slug(text) == expected
    assert SAFE.match(hw_slug(text))


def test_slug_keeps_backend_words():
    assert slug("ORT CPU") == "ort-cpu" and slug("ort-trt/fp16") == "ort-trt-fp16"


def test_cpu_model_aarch64_falls_back_to_device_tree(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 62.50\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n"
                       "CPU part\t: 0xd42\n\nprocessor\t: 1\n")
    dt = tmp_path / "model"
    dt.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    assert hardware.cpu_model(str(cpuinfo), str(dt)) == "NVIDIA Jetson AGX Orin Developer Kit"
    x86 = tmp_path / "cpuinfo-x86"
    x86.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n")
    assert hardware.cpu_model(str(x86), str(dt)) == "AMD EPYC 7B13"
    assert hardware.cpu_model(str(tmp_path / "none"), str(tmp_path / "none"))  # platform fallback, never empty


def test_jetson_info_from_files(tmp_path):
    dt = tmp_path / "model"
    dt.write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    rel = tmp_path / "nv_tegra_release"
    rel.write_text("# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64\n")
    info = hardware.jetson_info(False, str(dt), str(rel))
    assert info["model"] == "NVIDIA Jetson Orin Nano Developer Kit" and info["l4t"] == "36.3.0"
    assert info["source"] == "sysfs"
    assert hardware.jetson_info(False, str(tmp_path / "x"), str(tmp_path / "y")) is None


def test_gpu_from_nvidia_smi_on_path(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 550.54.15'\necho 'NVIDIA H100 80GB HBM3, 550.54.15'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    gpu = hardware.gpu_info()
    assert gpu == {"name": "NVIDIA H100 80GB HBM3", "names": ["NVIDIA H100 80GB HBM3"] * 2, "count": 2,
                   "driver": "550.54.15", "source": "nvidia-smi"}


def _nvml_stand_in(names: list, driver, calls: list, capabilities: list | None = None) -> types.ModuleType:
    """A pynvml stand-in (its documented API) for GPUs ``names``; init/shutdown calls recorded in ``calls``."""
    mod = types.ModuleType("pynvml")
    mod.nvmlInit = lambda: calls.append("init")
    mod.nvmlShutdown = lambda: calls.append("shutdown")
    mod.nvmlDeviceGetCount = lambda: len(names)
    mod.nvmlDeviceGetHandleByIndex = lambda i: i
    mod.nvmlDeviceGetName = lambda h: names[h]
    mod.nvmlSystemGetDriverVersion = lambda: driver
    if capabilities is not None:
        mod.nvmlDeviceGetCudaComputeCapability = lambda h: capabilities[h]
    return mod


def test_gpu_from_nvml_stand_in(monkeypatch):
    calls = []
    # old nvidia-ml-py returns bytes
    monkeypatch.setitem(sys.modules, "pynvml", _nvml_stand_in([b"Tesla T4"], "535.104.05", calls))
    gpu = hardware.gpu_info()
    assert gpu["name"] == "Tesla T4" and gpu["driver"] == "535.104.05" and gpu["source"] == "nvml"
    assert calls == ["init", "shutdown"]


def test_gpu_compute_capability_and_detect_gpu_from_nvidia_smi(tmp_path, monkeypatch):
    from abcd_edge.device.tensorrt import detect_gpu

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\ncase \"$1\" in\n  *compute_cap*) echo '9.0' ;;\n"
                   "  *) echo 'NVIDIA H100 80GB HBM3, 550.54.15' ;;\nesac\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert hardware.gpu_compute_capability() == "9.0"
    assert detect_gpu() == {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "how": "nvidia-smi"}
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")   # a broken driver: nothing found
    assert hardware.gpu_info() is None and hardware.gpu_compute_capability() is None


def test_detect_gpu_from_nvml_stand_in(monkeypatch):
    from abcd_edge.device.tensorrt import detect_gpu

    calls = []
    monkeypatch.setitem(sys.modules, "pynvml", _nvml_stand_in(["NVIDIA A10G", "NVIDIA T4"], b"535.104.05", calls,
                                                              [(8, 6), (7, 5)]))
    assert detect_gpu() == {"gpu_name": "NVIDIA A10G", "compute_capability": "8.6", "how": "nvml"}
    assert calls == ["init", "shutdown"] * 2     # gpu_info, then the compute capability; each shuts NVML down


def test_detect_gpu_on_a_jetson_falls_back_to_the_device_tree(tmp_path, monkeypatch):
    """No NVML, no nvidia-smi (JetPack 5): the board model names the GPU; elsewhere nothing does."""
    from abcd_edge.device.tensorrt import detect_gpu

    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect_gpu() == {"gpu_name": None, "compute_capability": None, "how": "none"}
    dt = tmp_path / "model"
    dt.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    monkeypatch.setattr(hardware, "DT_MODEL", str(dt))
    assert hardware.device_tree_model() == "NVIDIA Jetson AGX Orin Developer Kit"
    assert detect_gpu() == {"gpu_name": "NVIDIA Jetson AGX Orin Developer Kit", "compute_capability": None,
                            "how": "device-tree"}


def test_jetson_power_mode_from_jtop_enters_the_id(monkeypatch, tmp_path):
    mod = types.ModuleType("jtop")

    class JtopException(Exception):
        pass

    class jtop:  # noqa: N801
        def __init__(self, interval=1.0):
            self.interval = 1.0

        def start(self):
            pass

        def ok(self, spin=False):
            return True

        def close(self):
            pass

        power = {"rail": {}, "tot": {"power": 4000, "avg": 4000, "name": "VDD_IN"}}
        board = {"hardware": {"Model": "NVIDIA Jetson Orin NX Engineering Reference Developer Kit", "L4T": "35.4.1",
                              "Jetpack": "5.1.2"}}
        nvpmodel = types.SimpleNamespace(name="25W", id=3)
        jetson_clocks = False

    mod.jtop, mod.JtopException = jtop, JtopException
    monkeypatch.setitem(sys.modules, "jtop", mod)
    info = machine_info()
    assert info["power_meters"]["jtop"] is None
    assert info["jetson"]["nvpmodel"] == "25W" and info["jetson"]["jetpack"] == "5.1.2"
    assert "25W" in format_info(info) and "JetPack 5.1.2" in format_info(info)
    did = device_id("ort-trt", None, info)
    assert did.startswith("jetson-orin-nx-engineering-reference-developer-kit-25w-") and did.endswith("-ort-trt")
    assert device_id("ort-trt", None) == did  # the quick path reads jtop too
