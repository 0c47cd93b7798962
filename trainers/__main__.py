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

    from data_tools.locks import FolderBusy
    from data_tools.schema import ConfigError
    from ldmcore.weights import CheckpointError

    from .config import read_config
    from .interrupts import EXIT_RESUME, Interrupted
    from .loop import TrainingStopped, train

    try:
        config = read_config(args.config, args.overrides)
        output = train(config)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (TrainingStopped, FolderBusy, NotImplementedError) as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:  # the first SIGTERM / Ctrl-C: everything needed to go on is on disk
        print(f"interrupted: {e}", file=sys.stderr)
        return EXIT_RESUME
    except KeyboardInterrupt as e:  # the second: stopped at once
        print(f"interrupted: {e or 'Ctrl-C'}; the last complete checkpoint is intact (train.resume=latest)",
              file=sys.stderr)
        return 130
    except OSError as e:  # a write failed outside the places that name what they were writing
        print(f"stopped: {e.strerror or e} ({e.filename}); finished checkpoints and cache shards are intact: "
              "fix it, then run the same command with train.resume=latest", file=sys.stderr)
        return 1
    print(f"done: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
