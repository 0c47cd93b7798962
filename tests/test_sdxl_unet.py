"""SDXL's U-Net and ControlNet against diffusers' UNet2DConditionModel / ControlNetModel on the same random
weights (float32, 1e-5 relative): the added conditioning (pooled text + time ids), per-level transformer
depths, key names and order at full size; and the original ControlNet layout with `label_emb`."""
import pytest
import torch
from conftest import randomize_, rel_err
from diffusers import ControlNetModel, UNet2DConditionModel

from ldmcore.controlnet import ControlNet, ControlNetConfig
from ldmcore.controlnet_single_file import (
    controlnet_to_original, load_controlnet_single_file, original_to_controlnet, save_controlnet_single_file)
from ldmcore.presets import PRESETS
from ldmcore.unet import UNet
from ldmcore.weights import CheckpointError

TINY = {"base": PRESETS["tiny-sdxl"].denoiser, "refiner": PRESETS["tiny-sdxl-refiner"].denoiser}
SMALL_CONTROL = dict(conditioning_embedding_out_channels=(4, 8, 16))  # 4x: the tiny VAE's factor


def pair(cfg):
    ref = randomize_(UNet2DConditionModel(**cfg)).eval()
    ours = UNet.from_config(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(cfg, b=2, h=8, w=8, seed=1):
    """sample, timesteps, context and SDXL's added conditioning with different size ids per sample."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.get("in_channels", 4), h, w, generator=g)
    ctx = torch.randn(b, 9, cfg["cross_attention_dim"], generator=g)
    rows = [[32.0, 32, 0, 0, 32, 32], [48.0, 40, 4, 8, 32, 32]]  # original (h, w), crop (top, left), target (h, w)
    n = (cfg["projection_class_embeddings_input_dim"] - cfg["cross_attention_dim"]) // cfg["addition_time_embed_dim"]
    if n == 5:  # refiner: (h, w, top, left, aesthetic score); its context is the pooled width
        rows = [[32.0, 32, 0, 0, 6.0], [48.0, 40, 4, 8, 2.5]]
    pooled = cfg["projection_class_embeddings_input_dim"] - len(rows[0]) * cfg["addition_time_embed_dim"]
    added = {"text_embeds": torch.randn(b, pooled, generator=g), "time_ids": torch.tensor(rows[:b])}
    return x, torch.tensor([7, 813][:b]), ctx, added


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_sdxl_unet_matches_diffusers(name):
    cfg = TINY[name]
    ref, ours = pair(cfg)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    x, t, ctx, added = inputs(cfg)
    with torch.no_grad():
        expected = ref(x, t, ctx, added_cond_kwargs=added).sample
        got = ours(x, t, ctx, added_cond_kwargs=added)
        assert rel_err(got, expected) < 1e-5
        # the size ids matter, per sample: swapping the rows changes each sample's prediction
        swapped = {**added, "time_ids": added["time_ids"].flip(0)}
        assert rel_err(ours(x, t, ctx, added_cond_kwargs=swapped), got) > 1e-3
        expected = ref(x, 500, ctx, added_cond_kwargs=swapped).sample  # one timestep for the batch
        assert rel_err(ours(x, 500, ctx, added_cond_kwargs=swapped), expected) < 1e-5


def test_folders_load_both_ways(tmp_path):
    cfg = TINY["base"]
    ref, ours = pair(cfg)
    ref.save_pretrained(tmp_path / "diffusers")
    ours.save_pretrained(tmp_path / "ours")
    from_diffusers = UNet.from_pretrained(tmp_path / "diffusers")
    from_ours = UNet2DConditionModel.from_pretrained(tmp_path / "ours")
    assert from_diffusers.config == ours.config
    x, t, ctx, added = inputs(cfg)
    with torch.no_grad():
        expected = ref(x, t, ctx, added_cond_kwargs=added).sample
        assert torch.equal(from_diffusers(x, t, ctx, added_cond_kwargs=added), ours(x, t, ctx, added_cond_kwargs=added))
        assert rel_err(from_ours(x, t, ctx, added_cond_kwargs=added).sample, expected) < 1e-5


@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner"])
def test_full_size_state_dict_matches_diffusers(name):
    cfg = PRESETS[name].denoiser
    with torch.device("meta"):  # keys, order and shapes only
        ref = UNet2DConditionModel(**cfg).state_dict()
        ours = UNet.from_config(dict(cfg)).state_dict()
    assert list(ours) == list(ref)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    # SDXL base: transformer depth 10 in the last level and the mid block, none in level 0
    if name == "sdxl":
        assert "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight" in ours
        assert "mid_block.attentions.0.transformer_blocks.9.ff.net.2.weight" in ours
        assert not any(k.startswith("down_blocks.0.attentions") for k in ours)
        assert ours["add_embedding.linear_1.weight"].shape == (1280, 2816)


def test_added_conditioning_is_required_exactly_for_sdxl():
    cfg = TINY["base"]
    ours = UNet.from_config(dict(cfg)).eval()
    x, t, ctx, added = inputs(cfg)
    with pytest.raises(ValueError, match="added_cond_kwargs.*missing text_embeds, time_ids"):
        ours(x, t, ctx)
    with pytest.raises(ValueError, match="missing time_ids"):
        ours(x, t, ctx, added_cond_kwargs={"text_embeds": added["text_embeds"]})
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim is 96"):
        ours(x, t, ctx, added_cond_kwargs={**added, "time_ids": added["time_ids"][:, :5]})
    with pytest.raises(ValueError, match=r"time_ids has shape \(6,\)"):
        ours(x, t, ctx, added_cond_kwargs={**added, "time_ids": added["time_ids"][0]})
    sd = UNet.from_config(dict(PRESETS["tiny"].denoiser)).eval()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 9, 32)
    with pytest.raises(ValueError, match="no addition_embed_type"):
        sd(x, t, ctx, added_cond_kwargs=added)
    assert not any(k.startswith("add_embedding") for k in sd.state_dict())


def test_incomplete_or_unknown_added_conditioning_configs_are_refused():
    with pytest.raises(CheckpointError, match="needs addition_time_embed_dim"):
        UNet.from_config({**TINY["base"], "addition_time_embed_dim": None})
    with pytest.raises(CheckpointError, match="addition_embed_type='text_image' is not supported"):
        UNet.from_config({**TINY["base"], "addition_embed_type": "text_image"})
    with pytest.raises(CheckpointError, match="ControlNet config: addition_embed_type='text'"):
        ControlNetConfig(addition_embed_type="text")


def test_half_precision_runs_with_float32_time_ids():
    cfg = TINY["base"]
    _, ours = pair(cfg)
    x, t, ctx, added = inputs(cfg)
    with torch.no_grad():
        full = ours(x, t, ctx, added_cond_kwargs=added)
        half = ours.to(torch.bfloat16)(x.bfloat16(), t, ctx.bfloat16(), added_cond_kwargs=added)
    assert half.dtype == torch.bfloat16
    assert rel_err(half.float(), full) < 5e-2


# -- ControlNet ----------------------------------------------------------------------------------------


def controlnet_config(name: str = "base") -> ControlNetConfig:
    return ControlNetConfig.from_unet_config(UNet.from_config(dict(TINY[name])).config, **SMALL_CONTROL)


def diffusers_kwargs(cfg: ControlNetConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}


def control_image(cfg: ControlNetConfig, x: torch.Tensor, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = x.shape
    return torch.rand(b, cfg.conditioning_channels, h * cfg.downscale, w * cfg.downscale, generator=g)


@pytest.mark.parametrize("name", sorted(TINY))
def test_controlnet_residuals_match_diffusers(name):
    cfg = controlnet_config(name)
    ours = randomize_(ControlNet(cfg)).eval()  # zero convs and add_embedding included
    ref = ControlNetModel(**diffusers_kwargs(cfg)).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict(), strict=True)
    x, t, ctx, added = inputs(TINY[name])
    cond = control_image(cfg, x)
    with torch.no_grad():
        down, mid = ours(x, t, ctx, cond, 0.7, added_cond_kwargs=added)
        ref_down, ref_mid = ref(x, t, ctx, cond, conditioning_scale=0.7, added_cond_kwargs=added, return_dict=False)
    assert len(down) == len(ref_down)
    for a, b in zip(down, ref_down):
        assert rel_err(a, b) < 1e-5
    assert rel_err(mid, ref_mid) < 1e-5
    with pytest.raises(ValueError, match="missing text_embeds, time_ids"):
        ours(x, t, ctx, cond)


def test_controlnet_folders_load_both_ways(tmp_path):
    cfg = controlnet_config("base")
    ours = randomize_(ControlNet(cfg)).eval()
    ours.save_pretrained(tmp_path / "ours")
    ref = ControlNetModel.from_pretrained(tmp_path / "ours").eval()
    ref.save_pretrained(tmp_path / "diffusers")
    back = ControlNet.from_pretrained(tmp_path / "diffusers")
    assert back.config == cfg and ref.config.addition_embed_type == "text_time"
    x, t, ctx, added = inputs(TINY["base"])
    cond = control_image(cfg, x)
    with torch.no_grad():
        down, mid = back(x, t, ctx, cond, added_cond_kwargs=added)
        ref_down, ref_mid = ref(x, t, ctx, cond, added_cond_kwargs=added, return_dict=False)
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(down, ref_down)) and rel_err(mid, ref_mid) < 1e-5


def test_full_size_controlnet_state_dict_matches_diffusers():
    with torch.device("meta"):
        cfg = ControlNetConfig.from_unet_config(UNet.from_config(dict(PRESETS["sdxl"].denoiser)).config)
        ours, ref = ControlNet(cfg).state_dict(), ControlNetModel(**diffusers_kwargs(cfg)).state_dict()
    assert list(ours) == list(ref)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


def test_controlnet_from_unet_copies_the_added_conditioning_as_diffusers_does():
    ref_unet = randomize_(UNet2DConditionModel(**TINY["base"]), std=0.05)
    unet = UNet.from_config(dict(ref_unet.config))
    unet.load_state_dict(ref_unet.state_dict())
    ref = ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=(4, 8, 16))
    ours = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 16))
    assert ours.config.addition_embed_type == "text_time"
    assert {k: v for k, v in ours.config.to_dict().items() if not k.startswith("_")} == {
        k: (list(ref.config[k]) if isinstance(ref.config[k], tuple) else ref.config[k]) for k in ours.config.to_dict()
        if not k.startswith("_")}
    for k, v in ref.state_dict().items():
        if not k.startswith("controlnet_cond_embedding.") or k.startswith("controlnet_cond_embedding.conv_out"):
            assert torch.equal(ours.state_dict()[k], v), k
    assert torch.equal(ours.add_embedding.linear_2.weight, unet.add_embedding.linear_2.weight)


def test_controlnet_single_file_carries_label_emb(tmp_path):
    cfg = controlnet_config("base")
    ours = randomize_(ControlNet(cfg), seed=4)
    original = controlnet_to_original(ours.state_dict(), cfg)
    for key in ("label_emb.0.0.weight", "label_emb.0.2.bias", "time_embed.0.weight", "input_blocks.4.1.proj_in.weight"):
        assert "control_model." + key in original
    assert not any(".add_embedding." in k or k.startswith("control_model.add_embedding") for k in original)
    back = original_to_controlnet(original, cfg)
    assert list(back) == list(ours.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    # a file without label_emb does not fit an SDXL config, and the message names the key
    truncated = {k: v for k, v in original.items() if "label_emb.0.2.weight" not in k}
    with pytest.raises(CheckpointError, match=r"control_model\.label_emb\.0\.2\.weight"):
        original_to_controlnet(truncated, cfg)
    path = save_controlnet_single_file(ours, tmp_path / "cn.safetensors")
    loaded = load_controlnet_single_file(path)
    assert loaded.config == cfg
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ours.state_dict().items())
    # a foreign file (no config in its metadata) reads with the base model's config
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in original.items()}, str(tmp_path / "foreign.safetensors"))
    foreign = load_controlnet_single_file(tmp_path / "foreign.safetensors", config=ControlNetConfig.from_unet_config(
        UNet.from_config(dict(TINY["base"])).config))
    assert all(torch.equal(foreign.state_dict()[k], v) for k, v in ours.state_dict().items())
