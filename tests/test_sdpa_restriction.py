"""Restricting SDPA to one kernel: every other kernel off (cuDNN included) through the API of PyTorch 2.0-2.2,
and compiled forced-kernel cases skipped with the reason where Dynamo cannot trace the restriction."""

from __future__ import annotations

import pytest
import torch

from perf_tests import cases as C
from sd import capabilities

needs_sdpa = pytest.mark.skipif(
    not hasattr(torch.nn.functional, "scaled_dot_product_attention"), reason="SDPA needs PyTorch 2"
)


def _sdp_kernel_recording(calls, with_cudnn):
    if with_cudnn:

        def sdp_kernel(enable_flash=True, enable_math=True, enable_mem_efficient=True, enable_cudnn=True):
            calls.append(
                dict(flash=enable_flash, math=enable_math, mem=enable_mem_efficient, cudnn=enable_cudnn)
            )
    else:

        def sdp_kernel(enable_flash=True, enable_math=True, enable_mem_efficient=True):
            calls.append(dict(flash=enable_flash, math=enable_math, mem=enable_mem_efficient))

    return sdp_kernel


@pytest.mark.parametrize("with_cudnn", [True, False])
@pytest.mark.parametrize("kernel", ["flash", "mem-efficient", "math"])
def test_sdp_kernel_switches_off_every_other_kernel_cudnn_included(monkeypatch, kernel, with_cudnn):
    calls = []
    monkeypatch.setattr(capabilities, "sdpa_kernel_api", lambda: "torch.backends.cuda.sdp_kernel")
    monkeypatch.setattr(
        torch.backends.cuda, "sdp_kernel", _sdp_kernel_recording(calls, with_cudnn), raising=False
    )
    capabilities.sdpa_kernel_context(kernel)()
    (flags,) = calls
    assert [name for name, on in flags.items() if on] == [{"mem-efficient": "mem"}.get(kernel, kernel)]
    assert ("cudnn" in flags) == with_cudnn


def _forced(compile_mode, attention="sdpa-flash"):
    p = C.PROFILES["sd21-base"]
    return C.Case(
        "unet-step", "sd21-base", attention, compile_mode, 1, "fp16", height=p.height, width=p.width
    )


CUDA = capabilities.DeviceCapabilities(
    "cuda", dict.fromkeys(C.ATTENTION_BACKENDS), True, "2.0.1+cu118", cuda_capability=(9, 0)
)


def test_compiled_forced_kernel_cases_skip_where_dynamo_cannot_trace_the_restriction(monkeypatch):
    refusal = (
        "torch.compile(fullgraph=True) cannot trace torch.backends.cuda.sdp_kernel in this PyTorch "
        "(Unsupported torch.* op returned non-Tensor _GeneratorContextManager)"
    )
    monkeypatch.setattr(C, "sdpa_kernel_compile_missing", lambda: refusal)
    assert (
        C.skip_reason(_forced("compile"), CUDA)
        == f"sdpa-flash restricts SDPA inside the compiled UNet, and {refusal}"
    )
    assert C.skip_reason(_forced("eager"), CUDA) is None  # eager: the context runs as Python
    assert C.skip_reason(_forced("compile", "sdpa"), CUDA) is None  # nothing restricted
    gate = C.grid("gate", "cuda")
    skipped = [
        c for k in gate.kinds for c in gate.cases(k) if "cannot trace" in (C.skip_reason(c, CUDA) or "")
    ]
    assert skipped and all(
        c.compiled and c.attention in ("sdpa-flash", "sdpa-mem-efficient") for c in skipped
    )
    monkeypatch.setattr(C, "sdpa_kernel_compile_missing", lambda: None)
    assert C.skip_reason(_forced("compile"), CUDA) is None


@needs_sdpa
@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile needs PyTorch 2")
def test_the_probe_reports_a_restriction_dynamo_cannot_trace(monkeypatch):
    class Untraceable:
        def __enter__(self):
            torch._dynamo.graph_break()  # what Dynamo of PyTorch 2.0 meets in sdp_kernel: a graph break

        def __exit__(self, *exc):
            return False

    import torch._dynamo

    capabilities.sdpa_kernel_compile_missing.cache_clear()
    monkeypatch.setattr(capabilities, "sdpa_kernel_context", lambda kernel: Untraceable)
    try:
        reason = capabilities.sdpa_kernel_compile_missing()
    finally:
        capabilities.sdpa_kernel_compile_missing.cache_clear()
    assert reason is not None and reason.startswith("torch.compile(fullgraph=True) cannot trace")
    monkeypatch.undo()
    # this PyTorch's own restriction: traced where torch.nn.attention.sdpa_kernel exists (2.3 and later)
    if capabilities.sdpa_kernel_api() == "torch.nn.attention.sdpa_kernel":
        assert capabilities.sdpa_kernel_compile_missing() is None
