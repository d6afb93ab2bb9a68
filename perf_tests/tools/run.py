"""``python -m perf_tests run``: one perf run end to end.

    python -m perf_tests run [--grid gate|full] [--runs N | --budget MINUTES] [--ab REF] [...] [-- PYTEST
    ARGS]

1. The suite, N times, each a separate process (``python -m pytest perf_tests ... --benchmark-json
   <results>/<label>-run<i>.json``): processes, not rounds, are the unit of evidence. With ``--budget`` the
   runs go on until the next one would overrun the budget (at least one run). The suite's Inductor cache
   folder persists between runs and invocations, so only a machine's first run compiles cold.
2. The study table over all runs (``study-<label>.md``).
3. Every suite process recorded into the results store (``--store``, docs/store.md), then the verdict
   against this machine's runs in the store, else the committed baseline (or, with ``--ab REF``, against
   REF on this machine, analysed in pairs), written once per format: ``verdict-<label>.txt|.md|.json``.
   The two processes of a pair start together and take turns after every timed round
   (``perf_tests.measure.turns``), so both meet the machine's moment-to-moment load alike;
   ``--interleave runs`` runs A, then B.
4. The study table and the verdict appended once to ``$GITHUB_STEP_SUMMARY`` when that is set.

Exit codes: 0 pass; 1 regression or failed case (or missing under --require-all, inconclusive under
--fail-on-inconclusive); 2 bad input or error, e.g. a suite process that ended without a result.
``--gate warn`` turns exit 1 from time verdicts into 0, never a failed or missing case, never exit 2.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from perf_tests.analysis.stats import FAILED, MISSING, REGRESSION
from perf_tests.errors import EXIT_FAIL, EXIT_OK, InputError
from perf_tests.measure import turns
from perf_tests.records.baselines import locate_baselines, update_baselines
from perf_tests.records.names import env_label
from perf_tests.records.results import profiles_of, read_baseline, read_run
from perf_tests.report.job_summary import append_step_summary
from perf_tests.tools import store_baseline
from perf_tests.tools.ab import ab_trees, pair_cpus
from perf_tests.tools.compare import Outcome, exit_code, load_and_compare, load_and_compare_ab, write_reports
from perf_tests.tools.worktree import Tree

PYTEST_NO_TESTS = 5


class RunError(InputError):
    """A bad option or a suite process without a result: exit 2."""


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------
def another_run(durations: Sequence[float], budget_s: float) -> bool:
    """Whether one more run (or A/B pair) fits in the budget, given the durations of those done.

    The first always runs. Its duration is the estimate until a second one has run; from then on the
    longest of the later ones is, since the first compiled with a cold Inductor cache and the later ones
    reuse it. A run that would end past the budget is never started.
    """
    if not durations:
        return True
    estimate = max(durations[1:]) if len(durations) > 1 else durations[0]
    return sum(durations) + estimate <= budget_s


@dataclass(frozen=True)
class SuiteRun:
    tree: Tree
    index: int
    path: Path  # the result JSON; <path stem>.journal.jsonl beside it
    seconds: float
    returncode: int


def suite_command(out_json: Path, grid: str | None, pytest_args: Sequence[str]) -> list[str]:
    grid_args = ["--grid", grid] if grid else []
    return [sys.executable, "-m", "pytest", "perf_tests", "-p", "no:cacheprovider", *grid_args, *pytest_args,
            "--benchmark-json", str(out_json)]


def run_process(cmd: list[str], cwd: Path, env: dict[str, str]) -> int:
    return subprocess.run(cmd, cwd=cwd, env=env, check=False).returncode


@dataclass(frozen=True)
class Job:
    cmd: list[str]
    cwd: Path
    env: dict[str, str]
    log: Path  # the process's output (both of a pair run at once: their output would interleave)


def shared_cpu(suite_cmd: Sequence[str] = ()) -> set[int] | None:
    """The CPUs both processes of a pair run on (Linux), else None: one core on a CPU run, every core on
    CUDA (perf_tests.tools.ab.pair_cpus says why)."""
    return pair_cpus(suite_cmd)


def run_side_by_side(jobs: Sequence[Job]) -> list[int]:
    """Start the two processes of an A/B pair at once, on one CPU; they take turns round by round
    (perf_tests.measure.turns), the first job first. Returns their exit codes; each one's output is in its
    log."""
    a_read, b_write = os.pipe()  # B -> A
    b_read, a_write = os.pipe()  # A -> B
    os.write(b_write, turns.TOKEN)  # A starts
    cpu = shared_cpu(jobs[0].cmd)
    procs: list[subprocess.Popen] = []
    try:
        for job, (r, w) in zip(jobs, ((a_read, a_write), (b_read, b_write)), strict=True):
            with open(job.log, "wb") as out:
                procs.append(subprocess.Popen(job.cmd, cwd=job.cwd, env={**job.env, turns.ENV: f"{r},{w}"},
                                              pass_fds=(r, w), stdout=out, stderr=subprocess.STDOUT))
            if cpu is not None:  # still one thread (the interpreter starting): its later threads inherit them
                os.sched_setaffinity(procs[-1].pid, cpu)
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    finally:
        for fd in (a_read, b_write, b_read, a_write):
            os.close(fd)  # the children hold their own ends: one's exit is the other's end-of-file
    return [proc.wait() for proc in procs]


def _result_name(label: str, tree: Tree, index: int) -> str:
    return f"{label}-{tree.side}-run{index}.json" if tree.side else f"{label}-run{index}.json"


def check_run(run: SuiteRun) -> None:
    """pytest exit 0 or 1 (1: a case failed, recorded in the result) with a result file, or RunError."""
    side = f" (side {run.tree.side}, {run.tree.label})" if run.tree.side else ""
    where = f"suite process {run.index}{side}"
    if run.returncode == PYTEST_NO_TESTS:
        raise RunError(f"the {where} collected no test: check the selection after `--`.")
    if run.returncode not in (0, 1) or not run.path.is_file():
        journal = run.path.with_suffix(".journal.jsonl")
        kept = f"; the cases it finished are in {journal}" if journal.is_file() else ""
        raise RunError(f"the {where} ended with exit {run.returncode} and no result ({run.path}){kept}. "
                       "Its output above says why.")


def run_all(
    trees: Sequence[Tree], opts: argparse.Namespace, pytest_args: Sequence[str], out: Path, label: str,
    launch: Callable[[list[str], Path, dict[str, str]], int] = run_process,
    clock: Callable[[], float] = time.monotonic, log: Callable[[str], None] = print,
    launch_pair: Callable[[Sequence[Job]], list[int]] = run_side_by_side,
) -> list[SuiteRun]:
    """Run the suite in each tree until --runs or --budget is spent, in pairs with two trees, each pair side
    by side taking turns round by round unless ``--interleave runs``. The side that goes first alternates
    (A, B in odd pairs, B, A in even ones), so what going first does to a process (the machine's state it
    meets, the partner still starting) falls on both sides alike: it cancels in the paired mean over an even
    number of pairs, and leaves a third of itself over three (it widens the interval either way)."""
    budget_s = opts.budget * 60 if opts.budget is not None else None
    side_by_side = len(trees) == 2 and getattr(opts, "interleave", "rounds") == "rounds"
    turns_files = ("measure/turns.py", "turns.py")  # the second: a tree from before the layers
    older = [t.label for t in trees if not any((t.path / "perf_tests" / f).is_file() for f in turns_files)]
    if side_by_side and older:  # a tree without turns.py would not wait for its turn: run A, then B
        log(f"[run] {', '.join(older)} cannot take turns round by round (no perf_tests/measure/turns.py): "
            "each pair runs A, then B")
        side_by_side = False
    runs: list[SuiteRun] = []
    durations: list[float] = []
    while (len(durations) < (opts.runs or 1)) if budget_s is None else another_run(durations, budget_s):
        index = len(durations) + 1
        if budget_s is not None:
            log(f"[run] {label} run {index}: {sum(durations) / 60:.1f} of {opts.budget:g} min spent")
        start = clock()
        jobs, paths = [], []
        order = list(trees) if index % 2 else list(trees)[::-1]
        for tree in order:
            path = (out / _result_name(label, tree, index)).resolve()
            pythonpath = [str(tree.path), *filter(None, [os.environ.get("PYTHONPATH")])]
            # The Inductor cache is the suite's own persistent folder, shared by all runs and both A/B sides:
            # it keys entries by graph content, and every measured compilation reads it (warm mode).
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
            jobs.append(Job(suite_command(path, opts.grid, pytest_args), tree.path, env,
                            path.with_suffix(".log")))
            paths.append(path)
            log(f"[run] {label} run {index}{f' side {tree.side} ({tree.label})' if tree.side else ''}: "
                f"{' '.join(jobs[-1].cmd[1:])}" + (f" (output: {jobs[-1].log})" if side_by_side else ""))
            if not side_by_side:
                t0 = clock()
                returncode = launch(jobs[-1].cmd, tree.path, env)
                run = SuiteRun(tree, index, path, clock() - t0, returncode)
                check_run(run)
                runs.append(run)
        if side_by_side:
            log(f"[run] {label} run {index}: {order[0].side} and {order[1].side} side by side, taking turns "
                f"after every timed round, {order[0].side} first")
            t0 = clock()
            codes = launch_pair(jobs)
            pair = [SuiteRun(tree, index, path, clock() - t0, code)
                    for tree, path, code in zip(order, paths, codes, strict=True)]
            for job in jobs:
                if job.log.is_file():
                    sys.stdout.write(job.log.read_text(encoding="utf-8", errors="replace"))
                    sys.stdout.flush()
            for run in pair:
                check_run(run)
            runs.extend(pair)
        durations.append(clock() - start)
    log(f"[run] {len(durations)} run(s){' per side' if len(trees) > 1 else ''} in {sum(durations) / 60:.1f} "
        "min")
    return runs


@contextmanager
def source_trees(root: Path, ab_ref: str | None) -> Iterator[tuple[Tree, ...]]:
    """The tree(s) the suite runs in: ``root``, and REF beside it with --ab."""
    if not (root / "perf_tests").is_dir():
        raise RunError(f"{root} has no perf_tests/ folder: run from the repository root.")
    if ab_ref is None:
        yield (Tree(root, "current tree"),)
        return
    with ab_trees(ab_ref, root) as pair:
        yield pair


# ---------------------------------------------------------------------------------------------------------
# Verdict and exit code
# ---------------------------------------------------------------------------------------------------------
def final_exit(gate_code: int, *, failed: int, gate: str) -> int:
    """The run's exit code from the gate's (0/1), the failed or missing cases counted apart, and --gate."""
    if failed:
        return EXIT_FAIL  # a failed (or, under --require-all, missing) case: never softened
    if gate_code == EXIT_FAIL and gate == "warn":
        return EXIT_OK
    return gate_code


def _summary(paths: Sequence[Path]) -> None:
    append_step_summary(path.read_text(encoding="utf-8") for path in paths if path.is_file())


def write_study(files: Sequence[Path], out: Path, label: str) -> Path | None:
    """The study table over all runs (study-<label>.md and its bar chart), printed too."""
    from perf_tests.report.study import write_study as write

    md = out / f"study-{label}.md"
    write([read_run(f) for f in files], md, plot=out / f"study-{label}.png")
    print(md.read_text(encoding="utf-8"))
    return md


def run(opts: argparse.Namespace, pytest_args: Sequence[str]) -> int:
    """The run end to end (options of ``python -m perf_tests run``); errors raise RunError or InputError."""
    now = datetime.datetime.now(datetime.timezone.utc)
    out = opts.results or Path("results") / now.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    label = opts.label or env_label(importlib.metadata.version("torch"))
    with source_trees(Path.cwd().resolve(), opts.ab) as trees:  # A/B's worktree lives until --explain is done
        runs = run_all(trees, opts, pytest_args, out, label, log=lambda m: print(m, file=sys.stderr,
                                                                                 flush=True))
        return _verdict(opts, trees, runs, out, label)


def _verdict(opts: argparse.Namespace, trees: Sequence[Tree], runs: list[SuiteRun], out: Path,
             label: str) -> int:
    study = write_study([r.path for r in runs], out, label)
    where = store_baseline.location(opts.store)
    for line in store_baseline.record_invocation(where, [r.path for r in runs], named=bool(opts.store),
                                                 mode="ab" if opts.ab else "solo"):
        print(line, file=sys.stderr)
    # processes with a failed case
    failed = sum(r.returncode == 1 or bool(_recorded_failures(r.path)) for r in runs)

    if opts.update_baselines:
        unfinished = _unfinished([r.path for r in runs]) if opts.require_all else []
        if failed or unfinished:  # a failed or half-measured run never becomes a baseline
            print(f"error: not recorded: {failed} run(s) with a failed case, {len(unfinished)} selected "
                  "case(s) "
                  f"without a result {unfinished[:5]}", file=sys.stderr)
            return EXIT_FAIL
        for line in _record(sorted(r.path for r in runs), opts.baseline_dir, opts.replace):
            print(line)
        _summary([p for p in (study,) if p])
        return EXIT_OK

    if opts.ab:
        a = [r.path for r in runs if r.tree.side == "A"]
        b = [r.path for r in runs if r.tree.side == "B"]
        outcome = load_and_compare_ab(b, a, opts.policy, ref_label=f"{opts.ab} ({len(b)} runs)",
                                      current_label=f"current tree ({len(a)} runs)")
    else:
        outcome, lines = store_baseline.judge(where, [r.path for r in runs], opts.policy,
                                              baseline_commit=opts.baseline_commit)
        for line in lines:
            print(line, file=sys.stderr)
        outcome = outcome or load_and_compare(opts.baseline_dir, [r.path for r in runs], opts.policy,
                                              require_baseline=opts.require_baseline)
    for warning in outcome.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if outcome.comparison is None:
        print(store_baseline.no_baseline_hint(out, label), file=sys.stderr)
    reports = write_reports(outcome, out, f"verdict-{label}")
    if opts.explain:
        _explain(opts, trees, outcome, out, reports)
    print(reports["text"].read_text(encoding="utf-8"))
    gate_code = exit_code(outcome, fail_on_inconclusive=opts.fail_on_inconclusive,
                          require_all=opts.require_all)
    failed += _hard_verdicts(outcome, require_all=opts.require_all)
    code = final_exit(gate_code, failed=failed, gate=opts.gate)
    if gate_code == EXIT_FAIL and code == EXIT_OK:
        print("warning: timing regression(s) above; not failing the run (--gate warn)", file=sys.stderr)
    _summary([p for p in (study, reports["markdown"]) if p])
    print(f"results, study table and verdict: {out}/", file=sys.stderr)
    return code


# ---------------------------------------------------------------------------------------------------------
# The gate and the store
# ---------------------------------------------------------------------------------------------------------
def _hard_verdicts(outcome: Outcome, *, require_all: bool) -> int:
    """Failed cases, and missing ones under --require-all: what --gate warn never softens."""
    if outcome.comparison is None:
        return 0
    return outcome.comparison.count(FAILED) + (outcome.comparison.count(MISSING) if require_all else 0)


def _explain(opts: argparse.Namespace, trees: Sequence[Tree], outcome: Outcome, out: Path,
             reports: dict[str, Path]) -> None:
    """The operator diff of every case flagged as a regression, appended to the verdict in every format."""
    from perf_tests.tools import explain

    cases = outcome.comparison.cases if outcome.comparison else []
    flagged = [c.name for c in cases if c.verdict == REGRESSION]
    if not flagged:
        return
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    folder = out / "explain"
    if opts.ab:
        current, ref = trees
        diffs = explain.explain_trees(ref.path, current.path, flagged, folder, baseline_label=ref.label,
                                      candidate_label=current.label, log=log)
    else:
        ref = opts.explain_ref or _baseline_commit(opts.baseline_dir, outcome)
        if ref is None:
            print("warning: --explain: the baseline records no git commit to profile against; pass "
                  "--explain-ref",
                  file=sys.stderr)
            return
        diffs = explain.explain_cases(ref, flagged, folder, root=trees[0].path, log=log)
    explain.write_reports(diffs, folder)
    for fmt, path in reports.items():
        if fmt == "json":
            doc = json.loads(path.read_text(encoding="utf-8"))
            doc.update(explain.to_dict(diffs))
            path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        elif fmt in ("text", "markdown"):
            with open(path, "a", encoding="utf-8") as fh:
                fh.write("\n" + explain.RENDERERS[fmt](diffs))


def _baseline_commit(baseline_dir: Path, outcome: Outcome) -> str | None:
    """The commit the baseline's last run was recorded at (without a '+dirty' mark), if it recorded one."""
    paths = locate_baselines(baseline_dir, outcome.candidate, profiles_of(outcome.candidate))
    commits = [run.git_commit for path in paths for run in read_baseline(path).runs if run.git_commit]
    return commits[-1].removesuffix("+dirty") if commits else None


def _recorded_failures(path: Path) -> list[str]:
    return list(read_run(path).failed)


def _unfinished(files: list[Path]) -> list[str]:
    """Cases selected in a run that left neither a result, a skip nor a failure."""
    return [name for path in files for name in read_run(path).lacking]


def _record(files: list[Path], baseline_dir: Path, replace: bool) -> list[str]:
    lines = []
    for update in update_baselines(files, baseline_dir, replace):
        lines.append(f"wrote {update.path}: {len(update.added)} run(s) added"
                     + (f", {len(update.duplicates)} already there" if update.duplicates else ""))
        lines += [f"  note: {note}" for note in update.notes]
    return lines
