"""SDXL's original single-file (sgm) layout: what we write diffusers' from_single_file reads back exactly,
what diffusers' models hold our reader gives back exactly, both ways round trip, the full-size layout
lands on the real key names and on diffusers' own detection, and broken files are explained."""
from __future__ import annotations

import pytest
import torch
from conftest import randomize_
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.loaders import single_file_utils as diffusers_sf
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldmcore import single_file
from ldmcore.presets import PRESETS
from ldmcore.single_file import detect_family
from ldmcore.single_file_sdxl import detect_sdxl, diffusers_to_original, original_to_diffusers
from ldmcore.text import build_word_tokenizer
from ldmcore.weights import CheckpointError

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_L, BIGG = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
REFINER_BIGG = "conditioner.embedders.0.model."
WORDS = "a red green blue circle square".split()
TEXT_PARTS = ("text_encoder", "text_encoder_2")


def text_config(keys: dict, tokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(**{**keys, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                             "eos_token_id": tokenizer.eos_token_id})


def diffusers_models(preset: str, in_channels: int = 4, seed: int = 0) -> dict:
    """diffusers' and transformers' own classes built from one of our presets, every weight random
    (distinct values everywhere, so two swapped tensors cannot compare equal)."""
    p, tokenizer = PRESETS[preset], build_word_tokenizer(WORDS)
    models = {
        "unet": UNet2DConditionModel(**{**p.denoiser, "in_channels": in_channels}),
        "vae": AutoencoderKL(**p.vae),
        "text_encoder_2": CLIPTextModelWithProjection(text_config(p.text_encoder_2, tokenizer)),
    }
    if p.text_encoder is not None:
        models["text_encoder"] = CLIPTextModel(text_config(p.text_encoder, tokenizer))
    for i, model in enumerate(models.values()):
        randomize_(model, seed=seed + i, std=1.0)
    return models


def state_dicts(models: dict) -> dict[str, dict[str, torch.Tensor]]:
    return {name: model.state_dict() for name, model in models.items()}


def export(sds: dict, preset: str, in_channels: int = 4) -> dict[str, torch.Tensor]:
    p = PRESETS[preset]
    texts = {name: sds[name] for name in TEXT_PARTS if name in sds}
    return diffusers_to_original(sds["unet"], sds["vae"], texts, {**p.denoiser, "in_channels": in_channels}, p.vae)


def configs(preset: str, in_channels: int = 4) -> dict:
    p = PRESETS[preset]
    return {"unet": {**p.denoiser, "in_channels": in_channels}, "vae": p.vae, "text_encoder": p.text_encoder,
            "text_encoder_2": p.text_encoder_2}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    different = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"


# -- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_round_trip_is_exact(preset):
    models = diffusers_models(preset)
    sds = state_dicts(models)
    original = export(sds, preset)
    back = original_to_diffusers(original, configs(preset))
    assert sorted(back) == sorted(sds)
    for name in sds:
        assert_same(back[name], sds[name])
        models[name].load_state_dict(back[name], strict=True)  # the layout of transformers' own state dicts
    assert_same(export(back, preset), original)
    if preset == "tiny-sdxl-refiner":
        assert not any(k.startswith((CLIP_L, BIGG)) for k in original)
        assert REFINER_BIGG + "text_projection" in original


def test_the_file_has_the_sgm_names_and_shapes():
    sds = state_dicts(diffusers_models("tiny-sdxl"))
    original = export(sds, "tiny-sdxl")
    te2 = sds["text_encoder_2"]
    q, k, v = (te2[f"text_model.encoder.layers.2.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(original[BIGG + "transformer.resblocks.2.attn.in_proj_weight"], torch.cat([q, k, v]))
    assert torch.equal(original[BIGG + "text_projection"], te2["text_projection.weight"].T)  # (width, proj)
    assert torch.equal(original[BIGG + "positional_embedding"], te2["text_model.embeddings.position_embedding.weight"])
    assert torch.equal(original[UNET + "label_emb.0.2.bias"], sds["unet"]["add_embedding.linear_2.bias"])
    expected = [
        CLIP_L + "text_model.encoder.layers.2.mlp.fc2.weight",
        BIGG + "token_embedding.weight",
        BIGG + "ln_final.bias",
        BIGG + "transformer.resblocks.0.mlp.c_fc.weight",
        BIGG + "transformer.resblocks.0.attn.out_proj.bias",
        UNET + "label_emb.0.0.weight",
        UNET + "input_blocks.3.0.op.weight",
        UNET + "input_blocks.4.1.proj_in.weight",  # level 1, first resnet: attention from level 1 on
        UNET + "input_blocks.8.1.transformer_blocks.1.attn2.to_k.weight",  # depth 2 on level 2
        UNET + "output_blocks.2.2.conv.weight",  # up level 0 has attention: the upsampler is third
        UNET + "output_blocks.5.2.conv.weight",
        UNET + "output_blocks.8.0.skip_connection.weight",
        UNET + "middle_block.1.transformer_blocks.1.norm3.weight",
        VAE + "decoder.up.2.upsample.conv.weight",
    ]
    assert [k for k in expected if k not in original] == []
    absent = ("input_blocks.1.1.", "input_blocks.9.", "output_blocks.8.2.", "output_blocks.9.")
    assert not any(k.startswith(tuple(UNET + a for a in absent)) for k in original)
    assert not any(k.endswith(("logit_scale", "position_ids")) for k in original)


def test_inpainting_file_round_trips_and_is_detected():
    sds = state_dicts(diffusers_models("tiny-sdxl", in_channels=9))
    original = export(sds, "tiny-sdxl", in_channels=9)
    assert original[UNET + "input_blocks.0.0.weight"].shape[1] == 9
    found = detect_family(original)
    assert (found["family"], found["in_channels"], found["inpainting"]) == ("sdxl", 9, True)
    back = original_to_diffusers(original, configs("tiny-sdxl", in_channels=9))
    assert_same(back["unet"], sds["unet"])


# -- diffusers reads our files, our reader reads diffusers' models -------------------------------------


def diffusers_folder(tmp_path, preset: str):
    """A diffusers pipeline folder of the tiny model (default weights, not the ones compared), written by
    diffusers itself; from_single_file reads its configs."""
    p, tokenizer = PRESETS[preset], build_word_tokenizer(WORDS)
    models = diffusers_models(preset, seed=100)
    scheduler = EulerDiscreteScheduler.from_config(p.scheduler)
    if preset == "tiny-sdxl":
        pipe = StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=scheduler, **models)
    else:
        pipe = StableDiffusionXLImg2ImgPipeline(text_encoder=None, tokenizer=None, tokenizer_2=tokenizer,
                                                scheduler=scheduler, requires_aesthetics_score=True, **models)
    pipe.save_pretrained(tmp_path / preset)
    return tmp_path / preset, type(pipe)


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sdxl-refiner"])
def test_diffusers_from_single_file_reads_our_file_exactly(tmp_path, preset):
    folder, pipeline_class = diffusers_folder(tmp_path, preset)
    sds = state_dicts(diffusers_models(preset))
    path = tmp_path / "model.safetensors"
    save_file(export(sds, preset), str(path))
    pipe = pipeline_class.from_single_file(str(path), config=str(folder), local_files_only=True)
    for name in sds:
        assert_same(getattr(pipe, name).state_dict(), sds[name])
    if preset == "tiny-sdxl-refiner":
        assert pipe.text_encoder is None


def test_our_reader_gives_back_what_diffusers_saved(tmp_path):
    """Weights as diffusers writes them to disk (the text encoders with `text_model.`), through our file,
    back as the tensors of the pipeline diffusers loads from that folder."""
    folder, _ = diffusers_folder(tmp_path, "tiny-sdxl")
    on_disk = {
        "unet": load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"),
        "vae": load_file(folder / "vae" / "diffusion_pytorch_model.safetensors"),
        **{name: load_file(folder / name / "model.safetensors") for name in TEXT_PARTS},
    }
    original = export(on_disk, "tiny-sdxl")
    back = original_to_diffusers(original, configs("tiny-sdxl"))
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    for name in on_disk:
        assert_same(back[name], getattr(pipe, name).state_dict())


# -- the full-size layout, on the meta device ------------------------------------------------------------


def full_size(preset: str, in_channels: int = 4) -> tuple[dict, dict]:
    p = PRESETS[preset]
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**{**p.denoiser, "in_channels": in_channels}), "vae": AutoencoderKL(**p.vae),
                  "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**p.text_encoder_2))}
        if p.text_encoder is not None:
            models["text_encoder"] = CLIPTextModel(CLIPTextConfig(**p.text_encoder))
        original = export(state_dicts(models), preset, in_channels)
    return models, original


@pytest.mark.parametrize("preset, in_channels, diffusers_type", [
    ("sdxl", 4, "xl_base"), ("sdxl", 9, "xl_inpaint"), ("sdxl-refiner", 4, "xl_refiner")])
def test_full_size_file_is_what_diffusers_expects(preset, in_channels, diffusers_type):
    models, original = full_size(preset, in_channels)
    assert diffusers_sf.infer_diffusers_model_type(original) == diffusers_type
    shapes = {k: v.shape for k, v in models["unet"].state_dict().items()}
    theirs = diffusers_sf.convert_ldm_unet_checkpoint(original, dict(models["unet"].config))
    assert {k: v.shape for k, v in theirs.items()} == shapes
    prefix = BIGG if preset == "sdxl" else REFINER_BIGG
    te2 = models["text_encoder_2"]
    theirs = diffusers_sf.convert_open_clip_checkpoint(te2, original, prefix=prefix)
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in te2.state_dict().items()}
    found = detect_family(original)
    expected_family = "sdxl" if preset == "sdxl" else "sdxl-refiner"
    assert (found["family"], found["in_channels"]) == (expected_family, in_channels)
    assert found["inpainting"] == (in_channels == 9)
    unet = PRESETS[preset].denoiser
    assert found["cross_attention_dim"] == unet["cross_attention_dim"]
    assert found["projection_class_embeddings_input_dim"] == unet["projection_class_embeddings_input_dim"]
    assert found["text_encoders"] == (("text_encoder", "text_encoder_2") if preset == "sdxl" else ("text_encoder_2",))


def test_full_size_base_file_has_the_real_key_names():
    _, original = full_size("sdxl")
    shapes = {
        UNET + "label_emb.0.0.weight": (1280, 2816),
        UNET + "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
        UNET + "input_blocks.8.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        UNET + "middle_block.1.transformer_blocks.9.norm3.weight": (1280,),
        UNET + "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        UNET + "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        UNET + "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        CLIP_L + "text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        BIGG + "transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        BIGG + "text_projection": (1280, 1280),
        BIGG + "positional_embedding": (77, 1280),
        VAE + "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    }
    assert {k: tuple(original[k].shape) for k in shapes if k in original} == shapes
    absent = ("input_blocks.1.1.", "input_blocks.9.", "output_blocks.9.")
    assert not any(k.startswith(tuple(UNET + a for a in absent)) for k in original)


# -- detection and broken files --------------------------------------------------------------------------


def test_detection_of_tiny_files_and_of_files_without_text_encoders():
    base = export(state_dicts(diffusers_models("tiny-sdxl")), "tiny-sdxl")
    refiner = export(state_dicts(diffusers_models("tiny-sdxl-refiner")), "tiny-sdxl-refiner")
    assert detect_family(base) == {
        "family": "sdxl", "text_kind": None, "cross_attention_dim": 80, "in_channels": 4, "inpainting": False,
        "use_linear_projection": True, "prediction_type": None, "projection_class_embeddings_input_dim": 96,
        "text_encoders": ("text_encoder", "text_encoder_2")}
    found = detect_family(refiner)
    assert (found["family"], found["cross_attention_dim"]) == ("sdxl-refiner", 48)
    assert found["text_encoders"] == ("text_encoder_2",)
    # without text encoders, the U-Net's context width decides; tiny widths are no family's
    unet_only = {k: v for k, v in base.items() if k.startswith(UNET)}
    with pytest.raises(CheckpointError, match="context width 80 is neither"):
        detect_sdxl(unet_only)
    _, full = full_size("sdxl-refiner")
    assert detect_sdxl({k: v for k, v in full.items() if k.startswith(UNET)})["family"] == "sdxl-refiner"
    # text encoders of another model than the U-Net
    mixed = {**base, BIGG + "positional_embedding": torch.zeros(77, 64)}
    with pytest.raises(CheckpointError, match=r"80 but the text encoders give text_encoder 32 \+ text_encoder_2 64"):
        detect_family(mixed)


def test_the_sd_reader_sends_sdxl_files_here_and_back():
    base = export(state_dicts(diffusers_models("tiny-sdxl")), "tiny-sdxl")
    p = PRESETS["tiny-sdxl"]
    with pytest.raises(CheckpointError, match="single_file_sdxl.original_to_diffusers"):
        single_file.original_to_diffusers(base, p.denoiser, p.vae, "clip")
    sd_file = {k: v for k, v in base.items() if k.startswith((UNET, VAE)) and "label_emb" not in k}
    with pytest.raises(CheckpointError, match="not an SDXL checkpoint.*single_file.original_to_diffusers"):
        original_to_diffusers(sd_file, configs("tiny-sdxl"))


def test_extra_models_and_training_state_are_ignored():
    sds = state_dicts(diffusers_models("tiny-sdxl"))
    original = export(sds, "tiny-sdxl")
    extra = {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(10),
        "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(1),
        "denoiser.sigmas": torch.ones(1000),
        VAE + "loss.logvar": torch.zeros(()),
        CLIP_L + "text_model.embeddings.position_ids": torch.arange(77)[None],
        BIGG + "logit_scale": torch.tensor(4.6),
    }
    back = original_to_diffusers({**original, **extra}, configs("tiny-sdxl"))
    for name in sds:
        assert_same(back[name], sds[name])
    assert detect_family({**original, **extra})["family"] == "sdxl"


@pytest.mark.parametrize("key", [
    UNET + "label_emb.0.2.weight",
    UNET + "input_blocks.8.1.transformer_blocks.1.attn2.to_k.weight",
    VAE + "decoder.up.0.block.0.nin_shortcut.bias",
    CLIP_L + "text_model.encoder.layers.1.self_attn.v_proj.bias",
    BIGG + "transformer.resblocks.2.attn.in_proj_weight",
    BIGG + "ln_final.weight",
    BIGG + "text_projection",
])
def test_a_truncated_file_names_what_is_missing(key):
    original = export(state_dicts(diffusers_models("tiny-sdxl")), "tiny-sdxl")
    assert key in original
    broken = {k: v for k, v in original.items() if k != key}
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        original_to_diffusers(broken, configs("tiny-sdxl"))


def test_files_and_configs_that_disagree_are_refused():
    base = export(state_dicts(diffusers_models("tiny-sdxl")), "tiny-sdxl")
    refiner = export(state_dicts(diffusers_models("tiny-sdxl-refiner")), "tiny-sdxl-refiner")
    with pytest.raises(CheckpointError, match="text_encoder: the configs expect it.*embedders.0.transformer"):
        original_to_diffusers(refiner, configs("tiny-sdxl"))
    without_bigg = {k: v for k, v in base.items() if not k.startswith(BIGG)}
    with pytest.raises(CheckpointError, match="no second text encoder"):
        original_to_diffusers(without_bigg, {**configs("tiny-sdxl"), "text_encoder_2": None})
    # an SD U-Net config (no added conditioning) does not describe label_emb
    sd_unet = {k: v for k, v in PRESETS["tiny-sdxl"].denoiser.items() if not k.startswith(("addition", "projection"))}
    with pytest.raises(CheckpointError, match=r"does not describe model\.diffusion_model\.label_emb\.0\.0\.bias"):
        original_to_diffusers(base, {**configs("tiny-sdxl"), "unet": sd_unet})
    deeper = {**PRESETS["tiny-sdxl"].text_encoder_2, "num_hidden_layers": 4}
    fewer_layers = {**configs("tiny-sdxl"), "text_encoder_2": deeper}
    with pytest.raises(CheckpointError, match="text_encoder_2: the checkpoint has 3 layers but the config expects 4"):
        original_to_diffusers(base, fewer_layers)
    sds = state_dicts(diffusers_models("tiny-sdxl"))
    no_projection = {k: v for k, v in sds["text_encoder_2"].items() if k != "text_projection.weight"}
    with pytest.raises(CheckpointError, match="text_projection.weight"):
        texts = {"text_encoder": sds["text_encoder"], "text_encoder_2": no_projection}
        diffusers_to_original(sds["unet"], sds["vae"], texts, PRESETS["tiny-sdxl"].denoiser, PRESETS["tiny-sdxl"].vae)
