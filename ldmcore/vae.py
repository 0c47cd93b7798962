"""The Stable Diffusion VAE (AutoencoderKL), written from the architecture description.

Reading order: config, the posterior, the blocks, encoder and decoder, the model. Parameter names
are diffusers' (`encoder.down_blocks.0.resnets.1.conv2.weight`, `decoder.mid_block.attentions.0.to_q.weight`,
...), so state dicts of `AutoencoderKL` here and in diffusers, built from one config.json, are
interchangeable. As in diffusers, `encode`/`decode` work on unscaled latents; `scale`/`unscale`
convert to and from the latents the U-Net sees.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .attention import Attention
from .lean import group_norm_silu
from .modeling import ConfigModel, ModelConfig, maybe_checkpoint
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .weights import CheckpointError

DOWN, UP = "DownEncoderBlock2D", "UpDecoderBlock2D"
NORM_EPS = 1e-6  # diffusers' VAE uses this for every GroupNorm; it is not a config key


@dataclasses.dataclass
class AutoencoderKLConfig(ModelConfig):
    """diffusers' AutoencoderKL config keys; defaults are SD 1.5's VAE."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN,) * 4
    up_block_types: tuple[str, ...] = (UP,) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None  # SD3 / Flux: latents = (z - shift_factor) * scaling_factor
    force_upcast: bool = True  # the VAE should run in float32 when the rest of the pipeline is fp16
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    _class_name = "AutoencoderKL"
    # Per-channel latent statistics (Playground v2.5) are not implemented; SD 1.x/2.x/XL VAEs leave them null.
    _fixed = {"act_fn": "silu", "latents_mean": None, "latents_std": None}

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise CheckpointError(
                f"AutoencoderKL config: {n} block_out_channels but {len(self.down_block_types)} down_block_types "
                f"and {len(self.up_block_types)} up_block_types"
            )
        for key, only in (("down_block_types", DOWN), ("up_block_types", UP)):
            types = list(getattr(self, key))
            if any(t != only for t in types):
                raise CheckpointError(f"AutoencoderKL config: {key}={types} is not supported (only {only!r})")


class DiagonalGaussian:
    """The posterior q(z | x): an independent Gaussian per latent element, tensors (b, c, h, w)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor, std: torch.Tensor | None = None):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)  # as diffusers: keeps exp() finite for untrained encoders
        self.std = torch.exp(0.5 * self.logvar) if std is None else std
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        """From the (quant_conv) encoder output (b, 2c, h, w): mean in the first c channels, log-variance after."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    @classmethod
    def from_mean_std(cls, mean: torch.Tensor, std: torch.Tensor) -> DiagonalGaussian:
        """Rebuild a cached posterior. `std` is kept as given, so samples use exactly the stored numbers;
        pass float32 tensors to sample in float32 from an fp16 cache."""
        return cls(mean, 2.0 * torch.log(std), std)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise; a CPU generator on a GPU posterior draws on the CPU, as diffusers does."""
        device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over (c, h, w): shape (b,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of `x` under q, summed over (c, h, w): shape (b,)."""
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (x - self.mean).pow(2) / self.var, dim=[1, 2, 3])


class SpatialSelfAttention(Attention):
    """Single-head self-attention over the h*w positions of a feature map: GroupNorm first, residual after.
    The attention itself runs in float32 for half-precision inputs (diffusers upcasts the VAE softmax)."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, dim_head=channels, bias=True, upcast=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # Normalising the (b, c, hw) view, as diffusers does, keeps its reduction order: parity to the last bit.
        tokens = self.group_norm(x.reshape(b, c, h * w)).transpose(1, 2)  # (b, hw, c)
        out = super().forward(tokens)  # (b, hw, c)
        return out.transpose(1, 2).reshape(b, c, h, w) + x  # (b, c, h, w)


def _resnet(cfg: AutoencoderKLConfig, in_ch: int, out_ch: int) -> ResnetBlock2D:
    return ResnetBlock2D(in_ch, out_ch, None, cfg.norm_num_groups, NORM_EPS)


class DownEncoderBlock(nn.Module):
    """`layers_per_block` ResNet blocks, then a stride-2 conv (padded right and bottom) unless last."""

    def __init__(self, cfg: AutoencoderKLConfig, in_ch: int, out_ch: int, last: bool):
        super().__init__()
        self.gradient_checkpointing = False
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList(_resnet(cfg, in_ch if i == 0 else out_ch, out_ch) for i in range(n))
        self.downsamplers = None if last else nn.ModuleList([Downsample2D(out_ch, padding=0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)  # (b, out, h, w)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (b, out, h/2, w/2)
        return x


class MidBlock(nn.Module):
    """ResNet, spatial self-attention (unless `mid_block_add_attention` is off), ResNet."""

    def __init__(self, cfg: AutoencoderKLConfig, ch: int):
        super().__init__()
        self.gradient_checkpointing = False
        attn = cfg.mid_block_add_attention
        self.attentions = nn.ModuleList([SpatialSelfAttention(ch, cfg.norm_num_groups)]) if attn else None
        self.resnets = nn.ModuleList([_resnet(cfg, ch, ch), _resnet(cfg, ch, ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)  # (b, c, h, w)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class UpDecoderBlock(nn.Module):
    """`layers_per_block + 1` ResNet blocks (no skips, unlike the U-Net), then 2x upsampling unless last."""

    def __init__(self, cfg: AutoencoderKLConfig, in_ch: int, out_ch: int, last: bool):
        super().__init__()
        self.gradient_checkpointing = False
        n = cfg.layers_per_block + 1
        self.resnets = nn.ModuleList(_resnet(cfg, in_ch if i == 0 else out_ch, out_ch) for i in range(n))
        self.upsamplers = None if last else nn.ModuleList([Upsample2D(out_ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)  # (b, out, h, w)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)  # (b, out, 2h, 2w)
        return x


class Encoder(nn.Module):
    """Image (b, in_channels, h, w) -> posterior moments (b, 2 * latent_channels, h/f, w/f), f = 2^(levels-1)."""

    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        ch = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock(cfg, ch[max(i - 1, 0)], ch[i], last=i == len(ch) - 1) for i in range(len(ch))
        )
        self.mid_block = MidBlock(cfg, ch[-1])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)  # (b, c0, h, w)
        for block in self.down_blocks:
            x = maybe_checkpoint(block, x)  # (b, c_i, h / 2^i, w / 2^i)
        x = maybe_checkpoint(self.mid_block, x)  # (b, c_last, h/f, w/f)
        return self.conv_out(group_norm_silu(x, self.conv_norm_out))  # (b, 2 * latent, h/f, w/f)


class Decoder(nn.Module):
    """Latent (b, latent_channels, h/f, w/f) -> image (b, out_channels, h, w)."""

    def __init__(self, cfg: AutoencoderKLConfig):
        super().__init__()
        rev = cfg.block_out_channels[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(cfg, rev[0])
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock(cfg, rev[max(i - 1, 0)], rev[i], last=i == len(rev) - 1) for i in range(len(rev))
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, rev[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)  # (b, c_last, h/f, w/f)
        x = maybe_checkpoint(self.mid_block, x)
        for block in self.up_blocks:
            x = maybe_checkpoint(block, x)  # (b, c_i, 2x the size, unless last)
        return self.conv_out(group_norm_silu(x, self.conv_norm_out))  # (b, out_channels, h, w)


class AutoencoderKL(ConfigModel):
    """KL-regularised autoencoder: images in [-1, 1] <-> latents 8x smaller per side (for SD's 4 levels)."""

    config_class = AutoencoderKLConfig

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__(config)
        lat = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * lat, 2 * lat, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lat, lat, 1) if config.use_post_quant_conv else None

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each encoder and decoder block in the backward pass instead of keeping its activations."""
        enc, dec = self.encoder, self.decoder
        for block in [*enc.down_blocks, enc.mid_block, dec.mid_block, *dec.up_blocks]:
            block.gradient_checkpointing = enabled

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image (b, in_channels, h, w) -> posterior over unscaled latents (b, latent_channels, h/f, w/f)."""
        moments = self.encoder(x)  # (b, 2 * latent, h/f, w/f)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (b, latent_channels, h/f, w/f) -> image (b, out_channels, h, w)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction of `x` from the posterior's mode, a sample, or mean + std * `noise` (the
        caller's own draws), and the posterior for the KL term."""
        posterior = self.encode(x)
        if noise is not None:
            z = posterior.mean + posterior.std * noise.to(posterior.mean)
        else:
            z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Posterior sample -> the latents the U-Net is trained on: (z - shift_factor) * scaling_factor."""
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """U-Net latents -> what `decode` takes; the inverse of `scale`."""
        return latents / self.config.scaling_factor + (self.config.shift_factor or 0.0)
