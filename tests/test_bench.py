"""The benchmark harness: metric functions on known inputs, the replay clock, each baseline's step rule,
bad input, and a micro grid end to end (tiny artifact, fake quality backend) with resume."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from abcd_edge.bench import legacy as bench
from abcd_edge.errors import UserError
from abcd_edge.quality import feature_fid, frechet_distance, mean_cov


# ------------------------------------------------------------------------------- metric functions

def test_success_rate_and_pooled():
    assert bench.success_rate([True, False, True, True]) == 0.75
    assert bench.success_rate([]) is None
    assert bench.pooled_success([(3, 4), (1, 4)]) == 0.5
    assert bench.pooled_success([(0, 0)]) is None


def test_bootstrap_ci_known_inputs():
    # identical seeds: no spread
    assert bench.bootstrap_ci([(2, 4)] * 5, bench.pooled_success) == (0.5, 0.5)
    # one seed all met, one all missed: resamples give 0, 0.5 or 1 -> the 95 % interval spans [0, 1]
    lo, hi = bench.bootstrap_ci([(4, 4), (0, 4)], bench.pooled_success, n_boot=2000)
    assert lo == 0.0 and hi == 1.0
    # many seeds around 0.9: the interval holds the point estimate and is narrow
    groups = [(9, 10)] * 15 + [(10, 10)] * 5
    lo, hi = bench.bootstrap_ci(groups, bench.pooled_success)
    point = bench.pooled_success(groups)
    assert lo <= point <= hi and hi - lo < 0.05 and lo > 0.9


def test_fid_identical_sets_is_zero_and_shift_is_known():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 6))
    assert feature_fid(a, a) == pytest.approx(0.0, abs=1e-8)
    # a pure shift by d: FID = |d|^2
    d = np.array([1.0, -2.0, 0, 0, 0, 0.5])
    assert feature_fid(a, a + d) == pytest.approx(float(d @ d), rel=1e-6)
    mu, cov = mean_cov(a)
    assert bench._fid_pool(lambda f: frechet_distance(*mean_cov(f), mu, cov), [a[:200], a[200:]]) == \
        pytest.approx(0.0, abs=1e-8)
    assert bench._fid_pool(lambda f: 0.0, [a[:1]]) is None          # fewer than 2 images: no FID


def test_cost_predictor_error():
    mape, cov = bench.cost_predictor_error([2, 2, 2], [1, 2, 4])
    assert mape == pytest.approx((1 + 0 + 0.5) / 3)
    assert cov == pytest.approx(2 / 3)
    assert bench.cost_predictor_error([], []) == (None, None)


def test_oracle_pick():
    lat = [10, 20, 30, 40]
    mse = np.array([[5.0, 5.0], [3.0, 1.0], [2.0, 4.0], [0.1, 0.1]])   # step 3 best, but late
    pick, fits = bench.oracle_pick(lat, mse, budget_ms=30)
    assert fits and pick.tolist() == [2, 1]
    pick, fits = bench.oracle_pick(lat, mse, budget_ms=5)
    assert not fits and pick.tolist() == [0, 0]


def test_ays_table_layouts(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ays.json").write_text(json.dumps({"3": [10.0, 1.0, 0.1]}))
    table, src = bench.load_ays(tmp_path / "a")
    assert bench.ays_for(table, "euler") == {3: [10.0, 1.0, 0.1]} and src.endswith("ays.json")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "ays.json").write_text(json.dumps(
        {"manifest_hash": "abc", "schedules": {"ddim": {"2": {"sigmas": [5.0, 0.5], "density": [1]}}}}))
    table, _ = bench.load_ays(tmp_path / "b", "abc")
    assert bench.ays_for(table, "ddim") == {2: [5.0, 0.5]} and bench.ays_for(table, "euler") is None
    assert bench.load_ays(tmp_path / "b", "other")[0] is None                    # another artifact's: unavailable
    assert "does not exist" in bench.load_ays(tmp_path)[1]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "ays.json").write_text(json.dumps({"3": [1.0, 2.0, 0.1]}))
    with pytest.raises(UserError, match="strictly decreasing"):
        bench.load_ays(tmp_path / "c")


def test_stepdrop_rule_and_ays_choice():
    psnr = np.array([10.0, 15.0, 18.0, 19.5, 20.0])
    assert bench.stepdrop_steps(psnr, 0.0) == 5
    assert bench.stepdrop_steps(psnr, 0.6) == 4
    assert bench.stepdrop_steps(psnr, 2.0) == 3
    assert bench.stepdrop_steps(psnr, 100.0) == 1
    assert bench.nearest_ays_n([5, 10, 20], 10) == 10
    assert bench.nearest_ays_n([5, 10, 20], 15) == 10
    assert bench.nearest_ays_n([5, 10, 20], 3) == 5
    assert bench.nearest_ays_n([], 3) is None


# ------------------------------------------------------------------------------- grid parsing, bad input

def test_parse_grid_defaults_and_overrides():
    q = bench.parse_grid_args("quick")
    assert q.samples_per_setting >= 256 and q.batch == 4 and q.methods == list(bench.METHODS)
    f = bench.parse_grid_args("full")
    assert f.samples_per_setting >= 256 and f.seeds == 10 and len(f.samplers) == 3 and len(f.budgets) == 3
    c = bench.parse_grid_args(budgets="50ms, 1s", samplers=["euler"], quality="0.5", methods="all", seeds=2)
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
        bench.parse_grid_args(**kwargs)


def test_missing_and_foreign_profiles(tiny_artifact, tiny_profile, tmp_path):
    from abcd_edge.formats.manifest import manifest_hash

    h = manifest_hash(tiny_artifact)
    with pytest.raises(UserError, match="does not exist"):
        bench.resolve_tiers([str(tmp_path / "nope.json")], h)
    with pytest.raises(UserError, match="matches no file"):
        bench.resolve_tiers([str(tmp_path / "*.json")], h)
    with pytest.raises(UserError, match="measured on this machine"):
        bench.resolve_tiers(["@real"], h, profiles_dir=tmp_path)
    data = json.loads(tiny_profile.read_text())
    data["device_id"] = "jetson-orin-nano-15w-6c-ort-cuda"
    foreign = tmp_path / "jetson.json"
    foreign.write_text(json.dumps(data))
    with pytest.raises(UserError, match="replay:"):
        bench.resolve_tiers([f"real:{foreign}"], h)
    tiers = bench.resolve_tiers([str(foreign), str(tiny_profile), f"busy:{tiny_profile}"], h)
    assert [(t.kind, t.simulated) for t in tiers] == [("replay", True), ("real", False), ("busy", False)]
    assert tiers[0].label.endswith("(simulated)")
    # @replay with no foreign profile committed: this machine's 1-thread profile, replayed
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "cpu-1t.json").write_text(tiny_profile.read_text())
    t = bench.resolve_tiers(["@real", "@replay"], h, profiles_dir=tmp_path / "p")
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
                samplers=["ddim"], profiles=[], n_parameters=spec.n_parameters(), created_utc="now", notes={})
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
    spec = bench.parse_grid_args(profiles=f"replay:{fixed_profile}", budgets="20ms", samplers="ddim",
                                 quality="0.6,0.9", seeds=1, samples=2, batch=1, artifact=str(tiny_artifact),
                                 controller=str(cdir), teacher_steps=10)
    tier = bench.resolve_tiers(spec.tiers, h)[0]
    sess = bench.open_tier(tier, spec, 1)
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
    plan = next(p for p in bench.plan_methods(sess, spec, 20.0, "ddim", 1, None) if p.method == "uniform")
    res, _ = bench.run_static(sess.base, clock, plan.sigmas, "ddim", 7, 1, 20.0)
    assert res.measured and all(round(m, 5) in allowed for m in res.measured)
    assert all(1.0 <= m <= 1.2 for m in res.measured)
    # charged time = the draws + real overhead scaled; never less than the draws
    assert res.latency_ms >= sum(res.measured) - 1e-9
    # seeded: the same key draws the same latencies
    res2, _ = bench.run_static(sess.base, sess.clock_for("test"), plan.sigmas, "ddim", 7, 1, 20.0)
    assert res2.measured == res.measured and np.array_equal(res2.images, res.images)


def test_each_baseline_obeys_its_step_rule(replay_session):
    from abcd_edge.runtime.cost import GUARD_SLACK_MS

    sess, spec, _ = replay_session
    bp = sess.base.profile.for_batch(1)
    b = 20.0
    k99 = int((b - bp.finish.p99_ms - GUARD_SLACK_MS) // (bp.step.p99_ms + bp.sampler_ms["ddim"].p99_ms))
    k50 = int((b - bp.finish.p50_ms - GUARD_SLACK_MS) // (bp.step.p50_ms + bp.sampler_ms["ddim"].p50_ms))
    assert k99 == 15 and k50 == 17                      # 1.0-1.2 ms steps, 0.1 ms finishing, 0.01 ms sampler
    thr = {0.6: 0.5, 0.9: 0.05}
    plans = {(p.method, p.rho): p for p in bench.plan_methods(sess, spec, b, "ddim", 1, thr)}
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
        res, _ = bench.run_static(sess.base, clock, plans[key].sigmas, "ddim", 1, 1, b)
        assert res.steps == len(plans[key].sigmas), key
    p = plans[("stepdrop", 0.6)]
    res, _ = bench.run_static(sess.base, clock, p.sigmas, "ddim", 1, 1, b, stop_below=p.stop_below)
    assert res.steps == int(np.sum(p.sigmas >= 0.5)) and res.steps < k99 and res.exit_reason == "stepdrop"
    # the oracle never picks a step that ended after B, and reports a step count within its trajectory
    from abcd_edge.core.images import to_uint8  # noqa: F401  (the oracle's finishing)
    teacher = np.zeros((1, 3, 8, 8), np.float32)
    r = bench._execute(sess, plans[("oracle", None)], spec, b, "20ms", "ddim", 1, 1, sess.clock_for("o"), teacher)
    assert 1 <= r.steps <= k50 and r.planned_steps == k50
    assert r.latency_ms <= b or not r.deadline_met
    # abcd: the runtime with the controller (schedule "controller"). Its latency is not asserted: the replay
    # clock charges real time outside the steps (scaled), and a loaded test machine can stall for 10s of ms.
    r = bench._execute(sess, plans[("abcd", 0.9)], spec, b, "20ms", "ddim", 1, 1, sess.clock_for("a"), None)
    assert r.note == "controller" and 1 <= r.steps <= r.planned_steps and len(r.predicted) == r.steps


def test_stepdrop_tuning_is_monotone_in_rho(replay_session):
    sess, spec, tmp = replay_session
    teacher = bench.TeacherCache(tmp / "teacher", sess.base.artifact_dir, sess.base.manifest_hash, 10, threads=1)
    thr, info = bench.tune_stepdrop(sess, spec, teacher, 20.0, "ddim", 1)
    assert info["K"] == 15 and len(info["psnr_by_step"]) == 15
    assert info["0.9"]["steps"] >= info["0.6"]["steps"]          # asking for more quality drops fewer steps
    assert thr[0.9] <= thr[0.6]


def test_unavailable_methods_without_controller(tiny_artifact, fixed_profile):
    from abcd_edge.formats.manifest import manifest_hash

    spec = bench.parse_grid_args(profiles=f"replay:{fixed_profile}", budgets="20ms", samplers="ddim", quality="0.9",
                                 seeds=1, samples=1, batch=1, artifact=str(tiny_artifact), controller="none")
    tier = bench.resolve_tiers(spec.tiers, manifest_hash(tiny_artifact))[0]
    sess = bench.open_tier(tier, spec, 1)
    try:
        plans = {p.method: p for p in bench.plan_methods(sess, spec, 20.0, "ddim", 1, None)}
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
    return bench.Quality(feats, lambda f: frechet_distance(*mean_cov(f), mu, sigma), "fake")


def test_micro_grid_end_to_end_and_resume(tiny_artifact, tiny_profile, tmp_path):
    spec = bench.parse_grid_args(profiles=str(tiny_profile), budgets="0.01ms,2s", samplers="ddim", quality="0.9",
                                 methods="uniform,abcd", seeds=2, samples=6, batch=1, artifact=str(tiny_artifact),
                                 controller="none", teacher_steps=10)
    out = tmp_path / "micro"
    q = _fake_quality()
    bench.run_grid(spec, out, quality=q, progress=False, log=lambda s: None)
    bench.summarize(out, quality=q)
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
    summary = (out / "summary.md").read_text()
    for text in ("Success rate", "Feature-FID", "Latency utilisation", "Wins", "infeasible", "Cost-predictor",
                 "rule-based"):
        assert text in summary, text
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
    bench.run_grid(spec, out, quality=q, progress=False, log=lambda s: None)
    assert len(list(csv.DictReader(open(out / "results.csv")))) == len(rows)
    # a crash mid-block (its block-end row missing): only that block is redone, and a stale features file of
    # that block (e.g. of a method that is now refused) does not survive the redo
    kept = rows[:-1]
    assert rows[-1]["status"] == "block-end"
    n_feat = len(list((out / "features").glob("*.npz")))
    stale = out / "features" / f"{rows[-1]['tier']}_{rows[-1]['budget']}_ddim_{rows[-1]['seed']}__oracle_all.npz"
    stale.write_bytes(b"stale")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(bench.CSV_FIELDS))
        w.writeheader()
        w.writerows(kept)
    bench.run_grid(spec, out, quality=q, progress=False, log=lambda s: None)
    assert not stale.exists() and len(list((out / "features").glob("*.npz"))) == n_feat
    again = list(csv.DictReader(open(out / "results.csv")))
    assert len(again) == len(rows)
    blk = (rows[-1]["tier"], rows[-1]["budget"], rows[-1]["seed"])
    assert [r["latency_ms"] for r in again if (r["tier"], r["budget"], r["seed"]) != blk] == \
        [r["latency_ms"] for r in rows if (r["tier"], r["budget"], r["seed"]) != blk]
    # another configuration into the same folder is refused, not mixed
    other = bench.parse_grid_args(profiles=str(tiny_profile), budgets="70ms", samplers="ddim", quality="0.9",
                                  methods="uniform", seeds=1, samples=1, batch=1, artifact=str(tiny_artifact),
                                  controller="none", teacher_steps=10)
    with pytest.raises(UserError, match="another configuration"):
        bench.run_grid(other, out, quality=q, progress=False, log=lambda s: None)


def test_bench_main_bad_input(tiny_artifact, tmp_path):
    with pytest.raises(UserError, match="no manifest"):
        bench.bench_main(out=tmp_path / "o", artifact=str(tmp_path / "none"), profiles="x.json", progress=False)
    with pytest.raises(UserError, match="batch"):
        bench.bench_main(out=tmp_path / "o", artifact=str(tiny_artifact), profiles="x.json", batch=64,
                         progress=False)


def test_click_command_help():
    from click.testing import CliRunner

    res = CliRunner().invoke(bench.bench_command, ["--help"])
    assert res.exit_code == 0 and "--grid" in res.output and "--resume" in res.output
    res = CliRunner().invoke(bench.bench_command, ["--methods", "nope"])
    assert isinstance(res.exception, UserError)
