"""The Flux.1 transformer in Black Forest Labs' original single-file layout, both ways.

BFL's files (flux1-dev.safetensors, flux1-schnell.safetensors) hold the transformer alone with no prefix;
ComfyUI-style full checkpoints put it under `model.diffusion_model.`. Against diffusers' names
(ldmcore.flux), the original fuses three things and orders one differently:

    double_blocks.N.img_attn.qkv     = rows of attn.to_q, to_k, to_v                   (txt_attn: add_*_proj)
    single_blocks.N.linear1          = rows of attn.to_q, to_k, to_v, proj_mlp           (d, d, d, 4d)
    final_layer.adaLN_modulation.1   = norm_out.linear with its halves swapped           (BFL shift, scale)

and calls the q/k RMS norms' weights `scale`. Everything else is a rename (table in `module_table`).

Public functions:
    original_to_diffusers(state, config) -> diffusers FluxTransformer2DModel state dict
    diffusers_to_original(state, config, prefix="") -> BFL state dict
    detect_flux(state) -> {"guidance_embeds", "prefix"} or None
    config_from_original(state, axes_dims_rope=None) -> diffusers transformer config (dict)
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .flux import FluxTransformerConfig
from .weights import CheckpointError, preview_keys

StateDict = dict[str, torch.Tensor]
PREFIX = "model.diffusion_model."  # where full checkpoints keep the transformer
DETECT_KEY = "double_blocks.0.img_attn.norm.key_norm.scale"  # diffusers' and ComfyUI's marker for Flux.1
GUIDANCE_KEY = "guidance_in.in_layer.weight"  # only guidance-distilled models (FLUX.1-dev) have it
LAYOUT = "Flux transformer, Black Forest Labs single-file layout"


@dataclasses.dataclass(frozen=True)
class ModuleEntry:
    """One module of the original file and the diffusers module(s) it holds."""

    original: str
    diffusers: tuple[str, ...]  # one module, or the parts a fused original weight stacks, in row order
    sizes: tuple[int, ...] = ()  # rows of each part when fused
    norm: bool = False  # an RMS norm: BFL `scale`, diffusers `weight`, no bias
    swap: bool = False  # BFL (shift, scale) rows, diffusers (scale, shift)

    @property
    def params(self) -> tuple[tuple[str, str], ...]:
        """(original name, diffusers name) of each tensor below the module."""
        return (("scale", "weight"),) if self.norm else (("weight", "weight"), ("bias", "bias"))


def module_table(cfg: FluxTransformerConfig) -> list[ModuleEntry]:
    """Every module of the original layout for this config, with the diffusers module(s) it holds."""
    d = cfg.inner_dim
    entries = [
        ModuleEntry("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
        ModuleEntry("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    ]
    if cfg.guidance_embeds:
        entries += [
            ModuleEntry("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
            ModuleEntry("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
        ]
    entries += [
        ModuleEntry("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        ModuleEntry("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
        ModuleEntry("txt_in", ("context_embedder",)),
        ModuleEntry("img_in", ("x_embedder",)),
    ]
    for i in range(cfg.num_layers):
        o, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        entries += [
            ModuleEntry(o + "img_mod.lin", (t + "norm1.linear",)),
            ModuleEntry(o + "txt_mod.lin", (t + "norm1_context.linear",)),
            ModuleEntry(o + "img_attn.qkv", tuple(t + f"attn.to_{p}" for p in "qkv"), (d, d, d)),
            ModuleEntry(o + "txt_attn.qkv", tuple(t + f"attn.add_{p}_proj" for p in "qkv"), (d, d, d)),
            ModuleEntry(o + "img_attn.norm.query_norm", (t + "attn.norm_q",), norm=True),
            ModuleEntry(o + "img_attn.norm.key_norm", (t + "attn.norm_k",), norm=True),
            ModuleEntry(o + "txt_attn.norm.query_norm", (t + "attn.norm_added_q",), norm=True),
            ModuleEntry(o + "txt_attn.norm.key_norm", (t + "attn.norm_added_k",), norm=True),
            ModuleEntry(o + "img_attn.proj", (t + "attn.to_out.0",)),
            ModuleEntry(o + "txt_attn.proj", (t + "attn.to_add_out",)),
            ModuleEntry(o + "img_mlp.0", (t + "ff.net.0.proj",)),
            ModuleEntry(o + "img_mlp.2", (t + "ff.net.2",)),
            ModuleEntry(o + "txt_mlp.0", (t + "ff_context.net.0.proj",)),
            ModuleEntry(o + "txt_mlp.2", (t + "ff_context.net.2",)),
        ]
    for i in range(cfg.num_single_layers):
        o, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        entries += [
            ModuleEntry(o + "modulation.lin", (t + "norm.linear",)),
            ModuleEntry(o + "linear1", (*(t + f"attn.to_{p}" for p in "qkv"), t + "proj_mlp"), (d, d, d, 4 * d)),
            ModuleEntry(o + "linear2", (t + "proj_out",)),
            ModuleEntry(o + "norm.query_norm", (t + "attn.norm_q",), norm=True),
            ModuleEntry(o + "norm.key_norm", (t + "attn.norm_k",), norm=True),
        ]
    entries += [
        ModuleEntry("final_layer.linear", ("proj_out",)),
        ModuleEntry("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
    ]
    return entries


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """The final modulation's rows the other way round (BFL: shift, scale; diffusers: scale, shift)."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _as_config(config: FluxTransformerConfig | Mapping[str, Any]) -> FluxTransformerConfig:
    return config if isinstance(config, FluxTransformerConfig) else FluxTransformerConfig.from_dict(dict(config))


def _describe(cfg: FluxTransformerConfig) -> str:
    return (f"num_layers={cfg.num_layers}, num_single_layers={cfg.num_single_layers}, "
            f"guidance_embeds={cfg.guidance_embeds}")


def _check_keys(given: Mapping[str, torch.Tensor], expected: list[str], what: str, shown: str, hint: str) -> None:
    """Raise naming the first missing and unexpected keys (shown with the file's prefix `shown`)."""
    missing = [shown + k for k in expected if k not in given]
    wanted = set(expected)
    unexpected = sorted(shown + k for k in given if k not in wanted)
    if missing:
        raise CheckpointError(f"{what} lacks {preview_keys(missing)}, which the config expects; {hint}")
    if unexpected:
        lora = any("lora" in k.lower() for k in unexpected)
        cause = "the file holds LoRA weights; load it as an adapter" if lora else hint
        raise CheckpointError(f"{what} has keys the config does not describe: {preview_keys(unexpected)}; {cause}")


# Original -> diffusers ---------------------------------------------------------------------------


def original_to_diffusers(
    state: Mapping[str, torch.Tensor], config: FluxTransformerConfig | Mapping[str, Any]
) -> StateDict:
    """A BFL-layout transformer state dict (optionally under `model.diffusion_model.`, beside other components'
    keys, which are ignored) -> diffusers FluxTransformer2DModel names, fused weights split by the config's widths."""
    cfg = _as_config(config)
    prefix = PREFIX if any(k.startswith(PREFIX) for k in state) else ""
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    entries = module_table(cfg)
    what = f"the checkpoint ({LAYOUT}{', under ' + prefix if prefix else ''})"
    hint = f"check the transformer config ({_describe(cfg)}) against the file, or read it with config_from_original"
    _check_keys(own, [f"{e.original}.{o}" for e in entries for o, _ in e.params], what, prefix, hint)

    out: StateDict = {}
    for e in entries:
        for o, d in e.params:
            key = f"{e.original}.{o}"
            tensor = own[key]
            if e.swap:
                tensor = swap_halves(tensor)
            if not e.sizes:
                out[f"{e.diffusers[0]}.{d}"] = tensor
                continue
            if tensor.shape[0] != sum(e.sizes):
                raise CheckpointError(
                    f"{what}: {prefix}{key} has {tensor.shape[0]} rows, but the config's width "
                    f"({cfg.num_attention_heads} heads x {cfg.attention_head_dim}) makes {list(e.sizes)} = "
                    f"{sum(e.sizes)}; {hint}"
                )
            for name, part in zip(e.diffusers, tensor.split(e.sizes, dim=0)):
                out[f"{name}.{d}"] = part.contiguous()
    return out


# Diffusers -> original ---------------------------------------------------------------------------


def diffusers_to_original(
    state: Mapping[str, torch.Tensor], config: FluxTransformerConfig | Mapping[str, Any], prefix: str = ""
) -> StateDict:
    """A diffusers FluxTransformer2DModel state dict -> BFL names (fused q/k/v and linear1, swapped final
    modulation), each key under `prefix` ("" for a BFL-style transformer file, `PREFIX` for a full checkpoint)."""
    cfg = _as_config(config)
    entries = module_table(cfg)
    what = "the diffusers Flux transformer state dict"
    hint = f"check the transformer config ({_describe(cfg)}) against the weights"
    _check_keys(state, [f"{name}.{d}" for e in entries for name in e.diffusers for _, d in e.params], what, "", hint)

    out: StateDict = {}
    for e in entries:
        for o, d in e.params:
            parts = [state[f"{name}.{d}"] for name in e.diffusers]
            tensor = torch.cat(parts, dim=0) if e.sizes else parts[0]
            out[f"{prefix}{e.original}.{o}"] = swap_halves(tensor) if e.swap else tensor
    return out


# Reading a file's shape --------------------------------------------------------------------------


def detect_flux(state: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """None unless the state dict holds a Flux.1 transformer in the BFL layout; else its prefix and whether it
    embeds the guidance scale (FLUX.1-dev: True; schnell: False)."""
    for prefix in (PREFIX, ""):
        if prefix + DETECT_KEY in state:
            return {"guidance_embeds": prefix + GUIDANCE_KEY in state, "prefix": prefix}
    return None


def _count_blocks(keys: list[str], name: str) -> int:
    indices = {int(m.group(1)) for k in keys if (m := re.match(rf"{name}\.(\d+)\.", k))}
    if indices != set(range(len(indices))):
        missing = sorted(set(range(max(indices) + 1)) - indices)
        raise CheckpointError(f"the checkpoint ({LAYOUT}) has no {name}.{missing[0]}.*, but has later blocks; "
                              "the file is incomplete")
    return len(indices)


def config_from_original(
    state: Mapping[str, torch.Tensor], axes_dims_rope: Sequence[int] | None = None
) -> dict[str, Any]:
    """A diffusers FluxTransformer2DModel config (dict) inferred from the shapes of a BFL-layout file.

    The rotary split of each head over (text, row, column) leaves no trace in the weights: Flux.1's
    (16, 56, 56) is assumed for 128-wide heads; other head widths need `axes_dims_rope` given."""
    found = detect_flux(state)
    if found is None:
        raise CheckpointError(f"not a {LAYOUT} file: no {DETECT_KEY} (nor {PREFIX}{DETECT_KEY})")
    prefix = found["prefix"]
    own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    def shape(key: str) -> torch.Size:
        if key not in own:
            raise CheckpointError(f"the checkpoint ({LAYOUT}) lacks {prefix}{key}; the file is incomplete")
        return own[key].shape

    hidden, in_channels = shape("img_in.weight")
    head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    out_channels = shape("final_layer.linear.weight")[0]
    if axes_dims_rope is None:
        if head_dim != 128:
            raise CheckpointError(
                f"the checkpoint ({LAYOUT}) has {head_dim}-wide attention heads; the rotary split over "
                "(text, row, column) cannot be read from weights and is known only for Flux.1's 128 (16, 56, 56): "
                "pass axes_dims_rope"
            )
        axes_dims_rope = (16, 56, 56)
    keys = list(own)
    cfg = FluxTransformerConfig(
        in_channels=in_channels,
        out_channels=None if out_channels == in_channels else out_channels,
        num_layers=_count_blocks(keys, "double_blocks"),
        num_single_layers=_count_blocks(keys, "single_blocks"),
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=shape("txt_in.weight")[1],
        pooled_projection_dim=shape("vector_in.in_layer.weight")[1],
        guidance_embeds=found["guidance_embeds"],
        axes_dims_rope=tuple(axes_dims_rope),
    )
    return cfg.to_dict()
