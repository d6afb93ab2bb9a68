"""A world of machines, sessions and rounds in which the gate's operating characteristics are measured.

The generator is written apart from the comparator (it imports only the data containers of
``perf_tests.analysis.stats``) and draws what the model does not assume: machines with their own speed and
per-case factors, sessions (runs) with a heavy-tailed common speed, per-case noise of unequal size, rounds
that drift within a run and carry outliers, a canary that tracks the machine and the session imperfectly,
kinds of unequal size (one of a single case), many cases moving in either direction, paired A/B with drift
shared by the members of a pair, baselines spread over several machines.

    python tests/gate_world.py [--draws N] [SCENARIO ...]   # an operating-characteristics table
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats as sps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from perf_tests.analysis import stats as S  # noqa: E402

# Kinds of unequal size, one of a single case: the pooling groups of the comparator.
KINDS = ("unet-step",) * 6 + ("attention",) * 4 + ("vae-decode",) + ("text-encoder",)
ENV = {"device_type": "cpu", "device_slug": "cpu-x", "env": "torch2", "torch_version": "2.14.1"}
PROBE = 0  # the case whose change the power rows vary
WILD = 7  # the case whose run medians are bimodal in the "wild" scenario (an allocator-bound kernel)


@dataclass(frozen=True)
class World:
    """Log-scale sds unless said. ``changes``: (case index, relative change) pairs, flattened, of the
    candidate beyond the probe."""

    n_b: int = 5
    n_c: int = 3
    run_sd: float = 0.03  # a session's speed, common to its cases
    run_tail_df: float = math.inf  # Student t sessions (heavy tails) when finite
    case_sd: float = 0.015  # per case and session, scaled per case by a factor in case_scale
    case_scale: tuple[float, float] = (0.7, 1.4)
    round_sd: float = 0.02
    drift_sd: float = 0.01  # a linear drift over a run's rounds (start to end)
    p_outlier: float = 0.02
    rounds: int = 10
    machines_b: int = 1  # the baseline's runs spread over this many machines
    new_machine: bool = False  # the candidate on a machine of its own
    machine_sd: float = 0.0  # machines' speed
    machine_case_sd: float = 0.0  # machines' per-case factors
    canary: bool = False
    canary_track: float = 0.9  # how much of the machine's and the session's speed the canary sees
    canary_sd: float = 0.02  # the canary's own per-run noise
    paired: bool = False
    pair_drift_sd: float = 0.0  # drift shared by both members of a pair
    session_shift: float = 0.0  # one candidate session this much slower, canary included
    changes: tuple[float, ...] = ()
    prior_sd: float = 0.0  # the policy's run-sd prior of this device type (0: the committed CPU prior)
    wild: float = 0.0  # an unchanged attention case (WILD) that lands, per run, this much faster or slower

    def change_vector(self, probe: float) -> np.ndarray:
        out = np.zeros(len(KINDS))
        for i in range(0, len(self.changes), 2):
            out[int(self.changes[i])] = math.log1p(self.changes[i + 1])
        out[PROBE] += math.log1p(probe)
        return out


@dataclass
class Draw:
    baseline: S.Side
    candidate: S.Side
    truth: np.ndarray = field(default_factory=lambda: np.zeros(len(KINDS)))


def _side(rng, w: World, n_runs: int, machines: list[str], machine_level: dict, case_scale: np.ndarray,
          truth: np.ndarray, drift: np.ndarray | None, shift_run: int | None, label: str) -> S.Side:
    m = len(KINDS)
    if math.isinf(w.run_tail_df):
        session = rng.normal(0, w.run_sd, n_runs)
    else:
        scale = math.sqrt(w.run_tail_df / (w.run_tail_df - 2))  # unit variance
        session = w.run_sd * rng.standard_t(w.run_tail_df, n_runs) / scale
    if drift is not None:
        session = session + drift
    if shift_run is not None:
        session[shift_run] += w.session_shift
    cases = {f"test_{KINDS[i].replace('-', '_')}[case{i}]": [] for i in range(m)}
    canary = []
    for r in range(n_runs):
        speed, per_case, canary_speed = machine_level[machines[r]]
        level = np.log(1 + 0.1 * np.arange(m)) + speed + per_case + session[r] + truth
        level += rng.normal(0, w.case_sd, m) * case_scale
        if w.wild:  # drawn only here, so the other scenarios' draws stay as they were
            level[WILD] += w.wild * rng.choice((-1.0, 1.0))
        trend = rng.normal(0, w.drift_sd) * np.linspace(-0.5, 0.5, w.rounds)
        x = np.exp(level[:, None] + trend[None, :] + rng.normal(0, w.round_sd, (m, w.rounds)))
        x *= np.where(rng.random(x.shape) < w.p_outlier, 1.25, 1.0)
        for i, name in enumerate(cases):
            cases[name].append(list(x[i]))
        if w.canary:
            c_level = canary_speed + w.canary_track * session[r] + rng.normal(0, w.canary_sd) + math.log(2e-3)
            canary.append(list(np.exp(c_level + rng.normal(0, 0.01, 20))))
    samples = {name: S.CaseSamples(name, runs, run_machines=list(machines), definition_hash=name,
                                   case={"kind": KINDS[i]})
               for i, (name, runs) in enumerate(cases.items())}
    return S.Side(label, dict(ENV), samples, n_runs, machines=list(machines), canary=canary)


def draw(rng, w: World, probe: float = 0.0) -> Draw:
    """One comparison: baseline and candidate sides with ``probe`` the relative change of case 0."""
    m = len(KINDS)
    case_scale = np.exp(rng.uniform(*np.log(w.case_scale), m))
    names = [f"m{i}" for i in range(w.machines_b + 1)]
    machine_level = {}
    for name in names:
        speed = rng.normal(0, w.machine_sd)
        # the canary sees the machine's speed through its own factor (a different mix of kernels)
        canary_speed = w.canary_track * speed + rng.normal(0, w.machine_sd * 0.3)
        machine_level[name] = (speed, rng.normal(0, w.machine_case_sd, m), canary_speed)
    b_machines = [names[r % w.machines_b] for r in range(w.n_b)]
    c_machines = [names[-1] if w.new_machine else names[0]] * w.n_c
    truth = w.change_vector(probe)
    drift = rng.normal(0, w.pair_drift_sd, w.n_b) if w.paired else None
    shift_run = 0 if w.session_shift else None
    base = _side(rng, w, w.n_b, b_machines, machine_level, case_scale, np.zeros(m), drift, None, "baseline")
    cand = _side(rng, w, w.n_c, c_machines, machine_level, case_scale, truth, drift, shift_run, "candidate")
    if w.paired:
        cand.run_order = [2 * i for i in range(w.n_c)]
        base.run_order = [2 * i + 1 for i in range(w.n_b)]
    return Draw(base, cand, truth)


NOISY = dict(run_sd=0.06, case_sd=0.04)
MANY_MIXED = (1, 0.15, 2, -0.2, 3, 0.25, 4, -0.15, 5, 0.2, 6, -0.25, 7, 0.18)
SCENARIOS = {
    "default 5v3": World(),
    "noisy 5v3": World(**NOISY),
    "7 of 12 +10%": World(changes=tuple(x for i in range(1, 8) for x in (i, 0.10))),
    "7 of 12 -17%": World(changes=tuple(x for i in range(1, 8) for x in (i, -0.17))),
    "7 of 12 +-15-25% noisy": World(**NOISY, changes=MANY_MIXED),
    "7 of 12 +-15-25% noisy, canary": World(**NOISY, changes=MANY_MIXED, canary=True),
    "every case +10% 5v4, 6% canary": World(n_c=4, canary=True, canary_sd=0.06,
                                            changes=tuple(x for i in range(1, 12) for x in (i, 0.10))),
    "one session 8% slower, canary": World(canary=True, session_shift=0.08),
    "fleet of 3 v a new machine": World(machines_b=3, n_b=6, new_machine=True, machine_sd=0.20,
                                        machine_case_sd=0.12, canary=True, canary_track=1.0),
    "fleet of 5 v a new machine": World(machines_b=5, n_b=10, new_machine=True, machine_sd=0.20,
                                        machine_case_sd=0.12, canary=True, canary_track=1.0),
    "paired A/B 4v4, drift": World(n_b=4, n_c=4, paired=True, pair_drift_sd=0.05),
    # one run a side: judged on the device type's prior; here the prior the world's own noise gives (about
    # 3.5% per case and run); the committed CPU prior (7%, this VM's noise) is twice that: "1v1, CPU prior"
    "1v1 (prior)": World(n_b=1, n_c=1, prior_sd=0.035),
    "1v1, CPU prior": World(n_b=1, n_c=1),
    "8v8 noisy": World(n_b=8, n_c=8, **NOISY),
    "heavy-tailed sessions, unequal cases": World(run_tail_df=4.0, case_scale=(0.5, 2.0)),
    "one case bimodal +-20%": World(wild=0.20),
    "paired A/B 6v6, one case bimodal": World(n_b=6, n_c=6, paired=True, pair_drift_sd=0.05, wild=0.20),
}


def run_world(w: World, draws: int, seed: int = 0, probe: float = 0.0, policy: S.Policy | None = None
              ) -> dict:
    """Rates over ``draws`` comparisons. ``false_alarm``: any case whose true change is 0 flagged a regression
    (family-wise); ``hit``: the probe a regression; ``no_change``: the probe read as no change; ``cover``: the
    share of 90% intervals that hold the truth; ``mde``: the probe's reported MDEs."""
    rng = np.random.default_rng(seed)
    false = hit = no_change = covered = judged = 0
    mdes = []
    policy = policy or S.Policy(**({"run_sd_priors": (("*", "*", w.prior_sd),)} if w.prior_sd else {}))
    for _ in range(draws):
        d = draw(rng, w, probe)
        cmp = S.compare(d.baseline, d.candidate, policy, paired=w.paired)
        wrong = False
        for i, c in enumerate(cmp.cases):
            t = c.metrics.get("time")
            if d.truth[i] == 0 and c.verdict == S.REGRESSION:
                wrong = True
            if i == PROBE:
                hit += c.verdict == S.REGRESSION
                no_change += c.verdict == S.NO_CHANGE
                if t is not None and t.mde is not None:
                    mdes.append(t.mde)
            if t is not None and t.ci is not None:
                covered += t.ci[0] <= math.exp(d.truth[i]) <= t.ci[1]
                judged += 1
        false += wrong
    return dict(false_alarm=false / draws, false_count=false, hit=hit / draws, no_change=no_change / draws,
                cover=covered / judged if judged else math.nan, mdes=mdes, draws=draws)


def upper_bound(count: int, n: int) -> float:
    """The upper end of the two-sided 95% Clopper-Pearson interval of a rate."""
    return float(sps.binomtest(count, n).proportion_ci(0.95, method="exact").high)


def characteristics(w: World, draws: int, seed: int = 0) -> dict:
    """One scenario's row: false alarm (with its upper bound), power at +5/+10/+20% of the probe, "no change"
    at +10%, coverage, the median reported MDE and the power at it."""
    null = run_world(w, draws, seed)
    n_power = max(draws // 3, 100)
    row = dict(false_alarm=null["false_alarm"], fa_upper=upper_bound(null["false_count"], draws),
               cover=null["cover"])
    for p in (0.05, 0.10, 0.20):
        r = run_world(w, n_power, seed + int(p * 100), p)
        row[f"power{int(p * 100)}"] = r["hit"]
        if p == 0.10:
            row["no_change10"] = r["no_change"]
    m = float(np.median(null["mdes"])) if null["mdes"] else math.nan
    row["mde"] = m
    seen = math.isfinite(m) and m < 2
    row["power_at_mde"] = run_world(w, n_power, seed + 7, m)["hit"] if seen else math.nan
    return row


COLUMNS = ("false_alarm", "fa_upper", "power5", "power10", "power20", "no_change10", "cover", "mde",
           "power_at_mde")


def table(rows: dict[str, dict]) -> str:
    head = ["scenario", "false alarm", "(95% upper)", "power +5%", "+10%", "+20%", "no change at +10%",
            "90% CI cover", "MDE", "power at MDE"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        lines.append("| " + " | ".join([name] + [f"{r[c]:.3f}" if c != "mde" else f"{r[c]:.1%}"
                                                   for c in COLUMNS]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=1000, help="comparisons per null scenario")
    ap.add_argument("scenarios", nargs="*", help=f"default: all of {', '.join(SCENARIOS)}")
    args = ap.parse_args(argv)
    rows = {}
    for name in args.scenarios or SCENARIOS:
        t0 = time.perf_counter()
        rows[name] = characteristics(SCENARIOS[name], args.draws)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
