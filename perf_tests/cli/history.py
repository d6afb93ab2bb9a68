"""``python -m perf_tests history``: change points of each case's time over the commits."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from perf_tests.analysis.history import change_point_line, report
from perf_tests.cli.options import store_option
from perf_tests.records.store import Store, describe


def cmd_history(args: argparse.Namespace) -> int:
    with Store.open(args.store) as store:
        groups = report(store, args.device, args.env, args.branch, args.recent)
        where = describe(store.location)
    if not groups:
        print(
            f"{where}: no runs"
            + (f" of {args.device}" if args.device else "")
            + (f" in {args.env}" if args.env else ""),
            file=sys.stderr,
        )
        return 2
    lines, doc = [], []
    for series, steps in groups:
        lines.append(
            f"{series.device_slug} {series.env}: {len(series.commits)} commits, {len(series.medians)} "
            f"cases, {len(steps)} change point(s)"
            + (f" in the last {args.recent} commits" if args.recent else "")
        )
        lines += [change_point_line(s) for s in steps]
        doc.append(
            {
                "device_slug": series.device_slug,
                "env": series.env,
                "commits": len(series.commits),
                "change_points": [asdict(s) for s in steps],
            }
        )
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    if args.summary:
        with open(args.summary, "a", encoding="utf-8") as fh:
            fh.write("## Change points\n\n```\n" + text + "```\n")
    regressions = [s for _, steps in groups for s in steps if s.verdict == "regression"]
    return 1 if args.fail_on_regression and regressions else 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "history", help="change points of each case's time over the commits (E-Divisive means)"
    )
    store_option(p)
    p.add_argument("--device", help="one device slug (default: every device type in the store)")
    p.add_argument("--env", help="one environment, e.g. torch2 (default: each)")
    p.add_argument("--branch", help="only runs recorded on this branch, e.g. main")
    p.add_argument("--recent", type=int, metavar="N", help="only change points within the last N commits")
    p.add_argument("--json", type=Path, help="also write the change points as JSON here")
    p.add_argument(
        "--summary", metavar="FILE", help="append a Markdown section here (e.g. $GITHUB_STEP_SUMMARY)"
    )
    p.add_argument(
        "--fail-on-regression", action="store_true", help="exit 1 when a change point is a regression"
    )
    p.set_defaults(func=cmd_history)
