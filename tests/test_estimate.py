"""The time estimate of a GPU run (perf_tests.measure.estimate) and the first-run selection of gpu-check."""

from __future__ import annotations

import pytest

from perf_tests.measure import cases as C
from perf_tests.measure import estimate as E
from perf_tests.measure.cases import ATTENTION_BACKENDS

FIRST_RUN_LIMIT_S = 8 * 60  # gpu-check's first run has about 10 minutes; 2 are left for a slow machine


def test_first_run_selection_covers_every_kernel_eager_then_one_compiled_unet_step():
    g = C.grid("first-run", "cuda")
    cases = E.grid_cases(g)
    compiled = [c for c in cases if c.compiled]
    assert [str(c) for c in compiled] == ["sd21-base-sdpa-compile-bs1-fp16"]
    assert compiled[0].kind == "unet-step" and cases[-1] == compiled[0]  # the one compile comes last
    for kind in ("unet-step", "vae-decode", *C.KIND_FAMILIES["attention"]):
        assert {c.attention for c in cases if c.kind == kind and not c.compiled} == set(ATTENTION_BACKENDS)
    kernel_cases = [c.kind in C.ATTENTION_SHAPES for c in cases]
    assert kernel_cases == sorted(kernel_cases, reverse=True)  # the kernels first, then the models
    assert {(c.precision, c.batch_size, c.profile) for c in cases} == {("fp16", 1, "sd21-base")}
    assert [c.attention for c in cases if c.kind == "txt2img"] == ["sdpa"]


def test_first_run_estimate_fits_eight_minutes_on_an_h100_and_an_a100_from_an_empty_cache():
    g = C.grid("first-run", "cuda")
    for gpu in ("H100", "A100"):
        assert E.selection_s(E.grid_cases(g), g, gpu, "cold") <= FIRST_RUN_LIMIT_S - 60, gpu  # + the install


def test_the_gate_grid_estimate_agrees_with_the_readme_figures():
    """The README's estimates of the CUDA gate grid (made by hand from the same per-call figures): H100
    about 8.5-9 min warm and 23 cold, A100 about 10-11 and 25. The model here must land within 20%."""
    g = C.grid("gate", "cuda")
    readme = {("H100", "warm"): 8.75, ("H100", "cold"): 23, ("A100", "warm"): 10.5, ("A100", "cold"): 25}
    for (gpu, cache), minutes in readme.items():
        assert E.selection_s(E.grid_cases(g), g, gpu, cache) / 60 == pytest.approx(minutes, rel=0.2), (
            gpu,
            cache,
        )


def test_case_cost_follows_the_timing_protocol():
    fig = E.FIGURES["H100"]
    p = C.PROFILES["sd21-base"]
    unet = C.Case("unet-step", "sd21-base", "sdpa", "eager", 1, "fp16", height=p.height, width=p.width)
    # 18 ms a call: a 20 ms round holds 2 calls; first + profiled + 2 warm-up + sizing block + 10 rounds
    assert E.case_s(unet, rounds=10, warmup_rounds=3, gpu=fig, min_round_s=0.02) == pytest.approx(
        0.018 * (1 + 1 + 2 + 2 + 10 * 2)
    )
    assert E.call_s(C.Case("unet-step", "sd21-base", "original", "eager", 4, "fp16"), fig) == pytest.approx(
        0.018 * 3.5 * 1.6
    )
    steps20 = C.Case("txt2img", "sd21-base", "sdpa", "eager", 1, "fp16", steps=20)
    assert E.call_s(steps20, fig) == pytest.approx(0.4)


def test_cold_costs_more_than_warm_by_the_compiles_alone():
    g = C.grid("first-run", "cuda")
    cases = E.grid_cases(g)
    fig = E.FIGURES["H100"]
    difference = E.selection_s(cases, g, "H100", "cold") - E.selection_s(cases, g, "H100", "warm")
    assert difference == pytest.approx(fig.compile_cold_s - fig.compile_warm_s)
    with pytest.raises(ValueError, match="cold or warm"):
        E.selection_s(cases, g, "H100", "hot")


def test_first_run_grid_on_a_cpu_is_the_same_selection_on_the_tiny_profile():
    cpu, cuda = C.grid("first-run", "cpu"), C.grid("first-run", "cuda")
    assert (cpu.profile, cpu.precisions, cpu.threads) == ("tiny", ("fp32",), 1)
    strip = [(c.kind, c.attention, c.compile) for c in E.grid_cases(cuda)]
    assert [(c.kind, c.attention, c.compile) for c in E.grid_cases(cpu)] == strip
