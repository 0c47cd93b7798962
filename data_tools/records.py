"""What a scan of a dataset produces and every later stage consumes: one record per usable image,
one entry per skipped file with its reason, written to and read from a JSON manifest."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

MANIFEST_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """A usable training image.

    `source` says where the bytes are: a file path, or `"<dataset dir>#<row>"` for a dataset saved
    with the datasets library (see `data_tools.images.read_bytes`). `sha256` is the hash of those
    bytes; `width` and `height` are after EXIF orientation. `role` is "instance" for the images being
    learned and "class" for DreamBooth prior-preservation images.
    """

    source: str
    sha256: str
    width: int
    height: int
    captions: tuple[str, ...]
    role: str = "instance"
    conditioning: str | None = None  # a user-given ControlNet conditioning image, matched by stem
    subset: int = 0  # which of data.subsets it came from

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["captions"] = list(self.captions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageRecord:
        return cls(**{**d, "captions": tuple(d["captions"])})


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A file that cannot be used. `reason` is a short stable code (see REASONS)."""

    source: str
    reason: str
    detail: str = ""


REASONS = {
    "empty": "zero-byte file",
    "unreadable": "cannot be read or decoded",
    "truncated": "image data ends early",
    "not_an_image": "not an image file",
    "too_small": "shorter side under the minimum",
    "extreme_aspect": "aspect ratio beyond the maximum",
    "duplicate": "the same bytes as another image",
    "bad_caption": "caption file cannot be decoded as text",
}


@dataclasses.dataclass
class Manifest:
    """The result of a scan: usable records, skipped files, warnings (missing captions, ...)."""

    root: str
    records: list[ImageRecord] = dataclasses.field(default_factory=list)
    skipped: list[Skipped] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def skipped_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.skipped:
            counts[s.reason] = counts.get(s.reason, 0) + 1
        return dict(sorted(counts.items()))

    def to_json(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "root": self.root,
            "usable": len(self.records),
            "skipped_by_reason": self.skipped_by_reason(),
            "records": [r.to_dict() for r in self.records],
            "skipped": [dataclasses.asdict(s) for s in self.skipped],
            "warnings": self.warnings,
        }

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Manifest:
        raw = json.loads(Path(path).read_text())
        if raw.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path}: manifest version {raw.get('version')} is not {MANIFEST_VERSION}; scan again")
        return cls(
            root=raw["root"],
            records=[ImageRecord.from_dict(r) for r in raw["records"]],
            skipped=[Skipped(**s) for s in raw["skipped"]],
            warnings=list(raw["warnings"]),
        )
