"""ControlNet conditioning images: where each training image's control map comes from.

Two sources: Canny edges computed from the training image itself, or a folder of user-made maps
(depth, pose, scribbles, ...) matched to the training images by file stem. Either way the map must
line up pixel for pixel with the training image as the model sees it, so it goes through the very
same resize and crop: the caller passes that transform as a callable (the training image's own crop
plan), and this module never decides a crop of its own.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import cv2
import numpy as np
from PIL import Image, ImageOps

from .images import IMAGE_EXTENSIONS

SOURCE_KINDS = ("canny", "folder")

Transform = Callable[[Image.Image], Image.Image]


@dataclasses.dataclass(frozen=True)
class ConditioningSource:
    """Where control maps come from: `kind="canny"` (thresholds `low`, `high`) or
    `kind="folder"` with `folder` holding one map per training image, named by its stem."""

    kind: str = "canny"
    folder: str | None = None
    low: int = 100
    high: int = 200

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"conditioning kind {self.kind!r} is not one of {list(SOURCE_KINDS)}")
        if (self.kind == "folder") != (self.folder is not None):
            raise ValueError("conditioning: give `folder` exactly when kind is 'folder' "
                             f"(kind={self.kind!r}, folder={self.folder!r})")
        if not 0 <= self.low <= self.high:
            raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got low={self.low}, high={self.high}")

    def to_dict(self) -> dict[str, Any]:
        """What the cache hashes: only the settings that change the maps (folder contents are
        hashed per file by the caller)."""
        if self.kind == "canny":
            return {"kind": "canny", "low": self.low, "high": self.high}
        return {"kind": "folder", "folder": str(self.folder)}


def canny(img: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges of `img` as the RGB image ControlNet's canny models expect: white edges on
    black, three identical channels. Edges are found on the grayscale image."""
    gray = np.asarray(img.convert("L"))
    edges = cv2.Canny(gray, low, high)  # (h, w) uint8, 255 on edges
    return Image.fromarray(np.stack([edges] * 3, axis=-1), mode="RGB")


def find_conditioning(
    folder: str | os.PathLike, stems: Iterable[str], *, strict: bool = False, what: str = "conditioning image"
) -> tuple[dict[str, Path], list[str]]:
    """Match training images to conditioning files in `folder` by file stem (`cat_01.jpg` ->
    `cat_01.png`). Returns (found: stem -> path, missing stems in the order given).

    `strict=True` raises instead of returning missing stems. Two files with one requested stem
    (`a.png` and `a.jpg`) are an error either way: which one is meant cannot be guessed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist or is not a folder")
    suffixes = IMAGE_EXTENSIONS
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes:
            by_stem.setdefault(path.stem, []).append(path)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for stem in stems:
        candidates = by_stem.get(stem, [])
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise ValueError(f"{folder}: several {what}s for {stem!r} ({names}); keep one")
        if candidates:
            found[stem] = candidates[0]
        else:
            missing.append(stem)
    if strict and missing:
        shown = ", ".join(repr(s) for s in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FileNotFoundError(f"{folder}: no {what} for {len(missing)} training image(s): {shown}; "
                                f"name each {what} after its training image's stem")
    return found, missing


def conditioning_image(
    record_image: Image.Image,
    source: ConditioningSource,
    *,
    size: tuple[int, int],
    path: str | os.PathLike | None = None,
    transform: Transform | None = None,
) -> Image.Image:
    """The control map for one training image, at the bucket `size` (width, height), RGB.

    `record_image` is the training image as loaded (EXIF orientation applied), before any resize.
    `transform` is the resize-and-crop applied to that training image (its crop plan); it is
    applied here to the map, so the two line up. Without one, the map is simply resized to `size`.
    Canny edges are computed after the transform, on the pixels the model trains on, so edges stay
    one pixel wide at the training resolution, as they are when users compute them at inference.
    """
    if source.kind == "canny":
        return canny(_fit(record_image.convert("RGB"), size, transform), source.low, source.high)
    if path is None:
        raise ValueError("conditioning kind 'folder' needs `path`, the file matched by find_conditioning")
    with Image.open(path) as raw:
        cond = ImageOps.exif_transpose(raw).convert("RGB")
    if cond.size != record_image.size:
        # Maps made at another resolution of the same picture are scaled to it, so that the crop
        # plan, made in the training image's pixels, cuts the same region; a different shape
        # would mean the map shows something else, and no crop could line it up.
        (cw, ch), (rw, rh) = cond.size, record_image.size
        if abs(cw / ch - rw / rh) > 0.01 * (rw / rh):
            raise ValueError(f"{path}: conditioning image is {cw}x{ch} but its training image is {rw}x{rh}; "
                             "the aspect ratios differ, so the two cannot be lined up")
        cond = cond.resize(record_image.size, Image.BICUBIC)
    return _fit(cond, size, transform)


def _fit(img: Image.Image, size: tuple[int, int], transform: Transform | None) -> Image.Image:
    out = img.resize(tuple(size), Image.BICUBIC) if transform is None else transform(img)
    if out.size != tuple(size):
        raise ValueError(f"the transform produced a {out.size[0]}x{out.size[1]} image, but the bucket is "
                         f"{size[0]}x{size[1]}; pass the training image's own crop plan")
    return out
