"""A content-addressed tensor store on disk: sharded, memory-mapped, safe against interruption.

Each entry is a key (a content hash, see `content_key`) holding a few named tensors. Entries are
written in shards, safetensors files of up to `shard_entries` entries each, named by writer so that
several processes can write side by side. A shard appears under its final name only once it is
complete (written as `.partial`, flushed, then renamed): a killed run loses at most the entries of
the shard it was filling, and never leaves a file that reads as valid but is not. The index (key ->
shard) is the union of the shards' headers, merged into `index.json` once after writing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

log = logging.getLogger(__name__)

INDEX = "index.json"
SHARD_GLOB = "shard-*.safetensors"
SEP = "/"  # tensor name inside a shard: "<key>/<field>"


def content_key(*parts: Any) -> str:
    """A stable hash of JSON-able parts (hashes of bytes, settings dicts, model fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def fingerprint(module: torch.nn.Module) -> str:
    """A hash of a model's weights (names, shapes, dtypes and bytes): changing any weight changes it."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


class ShardWriter:
    """Buffers entries and writes them out `shard_entries` at a time, each shard atomically."""

    def __init__(self, folder: str | os.PathLike, writer: str = "0", shard_entries: int = 256):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = writer
        self.shard_entries = shard_entries
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.written: list[Path] = []

    def add(self, key: str, tensors: Mapping[str, torch.Tensor]) -> None:
        self.pending[key] = {f: t.detach().cpu().contiguous() for f, t in tensors.items()}
        if len(self.pending) >= self.shard_entries:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        from ldmcore.faults import fault_point
        from ldmcore.weights import write_safetensors

        final = self.folder / f"shard-{self.writer}-{uuid.uuid4().hex[:12]}.safetensors"
        flat = {f"{key}{SEP}{field}": t for key, fields in self.pending.items() for field, t in fields.items()}
        fault_point("cache_write", final)
        write_safetensors(flat, final, {"entries": str(len(self.pending))})  # atomic, with its checksum
        self.written.append(final)
        self.pending = {}

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception the finished entries are still worth keeping: flush them too.
        self.flush()


def _shard_keys(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name.split(SEP, 1)[0] for name in f.keys()}


def build_index(folder: str | os.PathLike) -> dict[str, str]:
    """key -> shard file name, from every complete shard's header. Leftover `.partial` files from
    an interrupted run are removed: they were never complete."""
    folder = Path(folder)
    for partial in folder.glob("*.partial"):
        partial.unlink(missing_ok=True)
    index: dict[str, str] = {}
    for shard in sorted(folder.glob(SHARD_GLOB)):
        try:
            keys = _shard_keys(shard)
        except Exception as e:  # damaged after it was written (disk, copy): recompute its entries
            damaged = shard.with_name(shard.name + ".damaged")
            os.replace(shard, damaged)
            log.warning("%s: unreadable shard (%s), moved to %s; its entries will be computed again", shard, e, damaged.name)
            continue
        for key in keys:
            index.setdefault(key, shard.name)
    return index


def verify_shards(folder: str | os.PathLike, progress: bool = False) -> list[Path]:
    """Read every shard whole and check it against the checksum written with it; a damaged one
    (truncated, a flipped bit) is moved aside as `.damaged` so its entries are computed again
    rather than trained on. Returns the shards moved aside."""
    from ldmcore.weights import CheckpointError, read_safetensors

    shards = sorted(Path(folder).glob(SHARD_GLOB))
    bar = None
    if progress and shards:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(shards), desc=f"checking {Path(folder).name} cache", unit="shard")
    damaged = []
    for shard in shards:
        try:
            read_safetensors(shard)
        except CheckpointError as e:
            moved = shard.with_name(shard.name + ".damaged")
            os.replace(shard, moved)
            log.warning("%s; moved aside to %s, its entries will be computed again", e, moved.name)
            damaged.append(shard)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return damaged


def write_index(folder: str | os.PathLike) -> dict[str, str]:
    """Merge every shard into `index.json` (done once, by one process, after all have written)."""
    folder = Path(folder)
    index = build_index(folder)
    shards = sorted({name for name in index.values()})
    tmp = folder / (INDEX + ".partial")
    tmp.write_text(json.dumps({"shards": shards, "entries": index}))
    os.replace(tmp, folder / INDEX)
    return index


def load_index(folder: str | os.PathLike) -> dict[str, str]:
    """The index, from `index.json` when it covers exactly the shards on disk, else rebuilt."""
    folder = Path(folder)
    on_disk = sorted(p.name for p in folder.glob(SHARD_GLOB))
    path = folder / INDEX
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("shards") == on_disk or (not on_disk and not saved.get("entries")):
                return saved["entries"]
        except (json.JSONDecodeError, KeyError):
            pass
    return build_index(folder)


class ShardReader:
    """Random access to entries by key; shards are memory-mapped and opened on first use."""

    def __init__(self, folder: str | os.PathLike, index: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.index = load_index(self.folder) if index is None else index
        self._open: dict[str, Any] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def keys(self) -> Iterable[str]:
        return self.index.keys()

    def get(self, key: str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        try:
            shard = self.index[key]
        except KeyError:
            raise KeyError(f"{self.folder}: no cache entry {key}; run the precompute again") from None
        if shard not in self._open:
            handle = safe_open(str(self.folder / shard), framework="pt")
            fields: dict[str, list[str]] = {}
            for name in handle.keys():
                k, field = name.split(SEP, 1)
                fields.setdefault(k, []).append(field)
            self._open[shard] = (handle, fields)
        handle, fields = self._open[shard]
        return {field: handle.get_tensor(f"{key}{SEP}{field}") for field in fields[key]}

    def __getstate__(self):  # DataLoader workers reopen their own file handles
        return {"folder": self.folder, "index": self.index, "_open": {}}
