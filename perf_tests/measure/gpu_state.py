"""The GPU's state around each timed case, read through NVML (``nvidia-ml-py``): clocks, temperature,
power, clock-event (throttle) reasons, the time NVML counted against each performance policy, and whether
application clocks are set away from their defaults.

A GPU that slows itself down while a case runs (too hot, a hardware slowdown, a power brake) makes that
case slower without any change of the code: the case is *disturbed*. The reader of a result judges a
recorded state (:func:`perf_tests.records.gpu_disturbance.disturbance`).

Nothing here imports torch. The NVML calls go through an object with ``pynvml``'s function names, so tests
replay recorded answers (:class:`Replay`) and a GPU machine records them
(``python -m perf_tests.measure.gpu_state --record FILE``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from perf_tests.records.gpu_disturbance import DISTURBING_POLICIES

# Bits of nvmlClocksEventReasons (nvml.h, "nvmlClocksEventReason*"; "ThrottleReason" in older headers).
REASON_BITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# nvmlPerfPolicyType_t (nvml.h): NVML counts, per policy, the nanoseconds the clocks were held below target.
POLICIES = {"power": 0, "thermal": 1, "sync_boost": 2, "board_limit": 3, "low_utilization": 4,
            "reliability": 5}
NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2  # nvmlClockType_t
NVML_TEMPERATURE_GPU = 0  # nvmlTemperatureSensors_t


def reason_names(mask: int) -> list[str]:
    return [name for bit, name in REASON_BITS.items() if mask & bit]


class Probe:
    """Snapshots of one GPU through an NVML binding (``pynvml`` or a :class:`Replay`)."""

    def __init__(self, nvml: Any, index: int = 0, clock: Callable[[], float] = time.perf_counter):
        self.nvml = nvml
        self.clock = clock
        nvml.nvmlInit()
        self.handle = nvml.nvmlDeviceGetHandleByIndex(index)

    @classmethod
    def open(cls, index: int = 0) -> tuple[Probe | None, str | None]:
        """(probe, None), or (None, why not): NVML is optional; its absence is recorded, never fatal."""
        try:
            import pynvml
        except ImportError:
            return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
        try:
            return cls(pynvml, index), None
        except Exception as exc:  # NVMLError_*: no driver, no permission, a MIG slice without NVML access
            return None, f"NVML unavailable: {type(exc).__name__}: {exc}"

    def _reasons(self) -> int:
        get = getattr(self.nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if get is None:  # nvidia-ml-py before 12.535 names it after throttling
            get = self.nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        return int(get(self.handle))

    def _violation_ns(self) -> dict[str, int]:
        out = {}
        for name in DISTURBING_POLICIES + ("power",):
            try:
                out[name] = int(self.nvml.nvmlDeviceGetViolationStatus(self.handle,
                                                                       POLICIES[name]).violationTime)
            except Exception:  # NVMLError_NotSupported on some boards and policies
                continue
        return out

    def _app_clocks(self) -> dict[str, int | bool | None]:
        try:
            current = int(self.nvml.nvmlDeviceGetApplicationsClock(self.handle, NVML_CLOCK_SM))
            default = int(self.nvml.nvmlDeviceGetDefaultApplicationsClock(self.handle, NVML_CLOCK_SM))
        except Exception:
            return {"app_sm_clock_mhz": None, "app_clocks_locked": None}
        return {"app_sm_clock_mhz": current, "app_clocks_locked": current != default}

    def snapshot(self) -> dict[str, Any]:
        nvml, h = self.nvml, self.handle
        return {
            "t": self.clock(),
            "sm_clock_mhz": int(nvml.nvmlDeviceGetClockInfo(h, NVML_CLOCK_SM)),
            "mem_clock_mhz": int(nvml.nvmlDeviceGetClockInfo(h, NVML_CLOCK_MEM)),
            "temperature_c": int(nvml.nvmlDeviceGetTemperature(h, NVML_TEMPERATURE_GPU)),
            "power_w": int(nvml.nvmlDeviceGetPowerUsage(h)) / 1000.0,  # NVML answers in milliwatts
            "reasons_mask": self._reasons(),
            "violation_ns": self._violation_ns(),
            **self._app_clocks(),
        }

    @staticmethod
    def case_state(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
        """What a result records for one case: the state at its end, its hottest reading, and the time
        NVML counted against each policy while it ran."""
        throttled = {p: (after["violation_ns"][p] - before["violation_ns"].get(p, 0)) / 1e6
                     for p in after["violation_ns"] if p in before["violation_ns"]}
        return {
            "sm_clock_mhz": after["sm_clock_mhz"],
            "mem_clock_mhz": after["mem_clock_mhz"],
            "temperature_c": max(before["temperature_c"], after["temperature_c"]),
            "power_w": after["power_w"],
            "reasons": reason_names(after["reasons_mask"] | before["reasons_mask"]),
            "throttled_ms": {p: round(ms, 3) for p, ms in throttled.items()},
            "wall_ms": round((after["t"] - before["t"]) * 1e3, 3),
            "app_sm_clock_mhz": after["app_sm_clock_mhz"],
            "app_clocks_locked": after["app_clocks_locked"],
        }


class Replay:
    """An NVML binding that answers from a recording: ``{"calls": [{"fn": name, "answer": value}, ...]}``,
    each function's answers in the order they were recorded. An answer that is a dict becomes an object
    with those attributes (NVML's structs); ``{"error": "..."}`` raises."""

    def __init__(self, recording: Mapping[str, Any]):
        self._answers: dict[str, list[Any]] = {}
        for call in recording["calls"]:
            self._answers.setdefault(call["fn"], []).append(call["answer"])

    def __getattr__(self, fn: str) -> Callable[..., Any]:
        if not fn.startswith("nvml"):
            raise AttributeError(fn)
        if fn not in self._answers:
            raise AttributeError(f"the recording has no answer of {fn}")

        def call(*_args: Any) -> Any:
            answers = self._answers[fn]
            answer = answers.pop(0) if len(answers) > 1 else answers[0]  # the last answer repeats
            if isinstance(answer, dict) and "error" in answer:
                raise RuntimeError(answer["error"])
            return type(fn, (), dict(answer))() if isinstance(answer, dict) else answer

        return call


class Recorder:
    """Wraps ``pynvml`` and keeps every answer, for a :class:`Replay` of this GPU's behaviour in tests."""

    def __init__(self, nvml: Any):
        self._nvml = nvml
        self.calls: list[dict[str, Any]] = []

    def __getattr__(self, fn: str) -> Callable[..., Any]:
        target = getattr(self._nvml, fn)

        def call(*args: Any) -> Any:
            try:
                answer = target(*args)
            except Exception as exc:
                self.calls.append({"fn": fn, "answer": {"error": f"{type(exc).__name__}: {exc}"}})
                raise
            if hasattr(answer, "_fields_"):
                kept = {name: getattr(answer, name) for name, _ in answer._fields_}
            else:
                kept = answer if isinstance(answer, (int, float, str)) or answer is None else str(answer)
            if fn != "nvmlDeviceGetHandleByIndex":
                self.calls.append({"fn": fn, "answer": kept})
            else:
                self.calls.append({"fn": fn, "answer": 0})
            return answer

        return call


def main(argv: list[str] | None = None) -> int:
    """Record this GPU's NVML answers over a few seconds of load: a Replay file for the tests."""
    p = argparse.ArgumentParser(prog="python -m perf_tests.measure.gpu_state", description=main.__doc__)
    p.add_argument("--record", type=Path, required=True, help="write the recording (JSON) here")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="how long to load the GPU between the snapshots")
    p.add_argument("--index", type=int, default=0)
    opts = p.parse_args(argv)
    try:
        import pynvml
    except ImportError:
        print("error: nvidia-ml-py is not installed (pip install nvidia-ml-py)", file=sys.stderr)
        return 2
    recorder = Recorder(pynvml)
    probe = Probe(recorder, opts.index)
    before = probe.snapshot()
    import torch  # the load: matmuls on the GPU, so the counters move as in a case

    x = torch.randn(8192, 8192, device=f"cuda:{opts.index}", dtype=torch.float16)
    end = time.perf_counter() + opts.seconds
    while time.perf_counter() < end:
        x = (x @ x).clamp_(-1, 1)
    torch.cuda.synchronize()
    after = probe.snapshot()
    opts.record.write_text(json.dumps({"calls": recorder.calls}, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(Probe.case_state(before, after), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
