"""``python -m perf_tests history``: steps in each case's time over the commits, per device type and env.

    python -m perf_tests history [--store PATH|URL] [--device SLUG] [--env ENV] [--branch main] [--recent N]

The series of a case is one value per commit: the median of ``log(median of rounds)`` over the runs recorded
at that commit (clean trees only, A/B runs left out), commits in the order of their commit time. Its change
points are found by E-Divisive means (Matteson and James, JASA 2014) with a permutation test, as Daly et
al. (ICPE 2020) and Apache Otava apply it to performance series: the split that maximises the energy
statistic is kept when fewer than ``alpha`` of the permuted series reach it, and each part is searched
again. The series is cut into overlapping windows (``WINDOW`` commits), as Otava does, so the cost grows with
its length, not its square. Each change point found is then placed by a scan over the runs themselves
(:func:`refine`: the least-absolute-deviation split within ``REFINE`` commits): the commit medians decide
whether there is a step, every run decides where.

Each change point is then judged by the comparator (``stats.compare``) on the runs of the commits before and
after it (up to ``CONTEXT`` commits on each side, never past a neighbouring change point): its ratio with a
confidence interval, a verdict and the MDE. The environment changes between the two commits (torch, CUDA,
driver) are listed with it. docs/store.md has the measured detection rates.
"""

from __future__ import annotations

import gc
import json
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from perf_tests.analysis.stats import CaseSamples, Policy, Side, compare
from perf_tests.records.store import Store

WINDOW = 60  # commits per window
STRIDE = 30  # windows overlap by half, so a step near a window's edge is central in the next
MIN_SIZE = 4  # commits on each side of a change point
CONTEXT = 10  # commits on each side whose runs judge a change point
ALPHA = 0.02  # permutation p-value below which a split is a change point
PERMUTATIONS = 99
REFINE = 8  # commits either side of an E-Divisive split that the scan over runs may move it
# schema 2's index (run_id, name, median_s) holds every column asked for: the rows with samples stay unread
MEDIANS_SQL = "SELECT run_id, name, median_s FROM results WHERE run_id IN (SELECT id FROM runs WHERE {where})"
PERMUTED_VALUES = 1 << 22  # elements of the distance arrays of one batch of permutations (16 MiB in float32)


# --- E-Divisive means -------------------------------------------------------------------------------------


def energy_q(x: np.ndarray, min_size: int = MIN_SIZE, row_sums: np.ndarray | None = None) -> np.ndarray:
    """Q(tau) of every split of each row of ``x`` (shape (..., n)): the energy statistic with alpha = 1,
    scaled by m k / n (Matteson and James, eq. 5, with kappa at the end). Splits closer than ``min_size`` to
    an end are -inf. The sums over pairs are prefix sums over rows of the distance matrix: O(n^2) per row.
    ``row_sums``: each value's distances to all the others, when known (a permutation only reorders them)."""
    n = x.shape[-1]
    d = x[..., :, None] - x[..., None, :]
    np.abs(d, out=d)
    zero = np.zeros(x.shape[:-1] + (1,), dtype=d.dtype)
    # sums over the ordered pairs (i, j) with i < tau (left_all), and with both < tau (within_left)
    left_all = np.concatenate([zero, (d.sum(-1) if row_sums is None else row_sums).cumsum(-1)], -1)
    within_left = np.concatenate(
        [zero, 2 * np.einsum("...ij,ij->...i", d, np.tri(n, k=-1, dtype=d.dtype)).cumsum(-1)], -1
    )
    total = left_all[..., -1:]
    between = left_all - within_left
    within_right = total - 2 * left_all + within_left
    tau = np.arange(n + 1)
    m, k = tau.astype(float), (n - tau).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = 2 * between / (m * k) - within_left / (m * (m - 1)) - within_right / (k * (k - 1))
        q = m * k / n * e
    valid = (tau >= min_size) & (tau <= n - min_size)
    return np.where(valid, q, -np.inf)


def screen(
    x: np.ndarray,
    rngs: Sequence[np.random.Generator],
    *,
    alpha: float = ALPHA,
    permutations: int = PERMUTATIONS,
    min_size: int = MIN_SIZE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best split of each row of ``x`` (shape (rows, n)) and its permutation test, all rows at once:
    (tau, p-value, significant). Row ``i`` draws its permutations from ``rngs[i]``, so that its answer does
    not depend on the other rows. Permutations are drawn in batches; a row stops being tested as soon as so
    many permuted series reach its statistic that its p-value cannot end at or below ``alpha``, which is the
    decision all ``permutations`` would give. In float32, centred (distances do not move): 2.5 times faster
    than float64 here, and exact enough for a ranking."""
    x = (x - x.mean(axis=1, keepdims=True)).astype(np.float32)
    n = x.shape[1]
    row_sums = np.abs(x[:, :, None] - x[:, None, :]).sum(axis=2)
    q = energy_q(x, min_size, row_sums)
    tau = q.argmax(axis=1)
    q_obs = q[np.arange(len(x)), tau]
    reached = np.zeros(len(x), dtype=int)
    drawn = np.zeros(len(x), dtype=int)
    alive = np.isfinite(q_obs)
    limit = alpha * (permutations + 1)  # p = (1 + reached) / (permutations + 1) <= alpha
    batch = 4  # doubled each round: 2 of 4 permutations reaching a row's statistic settle 60% of noise rows
    done = 0
    while alive.any() and done < permutations:
        rows = np.flatnonzero(alive)
        size = min(batch, permutations - done)
        batch *= 2
        order = np.stack([rngs[i].random((size, n)).argsort(axis=1) for i in rows])  # (rows, size, n)
        step = max(1, PERMUTED_VALUES // (size * n * n))
        for a in range(0, len(rows), step):
            chunk, chunk_order = rows[a : a + step], order[a : a + step]
            perms = np.take_along_axis(x[chunk, None, :], chunk_order, axis=2)
            sums = np.take_along_axis(row_sums[chunk, None, :], chunk_order, axis=2)
            q_perm = energy_q(perms, min_size, sums).max(axis=2)
            reached[chunk] += (q_perm >= q_obs[chunk, None]).sum(axis=1)
        drawn[rows] += size
        done += size
        alive &= 1 + reached <= limit
    p = (1 + reached) / (drawn + 1)
    return tau, p, alive & (drawn >= permutations)


def e_divisive(
    series: Sequence[np.ndarray],
    rngs: Sequence[np.random.Generator],
    *,
    window: int = WINDOW,
    stride: int = STRIDE,
    alpha: float = ALPHA,
    permutations: int = PERMUTATIONS,
    min_size: int = MIN_SIZE,
) -> list[list[tuple[int, float]]]:
    """E-Divisive over overlapping windows of every series at once: (index of the first value after the
    change, p-value) per series, in order. Each round tests every pending segment (first the windows, then
    the two parts of each significant split), segments of one length in one batch; a step found by two
    windows (within ``min_size // 2``) counts once, with the smaller p-value."""
    found: list[list[tuple[int, float]]] = [[] for _ in series]
    pending = []  # (series, start, end)
    for k, x in enumerate(series):
        if x.size >= 2 * min_size:
            w = min(window, x.size)
            pending += [(k, s, s + w) for s in sorted(set(range(0, x.size - w, stride)) | {x.size - w})]
    while pending:
        by_length: dict[int, list[tuple[int, int, int]]] = {}
        for seg in pending:
            by_length.setdefault(seg[2] - seg[1], []).append(seg)
        pending = []
        for segs in by_length.values():
            x = np.stack([series[k][s:e] for k, s, e in segs])
            tau, p, ok = screen(
                x, [rngs[k] for k, _, _ in segs], alpha=alpha, permutations=permutations, min_size=min_size
            )
            for j in np.flatnonzero(ok):
                k, s, e = segs[j]
                t = s + int(tau[j])
                found[k].append((t, float(p[j])))
                pending += [(k, a, b) for a, b in ((s, t), (t, e)) if b - a >= 2 * min_size]
    out = []
    for points in found:
        merged: list[tuple[int, float]] = []
        for i, q in sorted(points):
            if merged and i - merged[-1][0] <= min_size // 2:
                if q < merged[-1][1]:
                    merged[-1] = (i, q)
                continue
            merged.append((i, q))
        out.append(merged)
    return out


def _sorted_medians(u: np.ndarray, counts: np.ndarray, starts: np.ndarray | int = 0) -> np.ndarray:
    """The medians of groups of a sorted array: group ``j`` is ``counts[j]`` values from ``starts[j]`` of row
    ``j`` of ``u`` (or of ``u`` itself when it is 1-D)."""
    lo, hi = starts + (counts - 1) // 2, starts + counts // 2
    if u.ndim == 1:
        return (u[lo] + u[hi]) / 2
    rows = np.arange(len(u))
    return (u[rows, lo] + u[rows, hi]) / 2


def commit_medians(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The median of each commit's runs; ``values`` holds the runs commit after commit, ``counts[i]`` of
    commit i."""
    commit = np.repeat(np.arange(counts.size), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return _sorted_medians(values[np.lexsort((values, commit))], counts, starts)


def refine(
    values: np.ndarray,
    counts: np.ndarray,
    points: Sequence[int],
    width: int = REFINE,
    min_size: int = MIN_SIZE,
) -> list[int]:
    """Each change point moved to the split of its commits' run values, within ``width`` commits of where
    E-Divisive put it and between its neighbours, that minimises the sum of absolute deviations from each
    side's median: the least-absolute-deviation cost (Laplace likelihood) of a change in level, scanned over
    runs rather than commit medians, so that a commit's every run counts and an outlying run does not.
    ``values`` and ``counts`` as in :func:`commit_medians`."""
    bounds = np.concatenate([[0], np.cumsum(counts)])
    out: list[int] = []
    for k, t in enumerate(points):
        lo = out[k - 1] if k else 0  # the left neighbour where it was placed: the points stay in order
        hi = points[k + 1] if k + 1 < len(points) else counts.size
        a, b = max(lo, t - width - CONTEXT), min(hi, t + width + CONTEXT)  # the commits that set the levels
        first = max(t - width, lo + min(min_size, t - lo), a + 1)
        last = min(t + width, hi - min(min_size, hi - t), b - 1)
        cands = np.arange(first, last + 1)
        if cands.size < 2:
            out.append(t)
            continue
        u = values[bounds[a] : bounds[b]]
        m = bounds[cands] - bounds[a]  # runs on the left of each candidate split
        col = np.arange(u.size)
        left = np.sort(np.where(col < m[:, None], u, np.nan), axis=1)  # NaN sorts last
        right = np.sort(np.where(col >= m[:, None], u, np.nan), axis=1)
        med_l, med_r = _sorted_medians(left, m), _sorted_medians(right, u.size - m)
        cost = np.nansum(np.abs(left - med_l[:, None]), 1) + np.nansum(np.abs(right - med_r[:, None]), 1)
        out.append(int(cands[np.argmin(cost)]))
    return out


def change_points(
    runs: Sequence[Sequence[float]] | np.ndarray,
    *,
    window: int = WINDOW,
    stride: int = STRIDE,
    alpha: float = ALPHA,
    permutations: int = PERMUTATIONS,
    min_size: int = MIN_SIZE,
    seed: int = 0,
) -> list[tuple[int, float]]:
    """Change points of one series, given per commit the values of its runs: (index of the first commit
    after the change, p-value), in order. Found by E-Divisive on the commits' medians, placed by
    :func:`refine` on the runs."""
    counts = np.array([len(r) for r in runs])
    if counts.size and counts.min() < 1:
        raise ValueError(f"commit {int(np.argmin(counts))} has no run: every commit of a series needs one")
    values = np.concatenate([np.asarray(r, dtype=float) for r in runs]) if len(runs) else np.empty(0)
    kw = dict(window=window, stride=stride, alpha=alpha, permutations=permutations, min_size=min_size)
    return find_all([(values, counts)], [np.random.default_rng(seed)], **kw)[0]


def find_all(
    series: Sequence[tuple[np.ndarray, np.ndarray]], rngs: Sequence[np.random.Generator], **kw
) -> list[list[tuple[int, float]]]:
    """:func:`change_points` of many series at once, each given as (values, counts) of
    :func:`commit_medians`; their permutations are drawn in common batches."""
    found = e_divisive([commit_medians(v, c) for v, c in series], rngs, **kw)
    min_size = kw.get("min_size", MIN_SIZE)
    return [
        list(zip(refine(v, c, [i for i, _ in f], min_size=min_size), [p for _, p in f], strict=True))
        for (v, c), f in zip(series, found, strict=True)
    ]


# --- series from the store --------------------------------------------------------------------------------


class ByCommit(Mapping[int, list]):
    """One case's values (run medians or run ids) by commit index, read only: sorted arrays rather than a
    list per commit, since a store of 10,000 runs of 100 cases holds a million of them."""

    def __init__(self, commits: np.ndarray, bounds: np.ndarray, values: np.ndarray):
        self.commits, self.bounds, self.values = commits, bounds, values  # commit k: values[bounds[k]:...]
        self._at = dict(zip(commits.tolist(), range(len(commits)), strict=True))

    def __getitem__(self, i: int) -> list:
        k = self._at[i]
        return self.values[self.bounds[k] : self.bounds[k + 1]].tolist()

    def __contains__(self, i: object) -> bool:
        return i in self._at

    def __iter__(self) -> Iterator[int]:
        return iter(self._at)

    def __len__(self) -> int:
        return len(self._at)


@dataclass
class Series:
    """The runs of one device type and environment, by commit in commit order."""

    device_slug: str
    env: str
    commits: list[str]  # full shas, in order
    times: list[str]
    environments: list[dict]  # the fingerprint of the commit's last run
    medians: dict[str, ByCommit]  # case -> commit index -> run medians (seconds)
    run_ids: dict[str, ByCommit]  # parallel to medians
    run_machines: dict[int, str | None]  # run id -> machine_id
    device_type: str | None = None
    kinds: dict[str, str] = field(default_factory=dict)

    def machines(self, case: str, i: int) -> list[str | None]:
        return [self.run_machines[r] for r in self.run_ids[case][i]]

    def values(self, case: str) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(commit indices, log run medians commit after commit, runs per commit) for the commits that
        measured ``case``."""
        m = self.medians[case]
        return m.commits.tolist(), np.log(m.values), np.diff(m.bounds)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while a million rows become lists: none of them holds a cycle, and the
    collections their allocations trigger took half of the reading time (Python 3.11)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _by_case_and_commit(
    rows: Sequence[tuple[int, str, float]], run_commit: dict[int, int]
) -> tuple[dict[str, ByCommit], dict[str, ByCommit]]:
    """(run id, case, median) rows grouped per case and commit index, run ids ascending; sorted with numpy,
    since a store of 10,000 runs of 100 cases gives a million rows."""
    if not rows:
        return {}, {}
    ids = [r[0] for r in rows]  # three comprehensions: zip(*rows) is five times slower on a million rows
    names = [r[1] for r in rows]
    cases = list(dict.fromkeys(names))
    code = {name: j for j, name in enumerate(cases)}
    case_of = np.fromiter(map(code.__getitem__, names), np.int64, len(rows))
    commit_of = np.fromiter(map(run_commit.__getitem__, ids), np.int64, len(rows))
    ids_arr = np.array(ids, dtype=np.int64)
    order = np.lexsort((ids_arr, commit_of, case_of))
    case_of, commit_of = case_of[order], commit_of[order]
    values_arr = np.array([r[2] for r in rows])[order]
    ids_arr = ids_arr[order]
    starts = np.flatnonzero(np.diff(case_of, prepend=-1) | np.diff(commit_of, prepend=-1))
    first = np.searchsorted(case_of[starts], np.arange(len(cases) + 1))  # each case's first group
    medians: dict[str, ByCommit] = {}
    run_ids: dict[str, ByCommit] = {}
    for j, case in enumerate(cases):
        groups = starts[first[j] : first[j + 1]]
        end = starts[first[j + 1]] if first[j + 1] < len(starts) else len(order)
        bounds = np.append(groups, end) - groups[0]
        medians[case] = ByCommit(commit_of[groups], bounds, values_arr[groups[0] : end])
        run_ids[case] = ByCommit(commit_of[groups], bounds, ids_arr[groups[0] : end])
    return medians, run_ids


def load_series(store: Store, device_slug: str, env: str, branch: str | None = None) -> Series:
    where = (
        "device_slug = ? AND env = ? AND mode = 'solo' AND dirty = 0 AND complete = 1 "
        "AND commit_sha IS NOT NULL"
    )
    params: list = [device_slug, env]
    if branch:
        where += " AND branch = ?"
        params.append(branch)
    runs = store.execute(
        f"SELECT id, commit_sha, COALESCE(commit_time, started_at, recorded_at), recorded_at, environment, "
        f"machine_id, device_type FROM runs WHERE {where}",
        params,
    ).fetchall()
    first_time: dict[str, tuple[str, str]] = {}
    run_sha: dict[int, str] = {}
    run_machines: dict[int, str | None] = {}
    env_of: dict[str, tuple[str, str]] = {}
    device_type = None
    for run_id, sha, time, recorded, environment, machine_id, dt in runs:
        run_sha[run_id], run_machines[run_id], device_type = sha, machine_id, dt
        if sha not in first_time or (time, recorded) < first_time[sha]:
            first_time[sha] = (time, recorded)
        if sha not in env_of or recorded > env_of[sha][0]:
            env_of[sha] = (recorded, environment)
    commits = sorted(first_time, key=lambda s: first_time[s])
    index = {sha: i for i, sha in enumerate(commits)}
    run_commit = {run_id: index[sha] for run_id, sha in run_sha.items()}
    with _collector_paused():
        rows = store.execute(MEDIANS_SQL.format(where=where), params).fetchall()
        medians, run_ids = _by_case_and_commit(rows, run_commit)
    latest = [r for r, i in run_commit.items() if i == len(commits) - 1]
    kinds = {
        name: kind
        for name, kind in store.execute(
            "SELECT DISTINCT name, kind FROM results "
            f"WHERE run_id IN ({', '.join('?' * len(latest)) or 'NULL'})",
            latest,
        )
        if kind
    }
    kinds = {name: kinds.get(name, name.split("[", 1)[0]) for name in medians}
    return Series(
        device_slug,
        env,
        commits,
        [first_time[c][0] for c in commits],
        [json.loads(env_of[c][1]) for c in commits],
        medians,
        run_ids,
        run_machines,
        device_type,
        kinds,
    )


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
    machines = [mid for i in commits for mid in series.machines(case, i)]
    cs = CaseSamples(case, runs, run_machines=machines, case={"kind": series.kinds.get(case, "")})
    environment = dict(series.environments[commits[-1] if label == "before" else commits[0]])
    return Side(label, environment, {case: cs}, n_runs=len(runs), machines=machines)


def judge_step(
    series: Series, case: str, idx: list[int], positions: list[int], k: int, policy: Policy, p: float
) -> ChangePoint:
    """The change point at ``positions[k]`` (into ``idx``, the case's commits), judged on nearby runs."""
    at = positions[k]
    lo = max(positions[k - 1] if k else 0, at - CONTEXT)
    hi = min(positions[k + 1] if k + 1 < len(positions) else len(idx), at + CONTEXT)
    before, after = idx[lo:at], idx[at:hi]
    cmp = compare(_side(series, case, before, "before"), _side(series, case, after, "after"), policy)
    verdict = cmp.cases[0]
    time = verdict.metrics.get("time")
    return ChangePoint(
        case=case,
        before=series.commits[idx[at - 1]],
        after=series.commits[idx[at]],
        index=idx[at],
        p_value=p,
        ratio=time.ratio if time else None,
        ci=time.ci if time else None,
        verdict=verdict.verdict,
        mde=time.mde if time else None,
        n_before=sum(len(series.medians[case][i]) for i in before),
        n_after=sum(len(series.medians[case][i]) for i in after),
        env_changes=tuple(cmp.env_changes),
    )


def find_steps(series: Series, policy: Policy | None = None, *, seed: int = 0, **kw) -> list[ChangePoint]:
    """The change points of every case, judged; each case draws its permutations from a generator of its
    own (seeded by ``seed`` and its name), so that its change points do not depend on the other cases."""
    policy = policy or Policy()
    cases = [c for c in sorted(series.medians) if len(series.medians[c]) >= 2 * MIN_SIZE]
    values = [series.values(c) for c in cases]
    rngs = [np.random.default_rng([seed, zlib.crc32(c.encode())]) for c in cases]
    found_all = find_all([(v, n) for _, v, n in values], rngs, **kw)
    out = []
    for case, (idx, _, _), found in zip(cases, values, found_all, strict=True):
        positions = [i for i, _ in found]
        out += [judge_step(series, case, idx, positions, k, policy, p) for k, (_, p) in enumerate(found)]
    return sorted(out, key=lambda c: (c.index, c.case))


# --- the command -------------------------------------------------------------------------------------------


def change_point_line(cp: ChangePoint) -> str:
    ratio = f"{cp.ratio - 1:+.1%}" if cp.ratio else "?"
    ci = f" [{cp.ci[0] - 1:+.1%}, {cp.ci[1] - 1:+.1%}]" if cp.ci else ""
    mde = f", MDE {cp.mde:.1%}" if cp.mde is not None else ""
    env = f"; environment: {', '.join(cp.env_changes)}" if cp.env_changes else ""
    return (
        f"  {cp.before[:12]}..{cp.after[:12]}  {cp.case}: {ratio}{ci} {cp.verdict} "
        f"({cp.n_before} v {cp.n_after} runs, p {cp.p_value:.3f}{mde}){env}"
    )


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
