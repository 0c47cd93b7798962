"""Generation settings in a PNG's text metadata, the way A1111 writes them (`parameters`: the prompt,
`Negative prompt: ...`, then `Steps: .., Sampler: .., CFG scale: .., Seed: .., Size: WxH, ...`), so that
A1111's PNG Info, ComfyUI and image browsers read back how a picture was made."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

#: our sampler names -> A1111's
SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "euler": "Euler", "dpmpp_2m": "DPM++ 2M"}


def file_hash(path: Path, n: int = 12) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:n]


def a1111_parameters(prompt: str, negative: str, loras: list[tuple[Path, float]], settings: dict) -> str:
    """The `parameters` text A1111 writes into its PNGs."""
    tags = "".join(f" <lora:{p.stem}:{w:g}>" for p, w in loras)
    fields = [("Steps", settings["steps"]), ("Sampler", SAMPLER_NAMES.get(settings["sampler"], settings["sampler"])),
              ("CFG scale", settings["cfg_scale"]), ("Seed", settings["seed"]),
              ("Size", f"{settings['width']}x{settings['height']}"), ("Model hash", settings["model_hash"]),
              ("Model", settings["model_name"])]
    if settings.get("true_cfg_scale", 1.0) != 1.0:
        fields.append(("True CFG scale", settings["true_cfg_scale"]))
    if loras:
        fields.append(("Lora hashes", '"' + ", ".join(f"{p.stem}: {file_hash(p)}" for p, _ in loras) + '"'))
    fields.append(("Version", "ldm-tune"))
    lines = [prompt + tags]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def read_parameters(text: str) -> dict[str, str]:
    """The settings line of an A1111 `parameters` text as a dict (and "prompt", "negative")."""
    lines = text.split("\n")
    out = {"prompt": lines[0], "negative": ""}
    for line in lines[1:-1]:
        if line.startswith("Negative prompt: "):
            out["negative"] = line[len("Negative prompt: "):]
    for key, value in re.findall(r'([A-Za-z][A-Za-z0-9 ]*): ("[^"]*"|[^,]*)(?:, |$)', lines[-1]):
        out[key] = value.strip('"')
    return out
