"""The diffusers/peft LoRA file, `pytorch_lora_weights.safetensors`, as diffusers' `load_lora_weights`
reads it: `<denoiser>.<module>.lora_A.weight`, ... with the family's component name (`unet.`, Flux
`transformer.`), `text_encoder.text_model.<module>...`, `text_encoder_2.text_model.<module>...`; alpha,
rank and target modules in the `lora_adapter_metadata` JSON (without it diffusers assumes alpha = rank).
"""
from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ldmcore.weights import CheckpointError, preview_keys

from .lora_family import DENOISER_PREFIX, _family_to_save, denoiser_layout
from .lora_state import (
    COMPONENTS,
    DIFFUSERS_KEY,
    OUR_KEY,
    TEXT_PREFIX,
    Groups,
    _check_settings,
    _module_groups,
    _our_metadata,
    _write,
    bare_text_name,
    common_rank,
    effective_alpha,
    join_modules,
    split_modules,
)

if TYPE_CHECKING:
    from .lora import LoraSettings

def _peft_config(mods: dict, rank: int, alpha: float) -> dict[str, Any]:
    """LoraConfig kwargs that diffusers builds its adapter from (`LoraConfig(**these)`)."""
    return {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(mods),
        "rank_pattern": {name: p["A"].shape[0] for name, p in sorted(mods.items()) if p["A"].shape[0] != rank},
        "use_dora": any("m" in p for p in mods.values()),
    }


def save_diffusers(
    path: str | os.PathLike,
    denoiser_sd: Mapping[str, torch.Tensor],
    text_sd: Mapping[str, torch.Tensor] | None = None,
    metadata: dict | None = None,
    *,
    settings: LoraSettings | None = None,
    text_2_sd: Mapping[str, torch.Tensor] | None = None,
    denoiser_config: Any = None,
) -> None:
    """Write `pytorch_lora_weights.safetensors` as diffusers' `load_lora_weights` reads it (SDXL:
    `text_2_sd` for `text_encoder_2`), the denoiser under the family's component name (`unet.`, Flux
    `transformer.`).

    Pass `settings` whenever alpha differs from the rank: without them the file says alpha = rank
    (scale 1), the convention of diffusers files that carry no alpha. `denoiser_config`, when given, is
    checked against the LoRA and its layout kept, so the file can later be written as kohya's."""
    groups = _module_groups(denoiser_sd, text_sd, text_2_sd)
    family = _family_to_save(groups, denoiser_config)
    if settings is not None:
        _check_settings(settings, groups)
    rank = settings.rank if settings is not None else common_rank(groups)
    alpha = effective_alpha(settings) if settings is not None else float(rank)
    tensors, adapter = {}, {}
    for component, mods in groups.items():
        if not mods:
            continue
        name = DENOISER_PREFIX[family] if component == "denoiser" else component
        prefix = f"{name}." if component == "denoiser" else f"{name}.{TEXT_PREFIX}"
        tensors |= {prefix + k: v for k, v in join_modules(mods).items()}
        # text names stay without `text_model.`: peft matches them as suffixes in either layout
        adapter |= {f"{name}.{k}": v for k, v in _peft_config(mods, rank, alpha).items()}
    layout = denoiser_layout(denoiser_config) if denoiser_config is not None else None
    meta = {DIFFUSERS_KEY: json.dumps(adapter, sort_keys=True), OUR_KEY: _our_metadata(settings, metadata, layout)}
    _write(path, tensors, meta)


# the prefixes of diffusers' files -> our components
_DIFFUSERS_COMPONENTS = {"unet": "denoiser", "transformer": "denoiser", "text_encoder": "text_encoder",
                         "text_encoder_2": "text_encoder_2"}


def _is_diffusers(keys) -> bool:
    return any(k.split(".", 1)[0] in _DIFFUSERS_COMPONENTS and (".lora_A." in k or ".lora_B." in k) for k in keys)


def _from_diffusers(state: dict, raw: dict, source: str) -> tuple[Groups, dict]:
    groups: Groups = {c: {} for c in COMPONENTS}
    flat: dict[str, dict[str, torch.Tensor]] = {p: {} for p in _DIFFUSERS_COMPONENTS}
    other = []
    for k, v in state.items():
        prefix = k.split(".", 1)[0]
        if prefix in flat:
            rest = k[len(prefix) + 1 :]
            flat[prefix][rest if _DIFFUSERS_COMPONENTS[prefix] == "denoiser" else bare_text_name(rest)] = v
        else:
            other.append(k)
    if other:
        raise CheckpointError(f"{source}: keys outside {', '.join(p + '.' for p in flat)}: {preview_keys(other)}")
    if flat["unet"] and flat["transformer"]:
        raise CheckpointError(f"{source}: weights for both a U-Net (unet.) and a transformer (transformer.); "
                              "a LoRA adapts one denoiser")
    adapter = json.loads(raw.get(DIFFUSERS_KEY) or "{}")
    alphas = {}
    for prefix, component in _DIFFUSERS_COMPONENTS.items():
        if not flat[prefix]:
            continue
        groups[component] = mods = split_modules(flat[prefix], source)
        cfg = {k[len(prefix) + 1 :]: v for k, v in adapter.items() if k.startswith(prefix + ".")}
        for name, p in mods.items():
            # no lora_alpha in the file: diffusers' convention is alpha = rank, module by module
            alphas[(component, name)] = float(
                _pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", p["A"].shape[0]))
            )
    return groups, alphas


def _pattern_value(pattern: dict, name: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key.lstrip('^')})$", name):
            return value
    return default
