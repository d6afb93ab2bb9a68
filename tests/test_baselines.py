"""Baseline store (perf_tests/baselines.py): layout, merging of runs, atomic writes, clear load errors."""

from __future__ import annotations

import json
import os

import pytest
from perf_json import CASES, run_doc, write_run

from perf_tests import baselines as B


def _baseline_file(tmp_path):
    return tmp_path / "baselines" / "cpu-intel-xeon-processor" / "torch2-tiny.json"


def test_update_writes_device_env_profile_file_with_raw_samples(tmp_path):
    r1, r2 = write_run(tmp_path / "r1.json", 1), write_run(tmp_path / "r2.json", 2)
    written = B.update_baselines([r1, r2], tmp_path / "baselines")
    target = _baseline_file(tmp_path)
    assert [p for p, _, _ in written] == [target]
    doc = json.loads(target.read_text())
    assert doc["schema"] == B.SCHEMA and doc["schema_version"] == B.SCHEMA_VERSION
    assert (doc["device_slug"], doc["env"], doc["profile"]) == ("cpu-intel-xeon-processor", "torch2", "tiny")
    assert doc["environment"]["torch_version"] == "2.14.1"
    assert [r["source"] for r in doc["runs"]] == ["r1.json", "r2.json"]
    case = doc["cases"][CASES[0]]
    assert case["definition_hash"] and case["case"]["profile"] == "tiny"
    assert [r["run"] for r in case["runs"]] == [0, 1]
    assert case["runs"][0]["samples"] == run_doc(1)["benchmarks"][0]["stats"]["data"]
    # reviewable: one line per sample list, not one line per number
    assert sum(1 for line in target.read_text().splitlines() if '"samples"' in line) == 2 * len(CASES)

    side = B.load_side([target])
    assert side.n_runs == 2 and len(side.cases[CASES[0]].runs) == 2
    assert side.cases[CASES[3]].compile_time_s == [12.0, 12.0]


def test_update_adds_runs_then_replace_starts_anew(tmp_path):
    base = tmp_path / "baselines"
    B.update_baselines([write_run(tmp_path / "r1.json", 1)], base)
    B.update_baselines([write_run(tmp_path / "r2.json", 2)], base)
    assert len(json.loads(_baseline_file(tmp_path).read_text())["runs"]) == 2
    B.update_baselines([write_run(tmp_path / "r3.json", 3)], base, replace=True)
    assert [r["source"] for r in json.loads(_baseline_file(tmp_path).read_text())["runs"]] == ["r3.json"]


def test_changed_definition_drops_the_stale_runs_with_a_note(tmp_path):
    base = tmp_path / "baselines"
    B.update_baselines([write_run(tmp_path / "r1.json", 1)], base)
    r2 = write_run(tmp_path / "r2.json", 2, extra={CASES[0]: {"definition_hash": "feedfacefeedface"}})
    (_, doc, notes), = B.update_baselines([r2], base)
    assert doc["cases"][CASES[0]]["definition_hash"] == "feedfacefeedface"
    assert [r["run"] for r in doc["cases"][CASES[0]]["runs"]] == [1]
    assert len(doc["cases"][CASES[1]]["runs"]) == 2
    assert any(CASES[0] in n and "definition changed" in n for n in notes)


def test_runs_are_split_by_profile(tmp_path):
    cases = (CASES[0], "test_unet_step[sd21-base-sdpa-eager-bs1-fp32]")
    written = B.update_baselines([write_run(tmp_path / "r.json", cases=cases)], tmp_path / "b")
    assert sorted(p.name for p, _, _ in written) == ["torch2-sd21-base.json", "torch2-tiny.json"]


def test_environment_change_is_not_merged_silently(tmp_path):
    base = tmp_path / "baselines"
    B.update_baselines([write_run(tmp_path / "r1.json", 1)], base)
    r2 = write_run(tmp_path / "r2.json", 2, machine={"torch_version": "2.15.0"})
    with pytest.raises(B.InputError, match=r"torch_version.*--replace"):
        B.update_baselines([r2], base)
    B.update_baselines([r2], base, replace=True)


def test_wrong_output_never_becomes_a_baseline(tmp_path):
    r = write_run(tmp_path / "r.json", extra={CASES[1]: {"correct": False}})
    with pytest.raises(B.InputError, match="wrong output"):
        B.update_baselines([r], tmp_path / "baselines")
    assert not (tmp_path / "baselines").exists()


def test_run_without_device_slug_is_refused(tmp_path):
    r = write_run(tmp_path / "r.json", machine={"device_slug": None})
    with pytest.raises(B.InputError, match="device_slug"):
        B.update_baselines([r], tmp_path / "baselines")


@pytest.mark.parametrize("where", ["write", "replace"])
def test_interrupted_update_leaves_previous_baseline_intact(tmp_path, monkeypatch, where):
    base = tmp_path / "baselines"
    B.update_baselines([write_run(tmp_path / "r1.json", 1)], base)
    target = _baseline_file(tmp_path)
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("interrupted midway")

    if where == "write":  # dies after the new document went into the temporary file, before the rename
        monkeypatch.setattr(B.os, "fsync", boom)
    else:  # dies at the rename
        monkeypatch.setattr(B.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        B.update_baselines([write_run(tmp_path / "r2.json", 2)], base)
    assert target.read_bytes() == before
    assert os.listdir(target.parent) == [target.name]  # no temporary file left behind
    assert B.load_side([target]).n_runs == 1


def test_atomic_write_creates_folders(tmp_path):
    B.atomic_write_json(tmp_path / "a" / "b" / "x.json", {"k": [1, 2], "d": {"e": None}})
    assert json.loads((tmp_path / "a" / "b" / "x.json").read_text()) == {"k": [1, 2], "d": {"e": None}}


# --- load errors: each with its own clear message ---------------------------------------------------------


def _write(tmp_path, text, name="bad.json"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_truncated_json(tmp_path):
    full = json.dumps(run_doc())
    with pytest.raises(B.InputError, match=r"not valid JSON .*truncated"):
        B.load_side([_write(tmp_path, full[: len(full) // 2])])


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(B.InputError, match="empty"):
        B.load_side([_write(tmp_path, "")])
    with pytest.raises(B.InputError, match="no such file"):
        B.load_side([tmp_path / "nope.json"])
    with pytest.raises(B.InputError, match="expected a JSON object"):
        B.load_side([_write(tmp_path, "[1, 2]")])


def test_file_without_raw_samples_explains_save_data(tmp_path):
    doc = run_doc()
    for b in doc["benchmarks"]:
        del b["stats"]["data"]
    with pytest.raises(B.InputError, match=r"no raw samples.*--benchmark-save-data"):
        B.load_side([_write(tmp_path, json.dumps(doc))])


def test_neither_run_nor_baseline(tmp_path):
    with pytest.raises(B.InputError, match="neither a pytest-benchmark JSON"):
        B.load_side([_write(tmp_path, '{"foo": 1}')])
    with pytest.raises(B.InputError, match="no benchmarks"):
        B.load_side([_write(tmp_path, '{"benchmarks": []}')])


@pytest.mark.parametrize("version,hint", [(2, "newer perf_tests"), (0, "--replace"), ("x", "--replace")])
def test_unknown_schema_version(tmp_path, version, hint):
    B.update_baselines([write_run(tmp_path / "r1.json", 1)], tmp_path / "baselines")
    doc = json.loads(_baseline_file(tmp_path).read_text())
    doc["schema_version"] = version
    with pytest.raises(B.InputError, match=f"unknown baseline schema version.*{hint}"):
        B.load_side([_write(tmp_path, json.dumps(doc))])


def test_corrupt_baseline_without_samples(tmp_path):
    B.update_baselines([write_run(tmp_path / "r1.json", 1)], tmp_path / "baselines")
    doc = json.loads(_baseline_file(tmp_path).read_text())
    doc["cases"][CASES[0]]["runs"][0]["samples"] = []
    with pytest.raises(B.InputError, match="no raw samples"):
        B.load_side([_write(tmp_path, json.dumps(doc))])


def test_runs_from_different_environments_are_not_merged_into_one_side(tmp_path):
    r1 = write_run(tmp_path / "r1.json", 1)
    r2 = write_run(tmp_path / "r2.json", 2, machine={"device_slug": "nvidia-h100-80gb-hbm3"})
    with pytest.raises(B.InputError, match="different environments"):
        B.load_side([r1, r2])


def test_missing_baseline_names_existing_ones_and_how_to_create(tmp_path):
    B.update_baselines([write_run(tmp_path / "r1.json", 1)], tmp_path / "baselines")
    side = B.load_side([write_run(tmp_path / "gpu.json", machine={"device_slug": "nvidia-a100-sxm4-80gb"})])
    with pytest.raises(B.MissingBaseline) as exc:
        B.locate_baselines(tmp_path / "baselines", side, ["tiny"])
    msg = str(exc.value)
    assert "nvidia-a100-sxm4-80gb/torch2-tiny.json" in msg
    assert "cpu-intel-xeon-processor/torch2-tiny.json" in msg and "update-baselines" in msg
