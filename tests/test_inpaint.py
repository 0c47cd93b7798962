"""9-channel inpainting: widening conv_in keeps the output, the sampler against diffusers'
StableDiffusionInpaintPipeline, the full-mask input against the cache, and the method through the
real entry point: a two-process run whose exports diffusers loads, exact resume, config errors."""
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import accelerate_launcher, build_training_world, randomize_, rel_err, unet_call_inputs
from PIL import Image
from safetensors.torch import load_file

from ldmcore.checkpoints import Components, load_components
from ldmcore.inpaint import inpaint, inpainting_input, widen_conv_in
from ldmcore.text import build_word_tokenizer

ROOT = Path(__file__).resolve().parent.parent
WORDS = "a red green blue circle square on white black background".split()


def tiny_inpainting_parts(seed: int = 0, preset: str = "tiny") -> Components:
    parts = Components.from_preset(preset, build_word_tokenizer(WORDS))
    randomize_(parts.vae, seed=seed + 1, std=0.05)
    widen_conv_in(parts.denoiser)
    randomize_(parts.denoiser, seed=seed + 2, std=0.05)  # every weight, the new channels' too
    return parts


@pytest.fixture(scope="module", params=["tiny", "tiny-sdxl"])
def world(request, tmp_path_factory):
    """A 4-channel base folder, a 9-channel inpainting single file, and four 64x64 captioned pictures,
    once per family (SD 1.x's layout, SDXL's)."""
    root = build_training_world(tmp_path_factory.mktemp(request.param), model="base", preset=request.param)
    tiny_inpainting_parts(seed=5, preset=request.param).save_single_file(root / "inpainting.safetensors")
    return root


def run(world: Path, out: Path, *overrides: str, launcher=(), expect=0):
    cmd = [*launcher] if launcher else [sys.executable, "-m", "trainers"]
    cmd += [str(ROOT / "configs" / "tiny" / "inpaint.yaml"), f"model.path={world / 'base'}",
            f"data.path={world / 'data'}", f"data.cache.dir={world / 'cache'}", f"output_dir={out}", *overrides]
    proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def unet_inputs(seed=0, channels=9, size=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, channels, size, size, generator=g), torch.tensor([10, 800]),
            torch.randn(2, 77, 32, generator=g))


# -- the model ------------------------------------------------------------------------------------


def test_widening_keeps_the_output_and_saves_as_nine_channels(tmp_path):
    parts = Components.from_preset("tiny", build_word_tokenizer(WORDS))
    unet = randomize_(parts.denoiser, seed=3, std=0.05)
    x, t, ctx = unet_inputs(channels=9)
    with torch.no_grad():
        before = unet(x[:, :4], t, ctx)
        widen_conv_in(unet)
        after = unet(x, t, ctx)  # mask and masked latent hold random values: their weights are zero
    assert unet.config.in_channels == 9 and unet.conv_in.weight.shape[1] == 9
    assert torch.equal(after, before)  # the zero weights add exact zeros
    with torch.no_grad():
        unet.conv_in.weight[:, 4:] = 0.1  # once the new weights move, the extra channels count
        assert rel_err(unet(x, t, ctx), before) > 1e-3
    parts.save_pretrained(tmp_path / "model")
    assert load_components(tmp_path / "model").denoiser.conv_in.weight.shape[1] == 9


def test_an_inpainting_single_file_loads_with_its_base_models_folder(world, tmp_path):
    """Other tools' 9-channel files carry no configs; read with a 4-channel base folder as config,
    the file's conv_in says how wide the U-Net is."""
    from safetensors.torch import save_file

    state = load_file(world / "inpainting.safetensors")
    save_file(state, tmp_path / "foreign.safetensors")  # without our metadata
    parts = load_components(tmp_path / "foreign.safetensors", config=world / "base", tokenizer=world / "base")
    assert parts.denoiser.config.in_channels == 9
    ours = load_components(world / "inpainting.safetensors", tokenizer=world / "base")
    for k, v in ours.denoiser.state_dict().items():
        assert torch.equal(parts.denoiser.state_dict()[k], v), k


# -- the sampler ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory):
    parts = tiny_inpainting_parts()
    folder = tmp_path_factory.mktemp("inpainting") / "model"
    parts.save_pretrained(folder)
    return parts, folder


def picture_and_mask():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 200  # grey levels are binarised at half: 200 repaints, 100 keeps
    mask[0:4, :] = 100
    return image, Image.fromarray(mask)


@pytest.mark.parametrize("sampler,scheduler,strength", [("ddim", "DDIMScheduler", 1.0),
                                                         ("euler", "EulerDiscreteScheduler", 1.0),
                                                         ("ddim", "DDIMScheduler", 0.6)])
def test_inpaint_matches_diffusers_inpaint_pipeline(inpainting_model, sampler, scheduler, strength):
    import diffusers

    parts, folder = inpainting_model
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None,
                                                                    requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image, mask = picture_and_mask()
    # diffusers' own processors blank the picture; the posterior mean stands in for its sample (see inpaint)
    pixels = pipe.image_processor.preprocess(image, height=32, width=32)
    repaint = pipe.mask_processor.preprocess(mask, height=32, width=32)
    with torch.no_grad():
        masked_latents = pipe.vae.encode(pixels * (repaint < 0.5)).latent_dist.mode() * pipe.vae.config.scaling_factor
    settings = dict(num_inference_steps=8, guidance_scale=4.0, strength=strength, negative_prompt="blue square")
    expected = pipe("a red circle", image=image, mask_image=mask, masked_image_latents=masked_latents,
                    generator=torch.Generator().manual_seed(5), output_type="latent", **settings).images
    ours = inpaint(parts, "a red circle", image, mask, seed=5, steps=8, guidance_scale=4.0, strength=strength,
                   negative_prompt="blue square", sampler=sampler, output="latent")
    assert ours.shape == expected.shape == (1, 4, 8, 8)
    assert rel_err(ours, expected) < 1e-5
    if strength == 1.0 and sampler == "ddim":  # and the pictures, through the same decoder
        ours_png = np.asarray(inpaint(parts, "a red circle", image, mask, seed=5, steps=8, guidance_scale=4.0,
                                      negative_prompt="blue square", sampler=sampler)[0], dtype=int)
        theirs_png = np.asarray(pipe("a red circle", image=image, mask_image=mask, masked_image_latents=masked_latents,
                                     generator=torch.Generator().manual_seed(5), **settings).images[0], dtype=int)
        assert np.abs(ours_png - theirs_png).max() <= 1


def test_inpaint_refuses_a_four_channel_model():
    parts = Components.from_preset("tiny", build_word_tokenizer(WORDS))
    image, mask = picture_and_mask()
    with pytest.raises(ValueError, match="9-channel inpainting U-Net"):
        inpaint(parts, "a", image, mask, steps=2)


# -- the method -----------------------------------------------------------------------------------


def test_full_masks_give_what_the_cache_holds_for_a_full_mask(world, tmp_path):
    """A cache of only full masks: its masked latent is the blank latent the method computes, and a
    batch drawn to the full mask reaches the U-Net exactly as that cached entry does."""
    from trainers.config import read_config
    from trainers.loop import collate, make_method

    config = read_config(ROOT / "configs" / "tiny" / "inpaint.yaml", [
        f"model.path={world / 'base'}", f"data.path={world / 'data'}", f"data.cache.dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path / 'out'}", "data.cache.mask_weights={full: 1}", "inpaint.full_mask_share=1"])
    parts = load_components(world / "base")
    method = make_method(config, parts)
    dataset, _ = method.dataset(torch.device("cpu"), progress=False)
    item = dataset[0]
    blank = method.blank_latents[(16, 16)]
    assert torch.equal(item["mask"], torch.ones(1, 16, 16, dtype=torch.float16))
    assert torch.equal(item["masked_mean"].float(), blank)
    batch = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in collate([item]).items()}
    noisy = torch.randn(1, 4, 16, 16)
    cached = method.unet_kwargs(batch, noisy, None, None, {})["sample"]
    drawn = {**batch, "mask": torch.zeros_like(batch["mask"]), "masked_mean": torch.randn(1, 4, 16, 16),
             "full_mask": torch.tensor([True])}
    assert torch.equal(method.unet_kwargs(drawn, noisy, None, None, {})["sample"], cached)
    assert torch.equal(cached, inpainting_input(noisy, torch.ones(1, 1, 16, 16), parts.vae.scale(blank)[None]))


@pytest.mark.parametrize("setup", ["multi", "zero3"])
def test_two_processes_train_and_export_what_diffusers_loads(world, tmp_path, setup):
    """Data parallel, and DeepSpeed ZeRO-3 (the 9-channel U-Net sharded, gathered for sampling and export)."""
    import diffusers

    from trainers.full import export_checkpoint

    if setup == "multi" and load_components(world / "base").family.name != "sd":
        pytest.skip("one launch config per extra family keeps the suite's time: ZeRO-3 covers data parallelism too")

    out = tmp_path / "run"
    run(world, out, "train.max_steps=2", "train.checkpoint_every=2", "validation.prompts=[a red circle]",
        "validation.steps=2", launcher=accelerate_launcher(setup))
    ckpt = out / "checkpoints" / "step_00000002"
    assert (ckpt / "rng_1.safetensors").is_file() and (out / "samples" / "step_00000002.png").is_file()

    # our U-Net: the base, widened, with the checkpoint's trained weights
    ours = load_components(world / "base").denoiser
    widen_conv_in(ours)
    trained = load_file(ckpt / "trained.safetensors")
    ours.load_state_dict(trained)
    assert trained["conv_in.weight"][:, 4:].abs().max() > 0  # the new channels learned something
    x, t, ctx, extra = unet_call_inputs(ours.config, size=16)
    pipeline = getattr(diffusers, load_components(world / "base").family.inpaint_pipeline_class)
    with torch.no_grad():
        expected = ours(x, t, ctx, **extra)
        for folder in (out / "model" / "unet", ckpt / "unet"):  # the run's export, the checkpoint's U-Net
            theirs = diffusers.UNet2DConditionModel.from_pretrained(folder)
            assert theirs.config.in_channels == 9
            assert rel_err(theirs(x, t, ctx, **extra).sample, expected) < 1e-5, folder
        pipe = pipeline.from_single_file(str(out / "model.safetensors"), config=str(out / "model"),
                                         local_files_only=True)
        assert rel_err(pipe.unet(x, t, ctx, **extra).sample, expected) < 1e-5
        ours_from_file = load_components(out / "model.safetensors", tokenizer=out / "model").denoiser
        assert rel_err(ours_from_file(x, t, ctx, **extra), expected) < 1e-6
        assert isinstance(diffusers.DiffusionPipeline.from_pretrained(out / "model"), pipeline)
        # a checkpoint exports to the complete model too (the full fine-tune's command)
        export_checkpoint(ckpt, tmp_path / "exported")
        again = load_components(tmp_path / "exported" / "model").denoiser
        assert rel_err(again(x, t, ctx, **extra), expected) < 1e-6


def test_resume_from_an_inpainting_single_file_ends_with_the_same_weights(world, tmp_path):
    common = ["train.max_steps=2", "train.checkpoint_every=1", f"model.path={world / 'inpainting.safetensors'}",
              f"model.tokenizer={world / 'base'}", "inpaint.full_mask_share=0.5",
              "loss.caption_dropout=0.3", "full.single_file=false"]
    run(world, tmp_path / "whole", *common)
    run(world, tmp_path / "parts", *common, launcher=_stop_after_first_checkpoint(tmp_path / "parts"),
        expect=-signal.SIGKILL)
    assert not (tmp_path / "parts" / "checkpoints" / "step_00000002").exists()  # really stopped half-way
    run(world, tmp_path / "parts", *common, "train.resume=latest")
    whole = load_file(tmp_path / "whole" / "checkpoints" / "step_00000002" / "trained.safetensors")
    parts = load_file(tmp_path / "parts" / "checkpoints" / "step_00000002" / "trained.safetensors")
    assert sorted(whole) == sorted(parts) and len(whole) == len(load_components(world / "base").denoiser.state_dict())
    for k in whole:
        assert torch.equal(whole[k], parts[k]), k
    assert not (tmp_path / "whole" / "model.safetensors").exists()


def _stop_after_first_checkpoint(out: Path):
    """A launcher that runs the trainer and SIGKILLs it as soon as the step-1 checkpoint is complete."""
    code = (
        "import os, signal, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-m', 'trainers', *sys.argv[1:]])\n"
        f"mark = {str(out / 'checkpoints' / 'step_00000001' / 'state.json')!r}\n"
        "while p.poll() is None and not os.path.exists(mark):\n"
        "    time.sleep(0.005)\n"
        "p.send_signal(signal.SIGKILL); p.wait()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    return (sys.executable, "-c", code)


def test_missing_masks_and_half_a_validation_pair_name_the_key(world, tmp_path, capsys):
    from trainers.__main__ import main  # in process: both fail before any training

    common = [str(ROOT / "configs" / "tiny" / "inpaint.yaml"), f"model.path={world / 'base'}",
              f"data.path={world / 'data'}", f"output_dir={tmp_path / 'x'}"]
    assert main([*common, "data.cache.inpaint_masks=0"]) == 2
    assert "set it to the number of mask variants" in capsys.readouterr().err
    assert main([*common, f"inpaint.validation_image={world / 'data' / 'p0.png'}"]) == 2
    assert "set both inpaint.validation_image and inpaint.validation_mask" in capsys.readouterr().err
