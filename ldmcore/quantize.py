"""A frozen base in 4 or 8 bits, as QLoRA trains: the denoiser's linear layers become bitsandbytes
NF4 (4-bit NormalFloat, blockwise scales) or int8 (LLM.int8 with outlier columns in 16 bits) layers,
while what trains (LoRA's A and B) stays in float32 beside them. Flux.1-dev's 12B transformer is
24 GB in bf16 and 6.1 GB in NF4 (bitsandbytes' double quantization: 0.516 B a weight), which is what
puts its LoRA training on a 24 GB card.

The layers are swapped in place and keep their names, so peft's LoRA wraps them as it wraps a plain
Linear (it has bitsandbytes-aware LoRA layers) and the LoRA files are exactly those of an unquantised
base: nothing of the quantisation is exported. Weights are quantised when the model moves to its
device (bitsandbytes quantises on `.to(device)`), so a base loaded on the CPU is never held twice on
the GPU.
"""
from __future__ import annotations

import torch
from torch import nn

KINDS = ("nf4", "int8")


def quantize_linears(model: nn.Module, kind: str, compute_dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every frozen nn.Linear of `model` by its bitsandbytes `kind` ("nf4" or "int8")
    counterpart holding the same weights; returns the names of the layers replaced. Layers whose
    weights train (requires_grad) are left alone: they must stay in full precision."""
    if kind not in KINDS:
        raise ValueError(f"quantisation {kind!r} is not supported; choose one of {', '.join(KINDS)}")
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
        raise RuntimeError("a quantised base needs bitsandbytes (pip install bitsandbytes)") from e

    replaced = []
    for name, layer in list(model.named_modules()):
        if type(layer) is not nn.Linear or layer.weight.requires_grad:
            continue
        if kind == "nf4":
            new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                    compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type="nf4")
            # bitsandbytes' CPU inference path repacks the weight in place on the first no-grad call, which
            # fails for layers narrower than a quantisation block and leaves training with repacked weights
            new.support_avx512bf16_for_cpu = False
        else:
            new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                      has_fp16_weights=False, threshold=6.0, device="meta")
            new.weight = bnb.nn.Int8Params(layer.weight.data, requires_grad=False, has_fp16_weights=False)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        replaced.append(name)
    return replaced


def is_quantized(p: torch.Tensor) -> bool:
    """Whether a parameter is a bitsandbytes quantised weight (its dtype must not be changed)."""
    return type(p).__name__ in ("Params4bit", "Int8Params")


def quantized_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers take as they are now: quantised weights at their packed size
    plus the scales bitsandbytes keeps beside them, which are neither parameters nor buffers (NF4: the
    blockwise absmax, itself quantised with a second level of scales and code tables; int8: a float32
    scale per row)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers(), *_quantization_state(model)]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _quantization_state(model: nn.Module) -> list[torch.Tensor]:
    found = []
    for p in model.parameters():
        state = getattr(p, "quant_state", None)  # NF4 (bitsandbytes.functional.QuantState)
        while state is not None:
            found += [t for t in (state.absmax, state.code, getattr(state, "offset", None)) if torch.is_tensor(t)]
            state = state.state2 if state.nested else None
        scales = getattr(p, "SCB", None)  # int8
        if torch.is_tensor(scales):
            found.append(scales)
    return found
