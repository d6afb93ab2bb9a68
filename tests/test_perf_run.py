"""The suite run for real, in a subprocess: bad options stop it with exit 2, a killed run keeps every finished
case in its journal, a failed case reaches the result file with its kind, and compile time is measured in
the same Inductor cache state on a fresh machine and on a warm one.

Small selections only (one attention shape, a few rounds): these tests check what is recorded, never how
long anything took.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from perf_tests.records.journal import journal_path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--case-kind", "attention-self-1024", "--compile", "eager", "--rounds", "2", "--warmup-rounds", "1"]


def suite_cmd(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "perf_tests", "-q", "-p", "no:cacheprovider",
            "--inductor-cache-dir", str(tmp_path / "inductor"), *args]


def run_suite(tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(suite_cmd(tmp_path, *args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def read_journal(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("args, option", [  # every option's check: tests/test_perf_cases.py
    (["--steps", "0"], "--steps"), (["--batch-size", "1,x"], "--batch-size"), (["--grid", "nightly"],
                                                                               "--grid"),
])
def test_bad_option_exits_2_naming_the_option(tmp_path, args, option):
    result = run_suite(tmp_path, *args, "--benchmark-json", str(tmp_path / "r.json"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: {option}" in result.stderr or f"{option} " in result.stderr, result.stderr
    assert not (tmp_path / "r.json").exists() and not journal_path(tmp_path / "r.json").exists()


def test_a_run_writes_the_perf_tests_section_and_a_complete_journal(tmp_path):
    out = tmp_path / "run.json"
    result = run_suite(tmp_path, *SMALL, "--attention", "original,xformers", "--benchmark-json", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads(out.read_text())
    name = "test_attention_self_1024[tiny-original-eager-bs1-fp32]"
    xformers = "test_attention_self_1024[tiny-xformers-eager-bs1-fp32]"
    p = doc["perf_tests"]
    assert p["harness_version"] == 2 and p["grid_name"] == "custom"
    assert p["selected"] == [name, xformers]
    assert [s["name"] for s in p["skipped"]] == [xformers] and p["failed"] == []
    assert p["inductor_cache"] == {"mode": "warm", "dir": str(tmp_path / "inductor")}
    assert [s["before"] for s in p["canary"]["samples"]] == [name, None]
    (bench,) = doc["benchmarks"]
    info = bench["extra_info"]
    assert info["iterations"] == bench["stats"]["iterations"] >= 1 and len(bench["stats"]["data"]) == 2
    assert info["compile_cache"] is None and info["vae_attention_used"] is None
    assert len(doc["machine_info"]["machine_id"]) == 12

    lines = read_journal(journal_path(out))
    assert [x["type"] for x in lines] == ["start", "canary", "case", "skip", "canary", "end"]
    assert lines[0]["perf_tests"]["selected"] == p["selected"]
    assert lines[0]["machine_info"]["device_type"] == "cpu"
    assert lines[2]["benchmark"]["stats"]["data"] == bench["stats"]["data"]
    assert lines[2]["benchmark"]["extra_info"] == info


def test_a_killed_run_keeps_every_finished_case_in_its_journal(tmp_path):
    out = tmp_path / "killed.json"
    # Four cases, each made to last about a second by an injected delay; killed after the second.
    args = [*SMALL, "--attention", "original", "--batch-size", "1,2,3,4", "--inject-delay", "0.05",
            "--min-round-ms", "1", "--rounds", "8", "--benchmark-json", str(out)]
    proc = subprocess.Popen(suite_cmd(tmp_path, *args), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    journal = journal_path(out)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if journal.exists() and journal.read_text().count('"type": "case"') >= 2:
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.02)
        else:
            pytest.fail("no two finished cases within 300 s")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # pytest-benchmark writes its JSON only at the end: the journal is what is left
    lines = read_journal(journal)  # every line is whole: written, flushed and fsync'ed one at a time
    types = [x["type"] for x in lines]
    assert types[0] == "start" and "end" not in types
    assert len(lines[0]["perf_tests"]["selected"]) == 4
    cases = [x["benchmark"] for x in lines if x["type"] == "case"]
    assert len(cases) >= 2
    assert [c["name"] for c in cases[:2]] == lines[0]["perf_tests"]["selected"][:2]
    assert all(len(c["stats"]["data"]) == 8 and c["extra_info"]["iterations"] >= 1 for c in cases)


@pytest.fixture
def wrong_everywhere(tmp_path):
    """A plugin that makes every optimized output wrong (zero tolerance): a real fault in a real run."""
    (tmp_path / "zero_tolerance.py").write_text(
        "from perf_tests.measure import cases\n"
        "def pytest_configure(config):\n"
        "    for table in cases.TOLERANCES.values():\n"
        "        for key in table:\n"
        "            table[key] = 0.0\n"
    )
    return ["-p", "zero_tolerance"]


@pytest.mark.skipif(not hasattr(torch.nn.functional, "scaled_dot_product_attention"), reason="needs SDPA")
def test_a_run_where_every_case_fails_still_writes_its_failures(tmp_path, wrong_everywhere):
    out = tmp_path / "failed.json"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    result = subprocess.run(suite_cmd(tmp_path, *SMALL, "--attention", "sdpa-math", *wrong_everywhere,
                                      "--benchmark-json", str(out)),
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads(out.read_text())
    name = "test_attention_self_1024[tiny-sdpa-math-eager-bs1-fp32]"
    assert doc["benchmarks"] == []
    (failure,) = doc["perf_tests"]["failed"]
    assert failure["name"] == name and failure["kind"] == "wrong-output"
    assert "WRONG OUTPUT" in failure["reason"]
    lines = read_journal(journal_path(out))
    assert [x["type"] for x in lines] == ["start", "canary", "fail", "canary", "end"]


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile needs PyTorch 2")
def test_compile_time_is_recorded_in_the_cache_state_it_ran_in_on_a_fresh_and_a_warm_machine(tmp_path):
    """The +800% false alarm of a fresh clone: the baseline's compile read a warm Inductor cache, the new
    machine's a cold one. With --inductor-cache warm both runs measure a compile that finds every graph in
    the cache when the folder is full (the second run); the first run on an empty folder compiles once and
    says so (cold), so the two are never compared as one state."""
    args = ["--case-kind", "attention-self-1024", "--attention", "sdpa", "--compile", "compile", "--rounds",
            "2",
            "--canary", "off"]
    infos = []
    for i in range(2):
        out = tmp_path / f"compile{i}.json"
        result = run_suite(tmp_path, *args, "--benchmark-json", str(out), timeout=900)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        (bench,) = json.loads(out.read_text())["benchmarks"]
        infos.append(bench["extra_info"])
    assert infos[0]["compile_cache"] == "cold" and infos[0]["fxgraph_cache_misses"] >= 1, infos[0]
    assert infos[1]["compile_cache"] == "warm", infos[1]
    assert infos[1]["fxgraph_cache_misses"] == 0 and infos[1]["fxgraph_cache_hits"] >= 1, infos[1]
    before = set((tmp_path / "inductor").iterdir())
    assert before

    # --inductor-cache cold: a fresh empty folder for the compilation, though the suite's folder is warm
    out = tmp_path / "cold.json"
    result = run_suite(tmp_path, *args, "--inductor-cache", "cold", "--benchmark-json", str(out), timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads(out.read_text())
    (bench,) = doc["benchmarks"]
    info = bench["extra_info"]
    assert info["compile_cache"] == "cold" and doc["perf_tests"]["inductor_cache"]["mode"] == "cold"
    assert info["fxgraph_cache_misses"] >= 1 and info["fxgraph_cache_hits"] == 0, info
    assert set((tmp_path / "inductor").iterdir()) == before  # the cold folder is gone
