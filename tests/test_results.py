"""perf_tests/records/results.py, the one reader: typed records from runs, journals and baselines, and every
kind of bad input refused with a message that names the file, the field and the fix (exit code 2 at the
CLI)."""

from __future__ import annotations

import json

import pytest
from perf_json import CASES, journal_lines, run_doc, write_journal, write_run

from perf_tests.__main__ import main
from perf_tests.records import baselines as B
from perf_tests.records import results as R


def test_a_run_is_read_into_typed_records(tmp_path):
    path = write_run(tmp_path / "r.json", 1, skipped={CASES[0]: "needs CUDA"},
                     failed={CASES[2]: ("oom", "CUDA out of memory")})
    run = R.read_run(path)
    assert run.source == "r.json" and run.complete and run.machine_id == "a1b2c3d4e5f6"
    assert run.machine["torch_version"] == "2.14.1" and "node" not in run.machine
    assert list(run.cases) == [CASES[1], CASES[3]]
    assert run.skipped == {CASES[0]: R.Skip(CASES[0], "needs CUDA")}
    assert run.failed == {CASES[2]: R.Failure(CASES[2], "CUDA out of memory", "oom")}
    assert run.selected == CASES and run.lacking == [] and run.grid_name == "custom"
    assert len(run.canary) == len(CASES) and run.canary_timeline[0]["before"] == CASES[0]
    c = run.cases[CASES[3]]
    assert (c.compile_time_s, c.compile_cache, c.iterations, c.correct) == (12.0, "cold", 1, True)
    assert c.case["profile"] == "tiny" and c.case["compile"] == "compile" and len(c.samples) == 20
    assert c.samples == tuple(run_doc(1)["benchmarks"][3]["stats"]["data"])


def test_a_side_aggregates_runs_in_one_place(tmp_path):
    r1 = write_run(tmp_path / "r1.json", 1, failed={CASES[2]: ("non-finite", "NaN in the output")})
    r2 = write_run(tmp_path / "r2.json", 2, machine={"machine_id": "ffffffffffff"},
                   extra={CASES[3]: {"compile_cache": "warm", "compile_time_s": 3.0},
                          CASES[1]: {"correct": False}})
    side = R.side_from_runs([R.read_run(r1), R.read_run(r2)], "cand")
    assert side.n_runs == 2 and side.machines == ["a1b2c3d4e5f6", "ffffffffffff"]
    assert side.failed == {CASES[2]: "non-finite: NaN in the output"}  # measured in r2, failed in r1
    cs = side.cases[CASES[3]]
    assert cs.compile_time_s == [12.0, 3.0] and cs.compile_cache == ["cold", "warm"]
    assert cs.run_machines == ["a1b2c3d4e5f6", "ffffffffffff"] and len(cs.runs) == 2
    assert side.cases[CASES[1]].correct is False and side.cases[CASES[0]].correct is True
    assert side.selected == set(CASES) and len(side.canary) == 2


def test_a_harness_1_run_has_an_unknown_selection(tmp_path):
    run = R.read_run(write_run(tmp_path / "old.json", perf_tests=False))
    assert run.selected is None and run.lacking == [] and run.canary == ()
    assert R.side_from_runs([run], "old").selected is None


def test_a_journal_reads_like_its_result_json(tmp_path):
    doc = run_doc(3, skipped={CASES[0]: "no xformers"})
    (tmp_path / "r.json").write_text(json.dumps(doc))
    (tmp_path / "r.journal.jsonl").write_text("".join(journal_lines(doc)))
    a, b = R.read_run(tmp_path / "r.json"), R.read_run(tmp_path / "r.journal.jsonl")
    assert (a.cases, a.skipped, a.selected, a.canary, a.content_hash) == (b.cases, b.skipped, b.selected,
                                                                         b.canary, b.content_hash)
    assert b.complete


def test_the_journal_of_a_killed_run_keeps_every_finished_case(tmp_path):
    lines = journal_lines(run_doc(1), end=False)[:3]  # start + two cases
    lines.append(journal_lines(run_doc(1))[3][:40])  # the third case cut mid-write, no newline
    path = tmp_path / "killed.journal.jsonl"
    path.write_text("".join(lines))
    run = R.read_run(path)
    assert not run.complete and list(run.cases) == list(CASES[:2]) and run.lacking == list(CASES[2:])


def test_a_lost_result_json_points_to_its_journal(tmp_path):
    write_journal(tmp_path / "r.journal.jsonl")
    with pytest.raises(R.InputError, match=r"r.json: no such file.*r.journal.jsonl exists"):
        R.read_run(tmp_path / "r.json")
    (tmp_path / "r.json").write_text('{"benchmarks": [{"name": "x", "st')
    with pytest.raises(R.InputError, match=r"not valid JSON.*journal .*r.journal.jsonl holds every case"):
        R.read_run(tmp_path / "r.json")


def test_profiles_of_runs_and_sides(tmp_path):
    cases = (CASES[0], "test_unet_step[sd21-base-sdpa-eager-bs1-fp32]")
    run = R.read_run(write_run(tmp_path / "r.json", cases=cases))
    assert R.profiles_of(run) == ["tiny", "sd21-base"] == R.profiles_of(R.side_from_runs([run], "x"))


def test_format_seconds():
    assert [R.format_seconds(x) for x in (0.0123, 1.5, None)] == ["12.30 ms", "1.500 s", "-"]


# --- bad input: the table in the README's reliability section comes from these ---------------------------


def _run_with(mutate):
    doc = run_doc(1)
    mutate(doc)
    return json.dumps(doc)


def _baseline_text(tmp_path, mutate):
    (u,) = B.update_baselines([write_run(tmp_path / "b0.json", 0)], tmp_path / "bl")
    doc = json.loads(u.path.read_text())
    mutate(doc)
    return json.dumps(doc)


def _journal(lines):
    return "".join(json.dumps(x) + "\n" if not isinstance(x, str) else x for x in lines)


FULL = json.dumps(run_doc(1))
B0 = {"name": CASES[0]}


def _set(path, value):
    """A mutator that sets doc[path...] = value (path of keys / indexes)."""
    def mutate(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _delete(path):
    def mutate(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return mutate


# (id, file name, content (text or a callable of tmp_path), message fragment)
BAD_INPUTS = [
    ("truncated JSON", "r.json", FULL[: len(FULL) // 2], "not valid JSON"),
    ("empty file", "r.json", "", "the file is empty"),
    ("JSON array", "r.json", "[1, 2]", "expected a JSON object, found list"),
    ("neither run nor baseline", "r.json", '{"hello": 1}', "neither a pytest-benchmark JSON"),
    ("benchmarks not a list", "r.json", '{"benchmarks": {}}', "benchmarks: expected a list"),
    ("no benchmarks at all", "r.json", '{"benchmarks": []}', "holds no benchmarks"),
    ("stats a list", "r.json", _run_with(_set(["benchmarks", 0, "stats"], [0.1, 0.2])),
     "stats: expected an object, found list"),
    ("extra_info a string", "r.json", _run_with(_set(["benchmarks", 0, "extra_info"], "fast")),
     "extra_info: expected an object, found str"),
    ("no raw samples", "r.json", _run_with(_delete(["benchmarks", 0, "stats", "data"])),
     "no raw samples. The comparator needs the per-round timings"),
    ("non-numeric sample", "r.json", _run_with(_set(["benchmarks", 0, "stats", "data", 3], "fast")),
     'stats.data: sample "fast" is not a positive finite number'),
    ("NaN sample", "r.json", _run_with(_set(["benchmarks", 0, "stats", "data", 0], float("nan"))),
     "stats.data: sample NaN is not a positive finite number"),
    ("zero sample", "r.json", _run_with(_set(["benchmarks", 0, "stats", "data", 0], 0)),
     "stats.data: sample 0 is not a positive finite number"),
    ("duplicate benchmark names", "r.json", _run_with(lambda d: d["benchmarks"].append(d["benchmarks"][0])),
     "appears twice"),
    ("name missing", "r.json", _run_with(_delete(["benchmarks", 1, "name"])),
     "benchmarks[1].name: expected a string"),
    ("correct a string", "r.json", _run_with(_set(["benchmarks", 0, "extra_info", "correct"], "yes")),
     "extra_info.correct: expected true, false or null, found str"),
    ("compile time a string", "r.json", _run_with(_set(["benchmarks", 3, "extra_info", "compile_time_s"],
                                                       "12s")),
     "extra_info.compile_time_s: expected a number or null, found str"),
    ("unknown compile cache", "r.json", _run_with(_set(["benchmarks", 3, "extra_info", "compile_cache"],
                                                       "hot")),
     "extra_info.compile_cache: 'hot' is not one of"),
    ("iterations zero", "r.json", _run_with(_set(["benchmarks", 0, "extra_info", "iterations"], 0)),
     "extra_info.iterations: 0 calls per round"),
    ("machine_info a list", "r.json", _run_with(_set(["machine_info"], [])),
     "machine_info: expected an object"),
    ("selected a string", "r.json", _run_with(_set(["perf_tests", "selected"], "all")),
     "perf_tests.selected: expected a list"),
    ("unknown failure kind", "r.json", _run_with(_set(["perf_tests", "failed"], [{"name": "x",
                                                                                  "kind": "slow"}])),
     "perf_tests.failed[0].kind: 'slow' is not one of"),
    ("duplicate failure", "r.json", _run_with(_set(["perf_tests", "failed"], [B0, B0])), "failed case"),
    ("journal: broken line inside", "r.journal.jsonl",
     lambda tmp: "".join(journal_lines(run_doc(1))[:2]) + "{oops\n" + journal_lines(run_doc(1))[2],
     "line 3 is not valid JSON"),
    ("journal: no start line", "r.journal.jsonl", _journal([{"type": "case", "benchmark": {}}]),
     "a journal has exactly one 'start' line, first"),
    ("journal: unknown line type", "r.journal.jsonl", _journal([{"type": "start"}, {"type": "progress"}]),
     "unknown line type 'progress'"),
    ("journal: case twice", "r.journal.jsonl",
     lambda tmp: "".join(journal_lines(run_doc(1))[:2] + journal_lines(run_doc(1))[1:]), "appears twice"),
    ("baseline without environment", "b.json", lambda tmp: _baseline_text(tmp, _delete(["environment"])),
     "environment: missing"),
    ("baseline environment a string", "b.json", lambda tmp: _baseline_text(tmp, _set(["environment"], "cpu")),
     "environment: expected an object"),
    ("baseline of a newer schema", "b.json", lambda tmp: _baseline_text(tmp, _set(["schema_version"], 99)),
     "unknown baseline schema version 99; this perf_tests reads versions 1, 2. It was written by a newer"),
    ("baseline schema version a string", "b.json", lambda tmp: _baseline_text(tmp, _set(["schema_version"],
                                                                                        "2")),
     "unknown baseline schema version '2'"),
    ("unknown schema", "b.json", lambda tmp: _baseline_text(tmp, _set(["schema"], "asv")),
     "unknown schema 'asv'"),
    ("baseline runs an object", "b.json", lambda tmp: _baseline_text(tmp, _set(["runs"], {})),
     "runs: expected a list"),
    ("baseline case without samples", "b.json",
     lambda tmp: _baseline_text(tmp, _set(["cases", CASES[0], "runs", 0, "samples"], [])),
     ".runs[0].samples: no raw samples. Regenerate the baseline"),
    ("baseline compile time a string", "b.json",
     lambda tmp: _baseline_text(tmp, _set(["cases", CASES[3], "runs", 0, "compile_time_s"], "slow")),
     "(runs[0]): compile_time_s: expected a number or null, found str"),
    ("baseline run index out of range", "b.json",
     lambda tmp: _baseline_text(tmp, _set(["cases", CASES[0], "runs", 0, "run"], 7)),
     ".runs[0].run: 7 is not a run of this file"),
]


@pytest.mark.parametrize("label,name,content,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused_with_a_message_naming_the_fix(tmp_path, capsys, label, name, content, message):
    path = tmp_path / name
    path.write_text(content(tmp_path) if callable(content) else content)
    with pytest.raises(R.InputError) as exc:
        R.read_any(path)
    text = str(exc.value)
    assert message in text and path.name in text
    assert "\n" not in text  # one paragraph
    # and at the command line: one `error:` paragraph, exit 2, as candidate and as baseline
    good = write_run(tmp_path / "good.json", 2)
    for argv in (["compare", good, path], ["compare", path, good]):
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err
