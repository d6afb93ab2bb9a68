"""pytest glue of the benchmark suite: options, one parametrized case per test, run order, machine_info,
the perf_tests section of the result JSON, the run journal, and the study table at the end of the run.

    python -m pytest perf_tests                          # the gate grid of the device found
    python -m pytest perf_tests --grid full              # every combination (baselines, nightly)
    python -m pytest perf_tests --profile tiny --attention original,sdpa --compile eager,compile \\
        --batch-size 1,2 --case-kind txt2img,unet-step --benchmark-json out.json --study-dir out/

``--benchmark-json out.json`` also writes ``out.journal.jsonl`` case by case (perf_tests/records/journal.py).
Raw samples are always saved (``--benchmark-save-data`` is forced on) and the garbage collector is off
during timed rounds. A bad option value stops the run before anything is built, with exit code 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from perf_tests.measure import cases as C
from perf_tests.measure import turns
from perf_tests.measure.machine import device_identity
from perf_tests.measure.suite import INDUCTOR_CACHE_DIR, OptionError, Options, PerfSession
from perf_tests.measure.timing import MIN_ROUND_S, use_inductor_cache
from perf_tests.records.journal import Journal, journal_path
from perf_tests.records.names import env_label

_SESSION_KEY = "_perf_session"
_JOURNAL_KEY = "_perf_journal"


def pytest_addoption(parser):
    g = parser.getgroup("perf_tests", "Stable Diffusion 2.1 benchmark suite (perf_tests)")
    g.addoption("--grid", dest="perf_grid", default=None,
                help="gate (default: the focused pull-request grid) or full (every combination, for "
                     "baselines "
                     "and nightly runs). Giving any axis below makes the grid 'custom'.")
    g.addoption("--profile", dest="perf_profile", default=None,
                help=f"model profile: {', '.join(C.PROFILES)} (default: tiny on CPU, sd21-base on CUDA)")
    g.addoption("--attention", dest="perf_attention", default=None,
                help=f"comma-separated attention backends of the UNet: {', '.join(C.ATTENTION_BACKENDS)}")
    g.addoption("--compile", dest="perf_compile", default=None,
                help=f"comma-separated: {', '.join(C.COMPILE_MODES)}")
    g.addoption("--batch-size", dest="perf_batch_size", default=None,
                help="comma-separated batch sizes, e.g. 1,4")
    g.addoption("--precision", dest="perf_precision", default=None,
                help=f"comma-separated: {', '.join(C.PRECISIONS)} (default: fp32 on CPU; fp16 on CUDA)")
    g.addoption("--memory-format", dest="perf_memory_format", default=None,
                help=f"comma-separated: {', '.join(C.MEMORY_FORMATS)} (default: contiguous)")
    g.addoption("--projections", dest="perf_projections", default=None,
                help=f"comma-separated: {', '.join(C.PROJECTIONS)} (default: separate q, k, v projections)")
    g.addoption("--case-kind", dest="perf_case_kind", default=None,
                help=f"comma-separated kinds: {', '.join(C.KINDS)}, or 'attention' for the three shapes")
    g.addoption("--steps", dest="perf_steps", default=None,
                help="txt2img sampling steps, >= 1 (default: the profile's, 4 tiny, 50 sd21)")
    g.addoption("--rounds", dest="perf_rounds", default=None,
                help="timed rounds per case, >= 1 (default per kind: 5-20)")
    g.addoption("--warmup-rounds", dest="perf_warmup_rounds", default=None,
                help="untimed calls before the rounds, >= 1, the first being the correctness check (compiled "
                     "cases get one more). Default: 1 for txt2img (the study's --skip_first), 1-3 else")
    g.addoption("--min-round-ms", dest="perf_min_round_ms", default=None,
                help=f"a round times a block of calls lasting at least this long (default "
                     f"{MIN_ROUND_S['cpu'] * 1e3:g} ms on a CPU, {MIN_ROUND_S['cuda'] * 1e3:g} ms on CUDA)")
    g.addoption("--canary", dest="perf_canary", default=None,
                help="on (default) or off: time a fixed plain-torch workload before every case and at the "
                     "end")
    g.addoption("--inductor-cache", dest="perf_inductor_cache", default=None,
                help="state each measured compilation starts from: warm (default: the suite's cache folder "
                     "as earlier runs left it; a compile that missed it is recorded as cold) or cold (a "
                     "fresh empty cache folder per compiled case)")
    g.addoption("--inductor-cache-dir", dest="perf_inductor_cache_dir", default=None,
                help="the suite's Inductor cache folder, Triton's in its triton/ subfolder (default: "
                     f"$TORCHINDUCTOR_CACHE_DIR when set, else {INDUCTOR_CACHE_DIR})")
    g.addoption("--ckpt", dest="perf_ckpt", default=None, help="checkpoint to load (default: random weights)")
    g.addoption("--device", dest="perf_device", default=None,
                help="cpu, cuda, cuda:1 (default: cuda if present)")
    g.addoption("--threads", dest="perf_threads", default=None,
                help="torch.set_num_threads for the run, or 'auto' for torch's default (default: 1 on CPU, "
                     "untouched on CUDA)")
    g.addoption("--study-dir", dest="perf_study_dir", default=None,
                help="write the study table (study.md, study.txt) and bar charts (study.png, or "
                     "study-<kind>.png for several kinds) here")
    g.addoption("--study-reference", dest="perf_study_reference", default="original",
                help="reference row of the study table (default: original)")
    g.addoption("--inject-delay", dest="perf_inject_delay", default=None,
                help="timing-honesty check: add a known delay (seconds; a device-side spin on CUDA) to every "
                     "timed call; recorded as extra_info.injected_delay_s")


def pytest_configure(config):
    config.option.benchmark_save_data = True  # raw samples in saved JSON, always
    config.option.benchmark_disable_gc = True
    if not _runs_perf_tests(config):
        return
    import torch

    try:
        options = Options.parse(config.getoption, torch.cuda.is_available())
    except OptionError as exc:
        pytest.exit(f"error: {exc}", returncode=2)
    if options.grid.threads:
        torch.set_num_threads(options.grid.threads)
    use_inductor_cache(options.inductor_cache_dir)  # before anything compiles
    setattr(config, _SESSION_KEY, PerfSession(options))


def _runs_perf_tests(config) -> bool:
    """This conftest is loaded for runs that collect perf_tests; the option check is for those only."""
    return not (config.option.help or config.option.version)


def perf_session(config) -> PerfSession:
    return getattr(config, _SESSION_KEY)


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    kind = metafunc.function.__name__[len("test_"):].replace("_", "-")
    cases = perf_session(metafunc.config).cases(kind)
    if not cases:  # kind not selected (--case-kind): one placeholder, deselected at collection
        metafunc.parametrize("case", [pytest.param(None, id="not-selected")])
        return
    metafunc.parametrize("case", cases, ids=[str(c) for c in cases])


def _case_of(item):
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("case", "missing") if callspec else "missing"


def pytest_collection_modifyitems(session, config, items):
    # Deselect kinds not asked for; sort the perf cases so that each model is built once.
    deselected = [it for it in items if _case_of(it) is None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [it for it in items if _case_of(it) is not None]
    slots = [i for i, it in enumerate(items) if isinstance(_case_of(it), C.Case)]
    ordered = sorted((items[i] for i in slots), key=lambda it: C.run_order(_case_of(it)))
    for i, it in zip(slots, ordered, strict=True):
        items[i] = it


def _selected(config) -> list:
    return getattr(config, "_perf_selected", [])


def pytest_collection_finish(session):
    """The selection is final (after -k and --case-kind): open the journal with the start line."""
    config = session.config
    s = getattr(config, _SESSION_KEY, None)
    if s is None:
        return
    config._perf_selected = [_case_of(it).name for it in session.items if isinstance(_case_of(it), C.Case)]
    json_path = config.getoption("benchmark_json", None)
    if json_path is None or config.option.collectonly:
        return
    turns.begin()  # in an A/B pair run side by side: wait for this process's first turn
    journal = Journal(journal_path(json_path))
    setattr(config, _JOURNAL_KEY, journal)
    bs = config._benchmarksession
    journal.write({"type": "start", "machine_info": bs.get_machine_info(),
                   "perf_tests": {**s.options.perf_tests_section(), "selected": _selected(config)}})
    s.set_journal(journal.write)


@pytest.fixture(scope="session")
def perf(request) -> PerfSession:
    return perf_session(request.config)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A perf case that failed or was skipped outside PerfSession.run (a fixture error, a skip marker) is
    recorded too: a selected case is always produced, skipped or failed."""
    outcome = yield
    report = outcome.get_result()
    case, s = _case_of(item), getattr(item.config, _SESSION_KEY, None)
    if s is None or not isinstance(case, C.Case) or not (report.failed or report.skipped):
        return
    if case.name in s.failed or case.name in s.skipped or report.when == "teardown":
        return
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        s.record_skip(case.name, reason.removeprefix("Skipped: "))
    else:
        message = str(report.longrepr).strip().splitlines()
        s.record_failure(case.name, message[-1] if message else f"{report.when} failed", "error")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session):
    yield
    s = getattr(session.config, _SESSION_KEY, None)
    if s is not None and not session.config.option.collectonly and _selected(session.config):
        s.canary(before=None)  # the end of the run


def pytest_benchmark_update_machine_info(config, machine_info):
    from perf_tests.measure.machine import machine_info as perf_machine_info

    machine_info.update(perf_machine_info(perf_session(config).device, str(config.rootpath)))


def perf_tests_section(config) -> dict:
    s = perf_session(config)
    return {
        **s.options.perf_tests_section(),
        "selected": _selected(config),  # every case name selected in this run
        "skipped": [{"name": n, "reason": r} for n, r in s.skipped.items()],
        "failed": list(s.failed.values()),  # {"name", "reason", "kind"}
        "canary": s.canary_section(),
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["perf_tests"] = perf_tests_section(config)


def pytest_sessionfinish(session, exitstatus):
    """pytest-benchmark writes no JSON when no case produced a timing (every case failed or skipped): the
    failures and skips must still reach the result file, so it is written here then. Then the journal
    gets its end line, unless the run was interrupted."""
    config = session.config
    s = getattr(config, _SESSION_KEY, None)
    journal = getattr(config, _JOURNAL_KEY, None)
    if s is None or journal is None:
        return
    bs = config._benchmarksession
    if not bs.benchmarks and bs.json:
        output_json = config.hook.pytest_benchmark_generate_json(
            config=config, benchmarks=[], include_data=True, machine_info=bs.get_machine_info(),
            commit_info=config.hook.pytest_benchmark_generate_commit_info(config=config))
        config.hook.pytest_benchmark_update_json(config=config, benchmarks=[], output_json=output_json)
        bs.save_json(output_json)
    if exitstatus != pytest.ExitCode.INTERRUPTED:
        journal.write({"type": "end"})
    journal.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    s = getattr(config, _SESSION_KEY, None)
    if bs is None or s is None:
        return
    if s.failed:
        terminalreporter.write_sep("=",
                                   f"{len(s.failed)} perf case(s) FAILED (recorded in perf_tests.failed)")
        for f in s.failed.values():
            terminalreporter.write_line(f"{f['kind']}: {f['reason']}")
    if not bs.benchmarks:
        return
    from perf_tests.report.study import build_study_tables, write_study

    run = {"machine_info": {"env": _env(), "device_slug": device_identity(s.device)[1]},
           "benchmarks": [b.as_dict(include_data=True) for b in bs.benchmarks if not b.has_error]}
    reference = config.getoption("perf_study_reference")
    tables = build_study_tables([run], reference)
    if not tables:
        return
    terminalreporter.write_sep("=", "SD 2.1 study table (median time, % improvement vs reference)")
    for t in tables:
        terminalreporter.write(t.to_text() + "\n")
    if s.skipped:
        terminalreporter.write_line(f"{len(s.skipped)} case(s) skipped with a reason (see -rs or the JSON's "
                                    "perf_tests.skipped)")
    out = config.getoption("perf_study_dir")
    if out:
        out = Path(out)
        for path in [*write_study([run], out / "study.md", reference=reference, plot=out / "study.png"),
                     *write_study([run], out / "study.txt", reference=reference)]:
            terminalreporter.write_line(f"wrote {path}")


def _env() -> str:
    import torch

    return env_label(torch.__version__)


def pytest_unconfigure(config):
    turns.end()  # the A/B partner takes over for good (after the study table and the summary)
