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

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from perf_tests.stats import CaseSamples, Policy, Side, compare
from perf_tests.store import Store, StoredRun, describe

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
        if self.canary_ci is not None:
            return self.canary_ci[0] > 1 + self.min_effect
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
    policy = policy or Policy()
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
            sum(bool(t.ci) and t.ci[0] > 1 + policy.min_effect for t in times.values()), len(ratios),
            policy.min_effect))
    return out


def _fmt(h: MachineHealth) -> str:
    canary = (f"canary {h.canary_ratio - 1:+.1%} [{h.canary_ci[0] - 1:+.1%}, {h.canary_ci[1] - 1:+.1%}]"
              if h.canary_ratio and h.canary_ci else "no canary")
    cases = (f"cases median {h.case_ratio - 1:+.1%}, {h.slow_cases} of {h.cases} slower beyond "
             f"+{h.min_effect:.0%}" if h.case_ratio else "no case")
    flag = f"  SLOW (interval above +{h.min_effect:.0%}): do not record a baseline on it" if h.slow else ""
    return f"  {h.machine_id} ({h.runs} runs, against {h.siblings} siblings): {canary}; {cases}{flag}"


def cmd_fleet(args: argparse.Namespace) -> int:
    lines, slow = [], 0
    with Store.open(args.store) as store:
        for slug, _, env, _ in store.groups():
            if (args.device and slug != args.device) or (args.env and env != args.env) or not slug:
                continue
            machines = health(store, slug, env, args.since)
            lines.append(f"{slug} {env}: {len(machines)} machine(s) with siblings")
            lines += [_fmt(h) for h in machines]
            slow += sum(h.slow for h in machines)
        where = describe(store.location)
    if not lines:
        print(f"{where}: no runs of the selected device types", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 1 if slow and args.fail_on_slow else 0


def add_parser(sub) -> None:
    from perf_tests.store_cli import store_option

    p = sub.add_parser("fleet", help="each machine's canary and case times against its siblings' (the store)")
    store_option(p)
    p.add_argument("--device", help="one device slug (default: each)")
    p.add_argument("--env", help="one environment (default: each)")
    p.add_argument("--since", metavar="ISO-DATE", help="only runs recorded since, e.g. 2026-12-01")
    p.add_argument("--fail-on-slow", action="store_true", help="exit 1 when a machine is named slow")
    p.set_defaults(func=cmd_fleet)
