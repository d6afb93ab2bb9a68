"""The A/B protocol: the current tree (A, the candidate) against a git ref (B, the reference) on one machine.

B is checked out into a temporary detached ``git worktree`` and removed afterwards. Both sides run in the same
environment (the interpreter running ``python -m perf_tests run``), in separate processes that alternate
A, B, A, B, ...: pair i is (A_i, B_i), run back to back, so drift of the machine that hits both members of a
pair cancels in the paired analysis (per-pair log ratios of the case medians). ``perf_tests.run`` drives the
runs and the budget; this module holds the trees and their order.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class ABError(Exception):
    """git is missing, the ref does not resolve, or the ref predates the suite."""


@dataclass(frozen=True)
class Tree:
    """A source tree the suite runs in: ``side`` is "A" or "B" in A/B mode, "" for a plain run."""

    side: str
    root: Path
    label: str  # "current tree", or "REF (commit)"


def _git(args: list[str], cwd: Path) -> str:
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ABError("git is not installed; A/B mode needs it.") from None
    if res.returncode != 0:
        raise ABError(f"`git {' '.join(args)}` failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout.strip()


@contextmanager
def ab_trees(ref: str, root: Path) -> Iterator[tuple[Tree, Tree]]:
    """(A, B): the tree at ``root`` and ``ref`` checked out beside it in a temporary worktree."""
    commit = _git(["rev-parse", "--verify", f"{ref}^{{commit}}"], root)
    tmp = Path(tempfile.mkdtemp(prefix="perf-ab-"))
    worktree = tmp / "ref"
    try:
        _git(["worktree", "add", "--detach", str(worktree), commit], root)
        if not (worktree / "perf_tests").is_dir():
            raise ABError(f"{ref} ({commit[:12]}) has no perf_tests/ folder; pick a newer ref.")
        yield Tree("A", root, "current tree"), Tree("B", worktree, f"{ref} ({commit[:12]})")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=root,
                       capture_output=True, check=False)
        subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
