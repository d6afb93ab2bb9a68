"""The environment label of a run (torch1, torch20, torch2), the correction of files written before torch
2.0.x had its own label, and the study's tables across the three environments (perf_tests.report.study)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from perf_json import run_doc, write_run
from scipy import stats as sps

import noxenvs
from perf_tests.__main__ import main
from perf_tests.measure.cases import Case
from perf_tests.records import baselines as B
from perf_tests.records import results as R
from perf_tests.records.names import env_label
from perf_tests.report.study import STUDY_NAMES, build_study_layout

VERSIONS = {"torch1": "1.12.1+cu102", "torch20": "2.0.1+cu117", "torch2": "2.14.1+cpu"}


# --- the label --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version, label", [
    ("1.12.1", "torch1"), ("1.13.0+cpu", "torch1"), ("2.0.0", "torch20"), ("2.0.1+cu117", "torch20"),
    ("2.0.0.dev20230111+cu117", "torch20"),  # the study's nightly
    ("2.1.0", "torch2"), ("2.10.0", "torch2"), ("2.14.1+cu130", "torch2"),
])
def test_the_label_names_the_release_line(version, label):
    assert env_label(version) == label


def test_a_version_that_is_not_one_is_refused():
    with pytest.raises(ValueError, match="not a torch version"):
        env_label("nightly")


@pytest.mark.parametrize("name", sorted(noxenvs.PINS))
def test_each_environment_labels_its_runs_with_its_session_name(name):
    """perf-<name> runs the pinned torch; its runs must carry <name> (results, baselines, the table)."""
    assert env_label(noxenvs.PINS[name]["torch"]) == name


# --- files written before torch20 had its own label -------------------------------------------------------
def _legacy_doc(seed=0, **kw):
    """A torch 2.0.1 run as perf_tests wrote it before: labelled torch2 in machine_info and in every case."""
    return run_doc(seed, machine={"torch_version": "2.0.1+cu117", "env": "torch2"}, **kw)


def test_a_legacy_run_is_read_as_torch20_in_its_machine_and_every_case(tmp_path):
    path = tmp_path / "torch2-run1.json"
    path.write_text(json.dumps(_legacy_doc()))
    run = R.read_run(path)
    assert run.machine["env"] == "torch20"
    assert {c.extra["env"] for c in run.cases.values()} == {"torch20"}


def test_a_legacy_journal_is_corrected_too(tmp_path):
    from perf_json import journal_lines

    path = tmp_path / "torch2-run1.journal.jsonl"
    path.write_text("".join(journal_lines(_legacy_doc())))
    assert R.read_run(path).machine["env"] == "torch20"


@pytest.mark.parametrize("env, version", [("torch1", "2.14.1"), ("torch2", "1.12.1"), ("torch20", "2.14.1")])
def test_any_other_disagreement_of_label_and_release_is_an_error(tmp_path, env, version):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run_doc(0, machine={"torch_version": version, "env": env})))
    with pytest.raises(R.InputError, match=f"machine_info.env: '{env}' does not name the environment"):
        R.read_run(path)


def test_without_a_release_number_the_label_is_kept(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run_doc(0, machine={"torch_version": "local build", "env": "torch2"})))
    assert R.read_run(path).machine["env"] == "torch2"


def test_a_case_labelled_unlike_its_run_is_an_error(tmp_path):
    doc = run_doc(0)
    doc["benchmarks"][0]["extra_info"]["env"] = "torch1"
    path = tmp_path / "run.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(R.InputError, match="extra_info.env"):
        R.read_run(path)


def test_legacy_runs_go_to_the_torch20_baseline_and_never_into_torch2s(tmp_path):
    legacy = tmp_path / "old.json"
    legacy.write_text(json.dumps(_legacy_doc(1)))
    current = write_run(tmp_path / "new.json", 2)  # perf_json's machine: torch 2.14.1, torch2
    B.update_baselines([legacy, current], tmp_path / "baselines")
    folder = tmp_path / "baselines" / "cpu-intel-xeon-processor"
    assert sorted(p.name for p in folder.glob("*.json")) == ["torch2-tiny.json", "torch20-tiny.json"]
    for name, env, version in (("torch2-tiny.json", "torch2", "2.14.1"),
                               ("torch20-tiny.json", "torch20", "2.0.1")):
        doc = json.loads((folder / name).read_text())
        assert doc["env"] == env and len(doc["runs"]) == 1
        assert doc["runs"][0]["machine_info"]["torch_version"].startswith(version)


def _legacy_baseline(tmp_path, name):
    """A torch 2.0.1 baseline as the store wrote it before: env torch2, named torch2-<profile>.json."""
    run = tmp_path / "old.json"
    run.write_text(json.dumps(_legacy_doc(1)))
    B.update_baselines([run], tmp_path / "store")
    written = tmp_path / "store" / "cpu-intel-xeon-processor" / "torch20-tiny.json"
    doc = json.loads(written.read_text())
    doc["env"] = doc["environment"]["env"] = "torch2"
    for r in doc["runs"]:
        r["machine_info"]["env"] = "torch2"
    target = tmp_path / name
    target.write_text(json.dumps(doc))
    return target


def test_a_legacy_baseline_named_for_torch2_is_an_error_that_says_to_rename_it(tmp_path):
    with pytest.raises(R.InputError, match=r"Rename it to torch20-tiny\.json"):
        R.read_baseline(_legacy_baseline(tmp_path, "torch2-tiny.json"))


def test_a_legacy_baseline_under_another_name_is_read_as_torch20(tmp_path):
    baseline = R.read_baseline(_legacy_baseline(tmp_path, "torch20-tiny.json"))
    assert baseline.env == "torch20" and baseline.environment["env"] == "torch20"
    assert {r.machine["env"] for r in baseline.runs} == {"torch20"}


def test_a_baseline_that_mixes_environments_is_an_error(tmp_path):
    B.update_baselines([write_run(tmp_path / "a.json", 1), write_run(tmp_path / "b.json", 2)], tmp_path / "s")
    path = tmp_path / "s" / "cpu-intel-xeon-processor" / "torch2-tiny.json"
    doc = json.loads(path.read_text())
    doc["runs"][1]["machine_info"]["torch_version"] = "2.0.1"  # a 2.0.1 run slipped into the torch2 file
    path.write_text(json.dumps(doc))
    with pytest.raises(R.InputError, match="holds runs of torch20; a baseline holds one environment"):
        R.read_baseline(path)


# --- the study's tables -----------------------------------------------------------------------------------
def bench(env, attention, compile, bs, seconds, compile_s=None):
    c = Case("txt2img", "tiny", attention, compile, bs, "fp32", steps=4, height=384, width=384)
    return {"name": c.name, "stats": {"data": list(seconds)},
            "extra_info": {"case": c.as_dict(), "env": env, "compile_time_s": compile_s,
                           "compile_cache": "cold" if compile_s else None}}


def skip(attention, compile, bs, reason):
    return {"name": Case("txt2img", "tiny", attention, compile, bs, "fp32").name, "reason": reason}


# Per environment and configuration: the median (seconds) of run 1 and of run 2, at batch 1; batch b takes
# b times as long.
TIMES = {
    "torch1": {("original", "eager"): (8.0, 8.4), ("xformers", "eager"): (6.7, 6.9)},
    "torch20": {("sdpa-math", "eager"): (5.7, 5.9), ("sdpa-mem-efficient", "eager"): (5.3, 5.2),
                ("sdpa-mem-efficient", "compile"): (4.1, 4.3)},
    "torch2": {("original", "eager"): (7.0, 7.2), ("sdpa-math", "eager"): (5.0, 5.1),
               ("sdpa-mem-efficient", "eager"): (4.6, 4.8), ("sdpa-mem-efficient", "compile"): (3.9, 3.7)},
}
XFORMERS_MISSING = "xformers is not importable (ModuleNotFoundError: No module named 'xformers')"


def study_docs(xformers_on_torch1=True, legacy_torch20=False):
    docs = []
    for env, points in TIMES.items():
        for i in range(2):
            benches, skipped = [], []
            for (attention, compile), medians in points.items():
                if attention == "xformers" and not xformers_on_torch1:
                    continue
                for bs in (1, 2, 4):
                    t = medians[i] * bs
                    compiled = 30.0 + i if compile == "compile" else None
                    benches.append(bench(env, attention, compile, bs, [t * 0.99, t, t * 1.02], compiled))
            if env == "torch2" or not xformers_on_torch1 and env == "torch1":
                skipped += [skip("xformers", "eager", bs, XFORMERS_MISSING) for bs in (1, 2, 4)]
            label = "torch2" if legacy_torch20 and env == "torch20" else env
            machine = {"env": label, "torch_version": VERSIONS[env],
                       "device_slug": "cpu-intel-xeon-processor"}
            if legacy_torch20 and env == "torch20":
                for b in benches:
                    b["extra_info"]["env"] = "torch2"
            docs.append({"machine_info": machine, "benchmarks": benches,
                         "perf_tests": {"skipped": skipped, "failed": []}})
    return docs


def _runs(tmp_path, **kw):
    paths = []
    for i, doc in enumerate(study_docs(**kw)):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(doc))
    return [R.read_run(p) for p in paths], paths


def _expected(m1, m2):
    """exp(mean log median) of two runs and its 90% t interval (1 df), computed here with scipy."""
    y = np.log([m1, m2])
    half = sps.t.ppf(0.95, 1) * y.std(ddof=1) / math.sqrt(2)
    return math.exp(y.mean()), math.exp(y.mean() - half), math.exp(y.mean() + half)


def test_each_configuration_sits_in_its_column_with_its_interval_and_the_study_reference(tmp_path):
    layout = build_study_layout(_runs(tmp_path)[0])
    assert layout.batch_sizes == [1, 2, 4]
    assert layout.columns == ["study: PyTorch 1.12.1 / 2.0.1", "current: PyTorch 2.14.1"]
    assert layout.references == {1: "original+xformers", 2: "original+xformers", 4: "original+xformers"}
    for col, envs in enumerate((("torch1", "torch1", "torch20", "torch20", "torch20"), ("torch2",) * 5)):
        points = [("original", "eager"), ("xformers", "eager"), ("sdpa-math", "eager"),
                  ("sdpa-mem-efficient", "eager"), ("sdpa-mem-efficient", "compile")]
        for (attention, compile), env in zip(points, envs, strict=True):
            config = {"xformers": "original+xformers"}.get(attention, attention)
            config += "+compile" if compile == "compile" else ""
            for bs in (1, 2, 4):
                cell = layout.cells[(config, col, bs)]
                if (attention, compile) not in TIMES[env]:
                    assert cell.time_s is None and cell.why_not == XFORMERS_MISSING
                    continue
                m1, m2 = TIMES[env][(attention, compile)]
                t, lo, hi = _expected(m1 * bs, m2 * bs)
                assert (cell.time_s, cell.low_s, cell.high_s) == pytest.approx((t, lo, hi))
                ref = _expected(6.7 * bs, 6.9 * bs)[0]
                assert cell.improvement == pytest.approx((ref - t) / ref)
                assert cell.compile_s == (pytest.approx(30.5) if compile == "compile" else None)


def test_the_markdown_is_one_table_per_batch_size_with_the_study_rows(tmp_path):
    md = build_study_layout(_runs(tmp_path)[0]).to_markdown()
    assert [line for line in md.splitlines() if line.startswith("### ")] == [
        f"### txt2img, batch {bs} — tiny, cpu-intel-xeon-processor, fp32" for bs in (1, 2, 4)]
    rows = [line.split(" | ")[0].lstrip("| ") for line in md.splitlines() if line.startswith("| ")]
    assert rows == (["configuration", *STUDY_NAMES.values()]) * 3
    t, lo, hi = _expected(6.7, 6.9)
    row = (f"| original with xFormers | {t:.3f} s [{lo:.3f} s, {hi:.3f} s] (ref) | "
           f"not run: {XFORMERS_MISSING} |")
    assert row in md
    t = _expected(4.1, 4.3)[0]
    assert f" ({(_expected(6.7, 6.9)[0] - t) / _expected(6.7, 6.9)[0] * 100:+.1f}%); compile 30.500 s |" in md
    assert "against the original code with xFormers" in md


def test_without_xformers_the_reference_is_the_original_and_the_table_says_so(tmp_path):
    layout = build_study_layout(_runs(tmp_path, xformers_on_torch1=False)[0])
    assert set(layout.references.values()) == {"original"}
    ref = _expected(8.0, 8.4)[0]
    math_sdpa = _expected(5.7, 5.9)[0]
    assert layout.cells[("sdpa-math", 0, 1)].improvement == pytest.approx((ref - math_sdpa) / ref)
    md = layout.to_markdown()
    assert f"not run: {XFORMERS_MISSING}" in md.split("### txt2img, batch 2")[0]
    assert any("xFormers did not run" in n and "against the original code without it" in n
               for n in layout.notes)


def test_legacy_torch20_runs_fill_the_study_column_not_the_current_one(tmp_path):
    fixed, legacy = (build_study_layout(_runs(tmp_path / d, legacy_torch20=lg)[0])
                     for d, lg in (("a", False), ("b", True)) if (tmp_path / d).mkdir() is None)
    assert legacy.cells == fixed.cells and legacy.columns == fixed.columns


def test_an_environment_left_out_says_so_in_its_cells(tmp_path):
    runs = [r for r in _runs(tmp_path)[0] if r.machine["env"] != "torch1"]
    layout = build_study_layout(runs)
    assert layout.cells[("original", 0, 1)].why_not == "no torch1 run in these files"
    assert layout.columns[0] == "study: PyTorch 2.0.1"
    assert "% =" not in layout.to_markdown()  # no reference: no percentages


def test_one_run_gives_a_time_without_an_interval(tmp_path):
    runs = _runs(tmp_path)[0][::2]  # the first run of each environment
    cell = build_study_layout(runs).cells[("sdpa-math", 0, 1)]
    assert cell.time_s == pytest.approx(5.7) and cell.low_s is None and cell.runs == 1


def test_report_layout_study_writes_the_tables_and_the_figure(tmp_path):
    _, paths = _runs(tmp_path)
    md, png = tmp_path / "study.md", tmp_path / "study.png"
    code = main(["report", *map(str, paths), "--layout", "study", "--output", str(md), "--plot", str(png)])
    assert code == 0
    assert md.read_text().count("### txt2img, batch") == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_of_two_profiles_are_refused(tmp_path):
    runs, _ = _runs(tmp_path)
    other = json.loads(json.dumps(study_docs()[0]))
    for b in other["benchmarks"]:
        b["extra_info"]["case"]["profile"] = "sd21-base"
        b["name"] = b["name"].replace("[tiny-", "[sd21-base-")
    with pytest.raises(R.InputError, match="mix profiles"):
        build_study_layout([*runs, R.run_from_doc(other)])


def test_the_configurations_table_orders_environments_by_release_and_the_ladder_takes_the_newest(tmp_path):
    from perf_tests.report.study import build_ladder, build_study_table

    runs = [r for r in _runs(tmp_path)[0]]
    table = build_study_table(runs)
    labels = [r.label for r in table.rows if r.config == "sdpa-math"]
    assert labels == ["sdpa-math [torch20]", "sdpa-math [torch2]"]
    ladder = build_ladder(runs, kind="txt2img")
    assert ladder.title.endswith("torch2)") and ladder.rungs  # not torch20, which sorts after it as text

