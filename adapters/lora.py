"""LoRA for the denoiser (a U-Net, or Flux's transformer) and the CLIP text encoders (SDXL's two as well,
Flux's CLIP-L), through peft.

`add_lora` wraps the chosen Linear / Conv2d layers in peft's LoRA layers in place (no PeftModel
around the model: the trainer keeps calling the same denoiser) and freezes everything else; which
layers a preset target names depends on the model (UNET_TARGETS, FLUX_TARGETS).
`lora_state_dict` / `set_lora_state_dict` move the adapter weights in peft's key layout, which is
also the layout of diffusers' files. The file formats live in lora_formats.py (reading either) and the
files it names (lora_state, lora_family, lora_diffusers, lora_kohya, lora_flux); their API is re-exported
here. `merge_lora` folds a file into plain weights, `describe` says what a file holds.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import re
from typing import Any, Mapping

import torch
from torch import nn

from ldmcore.weights import CheckpointError, check_state_dict, preview_keys

# re-exported: the one import point for LoRA
from .lora_diffusers import save_diffusers  # noqa: F401
from .lora_family import DENOISER, FAMILIES, lora_family
from .lora_formats import LoraFile, load_lora_file  # noqa: F401
from .lora_kohya import save_kohya  # noqa: F401
from .lora_state import DIFFUSERS_FILE, KOHYA_FILE, TEXT_PREFIX, bare_text_name, split_modules  # noqa: F401

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_FF = ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
_CONV = ("conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv")
UNET_TARGETS = {
    "attention": _ATTENTION,  # every Attention of the U-Net: self- and cross-attention
    "attention+ff": _ATTENTION + _FF,  # + the transformers' feed-forward and their in/out projections
    "all": _ATTENTION + _FF + _CONV,  # + the ResNet blocks and the resampling convs (conv LoRA, "LoCon")
}
# Flux: the double blocks' image and text projections, the single blocks' q/k/v (their attention output
# goes through proj_out together with the MLP's)
_FLUX_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                   "attn.add_v_proj", "attn.to_add_out")
_FLUX_FF = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
            r"single_transformer_blocks\.\d+\.proj_out")
_FLUX_REST = ("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder",
              "context_embedder", r"time_text_embed\..*", "proj_out")  # modulation, embedders, final layer
FLUX_TARGETS = {
    "attention": _FLUX_ATTENTION,
    "attention+ff": _FLUX_ATTENTION + _FLUX_FF,  # + both streams' MLPs, the single blocks' MLP and output
    "all": _FLUX_ATTENTION + _FLUX_FF + _FLUX_REST,  # every Linear layer
}
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP self-attention, CLIP-L and bigG alike
_REGEX_CHARS = set("*+?[](){}|^$\\")


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """What LoRA to add. `alpha` None means alpha = rank (scale 1). `targets` is a preset, "attention",
    "attention+ff" or "all" (UNET_TARGETS or FLUX_TARGETS, as the model is), or a tuple of module-name
    suffixes ("attn2.to_k") or regular expressions matched against whole module names
    ("down_blocks\\.0\\..*to_q"). `init` is peft's `init_lora_weights`."""

    rank: int = 16
    alpha: float | None = None
    dropout: float = 0.0
    targets: str | tuple[str, ...] = "attention"
    init: str | bool = True
    use_dora: bool = False
    text_encoder: bool = False
    type: str = "lora"  # "lora", or the LyCORIS adapters "loha" (Hadamard product) and "lokr" (Kronecker product)

    def __post_init__(self):
        if self.type not in ("lora", "loha", "lokr"):
            raise ValueError(f"LoraSettings.type must be lora, loha or lokr, got {self.type!r}")
        if self.type != "lora" and (self.use_dora or not isinstance(self.init, bool)):
            raise ValueError(f"{self.type}: use_dora and the LoRA init schemes ({self.init!r}) are LoRA's; "
                             "leave lora.use_dora false and lora.init true")
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraSettings.rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"LoraSettings.alpha must be a positive number or None, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSettings.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str):
            if self.targets not in UNET_TARGETS:
                raise ValueError(
                    f"LoraSettings.targets={self.targets!r}: choose one of {sorted(UNET_TARGETS)} "
                    "or give a list of module-name suffixes or regular expressions"
                )
        elif not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(
                f"LoraSettings.targets must be a preset name or a non-empty list of strings, got {self.targets!r}"
            )

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if isinstance(d["targets"], tuple):
            d["targets"] = list(d["targets"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"LoraSettings: unknown keys {unknown}; valid keys are {sorted(names)}")
        return cls(**d)


# -- injection ---------------------------------------------------------------------------------------


def _matches(name: str, pattern: str) -> bool:
    if _REGEX_CHARS & set(pattern):
        return re.fullmatch(pattern, name) is not None
    return name == pattern or name.endswith("." + pattern)


def denoiser_targets(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """The preset targets for this denoiser: FLUX_TARGETS for a Flux transformer, else UNET_TARGETS."""
    config = getattr(model, "config", None)
    return FLUX_TARGETS if config is not None and lora_family(config) == "flux" else UNET_TARGETS


def target_names(model: nn.Module, settings: LoraSettings, *, text_encoder: bool = False) -> list[str]:
    """The Linear / Conv2d modules of `model` that `settings` (or TEXT_TARGETS) select, in model order."""
    preset = text_encoder or isinstance(settings.targets, str)
    presets = {} if text_encoder else denoiser_targets(model)
    patterns = TEXT_TARGETS if text_encoder else presets.get(settings.targets, settings.targets)
    names, used = [], set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            hits = [p for p in patterns if _matches(name, p)]
            if hits:
                names.append(name)
                used.update(hits)
    unused = [p for p in patterns if p not in used]
    if not names or (unused and not preset):
        raise ValueError(
            f"LoRA targets {list(unused or patterns)} match no Linear or Conv2d layer of {type(model).__name__} "
            "(suffixes match whole name parts, e.g. 'attn2.to_k' or 'to_out.0'; regular expressions match whole names)"
        )
    return names


def has_lora(model: nn.Module) -> bool:
    return bool(getattr(model, "peft_config", None))


def _is_clip(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) in ("clip_text_model", "clip")


def add_lora(model: nn.Module, settings: LoraSettings, *, text_encoder: bool = False) -> list[str]:
    """Inject LoRA layers into `model` in place with peft, freeze every other parameter and return
    the wrapped module names. The preset targets follow the model (`denoiser_targets`). `text_encoder=True`:
    `model` is a CLIP text encoder (CLIPTextModel, or SDXL's CLIPTextModelWithProjection, whose projection
    stays frozen) and the targets are its attention projections (TEXT_TARGETS), whatever
    `settings.targets` says."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model

    if has_lora(model):
        raise ValueError(f"{type(model).__name__} already has LoRA layers; one adapter per model")
    if text_encoder and not _is_clip(model):
        raise ValueError(f"text encoder LoRA adapts CLIP text encoders, not {type(model).__name__}: Flux's T5 "
                         "stays frozen, as in kohya's Flux LoRAs (diffusers' loader reads no T5 weights)")
    names = target_names(model, settings, text_encoder=text_encoder)
    alpha = settings.alpha if settings.alpha is not None else settings.rank
    if settings.type == "lora":
        config = LoraConfig(
            r=settings.rank,
            lora_alpha=alpha,
            lora_dropout=settings.dropout,
            target_modules=names,  # whole names: peft's suffix matching then selects exactly these
            init_lora_weights=settings.init,
            use_dora=settings.use_dora,
        )
    else:  # peft's LyCORIS adapters; `dropout` drops whole modules' updates, as LyCORIS's module_dropout
        kind = LoHaConfig if settings.type == "loha" else LoKrConfig
        config = kind(r=settings.rank, alpha=alpha, target_modules=names, module_dropout=settings.dropout,
                      init_weights=settings.init)
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        # lora_A, lora_B and DoRA's lora_magnitude_vector; LoHa's hada_*; LoKr's lokr_*
        p.requires_grad_(any(marker in name for marker in ADAPTER_MARKERS))
    return names


#: the parameter names of an adapter's own weights
ADAPTER_MARKERS = (".lora_", ".hada_", ".lokr_")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights, keys as peft and diffusers write them:
    `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`."""
    from peft import get_peft_model_state_dict

    if not has_lora(model):
        raise ValueError(f"{type(model).__name__} has no LoRA layers (call add_lora first)")
    return get_peft_model_state_dict(model)


def set_lora_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Load adapter weights into a model prepared by `add_lora` with the same settings. Every key
    must match: unknown or missing keys and wrong shapes raise CheckpointError naming them."""
    from peft import set_peft_model_state_dict

    own = lora_state_dict(model)
    nested = any(k.startswith(TEXT_PREFIX) for k in own)  # a transformers 4.x text encoder
    sd = {(TEXT_PREFIX + bare_text_name(k) if nested else bare_text_name(k)): v for k, v in sd.items()}
    check_state_dict(own, sd, f"the LoRA weights do not fit the LoRA layers of {type(model).__name__}",
                     hint="were the same targets, rank and text_encoder setting used?")
    set_peft_model_state_dict(model, dict(sd))


# -- merging -----------------------------------------------------------------------------------------


def merged_weight(weight: torch.Tensor, parts: Mapping[str, torch.Tensor], alpha: float, scale: float) -> torch.Tensor:
    """W + scale * (alpha / rank) * B @ A (per kernel position for convs), in at least float32.
    DoRA: the full DoRA weight m * V / ||V|| (V = W + (alpha / rank) * B @ A, norms per output
    channel, as peft), blended as W + scale * (W_dora - W)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    w, a, b = weight.to(dtype), parts["A"].to(dtype), parts["B"].to(dtype)
    rank = a.shape[0]
    delta = (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])  # (out, r) @ (r, in[, kh, kw])
    if delta.shape != w.shape:
        raise CheckpointError(f"LoRA delta {tuple(delta.shape)} does not fit the weight {tuple(w.shape)}")
    v = w + (alpha / rank) * delta
    if "m" in parts:
        norm = v.flatten(1).norm(dim=1)  # (out,)
        v = (parts["m"].to(dtype).flatten() / norm).reshape(-1, *[1] * (w.ndim - 1)) * v
    return (w + scale * (v - w)).to(weight.dtype)


def _layer(model: nn.Module, name: str) -> nn.Module | None:
    for candidate in (name, TEXT_PREFIX + name):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None


_WHAT = {"text_encoder": "text encoder", "text_encoder_2": "second text encoder (text_encoder_2)"}


def merge_lora(components, lora_path: str | os.PathLike, scale: float = 1.0) -> None:
    """Fold a LoRA file (either format; SD 1.x/2.x, SDXL or Flux.1) into the weights of
    `components.denoiser` and, where the file has them, `components.text_encoder` and
    `components.text_encoder_2`: W += scale * (alpha / rank) * B @ A; a LoHa / LoKr file as ComfyUI
    merges it (adapters/lycoris.py). A file for another family than
    the denoiser's is refused. Nothing of peft stays."""
    from .lycoris import is_lycoris_file, merge_lycoris

    if is_lycoris_file(lora_path):
        merge_lycoris(components, lora_path, scale=scale)  # LoHa / LoKr
        return
    lora = load_lora_file(lora_path, denoiser_config=components.denoiser.config)
    what_is = {**_WHAT, "denoiser": DENOISER[lora.family]}
    plan = []
    for component, sd in lora.state_dicts().items():
        model, what = getattr(components, component, None), what_is[component]
        if model is None:
            raise CheckpointError(f"{lora_path}: the LoRA has weights for a {what}, which the model has not")
        if has_lora(model):
            raise ValueError(f"the {what} has LoRA layers injected; merge into a model loaded without them")
        mods = split_modules(sd, str(lora_path))
        layers = {name: _layer(model, name) for name in mods}
        absent = [n for n, layer in layers.items() if not isinstance(layer, (nn.Linear, nn.Conv2d))]
        if absent:
            raise CheckpointError(
                f"{lora_path}: {len(absent)} LoRA modules are not Linear / Conv2d layers of the {what}: "
                f"{preview_keys(sorted(absent))} (a LoRA for another model family?)"
            )
        plan += [(f"{what} {name}", layers[name], parts) for name, parts in mods.items()]
    merged = []
    for label, layer, parts in plan:  # compute everything first: a bad module leaves the model untouched
        try:
            merged.append((layer, merged_weight(layer.weight.detach(), parts, lora.alpha, scale)))
        except CheckpointError as e:
            raise CheckpointError(f"{lora_path}: {label}: {e}") from None
    with torch.no_grad():
        for layer, weight in merged:
            layer.weight.copy_(weight)


# -- describing --------------------------------------------------------------------------------------

KINDS = {  # module-name suffix -> kind, for `describe`
    "attention": ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj", "add_q_proj",
                  "add_k_proj", "add_v_proj", "to_add_out"),
    "feed_forward": ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp",
                     "mlp.fc1", "mlp.fc2"),
    "projection": ("proj_in", "proj_out"),
    "resnet": ("conv1", "conv2", "conv_shortcut", "time_emb_proj"),
    "resample": ("downsamplers.0.conv", "upsamplers.0.conv"),
    "modulation": ("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear"),
    "embedding": ("x_embedder", "context_embedder", "linear_1", "linear_2"),
}


def _kind(name: str) -> str:
    return next((kind for kind, suffixes in KINDS.items() if any(_matches(name, s) for s in suffixes)), "other")


def _block(name: str) -> str:
    m = re.match(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.", name)
    return m.group(1) if m else name.split(".")[0]


def describe(path: str | os.PathLike, denoiser_config: Any = None) -> dict[str, Any]:
    """What a LoRA file holds: family, format, ranks, alpha, targeted modules by kind and by block,
    text encoders or not, DoRA or not, and its metadata. `denoiser_config` as for `load_lora_file`."""
    lora = load_lora_file(path, denoiser_config)
    mods = {c: split_modules(sd, str(path)) for c, sd in lora.state_dicts().items()}
    denoiser, text, text_2 = (mods.get(c, {}) for c in ("denoiser", "text_encoder", "text_encoder_2"))
    everything = [p for m in mods.values() for p in m.values()]
    return {
        "file": str(path),
        "family": FAMILIES[lora.family],
        "format": lora.format,
        "ranks": sorted({p["A"].shape[0] for p in everything}),
        "alpha": lora.alpha,
        "denoiser": DENOISER[lora.family],  # what the denoiser is: "U-Net" or "transformer"
        "denoiser_modules": len(denoiser),
        "denoiser_kinds": dict(collections.Counter(_kind(n) for n in denoiser)),
        "denoiser_blocks": dict(collections.Counter(_block(n) for n in denoiser)),
        "text_encoder": bool(text),
        "text_encoder_modules": len(text),
        "text_encoder_2": bool(text_2),
        "text_encoder_2_modules": len(text_2),
        "dora": any("m" in p for p in everything),
        "conv": any(p["A"].ndim == 4 and p["A"].shape[-1] > 1 for p in everything),
        "settings": lora.settings,
        "metadata": lora.user,
        "file_metadata": {k: v for k, v in lora.file_metadata.items() if k.startswith(("ss_", "modelspec."))},
    }
