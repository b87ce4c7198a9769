"""The controller and a tiny end-to-end calibration (tiny UNet, real ONNX artifact, real profile)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from abcd_edge.core.budget import parse_budget
from abcd_edge.formats.controller import Controller, ControllerSpec, cost_features, decision_features, torch_controller
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
        d = ctl.density(ctx, z)
        assert d.shape == (ctl.spec.k_bins,) and (d > 0).all()
        sig = ctl.plan_sigmas(ctx, z, 7)
        assert len(sig) == 7 and np.all(np.diff(sig) < 0)


def test_torch_numpy_twin_parity():
    import torch

    model = torch_controller(ControllerSpec())
    twin = Controller(model.spec, model.numpy_weights())
    rng = np.random.default_rng(0)
    for _ in range(5):
        cz = rng.normal(size=(1, 9)).astype(np.float32)
        h = decision_features(2.0, 0.01, 0.4, 0.3, cz[0, :3], cz[0, 3:])
        f = cost_features(5.0, 6.5, 0.2, 0.3, 1, "ort-cpu", 1.1)
        with torch.no_grad():
            d, logit, cost = model(torch.from_numpy(cz), torch.from_numpy(h), torch.from_numpy(f))
        assert np.abs(twin.density(cz[0, :3], cz[0, 3:]) - d.numpy()[0]).max() <= 1e-5
        assert abs(twin.p_stop(h) - torch.sigmoid(logit).item()) <= 1e-5
        assert np.allclose(np.log(twin.predict_cost_ms(f)), cost.numpy()[0], atol=1e-5)


def test_inverse_cdf_placement_differentiable():
    import torch

    from abcd_edge.core.placement import sigmas_from_density

    d = torch.rand(16, dtype=torch.float64) + 0.1
    d.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: sigmas_from_density(w, 5, -4.0, 4.0, xp=torch), (d,))


def test_tiny_calibration_end_to_end(calibrated, tiny_artifact):
    from abcd_edge.formats.manifest import manifest_hash

    out, report = calibrated
    for name in ("controller.safetensors", "controller.json", "controller.onnx", "report.json", "curves.png", "ays.json"):
        assert (out / name).is_file(), name
    assert report["onnx_parity_max_abs"] <= 1e-5
    ctl = Controller.load(out, manifest_hash(tiny_artifact))
    assert ctl.spec.n_parameters() == report["parameters"]
    # training lowered the teacher distance on its own training contexts (log teacher MSE + KL)
    losses = json.loads((out / "report.json").read_text())["final_losses"]
    assert np.isfinite(losses["wg_loss"]) and np.isfinite(losses["policy_loss"])
    curve = calibrated[1]["wg_curve"]
    assert np.mean(curve[-10:]) < np.mean(curve[:10]), (curve[:10], curve[-10:])
    assert set(report["validation_teacher_mse"]) == {"ddim/n=3", "ddim/n=5", "ddim/n=10", "ddim/n=20"}


def test_controller_from_another_artifact_refused(calibrated):
    out, _ = calibrated
    with pytest.raises(UserError, match="another artifact"):
        Controller.load(out, "f" * 64)


def test_runtime_uses_controller_and_keeps_hard_rule(calibrated, tiny_artifact, fixed_profile):
    from abcd_edge.runtime.session import AnytimeRuntime
    from tests.test_runtime import StepClock

    out, _ = calibrated
    rt = AnytimeRuntime.open(tiny_artifact, profile=fixed_profile, controller=out, threads=1, power="none",
                        clock=StepClock(3.0))
    _, rep = rt.generate(parse_budget("40ms"), rho=1.0)
    assert rep.schedule == "controller" and rep.controller is not None
    assert rep.latency_ms <= 40 and rep.exit_reason in ("budget", "quality", "done")


def test_calibrate_bad_input(tiny_artifact, fixed_profile, tmp_path):
    from abcd_edge.calibrate.legacy import CalibrationConfig, calibrate

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
