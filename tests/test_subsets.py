"""Several datasets in one run (`data.subsets`): each folder with its repeats, role and caption; an epoch
visits each picture `repeats` times; the plan is said at the start; resume stays exact."""
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_training_world
from PIL import Image
from safetensors.torch import load_file

from data_tools.buckets import BucketBatchSampler
from data_tools.schema import ConfigError
from trainers.config import read_config
from trainers.loop import epoch_items

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tiny" / "lora.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = build_training_world(tmp_path_factory.mktemp("subsets"))
    style = root / "style"  # a second folder: 3 pictures without captions (the subset's caption applies)
    style.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(style / f"s{i}.png")
    return root


def subsets(world: Path, repeats=(1, 3)) -> list[str]:
    return [f"data.subsets=[{{path: {world / 'data'}, repeats: {repeats[0]}}}, "
            f"{{path: {world / 'style'}, repeats: {repeats[1]}, caption: a green square}}]"]


def run(world: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainers", str(CONFIG), f"model.path={world / 'model'}", "data.path=null",
           f"data.cache.dir={out}_cache", f"output_dir={out}", *overrides]
    return subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True)


def test_repeats_set_how_often_an_epoch_visits_each_picture():
    """Two subsets, repeats 1 and 3: over one epoch of the sampler the loop builds, each picture of the
    first is drawn once and each of the second three times, for any batch size and process count that
    divides the epoch (otherwise the sampler repeats a few visits so every process gets whole batches)."""
    repeats = [1, 1, 1, 1, 3, 3, 3, 3]  # items 0-3 from the first subset, 4-7 from the second: 16 visits
    for batch, processes in ((1, 1), (2, 1), (2, 2), (4, 2)):
        items = epoch_items(repeats, heldout=[])
        visits = Counter()
        for rank in range(processes):
            sampler = BucketBatchSampler([(64, 64)] * len(items), batch, seed=0, num_replicas=processes, rank=rank)
            for positions in sampler:
                visits.update(items[p] for p in positions)
        assert dict(visits) == {**{i: 1 for i in range(4)}, **{i: 3 for i in range(4, 8)}}, (batch, processes)
    assert epoch_items(repeats, heldout=[5]) == [0, 1, 2, 3, 4, 4, 4, 6, 6, 6, 7, 7, 7]


def test_a_run_over_two_subsets_says_its_plan_and_resumes_exactly(world, tmp_path):
    settings = [*subsets(world), "train.max_steps=4", "train.checkpoint_every=2", "train.batch_size=2"]
    out = tmp_path / "run"
    proc = run(world, out, *settings)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"subset 0 (instance) {world / 'data'}: 4 pictures x 1 repeats = 4 visits an epoch" in proc.stderr
    assert f"subset 1 (instance) {world / 'style'}: 3 pictures x 3 repeats = 9 visits an epoch" in proc.stderr
    assert "an epoch: 13 visits, 7 batches of 2 per process" in proc.stderr
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    proc = run(world, resumed, *settings, "train.resume=latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(out / "checkpoints" / "step_00000004" / "trained.safetensors")
    b = load_file(resumed / "checkpoints" / "step_00000004" / "trained.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the uncaptioned pictures took their subset's caption
    report = (Path(f"{out}_cache") / "scan_report.json").read_text()
    assert report.count('"a green square"') == 3


def test_subset_mistakes_are_named_before_any_step(world, tmp_path):
    with pytest.raises(ConfigError, match=r"data\.subsets\.1\.repeats"):
        read_config(CONFIG, ["model.path=m", "data.path=null", *subsets(world, repeats=(1, 0))])
    with pytest.raises(ConfigError, match="data.path .* or data.subsets"):
        read_config(CONFIG, ["model.path=m", *subsets(world)])  # both
    proc = run(world, tmp_path / "gone", f"data.subsets=[{{path: {tmp_path / 'nowhere'}}}]", "train.max_steps=1")
    assert proc.returncode == 1 and str(tmp_path / "nowhere") in proc.stderr and "training:" not in proc.stderr, \
        proc.stderr[-2000:]


def test_a_subset_with_its_own_resolution_gets_its_own_buckets(world, tmp_path):
    from data_tools.config import DataConfig
    from data_tools.precompute import prepare_cache
    from ldmcore.checkpoints import load_components

    parts = load_components(world / "model")
    cfg = DataConfig(subsets=[{"path": str(world / "data")}, {"path": str(world / "style"), "resolution": 32,
                                                              "caption": "a green square"}],
                     resolution=64, bucket_step=16, min_side=32, cache={"dir": str(tmp_path / "cache"), "num_workers": 0})
    plan, _ = prepare_cache(cfg, parts.vae, parts.prompt_encoder(), progress=False)
    buckets = {item.subset: item.bucket for item in plan.items}
    assert buckets == {0: (64, 64), 1: (32, 32)}  # the square pictures at 64 and at 32 px


def test_dreambooth_takes_its_instance_and_class_pictures_as_subsets(world, tmp_path):
    """The class subset is the folder DreamBooth tops up with the base's pictures of its caption; the
    instance subset's caption names the subject."""
    classes = tmp_path / "classes"
    classes.mkdir()
    common = [str(ROOT / "configs" / "tiny" / "dreambooth.yaml"), f"model.path={world / 'model'}", "data.path=null",
              "data.instance_prompt=null", "data.class_path=null", "data.class_prompt=null", "train.max_steps=2",
              "dreambooth.num_class_images=2", "dreambooth.class_steps=2"]
    sources = (f"data.subsets=[{{path: {world / 'data'}, caption: a sks circle, repeats: 2}}, "
               f"{{path: {classes}, role: class, caption: a circle}}]")
    out = tmp_path / "db"
    proc = subprocess.run([sys.executable, "-m", "trainers", *common, sources, f"data.cache.dir={out}_cache",
                           f"output_dir={out}"], cwd=str(ROOT), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(classes.glob("*.png"))) == 2  # topped up by sampling the class caption
    assert f"subset 0 (instance) {world / 'data'}: 4 pictures x 2 repeats = 8 visits an epoch" in proc.stderr
    assert f"subset 1 (class) {classes}: 2 pictures, drawn beside the instance pictures" in proc.stderr
    nameless = f"data.subsets=[{{path: {world / 'data'}}}]"
    proc = subprocess.run([sys.executable, "-m", "trainers", *common, nameless, "dreambooth.prior_preservation=false",
                           f"output_dir={tmp_path / 'bad'}"], cwd=str(ROOT), capture_output=True, text=True)
    assert proc.returncode == 2 and "data.subsets[0].caption" in proc.stderr, proc.stderr[-2000:]
