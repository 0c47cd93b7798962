"""`python -m trainers CONFIG [key=value ...]`, or `accelerate launch -m trainers CONFIG ...`."""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainers",
        description="Train LoRA, DreamBooth, full, inpainting or ControlNet models from a YAML config.",
    )
    parser.add_argument("config", metavar="CONFIG", help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from data_tools.schema import ConfigError
    from ldmcore.weights import CheckpointError

    from .config import read_config
    from .loop import TrainingStopped, train

    try:
        config = read_config(args.config, args.overrides)
        output = train(config)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingStopped, NotImplementedError) as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1
    print(f"done: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
