"""Model families: what differs between Stable Diffusion 1.x/2.x and SDXL, one small class each.

Everything outside this file asks the family of a model (`components.family`) and never looks at
the architecture:

- text conditioning: `prompt_encoder(parts, ...)` turns prompts into a `TextConditioning`, a dict
  of batch-first tensors: `hidden` (b, tokens, width) always, `pooled` (b, width) where the family
  conditions on a pooled vector. The cache stores exactly this dict per caption.
- the empty prompt (caption dropout, an empty negative prompt): `empty_text(encoded)`; SDXL was
  trained with zeros there, SD 1.x/2.x with the encoded empty string.
- micro-conditioning: `size_ids(original, crop_top_left, target)` for a picture; SDXL's
  six numbers, nothing for SD. Training takes them from each picture's own bucket transform,
  generation from the asked size (`generation_ids`).
- the denoiser call: `denoiser_inputs(text, ids)` -> the U-Net's (and the ControlNet's) keyword
  inputs after (sample, timestep).
- the files: the diffusers pipeline and scheduler class names, which text encoders and tokenizers
  a folder holds, and the original single-file layout (`from_original`, `to_original`).

The noise schedule and its prediction target (epsilon / v) are the schedule's (`NoiseSchedule`),
read from the model's scheduler config: both families here share the discrete DDPM objective.
A family is stateless: one instance per class, found by name in `FAMILIES`.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import torch

TextConditioning = dict[str, torch.Tensor]  # "hidden" (b, tokens, width), optionally "pooled" (b, width)


class Family:
    """What every family says; one subclass per family, one instance each (`FAMILIES`)."""

    name: ClassVar[str]
    title: ClassVar[str]
    pipeline_class: ClassVar[str]  # diffusers pipeline in model_index.json
    inpaint_pipeline_class: ClassVar[str]  # ... for a 9-channel U-Net
    scheduler_class: ClassVar[str]  # the scheduler a saved folder names
    #: (component, tokenizer, transformers class) for every text encoder, in the order the hidden
    #: states are concatenated
    text_parts: ClassVar[tuple[tuple[str, str, str], ...]]
    #: extra model_index.json entries a diffusers pipeline of this family reads
    pipeline_options: ClassVar[dict[str, Any]] = {}
    #: whether an empty prompt conditions on zeros instead of the encoded empty string
    zero_empty_prompt: ClassVar[bool] = False
    #: whether the training methods take this family's models as a base
    trainable: ClassVar[bool] = True
    #: the denoiser's diffusers component: its folder and model_index.json entry
    denoiser_name: ClassVar[str] = "unet"
    #: pixel sides must be multiples of the VAE's factor times this (Flux packs 2x2 latent patches)
    latent_multiple: ClassVar[int] = 1
    #: the text encoders a LoRA may train (lora.text_encoder)
    lora_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    #: whether the original single file holds the denoiser alone (Flux: the VAE and text encoders ship apart)
    single_file_denoiser_only: ClassVar[bool] = False
    #: the guidance scale generation uses when none is asked (diffusers' pipelines' defaults)
    default_guidance_scale: ClassVar[float] = 7.5

    # -- the models ------------------------------------------------------------------------------

    def denoiser_class(self) -> type:
        """The ldmcore class of the denoiser (built from its diffusers config)."""
        from .unet import UNet

        return UNet

    def schedule_class(self) -> type:
        """The objective: NoiseSchedule (discrete DDPM) or FlowMatchSchedule, read from scheduler_config.json."""
        from .schedule import NoiseSchedule

        return NoiseSchedule

    def default_latent_side(self, denoiser_config) -> int:
        """The latent side generation uses when no size is asked."""
        return denoiser_config.sample_size

    # -- text ------------------------------------------------------------------------------------

    def prompt_encoder(self, parts, clip_skip: int = 0, max_windows: int = 3) -> torch.nn.Module:
        """A module: prompts -> TextConditioning, with a `text_encoders` list (the cache hashes them)."""
        raise NotImplementedError

    def empty_text(self, encoded: TextConditioning) -> TextConditioning:
        """What an empty prompt conditions on, given the encoded empty string."""
        return {k: torch.zeros_like(v) for k, v in encoded.items()} if self.zero_empty_prompt else encoded

    # -- micro-conditioning ----------------------------------------------------------------------

    def size_ids(self, original: tuple[int, int], crop_top_left: tuple[int, int], target: tuple[int, int]
                 ) -> torch.Tensor | None:
        """The per-picture conditioning ids, (n,) float32, or None. Sizes are (height, width) in pixels."""
        return None

    def generation_ids(self, height: int, width: int, negative: bool = False) -> torch.Tensor | None:
        """The ids of a generated picture of this size (the negative branch of guidance may differ)."""
        return self.size_ids((height, width), (0, 0), (height, width))

    # -- the denoiser call -----------------------------------------------------------------------

    def denoiser_inputs(self, text: TextConditioning, ids: torch.Tensor | None = None,
                        guidance: float | None = None) -> dict[str, Any]:
        """The denoiser's keyword inputs beyond (sample, timestep). `ids`: (b, n) from `size_ids`, or in
        training the cache's per-picture (original h, w, crop top, left, target h, w). `guidance`: the
        embedded guidance of a guidance-distilled model (None: the value it trains with)."""
        raise NotImplementedError

    def cfg_scale(self, guidance_scale: float, true_cfg_scale: float = 1.0) -> float:
        """The classifier-free guidance scale of a generation: `guidance_scale` here; guidance-distilled
        families embed that value instead and guide with the negative prompt only by `true_cfg_scale`."""
        if true_cfg_scale != 1.0:
            raise ValueError(f"true_cfg_scale is for Flux; {self.title} guides by guidance_scale")
        return guidance_scale

    # -- files -----------------------------------------------------------------------------------

    def from_original(self, state: Mapping[str, torch.Tensor], configs: dict) -> dict[str, dict[str, torch.Tensor]]:
        """An original single file's state dict -> diffusers-named state dicts by component ("unet",
        "vae" and the `text_parts`). `configs`: the components' config dicts, plus "text_kind"."""
        raise NotImplementedError

    def to_original(self, parts) -> dict[str, torch.Tensor]:
        """The components as one original single-file state dict."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<family {self.name}: {self.title}>"


class StableDiffusion(Family):
    """SD 1.x/2.x: one CLIP text encoder (its last layer, or clip skip), no extra conditioning."""

    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipeline_class = "StableDiffusionPipeline"
    inpaint_pipeline_class = "StableDiffusionInpaintPipeline"
    scheduler_class = "DDIMScheduler"
    text_parts = (("text_encoder", "tokenizer", "CLIPTextModel"),)

    def prompt_encoder(self, parts, clip_skip=0, max_windows=3):
        from .text import PromptEncoder

        return _HiddenOnly(PromptEncoder(parts.tokenizer, parts.text_encoder, clip_skip=clip_skip, max_windows=max_windows))

    def denoiser_inputs(self, text, ids=None, guidance=None):
        return {"encoder_hidden_states": text["hidden"]}

    def from_original(self, state, configs):
        from .single_file import original_to_diffusers

        return original_to_diffusers(state, configs["unet"], configs["vae"], configs["text_kind"],
                                     configs["text_encoder"]["num_hidden_layers"])

    def to_original(self, parts):
        from .checkpoints import text_state_dict
        from .single_file import diffusers_to_original

        return diffusers_to_original(parts.denoiser.state_dict(), parts.vae.state_dict(), text_state_dict(parts.text_encoder),
                                     parts.denoiser.config, parts.vae.config, parts.text_kind)


class _HiddenOnly(torch.nn.Module):
    """An SD prompt encoder (prompts -> hidden states) seen as a family text encoder (-> dict)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.encoder.text_encoder]

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def forward(self, prompts: str | Sequence[str]) -> TextConditioning:
        return {"hidden": self.encoder(prompts)}


class SDXL(Family):
    """SDXL base: CLIP-L and CLIP-bigG (penultimate states concatenated, bigG's pooled projection),
    and six size ids: original (h, w), crop top-left (top, left), target (h, w)."""

    name = "sdxl"
    title = "SDXL"
    pipeline_class = "StableDiffusionXLPipeline"
    inpaint_pipeline_class = "StableDiffusionXLInpaintPipeline"
    scheduler_class = "EulerDiscreteScheduler"
    text_parts = (("text_encoder", "tokenizer", "CLIPTextModel"),
                  ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"))
    pipeline_options = {"force_zeros_for_empty_prompt": True}
    zero_empty_prompt = True
    default_guidance_scale = 5.0

    def prompt_encoder(self, parts, clip_skip: int = 0, max_windows: int = 3) -> torch.nn.Module:
        from .text_sdxl import SDXLPromptEncoder

        return SDXLPromptEncoder(parts.tokenizer, parts.text_encoder, parts.tokenizer_2, parts.text_encoder_2,
                                 clip_skip=clip_skip, max_windows=max_windows)

    def size_ids(self, original, crop_top_left, target):
        from .text_sdxl import size_ids

        return size_ids(original, crop_top_left, target)

    def denoiser_inputs(self, text, ids=None, guidance=None):
        if ids is None:
            raise ValueError(f"{self.title} needs the size conditioning ids (original size, crop, target size)")
        if "pooled" not in text:
            raise ValueError(f"{self.title} needs the pooled text embedding; was the cache built for another family?")
        return {"encoder_hidden_states": text["hidden"],
                "added_cond_kwargs": {"text_embeds": text["pooled"], "time_ids": ids.to(text["pooled"])}}

    def from_original(self, state, configs):
        from .single_file_sdxl import original_to_diffusers

        return original_to_diffusers(state, configs)

    def to_original(self, parts):
        from .checkpoints import text_state_dict
        from .single_file_sdxl import diffusers_to_original

        texts = {name: text_state_dict(model) for name, model in parts.text_encoders.items()}
        return diffusers_to_original(parts.denoiser.state_dict(), parts.vae.state_dict(), texts, parts.denoiser.config,
                                     parts.vae.config)


class SDXLRefiner(SDXL):
    """The SDXL refiner: bigG only, and five ids with an aesthetic score in place of the target size
    (6.0 for the prompt, 2.5 for the negative prompt by default, as the original training used)."""

    name = "sdxl-refiner"
    title = "SDXL refiner"
    pipeline_class = "StableDiffusionXLImg2ImgPipeline"
    text_parts = (("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"),)
    pipeline_options = {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}
    zero_empty_prompt = False
    trainable = False
    aesthetic_score: ClassVar[float] = 6.0
    negative_aesthetic_score: ClassVar[float] = 2.5

    def prompt_encoder(self, parts, clip_skip: int = 0, max_windows: int = 3) -> torch.nn.Module:
        from .text_sdxl import SDXLPromptEncoder

        return SDXLPromptEncoder(None, None, parts.tokenizer_2, parts.text_encoder_2,
                                 clip_skip=clip_skip, max_windows=max_windows)

    def size_ids(self, original, crop_top_left, target, aesthetic_score: float | None = None):
        from .text_sdxl import refiner_size_ids

        return refiner_size_ids(original, crop_top_left, self.aesthetic_score if aesthetic_score is None else aesthetic_score)

    def generation_ids(self, height, width, negative=False):
        score = self.negative_aesthetic_score if negative else self.aesthetic_score
        return self.size_ids((height, width), (0, 0), (height, width), score)



class Flux(Family):
    """Flux.1: a flow-matching MM-DiT transformer on 16-channel latents; T5's states for the tokens and
    CLIP-L's pooled output for the modulation. One class, two instances: dev embeds the guidance
    value (it was distilled from guided outputs), schnell (timestep-distilled) has no such input
    and reads shorter prompts."""

    title = "Flux.1"
    pipeline_class = "FluxPipeline"
    inpaint_pipeline_class = "FluxFillPipeline"  # named for completeness: no Flux inpainting method here (issue 14 leaves it out)
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    text_parts = (("text_encoder", "tokenizer", "CLIPTextModel"),
                  ("text_encoder_2", "tokenizer_2", "T5EncoderModel"))
    denoiser_name = "transformer"
    latent_multiple = 2
    default_guidance_scale = 3.5  # dev's embedded guidance; schnell ignores it
    lora_text_encoders = ("text_encoder",)  # CLIP-L, as kohya and ai-toolkit train it; T5-XXL stays frozen
    single_file_denoiser_only = True

    def __init__(self, name: str, guidance_embeds: bool, max_sequence_length: int, training_guidance: float = 1.0):
        self.name = name
        self.title = f"Flux.1-{name.removeprefix('flux-')}"
        self.guidance_embeds = guidance_embeds
        self.max_sequence_length = max_sequence_length  # T5 tokens: 512 for dev, 256 for schnell
        # What a guidance-distilled model is fed while it trains: 1.0, as kohya's sd-scripts, ai-toolkit and
        # SimpleTuner use for Flux.1-dev LoRAs; generation then embeds the asked guidance (3.5 by default).
        self.training_guidance = training_guidance

    def denoiser_class(self) -> type:
        from .flux import FluxTransformer

        return FluxTransformer

    def schedule_class(self) -> type:
        from .flow import FlowMatchSchedule

        return FlowMatchSchedule

    def default_latent_side(self, denoiser_config) -> int:
        return 128  # 1024 px, as diffusers' Flux pipelines

    def prompt_encoder(self, parts, clip_skip: int = 0, max_windows: int = 3) -> torch.nn.Module:
        from .text_flux import FluxPromptEncoder

        if clip_skip:
            raise ValueError(f"{self.title} reads T5's last state and CLIP's pooled output: clip_skip does not apply")
        # a T5 tokenizer that reads fewer tokens than the family (a tiny world's) sets the length
        length = min(self.max_sequence_length, parts.tokenizer_2.model_max_length)
        return FluxPromptEncoder(parts.tokenizer, parts.text_encoder, parts.tokenizer_2, parts.text_encoder_2,
                                 max_length=length)

    def denoiser_inputs(self, text, ids=None, guidance=None):
        if "pooled" not in text:
            raise ValueError(f"{self.title} needs the pooled CLIP embedding; was the cache built for another family?")
        inputs = {"encoder_hidden_states": text["hidden"], "pooled_projections": text["pooled"]}
        if self.guidance_embeds:
            value = self.training_guidance if guidance is None else guidance
            inputs["guidance"] = torch.full((text["hidden"].shape[0],), float(value), device=text["hidden"].device)
        return inputs

    def cfg_scale(self, guidance_scale: float, true_cfg_scale: float = 1.0) -> float:
        return true_cfg_scale  # diffusers' FluxPipeline: real guidance only when asked, beside the embedded one

    def from_original(self, state, configs):
        from .single_file_flux import original_to_diffusers

        return {self.denoiser_name: original_to_diffusers(state, configs[self.denoiser_name])}

    def to_original(self, parts):
        from .single_file_flux import diffusers_to_original

        return diffusers_to_original(parts.denoiser.state_dict(), parts.denoiser.config)

SD, SDXL_BASE, SDXL_REFINER = StableDiffusion(), SDXL(), SDXLRefiner()
FLUX_DEV = Flux("flux-dev", guidance_embeds=True, max_sequence_length=512)
FLUX_SCHNELL = Flux("flux-schnell", guidance_embeds=False, max_sequence_length=256)
FAMILIES: dict[str, Family] = {f.name: f for f in (SD, SDXL_BASE, SDXL_REFINER, FLUX_DEV, FLUX_SCHNELL)}


def cast_inputs(inputs: Mapping[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """A denoiser's conditioning inputs (`Family.denoiser_inputs`, nested dicts included) in its dtype,
    as diffusers' pipelines and training scripts pass them."""
    return {k: cast_inputs(v, dtype) if isinstance(v, Mapping) else v.to(dtype) for k, v in inputs.items()}


def get_family(name: str | Family) -> Family:
    if isinstance(name, Family):
        return name
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}") from None


def family_of_pipeline(index: Mapping[str, Any], denoiser_config: Mapping[str, Any] | None = None) -> Family:
    """The family of a diffusers folder, from its model_index.json (and for Flux its transformer's
    config, which says whether the guidance is embedded)."""
    if index.get("transformer") and index["transformer"][1] == "FluxTransformer2DModel":
        return FLUX_DEV if (denoiser_config or {}).get("guidance_embeds", False) else FLUX_SCHNELL
    if index.get("text_encoder_2") and index["text_encoder_2"][0] is not None:
        if not index.get("text_encoder") or index["text_encoder"][0] is None:
            return SDXL_REFINER
        return SDXL_BASE
    return SD
