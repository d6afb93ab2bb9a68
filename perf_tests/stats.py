"""The regression comparator: (baseline samples, candidate samples, policy) -> verdicts.

A pure function, :func:`compare`, with no files, printing or exit codes (``compare.py`` and ``report.py``
wrap it). The model behind the ``time`` verdict:

*Runs are the unit of evidence.* Rounds of one process share its state (clocks, memory layout, neighbours),
so they are not independent samples of the code's speed. Per case and side, each run is reduced to one
number, ``y = log(median of its rounds)``, which carries the within-run noise too; the effect is
``d = mean(y_candidate) - mean(y_baseline)`` (reported as the ratio ``exp(d)``).

* Noise: a process's speed moves all its cases alike (measured: ~3% per run common, 1.5% per case), so the
  variance of ``d`` is split (:func:`_split`) into a part common to all cases of a run (estimated from the
  runs' mean over cases, ``n - 1`` df per side) and a case-specific part (the rest, pooled across the cases
  of one kind, ``case["kind"]``). Where that split cannot be made (fewer than 3 cases measured in every
  run), the variance of run medians pooled across the cases of the kind on both sides is used as a whole.
* With one run on a side, that side adds no degrees of freedom and the estimate comes from the other side;
  with one run on both sides, from a per-device-type prior (``Policy.run_sd_priors``); with neither, the
  verdict is *inconclusive, too few samples*: never a regression by rounds alone.
* When the candidate ran on machines none of the baseline's runs came from, the machine's speed is in every
  change: with a canary in the same environment on both sides, every change is taken net of the canary's
  move (its standard error added to the common variance), and the machine-to-machine variances (estimated
  from a baseline spanning several machines, else ``Policy.machine_sd`` common and
  ``Policy.machine_case_sds`` per case: machines differ case by case too, by cache sizes and memory) are
  added to the common and the case-specific part. A candidate run's canary is then held against the
  candidate runs' median, not the baseline machine's.
* *Regression*: a one-sided t test of ``d > 0`` significant at ``alpha`` AND the point estimate above
  ``+min_effect``. With the split, two tests at ``alpha / 2`` each: the median change of all cases (a uniform
  slowdown) against the common variance, and the case's contrast to that median (it moved unlike the
  others) against the case-specific variance, Holm (or BH) across cases. Why this rule: testing each case's
  total change against its total variance, with the df pooled over cases, caught a one-case +10% in 78%
  of 200 draws at 5 vs 3 runs (the shared 3% dominates) and, because the shared part is counted as if
  independent across cases, raised 6.5% whole-run A/A false alarms at 3 vs 3 runs; requiring the
  interval's lower bound above ``+min_effect`` would test ``d > min_effect`` and need a far larger change. The point-estimate rule keeps a
  significant but negligible change from failing the gate. *Improvement* mirrors it. *No change* only when
  the whole ``confidence_level`` interval (total variance, Welch-Satterthwaite df) lies inside
  ``±min_effect``; anything else is *inconclusive*, with the interval, the MDE and the runs that would
  settle it. ``tests/test_stats.py`` measures the false-alarm rate, power and coverage of this rule.
* *MDE* (minimum detectable effect): the smallest slowdown of one case flagged with ``power`` (80%) at the
  corrected alpha, from the SEs and df actually used (:func:`mde`, :func:`_mde_of`): the larger of
  ``log(1 + min_effect) + t_power SE`` and, for the split, ``(t_{alpha/2m} + t_power) SE_contrast``.
* *Paired* (A/B runs alternated A, B, A, B): the same model on the per-pair differences of log run medians;
  drift shared by the members of a pair cancels. The comparison reports how much
  narrower the paired interval is than the unpaired one on the same data.
* *Canary*: a code-independent workload (plain matmul + conv) timed between cases. A candidate run whose
  canary is much noisier than usual, or whose canary median moved against the baseline's beyond the
  baseline's own run-to-run noise, is *disturbed*; paired, a pair is disturbed when its canary moved between
  the two members beyond the noise of their medians (drift that moved both cancels). Disturbed runs (pairs)
  are left out of the time verdicts when enough clean ones remain (two pairs, or one candidate run against
  a baseline); otherwise regression, improvement and no-change time verdicts become inconclusive. The part
  of the change common to all cases (a uniform slowdown) is what a slower machine also produces, so its test is against the canary's own move: ``D - C`` with both variances, where ``C``
  is the mean change of the canary's log run medians (per pair when paired). A run on a machine 16% slower
  for everything, canary included, is not a regression of every case; the case-specific contrasts, the
  intervals and the estimates are unchanged (timings are never divided by the canary). After an
  environment change (torch, driver) the canary's move is reported on its own and not used, so an upgrade
  is not normalised away.

``compile_time`` and ``peak_memory`` have one value per run; every pairwise ratio candidate/baseline is set
against the threshold (all above: regression, all inside: no change, else inconclusive). Compile time is
compared only between runs of the same ``compile_cache`` state (a warm cache compiles in a fraction of the
time); with no common state it is *not compared*, which never fails.

Case-level verdicts beyond timing: *failed* (the candidate recorded the case as failed, or its output was
wrong), *skipped* (in the baseline, skipped by the candidate with a reason), *missing* (selected by the
candidate but neither produced, skipped nor failed), *new* (not in the baseline, or a changed definition).
Baseline cases the candidate did not select are counted in ``Comparison.not_selected``, not judged.
Environment: a different device type or slug makes timings incomparable (every verdict inconclusive); a
different torch/CUDA/cuDNN/driver is compared and every verdict is labelled with the change.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import special
from scipy import stats as sps

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
# first match wins, "*" matches anything. CPU figures: the sd pooled over the cases of the committed CPU
# baselines (baselines/cpu-intel-xeon-processor, 3 runs each, a shared 2-core machine): torch2 6.7% (54
# cases), torch1 10.0% (12 cases), rounded up. CUDA: no GPU baseline has been recorded yet; 3% is an
# assumption (GPU kernels repeat far better than a shared CPU), to be replaced by the first recorded one.
DEFAULT_RUN_SD_PRIORS = (("cpu", "torch1", 0.10), ("cpu", "*", 0.07), ("cuda", "*", 0.03))

# What settles a comparison across machines, where more runs do not (the machine-to-machine variance stays).
ACROSS_MACHINES_FIX = "compare on one machine: --ab REF, or a baseline recorded on this one (update-baselines)"


@dataclass(frozen=True)
class Policy:
    """How verdicts are reached. Defaults are the gate's documented defaults (see the README)."""

    alpha: float = 0.05  # family-wise error rate across the cases of one run (Holm) / FDR (BH)
    min_effect: float = 0.05  # smallest relative change that counts (the no-change band is ±min_effect)
    min_effect_overrides: tuple[tuple[str, float], ...] = ()  # (fnmatch pattern on the case name, value)
    correction: str = "holm"  # "holm" | "bh" | "none"
    confidence_level: float = 0.90  # two-sided interval of the change (unadjusted)
    power: float = 0.80  # for the MDE
    target_mde: float = 0.10  # "runs needed" in reasons: runs per side that bring the MDE down to this
    run_sd_priors: tuple[tuple[str, str, float], ...] = DEFAULT_RUN_SD_PRIORS
    prior_df: int = 10  # degrees of freedom credited to a prior (about the runs it was measured on)
    # Machine-to-machine sds of a case's log median between two machines of one type, used when the candidate
    # ran on a machine none of the baseline's runs came from and the baseline spans a single machine. The
    # common part (every case alike) is what is left after the canary's move is taken out: 3.0% (torch2) and
    # 0.1% (torch1) between two 2-core VMs reporting the same CPU model, whose canaries differed by 35% and
    # 49%. The case-specific part (a case moving unlike the others), on those VMs: the sd over cases of each
    # case's change minus the mean change was 12-17% (torch2, 7 cases) and 11-14% (torch1, 3 cases) in
    # three smoke runs each, 2026-12-02, the largest single case +30% (attention with the original kernel):
    # rounded up to 20%, as the false alarms of a CI smoke cost more than its power. For CUDA an assumption
    # until a GPU fleet measures it: one GPU model runs the same kernels on every host.
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
    # Peak memory is judged only on these device types: CUDA's allocator statistics repeat run to run, while
    # a CPU peak-RSS delta depends on what the process allocated before the case (observed: 0.1 to 50 MB for
    # one case across runs), so it is shown but never gates.
    memory_device_types: tuple[str, ...] = ("cuda",)
    env_fields: tuple[str, ...] = DEFAULT_ENV_FIELDS

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.min_effect < 0:
            raise ValueError(f"min_effect must be >= 0, got {self.min_effect}")
        if self.correction not in ("holm", "bh", "none"):
            raise ValueError(f"correction must be holm, bh or none, got {self.correction!r}")
        if self.machine_sd < 0 or any(sd < 0 for _, sd in self.machine_case_sds):
            raise ValueError(f"machine sds must be >= 0, got {self.machine_sd} and {self.machine_case_sds}")
        for name in ("confidence_level", "power"):
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
                return sd, f"prior for {device_type}/{env}"
        return None


@dataclass
class CaseSamples:
    """One case on one side: per-call seconds per run (one list of rounds per run) and once-per-run metrics."""

    name: str
    runs: list[list[float]]
    run_machines: list[str | None] = field(default_factory=list)  # machine_id per run (parallel to runs)
    definition_hash: str | None = None
    compile_time_s: list[float] = field(default_factory=list)  # one per run that recorded it
    compile_cache: list[str | None] = field(default_factory=list)  # "warm" | "cold" | None, parallel to above
    peak_memory_bytes: list[float] = field(default_factory=list)
    attention_used: str | None = None
    unet_kernels: set = field(default_factory=set)  # UNet SDPA kernels the runs saw (perf_tests.kernels)
    correct: bool | None = None  # False if any run reported a wrong output
    case: dict = field(default_factory=dict)  # extra_info["case"]: kind, profile, attention, ...

    @property
    def samples(self) -> np.ndarray:
        return np.concatenate([np.asarray(r, dtype=float) for r in self.runs]) if self.runs else np.empty(0)

    @property
    def kind(self) -> str:
        """The pooling group: ``case["kind"]``, else the test function's name (``test_unet_step[...]``)."""
        return str(self.case.get("kind") or self.name.split("[", 1)[0])

    def log_run_medians(self) -> np.ndarray:
        return np.log([float(np.median(r)) for r in self.runs if len(r)])


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
    selected: set[str] | None = None  # None: unknown (e.g. a baseline), every baseline case counts as selected
    run_order: list[int] | None = None  # global position of each run when A and B alternated


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
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class CaseVerdict:
    name: str
    verdict: str
    metrics: dict[str, MetricResult]
    reasons: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()  # e.g. "environment changed: torch 2.13.1 -> 2.14.1"


@dataclass(frozen=True)
class CanaryRun:
    side: str  # "baseline" | "candidate"
    index: int
    median: float  # per-call seconds
    cv: float  # robust CV within the run
    disturbed: str | None = None  # the reason, when this run is disturbed


@dataclass(frozen=True)
class CanaryResult:
    runs: tuple[CanaryRun, ...]
    ratio: float | None  # candidate / baseline canary median (None without both sides)
    baseline_run_sd: float | None  # run-to-run sd of log canary medians in the baseline
    disturbed: tuple[str, ...] = ()  # one reason per disturbed candidate run (or pair)
    env_shift: str | None = None  # "plain kernels moved +X% with the environment change"
    left_out: tuple[int, ...] = ()  # candidate runs (pairs) left out of the time verdicts (see compare)
    by_pair: bool = False  # judged pair by pair (A/B) rather than against the baseline

    @property
    def disturbed_runs(self) -> tuple[int, ...]:
        """The 0-based indices of the disturbed candidate runs among those with canary samples."""
        return tuple(r.index for r in self.runs if r.side == "candidate" and r.disturbed)

    @property
    def disturbed_summary(self) -> str:
        """The disturbed runs' reasons; beyond two, the first and a count (each run is marked in the canary line)."""
        if len(self.disturbed) <= 2:
            return "; ".join(self.disturbed)
        total = sum(r.side == "candidate" for r in self.runs)
        what = "pairs" if self.by_pair else "candidate runs"
        return (f"{self.disturbed[0]}; and {len(self.disturbed) - 1} more of the {total} {what}, "
                "marked ! in the canary line")


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

    def count(self, verdict: str) -> int:
        return sum(c.verdict == verdict for c in self.cases)

    @property
    def has_regression(self) -> bool:
        return any(c.verdict == REGRESSION for c in self.cases)

    @property
    def has_inconclusive(self) -> bool:
        return any(c.verdict == INCONCLUSIVE for c in self.cases)

    @property
    def has_failed(self) -> bool:
        return any(c.verdict == FAILED for c in self.cases)

    @property
    def has_missing(self) -> bool:
        return any(c.verdict == MISSING for c in self.cases)

    def _mdes(self) -> list[float]:
        m = [c.metrics["time"].mde for c in self.cases if "time" in c.metrics]
        return [x for x in m if x is not None]

    @property
    def mde_median(self) -> float | None:
        m = self._mdes()
        return float(np.median(m)) if m else None

    @property
    def mde_worst(self) -> float | None:
        m = self._mdes()
        return max(m) if m else None


# --- small statistical helpers -------------------------------------------------------------------


def adjust_pvalues(p: Sequence[float], method: str) -> np.ndarray:
    """Holm step-down (FWER) or Benjamini-Hochberg step-up (FDR) adjusted p-values."""
    p = np.asarray(p, dtype=float)
    k = p.size
    if k == 0 or method == "none":
        return p.copy()
    order = np.argsort(p)
    ranked = p[order]
    if method == "holm":
        adj = np.maximum.accumulate(ranked * (k - np.arange(k)))
    elif method == "bh":
        adj = np.minimum.accumulate((ranked * k / np.arange(1, k + 1))[::-1])[::-1]
    else:
        raise ValueError(f"unknown correction {method!r}")
    out = np.empty(k)
    out[order] = np.minimum(adj, 1.0)
    return out


def robust_cv(x: np.ndarray) -> float:
    """Dispersion that outliers do not dominate: 1.4826 * MAD / median (equals the CV for a normal)."""
    x = np.asarray(x, dtype=float)
    med = float(np.median(x))
    if med <= 0:
        return math.inf
    return float(1.4826 * np.median(np.abs(x - med)) / med)


def _t(q: float, df: float) -> float:
    """Student t quantile (the plain ufunc: ``sps.t.ppf`` costs 100x more per scalar call)."""
    return float(special.ndtri(q) if math.isinf(df) else special.stdtrit(df, q))


def run_interval(runs: Sequence[Sequence[float]], confidence: float = Policy.confidence_level
                 ) -> tuple[float, float | None, float | None]:
    """One case's time on one side, by this model: (exp of the mean log run median, and its two-sided
    ``confidence`` t interval over runs); no interval from a single run."""
    y = np.log([float(np.median(r)) for r in runs])
    center = float(np.exp(y.mean()))
    if y.size < 2:
        return center, None, None
    half = _t(0.5 + confidence / 2, y.size - 1) * float(y.std(ddof=1)) / math.sqrt(y.size)
    return center, float(np.exp(y.mean() - half)), float(np.exp(y.mean() + half))


def mde(se: float, df: float, alpha: float, min_effect: float, power: float) -> float:
    """Smallest relative slowdown flagged with ``power``: significant at one-sided ``alpha`` (already
    corrected) AND a point estimate above ``min_effect``."""
    need = max(_t(1 - alpha, df) * se, math.log1p(min_effect))
    return math.expm1(need + _t(power, df) * se)


# --- environment ----------------------------------------------------------------------------------


def environment_mismatch(baseline: Mapping, candidate: Mapping, fields: Sequence[str]) -> list[str]:
    """Human-readable differences in the fields that matter; a field absent on either side is not judged."""
    out = []
    for key in fields:
        if key in baseline and key in candidate and baseline[key] != candidate[key]:
            out.append(f"{key}: baseline {baseline[key]!r} vs candidate {candidate[key]!r}")
    return out


def environment_changes(baseline: Mapping, candidate: Mapping, fields: Sequence[str]) -> list[str]:
    """Comparable differences, e.g. ``"torch 2.13.1 -> 2.14.1"`` (device type/slug excluded)."""
    out = []
    for key in fields:
        if key in INCOMPARABLE_ENV_FIELDS or key not in baseline or key not in candidate:
            continue
        if baseline[key] != candidate[key]:
            out.append(f"{_ENV_NAMES.get(key, key)} {baseline[key]} -> {candidate[key]}")
    return out


# --- time: runs as the unit ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Noise:
    """The run-level noise of one kind: pooled sd of log run medians (or of pair differences) and its df."""

    sd: float | None
    df: float
    source: str


def _pooled(groups: Sequence[np.ndarray]) -> tuple[float | None, int]:
    ss = sum(float(np.sum((g - g.mean()) ** 2)) for g in groups if g.size >= 2)
    df = sum(g.size - 1 for g in groups if g.size >= 2)
    return (math.sqrt(ss / df), df) if df else (None, 0)


def _kind_noise(groups: Sequence[np.ndarray], environment: Mapping, policy: Policy) -> _Noise:
    sd, df = _pooled(groups)
    if sd is not None:
        return _Noise(sd, df, f"run-to-run sd {sd:.1%} pooled over the kind's cases ({df} df)")
    prior = policy.run_sd_prior(environment)
    if prior is not None:
        return _Noise(prior[0], float(policy.prior_df), f"run-to-run sd {prior[0]:.1%} ({prior[1]}; one run "
                                                        "per side, no recorded noise)")
    return _Noise(None, 0, "one run per side and no run-to-run noise recorded or known for this device type")


def _machine_var(baseline: Side, names: Sequence[str], run_sd: float, environment: Mapping, policy: Policy
                 ) -> tuple[float, float, str]:
    """Machine-to-machine variances (common, case-specific) of a case's log median, and where they came from.

    From a baseline spanning >= 2 machines: per machine the mean log run median of each case, split into the
    machine's mean over the cases (common) and each case's deviation from it (case-specific), pooled over
    the cases measured on every machine, minus the run noise the machine means carry. Else the policy's."""
    case_default = policy.machine_case_sd(environment)
    by: dict[str | None, dict[str, list[float]]] = {}
    for name in names:
        cs = baseline.cases[name]
        y = cs.log_run_medians()
        if len(cs.run_machines) != y.size:
            continue
        for m, v in zip(cs.run_machines, y, strict=True):
            by.setdefault(m, {}).setdefault(name, []).append(float(v))
    shared = [n for n in names if all(n in cases for cases in by.values())]
    if len(by) < 2 or not shared:
        return (policy.machine_sd**2, case_default**2,
                f"policy default {policy.machine_sd:.1%} common, {case_default:.1%} per case (the baseline spans "
                "one machine)")
    means = np.array([[np.mean(cases[n]) for n in shared] for cases in by.values()])  # (machines, cases)
    noise = run_sd**2 * float(np.mean([1.0 / len(cases[n]) for cases in by.values() for n in shared]))
    common = means.mean(axis=1)
    k = means.shape[0] - 1
    common_var = max(float(np.sum((common - common.mean()) ** 2)) / k - noise / len(shared), 0.0)
    case_var = 0.0
    if len(shared) >= 2:
        resid = means - common[:, None]
        resid -= resid.mean(axis=0)
        case_var = max(float(np.sum(resid**2)) / (k * (len(shared) - 1)) - noise, 0.0)
    how = f"estimated from the baseline's {len(by)} machines"
    if len(by) < 3:  # a variance from two machines has one degree of freedom: never below the defaults
        common_var = max(common_var, policy.machine_sd**2)
        case_var = max(case_var, case_default**2)
        how += ", no lower than the policy defaults"
    return common_var, case_var, f"{how}: {math.sqrt(common_var):.1%} common, {math.sqrt(case_var):.1%} per case"


@dataclass
class _TimeEstimate:
    """One case's log change with the noise model it was judged under."""

    d: float  # mean log change (candidate - baseline)
    sd: float | None  # pooled per-run sd (unpaired) or per-pair sd (paired); None: unknown
    df: float
    n_b: int
    n_c: int
    n_cases: int  # cases of the kind: scales the df when estimating the runs needed
    paired: bool = False
    machine_var: float = 0.0  # machine-to-machine variance common to all cases (and the canary's, when net of it)
    machine_case_var: float = 0.0  # machine-to-machine variance of this case unlike the others
    reasons: list[str] = field(default_factory=list)  # shown on the verdict
    # The split model (see _split): d = common + contrast, each with its own per-run sd and df.
    common: float | None = None  # median log change over all cases of the comparison
    common_sd: float = 0.0
    common_df: float = 0.0
    contrast_sd: float = 0.0  # sd of this kind's case-specific run effects
    contrast_df: float = 0.0
    n_all: int = 0  # cases in the split model

    @property
    def contrast_value(self) -> float:
        return self.d - self.common

    @property
    def split(self) -> bool:
        return self.common is not None

    def _k(self, n_b: int, n_c: int) -> float:
        return 1 / n_b if self.paired else 1 / n_b + 1 / n_c

    def se_common(self, n_b: int, n_c: int) -> float:
        # the case-specific machine effects enter the median change over the n_all cases too (pi/2: a median)
        return math.sqrt(self.common_sd**2 * self._k(n_b, n_c) + self.machine_var
                         + self.machine_case_var * math.pi / 2 / max(self.n_all, 1))

    def se_contrast(self, n_b: int, n_c: int) -> float:
        return math.sqrt((self.contrast_sd**2 * self._k(n_b, n_c) + self.machine_case_var) * (1 - 1 / self.n_all))

    def se_for(self, n_b: int, n_c: int) -> float:
        if self.split:
            return math.hypot(self.se_common(n_b, n_c), self.se_contrast(n_b, n_c))
        return math.sqrt(self.sd**2 * self._k(n_b, n_c) + self.machine_var + self.machine_case_var)

    @property
    def se(self) -> float | None:
        return None if self.sd is None else self.se_for(self.n_b, self.n_c)

    @property
    def df_total(self) -> float:
        """Welch-Satterthwaite df of the split model's total variance, else the pooled df."""
        if not self.split:
            return self.df
        a = self.se_common(self.n_b, self.n_c) ** 4 / self.common_df
        b = self.se_contrast(self.n_b, self.n_c) ** 4 / self.contrast_df
        return self.se**4 / (a + b)


def on_new_machine(baseline: Side, candidate: Side) -> bool:
    """Whether every candidate run came from machines none of the baseline's runs came from."""
    b_machines = {m for m in baseline.machines if m is not None}
    c_machines = {m for m in candidate.machines if m is not None}
    return bool(b_machines and c_machines and not (b_machines & c_machines))


def _estimates(baseline: Side, candidate: Side, names: Sequence[str], policy: Policy, paired: bool,
               new_machine: bool) -> dict[str, _TimeEstimate]:
    """Per case: the log change and its noise, pooled per kind (see the module docstring)."""
    kinds: dict[str, list[str]] = {}
    for name in names:
        kinds.setdefault(candidate.cases[name].kind, []).append(name)
    out: dict[str, _TimeEstimate] = {}
    for members in kinds.values():
        yb = {n: baseline.cases[n].log_run_medians() for n in members}
        yc = {n: candidate.cases[n].log_run_medians() for n in members}
        noise = _kind_noise([*yb.values(), *yc.values()], candidate.environment, policy)
        pairable = [n for n in members if paired and yb[n].size == yc[n].size >= 2]
        diffs = {n: yc[n] - yb[n] for n in pairable}
        pair_noise = _kind_noise(list(diffs.values()), {}, policy) if pairable else None
        machine_var = machine_case_var = 0.0
        machine_reason = None
        if new_machine and noise.sd is not None:
            machine_var, machine_case_var, how = _machine_var(baseline, members, noise.sd,
                                                              candidate.environment, policy)
            machine_reason = (f"the candidate ran on a machine none of the baseline's runs came from: "
                              f"machine-to-machine sd ({how}) added to the interval and the MDE")
        for n in members:
            e = _TimeEstimate(float(yc[n].mean() - yb[n].mean()), noise.sd, noise.df, yb[n].size, yc[n].size,
                              len(members), machine_var=machine_var, machine_case_var=machine_case_var)
            if noise.sd is None or "prior" in noise.source:
                e.reasons.append(noise.source)
            if n in diffs and pair_noise.sd is not None:
                e.d, e.sd, e.df, e.paired = float(diffs[n].mean()), pair_noise.sd, pair_noise.df, True
            elif paired:
                e.reasons.append("analysed unpaired: the sides hold different numbers of runs of this case")
            if machine_reason:
                e.reasons.append(machine_reason)
            out[n] = e
    return out


def _split(baseline: Side, candidate: Side, est: Mapping[str, _TimeEstimate]) -> None:
    """Split each case's change into a part common to all cases and a case-specific contrast.

    A process's speed (clocks, neighbours, memory placement) moves every case of the run alike: with 3%
    per run common and 1.5% per case, most of a case's run-to-run variance is shared. Testing each case's
    total change against that variance makes a one-case slowdown hard to see (5 vs 3 runs: +10% caught in
    about 3 of 4 draws), and pooling the shared part across cases as if it were independent overstates the
    df (A/A false alarms above alpha with 3 runs a side). So, per side, the case-centred log run medians
    ``R[r, i]`` are split into the run's mean over cases ``g[r]`` (common: variance ``s_u^2 + s_e^2 / m``,
    ``n - 1`` df per side) and the rest ``R - g`` (case-specific: ``s_e^2``, pooled per kind,
    ``(n - 1)(m - 1)`` df per side). A case's change ``d = D + c`` is tested twice, each at alpha / 2: the
    median change of all cases ``D`` (a uniform slowdown) against the common variance, and the contrast
    ``c = d - D`` (this case moved unlike the others) against the case-specific one, Holm across cases.
    The interval of ``d`` uses both variances (Welch-Satterthwaite df). Needs >= 3 cases measured in
    every run of both sides; otherwise the plain pooled model stands. Paired: the same on the per-pair
    differences, as one sample.
    """
    names = [n for n, e in est.items() if e.sd is not None
             and len(baseline.cases[n].runs) == baseline.n_runs and len(candidate.cases[n].runs) == candidate.n_runs]
    paired = any(est[n].paired for n in names)
    if paired:
        names = [n for n in names if est[n].paired]
    m = len(names)
    if m < 3:
        return
    kinds = {n: candidate.cases[n].kind for n in names}

    def matrix(side: Side) -> np.ndarray:
        return np.stack([side.cases[n].log_run_medians() for n in names], axis=1)  # (runs, cases)

    # Paired: the per-pair differences are the runs of a single sample.
    samples = [matrix(candidate) - matrix(baseline)] if paired else [matrix(baseline), matrix(candidate)]
    ss_g = df_g = 0.0
    ss_e: dict[str, float] = {}
    df_e: dict[str, float] = {}
    for y in samples:
        n_runs = y.shape[0]
        if n_runs < 2:
            continue
        r = y - y.mean(axis=0)
        g = r.mean(axis=1)
        ss_g += float(np.sum(g**2))
        df_g += n_runs - 1
        resid = r - g[:, None]
        for j, n in enumerate(names):
            ss_e[kinds[n]] = ss_e.get(kinds[n], 0.0) + float(np.sum(resid[:, j] ** 2))
            df_e[kinds[n]] = df_e.get(kinds[n], 0.0) + (n_runs - 1) * (m - 1) / m
    if not df_g or min(df_e.values()) <= 0:
        return
    var_e = {k: ss_e[k] / df_e[k] for k in ss_e}
    # var(g) = s_u^2 + mean(s_e^2) / m: the common part of one case's run variance is s_u^2 + s_e^2 / m
    # minus nothing; D's variance is var(g) per run, exactly what the mean change needs (the median: below).
    # The common change is the median of the cases' changes, not their mean: a gross slowdown of a few
    # cases drags the mean, and every unchanged case above the band would then be flagged as part of a
    # uniform slowdown. A shift shared by all cases moves the median as it moves the mean; the case-specific
    # part s_e^2 / m enters the median's variance up to pi/2 times (normal noise).
    mean_var_e = float(np.mean([var_e[kinds[n]] for n in names]))
    common_sd = math.sqrt(ss_g / df_g + (math.pi / 2 - 1) * mean_var_e / m)
    d_all = np.array([est[n].d for n in names])
    for n in names:
        e = est[n]
        e.common, e.common_sd, e.common_df = float(np.median(d_all)), common_sd, df_g
        e.contrast_sd, e.contrast_df, e.n_all = math.sqrt(var_e[kinds[n]]), df_e[kinds[n]] * m / (m - 1), m


def _runs_needed(e: _TimeEstimate, alpha: float, min_effect: float, policy: Policy) -> int | None:
    """Runs per side (the same on both) that bring the MDE to ``policy.target_mde`` and the interval's
    half-width to half the band (so an unchanged case reads "no change"); None beyond 100."""

    def enough(n: int) -> bool:
        runs_df = (n - 1) * (1 if e.paired else 2)
        df = e.df_total * runs_df / max((e.n_b - 1) + (0 if e.paired else e.n_c - 1), 1) if e.n_b + e.n_c > 2 \
            else e.n_cases * runs_df
        half = _t(0.5 + policy.confidence_level / 2, max(df, 1)) * e.se_for(n, n)
        return (_mde_of(e, alpha, min_effect, policy, n, n) <= policy.target_mde
                and half <= math.log1p(min_effect) / 2)

    lo, hi = 1, 100  # both fall with n: bisect for the first n that reaches them
    if not enough(hi):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def _mde_of(e: _TimeEstimate, alpha: float, min_effect: float, policy: Policy, n_b: int, n_c: int) -> float:
    """The MDE of a slowdown of this case alone, with ``n_b`` and ``n_c`` runs (df scaled accordingly)."""
    runs_df = (n_b - 1) + (0 if e.paired else n_c - 1)
    now_df = (e.n_b - 1) + (0 if e.paired else e.n_c - 1)
    scale = 1.0 if (n_b, n_c) == (e.n_b, e.n_c) else runs_df / now_df if now_df else None
    if not e.split:  # with a prior (no runs_df now), n runs would give the kind's cases' pooled df
        df = e.df * scale if scale is not None else e.n_cases * runs_df
        return mde(e.se_for(n_b, n_c), max(df, 1), alpha, min_effect, policy.power)
    # Either test may flag it: the point estimate must clear the band, the contrast its test at alpha / 2.
    se_c = e.se_contrast(n_b, n_c) / (1 - 1 / e.n_all)  # a change of one case moves c by (1 - 1/m) of it
    by_contrast = (_t(1 - alpha / 2, e.contrast_df * scale) + _t(policy.power, e.contrast_df * scale)) * se_c
    by_estimate = math.log1p(min_effect) + _t(policy.power, max(e.df_total * scale, 1)) * e.se_for(n_b, n_c)
    return math.expm1(max(by_contrast, by_estimate))


def _time_result(
    name: str, b: CaseSamples, c: CaseSamples, e: _TimeEstimate, p_reg: float | None, p_imp: float | None,
    alpha_one: float, policy: Policy, blockers: list[str], disturbed: Sequence[str],
) -> MetricResult:
    """The time verdict of one case; ``alpha_one`` is the per-case alpha the MDE assumes (alpha / cases)."""
    min_effect = policy.min_effect_for(name)
    base = dict(metric="time", ratio=math.exp(e.d), threshold=min_effect, n_baseline=e.n_b,
                n_candidate=e.n_c, baseline_median=float(np.median(b.samples)),
                candidate_median=float(np.median(c.samples)))
    reasons = list(blockers) + e.reasons
    if e.se is None:
        reasons.append("too few samples: with one run per side the smallest attainable p is 1 (no run-to-run "
                       "noise is known for this device type); run >= 2 processes on a side, after which the "
                       "report gives the MDE and the runs needed for one of "
                       f"{policy.target_mde:.0%}")
        return MetricResult(verdict=INCONCLUSIVE, reasons=tuple(reasons), **base)

    se, df = e.se, e.df_total
    half = _t(0.5 + policy.confidence_level / 2, df) * se
    lo, hi = math.exp(e.d - half), math.exp(e.d + half)
    m_e = _mde_of(e, alpha_one, min_effect, policy, e.n_b, e.n_c)
    base.update(ci=(lo, hi), p_regression=p_reg, p_improvement=p_imp, mde=m_e, se=se, df=df)
    if blockers:
        return MetricResult(verdict=INCONCLUSIVE, reasons=tuple(reasons), **base)

    band = math.log1p(min_effect)
    if p_reg <= policy.alpha and e.d > band:
        verdict = REGRESSION
    elif p_imp <= policy.alpha and e.d < -band:
        verdict = IMPROVEMENT
    elif lo >= 1 / (1 + min_effect) and hi <= 1 + min_effect:
        verdict = NO_CHANGE
    else:
        verdict = INCONCLUSIVE
        needed = _runs_needed(e, alpha_one, min_effect, policy)
        base["runs_needed"] = needed
        more = (f"about {needed} runs per side would settle it (MDE {policy.target_mde:.0%}, interval ±"
                f"{min_effect / 2:.1%})" if needed
                else "more runs cannot settle it across machines (the machine-to-machine variance stays): "
                + ACROSS_MACHINES_FIX if e.machine_var or e.machine_case_var
                else "over 100 runs per side would be needed to settle it")
        reasons.append(
            f"interval [{lo - 1:+.1%}, {hi - 1:+.1%}] reaches beyond the ±{min_effect:.1%} band and no change "
            f"beyond it is significant after {policy.correction} (MDE {m_e:.1%}); {more}"
        )
    if disturbed:
        if verdict == INCONCLUSIVE:
            reasons.append("; ".join(disturbed))
        else:
            reasons.append(f"{'; '.join(disturbed)} (would have been {verdict})")
            verdict = INCONCLUSIVE
    return MetricResult(verdict=verdict, reasons=tuple(reasons), **base)


@dataclass(frozen=True)
class CanaryShift:
    """The canary's mean log change candidate vs baseline, with its standard error and df."""

    value: float
    se: float
    df: float


def _canary_log_medians(side: Side) -> np.ndarray:
    """The log of each run's canary median (runs without canary samples left out)."""
    return np.log(np.array([np.median(r) for r in side.canary if len(r)], dtype=float))


def canary_shift(baseline: Side, candidate: Side, policy: Policy, paired: bool) -> CanaryShift | None:
    """The canary's move between the sides, from its per-run medians (None without a canary on both).
    Paired: the mean of the per-pair differences. Otherwise the difference of the means, with the run-to-run
    sd pooled over both sides (``Policy.canary_run_sd`` when neither side has two runs)."""
    b, c = _canary_log_medians(baseline), _canary_log_medians(candidate)
    if not b.size or not c.size:
        return None
    if paired and b.size == c.size >= 2:
        diff = c - b
        return CanaryShift(float(diff.mean()), float(diff.std(ddof=1)) / math.sqrt(diff.size), diff.size - 1.0)
    df = (b.size - 1) + (c.size - 1)
    ss = float(np.sum((b - b.mean()) ** 2) + np.sum((c - c.mean()) ** 2))
    sd, df = (math.sqrt(ss / df), float(df)) if df else (policy.canary_run_sd, math.inf)
    return CanaryShift(float(c.mean() - b.mean()), sd * math.sqrt(1 / b.size + 1 / c.size), df)


def _pvalues(tested: Sequence[str], est: Mapping[str, _TimeEstimate], policy: Policy,
             canary: CanaryShift | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Adjusted one-sided p-values (regression, improvement) per case, on the scale of ``alpha``.

    Plain model: the t test of each case's change, adjusted across cases. Split model: the contrast's test
    adjusted across cases and the common change's test, each at alpha / 2, so ``2 * min(both)``. With a
    ``canary`` (same environment on both sides), the common change is tested net of the canary's move.
    """
    if not tested:
        return {}, {}
    stat = np.array([est[n].contrast_value / est[n].se_contrast(est[n].n_b, est[n].n_c) if est[n].split
                     else est[n].d / est[n].se for n in tested])
    df = np.array([est[n].contrast_df if est[n].split else est[n].df for n in tested])
    reg = adjust_pvalues(sps.t.sf(stat, df), policy.correction)
    imp = adjust_pvalues(sps.t.cdf(stat, df), policy.correction)
    split = [est[n].split for n in tested]
    if any(split):
        e = est[tested[split.index(True)]]
        value, se, df = e.common, e.se_common(e.n_b, e.n_c), e.common_df
        if canary is not None:  # a machine that moved every case alike moved the canary too
            a, b = se**2, canary.se**2
            value, se = value - canary.value, math.sqrt(a + b)
            df = (a + b) ** 2 / (a**2 / df + (b**2 / canary.df if math.isfinite(canary.df) else 0.0))
        z = value / se
        reg = np.minimum(1.0, 2 * np.minimum(reg, sps.t.sf(z, df)))
        imp = np.minimum(1.0, 2 * np.minimum(imp, sps.t.cdf(z, df)))
    return dict(zip(tested, reg.tolist(), strict=True)), dict(zip(tested, imp.tolist(), strict=True))


# --- canary ------------------------------------------------------------------------------------------


def _median_se(r: np.ndarray) -> float:
    """Standard error of the log of a run's canary median, from its spread within the run."""
    return 1.2533 * robust_cv(r) / math.sqrt(r.size)  # the median's efficiency under normal noise


def judge_canary(baseline: Side, candidate: Side, policy: Policy, env_changed: bool,
                 paired: bool = False) -> CanaryResult | None:
    """Per-run canary medians and CVs; which candidate runs are disturbed (see the module docstring).

    Unpaired, a candidate run is judged against the baseline's runs. Paired (A/B), against its partner:
    drift that moved both members of a pair cancels in the paired analysis, so only a canary that moved
    between the two members (beyond ``canary_z`` standard errors of the two medians, and ``canary_min_shift``)
    or spread within either of them disturbs the pair.
    """
    b_runs = [np.asarray(r, dtype=float) for r in baseline.canary if len(r)]
    c_runs = [np.asarray(r, dtype=float) for r in candidate.canary if len(r)]
    if not c_runs:
        return None
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
    # by the machine (taken out of every change in compare), so a run is held against the other candidate runs.
    ref, against = (b_meds.mean(), "the baseline's") if b_meds.size and not env_changed else (None, "")
    if not by_pair and on_new_machine(baseline, candidate):
        c_meds = np.log([np.median(r) for r in c_runs])
        ref = float(np.median(c_meds)) if c_meds.size >= 3 else None
        against = "the candidate runs' median (a machine none of the baseline's runs came from)"
    disturbed = []
    for i, (r, cv) in enumerate(zip(c_runs, c_cvs, strict=True)):
        med = float(np.median(r))
        why = None
        if by_pair:
            partner = b_runs[i]
            shift = math.log(med) - b_meds[i]
            limit = max(math.log1p(policy.canary_min_shift),
                        policy.canary_z * math.hypot(_median_se(r), _median_se(partner)))
            if max(cv, b_cvs[i]) > cv_limit:
                why = (f"machine disturbed: canary spread {max(cv, b_cvs[i]):.1%} within pair {i + 1} "
                       f"(usual < {cv_limit:.1%})")
            elif abs(shift) > limit:
                why = (f"machine disturbed: canary {math.expm1(shift):+.1%} between the runs of pair {i + 1} "
                       f"(their own noise allows ±{math.expm1(limit):.1%})")
        elif cv > cv_limit:
            why = f"machine disturbed: canary spread {cv:.1%} within candidate run {i + 1} (usual < {cv_limit:.1%})"
        elif ref is not None and abs(math.log(med) - ref) > shift_limit:
            why = (f"machine disturbed: canary {math.expm1(math.log(med) - ref):+.1%} in candidate run {i + 1} "
                   f"against {against} (the baseline's run-to-run noise allows ±{math.expm1(shift_limit):.1%})")
        runs.append(CanaryRun("candidate", i, med, cv, why))
        if why:
            disturbed.append(why)
    ratio = None
    if b_meds.size:
        ratio = math.exp(float(np.mean(np.log([cr.median for cr in runs if cr.side == "candidate"])) - b_meds.mean()))
    env_shift = f"plain kernels moved {ratio - 1:+.1%} with the environment change" if env_changed and ratio else None
    return CanaryResult(tuple(runs), ratio, run_sd if b_meds.size >= 2 else None, tuple(disturbed), env_shift,
                        by_pair=by_pair)


def _keep_runs(side: Side, keep: Sequence[int]) -> Side:
    """``side`` with only the runs at ``keep``: every per-run list parallel to the side's runs is cut."""

    def pick(values):
        return [values[i] for i in keep] if values is not None and len(values) == side.n_runs else values

    cases = {n: dataclasses.replace(cs, runs=pick(cs.runs), run_machines=pick(cs.run_machines),
                                    compile_time_s=pick(cs.compile_time_s), compile_cache=pick(cs.compile_cache),
                                    peak_memory_bytes=pick(cs.peak_memory_bytes))
             for n, cs in side.cases.items()}
    return dataclasses.replace(side, cases=cases, n_runs=len(keep), machines=pick(side.machines),
                               canary=pick(side.canary), run_order=pick(side.run_order))


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
    blockers: list[str], note: str | None = None,
) -> MetricResult | None:
    """Compile time / peak memory: one value per run, judged on the range of pairwise ratios."""
    if not b_vals or not c_vals:
        return None  # not recorded on one side (eager case, CPU memory): nothing to judge
    b = np.maximum(np.asarray(b_vals, dtype=float), floor)
    c = np.maximum(np.asarray(c_vals, dtype=float), floor)
    b_med, c_med = float(np.median(b)), float(np.median(c))
    lo, hi = float(c.min() / b.max()), float(c.max() / b.min())
    up, down = 1.0 + threshold, 1.0 / (1.0 + threshold)  # symmetric on the log scale
    reasons = list(blockers) + ([note] if note else [])
    if blockers:
        verdict = INCONCLUSIVE
    elif lo > up:
        verdict = REGRESSION
    elif hi < down:
        verdict = IMPROVEMENT
    elif lo >= down and hi <= up:
        verdict = NO_CHANGE
    else:
        verdict = INCONCLUSIVE
        reasons.append(
            f"run values overlap the ±{threshold:.0%} threshold (ratios {lo:.3f}..{hi:.3f}, "
            f"{b.size} baseline vs {c.size} candidate runs)"
        )
    if b.size == 1 and c.size == 1 and verdict != INCONCLUSIVE:
        reasons.append("one run per side: a single ratio against the threshold, no noise estimate")
    return MetricResult(
        metric=metric, verdict=verdict, ratio=c_med / b_med, ci=(lo, hi), threshold=threshold,
        n_baseline=b.size, n_candidate=c.size, baseline_median=b_med, candidate_median=c_med,
        reasons=tuple(reasons),
    )


def _by_cache(cs: CaseSamples) -> dict[str | None, list[float]]:
    states = list(cs.compile_cache) + [None] * (len(cs.compile_time_s) - len(cs.compile_cache))
    out: dict[str | None, list[float]] = {}
    for value, state in zip(cs.compile_time_s, states, strict=False):
        out.setdefault(state, []).append(value)
    return out


def _compile_result(b: CaseSamples, c: CaseSamples, policy: Policy, blockers: list[str]) -> MetricResult | None:
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
            reasons=(f"not compared: cache state differs (baseline {describe(bb)}, candidate {describe(cc)})",),
        )
    state = common[0]
    note = None if state is None else f"{state} cache on both sides"
    return _few_values_result("compile_time", bb[state], cc[state], policy.compile_threshold,
                              policy.compile_floor_s, blockers, note)


def _overall(metrics: Mapping[str, MetricResult]) -> str:
    verdicts = {m.verdict for m in metrics.values()}
    for v in (REGRESSION, INCONCLUSIVE, IMPROVEMENT):
        if v in verdicts:
            return v
    return NO_CHANGE


# --- the comparator --------------------------------------------------------------------------------


def compare(baseline: Side, candidate: Side, policy: Policy | None = None, *, paired: bool = False) -> Comparison:
    """Judge every case of ``candidate`` against ``baseline``. Pure: no I/O.

    ``paired=True``: the two sides' runs alternated (A, B, A, B) and run ``k`` of one side is paired with run
    ``k`` of the other; both sides must hold the same number of runs.
    """
    policy = policy or Policy()
    if paired and baseline.n_runs != candidate.n_runs:
        raise ValueError(f"paired comparison needs as many runs on both sides, got {baseline.n_runs} baseline "
                         f"and {candidate.n_runs} candidate runs")
    if paired and baseline.run_order and candidate.run_order and any(
            abs(b - c) != 1 for b, c in zip(baseline.run_order, candidate.run_order, strict=False)):
        raise ValueError(f"paired comparison needs runs that alternated A, B, A, B: run order baseline "
                         f"{baseline.run_order}, candidate {candidate.run_order}")
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
            verdicts[name] = CaseVerdict(name, NEW, {}, ("not in the baseline",), labels)
        elif b.definition_hash and c.definition_hash and b.definition_hash != c.definition_hash:
            verdicts[name] = CaseVerdict(
                name, NEW, {},
                (f"changed definition: definition_hash {b.definition_hash} (baseline) != "
                 f"{c.definition_hash} (candidate); not compared, record a new baseline",), labels,
            )
        elif not c.runs or not b.runs:
            verdicts[name] = CaseVerdict(name, INCONCLUSIVE, {}, ("no samples on one side",), labels)
        else:
            judged.append(name)
    for name, reason in candidate.failed.items():
        verdicts[name] = CaseVerdict(name, FAILED, {}, (f"failed in the candidate run: {reason}",), labels)
    not_selected = []
    for name in baseline.cases:
        if name in candidate.cases or name in candidate.failed:
            continue
        if name in candidate.skipped:
            verdicts[name] = CaseVerdict(name, SKIPPED, {}, (f"skipped: {candidate.skipped[name]}",), labels)
        elif candidate.selected is None or name in candidate.selected:
            verdicts[name] = CaseVerdict(
                name, MISSING, {}, ("selected in the candidate run but neither measured, skipped nor failed",),
                labels)
        else:
            not_selected.append(name)

    baseline, candidate, canary = _leave_out_disturbed(baseline, candidate, canary, judged, paired)
    disturbed = (canary.disturbed_summary,) if canary and canary.disturbed and not canary.left_out else ()
    machines_differ = on_new_machine(baseline, candidate)
    est = _estimates(baseline, candidate, judged, policy, paired, machines_differ)
    _split(baseline, candidate, est)
    narrowing = []
    if paired:  # the same data analysed unpaired, for the narrowing figure
        unpaired = _estimates(baseline, candidate, judged, policy, False, machines_differ)
        _split(baseline, candidate, unpaired)
        q = 0.5 + policy.confidence_level / 2
        narrowing = [_t(q, est[n].df_total) * est[n].se / (_t(q, unpaired[n].df_total) * unpaired[n].se)
                     for n in judged if est[n].paired and unpaired[n].se]
    control = None if changes else canary_shift(baseline, candidate, policy, paired)
    # On a machine none of the baseline's runs came from, the machine's speed is in every case's change and
    # the canary measures it (code changes cannot move the canary): every change is taken net of the canary's
    # move, its standard error joining the common variance.
    new_machine = not paired and machines_differ
    net_of_canary = control is not None and new_machine
    if net_of_canary:
        for e in est.values():
            e.d -= control.value
            if e.split:
                e.common -= control.value
            e.machine_var += control.se**2
    tested = [n for n in judged if est[n].se is not None]
    adj_reg, adj_imp = _pvalues(tested, est, policy, None if net_of_canary else control)
    alpha_one = policy.alpha / max(len(adj_reg), 1) if policy.correction != "none" else policy.alpha

    device_type = candidate.environment.get("device_type")
    judge_memory = device_type is None or device_type in policy.memory_device_types
    for name in judged:
        b, c = baseline.cases[name], candidate.cases[name]
        blockers = [f"environment mismatch: {m}" for m in mismatch]
        if new_machine and not net_of_canary:
            blockers.append("the candidate ran on a machine none of the baseline's runs came from, and the canary "
                            f"cannot take the machine's speed out ({'the environment changed' if changes else 'no canary on both sides'}): "
                            + ACROSS_MACHINES_FIX)
        if b.attention_used and c.attention_used and b.attention_used != c.attention_used:
            blockers.append(f"attention backend used differs: {b.attention_used} vs {c.attention_used}")
        if b.unet_kernels and c.unet_kernels and b.unet_kernels != c.unet_kernels:
            ran = [", ".join(sorted(side.unet_kernels)) for side in (b, c)]
            blockers.append(f"the attention kernel that ran differs: {ran[0]} vs {ran[1]} (the same backend "
                            "dispatched to another kernel)")
        e = est[name]
        metrics = {"time": _time_result(name, b, c, e, adj_reg.get(name), adj_imp.get(name), alpha_one, policy,
                                        blockers, disturbed)}
        compile_res = _compile_result(b, c, policy, list(blockers))
        if compile_res is not None:
            metrics["compile_time"] = compile_res
        if judge_memory:
            mem = _few_values_result("peak_memory", b.peak_memory_bytes, c.peak_memory_bytes,
                                     policy.memory_threshold, float(policy.memory_floor_bytes), list(blockers))
            if mem is not None:
                metrics["peak_memory"] = mem
        if c.correct is False:
            verdicts[name] = CaseVerdict(name, FAILED, metrics, ("candidate output is WRONG (correct=False)",),
                                         labels)
        else:
            verdicts[name] = CaseVerdict(name, _overall(metrics), metrics, (), labels)

    notes = []
    if not judge_memory:
        notes.append(f"peak memory is not judged on {device_type} (policy: {', '.join(policy.memory_device_types)})")
    if canary and canary.left_out:
        what = "pair" if paired else "candidate run"
        shown = ", ".join(str(i + 1) for i in canary.left_out)
        notes.append(f"{what}{'s' if len(canary.left_out) > 1 else ''} {shown} left out of the time verdicts "
                     f"(machine disturbed, see the canary): judged on the other {candidate.n_runs}")
    if canary and canary.env_shift:
        notes.append(canary.env_shift + " (reported, not used to cancel the change)")
    common = next((est[n].common for n in tested if est[n].split), None)
    if net_of_canary:
        notes.append(f"the candidate ran on a machine none of the baseline's runs came from: every time change is "
                     f"net of the canary's move ({math.expm1(control.value):+.1%}, se {control.se:.1%}; the medians "
                     "shown are as measured), and the machine-to-machine variance is in each interval and MDE")
    elif control is not None and common is not None:
        notes.append(f"the change common to all cases ({math.expm1(common):+.1%}) is tested net of the canary's "
                     f"move ({math.expm1(control.value):+.1%}, se {control.se:.1%}): a machine that moved every "
                     "case alike is not a change of the code")
    order = [*candidate.cases, *candidate.failed, *baseline.cases]
    return Comparison(
        cases=tuple(verdicts[n] for n in dict.fromkeys(order) if n in verdicts),
        policy=policy,
        env_mismatch=mismatch,
        env_changes=changes,
        notes=tuple(notes),
        baseline_label=baseline.label,
        candidate_label=candidate.label,
        not_selected=tuple(not_selected),
        new_machine=new_machine,
        canary=canary,
        paired=paired,
        pairing_narrowing=1 - float(np.median(narrowing)) if narrowing else None,
    )
