"""Samplers against diffusers' schedulers run in diffusers' own loop (scale_model_input, model, step),
on the same start noise and the same generator, with a fixed nonlinear stand-in for the U-Net.

Tolerance: final latents agree to 1e-5 of their largest magnitude in float32 (measured: ~1e-6;
diffusers keeps float32 tables, we keep float64 ones).
"""
import functools
import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from ldmcore.samplers import (
    Denoiser,
    classifier_free_guidance,
    ddim,
    ddpm,
    dpmpp_2m,
    euler,
    img2img_start,
    sampling_sigmas,
    sigma_grid,
)
from ldmcore.schedule import NoiseSchedule

RTOL = 1e-5
# third-party deprecation noise: diffusers' np.array() on a tensor, torch.jit use in the pipeline imports
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated"),
]
DPM = dict(algorithm_type="dpmsolver++", solver_order=2)
# name: diffusers scheduler class, its extra config, extra step() kwargs, our sampler, grid style, grid kwargs
CASES = {
    "ddpm": (DDPMScheduler, {}, {}, ddpm, "ddpm", {}),
    "ddim_eta0": (DDIMScheduler, {}, {}, ddim, "ddim", {}),
    "ddim_eta1": (DDIMScheduler, {}, dict(eta=1.0), functools.partial(ddim, eta=1.0), "ddim", {}),
    "euler": (EulerDiscreteScheduler, {}, {}, euler, "euler", {}),
    "euler_karras": (EulerDiscreteScheduler, dict(use_karras_sigmas=True), {}, euler, "euler", dict(karras=True)),
    "dpmpp_2m": (DPMSolverMultistepScheduler, DPM, {}, dpmpp_2m, "dpm", {}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler, {**DPM, "use_karras_sigmas": True}, {}, dpmpp_2m, "dpm", dict(karras=True)
    ),
}


def fake_unet(x_t: torch.Tensor, t) -> torch.Tensor:
    """A fixed nonlinear function of x_t and t, mixing channels, standing in for eps / v prediction."""
    t = torch.as_tensor(t, device=x_t.device).to(x_t.dtype).reshape(-1, 1, 1, 1) / 1000  # () or (b,)
    return torch.tanh(x_t * (0.7 + 0.2 * t) + 0.3 * x_t.roll(1, dims=1) - 0.5 * t) + 0.1 * torch.sin(4 * t)


def _noise(seed=0):
    return torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def _rel(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def diffusers_loop(scheduler, noise, steps, seed, **step_kw):
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = fake_unet(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, generator=generator, **step_kw).prev_sample
    return x


def img2img_timesteps(scheduler, steps, strength):
    """diffusers' StableDiffusionImg2ImgPipeline.get_timesteps (imported here: the pipeline import is slow)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")


def our_loop(sampler, schedule, sigmas, noise, seed, *, start_scale=None, quantize=False):
    """Noise at unit variance in, latents out; `start_scale` overrides the start level (diffusers' Euler quirk)."""
    generator = torch.Generator().manual_seed(seed)
    x = noise * (start_scale or math.sqrt(1 + sigmas[0].item() ** 2))
    x = sampler(Denoiser(fake_unet, schedule, quantize=quantize), x, sigmas, generator=generator)
    return x / math.sqrt(1 + sigmas[-1].item() ** 2)


def _compare(case, schedule, steps, *, start_scale=None):
    cls, extra, step_kw, sampler, like, grid_kw = CASES[case]
    scheduler = cls.from_config({**schedule.to_config(), **extra})
    noise = _noise()
    theirs = diffusers_loop(scheduler, noise, steps, seed=7, **step_kw)
    sigmas = sigma_grid(schedule, steps, like=like, **grid_kw)
    # diffusers' DPM-Solver rounds the timesteps of Karras sigmas; harmless on integer grids
    ours = our_loop(sampler, schedule, sigmas, noise, seed=7, start_scale=start_scale, quantize=like == "dpm")
    return _rel(ours, theirs)


def _euler_start(case, schedule, steps):
    """diffusers' Euler starts linspace / trailing grids at noise * sigma_max rather than at unit variance."""
    if not case.startswith("euler"):
        return None
    return sigma_grid(schedule, steps, like="euler", **CASES[case][-1])[0].item()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("case", CASES)
def test_sampler_matches_diffusers_sd_schedule(case, prediction_type):
    """SD 1.x/2.x: scaled_linear, "leading" spacing, steps_offset 1, DDIM ending on alphas_cumprod[0]."""
    assert _compare(case, NoiseSchedule(prediction_type=prediction_type), 25) < RTOL


@pytest.mark.parametrize("case", CASES)
def test_sampler_matches_diffusers_trailing(case):
    """"trailing" spacing, DDIM ending on alpha=1; diffusers' Euler starts these grids at noise * sigma_max."""
    schedule = NoiseSchedule(prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=True)
    start = _euler_start(case, schedule, 20)
    assert _compare(case, schedule, 20, start_scale=start) < RTOL


@pytest.mark.parametrize("case", ["euler", "euler_karras", "dpmpp_2m"])
def test_sampler_matches_diffusers_zero_terminal_snr(case):
    """Zero terminal SNR: diffusers' Euler and DPM-Solver sample with alphas_cumprod[-1] = 2**-24, as we do.
    Euler's first step from sigma ~ 4096 cancels most digits in float32 on both sides, hence 5e-5."""
    schedule = NoiseSchedule(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    start = _euler_start(case, schedule, 25)
    assert sigma_grid(schedule, 25, like="dpm")[0].item() == pytest.approx(math.sqrt(2**24 - 1))
    assert _compare(case, schedule, 25, start_scale=start) < (5e-5 if case == "euler" else RTOL)


GRIDS = [  # diffusers' DDPM / DDIM have no Karras option
    (like, spacing, karras)
    for like in ("ddpm", "ddim", "euler", "dpm")
    for spacing in ("leading", "trailing", "linspace")
    for karras in ((False, True) if like in ("euler", "dpm") else (False,))
]


@pytest.mark.parametrize("like,spacing,karras", GRIDS)
def test_grid_matches_diffusers(like, spacing, karras):
    schedule = NoiseSchedule(timestep_spacing=spacing)
    cls = dict(ddpm=DDPMScheduler, ddim=DDIMScheduler, euler=EulerDiscreteScheduler, dpm=DPMSolverMultistepScheduler)[like]
    scheduler = cls.from_config({**schedule.to_config(), "use_karras_sigmas": karras})
    scheduler.set_timesteps(30)
    sigmas = sigma_grid(schedule, 30, like=like, karras=karras)
    assert sigmas.shape == (31,) and sigmas.dtype == torch.float64 and bool((sigmas[:-1] >= sigmas[1:]).all())
    if like in ("ddpm", "ddim"):
        expected = torch.cat([sampling_sigmas(schedule)[scheduler.timesteps], torch.zeros(1)])
        if like == "ddim":  # set_alpha_to_one=False: the last step lands on alphas_cumprod[0]
            expected[-1] = schedule.sigmas[0]
        torch.testing.assert_close(sigmas, expected, rtol=0, atol=0)
    else:
        # diffusers' float32 sigma at t = 0 has lost digits to 1 - alphas_cumprod: 1.3e-5 off
        torch.testing.assert_close(sigmas.float(), scheduler.sigmas, rtol=2e-5, atol=0)
    denoiser = Denoiser(fake_unet, schedule, quantize=like == "dpm")
    t = torch.tensor([denoiser.sigma_to_t(s) for s in sigmas[:-1].tolist()], dtype=torch.float64)
    # float timesteps only for Euler: Karras, or linspace, whose fractional t diffusers interpolates
    # linearly in sigma where we invert log sigma
    torch.testing.assert_close(t, scheduler.timesteps.double(), rtol=0, atol=2e-3 if like == "euler" else 0)


def test_euler_is_ddim_without_noise():
    schedule = NoiseSchedule()
    sigmas = sigma_grid(schedule, 10, like="euler")
    denoiser = Denoiser(fake_unet, schedule)
    x = _noise() * sigmas[0].item()
    assert _rel(euler(denoiser, x, sigmas), ddim(denoiser, x, sigmas)) < 1e-6


def test_stochastic_samplers_follow_the_generator():
    schedule = NoiseSchedule()
    sigmas = sigma_grid(schedule, 10, like="ddpm")
    denoiser = Denoiser(fake_unet, schedule)
    x = _noise() * sigmas[0].item()
    run = lambda seed: ddpm(denoiser, x, sigmas, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(1), run(1))
    assert _rel(run(1), run(2)) > 1e-2


@pytest.mark.parametrize("steps,strength", [(25, 0.75), (25, 0.8), (30, 0.3), (10, 1.0), (50, 0.02)])
@pytest.mark.parametrize("like", ["ddim", "euler"])
def test_img2img_start_matches_diffusers(like, steps, strength):
    schedule = NoiseSchedule()
    cls = DDIMScheduler if like == "ddim" else EulerDiscreteScheduler
    scheduler = cls.from_config(schedule.to_config())
    scheduler.set_timesteps(steps)
    timesteps, n = img2img_timesteps(scheduler, steps, strength)
    sigmas = sigma_grid(schedule, steps, like=like)
    x0, noise = _noise(1), _noise(2)
    start, x = img2img_start(sigmas, strength, x0, noise)
    assert len(sigmas) - 1 - start == n
    denoiser = Denoiser(fake_unet, schedule)
    assert denoiser.sigma_to_t(sigmas[start].item()) == timesteps[0].item()
    theirs = scheduler.add_noise(x0, noise, timesteps[:1])  # x_t for DDIM, the sigma-space x for Euler
    ours = x / math.sqrt(1 + sigmas[start].item() ** 2) if like == "ddim" else x
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_img2img_run_matches_diffusers():
    """DPM-Solver++ restarts at first order from the img2img start, as diffusers' does."""
    schedule = NoiseSchedule(prediction_type="v_prediction")
    scheduler = DPMSolverMultistepScheduler.from_config({**schedule.to_config(), **DPM})
    scheduler.set_timesteps(25)
    timesteps, _ = img2img_timesteps(scheduler, 25, 0.6)
    x0, noise = _noise(1), _noise(2)
    theirs = scheduler.add_noise(x0, noise, timesteps[:1])
    for t in timesteps:
        theirs = scheduler.step(fake_unet(theirs, t), t, theirs).prev_sample

    sigmas = sigma_grid(schedule, 25, like="dpm")
    start, x = img2img_start(sigmas, 0.6, x0, noise)
    ours = dpmpp_2m(Denoiser(fake_unet, schedule), x, sigmas[start:])
    assert start == 25 - 15 and _rel(ours, theirs) < RTOL


def test_img2img_start_refuses_an_empty_run():
    sigmas = sigma_grid(NoiseSchedule(), 10, like="euler")
    with pytest.raises(ValueError, match="strength=0.05"):
        img2img_start(sigmas, 0.05, _noise(), _noise())


def test_classifier_free_guidance():
    calls = []

    def model(x_t, t, encoder_hidden_states):
        calls.append((x_t.shape[0], t.clone(), encoder_hidden_states.clone()))
        return x_t * encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + t.reshape(-1, 1, 1, 1) / 1000

    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(2, 2, 77, 8, generator=g)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 500.0])
    guided = classifier_free_guidance(model, {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}, 7.5)
    out = guided(x, t)
    assert len(calls) == 1 and calls[0][0] == 4  # one batched call
    assert torch.equal(calls[0][2], torch.cat([uncond, cond]))  # [uncond; cond], diffusers' order
    expected_uncond, expected_cond = model(x, t, uncond), model(x, t, cond)
    torch.testing.assert_close(out, expected_uncond + 7.5 * (expected_cond - expected_uncond), rtol=1e-6, atol=1e-6)
    plain = classifier_free_guidance(model, {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}, 1.0)
    assert torch.equal(plain(x, t), model(x, t, cond))
    with pytest.raises(ValueError, match="uncond has"):
        classifier_free_guidance(model, {"encoder_hidden_states": cond}, {}, 7.5)


def test_grid_errors_name_the_argument():
    with pytest.raises(ValueError, match="like='pndm'"):
        sigma_grid(NoiseSchedule(), 10, like="pndm")
    with pytest.raises(ValueError, match="steps=0"):
        sigma_grid(NoiseSchedule(), 0, like="euler")
