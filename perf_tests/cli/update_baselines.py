"""``python -m perf_tests update-baselines RUN...``: merge runs into the baseline store."""

from __future__ import annotations

import argparse
from pathlib import Path

from perf_tests.errors import EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser("update-baselines", help="merge runs into baselines/<device>/<env>-<profile>.json")
    p.add_argument("runs", nargs="+", help="result JSON runs (each from its own process)")
    p.add_argument("--baseline-dir", type=Path, default=Path("baselines"))
    p.add_argument("--replace", action="store_true",
                   help="start the baseline anew instead of adding runs to it")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from perf_tests.records.baselines import update_baselines

    for u in update_baselines(args.runs, args.baseline_dir, args.replace):
        if u.removed_temp_files:
            print(f"{u.path}: removed {len(u.removed_temp_files)} temporary file(s) of an interrupted update")
        if u.added:
            print(f"wrote {u.path}: {len(u.added)} run(s) added, {len(u.baseline.runs)} in all, "
                  f"{len({n for r in u.baseline.runs for n in r.cases})} cases")
        else:
            print(f"{u.path}: unchanged, no new run")
        if u.duplicates:
            print(f"  already there (same content hash), not added again: {', '.join(u.duplicates)}")
        for note in u.notes:
            print(f"  note: {note}")
    return EXIT_OK
