"""perf_tests.measure.turns and the side-by-side launch of an A/B pair: real processes and pipes, no suite."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest

from perf_tests.measure import turns
from perf_tests.tools import run as R

REPO = Path(__file__).resolve().parents[1]

# Each side appends "<side><i>" to a shared file, then hands over; ``stop`` ends the side early without a
# word to its partner (as a crash would). WAIT_S is lowered so that a broken hand-over fails the test
# in seconds instead of hanging it.
SIDE = """
import os, sys
sys.path.insert(0, {repo!r})
from perf_tests.measure import turns
turns.WAIT_S = 20.0
side, rounds, stop, log = {side!r}, {rounds}, {stop}, {log!r}
turns.begin()
print("cpus", sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None)
for i in range(rounds):
    if i == stop:
        os._exit(0)
    with open(log, "a") as fh:
        fh.write(f"{{side}}{{i}} ")
    turns.pass_turn()
turns.end()
"""


def _job(tmp_path: Path, side: str, rounds: int, stop: int = -1) -> R.Job:
    log = tmp_path / "order.txt"
    code = textwrap.dedent(SIDE.format(repo=str(REPO), side=side, rounds=rounds, stop=stop, log=str(log)))
    return R.Job([sys.executable, "-c", code], tmp_path, {}, tmp_path / f"{side}.log")


def test_two_processes_take_turns_round_by_round(tmp_path):
    t0 = time.monotonic()
    codes = R.run_side_by_side([_job(tmp_path, "A", 5), _job(tmp_path, "B", 5)])
    assert codes == [0, 0], [(tmp_path / f"{s}.log").read_text() for s in "AB"]
    assert (tmp_path / "order.txt").read_text().split() == [f"{s}{i}" for i in range(5) for s in "AB"]
    assert time.monotonic() - t0 < turns.WAIT_S  # nobody waited out the timeout
    # both on the same single CPU, so neither runs on a faster core than the other
    cpus = {(tmp_path / f"{s}.log").read_text().strip() for s in "AB"}
    assert cpus == {f"cpus {sorted(R.shared_cpu())}" if R.shared_cpu() else "cpus None"}


def test_a_partner_that_ends_early_leaves_the_other_alone_not_waiting(tmp_path):
    t0 = time.monotonic()
    codes = R.run_side_by_side([_job(tmp_path, "A", 5), _job(tmp_path, "B", 5, stop=2)])
    assert codes == [0, 0]
    assert (tmp_path / "order.txt").read_text().split() == ["A0", "B0", "A1", "B1", "A2", "A3", "A4"]
    assert time.monotonic() - t0 < 20.0  # end-of-file, not the partner's timeout


def test_sides_with_unequal_rounds_both_finish(tmp_path):
    codes = R.run_side_by_side([_job(tmp_path, "A", 2), _job(tmp_path, "B", 4)])
    assert codes == [0, 0]
    assert (tmp_path / "order.txt").read_text().split() == ["A0", "B0", "A1", "B1", "B2", "B3"]


def test_turns_come_from_the_environment_or_not_at_all():
    assert turns.Turns.from_env({}) is None
    with pytest.raises(turns.TurnsError, match="READ_FD,WRITE_FD"):
        turns.Turns.from_env({turns.ENV: "7"})
    assert not turns.active()
    turns.pass_turn()  # without a partner: a no-op, never a wait
    turns.end()
