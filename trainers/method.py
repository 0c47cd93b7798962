"""What a training method is, as the loop sees it.

A method builds what it trains (inject LoRA, widen conv_in, build a ControlNet), names the
parameters that train, turns a batch into the U-Net's inputs, may weigh samples or add a loss
term, and saves and exports what it trained. The loop never asks which method it runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from data_tools.loss_masks import masked_mean
from ldmcore.checkpoints import Components
from ldmcore.family import TextConditioning, cast_inputs
from ldmcore.weights import check_state_dict

from .batch import select
from .config import Config


class Method:
    """Base class; the defaults describe training the U-Net on text-conditioned latents."""

    name = "base"
    #: whether the text embeddings come from the cache (False when the text encoder trains)
    cached_text = True
    #: whether the denoiser's own weights stay frozen (then train.base_quantization may quantise them)
    frozen_denoiser = False

    def __init__(self, config: Config, components: Components):
        self.config = config
        self.components = components

    # -- building ------------------------------------------------------------------------------

    def build(self) -> None:
        """Change the models for training (inject adapters, widen layers). Called once, before
        anything is moved to a device or wrapped."""

    def trained_modules(self) -> dict[str, nn.Module]:
        """The modules holding trained parameters, by name; the loop prepares (wraps) these."""
        return {"denoiser": self.components.denoiser}

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.trained_modules().values() for p in m.parameters() if p.requires_grad]

    # -- data ----------------------------------------------------------------------------------

    def dataset(self, device: torch.device, progress: bool) -> tuple[Dataset, list[str]]:
        """The training dataset, and a stable key per item (the held-out split is chosen by key
        order, so it does not depend on file order). By default the precompute cache, built first
        where it is missing; the VAE and text encoder are on `device` while this runs."""
        from data_tools.dataset import CachedDataset
        from data_tools.precompute import cache_dir_for, prepare_cache

        parts, data = self.components, self.config.data
        plan, _ = prepare_cache(data, parts.vae, parts.prompt_encoder(data.clip_skip, data.max_windows),
                                progress=progress)
        dataset = CachedDataset(cache_dir_for(data), plan, seed=self.config.train.seed,
                                repeats=[s.repeats for s in data.subsets])
        return dataset, [it.latents[0] for it in plan.items]

    def generate(self, prompts: list[str], seed: int, **kwargs) -> list:
        """Validation samples (PIL images) of the model as it trains; `kwargs` are
        `ldmcore.pipeline.generate`'s (steps, guidance_scale, sampler)."""
        from ldmcore.pipeline import generate

        return generate(self.components, prompts, seed=seed, **kwargs)

    # -- one step ------------------------------------------------------------------------------

    def encode_text(self, batch: dict, drop: torch.Tensor, empty_text: TextConditioning, models: dict
                    ) -> TextConditioning:
        """The text conditioning of a batch ({"hidden": (b, tokens, width), ["pooled": (b, width)]}),
        with dropped captions (`drop`, (b,) bool) replaced by the empty prompt's (`empty_text`,
        unbatched, as the family conditions an empty prompt). By default from the cache; a method
        training a text encoder encodes live."""
        return select(batch["text"], ~drop, empty_text)

    def unet_kwargs(self, batch: dict[str, torch.Tensor], noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                    inputs: dict[str, Any], models: dict[str, nn.Module]) -> dict[str, Any]:
        """Extra inputs for the U-Net beyond (sample, timestep) and the family's conditioning `inputs`
        (encoder_hidden_states, and added_cond_kwargs for SDXL): the inpainting channels, ControlNet
        residuals. `sample` may be replaced by returning it. `models` holds the prepared (wrapped)
        trained modules, by the names of `trained_modules`."""
        return {}

    def loss(self, models: dict[str, nn.Module], batch: dict, empty_text: TextConditioning,
             generators: list[torch.Generator]) -> torch.Tensor:
        """The loss of one micro-batch; sample j draws its randomness from generators[j] only.
        By default the denoising loss; a method that trains something else (the VAE) replaces it."""
        return diffusion_loss(models, self, batch, self.components, self.config, empty_text, generators)

    def sample_weights(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Per-sample loss weights (prior preservation weighs class images), or None."""
        return None

    # -- saving --------------------------------------------------------------------------------

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """The trained parameters under the names a checkpoint stores them by ("<module>.<param>")."""
        return {f"{name}.{key}": p for name, module in self.trained_modules().items()
                for key, p in module.named_parameters() if p.requires_grad}

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must keep of the models: the trained parameters only."""
        return {k: p.detach() for k, p in self.trained_parameters().items()}

    def load_trained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trained_parameters()
        check_state_dict(params, state, "the checkpoint does not fit this run's trained parameters",
                         hint="was it written with another method, LoRA setting or model shape?")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k].to(p.device, p.dtype))

    def export(self, folder: Path, metadata: dict[str, str]) -> list[Path]:
        """Write the result in the formats other tools load; returns the files written."""
        raise NotImplementedError

    def export_bytes(self, checkpoint: bool) -> int:
        """About how many bytes `export` writes, into a checkpoint or as the final export (the
        free-space check before a run): by default two files of the trained weights."""
        return 2 * sum(p.numel() * 4 for p in self.parameters())


def denoise(models: dict, method: Method, parts: Components, batch: dict, noisy: torch.Tensor, t: torch.Tensor,
            text: TextConditioning) -> torch.Tensor:
    """The denoiser's prediction for `noisy` latents at `t`: the family's conditioning and the method's extra
    inputs, in the denoiser's dtype as diffusers' training scripts pass them. That keeps a bf16 or quantised
    base's activations in bf16: bitsandbytes' layers answer in their input's dtype, so float32 latents
    would keep a quantised model's whole residual stream (and what backward stores of it) in float32."""
    dtype = parts.denoiser.dtype  # the frozen base's (a trained denoiser's: float32, and autocast casts)
    inputs = cast_inputs(parts.family.denoiser_inputs(text, batch.get("size")), dtype)
    kwargs = method.unet_kwargs(batch, noisy, t, inputs, models)
    sample = kwargs.pop("sample", noisy).to(dtype)
    return models.get("denoiser", parts.denoiser)(sample, t, **inputs, **kwargs)


def diffusion_loss(models: dict, method: Method, batch: dict, parts: Components, config: Config, empty_text, gens) -> torch.Tensor:
    """The denoising loss of one batch; the random draws of sample j come from gens[j] (CPU)."""
    device = batch["mean"].device
    lc, schedule = config.loss, parts.schedule
    per_sample_shape = batch["mean"].shape[1:]  # (c, h, w)

    def draw(fn):  # one draw per sample, stacked to a batch on the device
        return torch.stack([fn(g) for g in gens]).to(device)

    mean, std = batch["mean"].float(), batch["std"].float()  # (b, 4, h, w)
    latents = parts.vae.scale(mean + std * draw(lambda g: torch.randn(per_sample_shape, generator=g)))
    noise = draw(lambda g: torch.randn(per_sample_shape, generator=g))
    t = draw(lambda g: schedule.draw_timestep(g, per_sample_shape, lc))  # (b,)
    if lc.noise_offset:
        noise = noise + lc.noise_offset * draw(lambda g: torch.randn(per_sample_shape[0], 1, 1, generator=g))
    input_noise = noise
    if lc.input_perturbation:
        input_noise = noise + lc.input_perturbation * draw(lambda g: torch.randn(per_sample_shape, generator=g))
    noisy = schedule.add_noise(latents, input_noise, t)
    target = schedule.target(latents, noise, t)

    drop = torch.zeros(len(gens), dtype=torch.bool, device=device)
    if lc.caption_dropout:
        drop = draw(lambda g: torch.rand((), generator=g) < lc.caption_dropout)
    text = method.encode_text(batch, drop, empty_text, models)  # {"hidden": (b, tokens, width), ...}
    pred = denoise(models, method, parts, batch, noisy, t, text)
    # (b,): the mean squared error, over the loss mask's weight where the data has one (data.loss_mask)
    per_sample = masked_mean(F.mse_loss(pred.float(), target.float(), reduction="none"), batch.get("loss_mask"))

    weights = schedule.loss_weights(t, lc).to(per_sample)
    extra = method.sample_weights(batch)
    if extra is not None:
        weights = weights * extra.to(weights)
    return (per_sample * weights).mean()
