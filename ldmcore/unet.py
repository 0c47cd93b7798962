"""The Stable Diffusion 1.x/2.x/XL conditional U-Net, written from the architecture description.

SDXL adds one input beside the timestep: the pooled text embedding and a few numbers about the image
(original size, crop corner, target size; the refiner has an aesthetic score in place of the target
size), each number embedded like a timestep. Their MLP's output is added to the time embedding
(diffusers' `addition_embed_type: "text_time"`).

Reading order: config, the down / mid / up blocks, the added conditioning, the model. Parameter
names are diffusers' (`down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight`, ...), so a
state dict of `UNet` and of diffusers' `UNet2DConditionModel` built from the same config.json are
interchangeable.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from .attention import Transformer2DModel
from .modeling import ConfigModel, ModelConfig, maybe_checkpoint
from .lean import group_norm_silu
from .resnet import Downsample2D, ResnetBlock2D, TimestepEmbedding, Upsample2D, timestep_embedding
from .weights import CheckpointError

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
MID = "UNetMidBlock2DCrossAttn"
TEXT_TIME = "text_time"  # SDXL's added conditioning, diffusers' name


@dataclasses.dataclass
class UNetConfig(ModelConfig):
    """diffusers' UNet2DConditionModel config keys that this core implements; defaults are SD 1.5's."""

    sample_size: int = 64
    in_channels: int = 4  # 9 for inpainting: noisy latent, mask, masked-image latent
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
    mid_block_type: str = MID
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    # diffusers' historical naming: `attention_head_dim` holds the number of heads unless
    # `num_attention_heads` is given. Kept as-is so real config.json files mean the same thing.
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    only_cross_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    center_input_sample: bool = False
    # SDXL's added conditioning: "text_time", or None for none (SD 1.x/2.x). Its MLP reads the pooled text
    # embedding followed by every time id embedded at addition_time_embed_dim:
    # projection_class_embeddings_input_dim = pooled width + number of time ids * addition_time_embed_dim.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    _class_name = "UNet2DConditionModel"
    _fixed = {
        "act_fn": "silu",
        "dual_cross_attention": False,
        "class_embed_type": None,
        "num_class_embeds": None,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "resnet_time_scale_shift": "default",
        "resnet_skip_time_act": False,
        "resnet_out_scale_factor": 1.0,
        "time_embedding_type": "positional",
        "time_embedding_dim": None,
        "time_embedding_act_fn": None,
        "timestep_post_act": None,
        "time_cond_proj_dim": None,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "attention_type": "default",
        "class_embeddings_concat": False,
        "mid_block_only_cross_attention": None,
        "cross_attention_norm": None,
        "addition_embed_type_num_heads": 64,
        "reverse_transformer_layers_per_block": None,
    }

    def per_level(self, value, name: str) -> tuple:
        levels = len(self.block_out_channels)
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * levels
        if len(values) != levels:
            raise CheckpointError(f"UNet config: {name} has {len(values)} entries but there are {levels} levels")
        return values

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise CheckpointError(
                f"UNet config: {n} block_out_channels but {len(self.down_block_types)} down_block_types "
                f"and {len(self.up_block_types)} up_block_types"
            )
        for t in self.down_block_types:
            if t not in (CROSS_DOWN, PLAIN_DOWN):
                raise CheckpointError(f"UNet config: down block type {t!r} is not supported")
        for t in self.up_block_types:
            if t not in (CROSS_UP, PLAIN_UP):
                raise CheckpointError(f"UNet config: up block type {t!r} is not supported")
        if self.mid_block_type != MID:
            raise CheckpointError(f"UNet config: mid_block_type {self.mid_block_type!r} is not supported")
        if not isinstance(self.layers_per_block, int):
            raise CheckpointError("UNet config: layers_per_block must be one integer")
        check_added_conditioning(self, "UNet config")

    @property
    def heads(self) -> tuple[int, ...]:
        return self.per_level(self.num_attention_heads or self.attention_head_dim, "attention heads")

    @property
    def depths(self) -> tuple[int, ...]:
        return self.per_level(self.transformer_layers_per_block, "transformer_layers_per_block")


class DownBlock(nn.Module):
    """ResNet blocks, each followed by a spatial transformer when `cross`, then an optional stride-2 conv."""

    def __init__(self, cfg: UNetConfig, level: int, in_ch: int, out_ch: int, temb_ch: int, cross: bool, last: bool):
        super().__init__()
        self.gradient_checkpointing = False
        heads, depth = cfg.heads[level], cfg.depths[level]
        # attentions before resnets: diffusers' registration order, so state dicts list keys identically
        self.attentions = (
            nn.ModuleList(_transformer(cfg, out_ch, heads, depth) for _ in range(cfg.layers_per_block)) if cross else None
        )
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_ch, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout)
            for i in range(cfg.layers_per_block)
        )
        self.downsamplers = None if last else nn.ModuleList([Downsample2D(out_ch, cfg.downsample_padding)])

    def forward(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (b, c, h/2, w/2)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """ResNet, spatial transformer, ResNet at the lowest resolution."""

    def __init__(self, cfg: UNetConfig, ch: int, temb_ch: int):
        super().__init__()
        self.gradient_checkpointing = False
        args = (temb_ch, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout, cfg.mid_block_scale_factor)
        self.attentions = nn.ModuleList([_transformer(cfg, ch, cfg.heads[-1], cfg.depths[-1])])
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, *args), ResnetBlock2D(ch, ch, *args)])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """ResNet blocks on the input concatenated with one skip each, optional transformers, then 2x upsampling."""

    def __init__(
        self, cfg: UNetConfig, level: int, prev_ch: int, out_ch: int, skip_in_ch: int, temb_ch: int, cross: bool, last: bool
    ):
        super().__init__()
        self.gradient_checkpointing = False
        n = cfg.layers_per_block + 1
        heads, depth = cfg.heads[::-1][level], cfg.depths[::-1][level]
        self.attentions = nn.ModuleList(_transformer(cfg, out_ch, heads, depth) for _ in range(n)) if cross else None
        resnets = []
        for i in range(n):
            skip_ch = skip_in_ch if i == n - 1 else out_ch
            res_in = prev_ch if i == 0 else out_ch
            resnets.append(ResnetBlock2D(res_in + skip_ch, out_ch, temb_ch, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout))
        self.resnets = nn.ModuleList(resnets)
        self.upsamplers = None if last else nn.ModuleList([Upsample2D(out_ch)])

    def forward(self, x, temb, context, skips: Sequence[torch.Tensor], upsample_size):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), temb)  # (b, c + c_skip, h, w) -> (b, out, h, w)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)  # (b, out, 2h, 2w)
        return x


def down_blocks(cfg: UNetConfig, temb_ch: int) -> nn.ModuleList:
    """The encoder half, one DownBlock per level. The ControlNet builds its copy with this too."""
    ch = cfg.block_out_channels
    return nn.ModuleList(
        DownBlock(cfg, level, ch[max(level - 1, 0)], ch[level], temb_ch, kind == CROSS_DOWN, level == len(ch) - 1)
        for level, kind in enumerate(cfg.down_block_types)
    )


def embed_timesteps(time_embedding: TimestepEmbedding, cfg, timestep, sample: torch.Tensor) -> torch.Tensor:
    """timestep () or (b,) -> (b, 4 * c0): sinusoidal features through the learned MLP, in `sample`'s dtype.
    `cfg` needs block_out_channels, flip_sin_to_cos and freq_shift (the U-Net's or the ControlNet's)."""
    b = sample.shape[0]
    t = torch.as_tensor(timestep, device=sample.device)
    t = t.expand(b) if t.ndim == 0 else t.reshape(-1).expand(b)
    temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)  # (b, c0)
    return time_embedding(temb.to(sample.dtype))


def check_added_conditioning(cfg, what: str) -> None:
    """Refuse an added-conditioning config this core cannot build. `cfg`: a U-Net or ControlNet config."""
    if cfg.addition_embed_type is None:
        return
    if cfg.addition_embed_type != TEXT_TIME:
        raise CheckpointError(
            f"{what}: addition_embed_type={cfg.addition_embed_type!r} is not supported "
            f"(only {TEXT_TIME!r}, SDXL's, or null)"
        )
    needs = ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
    missing = [k for k in needs if getattr(cfg, k) is None]
    if missing:
        raise CheckpointError(f"{what}: addition_embed_type={TEXT_TIME!r} needs {' and '.join(missing)}")


def added_embedding(cfg, temb_ch: int) -> TimestepEmbedding | None:
    """The MLP of SDXL's added conditioning (diffusers' `add_embedding`), or None when the config has none."""
    if cfg.addition_embed_type != TEXT_TIME:
        return None
    return TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_ch)


def embed_added_conditions(
    add_embedding: TimestepEmbedding | None, cfg, added_cond_kwargs: dict | None, temb: torch.Tensor
) -> torch.Tensor | None:
    """SDXL's added conditioning -> (b, 4 * c0), to be added to the time embedding `temb`; None without one.

    added_cond_kwargs: {"text_embeds": pooled text (b, pooled width), "time_ids": (b, n)}; n is 6 for the
    base model (original h, w, crop top, left, target h, w), 5 for the refiner. Each time id gets a
    sinusoidal embedding of width addition_time_embed_dim (the timestep's flip_sin_to_cos / freq_shift),
    and these follow the pooled text."""
    what = type(cfg).__name__.removesuffix("Config")
    if add_embedding is None:
        if added_cond_kwargs is not None:
            raise ValueError(
                f"{what}: added_cond_kwargs given, but the config has no addition_embed_type (not an SDXL model); "
                "leave them out"
            )
        return None
    given = added_cond_kwargs or {}
    missing = [k for k in ("text_embeds", "time_ids") if given.get(k) is None]
    if missing:
        raise ValueError(
            f"{what}: the config has addition_embed_type={TEXT_TIME!r} (SDXL), so forward needs added_cond_kwargs="
            f"{{'text_embeds': pooled text (b, width), 'time_ids': (b, n)}}; missing {', '.join(missing)}"
        )
    text_embeds, time_ids = given["text_embeds"], given["time_ids"]
    b = text_embeds.shape[0]
    if time_ids.ndim != 2 or time_ids.shape[0] != b:
        raise ValueError(f"{what}: time_ids has shape {tuple(time_ids.shape)}; expected ({b}, n), one row per sample")
    d = cfg.addition_time_embed_dim
    time_embeds = timestep_embedding(time_ids.flatten(), d, cfg.flip_sin_to_cos, cfg.freq_shift)  # (b * n, d) float32
    add = torch.cat([text_embeds, time_embeds.reshape(b, -1)], dim=-1).to(temb.dtype)  # (b, width + n * d)
    if add.shape[-1] != cfg.projection_class_embeddings_input_dim:
        raise ValueError(
            f"{what}: text_embeds {tuple(text_embeds.shape)} and {time_ids.shape[1]} time ids of width {d} make "
            f"{add.shape[-1]} features, but projection_class_embeddings_input_dim is "
            f"{cfg.projection_class_embeddings_input_dim}"
        )
    return add_embedding(add)  # (b, 4 * c0)


def _transformer(cfg: UNetConfig, ch: int, heads: int, depth: int) -> Transformer2DModel:
    return Transformer2DModel(
        ch,
        heads,
        ch // heads,
        cfg.cross_attention_dim,
        depth,
        cfg.norm_num_groups,
        cfg.use_linear_projection,
        cfg.upcast_attention,
        cfg.only_cross_attention,
        cfg.dropout,
    )


class UNet(ConfigModel):
    """Noise-prediction U-Net conditioned on a timestep and a sequence of text embeddings."""

    config_class = UNetConfig

    def __init__(self, config: UNetConfig):
        super().__init__(config)
        ch = config.block_out_channels
        temb_ch = ch[0] * 4
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch)
        self.add_embedding = added_embedding(config, temb_ch)  # SDXL; not registered when None

        self.down_blocks = down_blocks(config, temb_ch)

        rev = ch[::-1]
        self.up_blocks = nn.ModuleList()
        for level, kind in enumerate(config.up_block_types):
            prev_ch = rev[max(level - 1, 0)]
            skip_in_ch = rev[min(level + 1, len(ch) - 1)]
            last = level == len(ch) - 1
            self.up_blocks.append(
                UpBlock(config, level, prev_ch, rev[level], skip_in_ch, temb_ch, kind == CROSS_UP, last)
            )

        # registered after the up blocks, as diffusers does, so state dict keys come in the same order
        self.mid_block = MidBlock(config, ch[-1], temb_ch)

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, ch[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, 3, padding=1)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each down, mid and up block in the backward pass instead of keeping its activations."""
        for block in [*self.down_blocks, self.mid_block, *self.up_blocks]:
            block.gradient_checkpointing = enabled

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """sample (b, in_channels, h, w), timestep () or (b,), encoder_hidden_states (b, tokens, cross_dim)
        -> prediction (b, out_channels, h, w). The optional residuals come from a ControlNet, one per skip.
        added_cond_kwargs: SDXL's {"text_embeds", "time_ids"} (see `embed_added_conditions`), required
        exactly when the config has addition_embed_type."""
        temb = embed_timesteps(self.time_embedding, self.config, timestep, sample)  # (b, 4 * c0)
        added = embed_added_conditions(self.add_embedding, self.config, added_cond_kwargs, temb)
        if added is not None:
            temb = temb + added  # (b, 4 * c0)
        context = encoder_hidden_states

        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        x = self.conv_in(sample)  # (b, c0, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = maybe_checkpoint(block, x, temb, context)
            skips.extend(block_skips)

        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"expected {len(skips)} down_block_additional_residuals, got {len(down_block_additional_residuals)}"
                )
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]

        x = maybe_checkpoint(self.mid_block, x, temb, context)  # (b, c_last, h/8, w/8)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual

        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            upsample_size = skips[-1].shape[-2:] if skips else None
            x = maybe_checkpoint(block, x, temb, context, block_skips, upsample_size)

        x = group_norm_silu(x, self.conv_norm_out)
        return self.conv_out(x)  # (b, out_channels, h, w)
