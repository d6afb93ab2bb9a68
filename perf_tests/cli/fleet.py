"""``python -m perf_tests fleet``: each machine against its siblings (perf_tests/analysis/fleet.py)."""

from __future__ import annotations

import argparse
import sys

from perf_tests.analysis.fleet import MachineHealth, health
from perf_tests.cli.options import store_option
from perf_tests.records.store import Store, describe


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
    p = sub.add_parser("fleet", help="each machine's canary and case times against its siblings' (the store)")
    store_option(p)
    p.add_argument("--device", help="one device slug (default: each)")
    p.add_argument("--env", help="one environment (default: each)")
    p.add_argument("--since", metavar="ISO-DATE", help="only runs recorded since, e.g. 2026-12-01")
    p.add_argument("--fail-on-slow", action="store_true", help="exit 1 when a machine is named slow")
    p.set_defaults(func=cmd_fleet)
