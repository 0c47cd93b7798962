"""LoRA: low-rank adapters on the U-Net (and optionally the text encoder); the base stays frozen."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from adapters.lora import DIFFUSERS_FILE, KOHYA_FILE, LoraSettings, add_lora, lora_state_dict, save_diffusers, save_kohya
from adapters.lycoris import LYCORIS_FILE, save_lycoris

from .batch import select
from .method import Method


class LoraMethod(Method):
    name = "lora"

    def __init__(self, config, components):
        super().__init__(config, components)
        c = config.lora
        targets = c.targets if isinstance(c.targets, str) else tuple(c.targets)
        self.settings = LoraSettings(
            rank=c.rank, alpha=c.alpha, dropout=c.dropout, targets=targets, init=c.init, use_dora=c.use_dora,
            text_encoder=c.text_encoder, type=c.type,
        )
        self.cached_text = not c.text_encoder

    frozen_denoiser = True

    def text_encoders(self) -> dict[str, nn.Module]:
        """The text encoders whose LoRA trains (with lora.text_encoder): the family's CLIP ones (Flux's T5 stays frozen)."""
        if not self.settings.text_encoder:
            return {}
        parts = self.components
        return {name: parts.text_encoders[name] for name in parts.family.lora_text_encoders if name in parts.text_encoders}

    def build(self) -> None:
        add_lora(self.components.denoiser, self.settings)
        for encoder in self.text_encoders().values():
            add_lora(encoder, self.settings, text_encoder=True)

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"denoiser": self.components.denoiser, **self.text_encoders()}

    def encode_text(self, batch, drop, empty_text, models):
        if not self.settings.text_encoder:
            return super().encode_text(batch, drop, empty_text, models)
        # the text encoders train: encode the captions live, through the prepared (synchronised) modules
        parts, data = self.components, self.config.data
        live = dataclasses.replace(parts, **{name: models[name] for name in self.text_encoders()})
        captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist())]
        text = live.prompt_encoder(data.clip_skip, data.max_windows)(captions)
        if parts.family.zero_empty_prompt:  # a dropped caption is zeros there, not the encoded ""
            text = select(text, ~drop, empty_text)
        return text

    def export(self, folder: Path, metadata: dict[str, str]) -> list[Path]:
        parts = self.components
        denoiser_sd = lora_state_dict(parts.denoiser)
        texts = {name: lora_state_dict(model) for name, model in self.text_encoders().items()}
        # the denoiser's config names the family and, for SDXL, the original module names kohya files use
        kwargs = dict(text_2_sd=texts.get("text_encoder_2"), denoiser_config=parts.denoiser.config)
        meta = {**metadata, "trigger_words": ",".join(self.config.lora.trigger_words)}
        if self.settings.type != "lora":  # LoHa / LoKr: the LyCORIS layout, which ComfyUI and A1111 load
            return [save_lycoris(folder / LYCORIS_FILE, denoiser_sd, texts.get("text_encoder"), self.settings, meta,
                                 **kwargs)]
        save_diffusers(folder / DIFFUSERS_FILE, denoiser_sd, texts.get("text_encoder"), meta, settings=self.settings,
                       **kwargs)
        if self.settings.use_dora:  # tools disagree on how kohya files store DoRA: diffusers layout only
            return [folder / DIFFUSERS_FILE]
        save_kohya(folder / KOHYA_FILE, denoiser_sd, texts.get("text_encoder"), self.settings, meta, **kwargs)
        return [folder / DIFFUSERS_FILE, folder / KOHYA_FILE]
