"""A small factory of synthetic pytest-benchmark JSON runs in the perf_tests result format,
for the gate's tests (test_baselines.py, test_compare_cli.py). Not collected by pytest.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

import numpy as np

from perf_tests.records.names import parse_name

CASES = (
    "test_txt2img[tiny-original-eager-bs1-fp32]",
    "test_txt2img[tiny-sdpa-math-eager-bs1-fp32]",
    "test_unet_step[tiny-sdpa-eager-bs2-fp32]",
    "test_unet_step[tiny-sdpa-compile-bs1-fp32]",
)

MACHINE = {
    "node": "ci-runner", "machine": "x86_64", "processor": "x86_64", "python_implementation": "CPython",
    "python_version": "3.11.2", "system": "Linux", "release": "6.1", "cpu": {"brand_raw": "Intel Xeon"},
    "device_name": "Intel(R) Xeon(R) Processor", "device_slug": "cpu-intel-xeon-processor",
    "device_type": "cpu",
    "gpu_count": 0, "driver_version": None, "cuda_version": None, "cudnn_version": None,
    "torch_version": "2.14.1", "open_clip_version": "3.3.0", "cpu_model": "Intel(R) Xeon(R) Processor",
    "git_commit": "0123456789abcdef", "env": "torch2", "machine_id": "a1b2c3d4e5f6",
}


def case_fields(name: str) -> dict:
    """The extra_info.case the suite records for ``name`` (steps and size as for the tiny profile)."""
    return dataclasses.replace(parse_name(name), steps=5, height=384, width=384).as_dict()


def benchmark(name: str, samples, **extra) -> dict:
    case = case_fields(name)
    compiled = case["compile"] != "eager"
    info = {
        "case": case, "definition_hash": f"{abs(hash(name)) % 16**16:016x}",
        "compile_time_s": 12.0 if compiled else None, "graph_breaks": 0 if compiled else None,
        "recompiles": 0 if compiled else None, "peak_memory_bytes": None, "peak_reserved_bytes": None,
        "correct": True, "max_abs_error": 0.0, "tolerance": 1e-4, "attention_used": case["attention"],
        "env": "torch2", "iterations": 1, "compile_cache": "cold" if compiled else None,
        "vae_attention_used": None,
    }
    info.update(extra)
    data = [float(x) for x in samples]
    return {
        "group": None, "name": name, "fullname": f"perf_tests/test_x.py::{name}", "params": None,
        "param": name.split("[")[1][:-1], "extra_info": info,
        "options": {"disable_gc": True, "timer": "perf_counter", "min_rounds": len(data)},
        "stats": {"min": min(data), "max": max(data), "mean": statistics.fmean(data),
                  "median": statistics.median(data), "rounds": len(data), "iterations": 1, "data": data},
    }


def run_doc(seed: int = 0, rounds: int = 20, *, slow: dict | None = None, cases=CASES, machine=None,
            extra: dict | None = None, sigma: float = 0.02, skipped: dict | None = None,
            failed: dict | None = None, perf_tests: bool = True) -> dict:
    """One run: each case ~lognormal around its own scale; ``slow`` maps case name -> time factor;
    ``extra`` maps case name -> extra_info overrides; ``skipped`` name -> reason and ``failed`` name ->
    (kind, reason) are recorded in the ``perf_tests`` section (and selected) but not measured."""
    rng = np.random.default_rng(seed)
    skipped, failed = skipped or {}, failed or {}
    benches = []
    for i, name in enumerate(cases):
        samples = (0.1 + 0.05 * i) * (slow or {}).get(name, 1.0) * rng.lognormal(0.0, sigma, rounds)
        if name not in skipped and name not in failed:
            benches.append(benchmark(name, samples, **(extra or {}).get(name, {})))
    doc = {"machine_info": {**MACHINE, **(machine or {})}, "commit_info": {"id": "0123456789abcdef"},
           "benchmarks": benches, "datetime": "2026-11-26T07:00:00+00:00", "version": "5.3.1"}
    if perf_tests:
        doc["perf_tests"] = {
            "harness_version": 2, "grid_name": "custom", "grid": {}, "selected": list(cases),
            "skipped": [{"name": n, "reason": r} for n, r in skipped.items()],
            "failed": [{"name": n, "kind": k, "reason": r} for n, (k, r) in failed.items()],
            "canary": {"workload": "matmul", "samples": [
                {"t": float(i), "seconds": 0.001 * (1 + 0.01 * i), "before": n} for i,
                n in enumerate(cases)]},
            "inductor_cache": {"mode": "cold", "dir": "/tmp/inductor"},
        }
    return doc


def write_run(path: Path, seed: int = 0, **kw) -> Path:
    path = Path(path)
    path.write_text(json.dumps(run_doc(seed, **kw)))
    return path


def journal_lines(doc: dict, *, end: bool = True) -> list[str]:
    """The journal the suite would have written for ``doc``, one JSON line per event."""
    section = doc.get("perf_tests", {})
    lines = [{"type": "start", "machine_info": doc["machine_info"], "datetime": doc.get("datetime"),
              "perf_tests": {k: v for k, v in section.items() if k in ("grid", "grid_name", "selected")}}]
    lines += [{"type": "case", "benchmark": b} for b in doc["benchmarks"]]
    lines += [{"type": "skip", **s} for s in section.get("skipped", [])]
    lines += [{"type": "fail", **f} for f in section.get("failed", [])]
    lines += [{"type": "canary", **c} for c in section.get("canary", {}).get("samples", [])]
    lines += [{"type": "end"}] if end else []
    return [json.dumps(line) + "\n" for line in lines]


def write_journal(path: Path, seed: int = 0, *, end: bool = True, **kw) -> Path:
    path = Path(path)
    path.write_text("".join(journal_lines(run_doc(seed, **kw), end=end)))
    return path
