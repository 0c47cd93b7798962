"""`ldm-tune COMMAND ...`: the one command, installed with the package.

Each command is the room's own entry point, so `python -m trainers`, `python -m data_tools` and
`python -m adapters` keep working and take the same arguments:

  ldm-tune train CONFIG [key=value ...]          python -m trainers (also under accelerate launch -m ldm_tune)
  ldm-tune scan PATH | precompute CONFIG ...     python -m data_tools scan | precompute
  ldm-tune export | merge | inspect ...          python -m adapters export | merge | inspect
  ldm-tune generate MODEL "prompt" [--lora FILE[:WEIGHT] ...]   pictures from any base the core loads
"""
from __future__ import annotations

import sys

USAGE = "\n\n".join(__doc__.split("\n\n")[1:3])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(f"usage: ldm-tune COMMAND ...\n\n{USAGE}\n\nldm-tune COMMAND --help says more.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from trainers.__main__ import main as train

        return train(rest)
    if command in ("scan", "precompute"):
        from data_tools.__main__ import main as data

        return data([command, *rest])
    if command in ("export", "merge", "inspect"):
        from adapters.__main__ import main as adapters

        return adapters([command, *rest])
    if command == "generate":
        from .generate import main as generate

        return generate(rest)
    print(f"ldm-tune: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2
