"""Training batches of pictures themselves, for training the VAE (which the latent cache needs).

Pictures are scanned, bucketed and cropped exactly as the cache would (`precompute.crop_plan`),
decoded once and kept in memory as uint8: this serves the tiny world's few thousand small
pictures; a VAE fine-tune on a large real dataset would want a streaming reader instead.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import DataConfig
from .images import load_rgb, read_bytes
from .precompute import bucket_config, crop_plan
from .transforms import apply


class PixelDataset(Dataset):
    def __init__(self, cfg: DataConfig, progress: bool = False):
        from tqdm.auto import tqdm

        from .precompute import scan_data

        manifest = scan_data(cfg, progress=progress)
        buckets = bucket_config(cfg)
        self.keys, self.pictures, self._buckets = [], [], []
        for rec in tqdm(manifest.records, desc="decoding", unit="img", disable=not progress):
            plan = crop_plan(rec, cfg, buckets)
            picture = apply(load_rgb(read_bytes(rec.source), background=cfg.background), plan)
            self.pictures.append(torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1))  # (3, H, W) uint8
            self._buckets.append((plan.bucket_w, plan.bucket_h))
            self.keys.append(rec.sha256)

    def __len__(self) -> int:
        return len(self.pictures)

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return self._buckets

    def set_epoch(self, epoch: int) -> None:
        pass

    def __getitem__(self, i: int) -> dict:
        return {"pixels": self.pictures[i].float() / 127.5 - 1.0}  # (3, H, W) in [-1, 1]

    def empty_text(self) -> dict[str, torch.Tensor]:
        return {"hidden": torch.zeros(1, 1)}  # no text here; the loop asks every dataset for it
