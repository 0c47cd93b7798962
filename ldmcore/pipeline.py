"""Generation: prompt -> latents -> images, text-to-image and image-to-image.

One function does both: `init_image` with `strength` starts part-way down the noise grid from the
encoded picture instead of from pure noise. Sampling runs in float32 whatever the models' dtype.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .checkpoints import Components
from .family import cast_inputs
from .samplers import classifier_free_guidance, ddim, ddpm, dpmpp_2m, euler
from .text import pad_to_same_length

# name -> (sampler, the diffusers scheduler family whose step grid it uses)
SAMPLERS = {
    "ddpm": (ddpm, "ddpm"),
    "ddim": (ddim, "ddim"),
    "euler": (euler, "euler"),
    "dpmpp_2m": (dpmpp_2m, "dpm"),
}


def images_to_tensor(images: Sequence[Image.Image], device=None) -> torch.Tensor:
    """PIL images -> (b, 3, h, w) float32 in [-1, 1], the VAE's input range."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device)


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(b, 3, h, w) in [-1, 1] -> PIL images."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def _batch_ids(ids: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
    return None if ids is None else ids.to(device).expand(batch, -1)  # (n,) -> (b, n)


class EncodedPrompts:
    """A prompt encoder that answers from prompts encoded beforehand, for `generate(prompt_encoder=...)`:
    sampling then needs no text encoder on the device. Training encodes its validation prompts once,
    before the encoders leave the device (Flux's T5 alone is 9 GB in bf16), and samples with this.
    `batches`: the prompt lists generate will ask for, each encoded as one batch as generate would."""

    def __init__(self, encoder: Callable[[list[str]], dict], batches):
        with torch.no_grad():
            self.table = {tuple(b): encoder(list(b)) for b in batches}

    def __call__(self, prompts: Sequence[str]) -> dict:
        key = tuple(prompts)
        if key not in self.table:
            raise KeyError(f"the prompts {list(key)} were not encoded beforehand; encoded: {[list(k) for k in self.table]}")
        return dict(self.table[key])  # generate replaces entries of the dict it gets


@torch.no_grad()
def generate(
    components: Components,
    prompt: str | Sequence[str],
    *,
    negative_prompt: str | Sequence[str] = "",
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    steps: int = 30,
    guidance_scale: float | None = None,
    true_cfg_scale: float = 1.0,
    sampler: str | None = None,
    karras: bool = False,
    eta: float = 0.0,
    clip_skip: int = 0,
    init_image: Image.Image | Sequence[Image.Image] | None = None,
    strength: float = 0.8,
    output: str = "pil",
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
    unet_inputs: Callable[[torch.Tensor, torch.Tensor, dict], dict] | None = None,
    prompt_encoder: Callable[[list[str]], dict] | None = None,
) -> list[Image.Image] | torch.Tensor:
    """Sample images for `prompt` (one image per prompt).

    `init_image` turns this into img2img: the picture is encoded, noised to the level that
    `strength` selects (1.0 = pure noise, as text-to-image) and denoised from there; without a
    height and width the output has the picture's size. The seed
    fixes the noise: a CPU generator, so the same seed gives the same start on every device.
    `output="latent"` returns the final latents instead of images.

    The text and size conditioning are the model family's (`components.family`): for SDXL the
    pooled embedding and the size ids (original = target = the asked size, no crop), and an empty
    negative prompt conditions on zeros, as diffusers' SDXL pipelines do by default. Guidance-distilled
    Flux.1-dev embeds `guidance_scale` and runs one pass per step; schnell ignores it. On Flux,
    `true_cfg_scale` > 1 adds classifier-free guidance with the negative prompt (diffusers'
    FluxPipeline's `true_cfg_scale`): what a flow model without guidance distillation needs. Without a
    `guidance_scale` the family's default applies (SD 7.5, SDXL 5.0, Flux 3.5, as diffusers' pipelines).

    The objective is the schedule's (`components.schedule`): the discrete DDPM schedules sample with
    any of SAMPLERS (`sampler=None`: DPM-Solver++ 2M), flow matching with the flow Euler step.

    `unet_inputs(x_t, t, inputs)` adds inputs to every U-Net call (ControlNet residuals, the
    inpainting channels); `inputs` are the conditioning keyword inputs of that call
    (encoder_hidden_states, and added_cond_kwargs for SDXL). It may return "sample" to replace x_t.
    Classifier-free guidance may batch the conditional and unconditional halves, so it must fit
    x_t's batch.

    `prompt_encoder` replaces the components' own (prompts -> text conditioning), e.g. `EncodedPrompts`.
    """
    schedule, family = components.schedule, components.family
    sampler = sampler or schedule.default_sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if sampler not in schedule.samplers:
        raise ValueError(f"sampler {sampler!r} does not fit {family.title}'s objective; choose one of "
                         f"{', '.join(schedule.samplers)}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    denoiser, vae = components.denoiser, components.vae
    device, dtype = denoiser.device, denoiser.dtype
    factor = components.vae_scale_factor
    multiple = factor * family.latent_multiple
    if init_image is not None and not (height or width):  # img2img keeps the picture's size (rounded down)
        first = init_image if isinstance(init_image, Image.Image) else init_image[0]
        height, width = (max(multiple, side // multiple * multiple) for side in (first.height, first.width))
    default_side = family.default_latent_side(denoiser.config) * factor
    height, width = height or default_side, width or default_side
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple} for {family.title}, got {height}x{width}")

    if guidance_scale is None:
        guidance_scale = family.default_guidance_scale
    cfg_scale = family.cfg_scale(guidance_scale, true_cfg_scale)
    encoder = prompt_encoder or components.prompt_encoder(clip_skip=clip_skip)
    cond = encoder(prompts)  # {"hidden": (b, tokens, width), ["pooled": (b, p)]}
    uncond = encoder(negatives) if cfg_scale != 1.0 else cond
    empty = family.empty_text(encoder([""]))
    if family.zero_empty_prompt:  # rows with an empty negative prompt condition on zeros
        blank = torch.tensor([n == "" for n in negatives], device=uncond["hidden"].device)
        uncond = {k: torch.where(blank.view(-1, *[1] * (v.ndim - 1)), torch.zeros_like(v), v) for k, v in uncond.items()}
    cond["hidden"], uncond["hidden"] = pad_to_same_length(cond["hidden"], uncond["hidden"], empty["hidden"])
    cond_inputs, uncond_inputs = (
        family.denoiser_inputs(text, _batch_ids(family.generation_ids(height, width, negative=negative), len(prompts),
                                                device), guidance=guidance_scale)
        for text, negative in ((cond, False), (uncond, True))
    )

    def denoiser_call(x_t, t, **inputs):
        extra = unet_inputs(x_t, t, inputs) if unet_inputs is not None else {}
        sample = extra.pop("sample", x_t)
        return denoiser(sample.to(dtype), t, **cast_inputs(inputs, dtype), **extra).float()

    model = classifier_free_guidance(denoiser_call, cond_inputs, uncond_inputs, cfg_scale)
    step_fn, grid_style = SAMPLERS[sampler]
    if sampler == "ddim":
        step_fn = functools.partial(ddim, eta=eta)
    shape = (len(prompts), vae.config.latent_channels, height // factor, width // factor)
    sigmas = schedule.grid(steps, like=grid_style, karras=karras, latent_shape=shape)

    # Draws from one CPU generator in diffusers' order (img2img: the posterior sample, then the
    # noise), so a seed gives the same start as diffusers' pipelines on any device.
    generator = torch.Generator().manual_seed(seed)
    if init_image is None:
        noise = torch.randn(shape, generator=generator).to(device)
        x = schedule.initial_sample(noise, sigmas[0].item())
    else:
        images = [init_image] if isinstance(init_image, Image.Image) else list(init_image)
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} init images")
        images = [im.convert("RGB").resize((width, height), Image.BICUBIC) for im in images]
        pixels = images_to_tensor(images, device).to(vae.dtype)
        x0 = vae.scale(vae.encode(pixels).sample(generator)).float()
        noise = torch.randn(shape, generator=generator).to(device)
        start = schedule.img2img_start(len(sigmas) - 1, strength)
        x = schedule.noised_sample(x0, noise, sigmas[start].item())
        sigmas = sigmas[start:]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sigmas) - 1, desc="sampling", unit="step")

    def on_step(info: dict) -> None:
        if bar is not None:
            bar.update(1)
        if callback is not None:
            callback(info)

    x = step_fn(schedule.denoiser(model), x, sigmas, generator=generator, callback=on_step)
    if bar is not None:
        bar.close()
    latents = schedule.final_latents(x, sigmas[-1].item())
    if output == "latent":
        return latents
    return tensor_to_images(vae.decode(vae.unscale(latents).to(vae.dtype)))
