"""The original single-file layout: what we write is read back exactly by diffusers' own converters,
lands on the key names real SD 1.5 files use, round-trips exactly, and OpenCLIP's fused q/k/v is
split so that a CLIPTextModel computes what an OpenCLIP text tower computes."""
from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as diffusers_sf
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldmcore.single_file import detect_family, diffusers_to_original, original_to_diffusers
from ldmcore.weights import CheckpointError

CROSS_DOWN, DOWN, UP, CROSS_UP = "CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"
UNET, VAE, CLIP, OPENCLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.", "cond_stage_model.model."

TINY_UNETS = {
    "sd1_two_per_level": dict(layers_per_block=2),
    "sd1_one_per_level": dict(layers_per_block=1),
    "inpainting": dict(layers_per_block=1, in_channels=9),
    # three levels, so one up level has attention and an upsampler (output_blocks.N.2.conv)
    "sd2_three_levels": dict(
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=(CROSS_DOWN, CROSS_DOWN, DOWN),
        up_block_types=(UP, CROSS_UP, CROSS_UP),
        use_linear_projection=True,
        attention_head_dim=(2, 4, 4),
    ),
}


def tiny_unet(**overrides) -> UNet2DConditionModel:
    config = dict(
        sample_size=8,
        block_out_channels=(32, 64),
        down_block_types=(CROSS_DOWN, DOWN),
        up_block_types=(UP, CROSS_UP),
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    return UNet2DConditionModel(**{**config, **overrides})


def tiny_vae(layers_per_block: int = 1, block_out_channels=(16, 32)) -> AutoencoderKL:
    n = len(block_out_channels)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


def tiny_clip(layers: int = 2) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act="gelu",  # OpenCLIP's activation, for the numerical comparison below
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config)


def random_weights(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Distinct random values in every tensor: with the default init, norms are all ones and biases all
    zeros, and two swapped keys would still compare equal."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    different = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"


def tiny_sd(name: str):
    """Random diffusers-named weights for the three models, and the U-Net and VAE configs."""
    unet = tiny_unet(**TINY_UNETS[name])
    vae = tiny_vae(layers_per_block=unet.config.layers_per_block)
    weights = random_weights(unet, 0), random_weights(vae, 1), random_weights(tiny_clip(), 2)
    return weights, (dict(unet.config), dict(vae.config))


@pytest.mark.parametrize("name", TINY_UNETS)
def test_diffusers_reads_our_export_back_exactly(name):
    (unet_sd, vae_sd, text_sd), (unet_cfg, vae_cfg) = tiny_sd(name)
    original = diffusers_to_original(unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg, "clip")

    assert_same(diffusers_sf.convert_ldm_unet_checkpoint(original, unet_cfg), unet_sd)
    assert_same(diffusers_sf.convert_ldm_vae_checkpoint(original, vae_cfg), vae_sd)
    # diffusers' loader drops `text_model.` for transformers >= 5.6, whose CLIPTextModel has no such level
    theirs = diffusers_sf.convert_ldm_clip_checkpoint(original)
    assert_same({k.removeprefix("text_model."): v for k, v in theirs.items()}, text_sd)
    as_openclip = diffusers_to_original(unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg, "openclip")
    theirs = diffusers_sf.convert_open_clip_checkpoint(tiny_clip(), as_openclip)
    assert_same({k.removeprefix("text_model."): v for k, v in theirs.items()}, text_sd)
    # diffusers' reader accepts a Linear-shaped VAE attention too; the original stores a 1x1 conv
    assert original[VAE + "encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert original[UNET + "input_blocks.0.0.weight"].shape[1] == unet_cfg["in_channels"]


def test_sd15_shaped_export_uses_the_real_key_names():
    """Key names from the SD 1.5 checkpoint (v1-5-pruned.safetensors) at the places our tables put
    them, for a 4-level, 2-per-level U-Net and VAE that differ from SD 1.5 only in width."""
    unet = tiny_unet(
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=2,
        down_block_types=(CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, DOWN),
        up_block_types=(UP, CROSS_UP, CROSS_UP, CROSS_UP),
        attention_head_dim=2,
        cross_attention_dim=768,
    )
    vae = tiny_vae(layers_per_block=2, block_out_channels=(8, 16, 32, 32))
    unet_sd, unet_cfg = random_weights(unet, 0), dict(unet.config)
    original = diffusers_to_original(unet_sd, vae.state_dict(), tiny_clip().state_dict(), unet_cfg, dict(vae.config), "clip")
    assert_same(diffusers_sf.convert_ldm_unet_checkpoint(original, unet_cfg), unet_sd)
    real_names = [
        "time_embed.2.weight",
        "input_blocks.3.0.op.weight",  # downsamplers after levels 0, 1, 2
        "input_blocks.6.0.op.weight",
        "input_blocks.9.0.op.weight",
        "input_blocks.4.0.skip_connection.weight",  # 320 -> 640
        "input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.11.0.out_layers.3.weight",
        "middle_block.1.proj_out.weight",
        "middle_block.2.emb_layers.1.bias",
        "output_blocks.2.1.conv.weight",  # level without attention: the upsampler is the block's 2nd entry
        "output_blocks.5.2.conv.weight",  # with attention: its 3rd
        "output_blocks.8.2.conv.weight",
        "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
        "out.2.weight",
    ]
    assert [k for k in real_names if UNET + k not in original] == []
    absent = ("input_blocks.12.", "output_blocks.12.", "output_blocks.11.2.")  # no 13th block, no last upsampler
    assert not any(k.startswith(tuple(UNET + a for a in absent)) for k in original)
    real_vae = [
        "encoder.down.1.block.0.nin_shortcut.weight",  # 128 -> 256
        "encoder.down.2.downsample.conv.weight",
        "encoder.mid.attn_1.proj_out.weight",
        "decoder.up.3.upsample.conv.weight",  # decoder levels numbered by resolution: up.3 runs first
        "decoder.up.0.block.0.nin_shortcut.weight",  # 256 -> 128 at the highest resolution
        "decoder.up.0.block.2.conv2.weight",
        "decoder.norm_out.weight",
    ]
    assert [k for k in real_vae if VAE + k not in original] == []
    absent = ("encoder.down.3.downsample.", "decoder.up.0.upsample.")
    assert not any(k.startswith(tuple(VAE + a for a in absent)) for k in original)
    assert CLIP + "text_model.encoder.layers.1.self_attn.q_proj.weight" in original
    family = detect_family(original)
    assert (family["family"], family["text_kind"], family["inpainting"]) == ("sd1", "clip", False)


@pytest.mark.parametrize("name", TINY_UNETS)
@pytest.mark.parametrize("text_kind", ["clip", "openclip"])
def test_round_trips_are_exact(name, text_kind):
    (unet_sd, vae_sd, text_sd), (unet_cfg, vae_cfg) = tiny_sd(name)
    original = diffusers_to_original(unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg, text_kind)
    back = original_to_diffusers(original, unet_cfg, vae_cfg, text_kind, text_layers=2)
    assert_same(back["unet"], unet_sd)
    assert_same(back["vae"], vae_sd)
    assert_same(back["text_encoder"], text_sd)
    again = diffusers_to_original(back["unet"], back["vae"], back["text_encoder"], unet_cfg, vae_cfg, text_kind)
    assert_same(again, original)


class OpenClipBlock(nn.Module):
    """OpenCLIP's ResidualAttentionBlock, whose parameter names the SD 2.x file keeps."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width))
        )

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OpenClipText(nn.Module):
    """OpenCLIP's text tower with its contrastive head: width 32, 4 heads, 16 positions."""

    def __init__(self, layers: int, width: int = 32, heads: int = 4, vocab: int = 100, context: int = 16):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(OpenClipBlock(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, 24))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, ids):  # (b, t) -> (b, t, width), before the projection
        t = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:t]
        mask = torch.full((t, t), float("-inf"), dtype=x.dtype).triu(1)  # causal
        for block in self.transformer.resblocks:
            x = block(x, mask)
        return self.ln_final(x)


def openclip_original(layers: int = 3) -> tuple[OpenClipText, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    tower = OpenClipText(layers)
    weights = random_weights(tower, 3)
    tower.load_state_dict(weights)
    return tower, {OPENCLIP + k: v for k, v in weights.items()}


def with_openclip_text(text_original: dict[str, torch.Tensor]):
    """A whole file: a tiny U-Net and VAE as we write them, and the given OpenCLIP text tower."""
    (unet_sd, vae_sd, text_sd), configs = tiny_sd("sd1_one_per_level")
    ours = diffusers_to_original(unet_sd, vae_sd, text_sd, *configs, "clip")
    return {**{k: v for k, v in ours.items() if not k.startswith(CLIP)}, **text_original}, (unet_sd, vae_sd), configs


def test_openclip_import_computes_what_openclip_computes():
    tower, text_original = openclip_original(layers=3)
    original, (unet_sd, vae_sd), (unet_cfg, vae_cfg) = with_openclip_text(text_original)
    text_sd = original_to_diffusers(original, unet_cfg, vae_cfg, "openclip")["text_encoder"]

    clip = tiny_clip(layers=3)
    clip.load_state_dict(text_sd, strict=True)  # every parameter present, nothing extra
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = tower.double()(ids)
        actual = clip.double()(ids).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)

    theirs = diffusers_sf.convert_open_clip_checkpoint(clip, text_original)
    assert_same(text_sd, {k.removeprefix("text_model."): v for k, v in theirs.items()})

    written = diffusers_to_original(unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg, "openclip")
    head = {OPENCLIP + "text_projection", OPENCLIP + "logit_scale"}
    assert_same(
        {k: v for k, v in written.items() if k.startswith(OPENCLIP)},
        {k: v for k, v in text_original.items() if k not in head},
    )


def test_openclip_extra_layer_is_dropped_only_for_a_shallower_target():
    _, text_original = openclip_original(layers=3)
    original, (unet_sd, vae_sd), (unet_cfg, vae_cfg) = with_openclip_text(text_original)
    three = original_to_diffusers(original, unet_cfg, vae_cfg, "openclip", text_layers=3)["text_encoder"]
    two = original_to_diffusers(original, unet_cfg, vae_cfg, "openclip", text_layers=2)["text_encoder"]
    assert_same(two, {k: v for k, v in three.items() if not k.startswith("encoder.layers.2.")})
    tiny_clip(layers=2).load_state_dict(two, strict=True)
    written = diffusers_to_original(unet_sd, vae_sd, two, unet_cfg, vae_cfg, "openclip")
    assert OPENCLIP + "transformer.resblocks.1.attn.in_proj_weight" in written
    assert not any(k.startswith(OPENCLIP + "transformer.resblocks.2.") for k in written)
    with pytest.raises(CheckpointError, match="has 3 layers but the config expects 4"):
        original_to_diffusers(original, unet_cfg, vae_cfg, "openclip", text_layers=4)


def sd1_file():
    (unet_sd, vae_sd, text_sd), configs = tiny_sd("sd1_two_per_level")
    return diffusers_to_original(unet_sd, vae_sd, text_sd, *configs, "clip"), (unet_sd, vae_sd, text_sd), configs


def test_import_ignores_what_is_not_a_model_and_reads_old_clip_names():
    original, (unet_sd, vae_sd, text_sd), (unet_cfg, vae_cfg) = sd1_file()
    # some older files have no `text_model.` level
    old_clip = {CLIP + k.removeprefix(CLIP + "text_model."): v for k, v in original.items() if k.startswith(CLIP)}
    extra = {
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(1),
        "alphas_cumprod": torch.ones(1000),
        "betas": torch.ones(1000),
        VAE + "loss.logvar": torch.zeros(()),
        CLIP + "embeddings.position_ids": torch.arange(16.0)[None],
    }
    messy = {**{k: v for k, v in original.items() if not k.startswith(CLIP)}, **old_clip, **extra}
    back = original_to_diffusers(messy, unet_cfg, vae_cfg, "clip")
    assert_same(back["unet"], unet_sd)
    assert_same(back["vae"], vae_sd)
    assert_same(back["text_encoder"], text_sd)


def test_missing_and_undescribed_keys_are_named():
    original, (unet_sd, vae_sd, text_sd), (unet_cfg, vae_cfg) = sd1_file()
    needed = ("input_blocks.2.1.norm.weight", "input_blocks.4.0.skip_connection.weight", "output_blocks.0.0.skip_connection.bias")
    for key in (*(UNET + k for k in needed), VAE + "decoder.up.0.block.0.nin_shortcut.bias"):
        assert key in original
        broken = {k: v for k, v in original.items() if k != key}
        with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
            original_to_diffusers(broken, unet_cfg, vae_cfg, "clip")
    # a config with one resnet per level does not describe a file with two
    with pytest.raises(CheckpointError, match=r"does not describe model\.diffusion_model\.input_blocks\.2\.0\."):
        original_to_diffusers(original, {**unet_cfg, "layers_per_block": 1}, vae_cfg, "clip")
    with pytest.raises(CheckpointError, match=r"text_kind='clip'"):
        original_to_diffusers(original, unet_cfg, vae_cfg, "openclip")
    unet_sd = {k: v for k, v in unet_sd.items() if k != "down_blocks.0.resnets.1.conv2.weight"}
    with pytest.raises(CheckpointError, match=r"diffusers U-Net state dict lacks down_blocks\.0\.resnets\.1\.conv2\.weight"):
        diffusers_to_original(unet_sd, vae_sd, text_sd, unet_cfg, vae_cfg, "clip")


def family_file(context_dim: int, in_channels: int = 4, text: str = CLIP, linear: bool = False) -> dict:
    """The few entries detect_family reads, with real SD key names and small shapes."""
    first = UNET + "input_blocks.1.1."
    return {
        UNET + "input_blocks.0.0.weight": torch.zeros(8, in_channels, 3, 3),
        first + "proj_in.weight": torch.zeros(8, 8) if linear else torch.zeros(8, 8, 1, 1),
        first + "transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, context_dim),
        text + "ln_final.weight": torch.zeros(8),
    }


def test_detect_family():
    sd1 = detect_family(family_file(768))
    assert sd1 == {
        "family": "sd1",
        "text_kind": "clip",
        "cross_attention_dim": 768,
        "in_channels": 4,
        "inpainting": False,
        "use_linear_projection": False,
        "prediction_type": None,
    }
    sd2 = detect_family(family_file(1024, text=OPENCLIP, linear=True))
    assert (sd2["family"], sd2["text_kind"], sd2["use_linear_projection"]) == ("sd2", "openclip", True)
    inpainting = detect_family(family_file(1024, in_channels=9, text=OPENCLIP, linear=True))
    assert (inpainting["family"], inpainting["inpainting"], inpainting["in_channels"]) == ("sd2", True, 9)
    no_text = detect_family({k: v for k, v in family_file(768).items() if not k.startswith(CLIP)})
    assert (no_text["family"], no_text["text_kind"]) == ("sd1", None)


def test_detect_family_refuses_other_families():
    # SD files with a stray SDXL part go to SDXL detection, which finds no whole SDXL model in them
    sdxl_text = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(8)}
    sdxl_unet = {UNET + "label_emb.0.0.weight": torch.zeros(8, 8)}
    for extra in (sdxl_text, sdxl_unet):
        with pytest.raises(CheckpointError, match="SDXL"):
            detect_family({**family_file(1024, text=OPENCLIP), **extra})
    with pytest.raises(CheckpointError, match="context width 512 matches neither"):
        detect_family(family_file(512))
    with pytest.raises(CheckpointError, match="sd2.*text encoder is clip"):
        detect_family(family_file(1024, text=CLIP))


def test_detect_family_says_what_a_wrong_file_is():
    lora = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
    }
    with pytest.raises(CheckpointError, match="LoRA file.*adapter"):
        detect_family(lora)
    with pytest.raises(CheckpointError, match="diffusers-layout"):
        detect_family(random_weights(tiny_unet(layers_per_block=1), 0))
    with pytest.raises(CheckpointError, match="not a Stable Diffusion checkpoint"):
        detect_family({"weight": torch.zeros(1)})
