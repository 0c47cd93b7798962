"""ldmcore.vae.AutoencoderKL against diffusers' AutoencoderKL built from the same tiny config and weights:
state dict, posterior, sampling, decoding, both folder formats, checkpoint errors, bf16, checkpointing."""
from __future__ import annotations

import inspect
import json
import shutil
import warnings

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from ldmcore.unet import UNet, UNetConfig
from ldmcore.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian
from ldmcore.weights import CheckpointError, load_strict

TINY = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
TOL = 1e-5  # max abs error relative to the reference's max abs value


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every tensor ~ N(0, 0.1), norm gains ~ N(1, 0.1): no zero-initialised layer hides a mismatch."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t.normal_(0.0, 0.1, generator=g)
            if name.endswith("weight") and t.ndim == 1:
                t.add_(1.0)
    return model


def tiny(**overrides) -> AutoencoderKL:
    return randomise(AutoencoderKL(AutoencoderKLConfig(**{**TINY, **overrides}))).eval()


def diffusers_kwargs(config: AutoencoderKLConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "_class_name"}


def diffusers_twin(model: AutoencoderKL) -> DiffusersAutoencoderKL:
    ref = DiffusersAutoencoderKL(**diffusers_kwargs(model.config))
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref.eval()


@pytest.fixture(scope="module")
def pair() -> tuple[AutoencoderKL, DiffusersAutoencoderKL]:
    model = tiny()
    return model, diffusers_twin(model)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize(
    "overrides", [{}, {"mid_block_add_attention": False}, {"use_quant_conv": False, "use_post_quant_conv": False}]
)
def test_state_dict_matches_diffusers_and_loads_both_ways(overrides):
    ours = tiny(**overrides)
    ref = DiffusersAutoencoderKL(**diffusers_kwargs(ours.config))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    has_attention = overrides.get("mid_block_add_attention", True)
    assert ("decoder.mid_block.attentions.0.to_out.0.bias" in ours_shapes) == has_attention

    ref.load_state_dict(ours.state_dict(), strict=True)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in ref.state_dict().items())
    back = AutoencoderKL(ours.config)
    load_strict(back, randomise(ref, seed=5).state_dict(), "diffusers AutoencoderKL")
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in back.state_dict().items())


@torch.no_grad()
def test_posterior_matches_diffusers(pair, images):
    ours, ref = pair
    posterior, ref_posterior = ours.encode(images), ref.encode(images).latent_dist
    assert posterior.mean.shape == (2, 4, 16, 16)
    assert ref_posterior.std.std() > 0.05  # a non-trivial posterior: the weights really are random
    for name in ("mean", "std", "var", "logvar"):
        assert rel_err(getattr(posterior, name), getattr(ref_posterior, name)) < TOL, name
    assert torch.equal(posterior.mode(), posterior.mean)
    assert rel_err(posterior.kl(), ref_posterior.kl()) < TOL
    assert posterior.kl().shape == (2,)
    z = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
    assert rel_err(posterior.nll(z), ref_posterior.nll(z)) < TOL


@torch.no_grad()
def test_sample_with_generator_matches_diffusers(pair, images):
    ours, ref = pair
    posterior, ref_posterior = ours.encode(images), ref.encode(images).latent_dist
    sample = posterior.sample(torch.Generator().manual_seed(7))
    assert rel_err(sample, ref_posterior.sample(torch.Generator().manual_seed(7))) < TOL
    assert rel_err(sample, posterior.sample(torch.Generator().manual_seed(8))) > 0.01
    assert rel_err(sample, posterior.mean) > 0.01


@torch.no_grad()
def test_decode_and_forward_match_diffusers(pair, images, latents):
    ours, ref = pair
    image = ours.decode(latents)
    assert image.shape == (2, 3, 32, 32)
    assert rel_err(image, ref.decode(latents).sample) < TOL
    reconstruction, posterior = ours(images)
    assert rel_err(reconstruction, ref(images).sample) < TOL
    sampled, _ = ours(images, sample_posterior=True, generator=torch.Generator().manual_seed(4))
    ref_sampled = ref(images, sample_posterior=True, generator=torch.Generator().manual_seed(4)).sample
    assert rel_err(sampled, ref_sampled) < TOL
    assert rel_err(sampled, reconstruction) > 1e-3


@torch.no_grad()
def test_from_mean_std_rebuilds_the_posterior(pair, images):
    posterior = pair[0].encode(images)
    rebuilt = DiagonalGaussian.from_mean_std(posterior.mean, posterior.std)
    assert torch.equal(rebuilt.std, posterior.std)
    assert (rebuilt.logvar - posterior.logvar).abs().max() < 1e-5
    assert rel_err(rebuilt.var, posterior.var) < 1e-5
    assert rel_err(rebuilt.kl(), posterior.kl()) < 1e-5

    def g() -> torch.Generator:
        return torch.Generator().manual_seed(11)

    assert torch.equal(rebuilt.sample(g()), posterior.sample(g()))

    # the data cache stores fp16 and rebuilds later: samples stay in fp16 and within its rounding
    cached = DiagonalGaussian.from_mean_std(posterior.mean.half(), posterior.std.half())
    sample = cached.sample(g())
    assert sample.dtype == torch.float16
    assert rel_err(sample.float(), posterior.sample(g())) < 2e-3


def test_extreme_log_variances_are_clamped_like_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0)) * 40  # logvar well past [-30, 20]
    ours, ref = DiagonalGaussian.from_moments(moments), DiagonalGaussianDistribution(moments)
    assert ours.logvar.min() == -30.0 and ours.logvar.max() == 20.0
    for name in ("logvar", "std", "var"):
        assert rel_err(getattr(ours, name), getattr(ref, name)) < TOL, name
    assert rel_err(ours.kl(), ref.kl()) < TOL
    collapsed = DiagonalGaussian.from_mean_std(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2))
    assert collapsed.logvar.min() == -30.0 and torch.isfinite(collapsed.kl()).all()


def test_scale_and_unscale_read_the_config():
    default = inspect.signature(DiffusersAutoencoderKL.__init__).parameters["scaling_factor"].default
    assert AutoencoderKLConfig().scaling_factor == default

    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    vae = AutoencoderKL(AutoencoderKLConfig(**TINY, scaling_factor=0.5))
    assert torch.equal(vae.scale(z), z * 0.5)
    assert torch.equal(vae.unscale(z), z / 0.5)
    shifted = AutoencoderKL(AutoencoderKLConfig(**TINY, scaling_factor=1.5, shift_factor=0.25))
    assert torch.allclose(shifted.scale(z), (z - 0.25) * 1.5)
    assert torch.allclose(shifted.unscale(shifted.scale(z)), z, atol=1e-6)


def test_save_pretrained_round_trip_and_diffusers_reads_it(pair, latents, tmp_path):
    ours, _ = pair
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    loaded = AutoencoderKL.from_pretrained(tmp_path)
    assert loaded.config == ours.config
    assert loaded.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in loaded.state_dict().items())
    with torch.no_grad():
        image = ours.decode(latents)
        assert torch.equal(loaded.decode(latents), image)
        ref = DiffusersAutoencoderKL.from_pretrained(tmp_path).eval()
        assert rel_err(ref.decode(latents).sample, image) < TOL


def test_from_pretrained_reads_a_diffusers_folder(pair, images, tmp_path):
    _, ref = pair
    ref.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key diffusers writes is understood
        ours = AutoencoderKL.from_pretrained(tmp_path)
    with torch.no_grad():
        assert rel_err(ours.encode(images).mean, ref.encode(images).latent_dist.mean) < TOL


def test_unet_weights_are_refused_naming_keys(tmp_path):
    unet_cfg = UNetConfig(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=2,
    )
    UNet(unet_cfg).save_pretrained(tmp_path)
    tiny().save_pretrained(tmp_path / "vae")
    shutil.copy(tmp_path / "vae" / "config.json", tmp_path / "config.json")
    names_keys = r"missing \d+ keys: decoder\.conv_in\.bias.*unexpected \d+ keys: conv_in"
    with pytest.raises(CheckpointError, match=names_keys):
        AutoencoderKL.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change, key",
    [({"latent_channels": 8}, "encoder.conv_out.weight"), ({"block_out_channels": [32, 96]}, "encoder.down_blocks.1")],
)
def test_wrong_channels_are_refused_naming_the_key(tmp_path, change, key):
    tiny().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=r"wrong shape, first " + key.replace(".", r"\.")):
        AutoencoderKL.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"act_fn": "gelu"}, "act_fn"),
        ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "down_block_types"),
        ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types"),
        ({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}, "latents_mean"),
    ],
)
def test_unsupported_configs_are_refused_naming_the_key(change, key):
    with pytest.raises(CheckpointError, match=key):
        AutoencoderKLConfig.from_dict({**TINY, **change})


@torch.no_grad()
def test_bfloat16_runs_in_the_input_dtype(pair, images):
    ours = pair[0]
    bf16 = AutoencoderKL(ours.config).eval()
    bf16.load_state_dict(ours.state_dict())
    bf16.to(torch.bfloat16)
    posterior = bf16.encode(images.bfloat16())
    image = bf16.decode(posterior.mean)
    assert posterior.mean.dtype == posterior.std.dtype == image.dtype == torch.bfloat16
    assert torch.isfinite(image).all()
    reference = ours.decode(ours.encode(images).mean)
    assert rel_err(image.float(), reference) < 0.1  # bf16 rounding, not a different network


def test_gradient_checkpointing_keeps_gradients_and_saves_memory(images):
    model = tiny().train()

    def grads_and_saved() -> tuple[dict[str, torch.Tensor], int]:
        model.zero_grad()
        saved = 0

        def pack(t):
            nonlocal saved
            saved += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            reconstruction, posterior = model(images, sample_posterior=True, generator=torch.Generator().manual_seed(0))
            loss = (reconstruction - images).square().mean() + 1e-3 * posterior.kl().mean()
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}, saved

    plain, saved_plain = grads_and_saved()
    model.set_gradient_checkpointing(True)
    checkpointed, saved_checkpointed = grads_and_saved()
    assert saved_checkpointed < saved_plain / 2
    assert max(rel_err(checkpointed[k], plain[k]) for k in plain) < 1e-5
