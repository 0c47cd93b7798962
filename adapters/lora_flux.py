"""Flux.1 LoRA module names: diffusers' (ours, peft's, diffusers' files) and Black Forest Labs' (kohya's
`lora_unet_<bfl>` files, ComfyUI's `diffusion_model.<bfl>`), with the fused weights between them.

BFL fuses what diffusers keeps apart: a double block's image q/k/v are one `img_attn.qkv` (the text
stream's, `txt_attn.qkv`), a single block's q/k/v and MLP input one `linear1` (rows q, k, v, mlp), and
the final layer's modulation holds its two halves the other way round (BFL shift, scale; diffusers
scale, shift). The module table is ldmcore.single_file_flux's, where the checkpoint conversion reads it.

Writing, the LoRAs of a fused weight's k parts become one LoRA on it: downs stacked (rank k x r), ups
block-diagonal, zero blocks for parts that have none. Loaders scale a module by alpha / its rank, so the
fused module's alpha is k x alpha: each part keeps alpha / r (left at alpha, a file loads at 1/k
strength, the known pitfall of files written from split q/k/v).

Reading, a block-diagonal fused LoRA (ours, kohya's `split_qkv`) splits back into the per-part LoRAs
that were written (zero blocks dropped); any other (one down serving q, k and v: kohya's default
training) becomes one LoRA per part with that down, the up's rows for the part and the same alpha.
Both are exact: B @ A is the same sum either way.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Mapping

import torch

from ldmcore.single_file_flux import swap_halves
from ldmcore.weights import CheckpointError, preview_keys

Parts = dict[str, torch.Tensor]  # {"A": (rank, in), "B": (out, rank)}

DIFFUSERS_ROOTS = ("transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                   "time_text_embed", "norm_out", "proj_out")
BFL_ROOTS = ("double_blocks", "single_blocks", "img_in", "txt_in", "time_in", "vector_in", "guidance_in",
             "final_layer")
KOHYA_PREFIX = "lora_unet_"  # kohya's, for the transformer too ("make ComfyUI compatible")
BFL_PREFIX = "diffusion_model."  # ComfyUI's own spelling of BFL names
UNDERSCORED_PREFIXES = ("lora_transformer_", "lycoris_")  # OneTrainer's, LyCORIS': diffusers names, dots as _
SUFFIXES = {".lora_down.weight": "A", ".lora_up.weight": "B", ".lora_A.weight": "A", ".lora_B.weight": "B",
            ".alpha": "alpha"}
_BLOCK = re.compile(r"^(single_transformer_blocks|transformer_blocks|double_blocks|single_blocks)([._])(\d+)\2")


@dataclasses.dataclass(frozen=True)
class FluxModule:
    """One BFL module and the diffusers modules its weight holds, in row order. Block names carry `#`
    for the block's index. `wide`: the part whose rows are not the block width (single blocks' MLP
    input, 4x), None when all are."""

    bfl: str
    parts: tuple[str, ...]
    wide: int | None = None
    swap: bool = False

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1


def _generic(name: str) -> tuple[str, str | None]:
    """`transformer_blocks.3.attn.to_q` -> (`transformer_blocks.#.attn.to_q`, "3"); also with `_` for `.`."""
    m = _BLOCK.match(name)
    if m is None:
        return name, None
    return f"{m.group(1)}{m.group(2)}#{m.group(2)}{name[m.end():]}", m.group(3)


@functools.cache
def _table() -> tuple[FluxModule, ...]:
    from ldmcore.flux import FluxTransformerConfig
    from ldmcore.single_file_flux import module_table

    # one block of each kind and every optional module: the names of any Flux transformer, by template
    cfg = FluxTransformerConfig(num_layers=1, num_single_layers=1, guidance_embeds=True)
    out = []
    for e in module_table(cfg):
        if e.norm:  # RMS norm scales: no LoRA there
            continue
        wide = next((i for i, s in enumerate(e.sizes) if s != cfg.inner_dim), None)
        out.append(FluxModule(_generic(e.original)[0], tuple(_generic(p)[0] for p in e.diffusers), wide, e.swap))
    return tuple(out)


@functools.cache
def _by_bfl() -> dict[str, FluxModule]:
    return {m.bfl: m for m in _table()}


@functools.cache
def _by_part() -> dict[str, tuple[FluxModule, int]]:
    return {p: (m, i) for m in _table() for i, p in enumerate(m.parts)}


@functools.cache
def _underscored() -> dict[str, str]:
    """Generic names with dots as underscores (kohya's and OneTrainer's spelling) -> with dots."""
    names = [m.bfl for m in _table()] + [p for m in _table() for p in m.parts]
    return {n.replace(".", "_"): n for n in names}


def _concrete(generic: str, index: str | None) -> str:
    return generic.replace("#", index) if index is not None else generic


def is_flux_module(name: str) -> bool:
    """Whether `name` is a Linear layer of a Flux transformer in diffusers' names (what LoRA can adapt)."""
    return _generic(name)[0] in _by_part()


# -- diffusers -> BFL --------------------------------------------------------------------------------


def to_bfl(mods: Mapping[str, Parts], source: str) -> dict[str, tuple[Parts, int]]:
    """LoRAs by diffusers module -> {BFL module: ({"A", "B"}, alpha multiplier)}: fused parts stacked
    (multiplier k, see the module docstring), the final modulation's up rows swapped."""
    unknown = sorted(n for n in mods if not is_flux_module(n))
    if unknown:
        raise CheckpointError(f"{source}: not Linear layers of a Flux transformer: {preview_keys(unknown)}")
    fused: dict[str, dict[int, Parts]] = {}
    for name, parts in mods.items():
        generic, index = _generic(name)
        module, position = _by_part()[generic]
        fused.setdefault(_concrete(module.bfl, index), {})[position] = parts
    out = {}
    for bfl, present in fused.items():
        module = _by_bfl()[_generic(bfl)[0]]
        if not module.fused:
            a, b = present[0]["A"], present[0]["B"]
            out[bfl] = ({"A": a, "B": swap_halves(b) if module.swap else b}, 1)
        else:
            out[bfl] = (_stack(module, present, bfl, source), len(module.parts))
    return out


def _stack(module: FluxModule, present: dict[int, Parts], bfl: str, source: str) -> Parts:
    """One LoRA on a fused weight from its parts' LoRAs: every part gets a rank-r block (r the largest
    rank among them; a smaller rank's up is scaled by r / its rank so that its alpha / rank holds)."""
    any_a = next(iter(present.values()))["A"]
    width, dtype = any_a.shape[1], any_a.dtype  # every fused part reads the block's hidden state
    r = max(p["A"].shape[0] for p in present.values())
    k = len(module.parts)
    rows = [width] * k
    if module.wide is not None:  # the MLP's width: from its own LoRA, else Flux's ratio of 4
        rows[module.wide] = present[module.wide]["B"].shape[0] if module.wide in present else 4 * width
    a = torch.zeros(k * r, width, dtype=dtype)
    b = torch.zeros(sum(rows), k * r, dtype=dtype)
    for i, parts in present.items():
        rank, top = parts["A"].shape[0], sum(rows[:i])
        if parts["A"].shape[1] != width or parts["B"].shape[0] != rows[i]:
            raise CheckpointError(
                f"{source}: {_concrete(module.parts[i], _generic(bfl)[1])}: its LoRA maps {parts['A'].shape[1]} -> "
                f"{parts['B'].shape[0]} features, but the other parts fused into {bfl} make it {width} -> {rows[i]}"
            )
        a[i * r : i * r + rank] = parts["A"]
        b[top : top + rows[i], i * r : i * r + rank] = parts["B"] * (r / rank) if rank != r else parts["B"]
    return {"A": a, "B": b}


# -- BFL -> diffusers --------------------------------------------------------------------------------


def from_bfl(mods: Mapping[str, Parts], alphas: Mapping[str, float], source: str
             ) -> tuple[dict[str, Parts], dict[str, float]]:
    """LoRAs by BFL module (with their alphas) -> by diffusers module, fused ones split (module docstring)."""
    out: dict[str, Parts] = {}
    out_alphas: dict[str, float] = {}
    for bfl, parts in mods.items():
        generic, index = _generic(bfl)
        module = _by_bfl().get(generic)
        if module is None:
            raise CheckpointError(f"{source}: {bfl} is not a module of a Flux transformer (Black Forest Labs' names)")
        if not module.fused:
            name = _concrete(module.parts[0], index)
            out[name] = {"A": parts["A"], "B": swap_halves(parts["B"]) if module.swap else parts["B"]}
            out_alphas[name] = alphas[bfl]
            continue
        for generic_part, split, alpha in _split(module, parts, alphas[bfl], bfl, source):
            out[_concrete(generic_part, index)] = split
            out_alphas[_concrete(generic_part, index)] = alpha
    return out, out_alphas


def _split(module: FluxModule, parts: Parts, alpha: float, bfl: str, source: str):
    a, b = parts["A"], parts["B"]
    width, rank, k = a.shape[1], a.shape[0], len(module.parts)
    rows = [width] * k
    if module.wide is not None:
        rows[module.wide] = b.shape[0] - (k - 1) * width
    if rows[-1] <= 0 or sum(rows) != b.shape[0]:
        raise CheckpointError(
            f"{source}: {bfl}: the LoRA's up has {b.shape[0]} rows, which do not split into "
            f"{', '.join(p.rsplit('.', 1)[-1] for p in module.parts)} of a {width}-wide block"
        )
    tops = [sum(rows[:i]) for i in range(k)]
    r = rank // k
    if rank % k == 0 and all(
        not b[tops[i] : tops[i] + rows[i], j * r : (j + 1) * r].any() for i in range(k) for j in range(k) if i != j
    ):
        for i, name in enumerate(module.parts):
            down, up = a[i * r : (i + 1) * r], b[tops[i] : tops[i] + rows[i], i * r : (i + 1) * r]
            if down.any() or up.any():  # an all-zero block: the part has no LoRA
                yield name, {"A": down.contiguous(), "B": up.contiguous()}, alpha / k
        return
    for i, name in enumerate(module.parts):
        yield name, {"A": a, "B": b[tops[i] : tops[i] + rows[i]].contiguous()}, alpha


# -- other tools' spellings --------------------------------------------------------------------------


def parse_key(key: str) -> tuple[str, str, str] | None:
    """A key of a Flux transformer LoRA in any spelling ComfyUI reads except diffusers' own
    (`transformer.<module>...`, read with the other diffusers files) -> (naming "bfl" or "diffusers",
    module, part "A" / "B" / "alpha"); None for any other key."""
    suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
    if suffix is None:
        return None
    found = module_name(key[: -len(suffix)])
    return None if found is None else (*found, SUFFIXES[suffix])


def module_name(name: str) -> tuple[str, str] | None:
    """A Flux transformer module as files name it (`lora_unet_double_blocks_0_img_attn_qkv`,
    `diffusion_model.double_blocks.0.img_attn.qkv`, `lycoris_transformer_blocks_0_attn_to_q`,
    `lora_transformer_...`, `transformer_blocks.0.attn.to_q`) -> (naming "bfl" or "diffusers", the
    module with dots); None when it is not one."""
    if name.startswith(KOHYA_PREFIX) and "." not in name:
        naming, module = "bfl", _dotted(name[len(KOHYA_PREFIX) :])
    elif name.startswith(BFL_PREFIX):
        naming, module = "bfl", name[len(BFL_PREFIX) :]
    elif name.startswith(UNDERSCORED_PREFIXES) and "." not in name:
        prefix = next(p for p in UNDERSCORED_PREFIXES if name.startswith(p))
        naming, module = "diffusers", _dotted(name[len(prefix) :])
    elif name.split(".")[0] in DIFFUSERS_ROOTS:
        naming, module = "diffusers", name
    else:
        return None
    if module is None:
        return None
    known = _by_bfl() if naming == "bfl" else _by_part()
    return (naming, module) if _generic(module)[0] in known else None


def bfl_module(bfl: str) -> FluxModule:
    """The table entry of a concrete BFL module name (`double_blocks.3.img_attn.qkv`), its parts made
    concrete too."""
    generic, index = _generic(bfl)
    m = _by_bfl()[generic]
    return dataclasses.replace(m, bfl=bfl, parts=tuple(_concrete(p, index) for p in m.parts))


def _dotted(underscored: str) -> str | None:
    generic, index = _generic(underscored)
    dotted = _underscored().get(generic)
    return None if dotted is None else _concrete(dotted, index)
