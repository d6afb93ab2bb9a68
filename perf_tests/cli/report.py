"""``python -m perf_tests report RUN...``: the study table (and the optimization ladder) of saved runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from perf_tests.errors import EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="the study table (median time, %% improvement per batch size)")
    p.add_argument("runs", nargs="+", help="result JSON runs (torch1 and torch2 may be mixed)")
    p.add_argument("--reference", default="original", help="reference row (default %(default)s)")
    p.add_argument("--kind",
                   help="one case kind (txt2img, unet-step, ...); default: a table per kind present")
    p.add_argument("--format", choices=("markdown", "text"), default="markdown")
    p.add_argument("--output", type=Path)
    p.add_argument("--plot", type=Path,
                   help="write the bar chart PNG here (FILE-<kind>.png for each of several tables)")
    p.add_argument("--layout", choices=("configurations", "study"), default="configurations",
                   help="study: the PyTorch 2 study's tables, one per batch size, its release pair against "
                        "the current one (runs of torch1, torch20 and torch2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from perf_tests.records.results import read_run
    from perf_tests.report.study import study_text, write_study

    runs = [read_run(p) for p in args.runs]
    if args.layout == "study":
        return _study_layout(runs, args)
    if args.output:
        written = write_study(runs, args.output, reference=args.reference, kind=args.kind, fmt=args.format,
                              plot=args.plot)
    else:
        text, _ = study_text(runs, reference=args.reference, kind=args.kind, fmt=args.format)
        sys.stdout.write(text)
        written = write_study(runs, None, reference=args.reference, kind=args.kind, plot=args.plot)
    for path in written:
        if path.suffix == ".png":
            print(f"plot: {path}", file=sys.stderr)
    return EXIT_OK


def _study_layout(runs: list, args: argparse.Namespace) -> int:
    """The study's tables (perf_tests.report.study.build_study_layout) as Markdown, and its figure."""
    from perf_tests.report.study import build_study_layout, plot_study

    layout = build_study_layout(runs, args.kind or "txt2img")
    text = layout.to_markdown()
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if args.plot and layout.batch_sizes:
        print(f"plot: {plot_study(layout.as_study_table(), args.plot)}", file=sys.stderr)
    return EXIT_OK
