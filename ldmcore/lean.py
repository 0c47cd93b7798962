"""Memory-lean autograd functions for the two activation patterns that dominate U-Net memory.

Plain autograd keeps every intermediate: for `conv(silu(group_norm(x)))` it saves x, the norm's
output and the SiLU's output; for GEGLU it saves the projection, GELU(gate) and the product. The
functions below save only their input and recompute the cheap elementwise part in the backward
pass, which trades a little bandwidth for a third less activation memory in those places. The
results are identical to the plain ops; tests compare gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        ctx.save_for_backward(x, weight, bias)
        ctx.groups, ctx.eps = groups, eps
        return F.silu(F.group_norm(x, groups, weight, bias, eps))

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(need) for t, need in zip((x, weight, bias), ctx.needs_input_grad[:3])]
            out = F.silu(F.group_norm(inputs[0], ctx.groups, inputs[1], inputs[2], ctx.eps))
        wanted = [t for t, need in zip(inputs, ctx.needs_input_grad[:3]) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (*(next(grads) if need else None for need in ctx.needs_input_grad[:3]), None, None)


def group_norm_silu(x: torch.Tensor, norm: torch.nn.GroupNorm) -> torch.Tensor:
    """`silu(norm(x))`, keeping only x for the backward pass while gradients are recorded."""
    if torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad):
        return _GroupNormSiLU.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps)
    return F.silu(norm(x))


class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projected):
        ctx.save_for_backward(projected)
        hidden, gate = projected.chunk(2, dim=-1)
        return hidden * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad):
        (projected,) = ctx.saved_tensors
        with torch.enable_grad():
            p = projected.detach().requires_grad_(True)
            hidden, gate = p.chunk(2, dim=-1)
            out = hidden * F.gelu(gate)
        return torch.autograd.grad(out, p, grad)


def geglu(projected: torch.Tensor) -> torch.Tensor:
    """`hidden * gelu(gate)` for `projected = cat([hidden, gate], -1)`, keeping only `projected`."""
    if torch.is_grad_enabled() and projected.requires_grad:
        return _GEGLU.apply(projected)
    hidden, gate = projected.chunk(2, dim=-1)
    return hidden * F.gelu(gate)
