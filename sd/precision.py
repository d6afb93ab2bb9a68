"""Precisions a model runs in, and what each means for its weights and for autocast.

  fp32      float32 weights, no autocast
  fp16      float16 weights (the study's half-precision model)
  bf16      bfloat16 weights
  autocast  float32 weights under torch.autocast, the original scripts/txt2img.py default
            (`--precision autocast`): float16 on CUDA, bfloat16 on a CPU
"""

from __future__ import annotations

import contextlib

import torch

from sd.errors import ConfigError

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "autocast")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "autocast": torch.float32}


def precision_dtype(precision: str) -> torch.dtype:
    """The parameter dtype a model needs for `precision` ("autocast" runs a float32 model under autocast)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    return _DTYPES[precision]


def autocast_context(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager[object]:
    """torch.autocast for "autocast" (float16 on CUDA, bfloat16 elsewhere); no context for the others."""
    precision_dtype(precision)  # refuses unknown names
    if precision != "autocast":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.float16 if device_type == "cuda" else torch.bfloat16)
