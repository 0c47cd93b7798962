import sys

from ldm_tune.cli import main

sys.exit(main())
