"""Pictures sampled during training: the validation grid (`validation.prompts` x `validation.seeds`) and
sample prompts with settings of their own, from a file (`validation.prompts_file`), as kohya's
sample-prompts files write them: one prompt per line, options after it.

    a photo of zorb on a beach --n blurry, lowres --w 768 --h 512 --d 42 --l 6.5 --s 28

`--n` negative prompt, `--w` / `--h` size, `--d` seed, `--l` guidance (CFG) scale, `--s` steps. Lines
starting with # and blank lines are skipped. What a line leaves out comes from the `validation` section
(seeds[0], steps, guidance_scale) and the model (its native size).

`Samples` holds what sampling needs, gathered once before the steps; the loop asks it `due(step)` and
`run(step, engine)`.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ldmcore.faults import fault_point

log = logging.getLogger("trainers")

OPTIONS = {"n": "negative", "w": "width", "h": "height", "d": "seed", "l": "guidance", "s": "steps"}
_CAST = {"negative": str, "width": int, "height": int, "seed": int, "guidance": float, "steps": int}


@dataclasses.dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance: float | None = None
    steps: int | None = None


class PromptsFileError(ValueError):
    """A line of a prompts file that cannot be read: the message names the file and line."""


def read_prompts_file(path: str | Path) -> list[SamplePrompt]:
    path = Path(path)
    if not path.is_file():
        raise PromptsFileError(f"validation.prompts_file={path}: no such file")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = re.split(r"\s--(\w+)\s*", " " + line)  # [prompt, key, value, key, value, ...]
        prompt, values = parts[0].strip(), {}
        for key, value in zip(parts[1::2], parts[2::2]):
            if key not in OPTIONS:
                raise PromptsFileError(f"{path}:{number}: unknown option --{key}; the options are "
                                       + ", ".join(f"--{k} ({v})" for k, v in OPTIONS.items()))
            try:
                values[OPTIONS[key]] = _CAST[OPTIONS[key]](value.strip())
            except ValueError:
                raise PromptsFileError(f"{path}:{number}: --{key} {value.strip()!r} is not a "
                                       f"{_CAST[OPTIONS[key]].__name__}") from None
        if not prompt:
            raise PromptsFileError(f"{path}:{number}: options without a prompt")
        prompts.append(SamplePrompt(prompt, **values))
    if not prompts:
        raise PromptsFileError(f"{path}: no prompt in it")
    return prompts


def wanted(config, prompts: list[SamplePrompt] | None) -> bool:
    """Whether the run samples at all: validation prompts or a prompts file."""
    return bool(config.validation.prompts or prompts)


def encode_sample_prompts(config, prompts: list[SamplePrompt] | None, parts):
    """Every prompt the run will sample, encoded once with `parts`' text encoders (`EncodedPrompts`, which
    `Samples` hands to generation), so they can leave the device; None when the run samples nothing."""
    from ldmcore.pipeline import EncodedPrompts

    if not wanted(config, prompts):
        return None
    vc, data = config.validation, config.data
    batches = [vc.prompts, [""] * len(vc.prompts), [""]] if vc.prompts else [[""]]
    batches += [[p.prompt] for p in prompts or ()] + [[p.negative] for p in prompts or ()]
    return EncodedPrompts(parts.prompt_encoder(data.clip_skip, data.max_windows), batches)


@dataclasses.dataclass
class Samples:
    """Sampling during a run. `text`: the prompts encoded before the text encoders left the device (None:
    they stayed, as they train); `base_hash`: the base weights' fingerprint, for the PNG text."""

    accelerator: Any
    method: Any  # trainers.method.Method
    config: Any  # trainers.config.Config
    output: Path
    autocast: Callable[[], Any]
    prompts: list[SamplePrompt] | None
    base_hash: str
    text: Any = None  # ldmcore.pipeline.EncodedPrompts

    def due(self, step: int) -> bool:
        every = self.config.validation.every
        last = step == self.config.train.max_steps
        return wanted(self.config, self.prompts) and ((every and step % every == 0) or last)

    @torch.no_grad()
    def run(self, step: int, engine) -> None:
        """Sample on the main process and save the pictures; the others wait (below ZeRO-3 they first lend
        it their parts of the weights)."""
        with engine.full_weights():
            if self.accelerator.is_main_process:
                self._sample(step)
            self.accelerator.wait_for_everyone()
        self.accelerator.wait_for_everyone()

    def _sample(self, step: int) -> None:
        parts = self.method.components
        denoiser = parts.denoiser
        was_training = denoiser.training
        denoiser.eval()
        if torch.cuda.is_available():  # hand the activations' cached blocks to sampling
            torch.cuda.empty_cache()
        # the VAE comes back for the sampling; the text encoders only if the prompts were not encoded before
        frozen = [m for m in (parts.vae, *(parts.text_encoders.values() if self.text is None else ()))
                  if m.device != denoiser.device]
        for model in frozen:
            model.to(denoiser.device)
        try:
            fault_point("validation")
            grid, own = self._generate()
        finally:
            for model in frozen:
                model.to("cpu")
        denoiser.train(was_training)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        path = self.output / "samples" / f"step_{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if grid:
            self._save_grid(grid, path, step)
        if own:
            self._save_own(own, path, step)

    def _generate(self) -> tuple[list, list]:
        vc, method = self.config.validation, self.method
        common = dict(sampler=vc.sampler, clip_skip=self.config.data.clip_skip, prompt_encoder=self.text)
        grid = []
        with self.autocast():
            for seed in vc.seeds if vc.prompts else ():
                grid += method.generate(vc.prompts, seed, steps=vc.steps, guidance_scale=vc.guidance_scale, **common)
            own = [method.generate([p.prompt], self._seed(p), steps=p.steps or vc.steps,
                                   guidance_scale=self._guidance(p), negative_prompt=p.negative, height=p.height,
                                   width=p.width, **common)[0]
                   for p in self.prompts or ()]
        return grid, own

    def _seed(self, p: SamplePrompt) -> int:
        return self.config.validation.seeds[0] if p.seed is None else p.seed

    def _guidance(self, p: SamplePrompt) -> float | None:
        return self.config.validation.guidance_scale if p.guidance is None else p.guidance

    def _save_grid(self, images: list, path: Path, step: int) -> None:
        """validation.prompts across, seeds down."""
        from PIL import Image

        vc = self.config.validation
        w, h = images[0].size
        cols = len(vc.prompts)
        grid = Image.new("RGB", (w * cols, h * len(vc.seeds)))
        for i, im in enumerate(images):
            grid.paste(im, ((i % cols) * w, (i // cols) * h))
        fault_point("samples_write", path)
        grid.save(path)
        self._log_image("validation", grid, step)

    def _save_own(self, images: list, path: Path, step: int) -> None:
        """Each sample prompt's picture with how it was made in its PNG text, A1111's way."""
        from PIL.PngImagePlugin import PngInfo

        from ldmcore.pngmeta import a1111_parameters

        vc, parts = self.config.validation, self.method.components
        for i, (p, im) in enumerate(zip(self.prompts, images)):
            guidance = self._guidance(p)
            settings = {"steps": p.steps or vc.steps, "sampler": vc.sampler or parts.schedule.default_sampler,
                        "cfg_scale": parts.family.default_guidance_scale if guidance is None else guidance,
                        "seed": self._seed(p), "width": im.width, "height": im.height,
                        "model_hash": self.base_hash[:10],
                        "model_name": f"{Path(self.config.model.path).stem} (step {step})"}
            info = PngInfo()
            info.add_text("parameters", a1111_parameters(p.prompt, p.negative, [], settings))
            own_path = path.with_name(f"step_{step:08d}_{i:02d}.png")
            fault_point("samples_write", own_path)
            im.save(own_path, pnginfo=info)
        self._log_image("samples", _row(images), step)

    def _log_image(self, name: str, image, step: int) -> None:
        """A picture to every tracker in use; a tracker that fails only warns (logging never ends a run)."""
        for tracker in self.config.logging.report_to:
            try:
                if tracker == "tensorboard":
                    self.accelerator.get_tracker("tensorboard", unwrap=True).add_image(
                        name, np.asarray(image), step, dataformats="HWC")
                elif tracker == "wandb":
                    import wandb

                    self.accelerator.get_tracker("wandb", unwrap=True).log({name: wandb.Image(image)}, step=step)
            except Exception as e:
                log.warning("could not log the %s picture to %s: %s", name, tracker, e)


def _row(images):
    """Pictures side by side (of any sizes), on black."""
    from PIL import Image

    row = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)))
    x = 0
    for im in images:
        row.paste(im, (x, 0))
        x += im.width
    return row
