"""``python -m perf_tests COMMAND``: one module per subcommand in this package.

Each module holds ``add_parser(subparsers)``, which declares the command's options (the shared ones come
from :mod:`perf_tests.cli.options`) and sets ``func``, the function that runs it and returns the exit
code. The work itself lives in the layers below; a command never calls another command.

Exit codes (:mod:`perf_tests.errors`): 0 pass; 1 a regression or a failed case; 2 bad input, usage, or any
error inside the gate, printed as one ``error: ...`` paragraph without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from perf_tests.errors import EXIT_BAD_INPUT, InputError

# In the order of `python -m perf_tests --help`; module names under perf_tests.cli.
COMMANDS = ("run", "compare", "update_baselines", "report", "explain", "bisect", "parity", "store", "history",
            "dashboard", "fleet", "pr_comment")


def build_parser() -> argparse.ArgumentParser:
    from perf_tests.cli.options import VERDICT_RULES

    parser = argparse.ArgumentParser(
        prog="python -m perf_tests",
        description="Regression gate for the perf_tests benchmark suite.",
        epilog=VERDICT_RULES + "exit codes: 0 pass, 1 regression or failed case, 2 bad input or an error in "
                               "the gate.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"perf_tests.cli.{name}").add_parser(sub)
    return parser


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the command's own arguments, those after the first ``--``, which `run` hands to pytest)."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """A command that takes arguments for another program (``passthrough``) gets those after ``--``; for
    the others ``--`` keeps argparse's meaning (the end of the options)."""
    parser = build_parser()
    own, passthrough = split_passthrough(argv)
    args = parser.parse_args(own)
    if "passthrough" in vars(args):
        args.passthrough = passthrough
    elif passthrough or "--" in argv:
        args = parser.parse_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except Exception as exc:  # a crash inside the gate must never read as a regression (exit 1)
        where = traceback.extract_tb(exc.__traceback__)[-1]
        print(
            f"error: internal error in `python -m perf_tests {args.command}`: {type(exc).__name__}: {exc} "
            f"(at {Path(where.filename).name}:{where.lineno}). This is a bug in the gate, not a verdict on "
            "the "
            "code measured; the inputs may be unusual. Please report it with the command line and input "
            "files.",
            file=sys.stderr,
        )
    return EXIT_BAD_INPUT
