"""LoRA weights in our layout, and what every LoRA file format shares (lora_formats.py says which
files are where).

Our layout in memory is peft's, as `peft.get_peft_model_state_dict` gives it:
`<module>.lora_A.weight` (rank, in[, kh, kw]), `<module>.lora_B.weight` (out, rank[, 1, 1]) and, for
DoRA, `<module>.lora_magnitude_vector`, one state dict per component: `denoiser` (the U-Net, or Flux's
transformer), `text_encoder` (CLIP; Flux's CLIP-L) and, for SDXL, `text_encoder_2` (CLIP-bigG; Flux's
T5 takes no LoRA). Text encoder module names carry no `text_model.` level (transformers 5 drops it from
CLIPTextModel); every function here accepts them with or without it. One alpha serves the whole
adapter, and a module's scale is alpha / its rank: peft's convention, and kohya's.

Both file formats carry our settings, the user's metadata and the denoiser's layout as JSON under
`ldm_tune.lora` (OUR_KEY).
"""
from __future__ import annotations

import collections
import json
import os
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ldmcore.weights import CheckpointError

if TYPE_CHECKING:
    from .lora import LoraSettings

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
OUR_KEY = "ldm_tune.lora"  # JSON {"settings": ..., "user": ..., "denoiser_layout": ...} in both formats
DIFFUSERS_KEY = "lora_adapter_metadata"  # diffusers' own: prefixed LoraConfig kwargs
TEXT_PREFIX = "text_model."
COMPONENTS = ("denoiser", "text_encoder", "text_encoder_2")  # as ldmcore's Components names them
PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m"}

Groups = dict[str, dict[str, dict[str, torch.Tensor]]]  # component -> module -> {"A", "B"[, "m"]}


def split_modules(sd: Mapping[str, torch.Tensor] | None, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """Our-layout keys grouped by module: {module: {"A": ..., "B": ..., ["m": magnitude]}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in (sd or {}).items():
        for suffix, part in PARTS.items():
            if key.endswith(suffix):
                out.setdefault(key[: -len(suffix)], {})[part] = tensor
                break
        else:
            raise CheckpointError(
                f"{source}: {key} is not a LoRA weight (expected <module>.lora_A.weight, .lora_B.weight "
                "or .lora_magnitude_vector)"
            )
    _check_pairs(out, source)
    return out


def _check_pairs(mods: Mapping[str, Mapping[str, torch.Tensor]], source: str) -> None:
    for name, parts in mods.items():
        if "A" not in parts or "B" not in parts:
            raise CheckpointError(f"{source}: {name} needs both lora_A and lora_B, found {sorted(parts)}")
        if parts["A"].shape[0] != parts["B"].shape[1]:
            raise CheckpointError(
                f"{source}: {name}: lora_A {tuple(parts['A'].shape)} and lora_B {tuple(parts['B'].shape)} "
                "disagree on the rank"
            )


def join_modules(mods: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    suffix = {p: s for s, p in PARTS.items()}
    return {name + suffix[p]: t for name, parts in mods.items() for p, t in parts.items()}


def bare_text_name(name: str) -> str:
    return name[len(TEXT_PREFIX) :] if name.startswith(TEXT_PREFIX) else name


def _renamed(name: str, table: Mapping[str, str]) -> str | None:
    """`name` with its longest dotted prefix found in `table` replaced; None when none is."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in table:
            return ".".join([table[head], *parts[n:]])
    return None


def common_rank(groups: Groups) -> int:
    ranks = [p["A"].shape[0] for mods in groups.values() for p in mods.values()]
    if not ranks:
        raise CheckpointError("no LoRA modules given")
    return collections.Counter(ranks).most_common(1)[0][0]


def effective_alpha(settings: LoraSettings) -> float:
    return float(settings.alpha if settings.alpha is not None else settings.rank)


def _module_groups(denoiser_sd, text_sd, text_2_sd) -> Groups:
    groups = {"denoiser": split_modules(denoiser_sd, "denoiser LoRA")}
    for component, sd in (("text_encoder", text_sd), ("text_encoder_2", text_2_sd)):
        groups[component] = {bare_text_name(k): v for k, v in split_modules(sd, f"{component} LoRA").items()}
    if not any(groups.values()):
        raise CheckpointError("nothing to save: every LoRA state dict is empty")
    return groups


def _check_settings(settings: LoraSettings, groups: Groups) -> None:
    rank = common_rank(groups)
    if settings.rank != rank:
        raise ValueError(f"settings.rank is {settings.rank} but the LoRA weights have rank {rank}")


def _tensors(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def _our_metadata(settings: LoraSettings | None, user: dict | None, layout: dict | None) -> str:
    try:
        return json.dumps({"settings": settings.to_dict() if settings else None, "user": dict(user or {}),
                           "denoiser_layout": layout})
    except TypeError as e:
        raise ValueError(f"LoRA metadata must be JSON-serialisable: {e}") from None


def _stored(meta: Mapping[str, str]) -> dict[str, Any]:
    return json.loads(meta[OUR_KEY]) if OUR_KEY in meta else {}


def _stored_layout(ours: Mapping[str, Any]) -> dict[str, Any] | None:
    return ours.get("denoiser_layout") or ours.get("unet_layout")  # the second: files written before Flux


def _write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from ldmcore.weights import write_safetensors

    write_safetensors(_tensors(tensors), path, metadata)
