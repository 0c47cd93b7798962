"""Typed model configs read from diffusers `config.json` files, and the one way every core model is
built, loaded and saved (`from_config`, `from_pretrained`, `save_pretrained`)."""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .weights import CheckpointError, find_weights, load_strict, read_state_dict, write_safetensors

C = TypeVar("C", bound="ModelConfig")


@dataclasses.dataclass
class ModelConfig:
    """Base for model configs. Field names are diffusers' config keys.

    `_fixed` lists diffusers keys this core does not implement, with the only value it accepts;
    a config asking for anything else is refused with the key named, instead of silently building
    a different model.
    """

    _fixed: ClassVar[dict[str, Any]] = {}
    _class_name: ClassVar[str] = ""

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any], source: str = "config") -> C:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, ignored = {}, []
        for key, value in d.items():
            if key in names:
                kwargs[key] = tuple(value) if isinstance(value, list) else value
            elif key in cls._fixed:
                if value != cls._fixed[key] and not (value in (None, [], ()) and cls._fixed[key] in (None, [], ())):
                    raise CheckpointError(
                        f"{source}: {key}={value!r} is not supported by ldmcore.{cls.__name__.replace('Config', '')} "
                        f"(only {cls._fixed[key]!r} is implemented)"
                    )
            elif not key.startswith("_"):
                ignored.append(key)
        if ignored:
            warnings.warn(f"{source}: ignoring unknown config keys {sorted(ignored)}", stacklevel=2)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"_class_name": self._class_name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def maybe_checkpoint(module: nn.Module, *args):
    """Run `module(*args)`, recomputing it in the backward pass when the module has
    `gradient_checkpointing` set and gradients are being recorded."""
    if getattr(module, "gradient_checkpointing", False) and module.training and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class ConfigModel(nn.Module):
    """A module built from a `ModelConfig`, stored as a diffusers component folder."""

    config_class: ClassVar[type[ModelConfig]]
    weights_name: ClassVar[str] = "diffusion_pytorch_model"

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    @classmethod
    def from_config(cls, config: ModelConfig | dict[str, Any]):
        if isinstance(config, dict):
            config = cls.config_class.from_dict(config)
        return cls(config)

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ):
        folder = Path(folder)
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{folder}: no config.json; expected a diffusers component folder")
        try:
            raw = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
        config = cls.config_class.from_dict(raw, source=str(cfg_path))
        with torch.device("meta"):
            model = cls(config)
        weights = find_weights(folder, cls.weights_name)
        state = read_state_dict(weights)
        model.to_empty(device=device)
        load_strict(model, state, str(weights))
        if dtype is not None:
            model.to(dtype)
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        write_safetensors(self.state_dict(), folder / f"{self.weights_name}.safetensors")

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the first floating-point parameter's (a quantised base's weights are bytes)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
