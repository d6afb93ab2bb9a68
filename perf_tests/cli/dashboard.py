"""``python -m perf_tests dashboard OUT``: the static HTML site of the store
(perf_tests/report/dashboard.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from perf_tests.cli.options import store_option
from perf_tests.records.store import Store
from perf_tests.report.dashboard import build


def cmd_dashboard(args: argparse.Namespace) -> int:
    with Store.open(args.store) as store:
        pages = build(store, args.output, commit_url=args.commit_url, branch=args.branch)
    for page in pages:
        print(f"wrote {page}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "dashboard", help="a static HTML site of the store: one page per device type and env"
    )
    p.add_argument("output", type=Path, help="folder to write index.html and the pages into")
    store_option(p)
    p.add_argument("--branch", help="only runs recorded on this branch, e.g. main")
    p.add_argument(
        "--commit-url", help="link of a commit, with {sha}, e.g. https://github.com/o/r/commit/{sha}"
    )
    p.set_defaults(func=cmd_dashboard)
