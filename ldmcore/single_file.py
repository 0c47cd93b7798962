"""Renaming between diffusers parameter names and the original Stable Diffusion single-file layout.

An original (CompVis / Stability "ldm") checkpoint, the `.ckpt` / `.safetensors` file A1111 and ComfyUI
open, is one flat state dict holding three models under fixed prefixes: the U-Net under
`model.diffusion_model.`, the VAE under `first_stage_model.`, the text encoder under
`cond_stage_model.transformer.` (SD 1.x: Hugging Face CLIP names) or `cond_stage_model.model.` (SD 2.x:
OpenCLIP names). Converting is renaming plus two reshapes: the VAE's mid-block attention projections are
1x1 convolutions in the original and Linear layers in diffusers, and OpenCLIP fuses q, k and v into one
`in_proj` matrix.

SDXL files (Stability's "sgm" layout) share the U-Net and VAE tables here; their two text encoders and
the public functions for them are in single_file_sdxl.py. `detect_family` tells all of them apart.

Reading order: the renaming engine (a list of `_Module`s, each one submodule under its two names), the
tables per model, the public `original_to_diffusers` / `diffusers_to_original`, then `detect_family`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

import torch

from .weights import CheckpointError, preview_keys

UNET, VAE = "model.diffusion_model.", "first_stage_model."
SDXL_TEXT = "conditioner.embedders."  # where SDXL files keep their text encoders
TEXT_PREFIXES = {"clip": "cond_stage_model.transformer.", "openclip": "cond_stage_model.model."}
TextKind = Literal["clip", "openclip"]
StateDict = dict[str, torch.Tensor]

# The engine ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Module:
    diffusers: str
    original: str
    inner: tuple[tuple[str, str], ...] = ()  # (diffusers name, original name) below the module
    required: tuple[str, ...] = ("weight", "bias")  # diffusers names below it that must be present
    conv_1x1: tuple[str, ...] = ()  # diffusers Linear layers stored as (out, in, 1, 1) convs in the original


def _join(prefix: str, rest: str) -> str:
    return f"{prefix}.{rest}" if rest else prefix


def _rename_inner(rest: str, pairs: tuple[tuple[str, str], ...], to_original: bool) -> str:
    for diffusers_name, original_name in pairs:
        src, dst = (diffusers_name, original_name) if to_original else (original_name, diffusers_name)
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src) :]
    return rest


def _convert(state_dict: Mapping[str, torch.Tensor], modules: list[_Module], to_original: bool, what: str, prefix: str):
    """Rename every key of `state_dict` (without its single-file prefix) through `modules`.

    A key no module claims, or a required key that is absent, means the config does not describe the
    weights; both raise, naming the keys (with `prefix` when they are original keys)."""
    by_name = {(m.diffusers if to_original else m.original): m for m in modules}
    shown = "" if to_original else prefix
    where = f"the diffusers {what} state dict" if to_original else "the checkpoint"
    hint = f"check the {what} config (block_out_channels, layers_per_block, block types) against the weights"
    out, unclaimed = {}, []
    for key, tensor in state_dict.items():
        parts = key.split(".")
        owner = next((n for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in by_name), None)
        if owner is None:
            unclaimed.append(shown + key)
            continue
        m, rest = by_name[".".join(parts[:owner])], ".".join(parts[owner:])
        new_rest = _rename_inner(rest, m.inner, to_original)
        diffusers_rest = rest if to_original else new_rest
        if diffusers_rest.endswith(".weight") and diffusers_rest.removesuffix(".weight") in m.conv_1x1:
            tensor = tensor[:, :, None, None] if to_original else tensor.flatten(1)  # (o, i) <-> (o, i, 1, 1)
        out[_join(m.original if to_original else m.diffusers, new_rest)] = tensor
    if unclaimed:
        raise CheckpointError(f"{what}: the config does not describe {preview_keys(sorted(unclaimed))} in {where}; {hint}")
    expected = (
        _join(m.diffusers, r) if to_original else _join(m.original, _rename_inner(r, m.inner, True))
        for m in modules
        for r in m.required
    )
    missing = [shown + k for k in expected if k not in state_dict]
    if missing:
        raise CheckpointError(f"{what}: {where} lacks {preview_keys(missing)}, which the config expects; {hint}")
    return out


def _weights_and_biases(*names: str) -> tuple[str, ...]:
    return tuple(f"{n}.{p}" for n in names for p in ("weight", "bias"))


# The tables; pairs are (diffusers name, original name) -------------------------------------------

_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_VAE_RESNET = (("conv_shortcut", "nin_shortcut"),)  # norm1, conv1, norm2, conv2 keep their names
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
# q/k/v_proj are split from / fused into attn.in_proj_* around the renaming
_OPENCLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn", "attn"),
                   ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))
# OpenCLIP entries a text encoder does not use: the contrastive head and the causal-mask buffer.
_OPENCLIP_DROPPED = {"text_projection", "logit_scale", "attn_mask"}
_SHORTCUT = _weights_and_biases("conv_shortcut")
# what every block of a spatial transformer holds (the q, k, v projections have no bias)
_TRANSFORMER_BLOCK_NEEDS = (
    *_weights_and_biases("norm1", "norm2", "norm3", "attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"),
    *(f"attn{a}.to_{p}.weight" for a in (1, 2) for p in "qkv"),
)


def _read(config: Any, what: str, *keys: str) -> list[Any]:
    """The named entries of a diffusers config dict (or an ldmcore config), refusing what is absent."""
    config = config.to_dict() if hasattr(config, "to_dict") else config
    missing = [k for k in keys if k not in config]
    if missing:
        raise CheckpointError(f"{what} config: missing {', '.join(missing)}")
    if not isinstance(config["layers_per_block"], int):
        raise CheckpointError(f"{what} config: layers_per_block must be one integer, got {config['layers_per_block']!r}")
    return [config[k] for k in keys]


def _config_get(config: Any, key: str) -> Any:
    """An optional entry of a config dict or ldmcore config; None when absent."""
    config = config.to_dict() if hasattr(config, "to_dict") else config
    return config.get(key)


def _unet_modules(config: Any) -> list[_Module]:
    keys = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types")
    ch, per_level, down_types, up_types = _read(config, "U-Net", *keys)
    needs = _weights_and_biases("norm1", "conv1", "time_emb_proj", "norm2", "conv2")

    def resnet(d: str, o: str, shortcut: bool) -> _Module:
        return _Module(d, o, _UNET_RESNET, needs + (_SHORTCUT if shortcut else ()))

    depths = _config_get(config, "transformer_layers_per_block") or 1
    depths = tuple(depths) if isinstance(depths, (list, tuple)) else (depths,) * len(ch)

    def transformer(d: str, o: str, depth: int) -> _Module:  # spatial transformers keep every name below them
        blocks = tuple(f"transformer_blocks.{b}.{k}" for b in range(depth) for k in _TRANSFORMER_BLOCK_NEEDS)
        return _Module(d, o, required=("norm.weight", "norm.bias", "proj_in.weight", "proj_out.weight", *blocks))

    mods = [
        _Module("conv_in", "input_blocks.0.0"),
        _Module("time_embedding.linear_1", "time_embed.0"),
        _Module("time_embedding.linear_2", "time_embed.2"),
        resnet("mid_block.resnets.0", "middle_block.0", False),
        transformer("mid_block.attentions.0", "middle_block.1", depths[-1]),
        resnet("mid_block.resnets.1", "middle_block.2", False),
        _Module("conv_norm_out", "out.0"),
        _Module("conv_out", "out.2"),
    ]
    if _config_get(config, "addition_embed_type") == "text_time":  # SDXL's added conditioning MLP
        mods += [_Module("add_embedding.linear_1", "label_emb.0.0"), _Module("add_embedding.linear_2", "label_emb.0.2")]
    n = 1  # input_blocks.0 is conv_in; then one input block per resnet and per downsampler
    for i in range(len(ch)):
        for j in range(per_level):
            mods.append(resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", j == 0 and ch[max(i - 1, 0)] != ch[i]))
            if "CrossAttn" in down_types[i]:
                mods.append(transformer(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", depths[i]))
            n += 1
        if i < len(ch) - 1:
            mods.append(_Module(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{n}.0.op"))
            n += 1
    n = 0  # one output block per up resnet; the upsampler sits in the level's last one, after the attention
    for i in range(len(ch)):
        cross = "CrossAttn" in up_types[i]
        for j in range(per_level + 1):
            # up resnets read their input concatenated with a skip, so they always have a shortcut
            mods.append(resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", True))
            if cross:
                mods.append(transformer(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", depths[::-1][i]))
            n += 1
        if i < len(ch) - 1:
            mods.append(_Module(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{n - 1}.{2 if cross else 1}.conv"))
    return mods


def _vae_modules(config: Any) -> list[_Module]:
    ch, per_level = _read(config, "VAE", "block_out_channels", "layers_per_block")
    needs = _weights_and_biases("norm1", "conv1", "norm2", "conv2")

    def resnet(d: str, o: str, shortcut: bool) -> _Module:
        return _Module(d, o, _VAE_RESNET, needs + (_SHORTCUT if shortcut else ()))

    attention_needs = _weights_and_biases(*(d for d, _ in _VAE_ATTENTION))
    mods = [_Module("quant_conv", "quant_conv"), _Module("post_quant_conv", "post_quant_conv")]
    for c in ("encoder", "decoder"):
        mods += [
            _Module(f"{c}.conv_in", f"{c}.conv_in"),
            resnet(f"{c}.mid_block.resnets.0", f"{c}.mid.block_1", False),
            _Module(f"{c}.mid_block.attentions.0", f"{c}.mid.attn_1", _VAE_ATTENTION, attention_needs,
                    conv_1x1=("to_q", "to_k", "to_v", "to_out.0")),
            resnet(f"{c}.mid_block.resnets.1", f"{c}.mid.block_2", False),
            _Module(f"{c}.conv_norm_out", f"{c}.norm_out"),
            _Module(f"{c}.conv_out", f"{c}.conv_out"),
        ]
    for i in range(len(ch)):
        for j in range(per_level):
            shortcut = j == 0 and ch[max(i - 1, 0)] != ch[i]
            mods.append(resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", shortcut))
        if i < len(ch) - 1:
            mods.append(_Module(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
    rev = ch[::-1]
    for i in range(len(ch)):
        level = len(ch) - 1 - i  # the original numbers decoder levels by resolution, diffusers in order of use
        for j in range(per_level + 1):
            shortcut = j == 0 and rev[max(i - 1, 0)] != rev[i]
            mods.append(resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", shortcut))
        if i < len(ch) - 1:
            mods.append(_Module(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv"))
    return mods


def _openclip_modules(layers: int) -> list[_Module]:
    layer_needs = _weights_and_biases("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj",
                                      "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    return [
        _Module("embeddings.token_embedding", "token_embedding", required=("weight",)),
        _Module("embeddings.position_embedding.weight", "positional_embedding", required=("",)),
        _Module("final_layer_norm", "ln_final"),
        *(_Module(f"encoder.layers.{i}", f"transformer.resblocks.{i}", _OPENCLIP_LAYER, layer_needs) for i in range(layers)),
    ]


# The text encoder. Diffusers-side names are those of transformers' CLIPTextModel, which since transformers
# 5.6 has no `text_model.` level; keys that still carry it (diffusers folders on disk) are accepted.


def _strip(state_dict: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _count_layers(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    return 1 + max((int(k[len(prefix) :].split(".")[0]) for k in state_dict if k.startswith(prefix)), default=-1)


def _split_qkv(state_dict: StateDict) -> StateDict:
    """OpenCLIP's fused `attn.in_proj_{weight,bias}` (3c, ...) -> `attn.{q,k,v}_proj.{weight,bias}` (c, ...)."""
    out = {}
    for key, tensor in state_dict.items():
        head, sep, param = key.rpartition(".attn.in_proj_")
        if not sep:
            out[key] = tensor
            continue
        for name, part in zip("qkv", tensor.chunk(3, dim=0)):
            out[f"{head}.attn.{name}_proj.{param}"] = part.clone()  # own storage, so the dict can be saved
    return out


def _check_fused_qkv(state_dict: Mapping[str, torch.Tensor], prefix: str, what: str) -> None:
    """Name absent `attn.in_proj_*` as the file spells them (the split would only report q_proj missing)."""
    layers = _count_layers(state_dict, "transformer.resblocks.")
    missing = [f"{prefix}transformer.resblocks.{i}.attn.in_proj_{p}" for i in range(layers) for p in ("weight", "bias")
               if f"transformer.resblocks.{i}.attn.in_proj_{p}" not in state_dict]
    if missing:
        raise CheckpointError(f"{what}: the checkpoint lacks {preview_keys(missing)}; the file is incomplete")


def _fuse_qkv(state_dict: StateDict) -> StateDict:
    out = {}
    for key, tensor in state_dict.items():
        head, sep, param = key.rpartition(".attn.q_proj.")
        if sep:
            parts = [state_dict.get(f"{head}.attn.{name}_proj.{param}") for name in "qkv"]
            if any(p is None for p in parts):
                raise CheckpointError(f"text encoder: {head} has q_proj.{param} but not k_proj and v_proj")
            out[f"{head}.attn.in_proj_{param}"] = torch.cat(parts, dim=0)  # (3c, ...)
        elif ".attn.k_proj." not in key and ".attn.v_proj." not in key:
            out[key] = tensor
    return out


def _text_prefix(kind: str) -> str:
    if kind not in TEXT_PREFIXES:
        raise ValueError(f"text_kind must be 'clip' or 'openclip', got {kind!r}")
    return TEXT_PREFIXES[kind]


def _text_to_diffusers(state_dict: Mapping[str, torch.Tensor], kind: str, layers: int | None) -> StateDict:
    prefix = _text_prefix(kind)
    own = _strip(state_dict, prefix)
    if not own:
        other = next((k for k, p in TEXT_PREFIXES.items() if k != kind and any(s.startswith(p) for s in state_dict)), None)
        hint = f"; its text encoder is {other} (pass text_kind={other!r})" if other else ""
        raise CheckpointError(f"text encoder: the checkpoint has no {prefix}* keys{hint}")
    if kind == "clip":  # some older files have no `text_model.` level
        out = {k.removeprefix("text_model."): v for k, v in own.items()}
        out.pop("embeddings.position_ids", None)  # a constant buffer, not a weight
    else:
        _check_fused_qkv(own, prefix, "text encoder")
        own = _split_qkv({k: v for k, v in own.items() if k not in _OPENCLIP_DROPPED})
        out = _convert(own, _openclip_modules(_count_layers(own, "transformer.resblocks.")), False, "text encoder", prefix)
    have = _count_layers(out, "encoder.layers.")
    if layers is None or layers == have:
        return out
    if layers > have:
        raise CheckpointError(f"text encoder: the checkpoint has {have} layers but the config expects {layers}")
    # SD 2.x conditions on OpenCLIP's penultimate layer, so diffusers' text encoder keeps 23 of its 24.
    return {k: v for k, v in out.items() if not (k.startswith("encoder.layers.") and int(k.split(".")[2]) >= layers)}


def _text_to_original(text_sd: Mapping[str, torch.Tensor], kind: str) -> StateDict:
    prefix, own = _text_prefix(kind), {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    if kind == "clip":
        return {f"{prefix}text_model.{k}": v for k, v in own.items()}
    out = _fuse_qkv(_convert(own, _openclip_modules(_count_layers(own, "encoder.layers.")), True, "text encoder", ""))
    return {prefix + k: v for k, v in out.items()}


# Public API ----------------------------------------------------------------------------------------


def original_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], unet_config: Any, vae_config: Any,
    text_kind: TextKind, text_layers: int | None = None,
) -> dict[str, StateDict]:
    """An original single-file state dict -> {"unet", "vae", "text_encoder"}: diffusers-named state dicts.

    The configs are diffusers config dicts (or ldmcore configs); the U-Net's needs block_out_channels,
    layers_per_block, down_block_types and up_block_types, the VAE's the first two. `text_layers` is the
    target text encoder's num_hidden_layers: extra trailing layers in the file are dropped. Keys outside
    the three models (model_ema.*, alphas_cumprod, betas, ...) are ignored."""
    _refuse_other_formats(list(state_dict))
    if is_sdxl(state_dict):
        raise CheckpointError(
            "this is an SDXL (sgm layout) checkpoint, not SD 1.x/2.x: read it with "
            "ldmcore.single_file_sdxl.original_to_diffusers (load_components does so)"
        )
    # first_stage_model.loss.* is the autoencoder's training loss (LPIPS, discriminator), not the VAE
    vae = {k: v for k, v in _strip(state_dict, VAE).items() if not k.startswith("loss.")}
    return {
        "unet": _convert(_strip(state_dict, UNET), _unet_modules(unet_config), False, "U-Net", UNET),
        "vae": _convert(vae, _vae_modules(vae_config), False, "VAE", VAE),
        "text_encoder": _text_to_diffusers(state_dict, text_kind, text_layers),
    }


def diffusers_to_original(
    unet_sd: Mapping[str, torch.Tensor], vae_sd: Mapping[str, torch.Tensor], text_sd: Mapping[str, torch.Tensor],
    unet_config: Any, vae_config: Any, text_kind: TextKind,
) -> StateDict:
    """Diffusers-named state dicts -> one flat original single-file state dict. The text encoder is written
    as given: an SD 2.x encoder with 23 layers gives 23 resblocks, and no text_projection."""
    text = _text_to_original(text_sd, text_kind)
    unet = _convert(unet_sd, _unet_modules(unet_config), True, "U-Net", UNET)
    vae = _convert(vae_sd, _vae_modules(vae_config), True, "VAE", VAE)
    return {**{UNET + k: v for k, v in unet.items()}, **{VAE + k: v for k, v in vae.items()}, **text}


_CONTEXT_DIMS = {768: "sd1", 1024: "sd2"}  # width of the text encoder the U-Net cross-attends to


def is_sdxl(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether an original single file is SDXL's (sgm) layout: text encoders under `conditioner.embedders.`,
    or the U-Net's added-conditioning MLP `label_emb`."""
    return any(k.startswith((SDXL_TEXT, UNET + "label_emb.")) for k in state_dict)


def detect_family(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What an original single-file checkpoint is, from its keys and shapes.

    Returns family ("sd1" | "sd2" | "sdxl" | "sdxl-refiner"), text_kind ("clip" | "openclip" | None when
    the file has no text encoder; always None for SDXL, whose encoders the family fixes),
    cross_attention_dim, in_channels, inpainting, use_linear_projection, and prediction_type None: epsilon
    and v-prediction files have the same keys, so the caller must say which (SD 2.x 768px models predict
    v). SDXL files add projection_class_embeddings_input_dim and text_encoders (the components present);
    see single_file_sdxl.detect_sdxl."""
    _refuse_other_formats(list(state_dict))
    if is_sdxl(state_dict):
        from .single_file_sdxl import detect_sdxl

        return detect_sdxl(state_dict)
    conv_in = state_dict.get(UNET + "input_blocks.0.0.weight")
    to_k = state_dict.get(UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    proj_in = state_dict.get(UNET + "input_blocks.1.1.proj_in.weight")
    if conv_in is None or to_k is None or proj_in is None:
        raise CheckpointError(
            "not a Stable Diffusion 1.x/2.x U-Net: model.diffusion_model. lacks input_blocks.0.0 (conv_in) "
            "or the first cross-attention block, input_blocks.1.1"
        )
    context_dim = to_k.shape[1]
    family = _CONTEXT_DIMS.get(context_dim)
    if family is None:
        raise CheckpointError(f"cross-attention context width {context_dim} matches neither SD 1.x (768) nor SD 2.x (1024)")
    text_kind = next((k for k, p in TEXT_PREFIXES.items() if any(s.startswith(p) for s in state_dict)), None)
    if text_kind not in (None, {"sd1": "clip", "sd2": "openclip"}[family]):
        raise CheckpointError(f"the U-Net is {family} (context width {context_dim}) but the text encoder is {text_kind}")
    return {
        "family": family,
        "text_kind": text_kind,
        "cross_attention_dim": context_dim,
        "in_channels": conv_in.shape[1],
        "inpainting": conv_in.shape[1] == 9,  # noisy latent 4 + mask 1 + masked-image latent 4
        "use_linear_projection": proj_in.ndim == 2,
        "prediction_type": None,
    }


def _refuse_other_formats(keys: list[str]) -> None:
    """Files often passed as a single-file checkpoint by mistake, with what to do instead."""
    lora = [k for k in keys if "lora" in k.lower()]
    if lora:
        raise CheckpointError(
            f"this looks like a LoRA file ({len(lora)} keys such as {lora[0]!r}), not a full checkpoint: "
            "load a base model and apply the LoRA to it as an adapter"
        )
    if any(k.startswith(UNET) for k in keys):
        return
    diffusers_like = [k for k in keys if {"down_blocks", "up_blocks", "mid_block", "text_model"} & set(k.split(".")[:2])]
    if diffusers_like:
        raise CheckpointError(
            f"this looks like a diffusers-layout state dict (keys such as {diffusers_like[0]!r}), not an original "
            "single-file checkpoint: load it as a diffusers model folder (from_pretrained) instead"
        )
    raise CheckpointError(f"no model.diffusion_model.* keys, so not a Stable Diffusion checkpoint; keys: {preview_keys(keys)}")


def unet_module_names(config: Any) -> dict[str, str]:
    """diffusers module name -> original (sgm / ldm) module name, for every U-Net module the renaming tables
    know, ResNet layers included (`down_blocks.0.resnets.0.conv1` -> `input_blocks.1.0.in_layers.2`). Names
    below a spatial transformer are the same on both sides. For files that name modules, not weights (LoRA)."""
    names = {}
    for m in _unet_modules(config):
        names[m.diffusers] = m.original
        names.update({f"{m.diffusers}.{d}": f"{m.original}.{o}" for d, o in m.inner})
    return names
