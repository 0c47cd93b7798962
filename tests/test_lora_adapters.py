"""LoRA through peft, its two file layouts, merging and the command line, checked against diffusers
loading the same files into a pipeline built from the same weights.

Every LoRA here has random lora_B weights (peft's default zero init would make every comparison pass
trivially) and alpha != rank, so a scaling mistake shows."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_, randomize_lora_, rel_err
from safetensors.torch import load_file, save_file
from torch import nn

from adapters.lora import (
    DIFFUSERS_FILE,
    KOHYA_FILE,
    LoraSettings,
    add_lora,
    load_lora_file,
    lora_state_dict,
    merge_lora,
    save_diffusers,
    save_kohya,
    set_lora_state_dict,
)
from adapters.__main__ import main as adapters_main
from adapters.lora_kohya import kohya_name, module_from_kohya
from ldmcore.attention import Attention, FeedForward, Transformer2DModel
from ldmcore.checkpoints import Components, load_components
from ldmcore.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from ldmcore.text import build_word_tokenizer
from ldmcore.weights import CheckpointError

WORDS = "a red circle on white background".split()
RANK, ALPHA = 4, 2.0  # scale 0.5
ROOT = Path(__file__).resolve().parents[1]


def fresh() -> Components:
    """The same randomised tiny model every call (LoRA injection changes models in place)."""
    parts = Components.from_preset("tiny", build_word_tokenizer(WORDS), seed=0)
    randomize_(parts.denoiser, seed=1, std=0.05)
    randomize_(parts.text_encoder, seed=2, std=0.05)
    return parts


def with_lora(settings: LoraSettings, seed: int = 3) -> Components:
    parts = fresh()
    add_lora(parts.denoiser, settings)
    randomize_lora_(parts.denoiser, seed)
    if settings.text_encoder:
        add_lora(parts.text_encoder, settings, text_encoder=True)
        randomize_lora_(parts.text_encoder, seed + 1)
    return parts


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 900]), torch.randn(2, 77, 32, generator=g)
    ids = torch.randint(0, len(build_word_tokenizer(WORDS)), (2, 77), generator=g)
    return x, t, ctx, ids


@torch.no_grad()
def outputs(unet, text_encoder):
    x, t, ctx, ids = inputs()
    out = unet(x, t, ctx)
    return getattr(out, "sample", out), text_encoder(ids)[0]


def save_both(parts: Components, settings: LoraSettings, folder: Path, metadata=None) -> tuple[Path, Path]:
    text = lora_state_dict(parts.text_encoder) if settings.text_encoder else None
    save_diffusers(folder / DIFFUSERS_FILE, lora_state_dict(parts.denoiser), text, metadata, settings=settings)
    save_kohya(folder / KOHYA_FILE, lora_state_dict(parts.denoiser), text, settings, metadata)
    return folder / DIFFUSERS_FILE, folder / KOHYA_FILE


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora") / "model"
    fresh().save_pretrained(folder)
    return folder


def diffusers_pipe(folder, lora_file):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_file))
    return pipe


# -- 1. injection ------------------------------------------------------------------------------------


def expected_count(unet: nn.Module, targets: str) -> int:
    """From the module types, independently of the name matching in adapters.lora."""
    count = lambda cls: sum(isinstance(m, cls) for m in unet.modules())  # noqa: E731
    n = 4 * count(Attention)
    if targets in ("attention+ff", "all"):
        n += 2 * count(FeedForward) + 2 * count(Transformer2DModel)
    if targets == "all":
        resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
        n += 3 * len(resnets) + sum(r.conv_shortcut is not None for r in resnets)
        n += count(Downsample2D) + count(Upsample2D)
    return n


@pytest.mark.parametrize("targets", ["attention", "attention+ff", "all"])
def test_add_lora_targets_and_freezing(targets):
    from peft.tuners.lora import LoraLayer

    parts = fresh()
    expected = expected_count(parts.denoiser, targets)
    names = add_lora(parts.denoiser, LoraSettings(rank=RANK, alpha=ALPHA, targets=targets))
    assert len(names) == len(set(names)) == expected
    assert all(isinstance(parts.denoiser.get_submodule(n), LoraLayer) for n in names)
    trainable = [n for n, p in parts.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * expected

    text_names = add_lora(parts.text_encoder, LoraSettings(rank=RANK), text_encoder=True)
    assert len(text_names) == 4 * parts.text_encoder.config.num_hidden_layers
    assert all(n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "out_proj") for n in text_names)

    randomize_lora_(parts.denoiser, 0)
    x, t, ctx, _ = inputs()
    parts.denoiser(x, t, ctx).square().mean().backward()
    grads = {n: p.grad for n, p in parts.denoiser.named_parameters()}
    assert all(grads[n] is not None for n in trainable)
    assert all(g is None for n, g in grads.items() if n not in trainable)


def test_explicit_targets_and_bad_targets():
    parts = fresh()
    names = add_lora(parts.denoiser, LoraSettings(rank=2, targets=("attn2.to_k", r"down_blocks\.0\..*\.to_q")))
    cross_attentions = sum(isinstance(m, Attention) for m in parts.denoiser.modules()) // 2
    assert sum(n.endswith("attn2.to_k") for n in names) == cross_attentions
    assert sorted(n for n in names if n.endswith("to_q")) == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q",
    ]
    with pytest.raises(ValueError, match="to_out"):
        add_lora(fresh().denoiser, LoraSettings(targets=("to_q", "to_out")))  # to_out is a ModuleList: to_out.0
    with pytest.raises(ValueError, match="targets"):
        LoraSettings(targets="everything")
    with pytest.raises(ValueError, match="unknown keys"):
        LoraSettings.from_dict({"rank": 4, "ranks": 8})
    s = LoraSettings(rank=8, alpha=4, targets=("to_q",), init="gaussian")
    assert LoraSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s


# -- 2. diffusers reads what we write ----------------------------------------------------------------


@pytest.mark.parametrize("targets", ["attention", "all"])
def test_diffusers_matches_our_lora_model(targets, base_folder, tmp_path):
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets=targets, text_encoder=True)
    parts = with_lora(settings)
    ours_unet, ours_text = outputs(parts.denoiser, parts.text_encoder)
    plain_unet, plain_text = outputs(*(lambda p: (p.denoiser, p.text_encoder))(fresh()))
    assert rel_err(ours_unet, plain_unet) > 1e-2 and rel_err(ours_text, plain_text) > 1e-2  # the LoRA matters
    for lora_file in save_both(parts, settings, tmp_path):
        pipe = diffusers_pipe(base_folder, lora_file)
        theirs_unet, theirs_text = outputs(pipe.unet, pipe.text_encoder)
        assert rel_err(theirs_unet, ours_unet) < 1e-5, lora_file.name
        assert rel_err(theirs_text, ours_text) < 1e-5, lora_file.name


# -- 3. round trips ----------------------------------------------------------------------------------


def test_round_trips_are_exact(tmp_path):
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets="all", text_encoder=True)
    parts = with_lora(settings)
    unet_sd, text_sd = lora_state_dict(parts.denoiser), lora_state_dict(parts.text_encoder)
    user = {"run": "tiny", "steps": 2, "tags": ["a", "b"]}
    for path in save_both(parts, settings, tmp_path, user):
        lora = load_lora_file(path)
        unet2, text2 = lora.denoiser, lora.text_encoder
        assert unet2.keys() == unet_sd.keys() and text2.keys() == text_sd.keys() and lora.text_encoder_2 is None
        assert all(torch.equal(unet2[k], unet_sd[k]) for k in unet_sd)
        assert all(torch.equal(text2[k], text_sd[k]) for k in text_sd)
        assert lora.alpha == ALPHA and lora.user == user and lora.family == "sd"
        assert LoraSettings.from_dict(lora.settings) == settings
        # and back into a fresh LoRA model
        again = fresh()
        add_lora(again.denoiser, settings)
        set_lora_state_dict(again.denoiser, unet2)
        assert all(torch.equal(v, unet_sd[k]) for k, v in lora_state_dict(again.denoiser).items())

    kohya = load_file(tmp_path / KOHYA_FILE)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert torch.equal(kohya[f"{name}.lora_down.weight"], unet_sd[module_key(name, "A")])
    assert torch.equal(kohya[f"{name}.lora_up.weight"], unet_sd[module_key(name, "B")])
    assert kohya[f"{name}.alpha"].ndim == 0 and kohya[f"{name}.alpha"].item() == ALPHA
    assert kohya["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (RANK, 32, 3, 3)
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.lora_up.weight" in kohya
    diffusers_keys = load_file(tmp_path / DIFFUSERS_FILE)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in diffusers_keys
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in diffusers_keys
    from safetensors import safe_open

    with safe_open(str(tmp_path / KOHYA_FILE), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "2.0"}


def module_key(kohya: str, part: str) -> str:
    return f"{module_from_kohya(kohya, 'test')[0]}.lora_{part}.weight"


def test_kohya_names_invert_for_every_module():
    parts = fresh()
    for model, text in ((parts.denoiser, False), (parts.text_encoder, True)):
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        assert names
        for n in names:
            assert module_from_kohya(kohya_name(n, text), "test") == (n, text)
        # transformers 4.x nests the text layers under text_model.: the same kohya name
        if text:
            assert kohya_name("text_model." + names[0], True) == kohya_name(names[0], True)
    with pytest.raises(CheckpointError, match="SDXL"):
        module_from_kohya("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "f.safetensors")
    with pytest.raises(CheckpointError, match="input.blocks"):
        module_from_kohya("lora_unet_input_blocks_1_1_proj_in", "f.safetensors")


def test_foreign_kohya_alphas_keep_the_math(tmp_path):
    """Another tool's kohya file: one module with its own alpha, one with none (= its rank, as in
    sd-scripts). Reading folds alpha_m / alpha into lora_B; the merge must equal the peft model with
    those modules' scaling set to alpha_m / rank. diffusers 0.42 is no reference here: for SD 1.x
    kohya files it ignores per-module alphas (its alpha_pattern keeps unconverted key names) and
    gives modules without an alpha the common one instead of their rank."""
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets="attention")
    parts = with_lora(settings)
    save_kohya(tmp_path / "ours.safetensors", lora_state_dict(parts.denoiser), None, settings)
    state = load_file(tmp_path / "ours.safetensors")
    odd, bare = ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v",
                 "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_out_0")
    state[f"{odd}.alpha"] = torch.tensor(1.0)
    del state[f"{bare}.alpha"]
    save_file(state, tmp_path / "foreign.safetensors")  # no metadata at all, as some tools write

    lora = load_lora_file(tmp_path / "foreign.safetensors")
    unet_sd = lora.denoiser
    assert lora.format == "kohya" and lora.alpha == ALPHA and lora.text_encoder is None
    assert torch.equal(unet_sd[module_key(odd, "B")], state[f"{odd}.lora_up.weight"] * (1.0 / ALPHA))
    assert torch.equal(unet_sd[module_key(bare, "B")], state[f"{bare}.lora_up.weight"] * (RANK / ALPHA))
    assert torch.equal(unet_sd[module_key(odd, "A")], state[f"{odd}.lora_down.weight"])

    for name, alpha in ((odd, 1.0), (bare, float(RANK))):
        parts.denoiser.get_submodule(module_from_kohya(name, "test")[0]).scaling["default"] = alpha / RANK
    expected, _ = outputs(parts.denoiser, parts.text_encoder)
    merged = fresh()
    merge_lora(merged, tmp_path / "foreign.safetensors")
    assert rel_err(outputs(merged.denoiser, merged.text_encoder)[0], expected) < 1e-5
    again = fresh()  # and the folded tensors loaded into a one-alpha peft model
    add_lora(again.denoiser, LoraSettings.from_dict(lora.settings))
    set_lora_state_dict(again.denoiser, unet_sd)
    assert rel_err(outputs(again.denoiser, again.text_encoder)[0], expected) < 1e-5


def test_set_lora_state_dict_is_strict():
    settings = LoraSettings(rank=RANK, alpha=ALPHA)
    parts = with_lora(settings)
    sd = lora_state_dict(parts.denoiser)
    target = fresh()
    add_lora(target.denoiser, settings)
    missing = dict(sd)
    gone = sorted(missing)[0]
    del missing[gone]
    with pytest.raises(CheckpointError, match="missing 1 keys: " + gone.replace(".", r"\.")):
        set_lora_state_dict(target.denoiser, missing)
    with pytest.raises(CheckpointError, match=r"unexpected 1 keys: conv_in\.lora_A\.weight"):
        set_lora_state_dict(target.denoiser, {**sd, "conv_in.lora_A.weight": torch.zeros(RANK, 4, 3, 3)})
    other_rank = with_lora(LoraSettings(rank=2, alpha=ALPHA))
    with pytest.raises(CheckpointError, match="wrong shape"):
        set_lora_state_dict(target.denoiser, lora_state_dict(other_rank.denoiser))
    # the text encoder accepts keys with or without transformers 4's text_model. level
    add_lora(parts.text_encoder, settings, text_encoder=True)
    add_lora(target.text_encoder, settings, text_encoder=True)
    randomize_lora_(parts.text_encoder, 9)
    text = lora_state_dict(parts.text_encoder)
    set_lora_state_dict(target.text_encoder, {"text_model." + k: v for k, v in text.items()})
    assert all(torch.equal(v, text[k]) for k, v in lora_state_dict(target.text_encoder).items())


# -- 4. merging and the command line -----------------------------------------------------------------


def test_merge_matches_the_lora_model(tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets="all", text_encoder=True)
    parts = with_lora(settings)
    lora_unet, lora_text = outputs(parts.denoiser, parts.text_encoder)
    diffusers_file, kohya_file = save_both(parts, settings, tmp_path)
    for path in (diffusers_file, kohya_file):
        merged = fresh()
        merge_lora(merged, path)
        assert not any(isinstance(m, BaseTunerLayer) for m in [*merged.denoiser.modules(), *merged.text_encoder.modules()])
        assert merged.denoiser.state_dict().keys() == fresh().denoiser.state_dict().keys()
        unet_out, text_out = outputs(merged.denoiser, merged.text_encoder)
        assert rel_err(unet_out, lora_unet) < 1e-5 and rel_err(text_out, lora_text) < 1e-5

    # strength: weights are linear in the scale; 0 leaves the model as it was
    w = lambda p: p.denoiser.get_submodule("down_blocks.0.resnets.0.conv1").weight  # noqa: E731
    zero, half, one, base = fresh(), fresh(), fresh(), fresh()
    for c, s in ((zero, 0.0), (half, 0.5), (one, 1.0)):
        merge_lora(c, kohya_file, scale=s)
    assert torch.equal(w(zero), w(base))
    assert torch.allclose(w(half), (w(base) + w(one)) / 2, atol=1e-7)
    assert not torch.equal(w(one), w(base))

    wrong = Components.from_preset("tiny", build_word_tokenizer(WORDS))
    wrong.denoiser.down_blocks[0].attentions = None  # another architecture: modules the LoRA names are absent
    with pytest.raises(CheckpointError, match="not Linear / Conv2d layers of the U-Net"):
        merge_lora(wrong, kohya_file)


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "adapters", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=120)


def test_command_line(base_folder, tmp_path):
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets="all", text_encoder=True)
    parts = with_lora(settings)
    lora_unet, lora_text = outputs(parts.denoiser, parts.text_encoder)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    user = {"run": "tiny", "step": 2}
    save_diffusers(checkpoint / DIFFUSERS_FILE, lora_state_dict(parts.denoiser), lora_state_dict(parts.text_encoder), user,
                   settings=settings)

    r = cli("export", checkpoint, "--out", tmp_path / "export")
    assert r.returncode == 0, r.stderr
    for name in (DIFFUSERS_FILE, KOHYA_FILE):
        lora = load_lora_file(tmp_path / "export" / name)
        assert all(torch.equal(v, lora_state_dict(parts.denoiser)[k]) for k, v in lora.denoiser.items())
        assert lora.user == user and LoraSettings.from_dict(lora.settings) == settings

    r = cli("inspect", tmp_path / "export" / KOHYA_FILE)
    assert r.returncode == 0, r.stderr
    assert "format:        kohya" in r.stdout and "rank:          4" in r.stdout and "alpha:         2" in r.stdout
    assert "resnet 29" in r.stdout and "text encoder:  yes, 8 modules" in r.stdout and '"run": "tiny"' in r.stdout

    # merge: in a subprocess to a single file, in this process (the same main) to a folder
    single, folder = tmp_path / "merged.safetensors", tmp_path / "merged"
    r = cli("merge", base_folder, tmp_path / "export" / KOHYA_FILE, "--out", single,
            "--tokenizer", base_folder / "tokenizer")
    assert r.returncode == 0, r.stderr
    assert adapters_main(["merge", str(base_folder), str(tmp_path / "export"), "--out", str(folder)]) == 0
    for out in (single, folder):
        merged = load_components(out, tokenizer=base_folder / "tokenizer")
        unet_out, text_out = outputs(merged.denoiser, merged.text_encoder)
        assert rel_err(unet_out, lora_unet) < 1e-5 and rel_err(text_out, lora_text) < 1e-5

    bad = tmp_path / "not_a_lora.safetensors"
    save_file({"conv_in.weight": torch.zeros(1)}, bad)
    r = cli("inspect", bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {bad}: not a LoRA file")


def test_command_line_refuses_bad_input(base_folder, tmp_path, capsys):
    bad, missing = tmp_path / "not_a_lora.safetensors", tmp_path / "missing.safetensors"
    save_file({"conv_in.weight": torch.zeros(1)}, bad)
    (tmp_path / "empty_run").mkdir()
    good = tmp_path / DIFFUSERS_FILE
    save_diffusers(good, lora_state_dict(with_lora(LoraSettings(rank=2)).denoiser))
    cases = (
        (bad, ["export", bad, "--out", tmp_path / "x"]),
        (bad, ["merge", base_folder, bad, "--out", tmp_path / "y"]),
        (missing, ["inspect", missing]),
        (tmp_path / "empty_run", ["export", tmp_path / "empty_run", "--out", tmp_path / "z"]),
        (tmp_path / "nowhere", ["merge", tmp_path / "nowhere", good, "--out", tmp_path / "w"]),
    )
    for named, args in cases:
        assert adapters_main([str(a) for a in args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(named) in err, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# -- 5. DoRA -----------------------------------------------------------------------------------------


def test_dora_trains_exports_and_loads_in_diffusers(base_folder, tmp_path):
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets="all", use_dora=True)
    parts = with_lora(settings)
    trainable = [n for n, p in parts.denoiser.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in trainable)
    ours, _ = outputs(parts.denoiser, parts.text_encoder)
    plain, _ = outputs(fresh().denoiser, fresh().text_encoder)
    assert rel_err(ours, plain) > 1e-2
    sd = lora_state_dict(parts.denoiser)
    save_diffusers(tmp_path / DIFFUSERS_FILE, sd, settings=settings)
    with pytest.raises(CheckpointError, match="DoRA"):
        save_kohya(tmp_path / KOHYA_FILE, sd, None, settings)

    pipe = diffusers_pipe(base_folder, tmp_path / DIFFUSERS_FILE)
    theirs, _ = outputs(pipe.unet, pipe.text_encoder)
    assert rel_err(theirs, ours) < 1e-5
    merged = fresh()
    merge_lora(merged, tmp_path / DIFFUSERS_FILE)
    assert rel_err(outputs(merged.denoiser, merged.text_encoder)[0], ours) < 1e-5
    lora = load_lora_file(tmp_path / DIFFUSERS_FILE)
    assert all(torch.equal(lora.denoiser[k], v) for k, v in sd.items()) and lora.settings["use_dora"]


@pytest.mark.xfail(strict=True, reason=(
    "diffusers 0.42 + transformers 5: the text encoder's load_adapter renames peft's "
    "`<module>.lora_magnitude_vector` to `...lora_magnitude_vector.default_0`, missing the parameter's "
    "`.weight`, so DoRA magnitudes of the text encoder are not loaded (the U-Net's are)"))
def test_dora_text_encoder_in_diffusers(base_folder, tmp_path):
    settings = LoraSettings(rank=RANK, alpha=ALPHA, use_dora=True, text_encoder=True)
    parts = with_lora(settings)
    _, ours = outputs(parts.denoiser, parts.text_encoder)
    save_diffusers(tmp_path / DIFFUSERS_FILE, lora_state_dict(parts.denoiser), lora_state_dict(parts.text_encoder),
                   settings=settings)
    pipe = diffusers_pipe(base_folder, tmp_path / DIFFUSERS_FILE)
    assert rel_err(outputs(pipe.unet, pipe.text_encoder)[1], ours) < 1e-5
