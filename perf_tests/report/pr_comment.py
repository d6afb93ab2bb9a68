"""The pull-request comment of the performance gate: one per pull request and GPU type, updated in place.

Rendered from the gate's verdict JSON (``verdict-<env>.json``), never from the pull request's code: the
workflow that posts it runs the base branch's copy of this module over the artifact. The comment carries
a hidden marker per GPU type (:func:`marker`), which the workflow looks for to edit its own comment
instead of adding one per run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from perf_tests.tools import explain

_SHOWN = ("regression", "failed", "missing", "improvement", "inconclusive", "no change", "skipped", "new")


def marker(gpu: str) -> str:
    return f"<!-- sd-perf-gate: {gpu} -->"


def _pct(ratio: float | None) -> str:
    return "n/a" if ratio is None or not math.isfinite(ratio) else f"{(ratio - 1) * 100:+.1f}%"


def _interval(ci: Sequence[float] | None) -> str:
    return "" if not ci else f"[{_pct(ci[0])}, {_pct(ci[1])}]"


def _mde(mde: float | None) -> str:
    return "n/a" if mde is None or not math.isfinite(mde) else f"{mde * 100:.1f}%"


def _time(case: Mapping[str, Any]) -> Mapping[str, Any]:
    return case.get("metrics", {}).get("time", {})


def _counts(doc: Mapping[str, Any]) -> str:
    summary = doc.get("summary", {})
    return ", ".join(f"{summary[v]} {v}" for v in _SHOWN if summary.get(v))


def _suite_line(doc: Mapping[str, Any]) -> str:
    suite = doc.get("suite")
    if not suite:
        return "The suite as a whole: not estimated (no case measured in every run on both sides)."
    return (f"The suite as a whole (geometric mean over the cases measured in every run): "
            f"**{_pct(suite['ratio'])}** {_interval(suite.get('ci'))}, {suite['verdict']}; the smallest "
            f"change of the whole suite it could have seen: {_mde(suite.get('mde'))}.")


def _flagged_rows(doc: Mapping[str, Any]) -> list[str]:
    rows = []
    for case in doc.get("cases", []):
        if case["verdict"] not in ("regression", "failed", "missing"):
            continue
        t = _time(case)
        why = "; ".join(r["sentence"] if isinstance(r, Mapping) else str(r) for r in case.get("reasons", []))
        rows.append(f"| `{case['name']}` | **{case['verdict']}** | {_pct(t.get('ratio'))} "
                    f"{_interval(t.get('ci'))} | {_mde(t.get('mde'))} | {why} |")
    return rows


def render(gpu: str, doc: Mapping[str, Any], *, run_url: str | None = None,
           context: Mapping[str, Any] | None = None) -> str:
    """The comment for one GPU type: the gate's verdict ``doc`` (A/B by default), the stored baseline's
    verdict ``context`` beside it when there is one, and a link to the run's artifacts."""
    flagged = _flagged_rows(doc)
    bad = any(doc.get("summary", {}).get(v) for v in ("regression", "failed", "missing"))
    head = "slower, or a case failed" if bad else "no regression found"
    out = [marker(gpu), f"### Performance gate, {gpu}: {head}", ""]
    mode = "A/B, side by side on one runner" if doc.get("paired") else "against the stored baseline"
    out += [f"{doc.get('candidate', 'this pull request')} vs {doc.get('baseline', 'base')} ({mode}): "
            f"{_counts(doc) or 'no case judged'}. Median MDE {_mde(doc.get('mde_median'))} "
            f"(the smallest slowdown of one case this run would catch 80% of the time).", ""]
    out += [_suite_line(doc), ""]
    device = sum(_time(c).get("clock") == "device" for c in doc.get("cases", []))
    if device:
        out += [f"Time judged on the GPU's own clock (CUDA events) for {device} case(s), on the wall clock "
                "for the rest.", ""]
    if flagged:
        out += ["| case | verdict | change [interval] | MDE | why |", "|:--|:--|--:|--:|:--|", *flagged, ""]
    diffs = doc.get("explain") or []
    if diffs:
        out.append("<details><summary>Operators that got slower (profiled on both sides)</summary>\n")
        out.append(explain.render_markdown([explain.OperatorDiff.from_dict(d) for d in diffs]))
        out.append("</details>\n")
    if context is not None:
        out += [f"Context, not the gate: against the stored baseline ({context.get('baseline', '')}): "
                f"{_counts(context) or 'no case judged'}, median MDE {_mde(context.get('mde_median'))}.", ""]
    for change in doc.get("environment_changes", []):
        out.append(f"Environment changed: {change}")
    if run_url:
        out.append(f"Results, study table, verdicts and plots: [the run's artifacts]({run_url}).")
    return "\n".join(out).rstrip() + "\n"


def render_folder(gpu: str, folder: Path, run_url: str | None = None) -> str:
    """The comment from a gate job's results folder: ``verdict-<env>.json`` is the gate, and
    ``context-<env>.json`` (the stored-baseline comparison of an A/B run), when present, its context."""
    verdicts = sorted(folder.glob("verdict-*.json"))
    if not verdicts:
        return (f"{marker(gpu)}\n### Performance gate, {gpu}: no verdict\n\nThe run ended before it judged "
                f"anything; its log says why." + (f" [The run]({run_url})." if run_url else "") + "\n")
    parts = []
    for path in verdicts:
        context = folder / path.name.replace("verdict-", "context-", 1)
        doc = json.loads(path.read_text(encoding="utf-8"))
        ctx = json.loads(context.read_text(encoding="utf-8")) if context.is_file() else None
        parts.append(render(gpu, doc, run_url=run_url, context=ctx))
    return parts[0] + "".join(p.split("\n", 1)[1] for p in parts[1:])  # one marker per comment
