"""``python -m perf_tests store``: import result folders and baselines, export a baseline, show what is in.

python -m perf_tests store import results/ baselines/ [--store PATH|URL]
python -m perf_tests store export baselines/<device>/<env>-<profile>.json --device D --env E --profile P
python -m perf_tests store info
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from perf_tests.baselines import atomic_write_json, baseline_doc, locked, merge_runs
from perf_tests.results import JOURNAL_SUFFIX, Baseline, InputError, Run, read_any
from perf_tests.store import STORE_ENV, Store, default_location, describe
from perf_tests.store_baseline import run_context

AB_NAME = re.compile(r"-[AB]-run\d+(\.json|\.journal\.jsonl)$")


def store_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        default=None,
        metavar="PATH|URL",
        help=f"SQLite file or postgresql://... (default ${STORE_ENV}, else ~/.cache/sd-perf/store.sqlite)",
    )


def _files(paths: Sequence[Path]) -> Iterator[tuple[Path, bool]]:
    """(file, named by the user): files, and the result files under folders (a journal without its JSON)."""
    for path in paths:
        if not path.is_dir():
            yield path, True
            continue
        for f in sorted(path.rglob("*")):
            if f.name.endswith(JOURNAL_SUFFIX):
                if not f.with_name(f.name.removesuffix(JOURNAL_SUFFIX) + ".json").is_file():
                    yield f, False
            elif f.suffix == ".json" and not f.name.startswith("."):
                yield f, False


def import_paths(store: Store, paths: Sequence[Path], log=print) -> tuple[int, int, int]:
    """Record every run and baseline under ``paths``: (runs added, runs already there, files not results).
    A file named on the command line must be a result; one found in a folder that is not (a verdict, a
    report) is passed over."""
    added = already = passed = 0
    for path, named in _files(paths):
        try:
            record = read_any(path)
        except InputError:
            if named:
                raise
            passed += 1
            continue
        runs: Sequence[Run] = record.runs if isinstance(record, Baseline) else [record]
        mode = "ab" if AB_NAME.search(path.name) else "solo"
        for run in runs:
            result = store.record(run, run_context(run, Path.cwd(), mode))
            added += result.added
            already += not result.added
        log(f"{path}: {len(runs)} run(s)")
    return added, already, passed


def cmd_import(args: argparse.Namespace) -> int:
    with Store.open(args.store) as store:
        added, already, passed = import_paths(store, args.paths)
        print(
            f"{describe(store.location)}: {added} run(s) added, {already} already there"
            + (f", {passed} file(s) that are no result passed over" if passed else "")
            + f"; {store.count()} runs in all"
        )
    return 0


def export_baseline(
    store: Store,
    output: Path,
    device: str,
    env: str,
    profile: str,
    *,
    commit: str | None = None,
    host: str | None = None,
    replace: bool = False,
) -> Baseline:
    """The runs of one device, environment and profile (of one commit or host when given) as a baseline file,
    written atomically; an existing file is kept unless ``replace``."""
    where, params = "device_slug = ? AND env = ? AND complete = 1 AND mode = 'solo'", [device, env]
    if commit:
        where += " AND commit_sha = ? AND dirty = 0"
        params.append(commit)
    if host:
        where += " AND host_id = ?"
        params.append(host)
    runs = [s.run for s in store.runs(where, params, profiles=[profile])]
    runs = [r for r in runs if r.cases and not any(c.correct is False for c in r.cases.values())]
    if not runs:
        raise InputError(
            f"{describe(store.location)}: no complete run of {device}, {env}, profile {profile}"
            + (f", commit {commit}" if commit else "")
            + (f", host {host}" if host else "")
            + ": see `python -m perf_tests store info`."
        )
    latest = runs[-1].machine
    runs = [
        dataclasses.replace(r, content_hash=None) for r in runs if r.machine == latest
    ]  # one environment
    with locked(output):
        if output.exists() and not replace:
            raise InputError(f"{output} exists; pass --replace to overwrite it, or another output path.")
        baseline = merge_runs(None, runs, (device, env, profile), output).baseline
        atomic_write_json(output, baseline_doc(baseline))
    return baseline


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
