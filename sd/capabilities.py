"""Feature probes for the installed PyTorch, the device and optional packages.

This is the one place that asks what this machine can do. It probes features (does the attribute exist,
does the import work, what does the device report), never version strings, so that `import sd` works on
PyTorch 1.12 as well as on PyTorch 2.x. Nothing here runs at import time; every probe is a function.

Which attention *kernels* actually run on a device/dtype is decided in `sd.attention` by a tiny call
(the probes here only say whether the API to ask for them exists).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

# SDPA kernel names used in backend names ("sdpa-<kernel>") -> torch.nn.attention.SDPBackend member.
SDPA_KERNELS: dict[str, str] = {
    "math": "MATH",
    "flash": "FLASH_ATTENTION",
    "mem-efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
}


def has_sdpa() -> bool:
    """True if `F.scaled_dot_product_attention` exists (PyTorch 2.0+)."""
    return hasattr(F, "scaled_dot_product_attention")


def sdpa_missing() -> str | None:
    """None if SDPA exists, else why not."""
    if has_sdpa():
        return None
    return "this PyTorch has no F.scaled_dot_product_attention (needs PyTorch 2.0 or later)"


def sdpa_kernel_api() -> str | None:
    """Which API restricts SDPA to chosen kernels: the context manager's dotted name, or None."""
    try:
        attention = importlib.import_module("torch.nn.attention")
    except ImportError:
        attention = None
    if attention is not None and hasattr(attention, "sdpa_kernel"):
        return "torch.nn.attention.sdpa_kernel"
    if hasattr(torch.backends, "cuda") and hasattr(torch.backends.cuda, "sdp_kernel"):
        return "torch.backends.cuda.sdp_kernel"
    return None


def sdpa_kernel_missing(kernel: str) -> str | None:
    """None if SDPA can be restricted to `kernel` ("math", "flash", ...) with this PyTorch, else why not."""
    if not has_sdpa():
        return sdpa_missing()
    api = sdpa_kernel_api()
    if api is None:
        return "this PyTorch has no API to restrict SDPA to one kernel"
    if api == "torch.nn.attention.sdpa_kernel":
        from torch.nn.attention import SDPBackend

        if not hasattr(SDPBackend, SDPA_KERNELS[kernel]):
            return f"torch.nn.attention.SDPBackend has no {SDPA_KERNELS[kernel]} in this PyTorch"
        return None
    if kernel == "cudnn":
        return "torch.backends.cuda.sdp_kernel cannot select the cuDNN kernel (needs torch.nn.attention)"
    return None


def sdpa_kernel_context(kernel: str) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """A factory of context managers that allow only `kernel` inside SDPA (call sdpa_kernel_missing first).

    The factory is resolved once at model build; the context is entered around each SDPA call, so the
    restriction is local to our attention and never a process-wide switch.
    """
    if sdpa_kernel_api() == "torch.nn.attention.sdpa_kernel":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_KERNELS[kernel])
        return lambda: sdpa_kernel([backend])
    flags = {
        "enable_math": kernel == "math",
        "enable_flash": kernel == "flash",
        "enable_mem_efficient": kernel == "mem-efficient",
    }
    # Where sdp_kernel knows cuDNN attention (PyTorch 2.3 and later, deprecated there), it is enabled by
    # default and preferred on sm90: it must be switched off too, or "flash" may run cuDNN.
    if "enable_cudnn" in inspect.signature(torch.backends.cuda.sdp_kernel).parameters:
        flags["enable_cudnn"] = kernel == "cudnn"
    return lambda: torch.backends.cuda.sdp_kernel(**flags)


def sdpa_kernel_ignored(device: torch.device) -> str | None:
    """The kernel SDPA runs on `device` whatever `sdpa_kernel_context` says, or None where that context
    restricts it. torch.backends.cuda.sdp_kernel sets flags that PyTorch 2.0.1 reads for CUDA only: on a CPU a
    call with every kernel turned off still runs (its math kernel). Probed by that call."""
    if sdpa_kernel_api() != "torch.backends.cuda.sdp_kernel" or device.type in ("cuda", "meta"):
        return None
    q = torch.zeros(1, 1, 2, 8, device=device)
    off = {"enable_math": False, "enable_flash": False, "enable_mem_efficient": False}
    try:
        with torch.backends.cuda.sdp_kernel(**off):
            F.scaled_dot_product_attention(q, q, q)
    except RuntimeError:
        return None
    choice = getattr(torch, "_fused_sdp_choice", None)  # the backend index: 0 math, 1 flash, 2 mem-efficient
    index = choice(q, q, q) if choice is not None else 0
    return ("math", "flash", "mem-efficient")[index] if index in (0, 1, 2) else "an unknown kernel"


def sdpa_kernel_context_traceable() -> bool:
    """Whether torch.compile traces the context of `sdpa_kernel_context` inside a graph: torch.nn.attention's
    sdpa_kernel, yes; torch.backends.cuda.sdp_kernel of PyTorch 2.0-2.2, no (Dynamo 2.0.1: "torch.* op
    returned non-Tensor _GeneratorContextManager"), so sd.compile holds that one around the compiled call."""
    return sdpa_kernel_api() == "torch.nn.attention.sdpa_kernel"


def has_compile() -> bool:
    """True if `torch.compile` exists (PyTorch 2.0+)."""
    return hasattr(torch, "compile")


def has_device_context() -> bool:
    """True if `with torch.device(...)` sets the default device for new tensors (PyTorch 2.0+)."""
    return hasattr(torch.device, "__enter__")


def device_context(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """`with torch.device(device)` where supported; a no-op context otherwise (build on CPU then move)."""
    return device if has_device_context() else contextlib.nullcontext()


def xformers_missing() -> str | None:
    """None if `xformers.ops.memory_efficient_attention` imports, else the import error."""
    try:
        ops = importlib.import_module("xformers.ops")
    except Exception as exc:  # xformers raises more than ImportError when built for another torch
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"xformers is not importable ({type(exc).__name__}: {first_line})"
    if not hasattr(ops, "memory_efficient_attention"):
        return "xformers.ops has no memory_efficient_attention"
    return None
