"""Benchmark cases: what is measured, as data.

A :class:`Case` is one benchmark — a workload kind (``txt2img``, ``unet-step``, ...) at one point of the
grid profile × attention backend × compile mode × batch size × precision. Its string form is the pytest id
(``tiny-sdpa-math-eager-bs1-fp32``) and the benchmark name ``test_<kind>[<id>]`` is the key used by every
report and baseline. The grids (``gate`` and ``full``, per device), the reasons a combination cannot run
here and the definition hash live here too, as plain functions with no model or pytest import, so the unit
tests can check them in milliseconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from perf_tests.records.names import (  # noqa: F401  (re-exported: the suite's vocabulary is read from here)
    ATTENTION_BACKENDS,
    ATTENTION_SHAPES,
    BACKEND_FREE_KINDS,
    COMPILE_MODES,
    KIND_FAMILIES,
    KINDS,
    MEMORY_FORMATS,
    PRECISIONS,
    PROJECTIONS,
    Case,
    parse_name,
)

if TYPE_CHECKING:
    from sd.device import DeviceCapabilities

# Bump when the meaning of a measurement changes (what a kind times, its inputs, the warm-up rule), so
# that old baselines stop matching instead of being compared with something else.
# 2: a round times a block of calls (blocked autorange) and records per-call seconds; each compiled case
#    compiles afresh under a recorded Inductor cache state.
HARNESS_VERSION = 2


@dataclass(frozen=True)
class Profile:
    """Model size and workload settings; ``preset`` is the sd.load_model preset."""

    name: str
    preset: str
    height: int
    width: int
    steps: int  # PLMS steps of txt2img
    heads: tuple  # attention heads (of 64) at UNet levels 0 and 1, for the attention kinds
    sampler: str = "plms"
    guidance_scale: float = 9.0
    prompt: str = "A photo"  # the study's prompt


PROFILES = {
    # Tiny: 384x384 -> 48x48 latents, 2304 tokens of 64-d heads at level 0, so attention is a visible share
    # of a CPU step. 4 PLMS steps (5 UNet calls) is the smallest count that runs all four PLMS update
    # formulas (improved Euler, then 2nd, 3rd and 4th order Adams-Bashforth) and keeps the CPU run short.
    "tiny": Profile("tiny", "tiny", 384, 384, steps=4, heads=(1, 2)),
    "sd21-base": Profile("sd21-base", "sd21-base", 512, 512, steps=50, heads=(5, 10)),
    "sd21-v": Profile("sd21-v", "sd21-v", 768, 768, steps=50, heads=(5, 10)),
}


# ---------------------------------------------------------------------------------------------------------
# Grid


# "first-run": what a GPU's first, time-limited run measures from an empty Inductor cache (gpu-check).
GRID_NAMES = ("gate", "full", "first-run")


@dataclass(frozen=True)
class GridDefaults:
    name: str  # "gate", "full", "first-run", or "custom" when the command line chose an axis
    profile: str
    attention: tuple
    compile: tuple  # COMPILE_MODES names
    batch_sizes: tuple
    precisions: tuple
    kinds: tuple
    rounds: Mapping  # kind -> timed rounds
    warmup_rounds: Mapping  # kind -> warm-up calls before the timed rounds (>= 1: the first is the check)
    kind_compile: Mapping = dataclasses.field(default_factory=dict)  # kind -> compile modes, unless --compile
    threads: int | None = None  # torch.set_num_threads for the run (None: leave torch's default)
    kind_batch_sizes: Mapping = dataclasses.field(default_factory=dict)  # kind -> sizes, unless --batch-size
    # kind -> the (attention, compile) pairs measured for it: a focused grid is not a full cross product.
    # Cleared when --attention or --compile is given.
    kind_points: Mapping = dataclasses.field(default_factory=dict)
    memory_formats: tuple = MEMORY_FORMATS[:1]
    projections: tuple = PROJECTIONS[:1]

    def compile_for(self, kind: str) -> tuple:
        return tuple(self.kind_compile.get(kind, self.compile))

    def batch_sizes_for(self, kind: str) -> tuple:
        return tuple(self.kind_batch_sizes.get(kind, self.batch_sizes))

    def cases(self, kind: str, steps: int | None = None) -> list[Case]:
        """The cases of ``kind`` in this grid, in grid order (what cannot run here is skipped later)."""
        if kind not in self.kinds:
            return []
        cases = build_cases(kind, self.profile, self.attention, self.compile_for(kind),
                            self.batch_sizes_for(kind),
                            self.precisions, steps, self.memory_formats, self.projections)
        points = self.kind_points.get(kind)
        return cases if points is None else [c for c in cases if (c.attention, c.compile) in points]

    def as_dict(self) -> dict:
        """The grid as plain JSON (``perf_tests.grid`` of a result file)."""
        d = dataclasses.asdict(self)
        d["kind_points"] = {k: [list(p) for p in v] for k, v in self.kind_points.items()}
        return d


def grid(name: str, device_type: str) -> GridDefaults:
    """The named grid ("gate", "full", "first-run") for a device type ("cuda" or anything else: a CPU)."""
    if name not in GRID_NAMES:
        raise ValueError(f"unknown grid {name!r}; choose from {', '.join(GRID_NAMES)}")
    if name == "first-run":
        return _first_run(device_type)
    if device_type == "cuda":
        return _cuda_gate() if name == "gate" else _cuda_full()
    return _cpu_gate() if name == "gate" else _cpu_full()


def _cuda_gate() -> GridDefaults:
    # The pull-request grid: the seed study's configurations at fp16, batch 1 and 4, eager and
    # compiled. The UNet step and the attention kernels are the sensitive instruments; txt2img (50 steps)
    # at batch 1 is the end-to-end figure users quote. Estimated run time: see the README.
    attention_kinds = KIND_FAMILIES["attention"]
    return GridDefaults(
        name="gate",
        profile="sd21-base",
        attention=("original", "sdpa", "sdpa-flash", "sdpa-mem-efficient", "xformers"),
        compile=("eager", "compile"),
        batch_sizes=(1, 4),
        precisions=("fp16",),
        kinds=("txt2img", "unet-step", *attention_kinds),
        rounds=dict.fromkeys(KINDS, 20) | {"txt2img": 5},
        warmup_rounds=dict.fromkeys(KINDS, 3) | {"txt2img": 1},
        kind_batch_sizes={"txt2img": (1,)},
    )


def _cuda_full() -> GridDefaults:
    return GridDefaults(
        name="full",
        profile="sd21-base",
        attention=ATTENTION_BACKENDS,
        compile=COMPILE_MODES,
        batch_sizes=(1, 2, 4),
        precisions=("autocast", "fp16"),
        kinds=KINDS,
        rounds=dict.fromkeys(KINDS, 20) | {"txt2img": 10},
        warmup_rounds=dict.fromkeys(KINDS, 3) | {"txt2img": 1},
    )


def _first_run(device_type: str) -> GridDefaults:
    # A GPU's first run, which has about 10 minutes and an empty Inductor cache: every attention kernel
    # eager on the three attention shapes, the UNet step and the VAE decode (each records the SDPA kernels
    # it ran), one end-to-end txt2img (sdpa), then one compiled UNet step, the only compilation (about 75 s
    # cold for the sd21 UNet on an H100). Batch 1, fewer rounds than the gate. Its estimated time:
    # perf_tests.measure.estimate (tests/test_estimate.py holds it under 8 minutes on an H100). On a CPU the
    # same
    # selection on the tiny profile in fp32, so that it runs here too.
    cuda = device_type == "cuda"
    eager_everywhere = tuple((a, "eager") for a in ATTENTION_BACKENDS)
    attention_kinds = KIND_FAMILIES["attention"]
    return GridDefaults(
        name="first-run",
        profile="sd21-base" if cuda else "tiny",
        attention=ATTENTION_BACKENDS,
        compile=("eager", "compile"),
        batch_sizes=(1,),
        precisions=("fp16",) if cuda else ("fp32",),
        kinds=("txt2img", "unet-step", "vae-decode", *attention_kinds),
        rounds=dict.fromkeys(KINDS, 10) | {"txt2img": 3, "vae-decode": 5},
        warmup_rounds=dict.fromkeys(KINDS, 2) | {"txt2img": 1, "vae-decode": 1},
        threads=None if cuda else 1,
        kind_points={
            "txt2img": (("sdpa", "eager"),),
            "unet-step": (*eager_everywhere, ("sdpa", "compile")),
            "vae-decode": eager_everywhere,
            **dict.fromkeys(attention_kinds, eager_everywhere),
        },
    )


def _cpu_gate() -> GridDefaults:
    # A focused tiny grid for a pull request on a CPU, sized for many short runs (processes are the unit
    # of evidence; about a minute per run on a 2-core machine with a warm Inductor cache): the UNet step as
    # the main instrument (original, SDPA, SDPA compiled), one attention shape under every backend (the
    # math kernel included), text encoding and VAE decode. txt2img is left to the full grid, and batch 2
    # too: the measurements behind both choices are in docs/design-notes.md.
    attention_points = tuple((a, "eager") for a in ATTENTION_BACKENDS)
    return GridDefaults(
        name="gate",
        profile="tiny",
        attention=ATTENTION_BACKENDS,
        compile=("eager", "compile"),
        batch_sizes=(1,),
        precisions=("fp32",),
        kinds=("unet-step", "vae-decode", "text-encode", "attention-self-1024"),
        rounds=dict.fromkeys(KINDS, 10) | {"txt2img": 5, "vae-decode": 5, "unet-step": 8},
        warmup_rounds=dict.fromkeys(KINDS, 2) | {"txt2img": 1, "unet-step": 1, "vae-decode": 1},
        threads=1,
        kind_points={
            "unet-step": (("original", "eager"), ("sdpa", "eager"), ("sdpa", "compile")),
            "vae-decode": (("original", "eager"),),
            "text-encode": (("original", "eager"),),
            "attention-self-1024": attention_points,
        },
    )


def _cpu_full() -> GridDefaults:
    # Every backend x eager/default compile x batch 1 and 2, fp32, on the tiny profile. Economy on a
    # 2-core machine: torch.compile is exercised where it matters, on the UNet (unet-step, and txt2img
    # which runs the same compiled graphs, i.e. the study's "compile the U-Net only"); the VAE decoder
    # and the bare attention kernels are measured eager unless --compile is given. txt2img and
    # vae-decode (seconds per call) run at batch 1 only unless --batch-size is given; one thread
    # (docs/design-notes.md says why).
    # Rounds: >= 5 per case so a Mann-Whitney test of 5 vs 5 samples can reach p < 0.01; 10 for the
    # UNet step, the case that carries the grid.
    return GridDefaults(
        name="full",
        profile="tiny",
        attention=ATTENTION_BACKENDS,
        compile=("eager", "compile"),
        batch_sizes=(1, 2),
        precisions=("fp32",),
        kinds=KINDS,
        rounds=dict.fromkeys(KINDS, 10) | {"txt2img": 5, "vae-decode": 7},
        warmup_rounds=dict.fromkeys(KINDS, 2) | {"txt2img": 1, "unet-step": 1, "vae-decode": 1},
        kind_compile={k: ("eager",) for k in ("vae-decode", *KIND_FAMILIES["attention"])},
        threads=1,
        kind_batch_sizes={"txt2img": (1,), "vae-decode": (1,)},
    )


def split_csv(value: str | None) -> tuple | None:
    if value is None or value == "":
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


def check_compile(values: Iterable[str]) -> tuple:
    """The compile modes asked for, each checked against sd.compile.COMPILE_MODES (no other spelling)."""
    out = tuple(dict.fromkeys(values))
    for v in out:
        if v not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {v!r}; choose from {', '.join(COMPILE_MODES)}")
    return out


def normalize_kinds(values: Iterable[str]) -> tuple:
    out = []
    for v in values:
        if v in KIND_FAMILIES:
            out.extend(KIND_FAMILIES[v])
        elif v.replace("_", "-") in KINDS:
            out.append(v.replace("_", "-"))
        else:
            raise ValueError(f"unknown case kind {v!r}; choose from {', '.join(KINDS)} or 'attention'")
    return tuple(dict.fromkeys(out))


def build_cases(
    kind: str,
    profile: str,
    attention: Iterable[str],
    compile: Iterable[str],
    batch_sizes: Iterable[int],
    precisions: Iterable[str],
    steps: int | None = None,
    memory_formats: Iterable[str] = MEMORY_FORMATS[:1],
    projections: Iterable[str] = PROJECTIONS[:1],
) -> list[Case]:
    """All cases of one kind, in grid order. Nothing is filtered here: what cannot run is skipped later."""
    p = PROFILES[profile]
    return [
        Case(
            kind=kind,
            profile=profile,
            attention=a,
            compile=c,
            batch_size=int(b),
            precision=prec,
            steps=(steps or p.steps) if kind == "txt2img" else None,
            height=p.height,
            width=p.width,
            memory_format=mf,
            projections=proj,
        )
        for prec in precisions
        for a in attention
        for c in compile
        for b in batch_sizes
        for mf in memory_formats
        for proj in projections
    ]


def run_order(case: Case) -> tuple:
    """Sort key: eager cases before compiled ones, and within each the attention-kernel cases (no model,
    a second each on a GPU) before the model cases, grouped so that each model is built once (the
    reference model's group first). A run stopped at a time limit then keeps every kernel and the eager
    models, and loses the compiles, the longest part of a first run."""
    return (
        case.profile,
        case.compiled,  # compilations last: a cold one is a minute or more per model
        case.kind not in ATTENTION_SHAPES,  # model-free kernel cases first
        case.optimized,  # the reference model's group first
        PRECISIONS.index(case.precision) if case.precision in PRECISIONS else 99,
        ATTENTION_BACKENDS.index(case.attention) if case.attention in ATTENTION_BACKENDS else 99,
        COMPILE_MODES.index(case.compile) if case.compile in COMPILE_MODES else 99,
        MEMORY_FORMATS.index(case.memory_format) if case.memory_format in MEMORY_FORMATS else 99,
        PROJECTIONS.index(case.projections) if case.projections in PROJECTIONS else 99,
        case.batch_size,
        KINDS.index(case.kind) if case.kind in KINDS else 99,
    )


# ---------------------------------------------------------------------------------------------------------
# What cannot run here, and why


def skip_reason(case: Case, caps: DeviceCapabilities) -> str | None:
    """Why ``case`` cannot be measured here (a sentence), or None when it can."""
    model_axes = (case.memory_format, case.projections) != (MEMORY_FORMATS[0], PROJECTIONS[0])
    not_plain = case.attention != "original" or case.compile != "eager" or model_axes
    if case.kind in BACKEND_FREE_KINDS and not_plain:
        return (
            f"{case.kind} does not use the sd attention backend, torch.compile, the memory format or fused "
            f"projections (open_clip's own transformer); measured once as "
            f"{case.profile}-original-eager-bs{case.batch_size}-{case.precision}"
        )
    if case.kind in ATTENTION_SHAPES and model_axes:
        plain = dataclasses.replace(case, memory_format=MEMORY_FORMATS[0], projections=PROJECTIONS[0])
        return (f"{case.kind} calls the kernel on given q, k, v: the memory format and fused projections "
                f"are model settings; measured as {plain}")
    if case.memory_format not in MEMORY_FORMATS:
        return f"unknown memory format {case.memory_format!r}"
    if case.projections not in PROJECTIONS:
        return f"unknown projections {case.projections!r}"
    reason = caps.attention.get(case.attention, f"unknown attention backend {case.attention!r}")
    if reason is not None:
        return f"attention backend {case.attention!r} is not available here: {reason}"
    if case.compile != "eager":
        if not caps.has_compile:
            return f"torch.compile is not available in PyTorch {caps.torch_version} (needs PyTorch 2)"
        if case.compile == "compile-reduce-overhead" and caps.device_type != "cuda":
            return "compile mode reduce-overhead uses CUDA graphs; no CUDA device here"
        if caps.cuda_capability is not None and caps.cuda_capability < (7, 0):
            return f"torch.compile (Triton) needs CUDA capability >= 7.0, this GPU has {caps.cuda_capability}"
    if caps.device_type == "cpu" and case.precision in ("fp16", "autocast"):
        return f"precision {case.precision} is a CUDA measurement (fp16 kernels); use fp32 or bf16 on a CPU"
    if case.precision == "bf16" and not caps.bf16:
        return "bf16 is not supported on this device"
    return None


# ---------------------------------------------------------------------------------------------------------
# Definition hash and correctness tolerances


def workload_definition(case: Case, weights: str = "random") -> dict:
    """Everything that defines what a case measures (not the code measured): hashed for baselines."""
    p = PROFILES.get(case.profile)
    d = {"harness_version": HARNESS_VERSION, "case": case.as_dict(), "weights": weights}
    if p is not None:
        d["profile"] = {"preset": p.preset, "height": p.height, "width": p.width}
        if case.kind == "txt2img":
            d["profile"].update(sampler=p.sampler, guidance_scale=p.guidance_scale, prompt=p.prompt)
        if case.kind in ATTENTION_SHAPES:
            q, k, level = ATTENTION_SHAPES[case.kind]
            d["shape"] = {"q_tokens": q, "kv_tokens": k, "heads": p.heads[level], "head_dim": 64}
    return d


def definition_hash(case: Case, weights: str = "random") -> str:
    """sha256 (16 hex chars) of the case definition: kind, case fields, profile settings, harness version."""
    blob = json.dumps(workload_definition(case, weights), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Max abs error allowed against the fp32/original/eager output, relative to max(1, max|reference|).
# fp32 paths differ only by summation order (measured: ~1e-6 for one UNet step); txt2img compares the
# decoded image in [0, 1] after the whole sampling loop, which amplifies differences.
TOLERANCES = {
    "fp32": {"txt2img": 1e-2, "unet-step": 1e-3, "vae-decode": 1e-3, "text-encode": 1e-3, "attention": 1e-4},
    "autocast": {"txt2img": 1e-1, "unet-step": 5e-2, "vae-decode": 5e-2, "text-encode": 5e-2,
                 "attention": 1e-2},
    "fp16": {"txt2img": 1e-1, "unet-step": 5e-2, "vae-decode": 5e-2, "text-encode": 5e-2, "attention": 1e-2},
    "bf16": {"txt2img": 2e-1, "unet-step": 2e-1, "vae-decode": 2e-1, "text-encode": 2e-1, "attention": 5e-2},
}


def tolerance(case: Case) -> float:
    family = "attention" if case.kind in ATTENTION_SHAPES else case.kind
    return TOLERANCES[case.precision][family]
