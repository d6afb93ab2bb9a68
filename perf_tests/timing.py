"""How one case is timed: first call, explicit warm-up, then pytest-benchmark's pedantic rounds.

The timer is pytest-benchmark's; what it times is ``work(); delay(); synchronize()``, so asynchronous
CUDA work is inside the measured interval. Model build, weight fill and compilation happen before the
rounds. The first call (which compiles, for a compiled model) is timed on its own, its output is checked
against the reference, and the compile counters of torch._dynamo (graph breaks, graphs compiled, compile
seconds) are read around it. Memory: CUDA peak allocated/reserved over the timed rounds; on a CPU, the
peak RSS delta of the last untimed call (a sampling thread would perturb the timed rounds).
This module knows nothing about Stable Diffusion: it times any ``fn() -> tensor``.
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def sync(device: str | torch.device) -> None:
    """Wait until queued device work is done (CPU ops are synchronous)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)  # torch >= 1.13
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc)


# ---------------------------------------------------------------------------------------------------------
# torch._dynamo counters (None on PyTorch 1.12, which has no dynamo)


def _dynamo_utils():
    try:
        import torch._dynamo.utils as du
    except ImportError:
        return None
    return du if hasattr(du, "counters") else None


def compile_snapshot() -> dict | None:
    """Cumulative dynamo counters now: graph breaks, graphs compiled, compile seconds, cache hits."""
    du = _dynamo_utils()
    if du is None:
        return None
    c = du.counters
    metrics = getattr(du, "compilation_time_metrics", {})
    compile_s = metrics.get("_compile.compile_inner")
    return {
        "graph_breaks": sum(c["graph_break"].values()),
        "graphs": c["stats"]["unique_graphs"],
        "compile_s": sum(compile_s) if compile_s is not None else None,
        "fxgraph_cache_hit": c["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": c["inductor"]["fxgraph_cache_miss"],
    }


def _delta(after: dict, before: dict, key: str):
    if after.get(key) is None or before.get(key) is None:
        return None
    return after[key] - before[key]


# ---------------------------------------------------------------------------------------------------------
# Memory


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakRSS:
    """Peak resident-set growth during a block, sampled every ``interval`` s (Linux; else None)."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.delta: int | None = None

    def __enter__(self):
        self._start = _rss_bytes()
        self._peak = self._start
        self._stop = threading.Event()
        if self._start is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            rss = _rss_bytes()
            if rss is not None and rss > self._peak:
                self._peak = rss
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self._start is None:
            return
        self._stop.set()
        self._thread.join()
        end = _rss_bytes() or self._peak
        self.delta = max(self._peak, end) - self._start


# ---------------------------------------------------------------------------------------------------------
# Injected slowdown (timing-honesty check)


def make_delay(device: str | torch.device, seconds: float) -> Callable[[], None]:
    """Extra busy time of a known duration inside the timed region. On CUDA it is a device-side spin
    (torch.cuda._sleep) queued asynchronously, so it only shows up if the timing synchronizes. On a CPU it
    is a busy wait, not time.sleep: on a loaded machine the scheduler credits a sleeping process, which
    then runs the rest of the round faster, so a sleep shows up as less than its length."""
    if seconds <= 0:
        return lambda: None
    if torch.device(device).type == "cuda" and hasattr(torch.cuda, "_sleep"):
        cycles_per_s = _cuda_cycles_per_second(device)
        cycles = int(seconds * cycles_per_s)
        return lambda: torch.cuda._sleep(cycles)
    return lambda: _spin(seconds)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _cuda_cycles_per_second(device) -> float:
    n = 10_000_000
    torch.cuda._sleep(n)  # warm
    sync(device)
    t = time.perf_counter()
    torch.cuda._sleep(n)
    sync(device)
    return n / (time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------------------
# The measurement


@dataclass
class Measured:
    first_output: object
    extra: dict  # goes into benchmark.extra_info


def measure(
    benchmark,
    fn: Callable[[], object],
    *,
    device: str | torch.device,
    rounds: int,
    warmup_rounds: int = 1,
    compiled: bool = False,
    check: Callable[[object], dict] | None = None,
    delay_s: float = 0.0,
) -> Measured:
    """Time ``fn`` with ``benchmark.pedantic``.

    Calls, in order: the first call (timed alone: ``first_call_s``; compiles when ``compiled``; its
    output goes to ``check``, which raises when it is wrong), ``warmup_rounds - 1`` more untimed calls
    (one more when compiled, so a recompile on the second call is not timed), then ``rounds`` timed
    calls with the garbage collector off. ``delay_s`` adds a known delay (device-side on CUDA) to every
    timed round: the timing-honesty check, whose medians must move by about that much.
    """
    is_cuda = torch.device(device).type == "cuda"
    before = compile_snapshot() if compiled else None

    extra_warmups = max(warmup_rounds, 1) - 1 + (1 if compiled else 0)
    # CPU memory is read on the last untimed call: the first one when it is the only one (eager only).
    with PeakRSS() if (extra_warmups == 0 and not is_cuda) else _null() as probe:
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        first_call_s = time.perf_counter() - t0
    peak_rss = probe.delta
    after_first = compile_snapshot() if compiled else None
    extra = {"first_call_s": first_call_s}
    if check is not None:
        extra.update(check(out))

    for i in range(extra_warmups):
        last = i == extra_warmups - 1
        with PeakRSS() if (last and not is_cuda) else _null() as probe:
            fn()
            sync(device)
        if last and not is_cuda:
            peak_rss = probe.delta

    delay = make_delay(device, delay_s)
    if delay_s:
        extra["injected_delay_s"] = delay_s

    def timed():
        fn()
        delay()
        sync(device)

    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=0, iterations=1)
    finally:
        if gc_was_enabled:
            gc.enable()

    if is_cuda:
        extra["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        extra["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    else:
        extra["peak_memory_bytes"] = peak_rss
        extra["peak_reserved_bytes"] = None

    extra.update(_compile_extra(compiled, before, after_first, compile_snapshot() if compiled else None,
                                first_call_s, benchmark))
    return Measured(out, extra)


def _compile_extra(compiled, before, after_first, end, first_call_s, benchmark) -> dict:
    keys = ("compile_time_s", "graph_breaks", "recompiles")
    if not compiled:
        return dict.fromkeys(keys)
    if before is None:  # compiled without dynamo counters: estimate from the first call
        return {"compile_time_s": max(0.0, first_call_s - _median(benchmark)), "graph_breaks": None,
                "recompiles": None}
    compile_s = _delta(end, before, "compile_s")
    if compile_s is None:
        compile_s = max(0.0, first_call_s - _median(benchmark))
    return {
        "compile_time_s": compile_s,
        "graph_breaks": _delta(end, before, "graph_breaks"),
        # graphs compiled after the first call (warm-up or timed rounds): steady state should have none
        "recompiles": _delta(end, after_first, "graphs"),
        "compiled_graphs": _delta(after_first, before, "graphs"),
        "fxgraph_cache_hits": _delta(end, before, "fxgraph_cache_hit"),
        "fxgraph_cache_misses": _delta(end, before, "fxgraph_cache_miss"),
    }


def _median(benchmark) -> float:
    stats = getattr(benchmark, "stats", None)
    data = getattr(getattr(stats, "stats", None), "data", None)
    return statistics.median(data) if data else 0.0


class _null:
    delta = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
