"""Rendering of a comparison (perf_tests/report/verdict.py): every format carries the MDE, the labels, the
canary, the pairing and the case-level counts; plots are written without pyplot state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from perf_tests.analysis import stats as S
from perf_tests.report import verdict as report
from tests.test_stats import ENV, N_CASES, case_name, make_side


@pytest.fixture(scope="module")
def sides():
    rng = np.random.default_rng(0)
    base = make_side(rng, 5, env={**ENV, "torch_version": "2.13.1"})
    cand = make_side(rng, 3, factor=1.3)
    base.canary = [list(rng.lognormal(0, 0.01, 20) * 1e-3) for _ in range(5)]
    cand.canary = [list(rng.lognormal(0, 0.01, 20) * 1.1e-3) for _ in range(3)]
    names = [case_name(i) for i in range(N_CASES)]
    for n in names[1:4]:
        del cand.cases[n]
    cand.failed = {names[1]: "wrong output: max abs error 0.4"}
    cand.skipped = {names[2]: "xformers is not installed"}
    cand.selected = set(names) - {names[3]}
    return base, cand


@pytest.fixture(scope="module")
def cmp(sides):
    return S.compare(*sides)


def test_text_report_shows_mde_labels_canary_and_counts(cmp):
    text = report.render_text(cmp)
    assert "MDE (smallest slowdown caught with 80% power): median" in text
    assert "environment changed: torch 2.13.1 -> 2.14.1" in text
    assert "canary (plain matmul + conv per call, per run)" in text and "plain kernels moved +" in text
    assert "1 FAILED" in text and "1 skipped" in text and "1 not selected" in text
    assert "REGRESSION" in text and "runs are the unit" in text
    assert "wrong output" in text and "xformers is not installed" in text


def test_markdown_report(cmp):
    md = report.render_markdown(cmp)
    assert md.startswith("### ❌ Performance gate:")
    assert "| case | verdict |" in md and "| MDE |" in md
    assert "> environment changed: torch 2.13.1 -> 2.14.1" in md


def test_json_report_round_trips_every_field(cmp):
    doc = json.loads(report.render_json(cmp))
    assert doc["has_failed"] and doc["has_regression"] and not doc["has_missing"]
    assert doc["summary"]["failed"] == 1 and doc["not_selected"] == [case_name(3)]
    assert doc["environment_changes"] == ["torch 2.13.1 -> 2.14.1"]
    assert doc["mde_median"] is not None and doc["mde_worst"] >= doc["mde_median"]
    assert doc["canary"]["ratio"] == pytest.approx(1.1, rel=0.03)
    assert doc["policy_text"] == report.policy_line(cmp)
    first = doc["cases"][0]
    assert first["labels"] == ["environment changed: torch 2.13.1 -> 2.14.1"]
    assert first["metrics"]["time"]["mde"] > 0


def test_blind_gate_is_called_out():
    rng = np.random.default_rng(1)
    cmp = S.compare(make_side(rng, 1), make_side(rng, 1))  # one run a side: only the CPU prior
    assert not cmp.has_regression and cmp.mde_worst > report.BLIND_MDE
    assert "could not have seen a 20% slowdown" in report.render_text(cmp)


def test_pairing_narrowing_is_reported():
    rng = np.random.default_rng(2)
    drift = rng.normal(0, 0.05, 4)
    cmp = S.compare(make_side(rng, 4, run_sd=0.01, drift=drift), make_side(rng, 4, run_sd=0.01, drift=drift),
                    paired=True)
    assert "pairing narrowed the intervals by" in report.render_text(cmp)
    assert json.loads(report.render_json(cmp))["pairing_narrowing"] == pytest.approx(cmp.pairing_narrowing)


def test_plots_of_flagged_cases(cmp, sides, tmp_path):
    pytest.importorskip("matplotlib")
    paths = report.plot_flagged(cmp, *sides, tmp_path)
    assert paths and all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    assert {p.stem for p in paths} >= {"test_unet_step_case0"}
