"""The latent demo's components: configs (presets) and builders.

    vae           AutoencoderKL, 128 x 128 x 3 <-> 16 x 16 x 4 (4 blocks: 3 downsamplings), no mid-block attention
                  (fully convolutional, so it trains on crops)
    text_encoder  CLIPTextModel over the caption tokenizer (:mod:`.tokenizer`), positions = model_max_length
    unet          UNet2DConditionModel on 16 x 16 x 4 latents, cross-attention to the text encoder's hidden states
    scheduler     SD 1.x's: scaled_linear betas 0.00085..0.012 over 1000 steps, epsilon prediction (DDPM for
                  training, DDIM in the saved folder, set_alpha_to_one False, steps_offset 1)

``PRESETS["full"]`` is the shipped model; ``PRESETS["tiny"]`` the same shapes with minimal widths (tests).
torch, diffusers and transformers are imported inside functions.
"""
from __future__ import annotations

import copy

from abcd_edge.demo.latent import tokenizer as tok

RESOLUTION = 128
LATENT_CHANNELS = 4
NOISE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
             prediction_type="epsilon")
DDIM_EXTRA = dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)

_ENC = ("DownEncoderBlock2D",) * 4
_DEC = ("UpDecoderBlock2D",) * 4

PRESETS: dict[str, dict] = {
    "full": {
        "resolution": RESOLUTION,
        "vae": dict(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(16, 32, 64, 64),
                    down_block_types=_ENC, up_block_types=_DEC, layers_per_block=1, norm_num_groups=8,
                    sample_size=RESOLUTION, mid_block_add_attention=False),
        "text": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                     projection_dim=128),
        "unet": dict(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
                     block_out_channels=(32, 64, 128),      # 16 x 16, 8 x 8, 4 x 4 (+ a cross-attention mid block)
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     attention_head_dim=4, norm_num_groups=16),    # attention_head_dim: heads (diffusers' naming)
    },
    # tests: the same layout (128 px, 16 x 16 x 4 latents) with minimal widths
    "tiny": {
        "resolution": RESOLUTION,
        "vae": dict(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(4, 4, 8, 8),
                    down_block_types=_ENC, up_block_types=_DEC, layers_per_block=1, norm_num_groups=2,
                    sample_size=RESOLUTION, mid_block_add_attention=False),
        "text": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     projection_dim=16),
        "unet": dict(in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
                     block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, norm_num_groups=4),
    },
}


def preset(name: str) -> dict:
    if name not in PRESETS:
        raise ValueError(f"preset {name!r}: accepted {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def latent_size(cfg: dict) -> int:
    return cfg["resolution"] // 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)


def build_vae(cfg: dict):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**cfg["vae"])


def text_config(cfg: dict):
    from transformers import CLIPTextConfig

    t = tok.info()
    return CLIPTextConfig(vocab_size=t["vocab_size"], max_position_embeddings=t["model_max_length"],
                          bos_token_id=t["bos_token_id"], eos_token_id=t["eos_token_id"],
                          pad_token_id=t["pad_token_id"], **cfg["text"])


def build_text_encoder(cfg: dict):
    from transformers import CLIPTextModel

    return CLIPTextModel(text_config(cfg))


def build_unet(cfg: dict):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=latent_size(cfg), cross_attention_dim=cfg["text"]["hidden_size"],
                                **cfg["unet"])


def build_noise_scheduler():
    """The training schedule (DDPMScheduler)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**NOISE, clip_sample=False)


def build_sampling_scheduler():
    """The saved folder's scheduler: DDIM as SD 1.5 ships it."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**NOISE, **DDIM_EXTRA)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())
