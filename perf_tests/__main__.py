"""``python -m perf_tests``: the commands of :mod:`perf_tests.cli`."""

import sys

from perf_tests.cli import main

if __name__ == "__main__":
    sys.exit(main())
