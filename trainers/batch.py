"""Batches as the loop handles them: dicts of tensors (nested dicts for the text conditioning:
{"text": {"hidden": ..., "pooled": ...}}) and lists of plain values (captions)."""
from __future__ import annotations

import torch


def collate(items: list[dict]) -> dict:
    """Stack tensors, recursing into dicts; other values (captions) become lists."""
    first = items[0]
    return {k: collate([it[k] for it in items]) if isinstance(first[k], dict)
            else torch.stack([it[k] for it in items]) if torch.is_tensor(first[k])
            else [it[k] for it in items]
            for k in first}


def to_device(batch: dict, device) -> dict:
    """Floating tensors to float32 on the device (the cache stores fp16; steps compute in float32 and
    autocast lowers what mixed precision may), other tensors to the device, the rest as it is."""
    def move(v):
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if torch.is_tensor(v):
            return v.to(device, torch.float32) if v.is_floating_point() else v.to(device)
        return v

    return move(batch)


def concat(a: dict, b: dict) -> dict:
    """Two batches as one: tensors concatenated on the batch axis, lists joined."""
    return {k: concat(a[k], b[k]) if isinstance(a[k], dict)
            else torch.cat([a[k], b[k]]) if torch.is_tensor(a[k])
            else list(a[k]) + list(b[k])
            for k in a}


def select(text: dict, keep: torch.Tensor, other: dict) -> dict:
    """Per sample, `text` where `keep` (b,) is true and `other` (unbatched) elsewhere."""
    return {k: torch.where(keep.view(-1, *[1] * (v.ndim - 1)), v, other[k].to(v)) for k, v in text.items()}
