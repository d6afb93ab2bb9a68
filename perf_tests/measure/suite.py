"""The perf session: options -> cases, and how one case is run (skip, build, check, time, record).

conftest.py is the pytest glue around this object. Everything a case records in ``extra_info`` is
assembled in :meth:`PerfSession.run`; every skip, failure (with its kind), canary measurement and finished
case goes to the run's journal the moment it happens.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from perf_tests.measure import cases as C
from perf_tests.measure import kernels as K
from perf_tests.measure import turns
from perf_tests.measure.canary import Canary
from perf_tests.measure.gpu_state import Probe
from perf_tests.measure.timing import MIN_ROUND_S, cuda_event, is_oom, measure, sync
from perf_tests.measure.workloads import ModelCache, make_workload
from perf_tests.records.names import env_label
from sd.device import DeviceCapabilities, probe_device
from sd.errors import AttentionUnavailable, CompileUnavailable
from sd.precision import precision_dtype

FAILURE_KINDS = ("wrong-output", "non-finite", "error", "oom")
# Kinds whose rounds are timed on the device too (CUDA events), beside wall time: the model's parts. A
# txt2img call's host work (tokenizing, the sampler's Python loop) is part of what a user waits for.
DEVICE_TIMED_KINDS = tuple(k for k in C.KINDS if k != "txt2img")
INDUCTOR_CACHE_DIR = os.path.join("~", ".cache", "sd-perf", "inductor")
# Command-line options that choose grid axes: giving any of them makes the grid "custom".
AXIS_OPTIONS = ("perf_profile", "perf_attention", "perf_compile", "perf_batch_size", "perf_precision",
                "perf_case_kind", "perf_memory_format", "perf_projections")


class OptionError(ValueError):
    """A suite option with a value that cannot be run; the message names the option and the fix."""


def _parsed(get, name: str, option: str, what: str, fix: str, convert, ok, requirement: str):
    raw = get(name)
    if raw is None:
        return None
    try:
        value = convert(str(raw).strip())
    except ValueError:
        value = None
    if value is None or not ok(value):  # ok(nan) is False
        raise OptionError(f"{option} {raw!r}: {what} must be {requirement}; {fix}")
    return value


def _whole(get, name: str, option: str, what: str, fix: str, minimum: int = 1) -> int | None:
    return _parsed(get, name, option, what, fix, int, lambda v: v >= minimum,
                   f"a whole number of at least {minimum}")


def _number(get, name: str, option: str, what: str, fix: str, *, positive: bool) -> float | None:
    if positive:
        return _parsed(get, name, option, what, fix, float, lambda v: v > 0, "a number greater than 0")
    return _parsed(get, name, option, what, fix, float, lambda v: v >= 0, "a number 0 or more")


def _choice(get, name: str, option: str, allowed: tuple, default: str) -> str:
    raw = get(name)
    if raw is None:
        return default
    value = str(raw).strip()
    if value not in allowed:
        raise OptionError(f"{option} {raw!r} is not a choice; choose one of {', '.join(allowed)} (default "
                          f"{default})")
    return value


def _subset(get, name: str, option: str, allowed: tuple) -> tuple | None:
    raw = get(name)
    if raw is None:
        return None
    values = C.split_csv(raw)
    if not values:
        raise OptionError(f"{option} is empty; give a comma-separated list of: {', '.join(allowed)}")
    for v in values:
        if v not in allowed:
            raise OptionError(f"unknown {option} value {v!r}; choose from {', '.join(allowed)}")
    return tuple(dict.fromkeys(values))


def _device(get, cuda_available: bool) -> str:
    raw = get("perf_device")
    if raw is None:
        return "cuda" if cuda_available else "cpu"
    value = str(raw).strip()
    try:
        device = torch.device(value)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise OptionError(f"--device {raw!r}: give cpu, cuda or cuda:N")
    if device.type == "cuda" and not cuda_available:
        raise OptionError(f"--device {raw!r}: this PyTorch sees no CUDA device; use --device cpu or run on a "
                          "GPU")
    return value


def _project_points(points: dict, attention: tuple | None, compile_modes: tuple | None) -> dict:
    """A focused grid's per-kind (attention, compile) pairs once the command line gives one axis: the
    given values, each with the other axis's values that kind uses (``--attention sdpa-flash`` measures
    the UNet step eager and compiled, the attention shape eager only, as the gate does). Both axes given:
    the full cross product."""
    if attention and compile_modes:
        return {}
    if attention:
        return {k: tuple((a, c) for a in attention for c in dict.fromkeys(p[1] for p in v)) for k,
                v in points.items()}
    if compile_modes:
        return {k: tuple((a, c) for a in dict.fromkeys(p[0] for p in v) for c in compile_modes)
                for k, v in points.items()}
    return dict(points)


@dataclass(frozen=True)
class Options:
    device: str
    grid: C.GridDefaults  # the named grid with the command line applied
    steps: int | None = None  # None: the profile's
    rounds: int | None = None  # None: per-kind default of the grid
    warmup_rounds: int | None = None  # None: per-kind default of the grid
    ckpt: str | None = None
    delay_s: float = 0.0  # timing-honesty check: known delay added to every timed call
    min_round_s: float | None = None  # None: timing.MIN_ROUND_S of the device type
    canary: bool = True
    inductor_cache: str = "warm"  # "warm" | "cold": the state each measured compilation starts from
    inductor_cache_dir: str = os.path.expanduser(INDUCTOR_CACHE_DIR)

    @classmethod
    def parse(cls, get, cuda_available: bool) -> Options:
        """``get(name)`` returns the raw command-line string (None when not given). Raises OptionError."""
        device = _device(get, cuda_available)
        device_type = torch.device(device).type
        grid_name = _choice(get, "perf_grid", "--grid", C.GRID_NAMES, "gate")
        d = C.grid(grid_name, device_type)
        profile = _choice(get, "perf_profile", "--profile", tuple(C.PROFILES), d.profile)
        attention = _subset(get, "perf_attention", "--attention", C.ATTENTION_BACKENDS)
        compile_given = _subset(get, "perf_compile", "--compile", C.COMPILE_MODES)
        precisions = _subset(get, "perf_precision", "--precision", C.PRECISIONS)
        kinds = C.split_csv(get("perf_case_kind"))
        if get("perf_case_kind") is not None:
            if not kinds:
                raise OptionError("--case-kind is empty; give a comma-separated list of: "
                                  f"{', '.join(C.KINDS)}")
            try:
                kinds = C.normalize_kinds(kinds)
            except ValueError as exc:
                raise OptionError(f"--case-kind: {exc}") from None
        batch_sizes = None
        if get("perf_batch_size") is not None:
            raw = C.split_csv(get("perf_batch_size")) or ("",)
            if not all(b.isdigit() and int(b) >= 1 for b in raw):
                raise OptionError(f"--batch-size {get('perf_batch_size')!r}: give comma-separated whole "
                                  "numbers "
                                  "of at least 1, e.g. --batch-size 1,4")
            batch_sizes = tuple(dict.fromkeys(int(b) for b in raw))
        threads = d.threads
        raw_threads = get("perf_threads")
        if raw_threads is not None and str(raw_threads).strip() != "auto":
            threads = _whole(get, "perf_threads", "--threads", "the thread count",
                             "or say --threads auto to keep torch's default")
        elif raw_threads is not None:
            threads = None
        custom = any(get(name) is not None for name in AXIS_OPTIONS)
        grid = C.GridDefaults(
            name="custom" if custom else d.name,
            profile=profile,
            attention=attention or d.attention,
            compile=compile_given or d.compile,
            batch_sizes=batch_sizes or d.batch_sizes,
            precisions=precisions or d.precisions,
            kinds=kinds or d.kinds,
            rounds=d.rounds,
            warmup_rounds=d.warmup_rounds,
            kind_compile={} if compile_given else d.kind_compile,
            threads=threads,
            kind_batch_sizes={} if batch_sizes else d.kind_batch_sizes,
            kind_points=_project_points(d.kind_points, attention, compile_given),
            memory_formats=_subset(get, "perf_memory_format", "--memory-format", C.MEMORY_FORMATS)
            or d.memory_formats,
            projections=_subset(get, "perf_projections", "--projections", C.PROJECTIONS) or d.projections,
        )
        min_round_ms = _number(get, "perf_min_round_ms", "--min-round-ms",
                               "the shortest round (milliseconds)",
                               f"omit it for the default ({MIN_ROUND_S['cpu'] * 1e3:g} ms on a CPU, "
                               f"{MIN_ROUND_S['cuda'] * 1e3:g} ms on CUDA)", positive=True)
        # An explicit folder, else the one the caller's environment names (``python -m perf_tests run``
        # gives each side of an A/B its own), else the suite's per-user folder.
        cache_dir = get("perf_inductor_cache_dir") or os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        return cls(
            device=device,
            grid=grid,
            steps=_whole(get, "perf_steps", "--steps", "the number of txt2img sampling steps",
                         "omit --steps for the profile's own (" + ", ".join(
                             f"{p.name}: {p.steps}" for p in C.PROFILES.values()) + ")"),
            rounds=_whole(get, "perf_rounds", "--rounds", "the number of timed rounds per case",
                          "omit --rounds for the grid's per-kind default (5-20)"),
            warmup_rounds=_whole(get, "perf_warmup_rounds", "--warmup-rounds",
                                 "the number of untimed calls before the rounds (the first is the "
                                 "correctness "
                                 "check)", "omit it for the grid's per-kind default"),
            ckpt=get("perf_ckpt"),
            delay_s=_number(get, "perf_inject_delay", "--inject-delay", "the injected delay (seconds)",
                            "use 0 or omit it for no delay", positive=False) or 0.0,
            min_round_s=None if min_round_ms is None else min_round_ms / 1e3,
            canary=_choice(get, "perf_canary", "--canary", ("on", "off"), "on") == "on",
            inductor_cache=_choice(get, "perf_inductor_cache", "--inductor-cache", ("warm", "cold"), "warm"),
            inductor_cache_dir=os.path.abspath(os.path.expanduser(cache_dir or INDUCTOR_CACHE_DIR)),
        )

    def perf_tests_section(self) -> dict:
        """The run-level part of the result file's ``perf_tests`` section that options decide."""
        return {
            "harness_version": C.HARNESS_VERSION,
            "grid_name": self.grid.name,
            "grid": self.grid.as_dict(),
            "inductor_cache": {"mode": self.inductor_cache, "dir": self.inductor_cache_dir},
        }


class PerfSession:
    def __init__(self, options: Options, caps: DeviceCapabilities | None = None,
                 write: Callable[[dict], None] | None = None):
        self.options = options
        self.device = options.device
        self._caps = caps
        self._write = write or (lambda record: None)  # the journal's writer
        self.cache = ModelCache(options.device, options.ckpt, compile_vae=self.compile_vae)
        self.weights = "checkpoint" if options.ckpt else "random"
        self._reference_outputs: dict[tuple, torch.Tensor] = {}  # kept on the CPU
        self.skipped: dict[str, str] = {}
        self.failed: dict[str, dict] = {}
        self.canary_samples: list[dict] = []
        self._canary: Canary | None = None
        self._gpu: Probe | None = None
        self._gpu_unavailable: str | None = None
        if self.device.startswith("cuda"):
            index = int(self.device.partition(":")[2] or torch.cuda.current_device())
            self._gpu, self._gpu_unavailable = Probe.open(index)
        self._t0 = time.perf_counter()

    @property
    def caps(self) -> DeviceCapabilities:
        if self._caps is None:
            self._caps = probe_device(self.device)
        return self._caps

    def set_journal(self, write: Callable[[dict], None]) -> None:
        self._write = write

    def cases(self, kind: str) -> list[C.Case]:
        return self.options.grid.cases(kind, self.options.steps)

    @property
    def compile_vae(self) -> bool:
        """Compile the VAE decoder too when the vae-decode kind has compiled cases in this grid."""
        return any(c.compiled for c in self.cases("vae-decode"))

    def rounds(self, case: C.Case) -> tuple[int, int]:
        g = self.options.grid
        rounds = self.options.rounds or g.rounds[case.kind]
        warmup = self.options.warmup_rounds or g.warmup_rounds[case.kind]
        return rounds, warmup

    # -----------------------------------------------------------------------------------------------------
    # Records: every one goes to the journal at once

    def record_skip(self, name: str, reason: str) -> None:
        if name not in self.skipped:
            self.skipped[name] = reason
            self._write({"type": "skip", "name": name, "reason": reason})

    def record_failure(self, name: str, reason: str, kind: str) -> None:
        assert kind in FAILURE_KINDS, kind
        if name not in self.failed:
            self.failed[name] = {"name": name, "reason": reason, "kind": kind}
            self._write({"type": "fail", "name": name, "reason": reason, "kind": kind})

    def canary(self, before: str | None) -> None:
        """One canary measurement (``before``: the case about to run; None at the end of the run)."""
        if not self.options.canary:
            return
        if self._canary is None:
            self._canary = Canary(self.device, precision_dtype(self.options.grid.precisions[0]))
        sample = {"t": time.perf_counter() - self._t0, "seconds": self._canary.measure(), "before": before}
        self.canary_samples.append(sample)
        self._write({"type": "canary", **sample})

    def canary_section(self) -> dict | None:
        if self._canary is None:
            return None
        return {"workload": self._canary.workload, "samples": list(self.canary_samples)}

    def _skip(self, case: C.Case, reason: str):
        self.record_skip(case.name, reason)
        pytest.skip(reason)

    def _fail(self, case: C.Case, kind: str, reason: str):
        self.record_failure(case.name, reason, kind)
        pytest.fail(reason, pytrace=False)

    # -----------------------------------------------------------------------------------------------------

    def run(self, benchmark, case: C.Case) -> None:
        reason = C.skip_reason(case, self.caps)
        if reason:
            self._skip(case, reason)
        self.canary(before=case.name)
        gpu_before = self._gpu.snapshot() if self._gpu else None
        try:
            self._run(benchmark, case)
        except (AttentionUnavailable, CompileUnavailable) as exc:
            self._skip(case, f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            first_line = (str(exc).strip().splitlines() or [""])[0]
            if is_oom(exc):
                self.cache.release()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self._fail(case, "oom", f"{case.name}: out of memory (the run goes on): {first_line}")
            self.record_failure(case.name, f"{type(exc).__name__}: {first_line}", "error")
            raise
        # clocks, heat and throttling while the case ran (perf_tests.measure.gpu_state)
        if gpu_before is not None:
            benchmark.extra_info["gpu_state"] = Probe.case_state(gpu_before, self._gpu.snapshot())
        elif self._gpu_unavailable:
            benchmark.extra_info["gpu_state"] = {"unavailable": self._gpu_unavailable}
        self._write({"type": "case", "benchmark": benchmark.stats.as_dict(include_data=True)})

    def _run(self, benchmark, case: C.Case) -> None:
        fn, built = make_workload(self.cache, case)
        rounds, warmup = self.rounds(case)
        info = benchmark.extra_info
        info.update(
            case=case.as_dict(),
            definition_hash=C.definition_hash(case, self.weights),
            attention_used=built.attention_used,
            vae_attention_used=built.vae_attention_used,
            env=env_label(torch.__version__),
            device=self.device,
            weights=self.weights,
            rounds=rounds,
            warmup_rounds=max(warmup, 1) + (1 if case.compiled else 0),
            build_s=built.build_s,
            threads=torch.get_num_threads(),
        )
        if case.compiled:
            info["compile_setup_s"] = built.compile_setup_s
            info["compiled_parts"] = built.compiled_parts
        info.update(measure(
            benchmark, fn, device=self.device, rounds=rounds, warmup_rounds=warmup,
            min_round_s=self.options.min_round_s, compiled=case.compiled,
            compile_cache=self.options.inductor_cache if case.compiled else None,
            cache_dir=self.options.inductor_cache_dir,
            check=lambda out: self.check(case, out), delay_s=self.options.delay_s,
            after_round=turns.pass_turn if turns.active() else None,
            kernels=lambda f: self.attention_kernels(case, built, f),
            events=cuda_event if self.device.startswith("cuda") and case.kind in DEVICE_TIMED_KINDS else None,
        ))
        if turns.active():
            # its rounds alternated with the A/B partner's (perf_tests.measure.turns)
            info["interleaved"] = True
        elif turns.alone_reason():
            info["alone"] = turns.alone_reason()  # one of an A/B pair, measured after its partner went

    def attention_kernels(self, case: C.Case, built, fn) -> dict:
        """The SDPA kernels one profiled call of ``fn`` ran, per model part (perf_tests.measure.kernels). A
        profiler that cannot run here is recorded as such; the case is measured all the same."""
        parts = None if case.kind in C.ATTENTION_SHAPES else K.model_parts(built.model)
        try:
            return K.attention_kernels(fn, self.device, parts, default_part="unet")
        except Exception as exc:  # the profiler's failure (no CUPTI, ...) is not the case's
            first_line = (str(exc).strip().splitlines() or [""])[0]
            error = f"{type(exc).__name__}: {first_line}"
            return {"attention_kernels": None, "attention_kernels_error": error}

    # -----------------------------------------------------------------------------------------------------

    def reference_output(self, case: C.Case) -> torch.Tensor:
        ref = case.reference()
        key = (ref.kind, ref.profile, ref.batch_size, ref.steps)
        if key not in self._reference_outputs:
            fn, _ = make_workload(self.cache, ref)
            out = fn()
            sync(self.device)
            self._reference_outputs[key] = out.detach().float().cpu()
            del out
            # The reference model leaves the device, so that a case's peak memory is its own.
            self.cache.park_reference()
        return self._reference_outputs[key]

    def check(self, case: C.Case, out: torch.Tensor) -> dict:
        """Compare with the original/eager/fp32 output of the same inputs; a recorded failure when wrong."""
        out = out.detach()
        if not bool(torch.isfinite(out).all()):
            self._fail(case, "non-finite", f"{case.name}: output has non-finite values (nan/inf); not timed")
        ref_key = (case.kind, case.profile, case.batch_size, case.steps)
        if not case.optimized and ref_key not in self._reference_outputs:
            self._reference_outputs[ref_key] = out.float().cpu()  # this case is the reference
            return {"correct": True, "max_abs_error": 0.0, "tolerance": C.tolerance(case), "reference": True}
        ref = self.reference_output(case)
        if not bool(torch.isfinite(ref).all()):
            self._fail(case, "non-finite",
                       f"{case.name}: the reference output has non-finite values; not timed")
        error = (out.float().cpu() - ref).abs().max().item()
        tol = C.tolerance(case) * max(1.0, ref.abs().max().item())
        if not error <= tol:
            self._fail(case, "wrong-output",
                       f"{case.name}: WRONG OUTPUT — max abs error {error:.3g} against the "
                       "original/eager/fp32 "
                       f"reference exceeds the {case.precision} tolerance {tol:.3g}; not timed, not a "
                       "baseline")
        return {"correct": True, "max_abs_error": error, "tolerance": tol, "reference": not case.optimized}
