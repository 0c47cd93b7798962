"""The kohya LoRA file (A1111, ComfyUI, Forge), `lora_kohya.safetensors`: `<name>.lora_down.weight`
(= lora_A), `.lora_up.weight` (= lora_B) and `.alpha` (a 0-d tensor), `ss_*` metadata as sd-scripts
writes it; conv LoRA keeps its 4-D weights (LoCon).

The names differ by family (`KohyaNames`): SD 1.x/2.x `lora_unet_<diffusers module>` and
`lora_te_text_model_<module>`; SDXL `lora_unet_<original (sgm) module>` (`lora_unet_input_blocks_4_1_...`),
`lora_te1_...` (CLIP-L) and `lora_te2_...` (bigG), dots as underscores. A1111 and ComfyUI read SDXL's
U-Net only under its sgm names, and those depend on the U-Net's block layout: SDXL is written from the
U-Net config. Reading accepts SDXL's U-Net under either name, as ComfyUI does. Flux:
`lora_unet_<Black Forest Labs module>` with q/k/v fused, and `lora_te1_` for CLIP-L (lora_flux.py).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ldmcore.single_file import unet_module_names
from ldmcore.weights import CheckpointError

from . import lora_flux
from .lora_family import FAMILIES, _family_to_save, denoiser_layout, lora_family
from .lora_state import (
    COMPONENTS,
    OUR_KEY,
    TEXT_PREFIX,
    Groups,
    _check_pairs,
    _check_settings,
    _module_groups,
    _our_metadata,
    _renamed,
    _write,
    bare_text_name,
    effective_alpha,
)

if TYPE_CHECKING:
    from .lora import LoraSettings

KOHYA_PARTS = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
# Module-name words that contain "_": kohya names join everything with "_", these are put back whole.
_WORDS = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "add_embedding", "linear_1", "linear_2", "text_model", "self_attn", "q_proj", "k_proj",
    "v_proj", "out_proj",
    # the original (sgm) U-Net's
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "time_embed", "label_emb",
}
_UNET_ROOTS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
               "add_embedding")
_SGM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")
_KOHYA_PREFIXES = {"lora_unet_": "denoiser", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
# what kohya writes; Flux files from other tools also name CLIP-L lora_te_ (diffusers and ComfyUI read both)
_KOHYA_TEXT = {"sd": {"text_encoder": "lora_te_"}, "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
               "flux": {"text_encoder": "lora_te1_"}}


def _split_kohya(name: str, source: str) -> tuple[str, str, str]:
    """`lora_unet_input_blocks_4_1_proj_in` -> ("lora_unet_", "denoiser", "input_blocks.4.1.proj_in"): the
    prefix, the component and the module with its dots back, in whichever naming the file uses."""
    prefix = next((p for p in sorted(_KOHYA_PREFIXES, key=len, reverse=True) if name.startswith(p)), None)
    if prefix is None:
        raise CheckpointError(
            f"{source}: {name}: not a kohya LoRA module name (lora_unet_..., lora_te_..., lora_te1_... or lora_te2_...)"
        )
    tokens, parts, i = name[len(prefix) :].split("_"), [], 0
    while i < len(tokens):
        for n in (3, 2, 1):
            word = "_".join(tokens[i : i + n])
            if n == 1 or word in _WORDS:
                parts.append(word)
                i += n
                break
    return prefix, _KOHYA_PREFIXES[prefix], ".".join(parts)


@dataclasses.dataclass(frozen=True)
class KohyaNames:
    """kohya's module names for one family. SD 1.x/2.x: the U-Net in diffusers' names, `lora_te_` for the
    text encoder. SDXL: the U-Net in the original (sgm) names, `lora_te1_` (CLIP-L), `lora_te2_` (bigG).
    `sgm` maps diffusers module names to sgm ones for one U-Net layout (`KohyaNames.of(denoiser_config)`);
    SDXL needs it, and with it sgm U-Net names are read for SD 1.x/2.x too, as ComfyUI reads them.
    Flux: `lora_te1_` for CLIP-L here; the transformer's names fuse modules (lora_flux.py)."""

    family: str = "sd"
    sgm: Mapping[str, str] | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; choose one of {sorted(FAMILIES)}")
        if self.family == "sdxl" and self.sgm is None:
            raise ValueError("SDXL's kohya names depend on the U-Net's block layout: "
                             "use KohyaNames.of(denoiser_config)")

    @classmethod
    def of(cls, denoiser_config: Any) -> KohyaNames:
        if denoiser_config is None:
            return cls()
        family = lora_family(denoiser_config)
        return cls(family, None if family == "flux" else unet_module_names(denoiser_config))

    @functools.cached_property
    def _from_sgm(self) -> dict[str, str]:
        return {v: k for k, v in (self.sgm or {}).items()}

    def name(self, component: str, module: str) -> str:
        """(`denoiser`, `down_blocks.1.attentions.0.proj_in`) -> `lora_unet_down_blocks_1_attentions_0_proj_in`
        (SD) or `lora_unet_input_blocks_4_1_proj_in` (SDXL); text modules, with or without `text_model.`,
        -> `lora_te_text_model_encoder_...` (SD), `lora_te1_...` / `lora_te2_...` (SDXL), `lora_te1_` (Flux)."""
        if component == "denoiser":
            if self.family == "flux":
                raise ValueError("Flux's kohya names fuse modules (q, k, v into qkv): see lora_flux.to_bfl")
            if self.family == "sdxl":
                sgm = _renamed(module, self.sgm)
                if sgm is None:
                    raise CheckpointError(f"U-Net module {module!r} is not in the block layout of the U-Net config")
                module = sgm
            return "lora_unet_" + module.replace(".", "_")
        prefix = _KOHYA_TEXT[self.family].get(component)
        if prefix is None:
            raise ValueError(f"{FAMILIES[self.family]} LoRA files have no {component}")
        return prefix + (TEXT_PREFIX + bare_text_name(module)).replace(".", "_")

    def module(self, name: str, source: str) -> tuple[str, str]:
        """The inverse of `name`: (component, module name in our layout)."""
        return self._ours(*_split_kohya(name, source), name, source)

    def _ours(self, prefix: str, component: str, module: str, name: str, source: str) -> tuple[str, str]:
        if component != "denoiser":
            read = {*_KOHYA_TEXT[self.family].values(), *(("lora_te_",) if self.family == "flux" else ())}
            if prefix not in read:
                other = "sd" if prefix == "lora_te_" else "sdxl"
                raise CheckpointError(f"{source}: {name}: {prefix} names a text encoder of {FAMILIES[other]}, "
                                      f"not of {FAMILIES[self.family]}")
            if not module.startswith(TEXT_PREFIX):
                raise CheckpointError(f"{source}: {name}: not a text encoder module (kohya's start text_model_)")
            return component, bare_text_name(module)
        if self.family == "flux":
            raise CheckpointError(f"{source}: {name}: Flux's transformer modules are read by lora_flux")
        root = module.split(".")[0]
        if root in _UNET_ROOTS:
            return component, module
        if root not in _SGM_ROOTS:
            raise CheckpointError(
                f"{source}: {name}: U-Net module {module!r} is in neither diffusers' nor the original (sgm) naming"
            )
        if self.sgm is None:
            raise CheckpointError(
                f"{source}: {name}: U-Net module {module!r} is in the original (sgm) naming, which only the U-Net's "
                "config can map (pass denoiser_config); kohya writes it for SDXL"
            )
        ours = _renamed(module, self._from_sgm)
        if ours is None:
            raise CheckpointError(
                f"{source}: {name}: no module {module!r} in this {FAMILIES[self.family]} U-Net's block layout "
                "(a LoRA for another model family or block layout?)"
            )
        return component, ours


def kohya_name(module: str, text: bool) -> str:
    """SD 1.x/2.x's kohya name of a U-Net or text encoder module (`KohyaNames().name`)."""
    return KohyaNames().name("text_encoder" if text else "denoiser", module)


def module_from_kohya(name: str, source: str) -> tuple[str, bool]:
    """The inverse of `kohya_name`: (module name in our layout, is it the text encoder)."""
    component, module = KohyaNames().module(name, source)
    return module, component != "denoiser"


def _kohya_metadata(settings: LoraSettings, groups: Groups, family: str, user: dict | None) -> dict[str, str]:
    rank, alpha = settings.rank, effective_alpha(settings)
    meta = {
        # sd-scripts' network module for each family (networks/lora.py, networks/lora_flux.py)
        "ss_network_module": "networks.lora_flux" if family == "flux" else "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
    }
    if any(p["A"].ndim == 4 and p["A"].shape[-1] > 1 for p in groups["denoiser"].values()):  # 3x3 convs: LoCon
        meta["ss_network_args"] = json.dumps({"conv_dim": str(rank), "conv_alpha": str(alpha)})
    if family == "flux":
        meta["ss_base_model_version"] = "flux1"
    elif family == "sdxl":
        meta["ss_base_model_version"], meta["ss_v2"] = "sdxl_base_v1-0", "False"
    else:  # which SD, from the cross-attention's text width: 768 is SD 1.x, 1024 SD 2.x
        width = next((p["A"].shape[1] for n, p in groups["denoiser"].items() if n.endswith("attn2.to_k")), None)
        version = {768: ("sd_v1", "False"), 1024: ("sd_v2", "True")}.get(width)
        if version:
            meta["ss_base_model_version"], meta["ss_v2"] = version
    for k, v in (user or {}).items():  # the caller's own ss_* / modelspec.* keys win
        if k.startswith(("ss_", "modelspec.")):
            meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def save_kohya(
    path: str | os.PathLike,
    denoiser_sd: Mapping[str, torch.Tensor],
    text_sd: Mapping[str, torch.Tensor] | None,
    settings: LoraSettings,
    metadata: dict | None = None,
    *,
    text_2_sd: Mapping[str, torch.Tensor] | None = None,
    denoiser_config: Any = None,
) -> None:
    """Write the kohya / A1111 / ComfyUI layout. An SDXL LoRA (with `text_2_sd`, or for an SDXL U-Net)
    needs `denoiser_config`, the U-Net's config: its U-Net modules are written under their original (sgm)
    names. A Flux LoRA is written in Black Forest Labs' names, q/k/v fused (lora_flux.py). DoRA is
    refused: tools disagree on the axis of `dora_scale` (per input or per output channel) and diffusers
    drops it; use the diffusers file."""
    groups = _module_groups(denoiser_sd, text_sd, text_2_sd)
    family = _family_to_save(groups, denoiser_config)
    if family == "sdxl" and denoiser_config is None:
        raise ValueError(
            "an SDXL LoRA: pass the SDXL U-Net's config as denoiser_config; kohya files name SDXL's U-Net "
            "modules in the original (sgm) layout, which the config gives"
        )
    _check_settings(settings, groups)
    if any("m" in p for mods in groups.values() for p in mods.values()):
        raise CheckpointError(
            "DoRA adapters are not written in the kohya layout (its dora_scale convention differs between "
            "tools); use the diffusers file, pytorch_lora_weights.safetensors"
        )
    names = KohyaNames.of(denoiser_config) if denoiser_config is not None else KohyaNames(family)
    alpha = effective_alpha(settings)
    modules = []  # (kohya name, {"A", "B"}, alpha)
    for component, mods in groups.items():
        if component == "denoiser" and family == "flux":
            bfl = lora_flux.to_bfl(mods, "the LoRA to save")
            modules += [(lora_flux.KOHYA_PREFIX + m.replace(".", "_"), p, alpha * k) for m, (p, k) in bfl.items()]
        else:
            modules += [(names.name(component, module), p, alpha) for module, p in mods.items()]
    tensors = {}
    for name, p, a in modules:
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = p["A"], p["B"]
        tensors[f"{name}.alpha"] = torch.tensor(a)  # 0-d float32, one tensor per module
    layout = denoiser_layout(denoiser_config) if denoiser_config is not None else None
    meta = {**_kohya_metadata(settings, groups, family, metadata), OUR_KEY: _our_metadata(settings, metadata, layout)}
    _write(path, tensors, meta)


def _read_kohya(state: dict, source: str) -> tuple[dict, dict, Groups]:
    """A kohya file's tensors by module: ({kohya name: {"A", "B"[, "alpha"]}}, {kohya name: (prefix,
    component, module)} and the same tensors as {component: {module: parts}}), module names still in
    the file's own naming."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in state.items():
        name, _, part = key.partition(".")
        if part == "dora_scale":
            raise CheckpointError(f"{source}: {key}: DoRA in the kohya layout is not read (tools disagree on its axis)")
        if part not in KOHYA_PARTS:
            raise CheckpointError(
                f"{source}: {key}: not a plain LoRA weight (lora_down / lora_up / alpha); "
                "LyCORIS LoHa, LoKr and Tucker-decomposed files are not supported"
            )
        grouped.setdefault(name, {})[KOHYA_PARTS[part]] = v
    split, seen = {}, {c: {} for c in COMPONENTS}
    for name, parts in grouped.items():
        if "A" not in parts or "B" not in parts:
            raise CheckpointError(f"{source}: {name} needs both lora_down and lora_up weights")
        split[name] = prefix, component, module = _split_kohya(name, source)
        seen[component][module] = parts
    return grouped, split, seen


def _from_kohya(grouped: dict, split: dict, names: KohyaNames, source: str) -> tuple[Groups, dict]:
    groups: Groups = {c: {} for c in COMPONENTS}
    alphas = {}
    for name, parts in grouped.items():
        component, module = names._ours(*split[name], name, source)
        parts = dict(parts)
        alpha = float(parts.pop("alpha").item()) if "alpha" in parts else 0.0
        groups[component][module] = parts
        # sd-scripts: a missing or zero alpha means alpha = rank (scale 1)
        alphas[(component, module)] = alpha or float(parts["A"].shape[0])
    for mods in groups.values():
        _check_pairs(mods, source)
    return groups, alphas
