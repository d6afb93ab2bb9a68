"""How one case is timed: first call, explicit warm-up, a block size, then pytest-benchmark's pedantic rounds.

A round times a block of ``n`` calls, ``n`` sized after the warm-up so that a round lasts at least
``min_round_s`` (torch.utils.benchmark's blocked autorange): a 3 ms call is no longer at the mercy of one
timer tick or one scheduler slice. pytest-benchmark's ``pedantic(iterations=n)`` divides each round by
``n``, so ``stats.data`` holds per-call seconds; ``extra_info.iterations`` records ``n``.

What a round times is ``n x (work(); delay())`` followed by one device synchronisation, so asynchronous
CUDA work is inside the measured interval. One synchronisation per block is enough: the block starts on an
idle device (the previous block ended with a synchronisation) and ends when the device has finished every
call of it; synchronising after each call would add a host round trip per call to what is measured.
With ``events`` (CUDA events for the component cases, :func:`cuda_event`), a round also records a start
event before its first call and an end event after its last, and ``extra["device_samples"]`` holds each
round's device time per call (``start.elapsed_time(end) / n``), parallel to pytest-benchmark's wall
samples: the host's time to start the round, to return from the synchronisation and the timer's own ticks
stay out of it (docs/gpus.md, "Device time and wall time").

Model build, weight fill and compilation happen before the rounds. The first call (which compiles, for a
compiled model) is timed on its own, its output is checked against the reference, and the compile
counters of torch._dynamo (graph breaks, graphs compiled, compile seconds, Inductor cache hits) are read
around it. The Inductor cache state of that compilation is set here (see :func:`compile_cache_state`).
Memory: CUDA peak allocated/reserved over the timed rounds, from a reset taken just before them; on a
CPU, the peak RSS delta of the last untimed call (a sampling thread would perturb the timed rounds).
This module knows nothing about Stable Diffusion: it times any ``fn() -> tensor``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import torch

# A round lasts at least this long (seconds) unless --min-round-ms says otherwise.
MIN_ROUND_S = {"cpu": 0.05, "cuda": 0.02}
MAX_BLOCK = 100_000  # calls per round, a bound for a function that does nothing


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


def _compile_seconds(metrics: dict) -> float | None:
    """Dynamo's frame-compile seconds from its timing metrics: the key is "..._compile.compile_inner" in
    PyTorch 2.1 and later, "_compile" in 2.0. None when metrics exist under neither name (unknown: the
    caller estimates from the first call instead of reporting 0 s); 0 when there are none at all
    (torch._dynamo.reset() clears them: nothing compiled since)."""
    inner = [sum(v) for k, v in metrics.items() if k.endswith("compile_inner")]
    if inner:
        return sum(inner)
    if "_compile" in metrics:
        return sum(metrics["_compile"])
    return None if metrics else 0.0


def compile_snapshot() -> dict | None:
    """Cumulative dynamo counters now: graph breaks, graphs compiled, compile seconds, cache hits."""
    du = _dynamo_utils()
    if du is None:
        return None
    c = du.counters
    # compilation_time_metrics in PyTorch 2.1 and later; compilation_metrics, a dict of the same, in 2.0
    metrics = getattr(du, "compilation_time_metrics", None)
    if not isinstance(metrics, dict):
        metrics = getattr(du, "compilation_metrics", None)
    metrics = metrics if isinstance(metrics, dict) else {}
    return {
        "graph_breaks": sum(c["graph_break"].values()),
        "graphs": c["stats"]["unique_graphs"],
        "compile_s": _compile_seconds(metrics),
        "fxgraph_cache_hit": c["inductor"]["fxgraph_cache_hit"],
        "fxgraph_cache_miss": c["inductor"]["fxgraph_cache_miss"],
    }


def _delta(after: dict, before: dict, key: str):
    if after.get(key) is None or before.get(key) is None:
        return None
    return after[key] - before[key]


# ---------------------------------------------------------------------------------------------------------
# The Inductor cache state of a measured compilation

COMPILE_CACHE_MODES = ("warm", "cold")


def use_inductor_cache(directory: str) -> None:
    """Point Inductor and Triton at ``directory`` (Triton in its ``triton`` subfolder), for this process
    and the compile workers it starts. Call before anything compiles."""
    os.makedirs(directory, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = directory
    os.environ["TRITON_CACHE_DIR"] = os.path.join(directory, "triton")


def _forget_compiled() -> None:
    """Drop what this process has compiled: dynamo's code caches and Inductor's in-memory caches (loaded
    kernels keyed by their source), so the next call compiles again and reads only the on-disk cache."""
    torch._dynamo.reset()
    try:
        import torch._inductor.utils as iu
    except ImportError:
        return
    clear = getattr(iu, "clear_caches", None) or getattr(iu, "clear_inductor_caches", None)
    if clear is not None:
        clear()


_PROCESS_WARMED: set = set()


def _warm_compiler(device: str | torch.device) -> None:
    """Compile one trivial function once per process and device (untimed): Inductor's imports, the C++
    compiler and ISA checks (CPU) or the Triton/CUDA start-up cost seconds once per process; without
    this they would land in whichever compiled case runs first, so its compile time would depend on the
    selection."""
    key = str(torch.device(device))
    if key in _PROCESS_WARMED:
        return
    x = torch.ones(8, device=device)
    torch.compile(lambda t: (t * 2).sum(), fullgraph=True, dynamic=False)(x)
    sync(device)
    _PROCESS_WARMED.add(key)


@contextlib.contextmanager
def compile_cache_state(mode: str, directory: str, device: str | torch.device) -> Iterator[None]:
    """The Inductor cache state in which the next (measured) first call compiles.

    Both modes start from nothing compiled in this process (dynamo reset, Inductor's in-memory caches
    cleared), so each compiled case compiles afresh and its compile time does not depend on the cases
    before it. "warm": the suite's cache folder ``directory`` as earlier runs left it (:func:`measure`
    records a compile that missed it as cold). "cold": a fresh empty folder inside
    ``directory`` for this compilation, deleted afterwards: a first compile on a fresh machine.
    """
    if mode not in COMPILE_CACHE_MODES:
        raise ValueError(f"unknown Inductor cache mode {mode!r}; choose from "
                         f"{', '.join(COMPILE_CACHE_MODES)}")
    _warm_compiler(device)
    if mode == "warm":
        _forget_compiled()
        yield
        return
    saved = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    os.makedirs(directory, exist_ok=True)
    fresh = tempfile.mkdtemp(prefix="cold-", dir=directory)
    try:
        use_inductor_cache(fresh)
        _forget_compiled()
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(fresh, ignore_errors=True)


def _missed_cache(before: dict | None, after: dict | None) -> bool:
    """Did a compile between the snapshots miss the Inductor cache? True when it cannot be told (no
    counters, or no FX graph cache in use: neither a hit nor a miss counted)."""
    if before is None or after is None:
        return True
    misses, hits = _delta(after, before, "fxgraph_cache_miss"), _delta(after, before, "fxgraph_cache_hit")
    return misses is None or hits is None or misses > 0 or hits == 0


# ---------------------------------------------------------------------------------------------------------
# Memory


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _hwm_bytes() -> int | None:
    """The kernel's resident-set high-water mark (VmHWM in /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    """Set VmHWM back to the current RSS: writing 5 to /proc/PID/clear_refs (Linux 4.0 and later)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _hwm_bytes() is not None


class PeakRSS:
    """Peak resident-set growth during a block (Linux; else None). The kernel keeps the high-water mark, so
    an allocation freed within microseconds still counts. Where the mark cannot be reset, a thread samples
    the RSS every ``interval`` s instead, and can miss a short peak on a busy machine."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.delta: int | None = None
        self.method: str | None = None

    def __enter__(self):
        self._start = _rss_bytes()
        self._peak = self._start
        self._thread = None
        if self._start is None:
            return self
        if _reset_hwm():
            self.method = "high-water mark"
        else:
            self.method = "sampled"
            self._stop = threading.Event()
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
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self._peak = max(self._peak, _hwm_bytes() or 0)
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


def cuda_event():
    """A CUDA event that records its time on the current stream (for :func:`measure`'s ``events``)."""
    return torch.cuda.Event(enable_timing=True)


def _timed_call(fn: Callable[[], object], device) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def block_size(call_s: float, min_round_s: float, time_block: Callable[[int], float]) -> int:
    """Calls per round so that a round lasts at least ``min_round_s``: estimated from one call's time
    ``call_s``, then confirmed by timing a block with ``time_block(n)`` (grown until it is long enough)."""
    n, elapsed = 1, call_s
    while elapsed < min_round_s and n < MAX_BLOCK:
        per_call = max(elapsed / n, 1e-9)
        n = min(MAX_BLOCK, max(n + 1, math.ceil(min_round_s / per_call - 1e-9)))
        elapsed = time_block(n)
    return n


def measure(
    benchmark,
    fn: Callable[[], object],
    *,
    device: str | torch.device,
    rounds: int,
    warmup_rounds: int = 1,
    min_round_s: float | None = None,
    compiled: bool = False,
    compile_cache: str | None = None,
    cache_dir: str | None = None,
    check: Callable[[object], dict] | None = None,
    delay_s: float = 0.0,
    after_round: Callable[[], None] | None = None,
    kernels: Callable[[Callable[[], object]], dict] | None = None,
    events: Callable[[], object] | None = None,
) -> dict:
    """Time ``fn`` with ``benchmark.pedantic``; returns what goes into ``benchmark.extra_info``.

    Calls, in order: the first call (timed alone: ``first_call_s``; compiles when ``compiled``, in the
    Inductor cache state ``compile_cache`` (see :func:`compile_cache_state`); its output goes to
    ``check``, which raises when it is wrong). With ``compile_cache="warm"`` a compile that missed the
    cache is recorded as ``compile_cache: "cold"``, the state it ran in, and is not repeated;
    ``kernels``, when given, is called once with ``fn`` after the first call, untimed (it profiles a call:
    :mod:`perf_tests.measure.kernels`), and its dict joins the result;
    ``warmup_rounds - 1`` more untimed calls (one more when compiled, so a recompile on the second call is
    not timed); the block sizing (see :func:`block_size`); then ``rounds`` timed rounds of
    ``iterations`` calls each with the garbage collector off. ``delay_s`` adds a known delay
    (device-side on CUDA) to every call: the timing-honesty check, whose medians must move by about that
    much. ``after_round`` runs after every timed round, untimed (pytest-benchmark's ``teardown``): the
    A/B hand-over of :mod:`perf_tests.measure.turns`. ``events`` makes an event with
    ``torch.cuda.Event``'s ``record()`` and ``elapsed_time(end)`` (milliseconds); when given, every
    timed round is also timed between two of them and ``device_samples`` holds per-call seconds per round.
    """
    device_type = torch.device(device).type
    is_cuda = device_type == "cuda"
    if min_round_s is None:
        min_round_s = MIN_ROUND_S.get(device_type, MIN_ROUND_S["cpu"])
    extra: dict = {"compile_cache": compile_cache if compiled else None}
    state = contextlib.nullcontext()
    if compiled and compile_cache is not None:
        state = compile_cache_state(compile_cache, cache_dir or tempfile.gettempdir(), device)
    extra_warmups = max(warmup_rounds, 1) - 1 + (1 if compiled else 0)
    with state:
        before = compile_snapshot() if compiled else None
        # CPU memory is read on the last untimed call: the first one when it is the only one (eager only).
        with PeakRSS() if (extra_warmups == 0 and not is_cuda) else _null() as probe:
            out, first_call_s = _timed_call(fn, device)
        after_first = compile_snapshot() if compiled else None
        if compile_cache == "warm" and compiled and _missed_cache(before, after_first):
            # The cache lacked a graph (a fresh machine, or code not compiled here before): this compile
            # was cold, and is recorded so. Compiling again to measure a warm one would double the
            # cost of a first run (75 s for the sd21 UNet on an H100, README "GPUs"); the next run of
            # the same code finds every graph cached and records a warm compile.
            extra["compile_cache"] = "cold"
    peak_rss = probe.delta
    extra["first_call_s"] = first_call_s
    if check is not None:
        extra.update(check(out))
    del out
    if kernels is not None:
        extra.update(kernels(fn))

    last_call_s = first_call_s
    for i in range(extra_warmups):
        last = i == extra_warmups - 1
        with PeakRSS() if (last and not is_cuda) else _null() as probe:
            _, last_call_s = _timed_call(fn, device)
        if last and not is_cuda:
            peak_rss = probe.delta
    if extra_warmups == 0 and first_call_s < 10 * min_round_s:
        _, last_call_s = _timed_call(fn, device)  # a first call's one-off costs would undersize the block

    delay = make_delay(device, delay_s)
    if delay_s:
        extra["injected_delay_s"] = delay_s

    def time_block(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
            delay()
        sync(device)
        return time.perf_counter() - t0

    iterations = block_size(last_call_s + delay_s, min_round_s, time_block)
    extra.update(iterations=iterations, min_round_s=min_round_s)
    calls = 0
    # One (start, end) pair per round, each recorded once here: the first record of a CUDA event creates
    # it, which is host work that does not belong in a round.
    pairs = [(events(), events()) for _ in range(rounds)] if events is not None else []
    for start, end in pairs:
        start.record()
        end.record()
    if pairs:
        sync(device)

    def timed():
        nonlocal calls
        block = calls // iterations  # pedantic's extra result call runs past the last round's pair
        if calls % iterations == 0 and block < len(pairs):
            pairs[block][0].record()
        fn()
        delay()
        calls += 1
        if calls % iterations == 0:
            if block < len(pairs):
                pairs[block][1].record()
            sync(device)  # once per block, inside the timed region

    if is_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        teardown = {"teardown": after_round} if after_round is not None else {}
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=0, iterations=iterations, **teardown)
    finally:
        if gc_was_enabled:
            gc.enable()
    sync(device)  # pedantic makes one more untimed call after blocked rounds, for its return value
    if pairs:
        extra["device_samples"] = [start.elapsed_time(end) / 1e3 / iterations for start, end in pairs]

    if is_cuda:
        extra["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
        extra["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    else:
        extra["peak_memory_bytes"] = peak_rss
        extra["peak_reserved_bytes"] = None

    extra.update(_compile_extra(compiled, before, after_first, compile_snapshot() if compiled else None,
                                first_call_s, benchmark))
    return extra


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
