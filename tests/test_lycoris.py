"""LoHa and LoKr (`lora.type`): peft's adapters, written in the LyCORIS layout ComfyUI and A1111 / Forge load,
and read back by an independent reader: the lycoris-lora package applies our file to diffusers' own U-Net
(and FluxTransformer2DModel), and its output must be the one our peft-injected model gives. Our merge and
our import into fresh peft layers must give it too; kohya's fused Flux names merge as ComfyUI applies them."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_training_world, randomize_, rel_err, unet_call_inputs
from safetensors.torch import load_file

from adapters.lora import LoraSettings, add_lora, load_lora_file, lora_state_dict, merge_lora, set_lora_state_dict
from adapters.lora_state import OUR_KEY
from adapters.lycoris import (
    LYCORIS_FILE,
    lycoris_delta,
    lycoris_settings,
    merge_lycoris,
    peft_state,
    read_lycoris,
    save_lycoris,
)
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


@pytest.mark.parametrize("preset,algo", [("tiny", "loha"), ("tiny-flux", "lokr")])
def test_a_lycoris_adapter_trains_and_exports_through_the_entry_point(tmp_path, preset, algo):
    world = build_training_world(tmp_path / "world", preset=preset)
    cmd = [sys.executable, "-m", "trainers", str(ROOT / "configs" / "tiny" / "lora.yaml"),
           f"model.path={world / 'model'}", f"data.path={world / 'data'}", f"data.cache.dir={tmp_path / 'cache'}",
           "train.max_steps=2", f"lora.type={algo}", "lora.rank=4", "lora.alpha=4"]
    proc = subprocess.run([*cmd, f"output_dir={tmp_path / 'out'}"], cwd=str(ROOT), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / LYCORIS_FILE).is_file() and not (out / "pytorch_lora_weights.safetensors").exists()
    trained = load_file(out / "checkpoints" / "step_00000002" / "trained.safetensors")
    assert any(f".{'hada_w1_a' if algo == 'loha' else 'lokr_w1'}" in k for k in trained)
    lyco = read_lycoris(out / LYCORIS_FILE)
    assert lyco.algo == algo and lyco.family == ("flux" if preset == "tiny-flux" else "sd")
    if algo == "loha":
        assert lyco.ranks == {4}
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


# -- Flux: LyCORIS's own names (diffusers' with underscores), which ComfyUI and Forge map onto BFL's fused weights


def flux_model():
    from test_lora_flux import fresh

    return fresh()


def flux_velocity(model) -> torch.Tensor:
    from test_lora_flux import inputs

    from ldmcore.flux import image_ids, pack_latents, unpack_latents

    x, sigma, ctx, pooled, _ = inputs()
    guidance = torch.tensor([3.5, 1.0]) if model.config.guidance_embeds else None
    import diffusers

    with torch.no_grad():
        if isinstance(model, diffusers.FluxTransformer2DModel):  # diffusers' class: packed tokens
            packed = model(hidden_states=pack_latents(x), encoder_hidden_states=ctx, pooled_projections=pooled,
                           timestep=sigma, img_ids=image_ids(8, 8), txt_ids=torch.zeros(ctx.shape[1], 3),
                           guidance=guidance, return_dict=False)[0]
            return unpack_latents(packed, 8, 8)
        return model(x, sigma, ctx, pooled, guidance)


@pytest.mark.parametrize("case", ["loha", "lokr-full", "lokr-factored"])
def test_lycoris_reads_our_flux_file_as_our_transformer_computes_it(tmp_path, case):
    settings = dataclasses.replace(CASES[case], targets="all")  # every Linear, the final modulation included
    ours = flux_model()
    add_lora(ours.denoiser, settings)
    randomize_adapter_(ours.denoiser, seed=3)
    expected = flux_velocity(ours.denoiser)
    assert rel_err(expected, flux_velocity(flux_model().denoiser)) > 1e-3
    path = save_lycoris(tmp_path / LYCORIS_FILE, lora_state_dict(ours.denoiser), None, settings,
                        denoiser_config=ours.denoiser.config)
    keys = load_file(path)
    modules = {k.split(".")[0] for k in keys}
    assert all(m.startswith("lycoris_") for m in modules) and "lycoris_transformer_blocks_0_attn_to_q" in modules

    import diffusers
    import lycoris
    from lycoris.wrapper import LycorisNetwork

    flux_model().save_pretrained(tmp_path / "model")
    transformer = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "model" / "transformer").eval()
    LycorisNetwork.LORA_PREFIX = "lycoris"
    network, _ = lycoris.create_lycoris_from_weights(1.0, None, transformer, weights_sd=load_file(path))
    network.apply_to()
    assert len(network.loras) == len(modules)  # every module of the file found its layer
    assert rel_err(flux_velocity(transformer), expected) < 1e-5, case

    merged = flux_model()
    merge_lora(merged, path)
    assert rel_err(flux_velocity(merged.denoiser), expected) < 1e-5
    with pytest.raises(CheckpointError, match="Flux"):  # and not into another family's model
        merge_lora(load_components(_sd_base(tmp_path)), path)


def _sd_base(tmp_path) -> Path:
    folder = tmp_path / "sd"
    if not folder.exists():
        Components.from_preset("tiny", build_word_tokenizer(WORDS), seed=0).save_pretrained(folder)
    return folder


def test_kohya_fused_flux_names_merge_as_comfyui_applies_them(tmp_path):
    """kohya's LyCORIS Flux files name BFL's modules: a LoHa on a double block's fused q/k/v, a LoKr on a single
    block's linear1 (q, k, v and the MLP input), the final modulation (halves swapped). ComfyUI adds each change
    to the BFL weight; our merge shares its rows out to our separate layers. Both must be one model."""
    from safetensors.torch import save_file

    from ldmcore.single_file_flux import diffusers_to_original, original_to_diffusers

    parts = flux_model()
    config = parts.denoiser.config
    bfl = diffusers_to_original(parts.denoiser.state_dict(), config)
    g = torch.Generator().manual_seed(5)

    def loha(rows, cols, r=2):
        return {"hada_w1_a": torch.randn(rows, r, generator=g), "hada_w1_b": torch.randn(r, cols, generator=g),
                "hada_w2_a": torch.randn(rows, r, generator=g), "hada_w2_b": torch.randn(r, cols, generator=g),
                "alpha": torch.tensor(1.0)}

    def lokr(rows, cols):  # a full first half, a factored second: scale alpha / 2
        return {"lokr_w1": torch.randn(2, 2, generator=g) * 0.3, "lokr_w2_a": torch.randn(rows // 2, 2, generator=g),
                "lokr_w2_b": torch.randn(2, cols // 2, generator=g), "alpha": torch.tensor(1.5)}

    modules = {
        "double_blocks.0.img_attn.qkv": loha,
        "single_blocks.0.linear1": lokr,
        "final_layer.adaLN_modulation.1": loha,
        "double_blocks.0.txt_mlp.0": lokr,  # not fused: read as its one diffusers layer
    }
    tensors, changed = {}, dict(bfl)
    for name, make in modules.items():
        weight = bfl[f"{name}.weight"]
        params = make(*weight.shape)
        params = {k: v * 0.2 if k.endswith(("_a", "w1")) else v for k, v in params.items()}
        tensors.update({f"lora_unet_{name.replace('.', '_')}.{k}": v for k, v in params.items()})
        changed[f"{name}.weight"] = weight + lycoris_delta(params, weight.shape)  # what ComfyUI adds
    save_file(tensors, tmp_path / "kohya_flux.safetensors")

    reference = flux_model()
    reference.denoiser.load_state_dict(original_to_diffusers(changed, config))
    merged = flux_model()
    done = merge_lycoris(merged, tmp_path / "kohya_flux.safetensors")
    assert rel_err(flux_velocity(reference.denoiser), flux_velocity(parts.denoiser)) > 1e-3
    assert rel_err(flux_velocity(merged.denoiser), flux_velocity(reference.denoiser)) < 1e-5
    lyco = read_lycoris(tmp_path / "kohya_flux.safetensors")
    assert lyco.family == "flux" and set(lyco.fused) == set(list(modules)[:3])
    assert set(lyco.modules["denoiser"]) == {"transformer_blocks.0.ff_context.net.0.proj"}
    assert {"denoiser.double_blocks.0.img_attn.qkv", "denoiser.single_blocks.0.linear1"} <= set(done)
    with pytest.raises(CheckpointError, match="fused.*merge"):  # peft cannot hold a change over fused layers
        peft_state(lyco, LoraSettings(type="loha", rank=2))


# -- import: a file's weights back into peft's layers


@pytest.mark.parametrize("family", ["sd", "flux"])
@pytest.mark.parametrize("case", ["loha", "lokr-full", "lokr-factored"])
@pytest.mark.parametrize("ours", [True, False], ids=["our-file", "foreign-file"])
def test_a_lycoris_file_imports_into_fresh_peft_layers_as_the_same_model(base, tmp_path, family, case, ours):
    """Our file (its settings stored) and the same weights without our metadata (as another tool's file: the
    settings inferred from the shapes) load into fresh peft layers that compute what the trained ones did,
    CLIP's text encoder included."""
    settings = dataclasses.replace(CASES[case], text_encoder=True)
    make = flux_model if family == "flux" else (lambda: load_components(base))
    trained = make()
    add_lora(trained.denoiser, settings)
    add_lora(trained.text_encoder, settings, text_encoder=True)
    randomize_adapter_(trained.denoiser, seed=3)
    randomize_adapter_(trained.text_encoder, seed=4)
    path = save_lycoris(tmp_path / LYCORIS_FILE, lora_state_dict(trained.denoiser),
                        lora_state_dict(trained.text_encoder), settings, denoiser_config=trained.denoiser.config)
    if not ours:
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(path), framework="pt") as f:
            meta = {k: v for k, v in f.metadata().items() if k != OUR_KEY}
        save_file(load_file(path), path, meta)

    lyco = read_lycoris(path, denoiser_config=trained.denoiser.config)
    imported = lycoris_settings(lyco)
    assert imported.type == settings.type and imported.text_encoder
    if ours:
        assert imported == settings
    fresh = make()
    add_lora(fresh.denoiser, imported)
    add_lora(fresh.text_encoder, imported, text_encoder=True)
    state = peft_state(lyco, imported)
    set_lora_state_dict(fresh.denoiser, state["denoiser"])
    set_lora_state_dict(fresh.text_encoder, state["text_encoder"])
    ids = torch.randint(0, len(build_word_tokenizer(WORDS)), (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(fresh.text_encoder(ids)[0], trained.text_encoder(ids)[0]) < 1e-5
    if family == "flux":
        assert rel_err(flux_velocity(fresh.denoiser), flux_velocity(trained.denoiser)) < 1e-5
    else:
        x, t, ctx, _ = unet_call_inputs(trained.denoiser.config, seed=0)
        with torch.no_grad():
            assert rel_err(fresh.denoiser(x, t, encoder_hidden_states=ctx),
                           trained.denoiser(x, t, encoder_hidden_states=ctx)) < 1e-5


def test_export_rewrites_another_tools_flux_lokr_in_our_names(tmp_path):
    """OneTrainer spells Flux modules `lora_transformer_...`; `python -m adapters export` imports such a file
    and writes ours (`lycoris_...`), which merges to the same model; inspect names the family."""
    from safetensors.torch import save_file

    settings = LoraSettings(type="lokr", rank=2, alpha=1.0, targets="attention")
    trained = flux_model()
    add_lora(trained.denoiser, settings)
    randomize_adapter_(trained.denoiser, seed=6)
    ours = save_lycoris(tmp_path / "ours.safetensors", lora_state_dict(trained.denoiser), None, settings,
                        denoiser_config=trained.denoiser.config)
    theirs = {k.replace("lycoris_", "lora_transformer_", 1): v for k, v in load_file(ours).items()}
    save_file(theirs, tmp_path / "onetrainer.safetensors", {"ss_output_name": "kept"})
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "adapters", "export", str(tmp_path / "onetrainer.safetensors"),
                           "--out", str(out)], cwd=str(ROOT), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = load_file(out / LYCORIS_FILE)
    assert {k.split(".")[0] for k in exported} == {k.split(".")[0] for k in load_file(ours)}
    lyco = read_lycoris(out / LYCORIS_FILE)
    assert lyco.metadata["ss_output_name"] == "kept" and lyco.metadata["ss_base_model_version"] == "flux1"
    merged = flux_model()
    merge_lora(merged, out / LYCORIS_FILE)
    assert rel_err(flux_velocity(merged.denoiser), flux_velocity(trained.denoiser)) < 1e-5
    proc = subprocess.run([sys.executable, "-m", "adapters", "inspect", str(out / LYCORIS_FILE)], cwd=str(ROOT),
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "flux" in proc.stdout and "LoKr" in proc.stdout, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "adapters", "export", str(out), "--out", str(tmp_path / "again")],
                          cwd=str(ROOT), capture_output=True, text=True)  # a run's folder names its LoKr file
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_file(tmp_path / "again" / LYCORIS_FILE).keys() == exported.keys()
