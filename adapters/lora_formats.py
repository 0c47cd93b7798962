"""LoRA files, both ways: the diffusers/peft layout and the kohya layout (A1111, ComfyUI, Forge), for SD
1.x/2.x, SDXL and Flux.1.

Our layout in memory is peft's, as `peft.get_peft_model_state_dict` gives it:
`<module>.lora_A.weight` (rank, in[, kh, kw]), `<module>.lora_B.weight` (out, rank[, 1, 1]) and, for
DoRA, `<module>.lora_magnitude_vector`, one state dict per component: `denoiser` (the U-Net, or Flux's
transformer), `text_encoder` (CLIP; Flux's CLIP-L) and, for SDXL, `text_encoder_2` (CLIP-bigG; Flux's
T5 takes no LoRA). Text encoder module names carry no `text_model.` level (transformers 5 drops it from
CLIPTextModel); every function here accepts them with or without it. One alpha serves the whole
adapter, and a module's scale is alpha / its rank: peft's convention, and kohya's.

On disk:
- diffusers (`pytorch_lora_weights.safetensors`): `<denoiser>.<module>.lora_A.weight`, ... with the
  family's component name (`unet.`, Flux `transformer.`), `text_encoder.text_model.<module>...`,
  `text_encoder_2.text_model.<module>...`; alpha, rank and target modules in the
  `lora_adapter_metadata` JSON, which diffusers' `load_lora_weights` reads (without it diffusers
  assumes alpha = rank).
- kohya (`lora_kohya.safetensors`): `<name>.lora_down.weight` (= lora_A), `.lora_up.weight` (= lora_B)
  and `.alpha` (a 0-d tensor), `ss_*` metadata as sd-scripts writes it; conv LoRA keeps its 4-D weights
  (LoCon). The names differ by family (`KohyaNames`): SD 1.x/2.x `lora_unet_<diffusers module>` and
  `lora_te_text_model_<module>`; SDXL `lora_unet_<original (sgm) module>` (`lora_unet_input_blocks_4_1_...`),
  `lora_te1_...` (CLIP-L) and `lora_te2_...` (bigG), dots as underscores. A1111 and ComfyUI read SDXL's
  U-Net only under its sgm names, and those depend on the U-Net's block layout: SDXL is written from the
  U-Net config. Reading accepts SDXL's U-Net under either name, as ComfyUI does. Flux:
  `lora_unet_<Black Forest Labs module>` with q/k/v fused, and `lora_te1_` for CLIP-L (lora_flux.py).
Both carry our settings, the user's metadata and the denoiser's layout as JSON under `ldm_tune.lora`.

Which family a file is for is read from its keys (Flux's module names, a second text encoder,
`lora_te1_` / `lora_te2_`, the cross-attention's text width) and metadata; given a denoiser config, a
file for another family is refused with both named. A Flux LoRA is the same for dev and schnell.

Reading a file whose modules have different alphas (other tools' kohya files, diffusers'
alpha_pattern) folds alpha_m / alpha into that module's lora_B, so the math is unchanged while the
layout keeps one alpha. Files written here have one alpha, so their tensors come back identical.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ldmcore.family import FLUX_DEV, SD, SDXL_BASE
from ldmcore.single_file import unet_module_names
from ldmcore.weights import CheckpointError, preview_keys, read_state_dict

from . import lora_flux

if TYPE_CHECKING:
    from .lora import LoraSettings

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
OUR_KEY = "ldm_tune.lora"  # JSON {"settings": ..., "user": ..., "denoiser_layout": ...} in both formats
DIFFUSERS_KEY = "lora_adapter_metadata"  # diffusers' own: prefixed LoraConfig kwargs
TEXT_PREFIX = "text_model."
COMPONENTS = ("denoiser", "text_encoder", "text_encoder_2")  # as ldmcore's Components names them
# LoRA families, with short titles: SD 1.x/2.x and SDXL as in ldmcore.family; one for FLUX.1-dev and -schnell
FAMILIES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "flux": "Flux.1"}
# the denoiser's diffusers component (the file prefix), what the denoiser is called, the article for the title
DENOISER_PREFIX = {"sd": SD.denoiser_name, "sdxl": SDXL_BASE.denoiser_name, "flux": FLUX_DEV.denoiser_name}
DENOISER = {"sd": "U-Net", "sdxl": "U-Net", "flux": "transformer"}
_ARTICLE = {"sd": "an", "sdxl": "an", "flux": "a"}
FLUX_CLASS = "FluxTransformer2DModel"
FLUX_LAYOUT = {"_class_name": FLUX_CLASS}  # Flux's module names do not depend on its depth or width
PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m"}
KOHYA_PARTS = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
# The block layouts of SD 1.x/2.x and SDXL base: what the sgm names depend on (not widths or depths).
# SDXL files that carry no layout of their own and are read without a U-Net config are read with
# SDXL's; both tell which family a LoRA that fits no given U-Net is for.
SD_LAYOUT = {
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
SDXL_LAYOUT = {
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "addition_embed_type": "text_time",
}
_LAYOUT_KEYS = tuple(SDXL_LAYOUT)  # the U-Net config entries a layout keeps
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
# kohya's ss_base_model_version values (library/model_util.py, library/sdxl_model_util.py, library/flux_utils.py)
_KOHYA_VERSIONS = {"sd_v1": "sd", "sd_v2": "sd", "sdxl_base_v1-0": "sdxl", "flux1": "flux"}
# the text width a U-Net cross-attends to: CLIP-L, OpenCLIP-H, CLIP-L + bigG concatenated
_CROSS_WIDTHS = {768: ("sd", "SD 1.x"), 1024: ("sd", "SD 2.x"), 2048: ("sdxl", "SDXL")}

Groups = dict[str, dict[str, dict[str, torch.Tensor]]]  # component -> module -> {"A", "B"[, "m"]}


# -- our layout --------------------------------------------------------------------------------------


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


def _write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(_tensors(tensors), str(tmp), metadata={"format": "pt", **metadata})
    os.replace(tmp, path)


# -- families and denoiser layouts -------------------------------------------------------------------


def _config_value(config: Any, key: str) -> Any:
    """An entry of a diffusers config (a dict), an ldmcore config (attributes) or a layout dict."""
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


def lora_family(denoiser_config: Any) -> str:
    """The LoRA family of a denoiser config: "flux" for a Flux transformer (dev or schnell alike), "sdxl"
    for a U-Net with SDXL's added conditioning (addition_embed_type "text_time"), else "sd"."""
    if _config_value(denoiser_config, "_class_name") == FLUX_CLASS or \
            _config_value(denoiser_config, "num_single_layers") is not None:
        return "flux"
    return "sdxl" if _config_value(denoiser_config, "addition_embed_type") == "text_time" else "sd"


def denoiser_layout(denoiser_config: Any) -> dict[str, Any]:
    """The config entries that module names depend on, JSON-ready: what the files we write remember."""
    if lora_family(denoiser_config) == "flux":
        return dict(FLUX_LAYOUT)
    out = {}
    for key in _LAYOUT_KEYS:
        value = _config_value(denoiser_config, key)
        if value is not None:
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _renamed(name: str, table: Mapping[str, str]) -> str | None:
    """`name` with its longest dotted prefix found in `table` replaced; None when none is."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in table:
            return ".".join([table[head], *parts[n:]])
    return None


def _family_clues(groups: Groups, meta: Mapping[str, str], kohya_prefixes=()) -> list[tuple[str, str]]:
    """(family, why) for everything in a LoRA that tells its family, strongest first. U-Net names may
    be in either naming: only their endings and roots are looked at."""
    clues = []
    denoiser = groups.get("denoiser", {})
    flux = sorted(n for n in denoiser if n.split(".")[0] in lora_flux.DIFFUSERS_ROOTS)
    if flux:
        clues.append(("flux", f"its modules are a Flux transformer's ({flux[0]}, ...)"))
    else:  # a second text encoder and kohya's lora_te1_ / lora_te2_: SDXL's, unless the modules are Flux's
        if groups.get("text_encoder_2"):
            clues.append(("sdxl", "it has weights for a second text encoder, CLIP-bigG"))
        for prefix in sorted(kohya_prefixes):
            if prefix in ("lora_te1_", "lora_te2_"):
                clues.append(("sdxl", f"its {prefix} keys are kohya's names for SDXL's text encoders"))
            elif prefix == "lora_te_":
                clues.append(("sd", "its lora_te_ keys are kohya's name for the one text encoder of SD 1.x/2.x"))
    widths = {p["A"].shape[1] for n, p in denoiser.items() if n.endswith(("attn2.to_k", "attn2.to_v"))}
    for width in sorted(widths & set(_CROSS_WIDTHS)):
        family, model = _CROSS_WIDTHS[width]
        clues.append((family, f"its cross-attention reads {width}-wide text embeddings, as {model} does"))
    if any(n.startswith(("add_embedding.", "label_emb.")) for n in denoiser):
        clues.append(("sdxl", "it adapts the added-conditioning MLP that only SDXL has"))
    version = meta.get("ss_base_model_version")
    if version in _KOHYA_VERSIONS:
        clues.append((_KOHYA_VERSIONS[version], f"its metadata says ss_base_model_version={version}"))
    layout = _stored_layout(_stored(meta))
    if layout:
        family = lora_family(layout)
        clues.append((family, f"it was written for {_ARTICLE[family]} {FAMILIES[family]} {DENOISER[family]}"))
    return clues


def _stored(meta: Mapping[str, str]) -> dict[str, Any]:
    return json.loads(meta[OUR_KEY]) if OUR_KEY in meta else {}


def _stored_layout(ours: Mapping[str, Any]) -> dict[str, Any] | None:
    return ours.get("denoiser_layout") or ours.get("unet_layout")  # the second: files written before Flux


def _mismatch(source: str, theirs: str, why: str, ours: str, error: type[Exception]) -> Exception:
    return error(
        f"{source}: a LoRA for {FAMILIES[theirs]} ({why}), but the {DENOISER[ours]} is {FAMILIES[ours]}'s: "
        f"apply it to {_ARTICLE[theirs]} {FAMILIES[theirs]} base model, or use a LoRA trained on {FAMILIES[ours]}"
    )


def _family_for(source: str, clues: list[tuple[str, str]], denoiser_config: Any, error: type[Exception]) -> str:
    """The family a LoRA is used as: the denoiser config's, which the clues must not contradict; without a
    config, the strongest clue's (SD 1.x/2.x when nothing tells)."""
    if denoiser_config is None:
        return clues[0][0] if clues else "sd"
    family = lora_family(denoiser_config)
    against = next((c for c in clues if c[0] != family), None)
    if against:
        raise _mismatch(source, against[0], against[1], family, error)
    return family


def _fits(modules, table: Mapping[str, str]) -> list[str]:
    """The U-Net modules, in diffusers' or the sgm naming, that `table`'s layout does not have."""
    known = {**table, **{v: k for k, v in table.items()}}
    return sorted(n for n in modules if _renamed(n, known) is None)


def _check_denoiser_modules(source: str, modules, family: str, sgm: Mapping[str, str] | None,
                            error=CheckpointError) -> None:
    """The denoiser modules must be the family's: a Flux transformer's Linear layers, or a U-Net's of the
    block layout `sgm` describes (not checked for SD 1.x/2.x without one: its names are diffusers')."""
    if family == "flux":
        absent = sorted(n for n in modules if not lora_flux.is_flux_module(n))
    elif sgm is not None:
        absent = _fits(modules, sgm)
    else:
        return
    if not absent:
        return
    for other, layout in (("sd", SD_LAYOUT), ("sdxl", SDXL_LAYOUT)):
        if other != family and not _fits(modules, unet_module_names(layout)):
            raise _mismatch(source, other, f"its U-Net modules fit {FAMILIES[other]}'s block layout", family, error)
    if family != "flux" and all(lora_flux.is_flux_module(n) for n in modules):
        raise _mismatch(source, "flux", "its modules are a Flux transformer's", family, error)
    if family == "flux":
        raise CheckpointError(f"{source}: {len(absent)} modules of the LoRA are not Linear layers of a Flux "
                              f"transformer: {preview_keys(absent)} (a LoRA for another model family?)")
    raise CheckpointError(
        f"{source}: {len(absent)} U-Net modules of the LoRA are not in this {FAMILIES[family]} U-Net's block "
        f"layout: {preview_keys(absent)} (a LoRA for another model family or block layout?)"
    )


def _no_t5(source: str, family: str, groups: Groups, error: type[Exception] = CheckpointError) -> None:
    if family == "flux" and groups.get("text_encoder_2"):
        raise _t5_refused(source, error)


def _t5_refused(source: str, error: type[Exception]) -> Exception:
    return error(f"{source}: LoRA weights for Flux's second text encoder (T5) are not supported: Flux LoRAs "
                 "adapt the transformer and CLIP-L (text_encoder), as kohya's and diffusers' loaders read them")


# -- diffusers / peft --------------------------------------------------------------------------------


def _peft_config(mods: dict, rank: int, alpha: float) -> dict[str, Any]:
    """LoraConfig kwargs that diffusers builds its adapter from (`LoraConfig(**these)`)."""
    return {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(mods),
        "rank_pattern": {name: p["A"].shape[0] for name, p in sorted(mods.items()) if p["A"].shape[0] != rank},
        "use_dora": any("m" in p for p in mods.values()),
    }


def _family_to_save(groups: Groups, denoiser_config: Any) -> str:
    source = "the LoRA to save"
    family = _family_for(source, _family_clues(groups, {}), denoiser_config, ValueError)
    _no_t5(source, family, groups, ValueError)
    if denoiser_config is not None:
        sgm = None if family == "flux" else unet_module_names(denoiser_config)
        _check_denoiser_modules(source, groups["denoiser"], family, sgm, ValueError)
    return family


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


# -- kohya -------------------------------------------------------------------------------------------


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


# -- reading either ----------------------------------------------------------------------------------


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
