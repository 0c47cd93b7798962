"""ControlNet: a copy of the frozen U-Net's encoder learns to steer it from conditioning images
(Canny edges or the user's own maps, precomputed into the cache beside the latents)."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn

from data_tools.schema import ConfigError
from ldmcore.controlnet import SHARED_KEYS, ControlNet, generate_controlled
from ldmcore.controlnet_single_file import save_controlnet_single_file

from .method import Method

FOLDER, SINGLE_FILE = "controlnet", "controlnet.safetensors"


class ControlNetMethod(Method):
    name = "controlnet"
    frozen_denoiser = True

    def __init__(self, config, components):
        super().__init__(config, components)
        if config.data.cache.control is None:
            raise ConfigError(
                "method controlnet trains on conditioning images but data.cache.control is not set: set "
                "data.cache.control=canny (edges of each training image) or data.cache.control=folder "
                "with data.cache.control_dir holding one map per image"
            )
        if components.denoiser.config.in_channels != 4:
            raise ConfigError(
                f"model.path: the U-Net has in_channels={components.denoiser.config.in_channels} (an inpainting model?); "
                "method controlnet needs a text-to-image base with 4 input channels"
            )
        self.controlnet: ControlNet | None = None
        self.validation_control: Image.Image | None = None

    def build(self) -> None:
        c, unet = self.config.controlnet, self.components.denoiser
        if c.init:
            cn = ControlNet.from_pretrained(c.init, dtype=unet.dtype, device=unet.device)
            differ = [k for k in SHARED_KEYS if getattr(cn.config, k) != getattr(unet.config, k)]
            if differ:
                raise ConfigError(f"controlnet.init={c.init} does not fit model.path's U-Net: {', '.join(differ)} differ")
        else:
            cn = ControlNet.from_unet(unet, conditioning_embedding_out_channels=c.conditioning_embedding_out_channels)
        factor = self.components.vae_scale_factor
        if cn.config.downscale != factor:
            widths = list(cn.config.conditioning_embedding_out_channels)
            key = f"controlnet.init={c.init}: its conditioning_embedding_out_channels" if c.init else (
                "controlnet.conditioning_embedding_out_channels")
            raise ConfigError(
                f"{key}={widths} downscale control images {cn.config.downscale}x but this VAE's latents are "
                f"{factor}x smaller than the pictures: give {factor.bit_length()} widths (SD: [16, 32, 96, 256])"
            )
        cn.requires_grad_(True)
        if self.config.train.gradient_checkpointing:
            cn.set_gradient_checkpointing(True)
        self.controlnet = cn

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"controlnet": self.controlnet}

    def dataset(self, device, progress):
        dataset, keys = super().dataset(device, progress)
        if self.config.controlnet.validation_image:
            self.validation_control = Image.open(self.config.controlnet.validation_image).convert("RGB")
        else:  # the control map of the first image in key order: the same whatever the file order
            first = dataset[min(range(len(dataset)), key=lambda i: keys[i])]
            self.validation_control = Image.fromarray(first["control"].permute(1, 2, 0).numpy())
        return dataset, keys

    def unet_kwargs(self, batch, noisy_latents, timesteps, inputs, models):
        # uint8 pixels -> [0, 1], as diffusers' ControlNet pipelines feed control images
        cond = batch["control"].to(noisy_latents.device, torch.float32) / 255.0  # (b, 3, H, W)
        down, mid = models["controlnet"](noisy_latents, timesteps, controlnet_cond=cond, **inputs)
        # accelerate returns a prepared module's outputs in float32; the frozen U-Net's skips they are
        # added to are in the mixed-precision dtype, and CPU ops refuse the mix
        dtype = self.components.denoiser.dtype
        return {"down_block_additional_residuals": [d.to(dtype) for d in down],
                "mid_block_additional_residual": mid.to(dtype)}

    def generate(self, prompts, seed, **kwargs):
        cn = self.controlnet
        was_training = cn.training
        cn.eval()
        try:
            return generate_controlled(self.components, cn, prompts, self.validation_control,
                                       conditioning_scale=self.config.controlnet.conditioning_scale, seed=seed, **kwargs)
        finally:
            cn.train(was_training)

    def export(self, folder: Path, metadata: dict[str, str]) -> list[Path]:
        self.controlnet.save_pretrained(folder / FOLDER)
        save_controlnet_single_file(self.controlnet, folder / SINGLE_FILE, metadata)
        return [folder / FOLDER / "config.json", folder / FOLDER / "diffusion_pytorch_model.safetensors",
                folder / SINGLE_FILE]
