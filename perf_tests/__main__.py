"""``python -m perf_tests``: run, compare, update-baselines, report.

Exit codes: 0 no regression, 1 regression (or, with --fail-on-inconclusive, an inconclusive case),
2 bad input or usage. Errors print ``error: <message>`` without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from perf_tests.baselines import InputError
from perf_tests.stats import DEFAULT_ENV_FIELDS, Policy

EXIT_BAD_INPUT = 2

VERDICT_RULES = """\
verdicts (per case; time, compile time and peak memory each judged):
  regression    slower: significant after multiple-comparison correction AND the CI's lower bound above
                +min-effect (widened to the run-to-run noise stored in merged runs, and to the dispersion
                of a noisy side); exit 1
  improvement   the mirror image
  no-change     the whole CI within the threshold band, neither side noisy
  inconclusive  CI straddles the threshold, too few samples, noisy and within its noise, or an
                environment mismatch; exit 0 unless --fail-on-inconclusive
  new/missing   case only in the candidate / only in the baseline; a changed definition_hash is "new"
a candidate case with wrong output (extra_info.correct false) always counts as a regression.
"""


def _pattern_value(text: str) -> tuple[str, float]:
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"expected PATTERN=VALUE, got {text!r}")
    try:
        return pattern, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number in {text!r}") from None


def _policy_options(p: argparse.ArgumentParser) -> None:
    d = Policy()
    g = p.add_argument_group("verdict policy")
    g.add_argument("--alpha", type=float, default=d.alpha, help="family-wise error rate per run (default %(default)s)")
    g.add_argument("--min-effect", type=float, default=d.min_effect,
                   help="smallest relative slowdown that counts, e.g. 0.05 = 5%% (default %(default)s)")
    g.add_argument("--min-effect-for", type=_pattern_value, action="append", default=[], metavar="PATTERN=VALUE",
                   help="per-case/group minimum effect, fnmatch on the case name, e.g. 'test_attention*=0.1' "
                        "(repeatable; last match wins)")
    g.add_argument("--correction", choices=("holm", "bh", "none"), default=d.correction,
                   help="multiple-comparison correction across cases (default %(default)s)")
    g.add_argument("--max-dispersion", type=float, default=d.max_dispersion,
                   help="robust CV above which a case is 'noisy': its threshold widens to that CV and it "
                        "is never 'no change' (default %(default)s)")
    g.add_argument("--min-samples", type=int, default=d.min_samples, help="per side (default %(default)s)")
    g.add_argument("--compile-threshold", type=float, default=d.compile_threshold,
                   help="relative compile-time change that counts (default %(default)s)")
    g.add_argument("--memory-threshold", type=float, default=d.memory_threshold,
                   help="relative peak-memory change that counts (default %(default)s)")
    g.add_argument("--resamples", type=int, default=d.n_resamples, help="bootstrap resamples (default %(default)s)")
    g.add_argument("--ignore-env", action="append", default=[], metavar="FIELD",
                   help=f"do not judge this environment field (repeatable); judged: {', '.join(DEFAULT_ENV_FIELDS)}")


def _output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=("text", "markdown", "json"), default="text")
    g.add_argument("--output", type=Path, help="write the report here instead of stdout")
    g.add_argument("--plot-dir", type=Path, help="write a PNG per flagged case (baseline vs candidate) here")
    g.add_argument("--step-summary", action="store_true",
                   help="also append the Markdown report to $GITHUB_STEP_SUMMARY when that is set")
    g.add_argument("--fail-on-inconclusive", action="store_true",
                   help="exit 1 when any case is inconclusive, not only on a regression")


def build_policy(args: argparse.Namespace) -> Policy:
    unknown = sorted(set(args.ignore_env) - set(DEFAULT_ENV_FIELDS))
    if unknown:
        raise InputError(f"--ignore-env {', '.join(unknown)}: not a judged field ({', '.join(DEFAULT_ENV_FIELDS)}).")
    try:
        return Policy(
            alpha=args.alpha, min_effect=args.min_effect, min_effect_overrides=tuple(args.min_effect_for),
            correction=args.correction, max_dispersion=args.max_dispersion, min_samples=args.min_samples,
            compile_threshold=args.compile_threshold, memory_threshold=args.memory_threshold,
            n_resamples=args.resamples,
            env_fields=tuple(f for f in DEFAULT_ENV_FIELDS if f not in args.ignore_env),
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None


def cmd_compare(args: argparse.Namespace) -> int:
    from perf_tests.compare import emit, exit_code, load_and_compare

    outcome = load_and_compare(args.baseline, args.candidate, build_policy(args), args.require_baseline)
    for path in emit(outcome, args.format, args.output, args.plot_dir, args.step_summary):
        print(f"plot: {path}", file=sys.stderr)
    return exit_code(outcome.comparison, args.fail_on_inconclusive)


def cmd_update(args: argparse.Namespace) -> int:
    from perf_tests.baselines import update_baselines

    for path, doc, notes in update_baselines(args.runs, args.baseline_dir, args.replace):
        n_cases = len(doc["cases"])
        print(f"wrote {path}: {n_cases} cases, {len(doc['runs'])} run(s) merged")
        for note in notes:
            print(f"  note: {note}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from perf_tests.baselines import kind_of, load_json

    try:  # the study table is the perf suite's (perf_tests/table.py); imported only when asked for
        from perf_tests.table import available_kinds, build_study_table, plot_study
    except ImportError as exc:
        raise InputError(f"the study table needs perf_tests/table.py, which cannot be imported here ({exc}).") from None
    runs = []
    for p in args.runs:
        doc = load_json(p)
        if kind_of(doc, p) != "run":
            raise InputError(f"{p}: report takes pytest-benchmark JSON runs, not a baseline file.")
        runs.append(doc)
    kinds = [args.kind] if args.kind else available_kinds(runs)
    tables = [build_study_table(runs, args.reference, kind) for kind in kinds]
    text = "\n".join(t.to_markdown() if args.format == "markdown" else t.to_text() for t in tables)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if args.plot:
        for t in tables:  # FILE.png for a single table, FILE-<kind>.png for several
            path = args.plot if len(tables) == 1 else args.plot.with_name(f"{args.plot.stem}-{t.kind}{args.plot.suffix}")
            print(f"plot: {plot_study(t, path)}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m perf_tests",
        description="Regression gate for the perf_tests benchmark suite.",
        epilog=VERDICT_RULES + "exit codes: 0 no regression, 1 regression, 2 bad input or usage.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compare", help="compare a candidate run with a baseline", epilog=VERDICT_RULES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("baseline", help="baseline file, pytest-benchmark JSON, or baseline folder (e.g. baselines)")
    p.add_argument("candidate", nargs="+", help="pytest-benchmark JSON run(s); several are merged")
    p.add_argument("--require-baseline", action="store_true",
                   help="exit 2 instead of warning when the folder has no baseline for this device")
    _policy_options(p)
    _output_options(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("update-baselines", help="merge runs into baselines/<device>/<env>-<profile>.json")
    p.add_argument("runs", nargs="+", help="pytest-benchmark JSON runs (each from its own process)")
    p.add_argument("--baseline-dir", type=Path, default=Path("baselines"))
    p.add_argument("--replace", action="store_true", help="start the baseline anew instead of adding runs to it")
    p.set_defaults(func=cmd_update)

    p = sub.add_parser("report", help="the study table (median time, %% improvement per batch size)")
    p.add_argument("runs", nargs="+", help="pytest-benchmark JSON runs (torch1 and torch2 may be mixed)")
    p.add_argument("--reference", default="original", help="reference row (default %(default)s)")
    p.add_argument("--kind", help="one case kind (txt2img, unet-step, ...); default: a table per kind present")
    p.add_argument("--format", choices=("markdown", "text"), default="markdown")
    p.add_argument("--output", type=Path)
    p.add_argument("--plot", type=Path, help="write the bar chart PNG here")
    p.set_defaults(func=cmd_report)

    sub.add_parser("run", help="one perf run end to end: suite processes, study table, verdict (run --help)")

    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # its own parser (perf_tests/run.py): options, then pytest's after --
        from perf_tests.run import main as run

        return run(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
