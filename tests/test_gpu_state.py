"""GPU state through NVML, replayed from recorded answers (no GPU needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from perf_tests.measure import gpu_state as G
from perf_tests.records.gpu_disturbance import disturbance
from perf_tests.report.verdict import sentence

DATA = Path(__file__).parent / "data" / "nvml"


def probe(name: str, times=(10.0, 12.0)) -> G.Probe:
    clock = iter(times)
    return G.Probe(G.Replay(json.loads((DATA / name).read_text())), clock=lambda: next(clock))


def case_state(name: str) -> dict:
    p = probe(name)
    before, after = p.snapshot(), p.snapshot()
    return G.Probe.case_state(before, after)


def test_reason_bits_follow_nvml_h():
    # nvml.h: SwThermalSlowdown 0x20, HwThermalSlowdown 0x40, SwPowerCap 0x4, GpuIdle 0x1
    assert G.reason_names(0x60) == ["sw_thermal_slowdown", "hw_thermal_slowdown"]
    assert G.reason_names(0x5) == ["gpu_idle", "sw_power_cap"]
    assert G.reason_names(0) == []


def test_a_clean_case_records_its_state_and_is_not_disturbed():
    s = case_state("clean.json")
    assert (s["sm_clock_mhz"], s["mem_clock_mhz"]) == (1980, 2619)
    assert s["temperature_c"] == 57  # the hotter of the two readings
    assert s["power_w"] == pytest.approx(612.0)  # 612,000 mW
    assert s["throttled_ms"] == {"thermal": 0.0, "reliability": 0.0, "power": 400.0}
    assert s["wall_ms"] == pytest.approx(2000.0)
    assert s["reasons"] == ["gpu_idle", "sw_power_cap"]
    assert s["app_clocks_locked"] is False
    assert disturbance(s) is None  # power capping is how a power-bound kernel always runs


def test_a_thermally_throttled_case_is_disturbed_with_its_reason():
    s = case_state("throttled.json")
    d = disturbance(s)
    assert d is not None and d.code == "gpu-throttled"
    assert d.throttled_ms == pytest.approx(1200.0)  # 6.2e9 - 5.0e9 ns
    assert d.reasons == ("sw_thermal_slowdown", "hw_thermal_slowdown", "thermal policy")
    assert d.sentence().startswith("thermal throttling (") and "1200 of 2000 ms" in d.sentence()


def test_counter_noise_below_one_percent_without_a_reason_bit_is_not_a_disturbance():
    state = {"throttled_ms": {"thermal": 5.0}, "reasons": [], "wall_ms": 2000.0}
    assert disturbance(state) is None
    assert disturbance({**state, "throttled_ms": {"thermal": 40.0}}).throttled_ms == 40.0
    assert disturbance({**state, "reasons": ["hw_slowdown"]}).reasons == ("hw_slowdown", "thermal policy")


def test_no_state_or_a_state_without_counters_is_never_a_disturbance():
    assert disturbance(None) is None
    assert disturbance({"unavailable": "nvidia-ml-py is not installed"}) is None


def test_locked_application_clocks_are_reported():
    rec = json.loads((DATA / "clean.json").read_text())
    for call in rec["calls"]:
        if call["fn"] == "nvmlDeviceGetApplicationsClock":
            call["answer"] = 1410
    p = G.Probe(G.Replay(rec), clock=iter([0.0, 1.0]).__next__)
    assert p.snapshot()["app_clocks_locked"] is True


class _Struct:
    _fields_ = [("referenceTime", None), ("violationTime", None)]

    def __init__(self, ref, viol):
        self.referenceTime, self.violationTime = ref, viol


class _FakePynvml:
    """pynvml's surface as a driver answers it, with the older throttle-reasons name only."""

    def __init__(self):
        self.violation = {0: 10, 1: 20, 5: 30}

    def nvmlInit(self):
        return None

    def nvmlDeviceGetHandleByIndex(self, i):
        return object()

    def nvmlDeviceGetClockInfo(self, h, kind):
        return {1: 1500, 2: 1593}[kind]

    def nvmlDeviceGetTemperature(self, h, sensor):
        return 66

    def nvmlDeviceGetPowerUsage(self, h):
        return 250500

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
        return 0x8

    def nvmlDeviceGetViolationStatus(self, h, policy):
        return _Struct(1, self.violation[policy])

    def nvmlDeviceGetApplicationsClock(self, h, kind):
        raise RuntimeError("NVMLError_NotSupported")

    def nvmlDeviceGetDefaultApplicationsClock(self, h, kind):
        raise RuntimeError("NVMLError_NotSupported")


def test_a_recording_replays_to_the_same_snapshot():
    fake = _FakePynvml()
    recorder = G.Recorder(fake)
    live = G.Probe(recorder, clock=lambda: 3.0).snapshot()
    assert live["reasons_mask"] == 0x8 and live["power_w"] == pytest.approx(250.5)
    assert live["violation_ns"] == {"thermal": 20, "reliability": 30, "power": 10}
    assert live["app_clocks_locked"] is None  # not supported: unknown, not False
    replayed = G.Probe(G.Replay({"calls": json.loads(json.dumps(recorder.calls))}),
                       clock=lambda: 3.0).snapshot()
    assert replayed == live


def test_without_nvml_the_probe_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    probe_, why = G.Probe.open()
    assert probe_ is None and "nvidia-ml-py" in why


def test_the_module_imports_no_torch():
    code = "import sys, perf_tests.measure.gpu_state; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def _judge(tmp_path, candidate_state: str, *, through_baseline: bool, cand_seeds=(4, 5, 6), hot=5):
    """Three clean baseline runs; three candidate runs, the second of which ran one case with the GPU in
    ``candidate_state`` (a replay). Returns (comparison, the baseline side's per-run disturbances)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from perf_json import CASES, write_run

    from perf_tests.analysis import stats
    from perf_tests.records import baselines as B
    from perf_tests.records import results as R

    clean = case_state("clean.json")
    state = case_state(candidate_state)
    base = [write_run(tmp_path / f"b{s}.json", s, extra={CASES[2]: {"gpu_state": clean}}) for s in (1, 2, 3)]
    cand = [write_run(tmp_path / f"c{s}.json", s,
                      extra={CASES[2]: {"gpu_state": state if s == hot else clean}}) for s in cand_seeds]
    if through_baseline:
        (update,) = B.update_baselines(base, tmp_path / "baselines")
        assert json.loads(update.path.read_text())["cases"][CASES[2]]["runs"][0]["gpu_state"] == clean
        baseline = R.side_from_baseline(R.read_baseline(update.path), "baseline")
    else:
        baseline = R.load_side(base, "baseline")[0]
    return stats.compare(baseline, R.load_side(cand, "candidate")[0]), baseline.disturbances


@pytest.mark.parametrize("through_baseline", [False, True])
def test_a_throttled_run_is_disturbed_and_a_clean_one_is_judged(tmp_path, through_baseline):
    hot, base_disturbed = _judge(tmp_path, "throttled.json", through_baseline=through_baseline)
    assert base_disturbed == [None, None, None]
    (reason,) = map(sentence, hot.canary.disturbed)
    assert reason.startswith("machine disturbed: thermal throttling "
                             "(sw_thermal_slowdown, hw_thermal_slowdown")
    assert hot.canary.disturbed_runs == (1,) and hot.canary.left_out == (1,)  # the run is left out

    cool, _ = _judge(tmp_path, "clean.json", through_baseline=through_baseline)
    assert cool.canary.disturbed == () and cool.canary.left_out == ()
    assert all(c.verdict not in ("regression", "improvement") for c in cool.cases)


def test_a_throttled_run_beyond_the_baselines_run_count_is_disturbed(tmp_path):
    """Five candidate runs against three baseline runs, the fifth throttled: it is left out all the same."""
    hot, _ = _judge(tmp_path, "throttled.json", through_baseline=False, cand_seeds=(4, 5, 6, 7, 8), hot=8)
    (reason,) = map(sentence, hot.canary.disturbed)
    assert reason.startswith("machine disturbed: thermal throttling")
    assert hot.canary.disturbed_runs == (4,) and hot.canary.left_out == (4,)


def test_a_throttled_member_disturbs_its_pair_in_ab(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from perf_json import CASES, write_run

    from perf_tests.analysis import stats
    from perf_tests.records import results as R

    hot, clean = case_state("throttled.json"), case_state("clean.json")
    a = [write_run(tmp_path / f"a{s}.json", s, extra={CASES[0]: {"gpu_state": clean}}) for s in (1, 2, 3)]
    b = [write_run(tmp_path / f"b{s}.json", s, extra={CASES[0]: {"gpu_state": hot if s == 13 else clean}})
         for s in (11, 12, 13)]
    cmp = stats.compare(R.load_side(b, "B")[0], R.load_side(a, "A")[0], paired=True)
    (reason,) = map(sentence, cmp.canary.disturbed)
    assert "thermal throttling" in reason and reason.endswith("(the other side of pair 3)")
