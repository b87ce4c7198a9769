"""The latent demo (abcd_edge.demo.latent): its caption tokenizer against transformers' CLIPTokenizer, both training
stages on the tiny preset (a few steps, resumed from their checkpoints, an interrupted run resumable), and the saved
folder as StableDiffusionPipeline and the exporter take it."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from abcd_edge.demo.captions import captioned, vocabulary  # noqa: E402
from abcd_edge.demo.data import COLOUR_NAMES, KINDS  # noqa: E402
from abcd_edge.demo.latent import tokenizer as latent_tok  # noqa: E402
from abcd_edge.demo.latent.common import Options  # noqa: E402

TINY = dict(preset="tiny", threads=1, ckpt_every=2, vae_steps=2, vae_batch=2, vae_images=4, crop=32, scale_images=4,
            unet_steps=2, unet_batch=2, unet_images=4, sample_every=0, sample_steps=2, progress=False)


def _expected_ids(caption: str, vocab: dict) -> list[int]:
    words = caption.replace(",", " ,").split()
    ids = [vocab[latent_tok.BOS]] + [vocab[w + "</w>"] for w in words] + [vocab[latent_tok.EOS]]
    return ids + [vocab[latent_tok.EOS]] * (latent_tok.MODEL_MAX_LENGTH - len(ids))


def test_tokenizer_one_token_per_caption_word_as_clip_tokenizer_reads_it(tmp_path):
    info = latent_tok.write_tokenizer(tmp_path)
    tok = latent_tok.load_tokenizer(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert type(tok).__name__ == "CLIPTokenizer" and tok.model_max_length == latent_tok.MODEL_MAX_LENGTH
    assert info["vocab_size"] == len(tok) == len(vocab)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        info["bos_token_id"], info["eos_token_id"], info["pad_token_id"])
    for word in vocabulary():
        assert tok.tokenize(word) == [word + "</w>"], word
    kind, colour = max(KINDS, key=len), max(COLOUR_NAMES, key=len)
    worst = f"a {colour} {kind}, a {colour} {kind} and a {colour} {kind}"     # the most tokens a caption has
    captions = [worst, "three red circles", ""] + [captioned(1234, i, 8)[2] for i in range(150)]
    for caption in captions:
        got = tok(caption, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        assert got == _expected_ids(caption, vocab), caption
        assert len(tok(caption).input_ids) <= tok.model_max_length, caption
    assert len(tok("a " * 40).input_ids) > tok.model_max_length          # longer text is not silently short
    assert tok("photo of a café 🚀").input_ids[-1] == tok.eos_token_id   # other text: byte-level pieces


def test_exporter_tokenizer_check_accepts_it(tmp_path):
    from abcd_edge.export.tokenizer import export_tokenizer

    latent_tok.write_tokenizer(tmp_path / "tok")
    rec = export_tokenizer(tmp_path / "tok", tmp_path / "out", max_positions=latent_tok.MODEL_MAX_LENGTH)
    assert rec["model_max_length"] == latent_tok.MODEL_MAX_LENGTH and rec["prompts_checked"] > 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both stages on the tiny preset: 2 steps each, then rerun to 3 (resumed). (work, out, stdout of the runs)"""
    import contextlib
    import io

    import torch

    from abcd_edge.demo.latent.train import run

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("latent-demo")
    work, out = root / "work", root / "model"
    logs = []
    for steps in (2, 3):
        for stage in ("vae", "unet"):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                run(stage, work, out, Options(**{**TINY, "vae_steps": steps, "unet_steps": steps}), "pytest")
            logs.append((stage, steps, buf.getvalue()))
    return work, out, logs


def test_vae_stage_resumes_and_records_its_scaling_factor(trained):
    import torch

    work, _, logs = trained
    state = json.loads((work / "vae.ckpt" / "state.json").read_text())
    assert state["step"] == 3 and len(state["history"]["loss"]) == 3
    assert [e["step"] for e in state["evals"]] == [2, 3]
    assert any(stage == "vae" and steps == 3 and "resumed at step 2" in log for stage, steps, log in logs)
    optim = torch.load(work / "vae.ckpt" / "optim.pt", weights_only=True)
    assert all(int(s["step"]) == 3 for s in optim["state"].values())       # the optimiser continued, not restarted
    done = json.loads((work / "vae_stage.json").read_text())
    cfg = json.loads((work / "vae" / "config.json").read_text())
    assert done["steps"] == 3
    assert cfg["scaling_factor"] == pytest.approx(1 / done["latents"]["latent_std"])
    assert cfg["scaling_factor"] != pytest.approx(0.18215)
    assert (work / "vae_recon.png").is_file()


def test_unet_stage_resumes_and_writes_the_pipeline_folder(trained):
    import torch

    work, out, logs = trained
    state = json.loads((work / "unet.ckpt" / "state.json").read_text())
    assert state["step"] == 3 and len(state["history"]["loss"]) == 3
    assert any(stage == "unet" and steps == 3 and "resumed at step 2" in log for stage, steps, log in logs)
    optim = torch.load(work / "unet.ckpt" / "optim.pt", weights_only=True)
    assert all(int(s["step"]) == 3 for s in optim["state"].values())
    assert len(list(work.glob("latents_*.npz"))) == 1                     # encoded once, reused on resume
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDIMScheduler" and sched["set_alpha_to_one"] is False
    assert sched["steps_offset"] == 1 and sched["beta_schedule"] == "scaled_linear"
    info = json.loads((out / "training.json").read_text())
    assert info["unet_stage"]["steps"] == 3 and info["vae_stage"]["steps"] == 3
    assert info["unet_stage"]["final"] is True and (out / "README.md").is_file() and (out / "samples.png").is_file()
    for name in ("unet", "vae", "text_encoder"):
        assert list((out / name).glob("*.safetensors")), name
    from safetensors.torch import load_file

    saved = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))   # the EMA weights are shipped
    ema = load_file(str(work / "unet.ckpt" / "ema_unet.safetensors"))
    raw = load_file(str(work / "unet.ckpt" / "unet.safetensors"))
    assert all(torch.equal(saved[k], ema[k]) for k in ema)
    assert not all(torch.equal(saved[k], raw[k]) for k in raw)


def test_saved_folder_generates_with_stable_diffusion_pipeline(trained):
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    _, out, _ = trained
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer.model_max_length == latent_tok.MODEL_MAX_LENGTH
    img = pipe("two red circles and a blue triangle", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 128, 128, 3) and np.isfinite(img).all()


def test_exporter_accepts_the_saved_folder(trained, tmp_path):
    from abcd_edge.export import export_model

    _, out, _ = trained
    art = tmp_path / "art"
    export_model(str(out), art, batches=(1, 2), progress=False, threads=1)
    manifest = json.loads((art / "manifest.json").read_text())
    pipe = manifest["pipeline"]
    assert pipe["tokenizer"]["model_max_length"] == latent_tok.MODEL_MAX_LENGTH
    for name in ("unet", "text_encoder", "vae_decoder"):
        assert (art / name / "model.onnx").is_file(), name


def test_interrupted_stage_keeps_a_checkpoint_and_resumes(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from abcd_edge.demo.latent import common
    from abcd_edge.demo.latent.train import run

    work = tmp_path / "work"
    real = common.Progress.update

    def interrupt_at_3(self, step, **shown):
        real(self, step, **shown)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(common.Progress, "update", interrupt_at_3)
    opts = Options(**{**TINY, "vae_steps": 5, "ckpt_every": 100})
    with pytest.raises(SystemExit, match="interrupted"):
        run("vae", work, tmp_path / "model", opts, "pytest")
    assert json.loads((work / "vae.ckpt" / "state.json").read_text())["step"] == 3
    assert not (work / "vae").exists()
    monkeypatch.setattr(common.Progress, "update", real)
    run("vae", work, tmp_path / "model", Options(**{**TINY, "vae_steps": 3}), "pytest")   # nothing left to train:
    saved = load_file(str(work / "vae" / "diffusion_pytorch_model.safetensors"))        # the checkpoint's weights
    ckpt = load_file(str(work / "vae.ckpt" / "model.safetensors"))
    assert saved.keys() == ckpt.keys() and all(torch.equal(saved[k], ckpt[k]) for k in ckpt)
    run("vae", work, tmp_path / "model", opts, "pytest")
    state = json.loads((work / "vae.ckpt" / "state.json").read_text())
    assert state["step"] == 5 and len(state["history"]["loss"]) == 5
    assert (work / "vae" / "config.json").is_file()


def test_command_line_save_stage_and_refusals(trained, tmp_path):
    from abcd_edge.demo.latent.train import main

    work, _, _ = trained
    out = tmp_path / "again"
    main(["--stage", "save", "--preset", "tiny", "--work", str(work), "--out", str(out), "--no-progress"])
    assert json.loads((out / "training.json").read_text())["unet_stage"]["steps"] == 3
    with pytest.raises(SystemExit, match="preset"):                     # a work folder of another preset
        main(["--stage", "save", "--preset", "full", "--work", str(work), "--out", str(out)])
    with pytest.raises(SystemExit, match="vae stage first"):
        main(["--stage", "unet", "--preset", "tiny", "--work", str(tmp_path / "empty"), "--out", str(out)])
