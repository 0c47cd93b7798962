"""LoRA: low-rank adapters on the U-Net (and optionally the text encoder); the base stays frozen."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from adapters.lora import LoraSettings, add_lora, lora_state_dict, save_diffusers, save_kohya

from .method import Method

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"


class LoraMethod(Method):
    name = "lora"

    def __init__(self, config, components):
        super().__init__(config, components)
        c = config.lora
        targets = c.targets if isinstance(c.targets, str) else tuple(c.targets)
        self.settings = LoraSettings(
            rank=c.rank, alpha=c.alpha, dropout=c.dropout, targets=targets, init=c.init, use_dora=c.use_dora,
            text_encoder=c.text_encoder,
        )
        if c.text_encoder:
            raise NotImplementedError(
                "lora.text_encoder: training the text encoder's LoRA is not wired into the trainer yet; "
                "set lora.text_encoder=false"
            )

    def build(self) -> None:
        add_lora(self.components.unet, self.settings)

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.components.unet}

    def export(self, folder: Path, metadata: dict[str, str]) -> list[Path]:
        unet_sd = lora_state_dict(self.components.unet)
        meta = {**metadata, "trigger_words": ",".join(self.config.lora.trigger_words)}
        save_diffusers(folder / DIFFUSERS_FILE, unet_sd, None, meta, settings=self.settings)
        save_kohya(folder / KOHYA_FILE, unet_sd, None, self.settings, meta)
        return [folder / DIFFUSERS_FILE, folder / KOHYA_FILE]
