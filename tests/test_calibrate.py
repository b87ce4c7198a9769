"""The controller and a tiny end-to-end calibration (tiny UNet, real ONNX artifact, real profile)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from abcd_edge.core.budget import parse_budget
from abcd_edge.calibrate.torch_model import torch_controller
from abcd_edge.formats.controller import Controller, ControllerSpec, Gate, cost_features, wg_features
from abcd_edge.errors import UserError


def test_parameter_count_in_range():
    spec = ControllerSpec()
    model = torch_controller(spec)
    n = sum(p.numel() for p in model.parameters())
    assert n == spec.n_parameters()
    assert 10_000 <= n <= 25_000


def test_density_nonnegative_and_placement_monotone():
    ctl = Controller.random_init(seed=1)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        ctx, z = rng.normal(size=3).tolist(), rng.normal(size=6).tolist()
        d = ctl.density(ctx, z, 7)
        assert d.shape == (ctl.spec.k_bins,) and (d > 0).all()
        sig = ctl.plan_sigmas(ctx, z, 7)
        assert len(sig) == 7 and np.all(np.diff(sig) < 0)


def test_torch_numpy_twin_parity():
    import torch

    model = torch_controller(ControllerSpec())
    twin = Controller(model.spec, model.numpy_weights())
    rng = np.random.default_rng(0)
    for n in (1, 4, 13):
        ctx, z = rng.normal(size=3).tolist(), rng.normal(size=6).tolist()
        f = cost_features(5.0, 6.5, 0.2, 0.3, 1, "ort-cpu", 1.1)
        with torch.no_grad():
            d, cost = model(torch.from_numpy(wg_features(ctx, n, z)), torch.from_numpy(f))
        assert np.abs(twin.density(ctx, z, n) - d.numpy()[0]).max() <= 1e-5
        assert np.allclose(np.log(twin.predict_cost_ms(f)), cost.numpy()[0], atol=1e-5)


def test_inverse_cdf_placement_differentiable():
    import torch

    from abcd_edge.core.placement import sigmas_from_density

    d = torch.rand(16, dtype=torch.float64) + 0.1
    d.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: sigmas_from_density(w, 5, -4.0, 4.0, xp=torch), (d,))


def test_tiny_calibration_end_to_end(calibrated, tiny_artifact):
    from abcd_edge.core.placement import STATIC_PLACEMENTS
    from abcd_edge.formats.manifest import manifest_hash

    out, report = calibrated
    for name in ("controller.safetensors", "controller.json", "controller.onnx", "report.json", "curves.png",
                 "gate.md"):
        assert (out / name).is_file(), name
    assert not (out / "ays.json").exists()         # not asked for (--ays) and none there before
    assert report["onnx_parity_max_abs"] <= 1e-5
    ctl = Controller.load(out, manifest_hash(tiny_artifact))
    assert ctl.spec.n_parameters() == report["parameters"]
    # the search never ends worse than where it started, on its own (training) objective
    for n, row in report["search"]["ddim"].items():
        assert row["score"] <= row["start_score"] and len(row["sigmas"]) == int(n)
    assert np.isfinite(report["final_losses"]["wg_loss"]) and np.isfinite(report["final_losses"]["cost_loss"])
    # the gate: per step count, a decision that is the generator only where it won beyond the CI
    assert ctl.gate is not None and ctl.gate.steps == {"ddim": [2, 3, 5]}
    for k, n in enumerate(ctl.gate.steps["ddim"]):
        row = report["gate"]["ddim"][str(n)]
        assert {"learned", "searched", *STATIC_PLACEMENTS} <= set(row)
        won = row["fid_minus_best_static_ci95"][1] < 0
        assert ctl.gate.placements["ddim"][k] == ("learned" if won else row["best_static"])
        assert row["best_static"] == min(STATIC_PLACEMENTS, key=lambda p: row[p]["fid"])
        assert ctl.gate.fid["ddim"][k] == pytest.approx(row[ctl.gate.placements["ddim"][k]]["fid"], rel=1e-3)
    # report.json is written once, complete: what calibrate() returned, with the command that ran it
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert on_disk["command"] == "pytest: tiny calibration"
    for key, row in on_disk["exit_behaviour"].items():
        fit, rho = int(key.split("/")[0].split("=")[1]), float(key.split("=")[-1])
        assert 1 <= row["steps"] <= fit and row["steps"] == ctl.gate.exit_steps("ddim", fit, rho)
        if rho == 1.0:
            assert row["steps"] == fit and row["fid_ratio"] == 1.0
    assert set(on_disk["cost_predictor"]) == {"fixed"}
    assert not (out.parent / f".{out.name}.ckpt").exists()              # checkpoints removed once written


def test_gate_placement_and_exit_rule():
    gate = Gate(steps={"ddim": [2, 4, 8, 16]}, placements={"ddim": ["learned", "uniform", "learned", "logsnr"]},
                fid={"ddim": [40.0, 20.0, 10.0, 8.0]}, exit_kappa=0.3)
    # the nearest validated step count in log n (3 is nearer 4 than 2; 6 nearer 8 than 4)
    assert [gate.placement("ddim", n) for n in (1, 2, 3, 5, 6, 11, 12, 40)] == [
        "learned", "learned", "uniform", "uniform", "learned", "learned", "logsnr", "logsnr"]
    assert gate.placement("euler", 4) is None
    assert gate.expected_fid("ddim", 4) == pytest.approx(20.0)
    assert gate.expected_fid("ddim", 100) == pytest.approx(8.0)          # flat beyond what was measured
    # rho = 1 takes every step that fits; below, the fewest within (1 + 0.3 (1 - rho)) of the full plan
    assert gate.exit_steps("ddim", 16, 1.0) == 16
    steps = [gate.exit_steps("ddim", 16, rho) for rho in (0.0, 0.3, 0.5, 0.8, 0.95, 1.0)]
    assert steps == sorted(steps) and steps[0] < 16
    for rho, n in zip((0.0, 0.3, 0.5, 0.8, 0.95), steps):
        assert gate.expected_fid("ddim", n) <= 8.0 * (1 + 0.3 * (1 - rho)) + 1e-9
        assert n == 2 or gate.expected_fid("ddim", n - 1) > 8.0 * (1 + 0.3 * (1 - rho))
    assert gate.exit_steps("ddim", 2, 0.0) == 2 and gate.exit_steps("ddim", 1, 0.0) == 1
    assert gate.exit_steps("euler", 16, 0.0) == 16                      # no validated curve: no early exit
    assert Gate.from_json(json.loads(json.dumps(gate.to_json()))) == gate


def test_controller_from_another_artifact_refused(calibrated):
    out, _ = calibrated
    with pytest.raises(UserError, match="another artifact"):
        Controller.load(out, "f" * 64)


def test_runtime_uses_controller_and_keeps_hard_rule(calibrated, tiny_artifact, fixed_profile, step_clock):
    from abcd_edge.runtime.session import AnytimeRuntime

    out, _ = calibrated
    rt = AnytimeRuntime.open(tiny_artifact, profile=fixed_profile, controller=out, threads=1, power="none",
                        clock=step_clock(3.0))
    _, rep = rt.generate(parse_budget("40ms"), rho=1.0)
    ctl = Controller.load(out)
    validated = ctl.gate.placement("ddim", rep.planned_steps)
    assert rep.schedule == ("controller" if validated == "learned" else validated) and rep.controller is not None
    # rho = 1 asks for every step the budget allows
    assert rep.latency_ms <= 40 and rep.exit_reason in ("budget", "done") and rep.steps >= 1


def test_torch_rollout_is_the_onnx_loop_with_gradients(tiny_artifact, tiny_model_dir):
    """The AYS-like baseline's rollout (the one step loop over torch tensors, through TorchDenoiser) gives
    the ONNX Runtime result from the same noise and sigmas, and a gradient for every sigma."""
    import torch
    from diffusers import UNet2DModel

    from abcd_edge.calibrate.ays import TorchDenoiser
    from abcd_edge.core.loop import run_steps, sample
    from abcd_edge.core.noise import NoiseSchedule
    from abcd_edge.core.placement import time_uniform_sigmas
    from abcd_edge.core.samplers import make_sampler
    from abcd_edge.device.backends import open_denoiser
    from abcd_edge.formats.manifest import load_manifest

    manifest = load_manifest(tiny_artifact)
    schedule = NoiseSchedule.from_config(manifest.scheduler_config)
    unet = UNet2DModel.from_pretrained(tiny_model_dir / "unet").eval().requires_grad_(False)
    ort = open_denoiser(tiny_artifact, threads=1)
    noise = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    sig = time_uniform_sigmas(schedule, 4)
    for name in ("ddim", "dpmpp-2m", "euler"):
        ref, _ = sample(ort, make_sampler(name, schedule, sig, manifest.prediction_type), noise)
        sigmas = torch.tensor(sig, dtype=torch.float64, requires_grad=True)
        smp = make_sampler(name, schedule, sigmas, manifest.prediction_type)
        x0 = run_steps(TorchDenoiser(unet), smp, torch.from_numpy(noise).double()).x0
        assert np.abs(x0.detach().numpy() - ref).max() < 1e-4, name
        x0.square().mean().backward()
        assert torch.isfinite(sigmas.grad).all() and (sigmas.grad != 0).all(), (name, sigmas.grad)


def test_validation_budgets_fit_their_steps_by_the_cost_model(tiny_artifact, fixed_profile):
    """Calibration asks the runtime's CostModel how many steps fit; the budget each gated run of n
    steps is planned for fits exactly n static steps at the tail (and one more does not)."""
    from abcd_edge.calibrate.state import SEARCH_STEPS
    from abcd_edge.calibrate.state import CalibrationProfile
    from abcd_edge.formats.manifest import manifest_hash
    from abcd_edge.formats.profile import load_profile
    from abcd_edge.runtime.cost import CostModel

    prof = CalibrationProfile.load(fixed_profile, manifest_hash(tiny_artifact))
    raw = load_profile(fixed_profile)
    for sampler in ("ddim", "dpmpp-2m", "euler"):
        cost = prof.cost_model(sampler)
        assert cost == CostModel.from_profile(raw.for_batch(1), sampler)
        for n in SEARCH_STEPS:
            budget = cost.budget_for(n)
            assert prof.steps_that_fit(budget, sampler) == cost.steps_that_fit(budget, level="tail") == n
            assert prof.steps_that_fit(budget + cost.next_step_ms(), sampler) == n + 1
            assert prof.steps_that_fit(budget, sampler, cap=2) == min(n, 2)


def test_calibrate_bad_input(tiny_artifact, fixed_profile, tmp_path):
    from abcd_edge.calibrate import CalibrationConfig, calibrate

    with pytest.raises(UserError, match="empty"):
        calibrate(tiny_artifact, [fixed_profile], tmp_path / "c", CalibrationConfig(samplers=()), progress=False)
    with pytest.raises(UserError, match="at least one --profile"):
        calibrate(tiny_artifact, [], tmp_path / "c", CalibrationConfig(), progress=False)
    data = json.loads(fixed_profile.read_text())
    data["manifest_hash"] = "0" * 64
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    with pytest.raises(UserError, match="another artifact"):
        calibrate(tiny_artifact, [other], tmp_path / "c", CalibrationConfig(), progress=False)


def test_cost_predictor_only_on_its_calibrated_backends(calibrated, tiny_artifact, fixed_profile, tmp_path):
    from abcd_edge.runtime.session import AnytimeRuntime

    out, _ = calibrated
    assert json.loads((out / "controller.json").read_text())["cost_backends"] == ["ort-cpu"]
    other = tmp_path / "ctl"
    shutil.copytree(out, other)
    meta = json.loads((other / "controller.json").read_text())
    meta["cost_backends"] = ["ort-cuda"]               # as if calibrated on GPU profiles only
    (other / "controller.json").write_text(json.dumps(meta))
    rt = AnytimeRuntime.open(tiny_artifact, profile=fixed_profile, controller=other, threads=1, power="none")
    try:
        assert not rt.uses_cost_predictor(1)
        assert any("cost predictor calibrated on ort-cuda" in n for n in rt.notes)
        bp = rt.profile.for_batch(1)
        assert rt.cost_model(1, "ddim").step_tail_ms == bp.step.p99_ms
    finally:
        rt.close()


def test_cost_predictor_overruled_where_the_profile_disagrees(calibrated, tiny_artifact, fixed_profile, tmp_path):
    from abcd_edge.formats.profile import DeviceProfile, LatencyStats
    from abcd_edge.runtime.session import AnytimeRuntime

    prof = DeviceProfile.from_json(json.loads(fixed_profile.read_text()))
    for bp in prof.batches:      # this "device" steps 6x slower than the one the controller was calibrated on
        bp.step = LatencyStats.from_samples([6.0 * v for v in bp.step.samples_ms])
    slow = tmp_path / "slow.json"
    prof.save(slow)
    rt = AnytimeRuntime.open(tiny_artifact, profile=slow, controller=calibrated[0], threads=1, power="none")
    try:
        assert not rt.uses_cost_predictor(1)
        assert any("disagrees with the profile's measured p99" in n for n in rt.notes)
        assert rt.cost_model(1, "ddim").step_tail_ms == rt.profile.for_batch(1).step.p99_ms
    finally:
        rt.close()


def test_a_checkpoint_of_other_settings_is_not_resumed(tiny_artifact, fixed_profile, tiny_feature_nets, tmp_path,
                                                       monkeypatch):
    """A run that failed after its gate (steps 2,3) leaves a checkpoint; a new run with steps 2 must not
    report the old run's n = 3 (it once did: the checkpoint was resumed whatever the settings)."""
    from abcd_edge.calibrate import CalibrationConfig, calibrate, persist

    def cfg(steps):
        return CalibrationConfig(samplers=("ddim",), search_noises=8, search_steps=steps, gate_noises=8, wg_iters=20,
                                 cost_iters=20, threads=1, calibration_net=str(tiny_feature_nets[0]),
                                 evaluation_net=str(tiny_feature_nets[1]))

    def fail(*a, **k):
        raise RuntimeError("stopped before writing")

    out = tmp_path / "cal"
    with monkeypatch.context() as m:
        m.setattr(persist, "write", fail)
        with pytest.raises(RuntimeError):
            calibrate(tiny_artifact, [fixed_profile], out, cfg((2, 3)), progress=False)
    assert (tmp_path / ".cal.ckpt" / "gate.json").is_file()
    report = calibrate(tiny_artifact, [fixed_profile], out, cfg((2,)), progress=False)
    assert list(report["gate"]["ddim"]) == ["2"]
