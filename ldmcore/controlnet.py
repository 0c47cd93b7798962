"""ControlNet (Zhang et al. 2023): a trainable copy of the U-Net's encoder that steers a frozen U-Net
through a conditioning image (edges, depth, pose, ...).

The copy (time embedding, SDXL's added-conditioning MLP, conv_in, down blocks, mid block) starts as the
base U-Net's weights. A small convolutional encoder brings the pixel-space control image down to latent
size and adds it to conv_in's output; its last conv starts at zero. Every skip and the mid block's
output pass through a 1x1 conv that also starts at zero, and are added to the U-Net's own skips. An
untrained ControlNet therefore adds exact zeros, and training starts from the base model's behaviour.

Reading order: config, the conditioning-image encoder, the model, the generation helper. Parameter
and config names are diffusers' `ControlNetModel`'s, so folders load both ways.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from .modeling import ConfigModel, ModelConfig, maybe_checkpoint
from .resnet import TimestepEmbedding
from .unet import (CROSS_DOWN, CROSS_UP, MID, PLAIN_DOWN, PLAIN_UP, MidBlock, UNet, UNetConfig, added_embedding,
                   down_blocks, embed_added_conditions, embed_timesteps)
from .weights import CheckpointError

# the U-Net config keys the ControlNet's encoder copy shares
SHARED_KEYS = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type", "only_cross_attention",
    "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "norm_num_groups",
    "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim", "num_attention_heads",
    "use_linear_projection", "upcast_attention",
    "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",  # SDXL
)


@dataclasses.dataclass
class ControlNetConfig(ModelConfig):
    """diffusers' ControlNetModel config keys that this core implements; defaults are SD 1.5's."""

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    mid_block_type: str = MID
    only_cross_attention: bool = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8  # holds the number of heads, as in the U-Net config
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    controlnet_conditioning_channel_order: str = "rgb"  # "bgr": the model was trained on BGR control images
    # the conditioning encoder's widths; one stride-2 conv between neighbours, so 2**(n-1) must be the
    # VAE's downscale factor (SD: 8, four entries)
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    # SDXL's added conditioning, as in the U-Net config (the copy has the U-Net's add_embedding)
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    _class_name = "ControlNetModel"
    _fixed = {
        "act_fn": "silu",
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "class_embed_type": None,
        "num_class_embeds": None,
        "resnet_time_scale_shift": "default",
        "global_pool_conditions": False,
        "addition_embed_type_num_heads": 64,
    }

    def __post_init__(self):
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise CheckpointError(
                f"ControlNet config: controlnet_conditioning_channel_order must be 'rgb' or 'bgr', "
                f"got {self.controlnet_conditioning_channel_order!r}"
            )
        if not self.conditioning_embedding_out_channels:
            raise CheckpointError("ControlNet config: conditioning_embedding_out_channels is empty")
        try:
            self.unet_view()
        except CheckpointError as e:
            raise CheckpointError(str(e).replace("UNet config", "ControlNet config")) from None

    @classmethod
    def from_unet_config(cls, unet_config: UNetConfig, **extra) -> ControlNetConfig:
        """The ControlNet matching a U-Net; `extra` sets the ControlNet's own keys (conditioning_*)."""
        return cls(**{k: getattr(unet_config, k) for k in SHARED_KEYS}, **extra)

    def unet_view(self) -> UNetConfig:
        """A U-Net config with this encoder, for building the shared blocks (the decoder half mirrors it)."""
        mirror = tuple(CROSS_UP if t == CROSS_DOWN else PLAIN_UP for t in reversed(self.down_block_types))
        return UNetConfig(**{k: getattr(self, k) for k in SHARED_KEYS}, up_block_types=mirror)

    @property
    def downscale(self) -> int:
        """Control image pixels per latent pixel."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def skip_channels(self) -> list[int]:
        """Channels of every encoder skip, in order: conv_in's output, then each resnet and downsampler."""
        ch = self.block_out_channels
        out = [ch[0]]
        for level, c in enumerate(ch):
            out += [c] * (self.layers_per_block + (level < len(ch) - 1))
        return out


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ConditioningEmbedding(nn.Module):
    """Control image (b, c, H, W) -> features (b, c0, H / downscale, W / downscale), added to conv_in's output.

    conv_in, then per pair of neighbouring widths a 3x3 conv and a stride-2 3x3 conv, SiLU after each,
    then conv_out, zero-initialised."""

    def __init__(self, conditioning_channels: int, widths: Sequence[int], embedding_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = _zero(nn.Conv2d(widths[-1], embedding_channels, 3, padding=1))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(cond))  # (b, w0, H, W)
        for conv in self.blocks:
            x = F.silu(conv(x))  # every second conv halves H and W
        return self.conv_out(x)  # (b, c0, H / downscale, W / downscale)


class ControlNet(ConfigModel):
    """Encoder copy + conditioning encoder + zero convs -> residuals for `UNet.forward`'s
    down_block_additional_residuals and mid_block_additional_residual."""

    config_class = ControlNetConfig

    def __init__(self, config: ControlNetConfig):
        super().__init__(config)
        ch, view = config.block_out_channels, config.unet_view()
        temb_ch = ch[0] * 4
        # registration order is diffusers', so state dicts list keys identically
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch)
        self.add_embedding = added_embedding(config, temb_ch)  # SDXL; not registered when None
        self.controlnet_cond_embedding = ConditioningEmbedding(
            config.conditioning_channels, config.conditioning_embedding_out_channels, ch[0]
        )
        self.down_blocks = down_blocks(view, temb_ch)
        self.controlnet_down_blocks = nn.ModuleList(_zero(nn.Conv2d(c, c, 1)) for c in config.skip_channels())
        self.controlnet_mid_block = _zero(nn.Conv2d(ch[-1], ch[-1], 1))
        self.mid_block = MidBlock(view, ch[-1], temb_ch)

    @classmethod
    def from_unet(
        cls,
        unet: UNet,
        conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256),
        conditioning_channels: int = 3,
        controlnet_conditioning_channel_order: str = "rgb",
    ) -> ControlNet:
        """A fresh ControlNet whose encoder copy holds `unet`'s weights (on its device, in its dtype)."""
        config = ControlNetConfig.from_unet_config(
            unet.config,
            conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
        )
        model = cls(config).to(unet.device, unet.dtype)
        for name in ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block"):
            if getattr(unet, name) is not None:
                getattr(model, name).load_state_dict(getattr(unet, name).state_dict(), strict=True)
        return model

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each down block and the mid block in the backward pass instead of keeping activations."""
        for block in [*self.down_blocks, self.mid_block]:
            block.gradient_checkpointing = enabled

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """sample (b, in_channels, h, w), timestep () or (b,), encoder_hidden_states (b, tokens, cross_dim),
        controlnet_cond (b, conditioning_channels, h * downscale, w * downscale) in [0, 1]
        -> (one residual per U-Net skip, the mid-block residual), each times `conditioning_scale`.
        added_cond_kwargs: SDXL's {"text_embeds", "time_ids"}, as for `UNet.forward`."""
        cfg = self.config
        want = (sample.shape[0], cfg.conditioning_channels, sample.shape[2] * cfg.downscale, sample.shape[3] * cfg.downscale)
        if tuple(controlnet_cond.shape) != want:
            raise ValueError(
                f"ControlNet: controlnet_cond has shape {tuple(controlnet_cond.shape)}, expected {want}: one control "
                f"image per sample, {cfg.downscale}x the latent size (conditioning_embedding_out_channels="
                f"{list(cfg.conditioning_embedding_out_channels)})"
            )
        if cfg.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond.flip(1)
        temb = embed_timesteps(self.time_embedding, cfg, timestep, sample)  # (b, 4 * c0)
        added = embed_added_conditions(self.add_embedding, cfg, added_cond_kwargs, temb)
        if added is not None:
            temb = temb + added  # (b, 4 * c0)
        context = encoder_hidden_states

        x = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond.to(sample.dtype))  # (b, c0, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = maybe_checkpoint(block, x, temb, context)
            skips.extend(block_skips)
        x = maybe_checkpoint(self.mid_block, x, temb, context)  # (b, c_last, h / 2**(levels-1), ...)

        down = tuple(zero_conv(s) * conditioning_scale for zero_conv, s in zip(self.controlnet_down_blocks, skips))
        return down, self.controlnet_mid_block(x) * conditioning_scale


# -- generation ------------------------------------------------------------------------------------


def control_images_to_tensor(images: Sequence[Image.Image], width: int, height: int) -> torch.Tensor:
    """PIL control images -> (n, 3, height, width) float32 in [0, 1], RGB (diffusers' control
    preprocessing: no [-1, 1] normalisation; Lanczos when a resize is needed)."""
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (width, height):
            im = im.resize((width, height), Image.LANCZOS)
        arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def generate_controlled(
    components,
    controlnet: ControlNet,
    prompt: str | Sequence[str],
    control_image: Image.Image | Sequence[Image.Image],
    conditioning_scale: float = 1.0,
    **generate_kwargs,
):
    """`ldmcore.pipeline.generate` steered by `controlnet`: one control image for all prompts, or one each.
    height / width default to the control image's size (rounded down to the VAE factor), as diffusers'
    StableDiffusionControlNetPipeline does; other keywords are `generate`'s."""
    from .family import cast_inputs
    from .pipeline import generate

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    images = [control_image] * len(prompts) if isinstance(control_image, Image.Image) else list(control_image)
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} control images")
    factor = components.vae_scale_factor
    width = generate_kwargs.pop("width", None) or images[0].width // factor * factor
    height = generate_kwargs.pop("height", None) or images[0].height // factor * factor
    cond = control_images_to_tensor(images, width, height).to(controlnet.device, controlnet.dtype)  # (n, 3, H, W)
    unet_dtype = components.denoiser.dtype

    def residuals(x_t, t, inputs):
        # inputs: the U-Net call's conditioning (encoder_hidden_states, SDXL's added_cond_kwargs), which the
        # ControlNet takes too. Classifier-free guidance batches [uncond; cond]: the control images repeat
        # to x_t's batch.
        c = cond.repeat(x_t.shape[0] // cond.shape[0], 1, 1, 1)
        down, mid = controlnet(x_t.to(controlnet.dtype), t, controlnet_cond=c, conditioning_scale=conditioning_scale,
                               **cast_inputs(inputs, controlnet.dtype))
        return {"down_block_additional_residuals": [d.to(unet_dtype) for d in down],
                "mid_block_additional_residual": mid.to(unet_dtype)}

    return generate(components, prompts, height=height, width=width, unet_inputs=residuals, **generate_kwargs)
