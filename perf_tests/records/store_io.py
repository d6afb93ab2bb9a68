"""``python -m perf_tests store``: import result folders and baselines, export a baseline, show what is in.

python -m perf_tests store import results/ baselines/ [--store PATH|URL]
python -m perf_tests store export baselines/<device>/<env>-<profile>.json --device D --env E --profile P
python -m perf_tests store info
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from perf_tests.records.baselines import atomic_write_json, baseline_doc, locked, merge_runs
from perf_tests.records.results import JOURNAL_SUFFIX, Baseline, InputError, Run, read_any
from perf_tests.records.store import Store, describe
from perf_tests.tools.store_baseline import run_context

AB_NAME = re.compile(r"-[AB]-run\d+(\.json|\.journal\.jsonl)$")


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
