"""`python -m perf_tests run`: options, budget arithmetic, the A/B order, exit codes; the suite faked where a
real one would take minutes, plus one real run of a single tiny case."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from perf_tests.cli import main as cli
from perf_tests.cli import parse_args, split_passthrough
from perf_tests.measure import turns
from perf_tests.tools import run as R
from perf_tests.tools.ab import ab_trees
from perf_tests.tools.worktree import Tree

REPO = Path(__file__).resolve().parents[1]


# --- options ----------------------------------------------------------------------------------------------
def test_arguments_after_the_first_double_dash_go_to_pytest():
    assert split_passthrough(["--runs", "2", "--", "--case-kind", "unet-step", "--", "x"]) == (
        ["--runs", "2"], ["--case-kind", "unet-step", "--", "x"])
    assert split_passthrough(["--runs", "2"]) == (["--runs", "2"], [])
    opts = parse_args(["run", "--grid", "full", "--budget", "3", "--", "--rounds", "5"])
    assert (opts.grid, opts.budget, opts.runs, opts.passthrough) == ("full", 3.0, None, ["--rounds", "5"])


@pytest.mark.parametrize("argv", [
    ["--runs", "0"], ["--budget", "0"], ["--runs", "2", "--budget", "5"], ["--replace"],
    ["--ab", "HEAD", "--update-baselines"], ["--ab", "HEAD", "--ab-baseline"], ["--grid", "nightly"],
    ["--case-kind", "unet-step"],
    ["--", "--benchmark-json", "x.json"], ["--", "--benchmark-json=x.json"], ["--interleave", "runs"],
])
def test_bad_options_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["run", *argv])
    assert exc.value.code == 2


def test_suite_command_passes_the_grid_and_pytest_arguments_and_one_result_file():
    cmd = R.suite_command(Path("/r/torch2-run1.json"), "gate", ["--rounds", "5"])
    assert cmd[:4] == [sys.executable, "-m", "pytest", "perf_tests"]
    assert cmd[cmd.index("--grid") + 1] == "gate" and "--rounds" in cmd
    assert cmd[-2:] == ["--benchmark-json", "/r/torch2-run1.json"]
    assert "--grid" not in R.suite_command(Path("x.json"), None, [])  # the suite's own default


# --- budget -----------------------------------------------------------------------------------------------
def test_the_first_run_always_runs_even_past_the_budget():
    assert R.another_run([], budget_s=1)
    assert not R.another_run([600], budget_s=480)


def test_a_run_starts_only_when_its_estimate_fits():
    # first run 180 s (cold cache) is the estimate: 180 + 180 <= 480
    assert R.another_run([180], 480)
    # then the longest warm run is: 270 + 90 <= 480, 360 + 90 <= 480, 450 + 90 > 480
    assert R.another_run([180, 90], 480)
    assert R.another_run([180, 90, 90], 480)
    assert not R.another_run([180, 90, 90, 90], 480)
    assert R.another_run([200, 100], 400)  # ending exactly at the budget is within it
    assert not R.another_run([100, 150], 390)  # a slow warm run raises the estimate: 250 + 150 > 390


class FakeSuite:
    """Stands in for the suite processes: records each call, writes a result, advances a fake clock."""

    def __init__(self, seconds: list[float], returncode: int = 0, write: bool = True):
        self.seconds, self.returncode, self.write = list(seconds), returncode, write
        self.now, self.calls = 0.0, []

    def clock(self) -> float:
        return self.now

    def launch(self, cmd, cwd, env) -> int:
        out = Path(cmd[cmd.index("--benchmark-json") + 1])
        self.calls.append((out.name, Path(cwd), env.get("TORCHINDUCTOR_CACHE_DIR"), env["PYTHONPATH"]))
        if self.write:
            out.write_text("{}")
        self.now += self.seconds.pop(0) if len(self.seconds) > 1 else self.seconds[0]
        return self.returncode


def _opts(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"runs": None, "budget": None, "grid": None, **kw})


def test_budget_runs_until_the_next_would_overrun(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    fake = FakeSuite([180, 90, 90, 90, 90])
    runs = R.run_all([Tree(tmp_path, label="current tree")], _opts(budget=8), [], tmp_path, "torch2",
                     launch=fake.launch, clock=fake.clock, log=lambda m: None)
    # 180 + 90 + 90 + 90 = 450 s; a fifth would end at 540 s > 480
    assert [r.path.name for r in runs] == [f"torch2-run{i}.json" for i in (1, 2, 3, 4)]
    assert [r.seconds for r in runs] == [180, 90, 90, 90]
    # the suite's own persistent Inductor cache, untouched by run: a warm machine stays warm
    assert {c[2] for c in fake.calls} == {None}


def test_runs_default_to_one(tmp_path):
    fake = FakeSuite([1])
    runs = R.run_all([Tree(tmp_path, label="")], _opts(), [], tmp_path, "torch2", fake.launch, fake.clock,
                     lambda m: None)
    assert len(runs) == 1


def test_ab_alternates_a_and_b_in_pairs_each_side_in_its_tree(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    a, b = Tree(tmp_path / "a", side="A", label="current tree"), Tree(tmp_path / "b", side="B",
                                                                      label="HEAD (abc)")
    fake = FakeSuite([10])
    R.run_all([a, b], _opts(runs=3), ["-x"], tmp_path, "torch2", fake.launch, fake.clock, lambda m: None)
    # one after the other here (trees without turns.py); the side that goes first alternates pair by pair
    assert [c[0] for c in fake.calls] == ["torch2-A-run1.json", "torch2-B-run1.json", "torch2-B-run2.json",
                                          "torch2-A-run2.json", "torch2-A-run3.json", "torch2-B-run3.json"]
    assert [c[1].name for c in fake.calls] == ["a", "b", "b", "a", "a", "b"]
    assert [c[3].split(os.pathsep)[0] for c in fake.calls[:2]] == [str(a.path), str(b.path)]


def test_ab_budget_counts_pairs(tmp_path):
    fake = FakeSuite([60])  # a pair takes 120 s: 3 pairs fit in 6 minutes, never half a pair
    runs = R.run_all([Tree(tmp_path, side="A", label=""), Tree(tmp_path, side="B", label="")],
                     _opts(budget=6.5), [], tmp_path, "t",
                     fake.launch, fake.clock, lambda m: None)
    assert sorted((r.index, r.tree.side) for r in runs) == [(i, s) for i in (1, 2, 3) for s in "AB"]


def _turn_taking_tree(root: Path, side: str, label: str) -> Tree:
    (root / "perf_tests").mkdir(parents=True)
    (root / "perf_tests" / "turns.py").write_text("")
    return Tree(root, label, side=side)


def test_ab_pairs_run_side_by_side_when_both_trees_take_turns(tmp_path):
    a = _turn_taking_tree(tmp_path / "a", "A", "current tree")
    b = _turn_taking_tree(tmp_path / "b", "B", "HEAD (abc)")
    fake, pairs = FakeSuite([60]), []

    def launch_pair(jobs):
        pairs.append([(j.cmd[j.cmd.index("--benchmark-json") + 1], j.cwd.name, j.log.name) for j in jobs])
        return [fake.launch(j.cmd, j.cwd, j.env) for j in jobs]

    runs = R.run_all([a, b], _opts(budget=6.5), [], tmp_path, "t", fake.launch, fake.clock, lambda m: None,
                     launch_pair=launch_pair)
    assert len(pairs) == 3  # a pair costs 120 s of the fake clock: 3 fit in 6.5 min
    assert [(Path(p[0]).name, p[1], p[2]) for p in pairs[0]] == [("t-A-run1.json", "a", "t-A-run1.log"),
                                                                 ("t-B-run1.json", "b", "t-B-run1.log")]
    # the side that takes the first turn alternates: A in pairs 1 and 3, B in pair 2
    assert [[Path(j[0]).name for j in p] for p in pairs[1:]] == [["t-B-run2.json", "t-A-run2.json"],
                                                                  ["t-A-run3.json", "t-B-run3.json"]]
    assert [(r.tree.side, r.index) for r in runs] == [("A", 1), ("B", 1), ("B", 2), ("A", 2), ("A", 3), ("B",
                                                                                                         3)]
    # --interleave runs, or a tree that cannot take turns: A, then B, one process at a time
    fake2 = FakeSuite([60])
    R.run_all([a, b], _opts(runs=1, interleave="runs"), [], tmp_path, "u", fake2.launch, fake2.clock,
              lambda m: None, launch_pair=None)
    assert [c[0] for c in fake2.calls] == ["u-A-run1.json", "u-B-run1.json"]
    logged = []
    R.run_all([a, Tree(tmp_path / "old", side="B", label="v1 (def)")], _opts(runs=1), [], tmp_path, "v",
              fake2.launch,
              fake2.clock, logged.append, launch_pair=None)
    assert any("v1 (def) cannot take turns" in m for m in logged)


# --- suite processes and exit codes -------------------------------------------------------------------------
def test_a_suite_process_without_a_result_is_an_error_naming_its_journal(tmp_path):
    journal = tmp_path / "torch2-run1.journal.jsonl"
    journal.write_text('{"type": "start"}\n')
    fake = FakeSuite([1], returncode=-9, write=False)
    with pytest.raises(R.RunError, match="exit -9 and no result.*journal.jsonl"):
        R.run_all([Tree(tmp_path, label="")], _opts(runs=2), [], tmp_path, "torch2", fake.launch, fake.clock,
                  lambda m: None)
    assert len(fake.calls) == 1  # no second run after a crash


def test_pytest_collecting_no_test_is_an_error(tmp_path):
    fake = FakeSuite([1], returncode=5, write=False)
    with pytest.raises(R.RunError, match="collected no test"):
        R.run_all([Tree(tmp_path, label="")], _opts(), [], tmp_path, "torch2", fake.launch, fake.clock,
                  lambda m: None)


def test_a_failed_case_pytest_exit_1_with_a_result_is_a_result(tmp_path):
    fake = FakeSuite([1], returncode=1)
    runs = R.run_all([Tree(tmp_path, label="")], _opts(), [], tmp_path, "torch2", fake.launch, fake.clock,
                     lambda m: None)
    assert runs[0].returncode == 1


@pytest.mark.parametrize("gate_code, failed, gate, expected", [
    (0, 0, "fail", 0),
    (1, 0, "fail", 1),  # a timing regression
    (1, 0, "warn", 0),  # ... softened
    (0, 1, "warn", 1),  # a failed or missing case is never softened
    (1, 2, "warn", 1),
    (0, 1, "fail", 1),
])
def test_exit_code_mapping(gate_code, failed, gate, expected):
    assert R.final_exit(gate_code, failed=failed, gate=gate) == expected


def test_run_outside_a_repository_root_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(["run", "--runs", "1"]) == 2
    assert "error:" in capsys.readouterr().err


# --- A/B trees ----------------------------------------------------------------------------------------------
def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo,
                   check=True,
                   capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="A/B mode needs git")
def test_ab_trees_check_out_the_ref_beside_the_tree_and_remove_it(tmp_path):
    repo = tmp_path / "repo"
    (repo / "perf_tests").mkdir(parents=True)
    (repo / "perf_tests" / "v.txt").write_text("ref")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "ref")
    (repo / "perf_tests" / "v.txt").write_text("working tree")
    with ab_trees("HEAD", repo) as (a, b):
        assert (a.side, b.side) == ("A", "B") and a.path == repo
        assert (b.path / "perf_tests" / "v.txt").read_text() == "ref"
        assert b.label.startswith("HEAD (")
    assert not b.path.exists()
    listed = subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True, text=True).stdout
    assert len(listed.strip().splitlines()) == 1


# --- end to end ---------------------------------------------------------------------------------------------
FAKE_SUITE = """
import time
def test_fake(benchmark):
    factor = float(open(__file__.replace("test_fake.py", "factor.txt")).read())
    benchmark.extra_info.update({extra!r})
    benchmark.pedantic(lambda: sum(range(int(20000 * factor))), rounds=15, iterations=20, warmup_rounds=2)
"""
FAKE_CONFTEST = """
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.update({machine!r})
"""


def _fake_repo(root: Path, failing: bool = False) -> Path:
    """A git repository whose suite is one fake case (plus one failing test when asked)."""
    repo = root / "repo"
    (repo / "perf_tests").mkdir(parents=True)
    extra = {"case": {"kind": "fake", "profile": "tiny", "attention": "original", "compile": "eager",
                      "batch_size": 1, "precision": "fp32"}, "definition_hash": "abc", "env": "torch2",
             "correct": True, "attention_used": "original"}
    machine = {"device_slug": "cpu-test", "env": "torch2", "torch_version": "x", "device_type": "cpu"}
    suite = textwrap.dedent(FAKE_SUITE.format(extra=extra))
    if failing:
        suite += "\ndef test_wrong_output():\n    assert False, 'wrong output'\n"
    (repo / "perf_tests" / "test_fake.py").write_text(suite)
    (repo / "perf_tests" / "conftest.py").write_text(FAKE_CONFTEST.format(machine=machine))
    (repo / "perf_tests" / "factor.txt").write_text("1.0")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "reference")
    return repo


@pytest.mark.skipif(shutil.which("git") is None, reason="A/B mode needs git")
def test_ab_end_to_end_on_a_fake_suite(tmp_path, monkeypatch, capsys):
    """`run --ab HEAD` in a repository whose suite is one fake case, 2x slower in the working tree."""
    repo = _fake_repo(tmp_path)
    (repo / "perf_tests" / "factor.txt").write_text("2.0")  # the working tree is 2x slower

    monkeypatch.chdir(repo)
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    out = tmp_path / "out"
    code = cli(["run", "--ab", "HEAD", "--runs", "3", "--results", str(out), "--label", "torch2",
                   "--", "--benchmark-timer=time.process_time"])
    err = capsys.readouterr().err
    assert code in (0, 1), err
    sides = [line.split(" side ")[1][0] for line in err.splitlines() if line.startswith("[run] torch2 run")]
    assert sides == ["A", "B", "B", "A", "A", "B"]  # the first turn alternates between the sides
    assert sorted(p.name for p in out.glob("torch2-*-run*.json")) == [
        f"torch2-{s}-run{i}.json" for s in "AB" for i in (1, 2, 3)]
    verdict = json.loads((out / "verdict-torch2.json").read_text())
    assert "test_fake" in json.dumps(verdict)
    assert {p.name for p in out.glob("verdict-torch2.*")} == {"verdict-torch2.txt", "verdict-torch2.md",
                                                               "verdict-torch2.json"}
    assert (out / "verdict-torch2.md").read_text().strip() in summary.read_text()  # once, in the job summary
    listed = subprocess.run(["git", "worktree", "list"], cwd=repo, capture_output=True, text=True).stdout
    assert len(listed.strip().splitlines()) == 1  # the temporary worktree is gone
    assert (repo / "perf_tests" / "factor.txt").read_text() == "2.0"


TURN_SUITE = """
import os
from perf_tests.measure import turns
def test_fake(benchmark):
    def handover():
        with open({log!r}, "a") as fh:
            fh.write(f"{{os.getpid()}}\\n")
        turns.pass_turn()
    benchmark.pedantic(lambda: sum(range(20000)), rounds=6, iterations=5, teardown=handover)
"""
TURN_CONFTEST = """
from perf_tests.measure import turns
def pytest_collection_finish(session):
    turns.begin()
def pytest_unconfigure(config):
    turns.end()
"""


@pytest.mark.skipif(shutil.which("git") is None, reason="A/B mode needs git")
def test_ab_pairs_take_turns_through_pytest_benchmark_rounds(tmp_path, monkeypatch, capsys):
    """Both processes of a pair under real pytest and pytest-benchmark: the rounds of the two alternate."""
    repo = tmp_path / "repo"
    (repo / "perf_tests").mkdir(parents=True)
    log = tmp_path / "rounds.txt"
    (repo / "perf_tests" / "test_fake.py").write_text(textwrap.dedent(TURN_SUITE.format(log=str(log))))
    (repo / "perf_tests" / "conftest.py").write_text(TURN_CONFTEST)
    turns_file = repo / Path(turns.__file__).relative_to(REPO)  # where this layout keeps it
    turns_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(turns.__file__, turns_file)
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "reference")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # perf_tests.measure.turns for the fake suite
    trees = [Tree(repo, side="A", label="current tree"), Tree(repo, side="B", label="HEAD")]
    runs = R.run_all(trees, _opts(runs=1), [], tmp_path, "t", log=lambda m: None)
    assert [r.returncode for r in runs] == [0, 0]
    pids = log.read_text().split()
    assert len(set(pids)) == 2 and pids.count(pids[0]) == pids.count(pids[1]) >= 6  # every round of each
    assert all(a != b for a, b in zip(pids, pids[1:], strict=False))  # A, B, A, B, ... round by round
    assert "test_fake" in capsys.readouterr().out  # both processes' output, printed after the pair


@pytest.mark.skipif(shutil.which("git") is None, reason="A/B mode needs git")
def test_explain_profiles_each_flagged_case_in_both_ab_trees_and_writes_it_into_the_verdict(
        tmp_path, monkeypatch, capsys):
    """--explain hands the regressions to perf_tests.tools.explain with A/B's own trees (profiling itself is
    tested in test_explain.py) and appends its diff to the verdict in every format."""
    from perf_tests.tools import explain

    repo = _fake_repo(tmp_path)
    (repo / "perf_tests" / "factor.txt").write_text("4.0")  # the working tree is 4x slower
    monkeypatch.chdir(repo)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    seen = []

    def fake_explain_trees(baseline, candidate, names, out_dir, *, baseline_label, candidate_label, log):
        seen.append((Path(baseline), Path(candidate), list(names), baseline_label))
        assert (Path(baseline) / "perf_tests" / "factor.txt").read_text() == "1.0"  # REF's tree, still there
        return [explain.OperatorDiff(names[0], baseline_label, candidate_label, error="profiled in a test")]

    monkeypatch.setattr(explain, "explain_trees", fake_explain_trees)
    out = tmp_path / "out"
    code = cli(["run", "--ab", "HEAD", "--runs", "3", "--explain", "--results", str(out), "--label", "torch2",
                   "--", "--benchmark-timer=time.process_time"])
    assert code == 1, capsys.readouterr().err
    (ref_tree, current, names, label), = seen
    assert current == repo and names == ["test_fake"] and label.startswith("HEAD (")
    assert "Operators that got slower" in (out / "verdict-torch2.md").read_text()
    assert "profiled in a test" in (out / "verdict-torch2.txt").read_text()
    assert json.loads((out / "verdict-torch2.json").read_text())["explain"][0]["case"] == "test_fake"
    assert (out / "explain" / "explain.md").is_file()


@pytest.mark.skipif(shutil.which("git") is None, reason="the fake suite is a git repository")
def test_update_baselines_records_the_runs_of_a_fake_suite(tmp_path, monkeypatch, capsys):
    repo = _fake_repo(tmp_path)
    monkeypatch.chdir(repo)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    code = cli(["run", "--update-baselines", "--runs", "2", "--results", str(tmp_path / "out"),
                   "--baseline-dir", str(tmp_path / "bl"), "--label", "torch2"])
    assert code == 0, capsys.readouterr().err
    written = list((tmp_path / "bl").rglob("*.json"))
    assert len(written) == 1 and len(json.loads(written[0].read_text())["runs"]) == 2
    assert not (tmp_path / "out" / "verdict-torch2.txt").exists()  # recording, not judging


@pytest.mark.skipif(shutil.which("git") is None, reason="the fake suite is a git repository")
def test_a_run_with_a_failed_case_is_never_recorded_and_fails_even_with_gate_warn(tmp_path, monkeypatch,
                                                                                  capsys):
    repo = _fake_repo(tmp_path, failing=True)
    monkeypatch.chdir(repo)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    code = cli(["run", "--update-baselines", "--results", str(tmp_path / "out"), "--baseline-dir",
                str(tmp_path / "bl"),
                   "--label", "torch2"])
    assert code == 1 and "not recorded" in capsys.readouterr().err
    assert not (tmp_path / "bl").exists()
    (tmp_path / "bl").mkdir()  # no baseline for this device: the failed case alone fails the run
    code = cli(["run", "--gate", "warn", "--results", str(tmp_path / "out2"), "--baseline-dir",
                str(tmp_path / "bl"),
                   "--label", "torch2"])
    assert code == 1


@pytest.mark.slow
def test_one_real_run_of_one_tiny_case_end_to_end(tmp_path):
    """The real suite, one process, one case: result, study table, verdict files and the job summary."""
    summary = tmp_path / "summary.md"
    out = tmp_path / "out"
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(summary),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind")}
    res = subprocess.run(
        [sys.executable, "-m", "perf_tests", "run", "--runs", "1", "--gate", "warn", "--results", str(out),
         "--label", "e2e", "--", "--case-kind", "attention-self-1024", "--attention", "original",
         "--batch-size", "1", "--rounds", "5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    names = {p.name for p in out.iterdir()}
    assert {"e2e-run1.json", "study-e2e.md", "verdict-e2e.txt", "verdict-e2e.md", "verdict-e2e.json"} <= names
    result = json.loads((out / "e2e-run1.json").read_text())
    expected = ["test_attention_self_1024[tiny-original-eager-bs1-fp32]"]
    assert [b["name"] for b in result["benchmarks"]] == expected
    assert (out / "verdict-e2e.txt").read_text().strip() in res.stdout  # the verdict is printed
    text = summary.read_text()
    assert text.count((out / "verdict-e2e.md").read_text().strip()) == 1
    assert text.count((out / "study-e2e.md").read_text().strip()) == 1
