"""`python -m adapters <command>`: LoRA files from the shell.

- `export SOURCE --out DIR`: a LoRA file (or a run's or checkpoint's folder holding
  pytorch_lora_weights.safetensors) -> DIR/pytorch_lora_weights.safetensors (diffusers, peft) and
  DIR/lora_kohya.safetensors (A1111, ComfyUI), metadata kept; a LoHa / LoKr file ->
  DIR/lycoris_kohya.safetensors in our names (LyCORIS' for Flux); a folder may hold that file instead.
- `merge BASE LORA --out PATH [--scale S]`: a model with the LoRA folded in; PATH ending in
  .safetensors is written as an original single file, anything else as a diffusers folder.
- `inspect FILE`: family, format, rank, alpha, targeted modules, text encoders, metadata.

SD 1.x/2.x, SDXL and Flux.1 files alike; `merge` refuses a LoRA for another family than BASE's.

Exit codes: 0 done, 2 a bad path, file or argument (one line on stderr, never a traceback).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


class UsageError(Exception):
    """A bad path or argument found after parsing; main prints it and exits with 2."""


def _lora_file(source: str) -> Path:
    from adapters.lora import DIFFUSERS_FILE
    from adapters.lycoris import LYCORIS_FILE

    path = Path(source)
    if path.is_dir():  # a run's output or checkpoint folder: its LoRA, or its LoHa / LoKr
        found = next((path / f for f in (DIFFUSERS_FILE, LYCORIS_FILE) if (path / f).is_file()), None)
        if found is None:
            raise UsageError(f"{path}: the folder holds no {DIFFUSERS_FILE} or {LYCORIS_FILE}")
        return found
    if not path.is_file():
        raise UsageError(f"{path}: no such file or folder")
    return path


# ---------------------------------------------------------------------------------------------
# export


def add_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a LoRA in the diffusers and the kohya (A1111 / ComfyUI) layouts",
        description="Read a LoRA file in either layout, or a training checkpoint folder holding "
                    "pytorch_lora_weights.safetensors, and write both layouts to DIR.")
    p.add_argument("source", metavar="SOURCE",
                   help="a LoRA or LoHa / LoKr .safetensors file, or a folder holding "
                        "pytorch_lora_weights.safetensors or lycoris_kohya.safetensors")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the two files to")
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    from adapters.lora import DIFFUSERS_FILE, KOHYA_FILE, LoraSettings, load_lora_file, save_diffusers, save_kohya
    from adapters.lycoris import is_lycoris_file

    source = _lora_file(args.source)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    if is_lycoris_file(source):
        return _export_lycoris(source, out)
    lora = load_lora_file(source)
    settings = LoraSettings.from_dict(lora.settings)
    # SDXL's second text encoder, and the denoiser layout the file was read with: SDXL's kohya names need it,
    # and it names the family (the diffusers file's component, Flux's fused kohya names)
    extra = {"text_2_sd": lora.text_encoder_2, "denoiser_config": lora.denoiser_layout}
    save_diffusers(out / DIFFUSERS_FILE, lora.denoiser, lora.text_encoder, lora.user, settings=settings, **extra)
    print(f"wrote {out / DIFFUSERS_FILE}")
    if settings.use_dora:  # save_kohya refuses DoRA; say why instead of failing the whole export
        print(f"skipped {KOHYA_FILE}: DoRA adapters are written in the diffusers layout only")
        return 0
    save_kohya(out / KOHYA_FILE, lora.denoiser, lora.text_encoder, settings, lora.user, **extra)
    print(f"wrote {out / KOHYA_FILE}")
    return 0


def _export_lycoris(source: Path, out: Path) -> int:
    """A LoHa / LoKr file in any spelling we read (OneTrainer's, LyCORIS', kohya's) -> ours, through peft's
    layout: what a run of ours would have written with the file's settings."""
    from adapters.lycoris import LYCORIS_FILE, lycoris_settings, peft_state, read_lycoris, save_lycoris
    from adapters.lora_state import _stored

    lyco = read_lycoris(source)
    settings = lycoris_settings(lyco)
    state = peft_state(lyco, settings)
    user = _stored(lyco.metadata).get("user") or {  # another tool's training notes; its network keys are remade
        k: v for k, v in lyco.metadata.items() if k.startswith("ss_") and not k.startswith("ss_network_")}
    save_lycoris(out / LYCORIS_FILE, state.get("denoiser", {}), state.get("text_encoder"), settings, user,
                 text_2_sd=state.get("text_encoder_2"), denoiser_config=lyco.layout)
    print(f"wrote {out / LYCORIS_FILE}")
    return 0


# ---------------------------------------------------------------------------------------------
# merge


def add_merge(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge", help="fold a LoRA into a model's weights",
        description="Load BASE (a diffusers model folder or an original single file), add scale * LoRA to "
                    "its weights and save it: PATH ending in .safetensors as a single file, else as a "
                    "diffusers folder.")
    p.add_argument("base", metavar="BASE", help="diffusers model folder or single-file checkpoint")
    p.add_argument("lora", metavar="LORA",
                   help="LoRA file (either layout), LoHa / LoKr file, or a folder holding one "
                        "(pytorch_lora_weights / lycoris_kohya.safetensors)")
    p.add_argument("--out", required=True, metavar="PATH", help="output: NAME.safetensors or a folder")
    p.add_argument("--scale", type=float, default=1.0, metavar="S", help="LoRA strength (1.0)")
    p.add_argument("--tokenizer", metavar="FOLDER", help="tokenizer folder, for single files that carry none")
    p.set_defaults(run=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    from adapters.lora import load_lora_file, merge_lora
    from ldmcore.checkpoints import load_components

    lora = _lora_file(args.lora)
    load_lora_file(lora)  # a bad LoRA file is refused before the (large) model is read
    components = load_components(args.base, tokenizer=args.tokenizer)
    merge_lora(components, lora, scale=args.scale)
    out = Path(args.out)
    if out.suffix == ".safetensors":
        components.save_single_file(out)
    else:
        components.save_pretrained(out)
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# inspect


def add_inspect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="say what a LoRA file holds",
                              description="Print a LoRA file's family, format, rank, alpha, targeted modules "
                                          "and metadata.")
    p.add_argument("file", metavar="FILE", help="LoRA file (either layout)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(run=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from adapters.lora import describe
    from adapters.lycoris import describe_lycoris, is_lycoris_file

    path = _lora_file(args.file)
    if is_lycoris_file(path):
        d = describe_lycoris(path)
        print(json.dumps(d, indent=2) if args.json else "\n".join(f"{k + ':':<14} {v}" for k, v in d.items()))
        return 0
    d = describe(path)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    counts = lambda c: ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"  # noqa: E731
    modules = lambda part: f"yes, {d[part + '_modules']} modules" if d[part] else "no"  # noqa: E731
    ranks = "/".join(str(r) for r in d["ranks"])
    lines = [
        f"file:          {d['file']}",
        f"family:        {d['family']}",
        f"format:        {d['format']}{' (DoRA)' if d['dora'] else ''}",
        f"rank:          {ranks}",
        f"alpha:         {d['alpha']:g} (scale {d['alpha'] / d['ranks'][0]:g} at rank {d['ranks'][0]})",
        f"{d['denoiser'] + ' modules:':<14} {d['denoiser_modules']}{' (with conv layers)' if d['conv'] else ''}",
        f"  by kind:     {counts(d['denoiser_kinds'])}",
        f"  by block:    {counts(d['denoiser_blocks'])}",
        f"text encoder:  {modules('text_encoder')}",
        *([f"text encoder 2: {modules('text_encoder_2')}"] if d["family"] == "SDXL" or d["text_encoder_2"] else []),
        f"settings:      {json.dumps(d['settings'])}",
        f"metadata:      {json.dumps(d['metadata'])}",
    ]
    lines += [f"  {k}: {v}" for k, v in sorted(d["file_metadata"].items())]
    print("\n".join(lines))
    return 0


COMMANDS = (add_export, add_merge, add_inspect)


def main(argv: list[str] | None = None) -> int:
    # peft imports bitsandbytes, whose CPU backend warns on import about optional kernels
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(prog="python -m adapters",
                                     description="LoRA export, merge and inspection for ldm-tune.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    from ldmcore.weights import CheckpointError

    try:
        return args.run(args)
    except (UsageError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
