"""``python -m perf_tests pr-comment --gpu GPU --results DIR``: the pull request's comment of one GPU type
from a gate job's results folder (perf_tests/report/pr_comment.py), in Markdown on stdout."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from perf_tests.errors import EXIT_OK, InputError


def add_parser(sub) -> None:
    p = sub.add_parser("pr-comment", help="the pull request comment of one GPU type, from a gate's results")
    p.add_argument("--gpu", required=True, help="the GPU type (runner label), e.g. h100")
    p.add_argument("--results", type=Path, required=True,
                   help="the gate job's results folder (verdict-<env>.json, context-<env>.json)")
    p.add_argument("--run-url", help="link to the workflow run and its artifacts")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from perf_tests.report.pr_comment import render_folder

    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", args.gpu):
        raise InputError(f"--gpu {args.gpu!r}: a runner label of lower-case letters, digits and dashes.")
    if not args.results.is_dir():
        raise InputError(f"--results {args.results}: no such folder; pass the gate job's results folder.")
    sys.stdout.write(render_folder(args.gpu, args.results, args.run_url))
    return EXIT_OK
