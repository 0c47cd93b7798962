"""Flow matching (rectified flow), the objective of Flux.1 and SD3, as data read from a diffusers
`FlowMatchEulerDiscreteScheduler` config, and the training and sampling quantities derived from it.

The forward process is a straight line from data to noise:

    x_t = sigma * noise + (1 - sigma) * x0,   sigma in [0, 1]

and the model predicts its velocity, dx_t / dsigma = noise - x0. The denoiser is called with the
timestep `sigma` itself (diffusers' transformers take sigma and multiply by 1000 inside).

Shifting moves sigmas towards the noisy end, which larger images need (more pixels keep more of the
signal at a given sigma): sigma' = shift * sigma / (1 + (shift - 1) * sigma) with a fixed `shift`
(SD3, schnell), or with a shift that grows with the number of image tokens (Flux.1-dev,
`use_dynamic_shifting`): mu is linear in the token count through (base_image_seq_len, base_shift)
and (max_image_seq_len, max_shift), and sigma' = e^mu / (e^mu + 1/sigma - 1).

Sampling runs on x_t directly: the grid is diffusers' (linspace from 1 to 1/steps, shifted, then 0),
and the denoiser D(x, sigma) = x - sigma * v makes the samplers' Euler step
x + (x - D) / sigma * (sigma_next - sigma) exactly the flow Euler step x + v * (sigma_next - sigma).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np
import torch

TIME_SHIFT_TYPES = ("exponential",)
TIMESTEP_SAMPLING = ("uniform", "logit_normal")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")

# diffusers scheduler keys that change the schedule if set, with the only value implemented here
_FIXED: dict[str, tuple[Any, ...]] = {
    "invert_sigmas": (False,),
    "shift_terminal": (None,),
    "use_karras_sigmas": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "stochastic_sampling": (False,),
}


@dataclasses.dataclass
class FlowMatchSchedule:
    """Field names are diffusers' FlowMatchEulerDiscreteScheduler config keys; defaults are its defaults."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"

    #: the name the sampler and the training loop check: this is not a discrete DDPM schedule
    kind = "flow"
    default_sampler = "euler"
    samplers = ("euler",)  # the flow Euler step; the DDPM-family samplers assume another parametrisation

    def __post_init__(self):
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"FlowMatchSchedule: time_shift_type={self.time_shift_type!r} is not supported "
                             f"(only {', '.join(TIME_SHIFT_TYPES)})")
        if self.shift <= 0:
            raise ValueError(f"FlowMatchSchedule: shift={self.shift} must be positive")

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "scheduler config") -> FlowMatchSchedule:
        """Read a diffusers scheduler config dict; keys this schedule does not use are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key, allowed in _FIXED.items():
            if config.get(key, allowed[0]) not in allowed:
                raise ValueError(f"{source}: {key}={config[key]!r} is not supported (only {allowed[0]!r})")
        try:
            return cls(**{k: v for k, v in config.items() if k in names and v is not None})
        except ValueError as e:
            raise ValueError(f"{source}: {str(e).removeprefix('FlowMatchSchedule: ')}") from None

    def to_config(self) -> dict[str, Any]:
        """A config dict that diffusers' FlowMatchEulerDiscreteScheduler `from_config` accepts."""
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", **dataclasses.asdict(self)}

    # -- shifting ------------------------------------------------------------------------------

    def mu(self, image_seq_len: int) -> float:
        """The resolution-dependent shift exponent for `image_seq_len` image tokens (2x2 latent patches)."""
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return self.base_shift + slope * (image_seq_len - self.base_image_seq_len)

    def shifted(self, sigma: torch.Tensor | np.ndarray, image_seq_len: int, shift: float | None = None):
        """sigma -> the shifted sigma for an image of `image_seq_len` tokens. `shift` overrides the
        config's (a fixed shift); otherwise dynamic shifting follows `use_dynamic_shifting`."""
        if shift is None and self.use_dynamic_shifting:
            e = math.exp(self.mu(image_seq_len))
            return e / (e + (1 / sigma - 1))
        s = self.shift if shift is None else shift
        return s * sigma / (1 + (s - 1) * sigma)

    @staticmethod
    def image_seq_len(latent_shape: tuple[int, ...] | torch.Size) -> int:
        """Image tokens of latents (..., h, w) cut into 2x2 patches."""
        return (latent_shape[-2] // 2) * (latent_shape[-1] // 2)

    # -- training ------------------------------------------------------------------------------

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0, noise (b, ...), sigma t (b,) -> x_t (b, ...)."""
        s = _per_sample(t, x0)
        return (s * noise + (1 - s) * x0).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity the model is trained to output: noise - x0."""
        return noise - x0

    def draw_timestep(self, generator: torch.Generator, latent_shape, loss) -> torch.Tensor:
        """One training sigma (a 0-dim float32 tensor) from `generator`, as `loss` asks:
        `timestep_sampling` uniform, or logit-normal (`logit_mean`, `logit_std`; SD3's default);
        then shifted by `timestep_shift`: None the scheduler's own (Flux.1-dev: by resolution),
        "resolution", "none", or a number (a fixed shift)."""
        how = loss.timestep_sampling or "logit_normal"
        if how == "uniform":
            sigma = torch.rand((), generator=generator, dtype=torch.float64)
        elif how == "logit_normal":
            z = torch.randn((), generator=generator, dtype=torch.float64)
            sigma = torch.sigmoid(loss.logit_mean + loss.logit_std * z)
        else:
            raise ValueError(f"loss.timestep_sampling={how!r}; expected one of {', '.join(TIMESTEP_SAMPLING)}")
        n = self.image_seq_len(latent_shape)
        shift = loss.timestep_shift
        if shift == "none":
            shift = 1.0
        elif shift == "resolution":
            e = math.exp(self.mu(n))
            return (e / (e + (1 / sigma - 1))).float()
        return torch.as_tensor(self.shifted(sigma, n, shift)).float()

    def loss_weights(self, t: torch.Tensor, loss) -> torch.Tensor:
        """Per-sample loss weights (b,) at sigmas t (b,): `weighting` none, sigma_sqrt (sigma^-2) or
        cosmap, as the SD3 paper names them."""
        if loss.min_snr_gamma:
            raise ValueError("loss.min_snr_gamma is a weighting of discrete DDPM schedules; a flow-matching model "
                             "takes loss.weighting (none, sigma_sqrt, cosmap)")
        t = t.float()
        if loss.weighting == "sigma_sqrt":
            return t.clamp(min=1e-4) ** -2.0
        if loss.weighting == "cosmap":
            return 2 / (math.pi * (1 - 2 * t + 2 * t**2))
        return torch.ones_like(t)

    def fixed_timestep(self, step: int) -> float:
        """The model timestep of a validation step given on the 0..num_train_timesteps scale."""
        return step / self.num_train_timesteps

    # -- sampling ------------------------------------------------------------------------------

    def grid(self, steps: int, *, like: str = "euler", karras: bool = False, latent_shape=None) -> torch.Tensor:
        """The sigmas (steps + 1,) float64, descending to 0, that diffusers' Flux pipelines step through:
        linspace(1, 1/steps), shifted for these latents' size, then 0."""
        if like != "euler" or karras:
            raise ValueError("a flow-matching model samples with the flow Euler step (sampler 'euler', karras off)")
        if steps < 1:
            raise ValueError(f"steps={steps} must be at least 1")
        base = np.linspace(1.0, 1 / steps, steps)
        n = self.image_seq_len(latent_shape) if latent_shape is not None else self.base_image_seq_len
        sigmas = torch.from_numpy(np.asarray(self.shifted(base, n), dtype=np.float64))
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    def denoiser(self, model: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """D(x_t, sigma) -> x0 = x_t - sigma * v for a velocity model(x_t, sigma (b,))."""
        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            t = torch.full((x.shape[0],), float(sigma), device=x.device)
            v = model(x, t)
            return (x.float() - float(sigma) * v.float()).to(x.dtype)

        return denoise

    def initial_sample(self, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """Text to image starts from pure noise (the grid starts at or near sigma = 1)."""
        return noise

    def noised_sample(self, x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        """Image to image: the encoded picture moved to `sigma` along the line."""
        return sigma * noise + (1 - sigma) * x0

    def final_latents(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x

    def img2img_start(self, steps: int, strength: float) -> int:
        """Steps skipped for `strength`, as diffusers' Flux / SD3 img2img (no rounding of steps * strength)."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength} must be in [0, 1]")
        start = int(max(steps - min(steps * strength, steps), 0))
        if start >= steps:
            raise ValueError(f"strength={strength} with {steps} steps leaves no step to run; raise either")
        return start


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(b,) -> (b, 1, ..., 1) in the arithmetic dtype of `like` (at least float32)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    return t.to(like.device, dtype).reshape(-1, *[1] * (like.ndim - 1))
