"""perf_tests.tools.explain: the operator diff of a case between two trees.

The real test patches a copy of this tree so that the attention softmax runs twice, profiles the tiny
attention case on both commits with the real profiler and checks that softmax heads the list. No timing
is asserted: the patch doubles an operator's work, and the test checks which operator the diff names.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from perf_tests.tools import explain
from perf_tests.tools.worktree import checkout

ROOT = Path(__file__).resolve().parents[1]
EAGER_CASE = "test_attention_self_1024[tiny-original-eager-bs1-fp32]"
COMPILED_CASE = "test_attention_self_1024[tiny-original-compile-bs1-fp32]"
SOFTMAX_LINE = "    sim = sim.softmax(dim=-1)\n"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def repo_from_head(dest: Path) -> Path:
    """A fresh git repository holding this tree's HEAD (git archive), one commit; returns its path."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    git(dest, "init", "-q", "-b", "main")
    git(dest, "config", "user.email", "test@example.com")
    git(dest, "config", "user.name", "test")
    commit(dest, "base")
    return dest


def commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}: the test's patch no longer applies"
    path.write_text(text.replace(old, new, 1))


# ---------------------------------------------------------------------------------------------------------
# The diff itself, on synthetic summaries


def summary(ops: dict, device: str = "cpu") -> dict:
    operators = {n: {"self_us": us, "calls": 1.0} for n, us in ops.items()}
    return {"case": "c", "device": device, "unit": "CPU self time (us per step)", "calls": 5,
            "step_us": sum(ops.values()), "trace": "x.trace.json", "operators": operators}


def test_rows_sorted_by_added_time_with_shares_and_agreement():
    base = [summary({"aten::bmm": 100, "aten::_softmax": 50, "aten::mul": 20}),
            summary({"aten::bmm": 110, "aten::_softmax": 52, "aten::mul": 21})]
    cand = [summary({"aten::bmm": 108, "aten::_softmax": 101, "cpp_fused_add_0": 9}),
            summary({"aten::bmm": 104, "aten::_softmax": 99, "cpp_fused_add_0": 11})]
    d = explain.diff_summaries("c", base, cand, top=10)
    names = [r.name for r in d.rows]
    assert names[0] == "aten::_softmax" and names[1] == "cpp_fused_add_0" and names[-1] == "aten::mul"
    soft = d.rows[0]
    assert soft.added_us == pytest.approx(49.0) and soft.consistent
    assert soft.candidate_share == pytest.approx(100 / 216)
    assert soft.baseline_share == pytest.approx(51 / 176.5)
    assert d.rows[1].compiled and d.rows[1].baseline_us == 0 and d.rows[1].consistent
    bmm = next(r for r in d.rows if r.name == "aten::bmm")
    assert not bmm.consistent  # 100, 110 vs 108, 104: the processes overlap
    assert len(explain.diff_summaries("c", base, cand, top=2).rows) == 2


def test_renderers_text_markdown_json():
    base = [summary({"aten::_softmax": 50, "aten::bmm": 100})]
    cand = [summary({"aten::_softmax": 100, "aten::bmm": 100})]
    d = explain.diff_summaries("test_x[tiny]", base, cand, labels=("main (abc)", "current tree"))
    d.traces = {"baseline": ["b.trace.json"], "candidate": ["c.trace.json"]}
    failed = explain.OperatorDiff("test_y[tiny]", "main (abc)", "current tree", error="it broke")
    text = explain.render_text([d, failed])
    assert "aten::_softmax" in text.splitlines()[3] and "+0.050" in text and "c.trace.json" in text
    assert text.startswith("test_x[tiny]: current tree vs main (abc)") and "not profiled: it broke" in text
    md = explain.render_markdown([d])
    assert "| +0.050 | 0.050 | 0.100 | 1/1 | 33.3%/50.0% | `aten::_softmax` |" in md
    doc = json.loads(explain.RENDERERS["json"]([d, failed]))
    assert doc["explain"][0]["rows"][0]["added_us"] == pytest.approx(50)
    assert doc["explain"][1]["error"] == "it broke"


def test_checkout_makes_and_removes_a_detached_worktree(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    (repo / "f").write_text("one")
    first = commit(repo, "one")
    (repo / "f").write_text("two")
    commit(repo, "two")
    with checkout("HEAD~1", repo) as tree:
        assert tree.commit == first and (tree.path / "f").read_text() == "one"
        assert git(tree.path, "rev-parse", "HEAD") == first
    assert not tree.path.exists() and str(tree.path) not in git(repo, "worktree", "list")
    assert (repo / "f").read_text() == "two"  # the working tree is untouched


# ---------------------------------------------------------------------------------------------------------
# For real: a softmax made twice as costly heads the list


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(torch, "compile"), reason=(
    "PyTorch 1.12's profiler does not always attribute the CPU softmax kernel to aten::_softmax (in 2 of 5 "
    "runs of this test on a fresh clone the row was absent and the doubled softmax added ~1 ms to a 41 ms "
    "step); PyTorch 2 attributes it every time"))
def test_a_doubled_softmax_heads_the_operator_diff(tmp_path):
    repo = repo_from_head(tmp_path / "repo")
    base = git(repo, "rev-parse", "HEAD")
    # Test-only patch: the original attention computes its softmax a second time (result discarded).
    edit(repo / "sd" / "attention.py", SOFTMAX_LINE, SOFTMAX_LINE + "    sim.softmax(dim=-1)\n")
    commit(repo, "softmax twice")
    out = tmp_path / "out"
    # The CPU profiler now and then leaves the softmax kernel out of aten::_softmax in both processes (seen
    # once with PyTorch 2.14.1 on a fresh clone: no aten::_softmax row at all, the doubled aten::softmax
    # call counted 1/2); that is the profiler's gap, not the diff's, so such a profile is taken again.
    for _ in range(3):
        (d,) = explain.explain_cases(base, [EAGER_CASE], out, root=repo, runs=1, calls=8, warmup=2)
        assert d.error is None, d.error
        if any(r.name == "aten::_softmax" for r in d.rows):
            break
    top = d.rows[0]
    assert top.name == "aten::_softmax", explain.render_text([d])
    assert top.candidate_calls == 2 * top.baseline_calls  # the doubled call shows in the counts too
    for paths in d.traces.values():  # Chrome traces of both sides are kept
        assert json.loads(Path(paths[0]).read_text())["traceEvents"]
    assert (out / explain._slug(EAGER_CASE) / "baseline-1.json").is_file()
    assert "aten::_softmax" in explain.render_markdown([d])
    assert not list(Path(repo).glob(".git/worktrees/*"))  # the temporary worktree is gone


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile needs PyTorch 2 (Inductor kernels)")
def test_compiled_case_names_inductor_kernels(tmp_path):
    s = explain.profile_in_tree(ROOT, COMPILED_CASE, tmp_path / "compiled", calls=2, warmup=1, device="cpu")
    kernels = [n for n in s["operators"] if explain._COMPILED_RE.search(n)]
    fused = [n for n in kernels if "cpp_fused" in n or "triton_" in n]
    assert fused, f"no Inductor kernel among {sorted(s['operators'])}"
    assert any("softmax" in n for n in fused)  # the fused kernel is named after the ops it holds
    d = explain.diff_summaries(COMPILED_CASE, [s], [s], top=100)
    assert any(r.compiled and r.name in fused for r in d.rows)
    assert (tmp_path / "compiled.trace.json").is_file()


def test_cli_rejects_a_name_that_is_not_a_case(capsys):
    from perf_tests.__main__ import main

    assert main(["explain", "HEAD", "test_unet_step[tiny-sdpa]"]) == 2
    assert "error: not a perf_tests case id" in capsys.readouterr().err
