"""A detector for tiny-world pictures: which shape, which colour, where.

It knows the world's palette and shape templates (`worlds.pictures`) and nothing learned:
the background is the median of the picture's border, the shape is the largest connected region
that differs from it, its colour the nearest palette colour to the region's median, and its kind
the template that, stretched to the region's bounding box, overlaps it best (IoU). Generated
pictures are blurrier than drawn ones, so a region counts as a shape only when some template fits
it with IoU >= `min_iou`. Its accuracy on ground-truth pictures is tested (tests/test_world_pictures.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from .pictures import BACKGROUNDS, COLOURS, SHAPES, shape_mask

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that marks a shape's pixel
MIN_AREA = 0.03  # a region smaller than this share of the picture is noise, not a shape


@dataclass(frozen=True)
class Detection:
    shape: str | None  # None: no shape found, or none of the templates fits
    colour: str | None
    background: str
    box: tuple[int, int, int, int] | None  # x0, y0, x1, y1 of the region, x1/y1 exclusive
    iou: float  # of the best-fitting template with the region
    mask: np.ndarray  # (H, W) bool, the region

    def matches(self, shape: str | None = None, colour: str | None = None) -> bool:
        return (shape is None or self.shape == shape) and (colour is None or self.colour == colour)


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]], names: Sequence[str]) -> str:
    return min(names, key=lambda n: float(np.sum((rgb - np.array(palette[n], dtype=np.float32)) ** 2)))


def _largest_region(mask: np.ndarray) -> np.ndarray:
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros_like(mask)
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == biggest


def detect(image: Image.Image, shapes: Sequence[str] = tuple(SHAPES), colours: Sequence[str] = tuple(COLOURS),
           min_iou: float = 0.6) -> Detection:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    h, w, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    region = _largest_region(np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE)
    bg_name = _nearest(background, BACKGROUNDS, tuple(BACKGROUNDS))
    if region.sum() < MIN_AREA * h * w:
        return Detection(None, None, bg_name, None, 0.0, region)
    colour = _nearest(np.median(pixels[region], axis=0), COLOURS, colours)
    ys, xs = np.nonzero(region)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)

    def iou(shape: str) -> float:
        template = shape_mask(shape, box, h)
        return float((template & region).sum() / max((template | region).sum(), 1))

    scores = {s: iou(s) for s in shapes}
    best = max(scores, key=scores.get)
    return Detection(best if scores[best] >= min_iou else None, colour, bg_name, box, scores[best], region)


def share_matching(images: Sequence[Image.Image], shape: str | None = None, colour: str | None = None) -> float:
    """The fraction of pictures in which the detector finds `shape` (and `colour`, when given)."""
    if not images:
        return 0.0
    return sum(detect(im).matches(shape, colour) for im in images) / len(images)
