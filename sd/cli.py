"""Command line: `python -m sd txt2img ...` (the original scripts/txt2img.py) and `python -m sd attention`.

Any SDError (bad config, checkpoint, attention backend, compile mode, ...) is printed as
`error: <one paragraph>` on stderr with exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Sequence

import torch

from sd.attention import ATTENTION_BACKENDS, available_attention
from sd.compile import COMPILE_MODES, compile_model
from sd.config import PRESETS, load_config
from sd.errors import SDError
from sd.pipeline import Sampling, image_size, txt2img, write_images
from sd.precision import PRECISIONS, precision_dtype
from sd.samplers import SAMPLERS
from sd.weights import check_checkpoint_path

DEFAULT_PROMPT = "a professional photograph of an astronaut riding a triceratops"  # the original's default


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sd", description="Stable Diffusion 2.1 (sd-perf).")
    commands = parser.add_subparsers(dest="command", required=True)

    t2i = commands.add_parser("txt2img", help="text to image, as the original scripts/txt2img.py")
    model = t2i.add_mutually_exclusive_group(required=True)
    model.add_argument("--preset", choices=PRESETS, help="a packaged config")
    model.add_argument("--config", help="path to an original LDM YAML (e.g. v2-inference-v.yaml)")
    t2i.add_argument("--ckpt", help=".safetensors or .ckpt; without it the weights are random (seeded)")
    t2i.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="allow reading a .ckpt pickle without weights_only (runs code from the file)",
    )
    t2i.add_argument("--prompt", default=DEFAULT_PROMPT)
    t2i.add_argument("--negative-prompt", default="", help='the unconditional prompt (the original uses "")')
    t2i.add_argument("--steps", type=int, default=50)
    t2i.add_argument("--H", type=int, default=None, help="image height (default: the config's size)")
    t2i.add_argument("--W", type=int, default=None, help="image width (default: the config's size)")
    t2i.add_argument("--n-samples", type=int, default=1, help="batch size (the original's default is 3)")
    t2i.add_argument(
        "--n-iter", type=int, default=1, help="batches in sequence (the original's default is 3)"
    )
    t2i.add_argument("--sampler", choices=[*SAMPLERS, "dpm"], default="plms")
    t2i.add_argument("--eta", type=float, default=0.0, help="DDIM eta (ddim sampler only)")
    t2i.add_argument("--scale", type=float, default=9.0, help="classifier-free guidance scale")
    t2i.add_argument("--seed", type=int, default=42)
    t2i.add_argument("--attention", choices=ATTENTION_BACKENDS, default="original")
    t2i.add_argument(
        "--compile",
        nargs="?",
        const="compile",
        choices=COMPILE_MODES,
        default="eager",
        help="torch.compile the UNet in this mode ('compile' when given alone; default: eager)",
    )
    t2i.add_argument(
        "--compile-vae", action="store_true", help="with --compile, also compile the VAE decoder"
    )
    t2i.add_argument("--channels-last", action="store_true", help="channels-last memory format (UNet, VAE)")
    t2i.add_argument(
        "--fuse-projections",
        action="store_true",
        help="one matmul for each attention's Q, K, V (self) or K, V (cross); checkpoint keys unchanged",
    )
    t2i.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="autocast = float32 weights under torch.autocast (the original's default)",
    )
    t2i.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    t2i.add_argument("--outdir", default="outputs/txt2img-samples")
    t2i.add_argument("--grid", action="store_true", help="also write a grid-NNNN.png")
    t2i.add_argument("--quiet", action="store_true", help="no progress bar")

    att = commands.add_parser("attention", help="list the attention backends and whether they run here")
    att.add_argument("--device", default="cpu")
    return parser


def _check_counts(args: argparse.Namespace) -> None:
    """Counts must be positive: 0 never means "the default" (leave the option out for that)."""
    for flag, value, meaning in (
        ("--steps", args.steps, "sampler steps"),
        ("--n-samples", args.n_samples, "images per batch"),
        ("--n-iter", args.n_iter, "batches"),
    ):
        if value < 1:
            raise SDError(
                f"{flag} {value}: the number of {meaning} must be at least 1; pass a positive {flag}."
            )


def txt2img_command(args: argparse.Namespace) -> int:
    # Cheap checks first: a typo should not wait for the model build (or the open_clip import).
    config = load_config(args.preset or args.config)
    _check_counts(args)
    height, width = image_size(config, args.H, args.W)
    if args.ckpt is not None:
        check_checkpoint_path(args.ckpt)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SDError(
            f"--device {args.device}: CUDA is not available in this PyTorch/machine; use --device cpu."
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from sd.model import load_model  # imports open_clip (seconds): only once the arguments are checked

    model = load_model(
        config,
        args.ckpt,
        attention=args.attention,
        device=device,
        dtype=precision_dtype(args.precision),
        seed=args.seed,
        unsafe_pickle=args.unsafe_pickle,
        channels_last=args.channels_last,
        fuse_projections=args.fuse_projections,
    )
    if args.compile != "eager":
        compile_model(model, args.compile, vae=args.compile_vae)
    sampling = Sampling(
        sampler=args.sampler,
        steps=args.steps,
        guidance_scale=args.scale,
        negative_prompt=args.negative_prompt,
        eta=args.eta,
        seed=args.seed,
    )
    start = time.perf_counter()
    images = txt2img(
        model,
        args.n_samples * [args.prompt],
        sampling,
        height=height,
        width=width,
        n_iter=args.n_iter,
        precision=args.precision,
        progress=not args.quiet,
    )
    elapsed = time.perf_counter() - start
    write_images(images, args.outdir, grid_nrow=args.n_samples if args.grid else None)
    print(
        f"wrote {len(images)} image(s) {width}x{height} to {args.outdir}/samples "
        f"in {elapsed:.1f} s ({model.config.name}, attention {model.attention}, VAE attention "
        f"{model.vae_attention}, {args.precision}, {args.sampler} x {args.steps} steps)",
        file=sys.stderr,
    )
    return 0


def attention_command(args: argparse.Namespace) -> int:
    for name, reason in available_attention(args.device).items():
        print(f"{name:20s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"  # for people at a terminal: no source line


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    formatwarning, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        return {"txt2img": txt2img_command, "attention": attention_command}[args.command](args)
    except SDError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning
