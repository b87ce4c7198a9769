"""Shared fixtures and stand-ins: a tiny diffusers UNet exported to a real ONNX artifact, its measured and
fixed profiles, a short real calibration, and ``StepClock`` (a fake clock for deterministic exit-rule tests)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["tests.sd_fixtures"]   # tiny SD / LCM pipeline folders and their exports (issue 15)

# caches the code under test writes (quick profiles, the gate's static features) go to a throw-away folder
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="abcd-edge-test-cache-")


def one_line_error(res, *needles: str) -> str:
    """A CLI result (click's CliRunner) is exit 2 with exactly one non-empty line, ``abcd-edge: error: ...``,
    naming every needle, and no traceback; returns that line."""
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("abcd-edge: error: ") and "Traceback" not in res.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` -> its bytes (to check that a refused command wrote nothing)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_working_tree(dest: Path) -> Path:
    """The repository as a fresh clone of this working tree would hold it (tracked and new files, nothing
    ignored: no .venv, no build output, no caches), copied to ``dest``."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parent.parent
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (root / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, dest / name)
    return dest


class StepClock:
    """A fake clock: every denoiser call costs ``step_ms`` (a number, or a function of the call index);
    nothing else costs anything. Deterministic exit-rule tests run on it."""

    simulated = True

    def __init__(self, step_ms):
        self.step_ms = step_ms
        self.now = 0.0
        self.k = 0

    def start(self):
        self.now, self.k = 0.0, 0

    def elapsed_ms(self):
        return self.now

    def run_step(self, call, abandon, guard_ms):
        cost = self.step_ms(self.k) if callable(self.step_ms) else self.step_ms
        self.k += 1
        out = call()
        if guard_ms is not None and self.now + cost > guard_ms:
            self.now = guard_ms
            return None, cost
        self.now += cost
        return out, cost

    def disarm(self):
        pass

    def close(self):
        pass


@pytest.fixture()
def step_clock():
    """The :class:`StepClock` class: ``step_clock(1.0)`` is a clock whose every step costs 1 ms."""
    return StepClock


TINY_UNET = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                 layers_per_block=1, norm_num_groups=4)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A pipeline-style diffusers folder (unet/ + scheduler/) with random weights."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-model")
    UNet2DModel(**TINY_UNET).save_pretrained(root / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear").save_pretrained(
        root / "scheduler")
    return root


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model_dir, tmp_path_factory) -> Path:
    from abcd_edge.export import export_model

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    export_model(str(tiny_model_dir), out, batches=(1, 2), progress=False, threads=1)
    return out


@pytest.fixture(scope="session")
def tiny_profile(tiny_artifact, tmp_path_factory) -> Path:
    """A real (short) profile of the tiny artifact on this machine, 1 thread."""
    from abcd_edge.profiling.measure import measure_profile

    prof = measure_profile(tiny_artifact, threads=1, batches=(1, 2), runs=40, warmup=5, power="none",
                           progress=False, command="tests")
    path = tmp_path_factory.mktemp("profiles") / "tiny.json"
    prof.save(path)
    return path


@pytest.fixture(scope="session")
def fixed_profile(tiny_profile, tmp_path_factory) -> Path:
    """The measured tiny profile with its latency samples replaced by known values (1.0-1.2 ms steps,
    0.1 ms finishing): plans become predictable for the exit-rule tests whatever the machine's load."""
    import json

    from abcd_edge.formats.profile import DeviceProfile, LatencyStats

    prof = DeviceProfile.from_json(json.loads(tiny_profile.read_text()))
    for bp in prof.batches:
        bp.step = LatencyStats.from_samples([1.0 + 0.2 * k / 99 for k in range(100)])
        bp.finish = LatencyStats.from_samples([0.1] * 50)
        for name in bp.sampler_ms:
            bp.sampler_ms[name] = LatencyStats.from_samples([0.01] * 50)
    prof.controller_decision = LatencyStats.from_samples([0.01] * 50)
    path = tmp_path_factory.mktemp("profiles") / "fixed.json"
    prof.save(path)
    return path


@pytest.fixture(scope="session")
def tiny_feature_nets(tmp_path_factory) -> tuple[Path, Path]:
    """Two small untrained feature networks for 8x8 images (another seed and width each), exported to ONNX
    with their reference statistics, as calibration reads them: (calibration net, evaluation net)."""
    import torch

    from abcd_edge import paths
    from abcd_edge.demo.data import make_images
    from abcd_edge.demo.featurenet import FeatureCNN, export_onnx
    from abcd_edge.quality import FeatureNet, ReferenceStats

    folders = []
    for name, seed, widths, ref_seed in (("calnet", 1, (8, 16), paths.CALIBRATION_REF_SEED),
                                         ("evalnet", 2, (12, 24), paths.EVAL_REF_SEED)):
        torch.manual_seed(seed)
        folder = tmp_path_factory.mktemp(name)
        export_onnx(FeatureCNN(widths=widths, depths=(1, 1), groups=4), folder / "featurenet.onnx", resolution=8)
        ReferenceStats.load_or_compute(ref_seed, paths.REF_N, FeatureNet(folder), cache_dir=folder, resolution=8,
                                       images=make_images)
        folders.append(folder)
    return folders[0], folders[1]


@pytest.fixture(scope="session")
def calibrated(tiny_artifact, fixed_profile, tiny_feature_nets, tmp_path_factory):
    """A short real calibration of the tiny artifact: (folder, report)."""
    from abcd_edge.calibrate import CalibrationConfig, calibrate

    out = tmp_path_factory.mktemp("cal") / "tiny"
    cfg = CalibrationConfig(samplers=("ddim",), search_noises=16, search_steps=(2, 3, 5), gate_noises=16,
                            wg_iters=60, cost_iters=60, threads=1, calibration_net=str(tiny_feature_nets[0]),
                            evaluation_net=str(tiny_feature_nets[1]))
    report = calibrate(tiny_artifact, [fixed_profile], out, cfg, progress=False, command="pytest: tiny calibration")
    return out, report
