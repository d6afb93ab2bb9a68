"""Options shared by several commands, declared once: the verdict policy, the report outputs and what
makes the gate fail."""

from __future__ import annotations

import argparse
from pathlib import Path

from perf_tests.errors import InputError

VERDICT_RULES = """\
verdicts (per case; time, compile time and peak memory each judged). Time is judged on runs (each run's
median), not rounds: the run-to-run variance is part of the interval.
  regression    slower: a one-sided t test on the runs' log medians significant family-wise across cases
                (closed test; or BH), AND the estimated slowdown above +min-effect; exit 1
  improvement   the mirror image
  no-change     the whole 90% interval within +-min-effect
  inconclusive  anything else: the interval straddles the band, too few runs (the reason says how many
                would settle it), a disturbed machine (the canary moved), or another device type;
                exit 0 unless --fail-on-inconclusive
every time verdict states its MDE: the smallest slowdown this comparison catches with 80% power.
  new           case only in the candidate; a changed definition_hash is "new"
  failed        the candidate recorded the case as failed (wrong output, NaN, error, OOM); exit 1
  skipped       in the baseline, skipped in the candidate with a reason; passes
  missing       selected in the candidate run but neither produced, skipped nor failed; exit 1 with
                --require-all. Baseline cases the candidate did not select are counted, not judged.
"""


def _pattern_value(text: str) -> tuple[str, float]:
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"expected PATTERN=VALUE, got {text!r}")
    try:
        return pattern, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number in {text!r}") from None


def policy_options(p: argparse.ArgumentParser) -> None:
    from perf_tests.analysis.stats import DEFAULT_ENV_FIELDS, Policy

    d = Policy()
    g = p.add_argument_group("verdict policy")
    g.add_argument("--alpha", type=float, default=d.alpha,
                   help="family-wise error rate per run (default %(default)s)")
    g.add_argument("--min-effect", type=float, default=d.min_effect,
                   help="smallest relative slowdown that counts, e.g. 0.05 = 5%% (default %(default)s)")
    g.add_argument("--min-effect-for", type=_pattern_value, action="append", default=[],
                   metavar="PATTERN=VALUE",
                   help="per-case/group minimum effect, fnmatch on the case name, e.g. 'test_attention*=0.1' "
                        "(repeatable; last match wins)")
    g.add_argument("--correction", choices=("holm", "bh", "none"), default=d.correction,
                   help="multiple-comparison correction across cases (default %(default)s)")
    g.add_argument("--power", type=float, default=d.power,
                   help="power at which the minimum detectable effect (MDE) is stated (default %(default)s)")
    g.add_argument("--machine-sd", type=float, default=d.machine_sd,
                   help="machine-to-machine sd of the log time common to all cases (what is left after the "
                        "canary's move), added when the candidate ran on a machine none of the baseline's "
                        "runs "
                        "came from and the baseline cannot estimate it (default %(default)s)")
    g.add_argument("--machine-case-sd", type=float, default=None,
                   help="the same for a case moving unlike the others (default per device type: "
                        f"{', '.join(f'{dt} {sd}' for dt, sd in d.machine_case_sds)})")
    g.add_argument("--compile-threshold", type=float, default=d.compile_threshold,
                   help="relative compile-time change that counts (default %(default)s)")
    g.add_argument("--memory-threshold", type=float, default=d.memory_threshold,
                   help="relative peak-memory change that counts (default %(default)s)")
    g.add_argument("--ignore-env", action="append", default=[], metavar="FIELD",
                   help="do not label verdicts with a change of this environment field (repeatable); "
                        "labelled: "
                        f"{', '.join(DEFAULT_ENV_FIELDS)}. A different device type is never comparable.")


def output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=("text", "markdown", "json"), default="text")
    g.add_argument("--output", type=Path, help="write the report here instead of stdout")
    g.add_argument("--plot-dir", type=Path, help="write a PNG per flagged case (baseline vs candidate) here")
    g.add_argument("--step-summary", action="store_true",
                   help="also append the Markdown report to $GITHUB_STEP_SUMMARY when that is set")
    g.add_argument("--report-dir", type=Path,
                   help="also write the report in every format here, once each: STEM.txt, STEM.md, STEM.json "
                        "and plots-STEM/ (a PNG per flagged case)")
    g.add_argument("--stem", default="verdict", help="file name stem for --report-dir (default %(default)s)")


def gate_options(p: argparse.ArgumentParser) -> None:
    """What fails the gate besides a regression or a failed case (`compare` and `run`)."""
    g = p.add_argument_group("gate")
    g.add_argument("--fail-on-inconclusive", action="store_true",
                   help="exit 1 when any case is inconclusive, not only on a regression")
    g.add_argument("--require-all", action="store_true",
                   help="exit 1 when a case selected in the candidate run is missing (neither measured, "
                        "skipped nor failed), e.g. a run that was killed")
    g.add_argument("--require-baseline", action="store_true",
                   help="exit 2 instead of warning when the baseline folder has no baseline for this device")


def build_policy(args: argparse.Namespace):
    """The verdict policy of the options of :func:`policy_options`."""
    from perf_tests.analysis.stats import DEFAULT_ENV_FIELDS, Policy

    unknown = sorted(set(args.ignore_env) - set(DEFAULT_ENV_FIELDS))
    if unknown:
        raise InputError(f"--ignore-env {', '.join(unknown)}: not a judged field "
                         f"({', '.join(DEFAULT_ENV_FIELDS)}).")
    try:
        return Policy(
            alpha=args.alpha, min_effect=args.min_effect, min_effect_overrides=tuple(args.min_effect_for),
            correction=args.correction, power=args.power, machine_sd=args.machine_sd,
            machine_case_sds=Policy().machine_case_sds if args.machine_case_sd is None else (("*",
                                                                                              args.machine_case_sd),),
            compile_threshold=args.compile_threshold, memory_threshold=args.memory_threshold,
            env_fields=tuple(f for f in DEFAULT_ENV_FIELDS if f not in args.ignore_env),
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None


def profile_options(p: argparse.ArgumentParser) -> None:
    """How the operator profile of a case is taken (`explain` and `bisect`)."""
    from perf_tests.tools.explain import DEFAULT_CALLS, DEFAULT_RUNS, DEFAULT_WARMUP, TOP

    g = p.add_argument_group("profiling")
    g.add_argument("--repeats", type=int, default=DEFAULT_CALLS,
                   help="profiled calls per process, after the warm-up (default %(default)s)")
    g.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                   help="calls before profiling; the first compiles a compiled case (default %(default)s)")
    g.add_argument("--runs-per-side", type=int, default=DEFAULT_RUNS,
                   help="profiled processes per side, interleaved baseline, candidate, ... (default "
                        "%(default)s)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if present)")
    g.add_argument("--top", type=int, default=TOP, help="operators listed per case (default %(default)s)")


def profile_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``explain.explain_cases``/``explain_trees`` from :func:`profile_options`."""
    if args.repeats < 1 or args.runs_per_side < 1:
        raise InputError("--repeats and --runs-per-side must be at least 1.")
    return dict(runs=args.runs_per_side, calls=args.repeats, warmup=args.warmup, device=args.device,
                top=args.top)


def check_case_name(name: str, option: str = "") -> None:
    """InputError unless ``name`` is a benchmark name (``test_<kind>[<id>]``)."""
    from perf_tests.records.names import parse_name

    try:
        parse_name(name)
    except ValueError as exc:
        raise InputError(f"{option}{exc}; a case is named as in the gate's report, e.g. "
                         "'test_unet_step[tiny-sdpa-eager-bs1-fp32]'.") from None


def store_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        default=None,
        metavar="PATH|URL",
        help="SQLite file or postgresql://... (default $SD_PERF_STORE, else ~/.cache/sd-perf/store.sqlite)",
    )
