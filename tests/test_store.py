"""The results store: runs recorded whole and read back equal, once each under concurrent writers (SQLite and
a real PostgreSQL server), migrations, import of folders and baselines, export of a baseline, and the
machine's own history as the baseline of `perf_tests run`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from perf_tests.measure import machine
from perf_tests.records.baselines import update_baselines
from perf_tests.records.results import InputError, read_baseline, read_run, run_from_doc
from perf_tests.records.store import MIGRATIONS, SCHEMA_VERSION, Store, run_key
from perf_tests.records.store_io import export_baseline, import_paths
from perf_tests.tools import store_baseline
from tests.perf_json import CASES, run_doc

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, seed: int, *, minute: int = 0, commit: str = "a" * 40, **kw) -> Path:
    doc = run_doc(seed, **kw)
    doc["datetime"] = f"2026-11-26T07:{minute:02d}:00+00:00"
    doc["machine_info"] = {**doc["machine_info"], "git_commit": commit, **kw.get("machine", {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def same_run(a, b) -> None:
    """Everything the comparator and the reports read from a run."""
    assert a.source == b.source and a.machine == b.machine and a.machine_id == b.machine_id
    assert a.datetime == b.datetime and a.git_commit == b.git_commit and a.grid_name == b.grid_name
    assert a.selected == b.selected and a.canary == b.canary and a.canary_timeline == b.canary_timeline
    assert a.skipped == b.skipped and a.failed == b.failed and a.complete == b.complete
    assert a.cases.keys() == b.cases.keys()
    for name in a.cases:
        assert a.cases[name] == b.cases[name], name
    assert a.content_hash == b.content_hash


# --- stores: a SQLite file, and a PostgreSQL server when one is installed -----------------------------------


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return versions[-1].parent if versions else None


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of its own (initdb into a temporary folder, a Unix socket, no TCP), as the
    postgres user when run as root (in a folder of its own under /tmp: pytest's are root's alone); its URL."""
    pytest.importorskip("psycopg", reason="the store extra (psycopg) is not installed")
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (pg_ctl); CI installs the postgresql package")
    base = Path(tempfile.mkdtemp(prefix="sd-perf-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    with socket.socket() as s:  # a free port number names the socket file
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run(*cmd) -> None:
        done = subprocess.run([*as_user, *map(str, cmd)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, f"{cmd[0]} failed: {done.stdout}{done.stderr}"

    run(bin_dir / "initdb", "-D", data, "-U", "postgres", "-A", "trust")
    run(
        bin_dir / "pg_ctl",
        "-D",
        data,
        "-l",
        base / "log",
        "-w",
        "-o",
        f"-k {sock} -p {port} -c listen_addresses=''",
        "start",
    )
    yield f"postgresql://postgres@/postgres?host={sock}&port={port}"
    run(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop")
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "store.sqlite")
    url = request.getfixturevalue("postgres")
    with Store.open(url) as store:  # each test starts from an empty database
        store.execute("DROP SCHEMA public CASCADE")
        store.execute("CREATE SCHEMA public")
    return url


# --- recording and reading back -----------------------------------------------------------------------------


def test_a_recorded_run_reads_back_equal_to_its_file(where, tmp_path):
    path = write(
        tmp_path / "torch2-run1.json",
        1,
        skipped={CASES[1]: "no sdpa"},
        failed={CASES[2]: ("oom", "out of memory")},
    )
    original = read_run(path)
    with Store.open(where) as store:
        first = store.record(original)
        again = store.record(original)
        stored = store.runs()
        assert store.version() == SCHEMA_VERSION
    assert first.added and first.new_cases == len(original.cases)
    assert not again.added and again.new_cases == 0
    assert len(stored) == 1
    same_run(stored[0].run, original)
    assert stored[0].commit_sha == "a" * 40 and not stored[0].dirty


def test_two_runs_sharing_an_identity_but_not_their_samples_are_refused(where, tmp_path):
    a = read_run(write(tmp_path / "x" / "torch2-run1.json", 1))
    b = read_run(write(tmp_path / "y" / "torch2-run1.json", 2))  # same name, time, machine, commit
    with Store.open(where) as store:
        store.record(a)
        with pytest.raises(InputError, match="two runs"):
            store.record(b)
        assert store.count() == 1


def test_two_writers_at_once_lose_and_duplicate_no_run(where, tmp_path):
    """Two processes import overlapping folders at the same moment: every run once, every case once."""
    shared = [write(tmp_path / "shared" / f"torch2-run{i}.json", i, minute=i) for i in range(6)]
    own = {
        w: [
            write(
                tmp_path / w / f"torch2-run{i}.json",
                10 + i + 10 * (w == "b"),
                minute=20 + i + 10 * (w == "b"),
            )
            for i in range(4)
        ]
        for w in ("a", "b")
    }
    with Store.open(where):  # the schema exists before the race (its creation is raced in the next test)
        pass
    code = (
        "import sys; from pathlib import Path; from perf_tests.records.store import Store; "
        "from perf_tests.records.store_io import import_paths\n"
        "with Store.open(sys.argv[1]) as s:\n"
        "    import_paths(s, [Path(p) for p in sys.argv[2:]], log=lambda m: None)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, where, str(tmp_path / "shared"), str(tmp_path / w)],
            cwd=ROOT,
            stderr=subprocess.PIPE,
        )
        for w in ("a", "b")
    ]
    errors = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    with Store.open(where) as store:
        runs = store.runs()
        assert store.count("results") == sum(len(r.run.cases) for r in runs)
    expected = {run_key(read_run(p)) for p in [*shared, *own["a"], *own["b"]]}
    assert sorted(run_key(r.run) for r in runs) == sorted(expected)  # each exactly once


def test_writers_creating_the_schema_at_once_both_succeed(where):
    code = (
        "import sys; from perf_tests.records.store import Store\n"
        "with Store.open(sys.argv[1]) as s: print(s.version())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, where], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e.decode() for _, e in outs]
    assert {o.decode().strip() for o, _ in outs} == {str(SCHEMA_VERSION)}
    with Store.open(where) as store:
        assert store.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == SCHEMA_VERSION


# --- migrations ---------------------------------------------------------------------------------------------


def test_a_later_migration_applies_once_to_a_store_holding_runs(where, tmp_path):
    run = read_run(write(tmp_path / "torch2-run1.json", 1))
    with Store.open(where) as store:
        store.record(run)
    later = (*MIGRATIONS, ("ALTER TABLE runs ADD COLUMN note TEXT", "UPDATE runs SET note = 'migrated'"))
    with Store.open(where, migrations=later) as store:
        assert store.version() == SCHEMA_VERSION + 1
        assert store.execute("SELECT note FROM runs").fetchall() == [("migrated",)]
        same_run(store.runs()[0].run, run)
    with Store.open(where, migrations=later) as store:  # nothing left to apply
        assert store.migrate(later) == []
    with pytest.raises(InputError, match="newer than this perf_tests"):
        Store.open(where)


# --- import and export --------------------------------------------------------------------------------------


def test_a_results_folder_and_the_baseline_made_from_it_import_as_the_same_runs(tmp_path):
    folder = tmp_path / "results" / "20261126-070000"
    files = [write(folder / f"torch2-run{i}.json", i, minute=i) for i in range(3)]
    (folder / "verdict-torch2.json").write_text(json.dumps({"baseline_missing": True}))
    update_baselines(files, tmp_path / "baselines")
    with Store.open(tmp_path / "s.sqlite") as store:
        added, already, passed = import_paths(store, [folder], log=lambda m: None)
        assert (added, already, passed) == (3, 0, 1)
        added, already, _ = import_paths(store, [tmp_path / "baselines"], log=lambda m: None)
        assert (added, already) == (0, 3)  # a baseline's runs are the folder's runs
        assert store.count() == 3 and store.count("results") == 3 * len(CASES)


def test_an_exported_baseline_is_the_one_update_baselines_writes_from_the_same_runs(tmp_path):
    files = [write(tmp_path / "r" / f"torch2-run{i}.json", i, minute=i) for i in range(3)]
    [reference] = update_baselines(files, tmp_path / "baselines")
    with Store.open(tmp_path / "s.sqlite") as store:
        import_paths(store, [tmp_path / "r"], log=lambda m: None)
        out = tmp_path / "export" / "torch2-tiny.json"
        export_baseline(store, out, "cpu-intel-xeon-processor", "torch2", "tiny")
        with pytest.raises(InputError, match="exists"):
            export_baseline(store, out, "cpu-intel-xeon-processor", "torch2", "tiny")
    exported, expected = read_baseline(out), read_baseline(reference.path)
    assert (exported.device_slug, exported.env, exported.profile) == (
        expected.device_slug,
        expected.env,
        "tiny",
    )
    assert len(exported.runs) == len(expected.runs) == 3
    for a, b in zip(exported.runs, expected.runs, strict=True):
        assert a.cases == b.cases and a.canary == b.canary and a.machine_id == b.machine_id


# --- the machine's own history as the baseline --------------------------------------------------------------


def here(**kw) -> dict:
    """machine_info of runs made on this machine in this boot."""
    return {"machine": {"machine_id": machine.machine_id(), **kw}}


def test_the_second_run_is_judged_against_the_first_and_the_first_says_so(tmp_path):
    where = str(tmp_path / "s.sqlite")
    first = [write(tmp_path / "1" / f"torch2-run{i}.json", i, minute=i, **here()) for i in range(3)]
    outcome, lines = store_baseline.judge(where, first, store_baseline.Policy())
    assert outcome is None and "holds no earlier run of this machine" in lines[0]
    assert "next run on this machine is judged against these 3 run(s)" in lines[0]
    store_baseline.record_files(first, where)
    second = [
        write(
            tmp_path / "2" / f"torch2-run{i}.json",
            10 + i,
            minute=10 + i,
            commit="b" * 40,
            slow={CASES[0]: 1.3},
            **here(),
        )
        for i in range(3)
    ]
    outcome, lines = store_baseline.judge(where, second, store_baseline.Policy())
    assert (
        "3 run(s) of the latest commit recorded on this machine other than the tree's (aaaaaaaaaaaa)"
        in lines[0]
    )
    verdicts = {c.name: c.verdict for c in outcome.comparison.cases}
    assert verdicts[CASES[0]] == "regression" and not outcome.comparison.new_machine
    assert all(v != "regression" for n, v in verdicts.items() if n != CASES[0])
    # the same commit again, nothing else recorded: an A/A check against the earlier runs of this commit
    store_baseline.record_files(second, where)
    third = [
        write(tmp_path / "3" / f"torch2-run{i}.json", 20 + i, minute=20 + i, commit="b" * 40, **here())
        for i in range(2)
    ]
    outcome, lines = store_baseline.judge(where, third, store_baseline.Policy(), baseline_commit="a" * 40)
    assert "the base commit aaaaaaaaaaaa" in lines[0] and outcome.baseline.n_runs == 3


def test_runs_of_another_boot_count_as_this_machine_only_when_the_canary_agrees(tmp_path, monkeypatch):
    where = str(tmp_path / "s.sqlite")
    old = [
        write(tmp_path / "old" / f"torch2-run{i}.json", i, minute=i, **here(machine_id="0ldb00t0000"))
        for i in range(3)
    ]
    with Store.open(where) as store:  # recorded on this host before a reboot
        for p in old:
            store.record(read_run(p), store_baseline.RunContext(host_id=machine.host_id()))
    new = [
        write(tmp_path / "new" / f"torch2-run{i}.json", 10 + i, minute=10 + i, commit="b" * 40, **here())
        for i in range(2)
    ]
    outcome, lines = store_baseline.judge(where, new, store_baseline.Policy())
    assert "another boot of this host, canary +0.0%: judged as this machine" in lines[0]
    assert not outcome.comparison.new_machine
    faster = tmp_path / "fast"
    for p in new:  # the same runs on a boot whose canary ran 20% faster
        doc = json.loads(p.read_text())
        for sample in doc["perf_tests"]["canary"]["samples"]:
            sample["seconds"] *= 0.8
        faster.mkdir(exist_ok=True)
        (faster / p.name).write_text(json.dumps(doc))
    outcome, lines = store_baseline.judge(where, sorted(faster.iterdir()), store_baseline.Policy())
    assert "judged as another machine" in lines[0] and outcome.comparison.new_machine


# --- fleet health -------------------------------------------------------------------------------------------


def test_a_machine_slower_for_everything_is_named_and_its_siblings_are_not(tmp_path):
    """Five machines of one type, each 3 runs; the fleet's spread 2% per machine, one machine 15% slower for
    every case and the canary (a throttled clock)."""
    import numpy as np

    from perf_tests.analysis.fleet import health

    rng = np.random.default_rng(3)
    with Store.open(tmp_path / "s.sqlite") as store:
        for m in range(5):
            speed = 1.15 if m == 4 else float(np.exp(rng.normal(0, 0.02)))
            for r in range(3):
                doc = run_doc(100 * m + r, slow={n: speed for n in CASES})
                doc["datetime"] = f"2026-11-26T07:{10 * m + r:02d}:00+00:00"
                doc["machine_info"] = {**doc["machine_info"], "machine_id": f"machine{m}"}
                for sample in doc["perf_tests"]["canary"]["samples"]:
                    sample["seconds"] *= speed * float(np.exp(rng.normal(0, 0.01)))
                store.record(run_from_doc(doc, f"torch2-run{r}.json"))
        machines = {h.machine_id: h for h in health(store, "cpu-intel-xeon-processor", "torch2")}
    assert sorted(machines) == [f"machine{m}" for m in range(5)]
    assert [m for m, h in machines.items() if h.slow] == ["machine4"]
    slow = machines["machine4"]
    assert 1 < slow.canary_ci[0] < 1.15 < slow.canary_ci[1] and slow.canary_ratio > 1.05
    assert slow.case_ratio == pytest.approx(1.15, rel=0.05) and slow.slow_cases == len(CASES)


# --- `perf_tests run` end to end ----------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("git") is None, reason="the fake suite is a git repository")
def test_consecutive_runs_record_and_the_second_is_judged_against_the_first(tmp_path, monkeypatch, capsys):
    """A fake suite (tests/test_run.py) on this machine: the first run records and says what the next will
    see; the second is an A/A check against it; after a commit making the case 5x slower, the third is
    judged against the second commit's runs and fails."""
    from perf_tests.cli import main
    from tests.test_run import FAKE_CONFTEST, _fake_repo, _git

    repo = _fake_repo(tmp_path)
    fingerprint = {"device_slug": "cpu-test", "env": "torch2", "torch_version": "x", "device_type": "cpu",
                   "machine_id": machine.machine_id()}
    (repo / "perf_tests" / "conftest.py").write_text(FAKE_CONFTEST.format(machine=fingerprint))
    _git(repo, "commit", "-q", "-am", "this machine")
    monkeypatch.chdir(repo)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    where = tmp_path / "store.sqlite"
    (tmp_path / "bl").mkdir()  # no committed baseline for this device
    # The fake case is timed for real on a shared machine, so two invocations differ by chance: on a loaded
    # 2-core machine even CPU time shifted by 36% from one invocation to the next, an A/A difference the gate
    # rightly calls real. A 75% minimum effect keeps this A/A step from
    # failing on such a shift, and the 5x slowdown below fails far outside it.
    args = ["--runs", "3", "--label", "torch2", "--baseline-dir", str(tmp_path / "bl"), "--store", str(where),
            "--min-effect", "0.75"]
    timer = ["--", "--benchmark-timer=time.process_time"]
    assert main(["run", *args, "--results", str(tmp_path / "r1"), *timer]) == 0
    err = capsys.readouterr().err
    assert "holds no earlier run of this machine" in err and "judged against these 3 run(s)" in err
    assert f"update-baselines {tmp_path / 'r1'}/torch2-run*.json" in err
    assert main(["run", *args, "--results", str(tmp_path / "r2"), *timer]) == 0
    err = capsys.readouterr().err
    assert "baseline: 3 run(s) of no other commit recorded on this machine" in err
    verdict = json.loads((tmp_path / "r2" / "verdict-torch2.json").read_text())
    assert "this machine at" in json.dumps(verdict)
    (repo / "perf_tests" / "factor.txt").write_text("5.0")
    _git(repo, "commit", "-q", "-am", "slower")
    assert main(["run", *args, "--results", str(tmp_path / "r3"), *timer]) == 1
    err = capsys.readouterr().err
    assert "baseline: 6 run(s) of the latest commit recorded on this machine other than the tree's" in err
    with Store.open(where) as store:
        assert store.count() == 9
