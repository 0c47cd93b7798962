"""Flux generation against diffusers' Flux pipelines on the same tiny Flux-shaped components, seed and
settings: the text conditioning, text to image (dev with its embedded guidance, schnell), image to
image, and the flow-matching grid against FlowMatchEulerDiscreteScheduler."""
import numpy as np
import pytest
import torch
from conftest import randomize_, rel_err
from PIL import Image

from ldmcore.checkpoints import Components, load_components
from ldmcore.flow import FlowMatchSchedule
from ldmcore.pipeline import EncodedPrompts, generate
from ldmcore.presets import get_preset
from ldmcore.text import build_word_tokenizer

WORDS = "a red green blue circle square on white black background".split()


def tiny_parts(preset: str = "tiny-flux") -> Components:
    parts = Components.from_preset(preset, build_word_tokenizer(WORDS), seed=0)
    randomize_(parts.denoiser, seed=0, std=0.05)
    randomize_(parts.vae, seed=1, std=0.05)
    return parts


@pytest.fixture(scope="module", params=["tiny-flux", "tiny-flux-schnell"])
def base(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "model"
    tiny_parts(request.param).save_pretrained(folder)
    return load_components(folder), folder  # as a user would: from the folder


def diffusers_pipe(folder, cls: str = "FluxPipeline"):
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unpacked(pipe, latents: torch.Tensor, side: int) -> torch.Tensor:
    """diffusers' packed output latents (b, tokens, 64) -> (b, 16, h, w)."""
    return pipe._unpack_latents(latents, side, side, pipe.vae_scale_factor)


def test_the_family_and_objective_come_from_the_folder(base):
    parts, folder = base
    dev = parts.denoiser.config.guidance_embeds
    assert parts.family.name == ("flux-dev" if dev else "flux-schnell")
    assert isinstance(parts.schedule, FlowMatchSchedule) and parts.schedule.use_dynamic_shifting == dev
    assert parts.vae.config.latent_channels == 16 and parts.vae.config.shift_factor == pytest.approx(0.1159)


def test_prompt_encoding_matches_diffusers(base):
    parts, folder = base
    pipe = diffusers_pipe(folder)
    prompts = ["a red circle on a white background", ""]
    length = parts.family.max_sequence_length
    hidden, pooled, _ = pipe.encode_prompt(prompts, prompt_2=prompts, max_sequence_length=length)
    ours = parts.prompt_encoder()(prompts)
    assert ours["hidden"].shape == (2, length, 32) and ours["pooled"].shape == (2, 32)
    assert rel_err(ours["hidden"], hidden) < 1e-6 and rel_err(ours["pooled"], pooled) < 1e-6


@pytest.mark.parametrize("steps,side", [(6, 32), (4, 48)])
def test_the_sampling_grid_is_the_schedulers(steps, side):
    """linspace(1, 1/steps), shifted by resolution (dev) or not (schnell), then 0: as FluxPipeline sets it."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for preset in ("flux-dev", "flux-schnell"):
        config = get_preset(preset).scheduler
        ours = FlowMatchSchedule.from_config(config)
        theirs = FlowMatchEulerDiscreteScheduler.from_config(config)
        tokens = (side // 2) ** 2
        theirs.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(tokens))
        grid = ours.grid(steps, latent_shape=(1, 16, side, side))
        assert torch.allclose(grid, theirs.sigmas.double(), atol=1e-6), preset
        assert grid[0] == pytest.approx(1.0) and grid[-1] == 0


@pytest.mark.parametrize("guidance", [3.5, 1.0])
def test_text_to_image_matches_diffusers(base, guidance):
    parts, folder = base
    pipe = diffusers_pipe(folder)
    prompts = ["a red circle on a white background", "blue square"]
    length = parts.family.max_sequence_length
    expected = pipe(prompts, num_inference_steps=5, guidance_scale=guidance, height=32, width=32,
                    max_sequence_length=length, generator=torch.Generator().manual_seed(7), output_type="latent").images
    ours = generate(parts, prompts, steps=5, guidance_scale=guidance, seed=7, height=32, width=32, output="latent")
    assert rel_err(ours, unpacked(pipe, expected, 32)) < 1e-5
    if parts.family.guidance_embeds:  # dev reads the guidance value; schnell has no such input
        other = generate(parts, prompts, steps=5, guidance_scale=guidance + 2, seed=7, height=32, width=32,
                         output="latent")
        assert rel_err(other, ours) > 1e-4


def test_images_match_diffusers(base):
    parts, folder = base
    pipe = diffusers_pipe(folder)
    expected = pipe("a green square", num_inference_steps=3, height=32, width=32, output_type="np",
                    max_sequence_length=parts.family.max_sequence_length,
                    generator=torch.Generator().manual_seed(3)).images[0]
    ours = np.asarray(generate(parts, "a green square", steps=3, seed=3, height=32, width=32, guidance_scale=3.5)[0])
    assert np.abs(ours.astype(np.float64) - expected * 255).max() <= 1.0  # 8-bit rounding


@pytest.mark.parametrize("steps,strength", [(6, 0.5), (7, 0.5), (5, 0.9)])
def test_image_to_image_matches_diffusers(base, steps, strength):
    """Flux's img2img skips int(steps - steps * strength) steps (SD's pipelines round the other way:
    (7, 0.5) tells them apart)."""
    parts, folder = base
    pipe = diffusers_pipe(folder, "FluxImg2ImgPipeline")
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    prompt = "a blue circle on a black background"
    expected = pipe(prompt, image=picture, strength=strength, num_inference_steps=steps, guidance_scale=3.5, height=32,
                    width=32, max_sequence_length=parts.family.max_sequence_length,
                    generator=torch.Generator().manual_seed(11), output_type="latent").images
    ours = generate(parts, prompt, init_image=picture, strength=strength, steps=steps, guidance_scale=3.5, seed=11,
                    output="latent")
    assert rel_err(ours, unpacked(pipe, expected, 32)) < 1e-5


def test_flux_refuses_what_does_not_fit(base):
    parts, _ = base
    with pytest.raises(ValueError, match="does not fit"):
        generate(parts, "a red circle", sampler="dpmpp_2m", steps=2)
    with pytest.raises(ValueError, match="multiples of 8"):
        generate(parts, "a red circle", steps=2, height=36, width=32)
    with pytest.raises(ValueError, match="clip_skip"):
        generate(parts, "a red circle", steps=2, clip_skip=1)


def test_true_cfg_matches_diffusers(base):
    """Classifier-free guidance with a negative prompt on top of (or, for schnell, instead of) the embedded
    guidance, as FluxPipeline's true_cfg_scale."""
    parts, folder = base
    pipe = diffusers_pipe(folder)
    kw = dict(num_inference_steps=4, guidance_scale=3.5, height=32, width=32, output_type="latent",
              max_sequence_length=parts.family.max_sequence_length)
    expected = pipe("a red circle", negative_prompt="blue square", true_cfg_scale=4.0,
                    generator=torch.Generator().manual_seed(5), **kw).images
    ours = generate(parts, "a red circle", negative_prompt="blue square", true_cfg_scale=4.0, steps=4, seed=5,
                    guidance_scale=3.5, height=32, width=32, output="latent")
    assert rel_err(ours, unpacked(pipe, expected, 32)) < 1e-5
    plain = generate(parts, "a red circle", steps=4, seed=5, guidance_scale=3.5, height=32, width=32, output="latent")
    assert rel_err(plain, ours) > 1e-3


def test_prompts_encoded_beforehand_sample_without_the_text_encoders(base):
    """Training encodes its validation prompts before T5 and CLIP leave the device: sampling from those
    gives what the live encoders give, and the encoders are not called."""
    parts, _ = base
    prompts = ["a red circle", "a blue square on black"]
    options = dict(steps=2, height=32, width=32, true_cfg_scale=2.0, negative_prompt="", output="latent")
    live = generate(parts, prompts, **options)
    encoded = EncodedPrompts(parts.prompt_encoder(), [prompts, [""] * 2, [""]])

    def refuse(module, args):
        raise AssertionError("a text encoder was called")

    hooks = [m.register_forward_pre_hook(refuse) for m in parts.text_encoders.values()]
    try:
        assert torch.equal(generate(parts, prompts, prompt_encoder=encoded, **options), live)
        with pytest.raises(KeyError, match="a green circle"):
            generate(parts, ["a green circle"], prompt_encoder=encoded, **options)
    finally:
        for h in hooks:
            h.remove()
