"""Flux.1 LoRA: the presets on the transformer, both file layouts, merging and the command line, checked
against diffusers' FluxPipeline loading the same files into the same tiny weights, and against diffusers'
own kohya-Flux converter at Flux's real width (it splits fused weights by hard-coded 3072-wide parts,
FORMATS.md "Reader quirks", so a tiny model's kohya file cannot go through it).

Every LoRA here has random lora_B weights and alpha != rank, so a scaling mistake shows; the kohya
file's fused q/k/v carry 3x (single blocks' linear1 4x) the alpha, and a file that left it unscaled
would load at 1/3 strength."""
import pytest
import torch
from conftest import randomize_, randomize_lora_, rel_err
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from adapters.__main__ import main as adapters_main
from adapters.lora import (
    DIFFUSERS_FILE,
    FLUX_TARGETS,
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
    split_modules,
)
from ldmcore.checkpoints import Components, load_components
from ldmcore.flux import image_ids, pack_latents, unpack_latents
from ldmcore.presets import get_preset
from ldmcore.text import build_word_tokenizer
from ldmcore.weights import CheckpointError

WORDS = "a red circle on white background".split()
RANK, ALPHA = 4, 3.0  # scale 0.75: not a power of two, so alpha mistakes do not cancel
WIDTH, MLP = 3072, 12288  # Flux.1's hidden and MLP widths
TEXT_LAYERS = get_preset("tiny-flux").text_encoder["num_hidden_layers"]


def fresh(preset: str = "tiny-flux") -> Components:
    """The same randomised tiny Flux every call (LoRA injection changes models in place)."""
    parts = Components.from_preset(preset, build_word_tokenizer(WORDS), seed=0)
    randomize_(parts.denoiser, seed=1, std=0.05)
    randomize_(parts.text_encoder, seed=2, std=0.05)
    return parts


def with_lora(settings: LoraSettings, preset: str = "tiny-flux") -> Components:
    parts = fresh(preset)
    add_lora(parts.denoiser, settings)
    randomize_lora_(parts.denoiser, 3)
    if settings.text_encoder:
        add_lora(parts.text_encoder, settings, text_encoder=True)
        randomize_lora_(parts.text_encoder, 4)
    return parts


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, sigma = torch.randn(2, 16, 8, 8, generator=g), torch.tensor([0.2, 0.8])
    ctx, pooled = torch.randn(2, 5, 32, generator=g), torch.randn(2, 32, generator=g)
    ids = torch.randint(0, len(build_word_tokenizer(WORDS)), (2, 77), generator=g)
    return x, sigma, ctx, pooled, ids


@torch.no_grad()
def outputs(parts):
    """The transformer's velocity (ours: unpacked latents in; diffusers': FluxPipeline's packed call) and
    CLIP-L's last hidden state."""
    x, sigma, ctx, pooled, ids = inputs()
    model = parts.denoiser if hasattr(parts, "denoiser") else parts.transformer
    guidance = torch.tensor([3.5, 1.0]) if model.config.guidance_embeds else None
    if hasattr(parts, "denoiser"):
        velocity = model(x, sigma, ctx, pooled, guidance)
    else:
        packed = model(hidden_states=pack_latents(x), encoder_hidden_states=ctx, pooled_projections=pooled,
                       timestep=sigma, img_ids=image_ids(8, 8), txt_ids=torch.zeros(5, 3), guidance=guidance,
                       return_dict=False)[0]
        velocity = unpack_latents(packed, 8, 8)
    return velocity, parts.text_encoder(ids)[0]


def save_both(parts: Components, settings: LoraSettings, folder, metadata=None):
    text = lora_state_dict(parts.text_encoder) if settings.text_encoder else None
    kwargs = {"denoiser_config": parts.denoiser.config}
    denoiser = lora_state_dict(parts.denoiser)
    save_diffusers(folder / DIFFUSERS_FILE, denoiser, text, metadata, settings=settings, **kwargs)
    save_kohya(folder / KOHYA_FILE, denoiser, text, settings, metadata, **kwargs)
    return folder / DIFFUSERS_FILE, folder / KOHYA_FILE


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_lora") / "model"
    fresh().save_pretrained(folder)
    return folder


def diffusers_pipe(folder, lora_file):
    import diffusers

    pipe = diffusers.FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_file))
    return pipe


def effective(path, **kwargs) -> dict[str, torch.Tensor]:
    """{component.module: (alpha / rank) * B @ A} of a LoRA file as our reader gives it, in float64."""
    lora = load_lora_file(path, **kwargs)
    return {f"{c}.{name}": (lora.alpha / p["A"].shape[0]) * (p["B"].double() @ p["A"].double())
            for c, sd in lora.state_dicts().items() for name, p in split_modules(sd, str(path)).items()}


# -- 1. the presets on a Flux transformer ------------------------------------------------------------


def test_presets_choose_flux_modules_and_t5_takes_no_lora():
    model = fresh().denoiser
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    double, single = model.config.num_layers, model.config.num_single_layers
    counts = {}
    for targets in FLUX_TARGETS:
        parts = fresh()
        names = add_lora(parts.denoiser, LoraSettings(rank=RANK, targets=targets))
        counts[targets] = set(names)
    assert len(counts["attention"]) == 8 * double + 3 * single
    assert all(".attn." in n for n in counts["attention"])
    assert counts["attention+ff"] - counts["attention"] == {
        *(f"transformer_blocks.{i}.{m}" for i in range(double)
          for m in ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")),
        *(f"single_transformer_blocks.{i}.{m}" for i in range(single) for m in ("proj_mlp", "proj_out")),
    }
    assert counts["all"] == set(linears)  # + modulation, embedders and the final layer: every Linear
    with pytest.raises(ValueError, match="T5"):
        add_lora(fresh().text_encoder_2, LoraSettings(rank=RANK), text_encoder=True)


# -- 2. diffusers reads what we write; the kohya file is the same LoRA -------------------------------


@pytest.mark.parametrize("targets", ["attention", "all"])
def test_flux_pipeline_loads_our_diffusers_file(targets, base_folder, tmp_path):
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets=targets, text_encoder=True)
    parts = with_lora(settings)
    ours, plain = outputs(parts), outputs(fresh())
    assert rel_err(ours[0], plain[0]) > 1e-2 and rel_err(ours[1], plain[1]) > 1e-2  # the LoRA matters
    diffusers_file, _ = save_both(parts, settings, tmp_path)
    pipe = diffusers_pipe(base_folder, diffusers_file)
    assert not any(k.startswith("unet.") for k in load_file(diffusers_file))
    theirs = outputs(pipe)
    assert rel_err(theirs[0], ours[0]) < 1e-5 and rel_err(theirs[1], ours[1]) < 1e-5


def test_kohya_file_is_the_same_lora(tmp_path):
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets="all", text_encoder=True)
    parts = with_lora(settings)
    diffusers_file, kohya_file = save_both(parts, settings, tmp_path, {"run": "tiny-flux"})
    a, b = effective(diffusers_file), effective(kohya_file)
    text_modules = 4 * parts.text_encoder.config.num_hidden_layers  # CLIP-L's q/k/v/out
    assert a.keys() == b.keys() and len(a) == 36 + text_modules  # every transformer Linear
    worst = max(rel_err(b[k], a[k]) for k in a)
    assert worst < 1e-6, worst
    # and the tensors themselves come back: the block-diagonal fused LoRAs split into what was written
    sd = lora_state_dict(parts.denoiser)
    for path in (diffusers_file, kohya_file):
        lora = load_lora_file(path)
        assert (lora.family, lora.alpha, lora.user) == ("flux", ALPHA, {"run": "tiny-flux"}), path.name
        assert LoraSettings.from_dict(lora.settings) == settings
        assert lora.denoiser.keys() == sd.keys() and all(torch.equal(lora.denoiser[k], v) for k, v in sd.items())
    expected = outputs(parts)
    for path in (diffusers_file, kohya_file):
        merged = fresh()
        merge_lora(merged, path)
        got = outputs(merged)
        assert rel_err(got[0], expected[0]) < 1e-5 and rel_err(got[1], expected[1]) < 1e-5, path.name
    again = fresh()  # into a fresh LoRA model
    add_lora(again.denoiser, settings)
    set_lora_state_dict(again.denoiser, load_lora_file(kohya_file).denoiser)
    assert rel_err(outputs(again)[0], expected[0]) < 1e-6


def test_kohya_flux_names_and_fused_layout(tmp_path):
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets="all", text_encoder=True)
    parts = with_lora(settings)
    _, kohya_file = save_both(parts, settings, tmp_path)
    state, sd = load_file(kohya_file), lora_state_dict(parts.denoiser)
    modules = {k.split(".")[0] for k in state}
    d = parts.denoiser.config.num_attention_heads * parts.denoiser.config.attention_head_dim
    assert {m for m in modules if not m.startswith("lora_te1_")} == {
        *(f"lora_unet_double_blocks_0_{s}_{m}" for s in ("img", "txt")
          for m in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2", "mod_lin")),
        *(f"lora_unet_single_blocks_{i}_{m}" for i in range(2) for m in ("linear1", "linear2", "modulation_lin")),
        "lora_unet_time_in_in_layer", "lora_unet_time_in_out_layer", "lora_unet_guidance_in_in_layer",
        "lora_unet_guidance_in_out_layer", "lora_unet_vector_in_in_layer", "lora_unet_vector_in_out_layer",
        "lora_unet_txt_in", "lora_unet_img_in", "lora_unet_final_layer_linear",
        "lora_unet_final_layer_adaLN_modulation_1",
    }
    assert sum(m.startswith("lora_te1_text_model_encoder_layers_") for m in modules) == 4 * TEXT_LAYERS
    # q/k/v of the image stream: downs stacked, ups block-diagonal, 3x the alpha
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    down, up = state[f"{qkv}.lora_down.weight"], state[f"{qkv}.lora_up.weight"]
    assert down.shape == (3 * RANK, d) and up.shape == (3 * d, 3 * RANK)
    for i, p in enumerate("qkv"):
        name = f"transformer_blocks.0.attn.to_{p}"
        assert torch.equal(down[i * RANK : (i + 1) * RANK], sd[f"{name}.lora_A.weight"])
        assert torch.equal(up[i * d : (i + 1) * d, i * RANK : (i + 1) * RANK], sd[f"{name}.lora_B.weight"])
        assert not up[i * d : (i + 1) * d].index_fill(1, torch.arange(i * RANK, (i + 1) * RANK), 0).any()
    assert state[f"{qkv}.alpha"].item() == 3 * ALPHA and state["lora_unet_txt_in.alpha"].item() == ALPHA
    # linear1: q, k, v, then the 4x wide MLP input, 4x the alpha
    linear1 = "lora_unet_single_blocks_1_linear1"
    assert state[f"{linear1}.lora_up.weight"].shape == (3 * d + 4 * d, 4 * RANK)
    assert state[f"{linear1}.alpha"].item() == 4 * ALPHA
    assert torch.equal(state[f"{linear1}.lora_up.weight"][3 * d :, 3 * RANK :],
                       sd["single_transformer_blocks.1.proj_mlp.lora_B.weight"])
    # the final modulation: BFL (shift, scale) rows, diffusers (scale, shift)
    scale, shift = sd["norm_out.linear.lora_B.weight"].chunk(2)
    assert torch.equal(state["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"], torch.cat([shift, scale]))
    with safe_open(str(kohya_file), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["ss_network_module"]) == ("flux1", "networks.lora_flux")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(RANK), str(ALPHA))


def test_parts_without_a_lora_get_zero_blocks(tmp_path):
    """LoRA on q and v only (and a single block's MLP input): k's blocks are zero, and reading drops them."""
    targets = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v",
               "single_transformer_blocks.0.proj_mlp")
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets=targets)
    parts = with_lora(settings)
    _, kohya_file = save_both(parts, settings, tmp_path)
    state = load_file(kohya_file)
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert state[f"{qkv}.lora_down.weight"].shape[0] == 3 * RANK and state[f"{qkv}.alpha"].item() == 3 * ALPHA
    assert not state[f"{qkv}.lora_down.weight"][RANK : 2 * RANK].any()
    lora = load_lora_file(kohya_file)
    assert sorted(split_modules(lora.denoiser, "test")) == sorted(targets)
    merged = fresh()
    merge_lora(merged, kohya_file)
    assert rel_err(outputs(merged)[0], outputs(parts)[0]) < 1e-5


# -- 3. at Flux's real width, diffusers' own kohya converter -------------------------------------------


def real_width_lora(seed: int, modules: dict[str, tuple[int, int]], rank: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (out, width) in modules.items():
        sd[f"{name}.lora_A.weight"] = torch.randn(rank, width, generator=g)
        sd[f"{name}.lora_B.weight"] = torch.randn(out, rank, generator=g)
    return sd


def probed(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """scale * B @ A @ P for a fixed random P (in, 8): compares full-width deltas without forming them
    (two low-rank products differ exactly when they differ on a random probe, almost surely)."""
    probe = torch.randn(a.shape[1], 8, generator=torch.Generator().manual_seed(a.shape[1]), dtype=torch.float64)
    return scale * (b.double() @ (a.double() @ probe))


def converted_deltas(path) -> dict[str, torch.Tensor]:
    """diffusers' reading of a kohya Flux file: {module: B @ A @ P} (alpha folded in by its converter)."""
    import diffusers

    sd = diffusers.FluxPipeline.lora_state_dict(str(path))
    return {k.removeprefix("transformer.")[: -len(".lora_A.weight")]: probed(sd[k.replace("lora_A", "lora_B")], v)
            for k, v in sd.items() if k.endswith(".lora_A.weight")}


def test_diffusers_converter_reads_our_kohya_file_at_the_real_width(tmp_path):
    d, m = WIDTH, MLP
    blocks = {f"transformer_blocks.5.{n}": shape for n, shape in {
        "attn.to_q": (d, d), "attn.to_k": (d, d), "attn.to_v": (d, d), "attn.to_out.0": (d, d),
        "attn.add_q_proj": (d, d), "attn.add_k_proj": (d, d), "attn.add_v_proj": (d, d), "attn.to_add_out": (d, d),
        "ff.net.0.proj": (m, d), "ff.net.2": (d, m), "ff_context.net.0.proj": (m, d), "ff_context.net.2": (d, m),
        "norm1.linear": (6 * d, d), "norm1_context.linear": (6 * d, d)}.items()}
    blocks |= {f"single_transformer_blocks.11.{n}": shape for n, shape in {
        "attn.to_q": (d, d), "attn.to_k": (d, d), "attn.to_v": (d, d), "proj_mlp": (m, d), "proj_out": (d, d + m),
        "norm.linear": (3 * d, d)}.items()}
    sd = real_width_lora(0, blocks)
    settings = LoraSettings(rank=2, alpha=ALPHA)
    save_kohya(tmp_path / KOHYA_FILE, sd, None, settings)
    theirs = converted_deltas(tmp_path / KOHYA_FILE)
    ours = {n: probed(sd[f"{n}.lora_B.weight"], sd[f"{n}.lora_A.weight"], ALPHA / 2) for n in blocks}
    assert theirs.keys() == ours.keys()
    worst = max(rel_err(theirs[n], ours[n]) for n in ours)
    assert worst < 1e-6, worst
    # the check sees the pitfall: fused modules written with alpha unscaled load at 1/k strength
    state = load_file(tmp_path / KOHYA_FILE)
    for name in ("lora_unet_double_blocks_5_img_attn_qkv", "lora_unet_single_blocks_11_linear1"):
        state[f"{name}.alpha"] = torch.tensor(ALPHA)
    save_file(state, tmp_path / "unscaled.safetensors")
    weak = converted_deltas(tmp_path / "unscaled.safetensors")
    k_proj = "transformer_blocks.5.attn.to_k"
    assert rel_err(weak[k_proj], ours[k_proj]) == pytest.approx(2 / 3)
    assert rel_err(weak["single_transformer_blocks.11.proj_mlp"],
                   ours["single_transformer_blocks.11.proj_mlp"]) == pytest.approx(3 / 4)
    assert set(split_modules(load_lora_file(tmp_path / KOHYA_FILE).denoiser, "test")) == set(blocks)


def test_final_layer_and_embedders_at_the_real_width(tmp_path):
    """norm_out's rows swap into BFL's order and back: diffusers' converter swaps them again. Its reader
    applies no alpha on the final layer (diffusers 0.42.1), so alpha = rank here."""
    d = WIDTH
    modules = {"norm_out.linear": (2 * d, d), "proj_out": (64, d), "x_embedder": (d, 64),
               "context_embedder": (d, 4096), "time_text_embed.timestep_embedder.linear_1": (d, 256),
               "time_text_embed.guidance_embedder.linear_2": (d, d), "time_text_embed.text_embedder.linear_1": (d, 768)}
    sd = real_width_lora(1, modules)
    save_kohya(tmp_path / KOHYA_FILE, sd, None, LoraSettings(rank=2, alpha=2))
    theirs = converted_deltas(tmp_path / KOHYA_FILE)
    for n in modules:
        assert rel_err(theirs[n], probed(sd[f"{n}.lora_B.weight"], sd[f"{n}.lora_A.weight"])) < 1e-6, n
    up = load_file(tmp_path / KOHYA_FILE)["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    assert torch.equal(up[:d], sd["norm_out.linear.lora_B.weight"][d:])


@pytest.mark.xfail(strict=True, reason=(
    "diffusers 0.42.1: the kohya-Flux converter names the embedders' and the final layer's LoRAs without the "
    "`transformer.` prefix (x_embedder, norm_out.linear, ...), so load_lora_weights drops them"))
def test_diffusers_loads_kohya_final_layer_and_embedders(base_folder, tmp_path):
    settings = LoraSettings(rank=RANK, alpha=RANK, targets=("norm_out.linear", "x_embedder"))
    parts = with_lora(settings)
    save_kohya(tmp_path / KOHYA_FILE, lora_state_dict(parts.denoiser), None, settings)
    assert rel_err(outputs(diffusers_pipe(base_folder, tmp_path / KOHYA_FILE))[0], outputs(parts)[0]) < 1e-5


# -- 4. other tools' files ---------------------------------------------------------------------------


def test_other_tools_spellings_and_shared_downs(tmp_path):
    """kohya's default Flux training: one down for q, k and v (and linear1's four parts), per-module alphas;
    ComfyUI's `diffusion_model.` spelling; OneTrainer's `lora_transformer_`. Each part gets that down, the
    up's rows for it and the same alpha, so merging gives W + alpha / rank * up @ down on the fused rows."""
    model = fresh().denoiser
    d = model.config.num_attention_heads * model.config.attention_head_dim
    g = torch.Generator().manual_seed(5)
    fused = {"double_blocks_0_img_attn_qkv": (3 * d, d, 1.0), "single_blocks_1_linear1": (7 * d, d, 8.0),
             "final_layer_adaLN_modulation_1": (2 * d, d, 4.0)}
    kohya = {}
    for name, (out, width, alpha) in fused.items():
        kohya[f"lora_unet_{name}.lora_down.weight"] = torch.randn(6, width, generator=g) * 0.3
        kohya[f"lora_unet_{name}.lora_up.weight"] = torch.randn(out, 6, generator=g) * 0.3
        kohya[f"lora_unet_{name}.alpha"] = torch.tensor(alpha)
    save_file(kohya, tmp_path / "kohya.safetensors")

    def delta(name):
        _, _, alpha = fused[name]
        return (alpha / 6) * kohya[f"lora_unet_{name}.lora_up.weight"] @ kohya[f"lora_unet_{name}.lora_down.weight"]

    merged, base = fresh(), fresh()
    merge_lora(merged, tmp_path / "kohya.safetensors")
    weight = lambda parts, n: parts.denoiser.get_submodule(n).weight.detach()  # noqa: E731
    qkv = torch.cat([weight(merged, n) - weight(base, n) for n in (f"transformer_blocks.0.attn.to_{p}" for p in "qkv")])
    assert rel_err(qkv, delta("double_blocks_0_img_attn_qkv")) < 1e-6
    names = [f"single_transformer_blocks.1.attn.to_{p}" for p in "qkv"] + ["single_transformer_blocks.1.proj_mlp"]
    linear1 = torch.cat([weight(merged, n) - weight(base, n) for n in names])
    assert rel_err(linear1, delta("single_blocks_1_linear1")) < 1e-6
    scale, shift = (weight(merged, "norm_out.linear") - weight(base, "norm_out.linear")).chunk(2)
    assert rel_err(torch.cat([shift, scale]), delta("final_layer_adaLN_modulation_1")) < 1e-6
    lora = load_lora_file(tmp_path / "kohya.safetensors")
    assert lora.family == "flux" and lora.format == "kohya"
    assert all(p["A"].shape[0] == 6 for p in split_modules(lora.denoiser, "test").values())

    # the same tensors in ComfyUI's and OneTrainer's spellings read the same
    expected = effective(tmp_path / "kohya.safetensors")
    comfy = {k.replace("lora_unet_double_blocks_0_img_attn_qkv", "diffusion_model.double_blocks.0.img_attn.qkv")
             .replace("lora_unet_single_blocks_1_linear1", "diffusion_model.single_blocks.1.linear1")
             .replace("lora_unet_final_layer_adaLN_modulation_1", "diffusion_model.final_layer.adaLN_modulation.1")
             .replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v for k, v in kohya.items()}
    save_file(comfy, tmp_path / "comfy.safetensors")
    got = effective(tmp_path / "comfy.safetensors")
    assert got.keys() == expected.keys() and all(rel_err(got[k], v) < 1e-12 for k, v in expected.items())
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets="attention+ff", text_encoder=True)
    parts = with_lora(settings)
    diffusers_file, _ = save_both(parts, settings, tmp_path)
    onetrainer = {}
    for k, v in load_file(diffusers_file).items():
        component, rest = k.split(".", 1)
        module, part = rest.rsplit(".", 2)[0], rest.rsplit(".", 2)[1]
        kind = {"lora_A": "lora_down", "lora_B": "lora_up"}[part]
        if component == "transformer":
            onetrainer[f"lora_transformer_{module.replace('.', '_')}.{kind}.weight"] = v
            onetrainer[f"lora_transformer_{module.replace('.', '_')}.alpha"] = torch.tensor(ALPHA)
        else:
            onetrainer[f"lora_te1_{module.replace('.', '_')}.{kind}.weight"] = v
            onetrainer[f"lora_te1_{module.replace('.', '_')}.alpha"] = torch.tensor(ALPHA)
    save_file(onetrainer, tmp_path / "onetrainer.safetensors")
    a, b = effective(diffusers_file), effective(tmp_path / "onetrainer.safetensors")
    assert a.keys() == b.keys() and all(rel_err(b[k], v) < 1e-12 for k, v in a.items())


# -- 5. families do not mix; merging; the command line -----------------------------------------------


def test_family_mismatch_is_refused_both_ways(tmp_path):
    settings = LoraSettings(rank=RANK, alpha=ALPHA, text_encoder=True)
    flux_files = save_both(with_lora(settings), settings, tmp_path / "flux")
    sd = Components.from_preset("tiny", build_word_tokenizer(WORDS), seed=0)
    for path in flux_files:
        with pytest.raises(CheckpointError) as e:
            merge_lora(sd, path)
        message = str(e.value)
        assert str(path) in message and "a LoRA for Flux.1" in message and "the U-Net is SD 1.x/2.x's" in message
        assert "apply it to a Flux.1 base model" in message
    add_lora(sd.denoiser, settings)
    add_lora(sd.text_encoder, settings, text_encoder=True)
    sd_file = tmp_path / "sd" / KOHYA_FILE
    save_kohya(sd_file, lora_state_dict(sd.denoiser), lora_state_dict(sd.text_encoder), settings)
    flux = fresh()
    for path, theirs in ((sd_file, "SD 1.x/2.x"),):
        with pytest.raises(CheckpointError) as e:
            merge_lora(flux, path)
        message = str(e.value)
        assert str(path) in message and f"a LoRA for {theirs}" in message and "the transformer is Flux.1's" in message
        assert f"apply it to an {theirs} base model" in message
    # without metadata or text encoder, the U-Net modules still tell
    bare = tmp_path / "bare.safetensors"
    save_file({k: v for k, v in load_file(sd_file).items() if k.startswith("lora_unet_") and "_attn1_" in k}, bare)
    with pytest.raises(CheckpointError, match="a LoRA for SD 1.x/2.x .its U-Net modules fit"):
        load_lora_file(bare, denoiser_config=flux.denoiser.config)
    # dev's LoRA fits schnell: one Flux family for LoRA files
    merged = fresh("tiny-flux-schnell")
    merge_lora(merged, flux_files[1])
    assert load_lora_file(flux_files[0], denoiser_config=merged.denoiser.config).family == "flux"


def test_t5_weights_are_refused(tmp_path):
    settings = LoraSettings(rank=RANK, alpha=ALPHA)
    parts = with_lora(settings)
    denoiser = lora_state_dict(parts.denoiser)
    with pytest.raises(ValueError, match="T5"):
        save_diffusers(tmp_path / "never.safetensors", denoiser, text_2_sd={"encoder.block.0.layer.0.SelfAttention.q"
                       ".lora_A.weight": torch.zeros(RANK, 32), "encoder.block.0.layer.0.SelfAttention.q.lora_B.weight":
                       torch.zeros(32, RANK)})
    save_kohya(tmp_path / KOHYA_FILE, denoiser, None, settings)
    state = load_file(tmp_path / KOHYA_FILE)
    state["lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(RANK, 32)
    state["lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.zeros(32, RANK)
    save_file(state, tmp_path / "t5.safetensors")
    with pytest.raises(CheckpointError, match="t5.safetensors: LoRA weights for Flux's second text encoder .T5."):
        load_lora_file(tmp_path / "t5.safetensors")


def test_command_line_exports_inspects_and_merges_flux(base_folder, tmp_path, capsys):
    settings = LoraSettings(rank=RANK, alpha=ALPHA, targets="all", text_encoder=True)
    parts = with_lora(settings)
    expected = outputs(parts)
    # written without a config: the module names say Flux
    save_diffusers(tmp_path / "run" / DIFFUSERS_FILE, lora_state_dict(parts.denoiser),
                   lora_state_dict(parts.text_encoder), {"run": "flux"}, settings=settings)
    assert adapters_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    for name in (DIFFUSERS_FILE, KOHYA_FILE):
        lora = load_lora_file(tmp_path / "export" / name)
        assert lora.family == "flux" and lora.user == {"run": "flux"}, name
    assert "lora_unet_double_blocks_0_img_attn_qkv.alpha" in load_file(tmp_path / "export" / KOHYA_FILE)
    capsys.readouterr()
    assert adapters_main(["inspect", str(tmp_path / "export" / KOHYA_FILE)]) == 0
    out = capsys.readouterr().out
    assert "family:        Flux.1" in out and "format:        kohya" in out and "transformer modules: 36" in out
    assert "attention 14" in out and "modulation 5" in out and f"text encoder:  yes, {4 * TEXT_LAYERS} modules" in out
    assert "text encoder 2" not in out
    d = describe(tmp_path / "export" / KOHYA_FILE)
    assert d["denoiser_blocks"]["transformer_blocks"] == 14 and d["denoiser_blocks"]["single_transformer_blocks"] == 12
    assert adapters_main(["merge", str(base_folder), str(tmp_path / "export" / KOHYA_FILE),
                          "--out", str(tmp_path / "merged")]) == 0
    merged = outputs(load_components(tmp_path / "merged"))
    assert rel_err(merged[0], expected[0]) < 1e-5 and rel_err(merged[1], expected[1]) < 1e-5
