"""Training batches from the precomputed cache: posteriors, text embeddings, masks, control images.

Nothing is encoded here. Per item and epoch the dataset picks one view (the picture or its mirror),
one caption and one mask variant, each derived from (seed, epoch, item) so that a resumed run picks
what the uninterrupted run would have. The posterior is returned as mean and std: the trainer
draws the latent sample with its own generator.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import Dataset

from .precompute import STORES, CacheItem, CachePlan
from .store import ShardReader
from .transforms import CropPlan


class CachedDataset(Dataset):
    def __init__(self, cache_dir: str | os.PathLike, plan: CachePlan | None = None, seed: int = 0,
                 repeats: Sequence[int] = ()):
        self.cache_dir = Path(cache_dir)
        self.plan = plan or CachePlan.load(self.cache_dir)
        self.seed = seed
        # how many times an epoch visits each item: its subset's `repeats` (data.subsets), else once
        self.repeats = [repeats[it.subset] if repeats else 1 for it in self.plan.items]
        self.subsets = [it.subset for it in self.plan.items]  # which of data.subsets each item came from
        self.epoch = 0
        self.stores = {s: ShardReader(self.cache_dir / s) for s in STORES}
        missing = [k for item in self.plan.items for k in item.latents if k not in self.stores["latents"]]
        if missing:
            raise RuntimeError(
                f"{self.cache_dir}: {len(missing)} images are not in the cache (first key {missing[0]}); "
                "run `python -m data_tools precompute` again to complete it"
            )

    def __len__(self) -> int:
        return len(self.plan.items)

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """The bucket of every item, for `BucketBatchSampler`."""
        return [item.bucket for item in self.plan.items]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _choice(self, item: int, n: int, what: str) -> int:
        return random.Random(f"{self.seed}:{self.epoch}:{item}:{what}").randrange(n) if n > 1 else 0

    def __getitem__(self, i: int) -> dict:
        item: CacheItem = self.plan.items[i]
        view = self._choice(i, len(item.latents), "view")
        latent = self.stores["latents"].get(item.latents[view])
        c = self._choice(i, len(item.texts), "caption")
        text_key = item.texts[c] if item.texts else self.plan.empty_text
        crop = CropPlan.from_dict(item.crops[view])
        out = {
            "mean": latent["mean"],  # (4, h, w) fp16
            "std": latent["std"],
            # the family's text conditioning: "hidden" (77 * windows, width), maybe "pooled" (width,); fp16
            "text": self.stores["text"].get(text_key),
            # SDXL's micro-conditioning, from this view's own transform: original (h, w), crop (top, left),
            # target (h, w) in pixels; families without it ignore it
            "size": torch.tensor([crop.orig_h, crop.orig_w, *crop.crop_top_left, crop.bucket_h, crop.bucket_w]),
            "caption": item.captions[c] if item.captions else "",  # for a text encoder that trains
            "is_class": torch.tensor(item.role == "class"),
        }
        if "loss_mask" in latent:  # data.loss_mask: (1, h, w), the loss's weight per latent pixel
            out["loss_mask"] = latent["loss_mask"]
        if item.inpaint and item.inpaint[view]:
            variants = item.inpaint[view]
            entry = self.stores["inpaint"].get(variants[self._choice(i, len(variants), "mask")])
            out["mask"], out["masked_mean"] = entry["mask"], entry["masked_mean"]  # (1, h, w), (4, h, w)
        if item.control:
            out["control"] = self.stores["control"].get(item.control[view])["image"]  # (3, H, W) uint8
        return out

    def empty_text(self) -> dict[str, torch.Tensor]:
        """The empty caption's encoding (unbatched), for caption dropout (classifier-free guidance)."""
        return self.stores["text"].get(self.plan.empty_text)
