"""What a user meets with their own models and installs: verbs without their extras, latent (LDM) models,
offline Hub ids, consistency models through calibrate and run, and fp16 artifacts at run/profile time.

Tiny diffusers models are built from configs here (as tests/test_export.py does), exported once per module
on one thread; every refusal is checked through the CLI as one line on stderr with exit code 2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from abcd_edge.cli.main import main
from abcd_edge.errors import UserError
from tests.conftest import TINY_UNET, one_line_error


torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
torch.set_num_threads(1)

from diffusers import CMStochasticIterativeScheduler, DDPMScheduler, UNet2DModel  # noqa: E402

CM_TRAIN_STEPS = 40        # a consistency model with few train timesteps (the user's had 40)


def _save_pipeline(folder: Path, unet_config: dict, scheduler, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    UNet2DModel(**unet_config).save_pretrained(folder / "unet", safe_serialization=True)
    scheduler.save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def cm_model_dir(tmp_path_factory) -> Path:
    """A consistency-model pipeline folder (CMStochasticIterativeScheduler, 40 train timesteps), 8x8."""
    return _save_pipeline(tmp_path_factory.mktemp("cm") / "model", TINY_UNET,
                          CMStochasticIterativeScheduler(num_train_timesteps=CM_TRAIN_STEPS))


@pytest.fixture(scope="module")
def cm_artifact(cm_model_dir, tmp_path_factory) -> Path:
    """The consistency model exported with its fp16 twin (usable: the tiny model's drift is far below the bound)."""
    from abcd_edge.export import export_model

    out = tmp_path_factory.mktemp("cm-artifact") / "cm"
    m = export_model(str(cm_model_dir), out, batches=(1,), fp16=True, progress=False, threads=1)
    assert m.model_kind == "consistency" and m.fp16_usable
    return out


@pytest.fixture(scope="module")
def cm_profile(cm_artifact, tmp_path_factory) -> Path:
    from abcd_edge.profiling.measure import measure_profile

    prof = measure_profile(cm_artifact, threads=1, batches=(1,), runs=40, warmup=5, power="none", progress=False,
                           command="tests")
    path = tmp_path_factory.mktemp("cm-profile") / "cm.json"
    prof.save(path)
    return path


# ------------------------------------------------------------------------ 1. verbs that need extras
BLOCKED = ("torch", "onnx", "diffusers")


@pytest.fixture()
def runtime_only(monkeypatch):
    """As in `pip install abcd-edge` (no extras): importing torch, onnx or diffusers fails."""
    for name in BLOCKED:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("args,verb,extra", [
    (["export", "--model", "demo", "--out", "{tmp}/a"], "`export`", "abcd-edge[export]"),
    (["export", "--controller", "{tmp}/c", "--out", "{tmp}/a"], "`export`", "abcd-edge[export]"),
    (["calibrate", "--artifact", "{tmp}/a", "--profile", "{tmp}/p.json"], "`calibrate`", "abcd-edge[export]"),
])
def test_verbs_name_the_extra_they_need(runtime_only, tmp_path, args, verb, extra):
    res = CliRunner().invoke(main, [a.replace("{tmp}", str(tmp_path)) for a in args])
    line = one_line_error(res, verb, f"pip install '{extra}'", "torch")
    assert "ModuleNotFoundError" not in line
    assert not any(tmp_path.iterdir())                     # nothing written


def test_runtime_verbs_and_bench_help_need_no_extras(runtime_only):
    for args in (["run", "--help"], ["profile", "--help"], ["bench", "--help"], ["bench-schedules", "--help"]):
        assert CliRunner().invoke(main, args).exit_code == 0


@pytest.mark.parametrize("module,extra", [("abcd_edge.demo.train", "train"), ("abcd_edge.demo.featurenet", "train")])
def test_demo_training_names_the_extra(module, extra):
    """`python -m abcd_edge.demo.train` in a runtime-only install (torch/diffusers/onnx blocked in a child)."""
    code = ("import runpy, sys\n"
            f"for m in {BLOCKED!r}: sys.modules[m] = None\n"
            f"sys.argv = [{module!r}, '--help']\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"pip install 'abcd-edge[{extra}]'" in lines[0] and "torch" in lines[0], res.stderr


# ------------------------------------------------------------------------ 2. latent (LDM) models
LATENT_UNET = dict(TINY_UNET, in_channels=4, out_channels=4)


def _ldm_folder(root: Path, vae: str, unet_config: dict, index: bool) -> Path:
    """The LDM layout: unet/ + vqvae/ (or vae/) + scheduler/ [+ model_index.json naming them]."""
    _save_pipeline(root, unet_config, DDPMScheduler())
    (root / vae).mkdir()
    (root / vae / "config.json").write_text(json.dumps({"_class_name": "VQModel" if vae == "vqvae" else
                                                        "AutoencoderKL", "latent_channels": unet_config["in_channels"]}))
    if index:
        (root / "model_index.json").write_text(json.dumps({
            "_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"],
            vae: ["diffusers", "VQModel" if vae == "vqvae" else "AutoencoderKL"],
            "scheduler": ["diffusers", "DDPMScheduler"]}))
    return root


@pytest.mark.parametrize("vae,unet_config,index", [("vqvae", LATENT_UNET, True), ("vae", LATENT_UNET, False),
                                                    ("vae", TINY_UNET, True)])
def test_ldm_layout_without_decoder_weights_is_refused_before_loading(tmp_path, vae, unet_config, index):
    """The LDM layout now goes to the pipeline exporter (abcd_edge/export/sd_pipeline.py, exported in
    tests/test_sd_export.py); a vae/ or vqvae/ with a config but no weights is refused in one line."""
    model = _ldm_folder(tmp_path / "ldm", vae, unet_config, index)
    out = tmp_path / "artifact"
    res = CliRunner().invoke(main, ["export", "--model", str(model), "--out", str(out)])
    one_line_error(res, f"{vae}", "has a config.json but no weights")
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["ldm"]


def test_latent_channels_without_a_vae_are_refused(tmp_path):
    torch.manual_seed(0)
    UNet2DModel(**LATENT_UNET).save_pretrained(tmp_path / "bare")
    res = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "bare"), "--out", str(tmp_path / "a")])
    one_line_error(res, "4 channels", "accepted: pixel-space UNet2DModel")
    assert not (tmp_path / "a").exists()


@pytest.fixture(scope="module")
def latent_artifact(tmp_path_factory) -> Path:
    """A 4-channel artifact as an older abcd-edge exported it (the export-time check bypassed)."""
    import abcd_edge.export.model as model_mod
    from abcd_edge.export import export_model

    root = tmp_path_factory.mktemp("latent")
    torch.manual_seed(0)
    UNet2DModel(**LATENT_UNET).save_pretrained(root / "bare")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_mod, "_refuse_latent", lambda *a: None, raising=False)   # (absent before the check)
        export_model(str(root / "bare"), root / "artifact", batches=(1,), progress=False, threads=1)
    return root / "artifact"


def test_runtime_refuses_a_non_image_artifact(latent_artifact, tiny_profile, tmp_path):
    """`run` on a 4-channel artifact: one line, no RGBA PNG (its profile copied from the tiny one's measurement)."""
    from abcd_edge.core.images import to_uint8
    from abcd_edge.formats.manifest import manifest_hash

    prof = json.loads(tiny_profile.read_text())
    prof["manifest_hash"] = manifest_hash(latent_artifact)
    (tmp_path / "p.json").write_text(json.dumps(prof))
    out = tmp_path / "run.png"
    res = CliRunner().invoke(main, ["run", "--budget", "1s", "--artifact", str(latent_artifact), "--profile",
                                    str(tmp_path / "p.json"), "--controller", "none", "--threads", "1", "--power",
                                    "none", "--out", str(out), "--report", str(tmp_path / "run.json")])
    one_line_error(res, "4-channel samples", "accepted: pixel-space models with 3 channels")
    assert not out.exists()
    with pytest.raises(UserError, match="4-channel"):
        to_uint8(np.zeros((1, 4, 8, 8), np.float32))


def test_greyscale_images_are_written_as_greyscale(tmp_path):
    from PIL import Image

    from abcd_edge.core.images import save_png, to_uint8

    images = to_uint8(np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 1, 8, 8))
    save_png(images, tmp_path / "g.png", scale=1)
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "L" and im.size == (16, 8)


# ------------------------------------------------------------------------ 3. offline Hub ids
HUB_ID = "nobody-xyz/no-such-model-123"


def test_offline_hub_id_says_the_hub_was_not_reached(tmp_path):
    """HF_HUB_OFFLINE=1 (set in the child, so nothing is fetched and nothing hangs)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    res = subprocess.run([sys.executable, "-m", "abcd_edge.cli.main", "export", "--model", HUB_ID, "--out",
                          str(tmp_path / "a")], capture_output=True, text=True, timeout=120, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert f"could not reach the Hugging Face Hub for '{HUB_ID}'" in lines[0]
    assert "pass a local diffusers folder" in lines[0] and "no model" not in lines[0]
    assert not (tmp_path / "a").exists()


def _connect_error():
    import httpx

    return httpx.ConnectError("[Errno -2] Name or service not known")


def _requests_error():
    import requests

    return requests.ConnectionError("Max retries exceeded (Failed to establish a new connection)")


@pytest.mark.parametrize("make_cause", [_connect_error, _requests_error])
def test_no_network_is_not_reported_as_no_such_model(monkeypatch, tmp_path, make_cause):
    """Without a network the Hub client raises LocalEntryNotFoundError from the connection error (whose class
    name has "NotFound" in it): that is "could not reach", not "no model on the Hub"."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")            # belt and braces: nothing below may touch the network
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def snapshot_download(repo_id, local_files_only=False, **kw):
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        try:
            raise make_cause()
        except Exception as exc:
            raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub") from exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    res = CliRunner().invoke(main, ["export", "--model", HUB_ID, "--out", str(tmp_path / "a")])
    line = one_line_error(res, f"could not reach the Hugging Face Hub for '{HUB_ID}' (offline?",
                           "pass a local diffusers folder")
    assert "no model" not in line and not (tmp_path / "a").exists()


# ------------------------------------------------------------------------ 4. calibrate on user models
SMALL = dict(search_noises=8, other_steps=(2,), gate_noises=8, wg_iters=20, cost_iters=20, train_noises=4,
             wg_batch=2, ays_steps=(2, 3), ays_iters=2, threads=1)


@pytest.fixture()
def small_calibration(monkeypatch, tiny_feature_nets):
    """`abcd-edge calibrate` with conftest's quick settings (what the CLI sets itself is kept); returns the
    feature-net arguments."""
    import abcd_edge.calibrate as cal
    from abcd_edge.calibrate.state import CalibrationConfig

    monkeypatch.setattr(cal, "CalibrationConfig", lambda **kw: CalibrationConfig(**{**kw, **SMALL}))
    return ["--calibration-net", str(tiny_feature_nets[0]), "--evaluation-net", str(tiny_feature_nets[1]),
            "--threads", "1"]


def _calibrate(args: list[str], out: Path):
    res = CliRunner().invoke(main, ["calibrate", *args, "--out", str(out)])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res


def test_calibrate_consistency_model_with_few_train_timesteps(cm_artifact, cm_profile, small_calibration, tmp_path):
    """40 train timesteps: the AYS-like baseline's teacher (200 time-uniform steps) and the KL anchor (100)
    are capped at the model's train timesteps instead of crashing."""
    res = _calibrate(["--artifact", str(cm_artifact), "--profile", str(cm_profile), "--samplers", "consistency",
                      "--steps", "2,3", "--ays", *small_calibration], tmp_path / "cal")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "cal" / "report.json").read_text())
    assert list(report["gate"]) == ["consistency"] and list(report["gate"]["consistency"]) == ["2", "3"]
    ays = json.loads((tmp_path / "cal" / "ays.json").read_text())["schedules"]
    assert list(ays["consistency"]) == ["2", "3"]


def test_calibrate_defaults_for_a_consistency_model(cm_artifact, cm_profile, small_calibration, tmp_path):
    """No --samplers / --steps: the consistency sampler at 1..8 steps (its plans stop at 8)."""
    res = _calibrate(["--artifact", str(cm_artifact), "--profile", str(cm_profile), *small_calibration],
                     tmp_path / "cal")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "cal" / "report.json").read_text())
    assert list(report["gate"]) == ["consistency"]
    assert [int(n) for n in report["gate"]["consistency"]] == [1, 2, 3, 4, 6, 8]


def test_calibrate_refuses_steps_a_consistency_model_never_plans(cm_artifact, cm_profile, small_calibration,
                                                                 tmp_path):
    res = _calibrate(["--artifact", str(cm_artifact), "--profile", str(cm_profile), "--samplers", "consistency",
                      "--steps", "2,16", *small_calibration], tmp_path / "cal")
    one_line_error(res, "--steps", "2,16", "'consistency'", "accepted: 1 to 8 steps")
    assert not (tmp_path / "cal").exists()


def test_calibrate_a_single_step_plan(tiny_artifact, fixed_profile, small_calibration, tmp_path):
    """A one-step plan (what a consistency model is for, and the least any budget gets) is searched, fitted
    and gated like any other step count."""
    res = _calibrate(["--artifact", str(tiny_artifact), "--profile", str(fixed_profile), "--samplers", "ddim",
                      "--steps", "1,2", *small_calibration], tmp_path / "cal")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "cal" / "report.json").read_text())
    assert list(report["gate"]["ddim"]) == ["1", "2"] and len(report["search"]["ddim"]["1"]["sigmas"]) == 1


# ------------------------------------------------------------------------ 6. a consistency artifact at run time
def _run(artifact: Path, profile: Path, tmp_path: Path, *extra: str):
    report = tmp_path / "run.json"
    res = CliRunner().invoke(main, ["run", "--budget", "10s", "--artifact", str(artifact), "--profile", str(profile),
                                    "--controller", "none", "--threads", "1", "--power", "none",
                                    "--out", str(tmp_path / "run.png"), "--report", str(report), *extra])
    return res, (json.loads(report.read_text()) if report.is_file() else None)


def test_run_defaults_to_the_consistency_sampler_and_few_steps(cm_artifact, cm_profile, tmp_path):
    """A 10 s budget fits hundreds of tiny steps; a consistency model plans at most 8, with its own sampler."""
    res, rep = _run(cm_artifact, cm_profile, tmp_path)
    assert res.exit_code == 0, res.output
    assert rep["sampler"] == "consistency"
    from abcd_edge.core.samplers import CONSISTENCY_MAX_STEPS

    assert rep["planned_steps"] == rep["steps"] == CONSISTENCY_MAX_STEPS
    res, rep = _run(cm_artifact, cm_profile, tmp_path, "--sampler", "ddim")     # asked for: allowed, also capped
    assert res.exit_code == 0, res.output
    assert rep["sampler"] == "ddim" and rep["planned_steps"] == CONSISTENCY_MAX_STEPS


def test_python_api_resolves_the_default_sampler(cm_artifact, cm_profile, tiny_artifact, tiny_profile):
    from abcd_edge.core.budget import parse_budget
    from abcd_edge.runtime.session import AnytimeRuntime

    with AnytimeRuntime.open(cm_artifact, profile=cm_profile, controller="none", threads=1, power="none") as rt:
        assert rt.plan(parse_budget("10s")).sampler == "consistency"
        assert len(rt.plan(parse_budget("10s"), sampler="euler").sigmas) == 8
        assert rt.plan(parse_budget("10s"), sampler="auto").sampler == "consistency"   # no gate: the natural one
        _, rep = rt.generate(parse_budget("10s"), seed=3)
        assert rep.sampler == "consistency" and rep.steps == 8
    with AnytimeRuntime.open(tiny_artifact, profile=tiny_profile, controller="none", threads=1, power="none") as rt:
        plan = rt.plan(parse_budget("10s"))
        assert plan.sampler == "ddim" and len(plan.sigmas) > 8          # a DDPM model keeps its step count
        with pytest.raises(UserError, match="accepted: ddim, dpmpp-2m, euler, consistency, euler-ancestral, lcm, auto, default"):
            rt.plan(parse_budget("10s"), sampler="lms")


@pytest.mark.parametrize("n", [1, 2, 5])
def test_ddim_over_a_consistency_model_reads_its_output_correctly(n):
    """Asked for explicitly, DDIM (and Euler) on a consistency model is allowed: the samplers read a
    consistency output through the model's own parametrisation (x0 = c_skip x + c_out F), not as an epsilon.
    With an oracle whose every call means x0 = target, each sampler ends exactly at the target."""
    from abcd_edge.core.loop import sample
    from abcd_edge.core.noise import NoiseSchedule
    from abcd_edge.core.placement import karras_sigmas
    from abcd_edge.core.samplers import SIGMA_DATA, make_sampler

    cfg = dict(CMStochasticIterativeScheduler(num_train_timesteps=CM_TRAIN_STEPS).config)
    schedule = NoiseSchedule.from_config(cfg)
    rng = np.random.default_rng(0)
    target = rng.uniform(-0.9, 0.9, (2, 3, 8, 8))
    sigma_min = schedule.sigma_min

    def oracle(x_in, t):
        sigma = float(np.exp(t[0] / 250.0))
        x_ve = x_in * (sigma ** 2 + SIGMA_DATA ** 2) ** 0.5
        c_skip = SIGMA_DATA ** 2 / ((sigma - sigma_min) ** 2 + SIGMA_DATA ** 2)
        c_out = (sigma - sigma_min) * SIGMA_DATA / (sigma ** 2 + SIGMA_DATA ** 2) ** 0.5
        return (target - c_skip * x_ve) / c_out

    sigmas = karras_sigmas(schedule, n + 1)[:n]
    noise = rng.standard_normal(target.shape)
    for name in ("consistency", "ddim", "euler"):
        x0, _ = sample(oracle, make_sampler(name, schedule, sigmas, "consistency"), noise)
        np.testing.assert_allclose(x0, target, atol=1e-6, err_msg=name)


# ------------------------------------------------------------------------ 5. the fp16 denoiser at run/profile time
def test_open_denoiser_runs_the_fp16_file(cm_artifact):
    from abcd_edge.device.backends import open_denoiser
    from abcd_edge.formats.manifest import load_manifest

    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    t = np.array([100.0], np.float32)
    fp32 = open_denoiser(cm_artifact, threads=1)(x, t)
    fp16 = open_denoiser(cm_artifact, threads=1, precision="fp16")(x, t)
    drift = float(np.abs(fp16 - fp32).max())
    assert fp16.dtype == np.float32 and 0 < drift <= load_manifest(cm_artifact).fp16["bound"]


@pytest.fixture(scope="module")
def unusable_fp16_artifact(tmp_path_factory) -> Path:
    from abcd_edge.export import export_model

    root = tmp_path_factory.mktemp("fp16-unusable")
    model = _save_pipeline(root / "model", TINY_UNET, DDPMScheduler())
    m = export_model(str(model), root / "artifact", batches=(1,), fp16=True, fp16_bound=1e-9, progress=False,
                     threads=1)
    assert m.fp16 is not None and not m.fp16_usable
    return root / "artifact"


def test_profile_at_fp16_has_its_own_device_id(cm_artifact, cm_profile, tmp_path):
    out = tmp_path / "fp16.json"
    res = CliRunner().invoke(main, ["profile", "--artifact", str(cm_artifact), "--precision", "fp16", "--threads",
                                    "1", "--power", "none", "--runs", "20", "--out", str(out)])
    assert res.exit_code == 0, res.output
    fp16_id = json.loads(out.read_text())["device_id"]
    fp32_id = json.loads(cm_profile.read_text())["device_id"]
    assert fp16_id != fp32_id and fp16_id == fp32_id.replace("-ort-cpu-", "-ort-cpu-fp16-")
    # the runtime never plans steps of one precision with the other's profile
    res, _ = _run(cm_artifact, out, tmp_path)
    one_line_error(res, fp16_id, "a foreign profile is never used")
    # ... and `run --precision fp16` steps the fp16 file with the fp16 profile
    res, rep = _run(cm_artifact, out, tmp_path, "--precision", "fp16")
    assert res.exit_code == 0, res.output
    assert rep["profile_device"] == fp16_id and rep["steps"] >= 1


def test_device_id_names_fp16_only():
    from abcd_edge.device.hardware import device_id

    info = {"cpu_model": "AMD EPYC 7B13", "cpu_affinity": 2}
    assert device_id("ort-cpu", 2, info) == device_id("ort-cpu", 2, info, precision="fp32") == "cpu-amd-epyc-7b13-2c-ort-cpu-2t"
    assert device_id("ort-cpu", 2, info, precision="fp16") == "cpu-amd-epyc-7b13-2c-ort-cpu-fp16-2t"


@pytest.mark.parametrize("which,needles", [
    ("none", ("has no denoiser.fp16.onnx", "abcd-edge export --fp16")),
    ("unusable", ("drifts", "marked it unusable", "--precision fp32")),
    ("bad", ("--precision 'int8'", "accepted: fp32, fp16")),
])
def test_profile_refuses_an_fp16_it_cannot_run(tiny_artifact, unusable_fp16_artifact, tmp_path, which, needles):
    artifact = unusable_fp16_artifact if which == "unusable" else tiny_artifact
    out = tmp_path / "p.json"
    res = CliRunner().invoke(main, ["profile", "--artifact", str(artifact), "--precision",
                                    "int8" if which == "bad" else "fp16", "--threads", "1", "--power", "none",
                                    "--runs", "5", "--out", str(out)])
    one_line_error(res, *needles)
    assert not out.exists()
