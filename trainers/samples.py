"""Sample prompts with settings of their own, from a file (`validation.prompts_file`), as kohya's
sample-prompts files write them: one prompt per line, options after it.

    a photo of zorb on a beach --n blurry, lowres --w 768 --h 512 --d 42 --l 6.5 --s 28

`--n` negative prompt, `--w` / `--h` size, `--d` seed, `--l` guidance (CFG) scale, `--s` steps. Lines
starting with # and blank lines are skipped. What a line leaves out comes from the `validation` section
(seeds[0], steps, guidance_scale) and the model (its native size).
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

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
