"""The Flux.1 transformer against diffusers' FluxTransformer2DModel on the same random weights, called the way
FluxPipeline calls it (packed latents, position ids, sigma timesteps, guidance): float32 outputs within 1e-5,
key names, order and shapes at tiny and full size, gradient checkpointing, and folders both ways."""
import pytest
import torch
from conftest import randomize_
from diffusers import FluxPipeline, FluxTransformer2DModel

from ldmcore.flux import (
    FluxTransformer,
    FluxTransformerConfig,
    image_ids,
    pack_latents,
    unpack_latents,
)

TINY = {
    "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
    "joint_attention_dim": 24, "pooled_projection_dim": 20, "axes_dims_rope": (4, 6, 6), "in_channels": 64,
}
VARIANTS = {"schnell": dict(TINY), "dev": dict(TINY, guidance_embeds=True)}


def pair(cfg):
    ref = randomize_(FluxTransformer2DModel(**cfg)).eval()
    ours = FluxTransformer.from_config(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(cfg, b=2, h=6, w=8, n_txt=7, seed=1, dtype=torch.float32):
    """Latents (b, 16, h, w), per-sample sigmas, T5-like and pooled embeddings, guidance when the model takes it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg["in_channels"] // 4, h, w, generator=g)
    sigma = torch.tensor([0.13, 0.87])[:b]
    ctx = torch.randn(b, n_txt, cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(b, cfg["pooled_projection_dim"], generator=g)
    guidance = torch.tensor([3.5, 1.0])[:b] if cfg.get("guidance_embeds") else None
    return tuple(t if t is None else t.to(dtype) for t in (x, sigma, ctx, pooled, guidance))


def diffusers_velocity(ref, x, sigma, ctx, pooled, guidance):
    """FluxPipeline's call: pack, ids on the packed grid, text ids zero, unpack with the VAE's factor 8."""
    b, c, h, w = x.shape
    packed = FluxPipeline._pack_latents(x, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    txt_ids = torch.zeros(ctx.shape[1], 3, dtype=x.dtype)
    out = ref(
        hidden_states=packed, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=sigma,
        img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)


def test_packing_matches_flux_pipeline():
    x = torch.randn(2, 16, 6, 8)
    packed = FluxPipeline._pack_latents(x, 2, 16, 6, 8)
    assert torch.equal(pack_latents(x), packed)
    assert torch.equal(unpack_latents(packed, 6, 8), x)
    assert torch.equal(image_ids(6, 8), FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_tiny_flux_matches_diffusers(name):
    cfg = VARIANTS[name]
    ref, ours = pair(cfg)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    args = inputs(cfg)
    with torch.no_grad():
        expected = diffusers_velocity(ref, *args)
        got = ours(*args)
        assert got.shape == args[0].shape
        assert (got - expected).abs().max().item() < 1e-5
        # each sample's own sigma matters: swapping them changes the prediction
        x, sigma, *rest = args
        assert (ours(x, sigma.flip(0), *rest) - got).abs().max().item() > 1e-3


def test_bf16_matches_diffusers():
    cfg = VARIANTS["dev"]
    ref, ours = pair(cfg)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    args = inputs(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        expected, got = diffusers_velocity(ref, *args), ours(*args)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)


def test_guidance_required_exactly_for_dev():
    x, sigma, ctx, pooled, _ = inputs(VARIANTS["dev"])
    dev = FluxTransformer.from_config(VARIANTS["dev"])
    with pytest.raises(ValueError, match="FLUX.1-dev"):
        dev(x, sigma, ctx, pooled)
    schnell = FluxTransformer.from_config(VARIANTS["schnell"])
    with pytest.raises(ValueError, match="schnell"):
        schnell(x, sigma, ctx, pooled, guidance=torch.tensor([3.5, 3.5]))
    with pytest.raises(ValueError, match="even h and w"):
        schnell(x[..., :5], sigma, ctx, pooled)


def test_gradient_checkpointing_same_output_and_gradients():
    cfg = VARIANTS["dev"]
    _, ours = pair(cfg)
    ours.train()
    args = inputs(cfg)
    weights = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(5))

    def run():
        ours.zero_grad()
        out = ours(*args)
        (out * weights).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in ours.named_parameters()}

    plain_out, plain_grads = run()
    ours.set_gradient_checkpointing(True)
    ckpt_out, ckpt_grads = run()
    assert (ckpt_out - plain_out).abs().max().item() < 1e-6
    assert max((ckpt_grads[n] - g).abs().max().item() for n, g in plain_grads.items()) < 1e-6
    assert all(g.abs().sum() > 0 for g in plain_grads.values())


def test_folders_load_both_ways(tmp_path):
    ref, ours = pair(VARIANTS["dev"])
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "diffusers")
    from_ours = FluxTransformer2DModel.from_pretrained(tmp_path / "ours")
    from_diffusers = FluxTransformer.from_pretrained(tmp_path / "diffusers")
    assert from_diffusers.config == ours.config
    assert dict(from_ours.config)["guidance_embeds"] is True
    assert tuple(from_ours.config["axes_dims_rope"]) == (4, 6, 6)
    for loaded in (from_ours.state_dict(), from_diffusers.state_dict()):
        assert list(loaded) == list(ref.state_dict())
        assert all(torch.equal(loaded[k], v) for k, v in ref.state_dict().items())


def test_full_size_dev_keys_and_shapes_match_diffusers():
    cfg = {"guidance_embeds": True}  # FLUX.1-dev: diffusers' defaults plus the guidance embedding
    with torch.device("meta"):
        ref = FluxTransformer2DModel(**cfg).state_dict()
        ours = FluxTransformer.from_config(cfg).state_dict()
    assert list(ours) == list(ref)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    assert ours["single_transformer_blocks.37.proj_out.weight"].shape == (3072, 15360)


def test_config_refuses_what_it_cannot_build():
    from ldmcore.weights import CheckpointError

    with pytest.raises(CheckpointError, match="patch_size"):
        FluxTransformerConfig(patch_size=2)
    with pytest.raises(CheckpointError, match="axes_dims_rope"):
        FluxTransformerConfig(attention_head_dim=64)
    assert FluxTransformerConfig().latent_channels == 16
