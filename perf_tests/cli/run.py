"""``python -m perf_tests run [OPTIONS] [-- PYTEST ARGS]``: one perf run end to end
(perf_tests/tools/run.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from perf_tests.cli.options import build_policy, gate_options, policy_options


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run", help="one perf run end to end: suite processes, study table, verdict (run --help)",
        description="One perf run end to end: suite processes, study table, verdict, job summary.",
        epilog="arguments after -- go to pytest, e.g. -- --case-kind unet-step --batch-size 1",
    )
    p.add_argument("--grid", choices=("gate", "full"), help="the suite's grid (default: the suite's, gate)")
    runs = p.add_mutually_exclusive_group()
    runs.add_argument("--runs", type=int, help="suite processes (per side with --ab); default 1")
    runs.add_argument("--budget", type=float, metavar="MINUTES",
                      help="run the suite again while the next run fits in MINUTES of suite time (at least "
                           "once)")
    ab = p.add_mutually_exclusive_group()
    ab.add_argument("--ab", metavar="REF",
                    help="A/B: the current tree against git REF, in pairs whose first turn alternates")
    ab.add_argument("--ab-baseline", action="store_true",
                    help="A/B against the commit the newest run of the committed baselines (--baseline-dir) "
                         "of the suite's device type was recorded at, on any machine of that type")
    p.add_argument("--interleave", choices=("rounds", "runs"), default=None,
                   help="with --ab: 'rounds' (default) starts both processes of a pair together and they "
                        "take "
                        "turns after every timed round; 'runs' runs A, then B")
    p.add_argument("--results", type=Path, help="output folder (default results/<UTC timestamp>)")
    p.add_argument("--label", help="file name prefix (default: the environment, torch1, torch20 or torch2, "
                                   "from the installed torch: perf_tests.records.names.env_label)")
    p.add_argument("--baseline-dir", type=Path, default=Path("baselines"),
                   help="baseline store (default baselines)")
    p.add_argument("--gate", choices=("fail", "warn"), default="fail",
                   help="warn: report timing regressions without failing (failed cases still fail)")
    gate_options(p)
    p.add_argument("--explain", action="store_true",
                   help="profile every case flagged as a regression on both sides (the --ab REF, else "
                        "--explain-ref) and write the operators whose time grew most into the verdict "
                        "(perf_tests explain)")
    p.add_argument("--explain-ref", metavar="REF",
                   help="with --explain and a stored baseline: the git ref to profile against (default: the "
                        "commit the baseline's last run was recorded at)")
    p.add_argument("--store", metavar="PATH|URL|off",
                   help="results store the runs are recorded into and judged against first: a SQLite file or "
                        "postgresql://...; 'off' records nothing (default $SD_PERF_STORE, else "
                        "~/.cache/sd-perf/store.sqlite; docs/store.md)")
    p.add_argument("--baseline-commit", metavar="SHA",
                   help="judge against this commit's runs on this machine in the store (CI: the base "
                        "commit); default the latest recorded commit other than the tree's")
    policy_options(p)
    p.add_argument("--update-baselines", action="store_true", help="record the runs into --baseline-dir")
    p.add_argument("--replace", action="store_true", help="with --update-baselines: start the baseline anew")
    p.set_defaults(func=run, passthrough=[], usage_error=p.error)


def usage_problem(opts: argparse.Namespace) -> str | None:
    """What is wrong with a combination of options, or None."""
    pytest_args = opts.passthrough
    if opts.runs is not None and opts.runs < 1:
        return "--runs must be at least 1"
    if opts.budget is not None and opts.budget <= 0:
        return "--budget must be a positive number of minutes"
    if opts.replace and not opts.update_baselines:
        return "--replace only goes with --update-baselines"
    if opts.interleave is not None and not opts.ab:
        return "--interleave only goes with --ab (it orders the two sides of a pair)"
    if opts.ab and opts.update_baselines:
        return "--update-baselines records this tree's runs; it does not go with --ab"
    if "--benchmark-json" in pytest_args or any(a.startswith("--benchmark-json=") for a in pytest_args):
        return "--benchmark-json is set by run (one file per process, in --results)"
    return None


def run(args: argparse.Namespace) -> int:
    from perf_tests.tools import run as tool

    if args.ab_baseline:
        args.ab = ab_baseline(args)
    problem = usage_problem(args)
    if problem:
        args.usage_error(problem)  # exits 2 with the usage line
    args.interleave = args.interleave or "rounds"
    args.policy = build_policy(args)
    return tool.run(args, args.passthrough)


def ab_baseline(args: argparse.Namespace) -> str:
    """--ab-baseline: the reference commit, said on stderr with where it comes from."""
    from perf_tests.tools.ab import baseline_reference

    found = baseline_reference(args.baseline_dir, args.passthrough)
    edited = " (its tree had uncommitted edits then)" if found.dirty else ""
    print(f"[run] A/B reference {found.commit[:12]}: the newest run of the committed baselines, "
          f"{found.datetime} in {found.path}{edited}", file=sys.stderr, flush=True)
    return found.commit
