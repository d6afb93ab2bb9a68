"""``python -m perf_tests bisect GOOD BAD --case NAME``: the first commit that slowed a case down."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from perf_tests.cli.options import check_case_name, profile_kwargs, profile_options
from perf_tests.errors import EXIT_FAIL, EXIT_OK, InputError
from perf_tests.tools import bisect


def add_parser(sub) -> None:
    p = sub.add_parser("bisect", help="find the commit between GOOD and BAD that slowed a case down",
                       description=bisect.__doc__.split("\n\n")[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("good", metavar="GOOD", help="a git ref where the case is fast")
    p.add_argument("bad", metavar="BAD", help="a later git ref (first-parent descendant) where it is slow")
    p.add_argument("--case", required=True,
                   help="benchmark name, e.g. 'test_unet_step[tiny-sdpa-eager-bs1-fp32]'")
    p.add_argument("--max-steps", type=int, help="commits measured at most (default: log2(commits) + 3)")
    p.add_argument("--runs-per-step", type=int, default=3,
                   help="suite runs of each side per step (default %(default)s)")
    p.add_argument("--max-runs-per-step", type=int,
                   help="runs of each side before an inconclusive step is decided on its estimate (default "
                        "3x)")
    p.add_argument("--output-dir", type=Path, default=Path("results/bisect"),
                   help="bisect.{txt,json} and the operator diff's traces (default %(default)s)")
    p.add_argument("--suite-args", default="",
                   help="more options for each suite run, one string, e.g. '--rounds 20' (--device is passed "
                        "on)")
    p.add_argument("--no-explain", dest="explain", action="store_false",
                   help="skip the operator diff of the first bad commit against its parent")
    profile_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from perf_tests.tools import explain

    check_case_name(args.case, "--case: ")
    if args.runs_per_step < 2:
        raise InputError("--runs-per-step must be at least 2 (the run-to-run spread needs two runs).")
    root = bisect.repo_root()
    suite_extra = shlex.split(args.suite_args) + ([f"--device={args.device}"] if args.device else [])
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    kwargs = profile_kwargs(args)

    def run_explain(parent: Path, first_bad: Path, r: bisect.BisectResult) -> str:
        diffs = explain.explain_trees(parent, first_bad, [args.case], args.output_dir / "explain",
                                      baseline_label=f"parent {r.parent[:12]}",
                                      candidate_label=f"first bad {r.first_bad[:12]}", **kwargs, log=log)
        explain.write_reports(diffs, args.output_dir / "explain")
        return explain.render_text(diffs)

    bisector = bisect.Bisector(root, args.case,
                               lambda tree, case: bisect.measure_with_suite(tree, case, suite_extra),
                               args.runs_per_step, args.max_runs_per_step,
                               explain=run_explain if args.explain else None, log=log)
    result = bisector.run(args.good, args.bad, args.max_steps)
    text = bisect.render_text(result, root)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "bisect.txt").write_text(text, encoding="utf-8")
    (args.output_dir / "bisect.json").write_text(json.dumps(result.as_dict(), indent=1), encoding="utf-8")
    sys.stdout.write(text)
    return EXIT_OK if result.first_bad else EXIT_FAIL
