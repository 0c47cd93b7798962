"""The one way an image's bytes are found and decoded: `read_bytes` for where they live, `load_rgb` for
what they show. The scan validates every image through these two functions and the cache encodes
through them, so a file the scan accepts is a file the cache can read, pixel for pixel."""
from __future__ import annotations

import functools
import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


# What counts as an image file wherever a folder is read (scan, control maps, class images). HEIC,
# HEIF and AVIF are listed so that such files are reported as unusable rather than silently ignored.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif", ".heic", ".heif"}
)


class ImageError(ValueError):
    """Image bytes that cannot be used. `reason` is a code from `data_tools.records.REASONS`,
    `detail` says what is wrong in words, `source` names the file or dataset row when it is known."""

    def __init__(self, reason: str, detail: str, source: str | None = None):
        self.reason, self.detail, self.source = reason, detail, source
        super().__init__(f"{source}: {detail}" if source else detail)


# ---------------------------------------------------------------------------------------------
# Where the bytes are


def read_bytes(source: str) -> bytes:
    """The bytes of a file path, or of row N of a dataset saved with `datasets`' `save_to_disk`,
    written `"<dataset dir>#<N>"` (the image column is the first column with the `Image` feature)."""
    if os.path.isfile(source):
        return _read_file(source)
    folder, sep, row = source.rpartition("#")
    if sep and row.isdigit() and os.path.isdir(folder):
        ds, column = load_saved_dataset(folder)
        if int(row) >= len(ds):
            raise ImageError("unreadable", f"row {row} is past the end of the dataset ({len(ds)} rows); scan again", source)
        return dataset_image_bytes(ds[int(row)][column], folder, source)
    raise ImageError("unreadable", "no such file (moved or deleted since the scan?)", source)


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageError("unreadable", f"cannot be read: {e.strerror or e}", path) from e


@functools.lru_cache(maxsize=8)
def load_saved_dataset(folder: str) -> tuple[Any, str]:
    """A dataset saved with `save_to_disk` and its image column, the image column set to give the
    stored bytes (`decode=False`) so that decoding goes through `load_rgb` like every other image."""
    import datasets  # heavy (about a second): only when a dataset is actually read

    try:
        ds = datasets.load_from_disk(folder)
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, arrow errors ...
        raise ImageError("unreadable", f"not a dataset saved with save_to_disk ({e})", folder) from e
    if not isinstance(ds, datasets.Dataset):
        splits = ", ".join(ds)
        raise ImageError("unreadable", f"holds several splits ({splits}); name one: {folder}/<split>", folder)
    column = next((name for name, f in ds.features.items() if isinstance(f, datasets.Image)), None)
    if column is None:
        columns = ", ".join(f"{name} ({type(f).__name__})" for name, f in ds.features.items())
        raise ImageError("unreadable", f"no column has the datasets Image feature; columns are {columns}. "
                         "Cast the image column with ds.cast_column(name, datasets.Image()) and save again", folder)
    return ds.cast_column(column, datasets.Image(decode=False)), column


def dataset_image_bytes(value: dict[str, Any] | None, folder: str, source: str) -> bytes:
    """The bytes of one undecoded `Image` value: `{"bytes": ..., "path": ...}`. Datasets built from
    files embed the bytes; a value holding only a path is read from it (as given, else beside the dataset)."""
    if value is None or (value.get("bytes") is None and not value.get("path")):
        return b""  # a row with no image: reported as empty
    if value.get("bytes") is not None:
        return value["bytes"]
    path = value["path"]
    for candidate in (path, os.path.join(folder, path)):
        if os.path.isfile(candidate):
            return _read_file(candidate)
    raise ImageError("unreadable", f"the row points to {path}, which does not exist", source)


# ---------------------------------------------------------------------------------------------
# What the bytes show

# Leading bytes of the formats people put in training folders: used only to say, when Pillow cannot
# identify the data, whether it is a damaged image or something that never was one.
_SIGNATURES = [
    (0, b"\xff\xd8\xff", "JPEG"), (0, b"\x89PNG\r\n\x1a\n", "PNG"), (0, b"GIF8", "GIF"),
    (0, b"II*\x00", "TIFF"), (0, b"MM\x00*", "TIFF"), (8, b"WEBP", "WebP"),
    (4, b"ftypavif", "AVIF"), (4, b"ftypheic", "HEIC"), (4, b"ftypheix", "HEIC"), (4, b"ftypmif1", "HEIF"),
]


def load_rgb(data: bytes, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode image bytes fully into an 8-bit RGB image, upright per its EXIF orientation.

    Transparency (RGBA, LA, palettes with a transparent index, grey or RGB with a transparent
    colour) is composited onto `background`; 16-bit and 32-bit grey is scaled from 0..65535 to
    0..255 with rounding; CMYK is converted without colour management. 16-bit RGB(A) PNGs reach
    us as 8 bits already: Pillow keeps the high byte of each sample. Animated images give their
    first frame. Raises `ImageError` with reason empty / not_an_image / truncated / unreadable.
    """
    if not data:
        raise ImageError("empty", "zero-byte file (an interrupted download or copy?)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(*_unidentified(data)) from None
    except Image.DecompressionBombError as e:
        raise ImageError("unreadable", f"{e}; resize it before training") from None
    except Exception as e:  # damaged headers make plugins raise almost anything
        raise ImageError("unreadable", f"{img_format(data) or 'image'} header cannot be parsed ({e})") from None
    try:
        img.load()  # the full decode: truncation and corrupt data show here, not at open()
        ImageOps.exif_transpose(img, in_place=True)
        return _to_rgb(img, background)
    except (OSError, EOFError) as e:
        if "truncated" in str(e).lower() or isinstance(e, EOFError):
            raise ImageError("truncated", f"{img.format} data ends early ({e}); copy or download it again") from None
        raise ImageError("unreadable", f"{img.format} data is corrupt ({e})") from None
    except Exception as e:  # SyntaxError, ValueError, struct.error ... from corrupt data or metadata
        raise ImageError("unreadable", f"{img.format} image cannot be decoded ({type(e).__name__}: {e})") from None


def img_format(data: bytes) -> str:
    """The format the leading bytes announce ("JPEG", "PNG", ...), or "" when none of the known ones."""
    return next((name for at, magic, name in _SIGNATURES if data[at:at + len(magic)] == magic), "")


def _unidentified(data: bytes) -> tuple[str, str]:
    """(reason, detail) for bytes that Pillow cannot identify as any image format."""
    fmt = img_format(data)
    if fmt in ("HEIC", "HEIF", "AVIF"):
        return "unreadable", f"a {fmt} image, which this Pillow cannot decode; convert it to JPEG or PNG"
    if fmt:
        return "truncated", f"starts like a {fmt} file but its header is cut short or damaged; copy it again"
    if data.startswith(b"%PDF"):
        return "not_an_image", "a PDF document, not an image; export its pages as PNG to use them"
    try:
        data[:4096].decode("utf-8")
        return "not_an_image", "a text file, not an image (a caption or note with an image extension?)"
    except UnicodeDecodeError:
        return "not_an_image", "not in any image format Pillow can read"


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (and PNG's 16-bit grey opened as 32-bit "I"): round v * 255 / 65535, never clip at 255
        a = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img, mode = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L"), "L"
    if mode == "P":
        has_alpha = "transparency" in img.info or (img.palette is not None and img.palette.mode == "RGBA")
        img, mode = img.convert("RGBA" if has_alpha else "RGB"), ("RGBA" if has_alpha else "RGB")
    elif mode in ("L", "RGB", "1") and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"  # a single colour declared transparent (PNG tRNS)
    if mode in ("LA", "La", "PA", "RGBa"):
        img, mode = img.convert("RGBA"), "RGBA"
    if mode == "RGBA":
        canvas = Image.new("RGBA", img.size, (*background, 255))
        return Image.alpha_composite(canvas, img).convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")  # L, 1, CMYK, YCbCr; an unsupported mode raises ValueError -> unreadable
