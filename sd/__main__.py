"""`python -m sd ...`: see sd/cli.py."""

import sys

from sd.cli import main

if __name__ == "__main__":
    sys.exit(main())
