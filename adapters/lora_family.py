"""Which model family a LoRA is for, SD 1.x/2.x, SDXL or Flux.1, and refusing a LoRA for another.

A denoiser config tells its family (`lora_family`) and the block layout its module names depend on
(`denoiser_layout`, what the files we write remember). A LoRA's family is read from its keys (Flux's
module names, a second text encoder, `lora_te1_` / `lora_te2_`, the cross-attention's text width) and
metadata; given a denoiser config, a file for another family is refused with both named, and so is a
LoRA whose denoiser modules the model does not have. A Flux LoRA is the same for dev and schnell.
"""
from __future__ import annotations

from typing import Any, Mapping

from ldmcore.family import FLUX_DEV, SD, SDXL_BASE
from ldmcore.single_file import unet_module_names
from ldmcore.weights import CheckpointError, preview_keys

from . import lora_flux
from .lora_state import Groups, _renamed, _stored, _stored_layout

# LoRA families, with short titles: SD 1.x/2.x and SDXL as in ldmcore.family; one for FLUX.1-dev and -schnell
FAMILIES = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "flux": "Flux.1"}
# the denoiser's diffusers component (the file prefix), what the denoiser is called, the article for the title
DENOISER_PREFIX = {"sd": SD.denoiser_name, "sdxl": SDXL_BASE.denoiser_name, "flux": FLUX_DEV.denoiser_name}
DENOISER = {"sd": "U-Net", "sdxl": "U-Net", "flux": "transformer"}
_ARTICLE = {"sd": "an", "sdxl": "an", "flux": "a"}
FLUX_CLASS = "FluxTransformer2DModel"
FLUX_LAYOUT = {"_class_name": FLUX_CLASS}  # Flux's module names do not depend on its depth or width
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
# kohya's ss_base_model_version values (library/model_util.py, library/sdxl_model_util.py, library/flux_utils.py)
_KOHYA_VERSIONS = {"sd_v1": "sd", "sd_v2": "sd", "sdxl_base_v1-0": "sdxl", "flux1": "flux"}
# the text width a U-Net cross-attends to: CLIP-L, OpenCLIP-H, CLIP-L + bigG concatenated
_CROSS_WIDTHS = {768: ("sd", "SD 1.x"), 1024: ("sd", "SD 2.x"), 2048: ("sdxl", "SDXL")}


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


def _family_to_save(groups: Groups, denoiser_config: Any) -> str:
    source = "the LoRA to save"
    family = _family_for(source, _family_clues(groups, {}), denoiser_config, ValueError)
    _no_t5(source, family, groups, ValueError)
    if denoiser_config is not None:
        sgm = None if family == "flux" else unet_module_names(denoiser_config)
        _check_denoiser_modules(source, groups["denoiser"], family, sgm, ValueError)
    return family
