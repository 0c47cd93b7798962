"""Model families as data: the diffusers config of each component, the noise schedule, the
native resolution. Nothing here is a code path; the models read these dicts like any config.json."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Preset:
    denoiser: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any] | None  # transformers CLIPTextConfig keys; None: no such encoder (SDXL refiner)
    scheduler: dict[str, Any]  # diffusers scheduler config keys
    resolution: int  # native image side in pixels; the latent side is resolution // 2**(VAE levels - 1)
    text_kind: str = "clip"  # family "sd": "clip" (SD 1.x, OpenAI CLIP) or "openclip" (SD 2.x) in single files
    # the second encoder: SDXL's OpenCLIP bigG (CLIPTextConfig keys for CLIPTextModelWithProjection), Flux's T5
    # (T5Config keys for T5EncoderModel)
    text_encoder_2: dict[str, Any] | None = None
    # "sd" (1.x / 2.x: one text encoder), "sdxl" (two encoders, added conditioning) or "sdxl-refiner" (the
    # second encoder only): a name in ldmcore.family.FAMILIES
    family: str = "sd"


_SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}

_SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

_SD_UNET_BLOCKS = {
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "in_channels": 4,
    "out_channels": 4,
    "norm_num_groups": 32,
}

SD15 = Preset(
    denoiser={**_SD_UNET_BLOCKS, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
    vae=_SD_VAE,
    text_encoder={  # OpenAI CLIP ViT-L/14 text tower
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
    scheduler=_SD_SCHEDULER,
    resolution=512,
)

_SD2_TEXT = {  # OpenCLIP ViT-H/14 text tower without its last layer (SD 2.x conditions on the penultimate)
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
_SD2_UNET = {
    **_SD_UNET_BLOCKS,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],  # heads per level (diffusers' naming): 64-wide heads
    "use_linear_projection": True,
}

SD21 = Preset(  # the 768 px v-prediction model
    denoiser={**_SD2_UNET, "sample_size": 96, "upcast_attention": True},
    vae={**_SD_VAE, "sample_size": 768},
    text_encoder=_SD2_TEXT,
    scheduler={**_SD_SCHEDULER, "prediction_type": "v_prediction"},
    resolution=768,
    text_kind="openclip",
)

SD21_BASE = Preset(  # the 512 px epsilon model
    denoiser={**_SD2_UNET, "sample_size": 64},
    vae=_SD_VAE,
    text_encoder=_SD2_TEXT,
    scheduler=_SD_SCHEDULER,
    resolution=512,
    text_kind="openclip",
)

TINY = Preset(  # for tests: same layout as SD 1.5, a few hundred thousand parameters
    denoiser={
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "in_channels": 4,
        "out_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 8,
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
    },
    vae={
        **_SD_VAE,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [16, 32, 32],  # three levels: 4x downsampling, 32 px -> 8x8 latents
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 32,
    },
    text_encoder={
        "vocab_size": 1000,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 32,
    },
    scheduler=_SD_SCHEDULER,
    resolution=32,
)

TINY_WORLD = Preset(  # the tiny world's base (worlds.pictures): SD 1.5's layout, trained on a CPU in minutes
    denoiser={
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [64, 128],
        "layers_per_block": 1,
        "in_channels": 4,
        "out_channels": 4,
        "norm_num_groups": 16,
        "sample_size": 8,
        "cross_attention_dim": 64,
        "attention_head_dim": 4,
    },
    vae={
        **_SD_VAE,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [32, 64, 64],  # 32 px pictures -> 8x8 latents
        "layers_per_block": 1,
        "norm_num_groups": 16,
        "sample_size": 32,
    },
    text_encoder={
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 64,
    },
    scheduler=_SD_SCHEDULER,
    resolution=32,
)

TEST_WORLD = Preset(  # the test suite's smaller world (worlds.world.TEST_WORLD): half the channels, a few minutes to train
    denoiser={**TINY_WORLD.denoiser, "block_out_channels": [32, 64], "norm_num_groups": 8, "cross_attention_dim": 32},
    vae={**TINY_WORLD.vae, "block_out_channels": [16, 32, 32], "norm_num_groups": 8},
    text_encoder={**TINY_WORLD.text_encoder, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32},
    scheduler=_SD_SCHEDULER,
    resolution=32,
)

# SDXL --------------------------------------------------------------------------------------------

_SDXL_VAE = {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025}  # SD's architecture, retrained
_BIGG_TEXT = {  # OpenCLIP ViT-bigG/14 text tower, all 32 layers (SDXL reads the penultimate hidden state)
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
_TEXT_TIME = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256}

SDXL = Preset(  # stable-diffusion-xl-base-1.0
    denoiser={
        **_SD_UNET_BLOCKS,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280],
        "transformer_layers_per_block": [1, 2, 10],  # level 0 has no attention; the mid block takes the last
        "attention_head_dim": [5, 10, 20],  # heads per level: 64-wide heads
        "use_linear_projection": True,
        "cross_attention_dim": 2048,  # CLIP-L 768 + bigG 1280, concatenated
        **_TEXT_TIME,
        "projection_class_embeddings_input_dim": 2816,  # pooled bigG 1280 + 6 time ids x 256
        "sample_size": 128,
    },
    vae=_SDXL_VAE,
    text_encoder=SD15.text_encoder,  # OpenAI CLIP ViT-L/14
    text_encoder_2=_BIGG_TEXT,
    scheduler=_SD_SCHEDULER,
    resolution=1024,
    family="sdxl",
)

SDXL_REFINER = Preset(  # stable-diffusion-xl-refiner-1.0: bigG only; an aesthetic score replaces the target size
    denoiser={
        **_SD_UNET_BLOCKS,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [384, 768, 1536, 1536],
        "transformer_layers_per_block": 4,  # on the two attention levels and the mid block
        "attention_head_dim": [6, 12, 24, 24],
        "use_linear_projection": True,
        "cross_attention_dim": 1280,
        **_TEXT_TIME,
        "projection_class_embeddings_input_dim": 2560,  # pooled bigG 1280 + 5 time ids x 256
        "sample_size": 128,
    },
    vae=_SDXL_VAE,
    text_encoder=None,
    text_encoder_2=_BIGG_TEXT,
    scheduler=_SD_SCHEDULER,
    resolution=1024,
    family="sdxl-refiner",
)

_TINY_SDXL_UNET = {  # SDXL's layout: no attention on level 0, deeper transformers lower down, two resnets per level
    **TINY.denoiser,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 4, 4],
    "use_linear_projection": True,
    "cross_attention_dim": 32 + 48,  # the two encoders' widths
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 48 + 6 * 8,  # pooled second encoder + 6 time ids
}
_TINY_TEXT = {
    "vocab_size": 1000,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}

TINY_SDXL = Preset(  # for tests
    denoiser=_TINY_SDXL_UNET,
    vae={**TINY.vae, "scaling_factor": 0.13025},
    text_encoder=_TINY_TEXT,
    # wider than the first, as bigG is wider than CLIP-L: diffusers' single-file reader tells the two encoders
    # apart by width only, and a swapped encoder or pooled output then fails on shapes
    text_encoder_2={**_TINY_TEXT, "hidden_size": 48, "intermediate_size": 96, "projection_dim": 48,
                    "hidden_act": "gelu"},
    scheduler=_SD_SCHEDULER,
    resolution=32,
    family="sdxl",
)

TINY_SDXL_REFINER = Preset(  # for tests: the second encoder only
    denoiser={**_TINY_SDXL_UNET, "cross_attention_dim": 48, "projection_class_embeddings_input_dim": 48 + 5 * 8},
    vae=TINY_SDXL.vae,
    text_encoder=None,
    text_encoder_2=TINY_SDXL.text_encoder_2,
    scheduler=_SD_SCHEDULER,
    resolution=32,
    family="sdxl-refiner",
)

TEST_WORLD_SDXL = Preset(  # the test suite's SDXL-shaped world (worlds.world.TEST_WORLD_SDXL): trained from nothing
    # tiny-sdxl's layout with one resnet per level and one transformer layer everywhere: a few minutes to train
    denoiser={**_TINY_SDXL_UNET, "layers_per_block": 1, "transformer_layers_per_block": [1, 1, 1]},
    vae={**TEST_WORLD.vae, "scaling_factor": 0.13025},  # the VAE method measures its own factor
    text_encoder={**TEST_WORLD.text_encoder, "num_hidden_layers": 3},
    text_encoder_2={**TEST_WORLD.text_encoder, "num_hidden_layers": 3, "hidden_size": 48, "intermediate_size": 96,
                    "projection_dim": 48, "hidden_act": "gelu"},
    scheduler=_SD_SCHEDULER,
    resolution=32,
    family="sdxl",
)

# Flux.1 ------------------------------------------------------------------------------------------

_FLUX_VAE = {  # SD's VAE layout with 16 latent channels, no quant convs, and a shift before the scale
    **_SD_VAE, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "use_quant_conv": False, "use_post_quant_conv": False, "sample_size": 1024,
}
_FLUX_TRANSFORMER = {  # 12B: hidden 3072 = 24 heads x 128, 19 double-stream and 38 single-stream blocks
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "axes_dims_rope": [16, 56, 56],
}
_T5_XXL = {  # T5 v1.1 XXL's encoder (transformers T5Config keys)
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False,
}
_FLUX_DEV_SCHEDULER = {  # the shift grows with the image's token count
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096,
}
_FLUX_SCHNELL_SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}

FLUX_DEV = Preset(
    denoiser={**_FLUX_TRANSFORMER, "guidance_embeds": True},
    vae=_FLUX_VAE,
    text_encoder=SD15.text_encoder,  # CLIP ViT-L/14: its pooled output only
    text_encoder_2=_T5_XXL,
    scheduler=_FLUX_DEV_SCHEDULER,
    resolution=1024,
    family="flux-dev",
)
FLUX_SCHNELL = dataclasses.replace(  # dev's parts without the guidance embedding, and no resolution shift
    FLUX_DEV, denoiser={**_FLUX_TRANSFORMER, "guidance_embeds": False}, scheduler=_FLUX_SCHNELL_SCHEDULER,
    family="flux-schnell",
)
_TINY_FLUX_TRANSFORMER = {  # for tests: Flux's layout at width 32
    "patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [4, 6, 6],
    "guidance_embeds": True,
}
_TINY_T5 = {
    "vocab_size": 1000, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
    "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32, "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False,
}
TINY_FLUX = Preset(  # for tests: dev-shaped (guidance embedded), 32 px pictures -> 8x8 latents -> 16 image tokens
    denoiser=_TINY_FLUX_TRANSFORMER,
    vae={**TINY.vae, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
         "use_quant_conv": False, "use_post_quant_conv": False},
    text_encoder=_TINY_TEXT,
    text_encoder_2=_TINY_T5,
    scheduler=_FLUX_DEV_SCHEDULER,
    resolution=32,
    family="flux-dev",
)
TINY_FLUX_SCHNELL = dataclasses.replace(
    TINY_FLUX, denoiser={**_TINY_FLUX_TRANSFORMER, "guidance_embeds": False}, scheduler=_FLUX_SCHNELL_SCHEDULER,
    family="flux-schnell",
)

# 32 tokens (n_positions sets the fresh tokenizer's length) hold every caption of the world, and train the
# base 4.7x faster than schnell's 256
_TEST_WORLD_FLUX_T5 = {**_TINY_T5, "vocab_size": 1000, "d_model": 32, "d_ff": 64, "num_layers": 2, "n_positions": 32}
TEST_WORLD_FLUX = Preset(  # the test suite's flow-matching world (worlds.world.TEST_WORLD_FLUX): trained from nothing
    # schnell-shaped (no guidance embedding): a base trained here is not guidance-distilled, so it samples with
    # real classifier-free guidance (true_cfg_scale)
    # width 128 = 8 heads x 16: after 1200 steps (measured with 32 T5 tokens) width 64 drew blobs (44% of the
    # shapes right), 4 heads x 32 drew 75%, 8 x 16 89%
    denoiser={**_TINY_FLUX_TRANSFORMER, "num_layers": 2, "num_single_layers": 2, "num_attention_heads": 8,
              "attention_head_dim": 16, "axes_dims_rope": [4, 6, 6], "joint_attention_dim": 32,
              "pooled_projection_dim": 32, "guidance_embeds": False},
    # TEST_WORLD's VAE with 16 latent channels and no quant convs; the VAE method measures scale and shift
    vae={**TEST_WORLD.vae, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159,
         "use_quant_conv": False, "use_post_quant_conv": False},
    text_encoder=TEST_WORLD.text_encoder,  # CLIP: its pooled output only
    text_encoder_2=_TEST_WORLD_FLUX_T5,
    scheduler=_FLUX_SCHNELL_SCHEDULER,
    resolution=32,
    family="flux-schnell",
)

PRESETS: dict[str, Preset] = {"sd15": SD15, "sd21": SD21, "sd21-base": SD21_BASE, "tiny": TINY, "tiny-world": TINY_WORLD,
                              "test-world": TEST_WORLD, "sdxl": SDXL, "sdxl-refiner": SDXL_REFINER,
                              "tiny-sdxl": TINY_SDXL, "tiny-sdxl-refiner": TINY_SDXL_REFINER,
                              "test-world-sdxl": TEST_WORLD_SDXL, "flux-dev": FLUX_DEV, "flux-schnell": FLUX_SCHNELL,
                              "tiny-flux": TINY_FLUX, "tiny-flux-schnell": TINY_FLUX_SCHNELL,
                              "test-world-flux": TEST_WORLD_FLUX}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
