"""perf_tests.measure.cases: case ids and names, grid defaults, skip reasons, definition hash, option
parsing."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest

from perf_tests.measure import cases as C
from perf_tests.measure.suite import OptionError, Options
from sd.device import DeviceCapabilities

ALL_AVAILABLE = dict.fromkeys(C.ATTENTION_BACKENDS)
CPU_TORCH2 = DeviceCapabilities(
    device_type="cpu",
    attention={**ALL_AVAILABLE, "sdpa-mem-efficient": "a test call on cpu failed (no kernel)",
               "sdpa-cudnn": "a test call on cpu failed (no kernel)",
               "xformers": "xformers is not importable"},
    has_compile=True,
    torch_version="2.14.1",
)
CPU_TORCH1 = DeviceCapabilities(
    device_type="cpu",
    attention={**dict.fromkeys(C.ATTENTION_BACKENDS, "this PyTorch has no F.scaled_dot_product_attention"),
               "original": None},
    has_compile=False,
    torch_version="1.12.1",
)
CUDA = DeviceCapabilities(device_type="cuda", attention=ALL_AVAILABLE, has_compile=True,
                          torch_version="2.5.0",
                      cuda_capability=(8, 0))


def case(**kw) -> C.Case:
    base = dict(kind="txt2img", profile="tiny", attention="sdpa-math", compile="eager", batch_size=1,
                precision="fp32", steps=8, height=384, width=384)
    return C.Case(**{**base, **kw})


def test_case_id_and_benchmark_name():
    c = case(profile="sd21-base", attention="sdpa-mem-efficient", compile="compile", precision="fp16")
    assert str(c) == "sd21-base-sdpa-mem-efficient-compile-bs1-fp16"
    assert c.name == "test_txt2img[sd21-base-sdpa-mem-efficient-compile-bs1-fp16]"
    assert case(kind="unet-step").name == "test_unet_step[tiny-sdpa-math-eager-bs1-fp32]"
    assert case(kind="attention-cross-77").test_name == "test_attention_cross_77"


@pytest.mark.parametrize("profile", list(C.PROFILES))
def test_parse_name_inverts_every_grid_point(profile):
    for kind, a, comp, prec in itertools.product(C.KINDS, C.ATTENTION_BACKENDS, C.COMPILE_MODES,
                                                 C.PRECISIONS):
        c = C.Case(kind, profile, a, comp, 4, prec)
        assert C.parse_name(c.name) == c


def test_parse_name_rejects_foreign_names():
    with pytest.raises(ValueError):
        C.parse_name("test_something_else")
    with pytest.raises(ValueError):
        C.parse_name("test_txt2img[tiny-original-bs1]")


def test_compile_modes_have_one_spelling():
    assert C.check_compile(["eager", "compile", "compile", "compile-max-autotune"]) == (
        "eager", "compile", "compile-max-autotune")
    for other in ("fast", "default", "off", "max-autotune"):  # torch's names and old aliases are refused
        with pytest.raises(ValueError, match="unknown compile mode"):
            C.check_compile([other])
    assert case(compile="compile-max-autotune").compiled and not case(compile="eager").compiled


def test_kind_family_and_unknown_kind():
    assert C.normalize_kinds(["attention"]) == ("attention-self-4096", "attention-self-1024",
                                                "attention-cross-77")
    assert C.normalize_kinds(["unet_step", "txt2img", "unet-step"]) == ("unet-step", "txt2img")
    with pytest.raises(ValueError, match="unknown case kind"):
        C.normalize_kinds(["decode"])


def test_full_grid_cpu_covers_every_backend():
    g = C.grid("full", "cpu")
    assert g.name == "full" and g.profile == "tiny"
    assert g.attention == C.ATTENTION_BACKENDS  # unavailable ones are skipped with a reason, not dropped
    assert g.compile == ("eager", "compile")
    assert g.batch_sizes == (1, 2)
    assert g.precisions == ("fp32",)
    assert set(g.kinds) == set(C.KINDS)
    assert all(g.rounds[k] >= 5 for k in C.KINDS)
    assert all(g.warmup_rounds[k] >= 1 for k in C.KINDS)


def test_full_grid_cuda_is_every_combination():
    g = C.grid("full", "cuda")
    assert g.profile == "sd21-base"
    assert g.batch_sizes == (1, 2, 4)
    assert set(g.precisions) == {"autocast", "fp16"}
    assert g.compile == C.COMPILE_MODES
    assert g.attention == C.ATTENTION_BACKENDS


def _ids(g, kind):
    return [str(c) for c in g.cases(kind)]


def test_cuda_gate_grid():
    g = C.grid("gate", "cuda")
    assert g.name == "gate" and g.profile == "sd21-base" and g.precisions == ("fp16",)
    assert set(g.kinds) == {"txt2img", "unet-step", *C.KIND_FAMILIES["attention"]}
    backends = ("original", "sdpa", "sdpa-flash", "sdpa-mem-efficient", "xformers")
    for kind in ("unet-step", *C.KIND_FAMILIES["attention"]):
        got = {(c.attention, c.compile, c.batch_size) for c in g.cases(kind)}
        assert got == {(a, m, b) for a in backends for m in ("eager", "compile") for b in (1, 4)}
    assert {(c.attention, c.compile, c.batch_size) for c in g.cases("txt2img")} == {
        (a, m, 1) for a in backends for m in ("eager", "compile")}
    assert g.cases("txt2img")[0].steps == 50
    assert g.cases("vae-decode") == [] and g.cases("text-encode") == []


def test_cpu_gate_grid_is_focused():
    g = C.grid("gate", "cpu")
    assert g.name == "gate" and g.profile == "tiny" and g.threads == 1
    assert _ids(g, "unet-step") == ["tiny-original-eager-bs1-fp32", "tiny-sdpa-eager-bs1-fp32",
                                    "tiny-sdpa-compile-bs1-fp32"]
    assert _ids(g, "txt2img") == []
    assert _ids(g, "vae-decode") == ["tiny-original-eager-bs1-fp32"]
    assert _ids(g, "text-encode") == ["tiny-original-eager-bs1-fp32"]
    assert {c.attention for c in g.cases("attention-self-1024")} == set(C.ATTENTION_BACKENDS)
    assert {c.compile for c in g.cases("attention-self-1024")} == {"eager"}
    assert g.cases("attention-self-4096") == []


def test_grid_names_and_json_form():
    with pytest.raises(ValueError, match="unknown grid"):
        C.grid("nightly", "cpu")
    d = C.grid("gate", "cpu").as_dict()
    assert d["name"] == "gate" and d["kind_points"]["unet-step"] == [
        ["original", "eager"], ["sdpa", "eager"], ["sdpa", "compile"]]
    json.dumps(d)


def test_build_cases_filters_nothing():
    got = C.build_cases("txt2img", "tiny", C.ATTENTION_BACKENDS, ("eager", "compile"), (1, 2), ("fp32",),
                        steps=3)
    assert len(got) == len(C.ATTENTION_BACKENDS) * 2 * 2
    assert len({str(c) for c in got}) == len(got)
    assert {c.steps for c in got} == {3}
    assert C.build_cases("unet-step", "tiny", ["original"], ["eager"], [1], ["fp32"])[0].steps is None


def test_skip_reasons_cpu_torch2():
    assert C.skip_reason(case(attention="sdpa-math", compile="compile"), CPU_TORCH2) is None
    assert C.skip_reason(case(attention="original", batch_size=2), CPU_TORCH2) is None
    r = C.skip_reason(case(attention="xformers"), CPU_TORCH2)
    assert "xformers" in r and "not importable" in r
    assert "CUDA" in C.skip_reason(case(precision="fp16"), CPU_TORCH2)
    assert "CUDA" in C.skip_reason(case(precision="autocast"), CPU_TORCH2)
    assert "CUDA graphs" in C.skip_reason(case(compile="compile-reduce-overhead"), CPU_TORCH2)
    assert C.skip_reason(case(precision="bf16"), CPU_TORCH2) is None


def test_skip_reasons_torch1_compile_and_sdpa():
    r = C.skip_reason(case(attention="original", compile="compile"), CPU_TORCH1)
    assert "torch.compile is not available in PyTorch 1.12.1" in r
    assert "scaled_dot_product_attention" in C.skip_reason(case(attention="sdpa"), CPU_TORCH1)
    assert C.skip_reason(case(attention="original"), CPU_TORCH1) is None


def test_skip_reasons_cuda():
    assert C.skip_reason(case(compile="compile-reduce-overhead", precision="fp16"), CUDA) is None
    old_gpu = dataclasses.replace(CUDA, cuda_capability=(6, 0))
    assert "7.0" in C.skip_reason(case(compile="compile"), old_gpu)
    assert "bf16" in C.skip_reason(case(precision="bf16"), dataclasses.replace(CUDA, bf16=False))


def test_backend_free_kind_is_measured_once():
    assert C.skip_reason(case(kind="text-encode", attention="original"), CPU_TORCH2) is None
    r = C.skip_reason(case(kind="text-encode", attention="sdpa"), CPU_TORCH2)
    assert "measured once as tiny-original-eager-bs1-fp32" in r
    assert C.skip_reason(case(kind="text-encode", attention="original", compile="compile"), CPU_TORCH2)


def test_every_full_cpu_case_runs_or_has_a_reason():
    g = C.grid("full", "cpu")
    runnable = set()
    for kind in g.kinds:
        for c in C.build_cases(kind, g.profile, g.attention, g.compile, g.batch_sizes, g.precisions):
            reason = C.skip_reason(c, CPU_TORCH2)
            assert reason is None or len(reason) > 20
            if reason is None and kind == "unet-step":
                runnable.add((c.attention, c.compile, c.batch_size))
    # every available backend x compile off/default x batch 1 and 2
    expected = {(a, comp, b) for a in ("original", "sdpa", "sdpa-math", "sdpa-flash")
                for comp in ("eager", "compile") for b in (1, 2)}
    assert runnable == expected


def test_reference_and_optimized():
    assert not case(attention="original").optimized
    assert case(attention="original", compile="compile").optimized
    assert case(attention="original", precision="bf16").optimized
    ref = case(attention="sdpa", compile="compile", precision="bf16").reference()
    assert (ref.attention, ref.compile, ref.precision) == ("original", "eager", "fp32")


def test_definition_hash_is_stable_and_specific():
    c = case()
    h = C.definition_hash(c)
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == C.definition_hash(case())  # equal definitions, equal hash (no object ids, no dict order)
    # Golden value: if this changes, baselines stop matching. Bump HARNESS_VERSION on purpose, then update.
    assert h == GOLDEN_HASH
    assert C.definition_hash(case(steps=9)) != h
    assert C.definition_hash(case(kind="unet-step", steps=None)) != h
    assert C.definition_hash(case(attention="sdpa")) != h
    assert C.definition_hash(c, weights="checkpoint") != h


GOLDEN_HASH = "9ac59f0e4a3a0819"  # HARNESS_VERSION 2


def test_tolerances_order_by_precision():
    for kind in ("txt2img", "unet-step", "attention-self-4096"):
        fp32, fp16, bf16 = (C.tolerance(case(kind=kind, precision=p)) for p in ("fp32", "fp16", "bf16"))
        assert fp32 < fp16 <= bf16


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_run_order_eager_first_kernels_first_then_models_grouped(device):
    g = C.grid("full", device)
    all_cases = [c for k in g.kinds
                 for c in C.build_cases(k, g.profile, g.attention, g.compile, g.batch_sizes, g.precisions)]
    ordered = sorted(all_cases, key=C.run_order)
    compiled = [c.compiled for c in ordered]
    assert compiled == sorted(compiled) and any(compiled)  # every eager case before every compiled one
    for part in (c for c in ordered if not c.compiled), (c for c in ordered if c.compiled):
        part = list(part)
        model_case = [c.kind not in C.ATTENTION_SHAPES for c in part]
        assert model_case == sorted(model_case)  # the kernel cases of the part before its model cases
    eager_models = [c for c in ordered if not c.compiled and c.kind not in C.ATTENTION_SHAPES]
    if device == "cpu":  # the CPU full grid has the reference (fp32) among its cases
        assert not eager_models[0].optimized and eager_models[0].kind == "txt2img"
    keys = [c.model_key() for c in ordered if c.kind not in C.ATTENTION_SHAPES]
    blocks = [k for k, _ in itertools.groupby(keys)]
    assert len(blocks) == len(set(keys))  # each model key forms one contiguous block: built once


@pytest.mark.parametrize("name", ["full", "gate"])
def test_every_cuda_grid_case_runs_or_skips_naming_the_unet_kernel(name):
    """The VAE's 512-wide head never decides a case: sd picks the VAE's kernel itself, so a skip
    reason only ever names the kernel the case asked for, the UNet's."""
    g = C.grid(name, "cuda")
    no_flash = dataclasses.replace(CUDA, attention={**ALL_AVAILABLE, "xformers": "xformers is not importable",
                                                    "sdpa-cudnn": "a test call on cuda failed (no kernel)"})
    for kind in g.kinds:
        for c in g.cases(kind):
            reason = C.skip_reason(c, no_flash)
            if c.kind in C.BACKEND_FREE_KINDS and (c.attention, c.compile) != ("original", "eager"):
                continue
            if c.attention in ("xformers", "sdpa-cudnn"):
                assert f"{c.attention!r}" in reason and "VAE" not in reason
            elif not (c.precision == "bf16"):
                assert reason is None, (c, reason)


def test_memory_format_and_projections_axes_keep_old_ids():
    c = case(kind="unet-step", attention="sdpa", compile="compile")
    assert str(c) == "tiny-sdpa-compile-bs1-fp32"  # the defaults add nothing: old ids and baselines hold
    both = dataclasses.replace(c, memory_format="channels-last", projections="fused")
    assert str(both) == "tiny-sdpa-compile-bs1-fp32-channels-last-fused"
    assert str(dataclasses.replace(c, projections="fused")) == "tiny-sdpa-compile-bs1-fp32-fused"
    for x in (c, both, dataclasses.replace(c, projections="fused"),
              dataclasses.replace(c, memory_format="channels-last")):
        assert C.parse_name(x.name) == dataclasses.replace(x, steps=None, height=None, width=None)
    assert both.optimized and both.reference() == dataclasses.replace(c, attention="original",
                                                                      compile="eager")
    assert dataclasses.replace(case(attention="original"), memory_format="channels-last").optimized
    assert both.model_key() != c.model_key()
    assert C.definition_hash(both) != C.definition_hash(c)


def test_memory_format_and_projections_skip_where_they_do_not_apply():
    fused = dict(memory_format="channels-last", projections="fused")
    r = C.skip_reason(case(kind="attention-self-1024", **fused), CPU_TORCH2)
    assert "measured as tiny-sdpa-math-eager-bs1-fp32" in r
    assert "measured once as" in C.skip_reason(case(kind="text-encode", attention="original", **fused),
                                               CPU_TORCH2)
    assert C.skip_reason(case(kind="unet-step", **fused), CPU_TORCH2) is None
    got = C.build_cases("unet-step", "tiny", ["sdpa"], ["eager"], [1], ["fp32"], None, C.MEMORY_FORMATS,
                        C.PROJECTIONS)
    assert [str(x) for x in got] == ["tiny-sdpa-eager-bs1-fp32", "tiny-sdpa-eager-bs1-fp32-fused",
                                     "tiny-sdpa-eager-bs1-fp32-channels-last",
                                     "tiny-sdpa-eager-bs1-fp32-channels-last-fused"]


def _getter(**given):
    return lambda name: given.get(name)


def test_options_defaults_and_overrides(monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    o = Options.parse(_getter(), cuda_available=False)
    assert o.device == "cpu" and o.grid.profile == "tiny" and o.grid.name == "gate"
    assert o.canary and o.inductor_cache == "warm" and o.min_round_s is None
    assert o.inductor_cache_dir.endswith("sd-perf/inductor")
    o = Options.parse(_getter(perf_grid="full", perf_attention="original,sdpa",
                              perf_compile="eager,compile-max-autotune",
                              perf_batch_size="4", perf_case_kind="attention,txt2img", perf_steps="3",
                              perf_min_round_ms="20", perf_canary="off", perf_inductor_cache="cold",
                              perf_threads="auto", perf_memory_format="contiguous,channels-last"),
                      cuda_available=False)
    assert o.grid.name == "custom"
    assert o.grid.attention == ("original", "sdpa")
    assert o.grid.compile == ("eager", "compile-max-autotune")
    assert o.grid.batch_sizes == (4,)
    assert o.grid.kinds[-1] == "txt2img" and len(o.grid.kinds) == 4
    assert o.grid.memory_formats == C.MEMORY_FORMATS and o.grid.threads is None
    assert (o.steps, o.min_round_s, o.canary, o.inductor_cache) == (3, 0.02, False, "cold")
    assert Options.parse(_getter(), cuda_available=True).grid.profile == "sd21-base"
    assert Options.parse(_getter(perf_rounds="7", perf_grid="full"), cuda_available=False).grid.name == "full"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/side-a")  # what `python -m perf_tests run` sets
    assert Options.parse(_getter(), cuda_available=False).inductor_cache_dir == "/tmp/side-a"
    assert Options.parse(_getter(perf_inductor_cache_dir="/x"),
                         cuda_available=False).inductor_cache_dir == "/x"


def test_one_axis_on_a_focused_grid_keeps_the_kinds_other_axis():
    o = Options.parse(_getter(perf_attention="original,sdpa-flash"), cuda_available=False)
    assert {(c.attention, c.compile) for c in o.grid.cases("attention-self-1024")} == {
        ("original", "eager"), ("sdpa-flash", "eager")}
    assert {(c.attention, c.compile) for c in o.grid.cases("unet-step")} == {
        (a, m) for a in ("original", "sdpa-flash") for m in ("eager", "compile")}
    o = Options.parse(_getter(perf_compile="compile"), cuda_available=False)
    assert {c.attention for c in o.grid.cases("unet-step")} == {"original", "sdpa"}
    assert {c.compile for c in o.grid.cases("unet-step")} == {"compile"}
    assert o.grid.cases("txt2img") == []  # not in the CPU gate grid, whatever the axes


@pytest.mark.parametrize("bad, option", [
    ({"perf_profile": "huge"}, "--profile"), ({"perf_attention": "flash"}, "--attention"),
    ({"perf_precision": "fp8"}, "--precision"), ({"perf_compile": "jit"}, "--compile"),
    ({"perf_compile": "default"}, "--compile"), ({"perf_case_kind": "decoder"}, "--case-kind"),
    ({"perf_case_kind": ""}, "--case-kind"), ({"perf_attention": ","}, "--attention"),
    ({"perf_steps": "0"}, "--steps"), ({"perf_steps": "-3"}, "--steps"), ({"perf_steps": "two"}, "--steps"),
    ({"perf_rounds": "0"}, "--rounds"), ({"perf_rounds": "-1"}, "--rounds"), ({"perf_rounds": "2.5"},
                                                                              "--rounds"),
    ({"perf_warmup_rounds": "0"}, "--warmup-rounds"), ({"perf_batch_size": "0"}, "--batch-size"),
    ({"perf_batch_size": "1,-2"}, "--batch-size"), ({"perf_batch_size": "x"}, "--batch-size"),
    ({"perf_batch_size": ""}, "--batch-size"), ({"perf_min_round_ms": "0"}, "--min-round-ms"),
    ({"perf_min_round_ms": "nan"}, "--min-round-ms"), ({"perf_inject_delay": "-0.1"}, "--inject-delay"),
    ({"perf_threads": "0"}, "--threads"), ({"perf_canary": "yes"}, "--canary"),
    ({"perf_inductor_cache": "hot"}, "--inductor-cache"), ({"perf_grid": "nightly"}, "--grid"),
    ({"perf_device": "tpu"}, "--device"), ({"perf_device": "cuda"}, "--device"),
    ({"perf_memory_format": "nhwc"}, "--memory-format"), ({"perf_projections": "qkv"}, "--projections"),
])
def test_options_refuse_bad_values_naming_the_option(bad, option):
    with pytest.raises(OptionError) as err:
        Options.parse(_getter(**bad), cuda_available=False)
    assert str(err.value).startswith(option) or f" {option} " in str(err.value), str(err.value)
