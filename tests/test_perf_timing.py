"""perf_tests.measure.timing: what is inside the timed region and what is not (no timing is asserted here).

A fake pytest-benchmark fixture records the calls; a tiny nn.Module stands in for the model. The
timing-honesty figures themselves (a known injected slowdown showing up in the medians) are measured by
running the suite, not asserted in a unit test.
"""

from __future__ import annotations

import gc
import mmap
import os
import time

import pytest
import torch

from perf_tests.measure import timing


class FakeBenchmark:
    """The part of pytest-benchmark's fixture that measure() uses, recording what happens; like the real
    one it makes one more (untimed) call after blocked rounds, for its return value."""

    def __init__(self, events):
        self.events = events
        self.extra_info = {}
        self.rounds = None
        self.iterations = None
        self.gc_enabled_in_rounds = []

    def pedantic(self, target, rounds=1, warmup_rounds=0, iterations=1):
        self.rounds, self.iterations = rounds, iterations
        assert warmup_rounds == 0  # warm-up is explicit, done by measure() before
        for _ in range(rounds):
            self.events.append("start")
            self.gc_enabled_in_rounds.append(gc.isenabled())
            for _ in range(iterations):
                target()
            self.events.append("stop")
        if iterations > 1:
            self.events.append("result call")
            target()


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x).relu()


class FakeClock:
    """time.perf_counter for timing.py that advances only when the workload runs: block sizes are exact."""

    sleep = staticmethod(time.sleep)  # PeakRSS's sampling thread

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(timing, "time", fake)
    return fake


@pytest.fixture
def events(monkeypatch, clock):
    log = []
    monkeypatch.setattr(timing, "sync", lambda device: log.append("sync"))
    return log


def workload(log, clock=None, call_s=0.1):
    model, x = Tiny(), torch.randn(2, 8)

    def fn():
        log.append("work")
        if clock is not None:
            clock.now += call_s
        with torch.no_grad():
            return model(x)

    return fn


def timed_part(events):
    return events[events.index("start"):]


def test_sync_is_inside_every_timed_round_and_gc_is_off(events, clock):
    b = FakeBenchmark(events)
    extra = timing.measure(b, workload(events, clock, 0.1), device="cpu", rounds=4, warmup_rounds=1,
                           min_round_s=0.05)
    assert extra["iterations"] == 1 and b.iterations == 1  # a call longer than a round: one call per round
    assert timed_part(events) == ["start", "work", "sync", "stop"] * 4 + ["sync"]
    assert b.gc_enabled_in_rounds == [False] * 4
    assert gc.isenabled()


def test_a_short_call_is_timed_in_blocks_with_one_sync_per_block(events, clock):
    b = FakeBenchmark(events)
    extra = timing.measure(b, workload(events, clock, 0.003), device="cpu", rounds=3, warmup_rounds=2,
                           min_round_s=0.05)
    n = 17  # ceil(0.05 / 0.003): the fewest calls that make a 50 ms round
    assert extra["iterations"] == n and b.iterations == n and extra["min_round_s"] == 0.05
    block = ["start", *["work"] * n, "sync", "stop"]
    assert timed_part(events) == block * 3 + ["result call", "work", "sync"]


def test_block_size_grows_until_a_block_is_long_enough():
    blocks = []

    def time_block(n):  # a machine that got faster after the estimate: the first block is too short
        blocks.append(n)
        return n * (0.001 if len(blocks) == 1 else 0.002)

    # 0.05 / 0.004 -> 13 calls, which took 13 ms: re-estimated at 1 ms a call -> 50 calls, 100 ms: done
    assert timing.block_size(0.004, 0.05, time_block) == 50
    assert blocks == [13, 50]
    assert timing.block_size(0.2, 0.05, time_block) == 1  # one call is already a long enough round
    assert timing.block_size(0.0, 0.05, lambda n: 0.0) == timing.MAX_BLOCK  # a no-op stops at the bound


def test_first_call_check_and_explicit_warmup(events, clock):
    b = FakeBenchmark(events)
    seen = []
    extra = timing.measure(b, workload(events, clock), device="cpu", rounds=3, warmup_rounds=3,
                           check=lambda out: seen.append(out.shape) or {"correct": True})
    before_rounds = events[:events.index("start")]
    assert before_rounds.count("work") == 3  # the first call (checked) + 2 more warm-up calls
    assert seen == [torch.Size([2, 8])]
    assert extra["correct"] is True and extra["first_call_s"] == pytest.approx(0.1)
    assert events.count("work") == 3 + 3


def test_compiled_gets_one_more_warmup_and_zero_warmup_still_checks(events, clock):
    b = FakeBenchmark(events)
    timing.measure(b, workload(events, clock), device="cpu", rounds=2, warmup_rounds=1, compiled=True)
    assert events[:events.index("start")].count("work") == 2
    events.clear()
    timing.measure(FakeBenchmark(events), workload(events, clock), device="cpu", rounds=2, warmup_rounds=0,
                   check=lambda out: {})
    # the checked first call, then one more to size the block (a first call is not a steady-state call)
    assert events[:events.index("start")].count("work") == 2


def test_failed_check_times_nothing(events, clock):
    b = FakeBenchmark(events)

    def check(out):
        raise AssertionError("wrong output")

    with pytest.raises(AssertionError):
        timing.measure(b, workload(events, clock), device="cpu", rounds=3, check=check)
    assert b.rounds is None and "start" not in events


def test_eager_extra_info_fields(events, clock):
    extra = timing.measure(FakeBenchmark(events), workload(events, clock), device="cpu", rounds=2,
                           warmup_rounds=2)
    assert extra["compile_time_s"] is None and extra["graph_breaks"] is None and extra["recompiles"] is None
    assert extra["compile_cache"] is None and extra["peak_reserved_bytes"] is None


def test_cpu_peak_memory_is_the_workloads_allocation():
    if timing._rss_bytes() is None:
        pytest.skip("no /proc/self/statm on this platform")

    def fn():
        # 64 MiB of fresh pages, freed when fn returns. Not a torch tensor: in one full-suite run a 64 MiB
        # torch.ones read a peak of 0, as memory an earlier test freed but kept resident would.
        _touched_pages(64 * 2**20).close()
        return torch.ones(8)

    extra = timing.measure(FakeBenchmark([]), fn, device="cpu", rounds=1, warmup_rounds=2, min_round_s=1e-9)
    assert extra["peak_memory_bytes"] >= 32 * 2**20


def test_injected_slowdown_is_inside_the_timed_region(events, clock, monkeypatch):
    asked = []

    def fake_delay(device, seconds):
        asked.append(seconds)
        return lambda: events.append("delay")

    monkeypatch.setattr(timing, "make_delay", fake_delay)
    extra = timing.measure(FakeBenchmark(events), workload(events, clock), device="cpu", rounds=2,
                           warmup_rounds=2,
                           delay_s=0.125)
    assert timed_part(events) == ["start", "work", "delay", "sync", "stop"] * 2 + ["sync"]
    assert asked == [0.125] and extra["injected_delay_s"] == 0.125


def test_real_benchmark_records_per_call_seconds(benchmark):
    """With pytest-benchmark's own fixture: rounds of blocks, the block size recorded on both sides."""
    calls = []
    extra = timing.measure(benchmark, lambda: calls.append(1) or torch.zeros(1), device="cpu", rounds=3,
                           warmup_rounds=1, min_round_s=0.002)
    assert extra["iterations"] > 1  # appending to a list takes far less than 2 ms
    assert benchmark.stats.iterations == extra["iterations"] and len(benchmark.stats.stats.data) == 3


def test_make_delay_on_cpu_busy_waits(monkeypatch):
    spun = []
    monkeypatch.setattr(timing, "_spin", spun.append)
    timing.make_delay("cpu", 0.25)()
    assert spun == [0.25]
    timing.make_delay("cpu", 0.0)()
    assert spun == [0.25]


def _touched_pages(size: int) -> mmap.mmap:
    """``size`` bytes of fresh anonymous memory, every page written: resident for certain (an allocator
    such as torch's may instead hand back memory an earlier test freed but kept resident)."""
    block = mmap.mmap(-1, size)
    block.write(b"\x01" * size)
    return block


def test_peak_rss_sees_a_short_lived_allocation():
    # Allocated and freed at once: only the kernel's high-water mark is sure to see it.
    with timing.PeakRSS() as probe:
        _touched_pages(64 * 2**20).close()
    if probe.delta is None:
        pytest.skip("no /proc/self/statm on this platform")
    if probe.method != "high-water mark":
        pytest.skip("/proc/self/clear_refs cannot reset the high-water mark here")
    assert probe.delta >= 32 * 2**20


def test_peak_rss_sampling_sees_an_allocation_held_for_a_while(monkeypatch):
    monkeypatch.setattr(timing, "_reset_hwm", lambda: False)
    with timing.PeakRSS() as probe:
        block = _touched_pages(64 * 2**20)
        time.sleep(0.2)  # 200 sampling intervals; the sleep frees the GIL for the sampler
        block.close()
    if probe.delta is None:
        pytest.skip("no /proc/self/statm on this platform")
    assert probe.method == "sampled"
    assert probe.delta >= 32 * 2**20


def test_peak_rss_of_a_block_that_allocates_nothing_is_small():
    _touched_pages(64 * 2**20).close()  # raises the process's earlier peak; must not count
    with timing.PeakRSS() as probe:
        pass
    if probe.delta is None:
        pytest.skip("no /proc/self/statm on this platform")
    assert probe.delta < 16 * 2**20


@pytest.mark.parametrize("metrics, seconds", [
    ({"_compile.<locals>.compile_inner": [2.0, 1.5], "OutputGraph.call_user_compiler": [3.0]}, 3.5),  # 2.1+
    ({"_compile": [4.0], "OutputGraph.compile_and_call_fx_graph": [3.0]}, 4.0),  # 2.0.x
    ({"OutputGraph.call_user_compiler": [3.0]}, None),  # neither name: unknown, never 0 s
    ({}, 0.0),  # cleared by torch._dynamo.reset(): nothing compiled since
])
def test_compile_seconds_are_read_under_the_name_of_each_release(metrics, seconds):
    assert timing._compile_seconds(metrics) == seconds


def test_compile_snapshot_has_counters_on_torch2():
    snap = timing.compile_snapshot()
    if not hasattr(torch, "compile"):
        assert snap is None
        return
    assert set(snap) >= {"graph_breaks", "graphs", "compile_s"}


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile needs PyTorch 2")
@pytest.mark.slow
def test_compiled_tiny_module_records_compile_time_and_no_recompiles():
    model, x = Tiny(), torch.randn(2, 8)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # backend "eager": dynamo only, fast

    def fn():
        with torch.no_grad():
            return compiled(x)

    b = FakeBenchmark([])
    extra = timing.measure(b, fn, device="cpu", rounds=3, warmup_rounds=1, compiled=True)
    assert extra["compile_time_s"] is not None and extra["compile_time_s"] > 0
    assert extra["graph_breaks"] == 0
    assert extra["recompiles"] == 0
    assert extra["compiled_graphs"] >= 1


def test_oom_detection():
    assert timing.is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not timing.is_oom(RuntimeError("shape mismatch"))
    assert not timing.is_oom(ValueError("out of memory"))


class FakeInductor:
    """Dynamo's counters and an on-disk cache, as far as measure() sees them: the first call after a reset
    compiles, hitting the cache when an earlier compile filled it."""

    def __init__(self, events):
        self.events, self.compiled, self.cached = events, False, False
        self.counts = {"fxgraph_cache_hit": 0, "fxgraph_cache_miss": 0}
        self.dirs = []

    def snapshot(self):
        return {"graph_breaks": 0, "graphs": 0, "compile_s": 0.0, **self.counts}

    def forget(self):
        self.events.append("reset")
        self.compiled = False

    def fn(self):
        self.dirs.append(os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        if not self.compiled:
            self.counts["fxgraph_cache_hit" if self.cached else "fxgraph_cache_miss"] += 1
            self.compiled = self.cached = True
            self.events.append("compile")
        self.events.append("work")
        return torch.ones(1)


@pytest.fixture
def inductor(events, monkeypatch):
    fake = FakeInductor(events)
    monkeypatch.setattr(timing, "compile_snapshot", fake.snapshot)
    monkeypatch.setattr(timing, "_forget_compiled", fake.forget)
    monkeypatch.setattr(timing, "_warm_compiler", lambda device: None)
    return fake


def test_warm_cache_a_compile_that_missed_is_recorded_cold_and_not_repeated(events, inductor, tmp_path):
    # A fresh machine: the first compile fills the cache. It is measured once, as the cold compile it was.
    extra = timing.measure(FakeBenchmark(events), inductor.fn, device="cpu", rounds=1, compiled=True,
                           compile_cache="warm", cache_dir=str(tmp_path))
    assert events[:4] == ["reset", "compile", "work", "sync"] and events.count("compile") == 1
    assert events.count("reset") == 1
    assert extra["compile_cache"] == "cold"
    assert (extra["fxgraph_cache_hits"], extra["fxgraph_cache_misses"]) == (0, 1)
    # A machine that compiled this before: one compile, measured, warm.
    events.clear()
    extra = timing.measure(FakeBenchmark(events), inductor.fn, device="cpu", rounds=1, compiled=True,
                           compile_cache="warm", cache_dir=str(tmp_path))
    assert events[:4] == ["reset", "compile", "work", "sync"] and events.count("compile") == 1
    assert extra["compile_cache"] == "warm"
    assert (extra["fxgraph_cache_hits"], extra["fxgraph_cache_misses"]) == (1, 0)


def test_cold_cache_compiles_into_a_fresh_folder_that_is_removed(events, inductor, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "suite"))
    inductor.cached = False
    extra = timing.measure(FakeBenchmark(events), inductor.fn, device="cpu", rounds=1, compiled=True,
                           compile_cache="cold", cache_dir=str(tmp_path))
    first_dir = inductor.dirs[0]
    assert extra["compile_cache"] == "cold" and extra["fxgraph_cache_misses"] == 1
    assert first_dir.startswith(str(tmp_path / "cold-")) and not os.path.exists(first_dir)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "suite")  # restored after the compile


class FakeCudaEvents:
    """An event factory like ``timing.cuda_event`` on a device clock of its own: ``record()`` reads the
    device's time, ``elapsed_time(end)`` answers in milliseconds, as torch.cuda.Event does."""

    def __init__(self, log):
        self.log, self.now = log, 0.0  # device seconds

    def __call__(self):
        device = self

        class Event:
            t = None

            def record(self):
                device.log.append("record")
                self.t = device.now

            def elapsed_time(self, end):
                return (end.t - self.t) * 1e3

        return Event()


class WallBenchmark(FakeBenchmark):
    """FakeBenchmark keeping per-call wall seconds per round (pytest-benchmark's stats.data) on the fake
    clock. The host stalls ``stalls[r]`` seconds after round r's timer starts, before the first call: host
    jitter that the wall clock sees and the device, idle meanwhile, does not."""

    def __init__(self, events, clock, stalls):
        super().__init__(events)
        self.clock, self.stalls, self.data, self.round = clock, stalls, [], None

    def pedantic(self, target, rounds=1, warmup_rounds=0, iterations=1):
        self.rounds, self.iterations = rounds, iterations
        for r in range(rounds):
            self.events.append("start")
            self.round, t0 = r, self.clock.now
            self.clock.now += self.stalls[r]
            for _ in range(iterations):
                target()
            self.data.append((self.clock.now - t0) / iterations)
            self.events.append("stop")
        self.round = None
        if iterations > 1:
            self.events.append("result call")
            target()


def test_device_time_is_the_events_elapsed_time_and_leaves_host_stalls_out(events, clock):
    device = FakeCudaEvents(events)
    b = WallBenchmark(events, clock, stalls=[0.004, 0.0, 0.012, 0.001])
    timed_calls = []  # (round, device seconds) of each call inside a timed round

    def fn():
        d = 0.003 + 0.0005 * (len(events) % 7)  # device seconds of this call, varying
        events.append("work")
        device.now += d
        clock.now += d  # synchronous on the host too: wall = device + the stalls
        if b.round is not None:
            timed_calls.append((b.round, d))
        return torch.ones(1)

    extra = timing.measure(b, fn, device="cpu", rounds=4, warmup_rounds=1, min_round_s=0.02, events=device)
    n = extra["iterations"]
    assert n > 1  # blocks of calls, and pedantic's untimed result call after them
    expected = [sum(d for r, d in timed_calls if r == k) / n for k in range(4)]
    assert extra["device_samples"] == pytest.approx(expected, rel=1e-12)
    stalls = [w - d for w, d in zip(b.data, extra["device_samples"], strict=True)]
    assert stalls == pytest.approx([s / n for s in b.stalls], abs=1e-12)
    # a start event before each round's first call, an end event after its last and before its sync; the
    # result call records none (each event was recorded once before the rounds: 2 x 4 of them)
    block = ["start", "record", *["work"] * n, "record", "sync", "stop"]
    assert timed_part(events) == block * 4 + ["result call", "work", "sync"]
    assert events.count("record") == 2 * 4 + 2 * 4


def test_without_events_no_device_time_is_recorded(events, clock):
    extra = timing.measure(FakeBenchmark(events), workload(events, clock), device="cpu", rounds=2)
    assert "device_samples" not in extra and "record" not in events
