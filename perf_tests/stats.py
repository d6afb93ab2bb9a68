"""The regression comparator: (baseline samples, candidate samples, policy) -> verdicts.

A pure function, :func:`compare`, with no files, printing or exit codes (``compare.py`` and ``report.py``
wrap it). Per case it judges three metrics:

``time``
    the raw per-round timings. A one-sided Mann-Whitney U test per direction (scipy), p-values adjusted
    across all cases of the run (Holm by default, Benjamini-Hochberg on request), and an effect estimate,
    the Hodges-Lehmann shift of log times reported as a ratio ``candidate / baseline``, with a
    percentile-bootstrap confidence interval (``scipy.stats.bootstrap``). A *regression* needs both: the
    adjusted p-value at most ``alpha`` AND the interval's lower bound above ``1 + threshold``. The threshold
    is ``min_effect`` (overridable per case or group), widened where larger to the run-to-run noise recorded
    in merged runs: rounds of one process share its state, which Mann-Whitney cannot see, so a difference
    within ``z * sd_run * sqrt(1/R_base + 1/R_cand)`` (z at alpha / cases) is not called a regression.
    "No change" is claimed only when the whole interval lies inside the threshold band; an interval that
    straddles the threshold is *inconclusive*, so a missed regression never reads as a pass.
``compile_time`` / ``peak_memory``
    one value per run, so only a few values per side. The rule is deliberately simple and honest: every
    pairwise ratio candidate/baseline above ``1 + threshold`` is a regression, every one below
    ``1 / (1 + threshold)`` an improvement, all inside the band no change, anything else inconclusive.

A noisy side (robust dispersion over ``max_dispersion``) widens the threshold to that dispersion and rules
out "no change": a 2x slowdown on a busy machine is still a regression, anything less is inconclusive. Too
few samples to ever reach significance or an environment mismatch (fields chosen by the policy) make a
metric *inconclusive*, always with the reason.
Cases present on one side only are *new* or *missing*; a case whose ``definition_hash`` changed is *new*
with that reason, never compared with a stale definition.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import stats as sps

REGRESSION = "regression"
IMPROVEMENT = "improvement"
NO_CHANGE = "no-change"
INCONCLUSIVE = "inconclusive"
NEW = "new"
MISSING = "missing"
VERDICTS = (REGRESSION, IMPROVEMENT, NO_CHANGE, INCONCLUSIVE, NEW, MISSING)

METRICS = ("time", "compile_time", "peak_memory")

# Timed rounds per run that the gate's figures assume (tests/test_stats.py): at 20 rounds per side a 10%
# slowdown is flagged with >= 95% probability under 3% timing noise. The suite's default rounds should match.
RECOMMENDED_ROUNDS = 20

# Environment fields whose difference makes timings incomparable (policy default). Versions of the
# Python-side helpers (open_clip, python) are recorded in baselines but are not judged by default.
DEFAULT_ENV_FIELDS = (
    "device_slug",
    "env",
    "gpu_count",
    "torch_version",
    "cuda_version",
    "cudnn_version",
    "driver_version",
)


@dataclass(frozen=True)
class Policy:
    """How verdicts are reached. Defaults are the gate's documented defaults (see the README)."""

    alpha: float = 0.05  # family-wise error rate across the cases of one run (Holm) / FDR (BH)
    min_effect: float = 0.05  # smallest relative slowdown that counts as a regression
    min_effect_overrides: tuple[tuple[str, float], ...] = ()  # (fnmatch pattern on the case name, value)
    correction: str = "holm"  # "holm" | "bh" | "none"
    confidence_level: float = 0.90  # two-sided CI; its lower bound is a one-sided 95% bound
    n_resamples: int = 1000
    min_samples: int = 5  # per side; fewer is "too few samples"
    max_dispersion: float = 0.10  # robust CV (1.4826 MAD / median) above which a side is "noisy" and the
    # threshold is widened to that CV
    # The threshold is at least noise_z * (run-to-run sd of the difference of the two sides). None: the
    # one-sided normal quantile at alpha / (number of cases), so run-level drift alone rarely alarms a run.
    noise_z: float | None = None
    compile_threshold: float = 0.25
    compile_floor_s: float = 0.5  # compile times below this are treated as equal to it
    memory_threshold: float = 0.05
    memory_floor_bytes: int = 1 << 20  # memory values below this (incl. CPU RSS deltas <= 0) count as it
    # Peak memory is judged only on these device types: CUDA's allocator statistics repeat run to run, while
    # a CPU peak-RSS delta depends on what the process allocated before the case (observed: 0.1 to 50 MB for
    # one case across runs), so it is shown but never gates.
    memory_device_types: tuple[str, ...] = ("cuda",)
    env_fields: tuple[str, ...] = DEFAULT_ENV_FIELDS
    seed: int = 0  # bootstrap seed (combined with the case name), so verdicts are reproducible

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.min_effect < 0:
            raise ValueError(f"min_effect must be >= 0, got {self.min_effect}")
        if self.correction not in ("holm", "bh", "none"):
            raise ValueError(f"correction must be holm, bh or none, got {self.correction!r}")
        if not 0 < self.confidence_level < 1:
            raise ValueError(f"confidence_level must be in (0, 1), got {self.confidence_level}")

    def min_effect_for(self, name: str) -> float:
        """The case's own minimum effect: the last matching override wins, else ``min_effect``."""
        value = self.min_effect
        for pattern, override in self.min_effect_overrides:
            if fnmatch.fnmatchcase(name, pattern):
                value = override
        return value


@dataclass
class CaseSamples:
    """One case on one side: raw timings per run (seconds) and the once-per-run metrics."""

    name: str
    runs: list[list[float]]
    definition_hash: str | None = None
    compile_time_s: list[float] = field(default_factory=list)  # one per run that recorded it
    peak_memory_bytes: list[float] = field(default_factory=list)
    attention_used: str | None = None
    correct: bool | None = None  # False if any run reported a wrong output
    case: dict = field(default_factory=dict)  # extra_info["case"]: kind, profile, attention, ...
    run_machines: list[str | None] = field(default_factory=list)  # machine_id per run
    compile_cache: list[str | None] = field(default_factory=list)  # parallel to compile_time_s

    @property
    def samples(self) -> np.ndarray:
        return np.concatenate([np.asarray(r, dtype=float) for r in self.runs]) if self.runs else np.empty(0)


@dataclass
class Side:
    """All cases of one side (a baseline, or a candidate made of one or more runs)."""

    label: str
    environment: dict
    cases: dict[str, CaseSamples]
    n_runs: int = 1
    machines: list[str | None] = field(default_factory=list)  # machine_id per run
    canary: list[list[float]] = field(default_factory=list)  # per-run canary per-call samples
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason
    failed: dict[str, str] = field(default_factory=dict)  # name -> reason
    selected: set[str] | None = None  # None: unknown (e.g. a baseline)
    run_order: list[int] | None = None


@dataclass(frozen=True)
class MetricResult:
    metric: str
    verdict: str
    ratio: float | None = None  # candidate / baseline: Hodges-Lehmann (time), medians (others)
    ci: tuple[float, float] | None = None  # bootstrap CI of the ratio (time) or range of run ratios
    p_regression: float | None = None  # adjusted across cases (time only)
    p_improvement: float | None = None
    threshold: float | None = None  # effective relative threshold after widening
    n_baseline: int = 0
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


@dataclass(frozen=True)
class Comparison:
    cases: tuple[CaseVerdict, ...]
    policy: Policy
    env_mismatch: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    baseline_label: str = "baseline"
    candidate_label: str = "candidate"

    def count(self, verdict: str) -> int:
        return sum(c.verdict == verdict for c in self.cases)

    @property
    def has_regression(self) -> bool:
        return any(c.verdict == REGRESSION for c in self.cases)

    @property
    def has_inconclusive(self) -> bool:
        return any(c.verdict == INCONCLUSIVE for c in self.cases)


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
    med = float(np.median(x))
    if med <= 0:
        return math.inf
    return float(1.4826 * np.median(np.abs(x - med)) / med)


@lru_cache(maxsize=256)
def min_attainable_p(n_baseline: int, n_candidate: int) -> float:
    """The smallest one-sided Mann-Whitney p-value possible with these sample sizes (complete separation)."""
    lower = np.arange(n_baseline, dtype=float)
    upper = np.arange(n_candidate, dtype=float) + n_baseline
    return float(sps.mannwhitneyu(upper, lower, alternative="greater").pvalue)


def run_noise(runs: Sequence[Sequence[float]]) -> float | None:
    """Run-to-run sd of log run medians (None with fewer than two runs): the between-process variation."""
    meds = [float(np.median(r)) for r in runs if len(r)]
    if len(meds) < 2 or min(meds) <= 0:
        return None
    return float(np.std(np.log(meds), ddof=1))


def hodges_lehmann_log(b: np.ndarray, c: np.ndarray, axis: int = -1) -> np.ndarray:
    """Hodges-Lehmann shift of log times: the median of all pairwise ``log c_i - log b_j``.

    The estimator that goes with the Mann-Whitney test; robust to outliers and, on timing-like noise, about
    1.5x as efficient as a ratio of medians. Vectorized over leading axes (bootstrap resamples).
    """
    b = np.moveaxis(np.log(b), axis, -1)
    c = np.moveaxis(np.log(c), axis, -1)
    diffs = (c[..., :, None] - b[..., None, :]).reshape(c.shape[:-1] + (-1,))  # (..., n_c * n_b)
    # The median by an in-place partition of this temporary: np.median would copy it once more.
    k = diffs.shape[-1]
    mid = [(k - 1) // 2, k // 2]
    diffs.partition(mid, axis=-1)
    return 0.5 * (diffs[..., mid[0]] + diffs[..., mid[1]])


_BOOTSTRAP_SEED_ARG = "rng" if "rng" in inspect.signature(sps.bootstrap).parameters else "random_state"


def ratio_ci(b: np.ndarray, c: np.ndarray, policy: Policy, seed: int) -> tuple[float, float]:
    """Percentile-bootstrap CI of the Hodges-Lehmann ratio, resampling each side independently."""
    res = sps.bootstrap(
        (b, c),
        hodges_lehmann_log,
        n_resamples=policy.n_resamples,
        batch=max(1, 4_000_000 // (b.size * c.size)),  # bound memory: n_b * n_c pairwise diffs per resample
        vectorized=True,
        paired=False,
        confidence_level=policy.confidence_level,
        method="percentile",
        **{_BOOTSTRAP_SEED_ARG: np.random.default_rng(seed)},
    )
    return math.exp(res.confidence_interval.low), math.exp(res.confidence_interval.high)


def _case_seed(policy: Policy, name: str) -> int:
    return policy.seed * 1_000_003 + zlib.crc32(name.encode())


# --- environment ----------------------------------------------------------------------------------


def environment_mismatch(baseline: Mapping, candidate: Mapping, fields: Sequence[str]) -> list[str]:
    """Human-readable differences in the fields that matter; a field absent on either side is not judged."""
    out = []
    for key in fields:
        if key in baseline and key in candidate and baseline[key] != candidate[key]:
            out.append(f"{key}: baseline {baseline[key]!r} vs candidate {candidate[key]!r}")
    return out


# --- per-metric judgements -----------------------------------------------------------------------


def _band(threshold: float) -> tuple[float, float]:
    # Symmetric on the log scale: +5% slower and 1/1.05 faster are the same size of change.
    return 1.0 + threshold, 1.0 / (1.0 + threshold)


def _time_result(
    name: str, b: CaseSamples, c: CaseSamples, p_reg: float | None, p_imp: float | None, policy: Policy,
    blockers: list[str], noise_sd: float | None, noise_z: float,
) -> MetricResult:
    bs, cs = b.samples, c.samples
    base = dict(metric="time", n_baseline=bs.size, n_candidate=cs.size)
    if bs.size == 0 or cs.size == 0:
        return MetricResult(verdict=INCONCLUSIVE, reasons=("no samples",), **base)
    b_med, c_med = float(np.median(bs)), float(np.median(cs))
    ratio = math.exp(float(hodges_lehmann_log(bs, cs)))
    base.update(ratio=ratio, baseline_median=b_med, candidate_median=c_med)
    reasons = list(blockers)

    # Threshold: the case's minimum effect, widened to the run-to-run noise of the two sides.
    threshold = policy.min_effect_for(name)
    if noise_sd is not None:
        widened = math.expm1(noise_z * noise_sd * math.sqrt(1.0 / len(b.runs) + 1.0 / len(c.runs)))
        if widened > threshold:
            reasons.append(f"threshold widened from {threshold:.1%} to {widened:.1%} by run-to-run noise")
            threshold = widened
    base["threshold"] = threshold

    if p_reg is None:  # too few samples: no test was run
        min_p = min_attainable_p(bs.size, cs.size)
        reasons.append(
            f"too few samples ({bs.size} baseline, {cs.size} candidate; need >= {policy.min_samples} each "
            f"and a reachable p-value, smallest possible {min_p:.3g} vs alpha {policy.alpha})"
        )
        return MetricResult(verdict=INCONCLUSIVE, reasons=tuple(reasons), **base)

    lo, hi = ratio_ci(bs, cs, policy, _case_seed(policy, name))
    base.update(ci=(lo, hi), p_regression=p_reg, p_improvement=p_imp)
    if blockers:
        return MetricResult(verdict=INCONCLUSIVE, reasons=tuple(reasons), **base)
    # A noisy side (a shared machine's load, clock changes) can shift a median by about its own spread, so
    # the threshold is widened to that spread: a change far beyond it is still called, a smaller one is not,
    # and "no change" is never claimed from noisy data.
    noisy = [(label, robust_cv(x)) for label, x in (("baseline", bs), ("candidate", cs))]
    noisy = [(label, cv) for label, cv in noisy if cv > policy.max_dispersion]
    if noisy:
        label, cv = max(noisy, key=lambda item: item[1])
        reasons.append(
            f"noisy {label}: dispersion {cv:.1%} > limit {policy.max_dispersion:.0%}"
            + (f", threshold widened from {threshold:.1%} to {cv:.1%}" if cv > threshold else "")
        )
        threshold = max(threshold, cv)
        base["threshold"] = threshold

    up, down = _band(threshold)
    if lo > up and p_reg <= policy.alpha:
        verdict = REGRESSION
    elif hi < down and p_imp <= policy.alpha:
        verdict = IMPROVEMENT
    elif noisy:
        verdict = INCONCLUSIVE
        reasons.append("too noisy to claim no change; rerun on a quieter machine or with more rounds")
    elif lo >= down and hi <= up:
        verdict = NO_CHANGE
    else:
        verdict = INCONCLUSIVE
        sig = p_reg <= policy.alpha or p_imp <= policy.alpha
        reasons.append(
            f"CI [{lo - 1:+.1%}, {hi - 1:+.1%}] reaches beyond the ±{threshold:.1%} threshold "
            f"({'significant' if sig else 'not significant'} after {policy.correction}); more "
            + ("runs (processes) or a quieter machine" if threshold > policy.min_effect_for(name) else "rounds")
            + " needed"
        )
    return MetricResult(verdict=verdict, reasons=tuple(reasons), **base)


def _few_values_result(
    metric: str, b_vals: Sequence[float], c_vals: Sequence[float], threshold: float, floor: float,
    blockers: list[str],
) -> MetricResult | None:
    """Compile time / peak memory: one value per run, judged on the range of pairwise ratios."""
    if not b_vals or not c_vals:
        return None  # not recorded on one side (eager case, CPU memory): nothing to judge
    b = np.maximum(np.asarray(b_vals, dtype=float), floor)
    c = np.maximum(np.asarray(c_vals, dtype=float), floor)
    b_med, c_med = float(np.median(b)), float(np.median(c))
    lo, hi = float(c.min() / b.max()), float(c.max() / b.min())
    up, down = _band(threshold)
    reasons = list(blockers)
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


def _overall(metrics: Mapping[str, MetricResult]) -> str:
    verdicts = {m.verdict for m in metrics.values()}
    for v in (REGRESSION, INCONCLUSIVE, IMPROVEMENT):
        if v in verdicts:
            return v
    return NO_CHANGE


# --- the comparator --------------------------------------------------------------------------------


def compare(baseline: Side, candidate: Side, policy: Policy | None = None) -> Comparison:
    """Judge every case of ``candidate`` against ``baseline``. Pure: no I/O."""
    policy = policy or Policy()
    mismatch = tuple(environment_mismatch(baseline.environment, candidate.environment, policy.env_fields))

    verdicts: dict[str, CaseVerdict] = {}
    paired: list[str] = []
    for name, c in candidate.cases.items():
        b = baseline.cases.get(name)
        if b is None:
            verdicts[name] = CaseVerdict(name, NEW, {}, ("not in the baseline",))
        elif b.definition_hash and c.definition_hash and b.definition_hash != c.definition_hash:
            verdicts[name] = CaseVerdict(
                name, NEW, {},
                (f"changed definition: definition_hash {b.definition_hash} (baseline) != "
                 f"{c.definition_hash} (candidate); not compared, record a new baseline",),
            )
        else:
            paired.append(name)
    for name in baseline.cases:
        if name not in candidate.cases:
            verdicts[name] = CaseVerdict(name, MISSING, {}, ("in the baseline but not in the candidate run",))

    # Mann-Whitney per direction, on the cases with enough samples; adjusted across those cases.
    raw_reg, raw_imp, tested = [], [], []
    for name in paired:
        bs, cs = baseline.cases[name].samples, candidate.cases[name].samples
        if min(bs.size, cs.size) < policy.min_samples or min_attainable_p(bs.size, cs.size) > policy.alpha:
            continue
        raw_reg.append(sps.mannwhitneyu(cs, bs, alternative="greater").pvalue)
        raw_imp.append(sps.mannwhitneyu(cs, bs, alternative="less").pvalue)
        tested.append(name)
    adj_reg = dict(zip(tested, adjust_pvalues(raw_reg, policy.correction), strict=True))
    adj_imp = dict(zip(tested, adjust_pvalues(raw_imp, policy.correction), strict=True))

    # Run-to-run sd per case and side. Two or three runs give a poor estimate, so a case's own figure is
    # raised to the typical (root-mean-square) one of its side: a case whose few runs agreed by chance is
    # not trusted more than the machine it ran on.
    side_noise = []
    for side in (baseline, candidate):
        own = {n: run_noise(side.cases[n].runs) for n in paired}
        known = [v for v in own.values() if v is not None]
        typical = math.sqrt(float(np.mean(np.square(known)))) if known else 0.0
        side_noise.append({n: (None if v is None else max(v, typical)) for n, v in own.items()})

    def noise_sd(name: str) -> float | None:
        sds = [sn[name] for sn in side_noise if sn[name] is not None]
        return math.sqrt(sum(v * v for v in sds) / len(sds)) if sds else None

    noise_z = policy.noise_z if policy.noise_z is not None else float(
        sps.norm.ppf(1 - policy.alpha / max(len(tested), 1)))

    device_type = candidate.environment.get("device_type")
    judge_memory = device_type is None or device_type in policy.memory_device_types
    for name in paired:
        b, c = baseline.cases[name], candidate.cases[name]
        blockers = [f"environment mismatch: {m}" for m in mismatch]
        if b.attention_used and c.attention_used and b.attention_used != c.attention_used:
            blockers.append(f"attention backend used differs: {b.attention_used} vs {c.attention_used}")
        metrics = {
            "time": _time_result(
                name, b, c, adj_reg.get(name), adj_imp.get(name), policy, list(blockers), noise_sd(name), noise_z
            )
        }
        for metric, b_vals, c_vals, thr, floor in (
            ("compile_time", b.compile_time_s, c.compile_time_s, policy.compile_threshold,
             policy.compile_floor_s),
            ("peak_memory", b.peak_memory_bytes, c.peak_memory_bytes, policy.memory_threshold,
             float(policy.memory_floor_bytes)),
        ):
            if metric == "peak_memory" and not judge_memory:
                continue
            res = _few_values_result(metric, b_vals, c_vals, thr, floor, list(blockers))
            if res is not None:
                metrics[metric] = res
        reasons = []
        verdict = _overall(metrics)
        if c.correct is False:
            reasons.append("candidate output is WRONG (correct=False): never acceptable, counted as regression")
            verdict = REGRESSION
        verdicts[name] = CaseVerdict(name, verdict, metrics, tuple(reasons))

    notes = []
    if not judge_memory:
        notes.append(f"peak memory is not judged on {device_type} (policy: {', '.join(policy.memory_device_types)})")
    if baseline.n_runs < 2:
        notes.append(
            "the baseline holds a single run, so its run-to-run noise is unknown and the threshold is not "
            "widened to it; a baseline merged from 3 or more runs (separate processes) is more trustworthy"
        )
    order = list(candidate.cases) + [n for n in baseline.cases if n not in candidate.cases]
    return Comparison(
        cases=tuple(verdicts[n] for n in order),
        policy=policy,
        env_mismatch=mismatch,
        notes=tuple(notes),
        baseline_label=baseline.label,
        candidate_label=candidate.label,
    )
