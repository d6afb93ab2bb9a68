"""The operator-level diff of one benchmark case between two trees: which operators got slower.

``python -m perf_tests explain REF CASE`` profiles the case with ``torch.profiler`` in the current tree and
in REF (checked out into a temporary worktree), both with this Python environment, in separate processes
interleaved A, B, A, B as in A/B mode, and lists the operators whose self time per step grew most: on a
CPU the aten operators (and, for a compiled case, Inductor's generated ``cpp_fused_*`` kernels), on a GPU
the CUDA kernels (Triton kernels for a compiled case). Nothing here is timed for a verdict: the profiler
adds overhead, so the figures say *where* time went, while the gate's timed rounds say *how much*.

Each profiled process builds the case as the suite does, runs it ``warmup`` times (compiling, when the
case is compiled), then profiles ``calls`` calls and writes a Chrome trace (open in chrome://tracing or
https://ui.perfetto.dev) and a summary JSON beside it, under ``<output-dir>/<case>/``.

This file is also the profiled process's entry point, loaded by path into a process whose ``sys.path``
starts with the other tree (that tree may predate this module). So its module-level imports are the
standard library only, the tree's own ``perf_tests``/``sd`` are imported inside :func:`build_case`, and
this package's helpers are imported inside the functions that run in the parent.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_CALLS = 5  # profiled calls per process
DEFAULT_WARMUP = 2  # untimed calls before profiling (the first compiles a compiled case)
DEFAULT_RUNS = 2  # processes per side, interleaved
TOP = 10

# Profiler event names that come from a compiled graph: Inductor's C++ kernels (recorded when
# torch._inductor.config.cpp.enable_kernel_profile is on), its Triton kernels, and the wrapper events.
_COMPILED_RE = re.compile(r"cpp_fused|triton_|CompiledFxGraph|Torch-Compiled Region|CompiledFunction")
# Event names carrying a per-graph hash or a step number: normalised so both sides use one key.
_NAME_SUBS = ((re.compile(r"CompiledFxGraph \w+"), "CompiledFxGraph"), (re.compile(r"ProfilerStep#\d+"),
                                                                        "ProfilerStep"))


# ---------------------------------------------------------------------------------------------------------
# Profiled process (runs inside the tree being profiled)


def build_case(name: str, device: str) -> Callable[[], object]:
    """The case's workload as the suite builds it: the one place coupled to the suite's internals.

    Uses the profiled tree's ``perf_tests.measure.cases`` and ``perf_tests.measure.workloads`` (main's API as
    of this module); the thread count is the suite's grid default for the device.
    """
    import torch

    try:
        from perf_tests.measure import cases as C
        from perf_tests.measure.workloads import ModelCache, make_workload
    except ImportError:  # a tree from before the layers (layout-before-layers)
        from perf_tests import cases as C  # layout-before-layers
        from perf_tests.workloads import ModelCache, make_workload  # layout-before-layers

    parsed = C.parse_name(name)
    case = C.build_cases(parsed.kind, parsed.profile, [parsed.attention], [parsed.compile],
                         [parsed.batch_size],
                         [parsed.precision])[0]
    if hasattr(parsed, "memory_format"):  # trees whose cases have the ladder's axes
        case = dataclasses.replace(case, memory_format=parsed.memory_format, projections=parsed.projections)
    device_type = torch.device(device).type
    # C.grid(name, device_type) in trees with named grids, C.default_grid(device_type) before them
    threads = (C.grid("full", device_type) if hasattr(C, "grid") else C.default_grid(device_type)).threads
    if threads:
        torch.set_num_threads(threads)
    cache = ModelCache(device, compile_vae=case.kind == "vae-decode" and case.compile != "eager")
    fn, _ = make_workload(cache, case)
    return fn


def _operator_table(events, is_cuda: bool) -> dict[str, tuple[float, int]]:
    """name -> (self time in us, calls) of one profiled call. On a GPU the rows are the kernels (and
    memcpy/memset) with their device time; on a CPU the operators with their CPU self time."""
    table: dict[str, tuple[float, int]] = {}
    for e in events:
        if is_cuda and "CUDA" not in str(getattr(e, "device_type", "")):
            continue
        us = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total",
                                                                    0.0)) if is_cuda \
            else e.self_cpu_time_total
        key = e.key
        for pattern, repl in _NAME_SUBS:
            key = pattern.sub(repl, key)
        old_us, old_n = table.get(key, (0.0, 0))
        table[key] = (old_us + us, old_n + e.count)
    return table


def profile_case(name: str, out_stem: Path, calls: int, warmup: int, device: str | None) -> dict:
    """Build, warm up and profile ``calls`` calls of case ``name``; writes ``<stem>.trace.json`` and
    ``<stem>.json`` and returns the summary (self time per step and calls per step of every operator)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    is_cuda = torch.device(device).type == "cuda"
    inductor_config = sys.modules.get("torch._inductor.config")
    if inductor_config is None and hasattr(torch, "compile"):
        import torch._inductor.config as inductor_config
    if inductor_config is not None:  # name the C++ kernels of compiled graphs in the profile (CPU Inductor)
        inductor_config.cpp.enable_kernel_profile = True

    def sync():
        if is_cuda:
            torch.cuda.synchronize(device)

    fn = build_case(name, device)
    for _ in range(max(warmup, 1)):
        fn()
        sync()
    # One profiler cycle per call: each call gets its own operator table, and the per-process figure of an
    # operator is its median over the calls, so a burst of load from a neighbour in one call does not count.
    steps: list[dict[str, tuple[float, int]]] = []
    trace = out_stem.with_name(out_stem.name + ".trace.json")
    out_stem.parent.mkdir(parents=True, exist_ok=True)

    def on_trace_ready(prof) -> None:
        steps.append(_operator_table(prof.key_averages(), is_cuda))
        if len(steps) == calls:  # keep the last call's trace
            prof.export_chrome_trace(str(trace))

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "profiler won't be using warmup": on purpose, the calls were warmed
        with profile(activities=activities, schedule=schedule(wait=0, warmup=0, active=1, repeat=calls),
                     on_trace_ready=on_trace_ready) as prof:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
                sync()
                prof.step()
            wall = (time.perf_counter() - t0) / calls

    names = {n for step in steps for n in step}
    operators = {n: {"self_us": statistics.median(step.get(n, (0.0, 0))[0] for step in steps),
                     "calls": statistics.median(step.get(n, (0.0, 0))[1] for step in steps)} for n in names}
    summary = {
        "case": name,
        "device": device,
        "torch_version": torch.__version__,
        "calls": calls,
        "warmup": warmup,
        "unit": "device self time (us per step)" if is_cuda else "CPU self time (us per step)",
        "step_us": statistics.median(sum(us for us, _ in step.values()) for step in steps),
        "wall_s_per_call": wall,
        "trace": trace.name,
        "operators": operators,
    }
    out_stem.with_name(out_stem.name + ".json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def child_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="perf_tests.tools.explain (profiled process)")
    p.add_argument("--case", required=True)
    p.add_argument("--out-stem", type=Path, required=True)
    p.add_argument("--calls", type=int, default=DEFAULT_CALLS)
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP)
    p.add_argument("--device")
    a = p.parse_args(argv)
    profile_case(a.case, a.out_stem, a.calls, a.warmup, a.device)
    return 0


# The profiled process: `python -c _BOOTSTRAP <this file> <args>` in the profiled tree, so that `sd` and
# `perf_tests` resolve to that tree while this file (and not the tree's version of it, if any) runs.
_BOOTSTRAP = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_perf_explain_child', sys.argv[1])\n"
    "module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "sys.exit(module.child_main(sys.argv[2:]))\n"
)


def tree_env(tree: Path) -> dict:
    """This process's environment with ``tree`` first on PYTHONPATH (the same interpreter and packages)."""
    extra = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *extra])}


def profile_in_tree(tree: Path, name: str, out_stem: Path, calls: int, warmup: int,
                    device: str | None) -> dict:
    """Profile case ``name`` in a separate process running ``tree``'s code; returns its summary."""
    cmd = [sys.executable, "-c", _BOOTSTRAP, str(Path(__file__).resolve()), "--case", name,
           "--out-stem", str(out_stem.resolve()), "--calls", str(calls), "--warmup", str(warmup)]
    if device:
        cmd += ["--device", device]
    res = subprocess.run(cmd, cwd=tree, env=tree_env(tree), capture_output=True, text=True, check=False)
    summary = out_stem.with_name(out_stem.name + ".json")
    if res.returncode != 0 or not summary.is_file():
        tail = "\n".join((res.stderr or res.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"profiling {name} in {tree} failed (exit {res.returncode}):\n{tail}")
    return json.loads(summary.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------
# The diff


@dataclass(frozen=True)
class OperatorRow:
    name: str
    baseline_us: float  # self time per step, mean over the side's processes
    candidate_us: float
    baseline_calls: float  # calls per step
    candidate_calls: float
    baseline_share: float  # of the side's step (sum of all self times)
    candidate_share: float
    compiled: bool  # an event of a compiled graph (Inductor kernel or its wrapper)
    consistent: bool  # every candidate process differs from every baseline process in the same direction

    @property
    def added_us(self) -> float:
        return self.candidate_us - self.baseline_us


@dataclass
class OperatorDiff:
    case: str
    baseline: str  # labels: "main (3f2a1b0c9d8e)", "current tree"
    candidate: str
    device: str = ""
    unit: str = ""
    baseline_step_us: float = 0.0
    candidate_step_us: float = 0.0
    rows: list[OperatorRow] = field(default_factory=list)  # top operators by added time, largest first
    runs: int = 0  # processes per side
    calls: int = 0  # profiled calls per process
    traces: dict[str, list[str]] = field(default_factory=dict)  # side -> Chrome trace paths
    error: str | None = None  # the case could not be profiled on a side: why

    def as_dict(self) -> dict:
        d = asdict(self)
        for row, r in zip(d["rows"], self.rows, strict=True):
            row["added_us"] = r.added_us
        return d

    @classmethod
    def from_dict(cls, d: dict) -> OperatorDiff:
        """The inverse of :meth:`as_dict` (a verdict JSON's ``explain`` entries)."""
        fields = {f.name for f in dataclasses.fields(OperatorRow)}
        rows = [OperatorRow(**{k: v for k, v in r.items() if k in fields}) for r in d.get("rows", [])]
        return cls(**{**{k: v for k, v in d.items() if k != "rows"}, "rows": rows})


def diff_summaries(case: str, baseline: Sequence[dict], candidate: Sequence[dict], top: int = TOP,
                   labels: tuple[str, str] = ("baseline", "candidate")) -> OperatorDiff:
    """Pure: the per-process summaries of both sides -> operators sorted by added self time per step."""
    def mean(xs):
        return sum(xs) / len(xs)

    names = {n for s in (*baseline, *candidate) for n in s["operators"]}
    b_step = mean([s["step_us"] for s in baseline])
    c_step = mean([s["step_us"] for s in candidate])
    rows = []
    for n in names:
        b = [s["operators"].get(n, {}).get("self_us", 0.0) for s in baseline]
        c = [s["operators"].get(n, {}).get("self_us", 0.0) for s in candidate]
        b_us, c_us = mean(b), mean(c)
        rows.append(OperatorRow(
            name=n, baseline_us=b_us, candidate_us=c_us,
            baseline_calls=mean([s["operators"].get(n, {}).get("calls", 0.0) for s in baseline]),
            candidate_calls=mean([s["operators"].get(n, {}).get("calls", 0.0) for s in candidate]),
            baseline_share=b_us / b_step if b_step else 0.0, candidate_share=c_us / c_step if c_step else 0.0,
            compiled=bool(_COMPILED_RE.search(n)),
            consistent=min(c) > max(b) if c_us >= b_us else max(c) < min(b),
        ))
    rows.sort(key=lambda r: r.added_us, reverse=True)
    first = candidate[0]
    return OperatorDiff(case, *labels, device=first["device"], unit=first["unit"], baseline_step_us=b_step,
                        candidate_step_us=c_step, rows=rows[:top], runs=len(candidate), calls=first["calls"])


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def explain_trees(
    baseline: Path, candidate: Path, case_names: Sequence[str], out_dir: Path, *,
    baseline_label: str = "baseline", candidate_label: str = "candidate", runs: int = DEFAULT_RUNS,
    calls: int = DEFAULT_CALLS, warmup: int = DEFAULT_WARMUP, device: str | None = None, top: int = TOP,
    log: Callable[[str], None] = lambda m: None,
) -> list[OperatorDiff]:
    """Profile each case in both trees, ``runs`` processes per side interleaved baseline, candidate, ...;
    a case that cannot be profiled on a side gets a diff with ``error`` set (the others go on)."""
    diffs = []
    for name in case_names:
        folder = out_dir / _slug(name)
        sides: dict[str, list[dict]] = {"baseline": [], "candidate": []}
        try:
            for i in range(1, runs + 1):
                for side, tree in (("baseline", baseline), ("candidate", candidate)):
                    log(f"[explain] {name}: profile {i}/{runs} of {side} ({tree})")
                    sides[side].append(profile_in_tree(tree, name, folder / f"{side}-{i}", calls, warmup,
                                                       device))
        except RuntimeError as exc:
            diffs.append(OperatorDiff(name, baseline_label, candidate_label, error=str(exc)))
            continue
        d = diff_summaries(name, sides["baseline"], sides["candidate"], top, (baseline_label,
                                                                              candidate_label))
        d.traces = {side: [str(folder / s["trace"]) for s in ss] for side, ss in sides.items()}
        diffs.append(d)
    return diffs


def explain_cases(
    ref: str, case_names: Sequence[str], out_dir: Path, *, root: Path | None = None, **kwargs,
) -> list[OperatorDiff]:
    """The gate's entry point: the operator diff of each case, REF (baseline) against the tree at ``root``
    (default: the current repository's working tree). Keyword arguments go to :func:`explain_trees`."""
    from perf_tests.tools.worktree import checkout, repo_root

    root = repo_root(root)
    with checkout(ref, root, prefix="perf-explain-") as tree:
        return explain_trees(tree.path, root, case_names, out_dir,
                             baseline_label=f"{ref} ({tree.commit[:12]})",
                             candidate_label="current tree", **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Rendering


def _ms(us: float) -> str:
    return f"{us / 1000:.3f}"


def _calls(x: float) -> str:
    return f"{x:g}" if x == int(x) else f"{x:.1f}"


_HEAD = ("added ms", "baseline ms", "candidate ms", "calls b/c", "share b/c", "operator")


def _cells(r: OperatorRow) -> tuple:
    mark = "" if r.consistent else " (?)"
    name = r.name + (" [compiled]" if r.compiled else "")
    return (f"{r.added_us / 1000:+.3f}{mark}", _ms(r.baseline_us), _ms(r.candidate_us),
            f"{_calls(r.baseline_calls)}/{_calls(r.candidate_calls)}",
            f"{100 * r.baseline_share:.1f}%/{100 * r.candidate_share:.1f}%", name)


def _title(d: OperatorDiff) -> str:
    return f"{d.case}: {d.candidate} vs {d.baseline}"


def _step_line(d: OperatorDiff) -> str:
    change = d.candidate_step_us / d.baseline_step_us - 1 if d.baseline_step_us else float("nan")
    return (f"step {_ms(d.baseline_step_us)} -> {_ms(d.candidate_step_us)} ms ({change:+.1%}), {d.unit}, "
            f"{d.device}; {d.runs} process(es) x {d.calls} profiled call(s) per side")


_FOOT = ("(?) = the processes of the two sides overlap for this operator: within profiling noise. "
         "ProfilerStep* = time of the step outside any operator (Python, waits). Profiled times include "
         "profiler overhead; the gate's timed rounds give the slowdown itself.")


def render_text(diffs: Sequence[OperatorDiff]) -> str:
    from perf_tests.report.tabular import text_table

    out = []
    for d in diffs:
        out.append(_title(d))
        if d.error:
            out += [f"  not profiled: {line}" for line in d.error.splitlines()] + [""]
            continue
        out.append("  " + _step_line(d))
        out += text_table(_HEAD, [_cells(r) for r in d.rows], "rrrrrl", rule=False, indent="  ")
        for side, paths in d.traces.items():
            out.append(f"  {side} traces: {', '.join(paths)}")
        out.append("")
    if any(not d.error for d in diffs):
        out.append(_FOOT)
    return "\n".join(out) + "\n"


def render_markdown(diffs: Sequence[OperatorDiff]) -> str:
    from perf_tests.report.tabular import markdown_table

    out = ["### Operators that got slower", ""]
    for d in diffs:
        out.append(f"**`{d.case}`**: {d.candidate} vs {d.baseline}")
        out.append("")
        if d.error:
            out += ["```", d.error, "```", ""]
            continue
        rows = [[*_cells(r)[:-1], f"`{r.name}`" + (" (compiled)" if r.compiled else "")] for r in d.rows]
        out += [_step_line(d), "", *markdown_table(_HEAD, rows, "rrrrrl")]
        out += ["", "Chrome traces: " + "; ".join(f"{s}: {', '.join(f'`{p}`' for p in ps)}"
                                                for s, ps in d.traces.items()), ""]
    out.append(_FOOT)
    return "\n".join(out) + "\n"


def to_dict(diffs: Sequence[OperatorDiff]) -> dict:
    return {"explain": [d.as_dict() for d in diffs]}


RENDERERS = {"text": render_text, "markdown": render_markdown,
             "json": lambda diffs: json.dumps(to_dict(diffs), indent=1) + "\n"}


def write_reports(diffs: Sequence[OperatorDiff], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for fmt, suffix in (("text", "txt"), ("markdown", "md"), ("json", "json")):
        (out_dir / f"explain.{suffix}").write_text(RENDERERS[fmt](diffs), encoding="utf-8")
