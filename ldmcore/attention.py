"""Attention and the spatial transformer of the Stable Diffusion U-Net.

Parameter names follow diffusers (`to_q`, `to_k`, `to_v`, `to_out.0`, `ff.net.0.proj`,
`transformer_blocks.N`, ...) so state dicts load both ways without renaming.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lean import geglu


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False) -> torch.Tensor:
    """Multi-head scaled dot-product attention on (batch, tokens, heads * dim_head) tensors.

    `upcast` runs the attention itself in float32 when the inputs are half precision;
    SD 2.x's 768 px model overflows fp16 in the softmax otherwise.
    """
    b, n, inner = q.shape
    dim_head = inner // heads
    # (b, n, h*d) -> (b, h, n, d)
    q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v)  # (b, h, n, d)
    return out.to(dtype).transpose(1, 2).reshape(b, n, inner)  # (b, n, h*d)


class Attention(nn.Module):
    """Self-attention (context=None) or cross-attention on a token sequence."""

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        dropout: float = 0.0,
        bias: bool = False,
        upcast: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context  # (b, n_ctx, c_ctx)
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.upcast)
        return self.to_out[1](self.to_out[0](out))  # (b, n, query_dim)


class GEGLU(nn.Module):
    """Gated GELU: one projection to twice the width, half of it gating the other half."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return geglu(self.proj(x))  # (b, n, dim_out)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text, and a GEGLU feed-forward."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int,
        dropout: float = 0.0,
        upcast_attention: bool = False,
        only_cross_attention: bool = False,
    ):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(
            dim, heads, dim_head, cross_attention_dim if only_cross_attention else None, dropout, upcast=upcast_attention
        )
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim, dropout, upcast=upcast_attention)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context if self.only_cross_attention else None) + x  # (b, hw, dim)
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """Spatial transformer: feature map -> tokens -> `depth` transformer blocks -> feature map, residual.

    `use_linear_projection` selects SD 2.x's linear proj_in/proj_out over SD 1.x's 1x1 convolutions.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: int,
        depth: int = 1,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        only_cross_attention: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        linear_or_conv = (lambda i, o: nn.Linear(i, o)) if use_linear_projection else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = linear_or_conv(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner, heads, dim_head, cross_attention_dim, dropout, upcast_attention, only_cross_attention
            )
            for _ in range(depth)
        )
        self.proj_out = linear_or_conv(inner, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        residual = x
        x = self.norm(x)  # (b, c, h, w)
        if self.use_linear_projection:
            x = self.proj_in(x.permute(0, 2, 3, 1).reshape(b, h * w, -1))  # (b, hw, inner)
        else:
            x = self.proj_in(x)  # (b, inner, h, w)
            x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (b, hw, inner)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear_projection:
            # contiguous: a channels-last view here carries through the residual into the next ResNet,
            # where CPU convolutions then reorder their weights on every call (1.3x slower SDXL steps)
            x = self.proj_out(x).reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()  # (b, c, h, w)
        else:
            x = self.proj_out(x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous())
        return x + residual
