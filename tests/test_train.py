"""The training loop end to end on a tiny model: runs, exports, exact resume, errors, NaN guard,
and several processes against one."""
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_training_world, free_port, unet_call_inputs
from safetensors.torch import load_file

from trainers.statefile import load_state


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model folder and a small captioned dataset, one bucket (64x64)."""
    return build_training_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module", params=["tiny", "tiny-sdxl", "tiny-flux"])
def any_world(request, tmp_path_factory):
    """The same, once per model family (SD 1.x's layout, SDXL's, Flux's): for the tests where the family
    changes what a step computes (text conditioning, size ids, two text encoders, the objective, the
    denoiser, the exports)."""
    return build_training_world(tmp_path_factory.mktemp(request.param), preset=request.param)


def run(world: Path, out: Path, *overrides: str, launcher=(), expect=0):
    cmd = [*launcher] if launcher else [sys.executable, "-m", "trainers"]
    cmd += [str(ROOT / "configs" / "tiny" / "lora.yaml"), f"model.path={world / 'model'}", f"data.path={world / 'data'}",
            f"data.cache.dir={world / 'cache'}", f"output_dir={out}", *overrides]
    proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def trained(folder: Path) -> dict:
    return load_file(folder / "trained.safetensors")


def test_a_run_trains_checkpoints_logs_and_exports(any_world, tmp_path):
    world = any_world
    out = tmp_path / "run"
    run(world, out, "train.max_steps=4", "train.checkpoint_every=2", "validation.prompts=[a red circle]",
        "validation.steps=2")
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "lora_kohya.safetensors").is_file()
    from adapters.lora import load_lora_file
    from data_tools.store import fingerprint
    from ldmcore.checkpoints import load_components

    meta = load_lora_file(out / "lora_kohya.safetensors").user
    assert meta["ldm_tune.base_model_hash"] == fingerprint(load_components(world / "model").denoiser)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert (out / "config.yaml").read_text().count("max_steps: 4") == 1
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert (out / "samples" / "step_00000004.png").is_file()
    first, last = trained(out / "checkpoints" / "step_00000002"), trained(out / "checkpoints" / "step_00000004")
    assert first.keys() == last.keys() and all("lora" in k for k in first)
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the weights moved


def test_resume_ends_with_the_same_weights(any_world, tmp_path):
    world = any_world
    common = ["train.max_steps=6", "train.checkpoint_every=3", "train.lr_scheduler=cosine", "train.warmup_steps=2",
              "train.gradient_accumulation_steps=2", "loss.caption_dropout=0.3", "loss.noise_offset=0.05"]
    run(world, tmp_path / "whole", *common)
    # the interrupted run: the same config, stopped after its first checkpoint
    stopped = run(world, tmp_path / "parts", *common, launcher=_stop_after_first_checkpoint(tmp_path / "parts"),
                  expect=-signal.SIGKILL)
    assert (tmp_path / "parts" / "checkpoints" / "step_00000003" / "state.json").is_file(), stopped.stderr[-2000:]
    assert not (tmp_path / "parts" / "checkpoints" / "step_00000006").exists()  # really stopped half-way
    run(world, tmp_path / "parts", *common, "train.resume=latest")
    whole, parts = trained(tmp_path / "whole" / "checkpoints" / "step_00000006"), trained(
        tmp_path / "parts" / "checkpoints" / "step_00000006")
    for k in whole:
        assert torch.equal(whole[k], parts[k]), k


def _stop_after_first_checkpoint(out: Path):
    """A launcher that runs the trainer and SIGKILLs it as soon as the step-3 checkpoint is complete."""
    code = (
        "import os, signal, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-m', 'trainers', *sys.argv[1:]])\n"
        f"mark = {str(out / 'checkpoints' / 'step_00000003' / 'state.json')!r}\n"
        "while p.poll() is None and not os.path.exists(mark):\n"
        "    time.sleep(0.005)\n"
        "p.send_signal(signal.SIGKILL); p.wait()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    return (sys.executable, "-c", code)


def test_config_errors_name_the_key(world, tmp_path):
    typo = run(world, tmp_path / "x", "train.learnig_rate=1e-3", expect=2)
    assert "unknown key 'train.learnig_rate'; did you mean 'train.learning_rate'?" in typo.stderr
    wrong = run(world, tmp_path / "x", "train.max_steps=lots", expect=2)
    assert "train.max_steps" in wrong.stderr and "integer" in wrong.stderr
    assert "Traceback" not in typo.stderr + wrong.stderr


def test_a_bare_no_on_the_command_line_is_no_mixed_precision():
    from trainers.config import read_config

    config = read_config(ROOT / "configs" / "tiny" / "lora.yaml", ["train.mixed_precision=no", "output_dir=x"])
    assert config.train.mixed_precision == "no"  # YAML reads a bare `no` as false


def test_non_finite_losses_stop_the_run_and_keep_the_checkpoint(world, tmp_path):
    out = tmp_path / "nan"
    proc = run(world, out, "train.learning_rate=1e30", "train.max_grad_norm=null", "train.max_steps=50",
               "train.checkpoint_every=1", "train.max_nonfinite_steps=3", "train.lr_scheduler=constant", expect=1)
    assert "non-finite loss" in proc.stderr and "last good checkpoint" in proc.stderr
    kept = sorted((out / "checkpoints").glob("step_*"))
    assert kept and all(torch.isfinite(t).all() for t in trained(kept[0]).values())


def test_two_processes_equal_one_with_twice_the_batch(any_world, tmp_path):
    world = any_world
    run(world, tmp_path / "one", "train.max_steps=3", "train.batch_size=4", "train.checkpoint_every=3")
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()), "-m", "trainers")
    run(world, tmp_path / "two", "train.max_steps=3", "train.batch_size=2", "train.checkpoint_every=3",
        launcher=launcher)
    assert (tmp_path / "two" / "checkpoints" / "step_00000003" / "rng_1.safetensors").is_file()  # two ranks ran
    a, b = trained(tmp_path / "one" / "checkpoints" / "step_00000003"), trained(
        tmp_path / "two" / "checkpoints" / "step_00000003")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_bf16_with_8bit_adamw_trains_and_keeps_trained_weights_in_fp32(world, tmp_path):
    out = tmp_path / "lowp"
    run(world, out, "train.max_steps=2", "train.checkpoint_every=2", "train.mixed_precision=bf16",
        "train.optimizer.name=adamw8bit", "lora.targets=all", "lora.rank=64", "lora.alpha=64")
    ckpt = out / "checkpoints" / "step_00000002"
    weights = trained(ckpt)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    state = load_state(ckpt / "optimizer.safetensors")["state"]

    def tensors(tree):  # bitsandbytes nests its quantised state in a dict of its own
        for v in tree.values():
            yield from tensors(v) if isinstance(v, dict) else ([v] if torch.is_tensor(v) else [])

    assert any(t.dtype == torch.uint8 for s in state.values() for t in tensors(s))  # optimizer state in 8 bits


def test_the_exported_lora_gives_diffusers_the_trained_model(any_world, tmp_path):
    import diffusers

    from adapters.lora import LoraSettings, add_lora
    from ldmcore.checkpoints import load_components

    world, out = any_world, tmp_path / "run"
    if load_components(world / "model").family.denoiser_name != "unet":
        pytest.skip("the U-Net's check; Flux's is tests/test_train_flux.py")
    # a large step so that the LoRA's effect stands far above the 1e-5 the comparison allows
    run(world, out, "train.max_steps=3", "train.checkpoint_every=3", "train.learning_rate=2e-2")
    ours = load_components(world / "model")
    add_lora(ours.denoiser, LoraSettings(rank=4, alpha=2))
    weights = {k.removeprefix("denoiser."): v for k, v in trained(out / "checkpoints" / "step_00000003").items()}
    result = ours.denoiser.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys[:3]
    assert not [k for k in result.missing_keys if "lora" in k], [k for k in result.missing_keys if "lora" in k][:3]
    pipe = diffusers.DiffusionPipeline.from_pretrained(world / "model", safety_checker=None)
    x, t, ctx, extra = unet_call_inputs(ours.denoiser.config)
    with torch.no_grad():
        base = pipe.unet(x, t, ctx, **extra).sample
        expected = ours.denoiser(x, t, ctx, **extra)
        for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
            pipe.load_lora_weights(str(out / name), adapter_name=name.split(".")[0])
            pipe.set_adapters([name.split(".")[0]])
            got = pipe.unet(x, t, ctx, **extra).sample
            assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5, name
    assert ((base - expected).abs().max() / expected.abs().max()).item() > 1e-3  # the LoRA changes the output


def test_text_encoder_lora_trains_and_exports(any_world, tmp_path):
    world = any_world
    out = tmp_path / "te"
    run(world, out, "train.max_steps=2", "train.checkpoint_every=2", "lora.text_encoder=true",
        "loss.caption_dropout=0.5")
    weights = trained(out / "checkpoints" / "step_00000002")
    from adapters.lora import load_lora_file
    from ldmcore.checkpoints import load_components

    parts = load_components(world / "model")
    encoders = [e for e in parts.text_encoders if e in parts.family.lora_text_encoders]  # SDXL both, Flux CLIP-L
    assert any(k.startswith("denoiser.") for k in weights)
    for encoder in encoders:
        te = [k for k in weights if k.startswith(encoder + ".")]
        assert any(weights[k].abs().sum() > 0 for k in te if "lora_B" in k), encoder  # its LoRA moved
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        lora = load_lora_file(out / name)
        assert lora.denoiser and all(getattr(lora, encoder) for encoder in encoders), name


def test_heldout_validation_loss_and_ema(world, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "val"
    run(world, out, "train.max_steps=4", "train.checkpoint_every=2", "validation.heldout=1", "validation.every=2",
        "train.ema_decay=0.5")
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    val = [e.value for e in events.Scalars("val_loss")]
    assert len(val) == 2 and all(np.isfinite(val))
    assert len(events.Scalars("loss")) >= 1
    ckpt = out / "checkpoints" / "step_00000004"
    ema = load_state(ckpt / "ema.safetensors")
    raw = trained(ckpt)
    from adapters.lora import LoraSettings, add_lora
    from ldmcore.unet import UNet

    model = UNet.from_pretrained(world / "model" / "unet")
    add_lora(model, LoraSettings(rank=4, alpha=2))
    order = ["denoiser." + n for n, p in model.named_parameters() if p.requires_grad]  # the EMA's order
    assert sorted(order) == sorted(raw)
    shadow = dict(zip(order, ema["shadow"]))
    assert any(not torch.equal(shadow[k], raw[k]) for k in raw)  # the EMA lags the raw weights
    from adapters.lora import load_lora_file

    exported = load_lora_file(out / "pytorch_lora_weights.safetensors").denoiser
    assert len(exported) == len(raw)
    for key, value in exported.items():  # the exported file holds the EMA, not the raw weights
        name = "denoiser." + key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(value.float(), shadow[name]), key


def test_dora_run_exports_and_a_checkpoint_exports_from_the_command_line(world, tmp_path):
    out = tmp_path / "dora"
    run(world, out, "train.max_steps=2", "train.checkpoint_every=2", "lora.use_dora=true")
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "lora_kohya.safetensors").exists()
    plain = tmp_path / "plain"
    run(world, plain, "train.max_steps=2", "train.checkpoint_every=2")
    proc = subprocess.run([sys.executable, "-m", "adapters", "export", str(plain / "checkpoints" / "step_00000002"),
                           "--out", str(tmp_path / "exported")], cwd=str(ROOT), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == [
        "lora_kohya.safetensors", "pytorch_lora_weights.safetensors"]


def test_resuming_with_another_lora_setting_is_refused_clearly(world, tmp_path):
    out = tmp_path / "r"
    run(world, out, "train.max_steps=2", "train.checkpoint_every=2")
    proc = run(world, out, "train.max_steps=4", "train.resume=latest", "lora.rank=8", expect=2)
    assert "does not fit this run's trained parameters" in proc.stderr and "LoRA setting" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_refiner_given_as_the_base_is_refused_naming_it(tmp_path, capsys):
    from conftest import TRAIN_WORDS

    from ldmcore.checkpoints import Components
    from ldmcore.text import build_word_tokenizer
    from trainers.__main__ import main

    Components.from_preset("tiny-sdxl-refiner", build_word_tokenizer(TRAIN_WORDS)).save_pretrained(tmp_path / "refiner")
    code = main([str(ROOT / "configs" / "tiny" / "sdxl_lora.yaml"), f"model.path={tmp_path / 'refiner'}",
                 f"data.path={tmp_path}", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 1 and "is an SDXL refiner" in err and "point model.path at a base model" in err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_each_pictures_size_ids_reach_the_sdxl_unet_and_dropped_captions_are_zeros(tmp_path):
    """SDXL's micro-conditioning in training: the cached ids of each picture's own transform reach the
    U-Net (other ids, another loss), and a dropped caption conditions on zeros as SDXL was trained."""
    from ldmcore.checkpoints import load_components
    from trainers.batch import to_device
    from trainers.config import read_config
    from trainers.loop import collate, make_method, sample_generators

    world = build_training_world(tmp_path, preset="tiny-sdxl")
    config = read_config(ROOT / "configs" / "tiny" / "sdxl_lora.yaml", [
        f"model.path={world / 'model'}", f"data.path={world / 'data'}", f"data.cache.dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'out'}"])
    parts = load_components(world / "model")
    method = make_method(config, parts)
    dataset, _ = method.dataset(torch.device("cpu"), progress=False)
    item = dataset[0]
    assert item["size"].tolist() == [64, 64, 0, 0, 64, 64]  # a 64x64 picture in the 64x64 bucket, uncropped
    assert set(item["text"]) == {"hidden", "pooled"}
    batch = to_device(collate([dataset[0], dataset[1]]), "cpu")
    empty = parts.family.empty_text(to_device(dataset.empty_text(), "cpu"))
    assert all(not v.any() for v in empty.values())

    def loss(b):
        with torch.no_grad():
            return method.loss({"denoiser": parts.denoiser}, b, empty, sample_generators(0, 3, torch.tensor([0, 1]))).item()

    other_size = {**batch, "size": torch.tensor([[128.0, 96, 16, 8, 64, 64]] * 2)}
    assert abs(loss(other_size) - loss(batch)) > 1e-6 * loss(batch)
    dropped = method.encode_text(batch, torch.tensor([True, False]), empty, {})
    assert not dropped["hidden"][0].any() and not dropped["pooled"][0].any()
    assert torch.equal(dropped["pooled"][1], batch["text"]["pooled"][1])
