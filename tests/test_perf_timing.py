"""perf_tests.timing: what is inside the timed region and what is not (no timing is asserted here).

A fake pytest-benchmark fixture records the calls; a tiny nn.Module stands in for the model. The
timing-honesty figures themselves (a known injected slowdown showing up in the medians) are measured by
running the suite, not asserted in a unit test.
"""

from __future__ import annotations

import gc

import pytest
import torch

from perf_tests import timing


class FakeBenchmark:
    """The part of pytest-benchmark's fixture that measure() uses, recording what happens."""

    def __init__(self, events):
        self.events = events
        self.extra_info = {}
        self.rounds = None
        self.gc_enabled_in_rounds = []

    def pedantic(self, target, rounds=1, warmup_rounds=0, iterations=1):
        self.rounds = rounds
        assert warmup_rounds == 0  # warm-up is explicit, done by measure() before
        for _ in range(rounds):
            self.events.append("start")
            self.gc_enabled_in_rounds.append(gc.isenabled())
            target()
            self.events.append("stop")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x).relu()


@pytest.fixture
def events(monkeypatch):
    log = []
    monkeypatch.setattr(timing, "sync", lambda device: log.append("sync"))
    return log


def workload(log):
    model, x = Tiny(), torch.randn(2, 8)

    def fn():
        log.append("work")
        with torch.no_grad():
            return model(x)

    return fn


def test_sync_is_inside_every_timed_round_and_gc_is_off(events):
    b = FakeBenchmark(events)
    timing.measure(b, workload(events), device="cpu", rounds=4, warmup_rounds=1)
    timed = events[events.index("start"):]
    assert timed == ["start", "work", "sync", "stop"] * 4
    assert b.gc_enabled_in_rounds == [False] * 4
    assert gc.isenabled()


def test_first_call_check_and_explicit_warmup(events):
    b = FakeBenchmark(events)
    seen = []
    m = timing.measure(b, workload(events), device="cpu", rounds=3, warmup_rounds=3,
                       check=lambda out: seen.append(out.shape) or {"correct": True})
    before_rounds = events[:events.index("start")]
    assert before_rounds.count("work") == 3  # the first call (checked) + 2 more warm-up calls
    assert seen == [torch.Size([2, 8])]
    assert m.extra["correct"] is True and m.extra["first_call_s"] > 0
    assert events.count("work") == 3 + 3


def test_compiled_gets_one_more_warmup_and_zero_warmup_still_checks(events):
    b = FakeBenchmark(events)
    timing.measure(b, workload(events), device="cpu", rounds=2, warmup_rounds=1, compiled=True)
    assert events[:events.index("start")].count("work") == 2
    events.clear()
    timing.measure(FakeBenchmark(events), workload(events), device="cpu", rounds=2, warmup_rounds=0,
                   check=lambda out: {})
    assert events[:events.index("start")].count("work") == 1


def test_failed_check_times_nothing(events):
    b = FakeBenchmark(events)

    def check(out):
        raise AssertionError("wrong output")

    with pytest.raises(AssertionError):
        timing.measure(b, workload(events), device="cpu", rounds=3, check=check)
    assert b.rounds is None and "start" not in events


def test_eager_extra_info_fields(events):
    m = timing.measure(FakeBenchmark(events), workload(events), device="cpu", rounds=2, warmup_rounds=2)
    assert m.extra["compile_time_s"] is None and m.extra["graph_breaks"] is None and m.extra["recompiles"] is None
    assert m.extra["peak_reserved_bytes"] is None
    assert m.extra["peak_memory_bytes"] is None or m.extra["peak_memory_bytes"] >= 0


def test_injected_slowdown_is_inside_the_timed_region(events, monkeypatch):
    asked = []

    def fake_delay(device, seconds):
        asked.append(seconds)
        return lambda: events.append("delay")

    monkeypatch.setattr(timing, "make_delay", fake_delay)
    m = timing.measure(FakeBenchmark(events), workload(events), device="cpu", rounds=2, warmup_rounds=2,
                       delay_s=0.125)
    assert events[events.index("start"):] == ["start", "work", "delay", "sync", "stop"] * 2
    assert asked == [0.125] and m.extra["injected_delay_s"] == 0.125


def test_make_delay_on_cpu_busy_waits(monkeypatch):
    spun = []
    monkeypatch.setattr(timing, "_spin", spun.append)
    timing.make_delay("cpu", 0.25)()
    assert spun == [0.25]
    timing.make_delay("cpu", 0.0)()
    assert spun == [0.25]


def test_peak_rss_sees_an_allocation():
    with timing.PeakRSS() as probe:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    if probe.delta is None:
        pytest.skip("no /proc/self/statm on this platform")
    assert probe.delta >= 32 * 2**20


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
    m = timing.measure(b, fn, device="cpu", rounds=3, warmup_rounds=1, compiled=True)
    assert m.extra["compile_time_s"] is not None and m.extra["compile_time_s"] > 0
    assert m.extra["graph_breaks"] == 0
    assert m.extra["recompiles"] == 0
    assert m.extra["compiled_graphs"] >= 1


def test_oom_detection():
    assert timing.is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not timing.is_oom(RuntimeError("shape mismatch"))
    assert not timing.is_oom(ValueError("out of memory"))
