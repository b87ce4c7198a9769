"""The benchmark harness: metric functions on known inputs, the replay clock, each baseline's step rule,
bad input, and a micro grid end to end (tiny artifact, fake quality backend) with resume."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from abcd_edge.bench import ays, grid, methods, metrics, runner, store, summary, teacher, tiers
from abcd_edge.errors import UserError
from abcd_edge.quality import feature_fid, frechet_distance, mean_cov


# ------------------------------------------------------------------------------- metric functions

def test_success_rate_and_pooled():
    assert metrics.success_rate([True, False, True, True]) == 0.75
    assert metrics.success_rate([]) is None
    assert metrics.pooled_success([(3, 4), (1, 4)]) == 0.5
    assert metrics.pooled_success([(0, 0)]) is None


def test_bootstrap_ci_known_inputs():
    # identical seeds: no spread
    assert metrics.bootstrap_ci([(2, 4)] * 5, metrics.pooled_success) == (0.5, 0.5)
    # one seed all met, one all missed: resamples give 0, 0.5 or 1 -> the 95 % interval spans [0, 1]
    lo, hi = metrics.bootstrap_ci([(4, 4), (0, 4)], metrics.pooled_success, n_boot=2000)
    assert lo == 0.0 and hi == 1.0
    # many seeds around 0.9: the interval holds the point estimate and is narrow
    groups = [(9, 10)] * 15 + [(10, 10)] * 5
    lo, hi = metrics.bootstrap_ci(groups, metrics.pooled_success)
    point = metrics.pooled_success(groups)
    assert lo <= point <= hi and hi - lo < 0.05 and lo > 0.9


def test_fid_identical_sets_is_zero_and_shift_is_known():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 6))
    assert feature_fid(a, a) == pytest.approx(0.0, abs=1e-8)
    # a pure shift by d: FID = |d|^2
    d = np.array([1.0, -2.0, 0, 0, 0, 0.5])
    assert feature_fid(a, a + d) == pytest.approx(float(d @ d), rel=1e-6)
    mu, cov = mean_cov(a)
    assert metrics.fid_pool(lambda f: frechet_distance(*mean_cov(f), mu, cov), [a[:200], a[200:]]) == \
        pytest.approx(0.0, abs=1e-8)
    assert metrics.fid_pool(lambda f: 0.0, [a[:1]]) is None          # fewer than 2 images: no FID


def test_cost_predictor_error(tmp_path):
    mape, cov = metrics.pooled_cost_error([store.cost_terms([2, 2, 2], [1, 2, 4])])
    assert mape == pytest.approx((1 + 0 + 0.5) / 3)
    assert cov == pytest.approx(2 / 3)
    assert store.cost_terms([], []) is None and metrics.pooled_cost_error([]) == (None, None)
    assert store.cost_terms([2, 2], [1, 2, 4]) is None                          # not one prediction per step
    # the same terms are what results.csv stores per request and what the summary pools per (tier, method)
    tier = tiers.Tier(name="t", kind="real", profile_path="p.json", device_id="d", backend="ort-cpu", threads=1)
    res = methods.RunResult(images=np.zeros((1, 8, 8, 3), np.uint8), latency_ms=10.0, deadline_met=True, steps=3,
                            planned_steps=3, exit_reason="done", predicted=[2.0, 2.0, 2.0], measured=[1.0, 2.0, 4.0])
    row = store.make_row(tier, "uniform", "", "20ms", 20.0, "ddim", None, 0, 0, 0, 1, "ok", res=res)
    assert (row["cost_ape_sum"], row["cost_steps"], row["cost_covered"]) == (1.5, 3, 2)
    assert row["predicted_step_ms_mean"] == 2.0 and row["measured_step_ms_mean"] == pytest.approx(7 / 3, abs=1e-4)
    assert row["rho"] == "all" and row["utilisation"] == 0.5 and row["deadline_met"] is True
    other = methods.RunResult(images=res.images, latency_ms=30.0, deadline_met=False, steps=1, planned_steps=1,
                              exit_reason="done", predicted=[1.0], measured=[3.0])
    store.write_csv(tmp_path / store.RESULTS_CSV, [row, store.make_row(tier, "uniform", "", "20ms", 20.0, "ddim",
                                                                       None, 0, 1, 1, 1, "ok", res=other)])
    (pooled,) = metrics.predictor_errors(tmp_path)
    assert pooled["steps"] == 4 and pooled["mape"] == pytest.approx((1.5 + 2 / 3) / 4)
    assert pooled["coverage"] == pytest.approx(2 / 4)


def test_reference_fid_equals_frechet_distance():
    from abcd_edge.quality import ReferenceStats

    rng = np.random.default_rng(3)
    ref_feats = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6))
    mu, sigma = mean_cov(ref_feats)
    stats = ReferenceStats(1, 500, 32, mu, sigma, ref_feats.astype(np.float32), "sha")
    for k, shift in ((50, 0.0), (200, 0.3), (7, -1.0)):
        x = rng.standard_normal((k, 6)) * 1.5 + shift
        assert stats.fid_to_reference(x) == pytest.approx(frechet_distance(*mean_cov(x), mu, sigma), rel=1e-9,
                                                          abs=1e-9)
        assert stats.fid_to_reference(x) == pytest.approx(stats.fid(x), rel=1e-9, abs=1e-9)
    assert stats.fid_to_reference(ref_feats) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError):
        stats.fid_to_reference(ref_feats[:1])


def test_busy_core_runs_a_process_only_inside_the_block():
    import os

    from abcd_edge.bench.load import busy_core

    with busy_core(False) as pid:
        assert pid is None
    with busy_core(True, settle_s=0.05) as pid:
        os.kill(pid, 0)                                  # alive while the block runs
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)                                  # ended and reaped after it


def test_oracle_pick():
    lat = [10, 20, 30, 40]
    mse = np.array([[5.0, 5.0], [3.0, 1.0], [2.0, 4.0], [0.1, 0.1]])   # step 3 best, but late
    pick, fits = methods.oracle_pick(lat, mse, budget_ms=30)
    assert fits and pick.tolist() == [2, 1]
    pick, fits = methods.oracle_pick(lat, mse, budget_ms=5)
    assert not fits and pick.tolist() == [0, 0]


def test_ays_table_layouts(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ays.json").write_text(json.dumps({"3": [10.0, 1.0, 0.1]}))
    table, src = ays.load_ays(tmp_path / "a")
    assert ays.ays_for(table, "euler") == {3: [10.0, 1.0, 0.1]} and src.endswith("ays.json")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ays.json").write_text(json.dumps(
        {"manifest_hash": "abc", "schedules": {"ddim": {"2": {"sigmas": [5.0, 0.5], "density": [1]}}}}))
    table, _ = ays.load_ays(tmp_path / "b", "abc")
    assert ays.ays_for(table, "ddim") == {2: [5.0, 0.5]} and ays.ays_for(table, "euler") is None
    assert ays.load_ays(tmp_path / "b", "other")[0] is None                    # another artifact's: unavailable
    assert "does not exist" in ays.load_ays(tmp_path)[1]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "ays.json").write_text(json.dumps({"3": [1.0, 2.0, 0.1]}))
    with pytest.raises(UserError, match="strictly decreasing"):
        ays.load_ays(tmp_path / "c")


def test_stepdrop_rule_and_ays_choice():
    psnr = np.array([10.0, 15.0, 18.0, 19.5, 20.0])
    assert methods.stepdrop_steps(psnr, 0.0) == 5
    assert methods.stepdrop_steps(psnr, 0.6) == 4
    assert methods.stepdrop_steps(psnr, 2.0) == 3
    assert methods.stepdrop_steps(psnr, 100.0) == 1
    assert ays.nearest_ays_n([5, 10, 20], 10) == 10
    assert ays.nearest_ays_n([5, 10, 20], 15) == 10
    assert ays.nearest_ays_n([5, 10, 20], 3) == 5
    assert ays.nearest_ays_n([], 3) is None


# ------------------------------------------------------------------------------- grid parsing, bad input

def test_parse_grid_defaults_and_overrides():
    q = grid.parse_grid_args("quick")
    assert q.samples_per_setting >= 256 and q.batch == 4 and q.methods == list(grid.METHODS)
    f = grid.parse_grid_args("full")
    assert f.samples_per_setting >= 256 and f.seeds == 10 and len(f.samplers) == 3 and len(f.budgets) == 3
    c = grid.parse_grid_args(budgets="50ms, 1s", samplers=["euler"], quality="0.5", methods="all", seeds=2)
    assert c.budgets == ["50ms", "1s"] and c.samplers == ["euler"] and c.quality == [0.5] and c.seeds == 2
    assert c.name == "quick+custom"


@pytest.mark.parametrize("kwargs, match", [
    (dict(grid="huge"), "grid 'huge'"),
    (dict(methods="uniform,magic"), "method 'magic'"),
    (dict(samplers="heun"), "sampler 'heun'"),
    (dict(budgets=""), "grid is empty"),
    (dict(quality="1.5"), "quality"),
    (dict(quality="abc"), "quality"),
    (dict(budgets="2J"), "latency budgets"),
    (dict(budgets="fast"), "budget 'fast'"),
    (dict(seeds=0), "seeds"),
    (dict(profiles=""), "profiles"),
])
def test_bad_grid_input(kwargs, match):
    with pytest.raises(UserError, match=match):
        grid.parse_grid_args(**kwargs)


def test_missing_and_foreign_profiles(tiny_artifact, tiny_profile, tmp_path):
    from abcd_edge.formats.manifest import manifest_hash

    h = manifest_hash(tiny_artifact)
    with pytest.raises(UserError, match="does not exist"):
        tiers.resolve_tiers([str(tmp_path / "nope.json")], h)
    with pytest.raises(UserError, match="matches no file"):
        tiers.resolve_tiers([str(tmp_path / "*.json")], h)
    with pytest.raises(UserError, match="measured on this machine"):
        tiers.resolve_tiers(["@real"], h, profiles_dir=tmp_path)
    data = json.loads(tiny_profile.read_text())
    data["device_id"] = "jetson-orin-nano-15w-6c-ort-cuda"
    foreign = tmp_path / "jetson.json"
    foreign.write_text(json.dumps(data))
    with pytest.raises(UserError, match="replay:"):
        tiers.resolve_tiers([f"real:{foreign}"], h)
    resolved = tiers.resolve_tiers([str(foreign), str(tiny_profile), f"busy:{tiny_profile}"], h)
    assert [(t.kind, t.simulated) for t in resolved] == [("replay", True), ("real", False), ("busy", False)]
    assert resolved[0].label.endswith("(simulated)")
    # @replay with no foreign profile committed: this machine's 1-thread profile, replayed
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "cpu-1t.json").write_text(tiny_profile.read_text())
    t = tiers.resolve_tiers(["@real", "@replay"], h, profiles_dir=tmp_path / "p")
    assert [x.name for x in t] == ["cpu-1t", "cpu-1t@replay"]


# ------------------------------------------------------------------------------- replay clock, baseline rules

def _write_controller(folder, manifest_hash, ays=None):
    from safetensors.numpy import save_file

    from abcd_edge.formats.controller import SCHEMA_VERSION, Controller, ControllerSpec

    spec = ControllerSpec()
    ctrl = Controller.random_init(spec, seed=1)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in ctrl.weights.items()}, str(folder / "controller.safetensors"))
    meta = dict(schema_version=SCHEMA_VERSION, spec=spec.__dict__, manifest_hash=manifest_hash, artifact="tiny",
                samplers=["ddim"], profiles=[], n_parameters=spec.n_parameters(), created_utc="now", notes={},
                gate={"steps": {"ddim": [5, 10, 20]}, "placements": {"ddim": ["learned", "uniform", "learned"]},
                      "fid": {"ddim": [20.0, 10.0, 8.0]}})
    (folder / "controller.json").write_text(json.dumps(meta))
    if ays is not None:
        (folder / "ays.json").write_text(json.dumps(ays))
    return folder


@pytest.fixture()
def replay_session(tiny_artifact, fixed_profile, tmp_path):
    from abcd_edge.formats.manifest import manifest_hash
    from abcd_edge.core.noise import NoiseSchedule
    from abcd_edge.core.placement import time_uniform_sigmas
    from abcd_edge.formats.manifest import load_manifest

    h = manifest_hash(tiny_artifact)
    sched = NoiseSchedule.from_config(load_manifest(tiny_artifact).scheduler_config)
    # calibration's layout: per sampler, per n
    per_n = {str(n): {"sigmas": [float(s) for s in time_uniform_sigmas(sched, n)]} for n in (5, 10, 20)}
    ays = {"manifest_hash": h, "schedules": {"ddim": per_n}}
    cdir = _write_controller(tmp_path / "ctrl", h, ays)
    spec = grid.parse_grid_args(profiles=f"replay:{fixed_profile}", budgets="20ms", samplers="ddim",
                                 quality="0.6,0.9", seeds=1, samples=2, batch=1, artifact=str(tiny_artifact),
                                 controller=str(cdir), teacher_steps=10)
    tier = tiers.resolve_tiers(spec.tiers, h)[0]
    sess = tiers.open_tier(tier, spec, 1)
    yield sess, spec, tmp_path
    sess.close()


def test_all_methods_share_one_denoiser_session(replay_session):
    sess, _, _ = replay_session
    assert sess.abcd.denoiser is sess.base.denoiser


def test_replay_clock_draws_from_the_profile(replay_session):
    sess, spec, _ = replay_session
    allowed = set(round(v, 5) for v in sess.base.profile.for_batch(1).step.samples_ms)
    clock = sess.clock_for("test")
    assert clock.simulated
    plan = next(p for p in methods.plan_methods(sess, spec, 20.0, "ddim", 1, None) if p.method == "uniform")
    res, _ = methods.run_static(sess.base, clock, plan.sigmas, "ddim", 7, 1, 20.0)
    assert res.measured and all(round(m, 5) in allowed for m in res.measured)
    assert all(1.0 <= m <= 1.2 for m in res.measured)
    # charged time = the draws + real overhead scaled; never less than the draws
    assert res.latency_ms >= sum(res.measured) - 1e-9
    # seeded: the same key draws the same latencies
    res2, _ = methods.run_static(sess.base, sess.clock_for("test"), plan.sigmas, "ddim", 7, 1, 20.0)
    assert res2.measured == res.measured and np.array_equal(res2.images, res.images)


def test_each_baseline_obeys_its_step_rule(replay_session):
    from abcd_edge.runtime.cost import GUARD_SLACK_MS

    sess, spec, _ = replay_session
    bp = sess.base.profile.for_batch(1)
    b = 20.0
    k99 = int((b - bp.finish.p99_ms - GUARD_SLACK_MS) // (bp.step.p99_ms + bp.sampler_ms["ddim"].p99_ms))
    k50 = int((b - bp.finish.p50_ms - GUARD_SLACK_MS) // (bp.step.p50_ms + bp.sampler_ms["ddim"].p50_ms))
    assert k99 == 15 and k50 == 17                      # 1.0-1.2 ms steps, 0.1 ms finishing, 0.01 ms sampler
    assert methods.budget_k(sess, b, 1, "ddim") == (k99, k50)
    assert methods.budget_k(sess, 1e6, 1, "ddim") == (200, 200)      # capped at the rule-based plan's maximum
    thr = {0.6: 0.5, 0.9: 0.05}
    plans = {(p.method, p.rho): p for p in methods.plan_methods(sess, spec, b, "ddim", 1, thr)}
    for m in ("uniform", "karras", "logsnr"):
        assert plans[(m, None)].k == k99 and len(plans[(m, None)].sigmas) == k99
    assert plans[("ays", None)].k == 10 and len(plans[("ays", None)].sigmas) == 10   # largest n <= 15
    for rho in (0.6, 0.9):
        assert len(plans[("buco-mwg", rho)].sigmas) == k50
        assert len(plans[("stepdrop", rho)].sigmas) == k99
    assert len(plans[("oracle", None)].sigmas) == k50
    # executed: static methods take every planned step (no exit), stepdrop stops at its threshold
    clock = sess.clock_for("rule")
    for key in (("uniform", None), ("karras", None), ("ays", None), ("buco-mwg", 0.9)):
        res, _ = methods.run_static(sess.base, clock, plans[key].sigmas, "ddim", 1, 1, b)
        assert res.steps == len(plans[key].sigmas), key
    p = plans[("stepdrop", 0.6)]
    res, _ = methods.run_static(sess.base, clock, p.sigmas, "ddim", 1, 1, b, stop_below=p.stop_below)
    assert res.steps == int(np.sum(p.sigmas >= 0.5)) and res.steps < k99 and res.exit_reason == "stepdrop"
    # the oracle never picks a step that ended after B, and reports a step count within its trajectory
    teacher_x0 = np.zeros((1, 3, 8, 8), np.float32)
    r = methods.execute(sess, plans[("oracle", None)], b, "ddim", 1, 1, sess.clock_for("o"), teacher_x0)
    assert 1 <= r.steps <= k50 and r.planned_steps == k50
    chosen = [int(k) for k in r.note.removeprefix("chosen steps ").split(",")]
    assert len(chosen) == 1 and 1 <= chosen[0] <= k50 and r.steps == chosen[0]
    assert r.exit_reason == ("oracle" if r.deadline_met else "oracle-none-fit")
    assert r.latency_ms <= b or not r.deadline_met
    # abcd: the runtime with the controller (the placement its gate validated for the planned n). Its latency is
    # not asserted: the replay clock charges real time outside the steps (scaled), and a loaded test machine
    # can stall for 10s of ms.
    r = methods.execute(sess, plans[("abcd", 0.9)], b, "ddim", 1, 1, sess.clock_for("a"), None)
    validated = sess.controller.gate.placement("ddim", r.planned_steps)
    assert r.note == ("controller" if validated == "learned" else validated)
    assert 1 <= r.steps <= r.planned_steps and len(r.predicted) == r.steps
    # the request ran on the clock it was given (a fresh stream with the same key draws the same step times),
    # not on the runtime's own clock (whose draws would have moved on)
    again = methods.execute(sess, plans[("abcd", 0.9)], b, "ddim", 1, 1, sess.clock_for("a"), None)
    n = min(len(r.measured), len(again.measured))
    assert n >= 1 and again.measured[:n] == r.measured[:n]


def _reference_static_images(denoiser, rt, sigmas, sampler: str, seed: int, batch: int) -> tuple[np.ndarray, int]:
    """The bench's static loop as it was written before the one step loop, noise draws included."""
    from abcd_edge.core.images import to_uint8
    from abcd_edge.core.samplers import make_sampler

    shape = (batch, rt.manifest.channels, rt.manifest.resolution, rt.manifest.resolution)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(shape).astype(np.float32)
    smp = make_sampler(sampler, rt.schedule, np.asarray(sigmas), rt.manifest.prediction_type)
    x, x0 = smp.prepare(noise), np.zeros(shape, np.float32)
    for i in range(len(smp)):
        sample, t = smp.model_input(x, i)
        out = denoiser(sample, t)
        step_noise = rng.standard_normal(shape).astype(np.float32) if smp.stochastic else None
        x, x0 = smp.step(x, i, out, noise=step_noise)
    return to_uint8(np.asarray(x0, np.float32)), len(smp)


@pytest.mark.parametrize("sampler", ["ddim", "consistency"])
def test_static_methods_draw_their_noise_as_before(replay_session, sampler):
    """Through the one step loop, a static method gives the very images the bench's own loop gave (same
    initial noise, same per-step noise for a stochastic sampler), so results.csv rows are unchanged."""
    from abcd_edge.core.images import to_uint8
    from abcd_edge.core.placement import karras_sigmas

    sess, _, _ = replay_session
    sigmas = karras_sigmas(sess.base.schedule, 6)
    want, steps = _reference_static_images(sess.base.denoiser, sess.base, sigmas, sampler, 11, 2)
    res, hist = methods.run_static(sess.base, sess.clock_for("n"), sigmas, sampler, 11, 2, 20.0, keep_history=True)
    assert np.array_equal(res.images, want) and res.steps == steps == len(hist) and res.exit_reason == "done"
    assert np.array_equal(to_uint8(hist[-1][1]), res.images)             # the image is the last x0
    assert [h[0] for h in hist] == sorted(h[0] for h in hist)          # clock read after each step


def test_teacher_is_the_many_step_ddim_from_the_request_noise(replay_session):
    from abcd_edge.core.images import to_uint8
    from abcd_edge.core.placement import time_uniform_sigmas

    sess, _, tmp = replay_session
    m = sess.base.manifest
    cache = teacher.TeacherCache(tmp / "teacher", sess.base.manifest_hash, 10, lambda: sess.rollouts)
    got = cache.get([5, 6], 2, (m.channels, m.resolution, m.resolution))
    want, _ = _reference_static_images(sess.base.denoiser, sess.base, time_uniform_sigmas(sess.base.schedule, 10),
                                       "ddim", 5, 2)

    assert got[5].shape == (2, m.channels, m.resolution, m.resolution) and np.array_equal(to_uint8(got[5]), want)
    assert not np.array_equal(got[5], got[6])
    assert sorted(p.name for p in (tmp / "teacher").glob("*.npy")) == \
        sorted(f"{sess.base.manifest_hash[:12]}_10_2_{s}.npy" for s in (5, 6))
    # cached: a fresh cache reads the same arrays back from disk, opening nothing
    again = teacher.TeacherCache(tmp / "teacher", sess.base.manifest_hash, 10, lambda: pytest.fail("opened"))
    assert np.array_equal(again.get([5], 2, (m.channels, m.resolution, m.resolution))[5], got[5])


def test_stepdrop_tuning_is_monotone_in_rho(replay_session):
    sess, spec, tmp = replay_session
    cache = teacher.TeacherCache(tmp / "teacher", sess.base.manifest_hash, 10, lambda: sess.rollouts)
    thr, info = methods.tune_stepdrop(sess, spec, cache, 20.0, "ddim", 1)
    assert info["K"] == 15 and len(info["psnr_by_step"]) == 15
    assert info["0.9"]["steps"] >= info["0.6"]["steps"]          # asking for more quality drops fewer steps
    assert thr[0.9] <= thr[0.6]


def test_unavailable_methods_without_controller(tiny_artifact, fixed_profile):
    from abcd_edge.formats.manifest import manifest_hash

    spec = grid.parse_grid_args(profiles=f"replay:{fixed_profile}", budgets="20ms", samplers="ddim", quality="0.9",
                                 seeds=1, samples=1, batch=1, artifact=str(tiny_artifact), controller="none")
    tier = tiers.resolve_tiers(spec.tiers, manifest_hash(tiny_artifact))[0]
    sess = tiers.open_tier(tier, spec, 1)
    try:
        plans = {p.method: p for p in methods.plan_methods(sess, spec, 20.0, "ddim", 1, None)}
    finally:
        sess.close()
    assert plans["ays"].status == "unavailable" and plans["buco-mwg"].status == "unavailable"
    assert plans["abcd"].status == "ok" and "rule-based" in plans["abcd"].detail


# ------------------------------------------------------------------------------- micro grid end to end

def _fake_quality():
    def feats(images):
        x = images.astype(np.float64) / 255.0
        return np.concatenate([x.mean((1, 2)), x.std((1, 2))], 1)

    mu, sigma = np.full(6, 0.5), np.eye(6) * 0.01
    return metrics.Quality(feats, lambda f: frechet_distance(*mean_cov(f), mu, sigma), "fake")


def test_micro_grid_end_to_end_and_resume(tiny_artifact, tiny_profile, tmp_path):
    spec = grid.parse_grid_args(profiles=str(tiny_profile), budgets="0.01ms,2s", samplers="ddim", quality="0.9",
                                 methods="uniform,abcd", seeds=2, samples=6, batch=1, artifact=str(tiny_artifact),
                                 controller="none", teacher_steps=10)
    out = tmp_path / "micro"
    q = _fake_quality()
    runner.run_grid(spec, out, quality=q, progress=False, log=lambda s: None)
    summary.summarize(out, quality=q)
    rows = list(csv.DictReader(open(out / "results.csv")))
    served = [r for r in rows if r["status"] == "ok"]
    # 2 s: 2 methods x 2 seeds x 3 requests; 0.01 ms: infeasible, reported (not dropped)
    assert len(served) == 12
    assert {r["method"] for r in served} == {"uniform", "abcd"}
    assert {r["rho"] for r in served if r["method"] == "uniform"} == {"all"}
    infeasible = [r for r in rows if r["status"] == "infeasible"]
    assert {r["method"] for r in infeasible} == {"uniform", "abcd"} and all(r["budget"] == "0.01ms" for r in infeasible)
    for r in served:
        assert r["tier_kind"] == "real" and r["simulated"] == "False"
        assert float(r["latency_ms"]) > 0 and int(float(r["steps"])) >= 1
        assert math.isclose(float(r["utilisation"]), float(r["latency_ms"]) / 2000, rel_tol=1e-3)
        assert r["teacher_psnr"] != ""
    summary_md = (out / "summary.md").read_text()
    for text in ("Success rate", "Feature-FID", "Latency utilisation", "Wins", "infeasible", "Cost-predictor",
                 "rule-based"):
        assert text in summary_md, text
    meta = json.loads((out / "bench.json").read_text())
    assert meta["grid"]["budgets"] == ["0.01ms", "2s"] and meta["machine"]["cpu_model"]
    assert meta["samples_per_setting"] == 6
    cells = json.loads((out / "summary.json").read_text())["cells"]
    ab = next(c for c in cells if c["method"] == "abcd" and c["budget"] == "2s")
    assert ab["n_images"] == 6 and ab["fid"] is not None and 0 <= ab["success"] <= 1
    for png in ("success_vs_budget_ddim.png", "utilisation.png"):
        assert (out / png).stat().st_size > 1000

    assert all(r["time_utc"].startswith("20") for r in rows)
    # resume: nothing left to do -> no new rows
    runner.run_grid(spec, out, quality=q, progress=False, log=lambda s: None)
    assert len(list(csv.DictReader(open(out / "results.csv")))) == len(rows)
    # a crash mid-block (its block-end row missing): only that block is redone, and a stale features file of
    # that block (e.g. of a method that is now refused) does not survive the redo
    kept = rows[:-1]
    assert rows[-1]["status"] == "block-end"
    n_feat = len(list((out / "features").glob("*.npz")))
    stale = out / "features" / f"{rows[-1]['tier']}_{rows[-1]['budget']}_ddim_{rows[-1]['seed']}__oracle_all.npz"
    stale.write_bytes(b"stale")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(store.CSV_FIELDS))
        w.writeheader()
        w.writerows(kept)
    runner.run_grid(spec, out, quality=q, progress=False, log=lambda s: None)
    assert not stale.exists() and len(list((out / "features").glob("*.npz"))) == n_feat
    again = list(csv.DictReader(open(out / "results.csv")))
    assert len(again) == len(rows)
    blk = (rows[-1]["tier"], rows[-1]["budget"], rows[-1]["seed"])
    assert [r["latency_ms"] for r in again if (r["tier"], r["budget"], r["seed"]) != blk] == \
        [r["latency_ms"] for r in rows if (r["tier"], r["budget"], r["seed"]) != blk]
    # another configuration into the same folder is refused, not mixed
    other = grid.parse_grid_args(profiles=str(tiny_profile), budgets="70ms", samplers="ddim", quality="0.9",
                                  methods="uniform", seeds=1, samples=1, batch=1, artifact=str(tiny_artifact),
                                  controller="none", teacher_steps=10)
    with pytest.raises(UserError, match="another configuration"):
        runner.run_grid(other, out, quality=q, progress=False, log=lambda s: None)


def test_bench_main_bad_input(tiny_artifact, tmp_path):
    with pytest.raises(UserError, match="no manifest"):
        runner.bench_main(out=tmp_path / "o", artifact=str(tmp_path / "none"), profiles="x.json", progress=False)
    with pytest.raises(UserError, match="batch"):
        runner.bench_main(out=tmp_path / "o", artifact=str(tiny_artifact), profiles="x.json", batch=64,
                         progress=False)


def test_click_command_help():
    from click.testing import CliRunner

    from abcd_edge.cli import bench as bench_cli

    from abcd_edge.cli.main import main

    res = CliRunner().invoke(bench_cli.bench_command, ["--help"])
    assert res.exit_code == 0 and "--grid" in res.output and "--resume" in res.output
    res = CliRunner().invoke(bench_cli.bench_command, ["--methods", "nope"])
    assert isinstance(res.exception, UserError)
    # the three verbs are registered on `abcd-edge`, with the shared device options where they fit
    for verb, flags in (("bench", ("--grid", "--profiles")),
                        ("bench-runtime", ("--budgets", "--requests", "--loads", "--artifact", "--backend",
                                           "--threads")),
                        ("bench-schedules", ("--out", "--steps", "--samples", "--artifact", "--threads"))):
        res = CliRunner().invoke(main, [verb, "--help"])
        assert res.exit_code == 0 and all(f in res.output for f in flags), (verb, res.output)
    res = CliRunner().invoke(main, ["bench", "--methods", "nope"])
    assert res.exit_code == 2 and "method 'nope'" in res.output
    res = CliRunner().invoke(main, ["bench-runtime", "--loads", "noisy", "--out", "/nonexistent/x"])
    assert res.exit_code == 2 and "--loads" in res.output
    res = CliRunner().invoke(main, ["bench-runtime", "--requests", "ten", "--out", "/nonexistent/x"])
    assert res.exit_code == 2 and "--requests" in res.output


def test_runtime_bench_end_to_end(tiny_artifact, tiny_profile, tmp_path):
    from abcd_edge.bench import runtime_bench
    from abcd_edge.formats.profile import load_profile

    lines: list[str] = []
    result = runtime_bench.run_runtime_bench(tmp_path, tiny_artifact, ["30ms", "0.01ms"], [6], threads=1,
                                             profile=tiny_profile, loads=["quiet"], command="pytest",
                                             echo=lines.append, progress=False)
    ok, refused = result["rows"]
    bp = load_profile(tiny_profile).for_batch(1)
    assert ok["requests"] == 6 and ok["load"] == "quiet" and 0.0 <= ok["success_rate"] <= 1.0
    assert ok["profile_limit_steps"] == math.floor((30 - bp.finish.p50_ms) / bp.step.p50_ms)
    assert ok["physical_limit_steps"] >= 1 and ok["steps_mean"] >= 1 and ok["loop_overhead_median"] is not None
    assert sum(ok["exit_reasons"].values()) == 6
    assert "refused" in refused and "0.01ms" in refused["refused"] and refused["budget"] == "0.01ms"
    assert json.loads((tmp_path / "runtime_bench.json").read_text())["command"] == "pytest"
    table = (tmp_path / "runtime_bench.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| quiet | 30ms | 6 |") and "refused" in table[3]
    assert len(lines) == 3 and json.loads(lines[0])["budget"] == "30ms"


def test_bare_loop_runs_the_steps_of_the_request(tiny_artifact, fixed_profile):
    """The runtime bench's bare loop: exactly the steps the request took, on its sigmas and its noise."""
    from abcd_edge.bench.runtime_bench import bare_loop_ms
    from abcd_edge.core.budget import parse_budget
    from abcd_edge.device.backends import open_denoiser
    from abcd_edge.formats.manifest import load_manifest
    from abcd_edge.formats.profile import load_profile
    from abcd_edge.runtime.session import AnytimeRuntime

    class Counting:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __call__(self, sample, t):
            self.calls += 1
            return self.inner(sample, t)

        def abandon(self):
            self.inner.abandon()

    den = Counting(open_denoiser(tiny_artifact, threads=1))
    with AnytimeRuntime(den, load_manifest(tiny_artifact), load_profile(fixed_profile), warm_up=False) as rt:
        _, rep = rt.generate(parse_budget("20ms"), rho=1.0, best_effort=True)
        den.calls = 0
        assert bare_loop_ms(rt, rep, "ddim") > 0
    assert rep.steps >= 1 and den.calls == rep.steps
