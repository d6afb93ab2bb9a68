"""gpu-check without a GPU: the preflight (perf_tests.measure.preflight), the wheelhouse's fit to an image
(noxenvs.wheelhouse_fit) and the session's course (noxenvs.gpu_check) with a session that runs only pytest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import noxenvs
from perf_tests.measure import preflight

nox_command = pytest.importorskip(
    "nox.command", reason="gpu-check's tests need nox (installed by `nox -s tests`)"
)

# An image like the PyTorch 2.1 containers: Python 3.10, its torch's pins, NumPy 1.
IMAGE = {
    "python": "3.10.12",
    "python_tag": "cp310",
    "machine": "x86_64",
    "torch": "2.1.2+cu121",
    "torch_requires": [
        "filelock",
        "sympy",
        "networkx",
        "jinja2",
        "fsspec",
        'triton==2.1.0; platform_system == "Linux"',
        "typing-extensions",
    ],
    "installed": {"torch": "2.1.2+cu121", "sympy": "1.12", "numpy": "1.26.4", "jinja2": "3.1.2"},
    "needs_pkg_resources": True,
    "checks": [],
}
WHEELHOUSE = """# made by `nox -s wheelhouse` from torch2 (torch 2.14.1)
# preinstalled, not here: torch==2.14.1
sympy==1.14.0
networkx==3.5
numpy==2.3.4
jinja2==3.1.6
open_clip_torch==3.3.0
"""


# --- the wheelhouse against the image ----------------------------------------------------------------------
def test_the_images_own_torch_dependencies_are_kept_and_the_rest_installed():
    fit = noxenvs.wheelhouse_fit(WHEELHOUSE, [], IMAGE)
    assert fit.install == ["networkx==3.5", "open_clip_torch==3.3.0"]  # the image lacks both
    assert sorted(n.split(":")[0] for n in fit.notes) == ["jinja2", "numpy", "sympy"]
    assert "the image's 1.26.4 kept (the wheelhouse has 2.3.4)" in " ".join(fit.notes)
    assert fit.problems == []


def test_a_pin_that_contradicts_the_images_torch_is_a_problem_with_its_fix():
    image = {**IMAGE, "torch_requires": ["networkx<3", "sympy"], "installed": {}}
    fit = noxenvs.wheelhouse_fit("networkx==3.5\nsympy==1.14.0\n", [], image)
    assert fit.install == ["sympy==1.14.0"]
    (problem,) = fit.problems
    assert "networkx==3.5 contradicts the image's torch 2.1.2+cu121" in problem and "networkx<3" in problem


@pytest.mark.parametrize(
    "wheel, fits",
    [
        ("regex-2025.1.1-cp310-cp310-manylinux_2_17_x86_64.whl", True),
        ("regex-2025.1.1-cp311-cp311-manylinux_2_17_x86_64.whl", False),  # another CPython
        ("regex-2025.1.1-cp310-cp310-manylinux_2_17_aarch64.whl", False),  # another processor
        ("safetensors-0.6.2-cp38-abi3-manylinux_2_17_x86_64.whl", True),  # the stable ABI
        ("ftfy-6.3.1-py3-none-any.whl", True),  # pure Python
        ("requirements.txt", True),
    ],
)
def test_binary_wheels_must_match_the_images_python_and_processor(wheel, fits):
    fit = noxenvs.wheelhouse_fit("", [wheel], IMAGE)
    assert (fit.problems == []) == fits, fit.problems
    if not fits:
        assert "SD_PERF_TORCH2_PYTHON=3.10" in fit.problems[0] or "aarch64" in fit.problems[0]


# --- preflight ---------------------------------------------------------------------------------------------
def fake_torch(tmp_path: Path, cpp_extension: str, cuda: bool = True):
    (tmp_path / "torch" / "utils").mkdir(parents=True)
    (tmp_path / "torch" / "utils" / "cpp_extension.py").write_text(cpp_extension)
    return SimpleNamespace(
        __version__="2.1.2+cu121",
        __file__=str(tmp_path / "torch" / "__init__.py"),
        version=SimpleNamespace(cuda="12.1"),
        from_numpy=lambda a: a,
        cuda=SimpleNamespace(
            is_available=lambda: cuda,
            get_device_name=lambda i: "NVIDIA H200",
            get_device_capability=lambda i: (9, 0),
        ),
        backends=SimpleNamespace(cudnn=SimpleNamespace(version=lambda: 8902)),
    )


def importer_of(modules: dict):
    def load(name):
        found = modules.get(name)
        if isinstance(found, Exception):
            raise found
        if found is None:
            raise ModuleNotFoundError(f"No module named '{name}'")
        return found

    return load


def by_name(facts) -> dict:
    return {c["name"]: c for c in facts["checks"]}


def test_preflight_names_what_is_missing_and_what_blocks(tmp_path):
    torch = fake_torch(tmp_path, "from pkg_resources import packaging  # torch < 2.4\n")
    modules = {
        "torch": torch,
        "numpy": SimpleNamespace(__version__="1.26.4", zeros=lambda n: [0.0] * n),
        "torch._inductor.codecache": ModuleNotFoundError("No module named 'pkg_resources'"),
        "triton": SimpleNamespace(),
    }
    facts = preflight.run_checks(importer=importer_of(modules))
    checks = by_name(facts)
    assert facts["torch"] == "2.1.2+cu121" and facts["needs_pkg_resources"] is True
    assert checks["cuda"]["ok"] and "NVIDIA H200" in checks["cuda"]["detail"]
    assert checks["torchvision"]["blocking"] and "torchvision" in checks["torchvision"]["fix"]
    assert (
        not checks["inductor"]["ok"] and not checks["inductor"]["blocking"]
    )  # gpu-check installs setuptools
    assert "pkg_resources" in checks["inductor"]["fix"] and "pkg_resources" in checks["inductor"]["detail"]
    assert [c["name"] for c in facts["checks"] if c["blocking"]] == ["torchvision"]
    text = preflight.report(facts)
    assert "MISSING torchvision" in text and "warning inductor" in text and "ok      cuda" in text


def test_preflight_without_torch_or_gpu_blocks(tmp_path):
    facts = preflight.run_checks(importer=importer_of({}))
    assert by_name(facts)["torch"]["blocking"] and "torch" not in facts
    facts = preflight.run_checks(importer=importer_of({"torch": fake_torch(tmp_path, "", cuda=False)}))
    assert by_name(facts)["cuda"]["blocking"] and facts["needs_pkg_resources"] is False
    assert not preflight.run_checks(
        cuda_needed=False, importer=importer_of({"torch": fake_torch(tmp_path / "b", "", cuda=False)})
    )["checks"][2]["blocking"]


def test_preflight_runs_here_in_seconds_and_writes_its_facts(tmp_path):
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "perf_tests.measure.preflight",
            "--no-cuda-needed",
            "--json",
            str(tmp_path / "f.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    facts = json.loads((tmp_path / "f.json").read_text())
    assert (
        facts["installed"]["torch"] and facts["python_tag"] == f"cp{sys.version_info[0]}{sys.version_info[1]}"
    )
    assert "ok      torch" in res.stdout


# --- the session's course ----------------------------------------------------------------------------------
FAILING_GPU_TEST = """import pytest

@pytest.mark.gpu
def test_a_cuda_path_that_is_wrong():
    assert 1 + 1 == 3
"""


class Session:
    """nox's session as gpu-check uses it. The gpu tests run for real: a pytest on a failing test file, and
    a non-zero exit raises CommandFailed as nox's session.run does. Everything else is recorded."""

    def __init__(self, tmp_path: Path, facts: dict, perf_exit: int = 0):
        self.tmp_path, self.facts, self.perf_exit = tmp_path, facts, perf_exit
        self.runs, self.installed, self.logs = [], [], []

    def run(self, *args, external=False, **kwargs):
        args = list(args)
        self.runs.append(args)
        if args[:3] == ["python", "-m", "perf_tests.measure.preflight"]:
            Path(args[args.index("--json") + 1]).write_text(json.dumps(self.facts))
        elif "pytest" in args and "gpu" in args:
            test_file = self.tmp_path / "test_fake_gpu.py"
            test_file.write_text(FAILING_GPU_TEST)
            res = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    str(test_file),
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "-m",
                    "gpu",
                    "--rootdir",
                    str(self.tmp_path),
                ],
                capture_output=True,
                text=True,
            )
            if res.returncode:
                raise nox_command.CommandFailed(f"Returned code {res.returncode}")
        elif "perf_tests" in args and "run" in args and self.perf_exit:
            out = Path(args[args.index("--results") + 1])
            (out / "torch2-run1.journal.jsonl").write_text("{}\n")  # the cases finished before the stop
            raise nox_command.CommandFailed(f"Returned code {self.perf_exit}")
        return True

    def install(self, *args):
        self.installed.append(list(args))

    def log(self, message):
        self.logs.append(message)

    def error(self, message):
        raise SystemExit(message)


def wheelhouse(tmp_path: Path) -> Path:
    folder = tmp_path / "wheelhouse"
    folder.mkdir()
    (folder / "requirements.txt").write_text(WHEELHOUSE)
    return folder


def test_a_failing_gpu_test_is_reported_at_the_end_and_the_perf_run_still_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "empty-cache"))
    s = Session(tmp_path, IMAGE)
    wh, out = wheelhouse(tmp_path), tmp_path / "out"
    times = iter([0.0, 200.0])  # the start, then 200 s spent when the perf run starts
    with pytest.raises(SystemExit, match="gpu unit tests") as stop:
        noxenvs.gpu_check(
            s, wh, out, ["--update-baselines"], ["-k", "unet"], "first-run", 570.0, clock=lambda: next(times)
        )
    perf = [r for r in s.runs if "perf_tests" in r and "run" in r]
    assert perf == [
        [
            "timeout",
            "--signal=INT",
            "--kill-after=20",
            str(570 - 200 - noxenvs.REPORT_RESERVE_S),
            "python",
            "-m",
            "perf_tests",
            "run",
            "--runs",
            "1",
            "--results",
            str(out),
            "--update-baselines",
            "--",
            "--grid",
            "first-run",
            "-k",
            "unet",
        ]
    ]
    gpu_tests = next(i for i, r in enumerate(s.runs) if "pytest" in r)
    assert gpu_tests < s.runs.index(perf[0])  # the tests ran first, failed, and the perf run went on
    assert "perf run" not in str(stop.value)
    # the fitted install: the image's sympy, NumPy and jinja2 kept; setuptools for this torch's pkg_resources
    assert (out / "requirements-fitted.txt").read_text().split() == [
        "networkx==3.5",
        "open_clip_torch==3.3.0",
    ]
    offline = ["--no-index", "--find-links", str(wh)]
    assert s.installed == [
        [*offline, "-r", str(out / "requirements-fitted.txt")],
        [*offline, noxenvs.SETUPTOOLS_WITH_PKG_RESOURCES],
    ]
    assert any("cold" in m and str(tmp_path / "empty-cache") in m for m in s.logs)
    assert ["python", "-m", "perf_tests.measure.estimate", "first-run", "--cache", "cold"] in s.runs


def test_a_perf_run_stopped_at_its_limit_leaves_a_study_table_from_its_journal(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "fxgraph").mkdir(parents=True)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    s = Session(tmp_path, {**IMAGE, "needs_pkg_resources": False}, perf_exit=124)
    s.run = _tests_pass(s.run)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="perf run") as stop:
        noxenvs.gpu_check(s, wheelhouse(tmp_path), out, [], [], "first-run", 570.0, clock=lambda: 0.0)
    assert "gpu unit tests" not in str(stop.value)
    assert s.runs[-1] == [
        "python",
        "-m",
        "perf_tests",
        "report",
        str(out / "torch2-run1.journal.jsonl"),
        "--output",
        str(out / "study-partial.md"),
    ]
    assert ["python", "-m", "perf_tests.measure.estimate", "first-run", "--cache", "warm"] in s.runs
    assert len(s.installed) == 1  # no setuptools: this torch does not import pkg_resources


def _tests_pass(run):
    def wrapped(*args, **kwargs):
        if "pytest" in args:
            return True
        return run(*args, **kwargs)

    return wrapped


def test_a_wheelhouse_that_does_not_fit_stops_before_installing(tmp_path):
    s = Session(tmp_path, {**IMAGE, "python_tag": "cp312", "python": "3.12.3"})
    wh = wheelhouse(tmp_path)
    (wh / "regex-2025.1.1-cp311-cp311-manylinux_2_17_x86_64.whl").write_bytes(b"")
    with pytest.raises(SystemExit, match="(?s)does not fit this image.*SD_PERF_TORCH2_PYTHON=3.12"):
        noxenvs.gpu_check(s, wh, tmp_path / "out", [], [], "first-run", 570.0)
    assert s.installed == []
