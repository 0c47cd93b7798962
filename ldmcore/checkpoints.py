"""Whole models on disk: a diffusers-layout folder or an original single-file checkpoint, both ways.

`load_components(path)` accepts either and returns the same `Components`; `Components` saves to
either. Single files written here carry their component configs in the safetensors metadata, so
they load back exactly; foreign single files are recognised from their keys (see single_file.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from .family import SD, SDXL_BASE, Family, family_of_pipeline, get_family
from .flow import FlowMatchSchedule
from .presets import SD15, SD21, Preset, get_preset
from .schedule import NoiseSchedule
from .single_file import TEXT_PREFIXES, detect_family
from .vae import AutoencoderKL
from .weights import CheckpointError, read_state_dict, write_safetensors

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
METADATA_KEY = "ldm_tune.components"  # JSON of the component configs in single files we write
TEXT_PREFIX = "text_model."  # the layout transformers 4.x writes and 5.x still reads
PROJECTION = "text_projection."  # CLIPTextModelWithProjection's projection, beside text_model
ALL_TEXT_PARTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
# transformers text model class -> (its config class, its tokenizer class)
TEXT_CLASSES = {
    "CLIPTextModel": ("CLIPTextConfig", "CLIPTokenizer"),
    "CLIPTextModelWithProjection": ("CLIPTextConfig", "CLIPTokenizer"),
    "T5EncoderModel": ("T5Config", "T5TokenizerFast"),
}


@dataclasses.dataclass
class Components:
    """The parts of a latent diffusion model, loaded and ready. The denoiser is the family's (a U-Net,
    Flux's transformer), and so are the objective (`schedule`) and the text encoders
    (`family.text_parts`): SD 1.x/2.x one, SDXL two, the SDXL refiner only the second, Flux CLIP-L and T5."""

    denoiser: torch.nn.Module  # ldmcore.unet.UNet or ldmcore.flux.FluxTransformer
    vae: AutoencoderKL
    text_encoder: torch.nn.Module | None  # transformers.CLIPTextModel (None for the SDXL refiner)
    tokenizer: Any  # transformers.CLIPTokenizer
    schedule: NoiseSchedule | FlowMatchSchedule
    text_kind: str = "clip"  # SD 1.x/2.x single files: how the text encoder is written, "clip" or "openclip"
    # SDXL: transformers.CLIPTextModelWithProjection (CLIP-bigG); Flux: transformers.T5EncoderModel
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: Any = None
    family: Family = SD

    @classmethod
    def from_preset(cls, preset: str | Preset, tokenizer, seed: int = 0, tokenizer_2=None) -> Components:
        """Freshly initialised components of a family (weights random, as for training from scratch).
        Text encoders' vocabularies are sized to their tokenizers; SDXL's second tokenizer defaults to
        the first one padding with "!", as SDXL's does, Flux's T5 tokenizer to one knowing the first's words."""
        preset = get_preset(preset) if isinstance(preset, str) else preset
        family = get_family(preset.family)
        torch.manual_seed(seed)
        if tokenizer_2 is None:
            tokenizer_2 = fresh_tokenizer_2(family, tokenizer, preset.text_encoder_2)
        tokenizers = {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2}
        configs = {"text_encoder": preset.text_encoder, "text_encoder_2": preset.text_encoder_2}
        # drawn in this order (denoiser, VAE, text encoders) so that a seed gives the weights it always gave
        denoiser = family.denoiser_class().from_config(dict(preset.denoiser)).eval()
        vae = AutoencoderKL.from_config(dict(preset.vae)).eval()
        encoders = {name: _new_text_encoder(kind, configs[name], tokenizers[tok]) for name, tok, kind in family.text_parts}
        return cls(
            denoiser=denoiser,
            vae=vae,
            text_encoder=encoders.get("text_encoder"),
            tokenizer=tokenizers["tokenizer"] if "text_encoder" in encoders else None,
            schedule=family.schedule_class().from_config(preset.scheduler),
            text_kind=preset.text_kind,
            text_encoder_2=encoders.get("text_encoder_2"),
            tokenizer_2=tokenizer_2,
            family=family,
        )

    def prompt_encoder(self, clip_skip: int = 0, max_windows: int = 3) -> torch.nn.Module:
        """The family's text conditioning: a module, prompts -> {"hidden", ["pooled"]}."""
        return self.family.prompt_encoder(self, clip_skip=clip_skip, max_windows=max_windows)

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The text encoders by component name, in the family's order."""
        return {name: getattr(self, name) for name, _, _ in self.family.text_parts}

    @property
    def models(self) -> list[torch.nn.Module]:
        return [self.denoiser, self.vae, *self.text_encoders.values()]

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Components:
        for model in self.models:
            model.to(device=device, dtype=dtype)
        return self

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # -- saving -------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write a diffusers pipeline folder (diffusers' from_pretrained loads it), atomically."""
        folder = Path(folder)
        family = self.family
        with _atomic_dir(folder) as tmp:
            self.denoiser.save_pretrained(tmp / family.denoiser_name)
            self.vae.save_pretrained(tmp / "vae")
            for name, tok, _ in family.text_parts:
                _save_text_encoder(getattr(self, name), tmp / name)
                _save_tokenizer(getattr(self, tok), tmp / tok)
            (tmp / "scheduler").mkdir()
            sched = {"_class_name": family.scheduler_class, **self.schedule.to_config()}
            (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
            inpainting = getattr(self.denoiser.config, "in_channels", 4) == 9
            index = {
                "_class_name": family.inpaint_pipeline_class if inpainting else family.pipeline_class,
                # diffusers reads inpainting folders of version <= 0.5.1 as its legacy pipeline; the
                # layout written here is the current one
                "_diffusers_version": "0.30.0",
                family.denoiser_name: ["diffusers", self.denoiser.config._class_name],
                "vae": ["diffusers", "AutoencoderKL"],
                "scheduler": ["diffusers", family.scheduler_class],
            }
            kinds = {name: kind for name, _, kind in family.text_parts}
            for name, tok in ALL_TEXT_PARTS:
                kind = kinds.get(name)
                if kind or family is not SD:  # SD folders name only their one text encoder
                    index[name] = ["transformers", kind] if kind else [None, None]
                    index[tok] = ["transformers", TEXT_CLASSES[kind][1]] if kind else [None, None]
            if family is SD:
                index |= {"safety_checker": [None, None], "feature_extractor": [None, None],
                          "requires_safety_checker": False}
            index |= family.pipeline_options
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    def save_single_file(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write an original-layout single .safetensors file (A1111, ComfyUI and diffusers'
        from_single_file open it), atomically. Our own configs ride along in its metadata."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: single files are written as .safetensors only")
        family = self.family
        state = family.to_original(self)
        state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in state.items()}
        meta = {
            "family": family.name,
            family.denoiser_name: self.denoiser.config.to_dict(),
            **({} if family.single_file_denoiser_only else {
                "vae": self.vae.config.to_dict(),
                **{name: _text_config_dict(model) for name, model in self.text_encoders.items()}}),
            "scheduler": self.schedule.to_config(),
            "text_kind": self.text_kind,
        }
        write_safetensors(state, path, {METADATA_KEY: json.dumps(meta)})


# -- loading ---------------------------------------------------------------------------------------


def load_components(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    *,
    tokenizer: str | os.PathLike | Any | None = None,
    prediction_type: str | None = None,
    config: str | os.PathLike | None = None,
) -> Components:
    """Load a diffusers-layout folder or an original single-file checkpoint.

    `tokenizer` is needed only for foreign single files, which do not contain one: a tokenizer
    folder or object (by default a `tokenizer/` folder beside the file is used). `prediction_type`
    overrides the schedule's; single files cannot say whether they predict noise or v. `config`
    is a diffusers model folder whose configs describe a single file of a non-standard architecture.
    """
    path = Path(path)
    if path.is_dir():
        parts = _load_folder(path, dtype, device)
    elif path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        parts = _load_single_file(path, dtype, device, tokenizer, prediction_type, config)
    elif path.exists():
        raise CheckpointError(f"{path}: expected a diffusers model folder or a {'/'.join(SINGLE_FILE_SUFFIXES)} file")
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    if prediction_type is not None:
        parts.schedule = dataclasses.replace(parts.schedule, prediction_type=prediction_type)
    return parts


def _load_folder(folder: Path, dtype, device, skip_denoiser: bool = False) -> Components:
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    if index:
        flux_config = folder / "transformer" / "config.json"
        family = family_of_pipeline(index, json.loads(flux_config.read_text()) if flux_config.is_file() else None)
    else:
        family = SDXL_BASE if (folder / "text_encoder_2").is_dir() else SD
    needed = [*([] if skip_denoiser else [family.denoiser_name]), "vae",
              *(name for part in family.text_parts for name in part[:2])]
    missing = [name for name in needed if not (folder / name).is_dir()]
    if missing:
        hint = ""
        cfg = folder / "config.json"
        if cfg.is_file():
            kind = json.loads(cfg.read_text()).get("_class_name", "a single component")
            hint = f"; this is {kind} folder: point to the model folder above it, which holds {', '.join(needed)}"
        raise CheckpointError(f"{folder}: missing {', '.join(m + '/' for m in missing)} for {family.title}{hint}")
    sched_file = folder / "scheduler" / "scheduler_config.json"
    schedule_class = family.schedule_class()
    if sched_file.is_file():
        schedule = schedule_class.from_config(json.loads(sched_file.read_text()), source=str(sched_file))
    elif family is SD:
        log.warning("%s: no scheduler/scheduler_config.json; using the SD 1.x noise schedule", folder)
        schedule = NoiseSchedule.from_config(SD15.scheduler)
    else:
        raise CheckpointError(f"{folder}: no scheduler/scheduler_config.json, which {family.title} needs")
    denoiser = None if skip_denoiser else family.denoiser_class().from_pretrained(folder / family.denoiser_name, dtype,
                                                                                 device)
    vae = AutoencoderKL.from_pretrained(folder / "vae", dtype, device)
    te_kwargs = {"dtype": dtype} if dtype is not None else {}
    parts: dict[str, Any] = {}
    for name, tok, kind in family.text_parts:
        try:
            parts[name] = _text_model_class(kind).from_pretrained(folder / name, **te_kwargs).to(device).eval()
            parts[tok] = _tokenizer_class(kind).from_pretrained(folder / tok)
        except pickle.UnpicklingError as e:  # transformers reads .bin weights with weights_only=True
            raise CheckpointError(f"{folder / name}: refused to unpickle its weights: the file holds more than plain "
                                  f"weights ({str(e).splitlines()[-1][:160]}). Convert it to safetensors with a tool "
                                  "you trust") from None
        except (OSError, ValueError) as e:  # transformers' errors for missing or unreadable files
            raise CheckpointError(f"{folder}: could not load {name}/ or {tok}/: {e}") from e
    text_kind = "clip"
    if family is SD and parts["text_encoder"].config.hidden_size == SD21.text_encoder["hidden_size"]:
        text_kind = "openclip"
    return Components(denoiser=denoiser, vae=vae, text_encoder=parts.get("text_encoder"),
                      tokenizer=parts.get("tokenizer"), schedule=schedule, text_kind=text_kind,
                      text_encoder_2=parts.get("text_encoder_2"), tokenizer_2=parts.get("tokenizer_2"), family=family)


def _load_single_file(path: Path, dtype, device, tokenizer, prediction_type, config) -> Components:
    state = read_state_dict(path)
    from .single_file_flux import detect_flux

    flux = detect_flux(state)
    if flux is not None:
        return _load_flux_file(path, state, flux, dtype, device, config)
    if config is not None:
        configs = _configs_from_folder(Path(config), state)
    else:
        configs = _configs_from_metadata(path) or _configs_for_foreign_file(path, state, prediction_type)
    family = get_family(configs.get("family", "sd"))
    try:
        weights = family.from_original(state, configs)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    key = family.denoiser_name
    denoiser = _build(family.denoiser_class(), configs[key], weights[key], f"{path} ({key})", dtype, device)
    vae = _build(AutoencoderKL, configs["vae"], weights["vae"], f"{path} (VAE)", dtype, device)
    parts: dict[str, Any] = {}
    for name, tok, kind in family.text_parts:
        parts[name] = _build_text_encoder(kind, configs[name], weights[name], f"{path} ({name})", dtype, device)
        parts[tok] = _find_tokenizer(path, tokenizer, tok, second=tok == "tokenizer_2")
    return Components(
        denoiser=denoiser,
        vae=vae,
        text_encoder=parts.get("text_encoder"),
        tokenizer=parts.get("tokenizer"),
        schedule=family.schedule_class().from_config(configs["scheduler"]),
        text_kind=configs.get("text_kind", "clip"),
        text_encoder_2=parts.get("text_encoder_2"),
        tokenizer_2=parts.get("tokenizer_2"),
        family=family,
    )


def _load_flux_file(path: Path, state: dict, found: dict, dtype, device, config) -> Components:
    """A Flux.1 transformer file (Black Forest Labs' layout, or a ComfyUI checkpoint's model part): the
    VAE, text encoders, tokenizers and scheduler come from a diffusers Flux folder (`config`)."""
    from .family import FLUX_DEV, FLUX_SCHNELL
    from .single_file_flux import config_from_original

    family = FLUX_DEV if found["guidance_embeds"] else FLUX_SCHNELL
    if config is None:
        raise CheckpointError(
            f"{path}: a {family.title} transformer file holds no VAE, text encoders or tokenizers; they ship "
            "separately. Pass config=FOLDER (model.config in a training config): a diffusers Flux folder holding "
            "vae/, text_encoder/ (CLIP-L), text_encoder_2/ (T5-XXL), tokenizer/, tokenizer_2/ and scheduler/ "
            f"(for example a download of black-forest-labs/{family.title.replace('Flux.1', 'FLUX.1')}); its "
            "transformer/ is not read"
        )
    folder = Path(config)
    rest = _load_folder(folder, dtype, device, skip_denoiser=True)
    if rest.family not in (FLUX_DEV, FLUX_SCHNELL):
        raise CheckpointError(f"config={folder}: a {rest.family.title} folder; a Flux transformer file needs a Flux "
                              "folder's VAE, text encoders and scheduler")
    folder_config = folder / "transformer" / "config.json"
    folder_transformer = json.loads(folder_config.read_text()) if folder_config.is_file() else {}
    # dev embeds the guidance and shifts its sigmas by resolution; schnell does neither
    folder_dev = folder_transformer.get("guidance_embeds", rest.schedule.use_dynamic_shifting)
    if folder_dev != found["guidance_embeds"]:
        other = FLUX_DEV if folder_dev else FLUX_SCHNELL
        raise CheckpointError(
            f"{path}: {family.title} weights ({'with' if found['guidance_embeds'] else 'without'} a guidance "
            f"embedding) with {other.title}'s settings (config={folder}: "
            f"{'its transformer config' if folder_transformer else 'its scheduler'} is {other.title}'s). "
            f"Pass a {family.title} folder as config"
        )
    axes = folder_transformer.get("axes_dims_rope")
    meta = _configs_from_metadata(path) or {}
    transformer_config = meta.get(family.denoiser_name) or config_from_original(state, axes_dims_rope=axes)
    try:
        weights = family.from_original(state, {family.denoiser_name: transformer_config})
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    key = family.denoiser_name
    rest.denoiser = _build(family.denoiser_class(), transformer_config, weights[key], f"{path} ({key})", dtype, device)
    rest.family = family
    return rest


def _configs_from_metadata(path: Path) -> dict[str, Any] | None:
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None


def _configs_for_foreign_file(path: Path, state: dict[str, torch.Tensor], prediction_type: str | None) -> dict:
    found = detect_family(state)
    if found["family"] in ("sdxl", "sdxl-refiner"):
        preset = get_preset(found["family"])
    elif found["family"] == "sd1":
        preset = SD15
    else:
        # SD 2.x files do not say whether they are the 768 px v-prediction model or the 512 px base.
        preset = get_preset("sd21" if prediction_type in (None, "v_prediction") else "sd21-base")
        if prediction_type is None:
            log.warning(
                "%s: an SD 2.x checkpoint; assuming the 768 px v-prediction model. "
                "Pass prediction_type='epsilon' for a 512 px base model.",
                path,
            )
    family = get_family(preset.family)
    configs = {
        "family": family.name,
        "unet": {**preset.denoiser, "in_channels": found["in_channels"]},
        "vae": preset.vae,
        "scheduler": preset.scheduler,
        "text_kind": found.get("text_kind") or preset.text_kind,
    }
    for name, _, _ in family.text_parts:
        configs[name] = dict(getattr(preset, name))
    if family is SD:
        token_emb = _find_key(state, "token_embedding.weight")
        if token_emb is not None:
            configs["text_encoder"]["vocab_size"] = token_emb.shape[0]
    return configs


def _configs_from_folder(folder: Path, state: dict[str, torch.Tensor]) -> dict:
    """Configs of a diffusers model folder, used to read a single file of the same architecture."""
    def read(*parts: str) -> dict:
        f = folder.joinpath(*parts)
        if not f.is_file():
            raise CheckpointError(f"config={folder}: no {'/'.join(parts)}; pass a diffusers model folder")
        return json.loads(f.read_text())

    index = folder / "model_index.json"
    family = family_of_pipeline(json.loads(index.read_text())) if index.is_file() else SD
    unet = read("unet", "config.json")
    conv_in = state.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != unet.get("in_channels", 4):
        # an inpainting (9-channel) file read with its base model's folder: the file says how wide it is
        log.info("%s: in_channels %s, as the checkpoint's conv_in has", folder, conv_in.shape[1])
        unet = {**unet, "in_channels": conv_in.shape[1]}
    configs = {
        "family": family.name,
        "unet": unet,
        "vae": read("vae", "config.json"),
        "scheduler": read("scheduler", "scheduler_config.json"),
        "text_kind": next((kind for kind, prefix in TEXT_PREFIXES.items() if any(k.startswith(prefix) for k in state)), "clip"),
    }
    for name, _, _ in family.text_parts:
        configs[name] = _text_config_dict_from(read(name, "config.json"))
    return configs


def _text_config_dict_from(raw: dict) -> dict:
    return {k: v for k, v in raw.items() if k in _TEXT_CONFIG_KEYS and v is not None}


def _find_key(state: dict[str, torch.Tensor], suffix: str) -> torch.Tensor | None:
    return next((v for k, v in state.items() if k.startswith("cond_stage_model.") and k.endswith(suffix)), None)


def _build(cls, config: dict, state: dict, source: str, dtype, device):
    from .weights import load_strict

    with torch.device("meta"):
        model = cls.from_config(dict(config))
    model.to_empty(device=device)
    load_strict(model, state, source)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _text_model_class(kind: str):
    import transformers

    return getattr(transformers, kind)  # a transformers text model class named in family.text_parts


def _tokenizer_class(kind: str):
    import transformers

    return getattr(transformers, TEXT_CLASSES[kind][1])


def _text_config(kind: str, config: dict):
    import transformers

    return getattr(transformers, TEXT_CLASSES[kind][0])(**config)


def _new_text_encoder(kind: str, config: dict, tokenizer) -> torch.nn.Module:
    """A freshly initialised text encoder whose vocabulary and special tokens are the tokenizer's."""
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if TEXT_CLASSES[kind][1] == "CLIPTokenizer":
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    return _text_model_class(kind)(_text_config(kind, {**config, "vocab_size": len(tokenizer), **special})).eval()


def _build_text_encoder(kind: str, config: dict, state: dict, source: str, dtype, device):
    from .weights import load_strict

    model = _text_model_class(kind)(_text_config(kind, config))
    load_strict(model, _fit_text_keys(state, model), source)
    return model.to(device=device, dtype=dtype).eval()


def _fit_text_keys(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Match the `text_model.` nesting to the installed transformers (4.x has it in CLIPTextModel,
    5.x does not; CLIPTextModelWithProjection has it in both, beside `text_projection`)."""
    nested = next(iter(model.state_dict())).startswith(TEXT_PREFIX)
    out = {}
    for k, v in state.items():
        if k.startswith(PROJECTION):
            out[k] = v
            continue
        bare = k[len(TEXT_PREFIX) :] if k.startswith(TEXT_PREFIX) else k
        out[TEXT_PREFIX + bare if nested else bare] = v
    # position_ids is a buffer in some transformers versions and absent in others
    own = model.state_dict()
    return {k: v for k, v in out.items() if k in own or not k.endswith("position_ids")}


def _is_clip(model: torch.nn.Module) -> bool:
    return getattr(model.config, "model_type", "").startswith("clip")


def text_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A text encoder's weights in the canonical layout, without buffers: `text_model.*`, and
    `text_projection.weight` for CLIPTextModelWithProjection."""
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    return {k if k.startswith((TEXT_PREFIX, PROJECTION)) else TEXT_PREFIX + k: v for k, v in sd.items()}


_TEXT_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "projection_dim", "bos_token_id", "eos_token_id", "pad_token_id",
)


def _text_config_dict(model: torch.nn.Module) -> dict[str, Any]:
    return _text_config_dict_from(model.config.to_dict())


def _save_text_encoder(model: torch.nn.Module, folder: Path) -> None:
    if not _is_clip(model):  # T5: transformers' own layout, which writes its tied embedding once
        model.save_pretrained(str(folder))
        return
    folder.mkdir(parents=True)
    model.config.to_json_file(str(folder / "config.json"))
    write_safetensors(text_state_dict(model), folder / "model.safetensors")


def _save_tokenizer(tokenizer, folder: Path) -> None:
    """tokenizer.json for fast tokenizers, plus vocab.json and merges.txt that the slow
    CLIPTokenizer of older transformers needs."""
    tokenizer.save_pretrained(str(folder))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") == "BPE" and not (folder / "vocab.json").exists():
        (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def fresh_tokenizer_2(family: Family, tokenizer, config: Mapping[str, Any] | None = None):
    """The second tokenizer of a fresh model of `family` whose first is `tokenizer`: SDXL's the same
    vocabulary padding with "!", Flux's a T5 tokenizer knowing the first's words, reading at most the
    T5 config's `n_positions` tokens (the family's length where that is shorter); None without one."""
    kinds = {tok: kind for _, tok, kind in family.text_parts}
    if kinds.get("tokenizer_2") == "T5EncoderModel":
        from .text_flux import t5_tokenizer_like

        return t5_tokenizer_like(tokenizer, model_max_length=(config or {}).get("n_positions", 512))
    return second_tokenizer(tokenizer) if "tokenizer_2" in kinds else None


def second_tokenizer(tokenizer):
    """SDXL's second tokenizer: the same CLIP vocabulary, padding with "!" instead of the end token."""
    import copy

    tok = copy.deepcopy(tokenizer)
    if "!" in tok.get_vocab():
        tok.pad_token = "!"
    return tok


def _find_tokenizer(path: Path, given, name: str = "tokenizer", second: bool = False):
    """A single file's tokenizer: `given` (an object, a tokenizer folder or a model folder holding
    `name/`), else `name/` beside the file. SDXL's second tokenizer falls back to the first one's
    vocabulary padding with "!", which is what it is."""
    from transformers import CLIPTokenizer

    if given is not None and not isinstance(given, (str, os.PathLike)):
        return second_tokenizer(given) if second else given
    if given is not None:  # a tokenizer folder, or a model folder holding `name/`
        candidates = [Path(given) / name] + ([Path(given)] if name == "tokenizer" else [])
    else:
        candidates = [path.parent / name, path.with_suffix("") / name]
    for folder in candidates:
        if (folder / "tokenizer_config.json").is_file() or (folder / "vocab.json").is_file():
            return CLIPTokenizer.from_pretrained(str(folder))
    if second:
        return second_tokenizer(_find_tokenizer(path, given, "tokenizer"))
    raise CheckpointError(
        f"{path}: single-file checkpoints carry no tokenizer. Pass tokenizer=FOLDER (for example the tokenizer/ "
        "folder of any SD 1.x, 2.x or SDXL diffusers model; the CLIP vocabulary is the same) or put a tokenizer/ "
        f"folder beside the file (looked in: {', '.join(str(c) for c in candidates)})"
    )


class _atomic_dir:
    """Build a folder under a temporary name and move it into place only when complete."""

    def __init__(self, target: Path):
        self.target = target

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.target, old)
            os.replace(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.target)
        return False
