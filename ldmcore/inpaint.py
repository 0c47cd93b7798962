"""Inpainting with a 9-channel U-Net: its input, widening a 4-channel U-Net to it, and sampling.

An inpainting U-Net reads three things stacked on the channel axis, in this order (diffusers'
StableDiffusionInpaintPipeline and the original SD inpainting checkpoints agree on it):
the noisy latent (4), the mask at latent size (1, 1 = repaint) and the latent of the picture with
the masked region blanked (4): `pixels * (mask < 0.5)`, so repainted pixels are 0, mid-grey.
The U-Net sees the picture only through that masked latent; the noisy latent starts from pure noise
(strength 1) or from the noised picture (strength < 1), as img2img does.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .checkpoints import Components
from .pipeline import generate, images_to_tensor
from .unet import UNet

LATENT_CHANNELS = 4
INPAINT_CHANNELS = 2 * LATENT_CHANNELS + 1  # noisy latent, mask, masked-image latent


def inpainting_input(noisy: torch.Tensor, mask: torch.Tensor, masked_latents: torch.Tensor) -> torch.Tensor:
    """noisy (b, 4, h, w), mask (b, 1, h, w), masked_latents (b, 4, h, w) -> the U-Net's (b, 9, h, w)."""
    return torch.cat([noisy, mask.to(noisy), masked_latents.to(noisy)], dim=1)


def widen_conv_in(unet: UNet, in_channels: int = INPAINT_CHANNELS) -> None:
    """Give `unet.conv_in` `in_channels` inputs; the new channels' weights start at zero, so the
    widened U-Net computes what it computed before whatever the extra channels hold. The config
    follows, so the model saves and loads as the wider one."""
    old = unet.conv_in
    extra = in_channels - old.in_channels
    if extra < 0:
        raise ValueError(f"widen_conv_in: conv_in already has {old.in_channels} inputs, more than {in_channels}")
    if extra == 0:
        return
    weight = old.weight.detach()  # (out, in, k, k)
    zeros = torch.zeros(weight.shape[0], extra, *weight.shape[2:], dtype=weight.dtype, device=weight.device)
    with torch.device("meta"):  # the layer's own random init is thrown away; skip it
        new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    new.weight = nn.Parameter(torch.cat([weight, zeros], dim=1), requires_grad=old.weight.requires_grad)
    new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=old.bias.requires_grad)
    unet.conv_in = new
    unet.config = dataclasses.replace(unet.config, in_channels=in_channels)


# -- pictures and masks ----------------------------------------------------------------------------


def mask_to_tensor(masks: Sequence[Image.Image], device=None) -> torch.Tensor:
    """PIL masks (white = repaint) -> (b, 1, h, w) float {0, 1}: grey levels binarised at half,
    as diffusers' mask processor does."""
    arrays = [np.asarray(m.convert("L"), dtype=np.float32) / 255.0 for m in masks]
    return (torch.from_numpy(np.stack(arrays))[:, None] >= 0.5).float().to(device)


def masked_pixels(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """pixels (b, 3, H, W) in [-1, 1], mask (b, 1, H, W) -> the picture with the repainted region at 0."""
    return pixels * (mask < 0.5).to(pixels)


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(b, 1, H, W) -> (b, 1, H/f, W/f), nearest neighbour (the precompute cache does the same)."""
    return F.interpolate(mask, size=(mask.shape[-2] // factor, mask.shape[-1] // factor), mode="nearest")


def _as_list(x, n: int, what: str) -> list:
    items = [x] if isinstance(x, Image.Image) else list(x)
    if len(items) == 1:
        items = items * n
    if len(items) != n:
        raise ValueError(f"{n} prompts but {len(items)} {what}")
    return items


# -- sampling --------------------------------------------------------------------------------------


@torch.no_grad()
def inpaint(
    components: Components,
    prompt: str | Sequence[str],
    image: Image.Image | Sequence[Image.Image],
    mask: Image.Image | Sequence[Image.Image],
    *,
    seed: int = 0,
    steps: int = 30,
    guidance_scale: float = 7.5,
    sampler: str = "dpmpp_2m",
    strength: float = 1.0,
    height: int | None = None,
    width: int | None = None,
    **kwargs,
) -> list[Image.Image] | torch.Tensor:
    """Repaint the white part of `mask` in `image` for `prompt` (one picture per prompt; one image
    and mask may serve every prompt). Needs a 9-channel U-Net.

    The picture and mask are resized (bicubic) to height x width, by default the picture's size
    rounded down to the VAE's factor. The masked picture's latent is its posterior mean (the
    training cache uses the mean too; diffusers draws a posterior sample, which differs by the
    posterior's small std). With `strength` 1 sampling starts from pure noise; below 1 it starts
    from the noised picture, as img2img does. Other keyword arguments are `generate`'s
    (negative_prompt, eta, karras, output, progress, callback, ...); the noise comes from `seed`
    in diffusers' order, so passing diffusers the same seed and these masked latents reproduces it.
    """
    unet, vae = components.denoiser, components.vae
    if unet.config.in_channels != INPAINT_CHANNELS:
        raise ValueError(
            f"inpaint needs a 9-channel inpainting U-Net, this one takes {unet.config.in_channels} channels; "
            "load an inpainting checkpoint or train one (method: inpaint)"
        )
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"inpaint: strength={strength} must be in (0, 1]")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    images, masks = _as_list(image, len(prompts), "images"), _as_list(mask, len(prompts), "masks")
    factor = components.vae_scale_factor
    width = width or images[0].width // factor * factor
    height = height or images[0].height // factor * factor
    images = [im.convert("RGB").resize((width, height), Image.BICUBIC) for im in images]
    masks = [m.convert("L").resize((width, height), Image.BICUBIC) for m in masks]

    pixels = images_to_tensor(images, vae.device).to(vae.dtype)  # (b, 3, H, W)
    full_mask = mask_to_tensor(masks, vae.device).to(vae.dtype)  # (b, 1, H, W)
    masked_latents = vae.scale(vae.encode(masked_pixels(pixels, full_mask)).mode()).float()  # (b, 4, h, w)
    small_mask = latent_mask(full_mask, factor).float()  # (b, 1, h, w)
    return generate(
        components, prompts, seed=seed, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
        height=height, width=width, init_image=images if strength < 1.0 else None, strength=strength,
        unet_inputs=_inputs(small_mask, masked_latents), **kwargs,
    )


def _inputs(mask: torch.Tensor, masked_latents: torch.Tensor):
    """generate's `unet_inputs`: the inpainting channels, repeated to fit classifier-free guidance's
    [uncond; cond] batch."""
    def unet_inputs(x_t, t, inputs):
        reps = x_t.shape[0] // mask.shape[0]
        m, z = mask.to(x_t.device).repeat(reps, 1, 1, 1), masked_latents.to(x_t.device).repeat(reps, 1, 1, 1)
        return {"sample": inpainting_input(x_t, m, z)}

    return unet_inputs
