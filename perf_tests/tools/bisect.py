"""Bisect a slowdown: the first commit between GOOD and BAD that made one case slower.

``python -m perf_tests bisect GOOD BAD --case NAME`` walks the first-parent commits of GOOD..BAD with
``git bisect``'s rules, measuring the case with the A/B protocol: every measured commit is checked out into
its own temporary worktree and run by the suite in a separate process with this Python environment,
interleaved with runs of GOOD (GOOD, X, GOOD, X, ...) so that machine drift hits both alike.

1. GOOD and BAD are measured first: BAD must be significantly slower, which fixes the effect E
   (the ratio BAD/GOOD of the runs' geometric mean medians) and the decision point, the half-way ratio
   sqrt(E).
2. At each step the commit in the middle of the open range is measured against GOOD (all GOOD runs so
   far, pooled): "bad" when the whole interval of its ratio to GOOD lies above sqrt(E), "good" when it
   lies below. An interval that straddles sqrt(E) is inconclusive: another pair of runs is added, up to
   ``--max-runs-per-step``; after that the point estimate decides and the step is marked uncertain.
3. A commit whose run fails (it does not import, the case errors or is missing) is skipped, as
   ``git bisect skip`` does: the nearest untested commit to the middle is measured instead.
4. The first bad commit is measured against its parent (interleaved runs, the ratio with its interval)
   and profiled against it (:mod:`perf_tests.tools.explain`).

Runs are the unit, as in the gate (``perf_tests.analysis.stats``): each run is reduced to the log of its
median, the ratio is the exponential of the difference of the sides' means, and its interval a t interval on
the run-to-run sd pooled over both sides (the policy's largest prior, e.g. 10%, while neither side has two
runs). How a commit is measured is a parameter, ``measure(tree, case) -> per-call seconds of one run``; the
default runs the suite (:func:`measure_with_suite`).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from perf_tests.analysis.stats import Policy, ratio_interval
from perf_tests.errors import InputError
from perf_tests.tools.worktree import checkout, git, resolve

Measure = Callable[[Path, str], list[float]]  # (tree, case name) -> per-call seconds of one run (process)


class MeasureFailed(Exception):
    """The case could not be measured in this tree (import error, failed case, no result)."""


# ---------------------------------------------------------------------------------------------------------
# Measuring one run with the suite


def suite_args(case_name: str) -> list[str]:
    """The suite options selecting exactly this one case: the coupling to the suite's command line."""
    from perf_tests.records.names import MEMORY_FORMATS, PROJECTIONS, parse_name

    c = parse_name(case_name)
    args = [f"--profile={c.profile}", f"--attention={c.attention}", f"--compile={c.compile}",
            f"--batch-size={c.batch_size}", f"--precision={c.precision}", f"--case-kind={c.kind}"]
    # the ladder's axes only where the case has them: older trees do not know these options
    args += [f"--memory-format={c.memory_format}"] if c.memory_format != MEMORY_FORMATS[0] else []
    args += [f"--projections={c.projections}"] if c.projections != PROJECTIONS[0] else []
    return args


def measure_with_suite(tree: Path, case: str, extra_args: Sequence[str] = (),
                       timeout_s: float = 1800) -> list[float]:
    """One run of the suite in ``tree`` selecting only ``case``: its per-call samples (seconds)."""
    from perf_tests.tools.explain import tree_env

    with tempfile.TemporaryDirectory(prefix="perf-bisect-run-") as tmp:
        out = Path(tmp) / "run.json"
        cmd = [sys.executable, "-m", "pytest", "perf_tests", "-p", "no:cacheprovider", "-q",
               *suite_args(case),
               *extra_args, f"--benchmark-json={out}"]
        try:
            res = subprocess.run(cmd, cwd=tree, env=tree_env(tree), capture_output=True, text=True,
                                 timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            raise MeasureFailed(f"the suite ran over {timeout_s:.0f} s") from None
        doc = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {}
    for b in doc.get("benchmarks", []):
        if b.get("name") == case and b.get("stats", {}).get("data"):
            return [float(x) for x in b["stats"]["data"]]
    raise MeasureFailed(f"no result for the case (exit {res.returncode}): "
                        f"{failure_line(res.stdout + res.stderr)}")


def failure_line(output: str) -> str:
    """The line of pytest's output that says why: the last exception line, else the last line."""
    lines = [ln.strip() for ln in output.strip().splitlines() if ln.strip()]
    errors = [ln[1:].strip() for ln in lines if ln.startswith("E ") and re.search(r"(Error|Exception)\b", ln)]
    return (errors or lines or ["no output"])[-1]


# ---------------------------------------------------------------------------------------------------------
# Statistics of one comparison


@dataclass(frozen=True)
class Ratio:
    """Per-call time of X over the reference: the ratio of the runs' geometric mean medians, with its
    interval."""

    estimate: float
    low: float
    high: float
    runs_reference: int
    runs_x: int

    def __str__(self) -> str:
        return (f"{self.estimate:.3f}x (90% CI {self.low:.3f}-{self.high:.3f}; "
                f"{self.runs_reference}+{self.runs_x} runs)")


def ratio(reference: Sequence[Sequence[float]], x: Sequence[Sequence[float]],
          policy: Policy | None = None) -> Ratio:
    """X over the reference from per-call samples grouped by run (see the module docstring)."""
    policy = policy or Policy()
    yb = np.log([float(np.median(r)) for r in reference])  # (runs,) log run medians
    yc = np.log([float(np.median(r)) for r in x])
    groups = [y for y in (yb, yc) if y.size >= 2]
    df = sum(y.size - 1 for y in groups)
    if df:
        sd = math.sqrt(sum(float(np.sum((y - y.mean()) ** 2)) for y in groups) / df)
    else:  # one run a side: no measured spread yet, so the largest prior of the gate's policy
        sd, df = max(prior for *_, prior in policy.run_sd_priors), policy.prior_df
    d = float(yc.mean() - yb.mean())
    low, high = ratio_interval(d, sd * math.sqrt(1 / yb.size + 1 / yc.size), df, policy.confidence_level)
    return Ratio(math.exp(d), low, high, yb.size, yc.size)


# ---------------------------------------------------------------------------------------------------------
# The walk


@dataclass
class Step:
    commit: str
    subject: str
    verdict: str  # "good" | "bad" | "skip"
    ratio: Ratio | None = None  # vs GOOD
    uncertain: bool = False  # decided on the point estimate after the run limit
    reason: str = ""  # why skipped
    seconds: float = 0.0


@dataclass
class BisectResult:
    case: str
    good: str
    bad: str
    effect: Ratio  # BAD vs GOOD
    steps: list[Step] = field(default_factory=list)
    first_bad: str | None = None  # None when the range could not be narrowed to one commit
    candidates: list[str] = field(default_factory=list)  # commits that may be the first bad one
    parent: str | None = None
    slowdown: Ratio | None = None  # first bad vs its parent
    explain_text: str = ""
    max_steps: int = 0
    runs: int = 0  # suite runs (processes), all steps together
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def first_parent_commits(good: str, bad: str, root: Path) -> list[str]:
    """The first-parent commits after GOOD up to BAD, oldest first (BAD last)."""
    if subprocess.run(["git", "merge-base", "--is-ancestor", good, bad], cwd=root,
                      check=False).returncode != 0:
        raise InputError(f"{good[:12]} is not an ancestor of {bad[:12]}: GOOD must be an older commit of "
                         "BAD's history.")
    commits = git(["rev-list", "--first-parent", "--reverse", f"{good}..{bad}"], root).split()
    if not commits or commits[-1] != bad:
        raise InputError(f"no first-parent path from {good[:12]} to {bad[:12]}; pick refs on one branch.")
    return commits


def default_max_steps(n_commits: int) -> int:
    return math.ceil(math.log2(max(n_commits, 2))) + 3  # + room for a few skipped commits


class Bisector:
    def __init__(self, root: Path, case: str, measure: Measure, runs_per_step: int = 3,
                 max_runs_per_step: int | None = None, policy: Policy | None = None,
                 explain: Callable[[Path, Path, BisectResult], str] | None = None,
                 log: Callable[[str], None] = lambda m: None):
        self.root, self.case, self.measure, self.log = root, case, measure, log
        self.explain = explain  # (parent tree, first bad tree, result) -> the operator diff's text
        self.runs_per_step = runs_per_step
        self.max_runs = max_runs_per_step or 3 * runs_per_step
        self.policy = policy or Policy()
        self.n_runs = 0

    def subject(self, commit: str) -> str:
        return git(["log", "-1", "--format=%s", commit], self.root)

    def interleaved(self, ref_tree: Path, x_tree: Path, ref_runs: list, x_runs: list,
                    decide: Callable[[Ratio], str | None]) -> tuple[Ratio, str | None]:
        """Add (reference, X) run pairs until ``decide`` returns a verdict or the run limit is reached.

        X runs first in each pair, so a commit that does not run costs one process."""
        n_new = 0
        while True:
            x_runs.append(self._run(x_tree))
            ref_runs.append(self._run(ref_tree, reference=True))
            n_new += 1
            if n_new < self.runs_per_step:
                continue
            r = ratio(ref_runs, x_runs, self.policy)
            verdict = decide(r)
            if verdict is not None or n_new >= self.max_runs:
                return r, verdict
            self.log(f"    {r}: inconclusive, one more pair of runs")

    def _run(self, tree: Path, reference: bool = False) -> list[float]:
        self.n_runs += 1
        try:
            return self.measure(tree, self.case)
        except MeasureFailed as exc:
            if reference:
                raise InputError(f"the reference tree {tree} stopped running {self.case}: {exc}") from None
            raise

    def run(self, good_ref: str, bad_ref: str, max_steps: int | None = None) -> BisectResult:
        t_start, self.n_runs = time.perf_counter(), 0
        good, bad = resolve(good_ref, self.root), resolve(bad_ref, self.root)
        commits = first_parent_commits(good, bad, self.root)
        max_steps = max_steps or default_max_steps(len(commits))
        self.log(f"[bisect] {self.case}: {len(commits)} commit(s) after GOOD {good[:12]} up to BAD "
                 f"{bad[:12]}; "
                 f"step limit {max_steps}, {self.runs_per_step}-{self.max_runs} run pairs per step")
        with contextlib.ExitStack() as stack:
            good_tree = stack.enter_context(checkout(good, self.root, prefix="perf-bisect-good-")).path
            good_runs: list[list[float]] = []
            with checkout(bad, self.root, prefix="perf-bisect-bad-") as bad_tree:
                try:
                    effect, slower = self.interleaved(
                        good_tree, bad_tree.path, good_runs, [],
                        lambda r: "slower" if r.low > 1 else ("not" if r.high < 1 else None))
                except MeasureFailed as exc:
                    raise InputError(f"BAD ({bad[:12]}) does not run {self.case}: {exc}") from None
            if slower != "slower":
                raise InputError(f"BAD is not measurably slower than GOOD for {self.case}: {effect}. "
                                 "Nothing to bisect; check the case name, or add runs (--runs-per-step).")
            mid = math.sqrt(effect.estimate)
            self.log(f"[bisect] BAD vs GOOD: {effect}; a commit is bad above {mid:.3f}x")
            result = BisectResult(self.case, good, bad, effect, max_steps=max_steps)

            lo, hi = -1, len(commits) - 1  # last known good index (-1: GOOD), first known bad index
            skipped: set[int] = set()
            while hi - lo > 1 and len(result.steps) < max_steps:
                open_ = [i for i in range(lo + 1, hi) if i not in skipped]
                if not open_:
                    break
                target = (lo + hi) // 2
                i = min(open_, key=lambda j: (abs(j - target), j))
                step = self._step(commits[i], good_tree, good_runs, mid, len(result.steps) + 1, max_steps)
                result.steps.append(step)
                if step.verdict == "skip":
                    skipped.add(i)
                elif step.verdict == "bad":
                    hi = i
                else:
                    lo = i
            # As git: when skipped (or, at the step limit, untested) commits remain, name them all.
            result.candidates = commits[lo + 1:hi + 1]
            if len(result.candidates) == 1:
                result.first_bad = commits[hi]
                result.parent = commits[hi - 1] if hi > 0 else good
                self._against_parent(result)
        result.seconds = time.perf_counter() - t_start
        result.runs = self.n_runs
        return result

    def _step(self, commit: str, good_tree: Path, good_runs: list, mid: float, n: int,
              max_steps: int) -> Step:
        t0 = time.perf_counter()
        subject = self.subject(commit)
        self.log(f"[bisect] step {n}/{max_steps}: {commit[:12]} {subject}")
        try:
            with checkout(commit, self.root, prefix="perf-bisect-step-") as tree:
                r, verdict = self.interleaved(
                    good_tree, tree.path, good_runs, [],
                    lambda r: "bad" if r.low > mid else ("good" if r.high < mid else None))
        except MeasureFailed as exc:
            step = Step(commit, subject, "skip", reason=str(exc).splitlines()[0][:200],
                        seconds=time.perf_counter() - t0)
            self.log(f"    does not run ({step.reason}): skip ({step.seconds:.0f} s)")
            return step
        uncertain = verdict is None
        step = Step(commit, subject, verdict or ("bad" if r.estimate > mid else "good"), r, uncertain,
                    seconds=time.perf_counter() - t0)
        self.log(f"    {r} vs GOOD -> {step.verdict}{' (uncertain: run limit reached)' if uncertain else ''} "
                 f"({step.seconds:.0f} s)")
        return step

    def _against_parent(self, result: BisectResult) -> None:
        with checkout(result.parent, self.root, prefix="perf-bisect-parent-") as parent, \
                checkout(result.first_bad, self.root, prefix="perf-bisect-first-bad-") as first_bad:
            r, _ = self.interleaved(parent.path, first_bad.path, [], [],
                                    lambda r: "decided" if r.low > 1 or r.high < 1 else None)
            result.slowdown = r
            self.log(f"[bisect] first bad {result.first_bad[:12]} vs its parent: {r}")
            if self.explain is not None:
                result.explain_text = self.explain(parent.path, first_bad.path, result)


# ---------------------------------------------------------------------------------------------------------
# Report and command line


def render_text(r: BisectResult, root: Path) -> str:
    def one(c: str) -> str:
        return f"{c[:12]} {git(['log', '-1', '--format=%s', c], root)}"

    out = [f"bisect {r.case}: GOOD {r.good[:12]}, BAD {r.bad[:12]}", f"  BAD vs GOOD: {r.effect}"]
    for n, s in enumerate(r.steps, 1):
        uncertain = " (uncertain)" if s.uncertain else ""
        what = f"skip ({s.reason})" if s.verdict == "skip" else f"{s.verdict}{uncertain}, {s.ratio}"
        out.append(f"  step {n}: {s.commit[:12]} {s.subject}: {what}, {s.seconds:.0f} s")
    if r.first_bad:
        out += [f"first bad commit: {one(r.first_bad)}",
                f"  slowdown vs its parent {r.parent[:12]}: {r.slowdown}"]
    elif r.candidates:
        out.append("the first bad commit is one of "
                   f"({'skipped commits left' if len(r.steps) < r.max_steps else 'step limit reached'}):")
        out += [f"  {one(c)}" for c in r.candidates]
    out.append(f"{len(r.steps)} step(s) of a limit of {r.max_steps}, {r.runs} suite runs; "
               f"time spent {r.seconds:.0f} s")
    if r.explain_text:
        out += ["", r.explain_text.rstrip()]
    return "\n".join(out) + "\n"
