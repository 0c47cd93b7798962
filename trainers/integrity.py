"""Checkpoint integrity: every file of a checkpoint is listed with its size and sha256 in
`checksums.json`, written just before `state.json` marks the folder complete. Resuming checks them,
so a truncated or bit-flipped checkpoint (a full disk, a bad copy, a download) is found before a
single step trains on it, and `train.resume=latest` falls back to the newest intact checkpoint."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (CHECKSUMS, "state.json"))


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(folder: Path) -> None:
    table = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)}
    (folder / CHECKSUMS).write_text(json.dumps(table, indent=1) + "\n")


def check_checkpoint(folder: Path) -> str | None:
    """None if every file of the checkpoint is as written; else what is wrong, naming the file. A
    checkpoint written before checksums existed passes with a warning."""
    path = folder / CHECKSUMS
    if not path.is_file():
        log.warning("%s has no %s (written by an older ldm-tune): its files cannot be checked", folder, CHECKSUMS)
        return None
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{path} is damaged"
    for name, want in table.items():
        file = folder / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != want["bytes"]:
            return f"{file} has {size} bytes, {want['bytes']} were written (truncated?)"
        if _sha256(file) != want["sha256"]:
            return f"{file} does not match the checksum written with it (damaged after it was written)"
    return None
