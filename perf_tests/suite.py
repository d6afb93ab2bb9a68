"""The perf session: options -> cases, and how one case is run (skip, build, check, time, record).

conftest.py is the pytest glue around this object; everything a case records in ``extra_info`` is
assembled in :meth:`PerfSession.run`.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from perf_tests import cases as C
from perf_tests.machine import env_label
from perf_tests.timing import is_oom, measure, sync
from perf_tests.workloads import ModelCache, make_workload
from sd.capabilities import DeviceCapabilities, probe_device
from sd.errors import AttentionUnavailable, CompileUnavailable


@dataclass(frozen=True)
class Options:
    device: str
    grid: C.GridDefaults  # device defaults with the command line applied
    steps: int | None = None
    rounds: int | None = None  # None: per-kind default of the grid
    warmup_rounds: int | None = None
    ckpt: str | None = None
    delay_s: float = 0.0  # timing-honesty check: known delay added to every timed round

    @classmethod
    def parse(cls, get, cuda_available: bool) -> Options:
        """``get(name)`` returns the raw command-line value (None when not given)."""
        device = get("perf_device") or ("cuda" if cuda_available else "cpu")
        d = C.default_grid(torch.device(device).type)
        profile = get("perf_profile") or d.profile
        if profile not in C.PROFILES:
            raise ValueError(f"unknown --profile {profile!r}; choose from {', '.join(C.PROFILES)}")
        compile_given = C.split_csv(get("perf_compile"))
        batch_given = C.split_csv(get("perf_batch_size"))
        threads = get("perf_threads")
        grid = C.GridDefaults(
            profile=profile,
            attention=C.split_csv(get("perf_attention")) or d.attention,
            compile=C.check_compile(compile_given or d.compile),
            batch_sizes=tuple(int(b) for b in (batch_given or d.batch_sizes)),
            precisions=C.split_csv(get("perf_precision")) or d.precisions,
            kinds=C.normalize_kinds(C.split_csv(get("perf_case_kind")) or d.kinds),
            rounds=d.rounds,
            warmup_rounds=d.warmup_rounds,
            kind_compile={} if compile_given else d.kind_compile,
            threads=d.threads if threads is None else (threads or None),
            kind_batch_sizes={} if batch_given else d.kind_batch_sizes,
        )
        for p in grid.precisions:
            if p not in C.PRECISIONS:
                raise ValueError(f"unknown --precision {p!r}; choose from {', '.join(C.PRECISIONS)}")
        for a in grid.attention:
            if a not in C.ATTENTION_BACKENDS:
                raise ValueError(
                    f"unknown --attention {a!r}; choose from {', '.join(C.ATTENTION_BACKENDS)}")
        return cls(
            device=device,
            grid=grid,
            steps=get("perf_steps"),
            rounds=get("perf_rounds"),
            warmup_rounds=get("perf_warmup_rounds"),
            ckpt=get("perf_ckpt"),
            delay_s=get("perf_inject_delay") or 0.0,
        )


class PerfSession:
    def __init__(self, options: Options, caps: DeviceCapabilities | None = None):
        self.options = options
        self.device = options.device
        self._caps = caps
        self.cache = ModelCache(options.device, options.ckpt, compile_vae=self.compile_vae)
        self.weights = "checkpoint" if options.ckpt else "random"
        self._reference_outputs: dict[tuple, torch.Tensor] = {}

    @property
    def caps(self) -> DeviceCapabilities:
        if self._caps is None:
            self._caps = probe_device(self.device)
        return self._caps

    def cases(self, kind: str) -> list[C.Case]:
        g = self.options.grid
        if kind not in g.kinds:
            return []
        return C.build_cases(kind, g.profile, g.attention, g.compile_for(kind), g.batch_sizes_for(kind), g.precisions,
                             self.options.steps)

    @property
    def compile_vae(self) -> bool:
        """Compile the VAE decoder too when the vae-decode kind has compiled cases in this grid."""
        g = self.options.grid
        return "vae-decode" in g.kinds and any(c != "eager" for c in g.compile_for("vae-decode"))

    def rounds(self, case: C.Case) -> tuple[int, int]:
        g = self.options.grid
        rounds = self.options.rounds or g.rounds[case.kind]
        warmup = self.options.warmup_rounds if self.options.warmup_rounds is not None else g.warmup_rounds[case.kind]
        return rounds, warmup

    # -----------------------------------------------------------------------------------------------------

    def run(self, benchmark, case: C.Case) -> None:
        reason = C.skip_reason(case, self.caps)
        if reason:
            pytest.skip(reason)
        try:
            self._run(benchmark, case)
        except Exception as exc:
            if is_oom(exc):
                self.cache.release()
                torch.cuda.empty_cache()
                pytest.skip(f"CUDA out of memory for {case.name} (the run goes on): {str(exc).splitlines()[0]}")
            if isinstance(exc, (AttentionUnavailable, CompileUnavailable)):
                pytest.skip(f"{type(exc).__name__}: {exc}")
            raise

    def _run(self, benchmark, case: C.Case) -> None:
        fn, built = make_workload(self.cache, case)
        rounds, warmup = self.rounds(case)
        compiled = case.compiled
        info = benchmark.extra_info
        info.update(
            case=case.as_dict(),
            definition_hash=C.definition_hash(case, self.weights),
            attention_used=built.attention_used,
            env=env_label(torch.__version__),
            device=self.device,
            weights=self.weights,
            rounds=rounds,
            warmup_rounds=max(warmup, 1) + (1 if compiled else 0),
            build_s=built.build_s,
            threads=torch.get_num_threads(),
        )
        if compiled:
            info["compile_setup_s"] = built.compile_setup_s
            info["compiled_parts"] = built.compiled_parts
            # The compiled model is shared between kinds: a later case may find its graphs compiled.
            info["compiled_model_first_used_by"] = built.cases_run[0] if built.cases_run else None
        built.cases_run.append(case.name)

        measured = measure(
            benchmark, fn, device=self.device, rounds=rounds, warmup_rounds=warmup, compiled=compiled,
            check=lambda out: self.check(case, out), delay_s=self.options.delay_s,
        )
        info.update(measured.extra)

    # -----------------------------------------------------------------------------------------------------

    def reference_output(self, case: C.Case) -> torch.Tensor:
        ref = case.reference()
        key = (ref.kind, ref.profile, ref.batch_size, ref.steps)
        if key not in self._reference_outputs:
            fn, _ = make_workload(self.cache, ref)
            out = fn()
            sync(self.device)
            self._reference_outputs[key] = out.detach()
        return self._reference_outputs[key]

    def check(self, case: C.Case, out: torch.Tensor) -> dict:
        """Compare with the original/eager/fp32 output of the same inputs; pytest.fail when wrong."""
        out = out.detach()
        if not bool(torch.isfinite(out).all()):
            pytest.fail(f"{case.name}: output has non-finite values (nan/inf); not timed", pytrace=False)
        ref_key = (case.kind, case.profile, case.batch_size, case.steps)
        if not case.optimized and ref_key not in self._reference_outputs:
            self._reference_outputs[ref_key] = out  # this case is the reference
            return {"correct": True, "max_abs_error": 0.0, "tolerance": C.tolerance(case), "reference": True}
        ref = self.reference_output(case)
        if not bool(torch.isfinite(ref).all()):
            pytest.fail(f"{case.name}: the reference output has non-finite values; not timed", pytrace=False)
        error = (out.float() - ref.float()).abs().max().item()
        tol = C.tolerance(case) * max(1.0, ref.float().abs().max().item())
        if not error <= tol:
            pytest.fail(
                f"{case.name}: WRONG OUTPUT — max abs error {error:.3g} against the original/eager/fp32 "
                f"reference exceeds the {case.precision} tolerance {tol:.3g}; not timed, not a baseline",
                pytrace=False,
            )
        return {"correct": True, "max_abs_error": error, "tolerance": tol, "reference": not case.optimized}
