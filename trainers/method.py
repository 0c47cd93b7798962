"""What a training method is, as the loop sees it.

A method builds what it trains (inject LoRA, widen conv_in, build a ControlNet), names the
parameters that train, turns a batch into the U-Net's inputs, may weigh samples or add a loss
term, and saves and exports what it trained. The loop never asks which method it runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldmcore.checkpoints import Components
from ldmcore.weights import check_state_dict

from .config import Config


class Method:
    """Base class; the defaults describe training the U-Net on text-conditioned latents."""

    name = "base"
    #: whether the text embeddings come from the cache (False when the text encoder trains)
    cached_text = True

    def __init__(self, config: Config, components: Components):
        self.config = config
        self.components = components

    # -- building ------------------------------------------------------------------------------

    def build(self) -> None:
        """Change the models for training (inject adapters, widen layers). Called once, before
        anything is moved to a device or wrapped."""

    def trained_modules(self) -> dict[str, nn.Module]:
        """The modules holding trained parameters, by name; the loop prepares (wraps) these."""
        return {"unet": self.components.unet}

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.trained_modules().values() for p in m.parameters() if p.requires_grad]

    # -- one step ------------------------------------------------------------------------------

    def encode_text(self, batch: dict, drop: torch.Tensor, empty_text: torch.Tensor, models: dict) -> torch.Tensor:
        """The text embeddings of a batch, with dropped captions (`drop`, (b,) bool) replaced by the
        empty prompt's. By default from the cache; a method training the text encoder encodes live."""
        text = batch["text"]  # (b, tokens, width)
        return torch.where(drop[:, None, None], empty_text.to(text), text)

    def unet_kwargs(self, batch: dict[str, torch.Tensor], noisy_latents: torch.Tensor) -> dict[str, Any]:
        """Extra inputs for the U-Net beyond (sample, timestep, encoder_hidden_states): the
        inpainting channels, ControlNet residuals. `sample` may be replaced by returning it."""
        return {}

    def sample_weights(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Per-sample loss weights (prior preservation weighs class images), or None."""
        return None

    # -- saving --------------------------------------------------------------------------------

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must keep of the models: the trained parameters only."""
        out = {}
        for name, module in self.trained_modules().items():
            for key, p in module.named_parameters():
                if p.requires_grad:
                    out[f"{name}.{key}"] = p.detach()
        return out

    def load_trained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = {f"{n}.{k}": p for n, m in self.trained_modules().items() for k, p in m.named_parameters() if p.requires_grad}
        check_state_dict(params, state, "the checkpoint does not fit this run's trained parameters",
                         hint="was it written with another method or LoRA setting?")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k].to(p.device, p.dtype))

    def export(self, folder: Path, metadata: dict[str, str]) -> list[Path]:
        """Write the result in the formats other tools load; returns the files written."""
        raise NotImplementedError
