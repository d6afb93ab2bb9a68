"""Attention for SD 2.1: the backend registry and the UNet's CrossAttention block.

Reproduces `ldm/modules/attention.py` CrossAttention (and, through the same kernels, the VAE mid-block
AttnBlock in `sd.vae`). The projections, head split/merge and output projection are written once in
`CrossAttention`; the only thing that differs between backends is the kernel, a small function

    attend(q, k, v) -> out        # all (B, heads, N, d), scale d**-0.5, no mask

`_REGISTRY` maps each backend name to a `Backend`: a kernel factory, the feature check that says whether
this PyTorch has it at all, and the kernels the VAE falls back to, in order, when this one cannot take
the VAE's single wide head (flash and cuDNN stop at head dim 256; the SD 2.1 VAE head is 512 wide):
  original            the original einsum path: q, k cast to fp32 and QK^T computed with autocast off,
                      softmax in fp32, AV einsum in the ambient dtype (ldm/modules/attention.py
                      CrossAttention with its default ATTN_PRECISION="fp32")
  sdpa                F.scaled_dot_product_attention, PyTorch picks the kernel
  sdpa-<kernel>       SDPA restricted to one kernel (math, flash, mem-efficient, cudnn); no fallback
  xformers            xformers.ops.memory_efficient_attention on (B, N, heads, d)
A backend is chosen per model at build time with `resolve_attention`, which raises AttentionUnavailable
(with the reason and the list of backends that do run) when it cannot run on the device. Availability is
decided by running a tiny call with the backend on that device, not by reading versions.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sd import capabilities
from sd.errors import AttentionUnavailable
from sd.layers import fuse_projections

AttendFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[object]:
    # PyTorch 1.12 autocast knows only "cuda" and "cpu"; other devices (meta, ...) have no autocast to undo.
    if device_type in ("cuda", "cpu"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def attend_original(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The original CrossAttention math (ATTN_PRECISION="fp32", its default)."""
    scale = q.shape[-1] ** -0.5
    # The original disables autocast so that QK^T and the softmax stay in fp32 (fp16 overflows for v2.1).
    with _autocast_off(q.device.type):
        sim = torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) * scale  # (B, heads, Nq, Nk)
    sim = sim.softmax(dim=-1)
    # AV runs in the ambient precision: v's dtype (under autocast the matmul is cast as the original's).
    return torch.einsum("bhij,bhjd->bhid", sim.to(v.dtype), v)  # (B, heads, Nq, d)


def attend_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """PyTorch's fused attention; it picks the kernel."""
    return F.scaled_dot_product_attention(q, k, v)


def _sdpa_with_kernel(kernel: str) -> AttendFn:
    context = capabilities.sdpa_kernel_context(kernel)
    if capabilities.sdpa_kernel_context_traceable() or not capabilities.has_compile():
        compiling = lambda: False  # noqa: E731
    else:
        import torch._dynamo

        compiling = torch._dynamo.is_compiling

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if compiling():  # a graph traced inside `context`, which sd.compile holds around the compiled call
            return F.scaled_dot_product_attention(q, k, v)
        with context():  # only this kernel may run: an unsupported call raises instead of falling back
            return F.scaled_dot_product_attention(q, k, v)

    attend.__name__ = attend.__qualname__ = f"attend_sdpa_{kernel.replace('-', '_')}"
    attend.kernel_context = context  # type: ignore[attr-defined]
    return attend


def attend_xformers(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """xformers' memory-efficient kernel, as the original MemoryEfficientCrossAttention calls it."""
    import xformers.ops

    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, N, heads, d), the layout xformers expects
    return xformers.ops.memory_efficient_attention(q, k, v).transpose(1, 2)  # (B, heads, N, d)


@dataclass(frozen=True)
class Backend:
    """A registry entry: how to build the kernel, whether this PyTorch has it, where the VAE goes instead."""

    kernel: Callable[[], AttendFn]
    missing: Callable[[], str | None]  # why this PyTorch/packages lack it, or None
    vae_fallbacks: tuple[str, ...]  # tried in order when the kernel cannot take the VAE's head dim


def _sdpa_kernel(kernel: str, fallbacks: tuple[str, ...]) -> Backend:
    return Backend(
        partial(_sdpa_with_kernel, kernel), partial(capabilities.sdpa_kernel_missing, kernel), fallbacks
    )


# Fallbacks stay in the family first (another fused SDPA kernel), then SDPA's own choice, its math
# kernel and the original einsum, which run at any head dim.
_GENERIC = ("sdpa", "sdpa-math", "original")
_REGISTRY: dict[str, Backend] = {
    "original": Backend(lambda: attend_original, lambda: None, ()),
    "sdpa": Backend(lambda: attend_sdpa, capabilities.sdpa_missing, _GENERIC[1:]),
    "sdpa-math": _sdpa_kernel("math", ("original",)),
    "sdpa-flash": _sdpa_kernel("flash", ("sdpa-mem-efficient", *_GENERIC)),
    "sdpa-mem-efficient": _sdpa_kernel("mem-efficient", _GENERIC),
    "sdpa-cudnn": _sdpa_kernel("cudnn", ("sdpa-mem-efficient", *_GENERIC)),
    "xformers": Backend(
        lambda: attend_xformers, capabilities.xformers_missing, ("sdpa-mem-efficient", *_GENERIC)
    ),
}
ATTENTION_BACKENDS: tuple[str, ...] = tuple(_REGISTRY)


def _probe_dtypes(dtype: torch.dtype | None) -> tuple[torch.dtype, ...]:
    # An fp32 model may run under autocast, where attention sees fp16/bf16: any of them is enough.
    if dtype is None or dtype == torch.float32:
        return (torch.float32, torch.float16, torch.bfloat16)
    return (dtype,)


def _try_kernel(
    attend: AttendFn, device: torch.device, dtype: torch.dtype, head_dims: tuple[int, ...]
) -> str | None:
    """None if `attend` runs on tiny inputs of every head dim, else the first line of its error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA warns once per refused kernel; the error we keep says enough
        for d in head_dims:
            # (B, heads, N, d); no RNG, so that probing never moves the caller's random stream
            q = torch.linspace(-1, 1, 16 * d, device=device).reshape(1, 2, 8, d).to(dtype)
            try:
                attend(q, q, q)
            except Exception as exc:  # the kernel's own refusal is the reason we report
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                return f"head dim {d}: {first_line}"
    return None


_PROBES: dict[tuple[str, str, tuple[torch.dtype, ...], tuple[int, ...]], str | None] = {}


def _probe(
    name: str,
    device: torch.device,
    dtypes: tuple[torch.dtype, ...],
    head_dims: tuple[int, ...],
    attend: AttendFn | None = None,
) -> str | None:
    """Why `name` cannot run on `device` for any of `dtypes` at every head dim, or None. Cached."""
    key = (name, str(device), dtypes, head_dims)
    if key not in _PROBES:
        reason = _REGISTRY[name].missing()
        kernel = name.removeprefix("sdpa-")
        ran = capabilities.sdpa_kernel_ignored(device) if kernel in capabilities.SDPA_KERNELS else None
        if reason is None and ran not in (None, kernel):
            reason = (f"torch.backends.cuda.sdp_kernel does not restrict SDPA on {device.type} in this "
                      f"PyTorch (a call with every kernel off still runs, with {ran}): {kernel} cannot be "
                      f"selected")
        if reason is None and device.type != "meta":  # meta tensors run no kernel: nothing to learn
            attend = attend or _REGISTRY[name].kernel()
            errors: dict[str, list[str]] = {}  # message -> the dtypes that got it
            for dtype in dtypes:
                error = _try_kernel(attend, device, dtype, head_dims)
                if error is None:
                    break
                errors.setdefault(error, []).append(str(dtype).replace("torch.", ""))
            else:
                tried = "; ".join(f"{', '.join(dts)}, {msg}" for msg, dts in errors.items())
                reason = f"a test call on {device} failed ({tried})"
        _PROBES[key] = reason
    return _PROBES[key]


def available_attention(
    device: torch.device | str = "cpu", dtype: torch.dtype | None = None, head_dims: Iterable[int] = (64,)
) -> dict[str, str | None]:
    """Every backend name -> None if it runs on `device` (for `dtype`, or any of fp32/fp16/bf16 when
    dtype is None or fp32, since autocast may lower it), else the reason it does not."""
    device, dims = torch.device(device), tuple(sorted(set(head_dims)))
    return {name: _probe(name, device, _probe_dtypes(dtype), dims) for name in ATTENTION_BACKENDS}


def resolve_attention(
    name: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    head_dims: Iterable[int] = (64,),
) -> AttendFn:
    """The attend function for backend `name`, or AttentionUnavailable saying why and what runs here."""
    if name not in _REGISTRY:
        raise AttentionUnavailable(
            f"Unknown attention backend {name!r}. Choose one of: {', '.join(ATTENTION_BACKENDS)}."
        )
    device = torch.device(device)
    attend = _REGISTRY[name].kernel() if _REGISTRY[name].missing() is None else None
    reason = _probe(name, device, _probe_dtypes(dtype), tuple(sorted(set(head_dims))), attend)
    if reason is not None or attend is None:
        table = available_attention(device, dtype, head_dims)  # only now probe the others, for the message
        usable = ", ".join(n for n, why in table.items() if why is None)
        raise AttentionUnavailable(
            f"Attention backend {name!r} cannot run here: {reason}. "
            f"Available on this machine ({device}): {usable}. Pass one of those as attention=."
        )
    return attend


def resolve_with_fallback(
    name: str, device: torch.device | str, dtype: torch.dtype | None, head_dims: Iterable[int]
) -> tuple[str, AttendFn]:
    """(backend, attend) for `name`, or for the first of its `vae_fallbacks` that runs at `head_dims`.

    For the VAE's single wide head: a backend that cannot take it gives way to the next in its table
    entry (same family first). Raises AttentionUnavailable only if none of them runs.
    """
    resolve_attention(name, device, dtype)  # unknown names and a backend missing here fail as usual
    for candidate in (name, *_REGISTRY[name].vae_fallbacks):
        try:
            return candidate, resolve_attention(candidate, device, dtype, head_dims)
        except AttentionUnavailable:
            continue
    raise AttentionUnavailable(
        f"No attention backend runs at head dim {max(head_dims)} on {device}: tried {name!r} and then "
        f"{', '.join(_REGISTRY[name].vae_fallbacks) or 'nothing else'}."
    )


class CrossAttention(nn.Module):
    """Multi-head attention with the original's parameter names (to_q, to_k, to_v, to_out.0).

    Self-attention when `context` is None (attn1), cross-attention on the text context otherwise (attn2).
    The kernel is the `attend` function chosen at build time; nothing else depends on the backend.
    `fuse_projections()` turns Q, K, V (self) or K, V (cross) into one matmul; the keys stay the original's.
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, attend: AttendFn):
        super().__init__()
        inner = heads * dim_head
        self.is_self_attention = context_dim is None
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))
        self.attend = attend
        self.fused = ""  # "", "to_qkv" (self-attention) or "to_kv" (cross-attention)

    def fuse_projections(self) -> None:
        if self.fused:
            return
        self.fused = "to_qkv" if self.is_self_attention else "to_kv"
        names = ("to_q", "to_k", "to_v") if self.is_self_attention else ("to_k", "to_v")
        fuse_projections(self, names, self.fused)

    def _project(self, x: Tensor, context: Tensor) -> tuple[Tensor, ...]:
        if self.fused == "to_qkv":
            return self.to_qkv(x).chunk(3, dim=-1)
        if self.fused == "to_kv":
            return (self.to_q(x), *self.to_kv(context).chunk(2, dim=-1))
        return self.to_q(x), self.to_k(context), self.to_v(context)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        context = x if context is None else context
        # (B, N, heads*d) -> (B, heads, N, d): channels split as (heads, d), heads outer, as the original.
        # A list, not a generator: Dynamo 2.0.1 cannot unpack one (UNPACK_SEQUENCE ListIteratorVariable).
        q, k, v = [
            t.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in self._project(x, context)
        ]
        out = self.attend(q, k, v)  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head)  # (B, N, heads*d)
        return self.to_out(out)
