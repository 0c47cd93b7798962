"""SDXL's original single-file layout (Stability's "sgm" checkpoints), both ways.

One flat state dict, as for SD 1.x/2.x (single_file.py), with the text encoders under `conditioner.`:

    model.diffusion_model.                   U-Net; SD's names plus label_emb.0.{0,2}, the added conditioning
    first_stage_model.                       VAE, as in SD 1.x/2.x
    conditioner.embedders.0.transformer.     CLIP ViT-L, Hugging Face names (text_model.*)      base only
    conditioner.embedders.1.model.           OpenCLIP ViT-bigG, OpenCLIP names                 base
    conditioner.embedders.0.model.           the same bigG in the refiner, which has no CLIP-L

bigG is OpenCLIP's text tower: fused q/k/v (`attn.in_proj_*`, split and fused by single_file.py's
helpers), and its projection stored as the matrix the pooled output is multiplied by, (width, proj),
that is the transpose of `text_projection.weight` in transformers' CLIPTextModelWithProjection.
`logit_scale` (the contrastive temperature) is not part of a text encoder: dropped on reading, not written.

Public functions:
    original_to_diffusers(state_dict, configs) -> {"unet", "vae", ["text_encoder",] "text_encoder_2"}
    diffusers_to_original(unet_sd, vae_sd, text_sds, unet_config, vae_config) -> flat sgm state dict
    detect_sdxl(state_dict) -> what the file is (single_file.detect_family calls it for SDXL files)

Text-encoder state dicts are in the layout of transformers' own state_dict():
    text_encoder    CLIPTextModel: no `text_model.` level (transformers >= 5.6); read keys may carry it
    text_encoder_2  CLIPTextModelWithProjection: `text_model.*` and `text_projection.weight`
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from .single_file import (
    _OPENCLIP_DROPPED, UNET, VAE, StateDict, _check_fused_qkv, _convert, _count_layers, _fuse_qkv, _Module,
    _openclip_modules,
    _refuse_other_formats, _split_qkv, _strip, _unet_modules, _vae_modules, _weights_and_biases, is_sdxl,
)
from .weights import CheckpointError

CLIP_L = "conditioner.embedders.0.transformer."
BIGG = "conditioner.embedders.1.model."
REFINER_BIGG = "conditioner.embedders.0.model."
TEXT_MODEL = "text_model."
PROJECTION = "text_projection.weight"  # transformers' name; OpenCLIP's `text_projection` is its transpose
_POSITIONS = {  # the entry whose last axis is an encoder's width
    "text_encoder": "text_model.embeddings.position_embedding.weight",
    "text_encoder_2": "positional_embedding",
}

# The text encoders -------------------------------------------------------------------------------


def _clip_modules(layers: int) -> list[_Module]:
    """CLIP-L keeps transformers' names; the table only checks that every layer is whole."""
    layer_needs = _weights_and_biases("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                                      "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
    return [
        _Module("embeddings.token_embedding", "embeddings.token_embedding", required=("weight",)),
        _Module("embeddings.position_embedding", "embeddings.position_embedding", required=("weight",)),
        _Module("final_layer_norm", "final_layer_norm"),
        *(_Module(f"encoder.layers.{i}", f"encoder.layers.{i}", required=layer_needs) for i in range(layers)),
    ]


def _clip_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    own = {k.removeprefix(TEXT_MODEL): v for k, v in _strip(state_dict, CLIP_L).items()}
    own.pop("embeddings.position_ids", None)  # a constant buffer, not a weight
    modules = _clip_modules(_count_layers(own, "encoder.layers."))
    return _convert(own, modules, False, "text encoder (CLIP-L)", CLIP_L + TEXT_MODEL)


def _clip_to_original(text_sd: Mapping[str, torch.Tensor]) -> StateDict:
    own = {k.removeprefix(TEXT_MODEL): v for k, v in text_sd.items() if not k.endswith("position_ids")}
    out = _convert(own, _clip_modules(_count_layers(own, "encoder.layers.")), True, "text encoder (CLIP-L)", "")
    return {CLIP_L + TEXT_MODEL + k: v for k, v in out.items()}


def _bigg_to_diffusers(state_dict: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    own = _strip(state_dict, prefix)
    if "text_projection" not in own:
        raise CheckpointError(
            f"text encoder 2 (bigG): the checkpoint lacks {prefix}text_projection, which gives SDXL its pooled "
            "text embedding; the file is incomplete"
        )
    projection = own["text_projection"]  # (width, proj): pooled = x @ text_projection
    _check_fused_qkv(own, prefix, "text encoder 2 (bigG)")
    body = _split_qkv({k: v for k, v in own.items() if k not in _OPENCLIP_DROPPED})
    modules = _openclip_modules(_count_layers(body, "transformer.resblocks."))
    out = _convert(body, modules, False, "text encoder 2 (bigG)", prefix)
    return {**{TEXT_MODEL + k: v for k, v in out.items()}, PROJECTION: projection.t().contiguous()}  # (proj, width)


def _bigg_to_original(text_sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    if PROJECTION not in text_sd:
        raise CheckpointError(
            f"text encoder 2: the state dict lacks {PROJECTION}; SDXL's second encoder is a "
            "CLIPTextModelWithProjection"
        )
    own = {k.removeprefix(TEXT_MODEL): v for k, v in text_sd.items()
           if k != PROJECTION and not k.endswith("position_ids")}
    modules = _openclip_modules(_count_layers(own, "encoder.layers."))
    out = _fuse_qkv(_convert(own, modules, True, "text encoder 2 (bigG)", ""))
    out["text_projection"] = text_sd[PROJECTION].t().contiguous()  # (width, proj)
    return {prefix + k: v for k, v in out.items()}


def _text_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Component name -> prefix of the text encoders the file holds: base CLIP-L + bigG, refiner bigG alone."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in state_dict)

    layout = {}
    if has(CLIP_L):
        layout["text_encoder"] = CLIP_L
    if has(BIGG):
        layout["text_encoder_2"] = BIGG
    if has(REFINER_BIGG):
        if layout:
            raise CheckpointError(
                f"the checkpoint has both {REFINER_BIGG}* (the refiner's bigG) and "
                f"{next(iter(layout.values()))}* (the base model's encoders); one file holds one model"
            )
        layout["text_encoder_2"] = REFINER_BIGG
    return layout


# Public API ----------------------------------------------------------------------------------------


def original_to_diffusers(state_dict: Mapping[str, torch.Tensor], configs: Mapping[str, Any]) -> dict[str, StateDict]:
    """An SDXL single-file state dict -> diffusers-named state dicts: "unet", "vae", "text_encoder"
    (base files only) and "text_encoder_2" (layouts in the module docstring).

    `configs`: component configs by name, diffusers dicts or ldmcore configs. "unet" and "vae" are needed
    (the U-Net's with addition_embed_type "text_time"); a "text_encoder" / "text_encoder_2" entry that is
    not None says the file must hold that encoder, and its num_hidden_layers is checked. Keys outside the
    models (model_ema.*, first_stage_model.loss.*, denoiser.*, ...) are ignored, as for SD files."""
    _refuse_other_formats(list(state_dict))
    if not is_sdxl(state_dict):
        raise CheckpointError(
            "not an SDXL checkpoint (no conditioner.embedders.* or model.diffusion_model.label_emb.* keys): "
            "an SD 1.x/2.x file reads with ldmcore.single_file.original_to_diffusers"
        )
    layout = _text_layout(state_dict)
    for name, prefix in (("text_encoder", CLIP_L), ("text_encoder_2", f"{BIGG} (or {REFINER_BIGG})")):
        if configs.get(name) is not None and name not in layout:
            raise CheckpointError(f"{name}: the configs expect it but the checkpoint has no {prefix}* keys")
    vae = {k: v for k, v in _strip(state_dict, VAE).items() if not k.startswith("loss.")}
    out = {
        "unet": _convert(_strip(state_dict, UNET), _unet_modules(configs["unet"]), False, "U-Net", UNET),
        "vae": _convert(vae, _vae_modules(configs["vae"]), False, "VAE", VAE),
    }
    if "text_encoder" in layout:
        out["text_encoder"] = _clip_to_diffusers(state_dict)
    if "text_encoder_2" not in layout:
        raise CheckpointError(f"the checkpoint has no second text encoder (no {BIGG}* or {REFINER_BIGG}* keys)")
    out["text_encoder_2"] = _bigg_to_diffusers(state_dict, layout["text_encoder_2"])
    for name in ("text_encoder", "text_encoder_2"):
        _check_layers(name, out.get(name), configs.get(name))
    return out


def diffusers_to_original(
    unet_sd: Mapping[str, torch.Tensor], vae_sd: Mapping[str, torch.Tensor],
    text_sds: Mapping[str, Mapping[str, torch.Tensor]], unet_config: Any, vae_config: Any,
) -> StateDict:
    """Diffusers-named state dicts -> one flat SDXL single-file state dict. `text_sds`: {"text_encoder":
    CLIP-L, "text_encoder_2": bigG} for the base model, {"text_encoder_2": bigG} alone for the refiner
    (written at the refiner's place, conditioner.embedders.0.model.); `text_model.` may be present or not."""
    unknown = sorted(set(text_sds) - {"text_encoder", "text_encoder_2"})
    if unknown or "text_encoder_2" not in text_sds:
        raise ValueError(f"text_sds: expected text_encoder_2 and optionally text_encoder, got {sorted(text_sds)}")
    unet = _convert(unet_sd, _unet_modules(unet_config), True, "U-Net", UNET)
    vae = _convert(vae_sd, _vae_modules(vae_config), True, "VAE", VAE)
    out = {**{UNET + k: v for k, v in unet.items()}, **{VAE + k: v for k, v in vae.items()}}
    if "text_encoder" in text_sds:
        out |= _clip_to_original(text_sds["text_encoder"])
        out |= _bigg_to_original(text_sds["text_encoder_2"], BIGG)
    else:
        out |= _bigg_to_original(text_sds["text_encoder_2"], REFINER_BIGG)
    return out


_KNOWN_CONTEXTS = {2048: "sdxl", 1280: "sdxl-refiner"}  # CLIP-L 768 + bigG 1280; bigG alone


def detect_sdxl(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What an SDXL single file is: detect_family's entries (family "sdxl" or "sdxl-refiner", text_kind
    None, cross_attention_dim, in_channels, inpainting, use_linear_projection, prediction_type None) plus
    projection_class_embeddings_input_dim and text_encoders, the text components present in the file.

    The family comes from where the text encoders are (as diffusers and ComfyUI do), else from the U-Net's
    context width; when the file has text encoders, their widths must add up to that context width."""
    layout = _text_layout(state_dict)
    conv_in = state_dict.get(UNET + "input_blocks.0.0.weight")
    label_emb = state_dict.get(UNET + "label_emb.0.0.weight")
    cross = _first_cross_attention(state_dict)
    if conv_in is None or label_emb is None or cross is None:
        raise CheckpointError(
            "an SDXL checkpoint without a whole U-Net: model.diffusion_model. lacks input_blocks.0.0 (conv_in), "
            "label_emb.0.0 (the added conditioning) or any cross-attention block (input_blocks.N.1)"
        )
    to_k, proj_in = cross
    context = to_k.shape[1]
    if layout:
        family = "sdxl-refiner" if layout.get("text_encoder_2") == REFINER_BIGG else "sdxl"
        widths = {name: _text_width(state_dict, name, prefix) for name, prefix in layout.items()}
        if sum(widths.values()) != context:
            parts = " + ".join(f"{name} {w}" for name, w in widths.items())
            raise CheckpointError(
                f"the U-Net cross-attends to width {context} but the text encoders give {parts}; "
                "the file mixes models of different sizes"
            )
    elif context in _KNOWN_CONTEXTS:
        family = _KNOWN_CONTEXTS[context]
    else:
        raise CheckpointError(
            f"an SDXL U-Net without text encoders whose context width {context} is neither the base model's "
            "(2048) nor the refiner's (1280); pass the model's configs (config=a diffusers folder)"
        )
    return {
        "family": family,
        "text_kind": None,
        "cross_attention_dim": context,
        "in_channels": conv_in.shape[1],
        "inpainting": conv_in.shape[1] == 9,  # noisy latent 4 + mask 1 + masked-image latent 4
        "use_linear_projection": proj_in.ndim == 2,
        "prediction_type": None,
        "projection_class_embeddings_input_dim": label_emb.shape[1],
        "text_encoders": tuple(layout),
    }


def _first_cross_attention(state_dict: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(attn2.to_k weight, proj_in weight) of the shallowest input block with a transformer."""
    blocks = sorted(
        int(k[len(UNET + "input_blocks.") :].split(".")[0])
        for k in state_dict
        if k.startswith(UNET + "input_blocks.") and k.endswith(".1.transformer_blocks.0.attn2.to_k.weight")
    )
    for n in blocks:
        proj_in = state_dict.get(f"{UNET}input_blocks.{n}.1.proj_in.weight")
        if proj_in is not None:
            return state_dict[f"{UNET}input_blocks.{n}.1.transformer_blocks.0.attn2.to_k.weight"], proj_in
    return None


def _text_width(state_dict: Mapping[str, torch.Tensor], name: str, prefix: str) -> int:
    key = prefix + _POSITIONS[name]
    positions = state_dict.get(key, state_dict.get(key.replace(TEXT_MODEL, "")))
    if positions is None:
        raise CheckpointError(f"{name}: the checkpoint lacks {key}; the file is incomplete")
    return positions.shape[-1]


def _check_layers(name: str, state: StateDict | None, config: Any) -> None:
    if state is None or config is None:
        return
    config = config.to_dict() if hasattr(config, "to_dict") else config
    want = config.get("num_hidden_layers")
    have = _count_layers({k.removeprefix(TEXT_MODEL): v for k, v in state.items()}, "encoder.layers.")
    if want is not None and want != have:
        raise CheckpointError(f"{name}: the checkpoint has {have} layers but the config expects {want}")
