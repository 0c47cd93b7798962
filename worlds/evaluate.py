"""Measured checks on the tiny world: does a model draw what its prompt asks?

Every check samples the model for prompts whose answer is known and scores the pictures with
the tiny world's detector (`worlds.detect`). The same numbers back the demo's summary, the
README's figures and the tests' thresholds.

    python -m worlds.evaluate base runs/tiny-world/base
    python -m worlds.evaluate concept runs/tiny-world/base --lora runs/tiny-world/demo/pytorch_lora_weights.safetensors \
        --word zorb   # the world's concept (World.concept), or --shape cross / --colour green
    python -m worlds.evaluate base runs/test-world/base --world test-world   # its own shapes and colours
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ldmcore.checkpoints import Components, load_components

from .detect import detect
from .world import SIZE, TINY_WORLD, WORLDS, Concept, World


@dataclass(frozen=True)
class Ask:
    """A prompt and what a correct picture shows (None: anything)."""

    prompt: str
    shape: str | None
    colour: str | None


def asks(word: str | None = None, shape: str | None = None, world: World = TINY_WORLD) -> list[Ask]:
    """Prompts 'a <colour> <shape word> on a <background> background' over the world's colours,
    cycling its backgrounds. With `word` and `shape`: the word stands for that shape (a trigger
    word); else every shape of the world."""
    pairs = [(word, shape)] if word else [(s, s) for s in world.shapes]
    backgrounds = world.backgrounds
    out = []
    for i, (colour, (w, s)) in enumerate((c, p) for p in pairs for c in world.colours):
        out.append(Ask(f"a {colour} {w} on a {backgrounds[i % len(backgrounds)]} background", s, colour))
    return out


def concept_asks(word: str, concept: Concept, world: World = TINY_WORLD) -> list[Ask]:
    """Prompts that use `word` for the concept: in place of the shape ('a red zorb on a white background',
    over the world's colours) or of the colour ('a zorb circle on a white background', over its shapes)."""
    if concept.kind == "shape":
        return asks(word, concept.value, world)
    backgrounds = world.backgrounds
    return [Ask(f"a {word} {shape} on a {backgrounds[i % len(backgrounds)]} background", shape, concept.value)
            for i, shape in enumerate(world.shapes)]


def sample(parts: Components, prompts: Sequence[str], seeds: Sequence[int], world: World = TINY_WORLD,
           **kwargs) -> list[list[Image.Image]]:
    """Pictures per seed (outer) and prompt (inner), the world's size, sampled as the world says
    (`World.sampling`; `kwargs` override); one batch per seed."""
    from ldmcore.pipeline import generate

    options = {"height": SIZE, "width": SIZE, **world.sampling, **kwargs}
    with torch.no_grad():
        return [generate(parts, list(prompts), seed=seed, **options) for seed in seeds]


@dataclass
class Score:
    shape: float  # share of pictures showing the asked shape
    colour: float  # ... the asked colour
    both: float
    pictures: list[list[Image.Image]]

    def line(self) -> str:
        return f"shape {self.shape:.0%}, colour {self.colour:.0%}, both {self.both:.0%}"

    def of(self, kind: str) -> float:
        """The share showing the asked "shape" or "colour" (a concept's kind)."""
        return {"shape": self.shape, "colour": self.colour}[kind]


def score(parts: Components, items: Sequence[Ask], seeds: Sequence[int] = (0, 1), world: World = TINY_WORLD,
          **kwargs) -> Score:
    """How often the pictures for `items` show what each asks (sampled as `world` says)."""
    pictures = sample(parts, [a.prompt for a in items], seeds, world, **kwargs)
    shape = colour = both = 0
    for row in pictures:
        for a, picture in zip(items, row):
            d = detect(picture)
            shape += a.shape is None or d.shape == a.shape
            colour += a.colour is None or d.colour == a.colour
            both += d.matches(a.shape, a.colour)
    n = len(items) * len(seeds)
    return Score(shape / n, colour / n, both / n, pictures)


def with_lora(parts: Components, lora_file: str | os.PathLike, scale: float = 1.0) -> Components:
    """The components with a LoRA file (either format) merged into the U-Net (and text encoder)."""
    import copy

    from adapters.lora import merge_lora

    merged = copy.deepcopy(parts)
    merge_lora(merged, lora_file, scale=scale)
    return merged


def grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str] = (), scale: int = 3) -> Image.Image:
    """Pictures in rows, each enlarged `scale` times (nearest: the pixels stay visible); a label
    column on the left when given."""
    from PIL import ImageDraw

    w, h = rows[0][0].width * scale, rows[0][0].height * scale
    left = 8 * max((len(s) for s in labels), default=0) // 1 if labels else 0
    out = Image.new("RGB", (left + w * max(len(r) for r in rows), h * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    for i, row in enumerate(rows):
        if labels:
            draw.text((4, i * h + h // 2 - 5), labels[i], fill="black")
        for j, picture in enumerate(row):
            out.paste(picture.resize((w, h), Image.NEAREST), (left + j * w, i * h))
    return out


# -- scores for what a picture keeps and where it draws (inpainting, ControlNet) --------------------


@dataclass(frozen=True)
class Repaint:
    """How an inpainted picture did on one ask."""

    drawn: bool  # the detector finds the asked shape, in the asked colour, inside the repainted region
    inside: float  # share of the detected shape's pixels that lie inside the region
    outside_change: float  # mean absolute change of the pixels outside the region, in 0..255 levels


def repaint_score(picture: Image.Image, original: Image.Image, region: np.ndarray, shape: str, colour: str,
                  min_inside: float = 0.9) -> Repaint:
    """`region` (H, W) bool: the pixels the inpainting was allowed to change (the mask's white)."""
    now = np.asarray(picture.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    before = np.asarray(original.convert("RGB"), dtype=np.float32)
    keep = ~region
    change = float(np.abs(now - before)[keep].mean()) if keep.any() else 0.0
    d = detect(picture)
    inside = float((d.mask & region).sum() / max(int(d.mask.sum()), 1))
    drawn = d.shape is not None and d.matches(shape, colour) and inside >= min_inside
    return Repaint(drawn, inside, change)


def shape_region(picture: Image.Image) -> np.ndarray:
    """The (H, W) bool pixels of the shape the detector finds, counted as the ground truth's masks
    count them (a pixel belongs when the shape covers at least half of it): the pixels nearer the
    shape's colour than the background's, in the parts that meet the detector's region. The
    detector's own region (any clear difference from the background) also takes in edge pixels the
    shape covers only partly. All False when it finds nothing."""
    import cv2

    d = detect(picture)
    if d.box is None:
        return np.zeros_like(d.mask)
    pixels = np.asarray(picture.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background, colour = np.median(border, axis=0), np.median(pixels[d.mask], axis=0)
    nearer = np.linalg.norm(pixels - colour, axis=-1) < np.linalg.norm(pixels - background, axis=-1)
    _, labels = cv2.connectedComponents(nearer.astype(np.uint8), connectivity=8)
    return np.isin(labels, np.unique(labels[d.mask & nearer])) & nearer


def mask_iou(picture: Image.Image, truth: np.ndarray) -> float:
    """Overlap (intersection over union) of the shape found in the picture (`shape_region`) with a
    (H, W) bool mask; 0 when nothing is found."""
    region = shape_region(picture)
    return float((region & truth).sum() / max(int((region | truth).sum()), 1))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worlds.evaluate", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="check", required=True)
    base = sub.add_parser("base", help="does the model draw the asked base shape and colour?")
    concept = sub.add_parser("concept", help="does a trigger word draw its new concept, and do base prompts survive?")
    for q in (base, concept):
        q.add_argument("model", help="a model folder or single file")
        q.add_argument("--seeds", type=int, default=2, help="pictures per prompt")
        q.add_argument("--json", help="also write the scores here")
        q.add_argument("--world", choices=sorted(WORLDS), default=TINY_WORLD.name, help="whose shapes and colours to ask for")
    concept.add_argument("--lora", help="a LoRA file to merge first")
    concept.add_argument("--word", required=True)
    what = concept.add_mutually_exclusive_group()
    what.add_argument("--shape", help="the shape the word stands for (default: the world's concept)")
    what.add_argument("--colour", help="the colour the word stands for")
    args = p.parse_args(argv)

    parts = load_components(args.model, dtype=torch.float32)
    seeds, world = list(range(args.seeds)), WORLDS[args.world]
    results = {}
    if args.check == "concept":
        if args.lora:
            parts = with_lora(parts, args.lora)
        meant = (Concept("shape", args.shape) if args.shape else Concept("colour", args.colour) if args.colour
                 else world.concept)
        results["trigger"] = score(parts, concept_asks(args.word, meant, world), seeds, world)
    results["base"] = score(parts, asks(world=world), seeds, world)
    for name, s in results.items():
        print(f"{name:8s} {s.line()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: {"shape": s.shape, "colour": s.colour, "both": s.both} for k, s in results.items()}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
