"""perf_tests.report.study: the study table and plot, built from saved pytest-benchmark JSON only."""

from __future__ import annotations

import json

import pytest

from perf_tests.measure.cases import Case
from perf_tests.records.results import InputError, run_from_doc
from perf_tests.report.study import (
    build_ladder,
    build_study_table,
    build_study_tables,
    load_runs,
    plot_study,
    write_study,
)


def bench(kind, attention, compile, bs, samples, env="torch2", precision="fp32", profile="sd21-base"):
    c = Case(kind, profile, attention, compile, bs, precision)
    return {
        "name": c.name,
        "extra_info": {"case": c.as_dict(), "env": env, "correct": True},
        "stats": {"data": list(samples), "median": sorted(samples)[len(samples) // 2]},
    }


def run_doc(benchmarks, env="torch2", slug="nvidia-a100-sxm4-80gb"):
    return {"machine_info": {"env": env, "device_slug": slug}, "benchmarks": benchmarks}


def run(benchmarks, **kw):
    return run_from_doc(run_doc(benchmarks, **kw))


# The A100 column of the PyTorch blog study (sd21-facts §9), as single-sample runs.
A100 = {
    ("original", "eager"): (8.0, 12.0, 22.8),
    ("xformers", "eager"): (6.7, 8.0, 12.7),
    ("sdpa-math", "eager"): (5.7, 7.8, 14.5),
    ("sdpa-mem-efficient", "eager"): (5.3, 7.0, 12.8),
    ("sdpa-mem-efficient", "compile"): (4.1, 6.4, 11.2),
}


def study_docs():
    torch1 = [bench("txt2img", a, c, bs, [t], env="torch1", precision="autocast")
              for (a, c), times in A100.items() if a in ("original", "xformers")
              for bs, t in zip((1, 2, 4), times, strict=True)]
    torch2 = [bench("txt2img", a, c, bs, [t], precision="autocast")
              for (a, c), times in A100.items() if a.startswith("sdpa")
              for bs, t in zip((1, 2, 4), times, strict=True)]
    return [run_doc(torch1, env="torch1"), run_doc(torch2)]


def study_runs():
    return [run_from_doc(d) for d in study_docs()]


def test_study_rows_order_and_improvements(tmp_path):
    path = tmp_path / "runs.json"
    for i, r in enumerate(study_docs()):  # through saved files, as `python -m perf_tests report` does
        (tmp_path / f"run{i}.json").write_text(json.dumps(r))
    runs = load_runs([tmp_path / "run0.json", tmp_path / "run1.json"])
    t = build_study_table(runs, reference="original")
    assert [r.config for r in t.rows] == ["original", "original+xformers", "sdpa-math", "sdpa-mem-efficient",
                                          "sdpa-mem-efficient+compile"]
    assert [r.label for r in t.rows][0] == "original [torch1]"
    assert t.batch_sizes == [1, 2, 4]
    assert t.reference == "original [torch1]"
    # the blog: A100 batch 1, optimized+compile vs original without xFormers: (8.0-4.1)/8.0 = 48.75%
    best = t.row("sdpa-mem-efficient+compile [torch2]")
    assert best.cells[1].improvement == pytest.approx(0.4875)
    assert best.cells[4].median_s == pytest.approx(11.2)
    md = t.to_markdown()
    assert "| original [torch1] | 8.000 s (ref) | 12.000 s (ref) | 22.800 s (ref) |" in md
    assert "| sdpa-mem-efficient+compile [torch2] | 4.100 s (+48.8%) |" in md
    assert "sdpa-math [torch2]" in t.to_text()
    path.write_text(md)


def test_reference_row_can_be_any_label():
    t = build_study_table(study_runs(), reference="original+xformers")
    # the blog's headline: 38.5% faster than original with xFormers on A100, batch 1 ((6.7-4.1)/6.7 = 38.8%)
    assert t.row("sdpa-mem-efficient+compile [torch2]").cells[1].improvement == pytest.approx(2.6 / 6.7)
    t = build_study_table(study_runs(), reference="sdpa-math [torch2]")
    assert t.reference == "sdpa-math [torch2]"


def test_missing_reference_is_a_note_not_an_error():
    t = build_study_table(study_runs()[1:], reference="original")
    assert t.reference is None
    assert any("not in these runs" in n for n in t.notes)
    assert all(c.improvement is None for r in t.rows for c in r.cells.values())
    assert "(ref)" not in t.to_markdown()


def test_samples_of_one_benchmark_are_pooled_across_runs():
    a = run([bench("unet-step", "original", "eager", 1, [1.0, 1.2, 1.1])])
    b = run([bench("unet-step", "original", "eager", 1, [3.0, 3.0])])
    t = build_study_table([a, b], kind="unet-step")
    cell = t.row("original").cells[1]
    assert cell.rounds == 5 and cell.median_s == pytest.approx(1.2)
    assert "median of 5 timed rounds" in t.notes[-1]


def test_one_environment_has_plain_labels_and_other_backends_follow_the_study_rows():
    r = run([bench("txt2img", a, c, 1, [2.0]) for a, c in
             [("sdpa-flash", "compile-max-autotune"), ("sdpa", "eager"), ("original", "eager"),
              ("sdpa-mem-efficient", "compile"), ("sdpa-flash", "eager")]])
    t = build_study_table([r])
    assert [r.label for r in t.rows] == ["original", "sdpa-mem-efficient+compile", "sdpa", "sdpa-flash",
                                         "sdpa-flash+compile-max-autotune"]
    assert t.title.startswith("txt2img — sd21-base")


def test_kind_defaults_to_txt2img_and_tables_per_kind():
    r = run([bench("unet-step", "original", "eager", 1, [0.5]), bench("txt2img", "original", "eager", 1,
                                                                      [5.0]),
             bench("attention-self-4096", "sdpa", "eager", 2, [0.01])])
    assert build_study_table([r]).kind == "txt2img"
    assert [t.kind for t in build_study_tables([r])] == ["txt2img", "unet-step", "attention-self-4096"]
    assert "10.00 ms" in build_study_table([r], kind="attention-self-4096").to_text()


def test_foreign_benchmarks_are_ignored():
    r = run([{"name": "test_other", "stats": {"data": [1.0]}, "extra_info": {}},
             bench("txt2img", "original", "eager", 1, [5.0])])
    assert len(build_study_table([r]).rows) == 1


def test_plot_and_write_study(tmp_path):
    t = build_study_table(study_runs())
    png = plot_study(t, tmp_path / "fig" / "study.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "out"
    written = write_study(study_runs(), out / "study.md", plot=out / "study.png")
    written += write_study(study_runs(), out / "study.txt")
    assert sorted(p.name for p in written) == ["study.md", "study.png", "study.txt"]
    assert (out / "study.txt").read_text().startswith(build_study_table(study_runs()).to_text())
    assert (out / "study.md").read_text().startswith(build_study_table(study_runs()).to_markdown())


def test_a_cell_is_never_made_of_a_median_alone():
    """Without raw samples there is no table cell: the reader refuses the file instead of falling back."""
    b = bench("txt2img", "original", "eager", 1, [5.0])
    del b["stats"]["data"]
    with pytest.raises(InputError, match=r"stats.data: no raw samples"):
        run([b])


def test_a_killed_runs_journal_gives_its_finished_cases(tmp_path):
    lines = [{"type": "start", "machine_info": {"env": "torch2", "device_slug": "cpu-x"},
              "perf_tests": {"selected": [bench("txt2img", "original", "eager", bs,
                                                [1.0])["name"] for bs in (1, 2)]}},
             {"type": "case", "benchmark": bench("txt2img", "original", "eager", 1, [4.0, 5.0])}]
    path = tmp_path / "run.journal.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    (t,) = [build_study_table(load_runs([path]))]
    assert t.batch_sizes == [1] and t.row("original").cells[1].median_s == pytest.approx(4.5)


# --- the VAE's own kernel, and the optimization ladder ----------------------------------------------------


def test_a_case_whose_vae_ran_another_kernel_is_marked():
    b = bench("txt2img", "sdpa-flash", "eager", 1, [2.0])
    b["extra_info"]["vae_attention_used"] = "sdpa-mem-efficient"
    same = bench("txt2img", "sdpa", "eager", 1, [2.5])
    same["extra_info"]["vae_attention_used"] = "sdpa"  # the same kernel: nothing to mark
    t = build_study_table([run([b, same, bench("txt2img", "original", "eager", 1, [4.0])])])
    labels = [r.label for r in t.rows]
    assert "sdpa-flash (VAE: sdpa-mem-efficient)" in labels and "sdpa" in labels
    assert any("width 512" in n for n in t.notes)


def ladder_bench(attention, compile, samples, memory_format="contiguous", projections="separate",
                 precision="fp32"):
    c = Case("unet-step", "tiny", attention, compile, 2, precision, memory_format=memory_format,
             projections=projections)
    return {"name": c.name, "extra_info": {"case": c.as_dict(), "env": "torch2", "correct": True},
            "stats": {"data": list(samples)}}


def test_ladder_rows_in_order_with_the_gain_over_the_row_above():
    benches = [
        ladder_bench("sdpa", "compile", [0.5, 0.5], "channels-last", "fused"),  # out of order on purpose
        ladder_bench("original", "eager", [1.0, 1.0]),
        ladder_bench("sdpa", "eager", [0.8, 0.8]),
        ladder_bench("sdpa", "compile", [0.6, 0.6]),
        ladder_bench("sdpa", "eager", [9.0], "channels-last"),  # not a rung: ignored
    ]
    ladder = build_ladder([run(benches, slug="cpu-intel-xeon-processor")])
    assert [r.label for r in ladder.rungs] == ["reference (original attention)", "+ SDPA", "+ torch.compile",
                                               "+ fused projections"]
    gains = [r.gain for r in ladder.rungs]
    assert gains[0] is None and gains[1:] == pytest.approx([0.2, 0.25, 1 / 6])  # (above - t) / above
    assert ladder.rungs[-1].case == "tiny-sdpa-compile-bs2-fp32-channels-last-fused"
    assert any("+ channels_last" in n and "+ fp16/bf16 weights" in n for n in ladder.notes)
    assert "| + SDPA | `tiny-sdpa-eager-bs2-fp32` |" in ladder.to_markdown()
