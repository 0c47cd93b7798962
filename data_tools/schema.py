"""Typed configs from YAML: one reader for every command (precompute here, the trainers later).

A config is a pydantic model that forbids unknown keys. `load_config` reads YAML, applies dotted
`key=value` overrides from the command line, and turns validation failures into one message per
problem that names the key: an unknown key gets the closest valid key suggested, a wrong type the
expected type.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    """A config that cannot be used; the message names every offending key."""


def apply_override(tree: dict[str, Any], dotted: str) -> None:
    """`train.learning_rate=1e-4` -> tree["train"]["learning_rate"] = 1e-4 (the value parsed as YAML)."""
    if "=" not in dotted:
        raise ConfigError(f"override {dotted!r} is not of the form key=value (for example train.max_steps=100)")
    key, raw = dotted.split("=", 1)
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None


def _valid_keys(model: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    """The field names of the section at `loc` (for suggestions)."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            return []
        annotation = fields[part].annotation
        current = next((a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def explain(error: ValidationError, model: type[BaseModel], source: str) -> ConfigError:
    lines = []
    for e in error.errors():
        loc = [p for p in e["loc"] if not isinstance(p, int)] or ["(root)"]
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _valid_keys(model, loc), n=1)
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
            lines.append(f"unknown key {key!r}{hint}")
        elif e["type"] == "missing":
            lines.append(f"missing required key {key!r}")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return ConfigError(f"{source}: " + "; ".join(lines))


def load_config(model: type[M], path: str | os.PathLike | None = None, overrides: Sequence[str] = (), data: dict | None = None) -> M:
    """Read `path` (YAML) or `data`, apply overrides, validate against `model`."""
    source = str(path) if path is not None else "config"
    tree: dict[str, Any] = dict(data or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        tree.update(loaded)
    for item in overrides:
        apply_override(tree, item)
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        raise explain(e, model, source) from None


def dump_config(config: BaseModel, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (the run directory keeps what was actually used)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
