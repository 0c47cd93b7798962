"""Masks that weigh the loss (`data.loss_mask`): white pixels train, black ones are ignored, grey ones
weigh between. They come from a picture's alpha channel or from a folder of masks named after the
pictures, are cut with the picture's own crop and flip, shrunk to latent size (each latent pixel the
mean of the pixels it covers) and cached beside the latents, so the background of a subject photo
does not train."""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps


class LossMaskError(ValueError):
    """A mask that does not fit its picture; the message names both files."""


def loss_mask_image(picture: bytes, source: str, mode: str, mask_path: str | None) -> Image.Image:
    """The mask of one picture, as an 8-bit grey image of the picture's (upright) size."""
    with Image.open(io.BytesIO(picture)) as img:
        img = ImageOps.exif_transpose(img)
        size = img.size
        if mode == "alpha":
            has_alpha = "A" in img.getbands() or "transparency" in img.info
            return img.convert("RGBA").getchannel("A") if has_alpha else Image.new("L", size, 255)
    with Image.open(mask_path) as m:
        mask = ImageOps.exif_transpose(m).convert("L")
    if mask.size != size:
        raise LossMaskError(f"the loss mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its picture {source} is "
                            f"{size[0]}x{size[1]}; masks must have their picture's size")
    return mask


def mask_tensor(mask: Image.Image) -> torch.Tensor:
    """(1, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def to_latent_size(masks: torch.Tensor, factor: int) -> torch.Tensor:
    """(b, 1, H, W) -> (b, 1, H/factor, W/factor): each latent pixel the mean of the pixels it covers."""
    return F.avg_pool2d(masks, factor)


def masked_mean(error: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean of `error` (b, c, h, w) over the mask's weight ((b, 1, h, w); None: everywhere). A
    sample whose mask is all black contributes 0."""
    dims = tuple(range(1, error.ndim))
    if mask is None:
        return error.mean(dim=dims)
    weight = mask.to(error).expand_as(error)
    return (error * weight).sum(dim=dims) / weight.sum(dim=dims).clamp_min(1e-8)
