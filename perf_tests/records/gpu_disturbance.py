"""Whether a recorded GPU state says the device slowed a case down by itself (too hot, a hardware slowdown,
a power brake): such a case is *disturbed*, like a run whose canary moved.

The state is what :meth:`perf_tests.measure.gpu_state.Probe.case_state` records in a result's
``extra_info.gpu_state``. Power capping is recorded but not a disturbance: a power-bound kernel runs at its
power limit every time. Judging a recorded state needs no GPU and no PyTorch, so it lives with the readers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# What makes a case slower than its code: heat and hardware slowdowns (names of nvmlClocksEventReason bits,
# see perf_tests.measure.gpu_state.REASON_BITS). Power capping and idle are not.
DISTURBING_REASONS = ("sw_thermal_slowdown", "hw_thermal_slowdown", "hw_slowdown", "hw_power_brake_slowdown")
DISTURBING_POLICIES = ("thermal", "reliability")
# Throttled for less than this share of a case's wall time is noise of the counters, not a slowdown.
MIN_THROTTLED_SHARE = 0.01


@dataclass(frozen=True)
class Disturbance:
    """A case the GPU slowed down: a code (for programs) and its numbers (for the sentence)."""

    code: str  # "gpu-throttled"
    reasons: tuple[str, ...]
    throttled_ms: float
    case_ms: float

    def sentence(self) -> str:
        what = "thermal throttling" if any("thermal" in r for r in self.reasons) else "GPU slowdown"
        share = (f"{self.throttled_ms:.0f} of {self.case_ms:.0f} ms" if self.case_ms
                 else f"{self.throttled_ms:.0f} ms")
        return f"{what} ({', '.join(self.reasons)}; {share} held below target clocks)"


def disturbance(state: Mapping[str, Any] | None) -> Disturbance | None:
    """Whether a recorded case state (``extra_info.gpu_state``) says the GPU slowed the case down."""
    if not state or "throttled_ms" not in state:
        return None
    throttled = {p: ms for p, ms in state["throttled_ms"].items() if p in DISTURBING_POLICIES and ms > 0}
    reasons = [r for r in state.get("reasons", []) if r in DISTURBING_REASONS]
    total = sum(throttled.values())
    case_ms = float(state.get("wall_ms") or 0.0)
    if case_ms and total < MIN_THROTTLED_SHARE * case_ms and not reasons:
        return None
    if not throttled and not reasons:
        return None
    names = tuple(dict.fromkeys([*reasons, *(f"{p} policy" for p in throttled)]))
    return Disturbance("gpu-throttled", names, total, case_ms)
