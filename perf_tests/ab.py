"""The A/B protocol: the current tree (A, the candidate) against a git ref (B, the reference) on one machine.

B is checked out into a temporary detached worktree (perf_tests.worktree) and removed afterwards. Both sides
run in the same environment (the interpreter running ``python -m perf_tests run``), in separate processes
that alternate A, B, A, B, ...: pair i is (A_i, B_i), run back to back, so drift of the machine that hits
both members of a pair cancels in the paired analysis (per-pair log ratios of the case medians).
``perf_tests.run`` drives the runs and the budget; this module holds the trees and their order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from perf_tests.errors import InputError
from perf_tests.worktree import Tree, checkout


@contextmanager
def ab_trees(ref: str, root: Path) -> Iterator[tuple[Tree, Tree]]:
    """(A, B): the tree at ``root`` and ``ref`` checked out beside it in a temporary worktree."""
    with checkout(ref, root, prefix="perf-ab-") as other:
        if not (other.path / "perf_tests").is_dir():
            raise InputError(f"{ref} ({other.commit[:12]}) has no perf_tests/ folder; pick a newer ref.")
        yield (Tree(root, "current tree", side="A"),
               Tree(other.path, f"{ref} ({other.commit[:12]})", other.commit, side="B"))
