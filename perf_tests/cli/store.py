"""``python -m perf_tests store import|export|info``: the results store (perf_tests/records/store.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from perf_tests.cli.options import store_option
from perf_tests.records.store import Store, default_location, describe
from perf_tests.records.store_io import export_baseline, import_paths


def cmd_import(args: argparse.Namespace) -> int:
    with Store.open(args.store) as store:
        added, already, passed = import_paths(store, args.paths)
        print(
            f"{describe(store.location)}: {added} run(s) added, {already} already there"
            + (f", {passed} file(s) that are no result passed over" if passed else "")
            + f"; {store.count()} runs in all"
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with Store.open(args.store) as store:
        baseline = export_baseline(
            store,
            args.output,
            args.device,
            args.env,
            args.profile,
            commit=args.commit,
            host=args.host,
            replace=args.replace,
        )
    print(
        f"wrote {args.output}: {len(baseline.runs)} run(s), "
        f"{len({n for r in baseline.runs for n in r.cases})} cases"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with Store.open(args.store) as store:
        print(
            f"{describe(store.location)}: schema version {store.version()}, {store.count()} runs, "
            f"{store.count('results')} case results, {store.count('failures')} failures, "
            f"{store.count('skips')} skips"
        )
        for slug, device_type, env, n in store.groups():
            print(f"  {slug} ({device_type}) {env}: {n} runs")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "store",
        help="the results store: import result folders and baselines, export a baseline",
        description=f"The results store (default {default_location()}; docs/store.md).",
    )
    cmds = p.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    imp = cmds.add_parser("import", help="record result JSONs, journals, result folders and baseline files")
    imp.add_argument("paths", nargs="+", type=Path)
    store_option(imp)
    imp.set_defaults(func=cmd_import)
    exp = cmds.add_parser("export", help="write a baseline file from the store's runs")
    exp.add_argument(
        "output", type=Path, help="the baseline file, e.g. baselines/<device>/<env>-<profile>.json"
    )
    exp.add_argument("--device", required=True, help="device slug, e.g. nvidia-h100-80gb-hbm3")
    exp.add_argument("--env", required=True, help="torch1, torch2, ...")
    exp.add_argument("--profile", required=True, help="tiny, sd21-base, ...")
    exp.add_argument("--commit", help="only the runs of this commit (full sha)")
    exp.add_argument("--host", help="only the runs of this host_id")
    exp.add_argument("--replace", action="store_true", help="overwrite an existing output file")
    store_option(exp)
    exp.set_defaults(func=cmd_export)
    info = cmds.add_parser("info", help="schema version, counts, device types and environments")
    store_option(info)
    info.set_defaults(func=cmd_info)
