"""Precompute: every image encoded once by the VAE and every caption once by the text encoder.

The plan names every cache entry a training run needs by its content key, so nothing already in
the cache is computed again: adding ten images encodes ten; a new VAE, resolution, crop or mask
setting changes the keys and re-encodes; a run killed half-way resumes with what is missing.
Under several processes each rank encodes its own share and rank 0 merges the index once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ldmcore.faults import fault_point

from .buckets import BucketConfig, assign_bucket
from .config import DataConfig
from .control import ConditioningSource, conditioning_image, find_conditioning
from .diskspace import ensure_free_space
from .images import load_rgb, read_bytes
from .locks import FolderLock
from .loss_masks import loss_mask_image, mask_tensor, to_latent_size
from .masks import MaskConfig, make_mask, masked_image, variant_seed
from .records import ImageRecord, Manifest
from .store import ShardWriter, build_index, content_key, fingerprint, verify_shards, write_index
from .tags import caption_variants
from .transforms import CropPlan, apply, flipped, plan_crop, to_tensor

log = logging.getLogger(__name__)

STORES = ("latents", "text", "inpaint", "control")
PLAN = "plan.json"


@dataclasses.dataclass(frozen=True)
class CacheItem:
    """One training image, as the trainer reads it: its bucket and the keys of its cache entries.
    `latents`, `inpaint` and `control` have one entry per view (the picture, then its mirror)."""

    record: int
    role: str
    bucket: tuple[int, int]
    latents: tuple[str, ...]
    texts: tuple[str, ...]
    inpaint: tuple[tuple[str, ...], ...] = ()
    control: tuple[str, ...] = ()
    crops: tuple[dict, ...] = ()  # per view: original size, resize, crop offsets, flip (CropPlan.to_dict)
    captions: tuple[str, ...] = ()  # the caption texts, in the order of `texts`
    subset: int = 0  # which of data.subsets


@dataclasses.dataclass
class CachePlan:
    items: list[CacheItem]
    empty_text: str  # key of the empty caption's embedding, for caption dropout
    settings: dict

    def save(self, folder: Path) -> None:
        tmp = folder / (PLAN + ".partial")
        tmp.write_text(json.dumps({"settings": self.settings, "empty_text": self.empty_text,
                                   "items": [dataclasses.asdict(i) for i in self.items]}))
        os.replace(tmp, folder / PLAN)

    @classmethod
    def load(cls, folder: Path) -> CachePlan:
        raw = json.loads((folder / PLAN).read_text())
        items = [
            CacheItem(
                **{**i, "bucket": tuple(i["bucket"]), "latents": tuple(i["latents"]), "texts": tuple(i["texts"]),
                   "inpaint": tuple(tuple(v) for v in i["inpaint"]), "control": tuple(i["control"]),
                   "crops": tuple(i["crops"]), "captions": tuple(i.get("captions", ()))}
            )
            for i in raw["items"]
        ]
        return cls(items, raw["empty_text"], raw["settings"])


@dataclasses.dataclass(frozen=True)
class _ImageJob:
    record: int
    view: int  # 0 = as is, 1 = mirrored
    plan: object  # transforms.CropPlan
    latent: str
    inpaint: tuple[str, ...]
    mask_seeds: tuple[int, ...]
    control: str | None
    control_path: str | None  # the user's map, when control comes from a folder
    loss_mask_path: str | None = None  # data.loss_mask: folder, the picture's mask


def _control_source(cfg: DataConfig) -> ConditioningSource | None:
    cc = cfg.cache
    if cc.control is None:
        return None
    return ConditioningSource(kind=cc.control, folder=cc.control_dir, low=cc.canny_low, high=cc.canny_high)


def _text_key(caption: str, text_fp: str, cfg: DataConfig) -> str:
    return content_key("text", caption, text_fp, cfg.clip_skip, cfg.max_windows)


def _file_sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def bucket_config(cfg: DataConfig) -> BucketConfig:
    # the smallest bucket side is half the resolution (256 at 512 px), on the step grid
    min_bucket_side = max(cfg.bucket_step, cfg.resolution // 2 // cfg.bucket_step * cfg.bucket_step)
    return BucketConfig.from_resolution(
        cfg.resolution, step=cfg.bucket_step, min_side=min_bucket_side, no_upscale=cfg.no_upscale, max_aspect=cfg.max_aspect
    )


def crop_plan(rec: ImageRecord, cfg: DataConfig, bucket_cfg: BucketConfig) -> CropPlan:
    """The bucket and crop of a scanned picture (unflipped); the random crop depends on the picture
    and the seed, not on its place in the dataset."""
    w, h = assign_bucket(rec.width, rec.height, bucket_cfg.buckets(), no_upscale=cfg.no_upscale, step=cfg.bucket_step)
    return plan_crop(rec.width, rec.height, w, h, mode=cfg.cache.crop, seed=f"{cfg.seed}/{rec.sha256}")


def plan_cache(manifest: Manifest, cfg: DataConfig, vae_fp: str, text_fp: str) -> tuple[CachePlan, list[_ImageJob], list[str]]:
    """Every entry the data needs, by key: the plan the trainer reads, the image jobs, the captions."""
    # each subset's buckets: its own resolution where it has one (data.subsets[].resolution)
    bucket_cfgs = [bucket_config(cfg.model_copy(update={"resolution": sub.resolution}) if sub.resolution else cfg)
                   for sub in cfg.subsets] or [bucket_config(cfg)]
    cc = cfg.cache
    mask_cfg = MaskConfig(weights=cc.mask_weights)
    source = _control_source(cfg)
    maps: dict[str, Path] = {}
    if source is not None and source.kind == "folder":
        # every training image needs its map; a missing one is an error naming the stems
        maps, _ = find_conditioning(source.folder, [Path(r.source).stem for r in manifest.records], strict=True)
    masks: dict[str, Path] = {}
    if cfg.loss_mask == "folder":  # every picture needs its mask; a missing one is an error naming the stems
        masks, _ = find_conditioning(cfg.loss_mask_dir, [Path(r.source).stem for r in manifest.records], strict=True,
                                     what="loss mask")
    items, jobs, captions = [], [], {""}
    for r, rec in enumerate(manifest.records):
        mask_path = str(masks[Path(rec.source).stem]) if cfg.loss_mask == "folder" else None
        # a latent with a loss mask is another entry (the mask file's bytes count); without one, keys stay as they were
        with_mask = () if cfg.loss_mask is None else (cfg.loss_mask, _file_sha256(mask_path) if mask_path else None)
        bucket_cfg = bucket_cfgs[rec.subset]
        base = crop_plan(rec, cfg, bucket_cfg)
        bucket = (base.bucket_w, base.bucket_h)
        views = [base] + ([flipped(base)] if cc.flip else [])
        latent_keys, inpaint_keys, control_keys = [], [], []
        for view, plan in enumerate(views):
            latent = content_key("latent", rec.sha256, plan.to_dict(), bucket_cfg.to_dict(), cfg.background, vae_fp,
                                 *with_mask)
            base_seed = int(latent[:8], 16)
            seeds = tuple(variant_seed(base_seed, k) for k in range(cc.inpaint_masks))
            inpaint = tuple(content_key("inpaint", latent, mask_cfg.to_dict(), s) for s in seeds)
            control, control_path = None, None
            if source is not None:
                control_path = str(maps[Path(rec.source).stem]) if source.kind == "folder" else None
                control = content_key("control", rec.sha256, plan.to_dict(), source.to_dict(), control_path)
            jobs.append(_ImageJob(r, view, plan, latent, inpaint, seeds, control, control_path, mask_path))
            latent_keys.append(latent)
            inpaint_keys.append(inpaint)
            if control:
                control_keys.append(control)
        # tag captions: each caption's versions (data.tags, or its subset's); training picks one per epoch
        tags = cfg.subsets[rec.subset].tags if cfg.subsets else cfg.tags
        versions = tuple(v for c in rec.captions for v in caption_variants(c, tags, cfg.seed))
        captions.update(versions)
        texts = tuple(_text_key(c, text_fp, cfg) for c in versions)
        crops = tuple(v.to_dict() for v in views)
        items.append(
            CacheItem(r, rec.role, bucket, tuple(latent_keys), texts, tuple(inpaint_keys), tuple(control_keys), crops,
                      versions, rec.subset)
        )
    settings = {"data": cfg.model_dump(mode="json"), "vae": vae_fp, "text_encoder": text_fp}
    return CachePlan(items, _text_key("", text_fp, cfg), settings), jobs, sorted(captions)


class _Pictures(Dataset):
    """Decoding, resizing and cropping in DataLoader workers while the main process encodes."""

    def __init__(self, manifest: Manifest, jobs: Sequence[_ImageJob], cfg: DataConfig):
        self.manifest, self.jobs, self.cfg = manifest, list(jobs), cfg
        self.mask_cfg = MaskConfig(weights=cfg.cache.mask_weights)
        self.source = _control_source(cfg)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> dict:
        job = self.jobs[i]
        rec = self.manifest.records[job.record]
        data = read_bytes(rec.source)
        image = load_rgb(data, background=self.cfg.background)
        pixels = to_tensor(apply(image, job.plan))  # (3, H, W) in [-1, 1]
        out = {"index": i, "pixels": pixels}
        if self.cfg.loss_mask:  # cut as the picture is
            out["loss_mask"] = mask_tensor(apply(loss_mask_image(data, rec.source, self.cfg.loss_mask,
                                                                 job.loss_mask_path), job.plan))  # (1, H, W)
        h, w = pixels.shape[1:]
        if job.mask_seeds:
            masks = [make_mask(w, h, s, self.mask_cfg) for s in job.mask_seeds]
            out["masks"] = torch.stack([torch.from_numpy(m) for m in masks])  # (K, H, W), True = repaint
            out["masked"] = torch.stack([masked_image(pixels, m) for m in masks])  # (K, 3, H, W)
        if job.control is not None:
            cond = conditioning_image(
                image, self.source, size=(w, h), path=job.control_path, transform=lambda im: apply(im, job.plan)
            )
            out["control"] = torch.from_numpy(np.asarray(cond)).permute(2, 0, 1)  # (3, H, W) uint8
        return out


def _bucket_batches(manifest: Manifest, jobs: Sequence[_ImageJob], batch_size: int) -> list[list[int]]:
    """Batches of job indices, each from one picture size, so they stack."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, job in enumerate(jobs):
        by_size.setdefault((job.plan.bucket_w, job.plan.bucket_h), []).append(i)
    return [idx[s : s + batch_size] for _, idx in sorted(by_size.items()) for s in range(0, len(idx), batch_size)]


@dataclasses.dataclass
class PrecomputeReport:
    images_encoded: int
    captions_encoded: int
    already_cached: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images_encoded / self.seconds if self.seconds else 0.0


@torch.no_grad()
def precompute(
    manifest: Manifest,
    vae,
    prompt_encoder,
    cfg: DataConfig,
    cache_dir: str | os.PathLike,
    *,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
) -> tuple[CachePlan, PrecomputeReport]:
    """Fill `cache_dir` with what `manifest` needs and return the plan. Safe to rerun at any time, not
    by two runs at once: the first process holds the cache's lock (data_tools.locks) while it fills."""
    cache_dir = Path(cache_dir)
    with FolderLock(cache_dir, "cache") if rank == 0 else contextlib.nullcontext():
        return _fill(manifest, vae, prompt_encoder, cfg, cache_dir, rank, world_size, barrier, progress)


def _fill(manifest, vae, prompt_encoder, cfg: DataConfig, cache_dir: Path, rank: int, world_size: int, barrier,
          progress: bool) -> tuple[CachePlan, PrecomputeReport]:
    for store in STORES:
        (cache_dir / store).mkdir(parents=True, exist_ok=True)
    plan, jobs, captions = plan_cache(manifest, cfg, fingerprint(vae), text_fingerprint(prompt_encoder))
    if rank == 0:  # a damaged shard is moved aside before anyone reads the index: its entries are encoded again
        for store in STORES:
            verify_shards(cache_dir / store, progress=progress)
    if barrier is not None:
        barrier()
    have = {store: build_index(cache_dir / store) for store in STORES}
    if barrier is not None:
        # reading the index removes a dead run's .partial files: every rank must be past that
        # before any rank starts writing its own (a late rank deleted an early rank's shard)
        barrier()

    def missing(job: _ImageJob) -> bool:
        return (job.latent not in have["latents"] or any(k not in have["inpaint"] for k in job.inpaint)
                or (job.control is not None and job.control not in have["control"]))

    # Shares are cut from the whole job list, not from what is missing, so that every rank agrees
    # on them whatever the others have already written; then each does the part of its share
    # that is missing.
    todo = [j for j in jobs if missing(j)]
    mine = [j for j in sorted(jobs, key=lambda j: j.latent)[rank::world_size] if missing(j)]
    text_fp = plan.settings["text_encoder"]
    my_texts = [c for c in captions[rank::world_size] if _text_key(c, text_fp, cfg) not in have["text"]]
    if rank == 0 and todo:
        texts = [c for c in captions if _text_key(c, text_fp, cfg) not in have["text"]]
        ensure_free_space(cache_dir, cache_bytes(todo, texts, vae, prompt_encoder, cfg.loss_mask is not None),
                          "the cache")

    start = time.perf_counter()
    writers = {s: ShardWriter(cache_dir / s, writer=f"r{rank}", shard_entries=cfg.cache.shard_entries) for s in STORES}
    try:
        _encode_texts(my_texts, prompt_encoder, cfg, plan.settings["text_encoder"], writers["text"])
        _encode_images(manifest, mine, vae, cfg, writers, have, progress)
    except BaseException:
        for w in writers.values():  # what finished is kept when something failed (a signal), if it can be written
            try:
                w.close()
            except OSError as e:  # (the disk that failed is still full: the first error is the one to report)
                log.warning("could not keep the last entries: %s", e)
        raise
    for w in writers.values():
        w.close()
    seconds = time.perf_counter() - start

    if barrier is not None:
        barrier()
    if rank == 0:
        for store in STORES:
            write_index(cache_dir / store)
        plan.save(cache_dir)
    if barrier is not None:
        barrier()
    report = PrecomputeReport(len(mine), len(my_texts), len(jobs) - len(todo), seconds)
    return plan, report


def cache_bytes(jobs: Sequence[_ImageJob], captions: Sequence[str], vae, prompt_encoder,
                loss_masks: bool = False) -> int:
    """What encoding `jobs` and `captions` adds to the cache: fp16 latent mean and std per view (and
    its loss mask, one fp16 value per latent pixel, with `loss_masks`), the inpainting variants' mask
    and masked latent, control maps in bytes, and each caption's encoding as one encoded caption
    measures it (Flux's padded T5 states dominate: 4 MiB a caption)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    channels = vae.config.latent_channels
    total = 0
    for job in jobs:
        h, w = job.plan.bucket_h, job.plan.bucket_w
        latent = channels * (h // factor) * (w // factor) * 2
        total += 2 * latent + len(job.inpaint) * (latent + latent // channels)
        total += latent // channels if loss_masks else 0
        total += 3 * h * w if job.control is not None else 0
    if captions:
        encoded = prompt_encoder(list(captions[:1]))
        total += len(captions) * sum(v[0].numel() * 2 for v in encoded.values())
    return total


def text_fingerprint(prompt_encoder) -> str:
    """A hash of every text encoder's weights behind a family's prompt encoder (one: its own hash)."""
    prints = [fingerprint(m) for m in prompt_encoder.text_encoders]
    return prints[0] if len(prints) == 1 else content_key(*prints)


def _encode_texts(captions: list[str], prompt_encoder, cfg: DataConfig, text_fp: str, writer: ShardWriter) -> None:
    """Each caption's text conditioning as the family gives it: "hidden" (windows * 77, width) and,
    where the family has one, "pooled" (width,), in fp16."""
    batch = 32
    for s in range(0, len(captions), batch):
        chunk = captions[s : s + batch]
        encoded = {k: v.to(torch.float16) for k, v in prompt_encoder(chunk).items()}
        for j, caption in enumerate(chunk):
            writer.add(_text_key(caption, text_fp, cfg), {k: v[j] for k, v in encoded.items()})


def _encode_images(manifest, jobs, vae, cfg: DataConfig, writers, have, progress: bool) -> None:
    if not jobs:
        return
    loader = DataLoader(
        _Pictures(manifest, jobs, cfg),
        batch_sampler=_bucket_batches(manifest, jobs, cfg.cache.batch_size),
        num_workers=cfg.cache.num_workers,
        persistent_workers=False,
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="encoding images", unit="img")
    device, dtype = vae.device, vae.dtype
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    for batch in loader:
        pixels = batch["pixels"].to(device, dtype)  # (b, 3, H, W)
        post = vae.encode(pixels)
        for b, i in enumerate(batch["index"].tolist()):
            job = jobs[i]
            if job.latent not in have["latents"]:
                entry = {"mean": post.mean[b].half(), "std": post.std[b].half()}
                if "loss_mask" in batch:  # (1, h, w): each latent pixel the mean of the mask it covers
                    entry["loss_mask"] = to_latent_size(batch["loss_mask"][b : b + 1].float(), factor)[0].half()
                writers["latents"].add(job.latent, entry)
            if job.control is not None and job.control not in have["control"]:
                writers["control"].add(job.control, {"image": batch["control"][b]})
        if "masks" in batch:
            _encode_masked(batch, jobs, vae, factor, writers["inpaint"], have["inpaint"])
        if bar is not None:
            bar.update(len(batch["index"]))
        fault_point("cache_build")
    if bar is not None:
        bar.close()


def _encode_masked(batch, jobs, vae, factor: int, writer: ShardWriter, have) -> None:
    """For each mask variant: the mask at latent size and the latent of the picture with the
    masked region blanked (0 in [-1, 1] pixels), as 9-channel inpainting U-Nets take them."""
    masks, masked = batch["masks"], batch["masked"]  # (b, K, H, W), (b, K, 3, H, W)
    for k in range(masks.shape[1]):
        post = vae.encode(masked[:, k].to(vae.device, vae.dtype))
        small = F.interpolate(masks[:, k, None].float(), scale_factor=1 / factor, mode="nearest")  # (b, 1, h, w)
        for b, i in enumerate(batch["index"].tolist()):
            key = jobs[i].inpaint[k]
            if key not in have:
                writer.add(key, {"mask": small[b].half(), "masked_mean": post.mean[b].half()})


def process_state():
    """accelerate's view of this process (rank, count, device). Without a GPU, processes launched
    together form a CPU (gloo) group; accelerate only does that when told the run is on CPU."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def cache_dir_for(cfg: DataConfig) -> Path:
    """Where the cache lives: `data.cache.dir`, else a hidden folder inside the dataset (the first
    subset's; scans skip it)."""
    return Path(cfg.cache.dir) if cfg.cache.dir else Path(cfg.path or cfg.subsets[0].path) / ".ldm_cache"


def scan_data(cfg: DataConfig, progress: bool = True) -> Manifest:
    """The pictures of `data.path` (with `data.class_path`), or of every subset in `data.subsets`, each
    record marked with its subset and role. Raises ValueError when nothing is usable, naming the folders."""
    from .scan import scan

    common = dict(min_side=cfg.min_side, max_aspect=cfg.max_aspect, background=cfg.background, progress=progress)
    if not cfg.subsets:
        manifest = scan(cfg.path, instance_prompt=cfg.instance_prompt, class_path=cfg.class_path,
                        class_prompt=cfg.class_prompt, **common)
    else:
        manifest = Manifest(root=cfg.subsets[0].path)
        for i, sub in enumerate(cfg.subsets):
            part = scan(sub.path, instance_prompt=sub.caption, **common)
            if not part.records:
                raise ValueError(f"data.subsets[{i}] ({sub.path}): no usable images ({part.skipped_by_reason()}); "
                                 "run `python -m data_tools scan` on it for details")
            manifest.records += [dataclasses.replace(r, role=sub.role, subset=i) for r in part.records]
            manifest.skipped += part.skipped
            manifest.warnings += part.warnings
    if not manifest.records:
        raise ValueError(f"{cfg.path}: no usable images ({manifest.skipped_by_reason()}); "
                         "run `python -m data_tools scan` for details")
    return manifest


def prepare_cache(cfg: DataConfig, vae, prompt_encoder, *, progress: bool = True) -> tuple[CachePlan, PrecomputeReport]:
    """Scan the dataset and bring its cache up to date: what the `precompute` command and the
    trainers call. Under `accelerate launch` every process takes its share of the work."""
    state = process_state()
    cache_dir = cache_dir_for(cfg)
    manifest = scan_data(cfg, progress=progress and state.is_main_process)
    if state.is_main_process:
        manifest.save(cache_dir / "scan_report.json")
    return precompute(
        manifest, vae, prompt_encoder, cfg, cache_dir, rank=state.process_index, world_size=state.num_processes,
        barrier=state.wait_for_everyone if state.num_processes > 1 else None, progress=progress and state.is_main_process,
    )
