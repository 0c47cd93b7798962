"""generate() against diffusers' own pipelines on the same tiny components, seed and settings."""
import numpy as np
import pytest
import torch
from conftest import randomize_, rel_err
from PIL import Image

from ldmcore.checkpoints import Components
from ldmcore.pipeline import generate
from ldmcore.text import build_word_tokenizer

WORDS = "a red green blue circle square on white black background".split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = build_word_tokenizer(WORDS)
    parts = Components.from_preset("tiny", tok, seed=0)
    for i, model in enumerate((parts.denoiser, parts.vae)):
        randomize_(model, seed=i, std=0.05)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    parts.save_pretrained(folder)
    return parts, folder


def diffusers_pipe(folder, scheduler_cls, img2img=False, **scheduler_kwargs):
    import diffusers

    cls = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, scheduler_cls).from_config(pipe.scheduler.config, **scheduler_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


@pytest.mark.parametrize("sampler", sorted(CASES))
def test_text_to_image_matches_diffusers(tiny, sampler):
    parts, folder = tiny
    scheduler_cls, kwargs = CASES[sampler]
    pipe = diffusers_pipe(folder, scheduler_cls, **kwargs)
    prompt, negative = "a red circle on a white background", "blue square"
    expected = pipe(
        prompt, negative_prompt=negative, num_inference_steps=12, guidance_scale=5.0,
        generator=torch.Generator().manual_seed(7), output_type="latent",
    ).images
    ours = generate(
        parts, prompt, negative_prompt=negative, steps=12, guidance_scale=5.0, seed=7, sampler=sampler, output="latent"
    )
    assert ours.shape == expected.shape == (1, 4, 8, 8)
    assert rel_err(ours, expected) < 1e-5


def test_image_to_image_matches_diffusers(tiny):
    parts, folder = tiny
    pipe = diffusers_pipe(folder, "DDIMScheduler", img2img=True)
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    prompt = "a green square"
    expected = pipe(
        prompt, image=init, strength=0.6, num_inference_steps=10, guidance_scale=4.0,
        generator=torch.Generator().manual_seed(3), output_type="latent",
    ).images
    ours = generate(parts, prompt, init_image=init, strength=0.6, steps=10, guidance_scale=4.0, seed=3,
                    sampler="ddim", output="latent")
    assert rel_err(ours, expected) < 1e-5


def test_images_are_returned_and_seeded(tiny):
    parts, _ = tiny
    a = generate(parts, ["a red circle", "a blue square"], steps=4, seed=1)
    b = generate(parts, ["a red circle", "a blue square"], steps=4, seed=1)
    c = generate(parts, ["a red circle", "a blue square"], steps=4, seed=2)
    assert [im.size for im in a] == [(32, 32), (32, 32)]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))


def test_bad_arguments_are_named(tiny):
    parts, _ = tiny
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        generate(parts, "a", sampler="heun")
    with pytest.raises(ValueError, match="multiples of 4"):
        generate(parts, "a", height=30)
