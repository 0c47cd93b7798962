"""The Flux.1 transformer (Black Forest Labs' rectified-flow MM-DiT), written from the architecture.

Image and text become two token streams. Each double-stream block gives each stream its own weights
(AdaLN modulation, q/k/v, MLP) but one attention over both; the single-stream blocks then run on the
concatenated sequence with a fused parallel attention + MLP. Everything is modulated per sample by one
conditioning vector: the timestep (and, for the guidance-distilled FLUX.1-dev, the guidance scale) as
sinusoids through MLPs, plus the pooled CLIP text embedding. Positions enter only through rotary
embeddings on q and k, one band of frequencies per axis (text index, row, column).

The model sees 2x2 patches of 16-channel latents as 64-wide tokens. `FluxTransformer.forward` takes the
latents unpacked, (b, 16, h, w) like the U-Net's sample, and packs / unpacks them itself exactly as
diffusers' FluxPipeline does, so the training loop and the samplers treat both denoisers alike.

Reading order: config, packing and positions, embedders, attention, the two block kinds, the model.
Parameter names are diffusers' (`transformer_blocks.0.attn.add_q_proj.weight`, ...), so state dicts
move between this and diffusers' FluxTransformer2DModel without renaming, and LoRA module names match.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .modeling import ConfigModel, ModelConfig, maybe_checkpoint
from .resnet import TimestepEmbedding, timestep_embedding
from .weights import CheckpointError

ROPE_THETA = 10000.0
TIME_SINUSOID_WIDTH = 256  # width of the sinusoidal features of t x 1000 and guidance x 1000
NORM_EPS = 1e-6  # the affine-free layer norms and the q/k RMS norms


@dataclasses.dataclass
class FluxTransformerConfig(ModelConfig):
    """diffusers' FluxTransformer2DModel config keys; defaults are FLUX.1's (schnell: no guidance embedding)."""

    patch_size: int = 1  # tokens are already 2x2 latent patches; only 1 is implemented
    in_channels: int = 64  # 16 latent channels x 2 x 2
    out_channels: int | None = None  # None: in_channels
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # T5-XXL width
    pooled_projection_dim: int = 768  # CLIP-L pooled width
    guidance_embeds: bool = False  # True for FLUX.1-dev (guidance-distilled)
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)  # rotary dims per position axis; sums to attention_head_dim

    _class_name = "FluxTransformer2DModel"
    # every argument of diffusers 0.42's FluxTransformer2DModel.__init__ is a field above: nothing is fixed
    _fixed: ClassVar[dict[str, Any]] = {}

    def __post_init__(self):
        what = "FluxTransformer config"
        if self.patch_size != 1:
            raise CheckpointError(f"{what}: patch_size={self.patch_size} is not supported (only 1, Flux.1's)")
        for key in ("in_channels", "out_channels"):
            value = getattr(self, key)
            if value is not None and value % 4:
                raise CheckpointError(f"{what}: {key}={value} is not a multiple of 4 (latent channels x 2x2 patches)")
        if len(self.axes_dims_rope) != 3 or any(d % 2 for d in self.axes_dims_rope):
            raise CheckpointError(
                f"{what}: axes_dims_rope={list(self.axes_dims_rope)} must be three even numbers (text, row, column)"
            )
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise CheckpointError(
                f"{what}: axes_dims_rope={list(self.axes_dims_rope)} sums to {sum(self.axes_dims_rope)}, "
                f"but attention_head_dim is {self.attention_head_dim}; rotary embeddings cover each head exactly"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked latent `forward` takes: each token is a 2x2 patch of them."""
        return self.in_channels // 4

    @property
    def out_latent_channels(self) -> int:
        return (self.out_channels or self.in_channels) // 4


# Packing and positions ---------------------------------------------------------------------------


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) latents -> (b, h/2 * w/2, c * 4) tokens, row-major over 2x2 patches; within a token,
    channel-major then the patch's row and column (FluxPipeline's layout)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents`: (b, h/2 * w/2, c * 4) -> (b, c, h, w); h, w are the latent's size."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Position ids (0, row, col) of the packed tokens of an h x w latent -> (h/2 * w/2, 3), float32.
    Text tokens all sit at (0, 0, 0)."""
    rows = torch.arange(h // 2, device=device, dtype=torch.float32)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device, dtype=torch.float32)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


def rope_tables(ids: torch.Tensor, axes_dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary cos and sin for each token -> two (n, head_dim) float32 tensors.

    Axis i takes axes_dims[i] of the head's channels as axes_dims[i] / 2 rotating pairs, with frequencies
    theta^(-2j / axes_dims[i]); each angle is repeated for the two channels of its pair. Angles are computed
    in float64 as diffusers does (float32 frequencies would be off by ~1e-5 rad at position 128)."""
    dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / ROPE_THETA ** (torch.arange(0, dim, 2, dtype=dtype, device=ids.device) / dim)  # (dim/2,)
        angles = ids[:, axis].to(dtype)[:, None] * freqs[None]  # (n, dim/2)
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())  # (n, dim)
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)  # (n, head_dim) each


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (x[2j], x[2j+1]) of (b, n, heads, d) by its angle, in float32."""
    x32 = x.float()
    real, imag = x32.unflatten(-1, (-1, 2)).unbind(-1)  # (b, n, h, d/2) each
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)  # (b, n, h, d): i * (real + i imag)
    return (x32 * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


# Embedders ---------------------------------------------------------------------------------------


class TimeTextEmbedding(nn.Module):
    """The conditioning vector: MLP(sinusoid(t x 1000)) [+ MLP(sinusoid(guidance x 1000))] + MLP(pooled text)."""

    def __init__(self, cfg: FluxTransformerConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.timestep_embedder = TimestepEmbedding(TIME_SINUSOID_WIDTH, dim)
        self.guidance_embedder = TimestepEmbedding(TIME_SINUSOID_WIDTH, dim) if cfg.guidance_embeds else None
        self.text_embedder = TimestepEmbedding(cfg.pooled_projection_dim, dim)  # the same Linear-SiLU-Linear

    def forward(self, timestep: torch.Tensor, guidance: torch.Tensor | None, pooled: torch.Tensor) -> torch.Tensor:
        """timestep, guidance (b,) already x 1000; pooled (b, pooled_projection_dim) -> (b, inner_dim)."""
        def embed(mlp: TimestepEmbedding, t: torch.Tensor) -> torch.Tensor:
            return mlp(timestep_embedding(t, TIME_SINUSOID_WIDTH, flip_sin_to_cos=True).to(pooled.dtype))

        emb = embed(self.timestep_embedder, timestep)  # (b, inner)
        if self.guidance_embedder is not None:
            emb = emb + embed(self.guidance_embedder, guidance)
        return emb + self.text_embedder(pooled)


class AdaLayerNorm(nn.Module):
    """Affine-free LayerNorm, shifted and scaled per sample from the conditioning vector.

    `linear(silu(temb))` gives `chunks` vectors: the first two modulate x (shift, scale; or scale, shift
    for the output norm, as diffusers stores it), the rest (gates, the MLP's shift and scale) are returned."""

    def __init__(self, dim: int, chunks: int, scale_first: bool = False):
        super().__init__()
        self.chunks, self.scale_first = chunks, scale_first
        self.linear = nn.Linear(dim, chunks * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        first, second, *rest = self.linear(F.silu(temb)).chunk(self.chunks, dim=1)  # (b, dim) each
        shift, scale = (second, first) if self.scale_first else (first, second)
        return modulate(layer_norm(x), shift, scale), rest  # (b, n, dim)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]  # (b, n, dim)


# Attention ---------------------------------------------------------------------------------------


def heads(x: torch.Tensor, head_dim: int, norm: nn.RMSNorm) -> torch.Tensor:
    """(b, n, heads * d) -> (b, n, heads, d), RMS-normalised per head (QK norm keeps the logits bounded)."""
    return norm(x.unflatten(-1, (-1, head_dim)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
    """Full attention over (b, n, heads, d) q, k, v with rotary positions on q and k -> (b, n, heads * d)."""
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (b, h, n, d)
    return out.transpose(1, 2).flatten(2).to(q.dtype)  # (b, n, h * d)


class JointAttention(nn.Module):
    """One attention over text and image tokens, with separate projections and QK norms per stream."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        # registration order follows diffusers' FluxAttention, so state dict keys come out in the same order
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=NORM_EPS), nn.RMSNorm(head_dim, eps=NORM_EPS)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=NORM_EPS), nn.RMSNorm(head_dim, eps=NORM_EPS)
        self.add_q_proj, self.add_k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.to_add_out = nn.Linear(dim, dim)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.head_dim
        q = torch.cat([heads(self.add_q_proj(txt), d, self.norm_added_q), heads(self.to_q(img), d, self.norm_q)], 1)
        k = torch.cat([heads(self.add_k_proj(txt), d, self.norm_added_k), heads(self.to_k(img), d, self.norm_k)], 1)
        v = torch.cat([self.add_v_proj(txt), self.to_v(img)], 1).unflatten(-1, (-1, d))  # (b, n_txt + n_img, h, d)
        out = attention(q, k, v, rope)  # (b, n_txt + n_img, dim)
        txt_out, img_out = out[:, : txt.shape[1]], out[:, txt.shape[1] :]
        return self.to_out[0](img_out.contiguous()), self.to_add_out(txt_out.contiguous())


class SelfAttention(nn.Module):
    """The single-stream blocks' q/k/v (no output projection: the block's proj_out does that)."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=NORM_EPS), nn.RMSNorm(head_dim, eps=NORM_EPS)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        d = self.head_dim
        q, k = heads(self.to_q(x), d, self.norm_q), heads(self.to_k(x), d, self.norm_k)  # (b, n, h, d)
        return attention(q, k, self.to_v(x).unflatten(-1, (-1, d)), rope)  # (b, n, dim)


class GeluProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # index 1 is diffusers' dropout slot (p=0 in Flux); keeping it puts the output layer at `net.2`
        self.net = nn.ModuleList([GeluProjection(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


# Blocks ------------------------------------------------------------------------------------------


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    # fp16 overflows in the residual stream of the late blocks; diffusers clamps there, so do we
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class DoubleStreamBlock(nn.Module):
    """Per-stream modulation, attention projections and MLPs; one attention over both streams."""

    def __init__(self, cfg: FluxTransformerConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.gradient_checkpointing = False
        self.norm1 = AdaLayerNorm(dim, 6)  # shift, scale, gate for attention; shift, scale, gate for the MLP
        self.norm1_context = AdaLayerNorm(dim, 6)
        self.attn = JointAttention(dim, cfg.attention_head_dim)
        self.ff = FeedForward(dim)
        self.ff_context = FeedForward(dim)

    def forward(self, img, txt, temb, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        img_in, (img_gate, img_shift2, img_scale2, img_gate2) = self.norm1(img, temb)  # (b, n_img, dim)
        txt_in, (txt_gate, txt_shift2, txt_scale2, txt_gate2) = self.norm1_context(txt, temb)  # (b, n_txt, dim)
        img_attn, txt_attn = self.attn(img_in, txt_in, (cos, sin))

        img = img + img_gate[:, None] * img_attn
        img = img + img_gate2[:, None] * self.ff(modulate(layer_norm(img), img_shift2, img_scale2))
        txt = txt + txt_gate[:, None] * txt_attn
        txt = txt + txt_gate2[:, None] * self.ff_context(modulate(layer_norm(txt), txt_shift2, txt_scale2))
        return img, _clip_fp16(txt)


class SingleStreamBlock(nn.Module):
    """Attention and MLP in parallel on the joint sequence, from one modulated input, one output projection."""

    def __init__(self, cfg: FluxTransformerConfig, mlp_ratio: int = 4):
        super().__init__()
        dim = cfg.inner_dim
        self.gradient_checkpointing = False
        self.norm = AdaLayerNorm(dim, 3)  # shift, scale, gate
        self.proj_mlp = nn.Linear(dim, dim * mlp_ratio)
        self.proj_out = nn.Linear(dim + dim * mlp_ratio, dim)
        self.attn = SelfAttention(dim, cfg.attention_head_dim)

    def forward(self, x, temb, cos, sin) -> torch.Tensor:
        h, (gate,) = self.norm(x, temb)  # (b, n, dim)
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")  # (b, n, 4 dim)
        out = self.proj_out(torch.cat([self.attn(h, (cos, sin)), mlp], dim=2))  # (b, n, 5 dim) -> (b, n, dim)
        return _clip_fp16(x + gate[:, None] * out)


# The model ---------------------------------------------------------------------------------------


class FluxTransformer(ConfigModel):
    """Velocity-predicting Flux.1 transformer on unpacked latents, conditioned on T5 tokens and a pooled CLIP vector."""

    config_class = FluxTransformerConfig
    weights_name = "diffusion_pytorch_model"

    def __init__(self, config: FluxTransformerConfig):
        super().__init__(config)
        dim = config.inner_dim
        self.time_text_embed = TimeTextEmbedding(config)
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.num_layers))
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(config) for _ in range(config.num_single_layers)
        )
        self.norm_out = AdaLayerNorm(dim, 2, scale_first=True)
        self.proj_out = nn.Linear(dim, (config.out_channels or config.in_channels) * config.patch_size**2)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each double- and single-stream block in the backward pass instead of keeping its activations."""
        for block in [*self.transformer_blocks, *self.single_transformer_blocks]:
            block.gradient_checkpointing = enabled

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        guidance: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """sample (b, latent_channels, h, w) with h, w even; timestep () or (b,) sigma in [0, 1];
        encoder_hidden_states (b, n_txt, joint_attention_dim) T5 states; pooled_projections (b, pooled dim) CLIP;
        guidance () or (b,) the guidance scale (FLUX.1-dev only) -> velocity (b, out latent channels, h, w)."""
        cfg = self.config
        b, c, h, w = sample.shape
        if c != cfg.latent_channels or h % 2 or w % 2:
            raise ValueError(
                f"FluxTransformer: sample has shape {tuple(sample.shape)}; expected (b, {cfg.latent_channels}, h, w) "
                "with even h and w (tokens are 2x2 latent patches)"
            )
        if cfg.guidance_embeds and guidance is None:
            raise ValueError(
                "FluxTransformer: this model embeds the guidance scale (guidance_embeds=True, a guidance-distilled "
                "model such as FLUX.1-dev); pass guidance=(b,) scales, e.g. 3.5"
            )
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError(
                "FluxTransformer: guidance given, but this model has no guidance embedding (guidance_embeds=False, "
                "e.g. FLUX.1-schnell); leave it out"
            )

        img = self.x_embedder(pack_latents(sample))  # (b, h/2 * w/2, dim)
        dtype = img.dtype
        # x 1000 after casting to the model dtype, as diffusers does: bf16 rounds sigma the same way there
        timestep = _per_sample(timestep, b, sample.device).to(dtype) * 1000
        if guidance is not None:
            guidance = _per_sample(guidance, b, sample.device).to(dtype) * 1000
        temb = self.time_text_embed(timestep, guidance, pooled_projections.to(dtype))  # (b, dim)
        txt = self.context_embedder(encoder_hidden_states.to(dtype))  # (b, n_txt, dim)
        n_txt = txt.shape[1]

        ids = torch.cat([torch.zeros(n_txt, 3, device=sample.device), image_ids(h, w, sample.device)])  # (n, 3)
        cos, sin = rope_tables(ids, cfg.axes_dims_rope)  # (n_txt + n_img, head_dim) each

        for block in self.transformer_blocks:
            img, txt = maybe_checkpoint(block, img, txt, temb, cos, sin)
        x = torch.cat([txt, img], dim=1)  # (b, n_txt + n_img, dim)
        for block in self.single_transformer_blocks:
            x = maybe_checkpoint(block, x, temb, cos, sin)
        img = x[:, n_txt:]  # (b, n_img, dim)

        img, _ = self.norm_out(img, temb)
        return unpack_latents(self.proj_out(img), h, w)  # (b, out latent channels, h, w)


def _per_sample(value: torch.Tensor | float, b: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(value, device=device)
    return t.expand(b) if t.ndim == 0 else t.reshape(-1).expand(b)
