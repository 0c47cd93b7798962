"""Training on Flux through the real entry point: the LoRA from a 4-bit (NF4) and an 8-bit base, the full
fine-tune and DreamBooth, DeepSpeed ZeRO against one process, exact resume, and exports that
diffusers' Flux classes read with the trained outputs. The shared trainer tests (tests/test_train.py:
runs, exact resume after SIGKILL, two processes, the text encoder's LoRA) run on tiny-flux too."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import accelerate_launcher as launcher
from conftest import build_training_world, rel_err
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
RTOL, ATOL = 1e-4, 1e-6  # DeepSpeed reduces in its own buckets: equal to one process up to float32 rounding


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_training_world(tmp_path_factory.mktemp("flux_world"), preset="tiny-flux")


def run(world: Path, method: str, out: Path, *overrides: str, launch=(), expect=0, data="data"):
    cmd = [*launch] if launch else [sys.executable, "-m", "trainers"]
    cmd += [str(ROOT / "configs" / "tiny" / f"{method}.yaml"), f"model.path={world / 'model'}",
            f"data.path={world / data}", f"data.cache.dir={out}_cache", f"output_dir={out}", *overrides]
    proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True)
    assert proc.returncode == expect, proc.stderr[-4000:]
    return proc


def trained(folder: Path) -> dict:
    return load_file(folder / "trained.safetensors")


def assert_close(actual: dict, expected: dict):
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k].float(), expected[k].float(), rtol=RTOL, atol=ATOL, msg=k)


def transformer_inputs(config, batch: int = 2, side: int = 8, tokens: int = 7):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.in_channels // 4, side, side, generator=g)
    t = torch.tensor([0.3, 0.8])[:batch]
    hidden = torch.randn(batch, tokens, config.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, config.pooled_projection_dim, generator=g)
    guidance = torch.full((batch,), 1.0) if config.guidance_embeds else None
    return x, t, hidden, pooled, guidance


def diffusers_output(transformer, x, t, hidden, pooled, guidance):
    """diffusers' FluxTransformer2DModel called as FluxPipeline calls it, unpacked to (b, 16, h, w)."""
    from ldmcore.flux import image_ids, pack_latents, unpack_latents

    h, w = x.shape[-2:]
    out = transformer(hidden_states=pack_latents(x), timestep=t, guidance=guidance, pooled_projections=pooled,
                      encoder_hidden_states=hidden, txt_ids=torch.zeros(hidden.shape[1], 3), img_ids=image_ids(h, w),
                      return_dict=False)[0]
    return unpack_latents(out, h, w)


SETTINGS = ["train.max_steps=4", "train.checkpoint_every=2", "train.lr_scheduler=cosine", "train.warmup_steps=1",
            "loss.caption_dropout=0.3", "train.learning_rate=1e-3"]


@pytest.mark.parametrize("method,stage", [("lora", "zero2"), ("full", "zero3")])
def test_two_processes_under_zero_equal_one_and_resume_exactly(world, tmp_path, method, stage):
    common = [*SETTINGS, *(["full.single_file=false", "train.ema_decay=0.7"] if method == "full" else [])]
    run(world, method, tmp_path / "one", *common, "train.batch_size=4")
    out = tmp_path / "ds"
    run(world, method, out, *common, "train.batch_size=2", launch=launcher(stage))
    last = out / "checkpoints" / "step_00000004"
    assert len(list((last / "deepspeed" / "state").glob("*optim_states.pt"))) == 2  # each rank its shard
    assert_close(trained(last), trained(tmp_path / "one" / "checkpoints" / "step_00000004"))
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    run(world, method, resumed, *common, "train.batch_size=2", "train.resume=latest", launch=launcher(stage))
    a, b = trained(resumed / "checkpoints" / "step_00000004"), trained(last)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_on_a_quantised_base_trains_in_float32_and_exports_plain_lora_files(world, tmp_path):
    """NF4 and int8 bases (bitsandbytes): the LoRA trains in float32 beside the quantised layers, and its
    files are those of an unquantised base (same keys and shapes, float32, no quantisation state); the
    steps see the quantised weights, so the LoRA differs a little from the plain base's."""
    plain = tmp_path / "plain"
    run(world, "lora", plain, "train.max_steps=3", "train.checkpoint_every=3", "train.learning_rate=1e-3")
    ref = trained(plain / "checkpoints" / "step_00000003")
    for kind in ("nf4", "int8"):
        out = tmp_path / kind
        run(world, "lora", out, "train.max_steps=3", "train.checkpoint_every=3", "train.learning_rate=1e-3",
            f"train.base_quantization={kind}", "validation.prompts=[a red circle]", "validation.steps=2")
        weights = trained(out / "checkpoints" / "step_00000003")
        assert weights.keys() == ref.keys() and all(w.dtype == torch.float32 for w in weights.values()), kind
        b = [k for k in weights if "lora_B" in k]
        assert all(weights[k].abs().sum() > 0 for k in b), kind  # every LoRA moved from its zero start
        assert any(not torch.equal(weights[k], ref[k]) for k in b), kind  # it trained on another (quantised) base
        # ...but near it: the LoRA's distance from the plain base's, relative to its size (all B weights together)
        drift = (torch.cat([weights[k].flatten() - ref[k].flatten() for k in b]).norm()
                 / torch.cat([ref[k].flatten() for k in b]).norm()).item()
        assert drift < {"nf4": 0.8, "int8": 0.15}[kind], (kind, drift)  # measured 0.51 and 0.041 on this tiny model
        for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
            exported, plain_file = load_file(out / name), load_file(plain / name)
            assert exported.keys() == plain_file.keys(), (kind, name)
            assert all(v.dtype == torch.float32 and v.shape == plain_file[k].shape for k, v in exported.items())
        assert (out / "samples" / "step_00000003.png").is_file()  # validation sampled the quantised base


def test_a_bf16_nf4_base_keeps_its_activations_in_bf16():
    """bitsandbytes' layers answer in their input's dtype, so float32 latents would keep an NF4 base's
    whole residual stream (and what backward stores of it) in float32. The training step's denoiser call
    passes the base its inputs in the base's dtype, as diffusers' training scripts do."""
    from ldmcore.checkpoints import Components
    from ldmcore.quantize import is_quantized, quantize_linears
    from ldmcore.text import build_word_tokenizer
    from trainers.method import Method, denoise

    parts = Components.from_preset("tiny-flux", build_word_tokenizer("a red circle".split()), seed=0)
    base = parts.denoiser.requires_grad_(False)
    quantize_linears(base, "nf4", compute_dtype=torch.bfloat16)
    base.to("cpu")  # (bitsandbytes quantises here)
    for p in base.parameters():
        if not is_quantized(p):
            p.data = p.data.to(torch.bfloat16)  # as the loop casts a frozen base
    seen = []
    base.transformer_blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))  # (img, txt, ...)
    x, t, hidden, pooled, _ = transformer_inputs(base.config)
    text = {"hidden": hidden, "pooled": pooled}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = denoise({}, Method(None, parts), parts, {}, x, t, text)
        base(x, t, **parts.family.denoiser_inputs(text))  # called with the float32 latents as they come
    assert seen == [torch.bfloat16, torch.float32]  # the second shows what the cast prevents
    assert pred.dtype == torch.bfloat16


def test_a_quantised_base_is_refused_for_a_method_that_trains_it(world, tmp_path):
    proc = run(world, "full", tmp_path / "q", "train.max_steps=1", "train.base_quantization=nf4", expect=1)
    assert "base_quantization" in proc.stderr and "full" in proc.stderr


def test_the_exported_lora_gives_diffusers_the_trained_transformer(world, tmp_path):
    import diffusers

    from adapters.lora import LoraSettings, add_lora
    from ldmcore.checkpoints import load_components

    out = tmp_path / "run"
    run(world, "lora", out, "train.max_steps=3", "train.checkpoint_every=3", "train.learning_rate=2e-2")
    ours = load_components(world / "model").denoiser
    add_lora(ours, LoraSettings(rank=4, alpha=2))
    weights = {k.removeprefix("denoiser."): v for k, v in trained(out / "checkpoints" / "step_00000003").items()}
    result = ours.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora" in k]
    pipe = diffusers.FluxPipeline.from_pretrained(world / "model")
    inputs = transformer_inputs(ours.config)
    with torch.no_grad():
        base = diffusers_output(pipe.transformer, *inputs)
        expected = ours(*inputs[:4], guidance=inputs[4])
        pipe.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
        got = diffusers_output(pipe.transformer, *inputs)
    assert rel_err(got, expected) < 1e-5
    assert rel_err(base, expected) > 1e-3  # the LoRA changes the output


def test_full_fine_tune_exports_a_flux_folder_and_a_transformer_file(world, tmp_path):
    import diffusers

    from ldmcore.checkpoints import load_components

    out = tmp_path / "full"
    run(world, "full", out, "train.max_steps=2", "train.checkpoint_every=2", "train.ema_decay=0.5",
        "train.gradient_checkpointing=true", "train.mixed_precision=bf16")
    ckpt = out / "checkpoints" / "step_00000002"
    assert (ckpt / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_ino == \
        (ckpt / "trained.safetensors").stat().st_ino  # the checkpoint's transformer/ is its weights, linked
    folder = load_components(out / "model")
    raw = load_file(ckpt / "trained.safetensors")
    base = load_components(world / "model").denoiser.state_dict()
    assert all(not torch.equal(raw[k], base[k]) for k in raw)  # every weight trained
    # model/transformer is the EMA, model/transformer_raw the raw weights; diffusers reads both
    pipe = diffusers.FluxPipeline.from_pretrained(out / "model")
    raw_model = diffusers.FluxTransformer2DModel.from_pretrained(out / "model", subfolder="transformer_raw")
    assert all(torch.equal(v, raw[k]) for k, v in raw_model.state_dict().items())
    inputs = transformer_inputs(folder.denoiser.config)
    with torch.no_grad():
        expected = folder.denoiser(*inputs[:4], guidance=inputs[4])
        assert rel_err(diffusers_output(pipe.transformer, *inputs), expected) < 1e-5
    # the single file is the transformer alone (BFL layout); the rest comes from a folder
    single = load_components(out / "model.safetensors", config=out / "model")
    assert all(torch.equal(v, folder.denoiser.state_dict()[k]) for k, v in single.denoiser.state_dict().items())
    from ldmcore.single_file_flux import detect_flux

    state = load_file(out / "model.safetensors")
    assert detect_flux(state) == {"guidance_embeds": True, "prefix": ""}
    assert not any(k.startswith(("vae", "text_encoder", "first_stage_model", "conditioner")) for k in state)


def test_dreambooth_lora_draws_class_images_with_the_flux_base(world, tmp_path):
    classes = tmp_path / "classes"
    out = tmp_path / "db"
    run(world, "dreambooth", out, "train.max_steps=2", "train.checkpoint_every=2", f"data.class_path={classes}",
        "dreambooth.num_class_images=2", "dreambooth.class_steps=2", "data.instance_prompt=a sks circle",
        "data.class_prompt=a circle")
    assert len(list(classes.glob("*.png"))) == 2  # drawn by the Flux base (flow Euler, its own guidance)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    weights = trained(out / "checkpoints" / "step_00000002")
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)
