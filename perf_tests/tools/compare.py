"""The layer between the CLI and the comparator: pick and read the inputs (through ``results.py``), run
``stats.compare``, write the rendered reports and plots, and turn verdicts into an exit code.

BASELINE may be a baseline file, a run (result JSON or journal), or a baseline folder (``baselines``), from
which ``<device_slug>/<env>-<profile>.json`` is picked using the candidate's machine_info and case profiles.

Exit codes: 0 pass; 1 a regression or a failed case (also a missing case under ``require_all``, an
inconclusive one under ``fail_on_inconclusive``); 2 bad input or any error inside the gate (the CLI's job).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from perf_tests.analysis import stats
from perf_tests.analysis.stats import Comparison, Policy, Side
from perf_tests.errors import EXIT_FAIL, EXIT_OK, InputError
from perf_tests.records.baselines import locate_baselines
from perf_tests.records.results import (
    MissingBaseline,
    load_side,
    profiles_of,
    read_baseline,
    side_from_baseline,
)
from perf_tests.report.verdict import RENDERERS, plot_flagged

REPORT_SUFFIXES = {"text": ".txt", "markdown": ".md", "json": ".json"}


@dataclass
class Outcome:
    comparison: Comparison | None  # None: no baseline for this device (and not required)
    baseline: Side | None
    candidate: Side
    warnings: list[str] = field(default_factory=list)


def _baseline_side(paths: list[Path]) -> Side:
    """Several profiles' baseline files of one device and env -> one side."""
    sides = [side_from_baseline(read_baseline(p), str(p)) for p in paths]
    merged = max(sides, key=lambda s: s.n_runs)  # the profiles' files hold parts of the same runs
    cases = {}
    for s in sides:
        cases.update(s.cases)
    merged.cases = cases
    merged.label = ", ".join(s.label for s in sides)
    return merged


def load_and_compare(
    baseline: str | os.PathLike, candidates: list[str | os.PathLike], policy: Policy, *,
    require_baseline: bool = False, paired: bool = False,
) -> Outcome:
    """Read both sides and compare them. A baseline folder without this device's file is a warning (no
    comparison), or :class:`MissingBaseline` with ``require_baseline``."""
    candidate, warnings = load_side(candidates)
    if Path(baseline).is_dir():
        profiles = profiles_of(candidate)
        if not profiles:
            raise InputError(
                "the candidate's cases carry no extra_info.case.profile, so no baseline can be picked from "
                f"the folder {baseline}; pass a baseline file instead."
            )
        try:
            base = _baseline_side(locate_baselines(baseline, candidate, profiles))
        except MissingBaseline as exc:
            if require_baseline:
                raise
            return Outcome(None, None, candidate, [*warnings, str(exc)])
    else:
        base, base_warnings = load_side([baseline])
        warnings += base_warnings
    return Outcome(stats.compare(base, candidate, policy, paired=paired), base, candidate, warnings)


def load_and_compare_ab(
    ref_runs: list[str | os.PathLike], current_runs: list[str | os.PathLike], policy: Policy, *,
    ref_label: str = "REF", current_label: str = "current tree",
) -> Outcome:
    """A/B: the runs of REF (baseline) against those of the current tree, run in pairs (the current tree
    first in the odd pairs, REF in the even ones: perf_tests.tools.run.run_all), analysed as pairs."""
    if len(ref_runs) != len(current_runs) or not ref_runs:
        raise InputError(f"A/B needs as many runs of each side, at least one: {len(current_runs)} of the "
                         "current "
                         f"tree, {len(ref_runs)} of the reference.")
    base, warnings = load_side(ref_runs, ref_label)
    candidate, cand_warnings = load_side(current_runs, current_label)
    candidate.run_order = [2 * i + i % 2 for i in range(len(current_runs))]
    base.run_order = [2 * i + 1 - i % 2 for i in range(len(ref_runs))]
    comparison = stats.compare(base, candidate, policy, paired=True)
    return Outcome(comparison, base, candidate, [*warnings, *cand_warnings])


def exit_code(outcome: Outcome, *, fail_on_inconclusive: bool = False, require_all: bool = False) -> int:
    """1 for a regression or a failed case, whatever the comparison says about the rest; with
    ``require_all`` also for a missing case: one the candidate run selected (or, selection unknown, one in
    the baseline) but neither produced, skipped nor failed; with ``fail_on_inconclusive`` for an
    inconclusive one. 0 otherwise, also when there was no baseline to compare with."""
    cand = outcome.candidate
    if cand.failed:
        return EXIT_FAIL
    cmp = outcome.comparison
    if cmp is None:
        return EXIT_OK
    for c in cmp.cases:
        if c.verdict in (stats.REGRESSION, stats.FAILED):
            return EXIT_FAIL
        if require_all and c.verdict == stats.MISSING and (cand.selected is None or c.name in cand.selected):
            return EXIT_FAIL
        if fail_on_inconclusive and c.verdict == stats.INCONCLUSIVE:
            return EXIT_FAIL
    return EXIT_OK


def render(outcome: Outcome, fmt: str) -> str:
    """The report in one format; without a comparison, the reason why (e.g. for the pull request's
    summary)."""
    if outcome.comparison is not None:
        text = RENDERERS[fmt](outcome.comparison)
        if fmt != "json" and outcome.warnings:  # what the verdict rests on: said with it
            text += "".join(f"\nwarning: {w}" for w in outcome.warnings) + "\n"
        return text
    if fmt == "json":
        return json.dumps({"baseline_missing": True, "warnings": outcome.warnings}, indent=2) + "\n"
    prefix = "**No comparison:** " if fmt == "markdown" else ""
    return "".join(f"{prefix}{w}\n" for w in outcome.warnings)


def write_reports(outcome: Outcome, out_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """Render text, Markdown and JSON once each into ``out_dir/<stem>.{txt,md,json}``, and a PNG per flagged
    case into ``out_dir/plots-<stem>/``. Returns {"text": path, "markdown": ..., "json": ..., "plot:<case>":
    ...}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for fmt, suffix in REPORT_SUFFIXES.items():
        path = out / f"{stem}{suffix}"
        path.write_text(render(outcome, fmt), encoding="utf-8")
        written[fmt] = path
    if outcome.comparison is not None:
        for plot in plot_flagged(outcome.comparison, outcome.baseline, outcome.candidate,
                                 out / f"plots-{stem}"):
            written[f"plot:{plot.stem}"] = plot
    return written
