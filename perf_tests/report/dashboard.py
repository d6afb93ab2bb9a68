"""``python -m perf_tests dashboard``: a static HTML site of the store, a page per device type and env.

    python -m perf_tests dashboard OUT_DIR [--store PATH|URL] [--commit-url https://host/o/r/commit/{sha}]

Plain HTML with inline SVG: no script library, no CDN, no server; it opens from disk or any static host.
Per case: the median over runs of each commit's run medians, with the range of its runs, the change points
of ``history`` (red, dashed) and the environment changes (blue, dotted), each point linking to its commit.
``index.html`` lists the pages with the latest commit's verdicts against the commit before it.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from perf_tests.analysis.history import ChangePoint, Series, find_steps, load_series
from perf_tests.analysis.stats import DEFAULT_ENV_FIELDS, CaseSamples, Comparison, Policy, Side, compare
from perf_tests.records.store import Store, describe

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 760, 190, 64, 12, 14, 26
# Writes each plot's drawn extent into <body data-layout>: a headless browser's DOM dump says what rendered.
LAYOUT_SCRIPT = """<script>
window.addEventListener("load", () => {
  const plots = [...document.querySelectorAll("svg.plot")].map(svg => {
    const r = svg.getBoundingClientRect(), line = svg.querySelector(".series");
    const box = line ? line.getBBox() : null;
    return {case: svg.dataset.case, x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height,
            points: svg.querySelectorAll(".point").length,
            line_w: box ? box.width : 0, line_h: box ? box.height : 0};
  });
  document.body.dataset.layout = JSON.stringify({height: document.documentElement.scrollHeight, plots});
});
</script>"""
STYLE = """<style>
body{font:14px system-ui,sans-serif;margin:16px;color:#222;background:#fff}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
h2{font-size:15px;margin:18px 0 4px;font-family:monospace}.note{color:#666}
</style>"""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def page_name(series: Series) -> str:
    return f"{_slug(series.device_slug)}-{_slug(series.env)}.html"


def _env_changes(series: Series) -> list[tuple[int, str]]:
    out = []
    for i in range(1, len(series.commits)):
        a, b = series.environments[i - 1], series.environments[i]
        diff = [f"{f} {a.get(f)} -> {b.get(f)}" for f in DEFAULT_ENV_FIELDS if a.get(f) != b.get(f)]
        if diff:
            out.append((i, "; ".join(diff)))
    return out


def plot_svg(
    series: Series,
    case: str,
    steps: Sequence[ChangePoint],
    env_changes: Sequence[tuple[int, str]],
    commit_url: str | None,
) -> str:
    """One case: commit index on x, milliseconds on a log scale on y."""
    by_commit = series.medians[case]
    idx = sorted(by_commit)
    mid = np.array([np.median(by_commit[i]) for i in idx]) * 1e3
    lo = np.array([min(by_commit[i]) for i in idx]) * 1e3
    hi = np.array([max(by_commit[i]) for i in idx]) * 1e3
    n = max(len(series.commits) - 1, 1)
    y_lo, y_hi = np.log(lo.min() * 0.97), np.log(hi.max() * 1.03)
    span = max(y_hi - y_lo, 1e-9)

    def x(i: float) -> float:
        return PAD_L + (W - PAD_L - PAD_R) * i / n

    def y(ms: float) -> float:
        return PAD_T + (H - PAD_T - PAD_B) * (1 - (np.log(ms) - y_lo) / span)

    parts = [
        f'<svg class="plot" data-case="{html.escape(case)}" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" xmlns="http://www.w3.org/2000/svg" role="img">',
        f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" height="{H - PAD_T - PAD_B}" '
        'fill="#fafafa" stroke="#ccc"/>',
    ]
    for ms in (lo.min(), float(np.median(mid)), hi.max()):
        parts.append(
            f'<text x="{PAD_L - 4}" y="{y(ms) + 4:.1f}" font-size="10" text-anchor="end">{ms:.3g} ms</text>'
        )
    parts.append(
        f'<text x="{PAD_L}" y="{H - 8}" font-size="10">{html.escape(series.commits[0][:8])}</text>'
    )
    parts.append(
        f'<text x="{W - PAD_R}" y="{H - 8}" font-size="10" text-anchor="end">'
        f"{html.escape(series.commits[-1][:8])} ({len(series.commits)} commits)</text>"
    )
    for i, what in env_changes:
        parts.append(
            f'<line class="env-change" x1="{x(i - 0.5):.1f}" x2="{x(i - 0.5):.1f}" y1="{PAD_T}" '
            f'y2="{H - PAD_B}" stroke="#1f5fbf" stroke-dasharray="2,3"><title>environment: '
            f"{html.escape(what)}</title></line>"
        )
    for s in steps:
        ratio = f"{s.ratio - 1:+.1%}" if s.ratio else "?"
        ci = f" [{s.ci[0] - 1:+.1%}, {s.ci[1] - 1:+.1%}]" if s.ci else ""
        parts.append(
            f'<line class="change-point" x1="{x(s.index - 0.5):.1f}" x2="{x(s.index - 0.5):.1f}" '
            f'y1="{PAD_T}" y2="{H - PAD_B}" stroke="#c0392b" stroke-width="2" stroke-dasharray="6,3">'
            f"<title>{html.escape(f'{s.before[:12]}..{s.after[:12]} {ratio}{ci} {s.verdict}')}</title></line>"
        )
    for i, a, b in zip(idx, lo, hi, strict=True):
        parts.append(
            f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{y(a):.1f}" y2="{y(b):.1f}" stroke="#999"/>'
        )
    points = " ".join(f"{x(i):.1f},{y(m):.1f}" for i, m in zip(idx, mid, strict=True))
    parts.append(
        f'<polyline class="series" points="{points}" fill="none" stroke="#333" stroke-width="1.5"/>'
    )
    for i, m in zip(idx, mid, strict=True):
        sha = series.commits[i]
        dot = (
            f'<circle class="point" cx="{x(i):.1f}" cy="{y(m):.1f}" r="3" fill="#333">'
            f"<title>{sha[:12]}: {m:.4g} ms ({len(by_commit[i])} runs)</title></circle>"
        )
        parts.append(
            f'<a href="{html.escape(commit_url.format(sha=sha))}">{dot}</a>' if commit_url else dot
        )
    parts.append("</svg>")
    return "".join(parts)


def latest_verdicts(series: Series, policy: Policy) -> Comparison | None:
    """The latest commit's runs against the commit's before it, every case at once."""
    if len(series.commits) < 2:
        return None
    sides = []
    for i, label in (
        (len(series.commits) - 2, series.commits[-2][:12]),
        (len(series.commits) - 1, series.commits[-1][:12]),
    ):
        cases = {}
        for case, by_commit in series.medians.items():
            if i in by_commit:
                cases[case] = CaseSamples(
                    case,
                    [[m] for m in by_commit[i]],
                    run_machines=series.machines(case, i),
                    case={"kind": series.kinds.get(case, "")},
                )
        n = max((len(c.runs) for c in cases.values()), default=0)
        machines = next((c.run_machines for c in cases.values() if len(c.runs) == n), [])
        sides.append(Side(label, dict(series.environments[i]), cases, n_runs=n, machines=list(machines)))
    return compare(sides[0], sides[1], policy)


def _page(title: str, body: str) -> str:
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"{STYLE}</head><body>{body}{LAYOUT_SCRIPT}</body></html>\n"
    )


def build(
    store: Store,
    out: Path,
    *,
    commit_url: str | None = None,
    branch: str | None = None,
    policy: Policy | None = None,
) -> list[Path]:
    """Write index.html and one page per device type and environment into ``out``; the pages written."""
    policy = policy or Policy()
    out.mkdir(parents=True, exist_ok=True)
    rows, written = [], []
    for slug, device_type, env, _ in store.groups():
        if not slug or not env:
            continue
        series = load_series(store, slug, env, branch)
        if not series.commits:
            continue
        steps = find_steps(series, policy)
        env_changes = _env_changes(series)
        body = [
            f"<h1>{html.escape(slug)} ({html.escape(str(device_type))}), {html.escape(env)}</h1>",
            f'<p class="note">{len(series.commits)} commits, {len(series.medians)} cases. Dots: median of '
            "each commit's run medians (range of its runs as a bar); red dashed: change points; blue dotted: "
            'environment changes. <a href="index.html">all pages</a></p>',
        ]
        for case in sorted(series.medians):
            mine = [s for s in steps if s.case == case]
            body.append(f'<h2 id="{_slug(case)}">{html.escape(case)}</h2>')
            body.append(plot_svg(series, case, mine, env_changes, commit_url))
        name = page_name(series)
        (out / name).write_text(_page(f"{slug} {env}", "".join(body)), encoding="utf-8")
        written.append(out / name)
        cmp = latest_verdicts(series, policy)
        counts = (
            ", ".join(
                f"{v} {cmp.count(v)}"
                for v in ("regression", "improvement", "no-change", "inconclusive")
                if cmp and cmp.count(v)
            )
            if cmp
            else "one commit only"
        )
        flagged = [c.name for c in cmp.cases if c.verdict == "regression"] if cmp else []
        rows.append(
            f'<tr><td><a href="{name}">{html.escape(slug)}</a></td><td>{html.escape(env)}</td>'
            f"<td>{len(series.commits)}</td><td>{html.escape(series.commits[-1][:12])}</td>"
            f"<td>{html.escape(counts)}</td><td>{html.escape(', '.join(flagged)) or '-'}</td>"
            f"<td>{len(steps)}</td></tr>"
        )
    index = (
        "<h1>sd-perf history</h1>"
        f'<p class="note">store: {html.escape(describe(store.location))}. Latest verdicts: the latest commit '
        "against the one before it.</p><table><tr><th>device</th><th>env</th><th>commits</th><th>latest</th>"
        "<th>latest verdicts</th><th>regressions</th><th>change points</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    (out / "index.html").write_text(_page("sd-perf history", index), encoding="utf-8")
    return [out / "index.html", *written]
