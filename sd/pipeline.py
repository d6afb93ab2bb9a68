"""Text-to-image: the library form of the original `scripts/txt2img.py` (its main loop).

Per iteration: encode the prompts and the negative prompt (the original's uc = encoding of ""), draw x_T,
sample, decode with `StableDiffusion.decode_latents` and map to pixels as the original (255 * x truncated
to uint8); `write_images` writes them as `samples/%05d.png`. x_T comes from a CPU torch.Generator seeded with
`seed`,
the same generator also feeds the samplers' per-step noise: the stream is the one the original consumes
on a CPU run (seed_everything, then x_T and the per-step draws), and it does not depend on the device.
The original's invisible watermark is not applied.
"""

from __future__ import annotations

import os
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sd.errors import ConfigError, SDError
from sd.precision import autocast_context, precision_dtype
from sd.samplers import num_model_steps, resolve_sampler, sample

# Models already warned about random weights (the warning is said once per model, however many calls).
_WARNED_RANDOM: weakref.WeakSet = weakref.WeakSet()


class RandomWeightsWarning(UserWarning):
    """Images from a model with random (seeded) weights: noise, only good for timing."""


def _check_precision(model, precision: str) -> torch.device:
    weight = next(model.unet.parameters())
    wanted = precision_dtype(precision)
    if weight.dtype != wanted:
        have = str(weight.dtype).replace("torch.", "")
        raise ConfigError(
            f"precision {precision!r} needs a {str(wanted).replace('torch.', '')} model but this one is "
            f"{have}: "
            f"build it with sd.load_model(..., dtype=sd.precision_dtype({precision!r})) or pass the "
            "precision "
            "that matches the model."
        )
    return weight.device


def image_size(config, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width) in pixels: None means the config's default size; anything else must be a positive
    multiple of the model's factor (the VAE's downsampling times the UNet's), else SDError."""
    multiple = 2 ** (len(config.vae.ch_mult) - 1) * 2 ** (len(config.unet.channel_mult) - 1)
    sizes = {
        side: config.default_size if value is None else value
        for side, value in (("height", height), ("width", width))
    }
    for side, value in sizes.items():
        if value <= 0 or value % multiple:
            raise SDError(
                f"the image {side} must be a positive multiple of {multiple} for this model, got {value}: "
                f"pass e.g. {max(multiple, value // multiple * multiple)} (--H/--W), or leave it out for the "
                f"config's {config.default_size}."
            )
    return sizes["height"], sizes["width"]


def _warn_random_weights(model) -> None:
    if getattr(model, "checkpoint", None) is not None or model in _WARNED_RANDOM:
        return
    _WARNED_RANDOM.add(model)
    warnings.warn(
        "RANDOM WEIGHTS: this model was built without a checkpoint, so its images are noise. That is what "
        "timing runs want; for real images load a checkpoint (--ckpt / sd.load_model(..., ckpt=PATH)).",
        RandomWeightsWarning,
        stacklevel=3,
    )


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """decode_latents output (B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, truncating as the original."""
    return (255.0 * image.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8)


def image_grid(images: np.ndarray, nrow: int, padding: int = 2) -> np.ndarray:
    """torchvision.utils.make_grid's layout (nrow images per row, `padding` black pixels around each)."""
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    grid = np.zeros((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[top : top + h, left : left + w] = img
    return grid


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path)


@dataclass(frozen=True)
class Sampling:
    """How txt2img samples: the sampler and its steps, guidance, DDIM's eta and the seed."""

    sampler: str = "plms"  # sd.samplers.SAMPLERS, or "dpm" for dpmpp-2m
    steps: int = 50
    guidance_scale: float = 9.0  # classifier-free guidance; 1.0 switches it off
    negative_prompt: str = ""  # the unconditional prompt (the original's uc is the encoding of "")
    eta: float = 0.0  # DDIM only
    seed: int = 42


def txt2img(
    model,
    prompts: str | list[str],
    sampling: Sampling = Sampling(),
    *,
    height: int | None = None,
    width: int | None = None,
    n_iter: int = 1,
    precision: str = "fp32",
    progress: bool = True,
) -> np.ndarray:
    """Generate n_iter batches of len(prompts) images; returns uint8 (n_iter * B, H, W, 3).

    precision: "fp32" | "fp16" | "bf16" (the model must have that dtype, see `precision_dtype`) or
    "autocast" (a float32 model run under torch.autocast on its device, the original's default: fp16 on
    CUDA, bf16 on CPU). height/width: None means the config's size (512 base, 768 v, 384 tiny).
    progress: a tqdm bar over all sampler steps. Write the result with `write_images`.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise SDError("txt2img needs at least one prompt.")
    if n_iter < 1:
        raise SDError(f"n_iter must be at least 1 (got {n_iter}).")
    sampler = resolve_sampler(sampling.sampler)
    device = _check_precision(model, precision)
    height, width = image_size(model.config, height, width)
    _warn_random_weights(model)

    batch, factor = len(prompts), 2 ** (len(model.config.vae.ch_mult) - 1)
    shape = (batch, model.config.channels, height // factor, width // factor)
    generator = torch.Generator().manual_seed(sampling.seed)
    total = n_iter * num_model_steps(sampler, sampling.steps)
    bar = tqdm(total=total, desc=f"txt2img {sampler}", disable=not progress)
    results = []
    with bar, torch.no_grad(), autocast_context(precision, device):
        for _ in range(n_iter):
            guided = sampling.guidance_scale != 1.0
            uncond = model.encode_text(batch * [sampling.negative_prompt]) if guided else None
            cond = model.encode_text(prompts)
            x_T = torch.randn(shape, generator=generator).to(device)
            latents = sample(
                model,
                sampler,
                sampling.steps,
                cond,
                uncond,
                sampling.guidance_scale,
                x_T,
                eta=sampling.eta,
                generator=generator,
                callback=lambda _info: bar.update(1),
            )
            results.append(to_uint8(model.decode_latents(latents)))
    return np.concatenate(results)


def write_images(images: np.ndarray, outdir: str | Path, grid_nrow: int | None = None) -> list[Path]:
    """Write images as outdir/samples/%05d.png (continuing the numbering there) and, if grid_nrow is given,
    one outdir/grid-%04d.png. Returns the sample paths."""
    outdir = Path(outdir)
    samples = outdir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    base = len(os.listdir(samples))
    paths = []
    for i, image in enumerate(images):
        paths.append(samples / f"{base + i:05d}.png")
        _save_png(image, paths[-1])
    if grid_nrow is not None:
        count = len(list(outdir.glob("grid-*.png")))
        _save_png(image_grid(images, grid_nrow), outdir / f"grid-{count:04d}.png")
    return paths
