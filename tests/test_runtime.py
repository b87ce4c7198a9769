"""The anytime loop: real ONNX Runtime on a tiny exported UNet, and fake clocks for the exit rules."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from abcd_edge.device.backends import Abandoned
from abcd_edge.core.budget import parse_budget
from abcd_edge.errors import UserError
from abcd_edge.runtime.session import AnytimeRuntime, RequestReport


@pytest.fixture()
def runtime(tiny_artifact, fixed_profile):
    rt = AnytimeRuntime.open(tiny_artifact, profile=fixed_profile, controller=None, threads=1, power="none")
    yield rt
    rt.close()


def test_generate_real_clock_meets_generous_budget(tiny_artifact, tiny_profile):
    rt = AnytimeRuntime.open(tiny_artifact, profile=tiny_profile, controller=None, threads=1, power="none")
    images, rep = rt.generate(parse_budget("5s"), sampler="ddim", seed=3)
    rt.close()
    assert images.shape == (1, 8, 8, 3) and images.dtype == np.uint8
    assert rep.deadline_met and rep.latency_ms <= 5000
    # no controller: the rule-based plan is capped at 200 steps, far less than 5 s holds here
    assert rep.steps == len(rep.measured_step_ms) == rep.planned_steps == 200
    assert rep.exit_reason == "done"
    assert rep.power_meter == "none" and rep.energy_mj is None


def test_same_seed_same_image_on_a_fixed_clock(tiny_artifact, fixed_profile, step_clock):
    rt = AnytimeRuntime.open(tiny_artifact, profile=fixed_profile, controller=None, threads=1, power="none",
                        clock=step_clock(1.0))
    results = []
    for seed in (3, 3, 4):
        rt.online.correction = 1.0     # the cross-request correction would otherwise change the plan
        results.append(rt.generate(parse_budget("60ms"), sampler="dpmpp-2m", seed=seed))
    (a, ra), (b, rb), (c, _) = results
    assert ra.sigmas == rb.sigmas and np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp-2m", "euler", "consistency"])
def test_every_sampler_runs(tiny_artifact, fixed_profile, sampler, step_clock):
    """Each sampler runs its whole plan on a fixed clock and returns a real image from its last x0."""
    rt = AnytimeRuntime.open(tiny_artifact, profile=fixed_profile, controller=None, threads=1, power="none",
                             clock=step_clock(1.0))
    images, rep = rt.generate(parse_budget("30ms"), sampler=sampler, seed=1)
    other, _ = rt.generate(parse_budget("30ms"), sampler=sampler, seed=2)
    rt.close()
    assert rep.sampler == sampler and rep.exit_reason == "done" and rep.steps == rep.planned_steps >= 10
    assert all(a > b for a, b in zip(rep.sigmas, rep.sigmas[1:]))           # one strictly decreasing schedule
    assert images.shape == (1, 8, 8, 3) and images.std() > 0 and not np.array_equal(images, other)


def test_batch_two(runtime):
    images, rep = runtime.generate(parse_budget("1s"), batch=2)
    assert images.shape == (2, 8, 8, 3) and rep.batch == 2 and rep.exit_reason == "done" and rep.steps >= 1
    assert not np.array_equal(images[0], images[1])          # two noises, two images
    # numpy scalars (as a caller's arrays give them) are accepted like Python numbers
    _, rep2 = runtime.generate(parse_budget("1s"), rho=np.float32(1.0), batch=np.int64(2))
    assert rep2.batch == 2 and rep2.steps >= 1


def test_budget_rule_on_fake_clock(tiny_artifact, fixed_profile, step_clock):
    """With 10 ms steps on a simulated clock, the loop stops before a step that would overrun."""
    clock = step_clock(10.0)
    rt = AnytimeRuntime.open(tiny_artifact, profile=fixed_profile, controller=None, threads=1, power="none", clock=clock)
    cm = rt.cost_model(1, "ddim")
    _, rep = rt.generate(parse_budget("100ms"), seed=0)
    # 10x slower steps than profiled: the loop re-plans the rest of the schedule into the steps that
    # still fit (so it still reaches low noise) and never starts a step whose tail would overrun
    # (the clock is fake and deterministic: the re-planned schedule ends exactly, 9 of 87 planned steps)
    assert rep.exit_reason == "done" and (rep.steps, rep.planned_steps) == (9, 87) and rep.replans >= 1
    assert rep.latency_ms <= 100
    assert rep.sigmas[rep.steps - 1] < 0.1 * rep.sigmas[0] and rep.sigmas[rep.steps - 1] < 5.0
    elapsed = 0.0
    for pred in rep.predicted_step_ms:
        assert elapsed + pred + cm.finish_tail_ms <= 100 + 1e-6
        elapsed += 10.0
    assert rep.steps < rep.planned_steps
    # the online correction learned that steps are slower than the profile said
    assert rep.correction > 1.5


def test_guard_abandons_a_slow_step(tiny_artifact, fixed_profile):
    from abcd_edge.device.backends import open_denoiser

    inner = open_denoiser(tiny_artifact, threads=1)
    gate = threading.Event()
    calls = {"n": 0, "armed": False}

    class Sleepy:
        backend = "ort-cpu"

        def __call__(self, sample, t):
            calls["n"] += calls["armed"]
            if calls["n"] == 3:           # the third step of the request hangs for 5 s unless abandoned
                if gate.wait(5.0):
                    raise Abandoned("abandoned")
            return inner(sample, t)

        def abandon(self):
            gate.set()

    rt = AnytimeRuntime.open(tiny_artifact, profile=fixed_profile, controller=None, threads=1, power="none",
                             denoiser=Sleepy())
    calls["armed"] = True                 # after the session's warm-up
    t0 = time.monotonic()
    images, rep = rt.generate(parse_budget("150ms"), seed=0)
    wall = (time.monotonic() - t0) * 1e3
    rt.close()
    assert rep.exit_reason == "guard"
    assert rep.steps == 2
    # On a quiet machine the answer is on time; a loaded scheduler can delay the watchdog's wake-up by a
    # few ms (README, "Guarantees and limits"). Without the guard the request would take over 5 s.
    assert rep.latency_ms <= 155, rep.latency_ms
    assert wall < 1000                                   # did not wait for the 5 s step
    assert images.std() > 0                              # made from the last x0, not blank


def test_refuses_below_minimum_and_best_effort(runtime):
    minimum = runtime.minimum_ms()
    tiny = parse_budget(f"{minimum / 4:.6f}ms")
    with pytest.raises(UserError) as e:
        runtime.generate(tiny)
    assert f"{minimum:.2f}" in str(e.value) and "--best-effort" in str(e.value)
    images, rep = runtime.generate(tiny, best_effort=True)
    assert rep.steps == rep.planned_steps == 1 and images.shape[0] == 1
    assert rep.exit_reason == "best-effort"          # answered anyway, and said so


def test_bad_inputs(runtime):
    with pytest.raises(UserError, match="sampler 'heun'"):
        runtime.generate(parse_budget("1s"), sampler="heun")
    with pytest.raises(UserError, match="quality"):
        runtime.generate(parse_budget("1s"), rho=1.5)
    with pytest.raises(UserError, match="batch 0"):
        runtime.generate(parse_budget("1s"), batch=0)
    with pytest.raises(UserError, match="no batch 3"):
        runtime.generate(parse_budget("1s"), batch=3)
    with pytest.raises(UserError, match="energy budget"):
        runtime.generate(parse_budget("2J"))          # no meter, no energy per step: refused, not guessed


def test_foreign_profile_refused_on_wall_clock(tiny_artifact, tiny_profile, tmp_path):
    data = json.loads(tiny_profile.read_text())
    data["device_id"] = "gpu-other-device-ort-cuda"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    with pytest.raises(UserError, match="never used to keep deadlines"):
        AnytimeRuntime.open(tiny_artifact, profile=other, controller=None, threads=1, power="none")


def test_report_schema(runtime):
    _, rep = runtime.generate(parse_budget("500ms"))
    data = json.loads(json.dumps(rep.to_json()))
    for key in ("budget_ms", "latency_ms", "deadline_met", "steps", "planned_steps", "exit_reason", "power_meter",
                "energy_mj", "sampler", "schedule", "predicted_step_ms", "measured_step_ms", "manifest_hash", "seed"):
        assert key in data
    assert RequestReport(**data) == rep
    assert "no power meter" in rep.summary_line()


def test_runtime_imports_no_torch():
    """Every module of the runtime path (core, formats, device, runtime, profiling, quality, the CLI) imports
    without torch, diffusers, onnx or transformers, and without the demo (a leaf the library never imports)."""
    code = ("import importlib, pkgutil, sys\n"
            "import abcd_edge\n"
            "mods = ['abcd_edge.quality', 'abcd_edge.cli.main']\n"
            "for pkg in ('core', 'formats', 'device', 'runtime', 'profiling'):\n"
            "    p = importlib.import_module('abcd_edge.' + pkg)\n"
            "    mods += [m.name for m in pkgutil.iter_modules(p.__path__, p.__name__ + '.')]\n"
            "for m in mods:\n"
            "    importlib.import_module(m)\n"
            "bad = [m for m in ('torch', 'diffusers', 'onnx', 'transformers', 'abcd_edge.demo') if m in sys.modules]\n"
            "print(len(mods), bad)\n"
            "sys.exit(1 if bad or len(mods) < 20 else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_refusal_is_not_sticky(tiny_artifact, fixed_profile, step_clock):
    """A high running correction must not make every later request refused or stepless."""
    rt = AnytimeRuntime.open(tiny_artifact, profile=fixed_profile, controller=None, threads=1, power="none",
                        clock=step_clock(1.0))
    base = rt.minimum_ms()
    rt.online.correction = 50.0               # as after a burst of very slow steps
    assert rt.minimum_ms() == pytest.approx(base)          # the minimum is the profile's, not the burst's
    for _ in range(30):
        _, rep = rt.generate(parse_budget("8ms"))
        if rep.steps:
            break
    assert rep.steps >= 1 and rt.online.correction < 5.0


def test_gpu_backend_silently_on_cpu_is_refused(tiny_artifact, monkeypatch):
    """ONNX Runtime drops an unavailable CUDA provider with only a log line; we refuse instead."""
    from abcd_edge.device import backends

    monkeypatch.setattr(backends, "backend_unavailable_reason", lambda backend: None)
    with pytest.raises(UserError, match="could not start CUDAExecutionProvider"):
        backends.OrtDenoiser(tiny_artifact / "denoiser.onnx", backend="ort-cuda", threads=1)


def test_tail_widens_when_steps_vary_more_than_profiled(tiny_artifact, fixed_profile, step_clock):
    """Steps alternating 1 ms / 4 ms (profile: 1.0-1.2 ms): after TAIL_MIN_STEPS the hard rule's step tail
    follows the observed 99th percentile, not the profile's p99 scaled by the (mean) correction."""
    from abcd_edge.runtime.cost import TAIL_MIN_STEPS

    clock = step_clock(lambda k: 4.0 if k % 2 else 1.0)
    rt = AnytimeRuntime.open(tiny_artifact, profile=fixed_profile, controller=None, threads=1, power="none", clock=clock)
    try:
        p50 = rt.profile.for_batch(1).step.p50_ms
        assert rt.cost_model(1, "ddim").observed_tail_ratio == 0.0
        steps = 0
        while steps < TAIL_MIN_STEPS:
            steps += rt.generate(parse_budget("60ms"), seed=steps)[1].steps
        cm = rt.cost_model(1, "ddim")
        assert cm.observed_tail_ratio == pytest.approx(4.0 / p50, rel=0.01)
        assert cm.next_step_ms() >= 4.0 > cm.step_tail_ms * cm.correction
        _, rep = rt.generate(parse_budget("60ms"), seed=99)
        assert rep.latency_ms <= 60 and all(pred >= 4.0 for pred in rep.predicted_step_ms)
    finally:
        rt.close()
