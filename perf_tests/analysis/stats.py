"""The regression comparator: (baseline samples, candidate samples, policy) -> verdicts.

A pure function, :func:`compare`, with no files, printing or exit codes (``compare.py`` and ``report.py``
wrap it). The ``time`` verdict comes from one variance-components model of log run medians, estimated
once per comparison (:func:`_fit`); docs/statistics.md states the model, its assumptions, the tests,
the MDE and the operating characteristics measured by ``tests/gate_world.py``. ``compile_time`` and
``peak_memory`` have one value per run, judged on the range of pairwise ratios. Reasons are
:class:`Reason` codes with their numbers; ``report.py`` writes the sentences.
"""

from __future__ import annotations

import bisect
import dataclasses
import fnmatch
import functools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import special

REGRESSION = "regression"
IMPROVEMENT = "improvement"
NO_CHANGE = "no-change"
INCONCLUSIVE = "inconclusive"
NEW = "new"
MISSING = "missing"
FAILED = "failed"
SKIPPED = "skipped"
NOT_COMPARED = "not-compared"  # a metric only (compile time across cache states): shown, never decides

# A difference here makes timings incomparable: every verdict inconclusive.
INCOMPARABLE_ENV_FIELDS = ("device_type", "device_slug")
# Fields compared between the sides (policy default): the incomparable ones, and those whose change is judged
# and labelled on every verdict ("environment changed: torch 2.13.1 -> 2.14.1").
DEFAULT_ENV_FIELDS = INCOMPARABLE_ENV_FIELDS + (
    "env",
    "gpu_count",
    "torch_version",
    "cuda_version",
    "cudnn_version",
    "driver_version",
)
_ENV_NAMES = {"torch_version": "torch", "cuda_version": "CUDA", "cudnn_version": "cuDNN",
              "driver_version": "driver", "gpu_count": "GPUs"}

# Run-to-run sd of log case medians used when neither side has two runs, as (device_type, env, sd); the
# first match wins, "*" matches anything. Sources in docs/statistics.md.
DEFAULT_RUN_SD_PRIORS = (("cpu", "torch1", 0.10), ("cpu", "*", 0.07), ("cuda", "*", 0.03))



@dataclass(frozen=True)
class Policy:
    """How verdicts are reached. Defaults are the gate's documented defaults (see the README)."""

    alpha: float = 0.05  # family-wise error rate across the cases of one run (Holm) / FDR (BH)
    min_effect: float = 0.05  # smallest relative change that counts (the no-change band is ±min_effect)
    min_effect_overrides: tuple[tuple[str, float], ...] = ()  # (fnmatch pattern on the case name, value)
    correction: str = "holm"  # "holm" (the closed test, its name kept) | "bh" | "none"
    confidence_level: float = 0.90  # two-sided interval of the change (unadjusted)
    power: float = 0.80  # for the MDE
    target_mde: float = 0.10  # "runs needed" in reasons: runs per side that bring the MDE down to this
    run_sd_priors: tuple[tuple[str, str, float], ...] = DEFAULT_RUN_SD_PRIORS
    prior_df: int = 10  # degrees of freedom credited to a prior (about the runs it was measured on)
    case_prior_df: int = 8  # df of the kind's variance a case's own case-specific variance is moderated with
    machine_prior_df: int = 10  # df credited to machine_sd / machine_case_sds when pooled with a fleet's
    # sds of a case's log median between two machines of one type (common net of the canary, and
    # case-specific): the prior pooled with a fleet's estimate; measured values in docs/statistics.md
    machine_sd: float = 0.03
    machine_case_sds: tuple[tuple[str, float], ...] = (("cpu", 0.20), ("*", 0.03))
    # Canary: a candidate run is disturbed when its within-run robust CV exceeds canary_cv_factor times the
    # baseline's typical one (and canary_max_cv absolutely), or its median moves against the baseline's by
    # more than canary_z baseline run-to-run sds and more than canary_min_shift.
    canary_cv_factor: float = 3.0
    canary_max_cv: float = 0.05
    canary_z: float = 4.0
    canary_min_shift: float = 0.05
    canary_run_sd: float = 0.03  # the canary's run-to-run sd when the baseline has one canary run
    compile_threshold: float = 0.25
    compile_floor_s: float = 0.5  # compile times below this are treated as equal to it
    memory_threshold: float = 0.05
    memory_floor_bytes: int = 1 << 20  # memory values below this (incl. CPU RSS deltas <= 0) count as it
    # CUDA's allocator statistics repeat run to run; a CPU peak-RSS delta does not (docs/statistics.md)
    memory_device_types: tuple[str, ...] = ("cuda",)
    env_fields: tuple[str, ...] = DEFAULT_ENV_FIELDS

    def __post_init__(self) -> None:
        if self.min_effect < 0:
            raise ValueError(f"min_effect must be >= 0, got {self.min_effect}")
        if self.correction not in ("holm", "bh", "none"):
            raise ValueError(f"correction must be holm, bh or none, got {self.correction!r}")
        if self.machine_sd < 0 or any(sd < 0 for _, sd in self.machine_case_sds):
            raise ValueError(f"machine sds must be >= 0, got {self.machine_sd} and {self.machine_case_sds}")
        for name in ("alpha", "confidence_level", "power"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")

    def min_effect_for(self, name: str) -> float:
        """The case's own minimum effect: the last matching override wins, else ``min_effect``."""
        value = self.min_effect
        for pattern, override in self.min_effect_overrides:
            if fnmatch.fnmatchcase(name, pattern):
                value = override
        return value

    def machine_case_sd(self, environment: Mapping) -> float:
        """The case-specific machine-to-machine sd for this device type (the first match wins)."""
        device_type = str(environment.get("device_type"))
        return next((sd for dt, sd in self.machine_case_sds if fnmatch.fnmatchcase(device_type, dt)), 0.0)

    def run_sd_prior(self, environment: Mapping) -> tuple[float, str] | None:
        """(sd, where it came from) for this device type and env, or None when the policy has no prior."""
        device_type, env = environment.get("device_type"), environment.get("env")
        for dt, en, sd in self.run_sd_priors:
            if fnmatch.fnmatchcase(str(device_type), dt) and fnmatch.fnmatchcase(str(env), en):
                return sd, f"{device_type}/{env}"
        return None


@dataclass
class CaseSamples:
    """One case on one side: per-call seconds per run (one list of rounds per run) and once-per-run
    metrics."""

    name: str
    runs: list[list[float]]
    run_machines: list[str | None] = field(default_factory=list)  # machine_id per run (parallel to runs)
    definition_hash: str | None = None
    compile_time_s: list[float] = field(default_factory=list)  # one per run that recorded it
    compile_cache: list[str | None] = field(default_factory=list)  # "warm" | "cold" | None, parallel to above
    peak_memory_bytes: list[float] = field(default_factory=list)
    attention_used: str | None = None
    # UNet SDPA kernels the runs saw (perf_tests.measure.kernels)
    unet_kernels: set = field(default_factory=set)
    correct: bool | None = None  # False if any run reported a wrong output
    case: dict = field(default_factory=dict)  # extra_info["case"]: kind, profile, attention, ...
    # the same rounds on the device's clock (CUDA events), parallel to runs; None unless every run has them
    device_runs: list[list[float]] | None = None
    clock: str = "wall"  # what ``runs`` holds: "wall" (the host's timer) or "device" (see on_one_clock)

    @property
    def samples(self) -> np.ndarray:
        return np.concatenate([np.asarray(r, dtype=float) for r in self.runs]) if self.runs else np.empty(0)

    @property
    def kind(self) -> str:
        """The pooling group: ``case["kind"]``, else the test function's name (``test_unet_step[...]``)."""
        return str(self.case.get("kind") or self.name.split("[", 1)[0])

    def log_run_medians(self) -> np.ndarray:
        # statistics.median: the value np.median gives, without its per-call cost on lists of a few rounds
        return np.log([float(statistics.median(r)) for r in self.runs if len(r)])


@dataclass
class Side:
    """All cases of one side (a baseline, or a candidate made of one or more runs)."""

    label: str
    environment: dict
    cases: dict[str, CaseSamples]
    n_runs: int = 1
    machines: list[str | None] = field(default_factory=list)  # machine_id per run
    canary: list[list[float]] = field(default_factory=list)  # per run: the canary's per-call seconds
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason
    failed: dict[str, str] = field(default_factory=dict)  # name -> reason
    # None: unknown (e.g. a baseline), every baseline case counts as selected
    selected: set[str] | None = None
    run_order: list[int] | None = None  # global position of each run when A and B ran in pairs
    # per run: why the device slowed it down by itself (a throttled GPU, perf_tests.measure.gpu_state) or None
    disturbances: list[str | None] = field(default_factory=list)


@dataclass(frozen=True)
class Reason:
    """Why a verdict is what it is: a code and its numbers (``report.sentence`` writes the words)."""

    code: str
    values: tuple[tuple[str, object], ...] = ()

    def __getitem__(self, key: str) -> object:
        return dict(self.values)[key]


def why(code: str, **values) -> Reason:
    return Reason(code, tuple(values.items()))


@dataclass(frozen=True)
class MetricResult:
    metric: str
    verdict: str
    ratio: float | None = None  # candidate / baseline: exp(mean log run-median difference) for time
    ci: tuple[float, float] | None = None  # confidence interval of the ratio (time) or range of run ratios
    p_regression: float | None = None  # adjusted across cases (time only)
    p_improvement: float | None = None
    threshold: float | None = None  # the case's min_effect (time) or the metric's threshold
    mde: float | None = None  # smallest relative slowdown caught with Policy.power (time only)
    se: float | None = None  # standard error of the log change used (time only)
    df: float | None = None  # its degrees of freedom (inf: a known variance)
    runs_needed: int | None = None  # runs per side that would bring the MDE to Policy.target_mde
    n_baseline: int = 0  # runs (time) or values (others)
    n_candidate: int = 0
    baseline_median: float | None = None
    candidate_median: float | None = None
    reasons: tuple[Reason, ...] = ()
    clock: str | None = None  # time only: "device" (CUDA events on both sides) or "wall"


@dataclass(frozen=True)
class CaseVerdict:
    name: str
    verdict: str
    metrics: dict[str, MetricResult]
    reasons: tuple[Reason, ...] = ()
    labels: tuple[str, ...] = ()  # e.g. "environment changed: torch 2.13.1 -> 2.14.1"


@dataclass(frozen=True)
class CanaryRun:
    side: str  # "baseline" | "candidate"
    index: int
    median: float  # per-call seconds
    cv: float  # robust CV within the run
    disturbed: Reason | None = None  # why, when this run is disturbed


@dataclass(frozen=True)
class CanaryResult:
    runs: tuple[CanaryRun, ...]
    ratio: float | None  # candidate / baseline canary median (None without both sides)
    baseline_run_sd: float | None  # run-to-run sd of log canary medians in the baseline
    disturbed: tuple[Reason, ...] = ()  # one reason per disturbed candidate run (or pair)
    env_shift: str | None = None  # "plain kernels moved +X% with the environment change"
    left_out: tuple[int, ...] = ()  # candidate runs (pairs) left out of the time verdicts (see compare)
    by_pair: bool = False  # judged pair by pair (A/B) rather than against the baseline

    @property
    def disturbed_runs(self) -> tuple[int, ...]:
        """The 0-based indices of the disturbed candidate runs among those with canary samples."""
        return tuple(r.index for r in self.runs if r.side == "candidate" and r.disturbed)


@dataclass(frozen=True)
class Comparison:
    cases: tuple[CaseVerdict, ...]
    policy: Policy
    env_mismatch: tuple[str, ...] = ()  # incomparable differences (device type/slug)
    env_changes: tuple[str, ...] = ()  # compared and labelled differences, e.g. "torch 2.13.1 -> 2.14.1"
    notes: tuple[str, ...] = ()
    baseline_label: str = "baseline"
    candidate_label: str = "candidate"
    not_selected: tuple[str, ...] = ()  # baseline cases the candidate run did not select
    canary: CanaryResult | None = None
    paired: bool = False
    pairing_narrowing: float | None = None  # 1 - median(paired / unpaired interval width)
    new_machine: bool = False  # the candidate ran on machines none of the baseline's runs came from
    suite: MetricResult | None = None  # the change of the suite as a whole (every case alike), its own claim

    def count(self, verdict: str) -> int:
        return sum(c.verdict == verdict for c in self.cases)

    @property
    def has_regression(self) -> bool:
        return any(c.verdict == REGRESSION for c in self.cases)

    @property
    def has_failed(self) -> bool:
        return any(c.verdict == FAILED for c in self.cases)

    @property
    def has_missing(self) -> bool:
        return any(c.verdict == MISSING for c in self.cases)

    def _mdes(self) -> list[float]:
        return [m for c in self.cases if "time" in c.metrics and (m := c.metrics["time"].mde) is not None]

    @property
    def mde_median(self) -> float | None:
        return float(np.median(m)) if (m := self._mdes()) else None

    @property
    def mde_worst(self) -> float | None:
        return max(m) if (m := self._mdes()) else None


def adjust_pvalues(p: Sequence[float], method: str) -> np.ndarray:
    """Benjamini-Hochberg step-up (FDR) adjusted p-values, scipy's ("none": as they are)."""
    p = np.asarray(p, dtype=float)
    if p.size == 0 or method == "none":
        return p.copy()
    from scipy import stats as sps  # here, not at import: scipy.stats is 0.6 s of every command's start

    return sps.false_discovery_control(p)


def robust_cv(x: np.ndarray) -> float:
    """Dispersion that outliers do not dominate: 1.4826 * MAD / median (equals the CV for a normal)."""
    x = np.asarray(x, dtype=float)
    med = float(np.median(x))
    return float(1.4826 * np.median(np.abs(x - med)) / med) if med > 0 else math.inf


def _t(q: float, df: float) -> float:
    """Student t quantile (the plain ufunc: ``sps.t.ppf`` costs 100x more per scalar call)."""
    return float(special.ndtri(q) if math.isinf(df) else special.stdtrit(df, q))


def ratio_interval(d: float, se: float, df: float, confidence: float) -> tuple[float, float]:
    """The two-sided t interval of a log change ``d`` (standard error ``se`` on ``df``), as ratios."""
    half = _t(0.5 + confidence / 2, df) * se
    return math.exp(max(d - half, -700.0)), math.exp(min(d + half, 700.0))


def mde(se: float, df: float, alpha: float, min_effect: float, power: float) -> float:
    """Smallest relative slowdown flagged with ``power``: significant at one-sided ``alpha`` (already
    corrected) AND a point estimate above ``min_effect``. The critical value is itself estimated: the power
    term is the normal approximation to the noncentral t, z_power sqrt(1 + t_crit^2 / 2 df)."""
    crit = -_t(alpha, df)  # the lower tail: exact for the tiny alpha of an MDE the min effect sets
    need = max(crit * se, math.log1p(min_effect))
    return math.expm1(need + _t(power, math.inf) * se * math.sqrt(1 + crit * crit / (2 * df)))


def environment_mismatch(baseline: Mapping, candidate: Mapping, fields: Sequence[str]) -> list[str]:
    """Human-readable differences in the fields that matter; a field absent on either side is not judged."""
    return [f"{key}: baseline {baseline[key]!r} vs candidate {candidate[key]!r}" for key in fields
            if key in baseline and key in candidate and baseline[key] != candidate[key]]


def environment_changes(baseline: Mapping, candidate: Mapping, fields: Sequence[str]) -> list[str]:
    """Comparable differences, e.g. ``"torch 2.13.1 -> 2.14.1"`` (device type/slug excluded)."""
    return [f"{_ENV_NAMES.get(key, key)} {baseline[key]} -> {candidate[key]}"
            for key in fields if key not in INCOMPARABLE_ENV_FIELDS and key in baseline and key in candidate
            and baseline[key] != candidate[key]]


# --- time: the variance-components model ----------------------------------------------------------


def on_new_machine(baseline: Side, candidate: Side) -> bool:
    """Whether every candidate run came from machines none of the baseline's runs came from."""
    b_machines = {m for m in baseline.machines if m is not None}
    c_machines = {m for m in candidate.machines if m is not None}
    return bool(b_machines and c_machines and not (b_machines & c_machines))


def _canary_log_medians(side: Side) -> np.ndarray:
    """The log of each run's canary median (runs without canary samples left out)."""
    return np.log(np.array([np.median(r) for r in side.canary if len(r)], dtype=float))


def _pool(*parts: tuple[float, float]) -> tuple[float, float]:
    """(variance, df) pooled from (variance, df) estimates, weighted by df; (0, 0) when none has df."""
    df = sum(d for _, d in parts)
    return (sum(v * d for v, d in parts) / df, df) if df else (0.0, 0.0)


def _satterthwaite(parts: Sequence[tuple[float, float]]) -> float:
    """Welch-Satterthwaite df of a sum of variance terms (term, its df); a term with df inf is known."""
    total = sum(v for v, _ in parts)
    denom = sum(v * v / d for v, d in parts if v > 0 and math.isfinite(d))
    return total * total / denom if denom > 0 else math.inf


@dataclass
class _Case:
    """One case's log change ``d = U + e``: ``U`` shared with every case (run, machine and canary terms),
    ``e`` its own. Variances are of the change, at the case's run counts."""

    d: float
    var_u: float
    var_e: float
    df: float
    n_b: int
    n_c: int
    per_run: float  # the run-level part of var_u + var_e per unit of k (for "runs needed")
    fixed: float  # the parts that more runs do not shrink (machine-to-machine)
    runs_df: float  # df that scale with runs
    own_var: float = math.inf  # var_e where the split is made (the contrasts between cases), else inf
    own_df: float = math.inf

    @property
    def se(self) -> float:
        return math.sqrt(self.var_u + self.var_e)


@dataclass
class _Model:
    cases: dict[str, _Case]
    paired: bool
    suite: tuple[float, float, float] | None = None  # the mean change of all cases: (d, se, df)
    canary_weight: float | None = None  # the canary's regression weight (1: subtracted in full)
    canary_shift: float | None = None  # the canary's mean log change
    machines: tuple[int, float, float, bool] | None = None  # baseline machines, common sd, case sd, estimated
    reasons: dict[str, Reason] = field(default_factory=dict)  # per case: where its noise came from


def _k(n_b: int, n_c: int, paired: bool) -> float:
    return 1 / n_b if paired else 1 / n_b + 1 / n_c


def _weights(w: np.ndarray, cap: float = 0.4) -> np.ndarray:
    """``w`` normalised to sum 1 with no share above ``cap``, the excess spread over the others (3+ cases)."""
    a, fixed = w / w.sum(), np.zeros(w.size, bool)
    while (over := (a > cap) & ~fixed).any():
        fixed |= over
        a = np.where(fixed, cap, a * (1 - cap * fixed.sum()) / a[~fixed].sum())
    return a


def _own_variances(rs: Sequence[np.ndarray], a: np.ndarray, df: float) -> tuple[np.ndarray, np.ndarray]:
    """Each case's own per-run variance from the residuals of within-group-centred runs ``rs`` (runs x cases)
    about g = r @ a: E[s_j^2] = v_j (1 - 2 a_j) + Q with Q = sum a^2 v (heteroscedastic cases, so a case's
    large own noise is not charged to the others; Grubbs' estimator for equal weights), and the s_j^2."""
    s2 = sum(((r - (r @ a)[:, None]) ** 2).sum(axis=0) for r in rs) / df
    f = a * a / (1 - 2 * a)
    q = float(np.sum(f * s2) / (1 + np.sum(f)))
    return np.maximum((s2 - q) / (1 - 2 * a), 0.05 * s2) + 1e-18, s2 + 1e-18  # a constant case: finite logs


def _moderated(own: np.ndarray, s2: np.ndarray, kinds: Sequence[str], df: float, max_df: float
               ) -> tuple[np.ndarray, float]:
    """Each case's own variance (on ``df``) moderated towards its kind's (a kind of one case: all the other
    cases'), the geometric mean of theirs corrected for the bias of a log variance, with the df the cases
    lend one another: the spread of their log mean squares ``s2`` beyond what sampling on ``df`` explains
    (Smyth 2004, limma's squeezeVar), at most ``max_df``; and the df of the result."""
    excess = float(np.var(np.log(s2), ddof=1) - special.polygamma(1, df / 2))  # called with 3+ cases only
    prior_df = max_df
    if excess > 1e-6:  # the cases' noise differs beyond what sampling on df explains
        from scipy import optimize  # here, not at import: most commands never fit a model

        prior_df = min(2 * optimize.brentq(lambda y: special.polygamma(1, y) - excess, 1e-8, 1e7), max_df)
    log_bias = float(special.digamma(df / 2) - math.log(df / 2))
    out = np.empty_like(own)
    for j in range(own.size):
        others = [o for o in range(own.size) if o != j and kinds[o] == kinds[j]] or [
            o for o in range(own.size) if o != j]
        prior = math.exp(float(np.mean(np.log(own[others]))) - log_bias)
        out[j] = (own[j] * df + prior * prior_df) / (df + prior_df)
    return out, df + prior_df


def _fit(baseline: Side, candidate: Side, names: Sequence[str], policy: Policy, paired: bool,
         new_machine: bool, use_canary: bool) -> _Model:
    """Estimate the model once (see docs/statistics.md): per (side, machine) group of runs, each run's log
    medians of the cases measured in every run are split into their weighted mean ``g`` (common) and the
    rest (each case's own, moderated per kind); ``g`` is regressed on the run's log canary median. Paired,
    the per-pair differences are the runs of one sample. On a new machine the baseline's machine means give
    the machine-level variances, pooled with the policy's prior."""
    yb = {n: baseline.cases[n].log_run_medians() for n in names}
    yc = {n: candidate.cases[n].log_run_medians() for n in names}
    kinds = {n: candidate.cases[n].kind for n in names}
    full = [n for n in names if yb[n].size == baseline.n_runs and yc[n].size == candidate.n_runs
            and (not paired or yb[n].size == yc[n].size >= 2)]
    kb, kc = _canary_log_medians(baseline), _canary_log_medians(candidate)
    canary_ok = use_canary and kb.size == baseline.n_runs and kc.size == candidate.n_runs
    if paired and full:
        samples = [(np.stack([yc[n] - yb[n] for n in full], 1), kc - kb if canary_ok else None,
                    [None] * len(kb if canary_ok else yc[full[0]]))]
    else:
        samples = []
        for side, y, kk in ((baseline, yb, kb), (candidate, yc, kc)):
            if full:
                grouped = new_machine and len(side.machines) == side.n_runs
                machines = side.machines if grouped else [None] * side.n_runs
                samples.append((np.stack([y[n] for n in full], 1), kk if canary_ok else None, machines))
    m = len(full)
    # run level: within (side, machine) groups, each run's common term g its weighted mean over the cases
    ss_g = ss_kk = 0.0
    groups = [(y[rows] - y[rows].mean(axis=0), None if kk is None else kk[rows] - kk[rows].mean())
              for y, kk, machines in samples for mach in dict.fromkeys(machines)
              if len(rows := [i for i, x in enumerate(machines) if x == mach]) >= 2]
    df_g = float(sum(len(r) - 1 for r, _ in groups))
    split, df_own = m >= 3 and df_g > 0, df_g * (m - 1) / max(m, 1)
    a, var_e, kind_of = np.full(m, 1 / max(m, 1)), {}, [kinds[n] for n in full]
    for step in range(3 if split else 0):  # weights from the moderated variances, which the weights change
        own, own_df = _moderated(*_own_variances([r for r, _ in groups], a, df_g), kind_of, df_own,
                                 policy.case_prior_df)
        if step < 2:
            a = _weights(1 / np.maximum(own, 1e-12 + 1e-3 * own.max()))
        var_e = {n: (float(own[j]), own_df) for j, n in enumerate(full)}
    g_parts, k_parts = [r @ a for r, _ in groups], [k for _, k in groups]
    model = _Model({}, paired and bool(full))
    fixed_beta = new_machine and not paired
    beta = 0.0
    if canary_ok and g_parts and (fixed_beta or df_g >= 3):
        g_all, k_all = np.concatenate(g_parts), np.concatenate(k_parts)
        ss_kk = float(np.sum(k_all**2))
        # the regression weight, shrunk towards 1 (the canary tracks the machine) by a prior worth df_g runs
        # of canary_run_sd: a precise canary keeps a weight near 1, a noisy one the weight its runs show
        prior = df_g * policy.canary_run_sd**2
        beta = 1.0 if fixed_beta else (float(np.sum(g_all * k_all)) + prior) / (ss_kk + prior)
        ss_kk += prior
        resid_g = g_all - beta * k_all
        ss_g, df_g = float(np.sum(resid_g**2)), df_g - (0 if fixed_beta else 1)
        model.canary_weight = beta
    elif g_parts:
        ss_g = float(sum(np.sum(g**2) for g in g_parts))
    shift = 0.0
    if canary_ok:
        shift = float(kc.mean() - kb.mean()) if not paired else float(np.mean(kc - kb))
        model.canary_shift = shift
    var_g = ss_g / df_g if df_g > 0 else 0.0
    mean_e = float(np.mean([var_e[n][0] for n in full])) if split else 0.0
    q = float(sum(a[j] ** 2 * var_e[n][0] for j, n in enumerate(full))) if split else 0.0  # the e's in g
    var_u = max(var_g - q, 0.0) if split else 0.0
    # var_u is a difference of two estimates: its df (Satterthwaite) are below those of var_g
    df_e_sum = sum(df for _, df in var_e.values())
    df_u = max(var_u**2 / (var_g**2 / df_g + q**2 / df_e_sum), 1.0) if split and var_u > 0 else max(df_g, 1.0)
    # where the split cannot be made: the total per-run variance pooled per kind
    total: dict[str, list] = {}
    for n in names:
        total.setdefault(kinds[n], []).extend([yc[n] - yb[n]] if paired and n in full else [yb[n], yc[n]])
    pooled = {}
    for kind, groups in total.items():
        df = sum(g.size - 1 for g in groups if g.size >= 2)
        ss = sum(float(np.sum((g - g.mean()) ** 2)) for g in groups if g.size >= 2)
        pooled[kind] = (ss / df, float(df)) if df else None
    prior = policy.run_sd_prior(candidate.environment)
    # machine level: a candidate on machines none of the baseline's runs came from
    mach_u = mach_e = w_mach = 0.0
    df_mu = df_me = math.inf
    if new_machine and not paired:
        b_runs = [x for x in baseline.machines] if len(baseline.machines) == baseline.n_runs else []
        c_runs = [x for x in candidate.machines] if len(candidate.machines) == candidate.n_runs else []
        w_mach = sum((b_runs.count(x) / len(b_runs)) ** 2 for x in set(b_runs)) if b_runs else 1.0
        w_mach += sum((c_runs.count(x) / len(c_runs)) ** 2 for x in set(c_runs)) if c_runs else 1.0
        est_u = est_e = (0.0, 0.0)
        levels = list(dict.fromkeys(b_runs))
        if split and len(levels) >= 2:
            y = np.stack([yb[n] for n in full], 1)
            rows = [[i for i, x in enumerate(b_runs) if x == lv] for lv in levels]
            means = np.stack([y[r].mean(axis=0) for r in rows])  # (machines, cases)
            inv_n = float(np.mean([1 / len(r) for r in rows]))
            level = means.mean(axis=1)
            if kb.size == len(b_runs) and canary_ok:
                level = level - beta * np.array([kb[r].mean() for r in rows])
            est_u = (max(float(np.var(level, ddof=1)) - var_g * inv_n, 0.0), float(len(levels) - 1))
            resid = means - means.mean(axis=1, keepdims=True) - means.mean(axis=0) + means.mean()
            df_m = float((len(levels) - 1) * (m - 1))
            est_e = (max(float(np.sum(resid**2)) / df_m - mean_e * inv_n, 0.0), df_m)
        prior_df = float(policy.machine_prior_df)
        # the policy's sds are of the difference between two machines: half their square per machine
        mach_u, df_mu = _pool((policy.machine_sd**2 / 2, prior_df), est_u)
        mach_e, df_me = _pool((policy.machine_case_sd(candidate.environment) ** 2 / 2, prior_df), est_e)
        model.machines = (len(levels), math.sqrt(mach_u), math.sqrt(mach_e), est_u[1] > 0)
    suite_parts = []
    for n in names:
        n_b, n_c = (yb[n].size,) * 2 if model.paired and n in full else (yb[n].size, yc[n].size)
        k = _k(n_b, n_c, model.paired and n in full)
        d = float(yc[n].mean() - yb[n].mean()) - beta * shift
        if split and n in full:
            ve, dfe = var_e[n]
            var_beta = var_g / ss_kk if ss_kk and not fixed_beta else 0.0
            u_parts = [(var_u * k, df_u), (var_beta * shift**2, df_g)]
            e_parts = [(ve * k, dfe)]
            runs_df = df_g + dfe
        elif pooled.get(kinds[n]) is not None and pooled[kinds[n]][1] > 0:
            u_parts, e_parts = [], [(pooled[kinds[n]][0] * k, pooled[kinds[n]][1])]
            runs_df = pooled[kinds[n]][1]
        elif prior is not None:
            u_parts, e_parts, runs_df = [], [(prior[0] ** 2 * k, float(policy.prior_df))], 0.0
            env = candidate.environment
            model.reasons[n] = why("noise-prior", sd=prior[0], device_type=env.get("device_type"),
                                   env=env.get("env"))
        else:
            continue
        u_parts.append((mach_u * w_mach, df_mu))
        e_parts.append((mach_e * w_mach, df_me))
        parts = u_parts + e_parts
        c = _Case(d, sum(v for v, _ in u_parts), sum(v for v, _ in e_parts), _satterthwaite(parts), n_b, n_c,
                  (sum(v for v, _ in parts) - (mach_u + mach_e) * w_mach) / k, (mach_u + mach_e) * w_mach,
                  runs_df)
        model.cases[n] = c
        if split and n in full:
            c.own_var, c.own_df = c.var_e, _satterthwaite(e_parts)
            suite_parts.append(c)
    if suite_parts:
        se2_e = sum(c.var_e for c in suite_parts) / len(suite_parts) ** 2
        df = _satterthwaite([(suite_parts[0].var_u, df_u), (se2_e, min(c.df for c in suite_parts))])
        model.suite = (float(np.mean([c.d for c in suite_parts])), math.sqrt(suite_parts[0].var_u + se2_e),
                       df)
    return model


# Gauss-Hermite nodes and weights for E[f(Z)], Z ~ N(0, 1).
_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(32)
_GH_W = _GH_W / _GH_W.sum()


def _max_sf(t: np.ndarray, a: float, df: float, m: int) -> np.ndarray:
    """P(max_{j<=s} T_j >= t) for s = 1..m, as a (len(t), m) array, where T_j = (a U + sqrt(1 - a^2) e_j) / S,
    U and e_j iid standard normal and S^2 ~ chi^2_df / df: the joint law of ``s`` cases' t statistics, which
    share the common term ``U`` and (approximately) one variance estimate."""
    a = min(max(a, 0.0), 0.999)
    s, w = _chi_nodes(round(df, 2)) if math.isfinite(df) and df < 1e4 else (np.ones(1), np.ones(1))
    z = (np.asarray(t, dtype=float)[:, None, None] * s[None, :, None] - a * _GH_X) / math.sqrt(1 - a * a)
    log_cdf = special.log_ndtr(z)  # (t, S nodes, U nodes)
    sizes = np.arange(1, m + 1)
    below = np.exp(log_cdf[..., None] * sizes) * w[None, :, None, None] * _GH_W[None, None, :, None]
    return np.clip(1.0 - below.sum(axis=(1, 2)), 0.0, 1.0)


@functools.lru_cache(maxsize=256)
def _chi_nodes(df: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights for E[f(S)], S^2 ~ chi^2_df / df: generalised Gauss-Laguerre on x = chi^2 / 2."""
    x, w = special.roots_genlaguerre(24, df / 2 - 1)
    return np.sqrt(2 * x / df), w / w.sum()


@dataclass(frozen=True)
class _Family:
    """The cases judged together: log changes ``d``, their se, the variances ``v`` of their own parts (inf
    where the contrasts cannot be made), and the df of the common-law and contrast tests."""

    d: np.ndarray
    se: np.ndarray
    v: np.ndarray
    a: float  # the smallest share of a case's sd that is common (the conservative end of the joint law)
    nu: float
    nu_own: float
    level_share: float = 0.5  # of alpha, for the level tests of a set of cases; the rest for the contrasts
    band: np.ndarray | float = 0.0  # the log change a regression must also exceed


def closed_test(f: _Family, alpha: float, power: float | None = 0.8) -> tuple[np.ndarray, np.ndarray | None]:
    """Adjusted one-sided p-values of "case i moved up" by closed testing (strong family-wise control
    whatever the other cases do), and the log change each case needs to be flagged with ``power`` when it
    moves alone (its MDE). A set S of unchanged cases shares the common term C, so H_S is tested by the
    level of its largest t (the joint law of :func:`_max_sf`, at ``level_share`` of alpha) or by the largest
    contrast ``d_j - mean of the rest of S``, free of C (Bonferroni over S, the rest); a single case by its
    t alone. The largest p over the sets holding i is bounded from above by the sets made of i and the
    highest changes among the cases below each t. The MDE is the largest over the sets the others' levels
    do not reject of the easier of the set's two tests, each with its own sd (``power`` None: no MDE)."""
    t, m, w = f.d / f.se, f.d.size, f.level_share
    tail = _max_sf(t, f.a, f.nu, m)  # (case, size)
    grid = np.linspace(0.0, 10.0, 41)
    log_tail = np.log(np.maximum(_max_sf(grid, f.a, f.nu, m), 1e-300))  # near linear in t: interpolated
    t_level = np.array([np.interp(-math.log(alpha * (w if s else 1)), -log_tail[:, s], grid)
                        for s in range(m)])
    t_own = special.stdtrit(f.nu_own, 1 - alpha * (1 - w) / np.arange(2, m + 1))
    p = tail[:, 0].copy()
    sets = [(i, t_level[0], math.inf, f.nu, f.se[i], 0.0) for i in range(m)]  # (case, t, t, df, sd, rest)
    for i in range(m):
        others = np.array([j for j in np.argsort(t) if j != i], dtype=int)
        for q in range(others.size):
            below = others[: q + 1]
            order = below[np.argsort(-f.d[below])]
            k = np.arange(1, q + 2)  # the other members of S
            level = np.diagonal(np.minimum.accumulate(tail[order, 1:q + 2]))
            spread = np.sqrt(f.v[i] + f.v[below].max() / k)
            rest = np.cumsum(f.d[order]) / k
            own = (k + 1) * special.stdtr(f.nu_own, -(f.d[i] - rest) / spread)
            p[i] = max(p[i], float(np.min([np.minimum(tail[i, k], level) / w, own / (1 - w)], axis=0).max()))
            open_sets = level > alpha * w  # sets the other members' level does not reject
            sets += [(i, t_level[j], t_own[j - 1], f.nu_own, spread[j - 1], rest[j - 1])
                     for j in k[open_sets]]
    if power is None:
        return np.minimum(p, 1.0), None
    i, t_lv, t_ct, nu_ct, sd_ct, rest = (np.array(c) for c in zip(*sets, strict=True))
    mde_log, band = np.full(m, -np.inf), np.broadcast_to(f.band, (m,))[i]
    # A case is flagged only when every set holding it rejects, and their misses overlap only in part: each
    # set is solved for 3/4 of the miss rate (with all of it, 0.70-0.83 of draws were caught at the MDE)
    power = 1 - (1 - power) * 0.75
    np.maximum.at(mde_log, i, _reach(t_lv, f.nu, f.se[i], t_ct, nu_ct, sd_ct, rest, f.v[i], band, power))
    return np.minimum(p, 1.0), mde_log


def _phi2(h: np.ndarray, k: np.ndarray, r: np.ndarray) -> np.ndarray:
    """P(X < h, Y < k) for standard normals of correlation r, elementwise (Owen's T; Owen 1956)."""
    h, k, s = np.where(h == 0, 1e-12, h), np.where(k == 0, 1e-12, k), np.sqrt(1 - r * r)
    return (0.5 * (special.ndtr(h) + special.ndtr(k)) - special.owens_t(h, (k - r * h) / (h * s))
            - special.owens_t(k, (h - r * k) / (k * s)) - 0.5 * (h * k < 0))


def _reach(t_lv, nu, se, t_ct, nu_ct, sd_ct, rest, v, band, power: float) -> np.ndarray:
    """The log change flagged with ``power`` by a set's level test (d / se beyond t_lv) or contrast
    ((d - rest) / sd_ct beyond t_ct, rest as measured), d also above ``band``: P(d > max(t_lv se, band)) +
    P(band < d <= that, contrast beyond t_ct), correlation v / (se sd_ct), noncentral t margins as normal."""
    finite = np.isfinite(t_ct * sd_ct * v)
    t_ct, sd_ct, v, rest = (np.where(finite, x, 1.0 if x is sd_ct else 0.0) for x in (t_ct, sd_ct, v, rest))
    r = np.clip(v / (se * sd_ct), 0.0, 0.999)
    g_lv, g_ct = np.sqrt(1 + t_lv * t_lv / (2 * nu)), np.sqrt(1 + t_ct * t_ct / (2 * nu_ct))
    lo, hi = np.zeros_like(se), (t_lv + 6) * g_lv * se + band + 6 * se
    for _ in range(30):
        mid = (lo + hi) / 2
        z_b = (mid - band) / se
        z_1 = np.where(t_lv * se >= band, (mid / se - t_lv) / g_lv, z_b)
        z_c = np.where(finite, ((mid - rest) / sd_ct - t_ct) / g_ct, -40.0)
        ok = special.ndtr(z_1) + _phi2(z_b, z_c, r) - _phi2(z_1, z_c, r) >= power
        lo, hi = np.where(ok, lo, mid), np.where(ok, mid, hi)
    return hi


def _pvalues(model: _Model, tested: Sequence[str], policy: Policy) -> tuple[dict, dict, dict]:
    """Adjusted one-sided p-values (regression, improvement) per case, and the per-case alpha a single
    changed case is tested at (for the MDE)."""
    cs = [model.cases[n] for n in tested]
    d = np.array([c.d for c in cs])
    df = np.array([c.df for c in cs])
    if policy.correction == "holm" and cs:
        fam = _Family(d, np.array([c.se for c in cs]), np.array([c.own_var for c in cs]),
                      min(math.sqrt(c.var_u) / c.se for c in cs), float(df.min()), min(c.own_df for c in cs),
                      band=np.array([math.log1p(policy.min_effect_for(n)) for n in tested]))
        reg, reach = closed_test(fam, policy.alpha, policy.power)
        imp = closed_test(dataclasses.replace(fam, d=-d), policy.alpha, None)[0]  # an improvement has no MDE
        alpha_one = {n: _alpha_for(x / c.se, c.df, policy.power)
                     for n, c, x in zip(tested, cs, reach, strict=True)}
    else:
        t = d / np.array([c.se for c in cs]) if cs else d
        p_reg, p_imp = special.stdtr(df, -t), special.stdtr(df, t)
        reg, imp = adjust_pvalues(p_reg, policy.correction), adjust_pvalues(p_imp, policy.correction)
        alpha_one = dict.fromkeys(tested, policy.alpha / max(len(cs), 1) if policy.correction == "bh"
                                  else policy.alpha)
    adjusted = dict(zip(tested, reg.tolist(), strict=True)), dict(zip(tested, imp.tolist(), strict=True))
    return *adjusted, alpha_one


def _alpha_for(x: float, df: float, power: float) -> float:
    """The one-sided alpha at which :func:`mde` gives ``x`` se (solving c + z sqrt(1 + c^2 / 2 df) = x)."""
    z, a = special.ndtri(power), 1 - special.ndtri(power) ** 2 / (2 * df)
    c = (x - z * math.sqrt(a + x * x / (2 * df))) / a
    return max(float(special.ndtr(-c) if math.isinf(df) else special.stdtr(df, -c)), 1e-15)  # band-bound


def _mde_at(c: _Case, n_b: int, n_c: int, paired: bool, alpha: float, min_effect: float, power: float
            ) -> tuple[float, float, float]:
    """(MDE, se, df) of a slowdown of this case alone with ``n_b`` and ``n_c`` runs."""
    now = (c.n_b - 1) + (0 if paired else c.n_c - 1)
    then = (n_b - 1) + (0 if paired else n_c - 1)
    se = math.sqrt(c.per_run * _k(n_b, n_c, paired) + c.fixed)
    df = c.df if (n_b, n_c) == (c.n_b, c.n_c) else max(c.df * then / now if now else c.runs_df + then, 1)
    return mde(se, df, alpha, min_effect, power), se, df


def _runs_needed(c: _Case, paired: bool, alpha: float, min_effect: float, policy: Policy) -> int | None:
    """Runs per side (the same on both) that bring the MDE to ``policy.target_mde`` and the interval's
    half-width to half the band (so an unchanged case reads "no change"); None beyond 100."""

    def enough(n: int) -> bool:
        m_e, se, df = _mde_at(c, n, n, paired, alpha, min_effect, policy.power)
        return m_e <= policy.target_mde and _t(0.5 + policy.confidence_level / 2, df) * se <= math.log1p(
            min_effect) / 2

    n = bisect.bisect_left(range(1, 101), True, key=enough) + 1  # enough() only turns true as n grows
    return n if n <= 100 else None


def _verdict(d: float, lo: float, hi: float, p_reg: float, p_imp: float, band: float, alpha: float) -> str:
    """Regression (improvement): significant at ``alpha`` and beyond the band; no change: the interval
    inside it."""
    return (REGRESSION if p_reg <= alpha and d > band else IMPROVEMENT if p_imp <= alpha and d < -band
            else NO_CHANGE if -band <= math.log(lo) and math.log(hi) <= band else INCONCLUSIVE)


def _time_result(
    name: str, b: CaseSamples, c: CaseSamples, e: _Case | None, paired: bool, p_reg: float | None,
    p_imp: float | None, alpha_one: float, policy: Policy, blockers: list[Reason], reasons: Sequence[Reason],
    disturbed: Reason | None,
) -> MetricResult:
    """The time verdict of one case; ``alpha_one`` is the per-case alpha the MDE assumes."""
    min_effect = policy.min_effect_for(name)
    y_b, y_c = b.log_run_medians(), c.log_run_medians()
    base = dict(metric="time", clock=c.clock, ratio=math.exp(e.d if e else y_c.mean() - y_b.mean()),
                threshold=min_effect, n_baseline=y_b.size, n_candidate=y_c.size,
                baseline_median=float(np.median(b.samples)), candidate_median=float(np.median(c.samples)))
    reasons = list(blockers) + list(reasons)
    if e is None:
        reasons.append(why("too-few-samples", target_mde=policy.target_mde))
        return MetricResult(verdict=INCONCLUSIVE, reasons=tuple(reasons), **base)
    lo, hi = ratio_interval(e.d, e.se, e.df, policy.confidence_level)
    m_e = _mde_at(e, e.n_b, e.n_c, paired, alpha_one, min_effect, policy.power)[0]
    base.update(ci=(lo, hi), p_regression=p_reg, p_improvement=p_imp, mde=m_e, se=e.se, df=e.df)
    if blockers:
        return MetricResult(verdict=INCONCLUSIVE, reasons=tuple(reasons), **base)
    verdict = _verdict(e.d, lo, hi, p_reg, p_imp, math.log1p(min_effect), policy.alpha)
    if verdict == INCONCLUSIVE:
        needed = _runs_needed(e, paired, alpha_one, min_effect, policy)
        base["runs_needed"] = needed
        reasons.append(why("unsettled", low=lo, high=hi, min_effect=min_effect, correction=policy.correction,
                           mde=m_e, runs_needed=needed, target_mde=policy.target_mde,
                           across_machines=e.fixed > 0))
    if disturbed:
        reasons.append(dataclasses.replace(disturbed, values=disturbed.values + (
            ("would_have_been", None if verdict == INCONCLUSIVE else verdict),)))
        verdict = INCONCLUSIVE
    return MetricResult(verdict=verdict, reasons=tuple(reasons), **base)


def _suite_result(model: _Model, policy: Policy, blockers: Sequence[str]) -> MetricResult | None:
    """The change of the suite as a whole (the mean over the cases measured in every run), its own test."""
    if model.suite is None:
        return None
    d, se, df = model.suite
    lo, hi = ratio_interval(d, se, df, policy.confidence_level)
    p_reg, p_imp = float(special.stdtr(df, -d / se)), float(special.stdtr(df, d / se))
    verdict = INCONCLUSIVE if blockers else _verdict(d, lo, hi, p_reg, p_imp, math.log1p(policy.min_effect),
                                                     policy.alpha)
    return MetricResult(metric="suite", verdict=verdict, ratio=math.exp(d), ci=(lo, hi),
                        p_regression=p_reg, p_improvement=p_imp, threshold=policy.min_effect,
                        mde=mde(se, df, policy.alpha, policy.min_effect, policy.power), se=se, df=df,
                        reasons=tuple(blockers))


# --- canary ------------------------------------------------------------------------------------------


def judge_canary(baseline: Side, candidate: Side, policy: Policy, env_changed: bool,
                 paired: bool = False) -> CanaryResult | None:
    """Per-run canary medians and CVs, and which candidate runs are disturbed: judged against the baseline's
    runs, or paired (A/B) against the partner, since drift that moved both members cancels in the pair: a
    canary that moved between them (beyond ``canary_z`` standard errors of the two medians, whose se is
    1.2533 robust CV / sqrt(n) under normal noise, and ``canary_min_shift``) or spread within either."""
    b_runs = [np.asarray(r, dtype=float) for r in baseline.canary if len(r)]
    c_runs = [np.asarray(r, dtype=float) for r in candidate.canary if len(r)]
    device = _device_disturbances(baseline, candidate, paired)
    if not c_runs:  # no canary: a run the device slowed down by itself is still disturbed
        if not any(device):
            return None
        runs = tuple(CanaryRun("candidate", i, math.nan, math.nan, d) for i, d in enumerate(device))
        return CanaryResult(runs, None, None, tuple(d for d in device if d), by_pair=paired)
    by_pair = paired and len(b_runs) == len(c_runs) == len(candidate.canary) == candidate.n_runs
    b_meds = _canary_log_medians(baseline)
    b_cvs = [robust_cv(r) for r in b_runs]
    c_cvs = [robust_cv(r) for r in c_runs]
    usual = (b_cvs + c_cvs) if by_pair else b_cvs
    cv_limit = max(policy.canary_max_cv, policy.canary_cv_factor * float(np.median(usual))) if usual \
        else policy.canary_max_cv
    run_sd = float(np.std(b_meds, ddof=1)) if b_meds.size >= 2 else policy.canary_run_sd
    shift_limit = max(math.log1p(policy.canary_min_shift),
                      policy.canary_z * run_sd * math.sqrt(1 + 1 / max(b_meds.size, 1)))
    runs = [CanaryRun("baseline", i, float(np.median(r)), cv) for i, (r, cv) in enumerate(zip(b_runs, b_cvs,
                                                                                             strict=True))]
    # A candidate on a machine none of the baseline's runs came from: its canary differs from the baseline's
    # by the machine (taken out of every change in compare), so a run is held against the other candidates.
    ref, against = (b_meds.mean(), "baseline") if b_meds.size and not env_changed else (None, "")
    if not by_pair and on_new_machine(baseline, candidate):
        c_meds = np.log([np.median(r) for r in c_runs])
        ref = float(np.median(c_meds)) if c_meds.size >= 3 else None
        against = "candidate-median"  # a machine none of the baseline's runs came from
    disturbed = []
    for i, (r, cv) in enumerate(zip(c_runs, c_cvs, strict=True)):
        med = float(np.median(r))
        trouble = None
        if by_pair:
            shift = math.log(med) - b_meds[i]
            limit = max(math.log1p(policy.canary_min_shift),
                        policy.canary_z * 1.2533 * math.hypot(cv / math.sqrt(r.size),
                                                              b_cvs[i] / math.sqrt(b_runs[i].size)))
            if max(cv, b_cvs[i]) > cv_limit:
                trouble = why("canary-spread", cv=max(cv, b_cvs[i]), limit=cv_limit, run=i + 1,
                              pair=True)
            elif abs(shift) > limit:
                trouble = why("canary-pair-shift", shift=math.expm1(shift), limit=math.expm1(limit),
                              run=i + 1)
        elif cv > cv_limit:
            trouble = why("canary-spread", cv=cv, limit=cv_limit, run=i + 1, pair=False)
        elif ref is not None and abs(math.log(med) - ref) > shift_limit:
            trouble = why("canary-shift", shift=math.expm1(math.log(med) - ref),
                          limit=math.expm1(shift_limit), run=i + 1, against=against)
        if trouble is None and len(device) == len(c_runs):
            trouble = device[i]
        runs.append(CanaryRun("candidate", i, med, cv, trouble))
        disturbed += [trouble] if trouble else []
    ratio = math.exp(float(np.mean(np.log([cr.median for cr in runs if cr.side == "candidate"]))
                           - b_meds.mean())) if b_meds.size else None
    env_shift = (f"plain kernels moved {ratio - 1:+.1%} with the environment change" if env_changed and ratio
                 else None)
    return CanaryResult(tuple(runs), ratio, run_sd if b_meds.size >= 2 else None, tuple(disturbed), env_shift,
                        by_pair=by_pair)


def _device_disturbances(baseline: Side, candidate: Side, paired: bool) -> list[Reason | None]:
    """Per candidate run (pair, when paired): why the device slowed it down by itself, else None."""
    own = candidate.disturbances if len(candidate.disturbances) == candidate.n_runs else []
    partner = baseline.disturbances if paired and len(baseline.disturbances) == baseline.n_runs else []
    if not own and not partner:
        return []
    own, partner = own or [None] * candidate.n_runs, partner or [None] * candidate.n_runs
    return [why("device", detail=c or b, run=i + 1, partner=not c) if c or b else None
            for i, (c, b) in enumerate(zip(own, partner, strict=False))]


def on_one_clock(baseline: Side, candidate: Side) -> tuple[Side, Side]:
    """Both sides with a case's runs on the device's clock where both have it in every run, so that host
    jitter stays out of the change judged; elsewhere on the wall clock (docs/gpus.md)."""
    both = {n for n, c in candidate.cases.items()
            if c.device_runs and baseline.cases.get(n) is not None and baseline.cases[n].device_runs}
    if not both:
        return baseline, candidate

    def on_device(side: Side) -> Side:
        cases = {n: dataclasses.replace(cs, runs=cs.device_runs, device_runs=None, clock="device")
                 if n in both else cs for n, cs in side.cases.items()}
        return dataclasses.replace(side, cases=cases)

    return on_device(baseline), on_device(candidate)


def _keep_runs(side: Side, keep: Sequence[int]) -> Side:
    """``side`` with only the runs at ``keep``: every per-run list parallel to the side's runs is cut."""

    def pick(values):
        return [values[i] for i in keep] if values is not None and len(values) == side.n_runs else values

    cases = {n: dataclasses.replace(cs, runs=pick(cs.runs), run_machines=pick(cs.run_machines),
                                    compile_time_s=pick(cs.compile_time_s),
                                    compile_cache=pick(cs.compile_cache),
                                    peak_memory_bytes=pick(cs.peak_memory_bytes))
             for n, cs in side.cases.items()}
    return dataclasses.replace(side, cases=cases, n_runs=len(keep), machines=pick(side.machines),
                               canary=pick(side.canary), run_order=pick(side.run_order),
                               disturbances=pick(side.disturbances))


def _leave_out_disturbed(baseline: Side, candidate: Side, canary: CanaryResult | None, judged: Sequence[str],
                         paired: bool) -> tuple[Side, Side, CanaryResult | None]:
    """Leave the disturbed candidate runs (pairs, when paired) out when enough clean ones remain: two pairs,
    or one candidate run against the baseline, with every judged case measured in every run. The canary
    does not depend on the code, so choosing runs by it selects nothing about the change being judged."""
    if canary is None or not canary.disturbed_runs:
        return baseline, candidate, canary
    keep = [i for i in range(candidate.n_runs) if i not in canary.disturbed_runs]
    # the canary's run indices are the side's only when every run has canary samples
    canary_aligned = len(candidate.canary) == candidate.n_runs and all(len(r) for r in candidate.canary)
    cases_aligned = all(len(candidate.cases[n].runs) == candidate.n_runs
                        and (not paired or len(baseline.cases[n].runs) == baseline.n_runs) for n in judged)
    if len(keep) < (2 if paired else 1) or not (canary_aligned and cases_aligned):
        return baseline, candidate, canary
    left_out = dataclasses.replace(canary, left_out=canary.disturbed_runs)
    return (_keep_runs(baseline, keep) if paired else baseline), _keep_runs(candidate, keep), left_out


# --- compile time and peak memory: one value per run -------------------------------------------------


def _few_values_result(
    metric: str, b_vals: Sequence[float], c_vals: Sequence[float], threshold: float, floor: float,
    blockers: list[Reason], note: str | None = None,
) -> MetricResult | None:
    """Compile time / peak memory: one value per run, judged on the range of pairwise ratios."""
    if not b_vals or not c_vals:
        return None  # not recorded on one side (eager case, CPU memory): nothing to judge
    b = np.maximum(np.asarray(b_vals, dtype=float), floor)
    c = np.maximum(np.asarray(c_vals, dtype=float), floor)
    b_med, c_med = float(np.median(b)), float(np.median(c))
    lo, hi = float(c.min() / b.max()), float(c.max() / b.min())
    up, down = 1.0 + threshold, 1.0 / (1.0 + threshold)  # symmetric on the log scale
    reasons = list(blockers) + ([why("cache-state", state=note)] if note else [])
    verdict = (INCONCLUSIVE if blockers else REGRESSION if lo > up else IMPROVEMENT if hi < down
               else NO_CHANGE if lo >= down and hi <= up else INCONCLUSIVE)
    if verdict == INCONCLUSIVE and not blockers:
        reasons.append(why("values-overlap", threshold=threshold, low=lo, high=hi, n_baseline=b.size,
                           n_candidate=c.size))
    if b.size == 1 and c.size == 1 and verdict != INCONCLUSIVE:
        reasons.append(why("single-ratio"))
    return MetricResult(metric=metric, verdict=verdict, ratio=c_med / b_med, ci=(lo, hi), threshold=threshold,
                        n_baseline=b.size, n_candidate=c.size, baseline_median=b_med, candidate_median=c_med,
                        reasons=tuple(reasons))


def _by_cache(cs: CaseSamples) -> dict[str | None, list[float]]:
    states = list(cs.compile_cache) + [None] * (len(cs.compile_time_s) - len(cs.compile_cache))
    out: dict[str | None, list[float]] = {}
    for value, state in zip(cs.compile_time_s, states, strict=False):
        out.setdefault(state, []).append(value)
    return out


def _compile_result(b: CaseSamples, c: CaseSamples, policy: Policy, blockers: list[Reason]
                    ) -> MetricResult | None:
    """Compile time, compared only between runs of the same cache state (cold preferred when both match)."""
    bb, cc = _by_cache(b), _by_cache(c)
    if not bb or not cc:
        return None
    common = [s for s in ("cold", "warm", None) if s in bb and s in cc]
    if not common:
        describe = lambda d: "/".join(sorted(str(s or "unrecorded") for s in d))  # noqa: E731
        return MetricResult(
            metric="compile_time", verdict=NOT_COMPARED, n_baseline=sum(map(len, bb.values())),
            n_candidate=sum(map(len, cc.values())),
            reasons=(why("cache-state-differs", baseline=describe(bb), candidate=describe(cc)),),
        )
    return _few_values_result("compile_time", bb[common[0]], cc[common[0]], policy.compile_threshold,
                              policy.compile_floor_s, blockers, common[0])


def _overall(metrics: Mapping[str, MetricResult]) -> str:
    verdicts = {m.verdict for m in metrics.values()}
    return next((v for v in (REGRESSION, INCONCLUSIVE, IMPROVEMENT) if v in verdicts), NO_CHANGE)


# --- the comparator --------------------------------------------------------------------------------


def compare(baseline: Side, candidate: Side, policy: Policy | None = None, *,
            paired: bool = False) -> Comparison:
    """Judge every case of ``candidate`` against ``baseline``. Pure: no I/O.

    ``paired=True``: run ``k`` of one side ran in a pair with run ``k`` of the other (either one first);
    both sides must hold the same number of runs.
    """
    policy = policy or Policy()
    baseline, candidate = on_one_clock(baseline, candidate)
    if paired and baseline.n_runs != candidate.n_runs:
        raise ValueError(f"paired: as many runs a side needed, {baseline.n_runs} v {candidate.n_runs}")
    if paired and baseline.run_order and candidate.run_order and any(
            abs(b - c) != 1 for b, c in zip(baseline.run_order, candidate.run_order, strict=False)):
        raise ValueError(f"paired runs must be adjacent: order {baseline.run_order} v {candidate.run_order}")
    mismatch = tuple(environment_mismatch(baseline.environment, candidate.environment,
                                          [f for f in policy.env_fields if f in INCOMPARABLE_ENV_FIELDS]))
    changes = tuple(environment_changes(baseline.environment, candidate.environment, policy.env_fields))
    labels = tuple(f"environment changed: {c}" for c in changes)
    canary = judge_canary(baseline, candidate, policy, env_changed=bool(changes), paired=paired)

    verdicts: dict[str, CaseVerdict] = {}
    judged: list[str] = []
    for name, c in candidate.cases.items():
        b = baseline.cases.get(name)
        if name in candidate.failed:
            continue
        if b is None:
            verdicts[name] = CaseVerdict(name, NEW, {}, (why("not-in-baseline"),), labels)
        elif b.definition_hash and c.definition_hash and b.definition_hash != c.definition_hash:
            verdicts[name] = CaseVerdict(name, NEW, {}, (why("changed-definition", baseline=b.definition_hash,
                                                             candidate=c.definition_hash),), labels)
        elif not c.runs or not b.runs:
            verdicts[name] = CaseVerdict(name, INCONCLUSIVE, {}, (why("no-samples"),), labels)
        else:
            judged.append(name)
    for name, reason in candidate.failed.items():
        verdicts[name] = CaseVerdict(name, FAILED, {}, (why("failed", detail=reason),), labels)
    not_selected = []
    for name in baseline.cases:
        if name in candidate.cases or name in candidate.failed:
            continue
        if name in candidate.skipped:
            verdicts[name] = CaseVerdict(name, SKIPPED, {}, (why("skipped", detail=candidate.skipped[name]),),
                                         labels)
        elif candidate.selected is None or name in candidate.selected:
            verdicts[name] = CaseVerdict(name, MISSING, {}, (why("missing"),), labels)
        else:
            not_selected.append(name)

    baseline, candidate, canary = _leave_out_disturbed(baseline, candidate, canary, judged, paired)
    disturbed = None
    if canary and canary.disturbed and not canary.left_out:
        disturbed = why("disturbed", runs=tuple(r["run"] for r in canary.disturbed), by_pair=canary.by_pair,
                        total=sum(r.side == "candidate" for r in canary.runs))
    new_machine = not paired and on_new_machine(baseline, candidate)
    model = _fit(baseline, candidate, judged, policy, paired, new_machine, use_canary=not changes)
    net_of_canary = model.canary_weight is not None
    narrowing = []
    if model.paired:  # the same data analysed unpaired, for the narrowing figure
        unpaired = _fit(baseline, candidate, judged, policy, False, False, use_canary=not changes)
        q = 0.5 + policy.confidence_level / 2
        narrowing = [_t(q, model.cases[n].df) * model.cases[n].se / (_t(q, unpaired.cases[n].df)
                                                                     * unpaired.cases[n].se)
                     for n in judged if n in model.cases and n in unpaired.cases]
    tested = list(model.cases)
    adj_reg, adj_imp, alpha_one = _pvalues(model, tested, policy)
    machine_reason = None
    if model.machines is not None:
        count, common_sd, case_sd, estimated = model.machines
        machine_reason = why("machine-variance", machines=count if estimated else 1, common_sd=common_sd,
                             case_sd=case_sd, prior_df=policy.machine_prior_df)
    unpaired_why = why("analysed-unpaired") if paired and not model.paired else None
    case_reasons = {n: [r for r in (model.reasons.get(n), machine_reason, unpaired_why) if r] for n in judged}
    suite_blockers = [why("environment-mismatch", detail=m) for m in mismatch] + (
        [why("machine-not-taken-out", environment_changed=bool(changes))] if new_machine and not net_of_canary
        else [])

    device_type = candidate.environment.get("device_type")
    judge_memory = device_type is None or device_type in policy.memory_device_types
    for name in judged:
        b, c = baseline.cases[name], candidate.cases[name]
        blockers = list(suite_blockers)
        if b.attention_used and c.attention_used and b.attention_used != c.attention_used:
            blockers.append(why("attention-differs", baseline=b.attention_used, candidate=c.attention_used))
        if b.unet_kernels and c.unet_kernels and b.unet_kernels != c.unet_kernels:
            blockers.append(why("kernel-differs", baseline=", ".join(sorted(b.unet_kernels)),
                                candidate=", ".join(sorted(c.unet_kernels))))
        metrics = {"time": _time_result(name, b, c, model.cases.get(name), model.paired, adj_reg.get(name),
                                        adj_imp.get(name), alpha_one.get(name, policy.alpha), policy,
                                        blockers, case_reasons[name], disturbed)}
        once = {"compile_time": _compile_result(b, c, policy, list(blockers)),
                "peak_memory": _few_values_result("peak_memory", b.peak_memory_bytes, c.peak_memory_bytes,
                                                  policy.memory_threshold, float(policy.memory_floor_bytes),
                                                  list(blockers)) if judge_memory else None}
        metrics.update({k: v for k, v in once.items() if v is not None})
        wrong = c.correct is False
        verdicts[name] = CaseVerdict(name, FAILED if wrong else _overall(metrics), metrics,
                                     (why("wrong-output"),) if wrong else (), labels)

    notes = []
    if not judge_memory:
        notes.append(f"peak memory is not judged on {device_type} "
                     f"(policy: {', '.join(policy.memory_device_types)})")
    if canary and canary.left_out:
        what = "pair" if paired else "candidate run"
        shown = ", ".join(str(i + 1) for i in canary.left_out)
        notes.append(f"{what}{'s' if len(canary.left_out) > 1 else ''} {shown} left out of the time verdicts "
                     f"(machine disturbed, see the canary): judged on the other {candidate.n_runs}")
    if canary and canary.env_shift:
        notes.append(canary.env_shift + " (reported, not used to cancel the change)")
    if net_of_canary and new_machine:
        notes.append("the candidate ran on a machine none of the baseline's runs came from: every time "
                     f"change is net of the canary's move ({math.expm1(model.canary_shift):+.1%}; the "
                     "medians shown are as measured), and the machine-to-machine variance is in each "
                     "interval and MDE")
    elif net_of_canary:
        notes.append(f"every time change is net of the canary's move ({math.expm1(model.canary_shift):+.1%}) "
                     f"weighted by {model.canary_weight:.2f}, the share of the runs' common speed it "
                     "tracked: a machine that moved every case alike is not a change of the code")
    order = [*candidate.cases, *candidate.failed, *baseline.cases]
    return Comparison(
        tuple(verdicts[n] for n in dict.fromkeys(order) if n in verdicts), policy, mismatch, changes,
        tuple(notes), baseline.label, candidate.label, tuple(not_selected), canary, paired,
        1 - float(np.median(narrowing)) if narrowing else None, new_machine,
        _suite_result(model, policy, suite_blockers))
