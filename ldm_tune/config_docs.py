"""docs/config.md, generated from the typed training schema (`trainers.config.Config`), so the reference
cannot drift from the code: every section and key with its type, default and the comment written beside
it in the source. `python -m ldm_tune.config_docs > docs/config.md` (or `make docs`) writes it;
tests/test_docs.py fails when the page is out of date.
"""
from __future__ import annotations

import inspect
import io
import json
import re
import sys
import tokenize
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

PAGE = Path(__file__).resolve().parent.parent / "docs" / "config.md"

HEADER = """# Configuration reference

Generated from the typed schema (`trainers/config.py`, `data_tools/config.py`) by
`python -m ldm_tune.config_docs`; do not edit by hand (`make docs` writes it, and a test fails when it is
out of date). A training config is YAML with these sections; any key can be overridden on the command
line as `section.key=value` (`train.learning_rate=1e-4`, `lora.targets=[attn2.to_k, attn2.to_v]`).
Keys without a default must be given. Unknown keys are refused, naming the closest valid one.
"""


def field_comments(cls: type) -> dict[str, str]:
    """name -> the comment on a field's line (or the comment lines right above it) in the class's source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    above: list[str] = []
    lines = source.splitlines()
    line_comment = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line_comment[tok.start[0]] = tok.string.lstrip("#").strip()
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        match = re.match(r"^(\w+)\s*:", stripped)
        if stripped.startswith("#"):
            above.append(line_comment.get(number, ""))
            continue
        if match and line.startswith("    ") and not line.startswith("     "):
            text = line_comment.get(number, "")
            comments[match.group(1)] = " ".join([*above, text]).strip() if above and not text else (text or " ".join(above))
        above = []
    return comments


def type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(names) + (" \\| null" if type(None) in args else "")
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section (below)"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field) -> str:
    if field.is_required():
        return "(required)"
    value = field.default if field.default is not PydanticUndefined else field.default_factory()
    if isinstance(value, BaseModel):
        return ""
    return f"`{json.dumps(value, default=str)}`"


def sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """(dotted name, model) for `model`'s nested sections, depth first."""
    found = []
    for name, field in model.model_fields.items():
        annotation, suffix = field.annotation, ""
        if typing.get_origin(annotation) is list and _is_model(typing.get_args(annotation)[0]):
            annotation, suffix = typing.get_args(annotation)[0], "[]"  # a list of sections: each item one
        if _is_model(annotation):
            dotted = f"{prefix}{name}{suffix}"
            found.append((dotted, annotation))
            found += sections(annotation, dotted + ".")
    return found


def _is_model(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def render() -> str:
    from trainers.config import Config

    out = [HEADER]
    top = [(name, f) for name, f in Config.model_fields.items()
           if not (isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel))]
    out.append("## Top level\n")
    out += _table(Config, top)
    for dotted, model in sections(Config):
        out.append(f"## `{dotted}`\n")
        doc = inspect.cleandoc(model.__doc__ or "")
        if doc and not doc.startswith("Base for config sections"):
            out.append(" ".join(doc.split()) + "\n")
        fields = [(name, f) for name, f in model.model_fields.items()
                  if not (isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel))]
        if fields:
            out += _table(model, fields)
    return "\n".join(out).rstrip() + "\n"


def _table(model: type[BaseModel], fields) -> list[str]:
    comments = {}
    for cls in reversed(model.__mro__):
        if isinstance(cls, type) and issubclass(cls, BaseModel):
            comments.update(field_comments(cls))
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in fields:
        meaning = comments.get(name, "").replace("|", "\\|")
        rows.append(f"| `{name}` | {type_name(field.annotation)} | {default_text(field)} | {meaning} |")
    return rows + [""]


if __name__ == "__main__":
    sys.stdout.write(render())
