"""Export of latent pipeline folders (issue 15): Stable-Diffusion-style text-to-image, LCM, and the LDM layout.

The tiny pipelines come from tests/sd_fixtures.py (random weights, seconds to build and export).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from abcd_edge.cli.main import main
from abcd_edge.errors import UserError
from abcd_edge.formats.manifest import Manifest, content_hash, load_manifest, manifest_hash, sha256_file
from tests.conftest import one_line_error, snapshot
from tests.sd_fixtures import LCM_MAX_LENGTH, SD_MAX_LENGTH, TEXT_HIDDEN, TIME_COND_PROJ_DIM, build_tiny_pipeline

PROMPTS = ("a photo of a cat", "", "An ASTRONAUT riding a horse on Mars!", "naïve café 東京 🚀",
           "a red car on mars " * 30)


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


@pytest.fixture()
def existing_out(tmp_path) -> Path:
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier artifact")
    return out


# ======================================================================== export through the CLI
@pytest.mark.parametrize("which", ["sd", "lcm"])
def test_cli_export_validates_and_reexport_gives_the_same_hash(which, request, tmp_path):
    folder = request.getfixturevalue(f"tiny_{which}_dir")
    artifact = request.getfixturevalue(f"tiny_{which}_artifact")        # export_model at batches 1..2
    out = tmp_path / "again"
    res = CliRunner().invoke(main, ["export", "--model", str(folder), "--out", str(out), "--batch", "1,2"])
    assert res.exit_code == 0, res.output
    line = res.output.strip().splitlines()[-1]
    assert "text-to-image pipeline" in line and "unet" in line and "vae_decoder" in line and "parity max rel" in line
    m = load_manifest(out)                                                # every listed file's sha256 verified
    first = load_manifest(artifact)
    assert manifest_hash(out) == manifest_hash(artifact) == content_hash(m)
    assert m.files == first.files                                        # the same bytes, component by component
    assert m.model_kind == "text-to-image" and m.denoiser_file == "unet/model.onnx" and m.is_pipeline
    expect = {"unet/model.onnx", "text_encoder/model.onnx", "vae_decoder/model.onnx", "tokenizer/tokenizer.json"}
    if which == "lcm":
        expect.add("vae_decoder_tiny/model.onnx")
    assert set(m.files) == expect
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == sorted(
        expect | {"manifest.json"})


def test_sd_manifest_records_components_shapes_and_conventions(tiny_sd_artifact):
    m = load_manifest(tiny_sd_artifact)
    p = m.pipeline
    assert set(p["components"]) == {"unet", "text_encoder", "vae_decoder"} and p["decoders"] == ["vae_decoder"]
    for name, c in p["components"].items():
        assert c["parity"]["passed"] and c["parity"]["max_rel"] <= 1e-4 and c["parity"]["tol"] == 1e-4, name
        assert c["flops"] > 0 and c["flops_rel_diff"] <= 0.05 and c["params"] > 0, name
        assert m.component_file(name) == c["file"] == f"{name}/model.onnx"
    unet = p["components"]["unet"]
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet["inputs"][2]["shape"] == ["batch", SD_MAX_LENGTH, TEXT_HIDDEN]
    assert unet["outputs"] == [{"name": "out_sample", "dtype": "float32", "shape": ["batch", 4, 8, 8]}]
    assert unet["parity"]["batches"] == [1, 2, 4]                   # classifier-free guidance doubles the batch
    assert m.inputs == unet["inputs"] and m.flops_per_step == unet["flops"] and (m.channels, m.resolution) == (4, 8)
    assert p["components"]["text_encoder"]["inputs"] == [{"name": "input_ids", "dtype": "int64",
                                                          "shape": ["batch", SD_MAX_LENGTH]}]
    assert p["components"]["vae_decoder"]["outputs"][0]["shape"] == ["batch", 3, 16, 16]
    assert p["latent"] == {"channels": 4, "size": 8, "vae_scale_factor": 2, "scaling_factor": 0.18215,
                           "shift_factor": None}
    assert p["image"] == {"resolution": 16, "channels": 3}
    assert p["text"] == {"hidden_size": TEXT_HIDDEN, "max_length": SD_MAX_LENGTH}
    assert p["guidance"]["time_cond_proj_dim"] is None and p["guidance"]["default_scale"] == 7.5
    tok = p["tokenizer"]
    assert tok["file"] == "tokenizer/tokenizer.json" and tok["model_max_length"] == SD_MAX_LENGTH
    assert tok["checked_against"] == "transformers.CLIPTokenizer" and tok["bos_token_id"] != tok["eos_token_id"]
    assert m.scheduler_config["_class_name"] == "DDIMScheduler" and m.prediction_type == "epsilon"
    assert len(m.alphas_cumprod) == 1000


def test_lcm_manifest_has_the_guidance_embedding_input_and_the_tiny_decoder(tiny_lcm_artifact):
    m = load_manifest(tiny_lcm_artifact)
    p = m.pipeline
    unet = p["components"]["unet"]
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    assert unet["inputs"][3]["shape"] == ["batch", TIME_COND_PROJ_DIM]
    assert unet["parity"]["batches"] == [1, 2]                      # an LCM UNet runs one branch: no doubling
    assert p["guidance"]["time_cond_proj_dim"] == TIME_COND_PROJ_DIM and p["guidance"]["default_scale"] == 8.5
    assert p["decoders"] == ["vae_decoder", "vae_decoder_tiny"]
    tiny = p["components"]["vae_decoder_tiny"]
    assert tiny["inputs"] == p["components"]["vae_decoder"]["inputs"]
    assert tiny["outputs"] == p["components"]["vae_decoder"]["outputs"] and tiny["parity"]["max_rel"] <= 1e-4
    assert p["text"]["max_length"] == LCM_MAX_LENGTH and m.scheduler_config["_class_name"] == "LCMScheduler"


# ============================================================ the ONNX agrees with diffusers' pipeline
def test_onnx_text_encoder_and_decoder_match_the_diffusers_pipeline(tiny_sd_dir, tiny_sd_artifact):
    """tokenizer.json + text_encoder ONNX == StableDiffusionPipeline.encode_prompt; vae_decoder ONNX ==
    vae.decode(latents / scaling_factor) as the pipeline calls it; the UNet ONNX == pipe.unet."""
    import onnxruntime as ort
    import torch
    from diffusers import StableDiffusionPipeline
    from tokenizers import Tokenizer

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None,
                                                   requires_safety_checker=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = {n: ort.InferenceSession(str(tiny_sd_artifact / n / "model.onnx"), so, providers=["CPUExecutionProvider"])
            for n in ("unet", "text_encoder", "vae_decoder")}
    tok = Tokenizer.from_file(str(tiny_sd_artifact / "tokenizer" / "tokenizer.json"))
    ids = np.asarray([tok.encode(p).ids for p in PROMPTS], np.int64)
    ours = sess["text_encoder"].run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        theirs = pipe.encode_prompt(list(PROMPTS), "cpu", 1, False)[0].numpy()
    assert ours.shape == theirs.shape == (len(PROMPTS), SD_MAX_LENGTH, TEXT_HIDDEN)
    assert np.max(np.abs(ours - theirs)) <= 1e-4 * np.max(np.abs(theirs))
    latents = np.random.default_rng(5).standard_normal((2, 4, 8, 8)).astype(np.float32)
    img = sess["vae_decoder"].run(None, {"latent": latents})[0]
    with torch.no_grad():
        ref = pipe.vae.decode(torch.from_numpy(latents) / pipe.vae.config.scaling_factor, return_dict=False)[0].numpy()
    assert np.max(np.abs(img - ref)) <= 1e-4 * np.max(np.abs(ref))
    t = np.array([981.0, 1.0], np.float32)
    eps = sess["unet"].run(None, {"sample": latents, "timestep": t, "encoder_hidden_states": ours[:2]})[0]
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(latents), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(
            ours[:2])).sample.numpy()
    assert np.max(np.abs(eps - ref)) <= 1e-4 * np.max(np.abs(ref))


# ======================================================================================= tokenizer
def test_tokenizer_json_equals_clip_tokenizer_token_for_token(tiny_lcm_dir, tiny_lcm_artifact):
    """The runtime's view (tokenizers only, nothing re-configured) equals transformers' CLIPTokenizer, truncation
    (EOS kept, overflowing set) and max-length padding included."""
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    ref = CLIPTokenizer.from_pretrained(str(tiny_lcm_dir / "tokenizer"))
    tok = Tokenizer.from_file(str(tiny_lcm_artifact / "tokenizer" / "tokenizer.json"))
    L = LCM_MAX_LENGTH
    for prompt in PROMPTS + ("<|endoftext|>", "dog " * (L - 2), "dog " * (L - 1)):
        enc = tok.encode(prompt)
        want = ref(prompt, padding="max_length", truncation=True, max_length=L).input_ids
        assert enc.ids == want, prompt
        assert len(enc.ids) == L and enc.ids[0] == ref.bos_token_id and ref.eos_token_id in enc.ids
        assert bool(enc.overflowing) == (len(ref(prompt).input_ids) > L), prompt
    assert not tok.encode("dog " * (L - 2)).overflowing and tok.encode("dog " * (L - 1)).overflowing


def test_a_different_tokenizer_json_is_detected(tiny_sd_dir, tiny_sd_artifact, tmp_path):
    from tokenizers import Tokenizer, normalizers

    from abcd_edge.export.errors import ExportError
    from abcd_edge.export.tokenizer import check_tokenizer_json, export_tokenizer, reference_tokenizer

    ref, built_from = reference_tokenizer(tiny_sd_dir / "tokenizer")
    assert built_from == "vocab.json + merges.txt"
    good = tiny_sd_artifact / "tokenizer" / "tokenizer.json"
    assert check_tokenizer_json(good, ref, SD_MAX_LENGTH) == []
    # 1. no lower-casing: "A PHOTO" tokenizes differently
    bad = Tokenizer.from_file(str(good))
    bad.normalizer = normalizers.NFC()
    bad.save(str(tmp_path / "nolower.json"))
    found = check_tokenizer_json(tmp_path / "nolower.json", ref, SD_MAX_LENGTH)
    assert found and "PHOTO" in found[0] and "ids differ" in found[0]
    # 2. no padding baked in: lengths differ
    bad = Tokenizer.from_file(str(good))
    bad.no_padding()
    bad.save(str(tmp_path / "nopad.json"))
    assert any("lengths" in line for line in check_tokenizer_json(tmp_path / "nopad.json", ref, SD_MAX_LENGTH))
    # 3. a folder shipping a tokenizer.json that disagrees with its own vocab.json + merges.txt: export refuses
    tok_dir = _copy(tiny_sd_dir / "tokenizer", tmp_path / "tok")
    shutil.copy(tmp_path / "nolower.json", tok_dir / "tokenizer.json")
    with pytest.raises(ExportError, match="tokenizer check failed: .* differ from transformers' CLIPTokenizer"):
        export_tokenizer(tok_dir, tmp_path / "out" / "tokenizer")
    # ... and through the CLI: one line, exit 2, an existing --out untouched
    folder = _copy(tiny_sd_dir, tmp_path / "pipe")
    shutil.copy(tmp_path / "nolower.json", folder / "tokenizer" / "tokenizer.json")
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = CliRunner().invoke(main, ["export", "--model", str(folder), "--out", str(out)])
    one_line_error(res, "tokenizer check failed", "folder's tokenizer.json")
    assert snapshot(out) == {"keep.txt": b"x"} and sorted(p.name for p in tmp_path.iterdir()) == [
        "existing", "nolower.json", "nopad.json", "out", "pipe", "tok"]


def test_a_matching_shipped_tokenizer_json_is_used(tiny_sd_dir, tiny_sd_artifact, tmp_path):
    from abcd_edge.export.tokenizer import export_tokenizer

    tok_dir = _copy(tiny_sd_dir / "tokenizer", tmp_path / "tok")
    shutil.copy(tiny_sd_artifact / "tokenizer" / "tokenizer.json", tok_dir / "tokenizer.json")
    rec = export_tokenizer(tok_dir, tmp_path / "out" / "tokenizer", max_positions=SD_MAX_LENGTH)
    assert rec["source"].startswith("the folder's tokenizer.json (checked against its vocab.json + merges.txt)")
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").read_bytes() == (
        tiny_sd_artifact / "tokenizer" / "tokenizer.json").read_bytes()


# ======================================================================================== refusals
def _refused(model: Path, out: Path, *needles: str) -> None:
    before = snapshot(out) if out.exists() else None
    res = CliRunner().invoke(main, ["export", "--model", str(model), "--out", str(out)])
    one_line_error(res, *needles)
    assert (snapshot(out) if out.exists() else None) == before          # nothing written
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]   # no temp folder left


def test_transformer_backbones_are_refused(tmp_path, existing_out):
    folder = tmp_path / "pixart"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "PixArtTransformer2DModel"}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline",
                                                         "transformer": ["diffusers", "PixArtTransformer2DModel"]}))
    _refused(folder, existing_out, "PixArtAlphaPipeline", "transformer/", "PixArtTransformer2DModel",
             "not supported", "accepted: a StableDiffusionPipeline-layout folder")
    _refused(folder, tmp_path / "new", "PixArtTransformer2DModel")


def test_sdxl_second_text_encoder_is_refused(tiny_sd_dir, tmp_path, existing_out):
    folder = _copy(tiny_sd_dir, tmp_path / "sdxl")
    (folder / "text_encoder_2").mkdir()
    (folder / "text_encoder_2" / "config.json").write_text(json.dumps(
        {"architectures": ["CLIPTextModelWithProjection"]}))
    _refused(folder, existing_out, "text_encoder_2/", "CLIPTextModelWithProjection", "SDXL", "accepted:")


@pytest.mark.parametrize("missing", ["text_encoder", "vae", "tokenizer", "scheduler", "unet"])
def test_a_missing_component_is_one_line(missing, tiny_sd_dir, tmp_path, existing_out):
    folder = _copy(tiny_sd_dir, tmp_path / "pipe")
    shutil.rmtree(folder / missing)
    _refused(folder, existing_out, "missing component", missing)
    _refused(folder, tmp_path / "fresh", "missing component")


@pytest.mark.parametrize("edit,needles", [
    (lambda f: _edit_config(f / "unet", _class_name="UNetSpatioTemporalConditionModel"),
     ("UNetSpatioTemporalConditionModel", "not supported")),
    (lambda f: _edit_config(f / "unet", in_channels=9), ("9 channels", "inpainting")),
    (lambda f: _edit_config(f / "unet", addition_embed_type="text_time"), ("addition_embed_type", "SDXL")),
    (lambda f: _edit_config(f / "vae", _class_name="AutoencoderKLTemporalDecoder"),
     ("vae/ is AutoencoderKLTemporalDecoder", "accepted: AutoencoderKL")),
    (lambda f: _edit_config(f / "text_encoder", architectures=["T5EncoderModel"]),
     ("text_encoder/ is T5EncoderModel", "accepted: CLIPTextModel")),
    (lambda f: (f / "vae" / "diffusion_pytorch_model.safetensors").unlink(), ("vae", "no weights")),
    (lambda f: (f / "tokenizer" / "merges.txt").unlink(), ("tokenizer", "vocab.json + merges.txt")),
])
def test_unsupported_or_broken_components_are_one_line(edit, needles, tiny_sd_dir, tmp_path, existing_out):
    folder = _copy(tiny_sd_dir, tmp_path / "pipe")
    edit(folder)
    _refused(folder, existing_out, *needles)


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_a_component_of_another_pipeline_is_refused(tiny_sd_dir, tmp_path, existing_out):
    """A text encoder whose width is not the UNet's cross-attention width, a tokenizer longer than the text
    encoder's positions, a VAE with other latent channels: one line each, nothing written."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = _copy(tiny_sd_dir, tmp_path / "pipe")
    cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    torch.manual_seed(0)
    shutil.rmtree(folder / "text_encoder")
    CLIPTextModel(CLIPTextConfig(vocab_size=cfg["vocab_size"], hidden_size=32, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=SD_MAX_LENGTH)).save_pretrained(folder / "text_encoder")
    _refused(folder, existing_out, "32-wide", "cross_attention_dim is 16", "another pipeline")
    folder2 = _copy(tiny_sd_dir, tmp_path / "pipe2")
    cfg = json.loads((folder2 / "tokenizer" / "tokenizer_config.json").read_text())
    (folder2 / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(dict(cfg, model_max_length=100)))
    _refused(folder2, existing_out, "model_max_length 100 exceeds", "max_position_embeddings 77")
    folder3 = _copy(tiny_sd_dir, tmp_path / "pipe3")
    shutil.rmtree(folder3 / "vae")
    AutoencoderKL(latent_channels=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(folder3 / "vae")
    _refused(folder3, existing_out, "8 latent channels", "another pipeline")


def test_fp16_per_component_drift_reported_and_run(tiny_lcm_dir, tiny_lcm_artifact, tmp_path):
    """`export --fp16` writes <component>/model.fp16.onnx with its drift from fp32; `--precision fp16` runs
    them (an image close to fp32's); an artifact without fp16 copies refuses --precision fp16 in one line."""
    import json

    from abcd_edge.formats.manifest import load_manifest, manifest_hash

    out = tmp_path / "a16"
    res = CliRunner().invoke(main, ["export", "--model", str(tiny_lcm_dir), "--out", str(out), "--fp16"])
    assert res.exit_code == 0, res.output
    m = load_manifest(out)                                  # files (fp16 ones too) verified by their sha256
    for name, rec in m.pipeline["components"].items():
        f16 = rec["fp16"]
        assert (out / f16["file"]).is_file() and f16["file"] in m.files and f16["file"] == f"{name}/model.fp16.onnx"
        assert 0 < f16["drift_max_rel"] <= f16["bound_rel"] and f16["usable"], (name, f16)
        assert m.component_file(name, "fp16") == f16["file"] and m.component_file(name) == rec["file"]
    assert manifest_hash(out) != manifest_hash(tiny_lcm_artifact)     # it computes in another precision
    images = {}
    for precision in ("fp32", "fp16"):
        prof = tmp_path / f"{precision}.json"
        r = CliRunner().invoke(main, ["profile", "--artifact", str(out), "--threads", "1", "--runs", "20",
                                      "--power", "none", "--precision", precision, "--out", str(prof)])
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(main, ["run", "--artifact", str(out), "--profile", str(prof), "--threads", "1",
                                      "--precision", precision, "--prompt", "a photo of a cat", "--budget", "2s",
                                      "--sampler", "lcm", "--out", str(tmp_path / f"{precision}.png"),
                                      "--report", str(tmp_path / f"{precision}-report.json")])
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / f"{precision}-report.json").read_text())["steps"] == 8
        from PIL import Image
        images[precision] = np.asarray(Image.open(tmp_path / f"{precision}.png"), np.float64)
    diff = np.abs(images["fp16"] - images["fp32"])
    assert diff.mean() < 2.0 and diff.max() <= 16, (diff.mean(), diff.max())
    res = CliRunner().invoke(main, ["run", "--artifact", str(tiny_lcm_artifact), "--precision", "fp16", "--threads",
                                    "1", "--budget", "1s", "--prompt", "a cat", "--out", str(tmp_path / "x.png")])
    one_line_error(res, "--precision fp16", "has no fp16 components")
    assert not (tmp_path / "x.png").exists()


# ===================================================================== LDM layout, external data
@pytest.fixture(scope="module")
def tiny_ldm_dir(tmp_path_factory) -> Path:
    """The LDM layout: a latent UNet2DModel (4 x 8 x 8) + vae/ AutoencoderKL + scheduler/, model_index.json."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

    root = tmp_path_factory.mktemp("ldm") / "pipe"
    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4).save_pretrained(root / "unet")
    AutoencoderKL(latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  scaling_factor=0.5).save_pretrained(root / "vae")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                                       "vae": ["diffusers", "AutoencoderKL"],
                                                       "scheduler": ["diffusers", "DDIMScheduler"]}))
    return root


def test_ldm_layout_exports_with_external_data(tiny_ldm_dir, tmp_path):
    """A latent UNet2DModel + vae/ goes through the same decode path (no text); external data forced on
    (threshold 0) takes the > 2 GB code path: every component's weights in model.onnx.data, hashed, checked."""
    import onnxruntime as ort

    from abcd_edge.export import export_model

    m = export_model(str(tiny_ldm_dir), tmp_path / "ldm", batches=(1, 2), progress=False, threads=1,
                     external_data=True)
    assert m.model_kind == "unconditional" and m.external_data and m.pipeline["text"] is None
    assert m.pipeline["tokenizer"] is None and set(m.pipeline["components"]) == {"unet", "vae_decoder"}
    assert set(m.files) == {"unet/model.onnx", "unet/model.onnx.data", "vae_decoder/model.onnx",
                            "vae_decoder/model.onnx.data"}
    assert [i["name"] for i in m.inputs] == ["sample", "timestep"] and m.pipeline["latent"]["scaling_factor"] == 0.5
    assert m.pipeline["components"]["unet"]["parity"]["batches"] == [1, 2]       # no guidance: no doubling
    assert all(c["external_data"] and c["parity"]["max_rel"] <= 1e-4 for c in m.pipeline["components"].values())
    load_manifest(tmp_path / "ldm")
    for name, c in m.pipeline["components"].items():                            # the weights are beside it
        assert (tmp_path / "ldm" / name / "model.onnx.data").stat().st_size >= 0.9 * 4 * c["params"], name
    sess = ort.InferenceSession(str(tmp_path / "ldm" / "vae_decoder" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"latent": np.zeros((1, 4, 8, 8), np.float32)})[0].shape == (1, 3, 16, 16)


# ==================================================================== manifest: hashes and validation
def test_load_manifest_verifies_component_files(tiny_sd_artifact, tmp_path):
    art = _copy(tiny_sd_artifact, tmp_path / "art")
    m = load_manifest(art)
    for rel, digest in m.files.items():
        assert sha256_file(art / rel) == digest
    (art / "vae_decoder" / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(UserError, match=r"vae_decoder/model.onnx does not match its sha256"):
        load_manifest(art)
    load_manifest(art, verify_hashes=False)
    (art / "vae_decoder" / "model.onnx").unlink()
    with pytest.raises(UserError, match="missing vae_decoder/model.onnx"):
        load_manifest(art)
    shutil.rmtree(art / "vae_decoder")
    (art / "vae_decoder").symlink_to(tiny_sd_artifact / "vae_decoder")
    with pytest.raises(UserError, match="symbolic link"):
        load_manifest(art)


def test_content_hash_leaves_out_measured_numbers(tiny_sd_artifact):
    data = json.loads((tiny_sd_artifact / "manifest.json").read_text())
    base = content_hash(Manifest.from_dict(json.loads(json.dumps(data))))
    measured = json.loads(json.dumps(data))
    for comp in measured["pipeline"]["components"].values():
        comp["parity"]["max_abs"] = 0.5
        comp["flops"] += 7
        comp["flops_torch"] += 7
        comp["flops_rel_diff"] = 0.01
    measured["created_utc"] = "2000-01-01T00:00:00+00:00"
    measured["name"] = "elsewhere"
    assert content_hash(Manifest.from_dict(measured)) == base
    for path, value in ((("latent", "scaling_factor"), 0.13025), (("tokenizer", "model_max_length"), 76),
                        (("guidance", "default_scale"), 5.0)):
        changed = json.loads(json.dumps(data))
        changed["pipeline"][path[0]][path[1]] = value
        assert content_hash(Manifest.from_dict(changed)) != base, path
    changed = json.loads(json.dumps(data))
    changed["pipeline"]["components"]["unet"]["inputs"][2]["shape"][1] = 76
    assert content_hash(Manifest.from_dict(changed)) != base


def _bad(data: dict, edit, match: str) -> None:
    d = json.loads(json.dumps(data))
    edit(d)
    with pytest.raises(UserError, match=match):
        Manifest.from_dict(d)


def test_pipeline_manifest_validation_names_the_field(tiny_sd_artifact):
    data = json.loads((tiny_sd_artifact / "manifest.json").read_text())
    Manifest.from_dict(data)
    P = data["pipeline"]

    def set_(path, value):
        def edit(d):
            node = d
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = value
        return edit

    def rename_file(old, new):
        def edit(d):
            d["files"][new] = d["files"].pop(old)
        return edit

    _bad(data, set_(("pipeline",), None), "field 'pipeline' must be set for a text-to-image model")
    _bad(data, rename_file("vae_decoder/model.onnx", "weights/model.onnx"),
         r"entry 'weights/model.onnx' must be a plain file name inside the artifact or <component>/<file>")
    _bad(data, rename_file("vae_decoder/model.onnx", "../model.onnx"), "must be a plain file name")
    _bad(data, rename_file("vae_decoder/model.onnx", "vae_decoder/x/model.onnx"), "must be a plain file name")
    _bad(data, rename_file("unet/model.onnx", "unet/other.onnx"), "must list unet/model.onnx")
    _bad(data, set_(("pipeline", "components", "vae_decoder", "file"), "vae_decoder/missing.onnx"),
         "component 'vae_decoder' file 'vae_decoder/missing.onnx' is not listed in files")
    _bad(data, lambda d: d["pipeline"]["components"].pop("vae_decoder"), "must list the component 'vae_decoder'")
    _bad(data, lambda d: d["pipeline"]["components"].pop("text_encoder"), "'text_encoder' \\(text-to-image\\)")
    _bad(data, set_(("pipeline", "tokenizer"), None), "needs 'tokenizer'")
    _bad(data, set_(("pipeline", "tokenizer", "pad_token_id"), "49407"), "integer 'pad_token_id'")
    _bad(data, set_(("pipeline", "latent", "size"), 16), "latent 4 x 16 does not match")
    _bad(data, set_(("pipeline", "latent", "scaling_factor"), 0), "needs 'latent'")
    _bad(data, set_(("pipeline", "guidance", "time_cond_proj_dim"), 0), "needs 'guidance'")
    _bad(data, set_(("pipeline", "decoders"), ["vae_decoder_tiny"]), "needs 'decoders'")
    _bad(data, set_(("pipeline", "components", "unet", "parity"), {"max_abs": 0.0}), "component 'unet' needs 'parity'")
    _bad(data, set_(("pipeline", "components", "unet", "flops"), 0), "integer 'flops' > 0")
    _bad(data, set_(("model_kind",), "unconditional"), "must be 'text-to-image'")
    assert P["components"]["unet"]["file"] == "unet/model.onnx"
    # a pixel artifact may not use component folders
    pixel = json.loads(json.dumps(data))
    pixel.pop("pipeline")
    pixel["model_kind"] = "unconditional"
    pixel["files"] = {"denoiser.onnx": "a" * 64, "unet/model.onnx": "b" * 64}
    with pytest.raises(UserError, match="entry 'unet/model.onnx' must be a plain file name inside the artifact$"):
        Manifest.from_dict(pixel)
    with pytest.raises(UserError, match="no 'vae_decoder_tiny' component; it has: unet, text_encoder, vae_decoder"):
        Manifest.from_dict(data).component_file("vae_decoder_tiny")


def test_bundle_carries_component_folders(tiny_sd_artifact, tmp_path):
    from abcd_edge.formats.bundle import make_bundle

    out = make_bundle(tiny_sd_artifact, tmp_path / "bundle")
    assert manifest_hash(out) == manifest_hash(tiny_sd_artifact)
    assert load_manifest(out).files == load_manifest(tiny_sd_artifact).files


def test_fixture_folder_loads_in_diffusers_and_ships_only_slow_tokenizer_files(tiny_sd_dir, tmp_path):
    assert sorted(p.name for p in (tiny_sd_dir / "tokenizer").iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    index = json.loads((tiny_sd_dir / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    other = build_tiny_pipeline(tmp_path / "again", lcm=False)            # deterministic: the same weights
    assert sha256_file(other / "unet" / "diffusion_pytorch_model.safetensors") == sha256_file(
        tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
