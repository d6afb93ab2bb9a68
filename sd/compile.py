"""torch.compile for SD 2.1, applied from outside the model by one builder function.

This is the PyTorch-2 part of the optimised SD 2.1 (the study compiled the U-Net only): the UNet's
tensor-only `denoise` is compiled with fullgraph=True, so a graph break is an error rather than a silent
slowdown, and with static shapes. Timesteps reach it as a float32 (B,) tensor (UNetModel.forward converts
ints and floats), so a new timestep is new data, not a recompilation. Optionally the VAE decoder is compiled
too. Inductor settings are made here, per compiled function, and nowhere else (never at import).
The state dict is unchanged (no `_orig_mod.` prefixes): compiled functions are instance attributes.
"""

from __future__ import annotations

from typing import Any

import torch

from sd import capabilities
from sd.errors import CompileUnavailable

# The one spelling of a compile mode in this project: CLI values, case ids, baselines and compile_model.
# "eager" means not compiled. torch.compile's own names appear only in _TORCH_MODES.
COMPILE_MODES: tuple[str, ...] = ("eager", "compile", "compile-max-autotune", "compile-reduce-overhead")
_TORCH_MODES: dict[str, str] = {
    "compile": "default",
    "compile-max-autotune": "max-autotune",
    "compile-reduce-overhead": "reduce-overhead",
}

# Inductor options on top of the mode's own: 1x1 convolutions as matmuls, as diffusion-fast does for SD.
INDUCTOR_OPTIONS: dict[str, Any] = {"conv_1x1_as_mm": True}


def compile_fn(fn: Any, mode: str = "compile") -> Any:
    """torch.compile(fn) with fullgraph=True, static shapes and `mode` (a COMPILE_MODES name other than
    "eager") plus INDUCTOR_OPTIONS. The one place where this project calls torch.compile."""
    _check_mode(mode)
    mode = _TORCH_MODES[mode]
    list_mode_options = (
        getattr(torch._inductor, "list_mode_options", None) if hasattr(torch, "_inductor") else None
    )
    if list_mode_options is None:  # PyTorch 2.0: options cannot be combined with a mode; use the mode only
        return torch.compile(fn, fullgraph=True, dynamic=False, mode=None if mode == "default" else mode)
    # A mode is a named set of Inductor options; spelling it out lets us add ours for this function only.
    options = {**({} if mode == "default" else list_mode_options(mode)), **INDUCTOR_OPTIONS}
    return torch.compile(fn, fullgraph=True, dynamic=False, options=options)


def _check_mode(mode: str) -> None:
    if not capabilities.has_compile():
        raise CompileUnavailable(
            f"torch.compile is not available in PyTorch {torch.__version__} (it arrived in PyTorch 2.0). "
            f"Run without compile (compile mode 'eager'), or use a PyTorch 2 environment."
        )
    if mode not in _TORCH_MODES:
        raise CompileUnavailable(
            f"Unknown compile mode {mode!r}. Choose one of: {', '.join(_TORCH_MODES)} ('eager' means no "
            "compile)."
        )


def compile_model(model: Any, mode: str = "compile", *, vae: bool = False) -> Any:
    """Compile `model.unet` (and with vae=True the VAE decoder) with torch.compile; returns `model`.

    mode: "compile" (torch.compile's default mode), "compile-reduce-overhead" or "compile-max-autotune"
    (the last two replay CUDA graphs, whose output buffers are reused, so the UNet then returns a copy:
    samplers keep earlier outputs). Compilation itself happens lazily on the first call; time that call
    to measure it. Records the mode as `model.compile_mode`. Raises CompileUnavailable where PyTorch has no
    torch.compile or for unknown modes.
    """
    _check_mode(mode)
    if getattr(model, "compile_mode", None) is not None:
        raise CompileUnavailable(
            f"This model is already compiled (mode {model.compile_mode!r}); build a new one."
        )
    unet = model.unet
    unet.denoise = _in_kernel_context(compile_fn(unet.denoise, mode), unet)
    unet.clone_outputs = mode != "compile"
    if vae:
        decoder = model.vae.decoder
        decoder.forward = _in_kernel_context(compile_fn(decoder.forward, mode), decoder)
    model.compile_mode = mode
    return model


def _in_kernel_context(compiled: Any, module: torch.nn.Module) -> Any:
    """`compiled`, called inside the SDPA kernel context of `module`'s attention where torch.compile cannot
    trace that context (capabilities.sdpa_kernel_context_traceable): the graph is traced, and its kernel
    chosen, within it."""
    if capabilities.sdpa_kernel_context_traceable():
        return compiled
    contexts = {getattr(m.attend, "kernel_context", None) for m in module.modules() if hasattr(m, "attend")}
    contexts.discard(None)
    if not contexts:
        return compiled
    if len(contexts) > 1:
        raise CompileUnavailable(
            f"{type(module).__name__} restricts SDPA to {len(contexts)} different kernels; with PyTorch "
            f"{torch.__version__} a compiled module can hold one (build it with one attention backend)."
        )
    (context,) = contexts

    def call(*args: Any, **kwargs: Any) -> Any:
        with context():
            return compiled(*args, **kwargs)

    return call
