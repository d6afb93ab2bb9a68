"""The layer between the CLI and the comparator: pick and load the inputs, run ``stats.compare``, write the
rendered report and plots, and turn verdicts into an exit code.

BASELINE may be a baseline file, a pytest-benchmark JSON, or a baseline folder (``baselines``), from which
``<device_slug>/<env>-<profile>.json`` is picked using the candidate's machine_info and case profiles.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from perf_tests.baselines import (
    InputError,
    MissingBaseline,
    locate_baselines,
    profiles_of,
)
from perf_tests.baselines import (
    load_side as _load_side,
)
from perf_tests.report import RENDERERS, plot_flagged, render_markdown
from perf_tests.stats import Comparison, Policy, Side, compare

EXIT_OK, EXIT_REGRESSION, EXIT_BAD_INPUT = 0, 1, 2


@dataclass
class Outcome:
    comparison: Comparison | None
    baseline: Side | None
    candidate: Side
    warnings: list[str] = field(default_factory=list)


def _merge_baseline_files(paths: list[Path]) -> Side:
    """Several profiles' baseline files of one device and env -> one side."""
    sides = []
    for p in paths:
        side = _load_side([p], label=str(p))
        sides.append(side)
    merged = sides[0]
    for s in sides[1:]:
        merged.cases.update(s.cases)
        merged.label += f", {s.label}"
    return merged


def load_and_compare(
    baseline: str | os.PathLike, candidates: list[str | os.PathLike], policy: Policy,
    require_baseline: bool = False,
) -> Outcome:
    candidate = _load_side(candidates)
    if Path(baseline).is_dir():
        profiles = profiles_of(candidate)
        if not profiles:
            raise InputError(
                "the candidate's cases carry no extra_info.case.profile, so no baseline can be picked from "
                f"the folder {baseline}; pass a baseline file instead."
            )
        try:
            paths = locate_baselines(baseline, candidate, profiles)
        except MissingBaseline as exc:
            if require_baseline:
                raise
            return Outcome(None, None, candidate, [str(exc)])
        base = _merge_baseline_files(paths)
    else:
        base = _load_side([baseline])
    return Outcome(compare(base, candidate, policy), base, candidate)


def exit_code(cmp: Comparison | None, fail_on_inconclusive: bool = False) -> int:
    if cmp is None:
        return EXIT_OK
    if cmp.has_regression or (fail_on_inconclusive and cmp.has_inconclusive):
        return EXIT_REGRESSION
    return EXIT_OK


def emit(
    outcome: Outcome, fmt: str = "text", output: str | os.PathLike | None = None,
    plot_dir: str | os.PathLike | None = None, step_summary: bool = False,
) -> list[Path]:
    """Print / write the report, warnings to stderr; returns the plots written."""
    for w in outcome.warnings:
        print(f"warning: {w}", file=sys.stderr)
    cmp = outcome.comparison
    if cmp is None:  # no baseline: the report still says so, e.g. in the pull request's summary
        if fmt == "json":
            text = json.dumps({"baseline_missing": True, "warnings": outcome.warnings}, indent=2) + "\n"
        else:
            prefix = "**No comparison:** " if fmt == "markdown" else ""
            text = "".join(f"{prefix}{w}\n" for w in outcome.warnings)
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(text, encoding="utf-8")
        return []
    text = RENDERERS[fmt](cmp)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if step_summary and os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as f:
            f.write(render_markdown(cmp) + "\n")
    plots = []
    if plot_dir:
        plots = plot_flagged(cmp, outcome.baseline, outcome.candidate, plot_dir)
    return plots

