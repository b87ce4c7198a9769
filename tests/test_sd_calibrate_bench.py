"""Issue 15, offline side: `calibrate` and `bench` on text-to-image pipeline artifacts (tiny SD / LCM from
tests/sd_fixtures.py, random weights) through the CLI, what they see equal to what the runtime makes, the
controller used only at the guidance it was calibrated at, and one-line refusals.

Random weights make every schedule's images about equally far from the shapes data, so these tests check
the machinery (what runs, what is written, what each method's request contains), not which schedule wins."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from abcd_edge import paths
from abcd_edge.cli.main import main
from tests.conftest import one_line_error, snapshot

PROMPTS = ["a photo of a cat", "a red car on mars", "the dog", "an astronaut riding a horse",
           "a photo of the red dog", "a cat on a horse"]
QUICK = ["--search-noises", 8, "--gate-noises", 16, "--iters", 30, "--cost-iters", 30, "--threads", 1]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> Path:
    """Copies of the shipped feature nets with reference statistics for 16 px images (the tiny pipelines'),
    made as a user would: `python -m abcd_edge.demo.reference --resolution 16`."""
    root = tmp_path_factory.mktemp("nets")
    for name, src, seed in (("featurenet", paths.FEATURENET_DIR, paths.CALIBRATION_REF_SEED),
                            ("evalnet", paths.EVALNET_DIR, paths.EVAL_REF_SEED)):
        shutil.copytree(src, root / name)
        subprocess.run([sys.executable, "-m", "abcd_edge.demo.reference", "--seed", str(seed), "--n",
                        str(paths.REF_N), "--resolution", "16", "--featurenet", str(root / name)], check=True,
                       capture_output=True)
        assert (root / name / f"reference_{seed}_{paths.REF_N}_r16.npz").is_file()
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return root


def _profile(artifact: Path, out: Path) -> Path:
    res = cli("profile", "--artifact", artifact, "--threads", 1, "--runs", 40, "--power", "none", "--out", out)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def sd_setup(tiny_sd_artifact, nets, tmp_path_factory):
    """The tiny SD artifact, its profile and a quick calibration of it (DDIM, 2/3/5 steps), via the CLI."""
    tmp = tmp_path_factory.mktemp("sd-cal")
    prof = _profile(tiny_sd_artifact, tmp / "sd.json")
    res = cli("calibrate", "--artifact", tiny_sd_artifact, "--profile", prof, "--prompts", nets / "prompts.txt",
              "--steps", "2,3,5", *QUICK, "--calibration-net", nets / "featurenet", "--evaluation-net",
              nets / "evalnet", "--out", tmp / "cal")
    assert res.exit_code == 0, res.output
    return tiny_sd_artifact, prof, tmp / "cal"


# ------------------------------------------------------------------------------------ calibrate
def test_calibrate_a_pipeline_writes_a_controller_for_its_guidance(sd_setup, nets):
    art, prof, cal = sd_setup
    meta = json.loads((cal / "controller.json").read_text())
    assert meta["conditions"]["guidance"] == 7.5 and meta["conditions"]["decoder"] == "vae"
    assert meta["samplers"] == ["ddim"]                 # the pipeline's own scheduler (DDIMScheduler)
    report = json.loads((cal / "report.json").read_text())
    for n in ("2", "3", "5"):
        row = report["gate"]["ddim"][n]
        # the model's own diffusers timesteps are a static schedule the generator must beat
        assert {"learned", "searched", "uniform", "karras", "logsnr", "diffusers"} <= set(row)
        assert row["decision"] in ("learned", "uniform", "karras", "logsnr", "diffusers")
        assert all(np.isfinite(row[k]["fid"]) for k in ("learned", "diffusers"))
    assert "the model's own (diffusers)" in (cal / "gate.md").read_text()


def test_calibration_rollouts_make_what_the_runtime_makes(sd_setup):
    """The images calibration scores (Rollouts: its own loop over the guided UNet, one prompt per row, VAE
    decode) equal the runtime's request parts' (the bench's static path, which runs the session's encode /
    guided denoiser / decode) for the same noise, prompt and schedule."""
    from abcd_edge.bench.methods import run_static
    from abcd_edge.core.placement import time_uniform_sigmas
    from abcd_edge.device.clock import WallClock
    from abcd_edge.runtime.rollout import Rollouts
    from abcd_edge.runtime.session import AnytimeRuntime

    art, prof, _ = sd_setup
    with AnytimeRuntime.open(art, profile=prof, controller=None, threads=1, power="none") as rt:
        sigmas = time_uniform_sigmas(rt.schedule, 4)
        ro = Rollouts(rt.manifest, rt.schedule, rt.denoiser, rt.pipeline)
        shape = (rt.manifest.channels, rt.manifest.resolution, rt.manifest.resolution)
        for seed, prompt in ((3, PROMPTS[0]), (4, PROMPTS[3])):
            res, _ = run_static(rt, WallClock(), sigmas, "ddim", seed, 1, 1e9, req=rt.pipeline_request(prompt=prompt))
            noise = np.random.default_rng(seed).standard_normal((1, *shape)).astype(np.float32)
            mine = ro.images(ro.x0("ddim", sigmas, noise, ro.denoiser([prompt])))
            assert np.abs(mine.astype(int) - res.images.astype(int)).max() <= 1
        # rows of one batch each get their own prompt: the same as one call per prompt
        noise = np.random.default_rng(9).standard_normal((2, *shape)).astype(np.float32)
        both = ro.x0("ddim", sigmas, noise, ro.denoiser(PROMPTS[:2]))
        one = np.concatenate([ro.x0("ddim", sigmas, noise[i:i + 1], ro.denoiser([PROMPTS[i]])) for i in range(2)])
        np.testing.assert_allclose(both, one, atol=1e-4)


def test_run_uses_the_controller_only_at_its_guidance(sd_setup, tmp_path):
    art, prof, cal = sd_setup
    common = ["run", "--artifact", art, "--profile", prof, "--controller", cal, "--threads", 1, "--budget", "400ms",
              "--prompt", PROMPTS[0]]
    res = cli(*common, "--out", tmp_path / "a.png", "--report", tmp_path / "a.json")
    assert res.exit_code == 0, res.output
    a = json.loads((tmp_path / "a.json").read_text())
    assert not any("calibrated at guidance" in n for n in a["notes"])
    assert a["controller"] == str(cal)                  # planned with the controller
    res = cli(*common, "--guidance", 3, "--out", tmp_path / "b.png", "--report", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    b = json.loads((tmp_path / "b.json").read_text())
    assert any("calibrated at guidance 7.5; guidance 3.0 is planned without it" in n for n in b["notes"])
    assert b["schedule"] == "diffusers" and b["controller"] is None


def test_calibrate_the_lcm_pipeline(tiny_lcm_artifact, nets, tmp_path):
    prof = _profile(tiny_lcm_artifact, tmp_path / "lcm.json")
    res = cli("calibrate", "--artifact", tiny_lcm_artifact, "--profile", prof, "--prompts", nets / "prompts.txt",
              "--steps", "1,2,4", *QUICK, "--calibration-net", nets / "featurenet", "--evaluation-net",
              nets / "evalnet", "--out", tmp_path / "cal")
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "cal" / "controller.json").read_text())
    assert meta["samplers"] == ["lcm"] and meta["gate"]["steps"]["lcm"] == [1, 2, 4]
    res = cli("run", "--artifact", tiny_lcm_artifact, "--profile", prof, "--controller", tmp_path / "cal",
              "--threads", 1, "--budget", "300ms", "--prompt", PROMPTS[1],
              "--out", tmp_path / "o.png", "--report", tmp_path / "o.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "o.json").read_text())
    assert rep["sampler"] == "lcm" and rep["steps"] <= 8 and rep["controller"] == str(tmp_path / "cal")


def test_a_prompt_without_artifact_goes_to_the_latent_demo(tiny_lcm_artifact, tmp_path, monkeypatch):
    """`run --prompt` alone answers with the text-to-image demo (make run); without a prompt, the pixel demo."""
    prof = _profile(tiny_lcm_artifact, tmp_path / "lcm.json")
    monkeypatch.setattr(paths, "DEMO_LATENT_ARTIFACT_DIR", tiny_lcm_artifact)
    res = cli("run", "--profile", prof, "--threads", 1, "--budget", "300ms", "--prompt", PROMPTS[1],
              "--out", tmp_path / "o.png", "--report", tmp_path / "o.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "o.json").read_text())
    assert rep["artifact"] == str(tiny_lcm_artifact) and rep["sampler"] == "lcm"
    res = cli("run", "--artifact", paths.DEMO_ARTIFACT_DIR, "--profile", prof, "--budget", "300ms", "--prompt", "x",
              "--out", tmp_path / "p.png", "--report", tmp_path / "p.json")
    one_line_error(res, "pixel-space")                                 # an explicit --artifact is kept


# ------------------------------------------------------------------------------------ bench
def test_bench_a_pipeline_through_the_cli(sd_setup, nets, tmp_path):
    art, prof, cal = sd_setup
    out = tmp_path / "bench"
    res = cli("bench", "--artifact", art, "--profiles", f"real:{prof}", "--budgets", "40ms,200ms", "--samplers",
              "ddim", "--quality", "0.6,1.0", "--seeds", 2, "--samples", 6, "--batch", 1, "--teacher-steps", 20,
              "--prompts", nets / "prompts.txt", "--controller", cal, "--evaluation-net", nets / "evalnet",
              "--out", out)
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "results.csv")))
    ok = [r for r in rows if r["status"] == "ok"]
    methods = {r["method"] for r in ok}
    assert {"uniform", "karras", "logsnr", "stepdrop", "buco-mwg", "abcd", "oracle"} <= methods
    assert {r["status"] for r in rows if r["method"] == "ays"} == {"unavailable"}   # no AYS table for it
    # every request seed of every method: one image, its latency measured, steps taken (the static methods have
    # no guard: at least one step; ABCD's guard may abandon a first step a loaded machine makes late)
    assert all(float(r["latency_ms"]) > 0 for r in ok)
    assert all(float(r["steps"]) >= 1 for r in ok if r["method"] != "abcd")
    assert all(float(r["steps"]) >= 1 or r["exit_reason"] != "done" for r in ok)
    abcd = [r for r in ok if r["method"] == "abcd"]
    assert len(abcd) == 2 * 2 * 2 * 3 and all(r["deadline_met"] == "True" for r in abcd)
    meta = json.loads((out / "bench.json").read_text())
    assert "16x16 images fitted to its 32x32" in meta["quality"]
    assert meta["grid"]["prompts"] and meta["grid"]["guidance"] is None
    summary = (out / "summary.md").read_text()
    assert "Success rate" in summary and "Feature-FID" in summary
    # resumes with nothing to do; the same prompts under another name are the same configuration
    shutil.copy(nets / "prompts.txt", tmp_path / "same.txt")
    res = cli("bench", "--artifact", art, "--profiles", f"real:{prof}", "--budgets", "40ms,200ms", "--samplers",
              "ddim", "--quality", "0.6,1.0", "--seeds", 2, "--samples", 6, "--batch", 1, "--teacher-steps", 20,
              "--prompts", tmp_path / "same.txt", "--controller", cal, "--evaluation-net", nets / "evalnet",
              "--out", out)
    assert res.exit_code == 0, res.output
    assert len(list(csv.DictReader(open(out / "results.csv")))) == len(rows)


@pytest.fixture(scope="module")
def headed_net(tmp_path_factory) -> Path:
    """A tiny 32 x 32 feature net exported with its prediction heads (a few steps: its judgement is poor, but
    real), with reference statistics for 16 px images."""
    torch = pytest.importorskip("torch")
    from abcd_edge.demo import featurenet as fn

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("headed") / "net"
    fn.train(out, n_train=48, n_heldout=16, steps=3, batch=8, lr=2e-3, threads=1, seed=0, widths=(8, 16),
             depths=(1, 1), onnx_heads=True)
    subprocess.run([sys.executable, "-m", "abcd_edge.demo.reference", "--seed", str(paths.EVAL_REF_SEED), "--n",
                    str(paths.REF_N), "--resolution", "16", "--featurenet", str(out)], check=True, capture_output=True)
    return out


def test_bench_prompt_sets_prompt_accuracy_and_the_seed_claims(sd_setup, headed_net, tmp_path):
    """Labelled prompt sets split every block's requests; the evaluation net's heads give prompt accuracy per
    cell and per set; --max-steps caps every method; the seed's claims are printed beside ABCD vs uniform."""
    art, prof, cal = sd_setup
    (tmp_path / "easy.txt").write_text("a red circle\na blue square\n")
    (tmp_path / "hard.txt").write_text("three red circles\na red circle, a blue square and a green ring\n")
    out = tmp_path / "bench"
    res = cli("bench", "--artifact", art, "--profiles", f"real:{prof}", "--budgets", "300ms", "--samplers", "ddim",
              "--quality", "0.5,1.0", "--methods", "uniform,abcd,oracle", "--seeds", 2, "--samples", 8, "--batch", 1,
              "--teacher-steps", 10, "--prompts", f"easy={tmp_path / 'easy.txt'},hard={tmp_path / 'hard.txt'}",
              "--max-steps", 3, "--controller", cal, "--evaluation-net", headed_net, "--out", out)
    assert res.exit_code == 0, res.output
    rows = [r for r in csv.DictReader(open(out / "results.csv")) if r["status"] == "ok"]
    assert rows and all(int(float(r["planned_steps"])) <= 3 for r in rows if r["method"] != "oracle")
    summary = json.loads((out / "summary.json").read_text())
    accs = [c["prompt_acc"] for c in summary["cells"] if c["status"] == "ok"]
    assert accs and all(a is not None and 0.0 <= a <= 1.0 for a in accs)
    sets = summary["prompt_sets"]
    assert {r["set"] for r in sets} == {"easy", "hard"}
    abcd = [r for r in sets if r["method"] == "abcd"]
    assert abcd and all(r["n"] == 4 and r["steps"] <= 3 for r in abcd)    # 8 requests a stream: 4 per set
    assert summary["seed_claims"] and summary["seed_claims"][0]["setting"].endswith("300ms ddim")
    md = (out / "summary.md").read_text()
    assert "## Prompt accuracy of on-time images" in md and "## Prompt sets: steps spent" in md
    assert "+12 pp" in md and "-13 %" in md and "capped at 3 steps" in md
    one_line_error(cli("bench", "--artifact", art, "--profiles", f"real:{prof}", "--batch", 1, "--prompts",
                       f"easy={tmp_path / 'easy.txt'},easy={tmp_path / 'hard.txt'}", "--out", tmp_path / "b2"),
                   "labels repeat")


def test_every_method_encodes_its_prompt_inside_its_clock(sd_setup, monkeypatch):
    """No method rides on another's cached embedding: the prompt is dropped before each request."""
    from abcd_edge.bench.grid import parse_grid_args
    from abcd_edge.bench.methods import Plan, execute
    from abcd_edge.bench.text import BenchText
    from abcd_edge.bench.tiers import resolve_tiers, open_tier
    from abcd_edge.core.placement import time_uniform_sigmas
    from abcd_edge.formats.manifest import manifest_hash

    art, prof, cal = sd_setup
    spec = parse_grid_args(profiles=f"real:{prof}", batch=1, artifact=str(art), controller=str(cal))
    text = BenchText(tuple(PROMPTS), None)
    tier = resolve_tiers(spec.tiers, manifest_hash(art))[0]
    with open_tier(tier, spec, 1, text) as sess:
        calls = []
        for rt in (sess.base, sess.abcd):
            enc = rt.pipeline.encoder
            model_run = enc.model.run
            monkeypatch.setattr(enc.model, "run", lambda feed, _run=model_run, **kw: calls.append(1) or _run(feed, **kw))
        sig = time_uniform_sigmas(sess.base.schedule, 3)
        for p in (Plan("uniform", None, "ok", "", sig), Plan("abcd", 1.0, "ok", ""), Plan("uniform", None, "ok", "", sig)):
            before = len(calls)
            assert execute(sess, p, 300.0, "ddim", 5, 1, sess.base.clock, None) is not None
            assert len(calls) == before + 1, p.method       # the prompt (the negative "" stays cached)


def test_pipeline_refusals_are_one_line(sd_setup, nets, tiny_artifact, fixed_profile, tmp_path):
    art, prof, cal = sd_setup
    prompts = nets / "prompts.txt"
    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("caf\xe9\n".encode("latin-1"))
    cases = [
        (["calibrate", "--artifact", art, "--profile", prof, "--steps", 2, "--out", tmp_path / "c"],
         "needs --prompts FILE"),
        (["calibrate", "--artifact", tiny_artifact, "--profile", fixed_profile, "--prompts", prompts,
          "--steps", 2, "--out", tmp_path / "c"], "takes no prompts or guidance"),
        (["calibrate", "--artifact", art, "--profile", prof, "--prompts", bad_utf8, "--steps", 2,
          "--out", tmp_path / "c"], "is not UTF-8"),
        (["calibrate", "--artifact", art, "--profile", prof, "--prompts", prompts, "--guidance", 0.5, "--steps", 2,
          "--out", tmp_path / "c"], "--guidance 0.5"),
        (["calibrate", "--artifact", art, "--profile", prof, "--prompts", prompts, "--ays", "--steps", 2,
          "--out", tmp_path / "c"], "--ays"),
        (["bench", "--artifact", art, "--profiles", f"real:{prof}", "--batch", 1, "--out", tmp_path / "b"],
         "the bench needs --prompts FILE"),
        (["bench", "--artifact", art, "--profiles", f"real:{prof}", "--batch", 4, "--prompts", prompts,
          "--out", tmp_path / "b"], "--batch 1"),
        (["bench", "--artifact", art, "--profiles", f"replay:{prof}", "--batch", 1, "--prompts", prompts,
          "--out", tmp_path / "b"], "replay"),
        (["bench", "--artifact", tiny_artifact, "--profiles", f"real:{fixed_profile}", "--prompts", prompts,
          "--out", tmp_path / "b"], "takes no prompts or guidance"),
    ]
    before = snapshot(tmp_path)
    for args, needle in cases:
        one_line_error(cli(*args), needle)
    assert snapshot(tmp_path) == before and not (tmp_path / "c").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------ small parts
def test_fit_images_by_integer_factors():
    from abcd_edge.errors import UserError
    from abcd_edge.quality import fit_images

    x = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    down = fit_images(x, 2, 2)
    assert down.shape == (2, 2, 2, 3)
    assert down[0, 0, 0, 0] == np.rint(x[0, :2, :2, 0].astype(float).mean())
    up = fit_images(x, 8, 8)
    assert up.shape == (2, 8, 8, 3) and np.array_equal(up[:, ::2, ::2], x)
    assert fit_images(x, 4, 4) is x
    with pytest.raises(UserError, match="integer scale factors"):
        fit_images(x, 3, 3)


def test_prompt_sets_hold_out_every_other_line(tmp_path):
    from abcd_edge.errors import UserError
    from abcd_edge.runtime.rollout import PromptSets

    f = tmp_path / "p.txt"
    f.write_text("one\n\n two \nthree\nfour\nfive\n")
    ps = PromptSets.from_file(f)
    assert ps.train == ("one", "three", "five") and ps.heldout == ("two", "four")
    assert ps.rows("heldout", 5) == ["two", "four", "two", "four", "two"]
    f.write_text("only one\n")
    with pytest.raises(UserError, match="at least 2"):
        PromptSets.from_file(f)


def test_latent_evaluate_writes_its_table_grid_and_readme_section(tiny_lcm_artifact, headed_net, tmp_path):
    """`python -m abcd_edge.demo.latent.evaluate` (make evaluate-latent) on the tiny LCM artifact: FID with a CI
    and prompt accuracy per step count, the prompts x steps grid, its README section replaced on a rerun."""
    from PIL import Image

    from abcd_edge.demo.latent import evaluate

    (tmp_path / "README.md").write_text("# model\n\ntraining notes\n")
    args = ["--artifact", str(tiny_lcm_artifact), "--steps", "1,2", "--samples", "8", "--net", str(headed_net),
            "--threads", "1", "--out", str(tmp_path)]
    evaluate.main(args)
    evaluate.main(args)
    rec = json.loads((tmp_path / "evaluation.json").read_text())
    assert [r["steps"] for r in rec["rows"]] == [1, 2] and rec["samples"] == 8 and rec["sampler"] == "lcm"
    for r in rec["rows"]:
        assert r["fid_ci95"][0] <= r["fid_ci95"][1] and 0.0 <= r["prompt_accuracy"]["exact"] <= 1.0
    readme = (tmp_path / "README.md").read_text()
    assert readme.startswith("# model\n\ntraining notes\n") and readme.count(evaluate.BEGIN) == 1
    assert "| 2 |" in readme and "Chance:" in readme
    assert Image.open(tmp_path / "evaluation.png").size == (2 * 16, evaluate.GRID_PROMPTS * 16)
