"""A run's side of the store: record its runs, and judge them against this machine's own history.

``python -m perf_tests run`` records every suite process into the store (:func:`record_files`) and, unless
``--ab`` is given, looks there first for a baseline (:func:`pick`): runs of this device, environment and
profile recorded on this machine, of the commit given by ``--baseline-commit`` (CI: the pull request's
base), else of the latest recorded commit other than the tree's, else earlier runs of the tree's own commit.
Only when the store holds none does the committed per-type baseline (``baselines/``) judge the run.

This machine: the same ``machine_id`` (host and boot). Runs of another boot of the same ``host_id`` are
judged as this machine when their canary's median is within ``Policy.canary_min_shift`` of this run's, and
as another machine otherwise (docs/store.md says why).
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from perf_tests.analysis.stats import DEFAULT_ENV_FIELDS, Policy, compare
from perf_tests.measure import machine
from perf_tests.records.results import (
    JOURNAL_SUFFIX,
    InputError,
    Run,
    load_side,
    profiles_of,
    read_run,
    side_from_runs,
)
from perf_tests.records.store import OFF, RunContext, Store, StoredRun, default_location, describe, run_key
from perf_tests.tools.compare import Outcome


def location(option: str | None) -> str | None:
    """The store a run records into: --store, else $SD_PERF_STORE, else the default file; None when off."""
    where = option or default_location()
    return None if where == OFF else where


def _git(args: Sequence[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def run_context(run: Run, root: Path, mode: str) -> RunContext:
    """Host, commit time and branch of a run made here (host only for runs of this boot)."""
    commit = run.git_commit.removesuffix("+dirty") if run.git_commit else None
    branch = os.environ.get("GITHUB_REF_NAME") if os.environ.get("GITHUB_ACTIONS") else None
    return RunContext(
        host_id=machine.host_id() if run.machine_id == machine.machine_id() else None,
        commit_time=_git(["show", "-s", "--format=%cI", commit], root) if commit else None,
        branch=branch or _git(["branch", "--show-current"], root),
        mode=mode,
    )


def record_files(
    paths: Sequence[Path], where: str, *, mode: str = "solo", root: Path | None = None
) -> list[str]:
    """Record result files (a killed process's journal when its JSON is missing) into the store."""
    root = root or Path.cwd()
    added = 0
    with Store.open(where) as store:
        for path in paths:
            journal = path.with_name(path.name.removesuffix(".json") + JOURNAL_SUFFIX)
            source = path if path.is_file() else journal
            if not source.is_file():
                continue
            run = read_run(source)
            added += store.record(run, run_context(run, root, mode)).added
        total = store.count()
    return [f"store: recorded {added} run(s) into {describe(where)} ({total} in all)"]


def record_invocation(where: str | None, paths: Sequence[Path], *, named: bool, mode: str) -> list[str]:
    """Record one invocation's runs. A store named by --store or $SD_PERF_STORE that cannot be written is an
    error (InputError, exit 2); the default one only warns, so a read-only home never costs a perf run."""
    if where is None:
        return ["store: off, nothing recorded"]
    try:
        return record_files(paths, where, mode=mode)
    except Exception as exc:  # sqlite3 and psycopg errors share no base class below Exception
        if named or os.environ.get("SD_PERF_STORE"):
            raise InputError(
                f"the store {describe(where)} cannot record the runs ({exc}); the results are in "
                f"{paths[0].parent}/, record them later with `python -m perf_tests store import "
                f"{paths[0].parent}`"
            ) from exc
        return [f"warning: store: not recorded into {describe(where)} ({exc})"]


def no_baseline_hint(out: Path, label: str) -> str:
    """What to do when nothing judged the runs: the folder just produced, named."""
    return (
        f"hint: these runs are in {out}/ and in the store; the next run on this machine is judged against "
        f"them. To make them this device type's committed baseline: python -m perf_tests update-baselines "
        f"{out}/{label}-run*.json"
    )


@dataclass(frozen=True)
class Pick:
    runs: list[Run]
    commit: str | None
    label: str  # names the baseline in the verdict's header
    why: str  # one sentence: which runs and why these


def _canary_median(runs: Sequence[Run]) -> float | None:
    values = sorted(x for r in runs for x in r.canary)
    return values[len(values) // 2] if values else None


def _usable(stored: StoredRun, profiles: Sequence[str]) -> bool:
    run = stored.run
    wrong = any(c.correct is False for c in run.cases.values()) or any(
        f.kind in ("wrong-output", "non-finite") for f in run.failed.values()
    )
    return (
        bool(run.cases)
        and run.complete
        and not wrong
        and any(c.case.get("profile") in profiles for c in run.cases.values())
    )


def _env_key(run: Run) -> tuple:
    return tuple(run.machine.get(f) for f in DEFAULT_ENV_FIELDS)


def pick(
    where: str, candidate: Sequence[Run], *, baseline_commit: str | None = None, policy: Policy = Policy()
) -> tuple[Pick | None, str]:
    """The baseline runs for ``candidate`` from this machine's history, or (None, why there are none)."""
    first = candidate[0]
    slug, env = first.machine.get("device_slug"), first.machine.get("env")
    profiles = profiles_of(candidate)
    what = f"{slug}, {env}, profile {', '.join(profiles) or '?'}"
    if not slug or not env or not profiles:
        return None, "the runs name no device, environment or profile"
    machine_ids = sorted({r.machine_id for r in candidate if r.machine_id})
    own = {run_key(r) for r in candidate}
    host = machine.host_id()
    marks = ", ".join("?" * len(machine_ids)) or "NULL"
    scope = (f"device_slug = ? AND env = ? AND mode = 'solo' AND complete = 1 "
             f"AND (machine_id IN ({marks}) OR host_id = ?)")
    params = (slug, env, *machine_ids, host)
    chosen: list[StoredRun] = []
    with Store.open(where) as store:
        # which commits first (a light query), then the runs of one commit at a time, whole
        heads = store.execute(f"SELECT id, git_commit, commit_sha, dirty, COALESCE(started_at, recorded_at) "
                              f"FROM runs WHERE {scope}", params).fetchall()
        heads.sort(key=lambda h: h[4])
        if baseline_commit:
            order = [("base", [h[0] for h in heads if h[2] == baseline_commit and not h[3]])]
        else:
            latest_first = list(dict.fromkeys(h[1] for h in reversed(heads) if h[1] != first.git_commit))
            order = [("other", [h[0] for h in heads if h[1] == c]) for c in latest_first]
            order.append(("own", [h[0] for h in heads if h[1] == first.git_commit]))
        reason = ""
        for kind, ids in order:
            if not ids:
                continue
            runs_of = store.runs(f"id IN ({', '.join('?' * len(ids))})", ids, profiles=profiles)
            chosen = [s for s in runs_of if _usable(s, profiles) and run_key(s.run) not in own]
            if chosen:
                reason = kind
                break
    if not chosen:
        if baseline_commit:
            return None, (f"the store {describe(where)} holds no run of the base commit "
                          f"{baseline_commit[:12]} on this machine ({what})")
        return None, f"the store {describe(where)} holds no earlier run of this machine ({what})"
    chosen.sort(key=lambda s: s.run.datetime or s.recorded_at)
    commit_shown = (chosen[-1].run.git_commit or "?")[:12]
    why = {"base": f"the base commit {commit_shown}",
           "other": f"the latest commit recorded on this machine other than the tree's ({commit_shown})",
           "own": "no other commit recorded on this machine: earlier runs of the tree's own commit "
                  "(an A/A check)"}[reason]
    env_now = _env_key(chosen[-1].run)
    chosen = [s for s in chosen if _env_key(s.run) == env_now]
    runs = [s.run for s in chosen]
    this_boot = set(machine_ids)
    other_boot = [r for r in runs if r.machine_id not in this_boot]
    if other_boot:
        ours, theirs = _canary_median(candidate), _canary_median(other_boot)
        near = (
            ours is not None
            and theirs is not None
            and abs(math.log(theirs / ours)) <= math.log1p(policy.canary_min_shift)
        )
        if near and machine_ids:
            runs = [
                dataclasses.replace(r, machine_id=machine_ids[0]) if r.machine_id not in this_boot else r
                for r in runs
            ]
            why += (
                f"; {len(other_boot)} of them from another boot of this host, canary "
                f"{theirs / ours - 1:+.1%}: judged as this machine"
            )
        else:
            moved = f"canary {theirs / ours - 1:+.1%}" if ours and theirs else "no canary to tell"
            why += (
                f"; {len(other_boot)} of them from another boot of this host ({moved}, beyond "
                f"±{policy.canary_min_shift:.0%}): judged as another machine"
            )
    commit = chosen[-1].commit_sha
    label = f"this machine at {(commit or 'unknown commit')[:12]} ({len(runs)} runs from the store)"
    return Pick(
        runs, commit, label, f"baseline: {len(runs)} run(s) of {why}, from the store {describe(where)}"
    ), ""


def judge(
    where: str | None,
    candidate_paths: Sequence[Path],
    policy: Policy,
    *,
    baseline_commit: str | None = None,
) -> tuple[Outcome | None, list[str]]:
    """The candidate runs against this machine's history: (Outcome, lines saying which baseline and why),
    or (None, lines saying why the store has none)."""
    if where is None:
        return None, []
    runs = [read_run(p) for p in candidate_paths]
    try:
        chosen, why_not = pick(where, runs, baseline_commit=baseline_commit, policy=policy)
    except InputError as exc:
        return None, [f"store: not used ({exc})"]
    if chosen is None:
        return None, [
            f"store: {why_not}; judged against the committed baseline instead. The next run on "
            f"this machine is judged against these {len(runs)} run(s)."
        ]
    candidate, warnings = load_side(list(candidate_paths), f"current tree ({len(runs)} runs)")
    baseline = side_from_runs(chosen.runs, chosen.label)
    return Outcome(compare(baseline, candidate, policy), baseline, candidate, warnings), [chosen.why]
