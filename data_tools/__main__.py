"""`python -m data_tools <command>`: the data tools from the shell.

Each command is a pair: `add_<name>(subparsers)` declares its arguments and sets `run` to a function
taking the parsed arguments and returning the exit code. To add a command, write the pair and list
its `add_` function in COMMANDS. Exit codes: 0 done, 1 ran but produced nothing usable, 2 a bad path
or argument (said in one line on stderr, never a traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_tools.records import REASONS, Manifest

EXAMPLES_PER_REASON = 3
WARNINGS_SHOWN = 5


class UsageError(Exception):
    """A bad path or argument found after parsing; main prints it and exits with 2."""


# ---------------------------------------------------------------------------------------------
# scan


def add_scan(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "scan", help="check a dataset's images and captions and write a report of what can be trained on",
        description="Decode every image once and report which are usable and why each other file is not. "
                    "PATH is a folder of images (captions in <stem>.txt / <stem>.caption sidecars or in "
                    "metadata.jsonl / metadata.csv) or a dataset saved with datasets' save_to_disk.")
    p.add_argument("path", metavar="PATH", help="folder of images, or a saved datasets folder")
    p.add_argument("--instance-prompt", help="DreamBooth: the caption of instance images that have none")
    p.add_argument("--class-path", help="DreamBooth: folder of class (prior preservation) images")
    p.add_argument("--class-prompt", help="DreamBooth: the caption of the class images")
    p.add_argument("--min-side", type=int, default=256, metavar="N", help="skip images whose shorter side is under N px (256)")
    p.add_argument("--max-aspect", type=float, default=4.0, metavar="X", help="skip images longer than X:1 (4.0)")
    p.add_argument("--report", metavar="FILE",
                   help="where to write the JSON report (default PATH/scan_report.json, else ./scan_report.json)")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="decoding threads (default up to 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_scan)


def run_scan(args: argparse.Namespace) -> int:
    from data_tools.scan import ScanError, scan  # imported here so that `--help` stays instant

    try:
        manifest = scan(args.path, instance_prompt=args.instance_prompt, class_path=args.class_path,
                        class_prompt=args.class_prompt, min_side=args.min_side, max_aspect=args.max_aspect,
                        progress=not args.no_progress, workers=args.workers)
    except ScanError as e:
        raise UsageError(str(e)) from None
    report = _save_report(manifest, args.report)
    print(summary(manifest))
    print(f"report: {report}")
    if not any(r.role == "instance" for r in manifest.records):
        print(f"\nno usable training images in {manifest.root}. Fix or replace the files listed above "
              f"(full list in {report}), or point PATH at the folder that holds the images "
              "(jpg, png, webp, ...; captions in <stem>.txt beside them).", file=sys.stderr)
        return 1
    return 0


def _save_report(manifest: Manifest, requested: str | None) -> Path:
    """Write the report where asked; by default beside the data, else in the working folder."""
    if requested:
        try:
            manifest.save(requested)
        except OSError as e:
            raise UsageError(f"{requested}: cannot write the report ({e.strerror or e}); choose another --report") from None
        return Path(requested)
    for folder in (Path(manifest.root), Path.cwd()):
        try:
            manifest.save(folder / "scan_report.json")
            return folder / "scan_report.json"
        except OSError:
            continue
    raise UsageError(f"cannot write scan_report.json in {manifest.root} or {Path.cwd()}; pass --report FILE")


def summary(manifest: Manifest) -> str:
    """What a person needs from a scan: how many images are usable, what was skipped and why, with a
    few examples each, and how many warnings there are."""
    root = manifest.root + os.sep

    def short(source: str) -> str:
        return source[len(root):] if source.startswith(root) else source

    roles: dict[str, int] = {}
    for r in manifest.records:
        roles[r.role] = roles.get(r.role, 0) + 1
    by_role = " (" + ", ".join(f"{n} {role}" for role, n in roles.items()) + ")" if len(roles) > 1 else ""
    lines = [f"{manifest.root}: {len(manifest.records)} usable images{by_role}, "
             f"{len(manifest.skipped)} skipped, {len(manifest.warnings)} warnings"]
    for reason, count in manifest.skipped_by_reason().items():
        lines.append(f"  skipped {count} {reason} ({REASONS.get(reason, reason)}):")
        examples = [s for s in manifest.skipped if s.reason == reason]
        for s in examples[:EXAMPLES_PER_REASON]:
            lines.append(f"    {short(s.source)}: {s.detail}")
        if count > EXAMPLES_PER_REASON:
            lines.append(f"    ... and {count - EXAMPLES_PER_REASON} more")
    if manifest.warnings:
        lines.append(f"  warnings ({len(manifest.warnings)}):")
        lines += [f"    {w}" for w in manifest.warnings[:WARNINGS_SHOWN]]
        if len(manifest.warnings) > WARNINGS_SHOWN:
            lines.append(f"    ... and {len(manifest.warnings) - WARNINGS_SHOWN} more in the report")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# precompute


def add_precompute(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "precompute", help="encode every image and caption once into the cache the trainers read",
        description="Read the model and data sections of CONFIG (a training config works as is), scan the "
                    "data, and encode what the cache lacks. Safe to rerun; under `accelerate launch -m "
                    "data_tools precompute` every process encodes its share.")
    p.add_argument("config", metavar="CONFIG", help="YAML with model.path and a data section")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.resolution=768")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_precompute)


def run_precompute(args: argparse.Namespace) -> int:
    from pydantic import ConfigDict

    from data_tools.config import DataConfig, ModelConfig
    from data_tools.locks import FolderBusy
    from data_tools.precompute import cache_dir_for, prepare_cache, process_state
    from data_tools.schema import ConfigError, Strict, load_config
    from ldmcore.weights import CheckpointError

    class PrecomputeConfig(Strict):
        model_config = ConfigDict(extra="ignore")  # the other sections of a training config
        model: ModelConfig
        data: DataConfig

    try:
        cfg = load_config(PrecomputeConfig, args.config, args.overrides)
        state = process_state()
        parts = cfg.model.load(device=state.device)
        plan, report = prepare_cache(cfg.data, parts.vae, parts.prompt_encoder(cfg.data.clip_skip, cfg.data.max_windows),
                                     progress=not args.no_progress)
    except (ConfigError, CheckpointError, ValueError, FolderBusy) as e:
        raise UsageError(str(e)) from None
    except OSError as e:  # a full disk, a read-only folder: finished shards are kept
        raise UsageError(f"could not write the cache: {e.strerror} ({e.filename}); the shards finished so far are "
                         "kept: fix it and run the same command again") from None
    if state.is_main_process:
        print(f"cache: {cache_dir_for(cfg.data)}")
        print(f"  {len(plan.items)} images; {report.already_cached} views already cached; "
              f"encoded {report.images_encoded} views here at {report.images_per_second:.1f} images/s "
              f"and {report.captions_encoded} captions")
    return 0


# ---------------------------------------------------------------------------------------------
# the dispatcher

COMMANDS = [add_scan, add_precompute]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description="Prepare training data for ldm-tune.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    # argparse exits with 2 and the usage on a bad argument. key=value overrides may come after
    # flags too, which plain positional parsing would refuse: collect those for commands taking them.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
