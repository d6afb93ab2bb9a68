"""Environments and entry points of the Stable Diffusion 2.1 performance suite.

Environments (pins in noxenvs.PINS): torch2 (torch 2.14.1, the current release), torch20 (2.0.1, the study's)
and torch1 (1.12.1). A perf session installs its environment (once: noxenvs.install keeps a stamp) and runs
`python -m perf_tests run`, whose --help lists the options that go after `--`. The repository is not
installed: sessions run from the working tree, so an A/B run of another revision uses the same environment.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import sys
from pathlib import Path

import nox
from nox.command import CommandFailed

sys.path.insert(0, str(Path(__file__).resolve().parent))  # nox loads this file without its folder on the path
import noxenvs  # noqa: E402
from noxenvs import TOOLS, Env  # noqa: E402

TORCH2, TORCH20, TORCH1 = Env.pinned("torch2"), Env.pinned("torch20"), Env.pinned("torch1")
GPU_PYTHON = os.environ.get("SD_PERF_GPU_PYTHON", "python3")  # the interpreter with the preinstalled PyTorch
WORKFLOWS = [".github/workflows/perf-gate.yml", ".github/workflows/perf-comment.yml",
             ".github/workflows/update-baselines.yml", ".github/workflows/perf-nightly.yml"]
# Default of the perf sessions: the suite's gate grid, as many runs as fit in 8 minutes of suite time. The
# first run (cold Inductor cache) always runs; a later one starts only when its estimate fits in what is
# left, so on the 2-core CI machine the suite stays within 10 minutes with 2 minutes for a slow run.
PERF_BUDGET = ["--budget", "8"]

nox.options.sessions = ["lint", "tests"]  # what a bare `nox` runs
nox.options.reuse_existing_virtualenvs = True  # with the install stamp; `nox --reuse-venv=never` rebuilds
nox.options.error_on_missing_interpreters = True


def env_session(env: Env, name: str):
    """A nox session in `env`'s interpreter; listed even when that is missing, and then failing with what
    to install (never skipped: a missing Python is an error locally and in CI)."""

    def decorate(func):
        if env.interpreter is None:

            def missing(session: nox.Session) -> None:
                session.error(env.missing_message())

            missing.__doc__ = func.__doc__
            return nox.session(name=name, python=False)(missing)
        return nox.session(name=name, python=env.interpreter, venv_params=noxenvs.venv_params())(func)

    return decorate


def perf_run(session: nox.Session, *label: str) -> None:
    """`python -m perf_tests run` with the session's arguments; an 8-minute budget unless they set runs."""
    own = {a.split("=")[0] for a in noxenvs.split_posargs(session.posargs)[0]}
    budget = [] if own & {"--runs", "--budget"} else PERF_BUDGET
    session.run("python", "-m", "perf_tests", "run", *budget, *label, *session.posargs)


@env_session(TORCH2, "perf-torch2")
def perf_torch2(session: nox.Session) -> None:
    """The suite in the pinned PyTorch 2 env: gate grid, 8-minute budget, verdict against baselines/.

    nox -s perf-torch2 -- [run options] [-- pytest args], e.g.
        nox -s perf-torch2 -- --ab HEAD~1 --budget 15          A/B against a revision, paired
        nox -s perf-torch2 -- --runs 1 -- --case-kind unet-step
    Results, study table and verdict: results/<timestamp>/ (`python -m perf_tests run --help`).
    """
    noxenvs.install(session, TORCH2, ("perf",))
    perf_run(session)


@env_session(TORCH20, "perf-torch20")
def perf_torch20(session: nox.Session) -> None:
    """The suite on PyTorch 2.0.1 (Python 3.10), the study's release: runs, files and baselines labelled
    torch20 (perf_tests.records.names.env_label). Options as perf-torch2."""
    noxenvs.install(session, TORCH20, ("perf",))
    perf_run(session)


@env_session(TORCH1, "perf-torch1")
def perf_torch1(session: nox.Session) -> None:
    """The suite in the PyTorch 1.12.1 env (Python 3.10), against the torch1 baseline. Options as
    perf-torch2."""
    noxenvs.install(session, TORCH1, ("perf",))
    perf_run(session)


@nox.session(name="update-baselines", python=False)
def update_baselines(session: nox.Session) -> None:
    """Record this device's baselines: the full grid, 3 runs per environment, merged into baselines/.

    nox -s update-baselines -- [--env torch2|torch20|torch1|both] [run options, e.g. --runs 5] [-- pytest]
    Runs the perf sessions with `--update-baselines --grid full --runs 3` (each overridable).
    """
    parser = argparse.ArgumentParser(prog="nox -s update-baselines --", allow_abbrev=False)
    parser.add_argument("--env", choices=["torch2", "torch20", "torch1", "both"], default="both",
                        help="both: torch2 and torch1")
    own, pytest_args = noxenvs.split_posargs(session.posargs)
    opts, own = parser.parse_known_args(own)
    defaults = [arg for opt, value in (("--grid", "full"), ("--runs",
                                                            "3")) if opt not in own for arg in (opt, value)]
    for name in ["torch2", "torch1"] if opts.env == "both" else [opts.env]:
        session.notify(f"perf-{name}", posargs=["--update-baselines", *defaults, *own, "--", *pytest_args])


@nox.session(name="study", python=False)
def study(session: nox.Session) -> None:
    """The PyTorch 2 study's table: its five configurations on its releases and on the current one.

    nox -s study -- [--results DIR] [--runs N] [--profile tiny] [--batch-size 1,2,4] [--env torch1,...]
    txt2img per batch size: original code with and without xFormers on 1.12.1 (perf-torch1), SDPA math,
    memory-efficient, and memory-efficient compiled on 2.0.1 (perf-torch20), all five on the current
    release (perf-torch2); then DIR/study.md and study.png (`nox -s report -- DIR --layout study`).
    """
    for name, posargs in noxenvs.study_sessions(session.posargs):
        session.notify(name, posargs=posargs)


@env_session(TORCH2, "wheelhouse")
def wheelhouse(session: nox.Session) -> None:
    """Wheels of the tested torch2 environment, for a GPU machine without a package registry (gpu-check).

    nox -s wheelhouse -- [--dest wheelhouse] [--preinstalled torch,torchvision] [--xformers xformers==X]
    The GPU machine's own PyTorch (and torchvision) are used, so they and the CUDA runtime are left out. The
    wheels are for this Python (SD_PERF_TORCH2_PYTHON=3.X for another); --xformers adds a wheel built for
    the GPU machine's torch (gpu-check installs it when it matches).
    """
    parser = argparse.ArgumentParser(prog="nox -s wheelhouse --", allow_abbrev=False)
    parser.add_argument("--dest", type=Path, default=Path("wheelhouse"))
    parser.add_argument("--preinstalled", default="torch,torchvision")
    parser.add_argument("--xformers", metavar="REQUIREMENT")
    opts = parser.parse_args(session.posargs)
    noxenvs.build_wheelhouse(session, TORCH2, opts.dest, opts.preinstalled.split(","), opts.xformers)


@nox.session(name="gpu-check", python=GPU_PYTHON, venv_params=["--system-site-packages"])
def gpu_check(session: nox.Session) -> None:
    """On a GPU machine without a registry: preflight, the gpu tests, then the first-run grid, in 10 minutes.

    nox -s gpu-check -- --wheelhouse DIR --out DIR [--grid first-run|gate|full] [--limit MIN] [run options]
                        [-- pytest args]
    PyTorch and torchvision come preinstalled with the interpreter (SD_PERF_GPU_PYTHON, default python3); the
    preflight (python -m perf_tests.measure.preflight) checks the image and the wheelhouse's fit, then the
    rest comes from the wheelhouse built by `nox -s wheelhouse`. A failing gpu test is reported at the end;
    the perf run is stopped at --limit (default 9.5 min from the start) and keeps every finished case. All in
    --out.
    """
    parser = argparse.ArgumentParser(prog="nox -s gpu-check --", allow_abbrev=False)
    parser.add_argument("--wheelhouse", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--grid", choices=["first-run", "gate", "full"], default="first-run")
    parser.add_argument("--limit", type=float, default=9.5, help="minutes for the whole check")
    own, pytest_args = noxenvs.split_posargs(session.posargs)
    opts, own = parser.parse_known_args(own)
    noxenvs.gpu_check(session, opts.wheelhouse, opts.out, own, pytest_args, opts.grid, opts.limit * 60)


def _install_analysis(session: nox.Session) -> None:
    """What reading, judging and rendering results import: numpy, scipy, matplotlib (no PyTorch)."""
    session.install(*noxenvs.extra_requirements("analysis"))


@env_session(TORCH2, "compare")
def compare(session: nox.Session) -> None:
    """Compare results: nox -s compare -- BASELINE CANDIDATE... [options of perf_tests compare]."""
    if len([a for a in session.posargs if not a.startswith("-")]) < 2:
        session.error("usage: nox -s compare -- BASELINE CANDIDATE [options of `python -m perf_tests "
                      "compare`]")
    _install_analysis(session)
    session.run("python", "-m", "perf_tests", "compare", *session.posargs)


@env_session(TORCH2, "report")
def report(session: nox.Session) -> None:
    """Study table across environments: nox -s report -- results/<timestamp> [...] (study.md/.png there)."""
    files, options, folders = [], [], []
    for arg in session.posargs:
        if os.path.isdir(arg):
            folders.append(arg)
            runs = Path(arg).glob("*.json")
            files += sorted(str(p) for p in runs if re.fullmatch(r"torch\d*-run\d+\.json", p.name))
        elif arg.endswith(".json") and not arg.startswith("-"):
            files.append(arg)
        else:
            options.append(arg)
    if not files:
        session.error("usage: nox -s report -- results/<timestamp> | RESULT.json ... [--reference original]")
    if len(folders) == 1 and "--output" not in options:
        options += ["--output", os.path.join(folders[0], "study.md"), "--plot", os.path.join(folders[0],
                                                                                             "study.png")]
    _install_analysis(session)
    session.run("python", "-m", "perf_tests", "report", *files, *options)
    if "--output" in options and os.path.isfile(output := options[options.index("--output") + 1]):
        print(Path(output).read_text(encoding="utf-8"))


@env_session(TORCH2, "history")
def history(session: nox.Session) -> None:
    """The results store (docs/store.md): nox -s history -- [history options], or -- store|dashboard|fleet
    ...; with the PostgreSQL driver for --store postgresql://..."""
    noxenvs.install(session, TORCH2, ("perf", "store"))
    command = [] if session.posargs[:1] in (["store"], ["dashboard"], ["fleet"]) else ["history"]
    session.run("python", "-m", "perf_tests", *command, *session.posargs)


@env_session(TORCH2, "tests")
def tests(session: nox.Session) -> None:
    """Unit tests (pytest tests/) in the pinned PyTorch 2 env; diffusers the oracle, nox for test_noxfile."""
    noxenvs.install(session, TORCH2, ("test", "oracle"), f"nox=={importlib.metadata.version('nox')}")
    session.run("python", "-m", "pytest", "tests", *session.posargs)


@env_session(TORCH2, "gate-validity")
def gate_validity(session: nox.Session) -> None:
    """The gate's operating characteristics on simulated machines (tests/gate_world.py): every scenario's
    bounds asserted, then the table of docs/statistics.md printed. Minutes on a CPU."""
    noxenvs.install(session, TORCH2, ("test",))
    session.run("python", "-m", "pytest", "tests/test_gate_validity.py", "-q", *session.posargs,
                env={"SD_PERF_GATE_VALIDITY": "1"})
    session.run("python", "tests/gate_world.py")


@env_session(TORCH1, "tests-torch1")
def tests_torch1(session: nox.Session) -> None:
    """Unit tests (pytest tests/) in the PyTorch 1.12.1 env; oracle tests skip (no diffusers)."""
    noxenvs.install(session, TORCH1, ("test",))
    session.run("python", "-m", "pytest", "tests", *session.posargs)


@nox.session(python=TORCH2.interpreter or TORCH1.interpreter)
def lint(session: nox.Session) -> None:
    """ruff on the code; check-jsonschema and zizmor (offline) on the workflows; shellcheck on .ci/run."""
    session.install(*TOOLS)
    checks = {"ruff": ["ruff", "check", "."],
              "check-jsonschema": ["check-jsonschema", "--builtin-schema", "vendor.github-workflows",
                                   *WORKFLOWS],
              "zizmor": ["zizmor", "--offline", *WORKFLOWS], "shellcheck": ["shellcheck", ".ci/run"]}
    failed = []
    for name, cmd in checks.items():
        try:
            session.run(*cmd)
        except CommandFailed:
            failed.append(name)
    if failed:
        session.error(f"lint failed: {', '.join(failed)}")
