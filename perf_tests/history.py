"""``python -m perf_tests history``: steps in each case's time over the commits, per device type and environment.

    python -m perf_tests history [--store PATH|URL] [--device SLUG] [--env ENV] [--branch main] [--recent N]

The series of a case is one value per commit: the median of ``log(median of rounds)`` over the runs recorded
at that commit (clean trees only, A/B runs left out), commits in the order of their commit time. Its change
points are found by E-Divisive means (Matteson and James, JASA 2014) with a permutation test, as Daly et
al. (ICPE 2020) and Apache Otava apply it to performance series: the split that maximises the energy
statistic is kept when fewer than ``alpha`` of the permuted series reach it, and each part is searched
again. The series is cut into overlapping windows (``WINDOW`` commits), as Otava does, so the cost grows with
its length, not its square.

Each change point is then judged by the comparator (``stats.compare``) on the runs of the commits before and
after it (up to ``CONTEXT`` commits on each side, never past a neighbouring change point): its ratio with a
confidence interval, a verdict and the MDE. The environment changes between the two commits (torch, CUDA,
driver) are listed with it. docs/store.md has the measured detection rates.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from perf_tests.stats import CaseSamples, Policy, Side, compare
from perf_tests.store import Store, describe

WINDOW = 60  # commits per window
STRIDE = 30  # windows overlap by half, so a step near a window's edge is central in the next
MIN_SIZE = 4  # commits on each side of a change point
CONTEXT = 10  # commits on each side whose runs judge a change point
ALPHA = 0.02  # permutation p-value below which a split is a change point
PERMUTATIONS = 199


# --- E-Divisive means -------------------------------------------------------------------------------------


def _block_sums(d: np.ndarray) -> np.ndarray:
    """2-D prefix sums with a zero row and column: P[..., a, b] = sum of d[..., :a, :b]."""
    p = np.zeros(d.shape[:-2] + (d.shape[-2] + 1, d.shape[-1] + 1))
    p[..., 1:, 1:] = d.cumsum(-2).cumsum(-1)
    return p


def energy_q(x: np.ndarray, min_size: int = MIN_SIZE) -> np.ndarray:
    """Q(tau) of every split of each row of ``x`` (shape (..., n)): the energy statistic with alpha = 1,
    scaled by m k / n (Matteson and James, eq. 5, with kappa at the end). Splits closer than ``min_size`` to
    an end are -inf."""
    n = x.shape[-1]
    d = np.abs(x[..., :, None] - x[..., None, :])
    p = _block_sums(d)
    tau = np.arange(n + 1)
    m, k = tau.astype(float), (n - tau).astype(float)
    within_left = p[..., tau, tau]  # ordered pairs, so each pair twice
    total = p[..., n, n][..., None]
    left_all = p[..., tau, n]
    between = left_all - within_left
    within_right = total - 2 * left_all + within_left
    with np.errstate(divide="ignore", invalid="ignore"):
        e = 2 * between / (m * k) - within_left / (m * (m - 1)) - within_right / (k * (k - 1))
        q = m * k / n * e
    valid = (tau >= min_size) & (tau <= n - min_size)
    return np.where(valid, q, -np.inf)


def _significant(x: np.ndarray, q_obs: float, rng: np.random.Generator, alpha: float, permutations: int,
                 min_size: int) -> tuple[bool, float]:
    """Permutation test of the best split: (p <= alpha, p). Permutations are drawn in batches and the test
    stops as soon as enough of them reach ``q_obs`` that p cannot end below ``alpha``."""
    reached, drawn, batch = 0, 0, 20
    limit = alpha * (permutations + 1)  # p = (1 + reached) / (permutations + 1) <= alpha
    while drawn < permutations:
        size = min(batch, permutations - drawn)
        perms = rng.permuted(np.broadcast_to(x, (size, x.size)), axis=1)
        reached += int((energy_q(perms, min_size).max(axis=1) >= q_obs).sum())
        drawn += size
        if 1 + reached > limit:
            return False, (1 + reached) / (drawn + 1)
    p = (1 + reached) / (permutations + 1)
    return p <= alpha, p


def e_divisive(x: Sequence[float], *, alpha: float = ALPHA, permutations: int = PERMUTATIONS,
               min_size: int = MIN_SIZE, seed: int = 0) -> list[tuple[int, float]]:
    """Change points of one series: (index of the first value after the change, p-value), in order."""
    x = np.asarray(x, dtype=float)
    rng = np.random.default_rng(seed)
    found: list[tuple[int, float]] = []
    pending = [(0, x.size)]
    while pending:
        best = None
        for start, end in pending:
            if end - start < 2 * min_size:
                continue
            q = energy_q(x[start:end], min_size)
            tau = int(np.argmax(q))
            if np.isfinite(q[tau]) and (best is None or q[tau] > best[0]):
                best = (q[tau], start, end, tau)
        if best is None:
            break
        q_obs, start, end, tau = best
        ok, p = _significant(x[start:end], q_obs, rng, alpha, permutations, min_size)
        pending.remove((start, end))
        if ok:
            found.append((start + tau, p))
            pending += [(start, start + tau), (start + tau, end)]
    return sorted(found)


def change_points(x: Sequence[float], *, window: int = WINDOW, stride: int = STRIDE, **kw) -> list[tuple[int, float]]:
    """E-Divisive over overlapping windows; a step found by two windows (within ``MIN_SIZE // 2``) counts once,
    with the smaller p-value."""
    x = np.asarray(x, dtype=float)
    if x.size <= window:
        return e_divisive(x, **kw)
    found: list[tuple[int, float]] = []
    starts = list(range(0, x.size - window, stride)) + [x.size - window]
    for start in starts:
        for i, p in e_divisive(x[start:start + window], **kw):
            found.append((start + i, p))
    merged: list[tuple[int, float]] = []
    for i, p in sorted(found):
        if merged and i - merged[-1][0] <= MIN_SIZE // 2:
            if p < merged[-1][1]:
                merged[-1] = (i, p)
            continue
        merged.append((i, p))
    return merged


# --- series from the store --------------------------------------------------------------------------------


@dataclass
class Series:
    """The runs of one device type and environment, by commit in commit order."""

    device_slug: str
    env: str
    commits: list[str]  # full shas, in order
    times: list[str]
    environments: list[dict]  # the fingerprint of the commit's last run
    medians: dict[str, dict[int, list[float]]]  # case -> commit index -> run medians (seconds)
    machines: dict[str, dict[int, list[str | None]]]
    device_type: str | None = None
    kinds: dict[str, str] = field(default_factory=dict)

    def values(self, case: str) -> tuple[list[int], np.ndarray]:
        """(commit indices, the median over its runs of log run median at each) for the commits that measured
        ``case``: the median keeps one disturbed run from moving its commit."""
        by_commit = self.medians[case]
        idx = sorted(by_commit)
        return idx, np.array([np.median(np.log(by_commit[i])) for i in idx])


def load_series(store: Store, device_slug: str, env: str, branch: str | None = None) -> Series:
    where = ("device_slug = ? AND env = ? AND mode = 'solo' AND dirty = 0 AND complete = 1 "
             "AND commit_sha IS NOT NULL")
    params: list = [device_slug, env]
    if branch:
        where += " AND branch = ?"
        params.append(branch)
    runs = store.execute(
        f"SELECT id, commit_sha, COALESCE(commit_time, started_at, recorded_at), recorded_at, environment, "
        f"machine_id, device_type FROM runs WHERE {where}", params).fetchall()
    first_time: dict[str, tuple[str, str]] = {}
    run_commit: dict[int, str] = {}
    run_machine: dict[int, str | None] = {}
    env_of: dict[str, tuple[str, str]] = {}
    device_type = None
    for run_id, sha, time, recorded, environment, machine_id, dt in runs:
        run_commit[run_id], run_machine[run_id], device_type = sha, machine_id, dt
        if sha not in first_time or (time, recorded) < first_time[sha]:
            first_time[sha] = (time, recorded)
        if sha not in env_of or recorded > env_of[sha][0]:
            env_of[sha] = (recorded, environment)
    commits = sorted(first_time, key=lambda s: first_time[s])
    index = {sha: i for i, sha in enumerate(commits)}
    medians: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    machines: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    kinds: dict[str, str] = {}
    rows = store.execute(
        f"SELECT run_id, name, kind, median_s FROM results WHERE run_id IN (SELECT id FROM runs WHERE {where})",
        params).fetchall()
    for run_id, name, kind, median in rows:
        i = index[run_commit[run_id]]
        medians[name][i].append(median)
        machines[name][i].append(run_machine[run_id])
        kinds[name] = kind or name.split("[", 1)[0]
    return Series(device_slug, env, commits, [first_time[c][0] for c in commits],
                  [json.loads(env_of[c][1]) for c in commits], medians, machines, device_type, kinds)


# --- change points, judged -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChangePoint:
    case: str
    before: str  # the last commit before the step
    after: str  # the first commit after it
    index: int  # position of ``after`` in the series' commits
    p_value: float
    ratio: float | None  # time after / before
    ci: tuple[float, float] | None
    verdict: str
    mde: float | None
    n_before: int  # runs on each side
    n_after: int
    env_changes: tuple[str, ...]


def _side(series: Series, case: str, commits: Sequence[int], label: str) -> Side:
    runs = [[m] for i in commits for m in series.medians[case][i]]
    machines = [mid for i in commits for mid in series.machines[case][i]]
    cs = CaseSamples(case, runs, run_machines=machines, case={"kind": series.kinds.get(case, "")})
    environment = dict(series.environments[commits[-1] if label == "before" else commits[0]])
    return Side(label, environment, {case: cs}, n_runs=len(runs), machines=machines)


def judge_step(series: Series, case: str, positions: list[int], k: int, policy: Policy, p: float) -> ChangePoint:
    """The change point at ``positions[k]`` (index into the case's commits), judged on its neighbours' runs."""
    idx, _ = series.values(case)
    at = positions[k]
    lo = max(positions[k - 1] if k else 0, at - CONTEXT)
    hi = min(positions[k + 1] if k + 1 < len(positions) else len(idx), at + CONTEXT)
    before, after = idx[lo:at], idx[at:hi]
    cmp = compare(_side(series, case, before, "before"), _side(series, case, after, "after"), policy)
    verdict = cmp.cases[0]
    time = verdict.metrics.get("time")
    return ChangePoint(
        case=case, before=series.commits[idx[at - 1]], after=series.commits[idx[at]], index=idx[at], p_value=p,
        ratio=time.ratio if time else None, ci=time.ci if time else None, verdict=verdict.verdict,
        mde=time.mde if time else None, n_before=sum(len(series.medians[case][i]) for i in before),
        n_after=sum(len(series.medians[case][i]) for i in after), env_changes=tuple(cmp.env_changes))


def find_steps(series: Series, policy: Policy | None = None, **kw) -> list[ChangePoint]:
    policy = policy or Policy()
    out = []
    for case in sorted(series.medians):
        idx, values = series.values(case)
        if len(idx) < 2 * MIN_SIZE:
            continue
        found = change_points(values, **kw)
        positions = [i for i, _ in found]
        out += [judge_step(series, case, positions, k, policy, p) for k, (_, p) in enumerate(found)]
    return sorted(out, key=lambda c: (c.index, c.case))


# --- the command -------------------------------------------------------------------------------------------


def _fmt(cp: ChangePoint) -> str:
    ratio = f"{cp.ratio - 1:+.1%}" if cp.ratio else "?"
    ci = f" [{cp.ci[0] - 1:+.1%}, {cp.ci[1] - 1:+.1%}]" if cp.ci else ""
    mde = f", MDE {cp.mde:.1%}" if cp.mde is not None else ""
    env = f"; environment: {', '.join(cp.env_changes)}" if cp.env_changes else ""
    return (f"  {cp.before[:12]}..{cp.after[:12]}  {cp.case}: {ratio}{ci} {cp.verdict} "
            f"({cp.n_before} v {cp.n_after} runs, p {cp.p_value:.3f}{mde}){env}")


def report(store: Store, device: str | None, env: str | None, branch: str | None, recent: int | None):
    """[(series, change points)] for every device type and environment selected."""
    out = []
    for slug, _, group_env, _ in store.groups():
        if (device and slug != device) or (env and group_env != env) or not slug or not group_env:
            continue
        series = load_series(store, slug, group_env, branch)
        steps = find_steps(series)
        if recent:
            steps = [s for s in steps if s.index >= len(series.commits) - recent]
        out.append((series, steps))
    return out


def cmd_history(args: argparse.Namespace) -> int:
    with Store.open(args.store) as store:
        groups = report(store, args.device, args.env, args.branch, args.recent)
        where = describe(store.location)
    if not groups:
        print(f"{where}: no runs" + (f" of {args.device}" if args.device else "")
              + (f" in {args.env}" if args.env else ""), file=sys.stderr)
        return 2
    lines, doc = [], []
    for series, steps in groups:
        lines.append(f"{series.device_slug} {series.env}: {len(series.commits)} commits, {len(series.medians)} "
                     f"cases, {len(steps)} change point(s)" + (f" in the last {args.recent} commits" if args.recent
                                                                else ""))
        lines += [_fmt(s) for s in steps]
        doc.append({"device_slug": series.device_slug, "env": series.env, "commits": len(series.commits),
                    "change_points": [asdict(s) for s in steps]})
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    if args.summary:
        with open(args.summary, "a", encoding="utf-8") as fh:
            fh.write("## Change points\n\n```\n" + text + "```\n")
    regressions = [s for _, steps in groups for s in steps if s.verdict == "regression"]
    return 1 if args.fail_on_regression and regressions else 0


def add_parser(sub) -> None:
    from perf_tests.store_cli import store_option

    p = sub.add_parser("history", help="change points of each case's time over the commits (E-Divisive means)")
    store_option(p)
    p.add_argument("--device", help="one device slug (default: every device type in the store)")
    p.add_argument("--env", help="one environment, e.g. torch2 (default: each)")
    p.add_argument("--branch", help="only runs recorded on this branch, e.g. main")
    p.add_argument("--recent", type=int, metavar="N", help="only change points within the last N commits")
    p.add_argument("--json", type=Path, help="also write the change points as JSON here")
    p.add_argument("--summary", metavar="FILE", help="append a Markdown section here (e.g. $GITHUB_STEP_SUMMARY)")
    p.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a change point is a regression")
    p.set_defaults(func=cmd_history)
