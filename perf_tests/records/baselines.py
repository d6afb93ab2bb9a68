"""The baseline store: ``baselines/<device_slug>/<env>-<profile>.json``, runs merged in, nothing lost.

A baseline keeps everything needed to recompute a verdict later: the raw samples of every run merged into it
(several independent runs, i.e. processes, so run-to-run variation is known and not only round-to-round), the
environment fingerprint, each case's ``definition_hash`` and a schema version. Layout (schema version 2;
``results.py`` reads it, and version 1, which lacks the fields marked *)::

    {"schema": "sd-perf-baseline", "schema_version": 2, "device_slug": ..., "env": ..., "profile": ...,
     "environment": {fingerprint fields}, "created": iso-time, "updated": iso-time,
     "runs": [{"source": file name, "datetime": ..., "git_commit": ..., "machine_info": {fingerprint},
               "machine_id"*: 12 hex, "content_hash"*: sha256 of the run's samples, "grid_name"*: ...,
               "canary"*: [per-call seconds]}],
     "cases": {name: {"definition_hash": ..., "case": {...}, "attention_used": ..., "vae_attention_used"*:
     ...,
                      "runs": [{"run": index into runs, "samples": [seconds, ...], "iterations"*: calls per
                                round, "compile_cache"*: "warm"|"cold"|null, "correct"*: true|false|null,
                                "attention_kernels"*: {part: [kernel, ...]}, "device_samples"*: [seconds
                                per call on the device's clock, per round; CUDA component cases only],
                                "compile_time_s": ...,
                                "peak_memory_bytes": ..., "peak_reserved_bytes": ..., "graph_breaks": ...,
                                "recompiles": ...}]}}}

An update holds an exclusive lock (``fcntl.flock`` on ``<file>.lock`` beside it) around read, merge and
replace, so concurrent updates of one file each keep their runs. It writes a temporary file
``.<name>.*.tmp`` in the same folder, fsyncs it and renames it over the baseline: a killed writer leaves the
previous file intact, and its temporary file is removed by the next update. A run whose content hash is
already in the file is not added again, so rerunning an update adds nothing twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from perf_tests.analysis.stats import DEFAULT_ENV_FIELDS, Side, environment_mismatch
from perf_tests.records.results import (
    PER_RUN_FIELDS,
    SCHEMA,
    SCHEMA_VERSION,
    Baseline,
    InputError,
    MissingBaseline,
    Run,
    read_baseline,
    read_run,
)

CREATE_HINT = (
    "Create one on this machine with `python -m perf_tests update-baselines RUN.json [RUN2.json ...]` "
    "(RUN.json from `python -m pytest perf_tests --benchmark-json RUN.json`; several runs, each in its own "
    "process, record the run-to-run noise), or `nox -s update-baselines`."
)
# Fault injection for the store's tests: seconds to wait after the temporary file is complete and before it
# replaces the baseline, so that a test can kill the writer, or race a second one, inside that window.
PAUSE_ENV = "SD_PERF_STORE_PAUSE_S"


# --- baseline location -------------------------------------------------------------------------------


def baseline_path(baseline_dir: str | os.PathLike, device_slug: str, env: str, profile: str) -> Path:
    return Path(baseline_dir) / device_slug / f"{env}-{profile}.json"


def existing_baselines(baseline_dir: str | os.PathLike) -> list[Path]:
    root = Path(baseline_dir)
    return sorted(root.glob("*/*.json")) if root.is_dir() else []


def locate_baselines(baseline_dir: str | os.PathLike, side: Side, profiles: Sequence[str]) -> list[Path]:
    """The baseline files for ``side``'s device and env and each profile; MissingBaseline if any is absent."""
    slug, env = side.environment.get("device_slug"), side.environment.get("env")
    if not slug or not env:
        raise InputError(
            "the candidate run has no machine_info.device_slug / env, so no baseline can be picked from a "
            "folder: produce it with `python -m pytest perf_tests` (its conftest records them) or pass a "
            "baseline file instead of a folder."
        )
    paths = [baseline_path(baseline_dir, slug, env, p) for p in profiles]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        have = existing_baselines(baseline_dir)
        raise MissingBaseline(
            f"no baseline for this device: {', '.join(map(str, missing))} does not exist. "
            + (f"Existing baselines: {', '.join(map(str, have))}. " if have
               else f"{baseline_dir} holds no baselines yet. ")
            + CREATE_HINT
        )
    return paths


# --- writing ------------------------------------------------------------------------------------------


def _compact_json(obj, indent: int = 0) -> str:
    """JSON with one key per line but lists of numbers on one line: small, reviewable diffs."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {_compact_json(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(x, (dict, list)) for x in obj):
            return json.dumps(obj)
        return "[\n" + ",\n".join(inner + _compact_json(x, indent + 2) for x in obj) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False)


def atomic_write_json(path: str | os.PathLike, doc: dict) -> None:
    """Write ``doc`` to ``path`` so that readers see the old file or the complete new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _compact_json(doc) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; a baseline is a shared, reviewable data file (0644 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        pause = float(os.environ.get(PAUSE_ENV) or 0)
        if pause > 0:
            time.sleep(pause)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (POSIX); not possible on every platform / filesystem
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def baseline_doc(baseline: Baseline) -> dict:
    """The schema-version-2 document of a baseline (what :func:`results.baseline_from_doc` reads back)."""
    runs, cases = [], {}
    for index, run in enumerate(baseline.runs):
        runs.append({
            "source": run.source, "datetime": run.datetime, "git_commit": run.git_commit,
            "machine_info": run.machine, "machine_id": run.machine_id, "content_hash": run.content_hash,
            "grid_name": run.grid_name, "canary": list(run.canary),
        })
        for name, r in run.cases.items():
            case = cases.setdefault(name, {
                "definition_hash": r.definition_hash, "case": r.case, "attention_used": r.attention_used,
                "vae_attention_used": r.vae_attention_used, "runs": [],
            })
            case["runs"].append({
                "run": index, "samples": list(r.samples), "iterations": r.iterations,
                "compile_cache": r.compile_cache, "correct": r.correct,
                # perf_tests.measure.kernels; None before
                "attention_kernels": r.extra.get("attention_kernels"),
                "gpu_state": r.extra.get("gpu_state"),  # perf_tests.measure.gpu_state; None off CUDA
                **{k: r.extra.get(k) for k in PER_RUN_FIELDS},
                "compile_time_s": r.compile_time_s, "peak_memory_bytes": r.peak_memory_bytes,
                # the rounds on the device's clock (perf_tests.measure.timing); only where recorded
                **({"device_samples": list(r.device_samples)} if r.device_samples is not None else {}),
            })
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "device_slug": baseline.device_slug,
        "env": baseline.env, "profile": baseline.profile, "environment": baseline.environment,
        "created": baseline.created, "updated": baseline.updated, "runs": runs, "cases": cases,
    }


@dataclass
class Update:
    """What one update did to one baseline file."""

    path: Path
    baseline: Baseline
    added: list[str] = field(default_factory=list)  # sources of the runs added
    duplicates: list[str] = field(default_factory=list)  # sources of runs already in the file (same hash)
    notes: list[str] = field(default_factory=list)
    removed_temp_files: list[str] = field(default_factory=list)


def merge_runs(existing: Baseline | None, runs: Sequence[Run], key: tuple[str, str, str],
               path: Path) -> Update:
    """Add ``runs`` (one device, env and profile) to ``existing``; runs already there by content hash are
    skipped, a case whose definition changed loses its old runs (with a note)."""
    slug, env, profile = key
    now = _now()
    base = existing or Baseline(str(path), SCHEMA_VERSION, slug, env, profile, dict(runs[0].machine), now,
                                now, ())
    update = Update(path, base)
    stored = list(base.runs)
    seen = {r.content_hash for r in stored}
    for run in runs:
        diff = environment_mismatch(base.environment, run.machine, DEFAULT_ENV_FIELDS)
        if diff:
            raise InputError(
                f"{run.source}: its environment differs from the baseline {path}'s ({'; '.join(diff)}); runs "
                f"from different environments are not merged. Pass --replace to start a new baseline from it."
            )
        if run.content_hash in seen:
            update.duplicates.append(run.source)
            continue
        seen.add(run.content_hash)
        for name, r in run.cases.items():
            old = next((s.cases[name] for s in stored if name in s.cases), None)
            if old is not None and old.definition_hash != r.definition_hash:
                update.notes.append(f"{name}: definition changed ({old.definition_hash} -> "
                                    f"{r.definition_hash}); its old runs were dropped")
                stored = [dataclasses.replace(s, cases={n: c for n, c in s.cases.items() if n != name})
                          for s in stored]
        stored.append(run)
        update.added.append(run.source)
    update.baseline = dataclasses.replace(base, schema_version=SCHEMA_VERSION, updated=now,
                                          runs=tuple(stored))
    return update


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the exclusive lock of baseline ``path`` (``<path>.lock``; the kernel releases it if we die)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def remove_stale_temp_files(path: Path) -> list[str]:
    """Temporary files of killed writers (``.<name>.*.tmp``); call with the lock held, when none is live."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp.name)
    return removed


def _split_by_profile(run: Run) -> dict[tuple[str, str, str], Run]:
    """One run -> {(device_slug, env, profile): the run restricted to that profile's cases}."""
    slug = run.machine.get("device_slug")
    if not slug:
        raise InputError(
            f"{run.source}: machine_info has no device_slug; baselines are stored per device. Produce the "
            "run "
            f"with `python -m pytest perf_tests` (its conftest records the device)."
        )
    parts: dict[tuple[str, str, str], dict] = {}
    for name, r in run.cases.items():
        env = run.machine.get("env") or r.extra.get("env")
        profile = r.case.get("profile")
        if not env or not profile:
            raise InputError(
                f"{run.source}: case {name!r} lacks extra_info env / case.profile, so its baseline file "
                f"(<env>-<profile>.json) cannot be named. Was it produced by perf_tests?"
            )
        parts.setdefault((slug, env, profile), {})[name] = r
    # content_hash=None: each part is hashed on its own cases, as it is stored
    return {key: dataclasses.replace(run, cases=cases, content_hash=None) for key, cases in parts.items()}


def _usable_run(path: str | os.PathLike) -> Run:
    run = read_run(path)
    if not run.complete:
        raise InputError(
            f"{path}: the run did not finish (its journal has no 'end' line; it lacks "
            f"{len(run.lacking)} selected case(s)); a partial run must not become a baseline. Rerun it."
        )
    wrong = [n for n, r in run.cases.items() if r.correct is False]
    wrong += [n for n, f in run.failed.items() if f.kind in ("wrong-output", "non-finite") and n not in wrong]
    if wrong:
        raise InputError(
            f"{path}: {len(wrong)} case(s) produced wrong output ({', '.join(wrong[:3])}); a wrong result "
            f"must never become a baseline. Fix them or deselect them, then rerun."
        )
    if not run.cases:
        raise InputError(f"{path}: the run measured no case (all skipped or failed); nothing to record.")
    return run


def update_baselines(
    paths: Sequence[str | os.PathLike], baseline_dir: str | os.PathLike, replace: bool = False
) -> list[Update]:
    """Merge runs into their baseline files (or start them anew with ``replace``).

    Every run, and every baseline it goes into, is read and validated before anything is written; then each
    file is updated under its lock (read again, merged, replaced atomically). A run with a wrong output is
    refused: a fast wrong kernel must never become a baseline.
    """
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for p in paths:
        for key, part in _split_by_profile(_usable_run(p)).items():
            groups.setdefault(key, []).append(part)
    targets = {key: baseline_path(baseline_dir, *key) for key in groups}
    if not replace:  # fail on a corrupt baseline before writing any file
        for target in targets.values():
            if target.exists():
                read_baseline(target)
    updates = []
    for key, runs in groups.items():
        target = targets[key]
        with locked(target):
            removed = remove_stale_temp_files(target)
            existing = read_baseline(target) if target.exists() and not replace else None
            update = merge_runs(existing, runs, key, target)
            update.removed_temp_files = removed
            if update.added or replace:
                atomic_write_json(target, baseline_doc(update.baseline))
        updates.append(update)
    return updates
