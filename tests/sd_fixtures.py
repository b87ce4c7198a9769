"""Tiny Stable-Diffusion-shaped pipeline folders (random weights, built from configs like diffusers' own tiny test
pipelines) and their exports, as pytest fixtures (registered by tests/conftest.py's ``pytest_plugins``).

    tiny_sd_dir        StableDiffusionPipeline layout: unet/ (UNet2DConditionModel, latent 4 x 8 x 8, cross-attention
                       dim 16), vae/ (AutoencoderKL, 4 latent channels, scale factor 2 -> 16 px images),
                       text_encoder/ (CLIPTextModel, hidden 16, 2 layers), tokenizer/ (vocab.json + merges.txt
                       only, the slow files many SD folders ship; model_max_length 77), scheduler/ (DDIMScheduler,
                       scaled_linear like SD 1.5), model_index.json with safety_checker null
    tiny_lcm_dir       the same with time_cond_proj_dim on the UNet (LCM's guidance embedding), an LCMScheduler,
                       model_max_length 20, and a tiny decoder vae_tiny/ (AutoencoderTiny, same scale factor)
    tiny_sd_artifact   session-scoped exports of those through ``abcd_edge.export.export_model`` (batches 1..2)
    tiny_lcm_artifact

``build_tiny_pipeline(root, lcm=...)`` builds a folder anywhere (tests that break one copy it first).
Each folder builds in about a second; each export takes a few seconds on one thread.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

TEXT_HIDDEN = 16
SD_MAX_LENGTH = 77
LCM_MAX_LENGTH = 20
TIME_COND_PROJ_DIM = 16
# words the tiny BPE merges whole (everything else falls back to byte-level pieces, which are all in the vocab)
WORDS = ("a", "photo", "of", "cat", "dog", "the", "red", "car", "on", "mars", "astronaut", "riding", "horse")


def write_clip_tokenizer(folder: Path, model_max_length: int = SD_MAX_LENGTH) -> int:
    """A small CLIP BPE tokenizer as SD folders ship it (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json; no tokenizer.json). Returns the vocabulary size."""
    folder.mkdir(parents=True, exist_ok=True)
    from abcd_edge.demo.latent.tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[str] = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:            # merge left to right: "c a" -> "ca", "ca t</w>" -> "cat</w>"
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True,
         "errors": "replace", "add_prefix_space": False, **special}, indent=2))
    return len(vocab)


def build_tiny_pipeline(root: Path, lcm: bool = False, tiny_decoder: bool | None = None, seed: int = 0) -> Path:
    """A StableDiffusionPipeline-layout folder with random weights at ``root`` (see the module docstring)."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, DDIMScheduler, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    max_length = LCM_MAX_LENGTH if lcm else SD_MAX_LENGTH
    vocab_size = write_clip_tokenizer(root / "tokenizer", max_length)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=2, norm_num_groups=4,
        time_cond_proj_dim=TIME_COND_PROJ_DIM if lcm else None)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1,
                        norm_num_groups=4, sample_size=16)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    vocab = json.loads((root / "tokenizer" / "vocab.json").read_text())
    text_cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=max_length, projection_dim=TEXT_HIDDEN,
                              bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                              pad_token_id=vocab["<|endoftext|>"])
    CLIPTextModel(text_cfg).save_pretrained(root / "text_encoder", safe_serialization=True)
    if lcm:
        sched = LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", set_alpha_to_one=True, steps_offset=1,
                             prediction_type="epsilon", timestep_scaling=10.0, original_inference_steps=50)
    else:
        sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="epsilon")
    sched.save_pretrained(root / "scheduler")
    if tiny_decoder if tiny_decoder is not None else lcm:
        AutoencoderTiny(in_channels=3, out_channels=3, latent_channels=4, encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1),
                        upsampling_scaling_factor=2).save_pretrained(root / "vae_tiny", safe_serialization=True)
    pipe_cls = "LatentConsistencyModelPipeline" if lcm else "StableDiffusionPipeline"
    index = {"_class_name": pipe_cls, "_diffusers_version": "0.42.1",
             "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False, "safety_checker": [None, None],
             "scheduler": ["diffusers", type(sched).__name__], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny StableDiffusionPipeline folder (DDIM, 77-token prompts, 16 px images). Do not modify: copy it."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipe", lcm=False)


@pytest.fixture(scope="session")
def tiny_lcm_dir(tmp_path_factory) -> Path:
    """A tiny LCM folder (time_cond_proj_dim 16, LCMScheduler, 20-token prompts, vae_tiny/). Do not modify."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-lcm") / "pipe", lcm=True)


def _export(folder: Path, out: Path) -> Path:
    from abcd_edge.export import export_model

    export_model(str(folder), out, batches=(1, 2), progress=False, threads=1)
    return out


@pytest.fixture(scope="session")
def tiny_sd_artifact(tiny_sd_dir, tmp_path_factory) -> Path:
    """``tiny_sd_dir`` exported (unet/, text_encoder/, vae_decoder/, tokenizer/ + manifest.json)."""
    return _export(tiny_sd_dir, tmp_path_factory.mktemp("sd-artifacts") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_lcm_artifact(tiny_lcm_dir, tmp_path_factory) -> Path:
    """``tiny_lcm_dir`` exported (+ unet timestep_cond input, vae_decoder_tiny/)."""
    return _export(tiny_lcm_dir, tmp_path_factory.mktemp("sd-artifacts") / "tiny-lcm")
