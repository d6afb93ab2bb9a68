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

from perf_tests.analysis.stats import (
    FAILED,
    IMPROVEMENT,
    INCONCLUSIVE,
    MISSING,
    NEW,
    NO_CHANGE,
    NOT_COMPARED,
    REGRESSION,
    SKIPPED,
    CanaryResult,
    CaseVerdict,
    Comparison,
    MetricResult,
    Reason,
    Side,
    on_one_clock,
)
from perf_tests.report.tabular import format_seconds, markdown_table, text_table

# What settles a comparison across machines, where more runs do not (the machine-to-machine variance stays).
# Policy.correction's values, as a sentence says them ("holm", the name the option has always had, selects
# the closed test that replaced Holm's step-down: docs/statistics.md)
CORRECTIONS = {"holm": "the closed test across cases", "bh": "Benjamini-Hochberg", "none": "no correction"}
ACROSS_MACHINES_FIX = ("compare on one machine: --ab REF, or a baseline recorded on this one "
                       "(update-baselines)")


def _unsettled(r: Reason) -> str:
    more = (f"about {r['runs_needed']} runs per side would settle it (MDE {r['target_mde']:.0%}, interval "
            f"±{r['min_effect'] / 2:.1%})" if r["runs_needed"]
            else "more runs cannot settle it across machines (the machine-to-machine variance stays): "
            + ACROSS_MACHINES_FIX if r["across_machines"]
            else "over 100 runs per side would be needed to settle it")
    return (f"interval [{r['low'] - 1:+.1%}, {r['high'] - 1:+.1%}] reaches beyond the ±{r['min_effect']:.1%} "
            f"band and no change beyond it is significant after "
            f"{CORRECTIONS.get(r['correction'], r['correction'])} (MDE {r['mde']:.1%}); "
            f"{more}")


def _machines(r: Reason) -> str:
    how = (f"estimated from the baseline's {r['machines']} machines pooled with the policy's prior "
           f"({r['prior_df']} df)" if r["machines"] > 1
           else "policy default (the baseline spans one machine)")
    return ("the candidate ran on a machine none of the baseline's runs came from: machine-to-machine sd "
            f"({how}: {r['common_sd']:.1%} common, {r['case_sd']:.1%} per case, per machine) added to the "
            "interval and the MDE")


# The sentence of each reason code (stats.Reason), from its values.
SENTENCES = {
    "environment-mismatch": lambda r: f"environment mismatch: {r['detail']}",
    "machine-not-taken-out": lambda r: (
        "the candidate ran on a machine none of the baseline's runs came from, and the canary cannot take "
        "the machine's speed out ("
        + ("the environment changed" if r["environment_changed"] else "no canary on both sides")
        + "): " + ACROSS_MACHINES_FIX),
    "attention-differs": lambda r: f"attention backend used differs: {r['baseline']} vs {r['candidate']}",
    "kernel-differs": lambda r: (f"the attention kernel that ran differs: {r['baseline']} vs "
                                 f"{r['candidate']} (the same backend dispatched to another kernel)"),
    "noise-prior": lambda r: (f"run-to-run sd {r['sd']:.1%} (prior for {r['device_type']}/{r['env']}; one "
                              "run per side, no recorded noise)"),
    "machine-variance": _machines,
    "analysed-unpaired": lambda r: "analysed unpaired: the sides hold different numbers of runs of this case",
    "too-few-samples": lambda r: (
        "too few samples: with one run per side the smallest attainable p is 1 (no run-to-run noise is known "
        "for this device type); run >= 2 processes on a side, after which the report gives the MDE and the "
        f"runs needed for one of {r['target_mde']:.0%}"),
    "unsettled": _unsettled,
    "disturbed": lambda r: (f"machine disturbed in {'pair' if r['by_pair'] else 'candidate run'}"
                            f"{'s' if len(r['runs']) > 1 else ''} {', '.join(map(str, r['runs']))} of "
                            f"{r['total']} (see the canary)" + (f" (would have been {r['would_have_been']})"
                                                                if r["would_have_been"] else "")),
    "canary-spread": lambda r: (f"machine disturbed: canary spread {r['cv']:.1%} within "
                                f"{'pair' if r['pair'] else 'candidate run'} {r['run']} "
                                f"(usual < {r['limit']:.1%})"),
    "canary-pair-shift": lambda r: (f"machine disturbed: canary {r['shift']:+.1%} between the runs of pair "
                                    f"{r['run']} (their own noise allows ±{r['limit']:.1%})"),
    "canary-shift": lambda r: (
        f"machine disturbed: canary {r['shift']:+.1%} in candidate run {r['run']} against "
        + ("the baseline's" if r["against"] == "baseline"
           else "the candidate runs' median (a machine none of the baseline's runs came from)")
        + f" (the baseline's run-to-run noise allows ±{r['limit']:.1%})"),
    "device": lambda r: r["detail"] + (f" (the other side of pair {r['run']})" if r["partner"] else ""),
    "cache-state": lambda r: f"{r['state']} cache on both sides",
    "cache-state-differs": lambda r: (f"not compared: cache state differs (baseline {r['baseline']}, "
                                      f"candidate {r['candidate']})"),
    "values-overlap": lambda r: (f"run values overlap the ±{r['threshold']:.0%} threshold (ratios "
                                 f"{r['low']:.3f}..{r['high']:.3f}, {r['n_baseline']} baseline vs "
                                 f"{r['n_candidate']} candidate runs)"),
    "single-ratio": lambda r: "one run per side: a single ratio against the threshold, no noise estimate",
    "not-in-baseline": lambda r: "not in the baseline",
    "changed-definition": lambda r: (f"changed definition: definition_hash {r['baseline']} (baseline) != "
                                     f"{r['candidate']} (candidate); not compared, record a new baseline"),
    "no-samples": lambda r: "no samples on one side",
    "failed": lambda r: f"failed in the candidate run: {r['detail']}",
    "skipped": lambda r: f"skipped: {r['detail']}",
    "missing": lambda r: "selected in the candidate run but neither measured, skipped nor failed",
    "wrong-output": lambda r: "candidate output is WRONG (correct=False)",
}


def sentence(r: Reason) -> str:
    return SENTENCES[r.code](r)


def _reason_dict(r: Reason) -> dict:
    return {"code": r.code, "values": dict(r.values), "sentence": sentence(r)}

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
    over = ("closed testing over cases (family-wise)" if p.correction == "holm"
            else f"{p.correction} over cases")
    return (
        f"time: runs are the unit ({design}): per run the median of its rounds; the noise of each case's "
        f"change has a part common to the run's cases (net of the canary, weighted by regression) and a "
        f"case-specific part, estimated once (docs/statistics.md); regression = a one-sided t test of the "
        f"case's change significant at alpha {p.alpha} ({over}) AND a point estimate above "
        f"+{p.min_effect:.0%}; no change = "
        f"the {p.confidence_level:.0%} interval inside ±{p.min_effect:.0%}; one run a side judged only "
        f"against a recorded or prior run-to-run noise; a run (pair) with a disturbed canary is left out "
        "while enough clean ones remain, else regressions and no change are inconclusive. "
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
    if cmp.suite is not None:
        lines.append(suite_line(cmp))
    if clock_line(cmp):
        lines.append(clock_line(cmp))
    if cmp.paired and cmp.pairing_narrowing is not None:
        lines.append(f"pairing narrowed the intervals by {cmp.pairing_narrowing:.0%} (median over cases) "
                     "against the unpaired analysis of the same runs")
    return lines


def clock_line(cmp: Comparison) -> str | None:
    """Which clock each case's time was judged on, when any was judged on the device's (CUDA events)."""
    clocks = {c.name: c.metrics["time"].clock for c in cmp.cases if "time" in c.metrics}
    device = [n for n, k in clocks.items() if k == "device"]
    if not device:
        return None
    wall = [n for n, k in clocks.items() if k != "device"]
    text = f"time judged on the device's clock (CUDA events) for {len(device)} case(s)"
    if wall:
        shown = ", ".join(wall[:3]) + (f" and {len(wall) - 3} more" if len(wall) > 3 else "")
        text += f"; on the wall clock for {len(wall)} (end-to-end, or a side without device time): {shown}"
    return text


def suite_line(cmp: Comparison) -> str:
    """The change of the suite as a whole (the mean over the cases measured in every run): its own claim,
    which makes no case a regression."""
    s = cmp.suite
    p = min(s.p_regression, s.p_improvement)
    return (f"the suite as a whole: {_change(s)} ({_MARK[s.verdict]}, p {p:.2g}, MDE {s.mde:.1%}; the mean "
            "over the cases measured in every run, tested on its own)")


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
    text += "; " + (disturbed_summary(k) if k.disturbed else "machine quiet")
    return text


def disturbed_summary(k: CanaryResult) -> str:
    """The disturbed runs' reasons; beyond two, the first and a count (each run is marked ! in the line)."""
    if len(k.disturbed) <= 2:
        return "; ".join(map(sentence, k.disturbed))
    total = sum(r.side == "candidate" for r in k.runs)
    return (f"{sentence(k.disturbed[0])}; and {len(k.disturbed) - 1} more of the {total} "
            f"{'pairs' if k.by_pair else 'candidate runs'}, marked ! in the canary line")


def _canary_dict(k: CanaryResult) -> dict:
    """The canary's fields, each disturbance as its code, values and sentence."""
    runs = [{**dataclasses.asdict(r), "disturbed": r.disturbed and _reason_dict(r.disturbed)} for r in k.runs]
    return {**dataclasses.asdict(k), "runs": runs, "disturbed": [_reason_dict(r) for r in k.disturbed]}


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
    out = [sentence(r) for r in c.reasons]
    for m in c.metrics.values():
        out += [f"{m.metric}: {sentence(r)}" for r in m.reasons]
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


def _metric_dict(m: MetricResult) -> dict:
    """The metric's fields, each reason as its code, values and sentence."""
    return {**dataclasses.asdict(m), "reasons": [_reason_dict(r) for r in m.reasons]}


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
        "canary": None if cmp.canary is None else _canary_dict(cmp.canary),
        "paired": cmp.paired,
        "pairing_narrowing": cmp.pairing_narrowing,
        "new_machine": cmp.new_machine,
        "suite": None if cmp.suite is None else _metric_dict(cmp.suite),
        "notes": list(cmp.notes),
        "policy": dataclasses.asdict(cmp.policy),
        "policy_text": policy_line(cmp),
        "cases": [
            {"name": c.name, "verdict": c.verdict, "labels": list(c.labels), "reasons": _reasons(c),
             "why": [_reason_dict(r) for r in c.reasons],
             "metrics": {k: _metric_dict(m) for k, m in c.metrics.items()}}
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
    """One PNG per flagged case: per-run strips of baseline and candidate timings with their medians, on the
    clock the case was judged on."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    baseline, candidate = on_one_clock(baseline, candidate)

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
        t = c.metrics.get("time")
        clock = " on the device's clock" if t is not None and t.clock == "device" else ""
        ax.set_xlabel(f"time per call (ms){clock}; colour = run, bar = the run's median")
        mde = "" if t is None or t.mde is None else f", MDE {t.mde:.1%}"
        ax.set_title(f"{c.name}\n{_MARK[c.verdict]}: {_change(t)}{mde}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{_slug(c.name)}.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    return written
