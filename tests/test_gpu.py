"""The CUDA paths of the suite and of sd, on a real GPU (skipped with a reason elsewhere).

Each test is written to catch a real fault: a synchronisation outside the timed region (a device-side spin
would vanish from the time), memory counted from the wrong start (the reference model or an earlier case
would show up), a kernel that silently falls back (the profiler names the kernel that ran), CUDA-graph
output aliasing (a kept output would change under the next replay), an OOM that stops the run.
Run them with ``pytest tests/test_gpu.py`` on a machine with a GPU; ``nox -s gpu-check`` does.
"""

from __future__ import annotations

import dataclasses
import gc
import re
import time
from types import SimpleNamespace

import pytest
import torch

from perf_tests.measure import cases as C
from perf_tests.measure import machine, suite, timing
from perf_tests.measure.suite import Options, PerfSession

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (none visible to this PyTorch)"),
]

needs_compile = pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile needs PyTorch 2")
needs_sdpa = pytest.mark.skipif(not hasattr(torch.nn.functional, "scaled_dot_product_attention"),
                                reason="SDPA needs PyTorch 2")
SPIN_S = 0.02


class Bench:
    """pytest-benchmark's pedantic interface, timing each round with perf_counter (several per test)."""

    def __init__(self):
        self.extra_info, self.data, self.iterations = {}, [], None
        self.stats = SimpleNamespace(as_dict=lambda include_data=True: {"name": "x",
                                                                        "extra_info": self.extra_info,
                                                                        "stats": {"data": self.data}})

    def pedantic(self, target, rounds=1, warmup_rounds=0, iterations=1):
        self.iterations = iterations
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(iterations):
                target()
            self.data.append((time.perf_counter() - t0) / iterations)
        if iterations > 1:
            target()


def spin_cycles(seconds: float) -> int:
    return int(seconds * timing._cuda_cycles_per_second("cuda"))


def spin(cycles: int):
    def fn():
        torch.cuda._sleep(cycles)  # queued: returns at once, the device is busy for `seconds`
        return torch.ones(1, device="cuda")
    return fn


# ---------------------------------------------------------------------------------------------------------
# Timing


@pytest.mark.parametrize("min_round_s", [1e-6, 0.1])  # one call per round; a block of about five
def test_device_work_is_inside_the_timed_region(min_round_s):
    b = Bench()
    extra = timing.measure(b, spin(spin_cycles(SPIN_S)), device="cuda", rounds=3, warmup_rounds=1,
                           min_round_s=min_round_s)
    assert (extra["iterations"] == 1) == (min_round_s < SPIN_S)
    # Without the synchronisation at the end of a block the rounds would time the launches: microseconds.
    assert min(b.data) > 0.8 * SPIN_S, b.data


def test_injected_delay_is_a_device_side_spin_inside_the_timed_region():
    b0, b1 = Bench(), Bench()
    def fn():
        return torch.ones(1, device="cuda")
    timing.measure(b0, fn, device="cuda", rounds=3, warmup_rounds=1, min_round_s=1e-6)
    extra = timing.measure(b1, fn, device="cuda", rounds=3, warmup_rounds=1, min_round_s=1e-6, delay_s=SPIN_S)
    assert extra["injected_delay_s"] == SPIN_S
    assert min(b1.data) - max(b0.data) > 0.8 * SPIN_S, (b0.data, b1.data)


class StallingBench(Bench):
    """Bench whose host stalls ``stall_s`` after each round's timer starts, before the first launch."""

    def __init__(self, stall_s: float):
        super().__init__()
        self.stall_s = stall_s

    def pedantic(self, target, rounds=1, warmup_rounds=0, iterations=1):
        for _ in range(rounds):
            t0 = time.perf_counter()
            time.sleep(self.stall_s)
            for _ in range(iterations):
                target()
            self.data.append((time.perf_counter() - t0) / iterations)
        if iterations > 1:
            target()


def test_cuda_events_time_the_device_work_and_leave_a_host_stall_out():
    stall = 2 * SPIN_S
    b = StallingBench(stall)
    extra = timing.measure(b, spin(spin_cycles(SPIN_S)), device="cuda", rounds=3, warmup_rounds=1,
                           min_round_s=1e-6, events=timing.cuda_event)
    device = extra["device_samples"]
    assert extra["iterations"] == 1 and len(device) == len(b.data) == 3
    assert all(0.8 * SPIN_S < d < 1.5 * SPIN_S for d in device), device  # the spin, not the launch
    assert all(w - d > 0.8 * stall for w, d in zip(b.data, device, strict=True)), (b.data, device)


def test_peak_memory_counts_from_a_reset_before_the_rounds():
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB, freed before the case
    del big
    small = 32 << 20

    def fn():
        return torch.empty(small, dtype=torch.uint8, device="cuda")

    extra = timing.measure(Bench(), fn, device="cuda", rounds=2, warmup_rounds=1)
    assert small <= extra["peak_memory_bytes"] < 256 << 20, extra["peak_memory_bytes"]


# ---------------------------------------------------------------------------------------------------------
# The suite on CUDA with the tiny profile


def case(**kw) -> C.Case:
    p = C.PROFILES["tiny"]
    base = dict(kind="unet-step", profile="tiny", attention="sdpa", compile="eager", batch_size=1,
                precision="fp16", height=p.height, width=p.width)
    return C.Case(**{**base, **kw})


def session() -> PerfSession:
    return PerfSession(Options(device="cuda", grid=C.grid("gate", "cuda"), canary=False, rounds=2))


def run(s: PerfSession, c: C.Case) -> dict:
    b = Bench()
    s.run(b, c)
    return b.extra_info


def release(s: PerfSession) -> None:
    """Everything a session put on the device leaves it (its models; the reference goes to the CPU)."""
    s.cache.release()
    s.cache.park_reference()
    gc.collect()
    torch.cuda.empty_cache()


def test_a_cases_peak_memory_does_not_depend_on_the_grid():
    """The fp32 reference model leaves the device before a case is measured: the same case measured after
    the reference case (full grid) and alone (reference computed on demand) reports the same peak. Each
    session's models leave the device before the other measures, so that "alone" is alone."""
    after_reference = session()
    run(after_reference, case(precision="fp32", attention="original"))
    with_grid = run(after_reference, case())
    fp32_weights = sum(p.numel() * 4 for p in after_reference.cache._reference["tiny"].model.parameters())
    release(after_reference)
    assert torch.cuda.memory_allocated() < fp32_weights / 4, torch.cuda.memory_allocated()
    s = session()
    alone = run(s, case())
    release(s)
    assert with_grid["correct"] and alone["correct"]
    assert with_grid["peak_memory_bytes"] == pytest.approx(alone["peak_memory_bytes"], rel=0.05)
    assert alone["peak_memory_bytes"] < fp32_weights + with_grid["peak_memory_bytes"] / 2


@pytest.mark.parametrize("precision", ["fp16", "autocast", "bf16"])
@pytest.mark.parametrize("kind", ["unet-step", "vae-decode", "txt2img"])
def test_reduced_precision_is_checked_against_the_fp32_reference(kind, precision):
    s = session()
    c = case(kind=kind, precision=precision, steps=2 if kind == "txt2img" else None)
    reason = C.skip_reason(c, s.caps)
    if reason:
        pytest.skip(reason)
    info = run(s, c)
    assert info["correct"] and 0 < info["max_abs_error"] <= info["tolerance"]
    assert (info["vae_attention_used"] is None) == (kind == "unet-step")


def test_wrong_half_precision_output_is_caught(monkeypatch):
    s = session()
    monkeypatch.setitem(C.TOLERANCES["fp16"], "unet-step", 1e-7)  # fp16 rounding alone exceeds this
    with pytest.raises(pytest.fail.Exception, match="WRONG OUTPUT"):
        run(s, case())
    assert s.failed[case().name]["kind"] == "wrong-output"


def test_out_of_memory_is_a_recorded_failure_and_the_run_goes_on(monkeypatch):
    s = session()
    too_big = 2 * torch.cuda.get_device_properties(0).total_memory

    def make_workload(cache, c):
        built = SimpleNamespace(attention_used=c.attention, vae_attention_used=None, build_s=0.0,
                                compile_setup_s=None, compiled_parts=None)
        return (lambda: torch.empty(too_big, dtype=torch.uint8, device="cuda")), built

    monkeypatch.setattr(suite, "make_workload", make_workload)
    with pytest.raises(pytest.fail.Exception, match="out of memory"):
        s.run(Bench(), case())
    assert s.failed[case().name]["kind"] == "oom"
    monkeypatch.undo()
    assert run(s, case(batch_size=2))["correct"]  # the next case runs


# ---------------------------------------------------------------------------------------------------------
# Attention kernels: the one asked for runs, and agrees with the original


KERNEL_OPS = {
    "sdpa-flash": "aten::_scaled_dot_product_flash_attention",
    "sdpa-mem-efficient": "aten::_scaled_dot_product_efficient_attention",
    "sdpa-cudnn": "aten::_scaled_dot_product_cudnn_attention",
    "sdpa-math": "aten::_scaled_dot_product_attention_math",
}


def ops_run(fn) -> set:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages()}


def qkv(dtype, heads=5, tokens=1024, head_dim=64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, heads, tokens, head_dim, generator=g).to("cuda", dtype) for _ in range(3)]


@needs_sdpa
@pytest.mark.parametrize("backend", ["sdpa-flash", "sdpa-mem-efficient", "sdpa-cudnn", "xformers"])
def test_kernel_agrees_with_original_and_is_the_kernel_that_ran(backend):
    from sd.attention import attend_original, resolve_attention
    from sd.errors import AttentionUnavailable

    try:
        attend = resolve_attention(backend, "cuda", torch.float16)
    except AttentionUnavailable as exc:
        pytest.skip(str(exc))
    q, k, v = qkv(torch.float16)
    expected = attend_original(*(t.float() for t in (q, k, v)))
    out = attend(q, k, v)
    assert (out.float() - expected).abs().max().item() <= C.TOLERANCES["fp16"]["attention"]
    if backend in KERNEL_OPS:
        ran = ops_run(lambda: attend(q, k, v))
        assert KERNEL_OPS[backend] in ran, sorted(o for o in ran if "attention" in o)
        others = {op for b, op in KERNEL_OPS.items() if b != backend and op != KERNEL_OPS[backend]}
        assert not others & ran, sorted(others & ran)  # every other kernel, cuDNN included, was off


@needs_sdpa
def test_sdp_kernel_fallback_of_pytorch_2_0_to_2_2_restricts_the_kernel(monkeypatch):
    """PyTorch 2.0-2.2 have torch.backends.cuda.sdp_kernel and no torch.nn.attention: the same restriction
    must hold through that API (where this PyTorch still has it)."""
    from sd import capabilities

    if not hasattr(torch.backends.cuda, "sdp_kernel"):
        pytest.skip("this PyTorch no longer has torch.backends.cuda.sdp_kernel")
    monkeypatch.setattr(capabilities, "sdpa_kernel_api", lambda: "torch.backends.cuda.sdp_kernel")
    q, k, v = qkv(torch.float16)
    for kernel, op in (("flash", KERNEL_OPS["sdpa-flash"]), ("mem-efficient",
                                                             KERNEL_OPS["sdpa-mem-efficient"])):
        context = capabilities.sdpa_kernel_context(kernel)

        def call(context=context):
            with context():
                torch.nn.functional.scaled_dot_product_attention(q, k, v)

        ran = ops_run(call)
        assert op in ran and KERNEL_OPS["sdpa-cudnn"] not in ran, sorted(o for o in ran if "attention" in o)


@needs_sdpa
@pytest.mark.parametrize("backend", ["sdpa", "sdpa-flash", "sdpa-mem-efficient", "sdpa-cudnn"])
def test_the_recorded_kernels_are_what_the_profiler_saw_in_the_unet_and_the_vae(backend):
    """A case's attention_kernels (one profiled call, perf_tests.measure.kernels: the operator tree with
    ranges around the parts) against a second profile of the same workload read as a flat operator list. Plain
    sdpa names the kernel it dispatched to (cuDNN on sm90 with a recent cuDNN)."""
    from perf_tests.measure.kernels import SDPA_OPS
    from perf_tests.measure.workloads import make_workload

    s = session()
    forced = {"sdpa-flash": "flash", "sdpa-mem-efficient": "mem-efficient", "sdpa-cudnn": "cudnn"}
    for kind, part in (("unet-step", "unet"), ("vae-decode", "vae")):
        c = case(kind=kind, attention=backend)
        reason = C.skip_reason(c, s.caps)
        if reason:
            pytest.skip(reason)
        recorded = run(s, c)["attention_kernels"]
        fn, _ = make_workload(s.cache, c)
        seen = {SDPA_OPS[o] for o in ops_run(fn) if o in SDPA_OPS}
        assert list(recorded) == [part] and set(recorded[part]) == seen, (kind, recorded, seen)
        if part == "unet" and backend in forced:
            assert recorded["unet"] == [forced[backend]]
    release(s)


@needs_sdpa
@pytest.mark.parametrize("backend", ["sdpa-flash", "sdpa-cudnn"])
def test_the_vae_wide_head_runs_the_fallback_kernel_on_the_gpu(backend):
    """SD 2.1's VAE head is 512 wide, past the flash and cuDNN kernels: sd hands it to the next kernel of
    the fallback order, and that kernel is the one the profiler sees at d=512."""
    from perf_tests.measure.kernels import SDPA_OPS
    from sd.config import load_config
    from sd.errors import AttentionUnavailable
    from sd.model import resolve_model_attention

    try:
        _, vae_name, vae_attend = resolve_model_attention(load_config("sd21-base"), backend, None,
                                                          torch.device("cuda"), torch.float16)
    except AttentionUnavailable as exc:
        pytest.skip(str(exc))
    assert vae_name != backend
    q = torch.randn(1, 1, 4096, 512, device="cuda", dtype=torch.float16)
    ran = {SDPA_OPS[o] for o in ops_run(lambda: vae_attend(q, q, q)) if o in SDPA_OPS}
    expected = {"sdpa-mem-efficient": {"mem-efficient"}, "sdpa-math": {"math"}, "original": set()}
    if vae_name in expected:
        assert ran == expected[vae_name], (vae_name, ran)
    else:  # plain sdpa: PyTorch's choice, but never the kernel that refused the head
        assert ran and {"flash": "sdpa-flash", "cudnn": "sdpa-cudnn"}.get(next(iter(ran))) != backend


# ---------------------------------------------------------------------------------------------------------
# CUDA graphs (reduce-overhead, max-autotune): outputs must not alias the graph's buffers


@needs_compile
@pytest.mark.parametrize("mode", ["compile-reduce-overhead", "compile-max-autotune"])
def test_cuda_graph_outputs_are_not_overwritten_by_the_next_call(mode):
    from sd.compile import compile_model
    from sd.config import load_config
    from sd.model import load_model

    # The tiny config cut to two levels (as tests/conftest.py's micro_config): max-autotune tunes every
    # kernel, so the smaller the graph the shorter the test.
    tiny = load_config("tiny")
    micro = dataclasses.replace(tiny, unet=dataclasses.replace(
        tiny.unet, channel_mult=(1, 2), attention_resolutions=(1,), num_res_blocks=1))

    def build():
        return load_model(micro, attention="sdpa", device="cuda", dtype=torch.float16)

    eager, compiled = build(), compile_model(build(), mode)
    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, 77, eager.config.unet.context_dim, generator=g).to("cuda", torch.float16)
    t = torch.full((2,), 500, device="cuda")
    xs = [torch.randn(2, 4, 48, 48, generator=g).to("cuda", torch.float16) for _ in range(4)]
    with torch.no_grad():
        outs = [compiled.unet(x, t, context) for x in xs]  # warm-up, recording, replays
        kept = outs[-2].clone()
        compiled.unet(xs[0], t, context)  # a replay that would overwrite an aliased output
        assert torch.equal(outs[-2], kept), "a kept output changed under the next CUDA-graph replay"
        expected = eager.unet(xs[-2], t, context)
    error = (outs[-2].float() - expected.float()).abs().max().item()
    assert error <= C.TOLERANCES["fp16"]["unet-step"] * max(1.0, expected.float().abs().max().item())


# ---------------------------------------------------------------------------------------------------------
# machine_info


def test_cuda_machine_info_fields():
    info = machine.machine_info("cuda")
    assert info["device_type"] == "cuda" and info["gpu_count"] >= 1
    assert info["device_name"] == torch.cuda.get_device_name(0)
    assert info["device_slug"] == machine.slugify(torch.cuda.get_device_name(0))
    assert info["device_slug"][0] != "-"
    assert re.fullmatch(r"\d+\.\d+", info["cuda_capability"])
    assert info["cuda_version"] == torch.version.cuda
    assert info["cudnn_version"] == torch.backends.cudnn.version()
    if info["driver_version"] is not None:  # nvidia-smi on PATH
        assert re.fullmatch(r"\d+(\.\d+)+", info["driver_version"])
