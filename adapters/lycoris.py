"""LoHa and LoKr (the LyCORIS adapters): trained through peft (`lora.type: loha | lokr`), written in the
layout ComfyUI and A1111 / Forge load (`hada_w1_a` ... / `lokr_w1` ..., an `.alpha` per module), read back
by merge, inspect and import (`peft_state`: the file's weights in peft's layout, for `set_lora_state_dict`).

Module names. SD 1.x/2.x and SDXL: kohya's (`lora_unet_...`, `lora_te_` / `lora_te1_` / `lora_te2_`).
Flux: the transformer's modules in diffusers' names with dots as underscores after `lycoris_` (LyCORIS's
own spelling, which ComfyUI and Forge map onto the fused BFL weights); kohya's BFL names fuse q, k and v
into one module, which a Hadamard or Kronecker product cannot be split over, so they are only read: a
fused module's change is computed whole and its rows shared out to q, k and v when merged.

The two conventions differ in one place, which the writer bridges and the importer undoes
(docs/notes/lycoris.md has the sources):
- LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b) * scale; peft's scale is alpha / r, the readers' alpha /
  w1_b.shape[0], the same number.
- LoKr: dW = kron(w1, w2) * scale, each half full or the product of two factors (w?_a @ w?_b). peft's
  scale is always alpha / r; the readers' is alpha / the rank of a factored half, and 1 when both halves
  are full (their alpha is then ignored). A full-by-full LoKr is written with peft's scale folded into
  w1, and alpha = r as LyCORIS writes it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ldmcore.single_file_flux import swap_halves
from ldmcore.weights import CheckpointError, preview_keys, read_safetensors

from . import lora_flux
from .lora_family import FAMILIES, FLUX_LAYOUT, SDXL_LAYOUT, _family_for, denoiser_layout, lora_family
from .lora_kohya import KohyaNames
from .lora_state import OUR_KEY, _our_metadata, _stored, _stored_layout, _write

ALGOS = ("loha", "lokr")
LOHA_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
PARAMS = LOHA_PARAMS + LOKR_PARAMS
LYCORIS_FILE = "lycoris_kohya.safetensors"


def algo_of(params: Mapping[str, Any]) -> str | None:
    """"loha", "lokr" or None for one module's parameter names (or a whole state dict's keys)."""
    names = {k.rsplit(".", 1)[-1] for k in params}
    if "hada_w1_a" in names:
        return "loha"
    if names & {"lokr_w1", "lokr_w1_a"}:
        return "lokr"
    return None


def is_lycoris_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a LoHa / LoKr file, from its tensor names alone (nothing is loaded)."""
    if not str(path).endswith(".safetensors"):
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return algo_of(list(f.keys())) is not None
    except Exception:  # not a readable safetensors file: the LoRA reader says why
        return False


def by_module(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """peft's or a file's flat keys (`<module>.hada_w1_a`, `<module>.alpha`) -> {module: {param: tensor}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        module, _, param = key.rpartition(".")
        if param not in PARAMS and param != "alpha":
            raise CheckpointError(f"{key}: not a LoHa / LoKr weight (expected one of {', '.join(PARAMS)} or alpha)")
        modules.setdefault(module, {})[param] = tensor
    return modules


# -- writing -------------------------------------------------------------------------------------------

LYCORIS_PREFIX = "lycoris_"  # Flux transformer modules: diffusers' names, dots as underscores


def _file_name(names: KohyaNames, component: str, module: str) -> str:
    if component == "denoiser" and names.family == "flux":
        if not lora_flux.is_flux_module(module):
            raise ValueError(f"{module}: not a Linear layer of a Flux transformer")
        return LYCORIS_PREFIX + module.replace(".", "_")
    return names.name(component, module)


def save_lycoris(path: str | os.PathLike, denoiser_sd: Mapping[str, torch.Tensor],
                 text_sd: Mapping[str, torch.Tensor] | None, settings, metadata: dict | None = None, *,
                 text_2_sd: Mapping[str, torch.Tensor] | None = None, denoiser_config: Any = None) -> Path:
    """Write peft LoHa / LoKr weights (`lora_state_dict` of each model) in the LyCORIS layout."""
    if settings.type not in ALGOS:
        raise ValueError(f"save_lycoris writes LoHa and LoKr; this is a {settings.type}")
    names = KohyaNames.of(denoiser_config)
    alpha = float(settings.alpha if settings.alpha is not None else settings.rank)
    peft_scale = alpha / settings.rank
    tensors: dict[str, torch.Tensor] = {}
    for component, sd in (("denoiser", denoiser_sd), ("text_encoder", text_sd), ("text_encoder_2", text_2_sd)):
        for module, params in by_module(sd or {}).items():
            if algo_of(params) != settings.type:
                raise CheckpointError(f"{module}: its weights are not {settings.type} weights ({sorted(params)})")
            name = _file_name(names, component, module)
            params = {k: v.detach().float().contiguous() for k, v in params.items()}
            module_alpha = alpha
            if settings.type == "lokr" and "lokr_w1" in params and "lokr_w2" in params:
                # both halves full: readers scale by 1, peft by alpha / r
                params["lokr_w1"] = params["lokr_w1"] * peft_scale
                module_alpha = float(settings.rank)
            for param, tensor in params.items():
                tensors[f"{name}.{param}"] = tensor
            tensors[f"{name}.alpha"] = torch.tensor(module_alpha)
    if not tensors:
        raise ValueError("no LoHa / LoKr weights to write")
    meta = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(settings.rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({"algo": settings.type}),
        **({"ss_base_model_version": {"sdxl": "sdxl_base_v1-0", "flux": "flux1"}[names.family]}
           if names.family != "sd" else {}),
    }
    for k, v in (metadata or {}).items():
        if k.startswith(("ss_", "modelspec.")):
            meta[k] = v if isinstance(v, str) else json.dumps(v)
    layout = denoiser_layout(denoiser_config) if denoiser_config is not None else None
    meta[OUR_KEY] = _our_metadata(settings, metadata, layout)
    _write(path, tensors, meta)
    return Path(path)


# -- reading and merging -------------------------------------------------------------------------------


@dataclasses.dataclass
class LycorisFile:
    algo: str  # "loha" or "lokr"
    family: str
    modules: dict[str, dict[str, dict[str, torch.Tensor]]]  # component -> module (our names) -> params + alpha
    metadata: dict[str, str]
    # Flux files in kohya's BFL names: the modules that are not one of ours (fused q/k/v, the single blocks'
    # linear1, the final modulation with its halves swapped) -> params + alpha
    fused: dict[str, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)
    layout: dict[str, Any] | None = None  # the denoiser layout its names were read with (None: SD's)

    @property
    def ranks(self) -> set[int]:
        found = set()
        for p in [*(p for mods in self.modules.values() for p in mods.values()), *self.fused.values()]:
            for key in ("hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
                if key in p:
                    found.add(int(p[key].shape[0]))
        return found


def _is_flux_name(name: str) -> bool:
    return not name.startswith("lora_te") and lora_flux.module_name(name) is not None


def _family_clues(names, metadata: Mapping[str, str]) -> list[tuple[str, str]]:
    """What a file says of the family it was made for, strongest first (lora_family._family_for)."""
    clues = []
    flux = [n for n in names if _is_flux_name(n)]
    if flux:
        clues.append(("flux", f"its modules are a Flux transformer's ({flux[0]}, ...)"))
    sgm = [n for n in names if n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                             "lora_unet_output_blocks_"))]
    if sgm:  # kohya writes the original (sgm) U-Net names for SDXL only
        clues.append(("sdxl", f"its U-Net modules have the original (sgm) names ({sgm[0]}, ...)"))
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        clues.insert(0, ("sdxl", f"its metadata says ss_base_model_version={version}"))
    layout = _stored_layout(_stored(metadata))
    if layout:
        family = lora_family(layout)
        clues.insert(0, (family, f"it was written for a {FAMILIES[family]} model"))
    return clues


def read_lycoris(path: str | os.PathLike, denoiser_config: Any = None) -> LycorisFile:
    """A LyCORIS file (LoHa or LoKr), for the family of `denoiser_config` (without it: the family the file
    tells, SD 1.x/2.x when it tells none); a file for another family is refused."""
    path = Path(path)
    state, metadata = read_safetensors(path)
    algo = algo_of(list(state))
    if algo is None:
        raise CheckpointError(f"{path}: no LoHa or LoKr weights (hada_w1_a, lokr_w1, ...) in it")
    in_file = by_module(state)
    clues = _family_clues(in_file, metadata)
    family = _family_for(str(path), clues, denoiser_config, CheckpointError)
    # the U-Net's layout names its modules: the model's, else the one our files store, else the family's
    layout = denoiser_config if denoiser_config is not None else _stored_layout(_stored(metadata))
    if layout is None:
        layout = {"sdxl": SDXL_LAYOUT, "flux": FLUX_LAYOUT}.get(family)
    names = KohyaNames.of(layout)
    modules: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for name, params in in_file.items():
        if family == "flux" and not name.startswith("lora_te"):
            found = lora_flux.module_name(name)
            if found is None:
                raise CheckpointError(f"{path}: {name}: not a module of a Flux transformer")
            naming, module = found
            if naming == "bfl":
                entry = lora_flux.bfl_module(module)
                if entry.fused or entry.swap:
                    fused[module] = params
                    continue
                module = entry.parts[0]
            modules.setdefault("denoiser", {})[module] = params
            continue
        component, module = names.module(name, str(path))
        modules.setdefault(component, {})[module] = params
    layout = denoiser_layout(layout) if layout is not None else None
    return LycorisFile(algo, family, modules, metadata, fused, layout)


def lycoris_delta(params: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """One module's weight change as ComfyUI and A1111 compute it (in float32), reshaped to `shape`."""
    p = {k: v.float() for k, v in params.items()}
    w1, w2 = _products(p)
    if "hada_w1_a" in p:
        return (w1 * w2).reshape(shape) * _file_scale(p)
    if w2.ndim == 4:
        w1 = w1[..., None, None]
    return torch.kron(w1, w2).reshape(shape) * _file_scale(p)


def _products(p: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """LoHa's two low-rank products, or LoKr's two Kronecker halves."""
    if "hada_w1_a" in p:
        if "hada_t1" in p:
            return (torch.einsum("i j k l, j r, i p -> p r k l", p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"]),
                    torch.einsum("i j k l, j r, i p -> p r k l", p["hada_t2"], p["hada_w2_b"], p["hada_w2_a"]))
        return p["hada_w1_a"] @ p["hada_w1_b"], p["hada_w2_a"] @ p["hada_w2_b"]
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        w2 = torch.einsum("i j k l, j r, i p -> p r k l", p["lokr_t2"], p["lokr_w2_b"], p["lokr_w2_a"])
    else:
        w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
    return w1, w2


def _file_scale(p: Mapping[str, torch.Tensor]) -> float:
    """The scale ComfyUI and A1111 give a module: alpha / its rank (LoHa's; LoKr's factored half's), 1
    without an alpha or for a LoKr with both halves full."""
    if "alpha" not in p:
        return 1.0
    if "hada_w1_b" in p:
        return float(p["alpha"]) / p["hada_w1_b"].shape[0]
    dim = next((p[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in p), None)
    return float(p["alpha"]) / dim if dim is not None else 1.0


def merge_lycoris(components, path: str | os.PathLike, scale: float = 1.0) -> list[str]:
    """Fold a LoHa / LoKr file into the weights of the denoiser and text encoders it has modules for:
    W += scale * dW. Everything is computed first, so a module that does not fit leaves the model as it was."""
    lyco = read_lycoris(path, denoiser_config=components.denoiser.config)
    plan = []
    for component, mods in lyco.modules.items():
        model = getattr(components, component, None)
        if model is None:
            raise CheckpointError(f"{path}: it has weights for a {component}, which the model has not")
        for module, params in mods.items():
            layer = _layer(model, component, module, path)
            plan.append((layer, _delta(params, layer.weight.shape, f"{path}: {component} {module}")))
    for bfl, params in lyco.fused.items():  # one change for several of our layers: its rows shared out
        entry = lora_flux.bfl_module(bfl)
        layers = [_layer(components.denoiser, "denoiser", part, path) for part in entry.parts]
        rows = [layer.weight.shape[0] for layer in layers]
        delta = _delta(params, torch.Size((sum(rows), layers[0].weight.shape[1])), f"{path}: {bfl}")
        if entry.swap:
            delta = swap_halves(delta)
        plan += zip(layers, delta.split(rows))
    with torch.no_grad():
        for layer, delta in plan:
            layer.weight.copy_((layer.weight.float() + scale * delta.to(layer.weight.device)).to(layer.weight.dtype))
    return [f"{c}.{m}" for c, mods in lyco.modules.items() for m in mods] + [f"denoiser.{b}" for b in lyco.fused]


def _layer(model: nn.Module, component: str, module: str, path) -> nn.Module:
    layer = _find(model, module)
    if not isinstance(layer, (nn.Linear, nn.Conv2d)):
        raise CheckpointError(f"{path}: {component} {module}: not a Linear or Conv2d layer of the model")
    return layer


def _delta(params: Mapping[str, torch.Tensor], shape: torch.Size, where: str) -> torch.Tensor:
    try:
        return lycoris_delta(params, shape)
    except RuntimeError as e:  # shapes that do not multiply or reshape
        raise CheckpointError(f"{where}: does not fit the weight {tuple(shape)} ({e})") from None


# -- import: into peft's layers --------------------------------------------------------------------------


def lycoris_settings(lyco: LycorisFile):
    """The `LoraSettings` that give peft layers of this file's shapes: the ones our files store, else the
    algorithm, the rank of the file's factored products (its ss_network_dim when it has none) and its
    modules as targets (the text encoders are adapted when the file has weights for them)."""
    from .lora import LoraSettings

    stored = _stored(lyco.metadata).get("settings")
    if stored:
        return LoraSettings.from_dict(stored)
    ranks = lyco.ranks
    if len(ranks) > 1:
        raise CheckpointError(f"the file's modules have ranks {sorted(ranks)}; peft layers take one rank")
    rank = ranks.pop() if ranks else int(lyco.metadata.get("ss_network_dim", 0) or 0)
    if rank < 1:
        raise CheckpointError("the file says no rank (every LoKr half is full and there is no ss_network_dim)")
    alpha = float(lyco.metadata.get("ss_network_alpha", rank))
    targets = tuple(sorted(lyco.modules.get("denoiser", {})))
    text = any(c != "denoiser" for c in lyco.modules)
    return LoraSettings(type=lyco.algo, rank=rank, alpha=alpha, targets=targets or "attention", text_encoder=text)


def peft_state(lyco: LycorisFile, settings) -> dict[str, dict[str, torch.Tensor]]:
    """The file's weights in peft's layout, by component, for layers that `add_lora(model, settings)` makes
    (`set_lora_state_dict` loads them; it names any module whose shapes differ). Each module's first
    factor is rescaled so that peft's alpha / rank gives the change the file's own scale gives."""
    if lyco.fused:
        raise CheckpointError(
            f"{preview_keys(sorted(lyco.fused))}: LoHa / LoKr over fused Flux modules (kohya's BFL names) cannot be "
            "split into the per-module adapters peft trains; merge the file into the base instead")
    if settings.type != lyco.algo:
        raise CheckpointError(f"the file holds {lyco.algo} weights, the settings ask for {settings.type}")
    alpha = float(settings.alpha if settings.alpha is not None else settings.rank)
    peft_scale = alpha / settings.rank
    out: dict[str, dict[str, torch.Tensor]] = {}
    for component, mods in lyco.modules.items():
        sd = out.setdefault(component, {})
        for module, params in mods.items():
            params = {k: v.float() for k, v in params.items()}
            factor = _file_scale(params) / peft_scale
            first = next(k for k in ("hada_w1_a", "lokr_w1", "lokr_w1_a") if k in params)
            params[first] = params[first] * factor
            for param, tensor in params.items():
                if param != "alpha":
                    sd[f"{module}.{param}"] = tensor
    return out


def describe_lycoris(path: str | os.PathLike) -> dict[str, Any]:
    """What a LoHa / LoKr file holds (`python -m adapters inspect`)."""
    state, metadata = read_safetensors(path)
    modules = by_module(state)
    components = {}
    for name in modules:
        prefix = next((p for p in ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_", LYCORIS_PREFIX,
                                   "lora_transformer_") if name.startswith(p)), "other")
        components[prefix.rstrip("_")] = components.get(prefix.rstrip("_"), 0) + 1
    ranks = sorted({int(p[k].shape[0]) for p in modules.values() for k in ("hada_w1_b", "lokr_w1_b", "lokr_w2_b")
                    if k in p})
    clues = _family_clues(modules, metadata)
    return {
        "file": str(path),
        "format": "LyCORIS",
        "family": clues[0][0] if clues else "sd",
        "algo": {"loha": "LoHa", "lokr": "LoKr"}[algo_of(list(state))],
        "modules": ", ".join(f"{k} {v}" for k, v in sorted(components.items())),
        "ranks": "/".join(map(str, ranks)) or "full (LoKr with both halves full: scale 1)",
        "alphas": "/".join(f"{a:g}" for a in sorted({float(p["alpha"]) for p in modules.values() if "alpha" in p})),
        "metadata": json.dumps({k: v for k, v in metadata.items() if k.startswith("ss_")}),
    }


def _find(model: nn.Module, name: str) -> nn.Module | None:
    for candidate in (name, "text_model." + name):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None
