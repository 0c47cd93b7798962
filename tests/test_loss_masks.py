"""Masked loss (`data.loss_mask`): masks from the alpha channel or a folder, cut with the picture's own crop
and flip, cached at latent size beside the latents, and weighing the loss so that what they mask out
does not train."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_training_world
from PIL import Image
from safetensors.torch import load_file

from data_tools.config import DataConfig
from data_tools.loss_masks import masked_mean
from data_tools.precompute import cache_dir_for, crop_plan, bucket_config, prepare_cache
from data_tools.scan import scan
from data_tools.store import ShardReader
from data_tools.transforms import apply
from ldmcore.checkpoints import load_components

ROOT = Path(__file__).resolve().parent.parent


def rgba_pictures(folder: Path, n: int = 4) -> list[np.ndarray]:
    """Pictures 96x64 whose alpha is opaque on a left-leaning wedge (so a flip or a crop shows)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    alphas = []
    for i in range(n):
        rgb = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
        yy, xx = np.mgrid[:64, :96]
        alpha = np.where(xx < 20 + yy // 2 + 4 * i, 255, 0).astype(np.uint8)
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text("a red circle")
        alphas.append(alpha)
    return alphas


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = build_training_world(tmp_path_factory.mktemp("masks"))
    rgba_pictures(root / "rgba")
    return root


def test_alpha_masks_are_cut_with_the_pictures_crop_and_flip_and_cached_at_latent_size(world, tmp_path):
    parts = load_components(world / "model")
    cfg = DataConfig(path=str(world / "rgba"), resolution=64, bucket_step=16, min_side=32, loss_mask="alpha",
                     cache={"dir": str(tmp_path / "cache"), "flip": True, "crop": "random", "num_workers": 0})
    plan, _ = prepare_cache(cfg, parts.vae, parts.prompt_encoder(), progress=False)
    store = ShardReader(cache_dir_for(cfg) / "latents")
    manifest = scan(cfg.path, min_side=32, progress=False)
    factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    for item in plan.items:
        rec = manifest.records[item.record]
        base = crop_plan(rec, cfg, bucket_config(cfg))
        for view, key in enumerate(item.latents):
            entry = store.get(key)
            cut = apply(Image.open(rec.source).getchannel("A"), base if view == 0 else base.__class__(
                **{**base.to_dict(), "flip": True}))
            expected = F.avg_pool2d(torch.from_numpy(np.asarray(cut, dtype=np.float32) / 255)[None, None], factor)[0]
            assert entry["loss_mask"].shape == (1, *entry["mean"].shape[1:])
            torch.testing.assert_close(entry["loss_mask"].float(), expected, atol=1e-3, rtol=0)
        assert not torch.equal(store.get(item.latents[0])["loss_mask"], store.get(item.latents[1])["loss_mask"])
    # the same pictures without masks are other cache entries (the masked ones are not reused for them)
    plain = DataConfig(**{**cfg.model_dump(), "loss_mask": None})
    plan_plain, _ = prepare_cache(plain, parts.vae, parts.prompt_encoder(), progress=False)
    assert not set(plan_plain.items[0].latents) & set(plan.items[0].latents)


def test_the_disk_check_counts_every_cached_byte_masks_included(world, tmp_path, monkeypatch):
    """What the cache build asks the disk for (data_tools.diskspace) is what it then writes, tensor for tensor."""
    import data_tools.precompute as precompute

    asked = []
    monkeypatch.setattr(precompute, "ensure_free_space", lambda folder, size, what: asked.append(size))
    parts = load_components(world / "model")
    cfg = DataConfig(path=str(world / "rgba"), resolution=64, bucket_step=16, min_side=32, loss_mask="alpha",
                     cache={"dir": str(tmp_path / "cache"), "flip": True, "num_workers": 0})
    prepare_cache(cfg, parts.vae, parts.prompt_encoder(), progress=False)
    written = 0
    for store in ("latents", "text"):
        reader = ShardReader(cache_dir_for(cfg) / store)
        written += sum(t.numel() * t.element_size() for k in reader.keys() for t in reader.get(k).values())
    assert any("loss_mask" in ShardReader(cache_dir_for(cfg) / "latents").get(k)
               for k in ShardReader(cache_dir_for(cfg) / "latents").keys())
    assert asked == [written]


def test_a_masked_out_region_does_not_change_the_loss():
    """The loss weighs the error by the mask: whatever happens where the mask is black does not count."""
    g = torch.Generator().manual_seed(0)
    error = torch.rand(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :, :3] = 1.0  # the left 3 columns train
    changed = error.clone()
    changed[:, :, :, 3:] += 5.0  # the background's error grows
    assert torch.equal(masked_mean(error, mask), masked_mean(changed, mask))
    inside = error.clone()
    inside[:, :, :, 0] += 5.0
    assert (masked_mean(inside, mask) > masked_mean(error, mask)).all()
    torch.testing.assert_close(masked_mean(error, torch.ones(2, 1, 8, 8)), error.mean(dim=(1, 2, 3)))
    assert torch.equal(masked_mean(error, None), error.mean(dim=(1, 2, 3)))
    assert torch.equal(masked_mean(error, torch.zeros(2, 1, 8, 8)), torch.zeros(2))  # all black: nothing


def run(world: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainers", str(ROOT / "configs" / "tiny" / "lora.yaml"), f"model.path={world / 'model'}",
           f"data.cache.dir={out}_cache", f"output_dir={out}", "train.max_steps=2", "train.checkpoint_every=2",
           "data.resolution=64", "data.bucket_step=16", *overrides]
    return subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True)


def test_pictures_masked_out_entirely_train_nothing_and_a_half_mask_trains(world, tmp_path):
    """Through the entry point: black masks for every picture give a zero loss, so the LoRA stays at its
    zero start; the alpha masks (a wedge of each picture) train it."""
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(4):
        Image.new("L", (96, 64), 0).save(masks / f"p{i}.png")
    proc = run(world, tmp_path / "black", f"data.path={world / 'rgba'}", "data.loss_mask=folder",
               f"data.loss_mask_dir={masks}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = load_file(tmp_path / "black" / "checkpoints" / "step_00000002" / "trained.safetensors")
    b = [k for k in trained if "lora_B" in k]
    assert b and all(trained[k].abs().sum() == 0 for k in b)
    proc = run(world, tmp_path / "alpha", f"data.path={world / 'rgba'}", "data.loss_mask=alpha")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = load_file(tmp_path / "alpha" / "checkpoints" / "step_00000002" / "trained.safetensors")
    assert all(trained[k].abs().sum() > 0 for k in b)


def test_masks_that_do_not_fit_are_named_before_any_step(world, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(3):  # p3 has none
        Image.new("L", (96, 64), 255).save(masks / f"p{i}.png")
    proc = run(world, tmp_path / "missing", f"data.path={world / 'rgba'}", "data.loss_mask=folder",
               f"data.loss_mask_dir={masks}")
    assert proc.returncode == 1 and "no loss mask for 1 training image(s): 'p3'" in proc.stderr, proc.stderr[-2000:]
    Image.new("L", (48, 32), 255).save(masks / "p3.png")
    proc = run(world, tmp_path / "small", f"data.path={world / 'rgba'}", "data.loss_mask=folder",
               f"data.loss_mask_dir={masks}")
    assert proc.returncode == 1 and "p3.png is 48x32 but its picture" in proc.stderr and "96x64" in proc.stderr
    assert "training:" not in proc.stderr
    proc = run(world, tmp_path / "nodir", f"data.path={world / 'rgba'}", "data.loss_mask=folder")
    assert proc.returncode == 2 and "data.loss_mask_dir" in proc.stderr
