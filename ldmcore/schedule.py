"""The discrete noise schedule of a latent diffusion model, as data read from a diffusers
`scheduler_config.json`, and the training-time quantities derived from it.

Forward process: x_t = alpha_t * x0 + sigma_t * eps with alpha_t = sqrt(alphas_cumprod[t]) and
sigma_t = sqrt(1 - alphas_cumprod[t]). `sigmas` are the variance-exploding noise levels
sqrt((1 - acp) / acp) that the samplers work in. Tables are float64 on the CPU, computed with
diffusers' formulas; per-sample look-ups move them to the timesteps' device.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers scheduler keys that would change the schedule or the prediction if set, with the only
# value this core implements. Every other unknown key (solver options, _class_name, ...) is ignored.
_FIXED: dict[str, tuple[Any, ...]] = {
    "trained_betas": (None,),
    "thresholding": (False,),
    "variance_type": (None, "fixed_small"),
    "timestep_type": ("discrete",),
    "use_flow_sigmas": (False,),
}


@dataclasses.dataclass
class NoiseSchedule:
    """Field names are diffusers' scheduler config keys; defaults are Stable Diffusion 1.x's."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False  # Lin et al. 2023: the last timestep is pure noise
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    clip_sample: bool = False  # kept for the config round trip; only False is implemented
    set_alpha_to_one: bool = False  # DDIM: whether its last step lands on alpha=1 or on alphas_cumprod[0]

    betas: torch.Tensor = dataclasses.field(init=False, repr=False, compare=False)  # (T,) float64
    alphas_cumprod: torch.Tensor = dataclasses.field(init=False, repr=False, compare=False)  # (T,) float64
    sigmas: torch.Tensor = dataclasses.field(init=False, repr=False, compare=False)  # (T,) float64; inf at a zero-SNR end

    def __post_init__(self):
        _check("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if self.clip_sample:
            raise ValueError(
                "NoiseSchedule: clip_sample=True clamps the predicted x0 to [-1, 1], which is meant for pixel-space "
                "models and is not implemented; latent diffusion configs use false"
            )
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 2:
            raise ValueError(f"NoiseSchedule: num_train_timesteps={self.num_train_timesteps!r} must be an integer >= 2")
        self.betas = _betas(self.beta_schedule, self.beta_start, self.beta_end, self.num_train_timesteps)
        if self.rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "scheduler config") -> NoiseSchedule:
        """Read a diffusers scheduler config dict; keys this schedule does not use are ignored."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        for key, allowed in _FIXED.items():
            if key in config and config[key] not in allowed:
                raise ValueError(f"{source}: {key}={config[key]!r} is not supported (only {allowed[-1]!r})")
        try:
            return cls(**{k: v for k, v in config.items() if k in names})
        except ValueError as e:
            raise ValueError(f"{source}: {str(e).removeprefix('NoiseSchedule: ')}") from None

    def to_config(self) -> dict[str, Any]:
        """A config dict that diffusers' DDIMScheduler / DDPMScheduler `from_config` accept."""
        out: dict[str, Any] = {"_class_name": "DDIMScheduler"}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init})
        return out

    # --- the objective's face to the training loop and the pipeline (shared with flow.FlowMatchSchedule) ---

    kind = "ddpm"
    default_sampler = "dpmpp_2m"
    samplers = ("ddpm", "ddim", "euler", "dpmpp_2m")

    def draw_timestep(self, generator: torch.Generator, latent_shape, loss) -> torch.Tensor:
        """One training timestep, uniform over the discrete steps (a 0-dim int64 tensor)."""
        if loss.timestep_sampling not in (None, "uniform") or loss.timestep_shift is not None:
            raise ValueError("loss.timestep_sampling / loss.timestep_shift choose flow-matching sigmas; this model "
                             "has a discrete DDPM schedule (timesteps are drawn uniformly; remove them)")
        return torch.randint(0, self.num_train_timesteps, (), generator=generator)

    def loss_weights(self, t: torch.Tensor, loss) -> torch.Tensor:
        """Per-sample loss weights (b,): min-SNR-gamma (Hang et al. 2023) when `loss.min_snr_gamma` is set."""
        if loss.weighting != "none":
            raise ValueError(f"loss.weighting={loss.weighting!r} weighs flow-matching sigmas; this model has a "
                             "discrete DDPM schedule (use loss.min_snr_gamma)")
        if not loss.min_snr_gamma:
            return torch.ones(t.shape, device=t.device)
        snr = self.snr(t)
        capped = snr.clamp(max=loss.min_snr_gamma)
        if self.prediction_type == "v_prediction":
            return capped / (snr + 1)
        # epsilon: min(snr, gamma) / snr; zero-terminal-SNR timesteps (snr = 0) keep weight 1
        return torch.where(snr > 0, capped / snr.clamp(min=1e-12), torch.ones_like(snr))

    def fixed_timestep(self, step: int) -> int:
        """The model timestep of a validation step on the 0..num_train_timesteps scale: itself."""
        return step

    def grid(self, steps: int, *, like: str, karras: bool = False, latent_shape=None) -> torch.Tensor:
        """The descending sigmas of diffusers' scheduler family `like` (samplers.sigma_grid)."""
        from .samplers import sigma_grid

        return sigma_grid(self, steps, like=like, karras=karras)

    def denoiser(self, model):
        """D(x, sigma) -> x0 in the variance-exploding coordinates the samplers step in."""
        from .samplers import Denoiser

        return Denoiser(model, self)

    def initial_sample(self, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """Unit-variance noise as the sampler state x = x_t / alpha_t at the grid's first level."""
        return noise * math.sqrt(1 + sigma**2)

    def noised_sample(self, x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """Image to image: the encoded picture noised to `sigma`, as the sampler state."""
        return x0 + noise * sigma

    def final_latents(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The sampler state at the last level as latents (x_t = alpha_t * x)."""
        return x / math.sqrt(1 + sigma**2)

    def img2img_start(self, steps: int, strength: float) -> int:
        from .samplers import img2img_start_index

        return img2img_start_index(steps, strength)

    # --- per-sample look-ups; t is an integer tensor of shape (b,) ---

    def _at(self, table: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """table (T,) -> (b, 1, ..., 1) with `ndim` dims, float64 (float32 on MPS) on t's device."""
        dtype = torch.float32 if t.device.type == "mps" else torch.float64
        return table.to(t.device, dtype)[t].reshape(-1, *[1] * (ndim - 1))

    def _alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t as (b, 1, 1, 1) in the dtype the arithmetic on `like` runs in."""
        acp = self._at(self.alphas_cumprod, t, like.ndim)
        dtype = torch.promote_types(like.dtype, torch.float32)
        return acp.sqrt().to(dtype), (1 - acp).sqrt().to(dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The forward process: x0, noise (b, ...) -> x_t (b, ...)."""
        alpha, sigma = self._alpha_sigma(t, x0)
        return (alpha * x0 + sigma * noise).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model is trained to output for x_t = add_noise(x0, noise, t)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        alpha, sigma = self._alpha_sigma(t, x0)
        return (alpha * noise - sigma * x0).to(x0.dtype)  # v

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod / (1 - alphas_cumprod) at t: (b,) -> (b,) float32; 0 at a zero-SNR end."""
        acp = self._at(self.alphas_cumprod, t, 1)
        return (acp / (1 - acp)).float()

    def predicted_x0(self, x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The clean sample implied by a model output at x_t (infinite at a zero-SNR end for epsilon models)."""
        alpha, sigma = self._alpha_sigma(t, x_t)
        return self.prediction_to_x0(x_t, model_output, alpha, sigma).to(x_t.dtype)

    def predicted_noise(self, x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise implied by a model output at x_t."""
        alpha, sigma = self._alpha_sigma(t, x_t)
        return self.prediction_to_noise(x_t, model_output, alpha, sigma).to(x_t.dtype)

    # --- the one place the prediction type is interpreted; alpha, sigma: floats or broadcastable tensors ---

    def prediction_to_x0(self, x_t, model_output, alpha, sigma) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return (x_t - sigma * model_output) / alpha
        if self.prediction_type == "v_prediction":
            return alpha * x_t - sigma * model_output
        return model_output

    def prediction_to_noise(self, x_t, model_output, alpha, sigma) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return model_output
        if self.prediction_type == "v_prediction":
            return alpha * model_output + sigma * x_t
        return (x_t - alpha * model_output) / sigma


def _check(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"NoiseSchedule: {key}={value!r} is not supported (expected one of {', '.join(allowed)})")


def _betas(schedule: str, beta_start: float, beta_end: float, n: int) -> torch.Tensor:
    """diffusers' beta schedules, in float64: (n,)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if schedule == "scaled_linear":  # linear in sqrt(beta): the LDM / Stable Diffusion schedule
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    return betas_for_alpha_bar(n)


def betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule of Nichol & Dhariwal 2021, discretised into n betas capped at max_beta: (n,) float64."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=torch.float64
    )


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alphas_cumprod) so the last one is exactly 0
    while the first is unchanged, then recover the betas."""
    sqrt_acp = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_acp[0].clone(), sqrt_acp[-1].clone()
    sqrt_acp = (sqrt_acp - last) * (first / (first - last))
    acp = sqrt_acp**2
    alphas = torch.cat([acp[:1], acp[1:] / acp[:-1]])
    return 1 - alphas
