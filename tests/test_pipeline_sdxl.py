"""SDXL generation against diffusers' SDXL pipelines on the same tiny SDXL-shaped components, seed and
settings: text to image, image to image, inpainting, ControlNet and the refiner."""
import numpy as np
import pytest
import torch
from conftest import randomize_, rel_err
from PIL import Image

from ldmcore.checkpoints import Components, load_components
from ldmcore.controlnet import ControlNet, generate_controlled
from ldmcore.inpaint import inpaint, widen_conv_in
from ldmcore.pipeline import generate
from ldmcore.text import build_word_tokenizer

WORDS = "a red green blue circle square on white black background".split()


def tiny_parts(preset: str = "tiny-sdxl", inpainting: bool = False) -> Components:
    parts = Components.from_preset(preset, build_word_tokenizer(WORDS), seed=0)
    if inpainting:
        widen_conv_in(parts.denoiser)
    randomize_(parts.denoiser, seed=0, std=0.05)
    randomize_(parts.vae, seed=1, std=0.05)
    return parts


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "model"
    tiny_parts().save_pretrained(folder)
    return load_components(folder), folder  # as a user would: from the folder


def diffusers_pipe(folder, cls: str = "StableDiffusionXLPipeline", scheduler: str = "EulerDiscreteScheduler", **extra):
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(folder, **extra)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise_picture(seed: int, side: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


CASES = {"euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


@pytest.mark.parametrize("sampler", sorted(CASES))
def test_text_to_image_matches_diffusers(base, sampler):
    parts, folder = base
    pipe = diffusers_pipe(folder, scheduler=CASES[sampler])
    prompt = "a red circle on a white background"
    kw = dict(num_inference_steps=8, guidance_scale=5.0, output_type="latent")
    # an explicit negative prompt is encoded; without one diffusers conditions the negative branch on zeros,
    # which our empty negative prompt does too
    for negative, ours_negative in (("blue square", "blue square"), (None, "")):
        expected = pipe(prompt, negative_prompt=negative, generator=torch.Generator().manual_seed(7), **kw).images
        ours = generate(parts, prompt, negative_prompt=ours_negative, steps=8, guidance_scale=5.0, seed=7,
                        sampler=sampler, output="latent")
        assert ours.shape == expected.shape == (1, 4, 8, 8)
        assert rel_err(ours, expected) < 1e-5, (sampler, negative)


def test_size_conditioning_reaches_the_unet(base):
    """Another asked size changes the micro-conditioning ids, and with them the picture: a model that
    ignored the ids would give identical latents at 32x32 and 32x48 in the shared region."""
    parts, folder = base
    pipe = diffusers_pipe(folder)
    expected = pipe("a green square", height=32, width=48, num_inference_steps=6, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(2), output_type="latent").images
    ours = generate(parts, "a green square", height=32, width=48, steps=6, guidance_scale=3.0, seed=2,
                    sampler="euler", output="latent")
    assert ours.shape == (1, 4, 8, 12) and rel_err(ours, expected) < 1e-5
    ids = parts.family.generation_ids(32, 48)
    assert ids.tolist() == [32, 48, 0, 0, 32, 48]


def test_image_to_image_matches_diffusers(base):
    parts, folder = base
    pipe = diffusers_pipe(folder, "StableDiffusionXLImg2ImgPipeline", "DDIMScheduler")
    init = noise_picture(0)
    expected = pipe("a green square", image=init, strength=0.6, num_inference_steps=10, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(3), output_type="latent").images
    ours = generate(parts, "a green square", init_image=init, strength=0.6, steps=10, guidance_scale=4.0, seed=3,
                    sampler="ddim", output="latent")
    assert rel_err(ours, expected) < 1e-5


def test_inpainting_matches_diffusers(tmp_path):
    import diffusers

    parts = tiny_parts(inpainting=True)
    parts.save_pretrained(tmp_path / "model")
    pipe = diffusers_pipe(tmp_path / "model", "StableDiffusionXLInpaintPipeline", "DDIMScheduler")
    image = noise_picture(1)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:20] = 255
    mask = Image.fromarray(mask)
    # diffusers samples the masked picture's posterior; ours takes its mean (see ldmcore.inpaint): hand
    # diffusers the mean, as the SD inpainting test does
    pixels = pipe.image_processor.preprocess(image, height=32, width=32)
    repaint = pipe.mask_processor.preprocess(mask, height=32, width=32)
    with torch.no_grad():
        masked = pipe.vae.encode(pixels * (repaint < 0.5)).latent_dist.mode() * pipe.vae.config.scaling_factor
    assert isinstance(pipe, diffusers.StableDiffusionXLInpaintPipeline)
    expected = pipe("a red circle", image=image, mask_image=mask, masked_image_latents=masked, strength=1.0,
                    num_inference_steps=8, guidance_scale=4.0, negative_prompt="blue square",
                    generator=torch.Generator().manual_seed(5), output_type="latent").images
    ours = inpaint(parts, "a red circle", image, mask, seed=5, steps=8, guidance_scale=4.0, strength=1.0,
                   negative_prompt="blue square", sampler="ddim", output="latent")
    assert ours.shape == expected.shape == (1, 4, 8, 8)
    assert rel_err(ours, expected) < 1e-5


def test_controlnet_generation_matches_diffusers(base, tmp_path):
    import diffusers

    parts, folder = base
    cn = randomize_(ControlNet.from_unet(parts.denoiser, conditioning_embedding_out_channels=(8, 16, 32)), seed=2, std=0.05)
    cn.save_pretrained(tmp_path / "controlnet")
    sdxl = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    pipe = diffusers.StableDiffusionXLControlNetPipeline(
        **{k: v for k, v in sdxl.components.items() if k not in ("image_encoder", "feature_extractor")},
        controlnet=diffusers.ControlNetModel.from_pretrained(tmp_path / "controlnet"),
    )
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    control = noise_picture(4)
    kw = dict(num_inference_steps=6, guidance_scale=4.0, controlnet_conditioning_scale=0.8, output_type="latent")
    expected = pipe("a red circle", image=control, generator=torch.Generator().manual_seed(5), **kw).images
    ours = generate_controlled(parts, cn, "a red circle", control, conditioning_scale=0.8, steps=6, guidance_scale=4.0,
                               seed=5, sampler="ddim", output="latent")
    plain = generate_controlled(parts, cn, "a red circle", control, conditioning_scale=0.0, steps=6,
                                guidance_scale=4.0, seed=5, sampler="ddim", output="latent")
    assert rel_err(ours, expected) < 1e-5
    assert rel_err(plain, expected) > 1e-3  # the control really steers the result


def test_the_refiner_loads_and_refines_as_diffusers_does(tmp_path):
    """The refiner: bigG only, aesthetic-score ids (6.0 / 2.5), img2img at a low strength."""
    parts = tiny_parts("tiny-sdxl-refiner")
    parts.save_pretrained(tmp_path / "refiner")
    refiner = load_components(tmp_path / "refiner")
    assert refiner.family.name == "sdxl-refiner" and refiner.text_encoder is None
    pipe = diffusers_pipe(tmp_path / "refiner", "StableDiffusionXLImg2ImgPipeline", "EulerDiscreteScheduler")
    assert pipe.config.requires_aesthetics_score
    init = noise_picture(6)
    expected = pipe("a blue circle", image=init, strength=0.3, num_inference_steps=10, guidance_scale=5.0,
                    negative_prompt="red", generator=torch.Generator().manual_seed(8), output_type="latent").images
    ours = generate(refiner, "a blue circle", init_image=init, strength=0.3, steps=10, guidance_scale=5.0, seed=8,
                    negative_prompt="red", sampler="euler", output="latent")
    assert rel_err(ours, expected) < 1e-5
    assert refiner.family.generation_ids(32, 32).tolist() == [32, 32, 0, 0, 6.0]
    assert refiner.family.generation_ids(32, 32, negative=True).tolist() == [32, 32, 0, 0, 2.5]
