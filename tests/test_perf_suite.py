"""perf_tests.suite: the correctness verdict beside the timing, and skips with reasons (no model needed)."""

from __future__ import annotations

import pytest
import torch

from perf_tests import cases as C
from perf_tests.suite import Options, PerfSession
from sd.capabilities import DeviceCapabilities

CAPS = DeviceCapabilities(device_type="cpu", attention={**dict.fromkeys(C.ATTENTION_BACKENDS),
                                                   "xformers": "xformers is not importable"},
                      has_compile=True, torch_version="2.14.1")


@pytest.fixture
def session():
    return PerfSession(Options(device="cpu", grid=C.default_grid("cpu")), caps=CAPS)


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


def test_wrong_output_fails_loudly(session):
    ref = torch.randn(2, 4, 8, 8)
    session.check(case(attention="original"), ref)
    with pytest.raises(pytest.fail.Exception, match="WRONG OUTPUT"):
        session.check(case(compile="compile"), ref + 0.5)


def test_non_finite_output_fails(session):
    out = torch.randn(2, 4, 8, 8)
    out[0, 0, 0, 0] = float("nan")
    with pytest.raises(pytest.fail.Exception, match="non-finite"):
        session.check(case(), out)


def test_unavailable_combination_is_skipped_with_its_reason(session):
    with pytest.raises(pytest.skip.Exception, match="xformers is not importable"):
        session.run(benchmark=None, case=case(attention="xformers"))
    with pytest.raises(pytest.skip.Exception, match="CUDA"):
        session.run(benchmark=None, case=case(precision="fp16"))


def test_default_cpu_session_cases(session):
    got = session.cases("unet-step")
    assert {c.compile for c in got} == {"eager", "compile"}
    assert {c.compile for c in session.cases("vae-decode")} == {"eager"}  # VAE compile only on request
    assert not session.compile_vae
    assert session.rounds(got[0]) == (10, 1)
    assert {c.batch_size for c in got} == {1, 2}
    # The seconds-per-call kinds stay at batch 1 on a CPU unless --batch-size says otherwise.
    assert {c.batch_size for c in session.cases("txt2img")} == {1}
    assert {c.batch_size for c in session.cases("vae-decode")} == {1}
    assert session.cases("txt2img")[0].steps == C.PROFILES["tiny"].steps


def test_explicit_batch_sizes_apply_to_every_kind():
    given = {"perf_batch_size": "1,2", "perf_device": "cpu"}
    options = Options.parse(given.get, cuda_available=False)
    s = PerfSession(options, caps=CAPS)
    assert {c.batch_size for c in s.cases("txt2img")} == {1, 2}
    assert {c.batch_size for c in s.cases("vae-decode")} == {1, 2}
