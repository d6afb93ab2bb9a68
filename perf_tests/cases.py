"""Benchmark cases: what is measured, as data.

A :class:`Case` is one benchmark — a workload kind (``txt2img``, ``unet-step``, ...) at one point of the
grid profile × attention backend × compile mode × batch size × precision. Its string form is the pytest id
(``tiny-sdpa-math-eager-bs1-fp32``) and the benchmark name ``test_<kind>[<id>]`` is the key used by every
report and baseline. The grid defaults per device, the reasons a combination cannot run here and the
definition hash live here too, as plain functions with no model or pytest import, so the unit tests can
check them in milliseconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# The vocabulary is sd's: one spelling each, shared by the CLI, case ids and baselines.
from sd.attention import ATTENTION_BACKENDS
from sd.capabilities import DeviceCapabilities
from sd.compile import COMPILE_MODES
from sd.precision import PRECISIONS

# Bump when the meaning of a measurement changes (what a kind times, its inputs, the warm-up rule), so
# that old baselines stop matching instead of being compared with something else.
HARNESS_VERSION = 1


# Kinds in the order they run inside one model group: txt2img first, so that a compiled model's
# compilation is paid (and recorded) by the end-to-end case, as a user running txt2img would pay it.
KINDS = (
    "txt2img",
    "unet-step",
    "vae-decode",
    "text-encode",
    "attention-self-4096",
    "attention-self-1024",
    "attention-cross-77",
)
# A "--case-kind" value may also name a family: "attention" selects the three attention shapes.
KIND_FAMILIES = {"attention": ("attention-self-4096", "attention-self-1024", "attention-cross-77")}
# Attention shapes of SD 2.1 at 512x512 (sd21-facts §2.2): (query tokens, key tokens, level).
ATTENTION_SHAPES = {
    "attention-self-4096": (4096, 4096, 0),
    "attention-self-1024": (1024, 1024, 1),
    "attention-cross-77": (4096, 77, 0),
}
# Kinds that do not depend on the attention backend or on compilation (the text encoder is open_clip's
# own transformer): only their original/eager point is a distinct measurement.
BACKEND_FREE_KINDS = ("text-encode",)


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


@dataclass(frozen=True)
class Case:
    kind: str
    profile: str
    attention: str
    compile: str  # a sd.compile.COMPILE_MODES name: "eager", "compile", "compile-max-autotune", ...
    batch_size: int
    precision: str
    steps: int | None = None  # txt2img only
    height: int | None = None
    width: int | None = None

    def __str__(self) -> str:
        return f"{self.profile}-{self.attention}-{self.compile}-bs{self.batch_size}-{self.precision}"

    @property
    def test_name(self) -> str:
        return "test_" + self.kind.replace("-", "_")

    @property
    def name(self) -> str:
        """The benchmark name, the comparison key: ``test_<kind>[<id>]``."""
        return f"{self.test_name}[{self}]"

    @property
    def compiled(self) -> bool:
        return self.compile != "eager"

    @property
    def optimized(self) -> bool:
        """True when the case differs from the fp32/original/eager reference and must be checked."""
        return not (self.attention == "original" and self.compile == "eager" and self.precision == "fp32")

    def reference(self) -> Case:
        """The case whose output this one must reproduce: original attention, eager, fp32."""
        return dataclasses.replace(self, attention="original", compile="eager", precision="fp32")

    def model_key(self) -> tuple:
        """Cases with equal keys share one built (and compiled) model."""
        return (self.profile, self.attention, self.compile, self.precision)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_ID_RE = re.compile(
    r"^(?P<profile>tiny|sd21-base|sd21-v|[a-z0-9]+)-(?P<attention>.+)-"
    r"(?P<compile>eager|compile(?:-max-autotune|-reduce-overhead)?)-bs(?P<batch>\d+)-(?P<precision>[a-z0-9]+)$"
)
_NAME_RE = re.compile(r"^test_(?P<kind>[a-z0-9_]+)\[(?P<id>.+)\]$")


def parse_name(name: str) -> Case:
    """Inverse of ``Case.name`` (steps/size unknown from a name alone)."""
    m = _NAME_RE.match(name)
    if not m:
        raise ValueError(f"not a perf_tests benchmark name: {name!r}")
    i = _ID_RE.match(m["id"])
    if not i:
        raise ValueError(f"not a perf_tests case id: {m['id']!r}")
    return Case(m["kind"].replace("_", "-"), i["profile"], i["attention"], i["compile"], int(i["batch"]), i["precision"])


# ---------------------------------------------------------------------------------------------------------
# Grid


@dataclass(frozen=True)
class GridDefaults:
    profile: str
    attention: tuple
    compile: tuple  # COMPILE_MODES names
    batch_sizes: tuple
    precisions: tuple
    kinds: tuple
    rounds: Mapping  # kind -> rounds
    warmup_rounds: Mapping  # kind -> warm-up calls before the timed rounds (>= 1: the first is the check)
    kind_compile: Mapping = dataclasses.field(default_factory=dict)  # kind -> compile modes, unless --compile
    threads: int | None = None  # torch.set_num_threads for the run (None: leave torch's default)
    kind_batch_sizes: Mapping = dataclasses.field(default_factory=dict)  # kind -> sizes, unless --batch-size

    def compile_for(self, kind: str) -> tuple:
        return tuple(self.kind_compile.get(kind, self.compile))

    def batch_sizes_for(self, kind: str) -> tuple:
        return tuple(self.kind_batch_sizes.get(kind, self.batch_sizes))


def default_grid(device_type: str) -> GridDefaults:
    """The grid `pytest perf_tests` runs with no options: full on CUDA, small on a CPU."""
    if device_type == "cuda":
        return GridDefaults(
            profile="sd21-base",
            attention=ATTENTION_BACKENDS,
            compile=COMPILE_MODES,
            batch_sizes=(1, 2, 4),
            precisions=("autocast", "fp16"),
            kinds=KINDS,
            rounds=dict.fromkeys(KINDS, 20) | {"txt2img": 10},
            warmup_rounds=dict.fromkeys(KINDS, 3) | {"txt2img": 1},
        )
    # CPU: every backend x eager/default compile x batch 1 and 2, fp32, on the tiny profile. Economy on a
    # 2-core machine: torch.compile is exercised where it matters, on the UNet (unet-step, and txt2img
    # which reuses the same compiled graphs, i.e. the study's "compile the U-Net only"); the VAE decoder
    # and the bare attention kernels are measured eager unless --compile is given. txt2img and
    # vae-decode (seconds per call) run at batch 1 only unless --batch-size is given: batch 2 of
    # both tripled the run (16 min instead of about 6). One thread: a CPU shared with other jobs makes
    # multi-threaded (OpenMP) timings several times slower and erratic.
    # Rounds: >= 5 per case so a Mann-Whitney test of 5 vs 5 samples can reach p < 0.01; 10 for the
    # UNet step, the case that carries the grid (power >= 0.95 for a 10% slowdown against a 3-run baseline).
    return GridDefaults(
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
        )
        for prec in precisions
        for a in attention
        for c in compile
        for b in batch_sizes
    ]


def run_order(case: Case) -> tuple:
    """Sort key grouping cases that share a model (reference model first) so each is built once;
    the attention-kernel cases, which need no model, come after all model cases."""
    is_ref_group = case.attention == "original" and case.compile == "eager" and case.precision == "fp32"
    return (
        case.profile,
        case.kind in ATTENTION_SHAPES,  # model-free kernel cases last
        not is_ref_group,
        PRECISIONS.index(case.precision) if case.precision in PRECISIONS else 99,
        ATTENTION_BACKENDS.index(case.attention) if case.attention in ATTENTION_BACKENDS else 99,
        COMPILE_MODES.index(case.compile) if case.compile in COMPILE_MODES else 99,
        case.batch_size,
        KINDS.index(case.kind) if case.kind in KINDS else 99,
    )


# ---------------------------------------------------------------------------------------------------------
# What cannot run here, and why


def skip_reason(case: Case, caps: DeviceCapabilities) -> str | None:
    """Why ``case`` cannot be measured here (a sentence), or None when it can."""
    if case.kind in BACKEND_FREE_KINDS and (case.attention != "original" or case.compile != "eager"):
        return (
            f"{case.kind} does not use the sd attention backend or torch.compile (open_clip's own "
            f"transformer); measured once as {case.profile}-original-eager-bs{case.batch_size}-{case.precision}"
        )
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
    "autocast": {"txt2img": 1e-1, "unet-step": 5e-2, "vae-decode": 5e-2, "text-encode": 5e-2, "attention": 1e-2},
    "fp16": {"txt2img": 1e-1, "unet-step": 5e-2, "vae-decode": 5e-2, "text-encode": 5e-2, "attention": 1e-2},
    "bf16": {"txt2img": 2e-1, "unet-step": 2e-1, "vae-decode": 2e-1, "text-encode": 2e-1, "attention": 5e-2},
}


def tolerance(case: Case) -> float:
    family = "attention" if case.kind in ATTENTION_SHAPES else case.kind
    return TOLERANCES[case.precision][family]
