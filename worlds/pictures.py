"""The tiny world: seeded pictures of coloured shapes, their captions and their ground truth.

A scene is one shape of one colour in a square box on a plain or lightly textured background;
its caption names the three ("a red circle on a white background"). Shapes are polygons given in
a unit box, so the generator and the detector (`worlds.detect`) draw them the same way. The
world is small enough for a diffusion model to learn on a CPU in minutes and rich enough that a
picture can be checked: was the asked shape drawn, in the asked colour?
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

# Named RGB colours, far enough apart that a blurred picture still reads as one of them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 190),
    "orange": (245, 130, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
}


def _regular(n: int, inner: float | None = None, turn: float = 0.0) -> list[tuple[float, float]]:
    """A regular n-gon (or an n-pointed star with inner radius `inner`), pointing up, in [-1, 1]^2."""
    points = []
    steps = 2 * n if inner else n
    for k in range(steps):
        r = inner if inner and k % 2 else 1.0
        a = turn - math.pi / 2 + 2 * math.pi * k / steps
        points.append((r * math.cos(a), r * math.sin(a)))
    return points


def _unit_box(points: Sequence[tuple[float, float]]) -> tuple[tuple[float, float], ...]:
    """Stretch a polygon to fill [0, 1]^2 exactly, so a shape's box is its bounding box."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return tuple(((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in points)


# Every shape as a polygon in its own unit bounding box.
SHAPES: dict[str, tuple[tuple[float, float], ...]] = {
    "circle": _unit_box(_regular(64)),
    "square": ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "triangle": ((0.5, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "diamond": ((0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)),
    "star": _unit_box(_regular(5, inner=0.42)),
    "cross": ((0.32, 0.0), (0.68, 0.0), (0.68, 0.32), (1.0, 0.32), (1.0, 0.68), (0.68, 0.68),
              (0.68, 1.0), (0.32, 1.0), (0.32, 0.68), (0.0, 0.68), (0.0, 0.32), (0.32, 0.32)),
}

# What the tiny base learns; the others are new to it. The demo teaches it the cross, which stays
# recognisable through the 4x-downsampling VAE (the star's thin points blur into a pentagon).
BASE_SHAPES = ("circle", "square", "triangle", "diamond")
BASE_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
# Words the tokenizer knows but the base never reads in a caption, as real CLIP vocabularies hold
# rare tokens: fine-tuning methods bind them to a new concept.
SPARE_WORDS = ("sks", "zorb", "ohwx", "photo", "of")


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive
    textured: bool = False
    texture_seed: int = 0

    def caption(self, words: Mapping[str, str] | None = None) -> str:
        """'a red circle on a white background'; `words` renames a shape or a colour (a trigger word:
        {"cross": "zorb"} gives 'a red zorb on ...', {"green": "zorb"} 'a zorb circle on ...')."""
        words = words or {}
        colour, shape = words.get(self.colour, self.colour), words.get(self.shape, self.shape)
        return f"a {colour} {shape} on a {self.background} background"


def polygon_in_box(shape: str, box: Sequence[float], scale: int = 1) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    return [((x0 + u * (x1 - x0)) * scale, (y0 + v * (y1 - y0)) * scale) for u, v in SHAPES[shape]]


def _coverage(shape: str, box: Sequence[float], size: int, supersample: int) -> np.ndarray:
    """How much of each pixel the shape covers, (size, size) in [0, 1], drawn `supersample` times larger."""
    big = Image.new("L", (size * supersample, size * supersample), 0)
    ImageDraw.Draw(big).polygon(polygon_in_box(shape, box, supersample), fill=255)
    return np.asarray(big.resize((size, size), Image.BOX), dtype=np.float32) / 255


def shape_mask(shape: str, box: Sequence[float], size: int, supersample: int = 4) -> np.ndarray:
    """The (size, size) bool mask of the pixels a shape filling `box` covers at least half of."""
    return _coverage(shape, box, size, supersample) >= 0.5


def render(scene: Scene, size: int, supersample: int = 4) -> tuple[Image.Image, np.ndarray]:
    """The picture (antialiased: the shape is drawn `supersample` times larger) and the shape's mask."""
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    canvas = np.broadcast_to(bg, (size, size, 3)).copy()
    if scene.textured:  # soft blotches: a background a detector must see past
        rng = np.random.default_rng(scene.texture_seed)
        blotch = rng.normal(0, 1, (size // 4 + 1, size // 4 + 1)).astype(np.float32)
        canvas += 14.0 * np.asarray(Image.fromarray(blotch).resize((size, size), Image.BICUBIC))[..., None]
    alpha = _coverage(scene.shape, scene.box, size, supersample)[..., None]
    canvas = canvas * (1 - alpha) + np.array(COLOURS[scene.colour], dtype=np.float32) * alpha
    return Image.fromarray(np.clip(canvas, 0, 255).round().astype(np.uint8)), alpha[..., 0] >= 0.5


def random_scene(rng: np.random.Generator, size: int, shapes: Sequence[str] = BASE_SHAPES,
                 colours: Sequence[str] = BASE_COLOURS, backgrounds: Sequence[str] = tuple(BACKGROUNDS),
                 textured_share: float = 0.2, min_frac: float = 0.5, max_frac: float = 0.9) -> Scene:
    """A shape of random kind, colour, size (a share of the picture's side) and position."""
    side = int(rng.integers(round(min_frac * size), round(max_frac * size) + 1))
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, 2))
    return Scene(
        shape=str(rng.choice(shapes)), colour=str(rng.choice(colours)), background=str(rng.choice(backgrounds)),
        box=(x0, y0, x0 + side, y0 + side), textured=bool(rng.random() < textured_share),
        texture_seed=int(rng.integers(2**31)),
    )


def scenes(n: int, seed: int, size: int, **kwargs) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng, size, **kwargs) for _ in range(n)]


TRUTH_FILE = "truth.jsonl"


def write_dataset(folder: str | os.PathLike, items: Iterable[Scene], size: int,
                  words: Mapping[str, str] | None = None, progress: bool = False) -> Path:
    """Write `NNNNN.png` + `NNNNN.txt` (the caption) per scene and `truth.jsonl` with the ground
    truth (scene and caption) per file, in the captioned-folder layout `data_tools scan` reads.
    `words` renames shapes or colours in captions ({"star": "zorb"} teaches a trigger word)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items = list(items)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc=f"drawing {folder.name}", unit="img")
    lines = []
    for i, scene in enumerate(items):
        name = f"{i:05d}"
        picture, _ = render(scene, size)
        picture.save(folder / f"{name}.png")
        caption = scene.caption(words)
        (folder / f"{name}.txt").write_text(caption + "\n")
        lines.append(json.dumps({"file": f"{name}.png", "caption": caption, **asdict(scene)}))
    tmp = folder / (TRUTH_FILE + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, folder / TRUTH_FILE)  # written last: marks the folder complete
    return folder


def read_truth(folder: str | os.PathLike) -> list[tuple[str, Scene]]:
    """(file name, scene) for every picture of a folder written by `write_dataset`."""
    out = []
    for line in (Path(folder) / TRUTH_FILE).read_text().splitlines():
        row = json.loads(line)
        file = row.pop("file")
        row.pop("caption")
        out.append((file, Scene(**{**row, "box": tuple(row["box"])})))
    return out


def vocabulary() -> list[str]:
    """Every word a tiny-world caption can hold, plus the spare (never-trained) words."""
    return sorted({"a", "on", "background", *SHAPES, *COLOURS, *BACKGROUNDS, *SPARE_WORDS})
