"""Tag captions (`data.tags`, `data.subsets[].tags`): shuffled after the kept tags, dropped, prefixed; a
fixed number of versions per caption in the text cache, one picked per picture and epoch."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_training_world
from safetensors.torch import load_file

from data_tools.config import CaptionTags
from data_tools.tags import caption_variant, caption_variants

ROOT = Path(__file__).resolve().parent.parent
CAPTION = "1girl, red hair, smile, outdoors, blue sky, looking at viewer"


def tags_of(text: str) -> list[str]:
    return [t.strip() for t in text.split(",")]


def test_shuffled_captions_keep_the_kept_tags_first():
    settings = CaptionTags(shuffle=True, keep_tokens=2, variants=8)
    versions = caption_variants(CAPTION, settings, seed=0)
    assert len(versions) == 8 and len(set(versions)) == 8  # eight different orders
    for v in versions:
        assert tags_of(v)[:2] == ["1girl", "red hair"]  # kept in place
        assert sorted(tags_of(v)) == sorted(tags_of(CAPTION))  # nothing lost or added
    assert versions == caption_variants(CAPTION, settings, seed=0)  # drawn from the seed: the same every time
    assert versions != caption_variants(CAPTION, settings, seed=1)
    assert caption_variants(CAPTION, None, seed=0) == (CAPTION,)


def test_tag_dropout_leaves_the_kept_tags_and_the_prefix_and_suffix_go_around():
    settings = CaptionTags(keep_tokens=1, dropout=0.5, prefix="zorb, ", suffix=", masterpiece", variants=50)
    versions = caption_variants(CAPTION, settings, seed=0)
    counts = {t: sum(t in tags_of(v) for v in versions) for t in tags_of(CAPTION)}
    assert counts["1girl"] == len(versions)  # kept: in every version
    assert all(0 < counts[t] < len(versions) for t in tags_of(CAPTION)[1:])  # the others now in, now out
    assert all(v.startswith("zorb, 1girl") and v.endswith(", masterpiece") for v in versions)
    # without shuffling, the tags that stay keep their order
    for v in versions:
        inner = tags_of(v)[1:-1]
        assert inner == [t for t in tags_of(CAPTION) if t in inner]
    assert caption_variant("solo", CaptionTags(shuffle=True), 0, 3) == "solo"


def run(world: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainers", str(ROOT / "configs" / "tiny" / "lora.yaml"), f"model.path={world / 'model'}",
           f"data.path={world / 'data'}", f"data.cache.dir={out}_cache", f"output_dir={out}",
           "train.max_steps=4", "train.checkpoint_every=2", *overrides]
    return subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = build_training_world(tmp_path_factory.mktemp("tags"))
    for i, caption in enumerate(["red, circle, white background, small", "blue, circle, black background, large",
                                 "green, square, white background, small", "red, square, black background, large"]):
        (root / "data" / f"p{i}.txt").write_text(caption)
    return root


def test_a_run_caches_each_captions_versions_and_resumes_exactly(world, tmp_path):
    tags = "data.tags={shuffle: true, keep_tokens: 1, prefix: 'zorb, ', variants: 3}"
    out = tmp_path / "run"
    proc = run(world, out, tags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((Path(f"{out}_cache") / "plan.json").read_text())
    for item in plan["items"]:
        # up to 3 versions (repeats are kept out: 3 shuffled tags have 6 orders), each its own text entry
        assert 2 <= len(item["captions"]) <= 3 and len(set(item["captions"])) == len(set(item["texts"])) == len(item["texts"])
        first = {tags_of(c)[1] for c in item["captions"]}
        assert len(first) == 1 and all(c.startswith("zorb, ") for c in item["captions"])  # the kept tag, then the rest
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    proc = run(world, resumed, tags, "train.resume=latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(out / "checkpoints" / "step_00000004" / "trained.safetensors")
    b = load_file(resumed / "checkpoints" / "step_00000004" / "trained.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
