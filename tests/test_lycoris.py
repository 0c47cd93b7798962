"""LoHa and LoKr (`lora.type`): peft's adapters, written in the LyCORIS layout ComfyUI and A1111 load, and
read back by an independent reader: the lycoris-lora package applies our file to diffusers' own U-Net, and
its output must be the one our peft-injected U-Net gives. Our merge must give it too."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_training_world, randomize_, rel_err, unet_call_inputs
from safetensors.torch import load_file

from adapters.lora import LoraSettings, add_lora, load_lora_file, lora_state_dict, merge_lora
from adapters.lycoris import LYCORIS_FILE, read_lycoris, save_lycoris
from ldmcore.checkpoints import Components, load_components
from ldmcore.text import build_word_tokenizer
from ldmcore.weights import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
WORDS = "a red circle on white background".split()


def randomize_adapter_(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".hada_" in name or ".lokr_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lycoris") / "model"
    parts = Components.from_preset("tiny", build_word_tokenizer(WORDS), seed=0)
    randomize_(parts.denoiser, seed=1, std=0.05)
    parts.save_pretrained(folder)
    return folder


CASES = {  # name -> settings; the tiny U-Net's attention layers are 32 or 64 wide
    "loha": LoraSettings(type="loha", rank=4, alpha=2.0, targets="attention"),
    "lokr-full": LoraSettings(type="lokr", rank=4, alpha=8.0, targets="attention"),  # both Kronecker halves full
    "lokr-factored": LoraSettings(type="lokr", rank=1, alpha=0.5, targets="attention"),  # the second half factored
    "loha-convs": LoraSettings(type="loha", rank=2, alpha=1.0, targets="all"),  # 3x3 convolutions too
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lycoris_reads_our_file_as_our_model_computes_it(base, tmp_path, case):
    settings = CASES[case]
    ours = load_components(base)
    add_lora(ours.denoiser, settings)
    randomize_adapter_(ours.denoiser, seed=3)
    sd = lora_state_dict(ours.denoiser)
    if case == "lokr-full":
        assert any(k.endswith("lokr_w2") for k in sd) and not any(k.endswith("lokr_w2_a") for k in sd)
    if case == "lokr-factored":
        assert any(k.endswith("lokr_w2_a") for k in sd)
    path = save_lycoris(tmp_path / LYCORIS_FILE, sd, None, settings, denoiser_config=ours.denoiser.config)
    keys = load_file(path)
    assert any(k.startswith("lora_unet_down_blocks_") for k in keys) and all(
        k.split(".", 1)[1] in ("alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w2",
                               "lokr_w2_a", "lokr_w2_b", "lokr_w1_a", "lokr_w1_b") for k in keys)

    x, t, ctx, _ = unet_call_inputs(ours.denoiser.config, seed=0)
    with torch.no_grad():
        expected = ours.denoiser(x, t, encoder_hidden_states=ctx)

    # the independent reader: lycoris-lora on diffusers' UNet2DConditionModel with the same base weights
    import diffusers
    import lycoris
    from lycoris.wrapper import LycorisNetwork

    unet = diffusers.UNet2DConditionModel.from_pretrained(base / "unet").eval()
    LycorisNetwork.LORA_PREFIX = "lora_unet"
    network, _ = lycoris.create_lycoris_from_weights(1.0, None, unet, weights_sd=load_file(path))
    network.apply_to()
    with torch.no_grad():
        theirs = unet(x, t, ctx).sample
    with torch.no_grad():
        plain = load_components(base).denoiser(x, t, encoder_hidden_states=ctx)
    assert rel_err(expected, plain) > 1e-3  # the adapter does change the output...
    assert rel_err(theirs, expected) < 1e-5, case  # ...and lycoris reads the file as our model computes it

    merged = load_components(base)  # our merge of the file: the same model again
    merge_lora(merged, path)
    with torch.no_grad():
        assert rel_err(merged.denoiser(x, t, encoder_hidden_states=ctx), expected) < 1e-5


def test_a_lycoris_file_is_named_on_a_lora_only_path_and_inspected(base, tmp_path):
    settings = CASES["lokr-full"]
    model = load_components(base)
    add_lora(model.denoiser, settings)
    path = save_lycoris(tmp_path / "x.safetensors", lora_state_dict(model.denoiser), None, settings,
                        denoiser_config=model.denoiser.config)
    with pytest.raises(CheckpointError, match=r"x.safetensors.*LoKr"):
        load_lora_file(path)
    assert read_lycoris(path).algo == "lokr"
    proc = subprocess.run([sys.executable, "-m", "adapters", "inspect", str(path)], cwd=str(ROOT), capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "lokr" in proc.stdout.lower(), proc.stderr


def test_a_loha_trains_exports_and_resumes_through_the_entry_point(tmp_path):
    world = build_training_world(tmp_path / "world")
    cmd = [sys.executable, "-m", "trainers", str(ROOT / "configs" / "tiny" / "lora.yaml"), f"model.path={world / 'model'}",
           f"data.path={world / 'data'}", f"data.cache.dir={tmp_path / 'cache'}", "train.max_steps=2",
           "lora.type=loha", "lora.rank=4", "lora.alpha=4"]
    proc = subprocess.run([*cmd, f"output_dir={tmp_path / 'out'}"], cwd=str(ROOT), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / LYCORIS_FILE).is_file() and not (out / "pytorch_lora_weights.safetensors").exists()
    trained = load_file(out / "checkpoints" / "step_00000002" / "trained.safetensors")
    assert any(".hada_w1_a" in k for k in trained)
    lyco = read_lycoris(out / LYCORIS_FILE)
    assert lyco.algo == "loha" and lyco.ranks == {4}
    proc = subprocess.run([*cmd, f"output_dir={tmp_path / 'bad'}", "lora.use_dora=true"], cwd=str(ROOT),
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "use_dora" in proc.stderr


def test_an_sdxl_lokr_is_written_in_the_original_names_and_merges_to_the_trained_model(tmp_path):
    parts = Components.from_preset("tiny-sdxl", build_word_tokenizer(WORDS), seed=0)
    randomize_(parts.denoiser, seed=1, std=0.05)
    parts.save_pretrained(tmp_path / "model")
    ours = load_components(tmp_path / "model")
    settings = LoraSettings(type="lokr", rank=2, alpha=1.0, targets="attention")
    add_lora(ours.denoiser, settings)
    randomize_adapter_(ours.denoiser, seed=4)
    path = save_lycoris(tmp_path / "xl.safetensors", lora_state_dict(ours.denoiser), None, settings,
                        denoiser_config=ours.denoiser.config)
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for k in load_file(path))  # kohya's SDXL names: the original (sgm) ones
    x, t, ctx, extra = unet_call_inputs(ours.denoiser.config, seed=0)
    with torch.no_grad():
        expected = ours.denoiser(x, t, encoder_hidden_states=ctx, **extra)
    merged = load_components(tmp_path / "model")
    merge_lora(merged, path)  # (the names come back through the file's stored layout)
    with torch.no_grad():
        assert rel_err(merged.denoiser(x, t, encoder_hidden_states=ctx, **extra), expected) < 1e-5
