"""Scan a dataset: find its images and captions, decode every image once, and write down which can be
trained on and why each other file cannot.

Where the images come from is read off the folder:
- a dataset saved with `datasets`' `save_to_disk` (`state.json` + `dataset_info.json`, or a
  `dataset_dict.json` over split folders): the first `Image` column, captions from `text` or `caption`;
- any other folder, walked recursively in name order: every file with an image extension; its captions
  come from a `metadata.jsonl` / `metadata.csv` in its folder (the datasets imagefolder convention:
  `file_name` plus `text`, which may be a list in jsonl), else from a sidecar with the same stem
  (`.txt`, `.caption`; one caption per non-empty line).
DreamBooth is the folder case with an `instance_prompt`, plus a `class_path` scanned the same way with
role "class" and its `class_prompt`.

An image without a caption falls back to the prompt given for its role, else to its file name with
`_` and `-` read as spaces, else to the empty caption; each fallback is a warning naming the file. A
caption file that is not UTF-8 makes its image unusable (reason "bad_caption"): guessing the encoding
or silently training on a fallback would teach the model the wrong words.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from data_tools.images import IMAGE_EXTENSIONS, ImageError, dataset_image_bytes, load_rgb, load_saved_dataset, read_bytes
from data_tools.records import ImageRecord, Manifest, Skipped

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_COLUMNS = ("text", "caption")


class ScanError(ValueError):
    """A path or argument the scan cannot start from; the message names it and says what to do."""


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """One image to examine, with everything known about its captions before its bytes are read."""

    source: str  # what the record will say: an absolute path or "<dataset dir>#<row>"
    label: str  # the same, shortened for messages
    role: str
    stem: str  # the file name the last-resort caption is made from; "" when there is none
    captions: tuple[str, ...] = ()  # given by metadata or a dataset column
    sidecar: bool = False  # look for <stem>.txt / <stem>.caption when `captions` is empty
    why_uncaptioned: str = ""  # how the warning explains a fallback (a missing sidecar adds its part)
    data: bytes | None = None  # bytes already in hand (dataset rows); None: read `source`


@dataclasses.dataclass(frozen=True)
class _Outcome:
    sha256: str | None
    record: ImageRecord | None = None
    skipped: Skipped | None = None
    warnings: tuple[str, ...] = ()


def scan(
    path: str | os.PathLike,
    *,
    instance_prompt: str | None = None,
    class_path: str | os.PathLike | None = None,
    class_prompt: str | None = None,
    min_side: int = 256,
    max_aspect: float = 4.0,
    caption_extensions: tuple[str, ...] = (".txt", ".caption"),
    background: tuple[int, int, int] = (255, 255, 255),
    progress: bool = True,
    workers: int | None = None,
) -> Manifest:
    """Examine every image under `path` (and `class_path`) and return the manifest. Nothing in the
    data stops the scan: each unusable file becomes a `Skipped` with its reason. Bad arguments and
    unreadable metadata files raise `ScanError` before any image is read. `workers` threads decode in
    parallel (default: up to 8); the manifest is the same for any number of them."""
    root = _folder(path, "the dataset path")
    class_root = _folder(class_path, "--class-path") if class_path is not None else None
    if class_root is not None and not class_prompt:
        raise ScanError(f"{class_root}: class images need a class prompt (e.g. --class-prompt 'a photo of a dog')")
    if class_prompt and class_root is None:
        raise ScanError("a class prompt was given without a class path: pass the folder of class images too")
    if class_root == root:
        raise ScanError(f"{root}: instance and class images are the same folder; keep class images apart")
    if min_side < 0 or not max_aspect >= 1 or (workers is not None and workers < 1):
        raise ScanError(f"need min side >= 0, max aspect >= 1, workers >= 1 (got {min_side}, {max_aspect}, {workers})")
    if any(not e.startswith(".") for e in caption_extensions):
        raise ScanError(f"caption extensions start with a dot, e.g. .txt (got {caption_extensions})")
    manifest = Manifest(root=str(root))
    sources = [_candidates(root, root, "instance", class_root, manifest)]
    if class_root is not None:
        sources.append(_candidates(class_root, root, "class", root, manifest))

    examine = functools.partial(_examine, prompts={"instance": instance_prompt, "class": class_prompt},
                                min_side=min_side, max_aspect=max_aspect, background=tuple(background),
                                caption_extensions=tuple(caption_extensions))
    workers = workers or min(8, os.cpu_count() or 1)
    first_of: dict[str, str] = {}  # sha256 -> label of the first usable image with those bytes
    candidates = itertools.chain.from_iterable(found for _, found in sources)
    with ThreadPoolExecutor(workers) as pool, tqdm(total=sum(n for n, _ in sources), unit="img",
                                                   desc="scan", disable=not progress) as bar:
        # chunks bound the bytes in flight (dataset rows carry theirs); map keeps the input order
        for chunk in iter(lambda: list(itertools.islice(candidates, 8 * workers)), []):
            for c, out in zip(chunk, pool.map(examine, chunk) if workers > 1 else map(examine, chunk)):
                bar.update()
                if out.sha256 is not None and out.sha256 in first_of:
                    manifest.skipped.append(Skipped(c.source, "duplicate", f"the same bytes as {first_of[out.sha256]}"))
                    continue
                manifest.warnings.extend(out.warnings)
                if out.record is not None:
                    first_of[out.sha256] = c.label
                    manifest.records.append(out.record)
                else:
                    manifest.skipped.append(out.skipped)
    return manifest


def _folder(path: str | os.PathLike, what: str) -> Path:
    p = Path(os.path.abspath(os.path.expanduser(path)))
    if not p.exists():
        raise ScanError(f"{p}: no such folder ({what})")
    if not p.is_dir():
        raise ScanError(f"{p}: {what} must be a folder of images or a saved dataset, not a file")
    return p


def _label(source: str, root: Path) -> str:
    prefix = str(root) + os.sep
    return source[len(prefix):] if source.startswith(prefix) else source


# ---------------------------------------------------------------------------------------------
# Finding the candidates: (how many, the candidates themselves)


def _candidates(folder: Path, root: Path, role: str, exclude: Path | None,
                manifest: Manifest) -> tuple[int, Iterable[_Candidate]]:
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError) as e:
            raise ScanError(f"{folder}/dataset_dict.json: cannot be read ({e}); save the dataset again") from None
        parts = [_dataset_rows(folder / s, root, role) for s in splits]
        return sum(n for n, _ in parts), itertools.chain.from_iterable(rows for _, rows in parts)
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        return _dataset_rows(folder, root, role)
    found = _folder_images(folder, root, role, exclude, manifest)
    return len(found), found


def _dataset_rows(folder: Path, root: Path, role: str) -> tuple[int, Iterator[_Candidate]]:
    try:
        ds, image_column = load_saved_dataset(str(folder))
    except ImageError as e:
        raise ScanError(str(e)) from None
    caption_column = next((c for c in CAPTION_COLUMNS if c in ds.column_names), None)
    why = f"row has an empty {caption_column}" if caption_column else "the dataset has no text or caption column"

    def rows() -> Iterator[_Candidate]:
        columns = [image_column] + ([caption_column] if caption_column else [])
        for i, row in enumerate(ds.select_columns(columns)):
            source = f"{folder}#{i}"
            value = row[image_column]
            try:
                data = dataset_image_bytes(value, str(folder), source)
            except ImageError:
                data = None  # a row pointing at a missing file: read_bytes reports it in the worker
            path = (value or {}).get("path") or ""
            yield _Candidate(source, _label(source, root), role, Path(path).stem,
                             _as_captions(row.get(caption_column)), why_uncaptioned=why, data=data)

    return len(ds), rows()


def _folder_images(folder: Path, root: Path, role: str, exclude: Path | None, manifest: Manifest) -> list[_Candidate]:
    listed: dict[str, tuple[tuple[str, ...], str]] = {}  # absolute path -> (captions, metadata file)
    images: list[str] = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and Path(here, d) != exclude)
        listed.update(_metadata(Path(here), files))
        images += [os.path.join(here, f) for f in sorted(files)
                   if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    on_disk = set(images)
    for p, (_, meta) in listed.items():  # listed files the walk did not find: elsewhere, or missing
        if p in on_disk:
            continue
        if os.path.isfile(p):
            images.append(p)
        else:
            manifest.skipped.append(Skipped(p, "unreadable", f"listed in {_label(meta, root)} but not found"))
    found = []
    for p in images:
        captions, meta = listed.get(p, ((), ""))
        stem = Path(p).stem
        why = f"no text for it in {_label(meta, root)}" if meta else ""
        found.append(_Candidate(p, _label(p, root), role, stem, captions, sidecar=True, why_uncaptioned=why))
    return found


def _metadata(folder: Path, files: list[str]) -> dict[str, tuple[tuple[str, ...], str]]:
    """The imagefolder metadata in one folder: absolute image path -> (captions, metadata file)."""
    present = [name for name in METADATA_FILES if name in files]
    if len(present) > 1:
        raise ScanError(f"{folder}: has both metadata.jsonl and metadata.csv; keep one")
    if not present:
        return {}
    meta = folder / present[0]
    try:
        text = meta.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ScanError(f"{meta}: cannot be read as UTF-8 text ({e}); re-save it as UTF-8") from None
    if meta.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows = [(n + 2, r) for n, r in enumerate(reader)]  # line 1 is the header
        if "file_name" not in (reader.fieldnames or []):
            raise ScanError(f"{meta}: the header has no file_name column (it has {reader.fieldnames})")
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ScanError(f"{meta}:{n}: not valid JSON ({e.msg}); fix or remove the line") from None
    out: dict[str, tuple[tuple[str, ...], str]] = {}
    for n, row in rows:
        if not isinstance(row, dict) or not row.get("file_name"):
            raise ScanError(f"{meta}:{n}: each row needs a file_name (the image's path relative to {folder})")
        p = os.path.normpath(os.path.join(folder, row["file_name"]))
        caption = next((row[c] for c in CAPTION_COLUMNS if c in row), None)
        # an image listed on several rows gets the captions of all of them
        out[p] = (out.get(p, ((), ""))[0] + _as_captions(caption), str(meta))
    return out


def _as_captions(value: object) -> tuple[str, ...]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return tuple(s for s in (str(v).strip() for v in values if v is not None) if s)


# ---------------------------------------------------------------------------------------------
# Examining one candidate (runs in a worker thread; everything it reports goes into the outcome)


def _examine(c: _Candidate, *, prompts: dict[str, str | None], min_side: int, max_aspect: float,
             background: tuple[int, int, int], caption_extensions: tuple[str, ...]) -> _Outcome:
    sha = None
    try:
        data = c.data if c.data is not None else read_bytes(c.source)
        if data:
            sha = hashlib.sha256(data).hexdigest()
        width, height = load_rgb(data, background).size
        if min(width, height) < min_side:
            return _Outcome(sha, skipped=Skipped(c.source, "too_small", f"{width}x{height}: the shorter side is under "
                                                 f"{min_side} px; use a larger original or lower --min-side"))
        if max(width, height) / min(width, height) > max_aspect:
            ratio = max(width, height) / min(width, height)
            return _Outcome(sha, skipped=Skipped(c.source, "extreme_aspect", f"{width}x{height} is {ratio:.1f}:1, beyond "
                                                 f"{max_aspect:g}:1; crop it or raise --max-aspect"))
        captions, why = c.captions, c.why_uncaptioned
        if not captions and c.sidecar:
            captions, no_sidecar = _sidecar(Path(c.source), caption_extensions)
            why = f"{why} and {no_sidecar}" if why else no_sidecar
        warnings = ()
        if not captions:
            captions, warning = _fallback(c, why, prompts[c.role])
            warnings = (warning,)
        record = ImageRecord(c.source, sha, width, height, captions, role=c.role)
        return _Outcome(sha, record=record, warnings=warnings)
    except ImageError as e:
        return _Outcome(sha, skipped=Skipped(c.source, e.reason, e.detail))
    except _BadCaption as e:
        return _Outcome(sha, skipped=Skipped(c.source, "bad_caption", str(e)))
    except Exception as e:  # a scan never stops halfway: anything unforeseen is reported on the file
        return _Outcome(sha, skipped=Skipped(c.source, "unreadable", f"unexpected {type(e).__name__}: {e}"))


class _BadCaption(Exception):
    pass


def _sidecar(image: Path, extensions: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """(captions, why there are none) from the first caption file beside the image."""
    for ext in extensions:
        p = image.with_suffix(ext)
        if not p.is_file():
            continue
        try:
            text = p.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            bad = e.object[e.start:e.start + 1].hex()
            raise _BadCaption(f"caption file {p.name} is not UTF-8 (byte 0x{bad} at offset {e.start}); "
                              "re-save it as UTF-8") from None
        except OSError as e:
            raise _BadCaption(f"caption file {p.name} cannot be read ({e.strerror or e})") from None
        return tuple(line.strip() for line in text.splitlines() if line.strip()), f"caption file {p.name} is empty"
    names = " or ".join(image.stem + ext for ext in extensions)
    return (), f"no caption file ({names})"


def _fallback(c: _Candidate, why: str, prompt: str | None) -> tuple[tuple[str, ...], str]:
    if prompt:
        return (prompt,), f"{c.label}: {why}; using the {c.role} prompt"
    from_name = re.sub(r"\s+", " ", re.sub(r"[_-]+", " ", c.stem)).strip()
    if from_name:
        return (from_name,), f"{c.label}: {why}; using its file name as the caption: '{from_name}'"
    return ("",), f"{c.label}: {why} and no file name to use; training it without a caption"
