"""load_components and saving, both layouts, checked against diffusers reading the same files."""

import pytest
import torch
from conftest import randomize_, rel_err
from safetensors.torch import load_file, save_file

from ldmcore.checkpoints import Components, load_components
from ldmcore.text import build_word_tokenizer
from ldmcore.weights import CheckpointError

WORDS = "a red circle on white background".split()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tok = build_word_tokenizer(WORDS)
    parts = Components.from_preset("tiny", tok, seed=0)
    randomize_(parts.denoiser, seed=1, std=0.05)
    randomize_(parts.vae, seed=2, std=0.05)
    root = tmp_path_factory.mktemp("ckpt")
    parts.save_pretrained(root / "model")
    parts.save_single_file(root / "model.safetensors")
    return parts, root


def assert_same_weights(a: Components, b: Components):
    for name in ("denoiser", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sorted(sa) == sorted(sb), name
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}.{k}"


def unet_inputs(parts, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 900]), torch.randn(2, 77, 32, generator=g)


def test_folder_round_trip_is_exact(saved):
    parts, root = saved
    loaded = load_components(root / "model")
    assert_same_weights(parts, loaded)
    assert loaded.schedule == parts.schedule
    assert loaded.tokenizer("a red circle")["input_ids"] == parts.tokenizer("a red circle")["input_ids"]


def test_single_file_round_trip_is_exact(saved):
    parts, root = saved
    loaded = load_components(root / "model.safetensors", tokenizer=parts.tokenizer)
    assert_same_weights(parts, loaded)
    assert loaded.schedule == parts.schedule
    keys = load_file(root / "model.safetensors")
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.conv_out.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys


def test_diffusers_reads_both_layouts(saved):
    import diffusers

    parts, root = saved
    x, t, ctx = unet_inputs(parts)
    with torch.no_grad():
        expected = parts.denoiser(x, t, ctx)
        folder_pipe = diffusers.StableDiffusionPipeline.from_pretrained(root / "model", safety_checker=None)
        assert rel_err(folder_pipe.unet(x, t, ctx).sample, expected) < 1e-5
        single_pipe = diffusers.StableDiffusionPipeline.from_single_file(
            str(root / "model.safetensors"), config=str(root / "model"), local_files_only=True, safety_checker=None
        )
        assert rel_err(single_pipe.unet(x, t, ctx).sample, expected) < 1e-5
        for ours, theirs in ((parts.vae, single_pipe.vae), (parts.text_encoder, single_pipe.text_encoder)):
            theirs_sd = theirs.state_dict()
            for k, v in ours.state_dict().items():
                assert torch.equal(theirs_sd[k], v), k


def test_foreign_single_file_with_config_folder(saved, tmp_path):
    """A single file without our metadata (as other tools write it), read with a config folder."""
    parts, root = saved
    plain = tmp_path / "foreign.safetensors"
    state = load_file(root / "model.safetensors")
    state["model_ema.decay"] = torch.tensor(0.999)  # leftovers other tools keep are ignored
    save_file(state, plain)
    loaded = load_components(plain, tokenizer=root / "model" / "tokenizer", config=root / "model")
    assert_same_weights(parts, loaded)


def test_dtype_and_prediction_type_override(saved):
    parts, root = saved
    loaded = load_components(root / "model", dtype=torch.bfloat16, prediction_type="v_prediction")
    assert loaded.denoiser.dtype == loaded.vae.dtype == torch.bfloat16
    assert next(loaded.text_encoder.parameters()).dtype == torch.bfloat16
    assert loaded.schedule.prediction_type == "v_prediction"


def test_saving_replaces_atomically(saved, tmp_path):
    parts, _ = saved
    target = tmp_path / "out"
    parts.save_pretrained(target)
    (target / "stale.txt").write_text("from an older save")
    parts.save_pretrained(target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left behind


def test_errors_name_the_problem(saved, tmp_path):
    parts, root = saved
    with pytest.raises(CheckpointError, match="no such file"):
        load_components(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="UNet2DConditionModel folder: point to the model folder above it"):
        load_components(root / "model" / "unet")
    with pytest.raises(CheckpointError, match="carry no tokenizer"):
        load_components(root / "model.safetensors", tokenizer=tmp_path / "missing")
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 2)}, lora)
    with pytest.raises(CheckpointError, match="LoRA"):
        load_components(lora)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((root / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        load_components(truncated, tokenizer=parts.tokenizer)
    broken = tmp_path / "broken"
    broken.mkdir()
    for sub in ("unet", "vae", "text_encoder", "tokenizer"):
        (broken / sub).mkdir()
    (broken / "unet" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_components(broken)
    parts.save_pretrained(broken)
    (broken / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="could not load text_encoder/"):
        load_components(broken)
