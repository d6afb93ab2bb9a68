"""An A/B pair on CUDA: the cores both sides get, and a side that goes on without its partner says so; the
reference that --ab-baseline takes from the committed baselines."""

from __future__ import annotations

import json
import os

import pytest
from perf_json import CASES, run_doc, write_run

from perf_tests.analysis.stats import Policy
from perf_tests.errors import InputError
from perf_tests.measure import turns
from perf_tests.tools import ab
from perf_tests.tools.compare import Outcome, load_and_compare_ab, render

SUITE = ["python", "-m", "pytest", "perf_tests", "--grid", "gate"]


@pytest.mark.parametrize("cmd, gpu, expected", [
    (SUITE, False, {2}),  # a CPU run: one core, the same for both
    (SUITE, True, {2, 3, 5, 7}),  # CUDA by default where a GPU is visible: every core, for the compile
    ([*SUITE, "--device", "cpu"], True, {2}),
    ([*SUITE, "--device=cuda:1"], False, {2, 3, 5, 7}),
])
def test_a_pair_shares_one_core_on_a_cpu_and_every_core_on_cuda(cmd, gpu, expected):
    assert ab.pair_cpus(cmd, allowed={3, 2, 7, 5}, gpu=lambda: gpu) == expected


def test_a_hidden_gpu_is_not_visible(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not ab.gpu_visible()


def test_a_partner_that_does_not_hand_over_in_time_leaves_a_reason(monkeypatch):
    monkeypatch.setattr(turns, "WAIT_S", 0.05)
    read_fd, write_fd = os.pipe()  # nobody ever writes the token
    other_read, other_write = os.pipe()
    t = turns.Turns(read_fd, other_write)
    t.wait()
    assert t.alone and "did not hand over within 0.05 s" in t.alone_reason
    os.close(write_fd)
    os.close(other_read)


def test_a_partner_that_ended_leaves_a_reason_and_an_own_end_does_not(monkeypatch):
    read_fd, write_fd = os.pipe()
    os.close(write_fd)  # the partner's end is closed: end-of-file
    other_read, other_write = os.pipe()
    t = turns.Turns(read_fd, other_write)
    t.wait()
    assert t.alone and t.alone_reason == "the partner process ended (finished or died)"
    os.close(other_read)
    read_fd, write_fd = os.pipe()
    other_read, other_write = os.pipe()
    t = turns.Turns(read_fd, other_write)
    t.end()  # this process ends first: nobody went away
    assert t.alone and t.alone_reason is None
    os.close(write_fd)
    os.close(other_read)


def test_the_ab_verdict_says_which_side_went_on_alone(tmp_path):
    reason = "the partner did not hand over within 1800 s (hung, or a compile longer than that)"
    alone = {name: {"alone": reason} for name in CASES[2:]}
    a = [write_run(tmp_path / f"a{i}.json", i, extra=alone if i == 1 else None) for i in range(1, 4)]
    b = [write_run(tmp_path / f"b{i}.json", 10 + i) for i in range(1, 4)]
    outcome = load_and_compare_ab(b, a, Policy(), ref_label="REF", current_label="current")
    (warning,) = outcome.warnings
    assert warning.startswith("a1.json: 2 case(s) measured without the A/B partner") and reason in warning
    assert CASES[2] in warning
    for fmt in ("text", "markdown"):
        assert reason in render(outcome, fmt)
    assert reason not in render(Outcome(outcome.comparison, outcome.baseline, outcome.candidate, []), "text")


def _baselines_of(tmp_path, **commits):
    """A baseline store with one run per device type, recorded at the commit given for it."""
    from perf_tests.records.baselines import update_baselines

    gpu = {"device_name": "NVIDIA H100", "device_slug": "nvidia-h100", "device_type": "cuda", "gpu_count": 1}
    paths = []
    for device_type, commit in commits.items():
        doc = run_doc(1, machine={"git_commit": commit, **(gpu if device_type == "cuda" else {})})
        paths.append(tmp_path / f"{device_type}.json")
        paths[-1].write_text(json.dumps(doc))
    update_baselines(paths, tmp_path / "baselines")
    return tmp_path / "baselines"


@pytest.mark.parametrize("cmd, gpu, expected", [
    ([], False, "c" * 40), ([], True, "d" * 40), (["--device", "cpu"], True, "c" * 40),
    (["--device=cuda:1"], False, "d" * 40),
])
def test_the_baseline_reference_is_of_the_suites_device_type(tmp_path, cmd, gpu, expected):
    store = _baselines_of(tmp_path, cpu="c" * 40, cuda="d" * 40)
    assert ab.baseline_reference(store, cmd, gpu=lambda: gpu).commit == expected


def test_no_baseline_reference_says_how_to_record_one(tmp_path):
    store = _baselines_of(tmp_path, cuda="d" * 40)
    with pytest.raises(InputError, match="no cpu baseline .* `nox -s update-baselines`"):
        ab.baseline_reference(store, ["--device", "cpu"], gpu=lambda: True)
