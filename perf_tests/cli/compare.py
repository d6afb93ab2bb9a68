"""``python -m perf_tests compare BASELINE CANDIDATE...``: the verdict of candidate runs against a
baseline."""

from __future__ import annotations

import argparse
import sys

from perf_tests.cli.options import VERDICT_RULES, build_policy, gate_options, output_options, policy_options


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="compare a candidate run with a baseline", epilog=VERDICT_RULES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("baseline", help="baseline file, result JSON, or baseline folder (e.g. baselines)")
    p.add_argument("candidate", nargs="+",
                   help="result JSON run(s) or their .journal.jsonl (a killed run's journal); several are "
                        "merged")
    gate_options(p)
    policy_options(p)
    output_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from perf_tests.tools.compare import load_and_compare

    outcome = load_and_compare(args.baseline, args.candidate, build_policy(args),
                               require_baseline=args.require_baseline)
    return emit(outcome, args)


def emit(outcome, args: argparse.Namespace) -> int:
    """Warnings to stderr, the report in --format to stdout or --output, every format to --report-dir."""
    from perf_tests.report.job_summary import append_step_summary
    from perf_tests.report.verdict import plot_flagged
    from perf_tests.tools.compare import exit_code, render, write_reports

    for w in outcome.warnings:
        print(f"warning: {w}", file=sys.stderr)
    text = render(outcome, args.format)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    elif outcome.comparison is not None:  # else the warnings above said it all
        sys.stdout.write(text)
    if args.step_summary:
        append_step_summary([render(outcome, "markdown")])
    if args.report_dir:
        for kind, path in write_reports(outcome, args.report_dir, args.stem).items():
            print(f"{'plot' if kind.startswith('plot:') else 'report'}: {path}", file=sys.stderr)
    elif args.plot_dir and outcome.comparison is not None:
        for path in plot_flagged(outcome.comparison, outcome.baseline, outcome.candidate, args.plot_dir):
            print(f"plot: {path}", file=sys.stderr)
    return exit_code(outcome, fail_on_inconclusive=args.fail_on_inconclusive, require_all=args.require_all)
