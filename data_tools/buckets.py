"""Aspect-ratio buckets and the batch sampler that keeps every batch inside one bucket.

Training at a single square size crops away the sides of every wide or tall image. Instead each image
goes to the bucket (a width x height, both multiples of the latent stride times the VAE factor) whose
aspect ratio is closest to its own, with an area no larger than the model's native one, so a batch of
one bucket stacks into a single tensor without padding.
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Any

from torch.utils.data import Sampler

Bucket = tuple[int, int]  # (width, height) in pixels


def _floor_to(x: float, step: int) -> int:
    return int(x // step) * step


def make_buckets(
    max_area: int, step: int = 64, min_side: int = 256, max_side: int | None = None, max_aspect: float = 4.0
) -> list[Bucket]:
    """All (width, height) buckets: sides multiples of `step` within [min_side, max_side], area at most
    `max_area`, aspect ratio (long side / short side) at most `max_aspect`.

    For every width the tallest height that fits the area is taken (a bucket smaller than needed only
    throws pixels away), and every bucket is added in both orientations so that portrait and landscape
    images are treated alike. The square bucket is always included. `max_side` defaults to
    `max_area // min_side`, the longest side a bucket with the shortest side can have. The list is
    sorted by aspect ratio (tallest first), then width, so the same arguments give the same list.
    """
    if step <= 0 or min_side <= 0 or min_side % step:
        raise ValueError(f"min_side={min_side} must be a positive multiple of step={step}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect={max_aspect} must be at least 1 (it is long side / short side)")
    if max_side is None:
        max_side = _floor_to(max_area // min_side, step)
    if max_side % step:
        raise ValueError(f"max_side={max_side} must be a multiple of step={step}")
    square = _floor_to(math.isqrt(max_area), step)
    if not min_side <= square <= max_side:
        raise ValueError(
            f"max_area={max_area} gives a {square}x{square} square bucket outside [min_side={min_side}, "
            f"max_side={max_side}]; raise max_area or lower min_side"
        )
    buckets = {(square, square)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, _floor_to(max_area // width, step))
        if height >= min_side and max(width, height) <= max_aspect * min(width, height):
            buckets.update({(width, height), (height, width)})
    return sorted(buckets, key=lambda b: (Fraction(b[0], b[1]), b[0]))


def assign_bucket(
    width: int, height: int, buckets: Sequence[Bucket], no_upscale: bool = False, step: int = 64
) -> Bucket:
    """The bucket for a `width` x `height` image: the closest aspect ratio in log space, ties broken by
    the larger area, then the smaller width.

    The distance |log(bucket aspect / image aspect)| is compared exactly as the rational
    max(r, 1/r) with r = (bw * h) / (bh * w), so ties are real ties and not float noise.

    With `no_upscale`, an image smaller than that bucket on either side is not enlarged: the bucket
    shrinks to (min(bw, w floored to step), min(bh, h floored to step)), at least `step` per side. Each
    side then fits inside the image (so the cover-resize scale is at most 1) and the area stays within
    the bucket's, hence within max_area. Such a bucket need not be in `buckets`; it holds only images of
    that size, so small images make small batches. `step` should be the one the buckets were made
    with; an image under `step` pixels on a side is still enlarged to `step` (the scan drops such images).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} must be positive")
    if not buckets:
        raise ValueError("no buckets to choose from; make_buckets gave an empty list, check its limits")

    def key(b: Bucket) -> tuple[Fraction, int, int]:
        r = Fraction(b[0] * height, b[1] * width)
        return (max(r, 1 / r), -b[0] * b[1], b[0])

    bw, bh = min(buckets, key=key)
    if no_upscale and (bw > width or bh > height):
        bw = max(step, min(bw, _floor_to(width, step)))
        bh = max(step, min(bh, _floor_to(height, step)))
    return bw, bh


@dataclasses.dataclass(frozen=True)
class BucketConfig:
    """The bucket settings of a run. The cache puts `to_dict()` in its content hashes, so every field
    that changes which bucket an image lands in is here, with `max_side` already resolved."""

    max_area: int
    step: int = 64
    min_side: int = 256
    max_side: int | None = None
    max_aspect: float = 4.0
    no_upscale: bool = False

    @classmethod
    def from_resolution(cls, resolution: int, **kwargs: Any) -> BucketConfig:
        """Buckets around the model's native square size: 512 for SD 1.x, 768 for SD 2.x."""
        return cls(max_area=resolution * resolution, **kwargs)

    def resolved_max_side(self) -> int:
        return self.max_side if self.max_side is not None else _floor_to(self.max_area // self.min_side, self.step)

    def buckets(self) -> list[Bucket]:
        return make_buckets(self.max_area, self.step, self.min_side, self.max_side, self.max_aspect)

    def assign(self, width: int, height: int) -> Bucket:
        return assign_bucket(width, height, self.buckets(), self.no_upscale, self.step)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["max_side"] = self.resolved_max_side()
        d["max_aspect"] = float(self.max_aspect)
        return d


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices, each from one bucket, split across ranks, resumable mid-epoch.

    Epoch `e` (seeded by (seed, e), the same on every rank): shuffle the indices within each bucket,
    cut each bucket into batches of `batch_size`, shuffle the order of all batches. Rank r of W then
    takes batches r, r+W, r+2W, ... Every rank gets the same number of batches, because a step on one
    rank waits for the gradients of the others:
      - drop_last=False: a bucket's last batch may be short; the epoch's batch list is padded to a
        multiple of W by repeating its first batches, so a few images are seen twice per epoch.
      - drop_last=True: short batches are dropped, and so are the batches left over after the last
        full round of W; some images are not seen in an epoch (different ones each epoch).

    Position: `batches_done` counts the batches this rank has yielded in `epoch`. When the epoch's
    batches run out the position moves to (epoch + 1, 0), so a loop that never calls `set_epoch` still
    gets a fresh order each epoch. `set_epoch(e)` for another epoch starts it at batch 0; for the current
    epoch it keeps the position, so a restored sampler resumes where it was.

    Exact resume: `state_dict()` is only exact when the sampler is not read ahead of training. A
    DataLoader with workers fetches several batches ahead, so the trainer should save
    {"epoch": e, "batches_done": batches trained on this epoch} itself rather than this object's state.

    There is deliberately no public `batch_size` attribute: accelerate's BatchSamplerShard reads one and
    then assumes fixed-size batches, padding a short one with indices from other batches (other
    buckets). Without it accelerate shards whole batches. Either let accelerate shard a num_replicas=1
    sampler, or shard here and keep accelerate from sharding again; not both.
    """

    def __init__(
        self,
        bucket_of: Sequence[Bucket],
        batch_size: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        shuffle: bool = True,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        self._batch_size = batch_size
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.drop_last, self.shuffle = drop_last, shuffle
        groups: dict[Bucket, list[int]] = {}
        for index, bucket in enumerate(bucket_of):
            groups.setdefault(tuple(bucket), []).append(index)
        self._groups = [groups[b] for b in sorted(groups)]  # a fixed order, whatever the input order
        self.epoch = 0
        self.batches_done = 0

    def _num_batches(self) -> int:
        """Batches in one epoch over all ranks, before padding or dropping the remainder."""
        if self.drop_last:
            return sum(len(g) // self._batch_size for g in self._groups)
        return sum(math.ceil(len(g) / self._batch_size) for g in self._groups)

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank)."""
        n, w = self._num_batches(), self.num_replicas
        return n // w if self.drop_last else math.ceil(n / w)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches for `epoch`, in order: a pure function of the constructor's arguments."""
        rng = random.Random(f"{self.seed}/{epoch}")  # a str seed is hashed stably, unlike seed + epoch pairs
        batches: list[list[int]] = []
        for group in self._groups:
            group = list(group)
            if self.shuffle:
                rng.shuffle(group)
            for start in range(0, len(group), self._batch_size):
                batch = group[start : start + self._batch_size]
                if len(batch) == self._batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        total = len(self) * self.num_replicas
        if batches:
            batches = (batches * math.ceil(total / len(batches)))[:total]  # pads or drops to a multiple of W
        return batches[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        while self.batches_done < len(batches):
            batch = batches[self.batches_done]
            self.batches_done += 1
            yield batch
        self.epoch, self.batches_done = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        missing = {"epoch", "batches_done"} - set(state)
        if missing:
            raise KeyError(f"sampler state lacks {sorted(missing)}; it has {sorted(state)}")
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if not 0 <= done <= len(self):
            raise ValueError(
                f"sampler state batches_done={done} is outside [0, {len(self)}] batches per epoch; the "
                "dataset, batch_size or number of processes differs from the run being resumed"
            )
        self.epoch, self.batches_done = epoch, done
