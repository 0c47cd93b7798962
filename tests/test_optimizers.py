"""The optimizers beyond AdamW: Prodigy, schedule-free AdamW and Adafactor train through the real entry
point, resume exactly, and are refused clearly where they cannot run (DeepSpeed ZeRO, a schedule with
schedule-free AdamW, another optimizer's settings)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import accelerate_launcher, build_training_world
from safetensors.torch import load_file

from data_tools.schema import ConfigError
from trainers.config import read_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "tiny" / "lora.yaml"
SETTINGS = ["train.max_steps=4", "train.checkpoint_every=2", "loss.caption_dropout=0.3"]
OPTIMIZERS = {
    "prodigy": ["train.learning_rate=1.0", "train.lr_scheduler=cosine", "train.optimizer.prodigy.d_coef=0.5"],
    "adamw_schedulefree": ["train.learning_rate=1e-3", "train.optimizer.schedulefree.warmup_steps=1"],
    "adafactor": ["train.learning_rate=1e-3", "train.lr_scheduler=linear"],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_training_world(tmp_path_factory.mktemp("optimizers"))


def run(world: Path, out: Path, *overrides: str, launch=()) -> subprocess.CompletedProcess:
    cmd = [*launch] if launch else [sys.executable, "-m", "trainers"]
    cmd += [str(CONFIG), f"model.path={world / 'model'}", f"data.path={world / 'data'}", f"data.cache.dir={out}_cache",
            f"output_dir={out}", *SETTINGS, *overrides]
    return subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True)


def trained(out: Path, step: int) -> dict:
    return load_file(out / "checkpoints" / f"step_{step:08d}" / "trained.safetensors")


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_an_optimizer_trains_and_resumes_exactly(world, tmp_path, name):
    settings = [f"train.optimizer.name={name}", *OPTIMIZERS[name]]
    out = tmp_path / "run"
    proc = run(world, out, *settings)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, last = trained(out, 2), trained(out, 4)
    b = [k for k in last if "lora_B" in k]
    assert all(torch.isfinite(last[k]).all() for k in last)
    assert all(last[k].abs().sum() > 0 for k in b) and any(not torch.equal(first[k], last[k]) for k in b)
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    proc = run(world, resumed, *settings, "train.resume=latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = trained(resumed, 4)
    assert all(torch.equal(again[k], last[k]) for k in last), name
    exported = load_file(out / "pytorch_lora_weights.safetensors")  # (the diffusers layout: B as trained)
    total = sum(float(v.double().abs().sum()) for k, v in exported.items() if "lora_B" in k)
    trained_total = sum(float(last[k].double().abs().sum()) for k in b)
    if name == "adamw_schedulefree":  # it exports the average of its iterates, not the iterate it trains on
        assert abs(total - trained_total) > 1e-6 * trained_total
    else:
        assert total == pytest.approx(trained_total, rel=1e-6)


def test_optimizers_that_need_whole_parameters_are_refused_under_deepspeed(world, tmp_path):
    proc = run(world, tmp_path / "ds", "train.optimizer.name=prodigy", "train.learning_rate=1.0",
               launch=accelerate_launcher("zero2"))
    assert proc.returncode != 0 and "train.optimizer.name=prodigy needs every parameter whole" in proc.stderr
    assert "configs/accelerate/multi.yaml" in proc.stderr


def test_optimizer_settings_that_cannot_work_are_named(tmp_path):
    with pytest.raises(ConfigError, match="train.lr_scheduler: constant"):
        read_config(CONFIG, ["model.path=m", "data.path=d", "train.optimizer.name=adamw_schedulefree",
                             "train.lr_scheduler=cosine"])
    with pytest.raises(ConfigError, match="train.optimizer.prodigy is set but train.optimizer.name is adamw"):
        read_config(CONFIG, ["model.path=m", "data.path=d", "train.optimizer.prodigy.d_coef=2"])
    with pytest.raises(ConfigError, match="train.optimizer.name"):
        read_config(CONFIG, ["model.path=m", "data.path=d", "train.optimizer.name=sgd"])


def test_weights_and_biases_beside_tensorboard_writes_offline(world, tmp_path):
    """logging.report_to: [tensorboard, wandb]: both get the scalars and the validation grid; under
    WANDB_MODE=offline (the tests' setting) W&B writes its run into output_dir/logs/wandb."""
    out = tmp_path / "tracked"
    proc = run(world, out, "logging.report_to=[tensorboard, wandb]", "logging.run_name=tiny", "train.max_steps=2",
               "train.log_every=1", "validation.prompts=[a red circle]", "validation.steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((out / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), list((out / "logs").rglob("*"))[:20]
    assert list(runs[0].glob("files/media/images/validation_2_*.png"))  # the grid of step 2
    assert b"tiny" in next(runs[0].glob("*.wandb")).read_bytes()  # the run's name
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # TensorBoard's beside it
