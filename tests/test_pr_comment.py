"""The pull request's comment, rendered from recorded runs: an A/B comparison with one case slowed down,
its operator diff, and the stored-baseline comparison beside it."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from perf_json import CASES, write_run  # noqa: E402

from perf_tests.analysis import stats  # noqa: E402
from perf_tests.records import results as R  # noqa: E402
from perf_tests.report import pr_comment  # noqa: E402
from perf_tests.report.verdict import to_dict  # noqa: E402
from perf_tests.tools import explain  # noqa: E402

SLOW = CASES[2]


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


@pytest.fixture
def gate_folder(tmp_path):
    """A gate job's results folder: the A/B verdict (the pull request 30% slower on one case, 4 pairs)
    with the operator diff of the flagged case, and the stored-baseline comparison as context."""
    a = [write_run(tmp_path / f"a{s}.json", s, slow={SLOW: 1.3}) for s in (1, 2, 3, 4)]
    b = [write_run(tmp_path / f"b{s}.json", s + 10) for s in (1, 2, 3, 4)]
    cmp = stats.compare(R.load_side(b, "merge base (4 runs)")[0], R.load_side(a, "pull request (4 runs)")[0],
                        paired=True)
    ops = {"aten::_softmax": {"self_us": 100.0, "calls": 16}, "aten::bmm": {"self_us": 300.0, "calls": 32}}
    slow_ops = {**ops, "aten::_softmax": {"self_us": 190.0, "calls": 16}}
    meta = {"device": "cuda", "unit": "one UNet step", "calls": 10}
    diff = explain.diff_summaries(SLOW, [{"step_us": 400.0, "operators": ops, **meta}] * 2,
                                  [{"step_us": 490.0, "operators": slow_ops, **meta}] * 2,
                                  labels=("base", "head"))
    doc = {**to_dict(cmp), **explain.to_dict([diff])}
    out = tmp_path / "results"
    out.mkdir()
    (out / "verdict-torch2.json").write_text(json.dumps(doc))
    context = stats.compare(R.load_side(b[:3], "baselines/cpu/torch2-tiny.json")[0], R.load_side(a, "A")[0])
    (out / "context-torch2.json").write_text(json.dumps(to_dict(context)))
    return out, cmp


def test_the_comment_names_each_regression_with_its_interval_and_mde(gate_folder):
    folder, cmp = gate_folder
    body = pr_comment.render_folder("h100", folder, run_url="https://ci.example/run/1")
    assert body.startswith(pr_comment.marker("h100") + "\n### Performance gate, h100: slower")
    (slow,) = [c for c in cmp.cases if c.name == SLOW]
    assert slow.verdict == stats.REGRESSION
    t = slow.metrics["time"]
    row = next(line for line in body.splitlines() if line.startswith(f"| `{SLOW}`"))
    assert "**regression**" in row
    assert f"{_pct(t.ratio)} [{_pct(t.ci[0])}, {_pct(t.ci[1])}]" in row
    assert f"{t.mde * 100:.1f}%" in row
    flagged = [line for line in body.splitlines() if line.startswith("| `")]
    assert len(flagged) == sum(c.verdict == stats.REGRESSION for c in cmp.cases)  # only what is flagged
    assert "A/B, side by side" in body and "https://ci.example/run/1" in body


def test_the_comment_gives_the_suites_geometric_mean_with_its_interval(gate_folder):
    folder, cmp = gate_folder
    body = pr_comment.render_folder("h100", folder)
    s = cmp.suite
    line = next(line for line in body.splitlines() if line.startswith("The suite as a whole"))
    assert f"**{_pct(s.ratio)}** [{_pct(s.ci[0])}, {_pct(s.ci[1])}]" in line and s.verdict in line
    # one case of four 30% slower: the suite's mean log change is a quarter of that case's
    ratios = [c.metrics["time"].ratio for c in cmp.cases if "time" in c.metrics]
    assert len(ratios) == 4
    assert s.ratio == pytest.approx(math.exp(sum(map(math.log, ratios)) / 4), rel=0.02)


def test_the_comment_carries_the_operator_diff_and_the_stored_baseline_as_context(gate_folder):
    folder, _ = gate_folder
    body = pr_comment.render_folder("h100", folder)
    assert "<details><summary>Operators that got slower" in body
    softmax = next(line for line in body.splitlines() if "`aten::_softmax`" in line)
    assert softmax.startswith("| +0.090 | 0.100 | 0.190 |")  # ms per step: 190 - 100 us added
    assert "Context, not the gate: against the stored baseline (baselines/cpu/torch2-tiny.json)" in body
    assert body.count("<!-- sd-perf-gate:") == 1


def test_a_run_without_a_verdict_still_says_so(tmp_path):
    body = pr_comment.render_folder("a100", tmp_path, run_url="https://ci.example/run/2")
    assert body.startswith(pr_comment.marker("a100")) and "no verdict" in body and "run/2" in body
