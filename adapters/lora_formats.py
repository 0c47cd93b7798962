"""LoRA files, both ways: the diffusers/peft layout and the kohya layout (A1111, ComfyUI, Forge), for SD
1.x/2.x, SDXL and Flux.1; here, reading either into a `LoraFile` (`load_lora_file`).

- lora_state.py: our layout in memory (peft's) and what both formats share;
- lora_family.py: which family a file or a model is for, and refusing a file for another;
- lora_diffusers.py: `pytorch_lora_weights.safetensors`, as diffusers reads it (`save_diffusers`);
- lora_kohya.py: `lora_kohya.safetensors`, kohya's names for each family (`KohyaNames`, `save_kohya`);
- lora_flux.py: Flux's module names, diffusers' and Black Forest Labs' (q/k/v fused).

Flux LoRAs are also read in the other spellings ComfyUI reads (`diffusion_model.<bfl>`,
`lora_transformer_<diffusers>`, bare diffusers names).

Reading a file whose modules have different alphas (other tools' kohya files, diffusers'
alpha_pattern) folds alpha_m / alpha into that module's lora_B, so the math is unchanged while the
layout keeps one alpha. Files written here have one alpha, so their tensors come back identical.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from ldmcore.single_file import unet_module_names
from ldmcore.weights import CheckpointError, preview_keys, read_state_dict

from . import lora_flux
from .lora_diffusers import _from_diffusers, _is_diffusers
from .lora_family import (
    FLUX_LAYOUT,
    SDXL_LAYOUT,
    _check_denoiser_modules,
    _family_clues,
    _family_for,
    _no_t5,
    _t5_refused,
    denoiser_layout,
)
from .lora_kohya import _SGM_ROOTS, KohyaNames, _from_kohya, _read_kohya
from .lora_state import COMPONENTS, Groups, _check_pairs, _stored, _stored_layout, common_rank, join_modules


def _read_flux(state: dict, raw: dict, source: str) -> tuple[Groups, dict] | None:
    """A Flux LoRA in kohya's spelling or another ComfyUI reads (`lora_unet_<bfl>`, `diffusion_model.<bfl>`,
    `lora_transformer_<diffusers>`, bare diffusers names), CLIP-L as `lora_te1_` / `lora_te_` or
    `text_encoder.`; None when no key names a Flux transformer module that way."""
    parsed = {k: p for k in state if (p := lora_flux.parse_key(k)) is not None}
    if not parsed:
        return None
    rest = {k: v for k, v in state.items() if k not in parsed}
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in rest):
        raise _t5_refused(source, CheckpointError)
    kohya_text = {k: v for k, v in rest.items() if k.startswith(("lora_te1_", "lora_te_"))}
    diffusers_text = {k: v for k, v in rest.items() if k.startswith("text_encoder.")}
    other = sorted(set(rest) - set(kohya_text) - set(diffusers_text))
    if other:
        raise CheckpointError(f"{source}: a Flux LoRA with keys that are neither a Flux transformer module's "
                              f"nor CLIP-L's: {preview_keys(other)}")
    by_naming: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, (naming, module, part) in parsed.items():
        by_naming.setdefault(naming, {}).setdefault(module, {})[part] = state[key]
    groups: Groups = {c: {} for c in COMPONENTS}
    alphas = {}
    for naming, mods in by_naming.items():
        # sd-scripts: a missing or zero alpha means alpha = rank (scale 1)
        mod_alphas = {m: float(p.pop("alpha").item()) if "alpha" in p else 0.0 for m, p in mods.items()}
        _check_pairs(mods, source)
        mod_alphas = {m: a or float(mods[m]["A"].shape[0]) for m, a in mod_alphas.items()}
        if naming == "bfl":
            mods, mod_alphas = lora_flux.from_bfl(mods, mod_alphas, source)
        twice = sorted(set(mods) & set(groups["denoiser"]))
        if twice:
            raise CheckpointError(f"{source}: modules given twice, in two spellings: {preview_keys(twice)}")
        groups["denoiser"] |= mods
        alphas |= {("denoiser", m): a for m, a in mod_alphas.items()}
    if kohya_text:
        grouped, split, _ = _read_kohya(kohya_text, source)
        text_groups, text_alphas = _from_kohya(grouped, split, KohyaNames("flux"), source)
        groups["text_encoder"], alphas = text_groups["text_encoder"], alphas | text_alphas
    if diffusers_text:
        text_groups, text_alphas = _from_diffusers(diffusers_text, raw, source)
        groups["text_encoder"] |= text_groups["text_encoder"]
        alphas |= text_alphas
    return groups, alphas


def _one_alpha(groups: Groups, alphas: dict, preferred: float | None) -> float:
    """Fold per-module alphas into lora_B so that one alpha holds for all (see the module docstring)."""
    values = list(alphas.values())
    # kohya files store alpha as float32 (and Flux's fused modules k x alpha): equal to that precision
    if preferred is not None and all(abs(a - preferred) <= 1e-6 * abs(preferred) for a in values):
        return float(preferred)
    alpha = collections.Counter(values).most_common(1)[0][0]
    for (component, name), a in alphas.items():
        if a != alpha:
            parts = groups[component][name]
            parts["B"] = parts["B"] * (a / alpha)
    return alpha


def read_lora_metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


@dataclasses.dataclass
class LoraFile:
    """A LoRA file read into our layout: one state dict per component, None where it has none."""

    denoiser: dict[str, torch.Tensor]  # the U-Net's or Flux transformer's modules
    text_encoder: dict[str, torch.Tensor] | None
    text_encoder_2: dict[str, torch.Tensor] | None  # SDXL's CLIP-bigG
    family: str  # "sd" (SD 1.x/2.x), "sdxl" or "flux": the denoiser config's, else what the file tells
    format: str  # "diffusers" or "kohya"
    alpha: float  # the one alpha of these tensors
    settings: dict[str, Any]  # LoraSettings as a dict: stored, or rebuilt from the tensors (explicit targets)
    user: dict[str, Any]  # the metadata given when saving
    file_metadata: dict[str, str]  # the file's own metadata, as stored
    denoiser_layout: dict[str, Any] | None  # the denoiser layout known for it: pass it on as denoiser_config

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """The components the file has weights for: {"denoiser": ..., "text_encoder": ..., ...}."""
        return {c: sd for c in COMPONENTS if (sd := getattr(self, c))}


def load_lora_file(path: str | os.PathLike, denoiser_config: Any = None) -> LoraFile:
    """Read a diffusers or kohya LoRA file, SD 1.x/2.x, SDXL or Flux.1, into our layout.

    `denoiser_config`: the config of the U-Net or Flux transformer the LoRA is for. A file for another
    family is refused, and U-Net modules under original (sgm) names are read with its block layout.
    Without it, the layout the file was written with (ours remember it) or, for other tools' SDXL
    files, SDXL base's is used."""
    path = Path(path)
    source = str(path)
    state = read_state_dict(path)
    raw = read_lora_metadata(path)
    keys = list(state)
    from .lycoris import algo_of

    algo = algo_of(keys)
    if algo is not None:
        raise CheckpointError(f"{path}: a {'LoHa' if algo == 'loha' else 'LoKr'} (LyCORIS) file, not a LoRA; this "
                              "reads LoRA files only: merge and inspect take LoHa / LoKr files")
    flux = _read_flux(state, raw, source)
    if flux is not None:  # kohya's spelling, or another that ComfyUI reads
        fmt, (groups, alphas) = "kohya", flux
        clues = _family_clues(groups, raw)
    elif any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        fmt, (grouped, split, seen) = "kohya", _read_kohya(state, source)
        clues = _family_clues(seen, raw, {prefix for prefix, _, _ in split.values()})
        sgm_names = any(m.split(".")[0] in _SGM_ROOTS for m in seen["denoiser"])
        if denoiser_config is None and not clues and sgm_names:  # only kohya's SDXL files use sgm names
            clues = [("sdxl", "its U-Net modules have the original (sgm) names")]
    elif _is_diffusers(keys):
        fmt, (groups, alphas) = "diffusers", _from_diffusers(state, raw, source)
        clues = _family_clues(groups, raw)
    else:
        hint = ""
        if any(".processor." in k or "_lora.down." in k for k in keys):
            hint = "; this is diffusers' old attention-processor LoRA format: load it in diffusers and save it again"
        elif any(k.startswith(("model.diffusion_model.", "down_blocks.", "first_stage_model.")) for k in keys):
            hint = "; this looks like a model checkpoint, not a LoRA"
        raise CheckpointError(
            f"{path}: not a LoRA file in the diffusers or kohya layout (keys: {preview_keys(keys)}){hint}"
        )
    family = _family_for(source, clues, denoiser_config, CheckpointError)
    ours = _stored(raw)
    layout = denoiser_layout(denoiser_config) if denoiser_config is not None else _stored_layout(ours)
    if layout is None and family in ("sdxl", "flux"):
        layout = SDXL_LAYOUT if family == "sdxl" else FLUX_LAYOUT
    names = KohyaNames(family, unet_module_names(layout) if layout and family != "flux" else None)
    # in the file's own naming: a LoRA for another family or layout fails here, not halfway
    kohya_names = fmt == "kohya" and flux is None
    _check_denoiser_modules(source, (seen if kohya_names else groups)["denoiser"], family, names.sgm)
    if kohya_names:
        groups, alphas = _from_kohya(grouped, split, names, source)
    _no_t5(source, family, groups)

    settings = ours.get("settings")
    stored = None if settings is None else float(settings.get("alpha") or settings["rank"])
    alpha = _one_alpha(groups, alphas, stored)
    if settings is not None and alpha != stored:  # an edited file: the folded tensors follow the file
        settings = {**settings, "alpha": alpha}
    if settings is None:
        settings = {
            "rank": common_rank(groups), "alpha": alpha, "dropout": 0.0,
            "targets": sorted(groups["denoiser"]) or "attention", "init": True,
            "use_dora": any("m" in p for mods in groups.values() for p in mods.values()),
            "text_encoder": bool(groups["text_encoder"] or groups["text_encoder_2"]),
        }
    return LoraFile(
        denoiser=join_modules(groups["denoiser"]),
        text_encoder=join_modules(groups["text_encoder"]) or None,
        text_encoder_2=join_modules(groups["text_encoder_2"]) or None,
        family=family, format=fmt, alpha=alpha, settings=settings, user=ours.get("user") or {},
        file_metadata=raw, denoiser_layout=layout,
    )
