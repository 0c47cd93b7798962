"""DeepSpeed ZeRO under two CPU processes (gloo): the shipped accelerate configs train LoRA and
full fine-tunes to what one process with twice the batch gives, resume exactly, write checkpoints
and exports that load without DeepSpeed, and refuse at start what cannot work."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import accelerate_launcher as launcher
from conftest import build_training_world
from safetensors.torch import load_file

from trainers.statefile import load_state

ROOT = Path(__file__).resolve().parent.parent
# DeepSpeed reduces in its own buckets and order: equal to one process up to float32 rounding
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_training_world(tmp_path_factory.mktemp("ds_world"))


def run(world: Path, method: str, out: Path, *overrides: str, launch=(), expect=0):
    cmd = [*launch] if launch else [sys.executable, "-m", "trainers"]
    cmd += [str(ROOT / "configs" / "tiny" / f"{method}.yaml"), f"model.path={world / 'model'}",
            f"data.path={world / 'data'}", f"data.cache.dir={world / 'cache'}", f"output_dir={out}", *overrides]
    proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


def trained(folder: Path) -> dict:
    return load_file(folder / "trained.safetensors")


def assert_same(actual: dict, expected: dict, exact=False):
    assert actual.keys() == expected.keys()
    for k in expected:
        if exact:
            assert torch.equal(actual[k], expected[k]), k
        else:
            torch.testing.assert_close(actual[k].float(), expected[k].float(), rtol=RTOL, atol=ATOL, msg=k)


# Both methods: 4 steps; the LoRA with a cosine schedule and caption dropout, the full fine-tune with
# an EMA (partitioned under ZeRO-3) and gradient accumulation.
SETTINGS = {
    "lora": ["train.max_steps=4", "train.checkpoint_every=2", "train.lr_scheduler=cosine", "train.warmup_steps=1",
             "loss.caption_dropout=0.3"],
    "full": ["train.max_steps=4", "train.checkpoint_every=2", "train.ema_decay=0.7", "train.learning_rate=1e-3",
             "full.single_file=false"],
}


@pytest.fixture(scope="module")
def one_process(world, tmp_path_factory):
    """The reference: each method on one process with the batch of two processes together."""
    outs = {}
    for method, settings in SETTINGS.items():
        outs[method] = tmp_path_factory.mktemp(f"one_{method}")
        run(world, method, outs[method], *settings, "train.batch_size=4")
    return outs


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_under_zero_equal_one_and_resume_exactly(world, one_process, tmp_path, method, stage):
    out = tmp_path / "ds"
    extra = ["validation.prompts=[a red circle]", "validation.steps=2", "validation.every=2"] if method == "lora" else []
    run(world, method, out, *SETTINGS[method], "train.batch_size=2", *extra, launch=launcher(stage))
    last = out / "checkpoints" / "step_00000004"
    shards = sorted(p.name for p in (last / "deepspeed" / "state").glob("*optim_states.pt"))
    assert len(shards) == 2, shards  # each rank wrote its own optimizer shard
    ref = one_process[method]
    assert_same(trained(last), trained(ref / "checkpoints" / "step_00000004"))

    # the exports are plain files that load without DeepSpeed, equal to the one-process run's
    if method == "lora":
        assert (out / "samples" / "step_00000004.png").is_file()  # sampled on rank 0 while rank 1 waited
        for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
            assert_same(load_file(out / name), load_file(ref / name))
    else:
        ema, ema_ref = load_state(last / "ema.safetensors"), load_state(ref / "checkpoints" / "step_00000004" / "ema.safetensors")
        for a, b in zip(ema["shadow"], ema_ref["shadow"], strict=True):
            assert a.shape == b.shape  # whole tensors, not one rank's partition
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
        for sub in ("unet", "unet_raw"):  # the EMA and the raw weights
            weights = out / "model" / sub / "diffusion_pytorch_model.safetensors"
            assert_same(load_file(weights), load_file(ref / "model" / sub / "diffusion_pytorch_model.safetensors"))
        from diffusers import UNet2DConditionModel

        UNet2DConditionModel.from_pretrained(out / "model", subfolder="unet")  # diffusers reads it as it is

    # resume: the run stopped after its step-2 checkpoint and resumed ends where the whole run did
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    run(world, method, resumed, *SETTINGS[method], "train.batch_size=2", "train.resume=latest", launch=launcher(stage))
    assert_same(trained(resumed / "checkpoints" / "step_00000004"), trained(last), exact=True)
    if method == "full":
        a, b = load_state(resumed / "checkpoints" / "step_00000004" / "ema.safetensors"), load_state(last / "ema.safetensors")
        assert all(torch.equal(x, y) for x, y in zip(a["shadow"], b["shadow"], strict=True))


def test_a_lora_that_also_trains_the_text_encoder_runs_under_zero3(world, one_process, tmp_path):
    """Two trained modules: DeepSpeed wraps them in one container and the methods call each."""
    te = ["train.max_steps=2", "train.checkpoint_every=2", "lora.text_encoder=true", "loss.caption_dropout=0.5"]
    ref = tmp_path / "one"
    run(world, "lora", ref, *te, "train.batch_size=4")
    out = tmp_path / "ds"
    run(world, "lora", out, *te, "train.batch_size=2", launch=launcher("zero3"))
    weights = trained(out / "checkpoints" / "step_00000002")
    assert any(k.startswith("text_encoder.") and "lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())
    assert_same(weights, trained(ref / "checkpoints" / "step_00000002"))


def test_a_checkpoint_resumes_only_under_the_setup_that_wrote_it(world, one_process, tmp_path):
    out = tmp_path / "plain"
    shutil.copytree(one_process["lora"] / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000002")
    proc = run(world, "lora", out, *SETTINGS["lora"], "train.batch_size=2", "train.resume=latest",
               launch=launcher("zero2", processes=1), expect=1)
    assert "was written without DeepSpeed; resume it with the accelerate config that wrote it" in proc.stderr


@pytest.mark.parametrize("optimizer, stage, precision", [("adamw8bit", "zero2", "bf16"), ("lion8bit", "zero3", "no")])
def test_eight_bit_optimizers_train_under_zero_with_state_in_eight_bits(world, tmp_path, optimizer, stage, precision):
    out = tmp_path / "bnb"
    run(world, "lora", out, "train.max_steps=2", "train.checkpoint_every=2", "train.batch_size=2",
        f"train.optimizer.name={optimizer}", "lora.targets=all", "lora.rank=64", "lora.alpha=64",
        f"train.mixed_precision={precision}", launch=launcher(stage))
    # under bf16 DeepSpeed keeps the module in bf16 and the float32 masters in the optimizer: checkpoints hold those
    assert all(v.dtype == torch.float32 for v in trained(out / "checkpoints" / "step_00000002").values())
    shards = sorted((out / "checkpoints" / "step_00000002" / "deepspeed" / "state").glob("*zero_pp_rank_0_*optim_states.pt"))
    assert len(shards) == 1, shards
    shard = torch.load(shards[0], weights_only=False)

    def tensors(tree):
        if isinstance(tree, dict):
            for v in tree.values():
                yield from tensors(v)
        elif isinstance(tree, (list, tuple)):
            for v in tree:
                yield from tensors(v)
        elif torch.is_tensor(tree):
            yield tree

    assert any(t.dtype == torch.uint8 for t in tensors(shard))  # the shard holds 8-bit optimizer state
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained(out / "checkpoints" / "step_00000002").items())


def test_non_finite_losses_stop_a_zero2_run_and_keep_the_last_good_checkpoint(world, tmp_path):
    out = tmp_path / "nan"
    proc = run(world, "lora", out, "train.learning_rate=1e30", "train.max_grad_norm=null", "train.max_steps=50",
               "train.checkpoint_every=1", "train.max_nonfinite_steps=3", "train.batch_size=2",
               launch=launcher("zero2"), expect=1)
    assert "non-finite loss" in proc.stderr and "last good checkpoint" in proc.stderr
    kept = sorted((out / "checkpoints").glob("step_*"))
    assert kept and all(torch.isfinite(t).all() for t in trained(kept[0]).values())


def test_eight_bit_optimizer_with_offload_is_refused_before_training(world, tmp_path):
    out = tmp_path / "refused"
    proc = run(world, "lora", out, "train.max_steps=2", "train.optimizer.name=adamw8bit",
               launch=launcher("zero2_offload"), expect=1)
    assert "stopped: train.optimizer.name=adamw8bit cannot run with the optimizer offloaded" in proc.stderr
    assert "train.optimizer.name=adamw" in proc.stderr and "zero2.yaml" in proc.stderr
    assert not (out / "checkpoints").exists()  # refused before any step


def test_offloaded_adamw_trains_like_adamw(world, one_process, tmp_path):
    out = tmp_path / "offload"
    run(world, "full", out, *SETTINGS["full"], "train.batch_size=2", launch=launcher("zero2_offload"))
    assert_same(trained(out / "checkpoints" / "step_00000004"),
                trained(one_process["full"] / "checkpoints" / "step_00000004"))


def test_the_deepspeed_config_is_filled_from_the_training_config_and_conflicts_are_named():
    from trainers.config import TrainConfig
    from trainers.distributed import DeepSpeedConfigError, check_optimizer, fill_deepspeed_config, fill_zero_buffers

    tc = TrainConfig(max_steps=1, batch_size=3, gradient_accumulation_steps=2, max_grad_norm=0.5)
    ds = fill_deepspeed_config({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}, tc, 4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"],
            ds["train_batch_size"]) == (3, 2, 0.5, 24)
    with pytest.raises(DeepSpeedConfigError, match="gradient_accumulation_steps=8 but train.gradient_accumulation_steps"):
        fill_deepspeed_config({"gradient_accumulation_steps": 8}, tc, 1)
    zero = fill_zero_buffers({"zero_optimization": {"stage": 3, "reduce_bucket_size": 123}})["zero_optimization"]
    assert zero["reduce_bucket_size"] == 123 and zero["stage3_max_live_parameters"] == 10**8  # given ones are kept
    with pytest.raises(DeepSpeedConfigError, match="enables bf16 but train.mixed_precision=no"):
        fill_deepspeed_config({"bf16": {"enabled": True}}, tc, 1)
    with pytest.raises(DeepSpeedConfigError, match="remove it"):
        check_optimizer(tc, {"optimizer": {"type": "Adam"}})
    check_optimizer(TrainConfig(max_steps=1, optimizer={"name": "lion8bit"}), {"zero_optimization": {"stage": 3}})
    with pytest.raises(DeepSpeedConfigError, match="lion8bit cannot run with the optimizer offloaded"):
        check_optimizer(TrainConfig(max_steps=1, optimizer={"name": "lion8bit"}),
                        {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})


def test_an_accumulation_count_in_the_accelerate_config_must_match_the_training_config(monkeypatch):
    from trainers.config import TrainConfig
    from trainers.distributed import DeepSpeedConfigError, _check_accumulation_env

    tc = TrainConfig(max_steps=1, gradient_accumulation_steps=2)
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(DeepSpeedConfigError, match="gradient_accumulation_steps=4 but the training config has"):
        _check_accumulation_env(tc)
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    _check_accumulation_env(tc)
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto")
    _check_accumulation_env(tc)  # "auto" is dropped, so accelerate takes ours
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in os.environ
