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

from .errors import SDError

DEFAULT_PROMPT = "a professional photograph of an astronaut riding a triceratops"  # the original's default


def _parser() -> argparse.ArgumentParser:
    from .attention import ATTENTION_BACKENDS
    from .compile import COMPILE_MODES
    from .config import PRESETS
    from .precision import PRECISIONS
    from .samplers import SAMPLERS

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
    t2i.add_argument("--channels-last", action="store_true", help="channels-last memory format")
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


def txt2img_command(args: argparse.Namespace) -> int:
    from .config import load_config
    from .pipeline import txt2img
    from .precision import precision_dtype
    from .weights import check_checkpoint_path

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Cheap checks first: a typo should not wait for the model build (or the open_clip import).
    config = load_config(args.preset or args.config)
    if args.ckpt is not None:
        check_checkpoint_path(args.ckpt)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SDError(
            f"--device {args.device}: CUDA is not available in this PyTorch/machine; use --device cpu."
        )

    from .compile import compile_model
    from .model import load_model

    model = load_model(
        config,
        args.ckpt,
        attention=args.attention,
        device=device,
        dtype=precision_dtype(args.precision),
        seed=args.seed,
        unsafe_pickle=args.unsafe_pickle,
        channels_last=args.channels_last,
    )
    if args.ckpt is not None and getattr(model, "checkpoint", None) is None:
        model.checkpoint = (
            args.ckpt
        )  # until load_model records it: the pipeline's random-weights check reads it
    if args.compile != "eager":
        compile_model(model, args.compile, vae=args.compile_vae)
    start = time.perf_counter()
    images = txt2img(
        model,
        args.n_samples * [args.prompt],
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        height=args.H,
        width=args.W,
        sampler=args.sampler,
        guidance_scale=args.scale,
        seed=args.seed,
        n_iter=args.n_iter,
        precision=args.precision,
        outdir=args.outdir,
        progress=not args.quiet,
        eta=args.eta,
        grid=args.grid,
    )
    elapsed = time.perf_counter() - start
    print(
        f"wrote {len(images)} image(s) {images.shape[2]}x{images.shape[1]} to {args.outdir}/samples "
        f"in {elapsed:.1f} s ({model.config.name}, attention {model.attention}, {args.precision}, "
        f"{args.sampler} x {args.steps} steps)",
        file=sys.stderr,
    )
    return 0


def attention_command(args: argparse.Namespace) -> int:
    from .attention import available_attention

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
