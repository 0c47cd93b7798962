"""Samplers as pure functions of one signature, k-diffusion style, and the pieces around them.

The design, in sigma space (Karras et al. 2022): the sampler state is x = x0 + sigma * eps, the
variance-exploding form of the model's x_t = alpha_t * x0 + sigma_t * eps (x = x_t / alpha_t,
sigma = sigma_t / alpha_t). A `Denoiser` turns a discrete-time model into D(x, sigma) -> x0, and
every sampler is

    sampler(denoiser, x, sigmas, *, generator=None, callback=None) -> x

stepping x from sigmas[0] down to sigmas[-1] (a descending float64 grid from `sigma_grid`),
calling callback({"i", "x", "sigma", "denoised"}) once per step before the update. Stochastic
samplers draw their noise from `generator` in diffusers' order, so seeded runs reproduce
diffusers'; deterministic ones accept and ignore it. `ddim`'s `eta` is bound with
functools.partial. In these coordinates DDIM with eta=0 is the Euler step, and DDIM with eta=1
is DDPM's ancestral step, so `ddim` carries both (Song et al. 2021, eq. 12-16).

Text to image, the way diffusers' pipelines start and end (latents at unit variance):

    sigmas = sigma_grid(schedule, 30, like="dpm", karras=True)
    x = noise * (1 + sigmas[0] ** 2).sqrt()                       # x_t at the first level, as x
    x = dpmpp_2m(Denoiser(classifier_free_guidance(unet, cond, uncond, 7.5), schedule), x, sigmas)
    latents = x / (1 + sigmas[-1] ** 2).sqrt()                     # == x unless the grid ends above 0 (DDIM)

Known departures from diffusers, all small: diffusers' Euler starts linspace/trailing grids from
noise * sigma_max; DDIM's step on a linspace (or trailing, steps not dividing the train steps)
grid goes to `t - T // steps` rather than the next grid point, we use the next grid point;
zero-terminal-SNR schedules use alphas_cumprod[-1] = 2**-24 for sampling as diffusers' Euler and
DPM-Solver do (diffusers' DDIM/DDPM use 0 there); diffusers' DDPM draws one more (unused, scaled
by 1e-10) noise tensor on its last step, so the generator ends one draw further on there.
"""
from __future__ import annotations

import bisect
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .schedule import NoiseSchedule

Model = Callable[..., torch.Tensor]  # model(x_t (b, c, h, w), t (b,), **cond) -> raw prediction (b, c, h, w)
DenoiserFn = Callable[[torch.Tensor, float], torch.Tensor]  # D(x (b, c, h, w), sigma) -> x0 (b, c, h, w)
Callback = Callable[[dict[str, Any]], None]
GRID_STYLES = ("ddpm", "ddim", "euler", "dpm")


def sampling_sigmas(schedule: NoiseSchedule) -> torch.Tensor:
    """The training sigmas, (T,) float64 ascending in t, finite: a zero-terminal-SNR schedule's last
    alphas_cumprod is taken as 2**-24 (sigma ~ 4096) as diffusers' Euler and DPM-Solver do."""
    acp = schedule.alphas_cumprod.clone()
    if schedule.rescale_betas_zero_snr:
        acp[-1] = 2.0**-24
    return ((1 - acp) / acp).sqrt()


class Denoiser:
    """D(x, sigma) -> x0 for a model trained on the discrete schedule.

    The model sees x_t = x / sqrt(sigma^2 + 1) at the (fractional) timestep whose sigma this is,
    found by interpolating log sigma; `quantize` rounds it to an integer, as diffusers' DPM-Solver
    does for Karras grids. Conditioning is bound into `model` (functools.partial, or
    `classifier_free_guidance`).
    """

    def __init__(self, model: Model, schedule: NoiseSchedule, *, quantize: bool = False):
        self.model, self.schedule, self.quantize = model, schedule, quantize
        self.log_sigmas = sampling_sigmas(schedule).log().tolist()  # (T,) ascending

    def sigma_to_t(self, sigma: float) -> float:
        """diffusers' `_sigma_to_t`: the timestep whose log sigma is `sigma`'s, interpolated linearly."""
        ls = self.log_sigmas
        log_sigma = math.log(max(sigma, 1e-10))
        low = min(max(bisect.bisect_right(ls, log_sigma) - 1, 0), len(ls) - 2)
        w = min(max((ls[low] - log_sigma) / (ls[low] - ls[low + 1]), 0.0), 1.0)
        t = low + w
        return float(round(t)) if self.quantize else t

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        sigma = float(sigma)
        c_in = 1 / math.sqrt(sigma**2 + 1)  # alpha_t; sigma_t = sigma * c_in
        t = torch.full((x.shape[0],), self.sigma_to_t(sigma), device=x.device)  # (b,) float32
        x_t = x * c_in
        out = self.model(x_t, t)  # (b, c, h, w)
        dtype = torch.promote_types(x.dtype, torch.float32)
        return self.schedule.prediction_to_x0(x_t.to(dtype), out.to(dtype), c_in, sigma * c_in).to(x.dtype)


def classifier_free_guidance(model: Model, cond: Mapping[str, Any], uncond: Mapping[str, Any], scale: float) -> Model:
    """model(x_t, t, **cond) -> model(x_t, t) giving uncond + scale * (cond - uncond), from one call on the
    batch [uncond; cond] (diffusers' order). cond / uncond: keyword inputs with batch first, tensors or
    dicts of tensors, e.g. {"encoder_hidden_states": (b, 77, 2048), "added_cond_kwargs": {"text_embeds":
    (b, 1280), "time_ids": (b, 6)}}; the negative prompt goes in uncond."""
    if set(cond) != set(uncond):
        raise ValueError(f"classifier_free_guidance: cond has keys {sorted(cond)} but uncond has {sorted(uncond)}")
    both = _concat(uncond, cond)  # (2b, ...)

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 1.0:
            return model(x_t, t, **cond)
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        out_uncond, out_cond = model(torch.cat([x_t, x_t]), torch.cat([t, t]), **both).chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    return guided


def _concat(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Concatenate two keyword-input dicts on the batch axis, into nested dicts."""
    return {k: _concat(a[k], b[k]) if isinstance(a[k], Mapping) else torch.cat([a[k], b[k]]) for k in a}


# --- the step grid ---


def sigma_grid(
    schedule: NoiseSchedule, steps: int, *, like: str, karras: bool = False, rho: float = 7.0
) -> torch.Tensor:
    """The descending sigmas (steps + 1,) float64 that diffusers' scheduler family `like` steps through
    for this schedule's timestep_spacing / steps_offset:

    "ddpm" / "ddim" (DDPMScheduler, DDIMScheduler): linspace timesteps rounded; the last level is 0,
        or for DDIM sigmas[0] of the schedule unless set_alpha_to_one.
    "euler" (EulerDiscreteScheduler): linspace timesteps not rounded; Karras sigmas span the grid's ends.
    "dpm" (DPMSolverMultistepScheduler): leading / linspace lay out steps + 1 timesteps and drop t = 0;
        Karras sigmas span the schedule's whole range.
    """
    if like not in GRID_STYLES:
        raise ValueError(f"sigma_grid: like={like!r}; expected one of {', '.join(GRID_STYLES)}")
    T = schedule.num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"sigma_grid: steps={steps} must be between 1 and num_train_timesteps={T}")
    train = sampling_sigmas(schedule)  # (T,)
    t = _timesteps(schedule, steps, like)  # (steps,) descending
    sigmas = _interp(t, train)
    if karras:
        lo, hi = (sigmas[-1], sigmas[0]) if like == "euler" else (train[0], train[-1])
        sigmas = karras_sigmas(steps, lo.item(), hi.item(), rho)
    final = 0.0 if like != "ddim" or schedule.set_alpha_to_one else schedule.sigmas[0].item()
    return torch.cat([sigmas, sigmas.new_tensor([final])])


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: (steps,) float64 from sigma_max down to sigma_min, even in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _timesteps(schedule: NoiseSchedule, steps: int, like: str) -> torch.Tensor:
    """diffusers' `set_timesteps` for the family `like`: (steps,) descending. In numpy as there, so that
    rounding ties (499.5) go the same way."""
    T, spacing = schedule.num_train_timesteps, schedule.timestep_spacing
    n = steps + 1 if like == "dpm" and spacing != "trailing" else steps  # DPM-Solver then drops t = 0
    if spacing == "leading":
        t = (np.arange(n) * (T // n))[::-1] + schedule.steps_offset
    elif spacing == "trailing":
        t = np.arange(T, 0, -T / n).round() - 1
    elif like == "euler":
        t = np.linspace(0, T - 1, n, dtype=np.float32)[::-1]
    else:
        t = np.linspace(0, T - 1, n).round()[::-1]
    return torch.from_numpy(t[:steps].astype(np.float64))


def _interp(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """table (T,) linearly interpolated at fractional positions t (n,) (numpy.interp on the index)."""
    low = t.floor().long().clamp(0, len(table) - 2)
    w = t - low
    return table[low] * (1 - w) + table[low + 1] * w


# --- noise for the stochastic samplers, drawn as diffusers' randn_tensor does ---


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _steps(sigmas: torch.Tensor | Sequence[float]) -> list[tuple[int, float, float]]:
    """(i, sigma, sigma_next) for each step, as Python floats: step coefficients are computed in float64."""
    s = [float(v) for v in sigmas]
    return [(i, s[i], s[i + 1]) for i in range(len(s) - 1)]


# --- samplers ---


@torch.no_grad()
def euler(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma."""
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})
        d = (x - denoised) / sigma
        x = x + d * (sigma_next - sigma)
    return x


@torch.no_grad()
def ddim(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, generator: torch.Generator | None = None,
    callback: Callback | None = None, eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) with stochasticity eta: each step lands on denoised + sigma_down * eps and
    adds sigma_up * fresh noise, sigma_down^2 + sigma_up^2 = sigma_next^2."""
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})
        sigma_up = eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0))
        sigma_down = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
        x = denoised + (x - denoised) * (sigma_down / sigma)  # (x - denoised) / sigma is the predicted eps
        if sigma_up > 0:
            x = x + _randn_like(x, generator) * sigma_up
    return x


@torch.no_grad()
def ddpm(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0) with its variance ("fixed_small"),
    which is DDIM with eta = 1."""
    return ddim(denoiser, x, sigmas, generator=generator, callback=callback, eta=1.0)


@torch.no_grad()
def dpmpp_2m(
    denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in lambda = -log sigma, first order on the
    first step and on a last step to sigma = 0."""
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = denoiser(x, sigma)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        if old_denoised is not None:
            r = h_last / h
            denoised_d = denoised * (1 + 1 / (2 * r)) - old_denoised * (1 / (2 * r))
        else:
            denoised_d = denoised
        x = x * (sigma_next / sigma) - denoised_d * math.expm1(-h)
        old_denoised, h_last = denoised, h
    return x


# --- image to image ---


def img2img_start(
    sigmas: torch.Tensor, strength: float, x0: torch.Tensor, noise: torch.Tensor
) -> tuple[int, torch.Tensor]:
    """Where img2img starts on a grid of `len(sigmas) - 1` steps, as diffusers' pipelines do: skip the first
    steps - int(steps * strength) steps, and noise the encoded image x0 to that level.
    Returns (start, x): sample with `sampler(denoiser, x, sigmas[start:])`."""
    start = img2img_start_index(len(sigmas) - 1, strength)
    return start, x0 + noise * float(sigmas[start])  # (b, c, h, w)


def img2img_start_index(steps: int, strength: float) -> int:
    """The steps diffusers' SD pipelines skip for `strength`: steps - int(steps * strength)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"img2img_start: strength={strength} must be in [0, 1]")
    start = steps - min(int(steps * strength), steps)
    if start == steps:
        raise ValueError(f"img2img_start: strength={strength} with {steps} steps leaves no step to run; raise either")
    return start
