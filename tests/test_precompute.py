"""Precompute: scan -> cache -> batches, on a tiny VAE and text encoder built here."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, randomize_
from PIL import Image

from data_tools.config import DataConfig
from data_tools.dataset import CachedDataset
from data_tools.images import load_rgb, read_bytes
from data_tools.precompute import precompute
from data_tools.scan import scan
from data_tools.transforms import CropPlan, apply, to_tensor
from ldmcore.checkpoints import Components
from ldmcore.text import build_word_tokenizer

ROOT = Path(__file__).resolve().parent.parent
WORDS = "a red green blue circle square on white black background".split()
SIZES = [(64, 64), (96, 64), (64, 96), (80, 80), (128, 64), (64, 64)]


def write_picture(path: Path, size, seed: int, caption: str) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    path.with_suffix(".txt").write_text(caption)


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i, size in enumerate(SIZES):
        write_picture(folder / f"img{i}.png", size, i, f"a {WORDS[1 + i % 3]} circle")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)  # reported, never trained on
    return folder


@pytest.fixture(scope="module")
def parts():
    comps = Components.from_preset("tiny", build_word_tokenizer(WORDS))
    randomize_(comps.vae, seed=3, std=0.05)
    return comps


def config(folder: Path, **cache) -> DataConfig:
    return DataConfig(
        path=str(folder), resolution=64, bucket_step=16, min_side=32,
        cache={"batch_size": 2, "num_workers": 0, "shard_entries": 3, **cache},
    )


def run(parts, folder, cache_dir, **cache):
    cfg = config(folder, **cache)
    manifest = scan(folder, min_side=cfg.min_side, progress=False)
    plan, report = precompute(manifest, parts.vae, parts.prompt_encoder(), cfg, cache_dir, progress=False)
    return manifest, plan, report


def test_cache_holds_exactly_what_direct_encoding_gives(parts, dataset, tmp_path):
    manifest, plan, report = run(parts, dataset, tmp_path / "cache")
    assert [(Path(s.source).name, s.reason) for s in manifest.skipped] == [("broken.png", "truncated")]
    assert report.images_encoded == len(SIZES) == len(plan.items)
    data = CachedDataset(tmp_path / "cache")
    enc = parts.prompt_encoder()
    for i, item in enumerate(plan.items):
        rec = manifest.records[item.record]
        got = data[i]
        pixels = to_tensor(apply(load_rgb(read_bytes(rec.source)), CropPlan.from_dict(item.crops[0])))
        with torch.no_grad():
            post = parts.vae.encode(pixels[None])
            text = enc(list(rec.captions))["hidden"][0]
        bw, bh = item.bucket
        assert got["mean"].shape == (4, bh // 4, bw // 4)
        assert got["mean"].dtype == torch.float16
        torch.testing.assert_close(got["mean"].float(), post.mean[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(got["std"].float(), post.std[0], atol=2e-3, rtol=2e-3)
        assert set(got["text"]) == {"hidden"}  # SD conditions on hidden states only
        torch.testing.assert_close(got["text"]["hidden"].float(), text, atol=2e-3, rtol=2e-3)
        crop = CropPlan.from_dict(item.crops[0])
        assert got["size"].tolist() == [crop.orig_h, crop.orig_w, crop.crop_top, crop.crop_left, bh, bw]
    assert data.empty_text()["hidden"].shape == (77, 32)


def test_adding_images_encodes_only_the_new_ones(parts, dataset, tmp_path):
    run(parts, dataset, tmp_path / "cache")
    write_picture(dataset / "new1.png", (64, 64), 101, "a blue square")
    write_picture(dataset / "new2.png", (96, 64), 102, "a red square")
    _, plan, report = run(parts, dataset, tmp_path / "cache")
    assert report.images_encoded == 2
    assert report.already_cached == len(SIZES)
    assert len(CachedDataset(tmp_path / "cache")) == len(SIZES) + 2


def test_a_new_vae_or_resolution_re_encodes(parts, dataset, tmp_path):
    run(parts, dataset, tmp_path / "cache")
    other = Components.from_preset("tiny", parts.tokenizer)
    randomize_(other.vae, seed=9, std=0.05)
    cfg = config(dataset)
    manifest = scan(dataset, min_side=32, progress=False)
    _, report = precompute(manifest, other.vae, parts.prompt_encoder(), cfg, tmp_path / "cache", progress=False)
    assert report.images_encoded == len(SIZES)
    bigger = cfg.model_copy(update={"resolution": 96})
    _, report = precompute(manifest, parts.vae, parts.prompt_encoder(), bigger, tmp_path / "cache", progress=False)
    assert report.images_encoded == len(SIZES)
    _, report = precompute(manifest, parts.vae, parts.prompt_encoder(), cfg, tmp_path / "cache", progress=False)
    assert report.images_encoded == 0  # the first settings are still cached


KILLED_RUN = """
import os, sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_precompute import config, parts_for_subprocess
from data_tools.precompute import precompute
from data_tools.scan import scan
parts = parts_for_subprocess()
encode, calls = parts.vae.encode, []
def dying_encode(x):
    calls.append(1)
    if len(calls) > {batches}:
        os._exit(9)  # killed in the middle of the run
    return encode(x)
parts.vae.encode = dying_encode
folder = {folder!r}
cfg = config(__import__("pathlib").Path(folder), batch_size=1, shard_entries=2)
precompute(scan(folder, min_side=32, progress=False), parts.vae, parts.prompt_encoder(), cfg, {cache!r},
           rank={rank}, world_size={world}, progress=False)
"""


def parts_for_subprocess():
    comps = Components.from_preset("tiny", build_word_tokenizer(WORDS))
    randomize_(comps.vae, seed=3, std=0.05)
    return comps


def _spawn(folder, cache, batches=10**6, rank=0, world=1):
    code = KILLED_RUN.format(root=str(ROOT), tests=str(ROOT / "tests"), batches=batches, folder=str(folder),
                             cache=str(cache), rank=rank, world=world)
    return subprocess.run([sys.executable, "-c", code], cwd=str(ROOT)).returncode


def _all_entries(cache: Path) -> dict:
    data = CachedDataset(cache)
    return {k: data.stores["latents"].get(k) for item in data.plan.items for k in item.latents}


def test_a_killed_run_resumes_where_it_stopped(parts, dataset, tmp_path):
    assert _spawn(dataset, tmp_path / "killed", batches=3) == 9
    shards = list((tmp_path / "killed" / "latents").glob("shard-*.safetensors"))
    assert len(shards) == 1  # two batches of one picture made one full shard; the third was lost
    assert _spawn(dataset, tmp_path / "killed") == 0
    assert _spawn(dataset, tmp_path / "whole") == 0
    resumed, whole = _all_entries(tmp_path / "killed"), _all_entries(tmp_path / "whole")
    assert resumed.keys() == whole.keys() and len(whole) == len(SIZES)
    for k in whole:
        assert torch.equal(resumed[k]["mean"], whole[k]["mean"]) and torch.equal(resumed[k]["std"], whole[k]["std"])


def test_two_processes_give_the_same_cache_as_one(parts, dataset, tmp_path):
    # each rank encodes its share; the last one to finish (rank 0 here) merges the index
    assert _spawn(dataset, tmp_path / "two", rank=1, world=2) == 0
    assert _spawn(dataset, tmp_path / "two", rank=0, world=2) == 0
    assert _spawn(dataset, tmp_path / "one") == 0
    two_shards = {p.name.split("-")[1] for p in (tmp_path / "two" / "latents").glob("shard-*.safetensors")}
    assert two_shards == {"r0", "r1"}
    two, one = _all_entries(tmp_path / "two"), _all_entries(tmp_path / "one")
    assert two.keys() == one.keys()
    for k in one:
        assert torch.equal(two[k]["mean"], one[k]["mean"])


def test_inpainting_masks_control_maps_and_flips(parts, dataset, tmp_path):
    _, plan, report = run(parts, dataset, tmp_path / "cache", flip=True, inpaint_masks=2, control="canny")
    assert report.images_encoded == 2 * len(SIZES)  # each picture and its mirror
    data = CachedDataset(tmp_path / "cache")
    item = data[0]
    bw, bh = plan.items[0].bucket
    assert item["mask"].shape == (1, bh // 4, bw // 4) and item["masked_mean"].shape == (4, bh // 4, bw // 4)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    assert item["control"].shape == (3, bh, bw) and item["control"].dtype == torch.uint8
    views = {data.stores["latents"].get(k)["mean"].sum().item() for k in plan.items[0].latents}
    assert len(views) == 2  # the mirror is a different latent
    seen = set()
    for epoch in range(8):  # the view and mask variant drawn per epoch vary, reproducibly
        data.set_epoch(epoch)
        seen.add(data[0]["mean"].sum().item())
    assert seen == views


def test_precompute_command(parts, dataset, tmp_path):
    parts.save_pretrained(tmp_path / "model")
    cfg = tmp_path / "train.yaml"
    cfg.write_text(textwrap.dedent(f"""
        method: lora            # sections the command does not read are left for the trainer
        model: {{path: {tmp_path / 'model'}}}
        data:
          path: {dataset}
          resolution: 64
          bucket_step: 16
          min_side: 32
          cache: {{dir: {tmp_path / 'cache'}, num_workers: 1}}
    """))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "data_tools", "precompute", str(cfg), "--no-progress", *args],
                              cwd=str(ROOT), capture_output=True, text=True)

    first = cli()
    assert first.returncode == 0, first.stderr
    assert f"{len(SIZES)} images; 0 views already cached; encoded {len(SIZES)} views" in first.stdout
    assert len(CachedDataset(tmp_path / "cache")) == len(SIZES)
    assert (tmp_path / "cache" / "scan_report.json").is_file()
    again = cli()
    assert f"{len(SIZES)} views already cached; encoded 0 views" in again.stdout
    typo = cli("data.resolutoin=96")
    assert typo.returncode == 2
    assert "unknown key 'data.resolutoin'; did you mean 'data.resolution'?" in typo.stderr
    assert "Traceback" not in typo.stderr


def test_accelerate_launch_with_two_processes_matches_one(parts, dataset, tmp_path):
    parts.save_pretrained(tmp_path / "model")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {tmp_path / 'model'}}}\n"
                   f"data: {{path: {dataset}, resolution: 64, bucket_step: 16, min_side: 32,"
                   f" cache: {{batch_size: 1, num_workers: 0}}}}\n")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()), "-m", "data_tools", "precompute", str(cfg), "--no-progress"]
    two = subprocess.run([*launcher, f"data.cache.dir={tmp_path / 'two'}"], cwd=str(ROOT), capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "data_tools", "precompute", str(cfg), "--no-progress",
                          f"data.cache.dir={tmp_path / 'one'}"], cwd=str(ROOT), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    writers = {p.name.split("-")[1] for p in (tmp_path / "two" / "latents").glob("shard-*.safetensors")}
    assert writers == {"r0", "r1"}
    a, b = _all_entries(tmp_path / "two"), _all_entries(tmp_path / "one")
    assert a.keys() == b.keys() and len(a) == len(SIZES)
    assert all(torch.equal(a[k]["mean"], b[k]["mean"]) for k in a)
