"""ControlNet: the model against diffusers' ControlNetModel (names, residuals, folders, single files),
controlled generation against StableDiffusionControlNetPipeline, and `method: controlnet` through the
real entry point (a run, exact resume, two processes, exports)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import accelerate_launcher, randomize_, rel_err, unet_call_inputs
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from ldmcore.controlnet import ControlNet, ControlNetConfig, generate_controlled
from ldmcore.controlnet_single_file import (
    controlnet_to_original, load_controlnet_single_file, save_controlnet_single_file)
from ldmcore.presets import PRESETS
from ldmcore.unet import UNet
from ldmcore.weights import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
WORDS = "a red green blue circle square on white black background".split()

SD1_LIKE = dict(  # as tests/test_unet.py
    sample_size=16, block_out_channels=[32, 64], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
SD2_LIKE = dict(  # linear projection, per-level heads and depth, upcast attention
    SD1_LIKE, block_out_channels=[32, 64, 64], layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 2, 1], use_linear_projection=True,
    upcast_attention=True,
)
# the ControlNet's own keys: SD's 8x conditioning encoder for SD1-like, a 4x one (read as BGR) for SD2-like
CONTROL = {"sd1": (SD1_LIKE, dict(conditioning_embedding_out_channels=(4, 8, 8, 16))),
           "sd2": (SD2_LIKE, dict(conditioning_embedding_out_channels=(8, 16, 16), conditioning_channels=1,
                                  controlnet_conditioning_channel_order="bgr"))}


def controlnet_config(name) -> ControlNetConfig:
    unet_cfg, extra = CONTROL[name]
    return ControlNetConfig.from_unet_config(UNet.from_config(dict(unet_cfg)).config, **extra)


def diffusers_kwargs(cfg: ControlNetConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}


def inputs(cfg: ControlNetConfig, b=2, h=8, w=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, h, w, generator=g)
    ctx = torch.randn(b, 9, cfg.cross_attention_dim, generator=g)
    cond = torch.rand(b, cfg.conditioning_channels, h * cfg.downscale, w * cfg.downscale, generator=g)
    return x, torch.tensor([7, 813][:b]), ctx, cond


def assert_residuals_close(ours, ref, tol=1e-5):
    (down, mid), (ref_down, ref_mid) = ours, ref
    assert len(down) == len(ref_down)
    for a, b in zip(down, ref_down):
        assert rel_err(a, b) < tol
    assert rel_err(mid, ref_mid) < tol


# -- the model ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_real_family_state_dict_matches_diffusers(preset):
    from diffusers import ControlNetModel

    with torch.device("meta"):  # keys, order and shapes only
        cfg = ControlNetConfig.from_unet_config(UNet.from_config(dict(PRESETS[preset].denoiser)).config)
        ours, ref = ControlNet(cfg).state_dict(), ControlNetModel(**diffusers_kwargs(cfg)).state_dict()
    assert list(ours) == list(ref)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


def test_untrained_controlnet_leaves_the_unet_unchanged():
    unet = randomize_(UNet.from_config(dict(SD1_LIKE)), std=0.05).eval()
    cn = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16)).eval()
    for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):  # the encoder copy is the U-Net's
        for k, v in getattr(unet, name).state_dict().items():
            assert torch.equal(getattr(cn, name).state_dict()[k], v), f"{name}.{k}"
    x, t, ctx, cond = inputs(cn.config)
    with torch.no_grad():
        down, mid = cn(x, t, ctx, cond)
        plain = unet(x, t, ctx)
        assert torch.equal(unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid), plain)
        # a trained one (random weights here) changes it
        down, mid = randomize_(cn, seed=3)(x, t, ctx, cond)
        assert rel_err(unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid), plain) > 1e-3


def test_from_unet_matches_diffusers_from_unet():
    from diffusers import ControlNetModel, UNet2DConditionModel

    ref_unet = randomize_(UNet2DConditionModel(**SD2_LIKE), std=0.05)
    unet = UNet.from_config(dict(ref_unet.config))
    unet.load_state_dict(ref_unet.state_dict())
    ref = ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=(8, 16, 16))
    ours = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16))
    assert {k: v for k, v in ours.config.to_dict().items() if not k.startswith("_")} == {
        k: (list(ref.config[k]) if isinstance(ref.config[k], tuple) else ref.config[k]) for k in ours.config.to_dict()
        if not k.startswith("_")}
    for k, v in ref.state_dict().items():
        if not k.startswith("controlnet_cond_embedding.") or k.startswith("controlnet_cond_embedding.conv_out"):
            assert torch.equal(ours.state_dict()[k], v), k  # copied or zero-initialised alike


@pytest.mark.parametrize("name", sorted(CONTROL))
def test_residuals_match_diffusers(name):
    from diffusers import ControlNetModel

    cfg = controlnet_config(name)
    ours = randomize_(ControlNet(cfg)).eval()  # every weight, zero convs included, non-zero
    ref = ControlNetModel(**diffusers_kwargs(cfg)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x, t, ctx, cond = inputs(cfg)
    with torch.no_grad():
        expected = ref(x, t, ctx, cond, conditioning_scale=0.7, return_dict=False)
        assert_residuals_close(ours(x, t, ctx, cond, conditioning_scale=0.7), expected)
        assert_residuals_close(ours(x, 500, ctx, cond), ref(x, 500, ctx, cond, return_dict=False))
    with pytest.raises(ValueError, match=f"{cfg.downscale}x the latent size"):
        ours(x, t, ctx, cond[..., :-1])


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = controlnet_config("sd2")
    cn = randomize_(ControlNet(cfg)).train()
    x, t, ctx, cond = inputs(cfg)

    def grads():
        cn.zero_grad()
        down, mid = cn(x, t, ctx, cond)
        (sum(d.square().mean() for d in down) + mid.square().mean()).backward()
        return {n: p.grad.clone() for n, p in cn.named_parameters()}

    plain = grads()
    cn.set_gradient_checkpointing(True)
    checkpointed = grads()
    for n in plain:
        assert torch.allclose(plain[n], checkpointed[n], rtol=1e-5, atol=1e-7), n


def test_folders_load_both_ways(tmp_path):
    from diffusers import ControlNetModel

    cfg = controlnet_config("sd2")
    ours = randomize_(ControlNet(cfg)).eval()
    ours.save_pretrained(tmp_path / "ours")
    ref = ControlNetModel.from_pretrained(tmp_path / "ours").eval()
    ref.save_pretrained(tmp_path / "diffusers")
    back = ControlNet.from_pretrained(tmp_path / "diffusers")
    assert back.config == ours.config
    x, t, ctx, cond = inputs(cfg)
    with torch.no_grad():
        assert_residuals_close(ours(x, t, ctx, cond), ref(x, t, ctx, cond, return_dict=False))
        for a, b in zip(back(x, t, ctx, cond)[0], ours(x, t, ctx, cond)[0]):
            assert torch.equal(a, b)


def test_single_file_has_the_original_names_and_reads_back(tmp_path):
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    cfg = controlnet_config("sd1")  # SD's four-width conditioning encoder, the only one diffusers' reader knows
    ours = randomize_(ControlNet(cfg)).eval()
    path = save_controlnet_single_file(ours, tmp_path / "cn.safetensors", {"ldm_tune.method": "controlnet"})
    original = load_file(path)
    n_skips = 1 + 2 * 2 + 1  # conv_in, two resnets per level, one downsampler
    assert all(k.startswith("control_model.") for k in original)
    for key in ("time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.1.1.proj_in.weight",
                "input_blocks.3.0.op.weight", "input_hint_block.0.weight", "input_hint_block.14.weight",
                f"zero_convs.{n_skips - 1}.0.weight", "middle_block.1.proj_out.weight", "middle_block_out.0.bias"):
        assert "control_model." + key in original, key
    expected = ours.state_dict()
    # diffusers' own converter reads our file to the same tensors
    converted = convert_controlnet_checkpoint(original, diffusers_kwargs(cfg))
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], v) for k, v in expected.items())
    # so does its from_single_file, offline with the config from a folder
    ours.save_pretrained(tmp_path / "folder")
    ref = ControlNetModel.from_single_file(str(path), config=str(tmp_path / "folder"), local_files_only=True)
    assert all(torch.equal(ref.state_dict()[k], v) for k, v in expected.items())
    # ours reads it back exactly, from its metadata or, for an unprefixed foreign file, from a given config
    back = load_controlnet_single_file(path)
    assert back.config == cfg and all(torch.equal(back.state_dict()[k], v) for k, v in expected.items())
    from safetensors.torch import save_file

    save_file({k.removeprefix("control_model."): v for k, v in original.items()}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="from_unet_config"):
        load_controlnet_single_file(tmp_path / "foreign.safetensors")
    unet_cfg = UNet.from_config(dict(SD1_LIKE)).config
    foreign = load_controlnet_single_file(tmp_path / "foreign.safetensors", ControlNetConfig.from_unet_config(unet_cfg))
    assert foreign.config == cfg and all(torch.equal(foreign.state_dict()[k], v) for k, v in expected.items())


def test_single_file_round_trip_with_a_4x_encoder_and_bad_files(tmp_path):
    cfg = controlnet_config("sd2")
    ours = randomize_(ControlNet(cfg))
    back = load_controlnet_single_file(save_controlnet_single_file(ours, tmp_path / "cn.safetensors"))
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())
    original = controlnet_to_original(ours.state_dict(), cfg)
    assert "control_model.input_hint_block.10.weight" in original  # conv_out after two pairs
    from ldmcore.controlnet_single_file import original_to_controlnet

    with pytest.raises(CheckpointError, match="input_hint_block.0"):
        original_to_controlnet({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, cfg)
    with pytest.raises(CheckpointError, match="zero_convs"):
        original_to_controlnet({k: v for k, v in original.items() if "zero_convs.2." not in k}, cfg)


# -- generation ----------------------------------------------------------------------------------------


def edge_picture(seed: int, size: int) -> Image.Image:
    """A filled circle and square on a plain background: clear edges for Canny."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 80, 3)))
    draw = ImageDraw.Draw(im)
    a, b = rng.integers(4, size // 2, 2)
    draw.ellipse([a, b, a + size // 3, b + size // 3], fill=(230, 40, 40))
    c, d = rng.integers(size // 3, size - size // 4, 2)
    draw.rectangle([c, d, c + size // 5, d + size // 5], fill=(40, 220, 90))
    return im


def test_generation_matches_diffusers_controlnet_pipeline(tmp_path):
    import diffusers

    from ldmcore.checkpoints import Components
    from ldmcore.text import build_word_tokenizer

    parts = Components.from_preset("tiny", build_word_tokenizer(WORDS), seed=0)
    randomize_(parts.denoiser, seed=0, std=0.05)
    randomize_(parts.vae, seed=1, std=0.05)
    cn = randomize_(ControlNet.from_unet(parts.denoiser, conditioning_embedding_out_channels=(8, 16, 32)), seed=2, std=0.05)
    parts.save_pretrained(tmp_path / "model")
    cn.save_pretrained(tmp_path / "controlnet")
    base = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "model", safety_checker=None)
    pipe = diffusers.StableDiffusionControlNetPipeline(
        **{k: v for k, v in base.components.items() if k not in ("image_encoder",)},
        controlnet=diffusers.ControlNetModel.from_pretrained(tmp_path / "controlnet"),
    )
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    control = edge_picture(0, 32)
    kw = dict(num_inference_steps=6, guidance_scale=4.0, controlnet_conditioning_scale=0.8, output_type="latent")
    expected = pipe("a red circle", image=control, generator=torch.Generator().manual_seed(5), **kw).images
    ours = generate_controlled(parts, cn, "a red circle", control, conditioning_scale=0.8, steps=6, guidance_scale=4.0,
                               seed=5, sampler="ddim", output="latent")
    plain = generate_controlled(parts, cn, "a red circle", control, conditioning_scale=0.0, steps=6,
                                guidance_scale=4.0, seed=5, sampler="ddim", output="latent")
    assert ours.shape == expected.shape == (1, 4, 8, 8)
    assert rel_err(ours, expected) < 1e-5
    assert rel_err(plain, expected) > 1e-3  # the control really steers the result
    with pytest.raises(ValueError, match="2 prompts but 3 control images"):
        generate_controlled(parts, cn, ["a", "b"], [control] * 3)


# -- training through the real entry point -------------------------------------------------------------


@pytest.fixture(scope="module", params=["tiny", "tiny-sdxl"])
def world(request, tmp_path_factory):
    """A tiny base model and four 64 px pictures with edges, captioned; once per family (SD 1.x's
    layout, SDXL's: its ControlNet takes the pooled text and size conditioning too)."""
    from ldmcore.checkpoints import Components
    from ldmcore.text import build_word_tokenizer

    root = tmp_path_factory.mktemp(f"cnworld-{request.param}")
    parts = Components.from_preset(request.param, build_word_tokenizer(WORDS))
    randomize_(parts.vae, seed=1, std=0.05)
    randomize_(parts.denoiser, seed=2, std=0.05)
    parts.save_pretrained(root / "model")
    (root / "data").mkdir()
    for i in range(4):
        edge_picture(i, 64).save(root / "data" / f"p{i}.png")
        (root / "data" / f"p{i}.txt").write_text(f"a {WORDS[1 + i % 3]} circle and a square")
    return root


def run(world: Path, out: Path, *overrides: str, launcher=(), expect=0):
    cmd = [*launcher] if launcher else [sys.executable, "-m", "trainers"]
    cmd += [str(ROOT / "configs" / "tiny" / "controlnet.yaml"), f"model.path={world / 'model'}",
            f"data.path={world / 'data'}", f"data.cache.dir={world / 'cache'}", f"output_dir={out}", *overrides]
    # one thread per process: on a small shared machine more threads made the run ~4x slower
    proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def trained(folder: Path) -> dict:
    return load_file(folder / "trained.safetensors")


# four pictures, batch 4: every step sees the whole epoch, so two processes with batch 2 see the same steps
COMMON = ("train.max_steps=4", "train.checkpoint_every=2", "train.batch_size=4", "loss.caption_dropout=0.3")


@pytest.fixture(scope="module")
def whole(world, tmp_path_factory):
    """One uninterrupted run with validation samples; the other training tests compare against it."""
    out = tmp_path_factory.mktemp("cnrun") / "whole"
    edge_picture(9, 32).save(world / "validation_control.png")
    run(world, out, *COMMON, "validation.prompts=[a red circle]", "validation.steps=2",
        f"controlnet.validation_image={world / 'validation_control.png'}")
    return out


def test_a_run_trains_the_controlnet_and_exports_it(world, whole):
    from diffusers import ControlNetModel

    from data_tools.control import canny

    first, last = (trained(whole / "checkpoints" / f"step_0000000{s}") for s in (2, 4))
    assert first.keys() == last.keys() and all(k.startswith("controlnet.") for k in first)
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the weights moved
    assert last["controlnet.controlnet_mid_block.weight"].abs().sum() > 0  # the zero convs left zero
    assert Image.open(whole / "samples" / "step_00000004.png").size == (32, 32)  # the validation image's size
    assert sorted(p.name for p in (whole / "controlnet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]

    ours = ControlNet.from_pretrained(whole / "controlnet")
    for k, v in ours.state_dict().items():  # the export is the last checkpoint's weights
        assert torch.equal(v, last["controlnet." + k]), k
    ref = ControlNetModel.from_pretrained(whole / "controlnet").eval()
    x, t, ctx, extra = unet_call_inputs(ours.config, size=16)
    cond = torch.from_numpy(np.asarray(canny(edge_picture(0, 64)), dtype=np.float32) / 255).permute(2, 0, 1)
    cond = cond[None].repeat(2, 1, 1, 1)  # (2, 3, 64, 64)
    with torch.no_grad():
        assert_residuals_close(ours(x, t, ctx, cond, **extra), ref(x, t, ctx, cond, **extra, return_dict=False))
    single = load_controlnet_single_file(whole / "controlnet.safetensors")
    assert all(torch.equal(single.state_dict()[k], v) for k, v in ours.state_dict().items())
    from safetensors import safe_open

    with safe_open(str(whole / "controlnet.safetensors"), "pt") as f:
        assert f.metadata()["ldm_tune.method"] == "controlnet"


def test_resume_ends_with_the_same_weights(world, whole, tmp_path):
    parts = tmp_path / "parts"
    run(world, parts, *COMMON, launcher=_stop_after_first_checkpoint(parts), expect=-signal.SIGKILL)
    assert (parts / "checkpoints" / "step_00000002" / "state.json").is_file()
    assert not (parts / "checkpoints" / "step_00000004").exists()  # really stopped half-way
    run(world, parts, *COMMON, "train.resume=latest")
    a, b = trained(whole / "checkpoints" / "step_00000004"), trained(parts / "checkpoints" / "step_00000004")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _stop_after_first_checkpoint(out: Path):
    """A launcher that runs the trainer and SIGKILLs it as soon as the step-2 checkpoint is complete."""
    code = (
        "import os, signal, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-m', 'trainers', *sys.argv[1:]])\n"
        f"mark = {str(out / 'checkpoints' / 'step_00000002' / 'state.json')!r}\n"
        "while p.poll() is None and not os.path.exists(mark):\n"
        "    time.sleep(0.005)\n"
        "p.send_signal(signal.SIGKILL); p.wait()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    return (sys.executable, "-c", code)


@pytest.mark.parametrize("setup", ["multi", "zero2", "zero3"])
def test_two_processes_equal_one_with_twice_the_batch(world, whole, tmp_path, setup):
    """Data parallel, and DeepSpeed ZeRO-2/3 (the ControlNet sharded, the frozen U-Net whole on each rank)."""
    if setup in ("multi", "zero2") and (world / "model" / "text_encoder_2").is_dir():
        pytest.skip("one family is enough for data parallel and ZeRO-2 in the suite's time: ZeRO-3 (the ControlNet "
                    "partitioned) covers SDXL")
    two = tmp_path / "two"
    run(world, two, "train.max_steps=2", "train.checkpoint_every=2", "train.batch_size=2", "loss.caption_dropout=0.3",
        launcher=accelerate_launcher(setup))
    assert (two / "checkpoints" / "step_00000002" / "rng_1.safetensors").is_file()  # two ranks ran
    a, b = trained(whole / "checkpoints" / "step_00000002"), trained(two / "checkpoints" / "step_00000002")
    rtol = 1e-5 if setup == "multi" else 1e-4  # DeepSpeed sums gradients in its own buckets and order
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=1e-6)
    exported = load_file(two / "controlnet" / "diffusion_pytorch_model.safetensors")
    for k, v in exported.items():  # the export is the trained ControlNet, as plain tensors
        assert torch.equal(v, b["controlnet." + k]), k


def make_method(world: Path, *overrides: str):
    from ldmcore.checkpoints import load_components
    from trainers.config import read_config
    from trainers.controlnet import ControlNetMethod

    config = read_config(ROOT / "configs" / "tiny" / "controlnet.yaml",
                         [f"model.path={world / 'model'}", f"data.path={world / 'data'}", *overrides])
    return ControlNetMethod(config, load_components(world / "model"))


def test_a_bf16_step_takes_accelerates_float32_outputs(world):
    """Under mixed precision accelerate returns a prepared module's outputs in float32; the residuals
    must still meet the frozen bfloat16 U-Net's skips (CPU kernels refuse mixed dtypes)."""
    from accelerate.utils import convert_outputs_to_fp32

    m = make_method(world, "train.gradient_checkpointing=true")
    m.build()
    m.components.denoiser.to(torch.bfloat16)
    cn = m.controlnet.train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the family's text conditioning, as the cache would hold it
        encoder = m.components.prompt_encoder()
        text = encoder(["a red circle", "a blue square"])
        empty = {k: v[0] for k, v in m.components.family.empty_text(encoder([""])).items()}
    batch = {"mean": torch.randn(2, 4, 16, 16, generator=g), "std": torch.full((2, 4, 16, 16), 0.1), "text": text,
             "size": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2),
             "control": torch.randint(0, 256, (2, 3, 64, 64), generator=g, dtype=torch.uint8)}
    with torch.autocast("cpu", torch.bfloat16):
        loss = m.loss({"controlnet": convert_outputs_to_fp32(cn.forward)}, batch, empty,
                      [torch.Generator().manual_seed(i) for i in range(2)])
    loss.backward()
    assert torch.isfinite(loss)
    assert cn.controlnet_mid_block.weight.grad.abs().sum() > 0  # the zero convs get gradients first


def test_misconfiguration_is_refused_naming_the_key(world, tmp_path):
    from data_tools.schema import ConfigError

    with pytest.raises(ConfigError, match="data.cache.control=canny"):
        make_method(world, "data.cache.control=null")
    with pytest.raises(ConfigError, match="controlnet.conditioning_embedding_out_channels=.*give 3 widths"):
        make_method(world, "controlnet.conditioning_embedding_out_channels=[16, 32, 96, 256]").build()
    # init: continue from a saved ControlNet instead of copying the U-Net
    m = make_method(world)
    m.build()
    randomize_(m.controlnet, seed=4).save_pretrained(tmp_path / "cn")
    resumed = make_method(world, f"controlnet.init={tmp_path / 'cn'}")
    resumed.build()
    assert all(torch.equal(resumed.controlnet.state_dict()[k], v) for k, v in m.controlnet.state_dict().items())
    assert all(p.requires_grad for p in resumed.controlnet.parameters())
    other = ControlNet.from_unet(UNet.from_config(dict(SD1_LIKE)), conditioning_embedding_out_channels=(8, 16, 32))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="does not fit model.path's U-Net: .*layers_per_block"):
        make_method(world, f"controlnet.init={tmp_path / 'other'}").build()
