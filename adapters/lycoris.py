"""LoHa and LoKr (the LyCORIS adapters): trained through peft (`lora.type: loha | lokr`), written in the
layout ComfyUI and A1111 / Forge load (kohya's module names, `hada_w1_a` ... / `lokr_w1` ..., an `.alpha`
per module), read back by merge and inspect.

The two conventions differ in one place, which the writer bridges (docs/notes/lycoris.md has the
sources):
- LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b) * scale; peft's scale is alpha / r, the readers' alpha /
  w1_b.shape[0], the same number.
- LoKr: dW = kron(w1, w2) * scale, each half full or the product of two factors (w?_a @ w?_b). peft's
  scale is always alpha / r; the readers' is alpha / the rank of a factored half, and 1 when both halves
  are full (their alpha is then ignored). A full-by-full LoKr is written with peft's scale folded into
  w1, and alpha = r as LyCORIS writes it.
Flux's kohya names fuse q, k and v into one module, which a Hadamard or Kronecker product cannot be
split over: LoHa and LoKr are refused on Flux.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ldmcore.weights import CheckpointError, read_safetensors

from .lora_family import SDXL_LAYOUT, denoiser_layout, lora_family
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


def save_lycoris(path: str | os.PathLike, denoiser_sd: Mapping[str, torch.Tensor],
                 text_sd: Mapping[str, torch.Tensor] | None, settings, metadata: dict | None = None, *,
                 text_2_sd: Mapping[str, torch.Tensor] | None = None, denoiser_config: Any = None) -> Path:
    """Write peft LoHa / LoKr weights (`lora_state_dict` of each model) in the LyCORIS kohya layout."""
    if settings.type not in ALGOS:
        raise ValueError(f"save_lycoris writes LoHa and LoKr; this is a {settings.type}")
    family = lora_family(denoiser_config) if denoiser_config is not None else "sd"
    if family == "flux":
        raise ValueError("LoHa / LoKr on Flux are not written: Flux's kohya names fuse q, k and v, which a Hadamard "
                         "or Kronecker product cannot be split over; use lora.type: lora")
    names = KohyaNames.of(denoiser_config)
    alpha = float(settings.alpha if settings.alpha is not None else settings.rank)
    peft_scale = alpha / settings.rank
    tensors: dict[str, torch.Tensor] = {}
    for component, sd in (("denoiser", denoiser_sd), ("text_encoder", text_sd), ("text_encoder_2", text_2_sd)):
        for module, params in by_module(sd or {}).items():
            if algo_of(params) != settings.type:
                raise CheckpointError(f"{module}: its weights are not {settings.type} weights ({sorted(params)})")
            name = names.name(component, module)
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
        **({"ss_base_model_version": "sdxl_base_v1-0"} if family == "sdxl" else {}),
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

    @property
    def ranks(self) -> set[int]:
        found = set()
        for mods in self.modules.values():
            for p in mods.values():
                for key in ("hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
                    if key in p:
                        found.add(int(p[key].shape[0]))
        return found


def read_lycoris(path: str | os.PathLike, denoiser_config: Any = None) -> LycorisFile:
    """A LyCORIS file (LoHa or LoKr) in kohya's names, for the family of `denoiser_config` (without it: SD's
    names, or SDXL's when the file says so)."""
    path = Path(path)
    state, metadata = read_safetensors(path)
    algo = algo_of(list(state))
    if algo is None:
        raise CheckpointError(f"{path}: no LoHa or LoKr weights (hada_w1_a, lokr_w1, ...) in it")
    # the U-Net's layout names its modules: the model's, else the one our files store, else SD's / SDXL base's
    layout = denoiser_config if denoiser_config is not None else _stored_layout(_stored(metadata))
    if layout is None and metadata.get("ss_base_model_version", "").startswith("sdxl"):
        layout = SDXL_LAYOUT
    names = KohyaNames.of(layout)
    if names.family == "flux":
        raise CheckpointError(f"{path}: LoHa / LoKr files for Flux are not read (kohya's Flux names fuse q, k and v)")
    modules: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for kohya, params in by_module(state).items():
        component, module = names.module(kohya, str(path))
        modules.setdefault(component, {})[module] = params
    return LycorisFile(algo, names.family, modules, metadata)


def lycoris_delta(params: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """One module's weight change as ComfyUI and A1111 compute it (in float32), reshaped to `shape`."""
    p = {k: v.float() for k, v in params.items()}
    alpha = float(p["alpha"]) if "alpha" in p else None
    if "hada_w1_a" in p:
        if "hada_t1" in p:
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", p["hada_t1"], p["hada_w1_b"], p["hada_w1_a"])
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", p["hada_t2"], p["hada_w2_b"], p["hada_w2_a"])
        else:
            m1, m2 = p["hada_w1_a"] @ p["hada_w1_b"], p["hada_w2_a"] @ p["hada_w2_b"]
        scale = alpha / p["hada_w1_b"].shape[0] if alpha is not None else 1.0
        return (m1 * m2).reshape(shape) * scale
    dim = None
    w1 = p.get("lokr_w1")
    if w1 is None:
        dim = p["lokr_w1_b"].shape[0]
        w1 = p["lokr_w1_a"] @ p["lokr_w1_b"]
    w2 = p.get("lokr_w2")
    if w2 is None:
        dim = p["lokr_w2_b"].shape[0]
        if "lokr_t2" in p:
            w2 = torch.einsum("i j k l, j r, i p -> p r k l", p["lokr_t2"], p["lokr_w2_b"], p["lokr_w2_a"])
        else:
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
    if w2.ndim == 4:
        w1 = w1[..., None, None]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale


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
            layer = _find(model, module)
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                raise CheckpointError(f"{path}: {component} {module}: not a Linear or Conv2d layer of the model")
            try:
                delta = lycoris_delta(params, layer.weight.shape)
            except RuntimeError as e:  # shapes that do not multiply or reshape
                raise CheckpointError(f"{path}: {component} {module}: does not fit the weight "
                                      f"{tuple(layer.weight.shape)} ({e})") from None
            plan.append((layer, delta))
    with torch.no_grad():
        for layer, delta in plan:
            layer.weight.copy_((layer.weight.float() + scale * delta.to(layer.weight.device)).to(layer.weight.dtype))
    return [f"{c}.{m}" for c, mods in lyco.modules.items() for m in mods]


def describe_lycoris(path: str | os.PathLike) -> dict[str, Any]:
    """What a LoHa / LoKr file holds (`python -m adapters inspect`)."""
    state, metadata = read_safetensors(path)
    modules = by_module(state)
    components = {}
    for name in modules:
        prefix = next((p for p in ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_") if name.startswith(p)), "other")
        components[prefix.rstrip("_")] = components.get(prefix.rstrip("_"), 0) + 1
    ranks = sorted({int(p[k].shape[0]) for p in modules.values() for k in ("hada_w1_b", "lokr_w1_b", "lokr_w2_b")
                    if k in p})
    return {
        "file": str(path),
        "format": "LyCORIS (kohya names)",
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
