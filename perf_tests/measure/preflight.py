"""What a GPU machine's image offers the suite, checked in seconds before anything is installed or run.

    python -m perf_tests.measure.preflight [--json FACTS.json] [--no-cuda-needed]

Checks, each with what is wrong and the fix: PyTorch imports; a CUDA device is visible; torchvision imports
and was built for this torch; NumPy hands arrays to torch (a torch built against NumPy 1 fails with 2);
`torch._inductor.codecache` imports (torch.compile's first step), which on a torch whose C++ extension code
imports `pkg_resources` needs a setuptools that still has it; Triton imports (Inductor's GPU kernels). The
facts (Python version and platform, torch's version and requirements, every installed distribution) go to
``--json`` for noxenvs.wheelhouse_fit, which checks the wheelhouse's wheels and pins against them.
Standard library only at import: it runs where nothing but a preinstalled PyTorch is.
Exit code: 0 when nothing blocks the run, 2 when something does (the report says what and why).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def installed_distributions() -> dict[str, str]:
    """Normalised name -> version of every distribution this interpreter sees."""
    out = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").strip().lower().replace("_", "-")
        if name:
            out.setdefault(name, dist.version)
    return out


def needs_pkg_resources(torch_dir: Path) -> bool:
    """Whether this torch's C++ extension code (imported by Inductor) imports pkg_resources: read from the
    file (torch < 2.4 does `from pkg_resources import packaging`), not guessed from the version."""
    try:
        return "pkg_resources" in (torch_dir / "utils" / "cpp_extension.py").read_text(encoding="utf-8")
    except OSError:
        return False


def run_checks(cuda_needed: bool = True, importer: Callable[[str], object] = importlib.import_module) -> dict:
    """The checks and facts; ``importer`` is importlib.import_module (a fake in tests)."""
    checks: list[dict] = []

    def check(name: str, ok: bool, detail: str, fix: str = "", blocking: bool = True) -> None:
        checks.append(
            {
                "name": name,
                "ok": ok,
                "detail": detail,
                "fix": "" if ok else fix,
                "blocking": blocking and not ok,
            }
        )

    facts: dict = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "python_tag": f"cp{sys.version_info[0]}{sys.version_info[1]}",
        "installed": {},
        "checks": checks,
    }
    facts["installed"] = installed_distributions()
    check(
        "python",
        sys.version_info >= (3, 10),
        f"Python {facts['python']} on {facts['machine']}",
        "the suite needs Python 3.10 or later; point SD_PERF_GPU_PYTHON at one",
    )
    try:
        torch = importer("torch")
    except Exception as exc:
        check("torch", False, _first_line(exc), "use an image with PyTorch installed for SD_PERF_GPU_PYTHON")
        return facts
    facts["torch"] = torch.__version__
    try:
        facts["torch_requires"] = importlib.metadata.requires("torch") or []
    except importlib.metadata.PackageNotFoundError:
        facts["torch_requires"] = []
    check("torch", True, f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    cuda = bool(torch.cuda.is_available())
    detail = (
        f"{torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}, cuDNN "
        f"{torch.backends.cudnn.version()}"
        if cuda
        else "torch.cuda.is_available() is False"
    )
    check(
        "cuda",
        cuda,
        detail,
        "a CUDA build of PyTorch and a visible GPU (nvidia-smi; CUDA_VISIBLE_DEVICES)",
        blocking=cuda_needed,
    )
    try:
        tv = importer("torchvision")
        built_for = [r for r in (importlib.metadata.requires("torchvision") or []) if r.startswith("torch")]
        check("torchvision", True, f"torchvision {tv.__version__} ({', '.join(built_for) or 'no torch pin'})")
    except Exception as exc:
        check(
            "torchvision",
            False,
            _first_line(exc),
            "install the torchvision built for this torch in the image, "
            "or build the wheelhouse with --preinstalled torch so that it carries one",
        )
    try:
        np = importer("numpy")
        torch.from_numpy(np.zeros(2))
        check("numpy", True, f"numpy {np.__version__} hands arrays to torch")
    except Exception as exc:
        check(
            "numpy",
            False,
            _first_line(exc),
            "a NumPy of the major version this torch was built with "
            "(NumPy 1 for torch < 2.3): the image's own, or SD_PERF_EXTRA_PACKAGES='numpy<2' in the "
            "wheelhouse",
        )
    torch_dir = Path(torch.__file__).parent
    facts["needs_pkg_resources"] = needs_pkg_resources(torch_dir)
    try:
        importer("torch._inductor.codecache")
        check("inductor", True, "torch._inductor.codecache imports")
    except Exception as exc:
        fix = (
            "setuptools with pkg_resources (the wheelhouse carries one; gpu-check installs it)"
            if facts["needs_pkg_resources"]
            else "torch.compile cannot run with this image"
        )
        # not blocking: the eager cases run; gpu-check installs setuptools and checks again
        check("inductor", False, _first_line(exc), fix, blocking=False)
    try:
        importer("triton")
        check("triton", True, "triton imports")
    except Exception as exc:
        check(
            "triton",
            False,
            _first_line(exc),
            "torch.compile on CUDA needs the triton that came with torch",
            blocking=False,
        )
    return facts


def report(facts: dict) -> str:
    lines = []
    for c in facts["checks"]:
        mark = "ok     " if c["ok"] else ("MISSING" if c["blocking"] else "warning")
        lines.append(
            f"{mark} {c['name']:<12} {c['detail']}" + (f"\n        fix: {c['fix']}" if c["fix"] else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perf_tests.measure.preflight", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--json", type=Path, help="write the facts and checks here (for noxenvs.wheelhouse_fit)"
    )
    parser.add_argument(
        "--no-cuda-needed", action="store_true", help="a missing GPU is a warning, not an error"
    )
    opts = parser.parse_args(argv)
    facts = run_checks(cuda_needed=not opts.no_cuda_needed)
    print(report(facts))
    if opts.json:
        opts.json.write_text(json.dumps(facts, indent=1), encoding="utf-8")
    blocking = [c["name"] for c in facts["checks"] if c["blocking"]]
    if blocking:
        print(f"preflight: cannot run the suite here: {', '.join(blocking)} (fixes above)", file=sys.stderr)
    return 2 if blocking else 0


if __name__ == "__main__":
    sys.exit(main())
