"""Class images for DreamBooth's prior preservation: pictures of the class ("a photo of a dog") drawn
by the model being tuned, so that learning one dog does not make every dog that dog.

The folder is filled up to a count and may be filled over several runs: every readable image in it
counts (a user may drop real photos in), a killed run loses only the batch it was drawing, and a
resumed run draws exactly the pictures an uninterrupted one would have. Generated files are named
`class_<index>.png`; the index fixes the picture, whatever happened to the folder in between.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from .images import IMAGE_EXTENSIONS

from ldmcore.checkpoints import Components
from ldmcore.pipeline import generate

log = logging.getLogger(__name__)

PARTIAL = ".partial"  # suffix of a file still being written; never counted, removed on the next run
_OURS = re.compile(r"class_(\d+)\.png")


def class_image_name(index: int) -> str:
    return f"class_{index:05d}.png"


def batch_seed(seed: int, batch: int) -> int:
    """The noise seed of generation batch `batch` (images batch*batch_size ...): a hash of both
    numbers, so runs with neighbouring seeds do not share pictures."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


def scan_class_folder(folder: str | os.PathLike) -> tuple[dict[int, Path], list[Path], list[tuple[Path, str]]]:
    """What a class folder holds: (our generated images by index, other readable images by name,
    unreadable image files with the reason). Files that are not images (captions, notes) and
    `.partial` leftovers are not listed."""
    ours: dict[int, Path] = {}
    others: list[Path] = []
    broken: list[tuple[Path, str]] = []
    suffixes = IMAGE_EXTENSIONS
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file() or path.name.endswith(PARTIAL) or path.suffix.lower() not in suffixes:
            continue
        try:
            with Image.open(path) as im:
                im.load()  # decode every byte: a truncated file opens fine and fails only here
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            broken.append((path, f"{type(e).__name__}: {e}"))
            continue
        match = _OURS.fullmatch(path.name)
        if match:
            ours[int(match.group(1))] = path
        else:
            others.append(path)
    return ours, others, broken


def ensure_class_images(
    components: Components,
    class_prompt: str,
    folder: str | os.PathLike,
    count: int,
    *,
    seed: int = 0,
    batch_size: int = 4,
    steps: int = 30,
    guidance_scale: float | None = None,
    sampler: str | None = None,
    size: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Generate images of `class_prompt` until `folder` holds `count` readable images; return
    `count` of them: generated ones by index, then the others by name. `size`: their side in pixels
    (the training resolution; None: the model's default).

    Image i comes from batch i // batch_size, drawn whole with seed `batch_seed(seed, batch)`, so
    with the same seed and batch size a missing index is redrawn pixel for pixel; a batch with a
    hole is drawn again in full and only the missing images are written. Each file is written
    under a `.partial` name and renamed when complete, so a killed run never leaves a PNG that
    opens but is cut short. Unreadable images are reported and not counted; a generated one is
    drawn again over itself. Call it from one process only (the main process under accelerate).
    """
    if count < 0 or batch_size < 1 or seed < 0:
        raise ValueError(f"ensure_class_images: need count >= 0, batch_size >= 1, seed >= 0; "
                         f"got count={count}, batch_size={batch_size}, seed={seed}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob("class_*.png" + PARTIAL):  # a run killed mid-write
        leftover.unlink()
    ours, others, broken = scan_class_folder(folder)
    for path, reason in broken:
        redo = " (it will be generated again)" if _OURS.fullmatch(path.name) else "; delete or replace it"
        log.warning("class image %s cannot be read (%s); not counted%s", path, reason, redo)

    needed = count - len(ours) - len(others)
    if needed > 0:
        todo = _missing_indices(set(ours), needed)
        batches: dict[int, list[int]] = {}
        for i in todo:
            batches.setdefault(i // batch_size, []).append(i)
        log.info("generating %d class images of %r into %s", needed, class_prompt, folder)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=needed, desc="class images", unit="img")
        for batch, indices in batches.items():
            images = generate(
                components, [class_prompt] * batch_size, seed=batch_seed(seed, batch),
                steps=steps, guidance_scale=guidance_scale, sampler=sampler, height=size, width=size,
            )
            for i in indices:
                ours[i] = _write_atomically(images[i - batch * batch_size], folder / class_image_name(i))
            if bar is not None:
                bar.update(len(indices))
        if bar is not None:
            bar.close()
    return ([ours[i] for i in sorted(ours)] + others)[:count]


def _missing_indices(present: set[int], needed: int) -> list[int]:
    """The `needed` smallest indices not yet on disk: holes first, then past the end."""
    out, i = [], 0
    while len(out) < needed:
        if i not in present:
            out.append(i)
        i += 1
    return out


def _write_atomically(image: Image.Image, path: Path) -> Path:
    tmp = path.with_name(path.name + PARTIAL)
    with open(tmp, "wb") as f:
        image.save(f, format="PNG")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
