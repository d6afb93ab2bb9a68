"""pytest glue of the benchmark suite: options, one parametrized case per test, run order, machine_info,
the skipped cases in the JSON, and the study table at the end of the run.

    python -m pytest perf_tests                          # default grid of the device found
    python -m pytest perf_tests --profile tiny --attention original,sdpa --compile eager,default \\
        --batch-size 1,2 --case-kind txt2img,unet-step --benchmark-json out.json --study-dir out/

Raw samples are always saved (``--benchmark-save-data`` is forced on) and the garbage collector is off
during timed rounds.
"""

from __future__ import annotations

import pytest

from perf_tests import cases as C
from perf_tests.machine import device_identity, env_label
from perf_tests.suite import Options, PerfSession

_SESSION_KEY = "_perf_session"
_SKIPPED: list = []  # {"name", "reason"} of every perf case skipped in this run
_FAILED: list = []  # {"name", "message"} of every perf case that failed (wrong output, error)


def pytest_addoption(parser):
    g = parser.getgroup("perf_tests", "Stable Diffusion 2.1 benchmark suite (perf_tests)")
    g.addoption("--profile", dest="perf_profile", default=None,
                help=f"model profile: {', '.join(C.PROFILES)} (default: tiny on CPU, sd21-base on CUDA)")
    g.addoption("--attention", dest="perf_attention", default=None,
                help=f"comma-separated attention backends (default: all of {', '.join(C.ATTENTION_BACKENDS)})")
    g.addoption("--compile", dest="perf_compile", default=None,
                help="comma-separated: eager, compile, compile-max-autotune, compile-reduce-overhead "
                     "(default: eager,compile on CPU; all four on CUDA)")
    g.addoption("--batch-size", dest="perf_batch_size", default=None,
                help="comma-separated batch sizes (default: 1,2 on CPU, txt2img and vae-decode 1 only; 1,2,4 on CUDA)")
    g.addoption("--precision", dest="perf_precision", default=None,
                help="comma-separated: fp32, fp16, bf16, autocast (default: fp32 on CPU; autocast,fp16 on CUDA)")
    g.addoption("--steps", dest="perf_steps", type=int, default=None,
                help="txt2img sampling steps (default: the profile's, 8 tiny, 50 sd21)")
    g.addoption("--rounds", dest="perf_rounds", type=int, default=None,
                help="timed rounds per case (default per kind: 5 for txt2img, 7 for vae-decode on CPU, 10 CPU / 20 CUDA "
                     "for the other components)")
    g.addoption("--warmup-rounds", dest="perf_warmup_rounds", type=int, default=None,
                help="untimed calls before the rounds, the first being the correctness check (min 1; "
                     "compiled cases get one more). Default: 1 for txt2img (the study's --skip_first), 2-3 else")
    g.addoption("--ckpt", dest="perf_ckpt", default=None, help="checkpoint to load (default: random weights)")
    g.addoption("--case-kind", dest="perf_case_kind", default=None,
                help=f"comma-separated kinds: {', '.join(C.KINDS)}, or 'attention' for the three shapes")
    g.addoption("--device", dest="perf_device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    g.addoption("--threads", dest="perf_threads", type=int, default=None,
                help="torch.set_num_threads for the run; 0 = torch's default (default: 1 on CPU, untouched on CUDA)")
    g.addoption("--study-dir", dest="perf_study_dir", default=None,
                help="write the study table (study.md, study.txt) and bar charts (study-<kind>.png) here")
    g.addoption("--study-reference", dest="perf_study_reference", default="original",
                help="reference row of the study table (default: original)")
    g.addoption("--inject-delay", dest="perf_inject_delay", type=float, default=0.0,
                help="timing-honesty check: add a known delay (seconds; a device-side spin on CUDA) to every "
                     "timed round; recorded as extra_info.injected_delay_s")


def pytest_configure(config):
    config.option.benchmark_save_data = True  # raw samples in saved JSON, always
    config.option.benchmark_disable_gc = True
    config._perf_skipped = []


def perf_session(config) -> PerfSession:
    session = getattr(config, _SESSION_KEY, None)
    if session is None:
        import torch

        try:
            options = Options.parse(config.getoption, torch.cuda.is_available())
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from exc
        if options.grid.threads:
            torch.set_num_threads(options.grid.threads)
        session = PerfSession(options)
        setattr(config, _SESSION_KEY, session)
    return session


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
    # Deselect kinds not asked for; sort the perf cases so that each model is built (and compiled) once.
    deselected = [it for it in items if _case_of(it) is None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [it for it in items if _case_of(it) is not None]
    slots = [i for i, it in enumerate(items) if isinstance(_case_of(it), C.Case)]
    ordered = sorted((items[i] for i in slots), key=lambda it: C.run_order(_case_of(it)))
    for i, it in zip(slots, ordered, strict=True):
        items[i] = it


@pytest.fixture(scope="session")
def perf(request) -> PerfSession:
    return perf_session(request.config)


def pytest_runtest_logreport(report):
    if "perf_tests/" not in report.nodeid or report.when not in ("setup", "call"):
        return
    name = report.nodeid.split("::")[-1]
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append({"name": name, "reason": reason.removeprefix("Skipped: ")})
    elif report.failed:  # e.g. a wrong output: never timed, so absent from "benchmarks"
        message = str(report.longrepr).strip().splitlines()
        _FAILED.append({"name": name, "message": message[-1] if message else ""})


def pytest_benchmark_update_machine_info(config, machine_info):
    from perf_tests.machine import machine_info as perf_machine_info

    machine_info.update(perf_machine_info(perf_session(config).device, str(config.rootpath)))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    s = perf_session(config)
    g = s.options.grid
    output_json["perf_tests"] = {
        "harness_version": C.HARNESS_VERSION,
        "grid": {"profile": g.profile, "attention": list(g.attention), "compile": list(g.compile),
                 "batch_sizes": list(g.batch_sizes), "precisions": list(g.precisions), "kinds": list(g.kinds),
                 "kind_compile": {k: list(v) for k, v in g.kind_compile.items()}, "threads": g.threads,
                 "kind_batch_sizes": {k: list(v) for k, v in g.kind_batch_sizes.items()}},
        "skipped": list(_SKIPPED),  # every combination that did not run, with its reason
        "failed": list(_FAILED),
    }


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks or getattr(config, _SESSION_KEY, None) is None:
        return
    from perf_tests.table import build_study_tables, write_study

    run = {"machine_info": {"env": _env(), "device_slug": device_identity(perf_session(config).device)[1]},
           "benchmarks": [b.as_dict(include_data=True) for b in bs.benchmarks if not b.has_error]}
    reference = config.getoption("perf_study_reference")
    tables = build_study_tables([run], reference)
    if not tables:
        return
    terminalreporter.write_sep("=", "SD 2.1 study table (median time, % improvement vs reference)")
    for t in tables:
        terminalreporter.write(t.to_text() + "\n")
    if _SKIPPED:
        terminalreporter.write_line(f"{len(_SKIPPED)} case(s) skipped with a reason (see -rs or the JSON's "
                                    "perf_tests.skipped)")
    out = config.getoption("perf_study_dir")
    if out:
        for path in write_study([run], out, reference):
            terminalreporter.write_line(f"wrote {path}")


def _env() -> str:
    import torch

    return env_label(torch.__version__)
