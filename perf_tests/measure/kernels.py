"""The attention kernels a case ran, read from one profiled call (torch.profiler), outside the timed rounds.

The backend a case asks for is not always the kernel that runs: plain ``sdpa`` is PyTorch's choice (cuDNN
attention on an sm90 GPU with a recent cuDNN, flash elsewhere, a CPU kernel on a CPU), and the VAE's wide
head goes to a fallback. One call is profiled; every SDPA implementation operator in it (the ATen op that
SDPA dispatched to, or xformers' operator) is named by its kernel family, with the device kernels under it
(on a GPU), and assigned to the part of the model that ran it: the ``unet``, the ``vae`` or the ``text``
encoder, marked by profiler ranges around those modules' calls (their hooks are outside any compiled
region, so compiled code is unchanged). The original attention (einsum and softmax) has no such
operator: its list is empty. A compiled model whose attention Inductor generated itself shows no
operator either, nor does a CUDA-graph replay (reduce-overhead, max-autotune), which dispatches none.
Result: ``extra_info.attention_kernels = {part: [kernel, ...]}`` and
``extra_info.attention_device_kernels = {part: [device kernel name, ...]}`` (GPU only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

# ATen's SDPA implementations (what F.scaled_dot_product_attention dispatches to) -> kernel family.
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash-cpu",
    "aten::_scaled_dot_product_efficient_attention": "mem-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "aten::_efficient_attention_forward": "mem-efficient",
    "aten::_flash_attention_forward": "flash",
}
RANGE_PREFIX = "sd-perf."  # profiler ranges around the model's parts: "sd-perf.unet", ...


def kernel_family(op_name: str) -> str | None:
    """The kernel family of a profiler event name, or None when it is not an attention implementation."""
    if op_name in SDPA_OPS:
        return SDPA_OPS[op_name]
    if op_name.startswith(("xformers::", "xformers_flash::", "xformers_flash3::")) and (
        "fw" in op_name or "forward" in op_name
    ):
        return "xformers:" + op_name.split("::", 1)[1]
    return None


def _parents(event) -> Iterator:
    parent = getattr(event, "cpu_parent", None)
    while parent is not None:
        yield parent
        parent = getattr(parent, "cpu_parent", None)


def _descendants(event) -> Iterator:
    for child in getattr(event, "cpu_children", []):
        yield child
        yield from _descendants(child)


def classify(events: Iterable, default_part: str) -> tuple[dict, dict]:
    """({part: sorted kernel families}, {part: sorted device kernel names}) from profiler events (objects
    with ``name``, ``cpu_parent``, ``cpu_children`` and ``kernels``, as torch.profiler's FunctionEvent).
    An implementation op inside another one (efficient attention's forward inside its SDPA op) counts once."""
    families: dict[str, set] = {}
    device: dict[str, set] = {}
    for event in events:
        family = kernel_family(event.name)
        if family is None or any(kernel_family(p.name) for p in _parents(event)):
            continue
        part = next(
            (p.name[len(RANGE_PREFIX) :] for p in _parents(event) if p.name.startswith(RANGE_PREFIX)),
            default_part,
        )
        families.setdefault(part, set()).add(family)
        for e in (event, *_descendants(event)):
            device.setdefault(part, set()).update(k.name for k in getattr(e, "kernels", []))
    return ({p: sorted(f) for p, f in families.items()}, {p: sorted(n)[:8] for p, n in device.items() if n})


@contextlib.contextmanager
def _ranges(parts: Mapping[str, torch.nn.Module]) -> Iterator[None]:
    """A profiler range named after the part around every call of each module (forward hooks)."""
    handles = []
    for part, module in parts.items():
        stack: list = []

        def enter(module, args, stack=stack, name=RANGE_PREFIX + part):
            stack.append(torch.autograd.profiler.record_function(name))
            stack[-1].__enter__()

        def leave(module, args, output, stack=stack):
            stack.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def attention_kernels(
    fn: Callable[[], object],
    device: str,
    parts: Mapping[str, torch.nn.Module] | None,
    default_part: str = "unet",
) -> dict:
    """Profile one call of ``fn`` and return what goes into ``extra_info`` (see the module docstring)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    is_cuda = torch.device(device).type == "cuda"
    if is_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof, _ranges(parts or {}):
        fn()
        if is_cuda:
            torch.cuda.synchronize(device)
    families, device_kernels = classify(prof.events(), default_part)
    return {"attention_kernels": families, "attention_device_kernels": device_kernels if is_cuda else None}


def model_parts(model) -> dict[str, torch.nn.Module]:
    """The parts of an sd model whose attention is told apart: UNet, VAE decoder, text encoder."""
    return {"unet": model.unet, "vae": model.vae.decoder, "text": model.text_encoder}
