"""noxfile.py and noxenvs.py: pins, interpreter discovery without processes, stamps, wheelhouse helpers, and
the sessions' arguments (with a fake session: nothing is installed or run)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

import noxenvs
from noxenvs import PINS, Env

REPO = Path(__file__).resolve().parents[1]
SESSIONS = {"perf-torch2", "perf-torch20", "perf-torch1", "update-baselines", "compare", "report", "tests",
            "tests-torch1", "lint", "wheelhouse", "gpu-check", "study", "gate-validity"}


@pytest.fixture
def no_processes(monkeypatch):
    """Any attempt to start a process fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[:1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    for name in ("system", "posix_spawn", "posix_spawnp", "fork", "execv", "execve"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse)


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SD_PERF_"):
            monkeypatch.delenv(name)


# --- pins
# -----------------------------------------------------------------------------------------------------
def test_torch20_is_the_study_release_with_its_torchvision_open_clip_and_numpy_1(clean_env):
    env = Env.pinned("torch20")
    assert (env.python, env.torch) == ("3.10", "2.0.1")
    reqs = env.requirements(("perf",))
    assert "torch==2.0.1" in reqs and "torchvision==0.15.2" in reqs and "numpy<2" in reqs
    clip = [r for r in reqs if noxenvs.req_name(r) == "open-clip-torch"]
    assert clip == ["open_clip_torch==2.20.0"]  # 3.x needs timm>=1.0.17; 2.20 is of torch 2.0's time
    assert "timm==0.9.2" in reqs


@pytest.mark.parametrize("name", sorted(PINS))
def test_each_package_is_required_once_and_pinned_where_a_pin_exists(name, clean_env):
    env = Env.pinned(name)
    reqs = env.requirements(("perf",))
    names = [noxenvs.req_name(r) for r in reqs]
    assert len(names) == len(set(names)), reqs
    assert f"torch=={env.torch}" in reqs
    for pin in env.packages:
        assert pin in reqs  # the pin replaced pyproject's range
    assert {"pytest", "pytest-benchmark", "scipy", "omegaconf"} <= set(names)


@pytest.mark.parametrize("name", ["torch20", "torch1"])
def test_torch_before_2_4_gets_a_setuptools_with_pkg_resources_packaging(name, clean_env):
    """torch.utils.cpp_extension (Inductor's C++ codegen) of torch < 2.4 does `from pkg_resources import
    packaging`: setuptools 82 removed pkg_resources, 70.x left `packaging` out of it."""
    pins = [r for r in Env.pinned(name).requirements(("perf",)) if noxenvs.req_name(r) == "setuptools"]
    assert len(pins) == 1 and pins[0].startswith("setuptools==")
    major = int(pins[0].split("==")[1].split(".")[0])
    assert major < 70 or 71 <= major < 82


def test_extra_packages_and_the_interpreter_come_from_the_environment(monkeypatch, clean_env, tmp_path):
    python = str(tmp_path / "py" / "bin" / "python3.10")
    monkeypatch.setenv("SD_PERF_EXTRA_PACKAGES", "xformers==0.0.28 foo")
    monkeypatch.setenv("SD_PERF_TORCH20_PYTHON", python)
    env = Env.pinned("torch20")
    assert env.python == python
    assert env.requirements(())[-2:] == ["xformers==0.0.28", "foo"]


# --- interpreters
# ---------------------------------------------------------------------------------------------
def _exe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_find_python_looks_at_files_only_and_skips_pyenv_shims(tmp_path, monkeypatch, no_processes):
    shim = _exe(tmp_path / "pyenv" / "shims" / "python3.10")
    _exe(tmp_path / "pyenv" / "versions" / "3.10.9" / "bin" / "python3.10")
    newest = _exe(tmp_path / "pyenv" / "versions" / "3.10.13" / "bin" / "python3.10")
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "pyenv"))
    monkeypatch.setenv("PATH", str(shim.parent))
    assert noxenvs.find_python("3.10") == str(newest)
    real = _exe(tmp_path / "usr" / "bin" / "python3.10")
    monkeypatch.setenv("PATH", os.pathsep.join([str(real.parent), str(shim.parent)]))
    assert noxenvs.find_python("3.10") == str(real)  # a real interpreter on PATH comes first
    assert noxenvs.find_python("3.99") is None
    assert noxenvs.find_python(str(newest)) == str(newest)
    assert noxenvs.find_python(str(tmp_path / "nope" / "python")) is None


def test_a_missing_interpreter_says_how_to_install_it(clean_env):
    message = Env.pinned("torch20").missing_message()
    assert "pyenv install 3.10" in message and "SD_PERF_TORCH20_PYTHON" in message


# --- install stamps
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", ["home = /x\nversion_info = 3.11.7.final.0\n",
                                 "home = /x\nversion = 3.11.7\n"])
def test_the_venv_python_version_is_read_from_pyvenv_cfg(tmp_path, cfg):
    (tmp_path / "pyvenv.cfg").write_text(cfg)
    assert noxenvs.venv_python_version(tmp_path) == "3.11.7"
    assert noxenvs.venv_python_version(tmp_path / "missing") == ""


def test_a_stamp_matches_only_the_same_python_and_requirements(tmp_path, clean_env):
    (tmp_path / "pyvenv.cfg").write_text("version = 3.11.7\n")
    env = Env.pinned("torch2")
    reqs = env.requirements(("perf",))
    key = noxenvs.stamp_key("3.11.7", reqs)
    (tmp_path / noxenvs.STAMP_FILE).write_text(noxenvs.stamp(tmp_path, key, env, reqs))
    assert noxenvs.stamp_matches(tmp_path, key)
    assert not noxenvs.stamp_matches(tmp_path, noxenvs.stamp_key("3.11.8", reqs))
    assert not noxenvs.stamp_matches(tmp_path, noxenvs.stamp_key("3.11.7", [*reqs, "foo"]))


class InstallSession:
    def __init__(self, venv: Path):
        self.virtualenv = SimpleNamespace(location=str(venv))
        self.installed, self.ran = [], []

    def install(self, *reqs):
        self.installed.append(reqs)

    def run_install(self, *args, **kwargs):
        self.ran.append(args)
        if "write_text" in args[2]:  # what the stamp command does, without a process
            Path(args[3]).write_text(args[4])

    def log(self, message):
        pass


def test_install_installs_once_then_trusts_its_stamp(tmp_path, clean_env, no_processes):
    (tmp_path / "pyvenv.cfg").write_text("version = 3.10.13\n")
    env = Env.pinned("torch20")
    first = InstallSession(tmp_path)
    noxenvs.install(first, env, ("perf",))
    assert first.installed == [tuple(env.requirements(("perf",)))]
    again = InstallSession(tmp_path)
    noxenvs.install(again, env, ("perf",))
    assert again.installed == [] and again.ran == []
    more = InstallSession(tmp_path)
    noxenvs.install(more, env, ("perf",), "nox==1")  # another requirement: installs again
    assert more.installed


# --- wheelhouse
# -----------------------------------------------------------------------------------------------
def test_a_wheelhouse_for_a_preinstalled_torch_leaves_out_torch_and_its_cuda_runtime():
    frozen = "\n".join(["numpy==2.1.0", "torch==2.5.1", "triton==3.1.0", "nvidia-cudnn-cu12==9.1.0.70",
                        "torchvision==0.20.1", "open_clip_torch==3.3.0", "pip==24.0", "-e git+x#egg=y"])
    keep, left_out = noxenvs.wheelhouse_requirements(frozen, {"torch", "torchvision"})
    assert keep == ["numpy==2.1.0", "open_clip_torch==3.3.0"]
    assert set(left_out) == {"torch==2.5.1", "triton==3.1.0", "nvidia-cudnn-cu12==9.1.0.70",
                             "torchvision==0.20.1"}


def _wheel(folder: Path, version: str, torch_pin: str) -> Path:
    path = folder / f"xformers-{version}-cp311-cp311-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"xformers-{version}.dist-info/METADATA",
                    "Metadata-Version: 2.1\nName: xformers\nRequires-Dist: numpy\nRequires-Dist: "
                    f"torch=={torch_pin}\n")
    return path


def test_the_xformers_wheel_is_the_one_built_for_the_installed_torch(tmp_path):
    _wheel(tmp_path, "0.0.27.post2", "2.4.0")
    new = _wheel(tmp_path, "0.0.28.post3", "2.5.1")
    assert noxenvs.xformers_wheel(tmp_path, "2.5.1+cu124") == new
    assert noxenvs.xformers_wheel(tmp_path, "2.6.0") is None
    assert noxenvs.xformers_wheel(tmp_path / "empty", "2.5.1") is None


# --- the noxfile
# ----------------------------------------------------------------------------------------------
def _load_noxfile():
    spec = importlib.util.spec_from_file_location("noxfile_under_test", REPO / "noxfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def noxfile(no_processes, monkeypatch):
    nox = pytest.importorskip("nox", reason="the noxfile's tests need nox (installed by `nox -s tests`)")
    monkeypatch.setattr(nox.registry, "_REGISTRY", {})  # the sessions of this load only
    module = _load_noxfile()  # with no_processes: `nox -l` starts no interpreter
    return SimpleNamespace(module=module, registry=nox.registry.get())


def test_importing_the_noxfile_starts_no_process_and_registers_every_session(noxfile):
    assert SESSIONS <= set(noxfile.registry)


def test_the_noxfile_stays_short():
    assert len((REPO / "noxfile.py").read_text().splitlines()) < 250


class FakeSession:
    def __init__(self, *posargs: str):
        self.posargs = list(posargs)
        self.runs, self.notified = [], []

    def run(self, *args, **kwargs):
        self.runs.append(list(args))

    def notify(self, name, posargs=None):
        self.notified.append((name, list(posargs or [])))


@pytest.mark.parametrize("posargs, expected", [
    ((), ["--budget", "8"]),
    (("--runs", "3"), ["--runs", "3"]),
    (("--budget=15", "--ab", "HEAD"), ["--budget=15", "--ab", "HEAD"]),
    (("--", "--runs", "2"), ["--budget", "8", "--", "--runs", "2"]),  # after -- it is pytest's
])
def test_perf_sessions_default_to_an_8_minute_budget_unless_runs_are_set(noxfile, posargs, expected):
    session = FakeSession(*posargs)
    noxfile.module.perf_run(session)
    assert session.runs == [["python", "-m", "perf_tests", "run", *expected]]


def test_update_baselines_runs_the_perf_sessions_on_the_full_grid(noxfile):
    session = FakeSession("--env", "torch1", "--runs", "5", "--", "--case-kind", "unet-step")
    noxfile.module.update_baselines(session)
    assert session.notified == [("perf-torch1", ["--update-baselines", "--grid", "full", "--runs", "5", "--",
                                                 "--case-kind", "unet-step"])]


def test_study_runs_each_environment_at_its_configurations_then_the_report(noxfile):
    session = FakeSession("--results", "out", "--", "--rounds", "3")
    noxfile.module.study(session)
    names = [name for name, _ in session.notified]
    assert names == ["perf-torch1", "perf-torch20", "perf-torch2", "report"]
    args = dict(session.notified)
    common = ["--results", "out", "--runs", "2", "--grid", "full", "--gate", "warn", "--", "--case-kind",
              "txt2img", "--profile", "tiny", "--batch-size", "1,2,4"]
    assert args["perf-torch1"] == [*common, "--attention", "original,xformers", "--compile", "eager",
                                   "--rounds", "3"]
    assert args["perf-torch20"] == [*common, "--attention", "sdpa-math,sdpa-mem-efficient", "--compile",
                                    "eager,compile", "-k", "not sdpa-math-compile", "--rounds", "3"]
    assert args["perf-torch2"][-4:] == ["-k", "not original-compile and not xformers-compile and not "
                                        "sdpa-math-compile", "--rounds", "3"]
    assert args["report"] == ["out", "--layout", "study"]


def test_study_refuses_an_unknown_environment(noxfile):
    with pytest.raises(SystemExit):
        noxfile.module.study(FakeSession("--env", "torch3"))


def test_study_cases_are_the_five_configurations_once_each():
    """The -k filters leave, over the three environments, every study configuration on the current release
    and the study's pair: original code on 1.12.1, optimized on 2.0.1."""
    from perf_tests.report.study import STUDY_COLUMNS, config_label

    measured = set()
    for env, (attention, compile, not_compiled) in noxenvs.STUDY_POINTS.items():
        measured |= {(config_label(a, c), env) for a in attention for c in compile
                     if c == "eager" or a not in not_compiled}
    wanted = {(config, env) for _, column in STUDY_COLUMNS for config, env in column.items()}
    assert measured == wanted
def test_compare_and_report_install_numpy_scipy_and_matplotlib_only(noxfile):
    """What `python -m perf_tests compare|report` import (tests/test_layers.py checks: no torch, no sd)."""
    session = FakeSession()
    session.install = lambda *reqs: session.runs.append(["install", *reqs])
    noxfile.module._install_analysis(session)
    assert [noxenvs.req_name(r) for r in session.runs[0][1:]] == ["numpy", "scipy", "matplotlib"]


def test_nox_lists_the_sessions_without_starting_an_interpreter(tmp_path):
    """`nox -l` for real, with process creation refused inside nox (sitecustomize)."""
    pytest.importorskip("nox")
    (tmp_path / "sitecustomize.py").write_text(
        "import subprocess\n"
        "def _refuse(*a, **k):\n    raise SystemExit('a process was started: %r' % (a[:1],))\n"
        "subprocess.Popen = _refuse\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "nox", "-l", "-f", str(REPO / "noxfile.py")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    listed = {line.split()[1] for line in res.stdout.splitlines() if line[:2] in ("* ", "- ")}
    assert SESSIONS <= listed


def test_the_report_reads_solo_runs_and_the_tested_side_of_an_ab_run(noxfile, tmp_path):
    """.ci/run's smokes are A/B runs: the tree under test is side A; B, the reference, stays out of the
    table."""
    for name in ("torch2-A-run1.json", "torch2-B-run1.json", "torch20-run1.json", "torch1-A-run2.json",
                 "verdict-torch2.json", "torch2-A-run1.journal.jsonl", "torch1-B-run2.json"):
        (tmp_path / name).write_text("{}")
    session = FakeSession(str(tmp_path))
    session.install = lambda *reqs: None
    noxfile.module.report(session)
    files = [Path(arg).name for arg in session.runs[0] if arg.endswith(".json")]
    assert files == ["torch1-A-run2.json", "torch2-A-run1.json", "torch20-run1.json"]
