"""Issue 15, runtime side: a text-to-image pipeline artifact (tiny SD and LCM from tests/sd_fixtures.py) through
the CLI (export -> profile -> run --prompt), the image equal to diffusers' pipeline output for the same latent
noise, prompt, guidance and steps, a runtime that imports neither torch nor transformers, and one-line refusals."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from abcd_edge import paths
from abcd_edge.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
LONG_PROMPT = " ".join(["a photo of a red car on mars"] * 20)      # 141 tokens with BOS/EOS: over both limits


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _profile(artifact: Path, out: Path) -> Path:
    res = cli("profile", "--artifact", artifact, "--threads", 1, "--runs", 40, "--power", "none", "--out", out)
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def sd_profile(tiny_sd_artifact, tmp_path_factory) -> Path:
    return _profile(tiny_sd_artifact, tmp_path_factory.mktemp("sd-prof") / "sd.json")


@pytest.fixture(scope="module")
def lcm_profile(tiny_lcm_artifact, tmp_path_factory) -> Path:
    return _profile(tiny_lcm_artifact, tmp_path_factory.mktemp("lcm-prof") / "lcm.json")


# ------------------------------------------------------------------------------ export -> profile -> run (CLI)
@pytest.mark.parametrize("kind", ["sd", "lcm"])
def test_cli_export_profile_run_prompt(kind, request, tmp_path):
    from abcd_edge.formats.manifest import manifest_hash

    folder = request.getfixturevalue(f"tiny_{kind}_dir")
    art = tmp_path / f"tiny-{kind}"
    res = cli("export", "--model", folder, "--out", art, "--batch", "1,2")
    assert res.exit_code == 0, res.output
    # the same folder exported again is the same artifact (profiles stay tied to it)
    assert manifest_hash(art) == manifest_hash(request.getfixturevalue(f"tiny_{kind}_artifact"))

    prof = tmp_path / "prof.json"
    res = cli("profile", "--artifact", art, "--threads", 1, "--runs", 40, "--power", "none", "--out", prof)
    assert res.exit_code == 0, res.output
    for name in ("text_encoder", "unet_b1", "vae_decoder", "finish (vae_decoder + uint8)", "guidance mode"):
        assert name in res.output
    data = json.loads(prof.read_text())
    comps = data["pipeline"]["components"]
    expected = {"text_encoder", "unet_b1", "vae_decoder"} | (
        {"unet_b2", "unet_split"} if kind == "sd" else {"vae_decoder_tiny"})
    assert expected <= set(comps)
    assert all(c["flops"] > 0 and c["latency"]["p99_ms"] > 0 for c in comps.values())
    assert data["pipeline"]["guidance_mode"] == ("none" if kind == "lcm" else
                                                 min(("batch2", "unet_b2"), ("split", "unet_split"),
                                                     key=lambda m: comps[m[1]]["latency"]["p50_ms"])[0])

    for decoder in ("vae", "tiny") if kind == "lcm" else ("vae",):
        out, rep = tmp_path / f"{decoder}.png", tmp_path / f"{decoder}.json"
        res = cli("run", "--artifact", art, "--profile", prof, "--threads", 1, "--prompt", "a photo of a cat",
                  "--negative-prompt", "a dog", "--budget", "500ms", "--decoder", decoder, "--out", out,
                  "--report", rep)
        assert res.exit_code == 0, res.output
        r = json.loads(rep.read_text())
        assert r["deadline_met"] and r["latency_ms"] <= 500 and r["steps"] >= 1
        assert r["encode_ms"] >= 0 and r["decode_ms"] > 0 and len(r["measured_step_ms"]) == r["steps"]
        assert r["prompt"] == "a photo of a cat" and r["prompt_truncated"] is False and r["decoder"] == decoder
        assert r["schedule"] == "diffusers" and r["sampler"] == ("lcm" if kind == "lcm" else "ddim")
        assert r["guidance_mode"] == ("single" if kind == "lcm" else data["pipeline"]["guidance_mode"])
        assert r["latency_ms"] >= r["encode_ms"] + sum(r["measured_step_ms"]) + r["decode_ms"] - 1e-3
        if kind == "lcm":
            assert r["steps"] <= 8 and any("negative prompt is not used" in n for n in r["notes"])
        line = res.output.strip().splitlines()[-1]
        assert "encode" in line and "decode" in line and "steps" in line and "(met)" in line
        from PIL import Image

        assert Image.open(out).size == (16 * 4, 16 * 4)      # 16 px images, written 4x


# ------------------------------------------------------------------------------ parity with diffusers
def _exact_profile(src: Path, dst: Path) -> Path:
    """The measured profile with every step at exactly 1 ms and nothing else costing anything: on a StepClock
    of 1 ms a budget of n + 1.65 ms plans exactly n steps (guard slack 1.15 ms), none re-planned."""
    from abcd_edge.formats.profile import DeviceProfile, LatencyStats

    prof = DeviceProfile.from_json(json.loads(src.read_text()))
    one, zero = LatencyStats.from_samples([1.0] * 20), LatencyStats.from_samples([0.0] * 20)
    for bp in prof.batches:
        bp.step, bp.finish = one, zero
        bp.sampler_ms = {k: zero for k in bp.sampler_ms}
    for name, c in prof.pipeline.components.items():
        c.latency = zero if name == "text_encoder" else one
    prof.pipeline.finish = {k: zero for k in prof.pipeline.finish}
    prof.controller_decision = zero
    prof.save(dst)
    return dst


def _ours(artifact: Path, profile: Path, step_clock, n: int, seed: int, **request):
    """Our runtime's uint8 image, report, and (by a spy on the decode) the x0 latent and the float image."""
    from abcd_edge.runtime.session import AnytimeRuntime

    seen = {}
    with AnytimeRuntime.open(artifact, profile=profile, controller="none", clock=step_clock(1.0), threads=1) as rt:
        decode = rt.pipeline.decode

        def spy(x0, decoder="vae"):
            seen["x0"], seen["image"] = np.array(x0), decode(x0, decoder)
            return seen["image"]
        rt.pipeline.decode = spy
        images, report = rt.generate(f"{n + 1.65}ms", seed=seed, **request)
    assert report.steps == report.planned_steps == n and report.replans == 0, report.summary_line()
    return images, report, seen


def _draws(seed: int, shape, n: int):
    """The runtime's noise for seed: the initial latent noise, then one draw after each step (the loop's)."""
    rng = np.random.default_rng(seed)
    first = rng.standard_normal(shape).astype(np.float32)
    return first, [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def _compare(images, seen, latent, float_image):
    scale = float(np.abs(latent).max())
    assert np.abs(seen["x0"] - latent).max() <= 1e-5 * max(scale, 1.0), (np.abs(seen["x0"] - latent).max(), scale)
    ours = (seen["image"] / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1)
    assert np.abs(ours - float_image).max() <= 1e-5
    # uint8: round((x + 1) 127.5) against diffusers' float in [0, 1] x 255: within rounding and round-off
    assert np.abs(images.astype(np.float64) - float_image * 255).max() <= 0.5 + 1e-3


def test_image_equals_diffusers_stable_diffusion_ddim(tiny_sd_dir, tiny_sd_artifact, sd_profile, step_clock, tmp_path):
    """DDIM, classifier-free guidance 7.5 with a negative prompt, 10 steps: our image is diffusers'
    StableDiffusionPipeline's (same folder, same initial latent, same timesteps), within fp32 round-off."""
    import torch
    from diffusers import StableDiffusionPipeline

    n, seed, w, prompt, neg = 10, 3, 7.5, "a red car on mars", "a dog"
    profile = _exact_profile(sd_profile, tmp_path / "exact.json")
    images, report, seen = _ours(tiny_sd_artifact, profile, step_clock, n, seed, prompt=prompt,
                                 negative_prompt=neg, guidance=w)
    assert report.sampler == "ddim" and report.schedule == "diffusers" and report.guidance_mode in ("batch2", "split")
    noise, _ = _draws(seed, seen["x0"].shape, n)
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=prompt, negative_prompt=neg, num_inference_steps=n, guidance_scale=w)
    with torch.no_grad():
        latent = pipe(**kw, latents=torch.from_numpy(noise), output_type="latent").images.numpy()
        float_image = pipe(**kw, latents=torch.from_numpy(noise), output_type="np").images
    assert np.allclose(report.sigmas, [float(s) for s in ((1 - pipe.scheduler.alphas_cumprod[pipe.scheduler.timesteps])
                                                          / pipe.scheduler.alphas_cumprod[pipe.scheduler.timesteps])
                                       .sqrt()], rtol=1e-4, atol=1e-6)     # the report keeps 6 decimals
    _compare(images, seen, latent, float_image)


def test_image_equals_diffusers_lcm(tiny_lcm_dir, tiny_lcm_artifact, lcm_profile, step_clock, tmp_path, monkeypatch):
    """LCM multistep (timestep_cond = the guidance embedding of w - 1), 4 steps: our image is diffusers'
    LatentConsistencyModelPipeline's, given the same re-noising draws, within fp32 round-off."""
    import torch
    import diffusers.schedulers.scheduling_lcm as scheduling_lcm
    from diffusers import LatentConsistencyModelPipeline

    n, seed, w, prompt = 4, 5, 8.0, "a photo of a cat"
    profile = _exact_profile(lcm_profile, tmp_path / "exact.json")
    images, report, seen = _ours(tiny_lcm_artifact, profile, step_clock, n, seed, prompt=prompt, guidance=w)
    assert report.sampler == "lcm" and report.guidance_mode == "single"
    noise, draws = _draws(seed, seen["x0"].shape, n)
    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_lcm_dir, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    outs = {}
    for output_type in ("latent", "np"):
        feed = iter(draws)     # the scheduler's re-noising: the runtime's draws, in order
        monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(feed)))
        with torch.no_grad():
            outs[output_type] = pipe(prompt, num_inference_steps=n, guidance_scale=w, latents=torch.from_numpy(noise),
                                     output_type=output_type).images
    assert pipe.scheduler.timesteps.tolist() == [999, 759, 499, 259]
    _compare(images, seen, outs["latent"].numpy(), outs["np"])


def test_guidance_scale_embedding_matches_diffusers():
    import torch
    from diffusers import LatentConsistencyModelPipeline

    from abcd_edge.device.pipeline import guidance_scale_embedding

    for dim in (16, 17, 256):
        w = [0.0, 1.5, 7.0]
        ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor(w), embedding_dim=dim)
        ours = guidance_scale_embedding(w, dim)
        assert ours.shape == (3, dim) and ours.dtype == np.float32
        # float32 as diffusers computes it; torch's and numpy's exp differ by an ulp on some frequencies, which
        # the argument w * 1000 * freq (up to 7000 here) scales to a few of its own float32 ulps
        assert np.abs(ours - ref.numpy()).max() <= 4 * np.spacing(np.float32(max(w) * 1000))


def test_tokenize_matches_clip_tokenizer(tiny_sd_dir, tiny_sd_artifact):
    """Our tokenizers-only path gives transformers' CLIPTokenizer ids (as the pipeline calls it)."""
    from transformers import CLIPTokenizer

    from abcd_edge.formats.manifest import load_manifest
    from abcd_edge.device.prompt import PromptEncoder

    enc = PromptEncoder(tiny_sd_artifact, load_manifest(tiny_sd_artifact), threads=1)
    ref = CLIPTokenizer.from_pretrained(tiny_sd_dir / "tokenizer")
    for text in ("", "a photo of a cat", "The RED car, on Mars!", "astronaut riding a horse  ", "café ☕ 東京",
                 LONG_PROMPT):
        want = ref(text, padding="max_length", max_length=ref.model_max_length, truncation=True).input_ids
        tok = enc.tokenize(text)
        assert tok.ids[0].tolist() == want, text
        assert tok.truncated == (len(ref(text).input_ids) > ref.model_max_length)


# ------------------------------------------------------------------------------ torch-free runtime
def test_runtime_imports_no_torch_or_transformers(tiny_sd_artifact, sd_profile, tmp_path):
    """`abcd-edge run --prompt` (the CLI in a fresh interpreter) with torch, transformers and diffusers made
    unimportable: a real request is answered, and none of them was ever imported."""
    out, rep = tmp_path / "run.png", tmp_path / "run.json"
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = ("torch", "transformers", "diffusers")
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked by the test: {{name}}")
        sys.meta_path.insert(0, Block())
        from abcd_edge.cli.main import main
        try:
            main(["run", "--artifact", {str(tiny_sd_artifact)!r}, "--profile", {str(sd_profile)!r}, "--threads", "1",
                  "--prompt", "a photo of a cat", "--budget", "500ms", "--out", {str(out)!r},
                  "--report", {str(rep)!r}], standalone_mode=False)
        finally:
            print("IMPORTED:", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "IMPORTED: []" in res.stdout, res.stdout
    r = json.loads(rep.read_text())
    assert r["steps"] >= 1 and r["encode_ms"] is not None and r["decode_ms"] is not None and out.is_file()


# ------------------------------------------------------------------------------ requests, plans, refusals
def test_encoding_inside_the_clock_reserved_then_cached(tiny_sd_artifact, sd_profile):
    """A new prompt's encoding tail is reserved before planning (and counts in the refusal minimum); a
    repeated prompt (and the default negative "", encoded at warm-up) is cached: nothing reserved."""
    from abcd_edge.runtime.session import AnytimeRuntime

    with AnytimeRuntime.open(tiny_sd_artifact, profile=sd_profile, controller="none", threads=1) as rt:
        tail = rt.profile.pipeline.components["text_encoder"].latency.p99_ms
        step = rt.cost_model(1, "ddim", correction=1.0)
        assert rt.minimum_ms() == pytest.approx(step.minimum_ms() + tail)
        _, first = rt.generate("500ms", prompt="the red car")
        _, again = rt.generate("500ms", prompt="the red car", seed=1)
        assert first.reserved_encode_ms == pytest.approx(tail, rel=1e-3) and first.deadline_met
        assert again.reserved_encode_ms == 0 and any("cached" in n for n in again.notes)
        assert first.latency_ms >= first.encode_ms + first.decode_ms
        # guidance 1: one UNet branch, its own (faster) step profile
        _, single = rt.generate("500ms", prompt="the red car", guidance=1.0)
        assert single.guidance_mode == "single" and single.guidance == 1.0
        assert rt.batch_profile(1, branches=1).step.p50_ms == rt.profile.pipeline.components["unet_b1"].latency.p50_ms


def test_long_prompt_truncated_with_a_note(tiny_sd_artifact, sd_profile, tmp_path):
    rep = tmp_path / "r.json"
    res = cli("run", "--artifact", tiny_sd_artifact, "--profile", sd_profile, "--threads", 1, "--prompt", LONG_PROMPT,
              "--budget", "500ms", "--out", tmp_path / "o.png", "--report", rep)
    assert res.exit_code == 0, res.output
    r = json.loads(rep.read_text())
    assert r["prompt_truncated"] is True and r["prompt_tokens"] > 77
    assert any("prompt truncated" in n and "77" in n for n in r["notes"])


def test_prompt_file_utf8(tiny_sd_artifact, sd_profile, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("café on mars\n", encoding="utf-8")
    rep = tmp_path / "r.json"
    res = cli("run", "--artifact", tiny_sd_artifact, "--profile", sd_profile, "--threads", 1, "--prompt-file", f,
              "--budget", "500ms", "--out", tmp_path / "o.png", "--report", rep)
    assert res.exit_code == 0, res.output
    assert json.loads(rep.read_text())["prompt"] == "café on mars"


def _bad_cases(tmp: Path, sd: Path, prof: Path) -> list[tuple[list, str]]:
    latin1 = tmp / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    common = ["--artifact", sd, "--profile", prof, "--threads", 1]
    return [
        (["run", "--artifact", paths.DEMO_ARTIFACT_DIR, "--budget", "150ms", "--prompt", "a cat"], "pixel-space"),
        (["run", "--budget", "150ms", "--guidance", "7"], "pixel-space"),     # no prompt: the pixel demo artifact
        (["run", *common, "--budget", "500ms", "--guidance", "0.5"], "--guidance 0.5"),
        (["run", *common, "--budget", "500ms", "--guidance", "nan"], "--guidance nan"),
        (["run", *common, "--budget", "500ms", "--prompt-file", latin1], "not UTF-8"),
        (["run", *common, "--budget", "500ms", "--prompt-file", tmp / "none.txt"], "does not exist"),
        (["run", *common, "--budget", "500ms", "--prompt", "a", "--prompt-file", latin1], "not both"),
        (["run", *common, "--budget", "500ms", "--decoder", "tiny"], "vae_decoder_tiny"),
        (["run", *common, "--budget", "0.5ms", "--prompt", "a brand new prompt"], "prompt encoding + one step + decode"),
        (["run", *common, "--budget", "500ms", "--batch", "2"], "one image per request"),
    ]


def test_bad_inputs_one_line_exit_2_nothing_written(tiny_sd_artifact, sd_profile, tmp_path):
    for args, needle in _bad_cases(tmp_path, tiny_sd_artifact, sd_profile):
        out, rep = tmp_path / "o.png", tmp_path / "r.json"
        res = cli(*args, "--out", out, "--report", rep)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2, (args, res.output)
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.output, (args, res.output)
        assert not out.exists() and not rep.exists(), args
    res = cli("profile", "--artifact", tiny_sd_artifact, "--batch", "1,2", "--runs", 5, "--out", tmp_path / "p.json")
    assert res.exit_code == 2 and "batch 1" in res.output and not (tmp_path / "p.json").exists()


def test_guided_modes_agree_and_split_stops_after_abandon(tiny_sd_artifact):
    from abcd_edge.device.backends import Abandoned, open_denoiser
    from abcd_edge.formats.manifest import load_manifest
    from abcd_edge.device.pipeline import GuidedDenoiser, open_pipeline

    manifest = load_manifest(tiny_sd_artifact)
    pl = open_pipeline(tiny_sd_artifact, manifest, open_denoiser(tiny_sd_artifact, threads=1), threads=1)
    cond, uncond = pl.encoder.embed("a photo of a cat")[0], pl.encoder.embed("")[0]
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    t = np.full(1, 500.0, np.float32)
    b2 = pl.denoiser(cond, uncond, 7.5, "batch2")(x, t)
    split = pl.denoiser(cond, uncond, 7.5, "split")(x, t)
    assert np.abs(b2 - split).max() <= 1e-5 * max(1.0, float(np.abs(b2).max()))
    assert np.array_equal(pl.denoiser(cond, uncond, 1.0, "batch2")(x, t),
                          pl.unet(x, t, encoder_hidden_states=cond))          # w = 1: one branch, cond only

    calls = []

    class FakeUNet:                 # the guard fires while the first of the two calls runs
        backend = "ort-cpu"

        def __call__(self, sample, timestep, **kw):
            calls.append(kw["encoder_hidden_states"])
            den.abandon()
            return np.zeros_like(sample)

        def abandon(self):
            pass
    den = GuidedDenoiser(FakeUNet(), cond, uncond, 7.5, "split")
    with pytest.raises(Abandoned):
        den(x, t)
    assert len(calls) == 1


def test_pixel_profiles_load_unchanged():
    """Committed pixel-artifact profiles (no pipeline field) still load; their pipeline is None."""
    from abcd_edge.formats.profile import DeviceProfile

    paths = sorted((ROOT / "profiles").glob("*.json"))
    assert paths
    for path in paths[:3]:
        prof = DeviceProfile.from_json(json.loads(path.read_text()), str(path))
        assert prof.pipeline is None


def test_latent_pipeline_without_text_runs_and_refuses_a_prompt(tmp_path):
    """The LDM layout (a latent UNet2DModel + vae/, no text encoder): steps over latents, finishes with the
    decode; a prompt or guidance is refused in one line."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

    from abcd_edge.export import export_model
    from abcd_edge.profiling.measure import measure_profile

    torch.manual_seed(0)
    root = tmp_path / "ldm"
    UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4).save_pretrained(root / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=4, sample_size=16).save_pretrained(root / "vae")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  clip_sample=False).save_pretrained(root / "scheduler")
    art = tmp_path / "ldm-art"
    export_model(str(root), art, batches=(1, 2), progress=False, threads=1)
    prof = measure_profile(art, threads=1, runs=30, warmup=5, power="none", progress=False)
    assert set(prof.pipeline.components) == {"unet_b1", "vae_decoder"} and prof.pipeline.guidance_mode == "none"
    prof.save(tmp_path / "p.json")
    rep = tmp_path / "r.json"
    res = cli("run", "--artifact", art, "--profile", tmp_path / "p.json", "--threads", 1, "--budget", "300ms",
              "--out", tmp_path / "o.png", "--report", rep)
    assert res.exit_code == 0, res.output
    r = json.loads(rep.read_text())
    assert r["steps"] >= 1 and r["deadline_met"] and r["decode_ms"] > 0 and r["encode_ms"] is None
    assert r["guidance_mode"] == "single" and "encode" not in res.output and "decode" in res.output
    for flag, value in (("--prompt", "a cat"), ("--guidance", "3")):
        res = cli("run", "--artifact", art, "--profile", tmp_path / "p.json", "--budget", "300ms", flag, value,
                  "--out", tmp_path / "x.png", "--report", tmp_path / "x.json")
        assert res.exit_code == 2 and "no text encoder" in res.output and not (tmp_path / "x.png").exists()


def test_pipeline_sessions_do_not_spin_on_each_others_cores(tiny_sd_artifact, tiny_artifact):
    """A pipeline's text encoder, UNet and decoders take turns on the same cores: their idle ONNX Runtime workers
    must not spin (measured here: with spinning, 2-thread requests of the latent demo ran 40 % slower than the
    profile and 10 % missed 150 ms). A pixel artifact's single session keeps ORT's default."""
    from abcd_edge.device.backends import open_denoiser
    from abcd_edge.device.pipeline import open_pipeline
    from abcd_edge.formats.manifest import load_manifest

    def spins(component) -> str:
        try:
            return component.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:        # ONNX Runtime: no such entry set, its default (spinning)
            return "default"

    unet = open_denoiser(tiny_sd_artifact, threads=2)
    pl = open_pipeline(tiny_sd_artifact, load_manifest(tiny_sd_artifact), unet, threads=2)
    assert spins(unet) == spins(pl.encoder.model) == "0"
    assert pl.decoders and all(spins(d) == "0" for d in pl.decoders.values())
    assert spins(open_denoiser(tiny_artifact, threads=2)) == "default"
