"""The one reader of result files: pytest-benchmark JSON runs, their ``.journal.jsonl`` journals and baseline
files, each turned into typed records (:class:`Run`, :class:`CaseResult`, :class:`Skip`, :class:`Failure`,
:class:`Baseline`) and from those into the comparator's ``stats.Side``.

Every consumer (compare, the baseline store, the study table, A/B, the run orchestration, the tests) reads
through here, so a field is validated once and compile time, memory and correctness are aggregated in one
place (:func:`side_from_runs`). Anything malformed raises :class:`InputError`: one paragraph naming the file,
the field and the fix, which the CLI prints as ``error: ...`` with exit code 2.

Formats read:

- a run: pytest-benchmark JSON written by ``pytest perf_tests --benchmark-json X.json``; ``stats.data``
  holds per-call seconds per round, ``extra_info`` the case and its metrics (on CUDA a component case's
  ``device_samples``: the same rounds timed by CUDA events, absent elsewhere and in older files), the
  top-level ``perf_tests`` section the selection, skips, failures and the canary (absent in harness
  version 1 files);
- a journal: ``X.journal.jsonl``, written line by line while the suite runs, so a killed run still leaves
  every finished case (``Run.complete`` is False without its ``end`` line);
- a baseline: ``schema_version`` 1 or 2 (see ``baselines.py`` for the layout); its runs come back as
  :class:`Run` records, so a baseline is a set of runs plus the environment they share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from perf_tests.analysis.stats import DEFAULT_ENV_FIELDS, CaseSamples, Side, environment_mismatch
from perf_tests.errors import InputError
from perf_tests.records.gpu_disturbance import disturbance
from perf_tests.records.journal import JOURNAL_SUFFIX, journal_path
from perf_tests.records.names import env_label, parse_name

SCHEMA = "sd-perf-baseline"
SCHEMA_VERSION = 2  # written; versions 1 and 2 are read
READABLE_SCHEMA_VERSIONS = (1, 2)

# What a baseline remembers about the machine (machine_info keys written by the perf_tests conftest, plus
# pytest-benchmark's own python_version). machine_id is kept per run, not in the shared fingerprint.
FINGERPRINT_FIELDS = (
    "device_slug", "device_name", "device_type", "gpu_count", "driver_version", "cuda_version",
    "cudnn_version", "torch_version", "open_clip_version", "cpu_model", "env", "python_version",
)
# Per-case, per-run values kept in a baseline beside the samples.
PER_RUN_FIELDS = ("compile_time_s", "peak_memory_bytes", "peak_reserved_bytes", "graph_breaks", "recompiles")
COMPILE_CACHE_STATES = ("warm", "cold")
FAILURE_KINDS = ("wrong-output", "non-finite", "error", "oom")

SAVE_DATA_HINT = (
    "The comparator needs the per-round timings: pytest-benchmark writes them into --benchmark-json files, "
    "but into --benchmark-save / --benchmark-autosave files only with --benchmark-save-data. Rerun the suite "
    "with `python -m pytest perf_tests --benchmark-json OUT.json` (the perf_tests conftest keeps raw "
    "samples)."
)
RERUN_HINT = "Rerun the suite (`python -m pytest perf_tests --benchmark-json OUT.json`) to produce it again."
BASELINE_HINT = (
    "Regenerate the baseline with `python -m perf_tests update-baselines --replace RUN.json ...` or restore "
    "it from git (`git checkout -- FILE`)."
)


class MissingBaseline(InputError):
    """No baseline file for this device / environment / profile."""


# --- records -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseResult:
    """One case measured in one run."""

    name: str  # the benchmark name, ``test_<kind>[<case id>]``: the key everywhere
    case: dict  # Case.as_dict(): kind, profile, attention, compile, batch_size, precision, ...; {} if foreign
    definition_hash: str | None
    samples: tuple[float, ...]  # per-call seconds, one per timed round
    iterations: int  # calls per round
    attention_used: str | None
    vae_attention_used: str | None
    correct: bool | None  # None: not checked
    compile_time_s: float | None
    compile_cache: str | None  # "warm" | "cold" | None (eager, or not recorded)
    peak_memory_bytes: float | None
    extra: dict  # the raw extra_info (or, from a baseline, the stored per-run fields)
    # per-call seconds per round on the device's clock (CUDA events), parallel to samples; None: not timed so
    device_samples: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Skip:
    name: str
    reason: str


@dataclass(frozen=True)
class Failure:
    name: str
    reason: str
    kind: str  # one of FAILURE_KINDS


@dataclass(frozen=True)
class Run:
    """One suite run (one process), from a result JSON, a journal, or a baseline's runs list."""

    source: str  # file name (a baseline run: the file it was merged from)
    machine: dict  # the fingerprint: FINGERPRINT_FIELDS present in machine_info
    machine_id: str | None
    datetime: str | None
    git_commit: str | None
    cases: dict[str, CaseResult]
    skipped: dict[str, Skip] = field(default_factory=dict)
    failed: dict[str, Failure] = field(default_factory=dict)
    # every case selected in the run; None: unknown (harness 1, baselines)
    selected: tuple[str, ...] | None = None
    canary: tuple[float, ...] = ()  # per-call seconds of the canary workload
    canary_timeline: tuple[dict, ...] = ()  # {"t", "seconds", "before"} in run order
    grid_name: str | None = None
    complete: bool = True  # False: a journal without its "end" line (the run was killed)
    content_hash: str | None = None  # computed from the case samples when not given (see content_hash())

    def __post_init__(self) -> None:
        if self.content_hash is None:
            object.__setattr__(self, "content_hash", content_hash(self.cases))

    @property
    def lacking(self) -> list[str]:
        """Selected cases the run neither produced, skipped nor failed (a killed run's unfinished cases)."""
        if self.selected is None:
            return []
        done = self.cases.keys() | self.skipped.keys() | self.failed.keys()
        return [n for n in self.selected if n not in done]


@dataclass(frozen=True)
class Baseline:
    """A baseline file: runs of one device, environment and profile, and the environment they share."""

    source: str
    schema_version: int
    device_slug: str
    env: str
    profile: str
    environment: dict
    created: str | None
    updated: str | None
    runs: tuple[Run, ...]


def content_hash(cases: Mapping[str, CaseResult]) -> str:
    """sha256 of a run's canonical case samples: the same run merged twice has the same hash."""
    canon = {n: [c.definition_hash, list(c.samples)] for n, c in sorted(cases.items())}
    return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()


# --- field checks: each names the file, the field and the fix ----------------------------------------------


def _fail(path, where: str, problem: str, fix: str = RERUN_HINT) -> InputError:
    return InputError(f"{path}: {where}: {problem}. {fix}")


def _typed(path, where: str, value, types, what: str, fix: str = RERUN_HINT, optional: bool = True):
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        ok = False  # True is an int to Python, never a number of seconds here
    else:
        ok = isinstance(value, types)
    if not ok:
        found = "nothing" if value is None else f"{type(value).__name__} {_short(value)}"
        raise _fail(path, where, f"expected {what}, found {found}", fix)
    return value


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(path, where: str, value, fix: str = RERUN_HINT) -> float | None:
    value = _typed(path, where, value, (int, float), "a number or null", fix)
    if value is None:
        return None
    if not math.isfinite(value):
        raise _fail(path, where, f"not a finite number ({value})", fix)
    return float(value)


def _samples(path, where: str, data, fix: str = RERUN_HINT,
             missing_fix: str = SAVE_DATA_HINT) -> tuple[float, ...]:
    if data is None or data == []:
        raise _fail(path, where, "no raw samples", missing_fix)
    _typed(path, where, data, list, "a list of seconds", fix, optional=False)
    for x in data:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
            raise _fail(path, where, f"sample {_short(x)} is not a positive finite number of seconds", fix)
    return tuple(float(x) for x in data)


def _str(path, where: str, value, fix: str = RERUN_HINT, optional: bool = True) -> str | None:
    return _typed(path, where, value, str, "a string", fix, optional)


def _dict(path, where: str, value, fix: str = RERUN_HINT, optional: bool = True) -> dict:
    return _typed(path, where, value, dict, "an object", fix, optional) or {}


def _list(path, where: str, value, fix: str = RERUN_HINT, optional: bool = True) -> list:
    return _typed(path, where, value, list, "a list", fix, optional) or []


def fingerprint(machine_info: Mapping) -> dict:
    return {k: machine_info[k] for k in FINGERPRINT_FIELDS if k in machine_info}


# Labels written before torch 2.0.x had its own environment: env_label gave 2.0.1 the current release's.
LEGACY_LABELS = {("torch2", "torch20")}


def checked_env(path, where: str, machine: Mapping, fix: str = RERUN_HINT) -> dict:
    """``machine`` with its ``env`` label agreeing with its ``torch_version``: a legacy label (a torch 2.0.x
    run recorded as 'torch2') is corrected; any other disagreement is an error, since the label picks the
    baseline file and the study table's column."""
    machine = dict(machine)
    env, version = machine.get("env"), machine.get("torch_version")
    if not isinstance(env, str) or not isinstance(version, str):
        return machine
    try:
        label = env_label(version)
    except ValueError:  # no release to hold the label against (a hand-made or foreign file)
        return machine
    if env != label:
        if (env, label) not in LEGACY_LABELS:
            raise _fail(path, f"{where}.env", f"{env!r} does not name the environment of torch {version} "
                        f"({label!r}); the file was edited or written by another tool", fix)
        machine["env"] = label
    return machine


# --- reading files ----------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        journal = journal_path(path)
        hint = (f" Its journal {journal} exists (the run was killed before it wrote the JSON?): pass the "
                f"journal instead; it holds every finished case." if journal.is_file() else "")
        raise InputError(f"{path}: no such file.{hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot be read ({exc}).") from None
    if not text.strip():
        raise InputError(f"{path}: the file is empty (an interrupted run?). {RERUN_HINT}")
    return text


def _load_json(path: Path) -> dict:
    text = _read_text(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        journal = journal_path(path)
        hint = (f" Its journal {journal} holds every case that finished: pass that instead."
                if journal.is_file() else f" {RERUN_HINT}")
        raise InputError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); the file looks "
            f"truncated or corrupt, e.g. from an interrupted run.{hint}"
        ) from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(doc).__name__}. {RERUN_HINT}")
    return doc


def read_any(path: str | os.PathLike) -> Run | Baseline:
    """A run (result JSON or journal) or a baseline, whichever the file is."""
    path = Path(path)
    if path.name.endswith(JOURNAL_SUFFIX):
        return _read_journal(path)
    doc = _load_json(path)
    if "schema" in doc or "schema_version" in doc:
        return baseline_from_doc(doc, path)
    if "benchmarks" in doc:
        return run_from_doc(doc, path)
    raise InputError(
        f"{path}: neither a pytest-benchmark JSON (no 'benchmarks' list) nor a perf_tests baseline (no "
        "'schema' field). Pass the file written by `python -m pytest perf_tests --benchmark-json X.json`, "
        f"its X{JOURNAL_SUFFIX}, or a file under baselines/."
    )


def read_run(path: str | os.PathLike) -> Run:
    return _expect(read_any(path), Run, f"{path}: is a baseline file; a run (pytest-benchmark JSON or its "
                                        "journal) is expected here.")


def read_baseline(path: str | os.PathLike) -> Baseline:
    return _expect(read_any(path), Baseline, f"{path}: is a run, not a baseline file; make one with "
                                             "`python -m perf_tests update-baselines`.")


def _expect(record: Run | Baseline, kind: type, problem: str):
    if not isinstance(record, kind):
        raise InputError(problem)
    return record


# --- runs -------------------------------------------------------------------------------------------------


def case_result(path, bench, where: str = "benchmarks[]") -> CaseResult:
    """One pytest-benchmark ``benchmarks[]`` entry (or a journal's ``benchmark``) -> CaseResult."""
    bench = _dict(path, where, bench, optional=False)
    name = _str(path, f"{where}.name", bench.get("name"), optional=False)
    where = f"benchmark {name!r}"
    stats = _dict(path, f"{where}: stats", bench.get("stats"), optional=False)
    extra = dict(_dict(path, f"{where}: extra_info", bench.get("extra_info")))
    extra.setdefault("iterations", stats.get("iterations"))
    samples = _samples(path, f"{where}: stats.data", stats.get("data"))
    return _case_result(path, name, samples, extra, f"{where}: extra_info.")


def _case_result(path, name: str, samples: tuple[float, ...], extra: dict, at: str,
                 fix: str = RERUN_HINT) -> CaseResult:
    """The fields a case result is made of, each checked; ``at`` prefixes a field's name in messages."""
    iterations = _typed(path, f"{at}iterations", extra.get("iterations"), int, "a whole number", fix)
    iterations = 1 if iterations is None else iterations
    if iterations < 1:
        raise _fail(path, f"{at}iterations", f"{iterations} calls per round", fix)
    cache = _str(path, f"{at}compile_cache", extra.get("compile_cache"), fix)
    if cache is not None and cache not in COMPILE_CACHE_STATES:
        raise _fail(path, f"{at}compile_cache", f"{cache!r} is not one of {COMPILE_CACHE_STATES}", fix)
    for key in PER_RUN_FIELDS:
        _number(path, f"{at}{key}", extra.get(key), fix)
    device = extra.get("device_samples")
    if device is not None:
        device = _samples(path, f"{at}device_samples", device, fix, missing_fix=fix)
        if len(device) != len(samples):
            raise _fail(path, f"{at}device_samples", f"{len(device)} rounds against {len(samples)} "
                        "wall-clock rounds; each round is timed on both clocks", fix)
    return CaseResult(
        name=name,
        case=dict(_dict(path, f"{at}case", extra.get("case"), fix)) or _case_from_name(name),
        definition_hash=_str(path, f"{at}definition_hash", extra.get("definition_hash"), fix),
        samples=samples,
        iterations=iterations,
        attention_used=_str(path, f"{at}attention_used", extra.get("attention_used"), fix),
        vae_attention_used=_str(path, f"{at}vae_attention_used", extra.get("vae_attention_used"), fix),
        correct=_typed(path, f"{at}correct", extra.get("correct"), bool, "true, false or null", fix),
        compile_time_s=_number(path, f"{at}compile_time_s", extra.get("compile_time_s"), fix),
        compile_cache=cache,
        peak_memory_bytes=_number(path, f"{at}peak_memory_bytes", extra.get("peak_memory_bytes"), fix),
        extra=extra,
        device_samples=device,
    )


def _case_from_name(name: str) -> dict:
    try:
        return parse_name(name).as_dict()
    except ValueError:
        return {}  # not a perf_tests benchmark (e.g. a plugin's own); compared by name only


def _skip(path, where: str, entry) -> Skip:
    entry = _dict(path, where, entry, optional=False)
    return Skip(_str(path, f"{where}.name", entry.get("name"), optional=False),
                _str(path, f"{where}.reason", entry.get("reason")) or "no reason given")


def _failure(path, where: str, entry) -> Failure:
    entry = _dict(path, where, entry, optional=False)
    kind = _str(path, f"{where}.kind", entry.get("kind")) or "error"
    if kind not in FAILURE_KINDS:
        raise _fail(path, f"{where}.kind", f"{kind!r} is not one of {FAILURE_KINDS}")
    return Failure(_str(path, f"{where}.name", entry.get("name"), optional=False),
                   _str(path, f"{where}.reason", entry.get("reason")) or "no reason given", kind)


def _canary_sample(path, where: str, entry) -> dict:
    entry = _dict(path, where, entry, optional=False)
    seconds = _number(path, f"{where}.seconds", entry.get("seconds"))
    if seconds is None or seconds <= 0:
        raise _fail(path, f"{where}.seconds", "a canary sample needs a positive number of seconds")
    return {"t": _number(path, f"{where}.t", entry.get("t")), "seconds": seconds,
            "before": _str(path, f"{where}.before", entry.get("before"))}


def _unique(path, items: Iterable, what: str) -> dict:
    out: dict = {}
    for item in items:
        if item.name in out:
            raise InputError(
                f"{path}: {what} {item.name!r} appears twice; one run measures each case once. Was the file "
                f"written by two runs (or a journal appended to twice)? {RERUN_HINT}"
            )
        out[item.name] = item
    return out


def _build_run(path, machine_info, section, cases, skips, failures, canary, *, doc_datetime=None,
               commit=None, complete=True) -> Run:
    machine_info = _dict(path, "machine_info", machine_info)
    section = _dict(path, "perf_tests", section)
    selected = section.get("selected")
    if selected is not None:
        selected = _list(path, "perf_tests.selected", selected)
        for i, name in enumerate(selected):
            _str(path, f"perf_tests.selected[{i}]", name, optional=False)
        selected = tuple(selected)
    cases = _unique(path, cases, "case")
    if not cases and not skips and not failures and (complete and not selected):
        raise InputError(f"{path}: the run holds no benchmarks (every case skipped or deselected?). "
                         f"{RERUN_HINT}")
    machine = checked_env(path, "machine_info", fingerprint(machine_info))
    if "env" in machine:  # each case repeats the run's label in extra_info.env
        cases = {n: _with_env(path, c, machine["env"]) for n, c in cases.items()}
    return Run(
        source=Path(path).name,
        machine=machine,
        machine_id=_str(path, "machine_info.machine_id", machine_info.get("machine_id")),
        datetime=doc_datetime,
        git_commit=_str(path, "machine_info.git_commit", machine_info.get("git_commit")) or commit,
        cases=cases,
        skipped=_unique(path, skips, "skipped case"),
        failed=_unique(path, failures, "failed case"),
        selected=selected,
        canary=tuple(c["seconds"] for c in canary),
        canary_timeline=tuple(canary),
        grid_name=_str(path, "perf_tests.grid_name", section.get("grid_name")),
        complete=complete,
    )


def _with_env(path, result: CaseResult, env: str) -> CaseResult:
    """The case's ``extra_info.env`` set to its run's (corrected) label; a label of another environment
    is an error."""
    own = result.extra.get("env")
    if own is None or own == env:
        return result
    if (own, env) not in LEGACY_LABELS:
        raise _fail(path, f"benchmark {result.name!r}: extra_info.env", f"{own!r}, but its run is {env!r}")
    return dataclasses.replace(result, extra={**result.extra, "env": env})


def run_from_doc(doc: Mapping, path: str | os.PathLike = "<memory>") -> Run:
    """A loaded pytest-benchmark JSON document -> Run."""
    benches = _list(path, "benchmarks", doc.get("benchmarks"), optional=False)
    section = _dict(path, "perf_tests", doc.get("perf_tests"))
    canary = _dict(path, "perf_tests.measure.canary", section.get("canary"))
    commit_info = _dict(path, "commit_info", doc.get("commit_info"))
    return _build_run(
        path, doc.get("machine_info"), section,
        [case_result(path, b, f"benchmarks[{i}]") for i, b in enumerate(benches)],
        [_skip(path, f"perf_tests.skipped[{i}]", s) for i, s in enumerate(_list(path, "perf_tests.skipped",
                                                                                 section.get("skipped")))],
        [_failure(path, f"perf_tests.failed[{i}]", f) for i, f in enumerate(_list(path, "perf_tests.failed",
                                                                                    section.get("failed")))],
        [_canary_sample(path, f"perf_tests.measure.canary.samples[{i}]", s)
         for i, s in enumerate(_list(path, "perf_tests.measure.canary.samples", canary.get("samples")))],
        doc_datetime=_str(path, "datetime", doc.get("datetime")),
        commit=_str(path, "commit_info.id", commit_info.get("id")),
    )


def _read_journal(path: Path) -> Run:
    """A journal, line by line. A last line cut short (the process died mid-write) is dropped; a broken
    line before it is an error. Without an ``end`` line the run is incomplete."""
    lines = _read_text(path).splitlines(keepends=True)
    start, cases, skips, failures, canary, ended = None, [], [], [], [], False
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            if no == len(lines) and not line.endswith("\n"):
                break  # the write the kill interrupted: everything before it is whole
            raise InputError(f"{path}: line {no} is not valid JSON ({exc.msg}); the journal is corrupt. "
                             f"{RERUN_HINT}") from None
        where = f"line {no}"
        entry = _dict(path, where, entry, optional=False)
        kind = entry.get("type")
        if no == 1 and kind != "start" or kind == "start" and start is not None:
            raise _fail(path, where, "a journal has exactly one 'start' line, first")
        if kind == "start":
            start = entry
        elif kind == "case":
            cases.append(case_result(path, entry.get("benchmark"), f"{where}: benchmark"))
        elif kind == "skip":
            skips.append(_skip(path, where, entry))
        elif kind == "fail":
            failures.append(_failure(path, where, entry))
        elif kind == "canary":
            canary.append(_canary_sample(path, where, entry))
        elif kind == "end":
            ended = True
        else:
            raise _fail(path, f"{where}.type",
                        f"unknown line type {kind!r} (start, case, skip, fail, canary, end)")
    if start is None:
        raise _fail(path, "line 1", "a journal opens with its 'start' line")
    return _build_run(path, start.get("machine_info"), start.get("perf_tests"), cases, skips, failures,
                      canary,
                      doc_datetime=_str(path, "line 1: datetime", start.get("datetime")), complete=ended)


# --- baselines --------------------------------------------------------------------------------------------


def baseline_from_doc(doc: Mapping, path: str | os.PathLike = "<memory>") -> Baseline:
    """A loaded baseline document (schema version 1 or 2) -> Baseline, every field checked."""
    fix = BASELINE_HINT
    if doc.get("schema") != SCHEMA:
        raise InputError(f"{path}: unknown schema {doc.get('schema')!r}; expected {SCHEMA!r}. {fix}")
    version = doc.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS or isinstance(version, bool):
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        raise InputError(
            f"{path}: unknown baseline schema version {version!r}; this perf_tests reads versions "
            f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}. "
            + ("It was written by a newer perf_tests: update this checkout." if newer else fix)
        )
    if "environment" not in doc:
        raise _fail(path, "environment", "missing; a baseline records the environment its runs came from",
                    fix)
    environment = _dict(path, "environment", doc["environment"], fix, optional=False)
    run_docs = _list(path, "runs", doc.get("runs"), fix, optional=False)
    case_docs = _dict(path, "cases", doc.get("cases"), fix, optional=False)
    if not run_docs or not case_docs:
        raise _fail(path, "runs/cases", "the baseline holds no runs or no cases", fix)
    per_run: list[dict[str, CaseResult]] = [{} for _ in run_docs]
    for name, case in case_docs.items():
        where = f"cases[{name!r}]"
        case = _dict(path, where, case, fix, optional=False)
        entries = _list(path, f"{where}.runs", case.get("runs"), fix, optional=False)
        if not entries:
            raise _fail(path, f"{where}.runs", "no raw samples (no runs)", fix)
        for i, entry in enumerate(entries):
            at = f"{where}.runs[{i}]"
            entry = _dict(path, at, entry, fix, optional=False)
            index = _typed(path, f"{at}.run", entry.get("run"), int, "an index into runs", fix,
                           optional=False)
            if not 0 <= index < len(run_docs) or name in per_run[index]:
                raise _fail(path, f"{at}.run", f"{index} is not a run of this file (or repeats one)", fix)
            per_run[index][name] = _case_result(
                path, name, _samples(path, f"{at}.samples", entry.get("samples"), fix, missing_fix=fix),
                {**{k: case.get(k) for k in ("case", "definition_hash", "attention_used",
                                             "vae_attention_used")},
                 **{k: entry.get(k) for k in (*PER_RUN_FIELDS, "iterations", "compile_cache", "correct",
                                              "attention_kernels", "gpu_state", "device_samples")}},
                f"{where} (runs[{i}]): ", fix)
    runs = []
    for i, (entry, cases) in enumerate(zip(run_docs, per_run, strict=True)):
        at = f"runs[{i}]"
        entry = _dict(path, at, entry, fix, optional=False)
        canary = tuple(_samples(path, f"{at}.canary", entry["canary"], fix)) if entry.get("canary") else ()
        runs.append(Run(
            source=_str(path, f"{at}.source", entry.get("source"), fix) or f"run {i}",
            machine=checked_env(path, f"{at}.machine_info", fingerprint(
                _dict(path, f"{at}.machine_info", entry.get("machine_info"), fix)) or environment, fix),
            machine_id=_str(path, f"{at}.machine_id", entry.get("machine_id"), fix),
            datetime=_str(path, f"{at}.datetime", entry.get("datetime"), fix),
            git_commit=_str(path, f"{at}.git_commit", entry.get("git_commit"), fix),
            cases=cases,
            canary=canary,
            grid_name=_str(path, f"{at}.grid_name", entry.get("grid_name"), fix),
            content_hash=_str(path, f"{at}.content_hash", entry.get("content_hash"), fix),
        ))
    environment = checked_env(path, "environment", environment, fix)
    env = written = _str(path, "env", doc.get("env"), fix, optional=False)
    env = environment.get("env", env) if (env, environment.get("env")) in LEGACY_LABELS else env
    if env != written and Path(path).name.startswith(f"{written}-"):
        renamed = Path(path).name.replace(written, env, 1)
        raise _fail(path, "env", f"the file is named for {written!r} but its runs are torch "
                    f"{environment.get('torch_version')} ({env!r}; recorded before that release had its own "
                    f"label)", f"Rename it to {renamed} (`git mv`), where the store looks for {env!r} runs; "
                    f"its labels are corrected when it is read.")
    mixed = sorted({r.machine.get("env") for r in runs} - {env, None})
    if mixed or environment.get("env", env) != env:
        others = ", ".join(mixed) or environment["env"]
        raise _fail(path, "env", f"the baseline is {env!r} but holds runs of {others}; a baseline holds one "
                    f"environment (torch 2.0.x runs were once labelled torch2)",
                    "Record each environment's runs into its own file: `nox -s update-baselines -- --env ENV "
                    "--replace`, or restore the file from git (`git checkout -- FILE`).")
    return Baseline(
        source=str(path),
        schema_version=version,
        device_slug=_str(path, "device_slug", doc.get("device_slug"), fix, optional=False),
        env=env,
        profile=_str(path, "profile", doc.get("profile"), fix, optional=False),
        environment=dict(environment),
        created=_str(path, "created", doc.get("created"), fix),
        updated=_str(path, "updated", doc.get("updated"), fix),
        runs=tuple(runs),
    )


# --- records -> the comparator's Side ------------------------------------------------------------------


def _merge_cases(runs: Sequence[Run]) -> dict[str, CaseSamples]:
    """Every case's samples, compile time (with its cache state), memory and correctness over runs: the
    one place these are aggregated."""
    cases: dict[str, CaseSamples] = {}
    for run in runs:
        for name, r in run.cases.items():
            cs = cases.get(name)
            if cs is None:
                cs = cases[name] = CaseSamples(name, [], definition_hash=r.definition_hash,
                                               attention_used=r.attention_used, case=dict(r.case),
                                               run_machines=[], compile_cache=[], correct=r.correct,
                                               device_runs=[])
            elif cs.definition_hash != r.definition_hash:
                raise InputError(
                    f"{run.source}: case {name!r} has definition_hash {r.definition_hash} but an earlier run "
                    f"has {cs.definition_hash}; these runs measured different definitions. Compare them "
                    f"separately, or rerun one side with the same perf_tests."
                )
            cs.runs.append(list(r.samples))
            # device time is judged only where every run of the side has it (stats.on_one_clock)
            has_device = r.device_samples is not None and cs.device_runs is not None
            cs.device_runs = [*cs.device_runs, list(r.device_samples)] if has_device else None
            cs.run_machines.append(run.machine_id)
            kernels = r.extra.get("attention_kernels")
            if isinstance(kernels, dict) and kernels.get("unet"):
                cs.unet_kernels.add("+".join(kernels["unet"]))
            if r.compile_time_s is not None:
                cs.compile_time_s.append(r.compile_time_s)
                cs.compile_cache.append(r.compile_cache)
            if r.peak_memory_bytes is not None:
                cs.peak_memory_bytes.append(r.peak_memory_bytes)
            # one wrong output taints the case; "correct" needs every run to have checked and passed
            if r.correct is False or cs.correct is False:
                cs.correct = False
            elif r.correct is None:
                cs.correct = None
    return cases


def _side(runs: Sequence[Run], label: str, environment: dict, selected_known: bool) -> Side:
    cases = _merge_cases(runs)
    failed: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for run in runs:
        for name, f in run.failed.items():
            failed.setdefault(name, f"{f.kind}: {f.reason}")
        for name, s in run.skipped.items():
            skipped.setdefault(name, s.reason)
    skipped = {n: r for n, r in skipped.items() if n not in cases and n not in failed}
    selected = None
    if selected_known and runs and all(r.selected is not None for r in runs):
        selected = set().union(*(r.selected for r in runs))
    return Side(
        label, environment, cases, n_runs=len(runs),
        machines=[r.machine_id for r in runs],
        canary=[list(r.canary) for r in runs],
        skipped=skipped, failed=failed, selected=selected, run_order=None,
        disturbances=[_device_disturbance(r) for r in runs],
    )


def _device_disturbance(run: Run) -> str | None:
    """Why the device slowed this run down by itself (a case the GPU throttled), else None."""
    for name, r in run.cases.items():
        found = disturbance(r.extra.get("gpu_state"))
        if found is not None:
            return f"machine disturbed: {found.sentence()} in {name}"
    return None


def side_from_runs(runs: Sequence[Run], label: str) -> Side:
    """Merge runs into one side; their environments must agree (a side is one environment)."""
    if not runs:
        raise InputError("no runs given.")
    env = dict(runs[0].machine)
    for run in runs[1:]:
        diff = environment_mismatch(env, run.machine, DEFAULT_ENV_FIELDS)
        if diff:
            raise InputError(
                f"cannot merge {run.source} with {runs[0].source}: different environments "
                f"({'; '.join(diff)}). "
                f"Pass runs of one environment per side."
            )
    return _side(runs, label, env, selected_known=True)


def side_from_baseline(baseline: Baseline, label: str) -> Side:
    """A baseline's runs as one side; which cases they selected is unknown (``Side.selected`` None)."""
    return _side(baseline.runs, label, dict(baseline.environment), selected_known=False)


def load_side(paths: Sequence[str | os.PathLike], label: str | None = None) -> tuple[Side, list[str]]:
    """One side from one baseline file, or from one or more runs (result JSON or journals, merged), and
    warnings about runs that did not finish."""
    if not paths:
        raise InputError("no input files given.")
    label = label or ", ".join(Path(p).name for p in paths)
    records = [read_any(p) for p in paths]
    if any(isinstance(r, Baseline) for r in records):
        if len(records) > 1:
            raise InputError("a baseline file cannot be merged with other files on one side; pass it alone.")
        return side_from_baseline(records[0], label), []
    warnings = []
    for run in records:
        alone = [n for n, c in run.cases.items() if c.extra.get("alone")]
        if alone:
            reason = run.cases[alone[0]].extra["alone"]
            warnings.append(f"{run.source}: {len(alone)} case(s) measured without the A/B partner taking "
                            f"turns ({reason}), from {alone[0]}: their rounds did not alternate with the "
                            "other side's")
        if not run.complete:
            lacking = run.lacking
            shown = ", ".join(lacking[:5]) + (f" and {len(lacking) - 5} more" if len(lacking) > 5 else "")
            warnings.append(
                f"{run.source}: the run did not finish (no 'end' line in its journal); it lacks "
                f"{len(lacking)} selected case(s)" + (f": {shown}" if lacking else "")
                + ". They count as missing."
            )
    return side_from_runs(records, label), warnings


def profiles_of(source: Run | Side | Iterable[Run]) -> list[str]:
    """Profiles named by the cases (``case.profile``) of a run, runs or a side, in order of appearance."""
    if isinstance(source, Run):
        source = [source]
    cases = source.cases.values() if isinstance(source,
                                                Side) else [c for r in source for c in r.cases.values()]
    out: list[str] = []
    for c in cases:
        p = c.case.get("profile")
        if p and p not in out:
            out.append(p)
    return out


def format_seconds(s: float | None) -> str:
    """A duration for people: ``12.34 ms`` below a second, ``1.234 s`` above (tables and reports)."""
    if s is None:
        return "-"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"
