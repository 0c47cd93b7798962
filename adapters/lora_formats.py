"""LoRA files, both ways: the diffusers/peft layout and the kohya layout (A1111, ComfyUI).

Our layout in memory is peft's, as `peft.get_peft_model_state_dict` gives it:
`<module>.lora_A.weight` (rank, in[, kh, kw]), `<module>.lora_B.weight` (out, rank[, 1, 1]) and, for
DoRA, `<module>.lora_magnitude_vector`. Text encoder module names carry no `text_model.` level (as
transformers 5 names them); every function here accepts them with or without it. One alpha serves
the whole adapter, and a module's scale is alpha / its rank: peft's convention, and kohya's.

On disk:
- diffusers (`pytorch_lora_weights.safetensors`): `unet.<module>.lora_A.weight`, ...,
  `text_encoder.text_model.<module>...`; alpha, rank and target modules in the `lora_adapter_metadata`
  JSON, which diffusers' `load_lora_weights` reads (without it diffusers assumes alpha = rank).
- kohya (`lora_kohya.safetensors`): `lora_unet_<module with _>.lora_down.weight` (= lora_A),
  `.lora_up.weight` (= lora_B) and `.alpha` (a 0-d tensor); `lora_te_text_model_<module>...`; `ss_*`
  metadata as sd-scripts writes it. Conv LoRA keeps its 4-D weights (LoCon).
Both carry our settings and the user's metadata as JSON under `ldm_tune.lora`.

Reading a file whose modules have different alphas (other tools' kohya files, diffusers'
alpha_pattern) folds alpha_m / alpha into that module's lora_B, so the math is unchanged while the
layout keeps one alpha. Files written here have one alpha, so their tensors come back identical.
"""
from __future__ import annotations

import collections
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ldmcore.weights import CheckpointError, preview_keys, read_state_dict

if TYPE_CHECKING:
    from .lora import LoraSettings

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
OUR_KEY = "ldm_tune.lora"  # JSON {"settings": ..., "user": ...} in both formats
DIFFUSERS_KEY = "lora_adapter_metadata"  # diffusers' own: prefixed LoraConfig kwargs
TEXT_PREFIX = "text_model."
PARTS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_magnitude_vector": "m"}
KOHYA_PARTS = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}
# Module-name words that contain "_": kohya names join everything with "_", these are put back whole.
_WORDS = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "time_embedding",
    "linear_1", "linear_2", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
}
_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.")


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
    for name, parts in out.items():
        if "A" not in parts or "B" not in parts:
            raise CheckpointError(f"{source}: {name} needs both lora_A and lora_B, found {sorted(parts)}")
        if parts["A"].shape[0] != parts["B"].shape[1]:
            raise CheckpointError(
                f"{source}: {name}: lora_A {tuple(parts['A'].shape)} and lora_B {tuple(parts['B'].shape)} "
                "disagree on the rank"
            )
    return out


def join_modules(mods: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    suffix = {p: s for s, p in PARTS.items()}
    return {name + suffix[p]: t for name, parts in mods.items() for p, t in parts.items()}


def bare_text_name(name: str) -> str:
    return name[len(TEXT_PREFIX) :] if name.startswith(TEXT_PREFIX) else name


def common_rank(*groups: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    ranks = [p["A"].shape[0] for mods in groups for p in mods.values()]
    if not ranks:
        raise CheckpointError("no LoRA modules given")
    return collections.Counter(ranks).most_common(1)[0][0]


def effective_alpha(settings: LoraSettings) -> float:
    return float(settings.alpha if settings.alpha is not None else settings.rank)


def _module_groups(unet_sd, text_sd) -> tuple[dict, dict]:
    unet = split_modules(unet_sd, "U-Net LoRA")
    text = {bare_text_name(k): v for k, v in split_modules(text_sd, "text encoder LoRA").items()}
    if not unet and not text:
        raise CheckpointError("nothing to save: both LoRA state dicts are empty")
    return unet, text


def _check_settings(settings: LoraSettings, unet: dict, text: dict) -> None:
    rank = common_rank(unet, text)
    if settings.rank != rank:
        raise ValueError(f"settings.rank is {settings.rank} but the LoRA weights have rank {rank}")


def _tensors(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def _our_metadata(settings: LoraSettings | None, user: dict | None) -> str:
    try:
        return json.dumps({"settings": settings.to_dict() if settings else None, "user": dict(user or {})})
    except TypeError as e:
        raise ValueError(f"LoRA metadata must be JSON-serialisable: {e}") from None


def _write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(_tensors(tensors), str(tmp), metadata={"format": "pt", **metadata})
    os.replace(tmp, path)


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


def save_diffusers(
    path: str | os.PathLike,
    unet_sd: Mapping[str, torch.Tensor],
    text_sd: Mapping[str, torch.Tensor] | None = None,
    metadata: dict | None = None,
    *,
    settings: LoraSettings | None = None,
) -> None:
    """Write `pytorch_lora_weights.safetensors` as diffusers' `load_lora_weights` reads it.

    Pass `settings` whenever alpha differs from the rank: without them the file says alpha = rank
    (scale 1), the convention of diffusers files that carry no alpha."""
    unet, text = _module_groups(unet_sd, text_sd)
    if settings is not None:
        _check_settings(settings, unet, text)
    rank = settings.rank if settings is not None else common_rank(unet, text)
    alpha = effective_alpha(settings) if settings is not None else float(rank)
    tensors = {f"unet.{k}": v for k, v in join_modules(unet).items()}
    tensors |= {f"text_encoder.{TEXT_PREFIX}{k}": v for k, v in join_modules(text).items()}
    adapter = {}
    for prefix, mods in (("unet", unet), ("text_encoder", text)):
        if mods:  # text names stay without `text_model.`: peft matches them as suffixes in either layout
            adapter |= {f"{prefix}.{k}": v for k, v in _peft_config(mods, rank, alpha).items()}
    meta = {DIFFUSERS_KEY: json.dumps(adapter, sort_keys=True), OUR_KEY: _our_metadata(settings, metadata)}
    _write(path, tensors, meta)


def _from_diffusers(state: dict, raw: dict, source: str):
    unet, text, other = {}, {}, []
    for k, v in state.items():
        if k.startswith("unet."):
            unet[k[len("unet.") :]] = v
        elif k.startswith("text_encoder."):
            text[bare_text_name(k[len("text_encoder.") :])] = v
        else:
            other.append(k)
    if other:
        raise CheckpointError(f"{source}: keys outside unet. and text_encoder.: {preview_keys(other)}")
    unet, text = split_modules(unet, source), split_modules(text, source)
    adapter = json.loads(raw.get(DIFFUSERS_KEY) or "{}")
    alphas = {}
    for prefix, mods in (("unet", unet), ("text_encoder", text)):
        cfg = {k[len(prefix) + 1 :]: v for k, v in adapter.items() if k.startswith(prefix + ".")}
        for name, p in mods.items():
            # no lora_alpha in the file: diffusers' convention is alpha = rank, module by module
            alphas[(prefix, name)] = float(
                _pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", p["A"].shape[0]))
            )
    return unet, text, alphas


def _pattern_value(pattern: dict, name: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key.lstrip('^')})$", name):
            return value
    return default


# -- kohya -------------------------------------------------------------------------------------------


def kohya_name(module: str, text: bool) -> str:
    """`down_blocks.0.attentions.0....to_q` -> `lora_unet_down_blocks_0_attentions_0_..._to_q`;
    text encoder modules, with or without `text_model.`, -> `lora_te_text_model_encoder_...`."""
    if text:
        return "lora_te_" + (TEXT_PREFIX + bare_text_name(module)).replace(".", "_")
    return "lora_unet_" + module.replace(".", "_")


def module_from_kohya(name: str, source: str) -> tuple[str, bool]:
    """The inverse of `kohya_name`: (module name in our layout, is it the text encoder)."""
    for prefix, text in (("lora_unet_", False), ("lora_te_", True)):
        if name.startswith(prefix):
            break
    else:
        if name.startswith(("lora_te1_", "lora_te2_")):
            raise CheckpointError(
                f"{source}: {name}: an SDXL LoRA (two text encoders); only SD 1.x / 2.x are supported"
            )
        raise CheckpointError(f"{source}: {name}: not a kohya LoRA module name (lora_unet_... or lora_te_...)")
    tokens, parts, i = name[len(prefix) :].split("_"), [], 0
    while i < len(tokens):
        for n in (3, 2, 1):
            word = "_".join(tokens[i : i + n])
            if n == 1 or word in _WORDS:
                parts.append(word)
                i += n
                break
    module = ".".join(parts)
    if text:
        return bare_text_name(module), True
    if not module.startswith(_UNET_ROOTS):
        raise CheckpointError(
            f"{source}: {name}: U-Net module {module!r} is not in diffusers' naming (an SDXL or original-layout LoRA?)"
        )
    return module, False


def _kohya_metadata(settings: LoraSettings, unet: dict, user: dict | None) -> dict[str, str]:
    rank, alpha = settings.rank, effective_alpha(settings)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
    }
    if any(p["A"].ndim == 4 and p["A"].shape[-1] > 1 for p in unet.values()):  # 3x3 convs: LoCon
        meta["ss_network_args"] = json.dumps({"conv_dim": str(rank), "conv_alpha": str(alpha)})
    # which family, from the cross-attention's text width: 768 is SD 1.x, 1024 SD 2.x
    width = next((p["A"].shape[1] for n, p in unet.items() if n.endswith("attn2.to_k")), None)
    version = {768: ("sd_v1", "False"), 1024: ("sd_v2", "True")}.get(width)
    if version:
        meta["ss_base_model_version"], meta["ss_v2"] = version
    for k, v in (user or {}).items():  # the caller's own ss_* / modelspec.* keys win
        if k.startswith(("ss_", "modelspec.")):
            meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def save_kohya(
    path: str | os.PathLike,
    unet_sd: Mapping[str, torch.Tensor],
    text_sd: Mapping[str, torch.Tensor] | None,
    settings: LoraSettings,
    metadata: dict | None = None,
) -> None:
    """Write the kohya / A1111 / ComfyUI layout. DoRA is refused: tools disagree on the axis of
    `dora_scale` (per input or per output channel) and diffusers drops it; use the diffusers file."""
    unet, text = _module_groups(unet_sd, text_sd)
    _check_settings(settings, unet, text)
    if any("m" in p for p in [*unet.values(), *text.values()]):
        raise CheckpointError(
            "DoRA adapters are not written in the kohya layout (its dora_scale convention differs between "
            "tools); use the diffusers file, pytorch_lora_weights.safetensors"
        )
    alpha = effective_alpha(settings)
    tensors = {}
    for mods, text_part in ((unet, False), (text, True)):
        for module, p in mods.items():
            name = kohya_name(module, text_part)
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = p["A"], p["B"]
            tensors[f"{name}.alpha"] = torch.tensor(alpha)  # 0-d float32, one tensor per module
    _write(path, tensors, {**_kohya_metadata(settings, unet, metadata), OUR_KEY: _our_metadata(settings, metadata)})


def _from_kohya(state: dict, source: str):
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
    unet, text, alphas = {}, {}, {}
    for name, parts in grouped.items():
        module, is_text = module_from_kohya(name, source)
        if "A" not in parts or "B" not in parts:
            raise CheckpointError(f"{source}: {name} needs both lora_down and lora_up weights")
        alpha = float(parts.pop("alpha").item()) if "alpha" in parts else 0.0
        (text if is_text else unet)[module] = parts
        # sd-scripts: a missing or zero alpha means alpha = rank (scale 1)
        alphas[("text_encoder" if is_text else "unet", module)] = alpha or float(parts["A"].shape[0])
    return split_modules(join_modules(unet), source), split_modules(join_modules(text), source), alphas


# -- reading either ----------------------------------------------------------------------------------


def _one_alpha(unet: dict, text: dict, alphas: dict, preferred: float | None) -> float:
    """Fold per-module alphas into lora_B so that one alpha holds for all (see the module docstring)."""
    values = list(alphas.values())
    f32 = torch.tensor(preferred or 0.0, dtype=torch.float32).item()  # kohya files store alpha as float32
    if preferred is not None and all(a in (preferred, f32) for a in values):
        return float(preferred)
    alpha = collections.Counter(values).most_common(1)[0][0]
    for (prefix, name), a in alphas.items():
        if a != alpha:
            parts = (unet if prefix == "unet" else text)[name]
            parts["B"] = parts["B"] * (a / alpha)
    return alpha


def read_lora_metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_lora_file(path: str | os.PathLike) -> tuple[dict, dict | None, dict]:
    """(unet_sd, text_sd or None, metadata) in our layout, from a diffusers or a kohya file.

    metadata: {"format": "diffusers" | "kohya", "alpha": the one alpha of the returned tensors,
    "settings": our LoraSettings dict (stored, or rebuilt from the tensors for other tools' files:
    explicit target names), "user": the metadata given when saving, "file": the raw file metadata}.
    """
    path = Path(path)
    state = read_state_dict(path)
    raw = read_lora_metadata(path)
    keys = list(state)
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        fmt, (unet, text, alphas) = "kohya", _from_kohya(state, str(path))
    elif any(k.startswith(("unet.", "text_encoder.")) and (".lora_A." in k or ".lora_B." in k) for k in keys):
        fmt, (unet, text, alphas) = "diffusers", _from_diffusers(state, raw, str(path))
    else:
        hint = ""
        if any(".processor." in k or "_lora.down." in k for k in keys):
            hint = "; this is diffusers' old attention-processor LoRA format: load it in diffusers and save it again"
        elif any(k.startswith(("model.diffusion_model.", "down_blocks.", "first_stage_model.")) for k in keys):
            hint = "; this looks like a model checkpoint, not a LoRA"
        raise CheckpointError(
            f"{path}: not a LoRA file in the diffusers or kohya layout (keys: {preview_keys(keys)}){hint}"
        )
    ours = json.loads(raw[OUR_KEY]) if OUR_KEY in raw else {}
    settings = ours.get("settings")
    stored = None if settings is None else float(settings.get("alpha") or settings["rank"])
    alpha = _one_alpha(unet, text, alphas, stored)
    if settings is not None and alpha != stored:  # an edited file: the folded tensors follow the file
        settings = {**settings, "alpha": alpha}
    if settings is None:
        rank = common_rank(unet, text)
        settings = {
            "rank": rank, "alpha": alpha, "dropout": 0.0, "targets": sorted(unet) or "attention", "init": True,
            "use_dora": any("m" in p for p in [*unet.values(), *text.values()]), "text_encoder": bool(text),
        }
    meta = {"format": fmt, "alpha": alpha, "settings": settings, "user": ours.get("user") or {}, "file": raw}
    return join_modules(unet), (join_modules(text) or None), meta
