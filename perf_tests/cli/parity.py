"""``python -m perf_tests parity``: our UNet forward against diffusers', rung by rung, interleaved."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("parity",
                       help="our UNet forward against diffusers' UNet2DConditionModel, rung by rung",
                       description="Our UNet forward against diffusers' UNet2DConditionModel, rung by rung, "
                                   "interleaved.")
    p.add_argument("--preset", default="tiny", choices=("tiny", "sd21-base"))
    p.add_argument("--batch-size", type=int, default=2, help="latents per UNet call (default 2)")
    p.add_argument("--rounds", type=int, default=20, help="interleaved timed calls per side (default 20)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per side first (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rungs", default=None,
                   help="comma-separated rung ids or patterns, e.g. 'eager-*' (default: all)")
    p.add_argument("--format", default="text", choices=("text", "markdown", "json"))
    p.add_argument("--output", type=Path, default=None, help="also write the report to this file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from perf_tests.tools import parity

    torch.set_num_threads(args.threads)
    report = parity.run_parity(
        args.preset,
        batch_size=args.batch_size,
        rounds=args.rounds,
        warmup=args.warmup,
        device=args.device,
        rungs=args.rungs.split(",") if args.rungs else None,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    text = parity.format_report(report, args.format)
    sys.stdout.write(text)
    if args.output is not None:
        args.output.write_text(text)
    return report.exit_code
