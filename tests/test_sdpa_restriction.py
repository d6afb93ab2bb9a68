"""Restricting SDPA to one kernel: every other kernel off (cuDNN included) through the API of PyTorch 2.0-2.2,
and compiled forced-kernel cases skipped with the reason where Dynamo cannot trace the restriction."""

from __future__ import annotations

import pytest
import torch

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
