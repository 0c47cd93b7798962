"""Random masks for inpainting training: which part of an image the model learns to repaint.

A mask is a (height, width) bool array, True where the image is to be repainted. Every mask is a
pure function of its seed and a `MaskConfig`, so the cache can store a seed and a config hash
instead of pixels, and a re-run draws the same masks. The kinds follow what inpainting models meet
at use: boxes and ellipses (objects a user selects), free-form brush strokes (what users paint in a
UI, as in LaMa's training masks) and the whole image (so the model keeps plain text-to-image).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import cv2
import numpy as np
import torch

KINDS = ("rectangle", "ellipse", "brush", "full")

# Bump when the drawing changes, so caches keyed on `MaskConfig.to_dict()` are rebuilt.
MASK_ALGORITHM_VERSION = 1


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """How masks are drawn. Fractions are of the image side (shorter side for brush width)."""

    weights: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"rectangle": 0.3, "ellipse": 0.2, "brush": 0.4, "full": 0.1}
    )
    shape_size: tuple[float, float] = (0.1, 0.6)  # rectangle/ellipse side, fraction of that image side
    brush_strokes: tuple[int, int] = (1, 4)  # strokes per mask
    brush_vertices: tuple[int, int] = (4, 12)  # points per stroke
    brush_step: tuple[float, float] = (0.05, 0.2)  # segment length, fraction of the longer side
    brush_width: tuple[float, float] = (0.03, 0.1)  # stroke thickness, fraction of the shorter side

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(KINDS)
        if unknown:
            raise ValueError(f"MaskConfig.weights: unknown kinds {sorted(unknown)}; choose from {list(KINDS)}")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"MaskConfig.weights must be non-negative with a positive sum, got {self.weights}")
        for name in ("shape_size", "brush_step", "brush_width"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"MaskConfig.{name} must satisfy 0 < low <= high <= 1, got {(lo, hi)}")
        for name in ("brush_strokes", "brush_vertices"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"MaskConfig.{name} must satisfy 1 <= low <= high, got {(lo, hi)}")

    def probabilities(self) -> dict[str, float]:
        """The weights normalised to sum to 1, over every kind in `KINDS` order (zeros included)."""
        total = float(sum(self.weights.values()))
        return {k: float(self.weights.get(k, 0.0)) / total for k in KINDS}

    def to_dict(self) -> dict[str, Any]:
        """A stable, JSON-able description: equal configs (whatever the weights' scale or key order)
        give equal dicts, and the drawing version is part of it, so a cache key built on it changes
        exactly when the masks would."""
        return {
            "version": MASK_ALGORITHM_VERSION,
            "weights": {k: round(p, 12) for k, p in self.probabilities().items()},
            **{f.name: list(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "weights"},
        }


def _pick_kind(rng: np.random.Generator, config: MaskConfig) -> str:
    probs = config.probabilities()
    return KINDS[int(rng.choice(len(KINDS), p=[probs[k] for k in KINDS]))]


def mask_kind(seed: int, config: MaskConfig) -> str:
    """The kind of mask `make_mask(..., seed, config)` draws (the first draw of the same stream)."""
    return _pick_kind(np.random.default_rng(seed), config)


def make_mask(width: int, height: int, seed: int, config: MaskConfig) -> np.ndarray:
    """A (height, width) bool mask, True = repaint, fully determined by `seed` and `config`.
    Never empty; only the "full" kind covers the whole image."""
    if width < 2 or height < 2:
        raise ValueError(f"mask size must be at least 2x2, got {width}x{height}")
    rng = np.random.default_rng(seed)
    kind = _pick_kind(rng, config)
    canvas = np.zeros((height, width), np.uint8)
    if kind == "full":
        canvas[:] = 1
    elif kind == "rectangle":
        w, h = _shape_size(rng, width, config), _shape_size(rng, height, config)
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        canvas[y0 : y0 + h, x0 : x0 + w] = 1
    elif kind == "ellipse":
        w, h = _shape_size(rng, width, config), _shape_size(rng, height, config)
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        angle = float(rng.uniform(0, 180))
        # Axes are half-sides; the centre lies inside the image, so the mask is never empty.
        cv2.ellipse(canvas, (cx, cy), (max(1, w // 2), max(1, h // 2)), angle, 0, 360, 1, thickness=-1)
    else:
        _draw_brush(canvas, rng, config)
    mask = canvas.astype(bool)
    if kind != "full" and mask.all():  # a brush that happened to cover everything: keep one pixel
        mask[0, 0] = False
    return mask


def _shape_size(rng: np.random.Generator, side: int, config: MaskConfig) -> int:
    lo, hi = config.shape_size
    size = int(round(rng.uniform(lo, hi) * side))
    return min(max(size, 1), side - 1)  # at least a pixel, never the whole side


def _draw_brush(canvas: np.ndarray, rng: np.random.Generator, config: MaskConfig) -> None:
    """Free-form strokes: random walks with random turns, drawn as thick polylines with round joints,
    bouncing off the borders."""
    height, width = canvas.shape
    longer, shorter = max(width, height), min(width, height)
    for _ in range(int(rng.integers(config.brush_strokes[0], config.brush_strokes[1] + 1))):
        thickness = max(1, int(round(rng.uniform(*config.brush_width) * shorter)))
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        angle = float(rng.uniform(0, 2 * np.pi))
        point = (int(x), int(y))
        cv2.circle(canvas, point, max(1, thickness // 2), 1, thickness=-1)
        for _ in range(int(rng.integers(config.brush_vertices[0], config.brush_vertices[1] + 1))):
            angle += float(rng.uniform(-np.pi / 2, np.pi / 2))  # strokes turn, but rarely double back
            length = float(rng.uniform(*config.brush_step)) * longer
            x, flip_x = _bounce(x + length * np.cos(angle), width - 1)
            y, flip_y = _bounce(y + length * np.sin(angle), height - 1)
            if flip_x:
                angle = np.pi - angle
            if flip_y:
                angle = -angle
            nxt = (int(x), int(y))
            cv2.line(canvas, point, nxt, 1, thickness=thickness)
            cv2.circle(canvas, nxt, max(1, thickness // 2), 1, thickness=-1)
            point = nxt


def _bounce(v: float, top: float) -> tuple[float, bool]:
    """Reflect a walk off the image border (clamping would run strokes along the edges)."""
    if v < 0:
        return min(-v, top), True
    if v > top:
        return max(2 * top - v, 0.0), True
    return v, False


def variant_seed(base_seed: int, index: int) -> int:
    """The seed of variant `index` of an image: a hash of both numbers, so variants of different
    images never share seeds the way `base_seed + index` would."""
    if base_seed < 0 or index < 0:
        raise ValueError(f"seeds and indices must be non-negative, got base_seed={base_seed}, index={index}")
    return int(np.random.SeedSequence([base_seed, index]).generate_state(1)[0])


def mask_variants(width: int, height: int, base_seed: int, k: int, config: MaskConfig) -> list[np.ndarray]:
    """`k` masks for one image (K variants are cached per image, one drawn per epoch)."""
    return [make_mask(width, height, variant_seed(base_seed, i), config) for i in range(k)]


def masked_image(image: torch.Tensor, mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The inpainting model's extra input: `image` (3, h, w) in [-1, 1] with the masked region set
    to 0 (mid-grey), as diffusers' inpainting training computes it: `image * (mask < 0.5)`.

    `mask` is (h, w) or (1, h, w): bool, uint8 in {0, 255}, or float in [0, 1]; 1 = repaint.
    """
    m = torch.as_tensor(mask)
    if m.dtype == torch.bool:
        m = m.float()
    elif m.dtype == torch.uint8:
        m = m.float() / 255.0
    if m.dim() == 3 and m.shape[0] == 1:
        m = m[0]
    if image.dim() != 3 or m.shape != image.shape[-2:]:
        raise ValueError(f"masked_image: image {tuple(image.shape)} and mask {tuple(m.shape)} do not match; "
                         "expected (3, h, w) and (h, w)")
    keep = (m.to(image.device) < 0.5).to(image.dtype)
    return image * keep  # broadcasts (h, w) over the channels
