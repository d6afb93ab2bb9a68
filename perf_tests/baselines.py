"""Baseline store and result loading: pytest-benchmark JSON and baseline files in, ``stats.Side`` out.

A baseline is a data file, ``baselines/<device_slug>/<env>-<profile>.json``, that keeps everything needed to
recompute a verdict later: the raw per-round samples of every run merged into it (several independent runs,
i.e. processes, so run-to-run variation is known and not only round-to-round), the environment fingerprint,
each case's ``definition_hash`` and a schema version. Layout (schema version 1)::

    {"schema": "sd-perf-baseline", "schema_version": 1, "device_slug": ..., "env": ..., "profile": ...,
     "environment": {fingerprint fields}, "created": iso-time, "updated": iso-time,
     "runs": [{"source": file name, "datetime": ..., "git_commit": ..., "machine_info": {fingerprint}}],
     "cases": {name: {"definition_hash": ..., "case": {...}, "attention_used": ...,
                      "runs": [{"run": index into runs, "samples": [seconds, ...], "compile_time_s": ...,
                                "peak_memory_bytes": ..., "peak_reserved_bytes": ..., "graph_breaks": ...,
                                "recompiles": ...}]}}}

Writes are atomic (temporary file in the same folder, fsync, ``os.replace``), so an interrupted update leaves
the previous baseline intact. Every loading problem raises :class:`InputError` with one clear paragraph.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from perf_tests.stats import DEFAULT_ENV_FIELDS, CaseSamples, Side, environment_mismatch

SCHEMA = "sd-perf-baseline"
SCHEMA_VERSION = 1

# What a baseline remembers about the machine (machine_info keys written by the perf_tests conftest, plus
# pytest-benchmark's own python_version).
FINGERPRINT_FIELDS = (
    "device_slug", "device_name", "device_type", "gpu_count", "driver_version", "cuda_version",
    "cudnn_version", "torch_version", "open_clip_version", "cpu_model", "env", "python_version",
)
PER_RUN_FIELDS = ("compile_time_s", "peak_memory_bytes", "peak_reserved_bytes", "graph_breaks", "recompiles")

SAVE_DATA_HINT = (
    "The comparator needs the per-round timings: pytest-benchmark writes them into --benchmark-json files, "
    "but into --benchmark-save / --benchmark-autosave files only with --benchmark-save-data. Rerun the suite "
    "with `python -m pytest perf_tests --benchmark-json OUT.json` (the perf_tests conftest keeps raw samples)."
)
CREATE_HINT = (
    "Create one on this machine with `python -m perf_tests update-baselines RUN.json [RUN2.json ...]` "
    "(RUN.json from `python -m pytest perf_tests --benchmark-json RUN.json`; several runs, each in its own "
    "process, record the run-to-run noise), or `nox -s update-baselines`."
)


class InputError(Exception):
    """A result or baseline file that cannot be used; the message says what is wrong and how to fix it."""


class MissingBaseline(InputError):
    """No baseline file for this device / environment / profile."""


# --- reading ------------------------------------------------------------------------------------------


def load_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read ({exc}).") from None
    if not text.strip():
        raise InputError(f"{path}: the file is empty (an interrupted run?). Rerun the benchmark.")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); the file looks "
            f"truncated or corrupt, e.g. from an interrupted run. Rerun the benchmark to produce it again."
        ) from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(doc).__name__}.")
    return doc


def kind_of(doc: dict, path: str | os.PathLike) -> str:
    """'baseline' or 'run' (a pytest-benchmark JSON); anything else is an InputError."""
    if "schema" in doc or "schema_version" in doc:
        if doc.get("schema") != SCHEMA:
            raise InputError(f"{path}: unknown schema {doc.get('schema')!r}; expected {SCHEMA!r}.")
        version = doc.get("schema_version")
        if version != SCHEMA_VERSION:
            newer = isinstance(version, int) and version > SCHEMA_VERSION
            raise InputError(
                f"{path}: unknown baseline schema version {version!r}; this perf_tests reads version "
                f"{SCHEMA_VERSION}. "
                + ("It was written by a newer perf_tests: update this checkout." if newer
                   else "Regenerate the baseline with `python -m perf_tests update-baselines --replace`.")
            )
        return "baseline"
    if isinstance(doc.get("benchmarks"), list):
        return "run"
    raise InputError(
        f"{path}: neither a pytest-benchmark JSON (no 'benchmarks' list) nor a perf_tests baseline "
        f"(no 'schema' field)."
    )


def fingerprint(machine_info: dict) -> dict:
    return {k: machine_info[k] for k in FINGERPRINT_FIELDS if k in machine_info}


def _check_samples(path, name: str, data) -> list[float]:
    if not isinstance(data, list) or not data:
        raise InputError(f"{path}: benchmark {name!r} has no raw samples (stats.data). {SAVE_DATA_HINT}")
    if not all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in data):
        raise InputError(f"{path}: benchmark {name!r} has non-positive or non-finite samples in stats.data.")
    return [float(x) for x in data]


def parse_run(doc: dict, path: str | os.PathLike) -> dict:
    """A pytest-benchmark JSON -> {"machine_info", "datetime", "git_commit", "source", "cases"}.

    ``cases[name]`` holds samples, definition_hash, case fields, attention_used, correct and the per-run
    metrics. Benchmarks without raw samples are an error (with the --benchmark-save-data explanation).
    """
    benches = doc["benchmarks"]
    if not benches:
        raise InputError(f"{path}: the run holds no benchmarks (every case skipped or deselected?).")
    machine_info = doc.get("machine_info") or {}
    without = [b.get("name", "?") for b in benches if not (b.get("stats") or {}).get("data")]
    if without:
        shown = ", ".join(without[:3]) + (f" and {len(without) - 3} more" if len(without) > 3 else "")
        raise InputError(f"{path}: {len(without)} benchmark(s) have no raw samples ({shown}). {SAVE_DATA_HINT}")
    cases = {}
    for b in benches:
        name = b.get("name")
        if not isinstance(name, str):
            raise InputError(f"{path}: a benchmark entry has no 'name'.")
        if name in cases:
            raise InputError(f"{path}: benchmark {name!r} appears twice.")
        extra = b.get("extra_info") or {}
        cases[name] = {
            "samples": _check_samples(path, name, b["stats"]["data"]),
            "definition_hash": extra.get("definition_hash"),
            "case": extra.get("case") or {},
            "attention_used": extra.get("attention_used"),
            "correct": extra.get("correct"),
            "env": extra.get("env"),
            **{k: extra.get(k) for k in PER_RUN_FIELDS},
        }
    commit = machine_info.get("git_commit") or (doc.get("commit_info") or {}).get("id")
    return {
        "source": Path(path).name,
        "datetime": doc.get("datetime"),
        "git_commit": commit,
        "machine_info": fingerprint(machine_info),
        "cases": cases,
    }


def _validate_baseline(doc: dict, path) -> None:
    if not isinstance(doc.get("runs"), list) or not isinstance(doc.get("cases"), dict):
        raise InputError(f"{path}: baseline is missing its 'runs' list or 'cases' object (corrupt file?).")
    if not doc["cases"]:
        raise InputError(f"{path}: baseline holds no cases.")
    for name, case in doc["cases"].items():
        runs = case.get("runs") if isinstance(case, dict) else None
        if not isinstance(runs, list) or not runs:
            raise InputError(f"{path}: baseline case {name!r} has no runs.")
        for r in runs:
            _check_samples(path, name, r.get("samples") if isinstance(r, dict) else None)


def _values(runs: Iterable[dict], key: str) -> list[float]:
    return [float(r[key]) for r in runs if isinstance(r.get(key), (int, float))]


def side_from_baseline(doc: dict, label: str) -> Side:
    cases = {}
    for name, case in doc["cases"].items():
        runs = case["runs"]
        cases[name] = CaseSamples(
            name=name,
            runs=[list(map(float, r["samples"])) for r in runs],
            definition_hash=case.get("definition_hash"),
            compile_time_s=_values(runs, "compile_time_s"),
            peak_memory_bytes=_values(runs, "peak_memory_bytes"),
            attention_used=case.get("attention_used"),
            case=dict(case.get("case") or {}),
            correct=False if any(r.get("correct") is False for r in runs) else None,
        )
    return Side(label, dict(doc.get("environment") or {}), cases, n_runs=len(doc["runs"]))


def side_from_runs(runs: Sequence[dict], label: str) -> Side:
    """Merge parsed runs (see :func:`parse_run`) into one side; their environments must agree."""
    env = dict(runs[0]["machine_info"])
    for run in runs[1:]:
        diff = environment_mismatch(env, run["machine_info"], DEFAULT_ENV_FIELDS)
        if diff:
            raise InputError(
                f"cannot merge {run['source']} with {runs[0]['source']}: different environments "
                f"({'; '.join(diff)})."
            )
    cases: dict[str, CaseSamples] = {}
    for run in runs:
        for name, rec in run["cases"].items():
            cs = cases.get(name)
            if cs is None:
                cs = cases[name] = CaseSamples(name, [], rec["definition_hash"],
                                               attention_used=rec["attention_used"], case=dict(rec["case"]))
            elif cs.definition_hash != rec["definition_hash"]:
                raise InputError(
                    f"{run['source']}: case {name!r} has definition_hash {rec['definition_hash']} but an "
                    f"earlier file has {cs.definition_hash}; these runs measured different definitions."
                )
            cs.runs.append(rec["samples"])
            for key, dest in (("compile_time_s", cs.compile_time_s), ("peak_memory_bytes", cs.peak_memory_bytes)):
                if isinstance(rec.get(key), (int, float)):
                    dest.append(float(rec[key]))
            if rec.get("correct") is False:
                cs.correct = False
    return Side(label, env, cases, n_runs=len(runs))


def load_side(paths: Sequence[str | os.PathLike], label: str | None = None) -> Side:
    """One side from one baseline file, or from one or more pytest-benchmark JSON runs (merged)."""
    if not paths:
        raise InputError("no input files given.")
    label = label or ", ".join(Path(p).name for p in paths)
    docs = [(p, load_json(p)) for p in paths]
    kinds = [kind_of(doc, p) for p, doc in docs]
    if "baseline" in kinds:
        if len(docs) > 1:
            raise InputError("a baseline file cannot be merged with other files on one side; pass it alone.")
        path, doc = docs[0]
        _validate_baseline(doc, path)
        return side_from_baseline(doc, label)
    return side_from_runs([parse_run(doc, p) for p, doc in docs], label)


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


def profiles_of(side: Side) -> list[str]:
    """Profiles named by the side's cases (extra_info.case.profile), in order of appearance."""
    out: list[str] = []
    for cs in side.cases.values():
        p = cs.case.get("profile")
        if p and p not in out:
            out.append(p)
    return out


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


def _split_by_profile(run: dict, path) -> dict[tuple[str, str, str], dict]:
    """One parsed run -> {(device_slug, env, profile): run restricted to that profile's cases}."""
    mi = run["machine_info"]
    slug = mi.get("device_slug")
    if not slug:
        raise InputError(
            f"{path}: machine_info has no device_slug; baselines are stored per device. Produce the run "
            f"with `python -m pytest perf_tests` (its conftest records the device)."
        )
    out: dict[tuple[str, str, str], dict] = {}
    for name, rec in run["cases"].items():
        env = mi.get("env") or rec.get("env")
        profile = rec["case"].get("profile")
        if not env or not profile:
            raise InputError(
                f"{path}: case {name!r} lacks extra_info env / case.profile, so its baseline file "
                f"(<env>-<profile>.json) cannot be named. Was it produced by perf_tests?"
            )
        key = (slug, env, profile)
        out.setdefault(key, {**run, "cases": {}})["cases"][name] = rec
    return out


def merge_into_baseline(existing: dict | None, runs: Sequence[dict], key: tuple[str, str, str]) -> tuple[dict, list[str]]:
    """Return the new baseline document and notes (e.g. cases whose definition changed and were reset)."""
    slug, env, profile = key
    notes: list[str] = []
    now = _now()
    doc = existing or {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "device_slug": slug, "env": env,
        "profile": profile, "environment": dict(runs[0]["machine_info"]), "created": now, "runs": [],
        "cases": {},
    }
    doc = json.loads(json.dumps(doc))  # a copy: the caller's document stays as it was
    doc["updated"] = now
    for run in runs:
        diff = environment_mismatch(doc["environment"], run["machine_info"], DEFAULT_ENV_FIELDS)
        if diff:
            raise InputError(
                f"{run['source']}: its environment differs from the baseline's ({'; '.join(diff)}); runs from "
                f"different environments are not merged. Pass --replace to start a new baseline from it."
            )
        index = len(doc["runs"])
        doc["runs"].append({k: run[k] for k in ("source", "datetime", "git_commit", "machine_info")})
        for name, rec in run["cases"].items():
            case = doc["cases"].get(name)
            if case is not None and case.get("definition_hash") != rec["definition_hash"]:
                notes.append(f"{name}: definition changed ({case.get('definition_hash')} -> "
                             f"{rec['definition_hash']}); its old runs were dropped")
                case = None
            if case is None:
                case = doc["cases"][name] = {
                    "definition_hash": rec["definition_hash"], "case": rec["case"],
                    "attention_used": rec["attention_used"], "runs": [],
                }
            case["runs"].append({"run": index, "samples": rec["samples"], **{k: rec[k] for k in PER_RUN_FIELDS}})
    return doc, notes


def update_baselines(
    paths: Sequence[str | os.PathLike], baseline_dir: str | os.PathLike, replace: bool = False
) -> list[tuple[Path, dict, list[str]]]:
    """Merge runs into their baseline files (or start them anew with ``replace``), writing atomically.

    Everything is read and validated before anything is written. A run with a case whose output was wrong
    (``correct`` False) is refused: a fast wrong kernel must never become a baseline.
    """
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for p in paths:
        doc = load_json(p)
        if kind_of(doc, p) != "run":
            raise InputError(f"{p}: is a baseline file; update-baselines takes pytest-benchmark JSON runs.")
        run = parse_run(doc, p)
        wrong = [n for n, rec in run["cases"].items() if rec.get("correct") is False]
        if wrong:
            raise InputError(
                f"{p}: {len(wrong)} case(s) produced wrong output ({', '.join(wrong[:3])}); a wrong result "
                f"must never become a baseline. Fix them or deselect them, then rerun."
            )
        for key, part in _split_by_profile(run, p).items():
            groups.setdefault(key, []).append(part)
    planned = []
    for key, runs in groups.items():
        target = baseline_path(baseline_dir, *key)
        existing = None
        if target.exists() and not replace:
            existing = load_json(target)
            kind_of(existing, target)
            _validate_baseline(existing, target)
        doc, notes = merge_into_baseline(existing, runs, key)
        planned.append((target, doc, notes))
    for target, doc, _ in planned:
        atomic_write_json(target, doc)
    return planned
