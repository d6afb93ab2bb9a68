"""The gate's command line (python -m perf_tests): exit codes, formats, baselines folder, bad input, A/B."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from perf_json import CASES, journal_lines, run_doc, write_run

from perf_tests.__main__ import main
from perf_tests.analysis import stats
from perf_tests.records import results as R
from perf_tests.tools.compare import exit_code, load_and_compare, write_reports

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv):
    flat = [a for arg in argv for a in (arg if isinstance(arg, list) else [arg])]  # a list: several runs
    code = main([str(a) for a in flat])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def runs(tmp_path, capsys):
    """A baseline merged from 3 runs (separate processes), and candidates of 3 runs each: A/A, and one with
    CASES[1] 20% slower. Runs, not rounds, are the gate's unit of evidence."""
    base = [write_run(tmp_path / f"base{i}.json", i) for i in (1, 2, 3)]
    assert main(["update-baselines", *map(str, base), "--baseline-dir", str(tmp_path / "bl")]) == 0
    capsys.readouterr()  # the tests read only their own output
    return {
        "base": tmp_path / "bl" / "cpu-intel-xeon-processor" / "torch2-tiny.json",
        "base_runs": base,
        "same": [write_run(tmp_path / f"same{i}.json", 10 + i) for i in (1, 2, 3)],
        "slow": [write_run(tmp_path / f"slow{i}.json", 20 + i, slow={CASES[1]: 1.2}) for i in (1, 2, 3)],
    }


def test_aa_compare_exits_0(capsys, runs):
    code, out, _ = run_cli(capsys, "compare", runs["base"], runs["same"])
    assert code == 0
    assert "REGRESSION" not in out and f"{len(CASES)} no change" in out


def test_regression_exits_1_with_effect_table_markdown_json_and_plot(capsys, runs, tmp_path):
    code, out, _ = run_cli(capsys, "compare", runs["base"], runs["slow"])
    assert code == 1
    line = next(x for x in out.splitlines() if x.startswith(CASES[1]))
    assert "REGRESSION" in line and "+2" in line  # about +20%

    code, md, _ = run_cli(capsys, "compare", runs["base"], runs["slow"], "--format", "markdown")
    assert code == 1 and md.startswith("### 🔴 Performance gate") and f"| `{CASES[1]}` | 🔴 REGRESSION" in md

    report = tmp_path / "out" / "cmp.json"
    code, _, err = run_cli(capsys, "compare", runs["base"], runs["slow"], "--format", "json", "--output",
                           report,
                           "--plot-dir", tmp_path / "plots")
    doc = json.loads(report.read_text())
    case = next(c for c in doc["cases"] if c["name"] == CASES[1])
    assert case["verdict"] == "regression" and doc["has_regression"]
    assert case["metrics"]["time"]["ratio"] == pytest.approx(1.2, rel=0.03)
    lo, hi = case["metrics"]["time"]["ci"]
    assert lo < 1.2 < hi
    pngs = list((tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 1 and pngs[0].read_bytes()[:4] == b"\x89PNG" and "plot:" in err


def test_baseline_folder_is_picked_by_device_env_and_profile(capsys, runs, tmp_path):
    code, out, _ = run_cli(capsys, "update-baselines", runs["base_runs"], "--baseline-dir", tmp_path / "bl2")
    assert code == 0 and "3 run(s) added" in out
    code, out, _ = run_cli(capsys, "compare", tmp_path / "bl2", runs["slow"])
    assert code == 1 and "cpu-intel-xeon-processor/torch2-tiny.json" in out


def test_missing_baseline_warns_and_exits_0_unless_required(capsys, runs, tmp_path):
    gpu = write_run(tmp_path / "gpu.json", machine={"device_slug": "nvidia-a100-sxm4-80gb"})
    code, out, err = run_cli(capsys, "compare", tmp_path / "bl", gpu)
    assert code == 0 and out == ""
    assert "warning: no baseline for this device" in err and "nvidia-a100-sxm4-80gb" in err
    assert "Existing baselines:" in err and "cpu-intel-xeon-processor" in err and "update-baselines" in err
    run_cli(capsys, "compare", tmp_path / "bl", gpu, "--format", "markdown", "--output", tmp_path / "v.md")
    assert "No comparison:** no baseline for this device" in (tmp_path / "v.md").read_text()
    code, _, err = run_cli(capsys, "compare", tmp_path / "bl", gpu, "--require-baseline")
    assert code == 2 and err.startswith("error: no baseline")


def test_inconclusive_fails_only_with_the_flag(capsys, runs, tmp_path):
    # +4%: significant with 3 runs a side but inside the ±5% band's edge -> neither regression nor no change
    edge = [write_run(tmp_path / f"e{i}.json", 30 + i, slow={CASES[1]: 1.05}) for i in (1, 2, 3)]
    code, out, _ = run_cli(capsys, "compare", runs["base"], edge)
    line = next(x for x in out.splitlines() if x.startswith(CASES[1]))
    assert code == 0 and "inconclusive" in line
    assert run_cli(capsys, "compare", runs["base"], edge, "--fail-on-inconclusive")[0] == 1


def test_one_run_a_side_is_never_a_regression_by_rounds_alone(capsys, tmp_path):
    base = write_run(tmp_path / "b.json", 1)
    cand = write_run(tmp_path / "c.json", 2, slow={CASES[1]: 1.2})  # 20 rounds each, +20%, tight rounds
    code, out, _ = run_cli(capsys, "compare", base, cand)
    assert code == 0 and "REGRESSION" not in out


def test_environment_change_is_judged_and_labelled(capsys, runs, tmp_path):
    other = [write_run(tmp_path / f"o{i}.json", 40 + i, slow={CASES[1]: 1.5},
                       machine={"torch_version": "2.15.0"})
             for i in (1, 2, 3)]
    code, out, _ = run_cli(capsys, "compare", runs["base"], other)
    assert code == 1 and "REGRESSION" in out  # a PyTorch upgrade is judged, not switched off
    assert "environment changed" in out and "2.14.1" in out and "2.15.0" in out
    gpu = [write_run(tmp_path / f"g{i}.json", 50 + i, slow={CASES[1]: 1.5},
                     machine={"device_slug": "other-cpu"})
           for i in (1, 2, 3)]
    code, out, _ = run_cli(capsys, "compare", runs["base_runs"][0], gpu)
    assert code == 0 and "REGRESSION" not in out  # another device type is incomparable


def test_changed_definition_is_new_not_compared(capsys, runs, tmp_path):
    changed = write_run(tmp_path / "c.json", 3, slow={CASES[1]: 1.5},
                        extra={CASES[1]: {"definition_hash": "0000000000000000"}})
    code, out, _ = run_cli(capsys, "compare", runs["base"], changed)
    assert code == 0 and "changed definition" in out


def test_step_summary_is_appended(capsys, runs, tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    run_cli(capsys, "compare", runs["base"], runs["slow"], "--step-summary")
    text = summary.read_text()
    assert text.startswith("earlier step\n") and "Performance gate" in text


# --- failures fail, missing cases under --require-all, a killed run's journal
# ---------------------------------


@pytest.mark.parametrize("kind", ["wrong-output", "non-finite", "error", "oom"])
def test_a_failed_case_fails_the_gate(capsys, runs, tmp_path, kind):
    failed = write_run(tmp_path / "f.json", 2, failed={CASES[1]: (kind, "something went wrong")})
    code, _, err = run_cli(capsys, "compare", runs["base"], failed)
    assert code == 1, err
    # also where there is no baseline to compare with: a failure needs none
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "compare", tmp_path / "empty", failed)
    assert code == 1 and "no baseline for this device" in err


def test_a_killed_runs_journal_is_compared_on_what_it_finished(capsys, runs, tmp_path):
    journal = tmp_path / "killed.journal.jsonl"
    journal.write_text("".join(journal_lines(run_doc(2), end=False)[:3]))  # start + 2 of 4 cases
    code, out, err = run_cli(capsys, "compare", runs["base"], journal)
    assert code == 0
    assert "killed.journal.jsonl: the run did not finish" in err
    assert f"lacks 2 selected case(s): {CASES[2]}" in err
    code, _, _ = run_cli(capsys, "compare", runs["base"], journal, "--require-all")
    assert code == 1


def test_a_partial_selection_is_judged_on_what_it_selected(runs, tmp_path):
    """A run that selected two cases (e.g. one kind) does not fail --require-all for the cases it left out."""
    part = R.read_run(write_run(tmp_path / "part.json", 2, cases=CASES[:2]))
    outcome = load_and_compare(runs["base"], [tmp_path / "part.json"], stats.Policy())
    assert outcome.candidate.selected == set(CASES[:2]) == set(part.cases)
    assert exit_code(outcome, require_all=True) == 0
    killed = write_run(tmp_path / "killed.json", 2, cases=CASES[:2])
    doc = json.loads(killed.read_text())
    doc["perf_tests"]["selected"] = list(CASES[:3])  # selected three, produced two
    killed.write_text(json.dumps(doc))
    assert exit_code(load_and_compare(runs["base"], [killed], stats.Policy()), require_all=True) == 1


def test_a_crash_inside_the_gate_exits_2_never_1(capsys, runs, monkeypatch):
    def broken(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(stats, "compare", broken)
    code, _, err = run_cli(capsys, "compare", runs["base"], runs["slow"])
    assert code == 2 and err.startswith("error: internal error") and "ZeroDivisionError" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_every_format_is_rendered_once_into_the_report_dir(capsys, runs, tmp_path):
    code, out, err = run_cli(capsys, "compare", runs["base"], runs["slow"], "--report-dir", tmp_path / "rep",
                             "--stem", "verdict-torch2-tiny")
    assert code == 1
    names = sorted(p.name for p in (tmp_path / "rep").iterdir())
    assert names == ["plots-verdict-torch2-tiny", "verdict-torch2-tiny.json", "verdict-torch2-tiny.md",
                     "verdict-torch2-tiny.txt"]
    assert (tmp_path / "rep" / "verdict-torch2-tiny.txt").read_text() == out
    assert json.loads((tmp_path / "rep" / "verdict-torch2-tiny.json").read_text())["has_regression"]
    assert len(list((tmp_path / "rep" / "plots-verdict-torch2-tiny").glob("*.png"))) == 1
    outcome = load_and_compare(runs["base"], runs["same"], stats.Policy())
    written = write_reports(outcome, tmp_path / "aa", "v")
    assert sorted(written) == ["json", "markdown", "text"]  # no flagged case, no plot


# --- bad input: message and exit code 2
# ----------------------------------------------------------------------


def _bad_files(tmp_path):
    full = json.dumps(run_doc())
    nodata = run_doc()
    for b in nodata["benchmarks"]:
        del b["stats"]["data"]
    newer = {"schema": "sd-perf-baseline", "schema_version": 99, "runs": [], "cases": {}}
    files = {
        "truncated": (full[:200], "not valid JSON"),
        "nodata": (json.dumps(nodata), "--benchmark-save-data"),
        "schema": (json.dumps(newer), "unknown baseline schema version 99"),
        "other": ('{"hello": 1}', "neither a pytest-benchmark JSON"),
    }
    out = {}
    for name, (text, message) in files.items():
        (tmp_path / f"{name}.json").write_text(text)
        out[name] = (tmp_path / f"{name}.json", message)
    out["absent"] = (tmp_path / "absent.json", "no such file")
    return out


@pytest.mark.parametrize("which", ["truncated", "nodata", "schema", "other", "absent"])
@pytest.mark.parametrize("side", ["baseline", "candidate"])
def test_bad_input_exits_2_with_its_message(capsys, runs, tmp_path, which, side):
    bad, message = _bad_files(tmp_path)[which]
    args = (bad, runs["same"]) if side == "baseline" else (runs["base"], bad)
    code, out, err = run_cli(capsys, "compare", *args)
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_bad_input_to_update_baselines_exits_2(capsys, tmp_path):
    bad, message = _bad_files(tmp_path)["nodata"]
    code, _, err = run_cli(capsys, "update-baselines", bad, "--baseline-dir", tmp_path / "bl")
    assert code == 2 and message in err and not (tmp_path / "bl").exists()


@pytest.mark.parametrize("argv", [["compare"], ["compare", "a.json", "b.json", "--alpha", "2"],
                                  ["frobnicate"],
                                  ["compare", "a.json", "b.json", "--format", "yaml"],
                                  ["compare", "a.json", "b.json", "--", "-x"],
                                  ["compare", "a.json", "b.json", "--machine-case-sd", "-0.1"]])
def test_usage_errors_exit_2(capsys, runs, argv):
    files = {"a.json": str(runs["base"]), "b.json": str(runs["same"][0])}
    argv = [files.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as exc:
        code = main(argv)
        raise SystemExit(code)
    assert exc.value.code == 2


def test_machine_case_sd_option_sets_the_policy_for_every_device_type():
    from perf_tests.cli import build_parser
    from perf_tests.cli.options import build_policy

    args = build_parser().parse_args(["compare", "a.json", "b.json", "--machine-case-sd", "0.05"])
    policy = build_policy(args)
    assert policy.machine_case_sd({"device_type": "cpu"}) == 0.05
    assert policy.machine_case_sd({"device_type": "cuda"}) == 0.05
    default = build_policy(build_parser().parse_args(["compare", "a.json", "b.json"]))
    assert default.machine_case_sd({"device_type": "cpu"}) == 0.20


def test_module_entry_point_and_exit_code(runs):
    res = subprocess.run([sys.executable, "-m", "perf_tests", "compare", str(runs["base"]), *map(str,
                                                                                                 runs["slow"]),
                          "--format", "markdown"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 1, res.stderr
    assert "REGRESSION" in res.stdout


# --- report (the study table of the perf suite) --------------------------------------------------------


def test_report_writes_study_table_and_plot(capsys, runs, tmp_path):
    pytest.importorskip("perf_tests.report.study")
    code, _, err = run_cli(capsys, "report", runs["base_runs"], "--output", tmp_path / "study.md", "--plot",
                           tmp_path / "study.png")
    assert code == 0, err
    assert "original" in (tmp_path / "study.md").read_text()
    assert list(tmp_path.glob("study*.png"))
