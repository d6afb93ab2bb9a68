"""perf_tests.measure.suite: the correctness verdict beside the timing, failures and skips recorded with their
kind and reason (in the session and its journal), the grids a session runs (no model needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from perf_tests.measure import cases as C
from perf_tests.measure import suite
from perf_tests.measure.suite import Options, PerfSession
from perf_tests.measure.workloads import ModelCache, make_workload
from sd.device import DeviceCapabilities

CAPS = DeviceCapabilities(device_type="cpu", attention={**dict.fromkeys(C.ATTENTION_BACKENDS),
                                                   "xformers": "xformers is not importable"},
                      has_compile=True, torch_version="2.14.1")


@pytest.fixture
def journal():
    return []


@pytest.fixture
def session(journal):
    return PerfSession(Options(device="cpu", grid=C.grid("full", "cpu"), canary=False), caps=CAPS,
                       write=journal.append)


def case(**kw):
    return C.Case(**{**dict(kind="unet-step", profile="tiny", attention="sdpa", compile="eager", batch_size=1,
                            precision="fp32", height=384, width=384), **kw})


def test_reference_case_output_becomes_the_reference(session):
    ref = torch.randn(2, 4, 8, 8)
    got = session.check(case(attention="original"), ref)
    assert got["correct"] is True and got["reference"] is True
    got = session.check(case(), ref + 1e-6)  # the optimized case is compared with it
    assert got["correct"] is True
    assert 0 < got["max_abs_error"] < got["tolerance"]
    assert got["tolerance"] == pytest.approx(C.tolerance(case()) * max(1.0, ref.abs().max().item()))


def test_wrong_output_is_a_recorded_failure(session, journal):
    ref = torch.randn(2, 4, 8, 8)
    session.check(case(attention="original"), ref)
    bad = case(compile="compile")
    with pytest.raises(pytest.fail.Exception, match="WRONG OUTPUT"):
        session.check(bad, ref + 0.5)
    assert session.failed[bad.name]["kind"] == "wrong-output"
    assert journal == [{"type": "fail", **session.failed[bad.name]}]


def test_non_finite_output_is_a_recorded_failure(session):
    out = torch.randn(2, 4, 8, 8)
    out[0, 0, 0, 0] = float("nan")
    with pytest.raises(pytest.fail.Exception, match="non-finite"):
        session.check(case(), out)
    assert session.failed[case().name]["kind"] == "non-finite"


def test_unavailable_combination_is_skipped_with_its_reason(session, journal):
    with pytest.raises(pytest.skip.Exception, match="xformers is not importable"):
        session.run(benchmark=None, case=case(attention="xformers"))
    with pytest.raises(pytest.skip.Exception, match="CUDA"):
        session.run(benchmark=None, case=case(precision="fp16"))
    assert set(session.skipped) == {case(attention="xformers").name, case(precision="fp16").name}
    assert [r["type"] for r in journal] == ["skip", "skip"]


def _raising(exc):
    def make_workload(cache, case):
        def fn():
            raise exc
        return fn, SimpleNamespace(attention_used=case.attention, vae_attention_used=None, build_s=0.0,
                                   compile_setup_s=None, compiled_parts=None)
    return make_workload


def _oom():
    oom = getattr(torch.cuda, "OutOfMemoryError", None)  # PyTorch >= 1.13
    message = "CUDA out of memory. Tried to allocate 20.00 GiB"
    return oom(message) if oom is not None else RuntimeError(message)


def test_out_of_memory_is_a_recorded_failure_and_the_run_goes_on(session, journal, monkeypatch):
    monkeypatch.setattr(suite, "make_workload", _raising(_oom()))
    with pytest.raises(pytest.fail.Exception, match="out of memory"):
        session.run(FakeBenchmark(), case())
    assert session.failed[case().name]["kind"] == "oom"
    assert journal[-1]["type"] == "fail" and journal[-1]["kind"] == "oom"


def test_an_exception_is_a_recorded_error_and_keeps_its_traceback(session, journal, monkeypatch):
    monkeypatch.setattr(suite, "make_workload", _raising(ValueError("shapes do not match")))
    with pytest.raises(ValueError):
        session.run(FakeBenchmark(), case())
    assert session.failed[case().name] == {"name": case().name, "kind": "error",
                                           "reason": "ValueError: shapes do not match"}


class FakeBenchmark:
    extra_info: dict

    def __init__(self):
        self.extra_info = {}


def test_canary_before_each_case_goes_to_the_journal(journal):
    s = PerfSession(Options(device="cpu", grid=C.grid("gate", "cpu")), caps=CAPS, write=journal.append)
    s.canary(before="test_x[a]")
    s.canary(before=None)
    assert [r["before"] for r in journal] == ["test_x[a]", None]
    assert all(r["type"] == "canary" and r["seconds"] > 0 for r in journal)
    assert journal[0]["t"] <= journal[1]["t"]
    section = s.canary_section()
    assert "matmul 256x256x256" in section["workload"] and "float32" in section["workload"]
    assert [x["before"] for x in section["samples"]] == ["test_x[a]", None]


def test_default_cpu_session_cases(session):
    got = session.cases("unet-step")
    assert {c.compile for c in got} == {"eager", "compile"}
    assert {c.compile for c in session.cases("vae-decode")} == {"eager"}  # VAE compile only on request
    assert not session.compile_vae
    assert session.rounds(got[0]) == (10, 1)
    assert all(c.kind == "unet-step" for c in got)
    assert {c.batch_size for c in got} == {1, 2}
    # The seconds-per-call kinds stay at batch 1 on a CPU unless --batch-size says otherwise.
    assert {c.batch_size for c in session.cases("txt2img")} == {1}
    assert {c.batch_size for c in session.cases("vae-decode")} == {1}
    assert session.cases("txt2img")[0].steps == C.PROFILES["tiny"].steps


def test_explicit_batch_sizes_apply_to_every_kind():
    given = {"perf_batch_size": "1,2", "perf_device": "cpu", "perf_grid": "full"}
    options = Options.parse(given.get, cuda_available=False)
    s = PerfSession(options, caps=CAPS)
    assert {c.batch_size for c in s.cases("txt2img")} == {1, 2}
    assert {c.batch_size for c in s.cases("vae-decode")} == {1, 2}


@pytest.mark.skipif(not hasattr(torch.nn.functional, "scaled_dot_product_attention"), reason="needs SDPA")
def test_the_vae_kernel_is_sds_choice_and_is_recorded(monkeypatch):
    """Issue 11: a case asks for the UNet's kernel only; where that kernel refuses the VAE's wide head,
    sd picks the VAE's (load_model(vae_attention=None)) and the case records both."""
    import sd.attention as A

    real = A._probe

    def probe(name, device, dtypes, head_dims, *args):
        if name == "sdpa-flash" and max(head_dims) > 64:
            return "refuses head dims above 64 (a fake probe)"
        return real(name, device, dtypes, head_dims, *args)

    monkeypatch.setattr(A, "_probe", probe)
    monkeypatch.setattr(A, "_PROBES", {})
    c = case(kind="vae-decode", attention="sdpa-flash")
    fn, built = make_workload(ModelCache("cpu"), c)
    assert built.attention_used == "sdpa-flash"
    assert built.vae_attention_used not in (None, "sdpa-flash")
    assert fn().shape == (1, 3, 384, 384)


def test_a_case_on_a_gpu_records_the_gpu_state_around_it(session, journal, monkeypatch):
    import json
    from pathlib import Path

    from perf_tests.measure.gpu_state import Probe, Replay

    recording = json.loads((Path(__file__).parent / "data" / "nvml" / "throttled.json").read_text())
    session._gpu = Probe(Replay(recording), clock=iter([1.0, 3.0]).__next__)
    monkeypatch.setattr(session, "_run", lambda benchmark, case: None)
    bench = FakeBenchmark()
    bench.stats = SimpleNamespace(as_dict=lambda include_data: {"name": case().name})
    session.run(bench, case())
    state = bench.extra_info["gpu_state"]
    assert state["throttled_ms"]["thermal"] == pytest.approx(1200.0)
    assert state["sm_clock_mhz"] == 1410 and state["wall_ms"] == pytest.approx(2000.0)
    assert journal[-1]["type"] == "case"


def test_without_nvml_a_gpu_case_says_why_its_state_is_missing(session, monkeypatch):
    session._gpu_unavailable = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    monkeypatch.setattr(session, "_run", lambda benchmark, case: None)
    bench = FakeBenchmark()
    bench.stats = SimpleNamespace(as_dict=lambda include_data: {})
    session.run(bench, case())
    assert bench.extra_info["gpu_state"] == {"unavailable": session._gpu_unavailable}


@pytest.mark.parametrize("device", ["cuda:0", "cpu"])
def test_on_cuda_the_model_parts_are_timed_by_cuda_events_too_and_txt2img_by_wall_time_only(device,
                                                                                           monkeypatch):
    from perf_tests.measure import timing

    s = PerfSession(Options(device=device, grid=C.grid("full", "cpu"), canary=False), caps=CAPS)
    built = SimpleNamespace(attention_used="sdpa", vae_attention_used=None, build_s=0.0, compile_setup_s=None,
                            compiled_parts=None)
    monkeypatch.setattr(suite, "make_workload", lambda cache, c: (lambda: None, built))
    events = {}

    def measure(benchmark, fn, **kw):
        events[benchmark.extra_info["case"]["kind"]] = kw["events"]
        return {}

    monkeypatch.setattr(suite, "measure", measure)
    for kind in C.KINDS:
        s._run(FakeBenchmark(), case(kind=kind))
    parts = ("unet-step", "vae-decode", "text-encode", "attention-self-4096", "attention-self-1024",
             "attention-cross-77")
    on_cuda = device.startswith("cuda")
    assert events == {k: timing.cuda_event if on_cuda and k in parts else None for k in C.KINDS}
