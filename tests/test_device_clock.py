"""Device time beside wall time: ``extra_info.device_samples`` (CUDA events, perf_tests.measure.timing) read
from runs and baselines, kept through the baseline store, and judged by the comparator where both sides
have it for a case, which the verdict names. The world here has a host whose jitter lands on the wall
clock only: the device's work is unchanged, the host got slower."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from perf_json import benchmark, run_doc

from perf_tests.analysis import stats
from perf_tests.errors import InputError
from perf_tests.records import baselines as B
from perf_tests.records import results as R
from perf_tests.report import pr_comment, verdict

REPO = Path(__file__).resolve().parents[1]
UNET = "test_unet_step[tiny-sdpa-eager-bs2-fp32]"
TXT2IMG = "test_txt2img[tiny-original-eager-bs1-fp32]"
GPU = {"device_type": "cuda", "device_slug": "nvidia-h100-80gb-hbm3", "device_name": "NVIDIA H100 80GB HBM3",
       "gpu_count": 1, "cpu_model": "AMD EPYC"}


def cuda_run(seed: int, host_s: float, *, device_time: bool = True) -> dict:
    """One run on a GPU: device time per call ~ 10 ms (12 ms for txt2img), the wall time that plus ``host_s``
    per call and a host hiccup now and then; txt2img on the wall clock only (its host work is the job's)."""
    rng = np.random.default_rng(seed)
    doc = run_doc(seed, cases=(TXT2IMG, UNET), machine=GPU)
    benches = []
    for name, scale in ((TXT2IMG, 0.012), (UNET, 0.010)):
        device = scale * rng.lognormal(0.0, 0.01, 20)
        hiccups = host_s * rng.exponential(1.0, 20) * (rng.random(20) < 0.3)
        wall = device + host_s + hiccups
        extra = {"device_samples": list(device)} if device_time and name == UNET else {}
        benches.append(benchmark(name, wall, **extra))
    doc["benchmarks"] = benches
    return doc


def write(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


def side(tmp_path: Path, label: str, seeds, host_s: float, **kw) -> stats.Side:
    paths = [write(tmp_path / f"{label}{s}.json", cuda_run(s, host_s, **kw)) for s in seeds]
    return R.load_side(paths, label)[0]


def test_device_samples_are_read_beside_the_wall_samples(tmp_path):
    doc = cuda_run(1, 0.002)
    run = R.read_run(write(tmp_path / "r.json", doc))
    bench = {b["name"]: b for b in doc["benchmarks"]}
    assert run.cases[UNET].device_samples == tuple(bench[UNET]["extra_info"]["device_samples"])
    assert run.cases[UNET].samples == tuple(bench[UNET]["stats"]["data"])
    assert run.cases[TXT2IMG].device_samples is None


def test_files_written_before_device_time_still_load_on_the_wall_clock(tmp_path):
    run = R.read_run(write(tmp_path / "old.json", run_doc(3)))
    assert all(c.device_samples is None for c in run.cases.values())
    for path in sorted((REPO / "baselines").glob("*/*.json")):  # the committed baselines
        base = R.side_from_baseline(R.read_baseline(path), path.name)
        assert all(cs.device_runs is None and cs.clock == "wall" for cs in base.cases.values())


@pytest.mark.parametrize("device, problem", [
    ([0.01] * 19, "19 rounds against 20 wall-clock rounds"),
    ([0.01] * 19 + [-1.0], "not a positive finite number"),
])
def test_device_samples_that_do_not_match_their_rounds_are_refused(tmp_path, device, problem):
    doc = cuda_run(1, 0.002)
    doc["benchmarks"][1]["extra_info"]["device_samples"] = device
    with pytest.raises(InputError, match=f"device_samples: .*{problem}"):
        R.read_run(write(tmp_path / "r.json", doc))


def test_the_baseline_keeps_device_samples_and_writes_none_where_there_were_none(tmp_path):
    paths = [write(tmp_path / f"r{s}.json", cuda_run(s, 0.002)) for s in (1, 2)]
    (update,) = B.update_baselines(paths, tmp_path / "baselines")
    doc = json.loads(update.path.read_text())
    runs = [R.read_run(p) for p in paths]
    assert [e["device_samples"] for e in doc["cases"][UNET]["runs"]] == [
        list(r.cases[UNET].device_samples) for r in runs]
    assert all("device_samples" not in e for e in doc["cases"][TXT2IMG]["runs"])
    back = R.side_from_baseline(R.read_baseline(update.path), "b")
    assert back.cases[UNET].device_runs == [list(r.cases[UNET].device_samples) for r in runs]
    assert back.cases[TXT2IMG].device_runs is None


def test_a_side_has_device_runs_only_when_every_run_has_them(tmp_path):
    paths = [write(tmp_path / "a.json", cuda_run(1, 0.002)),
             write(tmp_path / "b.json", cuda_run(2, 0.002, device_time=False))]
    mixed, _ = R.load_side(paths, "mixed")
    assert mixed.cases[UNET].device_runs is None and len(mixed.cases[UNET].runs) == 2


def test_host_jitter_stays_out_of_a_case_judged_on_the_device_clock(tmp_path):
    # The candidate's host is slower (3 ms more per call, 30% of the UNet step) and the GPU's work the same.
    base, cand = side(tmp_path, "base", (1, 2, 3, 4), 0.0005), side(tmp_path, "cand", (5, 6, 7, 8), 0.0035)
    cmp = stats.compare(base, cand)
    unet, txt2img = (next(c for c in cmp.cases if c.name == n) for n in (UNET, TXT2IMG))
    assert unet.metrics["time"].clock == "device" and unet.verdict == stats.NO_CHANGE
    assert unet.metrics["time"].ci[0] < 1 < unet.metrics["time"].ci[1]
    # txt2img is end to end: its host work is the job's, and the slower host is its regression
    assert txt2img.metrics["time"].clock == "wall" and txt2img.verdict == stats.REGRESSION
    # the same runs, the baseline recorded before device time: the UNet step is judged on the wall clock
    # on both sides, where the slower host reads as slower code
    old = side(tmp_path, "old", (1, 2, 3, 4), 0.0005, device_time=False)
    on_wall = next(c for c in stats.compare(old, cand).cases if c.name == UNET)
    assert on_wall.metrics["time"].clock == "wall" and on_wall.verdict == stats.REGRESSION


def test_the_report_says_which_clock_each_case_was_judged_on(tmp_path):
    base, cand = side(tmp_path, "base", (1, 2, 3), 0.0005), side(tmp_path, "cand", (4, 5, 6), 0.0005)
    cmp = stats.compare(base, cand)
    text = verdict.render_text(cmp)
    assert ("time judged on the device's clock (CUDA events) for 1 case(s); on the wall clock for 1 "
            f"(end-to-end, or a side without device time): {TXT2IMG}") in text
    doc = verdict.to_dict(cmp)
    assert {c["name"]: c["metrics"]["time"]["clock"] for c in doc["cases"]} == {UNET: "device",
                                                                                 TXT2IMG: "wall"}
    assert "GPU's own clock (CUDA events) for 1 case(s)" in pr_comment.render("H100", doc)
    # a comparison without device time says nothing about clocks
    old = side(tmp_path, "old", (1, 2, 3), 0.0005, device_time=False)
    assert "clock" not in verdict.render_text(stats.compare(old, cand))


def test_a_flagged_case_is_plotted_on_the_clock_it_was_judged_on(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    base = side(tmp_path, "base", (1, 2, 3), 0.0005)
    slower = {p: cuda_run(s, 0.0005) for p, s in (("c4.json", 4), ("c5.json", 5), ("c6.json", 6))}
    for doc in slower.values():  # the GPU's work 20% slower, on both clocks
        unet = next(b for b in doc["benchmarks"] if b["name"] == UNET)
        device = unet["extra_info"]["device_samples"]
        unet["stats"]["data"] = [w + 0.2 * d for w, d in zip(unet["stats"]["data"], device, strict=True)]
        unet["extra_info"]["device_samples"] = [1.2 * d for d in device]
    cand = R.load_side([write(tmp_path / p, d) for p, d in slower.items()], "cand")[0]
    cmp = stats.compare(base, cand)
    assert next(c for c in cmp.cases if c.name == UNET).verdict == stats.REGRESSION
    figures = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: figures.append(fig))
    verdict.plot_flagged(cmp, base, cand, tmp_path / "plots", verdicts=(stats.REGRESSION,))
    (fig,) = figures
    ax = fig.axes[0]
    assert "on the device's clock" in ax.get_xlabel()
    plotted = np.concatenate([c.get_offsets()[:, 0] for c in ax.collections])
    device = np.concatenate([*base.cases[UNET].device_runs, *cand.cases[UNET].device_runs])
    assert np.allclose(np.sort(plotted), np.sort(device) * 1e3)


def test_the_results_store_gives_device_samples_back(tmp_path):
    from perf_tests.records.store import Store

    run = R.read_run(write(tmp_path / "torch2-run1.json", cuda_run(1, 0.002)))
    with Store.open(str(tmp_path / "store.sqlite")) as store:
        store.record(run)
        (stored,) = store.runs()
    assert stored.run.cases[UNET].device_samples == run.cases[UNET].device_samples
    assert stored.run.cases[TXT2IMG].device_samples is None
