"""Stable Diffusion 2.1 text-to-image, checkpoint-compatible with the original code.

The public entry points:

    model = sd.load_model("sd21-base", ckpt=None, attention="original", device="cpu")
    latents = sd.sample(model, "plms", steps=50, cond=..., uncond=..., guidance_scale=9.0, x_T=...)
    pixels = model.decode_latents(latents)          # (B, 3, H, W) float in [0, 1]
    images = sd.txt2img(model, ["a photo"], sd.Sampling("plms", steps=50))  # uint8 (B, H, W, 3)

Everything imports on PyTorch 1.12; features of newer releases are probed in `sd.capabilities`. Importing
`sd` is cheap: each name below is imported from its module on first use, so `import sd.attention` (or
`sd.ATTENTION_BACKENDS`) does not import open_clip.
"""

from __future__ import annotations

import importlib

# public name -> the submodule that defines it
_EXPORTS = {
    "ATTENTION_BACKENDS": "attention",
    "available_attention": "attention",
    "resolve_attention": "attention",
    "COMPILE_MODES": "compile",
    "compile_model": "compile",
    "PRESETS": "config",
    "ModelConfig": "config",
    "load_config": "config",
    "AttentionUnavailable": "errors",
    "CheckpointError": "errors",
    "CompileUnavailable": "errors",
    "ConfigError": "errors",
    "SDError": "errors",
    "StableDiffusion": "model",
    "load_model": "model",
    "Sampling": "pipeline",
    "txt2img": "pipeline",
    "write_images": "pipeline",
    "PRECISIONS": "precision",
    "precision_dtype": "precision",
    "SAMPLERS": "samplers",
    "sample": "samplers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sd' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sd.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
