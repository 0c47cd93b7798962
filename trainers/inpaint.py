"""Inpainting: a 9-channel U-Net (noisy latent, mask, masked-image latent) trained whole.

The base is an inpainting checkpoint, or a 4-channel U-Net whose conv_in is widened with zeroed
weights, so training starts from the base's own predictions. Masks and masked-picture latents come
from the precompute cache (data.cache.inpaint_masks variants per image); a share of samples
(inpaint.full_mask_share, drawn from each sample's generator) sees the whole image masked instead,
so the model keeps plain text-to-image generation. The VAE runs once per bucket size at start, for
that blank latent, and never in a step.

Everything else is the full fine-tune's (trainers/full.py): the whole U-Net trains, checkpoints keep
it under diffusers names, and the export is model/ (a diffusers folder that
StableDiffusionInpaintPipeline loads) and model.safetensors (full.single_file), the original layout.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from data_tools.schema import ConfigError
from ldmcore.inpaint import INPAINT_CHANNELS, LATENT_CHANNELS, inpainting_input, widen_conv_in

from .full import FullMethod


class InpaintMethod(FullMethod):
    name = "inpaint"

    def __init__(self, config, components):
        super().__init__(config, components)
        if config.data.cache.inpaint_masks == 0:
            raise ConfigError(
                "method: inpaint trains on cached masks, but data.cache.inpaint_masks is 0: set it to the number of "
                "mask variants to cache per image (for example data.cache.inpaint_masks=4)"
            )
        channels = components.denoiser.config.in_channels
        if channels not in (LATENT_CHANNELS, INPAINT_CHANNELS):
            raise ConfigError(
                f"model.path={config.model.path}: its U-Net takes {channels} input channels; method: inpaint starts "
                f"from a {LATENT_CHANNELS}-channel model (widened) or a {INPAINT_CHANNELS}-channel inpainting model"
            )
        c = config.inpaint
        for key in ("validation_image", "validation_mask"):
            if getattr(c, key) is not None and not Path(getattr(c, key)).is_file():
                raise ConfigError(f"inpaint.{key}={getattr(c, key)}: no such file")
        self.blank_latents: dict[tuple[int, int], torch.Tensor] = {}  # latent (h, w) -> (4, h, w)

    def build(self) -> None:
        widen_conv_in(self.components.denoiser)  # no-op for an inpainting checkpoint
        super().build()

    # -- data ------------------------------------------------------------------------------------

    @torch.no_grad()
    def dataset(self, device, progress):
        """The cache, and per bucket size the posterior mean of the all-masked picture (all zeros),
        rounded through fp16 as the cache stores its own full-mask entries."""
        dataset, keys = super().dataset(device, progress)
        vae = self.components.vae
        for w, h in sorted(set(dataset.buckets)):
            blank = torch.zeros(1, 3, h, w, device=vae.device, dtype=vae.dtype)
            mean = vae.encode(blank).mean[0].half().float().cpu()  # (4, h/f, w/f)
            self.blank_latents[tuple(mean.shape[-2:])] = mean
        return dataset, keys

    # -- one step --------------------------------------------------------------------------------

    def loss(self, models, batch, empty_text, generators):
        # which samples see the full mask: each sample's own generator, first draw
        share = self.config.inpaint.full_mask_share
        full = torch.stack([torch.rand((), generator=g) < share for g in generators])  # (b,) bool
        return super().loss(models, {**batch, "full_mask": full.to(batch["mask"].device)}, empty_text, generators)

    def unet_kwargs(self, batch, noisy_latents, timesteps, inputs, models):
        mask, masked_mean = batch["mask"], batch["masked_mean"]  # (b, 1, h, w), (b, 4, h, w)
        full = batch.get("full_mask")  # absent for the held-out validation loss: cached masks only
        if full is not None and bool(full.any()):
            blank = self.blank_latents[tuple(masked_mean.shape[-2:])].to(masked_mean)  # (4, h, w)
            pick = full[:, None, None, None]
            mask = torch.where(pick, torch.ones_like(mask), mask)
            masked_mean = torch.where(pick, blank.expand_as(masked_mean), masked_mean)
        masked_latents = self.components.vae.scale(masked_mean)
        return {"sample": inpainting_input(noisy_latents, mask, masked_latents)}  # (b, 9, h, w)

    # -- validation -------------------------------------------------------------------------------

    def generate(self, prompts, seed, **kwargs):
        """Inpaint inpaint.validation_image under inpaint.validation_mask; without them, plain samples
        at data.resolution through the full mask (the picture then does not matter)."""
        from ldmcore.inpaint import inpaint

        c = self.config.inpaint
        if c.validation_image is not None:
            image, mask = Image.open(c.validation_image), Image.open(c.validation_mask)
        else:
            side = self.config.data.resolution
            image, mask = Image.new("RGB", (side, side), (127, 127, 127)), Image.new("L", (side, side), 255)
        return inpaint(self.components, prompts, image, mask, seed=seed, **kwargs)
