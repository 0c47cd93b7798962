"""From an image of any size to a bucket-sized training tensor: resize to cover, crop, maybe mirror.

The geometry is decided first, as a `CropPlan`, and applied second. The plan is plain data so that the
cache can store it next to the latents and SDXL can be given the original size and the crop offsets
("crop top-left") it is conditioned on, and so that a mask or a control image goes through exactly
the same crop as its image.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from .records import ImageRecord

# Lanczos: Pillow's resize widens the filter support by the downscale factor, so it is antialiased,
# and among Pillow's filters it keeps the most fine detail (bilinear softens, as in diffusers' scripts).
RESAMPLE = Image.Resampling.LANCZOS


@dataclasses.dataclass(frozen=True)
class CropPlan:
    """Resize (orig_w, orig_h) to (resized_w, resized_h), crop (bucket_w, bucket_h) at (crop_left,
    crop_top) of the resized image, then mirror left-right if `flip`."""

    orig_w: int
    orig_h: int
    resized_w: int
    resized_h: int
    crop_left: int
    crop_top: int
    bucket_w: int
    bucket_h: int
    flip: bool = False

    @property
    def crop_top_left(self) -> tuple[int, int]:
        """(top, left) of the crop as seen in the output image, for SDXL's crop conditioning.

        When flipped, `left` is measured in the mirrored resized image, as in diffusers' SDXL script,
        which flips before it crops."""
        left = self.resized_w - self.crop_left - self.bucket_w if self.flip else self.crop_left
        return self.crop_top, left

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CropPlan:
        return cls(**d)


def resized_size(orig_w: int, orig_h: int, bucket_w: int, bucket_h: int) -> tuple[int, int]:
    """The smallest aspect-preserving size that covers the bucket: one side equals the bucket's, the
    other is rounded and never under the bucket's."""
    if min(orig_w, orig_h, bucket_w, bucket_h) <= 0:
        raise ValueError(f"sizes must be positive: image {orig_w}x{orig_h}, bucket {bucket_w}x{bucket_h}")
    if bucket_w * orig_h >= bucket_h * orig_w:  # width is the binding side (compared exactly, in integers)
        return bucket_w, max(bucket_h, round(orig_h * bucket_w / orig_w))
    return max(bucket_w, round(orig_w * bucket_h / orig_h)), bucket_h


def plan_crop(
    orig_w: int,
    orig_h: int,
    bucket_w: int,
    bucket_h: int,
    mode: Literal["center", "random"] = "center",
    seed: int | str | None = None,
    flip: bool = False,
) -> CropPlan:
    """Where to crop a `orig_w` x `orig_h` image for a `bucket_w` x `bucket_h` bucket.

    "center" puts the crop in the middle (floored when the spare pixels are odd). "random" draws the
    offsets uniformly from `random.Random(seed)`; `seed` is required, so the same seed gives the same
    plan in any process (str seeds are hashed stably by `random`, unlike `hash()`).
    """
    rw, rh = resized_size(orig_w, orig_h, bucket_w, bucket_h)
    if mode == "center":
        left, top = (rw - bucket_w) // 2, (rh - bucket_h) // 2
    elif mode == "random":
        if seed is None:
            raise ValueError("plan_crop(mode='random') needs a seed, so that the crop can be reproduced")
        rng = random.Random(seed)
        left, top = rng.randint(0, rw - bucket_w), rng.randint(0, rh - bucket_h)
    else:
        raise ValueError(f"crop mode {mode!r} is not 'center' or 'random'")
    return CropPlan(orig_w, orig_h, rw, rh, left, top, bucket_w, bucket_h, flip)


def plan_for_record(
    record: ImageRecord,
    bucket: tuple[int, int],
    mode: Literal["center", "random"] = "center",
    seed: int = 0,
    flip: bool = False,
) -> CropPlan:
    """The plan for a scanned image; a random crop is seeded by the run's seed and the image's hash,
    so it does not change when the dataset is reordered or grows."""
    return plan_crop(record.width, record.height, *bucket, mode, f"{seed}/{record.sha256}", flip)


def flipped(plan: CropPlan) -> CropPlan:
    """The plan of the mirrored variant: the same region of the image, mirrored. The cache stores this
    variant separately, so a random flip in training is a choice between two cached entries."""
    return dataclasses.replace(plan, flip=not plan.flip)


def apply(img: Image.Image, plan: CropPlan, resample: Image.Resampling = RESAMPLE) -> Image.Image:
    """Resize, crop and maybe mirror `img` as planned; the result is exactly bucket-sized. Pass
    `resample=Image.Resampling.NEAREST` for masks whose values must stay 0 or 255."""
    if img.size != (plan.orig_w, plan.orig_h):
        raise ValueError(f"image is {img.size[0]}x{img.size[1]} but the plan is for {plan.orig_w}x{plan.orig_h}")
    if img.size != (plan.resized_w, plan.resized_h):
        img = img.resize((plan.resized_w, plan.resized_h), resample)
    img = img.crop((plan.crop_left, plan.crop_top, plan.crop_left + plan.bucket_w, plan.crop_top + plan.bucket_h))
    if plan.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An image as a float32 (3, h, w) tensor in [-1, 1], the range the VAE encodes."""
    array = np.asarray(img.convert("RGB"), dtype=np.uint8)  # (h, w, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous().float().div_(127.5).sub_(1.0)  # (3, h, w)
