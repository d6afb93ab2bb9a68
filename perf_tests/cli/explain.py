"""``python -m perf_tests explain REF CASE...``: the operators that got slower, current tree vs REF."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from perf_tests.cli.options import check_case_name, profile_kwargs, profile_options
from perf_tests.errors import EXIT_BAD_INPUT, EXIT_OK
from perf_tests.tools import explain


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="operator-level profile diff of a case: current tree vs a git ref",
                       description=explain.__doc__.split("\n\n")[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref", metavar="BASELINE_REF",
                   help="git ref profiled as the baseline (temporary worktree)")
    p.add_argument("cases", metavar="CASE", nargs="+",
                   help="benchmark name(s), e.g. 'test_unet_step[tiny-sdpa-eager-bs1-fp32]'")
    profile_options(p)
    p.add_argument("--output-dir", type=Path, default=Path("results/explain"),
                   help="traces, per-process summaries and explain.{txt,md,json} (default %(default)s)")
    p.add_argument("--format", choices=tuple(explain.RENDERERS), default="text",
                   help="printed report (default %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in args.cases:
        check_case_name(name)
    t0 = time.perf_counter()
    diffs = explain.explain_cases(args.ref, args.cases, args.output_dir, **profile_kwargs(args),
                                  log=lambda m: print(m, file=sys.stderr, flush=True))
    explain.write_reports(diffs, args.output_dir)
    sys.stdout.write(explain.RENDERERS[args.format](diffs))
    print(f"[explain] {time.perf_counter() - t0:.0f} s; reports in {args.output_dir}/explain.{{txt,md,json}}",
          file=sys.stderr)
    return EXIT_BAD_INPUT if any(d.error for d in diffs) else EXIT_OK
