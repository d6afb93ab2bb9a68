"""How long a selection of cases takes on a GPU, before any GPU has run it: an estimate from per-call figures.

The figures are the README's ("GPUs", *Time of the CUDA gate grid*), made from per-call times published for
SD 1.5/2.1 on an A100 with a 2x fp16 factor for an H100: UNet step at guidance batch 2 (batch 1) 30 ms on
an A100, 18 ms on an H100, 3.5x that at batch 4; original attention 1.6x slower; 50-step txt2img 1.6 s /
1.0 s; UNet compile 75 s from an empty Inductor cache, 15 s warm; a model build 10 s. The README has no
figure for the VAE decode, the bare attention kernels or fp32; those below are upper bounds stated with
their reasoning, and matter little: a kernel call is far shorter than a timed round (MIN_ROUND_S), so a
kernel case costs its rounds, whatever the call.

What a case costs follows perf_tests.measure.timing.measure: the first call, one profiled call
(perf_tests.measure.kernels), the warm-up calls (one more when compiled), one block to size the rounds, then
the timed rounds of ``iterations`` calls each lasting at least ``min_round_s``; plus a canary measurement
before it, a model build when its model differs from the previous case's, a compile when compiled, and
the fp32 reference output once per (kind, batch). This module imports no torch: it runs anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from perf_tests.measure import cases as C

# CUDA's default shortest round (perf_tests.measure.timing.MIN_ROUND_S["cuda"]; that module imports torch).
CUDA_MIN_ROUND_S = 0.02


@dataclass(frozen=True)
class GpuFigures:
    """Per-call seconds (fp16, eager, SDPA, batch 1) and fixed costs of one GPU type."""

    name: str
    unet_step: float  # one UNet call at guidance batch 2 (README)
    txt2img_50: float  # 50-step txt2img, VAE included (README)
    vae_decode: float  # one 512x512 decode; not in the README: about half a 50-step run's non-UNet share
    attention: float  # one bare attention call (4096 tokens, 5 heads); not in the README: an upper bound
    compile_cold_s: float = 75.0  # the UNet (README)
    compile_warm_s: float = 15.0  # the UNet (README)
    # one attention call or the VAE decoder: graphs of one op or a few blocks; not in the README: the
    # UNet's figures scaled down to a few seconds cold, one warm, as upper bounds
    small_compile_cold_s: float = 5.0
    small_compile_warm_s: float = 1.0
    build_s: float = 10.0  # one model build with random weights (README)
    batch4_factor: float = 3.5  # README
    original_factor: float = 1.6  # original attention against SDPA (README)
    # fp32 reference calls against fp16: TF32 tensor cores at about half the fp16 rate, and twice the bytes;
    # not in the README: a factor of 4 as an upper bound
    fp32_factor: float = 4.0
    canary_s: float = 0.1  # one canary measurement: a block of small matmuls and convolutions
    startup_s: float = 20.0  # interpreter, torch import, CUDA context, collection, device probes


# txt2img at 50 steps is 50 UNet calls (51 with PLMS's first) plus text encoding and one VAE decode:
# 1.0 s - 51 x 18 ms leaves about 80 ms on an H100; half of it is taken as the decode, an upper bound
# against the 1.2 TFLOP of the SD VAE decoder at 512x512.
FIGURES: Mapping[str, GpuFigures] = {
    "H100": GpuFigures("H100", unet_step=0.018, txt2img_50=1.0, vae_decode=0.04, attention=0.002),
    "A100": GpuFigures("A100", unet_step=0.030, txt2img_50=1.6, vae_decode=0.07, attention=0.003),
}


def call_s(case: C.Case, gpu: GpuFigures) -> float:
    """One call of ``case`` on ``gpu``, seconds."""
    if case.kind == "txt2img":
        base = gpu.txt2img_50 * (case.steps or C.PROFILES[case.profile].steps) / 50
    elif case.kind == "unet-step":
        base = gpu.unet_step
    elif case.kind == "vae-decode":
        base = gpu.vae_decode
    elif case.kind in C.ATTENTION_SHAPES:
        base = gpu.attention
    else:  # text-encode: the text encoder is a 24-layer transformer on 77 tokens, a fraction of a UNet step
        base = gpu.unet_step / 2
    if case.batch_size > 1:
        base *= 1 + (gpu.batch4_factor - 1) * (case.batch_size - 1) / 3
    if case.attention == "original":
        base *= gpu.original_factor
    if case.precision == "fp32":
        base *= gpu.fp32_factor
    return base


def case_s(case: C.Case, rounds: int, warmup_rounds: int, gpu: GpuFigures, min_round_s: float) -> float:
    """The calls of one case as perf_tests.measure.timing.measure makes them (no build, no compile)."""
    one = call_s(case, gpu)
    iterations = max(1, math.ceil(min_round_s / one))
    untimed = 1 + 1 + (max(warmup_rounds, 1) - 1) + (1 if case.compiled else 0)  # first, profiled, warm-up
    return one * (untimed + iterations + rounds * iterations)


def selection_s(
    selection: Iterable[C.Case],
    grid: C.GridDefaults,
    gpu: str = "H100",
    cache: str = "cold",
    min_round_s: float = CUDA_MIN_ROUND_S,
) -> float:
    """Seconds for the selection run in suite order (perf_tests.measure.cases.run_order) in one process."""
    if cache not in ("cold", "warm"):
        raise ValueError(f"unknown Inductor cache state {cache!r}; choose cold or warm")
    fig = FIGURES[gpu]
    total, model, references = fig.startup_s, None, set()
    reference_built = False  # the fp32 reference model is built once and kept (perf_tests.measure.workloads)
    for case in sorted(selection, key=C.run_order):
        total += fig.canary_s
        if case.kind not in C.ATTENTION_SHAPES and case.model_key() != model:
            total += fig.build_s
            model = case.model_key()
        if case.optimized and (case.kind, case.batch_size) not in references:
            references.add((case.kind, case.batch_size))
            total += call_s(case.reference(), fig)
            if case.kind not in C.ATTENTION_SHAPES and not reference_built:
                total += fig.build_s
                reference_built = True
        # each compiled case compiles afresh (perf_tests.measure.timing.compile_cache_state)
        if case.compiled:
            unet = case.kind in ("txt2img", "unet-step")
            cold, warm = (
                (fig.compile_cold_s, fig.compile_warm_s)
                if unet
                else (fig.small_compile_cold_s, fig.small_compile_warm_s)
            )
            total += cold if cache == "cold" else warm
        total += case_s(case, grid.rounds[case.kind], grid.warmup_rounds[case.kind], fig, min_round_s)
    return total


def grid_cases(grid: C.GridDefaults) -> list[C.Case]:
    """Every case of the grid, in run order (skips are not known without the device: all are counted)."""
    return sorted((c for kind in grid.kinds for c in grid.cases(kind)), key=C.run_order)


def main(argv: list[str] | None = None) -> int:
    """``python -m perf_tests.measure.estimate GRID [--cache cold|warm]``: the CUDA grid's estimated
    minutes."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m perf_tests.measure.estimate", description=main.__doc__)
    parser.add_argument("grid", choices=C.GRID_NAMES)
    parser.add_argument("--cache", choices=("cold", "warm"), default="cold")
    opts = parser.parse_args(argv)
    g = C.grid(opts.grid, "cuda")
    cases = grid_cases(g)
    minutes = ", ".join(f"{gpu} {selection_s(cases, g, gpu, opts.cache) / 60:.1f} min" for gpu in FIGURES)
    print(
        f"{opts.grid} grid, {len(cases)} cases, Inductor cache {opts.cache}: estimated {minutes} "
        "(perf_tests.measure.estimate, from the README's per-call figures)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
