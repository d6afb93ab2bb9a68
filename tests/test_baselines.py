"""Baseline store (perf_tests/records/baselines.py): layout, merging of runs, de-duplication, atomic writes,
and concurrent or killed writers, for real (subprocesses, SIGKILL)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from perf_json import CASES, run_doc, write_journal, write_run

from perf_tests.__main__ import main
from perf_tests.records import baselines as B
from perf_tests.records import results as R

REPO = Path(__file__).resolve().parents[1]


def _baseline_file(tmp_path):
    return tmp_path / "baselines" / "cpu-intel-xeon-processor" / "torch2-tiny.json"


def test_update_writes_device_env_profile_file_with_raw_samples(tmp_path):
    r1, r2 = write_run(tmp_path / "r1.json", 1), write_run(tmp_path / "r2.json", 2)
    written = B.update_baselines([r1, r2], tmp_path / "baselines")
    target = _baseline_file(tmp_path)
    assert [u.path for u in written] == [target] and written[0].added == ["r1.json", "r2.json"]
    doc = json.loads(target.read_text())
    assert doc["schema"] == B.SCHEMA and doc["schema_version"] == B.SCHEMA_VERSION
    assert (doc["device_slug"], doc["env"], doc["profile"]) == ("cpu-intel-xeon-processor", "torch2", "tiny")
    assert doc["environment"]["torch_version"] == "2.14.1"
    assert [r["source"] for r in doc["runs"]] == ["r1.json", "r2.json"]
    assert [r["machine_id"] for r in doc["runs"]] == ["a1b2c3d4e5f6"] * 2
    assert len({r["content_hash"] for r in doc["runs"]}) == 2 and len(doc["runs"][0]["canary"]) == len(CASES)
    case = doc["cases"][CASES[0]]
    assert case["definition_hash"] and case["case"]["profile"] == "tiny"
    assert [r["run"] for r in case["runs"]] == [0, 1]
    assert case["runs"][0]["samples"] == run_doc(1)["benchmarks"][0]["stats"]["data"]
    # reviewable: one line per sample list, not one line per number
    assert sum(1 for line in target.read_text().splitlines() if '"samples"' in line) == 2 * len(CASES)

    compiled = doc["cases"][CASES[3]]["runs"][0]
    assert (compiled["compile_cache"], compiled["iterations"], compiled["compile_time_s"]) == ("cold", 1,
                                                                                               12.0)

    side = R.side_from_baseline(R.read_baseline(target), "b")
    assert side.n_runs == 2 and len(side.cases[CASES[0]].runs) == 2
    assert side.cases[CASES[3]].compile_time_s == [12.0, 12.0]
    assert side.cases[CASES[3]].compile_cache == ["cold", "cold"]
    assert side.machines == ["a1b2c3d4e5f6"] * 2 and side.selected is None


def test_baseline_round_trips_through_the_reader(tmp_path):
    """What the writer stores is what the reader gives back, run by run."""
    r1 = write_run(tmp_path / "r1.json", 1)
    (update,) = B.update_baselines([r1], tmp_path / "baselines")
    back = R.read_baseline(update.path)
    assert back.schema_version == B.SCHEMA_VERSION == 2
    (run,) = back.runs
    orig = R.read_run(r1)
    assert run.cases == orig.cases.__class__({n: dataclasses.replace(c, extra=run.cases[n].extra)
                                              for n, c in orig.cases.items()})
    assert run.content_hash == orig.content_hash and run.canary == orig.canary


def test_version_1_baselines_are_read_and_upgraded_on_update(tmp_path):
    (update,) = B.update_baselines([write_run(tmp_path / "r1.json", 1)], tmp_path / "baselines")
    doc = json.loads(update.path.read_text())
    doc["schema_version"] = 1
    for run in doc["runs"]:
        for key in ("machine_id", "content_hash", "canary", "grid_name"):
            del run[key]
    for case in doc["cases"].values():
        del case["vae_attention_used"]
        for r in case["runs"]:
            del r["iterations"], r["compile_cache"], r["correct"]
    update.path.write_text(json.dumps(doc))
    old = R.read_baseline(update.path)
    assert old.schema_version == 1 and old.runs[0].cases[CASES[0]].iterations == 1
    # the same run again is recognised by the hash of its samples, even in a version 1 file
    (again,) = B.update_baselines([tmp_path / "r1.json", write_run(tmp_path / "r2.json", 2)],
                                  tmp_path / "baselines")
    assert again.duplicates == ["r1.json"] and again.added == ["r2.json"]
    assert json.loads(update.path.read_text())["schema_version"] == 2


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
    (update,) = B.update_baselines([r2], base)
    doc, notes = json.loads(update.path.read_text()), update.notes
    assert doc["cases"][CASES[0]]["definition_hash"] == "feedfacefeedface"
    assert [r["run"] for r in doc["cases"][CASES[0]]["runs"]] == [1]
    assert len(doc["cases"][CASES[1]]["runs"]) == 2
    assert any(CASES[0] in n and "definition changed" in n for n in notes)


def test_runs_are_split_by_profile(tmp_path):
    cases = (CASES[0], "test_unet_step[sd21-base-sdpa-eager-bs1-fp32]")
    written = B.update_baselines([write_run(tmp_path / "r.json", cases=cases)], tmp_path / "b")
    assert sorted(u.path.name for u in written) == ["torch2-sd21-base.json", "torch2-tiny.json"]


def test_environment_change_is_not_merged_silently(tmp_path):
    base = tmp_path / "baselines"
    B.update_baselines([write_run(tmp_path / "r1.json", 1)], base)
    r2 = write_run(tmp_path / "r2.json", 2, machine={"torch_version": "2.15.0"})
    with pytest.raises(B.InputError, match=r"torch_version.*--replace"):
        B.update_baselines([r2], base)
    B.update_baselines([r2], base, replace=True)


@pytest.mark.parametrize("how", ["correct-false", "failed-wrong-output", "failed-non-finite"])
def test_wrong_output_never_becomes_a_baseline(tmp_path, how):
    if how == "correct-false":
        r = write_run(tmp_path / "r.json", extra={CASES[1]: {"correct": False}})
    else:
        r = write_run(tmp_path / "r.json", failed={CASES[1]: (how.removeprefix("failed-"), "max error 3.2")})
    with pytest.raises(B.InputError, match="wrong output"):
        B.update_baselines([r], tmp_path / "baselines")
    assert not (tmp_path / "baselines").exists()


def test_journal_of_a_killed_run_never_becomes_a_baseline(tmp_path):
    j = write_journal(tmp_path / "r.journal.jsonl", end=False)
    with pytest.raises(B.InputError, match="did not finish"):
        B.update_baselines([j], tmp_path / "baselines")
    (update,) = B.update_baselines([write_journal(tmp_path / "ok.journal.jsonl")], tmp_path / "baselines")
    assert update.added == ["ok.journal.jsonl"]


def test_same_runs_twice_add_nothing_and_say_so(tmp_path, capsys):
    runs = [write_run(tmp_path / "r1.json", 1), write_run(tmp_path / "r2.json", 2)]
    B.update_baselines(runs, tmp_path / "baselines")
    before = _baseline_file(tmp_path).read_bytes()
    assert main(["update-baselines", *map(str, runs), "--baseline-dir", str(tmp_path / "baselines")]) == 0
    out = capsys.readouterr().out
    assert "unchanged, no new run" in out and "not added again: r1.json, r2.json" in out
    assert _baseline_file(tmp_path).read_bytes() == before
    # a copy under another name is the same run
    copy = tmp_path / "copy.json"
    copy.write_bytes(runs[0].read_bytes())
    (update,) = B.update_baselines([copy], tmp_path / "baselines")
    assert update.duplicates == ["copy.json"] and not update.added


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
    assert not list(target.parent.glob("*.tmp"))  # no temporary file left behind
    assert len(R.read_baseline(target).runs) == 1


def test_atomic_write_creates_folders(tmp_path):
    B.atomic_write_json(tmp_path / "a" / "b" / "x.json", {"k": [1, 2], "d": {"e": None}})
    assert json.loads((tmp_path / "a" / "b" / "x.json").read_text()) == {"k": [1, 2], "d": {"e": None}}




def test_missing_baseline_names_existing_ones_and_how_to_create(tmp_path):
    B.update_baselines([write_run(tmp_path / "r1.json", 1)], tmp_path / "baselines")
    side, _ = R.load_side([write_run(tmp_path / "gpu.json",
                                     machine={"device_slug": "nvidia-a100-sxm4-80gb"})])
    with pytest.raises(B.MissingBaseline) as exc:
        B.locate_baselines(tmp_path / "baselines", side, ["tiny"])
    msg = str(exc.value)
    assert "nvidia-a100-sxm4-80gb/torch2-tiny.json" in msg
    assert "cpu-intel-xeon-processor/torch2-tiny.json" in msg and "update-baselines" in msg


# --- concurrent and killed writers, for real ------------------------------------------------------------


def _update_process(runs, baseline_dir, pause_s: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, B.PAUSE_ENV: str(pause_s), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "perf_tests", "update-baselines", *map(str, runs),
                             "--baseline-dir", str(baseline_dir)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stored_sources(target: Path) -> list[str]:
    return sorted(r.source for r in R.read_baseline(target).runs)


TRIES = 3


@pytest.mark.parametrize("pause_s", [0.0, 0.3])
def test_two_concurrent_updates_keep_every_run_exactly_once(tmp_path, pause_s):
    """Two `update-baselines` processes started together on one file, several times over; with a pause
    inside the read-merge-replace window (0.3 s) an unlocked store would lose a writer's runs every time."""
    base = tmp_path / "baselines"
    expected = []
    for t in range(TRIES):
        a = [write_run(tmp_path / f"t{t}-a{i}.json", 100 * t + i) for i in range(2)]
        b = [write_run(tmp_path / f"t{t}-b{i}.json", 100 * t + 50 + i) for i in range(2)]
        procs = [_update_process(a, base, pause_s), _update_process(b, base, pause_s)]
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        expected += [f.name for f in a + b]
        assert _stored_sources(_baseline_file(tmp_path)) == sorted(expected)
    assert not list(_baseline_file(tmp_path).parent.glob("*.tmp"))


def _wait_for(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "the writer never reached the window"
        time.sleep(0.02)


def test_writer_killed_with_its_temp_file_written_loses_nothing(tmp_path):
    """SIGKILL a writer while it holds the lock, its temporary file complete but not yet renamed: the
    baseline is intact, a second writer waiting on the lock proceeds, the next update removes the stale
    temporary file, and rerunning the killed update adds its run once."""
    base = tmp_path / "baselines"
    B.update_baselines([write_run(tmp_path / "r0.json", 0)], base)
    target = _baseline_file(tmp_path)
    before = target.read_bytes()

    victim = _update_process([write_run(tmp_path / "r1.json", 1)], base, pause_s=60)
    _wait_for(lambda: list(target.parent.glob(f".{target.name}.*.tmp")))
    waiter = _update_process([write_run(tmp_path / "r2.json", 2)], base)
    time.sleep(2.0)
    assert waiter.poll() is None  # blocked on the lock the victim holds
    assert target.read_bytes() == before
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL

    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert "removed 1 temporary file(s) of an interrupted update" in out
    assert not list(target.parent.glob("*.tmp"))
    assert _stored_sources(target) == ["r0.json", "r2.json"]

    for _ in range(2):  # the killed update, rerun (twice): its run lands exactly once
        rerun = _update_process([tmp_path / "r0.json", tmp_path / "r1.json"], base)
        rerun.communicate(timeout=120)
        assert rerun.returncode == 0
    assert _stored_sources(target) == ["r0.json", "r1.json", "r2.json"]


def test_a_stale_temp_file_is_ignored_by_readers(tmp_path):
    base = tmp_path / "baselines"
    B.update_baselines([write_run(tmp_path / "r0.json", 0)], base)
    target = _baseline_file(tmp_path)
    stale = target.parent / f".{target.name}.x1y2.tmp"
    stale.write_text('{"schema": "sd-perf-baseline", "trunc')
    assert [p.name for p in B.existing_baselines(base)] == [target.name]
    assert len(R.read_baseline(target).runs) == 1
    (update,) = B.update_baselines([write_run(tmp_path / "r1.json", 1)], base)
    assert update.removed_temp_files == [stale.name] and not stale.exists()


# --- the commit a baseline names (the CI smoke's A/B reference) --------------------------------------------
def _recorded(tmp_path, name: str, commit: str, when: str, **machine) -> Path:
    env = {n: {"env": machine["env"]} for n in CASES} if "env" in machine else None
    doc = run_doc(len(name), machine={"git_commit": commit, **machine}, extra=env)
    doc["datetime"] = when
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


AMD = {"device_name": "AMD EPYC", "device_slug": "cpu-amd-epyc", "cpu_model": "AMD EPYC"}
GPU = {"device_name": "NVIDIA H100", "device_slug": "nvidia-h100", "device_type": "cuda", "gpu_count": 1}


def test_the_recorded_commit_is_the_newest_cpu_run_on_any_device_and_environment(tmp_path):
    """Times in different zones are ordered as instants; a GPU baseline never names the CPU reference."""
    runs = [
        _recorded(tmp_path, "xeon1.json", "a" * 40, "2026-12-02T02:19:03+00:00"),
        # the newest instant, though its local date is not the latest: 2026-12-02 23:30 UTC
        _recorded(tmp_path, "epyc1.json", "b" * 40 + "+dirty", "2026-12-03T01:30:00+02:00", **AMD,
                  env="torch1", torch_version="1.12.1"),
        _recorded(tmp_path, "epyc2.json", "c" * 40, "2026-12-02T22:00:00+00:00", **AMD),
        _recorded(tmp_path, "gpu.json", "d" * 40, "2026-12-05T00:00:00+00:00", **GPU),
    ]
    B.update_baselines(runs, tmp_path / "baselines")
    found = B.latest_recorded_commit(tmp_path / "baselines")
    assert (found.commit, found.dirty) == ("b" * 40, True)
    assert found.path == tmp_path / "baselines" / "cpu-amd-epyc" / "torch1-tiny.json"
    assert B.latest_recorded_commit(tmp_path / "baselines", "cuda").commit == "d" * 40


def test_no_recorded_commit_without_a_baseline_of_that_device_type(tmp_path):
    B.update_baselines([_recorded(tmp_path, "gpu.json", "d" * 40, "2026-12-05T00:00:00+00:00", **GPU)],
                       tmp_path / "baselines")
    assert B.latest_recorded_commit(tmp_path / "baselines") is None
    assert B.latest_recorded_commit(tmp_path / "nowhere") is None


def test_the_committed_cpu_baselines_name_a_commit_of_this_repository():
    """The CI smoke checks that commit out (.ci/run); it must be in the history, not only on a lost branch."""
    found = B.latest_recorded_commit(REPO / "baselines")
    assert found is not None
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=REPO, capture_output=True,
                             text=True, check=False)
    if shallow.returncode != 0 or shallow.stdout.strip() != "false":
        pytest.skip("not a full git checkout (a shallow clone lacks the history; .ci/run fetches the commit)")
    res = subprocess.run(["git", "merge-base", "--is-ancestor", found.commit, "HEAD"], cwd=REPO,
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"{found.commit} ({found.path}) is not an ancestor of HEAD: {res.stderr}"
