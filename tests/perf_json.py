"""A small factory of synthetic pytest-benchmark JSON runs in the perf_tests result format,
for the gate's tests (test_baselines.py, test_compare_cli.py). Not collected by pytest.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np

CASES = (
    "test_txt2img[tiny-original-eager-bs1-fp32]",
    "test_txt2img[tiny-sdpa-math-eager-bs1-fp32]",
    "test_unet_step[tiny-sdpa-eager-bs2-fp32]",
    "test_unet_step[tiny-sdpa-compile-bs1-fp32]",
)

MACHINE = {
    "node": "ci-runner", "machine": "x86_64", "processor": "x86_64", "python_implementation": "CPython",
    "python_version": "3.11.2", "system": "Linux", "release": "6.1", "cpu": {"brand_raw": "Intel Xeon"},
    "device_name": "Intel(R) Xeon(R) Processor", "device_slug": "cpu-intel-xeon-processor", "device_type": "cpu",
    "gpu_count": 0, "driver_version": None, "cuda_version": None, "cudnn_version": None,
    "torch_version": "2.14.1", "open_clip_version": "3.3.0", "cpu_model": "Intel(R) Xeon(R) Processor",
    "git_commit": "0123456789abcdef", "env": "torch2",
}


def case_fields(name: str) -> dict:
    func, cid = name[:-1].split("[")
    profile = next(p for p in ("sd21-base", "sd21-v", "tiny") if cid.startswith(p + "-"))
    rest = cid[len(profile) + 1:]
    for attention in ("sdpa-math", "original", "sdpa"):
        if rest.startswith(attention + "-"):
            break
    compile_, bs, precision = rest[len(attention) + 1:].split("-")
    return {"kind": func.removeprefix("test_").replace("_", "-"), "profile": profile, "attention": attention,
            "compile": compile_, "batch_size": int(bs[2:]), "precision": precision, "steps": 5,
            "height": 384, "width": 384}


def benchmark(name: str, samples, **extra) -> dict:
    case = case_fields(name)
    compiled = case["compile"] != "eager"
    info = {
        "case": case, "definition_hash": f"{abs(hash(name)) % 16**16:016x}",
        "compile_time_s": 12.0 if compiled else None, "graph_breaks": 0 if compiled else None,
        "recompiles": 0 if compiled else None, "peak_memory_bytes": None, "peak_reserved_bytes": None,
        "correct": True, "max_abs_error": 0.0, "tolerance": 1e-4, "attention_used": case["attention"],
        "env": "torch2",
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
            extra: dict | None = None, sigma: float = 0.02) -> dict:
    """One run: each case ~lognormal around its own scale; ``slow`` maps case name -> time factor;
    ``extra`` maps case name -> extra_info overrides."""
    rng = np.random.default_rng(seed)
    benches = []
    for i, name in enumerate(cases):
        factor = (slow or {}).get(name, 1.0)
        samples = (0.1 + 0.05 * i) * factor * rng.lognormal(0.0, sigma, rounds)
        benches.append(benchmark(name, samples, **(extra or {}).get(name, {})))
    return {"machine_info": {**MACHINE, **(machine or {})}, "commit_info": {"id": "0123456789abcdef"},
            "benchmarks": benches, "datetime": "2026-11-26T07:00:00+00:00", "version": "5.3.1"}


def write_run(path: Path, seed: int = 0, **kw) -> Path:
    path = Path(path)
    path.write_text(json.dumps(run_doc(seed, **kw)))
    return path
