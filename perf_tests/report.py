"""Rendering of a ``stats.Comparison``: terminal table, Markdown (PR comments, $GITHUB_STEP_SUMMARY), JSON,
and PNGs of baseline vs candidate runs for the flagged cases (matplotlib, Agg canvas, no pyplot state).
Nothing here decides a verdict. Every format shows the MDE per case and in the summary (with a warning when
a case could not have seen a 20% slowdown), the environment labels, the canary's per-run summary, how much
pairing narrowed the intervals, and the failed / skipped / missing / not-selected counts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from perf_tests.stats import (
    ACROSS_MACHINES_FIX,
    FAILED,
    IMPROVEMENT,
    INCONCLUSIVE,
    MISSING,
    NEW,
    NO_CHANGE,
    NOT_COMPARED,
    REGRESSION,
    SKIPPED,
    CaseVerdict,
    Comparison,
    MetricResult,
    Side,
)
from perf_tests.tabular import format_seconds, markdown_table, text_table

_MARK = {FAILED: "FAILED", REGRESSION: "REGRESSION", MISSING: "MISSING", IMPROVEMENT: "improvement",
         NO_CHANGE: "no change", INCONCLUSIVE: "inconclusive", NEW: "new", SKIPPED: "skipped",
         NOT_COMPARED: "not compared"}
_EMOJI = {FAILED: "❌", REGRESSION: "🔴", MISSING: "❓", IMPROVEMENT: "🟢", NO_CHANGE: "⚪",
          INCONCLUSIVE: "🟡",
          NEW: "🆕", SKIPPED: "⏭️", NOT_COMPARED: "➖"}
# An MDE above this is called out in the summary: "no regression" must not hide a blind gate.
BLIND_MDE = 0.20


def _pct(x: float) -> str:
    return f"{x - 1:+.1%}"


def _bytes(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f} MiB"


def _change(m: MetricResult | None) -> str:
    if m is None or m.ratio is None:
        return "-"
    text = _pct(m.ratio)
    if m.ci is not None:
        text += f" [{_pct(m.ci[0])}, {_pct(m.ci[1])}]"
    return text


def _metric_cell(m: MetricResult | None) -> str:
    if m is None:
        return "-"
    if m.verdict == NOT_COMPARED:
        return _MARK[NOT_COMPARED]
    return f"{_change(m)} {_MARK[m.verdict]}"


_ORDER = (FAILED, REGRESSION, MISSING, IMPROVEMENT, NO_CHANGE, INCONCLUSIVE, NEW, SKIPPED)


def summary_line(cmp: Comparison) -> str:
    counts = [f"{cmp.count(v)} {_MARK[v]}" for v in _ORDER if cmp.count(v)]
    if cmp.not_selected:
        counts.append(f"{len(cmp.not_selected)} not selected")
    return f"{len(cmp.cases)} cases: " + (", ".join(counts) if counts else "none")


def mde_line(cmp: Comparison) -> str:
    """The gate's resolution, with a warning when some case could not have seen a 20% slowdown."""
    if cmp.mde_median is None:
        return "MDE: none (no case had a run-to-run noise estimate)"
    blind = [c.name for c in cmp.cases if "time" in c.metrics and (c.metrics["time"].mde or 0) > BLIND_MDE]
    text = (f"MDE (smallest slowdown caught with {cmp.policy.power:.0%} power): median {cmp.mde_median:.1%}, "
            f"worst {cmp.mde_worst:.1%}")
    if blind:
        fix = ACROSS_MACHINES_FIX if cmp.new_machine else "run more processes"
        text += f"; WARNING {len(blind)} case(s) could not have seen a {BLIND_MDE:.0%} slowdown: {fix}"
    return text


def policy_line(cmp: Comparison) -> str:
    p = cmp.policy
    design = "paired A/B, per-pair log ratios" if cmp.paired else "unpaired"
    return (
        f"time: runs are the unit ({design}): per run the median of its rounds; each case's change is split "
        f"into a part common to the run's cases and a case-specific part, with variances pooled per kind; "
        f"regression = a one-sided t test significant at alpha {p.alpha} ({p.correction} over cases, common "
        f"and case-specific tests at alpha/2 each) AND a point estimate above +{p.min_effect:.0%}; no change "
        "= "
        f"the {p.confidence_level:.0%} interval inside ±{p.min_effect:.0%}; one run a side judged only "
        "against "
        "a recorded or prior run-to-run noise; a run (pair) with a disturbed canary is left out while "
        "enough "
        "clean ones remain, else regressions and no change are inconclusive. "
        f"compile time ±{p.compile_threshold:.0%} within one cache state, peak memory "
        f"±{p.memory_threshold:.0%}, "
        f"on every run pair."
    )


def context_lines(cmp: Comparison) -> list[str]:
    """Environment, canary and pairing, one line each (shared by text and Markdown)."""
    lines = []
    if cmp.env_mismatch:
        lines.append("environment mismatch, timings not comparable (every verdict inconclusive): "
                     + "; ".join(cmp.env_mismatch))
    if cmp.env_changes:
        lines.append("environment changed: " + "; ".join(cmp.env_changes)
                     + " (compared; every verdict carries this label)")
    if cmp.canary is not None:
        lines.append(canary_line(cmp))
    if cmp.paired and cmp.pairing_narrowing is not None:
        lines.append(f"pairing narrowed the intervals by {cmp.pairing_narrowing:.0%} (median over cases) "
                     "against the unpaired analysis of the same runs")
    return lines


def canary_line(cmp: Comparison) -> str:
    """The canary's timeline in one line: per-run medians (and spread) of both sides, and what it means."""
    k = cmp.canary
    parts = []
    for side in ("baseline", "candidate"):
        runs = [r for r in k.runs if r.side == side]
        if runs:
            cells = [f"{r.median * 1e3:.3g}ms±{r.cv:.0%}" + ("!" if r.disturbed else "") for r in runs]
            parts.append(f"{side} " + " ".join(cells))
    text = "canary (plain matmul + conv per call, per run): " + "; ".join(parts)
    if k.ratio is not None:
        text += f"; candidate/baseline {_pct(k.ratio)}"
    if k.env_shift:
        text += f"; {k.env_shift}"
    text += "; " + (k.disturbed_summary if k.disturbed else "machine quiet")
    return text


def _rows(cmp: Comparison) -> list[list[str]]:
    rows = []
    for c in cmp.cases:
        t = c.metrics.get("time")
        rows.append([
            c.name,
            _MARK[c.verdict],
            format_seconds(t.baseline_median if t else None),
            format_seconds(t.candidate_median if t else None),
            _change(t),
            "-" if t is None or t.mde is None else f"{t.mde:.1%}",
            "-" if t is None else f"{t.n_baseline}v{t.n_candidate}",
            "-" if t is None or t.p_regression is None else f"{min(t.p_regression, t.p_improvement):.2g}",
            _metric_cell(c.metrics.get("compile_time")),
            _metric_cell(c.metrics.get("peak_memory")),
        ])
    return rows


_HEADER = ["case", "verdict", "baseline", "candidate", "time change [CI]", "MDE", "runs", "p (adj.)",
           "compile time", "peak memory"]


def _reasons(c: CaseVerdict) -> list[str]:
    out = list(c.reasons)
    for m in c.metrics.values():
        out += [f"{m.metric}: {r}" for r in m.reasons]
    return list(dict.fromkeys(out))  # environment reasons repeat per metric


def _notes(cmp: Comparison) -> list[tuple[str, list[str]]]:
    shown = [c for c in cmp.cases
             if c.verdict != NO_CHANGE or any(m.verdict == NOT_COMPARED for m in c.metrics.values())]
    return [(c.name, _reasons(c)) for c in shown if _reasons(c)]


def render_text(cmp: Comparison) -> str:
    lines = [f"{cmp.candidate_label} vs {cmp.baseline_label}", *context_lines(cmp), *text_table(_HEADER,
                                                                                                _rows(cmp))]
    if _notes(cmp):
        lines.append("")
        for name, reasons in _notes(cmp):
            lines.append(f"{name}:")
            lines += [f"    {r}" for r in reasons]
    lines += ["", summary_line(cmp), mde_line(cmp), *[f"note: {n}" for n in cmp.notes], policy_line(cmp)]
    return "\n".join(lines) + "\n"


def _md(cell: str) -> str:
    return cell.replace("|", "\\|")


def render_markdown(cmp: Comparison) -> str:
    worst = next((v for v in (FAILED, REGRESSION, MISSING, INCONCLUSIVE) if cmp.count(v)), NO_CHANGE)
    lines = [f"### {_EMOJI[worst]} Performance gate: {summary_line(cmp)}", "",
             f"`{cmp.candidate_label}` vs `{cmp.baseline_label}`", "", f"**{mde_line(cmp)}**", ""]
    lines += [f"> {_md(line)}" for line in context_lines(cmp)]
    if context_lines(cmp):
        lines.append("")
    rows = [[f"`{r[0]}`", f"{_EMOJI[c.verdict]} {r[1]}", *r[2:]] for c, r in zip(cmp.cases, _rows(cmp),
                                                                                 strict=True)]
    lines += markdown_table(_HEADER, rows)
    if _notes(cmp):
        lines += ["", "<details><summary>Reasons</summary>", ""]
        for name, reasons in _notes(cmp):
            lines.append(f"- `{name}`: " + _md("; ".join(reasons)))
        lines += ["", "</details>"]
    lines += [""] + [f"> Note: {n}" for n in cmp.notes] + ["", f"<sub>{policy_line(cmp)}</sub>", ""]
    return "\n".join(lines)


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def to_dict(cmp: Comparison) -> dict:
    return _clean({
        "baseline": cmp.baseline_label,
        "candidate": cmp.candidate_label,
        "summary": {v: cmp.count(v) for v in _ORDER},
        "not_selected": list(cmp.not_selected),
        "has_regression": cmp.has_regression,
        "has_failed": cmp.has_failed,
        "has_missing": cmp.has_missing,
        "mde_median": cmp.mde_median,
        "mde_worst": cmp.mde_worst,
        "environment_mismatch": list(cmp.env_mismatch),
        "environment_changes": list(cmp.env_changes),
        "canary": None if cmp.canary is None else dataclasses.asdict(cmp.canary),
        "paired": cmp.paired,
        "pairing_narrowing": cmp.pairing_narrowing,
        "new_machine": cmp.new_machine,
        "notes": list(cmp.notes),
        "policy": dataclasses.asdict(cmp.policy),
        "policy_text": policy_line(cmp),
        "cases": [
            {"name": c.name, "verdict": c.verdict, "labels": list(c.labels), "reasons": _reasons(c),
             "metrics": {k: dataclasses.asdict(m) for k, m in c.metrics.items()}}
            for c in cmp.cases
        ],
    })


def render_json(cmp: Comparison) -> str:
    return json.dumps(to_dict(cmp), indent=2) + "\n"


RENDERERS = {"text": render_text, "markdown": render_markdown, "json": render_json}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:120]


def plot_flagged(
    cmp: Comparison, baseline: Side, candidate: Side, plot_dir: str | Path,
    verdicts: tuple[str, ...] = (REGRESSION, IMPROVEMENT, INCONCLUSIVE),
) -> list[Path]:
    """One PNG per flagged case: per-run strips of baseline and candidate timings with their medians."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(plot_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for c in cmp.cases:
        if c.verdict not in verdicts or c.name not in baseline.cases or c.name not in candidate.cases:
            continue
        fig = Figure(figsize=(7, 3.2))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        labels = []
        for y, (label, cs) in enumerate((("baseline", baseline.cases[c.name]), ("candidate",
                                                                                candidate.cases[c.name]))):
            for r, run in enumerate(cs.runs):
                jitter = [y + 0.3 * ((i * 0.618) % 1 - 0.5) for i in range(len(run))]
                ax.scatter([v * 1e3 for v in run], jitter, s=12, alpha=0.5, color=f"C{r % 10}")
                med = float(np.median(run)) * 1e3  # the run's median: the unit the verdict is built on
                ax.plot([med, med], [y - 0.35, y + 0.35], color=f"C{r % 10}", lw=2)
            labels.append(f"{label}\n({len(cs.runs)} run(s), {cs.samples.size} rounds)")
        ax.set_yticks([0, 1], labels)
        ax.set_xlabel("time per call (ms); colour = run, bar = the run's median")
        t = c.metrics.get("time")
        mde = "" if t is None or t.mde is None else f", MDE {t.mde:.1%}"
        ax.set_title(f"{c.name}\n{_MARK[c.verdict]}: {_change(t)}{mde}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{_slug(c.name)}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written
