"""Text-to-image: the library form of the original `scripts/txt2img.py` (sd21-facts 8).

Per iteration: encode the prompts and the negative prompt (the original's uc = encoding of ""), draw x_T,
sample, decode z / scale_factor with the VAE, map to pixels as the original (clamp((x + 1) / 2) * 255,
truncated to uint8) and write `samples/%05d.png`. x_T comes from a CPU torch.Generator seeded with `seed`,
the same generator also feeds the samplers' per-step noise: the stream is the one the original consumes
on a CPU run (seed_everything, then x_T and the per-step draws), and it does not depend on the device.
The original's invisible watermark is not applied.
"""

from __future__ import annotations

import os
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, SDError
from .precision import autocast_context, precision_dtype
from .samplers import num_model_steps, resolve_sampler, sample

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
            f"precision {precision!r} needs a {str(wanted).replace('torch.', '')} model but this one is {have}: "
            f"build it with sd.load_model(..., dtype=sd.precision.precision_dtype({precision!r})) or pass the precision "
            "that matches the model."
        )
    return weight.device


def _image_multiple(model) -> int:
    """Image sides must divide by this: the VAE's downsampling times the UNet's."""
    config = model.config
    return 2 ** (len(config.vae.ch_mult) - 1) * 2 ** (len(config.unet.channel_mult) - 1)


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


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """VAE output (B, 3, H, W) in about [-1, 1] -> (B, H, W, 3) uint8, truncating as the original."""
    x = torch.clamp((x.float() + 1.0) / 2.0, min=0.0, max=1.0)
    return (255.0 * x.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8)


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
    from PIL import Image

    Image.fromarray(array).save(path)


def txt2img(
    model,
    prompts: str | list[str],
    *,
    negative_prompt: str = "",
    steps: int = 50,
    height: int | None = None,
    width: int | None = None,
    sampler: str = "plms",
    guidance_scale: float = 9.0,
    seed: int = 42,
    n_iter: int = 1,
    precision: str = "fp32",
    outdir: str | Path | None = None,
    progress: bool = True,
    eta: float = 0.0,
    grid: bool = False,
) -> np.ndarray:
    """Generate n_iter batches of len(prompts) images; returns uint8 (n_iter * B, H, W, 3).

    precision: "fp32" | "fp16" | "bf16" (the model must have that dtype, see `precision_dtype`) or
    "autocast" (a float32 model run under torch.autocast on its device, the original's default: fp16 on
    CUDA, bf16 on CPU). height/width default to the config's size (512 base, 768 v, 384 tiny). outdir:
    PNGs go to outdir/samples/NNNNN.png, numbered after those already there, and with grid=True a
    grid-NNNN.png per call (one row per iteration). progress: a tqdm bar over all sampler steps.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise SDError("txt2img needs at least one prompt.")
    if n_iter < 1:
        raise SDError(f"n_iter must be at least 1 (got {n_iter}).")
    sampler = resolve_sampler(sampler)
    device = _check_precision(model, precision)
    height = height or model.config.default_size
    width = width or model.config.default_size
    multiple = _image_multiple(model)
    if height % multiple or width % multiple:
        raise SDError(
            f"height and width must be multiples of {multiple} for this model (got {height}x{width})."
        )
    _warn_random_weights(model)

    batch = len(prompts)
    factor = 2 ** (len(model.config.vae.ch_mult) - 1)
    shape = (batch, model.config.channels, height // factor, width // factor)
    generator = torch.Generator().manual_seed(seed)
    autocast = autocast_context(precision, device)
    vae_dtype = next(model.vae.parameters()).dtype

    from tqdm import tqdm

    bar = tqdm(
        total=n_iter * num_model_steps(sampler, steps), desc=f"txt2img {sampler}", disable=not progress
    )
    results = []
    with bar, torch.no_grad(), autocast:
        for _ in range(n_iter):
            uncond = model.encode_text(batch * [negative_prompt]) if guidance_scale != 1.0 else None
            cond = model.encode_text(prompts)
            x_T = torch.randn(shape, generator=generator).to(device)
            latents = sample(
                model,
                sampler,
                steps,
                cond,
                uncond,
                guidance_scale,
                x_T,
                eta=eta,
                generator=generator,
                callback=lambda _info: bar.update(1),
            )
            decoded = model.vae.decode((latents / model.scale_factor).to(vae_dtype))
            results.append(to_uint8(decoded))
    images = np.concatenate(results)
    if outdir is not None:
        write_images(images, outdir, grid_nrow=batch if grid else None)
    return images


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
