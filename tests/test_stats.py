"""The comparator (perf_tests/stats.py) on synthetic timings with known answers, over many seeded draws.

Timing-like noise: lognormal (3% sigma) with occasional slow outliers (5% of rounds, +10..50%), one scale per
case. The false-alarm rate and the detection power are measured here, not assumed.

    PYTHONPATH=. python tests/test_stats.py      # prints the power / false-alarm table quoted in the README and the issue
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from perf_tests import stats as S

ROUNDS = S.RECOMMENDED_ROUNDS  # the suite's default rounds must match this (see the README)


def timing_like(rng, n, scale=1.0, sigma=0.03, p_outlier=0.05):
    x = scale * rng.lognormal(0.0, sigma, n)
    out = rng.random(n) < p_outlier
    x[out] *= rng.uniform(1.1, 1.5, out.sum())
    return x


def make_side(rng, n_cases, rounds, *, slow=None, factor=1.0, runs=1, run_sigma=0.0, sigma=0.03, env=None):
    """A side of ``n_cases`` cases; case ``slow`` is ``factor`` times slower; each run has its own offset."""
    cases = {}
    for i in range(n_cases):
        name = f"test_unet_step[case{i}]"
        scale = (1 + 0.1 * i) * (factor if i == slow else 1.0)
        samples = []
        for _ in range(runs):
            offset = rng.lognormal(0.0, run_sigma) if run_sigma else 1.0
            samples.append(list(timing_like(rng, rounds, scale * offset, sigma)))
        cases[name] = S.CaseSamples(name, samples, definition_hash=f"h{i}")
    return S.Side("synthetic", dict(env or {"device_slug": "cpu-x", "torch_version": "2.14.1"}), cases, runs)


def verdicts(cmp):
    return {c.name: c.verdict for c in cmp.cases}


def simulate(draws, n_cases, rounds, factor=1.0, seed=0, policy=None, candidate_runs=None, **kw):
    """Rates over ``draws`` whole runs; case0 is ``factor`` times slower in the candidate.

    hit: case0 flagged as regression; other: any other case flagged; any: any case flagged;
    inconclusive / no_change: case0's verdict.
    """
    rng = np.random.default_rng(seed)
    counts = dict.fromkeys(("hit", "other", "any", "inconclusive", "no_change"), 0)
    cand_kw = {**kw, "runs": candidate_runs} if candidate_runs else kw
    for _ in range(draws):
        base = make_side(rng, n_cases, rounds, **kw)
        cand = make_side(rng, n_cases, rounds, slow=0, factor=factor, **cand_kw)
        v = verdicts(S.compare(base, cand, policy or S.Policy()))
        first = v.pop("test_unet_step[case0]")
        counts["hit"] += first == S.REGRESSION
        counts["other"] += S.REGRESSION in v.values()
        counts["any"] += first == S.REGRESSION or S.REGRESSION in v.values()
        counts["inconclusive"] += first == S.INCONCLUSIVE
        counts["no_change"] += first == S.NO_CHANGE
    return {k: n / draws for k, n in counts.items()}


# --- helpers --------------------------------------------------------------------------------------------


def test_holm_and_bh_adjustments_match_hand_computation():
    p = [0.01, 0.04, 0.03, 0.005]
    np.testing.assert_allclose(S.adjust_pvalues(p, "holm"), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(S.adjust_pvalues(p, "bh"), [0.02, 0.04, 0.04, 0.02])
    if hasattr(sps, "false_discovery_control"):
        np.testing.assert_allclose(S.adjust_pvalues(p, "bh"), sps.false_discovery_control(p))
    assert S.adjust_pvalues([], "holm").size == 0


def test_hodges_lehmann_is_vectorized_and_matches_a_loop():
    rng = np.random.default_rng(1)
    b, c = rng.lognormal(size=(3, 7)), rng.lognormal(size=(3, 9))
    loop = [np.median([np.log(ci) - np.log(bj) for ci in c[k] for bj in b[k]]) for k in range(3)]
    np.testing.assert_allclose(S.hodges_lehmann_log(b, c), loop)
    # a pure 10% scale change is recovered exactly
    assert np.isclose(np.exp(S.hodges_lehmann_log(b[0], 1.1 * b[0])), 1.1)


def test_min_attainable_p_is_the_exact_complete_separation_probability():
    assert np.isclose(S.min_attainable_p(5, 5), 1 / 252)
    assert S.min_attainable_p(3, 2) > 0.05  # 3 vs 2 can never reach significance at 0.05


def test_robust_cv_ignores_a_few_outliers():
    x = np.r_[np.full(19, 1.0) + np.linspace(-0.01, 0.01, 19), 10.0]
    assert S.robust_cv(x) < 0.02


# --- synthetic A/A: false alarms -----------------------------------------------------------------------


def test_mann_whitney_with_holm_keeps_family_wise_error_at_alpha():
    """The significance stage alone (no practical threshold), 2000 runs of 8 cases: FWER <= alpha."""
    rng = np.random.default_rng(2)
    draws, cases, alpha = 2000, 8, 0.05
    scale = np.exp(rng.normal(0, 0.5, (draws, cases, 1)))
    noise = lambda: scale * timing_like(rng, draws * cases * ROUNDS).reshape(draws, cases, ROUNDS)  # noqa: E731
    p = sps.mannwhitneyu(noise(), noise(), alternative="greater", axis=-1).pvalue
    raw_rate = np.mean((p <= alpha).any(axis=1))
    fwer = np.mean([(S.adjust_pvalues(row, "holm") <= alpha).any() for row in p])
    assert fwer <= alpha
    assert raw_rate > 2 * alpha  # without the correction, 8 cases would alarm far more often


def test_aa_false_alarm_rate_of_whole_runs_is_at_most_alpha():
    r = simulate(draws=60, n_cases=8, rounds=ROUNDS, seed=3)
    assert r["any"] <= S.Policy().alpha
    assert r["inconclusive"] <= 0.10  # A/A at the default rounds mostly reads "no change"


def test_aa_with_run_to_run_drift_is_held_by_the_widened_threshold():
    """Baseline merged from 3 runs, candidate 1 run, every run offset by 3% (sd) on top of the round noise.
    Rounds within a run share the offset, which Mann-Whitney cannot see: with the threshold fixed at 5% the
    run alarms too often; widened to the run-to-run noise recorded in the baseline, it stays at alpha."""
    kw = dict(draws=60, n_cases=4, rounds=10, runs=3, candidate_runs=1, run_sigma=0.03, seed=4)
    assert simulate(**kw)["any"] <= S.Policy().alpha
    assert simulate(**kw, policy=S.Policy(noise_z=0.0))["any"] > S.Policy().alpha


# --- synthetic power --------------------------------------------------------------------------------------


def test_ten_percent_slowdown_is_flagged_at_default_rounds():
    r = simulate(draws=100, n_cases=4, rounds=ROUNDS, factor=1.10, seed=5)
    assert r["hit"] >= 0.95
    assert r["other"] <= S.Policy().alpha  # and not elsewhere
    assert r["no_change"] == 0


def test_five_percent_slowdown_at_the_threshold_is_not_called_no_change():
    """At exactly the 5% practical threshold the gate may say either regression or inconclusive, but it must
    not silently pass: 'no change' needs the whole interval inside ±5%."""
    r = simulate(draws=50, n_cases=4, rounds=ROUNDS, factor=1.05, seed=6)
    assert r["no_change"] <= 0.10
    assert r["hit"] + r["inconclusive"] >= 0.90


def test_ten_percent_speedup_is_an_improvement():
    rng = np.random.default_rng(7)
    found = 0
    for _ in range(40):
        base = make_side(rng, 4, ROUNDS)
        cand = make_side(rng, 4, ROUNDS, slow=0, factor=1 / 1.10)
        found += verdicts(S.compare(base, cand))["test_unet_step[case0]"] == S.IMPROVEMENT
    assert found / 40 >= 0.95


# --- inconclusive, new, missing -----------------------------------------------------------------------


def _pair(seed=8, **kw):
    rng = np.random.default_rng(seed)
    return make_side(rng, 3, ROUNDS, **kw), make_side(rng, 3, ROUNDS, slow=0, factor=1.5, **kw)


def test_too_few_samples_is_inconclusive_with_reason():
    rng = np.random.default_rng(9)
    base, cand = make_side(rng, 2, 3), make_side(rng, 2, 3, slow=0, factor=2.0)
    m = S.compare(base, cand).cases[0].metrics["time"]
    assert m.verdict == S.INCONCLUSIVE and "too few samples" in m.reasons[-1]
    assert m.ratio == pytest.approx(2.0, rel=0.2)  # the estimate is still reported


def _noisy(factor, seed=10):
    # Lognormal sigma 0.3: a robust CV of about 30%, three times the default dispersion limit.
    rng = np.random.default_rng(seed)
    base = make_side(rng, 1, 40, sigma=0.3)
    cand = make_side(rng, 1, 40, sigma=0.3, slow=0, factor=factor)
    name = "test_unet_step[case0]"
    spread = max(S.robust_cv(base.cases[name].samples), S.robust_cv(cand.cases[name].samples))
    return S.compare(base, cand).cases[0].metrics["time"], spread


@pytest.mark.parametrize("factor", [1.0, 1.15])
def test_noisy_case_widens_the_threshold_and_never_claims_no_change(factor):
    m, spread = _noisy(factor)  # inside the noise: neither a regression nor "no change"
    assert spread > S.Policy().max_dispersion
    assert m.threshold == pytest.approx(spread)
    assert m.verdict == S.INCONCLUSIVE
    assert any(r.startswith("noisy") and "threshold widened" in r for r in m.reasons)


def test_noisy_case_still_flags_a_change_far_beyond_its_noise():
    m, spread = _noisy(3.0)
    assert m.verdict == S.REGRESSION and m.ci[0] > 1 + spread
    assert any(r.startswith("noisy") for r in m.reasons)


@pytest.mark.parametrize("field,value", [("device_slug", "nvidia-a100-sxm4-80gb"), ("torch_version", "2.15.0"),
                                         ("driver_version", "550.1")])
def test_environment_mismatch_makes_every_case_inconclusive(field, value):
    base, cand = _pair()
    base.environment["driver_version"] = "535.0"
    cand.environment["driver_version"] = "535.0"
    cand.environment[field] = value
    cmp = S.compare(base, cand)
    assert cmp.env_mismatch and field in cmp.env_mismatch[0]
    assert {c.verdict for c in cmp.cases} == {S.INCONCLUSIVE}
    assert all(any("environment mismatch" in r for r in c.metrics["time"].reasons) for c in cmp.cases)
    # the policy decides which fields matter
    relaxed = S.Policy(env_fields=tuple(f for f in S.DEFAULT_ENV_FIELDS if f != field))
    assert verdicts(S.compare(base, cand, relaxed))["test_unet_step[case0]"] == S.REGRESSION


def test_changed_definition_hash_is_not_compared():
    base, cand = _pair()
    cand.cases["test_unet_step[case0]"].definition_hash = "changed"
    c = next(c for c in S.compare(base, cand).cases if c.name == "test_unet_step[case0]")
    assert c.verdict == S.NEW and "changed definition" in c.reasons[0] and not c.metrics


def test_new_and_missing_cases():
    base, cand = _pair()
    cand.cases["test_vae_decode[new]"] = cand.cases.pop("test_unet_step[case2]")
    cand.cases["test_vae_decode[new]"].name = "test_vae_decode[new]"
    v = verdicts(S.compare(base, cand))
    assert v["test_vae_decode[new]"] == S.NEW and v["test_unet_step[case2]"] == S.MISSING


def test_different_attention_backend_used_is_inconclusive():
    base, cand = _pair()
    base.cases["test_unet_step[case0]"].attention_used = "sdpa-flash"
    cand.cases["test_unet_step[case0]"].attention_used = "sdpa-math"
    c = S.compare(base, cand).cases[0]
    assert c.verdict == S.INCONCLUSIVE and "attention backend" in c.metrics["time"].reasons[0]


def test_wrong_output_counts_as_regression():
    rng = np.random.default_rng(11)
    base, cand = make_side(rng, 1, ROUNDS), make_side(rng, 1, ROUNDS)
    cand.cases["test_unet_step[case0]"].correct = False
    c = S.compare(base, cand).cases[0]
    assert c.verdict == S.REGRESSION and "WRONG" in c.reasons[0]


def test_threshold_is_widened_to_recorded_run_to_run_noise():
    rng = np.random.default_rng(12)
    base = make_side(rng, 1, 10, runs=3, run_sigma=0.08)
    cand = make_side(rng, 1, 10, runs=3, run_sigma=0.08)
    m = S.compare(base, cand).cases[0].metrics["time"]
    assert m.threshold > 0.05 and any("widened" in r for r in m.reasons)


def test_per_case_min_effect_override():
    base, cand = _pair()  # case0 is 50% slower
    policy = S.Policy(min_effect_overrides=(("test_unet_step[[]case0]", 0.8),))
    assert policy.min_effect_for("test_unet_step[case0]") == 0.8
    assert verdicts(S.compare(base, cand, policy))["test_unet_step[case0]"] != S.REGRESSION


def test_verdicts_are_reproducible():
    base, cand = _pair()
    a, b = S.compare(base, cand), S.compare(base, cand)
    assert [c.metrics["time"].ci for c in a.cases] == [c.metrics["time"].ci for c in b.cases]


# --- compile time and peak memory: one value per run ------------------------------------------------------


def _few(b, c, metric="compile_time", blockers=()):
    policy = S.Policy()
    thr, floor = (policy.compile_threshold, policy.compile_floor_s) if metric == "compile_time" else (
        policy.memory_threshold, float(policy.memory_floor_bytes))
    return S._few_values_result(metric, b, c, thr, floor, list(blockers))


def test_compile_time_and_memory_verdicts_with_few_values():
    assert _few([10.0], [14.0]).verdict == S.REGRESSION  # one run each: a single ratio vs 25%
    assert "one run per side" in _few([10.0], [14.0]).reasons[-1]
    assert _few([10.0], [11.0]).verdict == S.NO_CHANGE
    assert _few([10.0, 10.5, 9.8], [7.0, 7.2]).verdict == S.IMPROVEMENT
    assert _few([10.0, 13.0], [12.0, 13.5]).verdict == S.INCONCLUSIVE  # runs straddle the threshold
    assert _few([], [12.0]) is None  # not recorded (eager case): nothing to judge
    gib = 2**30
    assert _few([gib], [1.2 * gib], "peak_memory").verdict == S.REGRESSION
    assert _few([0.0], [-5.0e5], "peak_memory").verdict == S.NO_CHANGE  # CPU RSS deltas under the floor
    assert _few([gib], [2 * gib], "peak_memory", ["environment mismatch: x"]).verdict == S.INCONCLUSIVE


def test_memory_regression_fails_the_case_even_when_time_is_unchanged():
    rng = np.random.default_rng(13)
    base, cand = make_side(rng, 1, ROUNDS), make_side(rng, 1, ROUNDS)
    base.cases["test_unet_step[case0]"].peak_memory_bytes = [2.0**30]
    cand.cases["test_unet_step[case0]"].peak_memory_bytes = [1.5 * 2.0**30]
    c = S.compare(base, cand).cases[0]
    assert c.metrics["time"].verdict == S.NO_CHANGE
    assert c.metrics["peak_memory"].verdict == S.REGRESSION and c.verdict == S.REGRESSION


def test_cpu_peak_rss_is_shown_but_not_judged():
    rng = np.random.default_rng(14)
    env = {"device_slug": "cpu-x", "device_type": "cpu"}
    base, cand = make_side(rng, 1, ROUNDS, env=env), make_side(rng, 1, ROUNDS, env=env)
    base.cases["test_unet_step[case0]"].peak_memory_bytes = [90e3]
    cand.cases["test_unet_step[case0]"].peak_memory_bytes = [50e6]  # run-order noise of an RSS delta
    cmp = S.compare(base, cand)
    assert "peak_memory" not in cmp.cases[0].metrics and cmp.cases[0].verdict == S.NO_CHANGE
    assert any("peak memory is not judged on cpu" in n for n in cmp.notes)


def power_table(draws: int = 200) -> None:  # pragma: no cover - a report, run by hand
    print(f"timing-like noise: lognormal sigma 3% + 5% outliers (+10..50%); {draws} draws of 8-case runs; "
          "rounds = samples per side, one run per side")
    print("rounds  P(flag 10%)  P(flag 5%)  P(5% inconcl.)  A/A alarm  A/A inconcl.   [default policy]")
    for n in (5, 10, 15, 20, 30):
        p10 = simulate(draws, 8, n, 1.10, seed=21)
        p05 = simulate(draws, 8, n, 1.05, seed=22)
        aa = simulate(draws, 8, n, 1.0, seed=23)
        print(f"{n:6d}  {p10['hit']:11.3f}  {p05['hit']:10.3f}  {p05['inconclusive']:14.3f}  {aa['any']:9.3f}  "
              f"{aa['inconclusive']:12.3f}", flush=True)
    pol = S.Policy(min_effect=0.02)
    print("min_effect 2%: rounds, P(flag 5%), A/A alarm")
    for n in (20, 40, 60):
        p05 = simulate(draws, 8, n, 1.05, seed=22, policy=pol)
        aa = simulate(draws, 8, n, 1.0, seed=23, policy=pol)
        print(f"{n:6d}  {p05['hit']:.3f}  {aa['any']:.3f}", flush=True)
    print("run-to-run drift (sd 3% per run), baseline 3 runs x 10 rounds vs candidate 1 run x 10 rounds, 4 cases")
    for label, pol in (("widened", S.Policy()), ("fixed 5%", S.Policy(noise_z=0.0))):
        aa = simulate(draws, 4, 10, 1.0, seed=24, runs=3, candidate_runs=1, run_sigma=0.03, policy=pol)
        p10 = simulate(draws, 4, 10, 1.10, seed=25, runs=3, candidate_runs=1, run_sigma=0.03, policy=pol)
        print(f"  {label}: A/A alarm {aa['any']:.3f}, P(flag 10%) {p10['hit']:.3f}", flush=True)


if __name__ == "__main__":  # pragma: no cover
    power_table()
