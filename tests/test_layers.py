"""The layers of perf_tests: what reads, judges and renders results imports no PyTorch (and no ``sd``), the
case vocabulary agrees with sd's, and no module of ``sd`` or ``perf_tests`` reaches itself through its
imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Everything `python -m perf_tests compare|report|update-baselines` needs, and the command line itself.
TORCH_FREE = (
    "perf_tests.records.names", "perf_tests.errors", "perf_tests.records.journal",
    "perf_tests.records.results", "perf_tests.records.baselines", "perf_tests.analysis.stats",
    "perf_tests.tools.compare", "perf_tests.report.verdict", "perf_tests.report.study",
    "perf_tests.report.tabular", "perf_tests.report.job_summary", "perf_tests.tools.explain",
    "perf_tests.tools.worktree", "perf_tests.tools.ab", "perf_tests.cli",
)


def test_reading_judging_and_rendering_import_neither_torch_nor_sd():
    code = (
        "import sys\n"
        f"for m in {TORCH_FREE!r}: __import__(m)\n"
        "from perf_tests.cli import build_parser\n"
        "build_parser()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sd', 'open_clip'))\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_the_case_vocabulary_is_sds():
    pytest.importorskip("torch")
    from perf_tests.records import names
    from sd.attention import ATTENTION_BACKENDS
    from sd.compile import COMPILE_MODES
    from sd.precision import PRECISIONS

    assert (names.ATTENTION_BACKENDS, names.COMPILE_MODES, names.PRECISIONS) == (
        ATTENTION_BACKENDS, COMPILE_MODES, PRECISIONS)


def _imports(path: Path, package: str) -> set[str]:
    """The modules of ``sd``/``perf_tests`` that a file imports anywhere in it (lazy imports included)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                parent = module.split(".")[: -node.level if not path.name == "__init__.py" else None]
                base = ".".join([*parent[: len(parent) - node.level + 1], *filter(None, [base])])
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m.split(".")[0] == package}


def _module_files(package: str) -> dict[str, Path]:
    files = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> the modules it imports) as a path, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*path[path.index(n):], n]
            if n not in state and (found := visit(n, [*path, n])):
                return found
        state[m] = 2
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m, [m]))), None)


@pytest.mark.parametrize("package", ["sd", "perf_tests"])
def test_no_import_cycle(package):
    files = _module_files(package)
    graph = {m: {i for i in _imports(p, package) if i in files and i not in (m, package)}
             for m, p in files.items()}
    assert _cycle(graph) is None, "import cycle: " + " -> ".join(_cycle(graph) or [])


def test_the_cycle_check_sees_a_lazy_import_cycle():
    """The check on modules written for the purpose: a cycle closed by an import inside a function."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    src = ROOT / "sd" / "capabilities.py"
    assert "sd.attention" not in _imports(src, "sd")
    assert {"sd.attention", "sd.capabilities"} <= _imports(ROOT / "sd" / "device.py", "sd")
