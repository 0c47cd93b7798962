"""SDXL LoRA files, both layouts: two text encoders, the kohya file in the original (sgm) U-Net names,
checked against diffusers' StableDiffusionXLPipeline loading the same files into the same weights.

The models are an SDXL-shaped tiny U-Net (three levels, none at level 0 with attention, a deeper
transformer at the last level, `text_time` added conditioning) and tiny CLIP-L / CLIP-bigG stand-ins
(CLIPTextModel, CLIPTextModelWithProjection). Every LoRA has random lora_B weights and alpha != rank."""
import types

import pytest
import torch
from conftest import randomize_, randomize_lora_, rel_err
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapters.__main__ import main as adapters_main
from adapters.lora import (
    DIFFUSERS_FILE,
    KOHYA_FILE,
    LoraSettings,
    add_lora,
    describe,
    load_lora_file,
    lora_state_dict,
    merge_lora,
    save_diffusers,
    save_kohya,
    set_lora_state_dict,
)
from adapters.lora_kohya import KohyaNames
from ldmcore.presets import TINY
from ldmcore.single_file import unet_module_names
from ldmcore.text import build_word_tokenizer
from ldmcore.weights import CheckpointError

WORDS = "a red circle on white background".split()
RANK, ALPHA = 4, 2.0  # scale 0.5
SDXL_UNET = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 4, 4],
    "use_linear_projection": True,
    "cross_attention_dim": 64,  # CLIP-L 32 + bigG 32
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,  # pooled 32 + 6 time ids x 8
    "norm_num_groups": 8,
    "sample_size": 8,
}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
        "max_position_embeddings": 77, "projection_dim": 32}


def tokenizer():
    return build_word_tokenizer(WORDS)


def fresh() -> types.SimpleNamespace:
    """The same randomised SDXL-shaped models every call (LoRA injection changes models in place)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = tokenizer()
    text = CLIPTextConfig(**TEXT, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    parts = types.SimpleNamespace(
        denoiser=diffusers.UNet2DConditionModel(**SDXL_UNET).eval(),
        text_encoder=CLIPTextModel(text).eval(),
        text_encoder_2=CLIPTextModelWithProjection(text).eval(),
    )
    for seed, model in enumerate((parts.denoiser, parts.text_encoder, parts.text_encoder_2)):
        randomize_(model, seed=seed + 1, std=0.05)
    return parts


def with_lora(settings: LoraSettings) -> types.SimpleNamespace:
    parts = fresh()
    add_lora(parts.denoiser, settings)
    add_lora(parts.text_encoder, settings, text_encoder=True)
    add_lora(parts.text_encoder_2, settings, text_encoder=True)
    # the U-Net's attention path is small next to its residuals: larger LoRA weights make it show
    for seed, (model, std) in enumerate(((parts.denoiser, 1.0), (parts.text_encoder, 0.3), (parts.text_encoder_2, 0.3))):
        randomize_lora_(model, 10 + seed, std)
    return parts


def save_both(parts, settings: LoraSettings, folder, metadata=None):
    sds = lora_state_dict(parts.denoiser), lora_state_dict(parts.text_encoder), lora_state_dict(parts.text_encoder_2)
    sdxl = {"text_2_sd": sds[2], "denoiser_config": parts.denoiser.config}
    save_diffusers(folder / DIFFUSERS_FILE, sds[0], sds[1], metadata, settings=settings, **sdxl)
    save_kohya(folder / KOHYA_FILE, sds[0], sds[1], settings, metadata, **sdxl)
    return folder / DIFFUSERS_FILE, folder / KOHYA_FILE


def inputs(seed=0, context_width=64, pooled_width=32):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 900])
    ctx, pooled = torch.randn(2, 77, context_width, generator=g), torch.randn(2, pooled_width, generator=g)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [48, 80, 8, 0, 64, 64]])
    ids = torch.randint(0, len(tokenizer()), (2, 77), generator=g)
    return x, t, ctx, {"text_embeds": pooled, "time_ids": time_ids}, ids


@torch.no_grad()
def unet_output(unet, **widths):
    x, t, ctx, added, _ = inputs(**widths)
    out = unet(x, t, ctx, added_cond_kwargs=added)
    return getattr(out, "sample", out)


@torch.no_grad()
def outputs(parts, **widths):
    """U-Net prediction, CLIP-L's last hidden state, bigG's last hidden state and projected pooling."""
    ids = inputs()[-1]
    second = parts.text_encoder_2(ids)
    return unet_output(parts.denoiser, **widths), parts.text_encoder(ids)[0], second.last_hidden_state, second.text_embeds


def diffusers_pipe(lora_file):
    import diffusers

    base = fresh()
    vae = diffusers.AutoencoderKL(block_out_channels=[8], norm_num_groups=8, latent_channels=4)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2, tokenizer=tokenizer(),
        tokenizer_2=tokenizer(), unet=base.denoiser, scheduler=diffusers.EulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_file))
    return pipe


def assert_same_outputs(got, expected, label):
    names = ("U-Net", "CLIP-L hidden", "bigG hidden", "bigG pooled")
    for name, a, b in zip(names, got, expected):
        assert rel_err(a, b) < 1e-5, f"{label}: {name} differs by {rel_err(a, b):.2e}"


# -- 1. diffusers reads what we write ----------------------------------------------------------------


@pytest.mark.parametrize("targets", ["attention", "all"])
def test_diffusers_sdxl_pipeline_matches_our_lora_models(targets, tmp_path):
    # "attention" puts LoRA on every attention block: diffusers maps kohya's sgm block numbers by the
    # keys it sees (FORMATS.md, reader quirks)
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets=targets, text_encoder=True)
    parts = with_lora(settings)
    ours, plain = outputs(parts), outputs(fresh())
    for name, a, b in zip(("U-Net", "CLIP-L", "bigG", "bigG pooled"), ours, plain):
        assert rel_err(a, b) > 1e-2, f"the LoRA does not change the {name} output"
    for lora_file in save_both(parts, settings, tmp_path):
        pipe = diffusers_pipe(lora_file)
        theirs = outputs(types.SimpleNamespace(denoiser=pipe.unet, text_encoder=pipe.text_encoder,
                                               text_encoder_2=pipe.text_encoder_2))
        assert_same_outputs(theirs, ours, lora_file.name)


def test_diffusers_reads_a_kohya_file_with_a_few_modules(tmp_path):
    """FORMATS.md warns that diffusers' reader maps sgm blocks by the keys present; a file written here
    with LoRA on a few scattered modules (an attention block, a resnet, a downsampler) still loads in
    diffusers 0.42.1 onto the right modules."""
    targets = (r"up_blocks\.1\.attentions\.2\..*to_out\.0", "down_blocks.1.resnets.0.conv1",
               "down_blocks.1.downsamplers.0.conv")
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets=targets)
    parts = fresh()
    add_lora(parts.denoiser, settings)
    randomize_lora_(parts.denoiser, 0, std=1.0)
    ours = unet_output(parts.denoiser)
    assert rel_err(ours, unet_output(fresh().denoiser)) > 1e-3
    save_kohya(tmp_path / KOHYA_FILE, lora_state_dict(parts.denoiser), None, settings, denoiser_config=parts.denoiser.config)
    assert len(load_file(tmp_path / KOHYA_FILE)) == 3 * 4
    assert rel_err(unet_output(diffusers_pipe(tmp_path / KOHYA_FILE).unet), ours) < 1e-5


def test_our_unet_runs_the_same_lora(tmp_path):
    """ldmcore's U-Net with diffusers' weights and the same peft LoRA gives diffusers' prediction."""
    from ldmcore.unet import UNet

    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets="all")
    parts = with_lora(settings)
    expected = unet_output(parts.denoiser)
    ours = UNet.from_config(dict(SDXL_UNET)).eval()
    ours.load_state_dict(fresh().denoiser.state_dict())
    add_lora(ours, settings)
    set_lora_state_dict(ours, lora_state_dict(parts.denoiser))
    assert rel_err(unet_output(ours), expected) < 1e-5
    # and a kohya file written from our U-Net's config reads back into it
    save_kohya(tmp_path / KOHYA_FILE, lora_state_dict(ours), None, settings, denoiser_config=ours.config)
    assert load_lora_file(tmp_path / KOHYA_FILE, denoiser_config=ours.config).denoiser.keys() == lora_state_dict(ours).keys()


# -- 2. the kohya file's names ------------------------------------------------------------------------


def test_kohya_sdxl_keys_use_the_original_names(tmp_path):
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets="all", text_encoder=True)
    _, kohya = save_both(with_lora(settings), settings, tmp_path)
    keys = list(load_file(kohya))
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_"))
               for k in keys), [k for k in keys if "blocks" not in k and "lora_te" not in k]
    assert not any(k.startswith(("unet.", "lora_unet_down_blocks", "lora_unet_mid_block", "lora_unet_up_blocks",
                                 "lora_te_")) for k in keys)
    assert {m.split("_")[1] for m in modules} == {"unet", "te1", "te2"}
    assert sum(m.startswith("lora_te2_") for m in modules) == 4 * TEXT["num_hidden_layers"]
    for m in modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= set(keys)
    with safe_open(str(kohya), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sdxl_base_v1-0", "False")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")


def test_kohya_names_invert_for_every_module():
    from torch import nn

    parts = fresh()
    names = KohyaNames.of(parts.denoiser.config)
    assert names.family == "sdxl"
    for component in ("denoiser", "text_encoder", "text_encoder_2"):
        model = getattr(parts, component)
        modules = [n for n, m in model.named_modules()
                   if isinstance(m, (nn.Linear, nn.Conv2d)) and n != "text_projection"]  # bigG's head: never a target
        assert modules
        for n in modules:
            ours = n if component == "denoiser" else n.removeprefix("text_model.")
            assert names.module(names.name(component, n), "test") == (component, ours), n
    assert names.name("denoiser", "conv_in") == "lora_unet_input_blocks_0_0"
    assert names.name("denoiser", "time_embedding.linear_1") == "lora_unet_time_embed_0"
    assert names.name("denoiser", "add_embedding.linear_2") == "lora_unet_label_emb_0_2"
    assert names.name("denoiser", "conv_out") == "lora_unet_out_2"
    assert names.name("text_encoder", "encoder.layers.2.mlp.fc1") == "lora_te1_text_model_encoder_layers_2_mlp_fc1"
    with pytest.raises(CheckpointError, match="lora_te_ names a text encoder of SD 1.x/2.x, not of SDXL"):
        names.module("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "f.safetensors")


def test_conv_lora_maps_to_resnet_and_resampler_names(tmp_path):
    """The table in FORMATS.md, written out for this layout (3 levels, 2 resnets each)."""
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets="all")
    parts = with_lora(settings)
    save_kohya(tmp_path / KOHYA_FILE, lora_state_dict(parts.denoiser), None, settings, denoiser_config=parts.denoiser.config)
    state = load_file(tmp_path / KOHYA_FILE)
    expected = {
        "down_blocks.0.resnets.0.conv1": "input_blocks_1_0_in_layers_2",
        "down_blocks.0.resnets.1.time_emb_proj": "input_blocks_2_0_emb_layers_1",
        "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks_4_0_skip_connection",  # 32 -> 64 channels
        "down_blocks.1.resnets.0.conv2": "input_blocks_4_0_out_layers_3",
        "down_blocks.1.attentions.0.proj_in": "input_blocks_4_1_proj_in",
        "down_blocks.1.downsamplers.0.conv": "input_blocks_6_0_op",
        "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k":
            "input_blocks_8_1_transformer_blocks_1_attn2_to_k",
        "mid_block.resnets.0.conv1": "middle_block_0_in_layers_2",
        "mid_block.attentions.0.transformer_blocks.1.ff.net.2": "middle_block_1_transformer_blocks_1_ff_net_2",
        "mid_block.resnets.1.time_emb_proj": "middle_block_2_emb_layers_1",
        "up_blocks.0.resnets.2.conv_shortcut": "output_blocks_2_0_skip_connection",
        "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0":
            "output_blocks_2_1_transformer_blocks_0_attn1_to_out_0",
        "up_blocks.0.upsamplers.0.conv": "output_blocks_2_2_conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks_5_2_conv",
        "up_blocks.2.resnets.2.conv2": "output_blocks_8_0_out_layers_3",
    }
    sd = lora_state_dict(parts.denoiser)
    for module, sgm in expected.items():
        assert torch.equal(state[f"lora_unet_{sgm}.lora_down.weight"], sd[f"{module}.lora_A.weight"]), module
    assert state["lora_unet_input_blocks_3_0_op.lora_down.weight"].shape == (RANK, 32, 3, 3)
    assert len([k for k in state if k.endswith(".alpha")]) == len(sd) // 2
    # an upsampler on a level without attention sits at index 1: SD 1.x's layout, level 0
    names = KohyaNames("sdxl", unet_module_names(TINY.denoiser))
    assert names.name("denoiser", "up_blocks.0.upsamplers.0.conv") == "lora_unet_output_blocks_1_1_conv"
    assert names.module("lora_unet_output_blocks_1_1_conv", "test") == ("denoiser", "up_blocks.0.upsamplers.0.conv")


# -- 3. round trips ----------------------------------------------------------------------------------


def test_round_trips_are_exact(tmp_path):
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets="all", text_encoder=True)
    parts = with_lora(settings)
    sds = {c: lora_state_dict(getattr(parts, c)) for c in ("denoiser", "text_encoder", "text_encoder_2")}
    user = {"run": "tiny-xl", "steps": 2}
    for path in save_both(parts, settings, tmp_path, user):
        for config in (parts.denoiser.config, None):  # without a config, the layout the file remembers
            lora = load_lora_file(path, denoiser_config=config)
            assert lora.family == "sdxl" and lora.alpha == ALPHA and lora.user == user, path.name
            assert LoraSettings.from_dict(lora.settings) == settings
            for component, sd in sds.items():
                got = getattr(lora, component)
                # transformers 5 nests bigG (not CLIP-L) under text_model.; our layout drops it
                want = {k.removeprefix("text_model."): v for k, v in sd.items()}
                assert got.keys() == want.keys(), (path.name, component)
                assert all(torch.equal(got[k], v) for k, v in want.items()), (path.name, component)
    again = fresh()  # the file's tensors load into a fresh LoRA model
    lora = load_lora_file(tmp_path / KOHYA_FILE, denoiser_config=again.denoiser.config)
    for component, sd in lora.state_dicts().items():
        add_lora(getattr(again, component), settings, text_encoder=component != "denoiser")
        set_lora_state_dict(getattr(again, component), sd)
    assert_same_outputs(outputs(again), outputs(parts), "reloaded")


def test_other_sdxl_spellings_read_the_same(tmp_path):
    """kohya names with diffusers' U-Net path (`lora_unet_down_blocks_...`) and a file from another tool
    without any metadata: read as SDXL (from lora_te2_), sgm names with SDXL base's layout."""
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets="attention", text_encoder=True)
    parts = with_lora(settings)
    _, kohya = save_both(parts, settings, tmp_path)
    names = KohyaNames("sdxl", unet_module_names(SDXL_UNET))
    state = load_file(kohya)
    diffusers_named = {}
    for key, v in state.items():
        name, _, part = key.partition(".")
        component, module = names.module(name, "test")
        spelled = "lora_unet_" + module.replace(".", "_") if component == "denoiser" else name
        diffusers_named[f"{spelled}.{part}"] = v
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0") for k in diffusers_named)
    save_file(diffusers_named, tmp_path / "diffusers_names.safetensors")
    expected = load_lora_file(kohya)
    lora = load_lora_file(tmp_path / "diffusers_names.safetensors")
    assert lora.family == "sdxl" and lora.alpha == ALPHA
    for component in ("denoiser", "text_encoder", "text_encoder_2"):
        assert all(torch.equal(getattr(lora, component)[k], v) for k, v in getattr(expected, component).items())
    # sgm names, no metadata at all, no config: the file's lora_te2_ keys say SDXL, SDXL base's layout maps it
    # (this tiny layout has the same block structure)
    save_file(state, tmp_path / "bare.safetensors")
    bare = load_lora_file(tmp_path / "bare.safetensors")
    assert bare.family == "sdxl" and bare.denoiser.keys() == expected.denoiser.keys()


def test_command_line_exports_and_inspects_sdxl(tmp_path, capsys):
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets="all", text_encoder=True)
    parts = with_lora(settings)
    diffusers_file, _ = save_both(parts, settings, tmp_path / "run", {"run": "xl"})
    assert adapters_main(["export", str(diffusers_file), "--out", str(tmp_path / "export")]) == 0
    for name in (DIFFUSERS_FILE, KOHYA_FILE):
        ours, exported = load_file(tmp_path / "run" / name), load_file(tmp_path / "export" / name)
        assert ours.keys() == exported.keys() and all(torch.equal(ours[k], exported[k]) for k in ours), name
    capsys.readouterr()
    assert adapters_main(["inspect", str(tmp_path / "export" / KOHYA_FILE)]) == 0
    out = capsys.readouterr().out
    assert "family:        SDXL" in out and "format:        kohya" in out
    assert "text encoder:  yes, 12 modules" in out and "text encoder 2: yes, 12 modules" in out
    d = describe(tmp_path / "export" / KOHYA_FILE)
    assert d["family"] == "SDXL" and d["denoiser_blocks"].keys() == {"down_blocks.0", "down_blocks.1", "down_blocks.2",
                                                                   "mid_block", "up_blocks.0", "up_blocks.1",
                                                                   "up_blocks.2"}


# -- 4. families do not mix --------------------------------------------------------------------------


def sd_lora_files(tmp_path, text_encoder=True):
    """An SD 1.x-layout LoRA (the tiny preset), both files."""
    from ldmcore.checkpoints import Components

    sd = Components.from_preset("tiny", tokenizer(), seed=0)
    settings = LoraSettings(rank=RANK, alpha=ALPHA, text_encoder=text_encoder)
    add_lora(sd.denoiser, settings)
    text = None
    if text_encoder:
        add_lora(sd.text_encoder, settings, text_encoder=True)
        text = lora_state_dict(sd.text_encoder)
    save_diffusers(tmp_path / DIFFUSERS_FILE, lora_state_dict(sd.denoiser), text, settings=settings)
    save_kohya(tmp_path / KOHYA_FILE, lora_state_dict(sd.denoiser), text, settings)
    return sd, (tmp_path / DIFFUSERS_FILE, tmp_path / KOHYA_FILE)


def test_family_mismatch_is_refused_naming_file_and_family(tmp_path):
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets="attention", text_encoder=True)
    sdxl_files = save_both(with_lora(settings), settings, tmp_path / "xl")
    sd_parts, sd_files = sd_lora_files(tmp_path / "sd")
    for path in sdxl_files:  # an SDXL file on an SD 1.x U-Net
        with pytest.raises(CheckpointError) as e:
            load_lora_file(path, denoiser_config=sd_parts.denoiser.config)
        message = str(e.value)
        assert str(path) in message and "a LoRA for SDXL" in message and "apply it to an SDXL base model" in message
        assert "SD 1.x/2.x" in message
        with pytest.raises(CheckpointError, match="a LoRA for SDXL"):
            merge_lora(sd_parts, path)
    for path in sd_files:  # and the reverse
        with pytest.raises(CheckpointError) as e:
            load_lora_file(path, denoiser_config=SDXL_UNET)
        message = str(e.value)
        assert str(path) in message and "a LoRA for SD 1.x/2.x" in message
        assert "apply it to an SD 1.x/2.x base model" in message and "SDXL" in message
        assert load_lora_file(path).family == "sd"

    # nothing but U-Net weights and no metadata: the modules' block layout still tells
    _, (diffusers_file, kohya_file) = sd_lora_files(tmp_path / "sd_unet", text_encoder=False)
    unet_only = tmp_path / "xl_unet.safetensors"
    save_file({k: v for k, v in load_file(sdxl_files[1]).items() if k.startswith("lora_unet_")}, unet_only)
    for path, config, theirs in ((diffusers_file, SDXL_UNET, "SD 1.x/2.x"), (kohya_file, SDXL_UNET, "SD 1.x/2.x"),
                                 (unet_only, sd_parts.denoiser.config, "SDXL")):
        save_file(load_file(path), path)  # drops the metadata
        with pytest.raises(CheckpointError, match=f"a LoRA for {theirs} .its U-Net modules fit {theirs}'s block") as e:
            load_lora_file(path, denoiser_config=config)
        assert str(path) in str(e.value) and f"apply it to an {theirs} base model" in str(e.value)
    # a layout that is neither: the modules it lacks are named
    odd = {**SDXL_UNET, "layers_per_block": 1}
    absent = "not in this SDXL U-Net's block layout: input_blocks.4.1.transformer"
    with pytest.raises(CheckpointError, match=absent) as e:
        load_lora_file(unet_only, denoiser_config=odd)
    assert str(unet_only) in str(e.value)


def test_saving_checks_the_family():
    settings = LoraSettings(rank=RANK, alpha=ALPHA, text_encoder=True)
    parts = with_lora(settings)
    unet, text, text_2 = (lora_state_dict(m) for m in (parts.denoiser, parts.text_encoder, parts.text_encoder_2))
    with pytest.raises(ValueError, match="denoiser_config"):  # sgm names need the layout
        save_kohya("never.safetensors", unet, text, settings, text_2_sd=text_2)
    with pytest.raises(ValueError, match="a LoRA for SDXL .*second text encoder.* the U-Net is SD 1.x/2.x's"):
        save_kohya("never.safetensors", unet, text, settings, text_2_sd=text_2, denoiser_config=TINY.denoiser)
    level_0_attention = {"down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(RANK, 32),
                         "down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, RANK)}
    with pytest.raises(ValueError, match="a LoRA for SD 1.x/2.x .its U-Net modules fit"):
        save_diffusers("never.safetensors", level_0_attention, denoiser_config=SDXL_UNET)


# -- 5. merging and bigG injection -------------------------------------------------------------------


def test_merge_folds_the_unet_and_both_text_encoders(tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets="all", text_encoder=True)
    parts = with_lora(settings)
    expected = outputs(parts)
    for path in save_both(parts, settings, tmp_path):
        merged = fresh()
        merge_lora(merged, path)
        models = (merged.denoiser, merged.text_encoder, merged.text_encoder_2)
        assert not any(isinstance(m, BaseTunerLayer) for model in models for m in model.modules())
        assert_same_outputs(outputs(merged), expected, f"merged {path.name}")
    no_second = fresh()
    no_second.text_encoder_2 = None  # e.g. a model loaded without it
    with pytest.raises(CheckpointError, match="second text encoder"):
        merge_lora(no_second, tmp_path / KOHYA_FILE)


def test_merge_into_our_sdxl_components(tmp_path):
    """The same through ldmcore's SDXL Components: our U-Net, CLIP-L and a wider bigG stand-in."""
    from ldmcore.checkpoints import Components

    def components():
        parts = Components.from_preset("tiny-sdxl", tokenizer(), seed=0)
        for seed, model in enumerate((parts.denoiser, parts.text_encoder, parts.text_encoder_2)):
            randomize_(model, seed=seed + 1, std=0.05)
        return parts

    widths = {"context_width": 80, "pooled_width": 48}  # the tiny-sdxl preset's
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets="all", text_encoder=True)
    parts = components()
    for seed, (name, std) in enumerate((("denoiser", 1.0), ("text_encoder", 0.3), ("text_encoder_2", 0.3))):
        add_lora(getattr(parts, name), settings, text_encoder=name != "denoiser")
        randomize_lora_(getattr(parts, name), seed, std)
    expected = outputs(parts, **widths)
    assert rel_err(expected[0], outputs(components(), **widths)[0]) > 1e-2
    for path in save_both(parts, settings, tmp_path):
        merged = components()
        merge_lora(merged, path)
        assert_same_outputs(outputs(merged, **widths), expected, f"merged {path.name}")


def test_add_lora_on_the_bigg_text_encoder():
    from peft.tuners.lora import LoraLayer

    parts = fresh()
    model = parts.text_encoder_2
    names = add_lora(model, LoraSettings(rank=RANK, alpha=ALPHA), text_encoder=True)
    assert len(names) == 4 * TEXT["num_hidden_layers"]
    assert {n.rsplit(".", 1)[1] for n in names} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert all(isinstance(model.get_submodule(n), LoraLayer) for n in names)
    assert not isinstance(model.text_projection, LoraLayer) and not model.text_projection.weight.requires_grad
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(names) and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    randomize_lora_(model, 0)
    model(inputs()[-1]).text_embeds.square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    # its keys, with transformers' text_model. level or without, are what the files hold
    sd = lora_state_dict(model)
    assert all(k.startswith("text_model.encoder.layers.") for k in sd)
    target = fresh().text_encoder_2
    add_lora(target, LoraSettings(rank=RANK, alpha=ALPHA), text_encoder=True)
    set_lora_state_dict(target, {k.removeprefix("text_model."): v for k, v in sd.items()})
    assert all(torch.equal(v, sd[k]) for k, v in lora_state_dict(target).items())

