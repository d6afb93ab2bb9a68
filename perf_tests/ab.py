"""A/B mode: the current tree (A, candidate) against a git ref (B, reference) on the same machine.

B is checked out into a temporary ``git worktree`` (detached; removed afterwards). The suite runs in separate
processes, interleaved A, B, A, B, ... so that slow drift of the machine (clocks, thermals, neighbours) hits
both sides alike, as in the study. The runs of each side are merged (their run-to-run spread then widens the
threshold) and compared with B as the baseline: a regression means the current tree is slower than REF.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from perf_tests.baselines import InputError, load_side
from perf_tests.compare import Outcome
from perf_tests.stats import Policy, compare


@dataclass
class ABRuns:
    a: list[Path]  # current tree
    b: list[Path]  # REF
    ref: str
    commit: str


def _git(args: list[str], cwd: Path) -> str:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise InputError("git is not installed; A/B mode needs it.") from None
    if res.returncode != 0:
        raise InputError(f"`git {' '.join(args)}` failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout.strip()


def repo_root(start: Path | None = None) -> Path:
    return Path(_git(["rev-parse", "--show-toplevel"], start or Path.cwd()))


def suite_command(out_json: Path, pytest_args: list[str]) -> list[str]:
    """The pytest invocation for one run of one side (the documented suite command line), run in that side's tree."""
    return [sys.executable, "-m", "pytest", "perf_tests", "-p", "no:cacheprovider", "-q", *pytest_args,
            f"--benchmark-json={out_json}"]


def run_interleaved(
    ref: str, runs_per_side: int, output_dir: Path, pytest_args: list[str], root: Path | None = None,
    log=print,
) -> ABRuns:
    """Run the suite A, B, A, B, ...; returns the JSON files per side (kept in ``output_dir``)."""
    if runs_per_side < 1:
        raise InputError("--rounds-per-side must be at least 1.")
    root = root or repo_root()
    commit = _git(["rev-parse", "--verify", f"{ref}^{{commit}}"], root)
    output_dir.mkdir(parents=True, exist_ok=True)
    a_files: list[Path] = []
    b_files: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="perf-ab-") as tmp:
        worktree = Path(tmp) / "ref"
        _git(["worktree", "add", "--detach", str(worktree), commit], root)
        try:
            if not (worktree / "perf_tests").is_dir():
                raise InputError(f"{ref} ({commit[:12]}) has no perf_tests/ folder; pick a newer ref.")
            for i in range(1, runs_per_side + 1):
                for side, tree, files in (("A", root, a_files), ("B", worktree, b_files)):
                    out = output_dir / f"{side}-{i}.json"
                    cmd = suite_command(out.resolve(), pytest_args)
                    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                        [str(tree)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
                    log(f"[ab] run {i}/{runs_per_side} side {side} ({'current tree' if side == 'A' else ref}): "
                        f"{' '.join(cmd[1:])}")
                    res = subprocess.run(cmd, cwd=tree, env=env, check=False)
                    # pytest exit 1 = some test failed (e.g. a wrong-output case): the JSON is still written
                    # and the comparator reports it; anything else means no usable result.
                    if res.returncode not in (0, 1) or not out.is_file():
                        raise InputError(
                            f"the suite failed on side {side} (exit {res.returncode}); see its output above."
                        )
                    files.append(out)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=root,
                           capture_output=True, check=False)
            subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True, check=False)
    return ABRuns(a_files, b_files, ref, commit)


def compare_ab(runs: ABRuns, policy: Policy) -> Outcome:
    base = load_side(runs.b, label=f"{runs.ref} ({runs.commit[:12]}, {len(runs.b)} runs)")
    cand = load_side(runs.a, label=f"current tree ({len(runs.a)} runs)")
    # Both sides ran here, on purpose with different code: git_commit is not part of the judged fields.
    return Outcome(compare(base, cand, policy), base, cand)
