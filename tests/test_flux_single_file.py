"""Black Forest Labs' single-file Flux layout both ways: exact round trips, the fused and swapped tensors,
the config read back from shapes, errors that name the key; and, at Flux's real width (diffusers' reader
splits `linear1` with hard-coded widths), the file we write read by diffusers' `from_single_file` and its
own converter."""
import json

import pytest
import torch
from conftest import randomize_
from safetensors.torch import save_file

from ldmcore.flux import FluxTransformer
from ldmcore.single_file_flux import (
    PREFIX,
    config_from_original,
    detect_flux,
    diffusers_to_original,
    original_to_diffusers,
)
from ldmcore.weights import CheckpointError

TINY = {
    "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
    "joint_attention_dim": 24, "pooled_projection_dim": 20, "axes_dims_rope": (4, 6, 6), "in_channels": 64,
}
VARIANTS = {"schnell": dict(TINY), "dev": dict(TINY, guidance_embeds=True)}


def tiny(name="dev"):
    model = randomize_(FluxTransformer.from_config(VARIANTS[name]))
    return model, model.state_dict()


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_round_trip_is_exact(name, prefix):
    model, ours = tiny(name)
    original = diffusers_to_original(ours, model.config, prefix=prefix)
    assert all(k.startswith(prefix) for k in original)
    assert detect_flux(original) == {"guidance_embeds": name == "dev", "prefix": prefix}
    back = original_to_diffusers(original, model.config)
    assert set(back) == set(ours)
    assert all(torch.equal(back[k], v) for k, v in ours.items())


def test_fused_and_swapped_tensors():
    model, ours = tiny()
    original = diffusers_to_original(ours, model.config)
    d = model.config.inner_dim  # 32
    qkv = original["double_blocks.1.txt_attn.qkv.weight"]
    assert torch.equal(qkv[d : 2 * d], ours["transformer_blocks.1.attn.add_k_proj.weight"])
    linear1 = original["single_blocks.0.linear1.bias"]
    assert linear1.shape == (7 * d,)
    assert torch.equal(linear1[3 * d :], ours["single_transformer_blocks.0.proj_mlp.bias"])
    final = original["final_layer.adaLN_modulation.1.weight"]  # BFL: shift rows first
    assert torch.equal(final[:d], ours["norm_out.linear.weight"][d:])
    norm = original["single_blocks.1.norm.key_norm.scale"]
    assert torch.equal(norm, ours["single_transformer_blocks.1.attn.norm_k.weight"])


def test_other_components_beside_the_prefix_are_ignored():
    model, ours = tiny()
    full = diffusers_to_original(ours, model.config, prefix=PREFIX)
    full["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # a VAE in the same file
    back = original_to_diffusers(full, model.config)
    assert set(back) == set(ours)


def test_config_from_original_recovers_the_config():
    for name in VARIANTS:
        model, ours = tiny(name)
        original = diffusers_to_original(ours, model.config, prefix=PREFIX)
        read = config_from_original(original, axes_dims_rope=(4, 6, 6))
        assert read == model.config.to_dict()
        with pytest.raises(CheckpointError, match="axes_dims_rope"):  # 16-wide heads: not Flux.1's split
            config_from_original(original)
    with pytest.raises(CheckpointError, match="not a Flux"):
        config_from_original({"img_in.weight": torch.zeros(3, 64)})
    assert detect_flux({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}) is None


def test_truncated_or_mismatched_files_raise_naming_the_key():
    model, ours = tiny()
    original = diffusers_to_original(ours, model.config, prefix=PREFIX)
    truncated = {k: v for k, v in original.items() if k != PREFIX + "single_blocks.1.linear2.bias"}
    lacks = r"Black Forest.* lacks model\.diffusion_model\.single_blocks\.1\.linear2\.bias"
    with pytest.raises(CheckpointError, match=lacks):
        original_to_diffusers(truncated, model.config)
    with pytest.raises(CheckpointError, match="guidance_in.in_layer.weight"):  # a dev file read as schnell
        original_to_diffusers(original, VARIANTS["schnell"])
    wide = dict(model.config.to_dict(), num_attention_heads=3)  # 48 wide, the file 32
    with pytest.raises(CheckpointError, match=r"img_attn\.qkv\.weight has 96 rows.*3 heads x 16"):
        original_to_diffusers(original, wide)
    lacking = {k: v for k, v in ours.items() if k != "transformer_blocks.0.attn.to_v.weight"}
    with pytest.raises(CheckpointError, match="transformer_blocks.0.attn.to_v.weight"):
        diffusers_to_original(lacking, model.config)
    lora = dict(original, **{"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="LoRA"):
        original_to_diffusers({k.removeprefix(PREFIX): v for k, v in lora.items()}, model.config)


@pytest.mark.slow
def test_real_width_file_is_read_by_diffusers(tmp_path):
    """One double and one single block at Flux's real width (3072 = 24 x 128), bf16: about 1 GB, 15 s."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
    )

    cfg = {"num_layers": 1, "num_single_layers": 1, "joint_attention_dim": 32, "pooled_projection_dim": 16,
           "guidance_embeds": True}
    with torch.device("meta"):
        model = FluxTransformer.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    ours = {k: torch.randn(v.shape, generator=g, dtype=torch.bfloat16) for k, v in model.state_dict().items()}
    original = diffusers_to_original(ours, model.config)
    save_file(original, str(tmp_path / "flux1.safetensors"))
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(model.config.to_dict()))

    assert config_from_original(original) == model.config.to_dict()  # 128-wide heads: Flux.1's rotary split
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert set(converted) == set(ours) and all(torch.equal(converted[k], v) for k, v in ours.items())
    del converted

    ref = FluxTransformer2DModel.from_single_file(
        str(tmp_path / "flux1.safetensors"), config=str(tmp_path), subfolder="transformer",
        local_files_only=True, torch_dtype=torch.bfloat16,
    )
    loaded = ref.state_dict()
    assert set(loaded) == set(ours) and all(torch.equal(loaded[k], v) for k, v in ours.items())


# -- a transformer file as a whole model: the rest from a folder (ldmcore.checkpoints) ----------------------


@pytest.fixture(scope="module")
def flux_folders(tmp_path_factory):
    """A tiny dev and a tiny schnell diffusers folder, and each one's transformer as a BFL-layout file
    written the way other tools ship it (no metadata of ours)."""
    from ldmcore.checkpoints import Components
    from ldmcore.text import build_word_tokenizer

    root = tmp_path_factory.mktemp("flux_files")
    out = {}
    for preset, name in (("tiny-flux", "dev"), ("tiny-flux-schnell", "schnell")):
        parts = Components.from_preset(preset, build_word_tokenizer(["a", "red", "circle"]), seed=0)
        randomize_(parts.denoiser)
        parts.save_pretrained(root / name)
        state = diffusers_to_original(parts.denoiser.state_dict(), parts.denoiser.config)
        save_file({k: v.contiguous() for k, v in state.items()}, str(root / f"flux1-{name}.safetensors"))
        out[name] = (root / name, root / f"flux1-{name}.safetensors", parts)
    return out


def test_a_transformer_file_loads_with_a_folders_vae_and_text_encoders(flux_folders):
    from ldmcore.checkpoints import load_components

    for name, (folder, file, parts) in flux_folders.items():
        loaded = load_components(file, config=folder)
        assert loaded.family.name == f"flux-{name}"
        assert all(torch.equal(v, parts.denoiser.state_dict()[k]) for k, v in loaded.denoiser.state_dict().items())
        assert loaded.text_encoder_2.__class__.__name__ == "T5EncoderModel" and loaded.tokenizer_2 is not None


def test_a_transformer_file_alone_says_where_its_text_encoders_go(flux_folders):
    from ldmcore.checkpoints import load_components

    _, file, _ = flux_folders["dev"]
    with pytest.raises(CheckpointError) as e:
        load_components(file)
    message = str(e.value)
    assert str(file) in message and "config=" in message and "text_encoder_2/" in message and "FLUX.1-dev" in message


def test_schnell_weights_with_dev_settings_are_refused_and_the_reverse(flux_folders):
    from ldmcore.checkpoints import load_components

    for weights, settings in (("schnell", "dev"), ("dev", "schnell")):
        _, file, _ = flux_folders[weights]
        folder = flux_folders[settings][0]
        with pytest.raises(CheckpointError) as e:
            load_components(file, config=folder)
        message = str(e.value)
        assert str(file) in message and f"Flux.1-{weights} weights" in message and f"Flux.1-{settings}'s settings" in message
        assert f"Pass a Flux.1-{weights} folder" in message
