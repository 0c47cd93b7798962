"""`ldm-tune generate MODEL "prompt"`: pictures from any base the core loads, with LoRAs at given weights.

Each picture is a PNG whose text metadata holds its settings twice: `parameters`, in the layout
A1111 writes (prompt with `<lora:name:weight>` tags, `Negative prompt:`, then `Steps: .., Sampler: ..,
CFG scale: .., Seed: .., Size: WxH, Model hash: ..`), which A1111's PNG Info, ComfyUI and image
browsers read back; and `ldm_tune`, the same as JSON with the exact file paths.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ldmcore.pngmeta import SAMPLER_NAMES, a1111_parameters, read_parameters  # noqa: F401

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def parse_lora(spec: str) -> tuple[Path, float]:
    """FILE or FILE:WEIGHT (weight 1 by default)."""
    path, sep, weight = spec.rpartition(":")
    if sep:
        try:
            return Path(path), float(weight)
        except ValueError:
            pass
    return Path(spec), 1.0


def parse_size(text: str) -> tuple[int, int]:
    """"WxH" -> (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        return w, h
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1024x768") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a diffusers folder or an original single file (SD 1.x/2.x, SDXL, Flux.1)")
    p.add_argument("prompt", nargs="+", metavar="PROMPT", help="one picture set per prompt")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a LoRA file (diffusers or kohya layout) merged at WEIGHT (default 1); repeat for several")
    p.add_argument("--negative", default="", metavar="TEXT", help="negative prompt")
    p.add_argument("--seed", type=int, default=0, help="the first picture's seed; the others count up from it")
    p.add_argument("--count", type=int, default=1, metavar="N", help="pictures per prompt (seeds SEED .. SEED+N-1)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sampler", choices=sorted(SAMPLER_NAMES), help="default: the model's (DPM++ 2M; Euler for Flux)")
    p.add_argument("--guidance", type=float, metavar="SCALE",
                   help="CFG scale (Flux.1-dev: the embedded guidance); default: the family's (7.5, SDXL 5, Flux 3.5)")
    p.add_argument("--true-cfg", type=float, default=1.0, metavar="SCALE", help="Flux: real CFG with the negative prompt")
    p.add_argument("--size", type=parse_size, metavar="WxH", help="default: the model's native size")
    p.add_argument("--out", default="outputs", metavar="DIR", help="folder for the PNGs (default ./outputs)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--device", help="default cuda when there is a GPU, else cpu")
    p.add_argument("--tokenizer", help="single files: a tokenizer/ folder (as model.tokenizer)")
    p.add_argument("--config", help="single files: a diffusers folder (as model.config; Flux transformer files need it)")
    p.add_argument("--clip-skip", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ldm-tune generate", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    from ldmcore.weights import CheckpointError

    try:
        written = generate_pictures(args)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def generate_pictures(args: argparse.Namespace) -> list[Path]:
    import torch
    from PIL.PngImagePlugin import PngInfo

    from adapters.lora import merge_lora
    from data_tools.config import ModelConfig
    from data_tools.store import fingerprint
    from ldmcore.pipeline import generate

    loras = [parse_lora(s) for s in args.lora]
    for path, _ in loras:
        if not path.is_file():
            raise ValueError(f"--lora {path}: no such file")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")])
    # loaded in the dtype it samples in (Flux.1 in float32 would need 48 GB); merging computes each layer's
    # sum in float32 and stores it back in that dtype
    parts = ModelConfig(path=args.model, tokenizer=args.tokenizer, config=args.config).load(dtype=dtype)
    model_hash = fingerprint(parts.denoiser)[:10]  # of the base, before any LoRA
    for path, weight in loras:
        if weight != 0:
            merge_lora(parts, path, scale=weight)
    parts.to(device=device)

    family = parts.family
    guidance = family.default_guidance_scale if args.guidance is None else args.guidance
    width, height = args.size or (None, None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = 1 + max((int(f.name.split("-")[0]) for f in out.glob("[0-9]*-*.png") if f.name.split("-")[0].isdigit()),
                    default=-1)
    written = []
    for prompt in args.prompt:
        for seed in range(args.seed, args.seed + args.count):
            image = generate(parts, prompt, negative_prompt=args.negative, seed=seed, height=height, width=width,
                             steps=args.steps, guidance_scale=guidance, true_cfg_scale=args.true_cfg,
                             sampler=args.sampler, clip_skip=args.clip_skip)[0]
            settings = {"steps": args.steps, "sampler": args.sampler or parts.schedule.default_sampler,
                        "cfg_scale": guidance, "true_cfg_scale": args.true_cfg, "seed": seed, "width": image.width,
                        "height": image.height, "model_hash": model_hash, "model_name": Path(args.model).stem,
                        "family": family.name, "clip_skip": args.clip_skip, "dtype": str(dtype).removeprefix("torch.")}
            info = PngInfo()
            info.add_text("parameters", a1111_parameters(prompt, args.negative, loras, settings))
            info.add_text("ldm_tune", json.dumps({"prompt": prompt, "negative_prompt": args.negative,
                                                  "model": str(args.model),
                                                  "loras": [{"file": str(p), "weight": w} for p, w in loras],
                                                  **settings}))
            path = out / f"{index:05d}-{seed}.png"
            image.save(path, pnginfo=info)
            written.append(path)
            index += 1
    return written
