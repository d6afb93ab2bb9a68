"""perf_tests.tools.parity: the side-by-side harness against diffusers runs every rung and compares outputs.

Times are never asserted; the harness runs on the micro config with 2 rounds of the eager rungs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import micro_config

from perf_tests.cli import main as cli
from perf_tests.tools import parity


def test_ratio_interval_known_answers():
    ours, theirs = [2.0, 4.0, 8.0], [1.0, 2.0, 4.0]  # every pair exactly 2x: no spread
    assert parity.ratio_interval(ours, theirs) == pytest.approx((2.0, 2.0, 2.0))
    ratio, low, high = parity.ratio_interval([1.1, 0.9, 1.05, 0.95], [1.0] * 4)
    assert low < 1.0 < high and ratio == pytest.approx(math.sqrt(1.05 * 0.95))  # median of the log ratios
    # A burst of load on one call of a pair moves the median ratio by one rank, not by the burst.
    calm = parity.ratio_interval([1.0] * 19 + [1.0], [1.1] * 20)
    burst = parity.ratio_interval([1.0] * 19 + [10.0], [1.1] * 20)
    assert burst[0] == pytest.approx(calm[0]) and burst[2] < 1.0


def test_verdict_says_when_the_interval_straddles_the_target():
    assert parity.verdict(0.9, 0.85, 0.95) == "pass"
    assert parity.verdict(1.1, 1.05, 1.15) == "fail"
    assert parity.verdict(0.98, 0.9, 1.05) == "pass, straddles 1"
    assert parity.verdict(1.02, 0.95, 1.1) == "fail, straddles 1"


def test_rungs_cover_the_cpu_ladder_and_patterns_select():
    cpu = torch.device("cpu")
    ids = [str(r) for r in parity.all_rungs(cpu)]
    assert len(ids) == 8
    assert "eager-contiguous-separate-fp32" in ids and "compile-channels-last-fused-fp32" in ids
    assert [str(r) for r in parity.select_rungs(cpu, ["eager-*-separate-*"])] == [
        "eager-contiguous-separate-fp32",
        "eager-channels-last-separate-fp32",
    ]
    with pytest.raises(parity.ParityError, match="matches no rung"):
        parity.select_rungs(cpu, ["eager-nhwc-*"])


def test_a_compiled_rung_is_unavailable_only_without_torch_compile():
    compiled = parity.Rung("compile", "contiguous", "fused", "fp32")
    assert parity.unavailable(parity.Rung("eager", "contiguous", "fused", "fp32")) is None
    if hasattr(torch, "compile"):
        assert parity.unavailable(compiled) is None
    else:
        assert "torch.compile is not available" in parity.unavailable(compiled)


@pytest.mark.oracle
def test_micro_eager_rungs_match_diffusers_and_report_every_rung(tiny_config, tmp_path):
    pytest.importorskip("diffusers", reason="the parity harness compares with diffusers (PyTorch 2 envs)")
    report = parity.run_parity(
        micro_config(tiny_config), batch_size=1, rounds=2, warmup=1, rungs=["eager-*"], latent_side=16
    )
    rungs = {r.rung: r for r in report.results}
    eager = [str(r) for r in parity.all_rungs(torch.device("cpu")) if r.compile == "eager"]
    assert sorted(rungs) == sorted(eager)
    for r in rungs.values():
        if r.status == "unavailable":
            assert r.rung.split("-")[-2] == "fused" and "not available in this tree" in r.reason
            continue
        assert r.status == "measured", r.reason
        assert r.outputs_match and r.max_abs_error < 1e-4
        assert len(r.ours_s) == len(r.theirs_s) == 2 and r.ratio_low <= r.ratio <= r.ratio_high
        assert r.ours_attention == "sdpa"
        assert r.theirs_attention == ("FusedAttnProcessor2_0" if "fused" in r.rung else "AttnProcessor2_0")
    text, markdown = parity.format_report(report, "text"), parity.format_report(report, "markdown")
    data = json.loads(parity.format_report(report, "json"))
    for name in rungs:
        assert name in text and f"| {name} |" in markdown
    assert [row["rung"] for row in data["rungs"]] == [r.rung for r in report.results]
    assert data["settings"]["latent_shape"] == [1, 4, 16, 16]


def test_main_without_diffusers_is_an_error_paragraph(monkeypatch, capsys):
    def missing():
        raise parity.ParityError("diffusers does not import here")

    monkeypatch.setattr(parity, "_diffusers", missing)
    assert cli(["parity", "--rounds", "2", "--rungs", "eager-*"]) == 2
    assert capsys.readouterr().err.startswith("error: diffusers")
