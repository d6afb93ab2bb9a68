"""Round-by-round interleaving of the two suite processes of an A/B pair.

A machine shared with other jobs changes speed from one second to the next (measured on a 2-core VM: the
canary moved between 1.0 and 1.8 ms per call within seconds, with nothing of the suite running). Two
processes run one after the other meet that noise at different moments, so even paired runs differ by
10-40% per case. Run side by side and taking turns, they meet it together: both processes of a pair are
started at once, only one of them works at any moment, and they hand over after every timed round. Round
``i`` of a case in A and round ``i`` of the same case in B are then a fraction of a second apart. Each
process still loads, compiles and warms up on its own, while the other waits.

The hand-over is a token passed through two pipes, one per direction. ``python -m perf_tests run`` makes
them, puts the first token in A's pipe and passes each process its ends as ``SD_PERF_TURNS="READ,WRITE"``.
A process waits for the token before its first case (:func:`begin`), passes it on after every timed round
(:func:`pass_turn`, pytest-benchmark's untimed ``teardown``) and at the end (:func:`end`). A process that
ends or dies closes its ends; the other then reads end-of-file, or finds the pipe broken, and carries on
alone, so neither waits on a partner that has gone. Without ``SD_PERF_TURNS`` every call is a no-op.
"""

from __future__ import annotations

import os
import select
from dataclasses import dataclass

ENV = "SD_PERF_TURNS"
TOKEN = b"t"
# The longest a process waits for its partner's round (a cold compile of the sd21 UNet included): past
# it, the partner is taken as hung and this process carries on alone.
WAIT_S = 1800.0


class TurnsError(ValueError):
    """A malformed SD_PERF_TURNS value."""


@dataclass
class Turns:
    read_fd: int
    write_fd: int
    alone: bool = False  # the partner has gone (or never answered): no more waiting
    holding: bool = False  # this process has the token: waiting for it again would block forever
    alone_reason: str | None = None  # why the partner is gone, when it went before this process ended

    @classmethod
    def from_env(cls, environ=os.environ) -> Turns | None:
        raw = environ.get(ENV)
        if not raw:
            return None
        try:
            read_fd, write_fd = (int(x) for x in raw.split(","))
        except ValueError:
            raise TurnsError(f"{ENV}={raw!r}: expected 'READ_FD,WRITE_FD' (set by `python -m perf_tests "
                             "run`; "
                             f"unset it to run the suite on its own)") from None
        for fd in (read_fd, write_fd):
            os.set_inheritable(fd, False)  # a compile worker must not keep the partner from seeing our end
        return cls(read_fd, write_fd)

    def wait(self) -> None:
        """Block until the token arrives; end-of-file (the partner has gone) or WAIT_S means alone."""
        if self.alone or self.holding:
            return
        ready, _, _ = select.select([self.read_fd], [], [], WAIT_S)
        got = os.read(self.read_fd, 1) if ready else b""
        if got != TOKEN:
            self._go_alone(f"the partner did not hand over within {WAIT_S:g} s (hung, or a compile longer "
                           "than that)" if not ready else "the partner process ended (finished or died)")
            return
        self.holding = True

    def pass_turn(self) -> None:
        """Hand the token over and wait for it to come back."""
        if self.alone:
            return
        self._give()
        self.wait()

    def end(self) -> None:
        """Hand the token over for good and close both ends."""
        if not self.alone:
            self._give()
        self._go_alone()

    def _give(self) -> None:
        try:
            os.write(self.write_fd, TOKEN)
        except BrokenPipeError:  # the partner has gone
            self._go_alone("the partner process ended (finished or died)")
            return
        self.holding = False

    def _go_alone(self, reason: str | None = None) -> None:
        if not self.alone and reason is not None:
            self.alone_reason = reason
        self.alone, self.holding = True, False
        for fd in (self.read_fd, self.write_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.read_fd = self.write_fd = -1  # closed once: the numbers may be reused by other files


_turns: Turns | None = None


def begin(environ=os.environ) -> Turns | None:
    """This process's turns (None when it runs alone), after waiting for its first turn."""
    global _turns
    _turns = Turns.from_env(environ)
    if _turns is not None:
        _turns.wait()
    return _turns


def pass_turn() -> None:
    if _turns is not None:
        _turns.pass_turn()


def end() -> None:
    global _turns
    if _turns is not None:
        _turns.end()
        _turns = None


def active() -> bool:
    return _turns is not None and not _turns.alone


def alone_reason() -> str | None:
    """Why this process, one of an A/B pair, now runs without its partner (None: it is not in a pair, or
    the partner is still there). The suite records it on every case measured since (extra_info.alone)."""
    return _turns.alone_reason if _turns is not None and _turns.alone else None
