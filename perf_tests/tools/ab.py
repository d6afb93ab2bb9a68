"""The A/B protocol: the current tree (A, the candidate) against a git ref (B, the reference) on one machine.

B is checked out into a temporary detached worktree (perf_tests.tools.worktree) and removed afterwards. Both
sides run in the same environment (the interpreter running ``python -m perf_tests run``), in separate
processes run in pairs: pair i is (A_i, B_i), side by side or back to back, A first in odd pairs and B first
in even ones, so drift of the machine that hits both members of a pair cancels in the paired analysis
(per-pair log ratios of the case medians), and so does an effect of going first over an even number of
pairs.
``perf_tests.tools.run`` drives the runs and the budget; this module holds the trees and their order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from perf_tests.errors import InputError
from perf_tests.records.baselines import RecordedCommit, latest_recorded_commit
from perf_tests.tools.worktree import Tree, checkout


@contextmanager
def ab_trees(ref: str, root: Path) -> Iterator[tuple[Tree, Tree]]:
    """(A, B): the tree at ``root`` and ``ref`` checked out beside it in a temporary worktree."""
    with checkout(ref, root, prefix="perf-ab-") as other:
        if not (other.path / "perf_tests").is_dir():
            raise InputError(f"{ref} ({other.commit[:12]}) has no perf_tests/ folder; pick a newer ref.")
        yield (Tree(root, "current tree", side="A"),
               Tree(other.path, f"{ref} ({other.commit[:12]})", other.commit, side="B"))


def gpu_visible(environ=os.environ) -> bool:
    """Whether the NVIDIA driver lists a GPU this process may use: files only, no torch import (the driver
    of `python -m perf_tests run` does not load PyTorch)."""
    if environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    try:
        return any(os.scandir("/proc/driver/nvidia/gpus"))
    except OSError:
        return False


def suite_device(suite_cmd: Sequence[str], gpu: Callable[[], bool] = gpu_visible) -> str:
    """"cuda" or "cpu": the suite's --device when the command gives one, else its default (CUDA where
    present)."""
    for i, arg in enumerate(suite_cmd):
        if arg == "--device" and i + 1 < len(suite_cmd):
            return "cuda" if suite_cmd[i + 1].startswith("cuda") else "cpu"
        if arg.startswith("--device="):
            return "cuda" if arg.split("=", 1)[1].startswith("cuda") else "cpu"
    return "cuda" if gpu() else "cpu"


def pair_cpus(suite_cmd: Sequence[str], allowed: set[int] | None = None,
              gpu: Callable[[], bool] = gpu_visible) -> set[int] | None:
    """The CPUs both processes of an A/B pair are pinned to (Linux), else None.

    On a CPU run, one core: two processes alive at once are otherwise kept on different cores by the
    scheduler, and cores of a shared machine differ in speed (measured here: one side of an A/A pair ran a
    case 30% slower in every round). On CUDA the time is the device's, and a compile needs the host's
    cores (Inductor compiles in parallel workers; a cold max-autotune compile on one core can outlast the
    partner's wait, perf_tests.measure.turns.WAIT_S): both get every core this process may use."""
    if allowed is None:
        if not hasattr(os, "sched_getaffinity"):
            return None
        allowed = os.sched_getaffinity(0)
    return set(allowed) if suite_device(suite_cmd, gpu) == "cuda" else {min(allowed)}


def baseline_reference(baseline_dir: str | os.PathLike, suite_cmd: Sequence[str],
                       gpu: Callable[[], bool] = gpu_visible) -> RecordedCommit:
    """The commit the newest run of the committed baselines of the suite's device type was recorded at: a
    reference every machine of that type can A/B against, whichever of them recorded it (.ci/run)."""
    device_type = suite_device(suite_cmd, gpu)
    found = latest_recorded_commit(baseline_dir, device_type)
    if found is None:
        raise InputError(f"--ab-baseline: no {device_type} baseline in {baseline_dir} records a git commit "
                         "and a datetime; record one with `nox -s update-baselines`, or name a ref with "
                         "--ab.")
    return found
