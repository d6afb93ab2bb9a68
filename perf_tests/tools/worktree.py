"""A git ref checked out into a temporary, detached worktree, removed on exit.

Used wherever a benchmark must run on another commit's code with this environment (A/B, ``explain``,
``bisect``): the other tree gets its own folder, so the current working tree, its uncommitted edits and
its branch are never touched.

    with checkout("main") as tree:       # tree.path: Path of the worktree, tree.commit: full sha
        subprocess.run([...], cwd=tree.path)
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from perf_tests.errors import InputError


@dataclass(frozen=True)
class Tree:
    """A source tree: a git worktree of a commit, or the current one; ``side`` is "A" or "B" in A/B mode."""

    path: Path
    label: str  # what the user named it: a ref, "current tree", "REF (commit)"
    commit: str = ""  # full sha ("" for a working tree that is not a checkout of a commit)
    side: str = ""


def git(args: list[str], cwd: Path) -> str:
    """Run git and return its stdout; a failure raises InputError with git's own message."""
    try:
        res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise InputError("git is not installed; comparing with a git ref needs it.") from None
    if res.returncode != 0:
        said = res.stderr.strip() or res.stdout.strip()
        raise InputError(f"`git {' '.join(args)}` in {cwd} failed: {said}")
    return res.stdout.strip()


def repo_root(start: Path | None = None) -> Path:
    return Path(git(["rev-parse", "--show-toplevel"], start or Path.cwd()))


def resolve(ref: str, root: Path) -> str:
    """The full commit sha of ``ref``; an unknown ref raises InputError."""
    return git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], root)


@contextlib.contextmanager
def checkout(ref: str, root: Path | None = None, prefix: str = "perf-worktree-") -> Iterator[Tree]:
    """Check ``ref`` out into a temporary detached worktree of the repository at ``root``; remove it after."""
    root = repo_root(root)
    commit = resolve(ref, root)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        path = Path(tmp) / commit[:12]
        git(["worktree", "add", "--detach", "--quiet", str(path), commit], root)
        try:
            yield Tree(path, ref, commit)
        finally:
            # --force: the benchmark may leave untracked files (caches, results) in the tree.
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=root,
                           capture_output=True, check=False)
            subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True, check=False)
