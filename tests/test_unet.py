"""ldmcore.UNet against diffusers' UNet2DConditionModel on the same random weights (float32, 1e-5 relative)."""
import pytest
import torch
from conftest import randomize_, rel_err
from diffusers import UNet2DConditionModel

from ldmcore.presets import PRESETS
from ldmcore.unet import UNet
from ldmcore.weights import CheckpointError

SD1_LIKE = dict(
    sample_size=16,
    block_out_channels=[32, 64],
    layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
SD2_LIKE = dict(  # linear projection, per-level heads, upcast attention, per-level transformer depth
    SD1_LIKE,
    block_out_channels=[32, 64, 64],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=[2, 4, 4],
    transformer_layers_per_block=[1, 2, 1],
    use_linear_projection=True,
    upcast_attention=True,
    layers_per_block=1,
)
INPAINT_LIKE = dict(SD1_LIKE, in_channels=9)
CONFIGS = {"sd1": SD1_LIKE, "sd2": SD2_LIKE, "inpaint": INPAINT_LIKE}


def pair(cfg):
    ref = randomize_(UNet2DConditionModel(**cfg)).eval()
    ours = UNet.from_config(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(cfg, b=2, h=16, w=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.get("in_channels", 4), h, w, generator=g)
    ctx = torch.randn(b, 9, cfg["cross_attention_dim"], generator=g)
    return x, torch.tensor([7, 813][:b]), ctx


@pytest.mark.parametrize("name", ["sd15", "sd21", "sd21-base"])
def test_real_family_state_dict_matches_diffusers(name):
    # Full-size architectures on the meta device: keys and shapes only, no memory.
    cfg = PRESETS[name].denoiser
    with torch.device("meta"):
        ref = UNet2DConditionModel(**cfg).state_dict()
        ours = UNet.from_config(dict(cfg)).state_dict()
    assert list(ours) == list(ref)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_weights_load_both_ways(name):
    ref = randomize_(UNet2DConditionModel(**CONFIGS[name]))
    ours = randomize_(UNet.from_config(dict(ref.config)), seed=5)
    ref.load_state_dict(ours.state_dict(), strict=True)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_diffusers(name):
    cfg = CONFIGS[name]
    ref, ours = pair(cfg)
    x, t, ctx = inputs(cfg)
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        assert rel_err(ours(x, t, ctx), expected) < 1e-5
        # a scalar timestep broadcasts over the batch
        assert rel_err(ours(x, 500, ctx), ref(x, 500, ctx).sample) < 1e-5


def test_odd_latent_size_matches_diffusers():
    ref, ours = pair(SD1_LIKE)
    x, t, ctx = inputs(SD1_LIKE, b=1, h=13, w=11)
    with torch.no_grad():
        assert rel_err(ours(x, t, ctx), ref(x, t, ctx).sample) < 1e-5


def test_controlnet_residuals_match_diffusers():
    ref, ours = pair(SD1_LIKE)
    x, t, ctx = inputs(SD1_LIKE)
    with torch.no_grad():
        # skip shapes: the conv_in output, then one per resnet and per downsampler
        skips = []
        h = ours.conv_in(x)
        skips.append(h)
        for block in ours.down_blocks:
            h, s = block(h, ours.time_embedding(torch.zeros(2, 32)), ctx)
            skips.extend(s)
        g = torch.Generator().manual_seed(3)
        down = [torch.randn(s.shape, generator=g) for s in skips]
        mid = torch.randn(h.shape, generator=g)
        expected = ref(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        got = ours(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        assert rel_err(got, expected) < 1e-5
        assert rel_err(got, ours(x, t, ctx)) > 1e-3  # the residuals really change the output
        with pytest.raises(ValueError, match="down_block_additional_residuals"):
            ours(x, t, ctx, down_block_additional_residuals=down[:-1])


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = SD2_LIKE
    _, ours = pair(cfg)
    x, t, ctx = inputs(cfg)
    ours.train()

    def grads():
        ours.zero_grad()
        ours(x, t, ctx).square().mean().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters()}

    plain = grads()
    ours.set_gradient_checkpointing(True)
    checkpointed = grads()
    for n in plain:
        assert torch.allclose(plain[n], checkpointed[n], rtol=1e-5, atol=1e-7), n


def test_bfloat16_forward_keeps_dtype_and_stays_close():
    ref, ours = pair(SD2_LIKE)
    x, t, ctx = inputs(SD2_LIKE)
    with torch.no_grad():
        expected = ours(x, t, ctx)
        got = ours.to(torch.bfloat16)(x.bfloat16(), t, ctx.bfloat16())
    assert got.dtype == torch.bfloat16
    assert rel_err(got.float(), expected) < 0.1


def test_pretrained_folders_load_both_ways(tmp_path):
    ref, ours = pair(SD2_LIKE)
    x, t, ctx = inputs(SD2_LIKE)
    ref.save_pretrained(tmp_path / "diffusers")
    ours.save_pretrained(tmp_path / "ours")
    from_diffusers = UNet.from_pretrained(tmp_path / "diffusers")
    from_ours = UNet2DConditionModel.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        assert torch.equal(from_diffusers(x, t, ctx), ours(x, t, ctx))
        assert rel_err(from_ours(x, t, ctx).sample, expected) < 1e-5
    assert from_diffusers.config == ours.config


def test_unsupported_config_is_refused_by_key():
    with pytest.raises(CheckpointError, match="addition_embed_type"):
        UNet.from_config(dict(SD1_LIKE, addition_embed_type="text_time"))
    with pytest.raises(CheckpointError, match="attention heads"):
        UNet.from_config(dict(SD1_LIKE, attention_head_dim=[1, 2, 3]))


def test_wrong_checkpoints_get_explanations(tmp_path):
    from ldmcore.weights import load_strict

    ours = UNet.from_config(dict(SD1_LIKE))
    sd = ours.state_dict()
    sdxl_like = {**sd, "add_embedding.linear_1.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="SDXL"):
        load_strict(ours, sdxl_like, "model.safetensors")
    inpaint = UNet.from_config(dict(INPAINT_LIKE)).state_dict()
    with pytest.raises(CheckpointError, match="conv_in.weight.*in_channels=9"):
        load_strict(ours, inpaint, "model.safetensors")
    missing = {k: v for k, v in sd.items() if not k.startswith("mid_block")}
    with pytest.raises(CheckpointError, match=r"missing \d+ keys: mid_block"):
        load_strict(ours, missing, "model.safetensors")


class NotWeights:
    """Stands for arbitrary pickled objects, which a weights file must never be allowed to run."""


def test_unsafe_pickle_is_refused(tmp_path):
    from ldmcore.weights import read_state_dict

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": NotWeights()}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        read_state_dict(path)
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, path)
    assert torch.equal(read_state_dict(path)["w"], torch.ones(2))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_state_dict(tmp_path / "empty.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_state_dict(tmp_path / "bad.safetensors")
