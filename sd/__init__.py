"""Stable Diffusion 2.1 text-to-image, checkpoint-compatible with the original code.

The public entry points:

    model = sd.load_model("sd21-base", ckpt=None, attention="original", device="cpu")
    latents = sd.sample(model, "plms", steps=50, cond=..., uncond=..., guidance_scale=9.0, x_T=...)
    images = sd.txt2img(model, ["a photo"], steps=50)

Everything imports on PyTorch 1.12; features of newer releases are probed in `sd.capabilities`.
"""

from .attention import ATTENTION_BACKENDS, available_attention, resolve_attention
from .compile import COMPILE_MODES, compile_model
from .config import PRESETS, ModelConfig, load_config
from .errors import AttentionUnavailable, CheckpointError, CompileUnavailable, ConfigError, SDError
from .model import StableDiffusion, load_model
from .pipeline import PRECISIONS, txt2img
from .samplers import SAMPLERS, sample

__all__ = [
    "ATTENTION_BACKENDS",
    "COMPILE_MODES",
    "PRECISIONS",
    "PRESETS",
    "SAMPLERS",
    "AttentionUnavailable",
    "CheckpointError",
    "CompileUnavailable",
    "ConfigError",
    "ModelConfig",
    "SDError",
    "StableDiffusion",
    "available_attention",
    "compile_model",
    "load_config",
    "load_model",
    "resolve_attention",
    "sample",
    "txt2img",
]
