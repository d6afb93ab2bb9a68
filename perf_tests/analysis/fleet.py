"""``python -m perf_tests fleet``: each machine of a device type against its siblings, from the store.

    python -m perf_tests fleet [--store PATH|URL] [--device SLUG] [--env torch2] [--since ISO-DATE]

Per device type and environment, each machine's runs (``machine_id``: one host in one boot) are compared
with the runs of all the other machines by the comparator, with the canary as one more case and without
taking changes net of the canary (here the machine is what is measured). Across machines the comparator
gives no regression verdict, but its interval holds the machine-to-machine variance estimated from the
siblings, so a machine is named slow when that interval lies wholly above ``+min_effect``: for its canary,
or (without one) for most of its cases. A baseline should not be recorded on such a machine.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from perf_tests.analysis.stats import CaseSamples, Policy, Side, compare
from perf_tests.records.store import Store, StoredRun

CANARY = "canary"


@dataclass(frozen=True)
class MachineHealth:
    device_slug: str
    env: str
    machine_id: str
    runs: int
    siblings: int  # other machines
    canary_ratio: float | None  # this machine / its siblings
    canary_ci: tuple[float, float] | None
    case_ratio: float | None  # median over cases of this machine's ratio
    slow_cases: int  # cases whose interval lies above +min_effect
    cases: int
    min_effect: float

    @property
    def slow(self) -> bool:
        """The gate's own rule: slower than its siblings beyond doubt (the interval above 1) and by more
        than the minimum effect (the estimate); by the canary where it ran, else by most cases."""
        if self.canary_ci is not None:
            return self.canary_ci[0] > 1 and self.canary_ratio > 1 + self.min_effect
        return self.cases > 0 and self.slow_cases > self.cases / 2


def _side(label: str, runs: Sequence[StoredRun]) -> Side:
    machines = [s.run.machine_id for s in runs]
    cases: dict[str, CaseSamples] = {}
    for s in runs:
        for name, r in s.run.cases.items():
            cs = cases.setdefault(name, CaseSamples(name, [], run_machines=[], case=dict(r.case)))
            cs.runs.append(list(r.samples))
            cs.run_machines.append(s.run.machine_id)
    with_canary = [s for s in runs if s.run.canary]
    if with_canary:
        cases[CANARY] = CaseSamples(CANARY, [list(s.run.canary) for s in with_canary],
                                    run_machines=[s.run.machine_id for s in with_canary],
                                    case={"kind": CANARY})
    return Side(label, dict(runs[-1].run.machine), cases, n_runs=len(runs), machines=machines)


def health(store: Store, device: str, env: str, since: str | None = None,
           policy: Policy | None = None) -> list[MachineHealth]:
    where, params = "device_slug = ? AND env = ? AND mode = 'solo' AND complete = 1", [device, env]
    if since:
        where += " AND recorded_at >= ?"
        params.append(since)
    runs = store.runs(where, params)
    by_machine: dict[str, list[StoredRun]] = {}
    for s in runs:
        by_machine.setdefault(s.run.machine_id or "?", []).append(s)
    # The siblings are the reference: their spread is the fleet's machine-to-machine variance, which the
    # device type's prior would otherwise outweigh at a few machines.
    policy = policy or dataclasses.replace(Policy(), machine_prior_df=0)
    out = []
    for mid, mine in sorted(by_machine.items()):
        others = [s for m, rs in by_machine.items() if m != mid for s in rs]
        if not others:
            continue
        cmp = compare(_side("siblings", others), _side(mid, mine), policy)
        times = {c.name: t for c in cmp.cases if (t := c.metrics.get("time")) and t.ratio}
        canary = times.pop(CANARY, None)
        ratios = [t.ratio for t in times.values()]
        out.append(MachineHealth(
            device, env, mid, len(mine), len(by_machine) - 1, canary.ratio if canary else None,
            canary.ci if canary else None, statistics.median(ratios) if ratios else None,
            sum(bool(t.ci) and t.ci[0] > 1 and t.ratio > 1 + policy.min_effect for t in times.values()),
            len(ratios),
            policy.min_effect))
    return out
