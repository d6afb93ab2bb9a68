"""sd.attention: the kernel registry, availability probing and the CrossAttention block."""

from __future__ import annotations

import pytest
import torch

from sd import attention, capabilities
from sd.attention import (
    ATTENTION_BACKENDS,
    CrossAttention,
    attend_original,
    available_attention,
    resolve_attention,
)
from sd.errors import AttentionUnavailable

AVAILABLE = [name for name, why in available_attention("cpu").items() if why is None]


def textbook_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The original's math with batch and heads merged: softmax(q k^T * d^-0.5) v in float64."""
    b, h, n, d = q.shape
    q, k, v = (t.double().reshape(b * h, -1, d) for t in (q, k, v))  # ((B heads), N, d)
    sim = torch.bmm(q, k.transpose(1, 2)) * d**-0.5
    return torch.bmm(sim.softmax(-1), v).reshape(b, h, n, d)


def qkv(dtype=torch.float32, nq=50, nk=77, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 3, nq, d, generator=g).to(dtype),
        torch.randn(2, 3, nk, d, generator=g).to(dtype),
        torch.randn(2, 3, nk, d, generator=g).to(dtype),
    )


def test_backend_names_in_documented_order():
    assert ATTENTION_BACKENDS == (
        "original",
        "sdpa",
        "sdpa-math",
        "sdpa-flash",
        "sdpa-mem-efficient",
        "sdpa-cudnn",
        "xformers",
    )


def test_cpu_availability_is_probed():
    table = available_attention("cpu")
    assert set(table) == set(ATTENTION_BACKENDS)
    assert table["original"] is None
    expected = ["sdpa", "sdpa-math", "sdpa-flash"] if capabilities.has_sdpa() else []
    for name in expected:
        assert table[name] is None, table[name]
    # No CUDA kernels on a CPU: the reasons are the kernels' own refusals of a real call.
    for name in ("sdpa-mem-efficient", "sdpa-cudnn", "xformers"):
        assert isinstance(table[name], str) and table[name]


def test_original_is_the_original_math():
    q, k, v = qkv()
    torch.testing.assert_close(
        attend_original(q, k, v).double(), textbook_attention(q, k, v), atol=2e-6, rtol=0
    )


@pytest.mark.parametrize("name", AVAILABLE)
@pytest.mark.parametrize("d", [64, 128])
def test_every_available_backend_computes_attention_fp32(name, d):
    q, k, v = qkv(d=d)
    torch.testing.assert_close(
        resolve_attention(name)(q, k, v).double(), textbook_attention(q, k, v), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("name", AVAILABLE)
def test_every_available_backend_computes_attention_bf16(name):
    q, k, v = (t.bfloat16() for t in qkv())
    out = resolve_attention(name, "cpu", torch.bfloat16)(q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), textbook_attention(q, k, v), atol=3e-2, rtol=3e-2)


def test_the_reference_catches_a_wrong_kernel():
    # The checks above can fail: a kernel with the wrong scale (1/d instead of 1/sqrt(d)) is caught.
    q, k, v = qkv()
    wrong = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1], dim=-1) @ v
    assert not torch.allclose(wrong.double(), textbook_attention(q, k, v), atol=1e-3)


def test_registry_is_one_table():
    assert ATTENTION_BACKENDS == tuple(attention._REGISTRY)
    for name, backend in attention._REGISTRY.items():
        assert set(backend.vae_fallbacks) <= set(ATTENTION_BACKENDS) - {name}, name
        # Every chain ends in a kernel that runs at any head dim.
        assert name == "original" or backend.vae_fallbacks[-1] == "original", name


def test_kernel_is_built_once_per_resolve(monkeypatch):
    built = []
    entry = attention._REGISTRY["original"]

    def factory():
        built.append(1)
        return attend_original

    monkeypatch.setitem(attention._REGISTRY, "original", attention.Backend(factory, entry.missing, ()))
    monkeypatch.setattr(attention, "_PROBES", {})
    assert resolve_attention("original") is attend_original
    assert len(built) == 1


def narrow_backend(limit: int) -> attention.Backend:
    """A fake kernel that, like flash attention on CUDA, refuses head dims above `limit`."""

    def narrow(q, k, v):
        if q.shape[-1] > limit:
            raise RuntimeError("No available kernel.")
        return attend_original(q, k, v)

    return attention.Backend(lambda: narrow, lambda: None, attention._REGISTRY["sdpa-flash"].vae_fallbacks)


def test_fallback_takes_the_first_backend_that_runs_the_wide_head(monkeypatch):
    monkeypatch.setitem(attention._REGISTRY, "sdpa-flash", narrow_backend(256))
    monkeypatch.setattr(attention, "_PROBES", {})
    name, attend = attention.resolve_with_fallback("sdpa-flash", "cpu", torch.float32, (512,))
    runs_512 = available_attention("cpu", torch.float32, (512,))
    expected = next(n for n in ("sdpa-mem-efficient", "sdpa", "sdpa-math", "original") if runs_512[n] is None)
    assert name == expected
    assert attention.resolve_with_fallback("sdpa-flash", "cpu", torch.float32, (64,))[0] == "sdpa-flash"


def test_original_keeps_qk_in_fp32_under_autocast():
    q, k, v = qkv(nq=16, nk=16, d=64)
    big = q * 60  # logits of ~1e3: fine in fp32, coarse in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend_original(big.bfloat16(), k.bfloat16(), v.bfloat16())
    ref = textbook_attention(big.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float())
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_unknown_backend_names_the_choices():
    with pytest.raises(AttentionUnavailable) as exc:
        resolve_attention("flash2", "cpu")
    assert "original, sdpa" in str(exc.value) and "\n" not in str(exc.value)


def test_unavailable_backend_says_why_and_what_runs():
    with pytest.raises(AttentionUnavailable) as exc:
        resolve_attention("xformers", "cpu")
    message = str(exc.value)
    assert "cannot run here" in message and "xformers" in message
    assert "Available on this machine (cpu): " + ", ".join(AVAILABLE) in message


def test_missing_sdpa_is_reported_as_such(monkeypatch):
    monkeypatch.setattr(capabilities, "has_sdpa", lambda: False)
    monkeypatch.setattr(attention, "_PROBES", {})
    table = available_attention("cpu")
    assert table["original"] is None
    for name in ("sdpa", "sdpa-math", "sdpa-flash"):
        assert "scaled_dot_product_attention" in table[name]


def block_and_inputs(context_dim):
    """A seeded CrossAttention (4 heads of 8) with x (2, 10, 32) and its context (None: self-attention)."""
    torch.manual_seed(0)
    block = CrossAttention(32, context_dim, heads=4, dim_head=8, attend=attend_original)
    x = torch.randn(2, 10, 32)
    return block, x, None if context_dim is None else torch.randn(2, 7, context_dim)


@pytest.mark.parametrize("context_dim", [None, 24])
def test_cross_attention_splits_heads_outer(context_dim):
    block, x, context = block_and_inputs(context_dim)
    src = x if context is None else context
    # The original: q = to_q(x); 'b n (h d) -> (b h) n d'; softmax(q k^T * scale) v; '(b h) n d -> b n (h d)'.
    q, k, v = block.to_q(x), block.to_k(src), block.to_v(src)
    split = [t.reshape(t.shape[0], t.shape[1], 4, 8).permute(0, 2, 1, 3) for t in (q, k, v)]
    out = textbook_attention(*split).float().permute(0, 2, 1, 3).reshape(2, 10, 32)
    expected = block.to_out(out)
    torch.testing.assert_close(block(x, context), expected, atol=1e-5, rtol=1e-5)
    assert [n for n, _ in block.named_parameters()] == [
        "to_q.weight",
        "to_k.weight",
        "to_v.weight",
        "to_out.0.weight",
        "to_out.0.bias",
    ]


@pytest.mark.parametrize("context_dim", [None, 24])
def test_fused_projections_compute_the_same_with_the_same_keys(context_dim):
    block, x, context = block_and_inputs(context_dim)
    separate = {k: v.clone() for k, v in block.state_dict().items()}
    expected = block(x, context)
    block.fuse_projections()
    assert block.fused == ("to_qkv" if context_dim is None else "to_kv")
    assert not hasattr(block, "to_k")
    torch.testing.assert_close(block(x, context), expected, atol=1e-6, rtol=1e-6)
    saved = block.state_dict()
    assert list(saved) == list(separate)
    for key, value in separate.items():
        assert torch.equal(saved[key], value), key
    fresh = CrossAttention(32, context_dim, heads=4, dim_head=8, attend=attend_original)
    fresh.fuse_projections()
    fresh.load_state_dict(separate, strict=True)  # the original keys load into a fused block
    torch.testing.assert_close(fresh(x, context), expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# On a CUDA device: the fused kernels against the float64 reference, and flash's real head-dim limit

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("d", [64, 512])
@pytest.mark.parametrize("name", ATTENTION_BACKENDS)
def test_cuda_backends_compute_attention_fp16(name, d):
    if available_attention("cuda", torch.float16, (d,))[name] is not None:
        pytest.skip(f"{name} does not run at head dim {d} here")
    q, k, v = (t.half() for t in qkv(d=d))
    out = resolve_attention(name, "cuda", torch.float16, (d,))(q.cuda(), k.cuda(), v.cuda())
    assert out.dtype == torch.float16 and out.is_cuda
    torch.testing.assert_close(out.cpu().double(), textbook_attention(q, k, v), atol=3e-3, rtol=3e-3)


@pytest.mark.gpu
@requires_cuda
def test_cuda_flash_gives_the_vae_head_to_the_next_kernel():
    if available_attention("cuda", torch.float16)["sdpa-flash"] is not None:
        pytest.skip("no flash kernel on this GPU/PyTorch")
    assert available_attention("cuda", torch.float16, (512,))["sdpa-flash"] is not None  # flash stops at 256
    name, attend = attention.resolve_with_fallback("sdpa-flash", "cuda", torch.float16, (512,))
    assert name in attention._REGISTRY["sdpa-flash"].vae_fallbacks
    q, k, v = (t.half() for t in qkv(d=512))
    out = attend(q.cuda(), k.cuda(), v.cuda())
    torch.testing.assert_close(out.cpu().double(), textbook_attention(q, k, v), atol=3e-3, rtol=3e-3)


@pytest.mark.skipif(not capabilities.has_sdpa(), reason="PyTorch 1.x has no SDPA to restrict")
def test_a_kernel_the_flags_cannot_select_on_this_device_is_refused_with_the_kernel_that_runs(monkeypatch):
    """PyTorch 2.0.1's torch.backends.cuda.sdp_kernel is read by its CUDA dispatch only: on a CPU every
    setting runs math, so sdpa-mem-efficient there would record a kernel that did not run."""
    monkeypatch.setattr(attention, "_PROBES", {})
    monkeypatch.setattr(capabilities, "sdpa_kernel_ignored", lambda device: "math")
    available = attention.available_attention("cpu")
    for name in ("sdpa-mem-efficient", "sdpa-flash"):
        assert "does not restrict SDPA on cpu" in available[name] and "with math" in available[name]
    if capabilities.sdpa_kernel_missing("math") is None:
        assert available["sdpa-math"] is None
    assert available["original"] is None and available["sdpa"] is None
