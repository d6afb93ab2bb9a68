"""Rendering of a ``stats.Comparison``: terminal table, Markdown (PR comments, $GITHUB_STEP_SUMMARY), JSON,
and PNGs of baseline vs candidate distributions for the flagged cases (matplotlib, Agg canvas, no pyplot
state). Nothing here decides a verdict.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from perf_tests.stats import (
    IMPROVEMENT,
    INCONCLUSIVE,
    MISSING,
    NEW,
    NO_CHANGE,
    REGRESSION,
    CaseVerdict,
    Comparison,
    MetricResult,
    Side,
)

_MARK = {REGRESSION: "REGRESSION", IMPROVEMENT: "improvement", NO_CHANGE: "no change",
         INCONCLUSIVE: "inconclusive", NEW: "new", MISSING: "missing"}
_EMOJI = {REGRESSION: "🔴", IMPROVEMENT: "🟢", NO_CHANGE: "⚪", INCONCLUSIVE: "🟡", NEW: "🆕", MISSING: "➖"}


def _pct(x: float) -> str:
    return f"{x - 1:+.1%}"


def _seconds(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.2f} ms" if x < 1 else f"{x:.3f} s"


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
    return f"{_change(m)} {_MARK[m.verdict]}"


def summary_line(cmp: Comparison) -> str:
    counts = [f"{cmp.count(v)} {_MARK[v]}" for v in (REGRESSION, IMPROVEMENT, NO_CHANGE, INCONCLUSIVE, NEW, MISSING)
              if cmp.count(v)]
    return f"{len(cmp.cases)} cases: " + (", ".join(counts) if counts else "none")


def policy_line(cmp: Comparison) -> str:
    p = cmp.policy
    return (
        f"time: one-sided Mann-Whitney, {p.correction} over cases at alpha {p.alpha}; Hodges-Lehmann change with "
        f"{p.confidence_level:.0%} bootstrap CI; regression needs the CI above +{p.min_effect:.0%} (widened to "
        f"recorded run-to-run noise, and to the dispersion of a side noisier than {p.max_dispersion:.0%}). compile time ±{p.compile_threshold:.0%}, "
        f"peak memory ±{p.memory_threshold:.0%} on every run pair."
    )


def _rows(cmp: Comparison) -> list[list[str]]:
    rows = []
    for c in cmp.cases:
        t = c.metrics.get("time")
        rows.append([
            c.name,
            _MARK[c.verdict],
            _seconds(t.baseline_median if t else None),
            _seconds(t.candidate_median if t else None),
            _change(t),
            "-" if t is None or t.threshold is None else f"±{t.threshold:.1%}",
            "-" if t is None or t.p_regression is None else f"{min(t.p_regression, t.p_improvement):.2g}",
            _metric_cell(c.metrics.get("compile_time")),
            _metric_cell(c.metrics.get("peak_memory")),
        ])
    return rows


_HEADER = ["case", "verdict", "baseline", "candidate", "time change [CI]", "threshold", "p (adj.)", "compile time", "peak memory"]


def _reasons(c: CaseVerdict) -> list[str]:
    out = list(c.reasons)
    for m in c.metrics.values():
        out += [f"{m.metric}: {r}" for r in m.reasons]
    return list(dict.fromkeys(out))  # environment reasons repeat per metric


def render_text(cmp: Comparison) -> str:
    rows = [_HEADER] + _rows(cmp)
    widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADER))]
    lines = [f"{cmp.candidate_label} vs {cmp.baseline_label}"]
    if cmp.env_mismatch:
        lines.append("WARNING environment mismatch, timings not comparable: " + "; ".join(cmp.env_mismatch))
    for i, r in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [(c.name, _reasons(c)) for c in cmp.cases if c.verdict != NO_CHANGE and _reasons(c)]
    if notes:
        lines.append("")
        for name, reasons in notes:
            lines.append(f"{name}:")
            lines += [f"    {r}" for r in reasons]
    lines += ["", summary_line(cmp), *[f"note: {n}" for n in cmp.notes], policy_line(cmp)]
    return "\n".join(lines) + "\n"


def _md(cell: str) -> str:
    return cell.replace("|", "\\|")


def render_markdown(cmp: Comparison) -> str:
    worst = REGRESSION if cmp.has_regression else INCONCLUSIVE if cmp.has_inconclusive else NO_CHANGE
    lines = [f"### {_EMOJI[worst]} Performance gate: {summary_line(cmp)}", "",
             f"`{cmp.candidate_label}` vs `{cmp.baseline_label}`", ""]
    if cmp.env_mismatch:
        lines += ["> **Environment mismatch** — timings are not comparable, every verdict is inconclusive: "
                  + "; ".join(cmp.env_mismatch), ""]
    lines.append("| " + " | ".join(_HEADER) + " |")
    lines.append("|" + "---|" * len(_HEADER))
    for c, r in zip(cmp.cases, _rows(cmp), strict=True):
        r[0] = f"`{r[0]}`"
        r[1] = f"{_EMOJI[c.verdict]} {r[1]}"
        lines.append("| " + " | ".join(_md(x) for x in r) + " |")
    notes = [(c.name, _reasons(c)) for c in cmp.cases if c.verdict != NO_CHANGE and _reasons(c)]
    if notes:
        lines += ["", "<details><summary>Reasons</summary>", ""]
        for name, reasons in notes:
            lines.append(f"- `{name}`: " + "; ".join(reasons))
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
        "summary": {v: cmp.count(v) for v in _MARK},
        "has_regression": cmp.has_regression,
        "environment_mismatch": list(cmp.env_mismatch),
        "notes": list(cmp.notes),
        "policy": dataclasses.asdict(cmp.policy),
        "cases": [
            {"name": c.name, "verdict": c.verdict, "reasons": _reasons(c),
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
        for y, (label, cs) in enumerate((("baseline", baseline.cases[c.name]), ("candidate", candidate.cases[c.name]))):
            for r, run in enumerate(cs.runs):
                jitter = [y + 0.3 * ((i * 0.618) % 1 - 0.5) for i in range(len(run))]
                ax.scatter([v * 1e3 for v in run], jitter, s=12, alpha=0.6, color=f"C{r % 10}")
            m = cs.samples
            if m.size:
                med = float(np.median(m)) * 1e3
                ax.plot([med, med], [y - 0.35, y + 0.35], color="black", lw=2)
            labels.append(f"{label}\n({len(cs.runs)} run(s), n={m.size})")
        ax.set_yticks([0, 1], labels)
        ax.set_xlabel("time per round (ms); colour = run, bar = median")
        t = c.metrics.get("time")
        ax.set_title(f"{c.name}\n{_MARK[c.verdict]}: {_change(t)}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{_slug(c.name)}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written
