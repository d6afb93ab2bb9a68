"""``python -m perf_tests``: run, compare, update-baselines, report.

Exit codes: 0 pass; 1 a regression or a failed case (with --require-all also a missing case, with
--fail-on-inconclusive an inconclusive one); 2 bad input, usage, or any error inside the gate, printed as one
``error: ...`` paragraph without a traceback. A subcommand is one ``add_<name>(subparsers)`` function below,
listed in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from perf_tests.results import InputError
from perf_tests.stats import DEFAULT_ENV_FIELDS, Policy

EXIT_BAD_INPUT = 2

VERDICT_RULES = """\
verdicts (per case; time, compile time and peak memory each judged). Time is judged on runs (each run's
median), not rounds: the run-to-run variance is part of the interval.
  regression    slower: a one-sided t test on the runs' log medians significant at the family-wise alpha
                (max-t step-down across cases; or BH), AND the estimated slowdown above +min-effect; exit 1
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
                   help="multiple-comparison correction across cases; holm: the family-wise max-t "
                        "step-down of docs/statistics.md (default %(default)s)")
    g.add_argument("--power", type=float, default=d.power,
                   help="power at which the minimum detectable effect (MDE) is stated (default %(default)s)")
    g.add_argument("--machine-sd", type=float, default=d.machine_sd,
                   help="machine-to-machine sd of the log time common to all cases (what is left after the "
                        "canary's move), added when the candidate ran on a machine none of the baseline's runs "
                        "came from and the baseline cannot estimate it (default %(default)s)")
    g.add_argument("--machine-case-sd", type=float, default=None,
                   help="the same for a case moving unlike the others (default per device type: "
                        f"{', '.join(f'{dt} {sd}' for dt, sd in d.machine_case_sds)})")
    g.add_argument("--compile-threshold", type=float, default=d.compile_threshold,
                   help="relative compile-time change that counts (default %(default)s)")
    g.add_argument("--memory-threshold", type=float, default=d.memory_threshold,
                   help="relative peak-memory change that counts (default %(default)s)")
    g.add_argument("--ignore-env", action="append", default=[], metavar="FIELD",
                   help="do not label verdicts with a change of this environment field (repeatable); labelled: "
                        f"{', '.join(DEFAULT_ENV_FIELDS)}. A different device type is never comparable.")


def _output_options(p: argparse.ArgumentParser) -> None:
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
    g.add_argument("--fail-on-inconclusive", action="store_true",
                   help="exit 1 when any case is inconclusive, not only on a regression")
    g.add_argument("--require-all", action="store_true",
                   help="exit 1 when a case selected in the candidate run is missing (neither measured, "
                        "skipped nor failed), e.g. a run that was killed")


def build_policy(args: argparse.Namespace) -> Policy:
    unknown = sorted(set(args.ignore_env) - set(DEFAULT_ENV_FIELDS))
    if unknown:
        raise InputError(f"--ignore-env {', '.join(unknown)}: not a judged field ({', '.join(DEFAULT_ENV_FIELDS)}).")
    try:
        return Policy(
            alpha=args.alpha, min_effect=args.min_effect, min_effect_overrides=tuple(args.min_effect_for),
            correction=args.correction, power=args.power, machine_sd=args.machine_sd,
            machine_case_sds=Policy().machine_case_sds if args.machine_case_sd is None else (("*", args.machine_case_sd),),
            compile_threshold=args.compile_threshold, memory_threshold=args.memory_threshold,
            env_fields=tuple(f for f in DEFAULT_ENV_FIELDS if f not in args.ignore_env),
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _emit(outcome, args: argparse.Namespace) -> int:
    """Warnings to stderr, the report in --format to stdout or --output, every format to --report-dir."""
    from perf_tests.compare import exit_code, render, write_reports
    from perf_tests.report import plot_flagged

    for w in outcome.warnings:
        print(f"warning: {w}", file=sys.stderr)
    text = render(outcome, args.format)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    elif outcome.comparison is not None:  # else the warnings above said it all
        sys.stdout.write(text)
    if args.step_summary and os.environ.get("GITHUB_STEP_SUMMARY"):
        with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as f:
            f.write(render(outcome, "markdown") + "\n")
    if args.report_dir:
        for kind, path in write_reports(outcome, args.report_dir, args.stem).items():
            print(f"{'plot' if kind.startswith('plot:') else 'report'}: {path}", file=sys.stderr)
    elif args.plot_dir and outcome.comparison is not None:
        for path in plot_flagged(outcome.comparison, outcome.baseline, outcome.candidate, args.plot_dir):
            print(f"plot: {path}", file=sys.stderr)
    return exit_code(outcome, fail_on_inconclusive=args.fail_on_inconclusive, require_all=args.require_all)


def cmd_compare(args: argparse.Namespace) -> int:
    from perf_tests.compare import load_and_compare

    outcome = load_and_compare(args.baseline, args.candidate, build_policy(args),
                               require_baseline=args.require_baseline)
    return _emit(outcome, args)


def cmd_update(args: argparse.Namespace) -> int:
    from perf_tests.baselines import update_baselines

    for u in update_baselines(args.runs, args.baseline_dir, args.replace):
        if u.removed_temp_files:
            print(f"{u.path}: removed {len(u.removed_temp_files)} temporary file(s) of an interrupted update")
        if u.added:
            print(f"wrote {u.path}: {len(u.added)} run(s) added, {len(u.baseline.runs)} in all, "
                  f"{len({n for r in u.baseline.runs for n in r.cases})} cases")
        else:
            print(f"{u.path}: unchanged, no new run")
        if u.duplicates:
            print(f"  already there (same content hash), not added again: {', '.join(u.duplicates)}")
        for note in u.notes:
            print(f"  note: {note}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from perf_tests.results import read_run
    from perf_tests.table import available_kinds, build_ladder, build_study_table, plot_study

    runs = [read_run(p) for p in args.runs]
    if args.layout == "study":
        return _study_layout(runs, args)
    kinds = [args.kind] if args.kind else available_kinds(runs)
    tables = [build_study_table(runs, args.reference, kind) for kind in kinds]
    text = "\n".join(t.to_markdown() if args.format == "markdown" else t.to_text() for t in tables)
    ladders = [ladder for kind in kinds if len((ladder := build_ladder(runs, kind)).rungs) >= 2]
    text += "".join("\n" + ladder.to_markdown() for ladder in ladders)  # where the runs measured its steps
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


def _study_layout(runs: list, args: argparse.Namespace) -> int:
    """The study's tables (perf_tests.table.build_study_layout) as Markdown, and its figure."""
    from perf_tests.table import build_study_layout, plot_study

    layout = build_study_layout(runs, args.kind or "txt2img")
    text = layout.to_markdown()
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if args.plot and layout.batch_sizes:
        print(f"plot: {plot_study(layout.as_study_table(), args.plot)}", file=sys.stderr)
    return 0


# --- the parser: one function per subcommand ------------------------------------------------------------


def add_compare(sub) -> None:
    p = sub.add_parser("compare", help="compare a candidate run with a baseline", epilog=VERDICT_RULES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("baseline", help="baseline file, result JSON, or baseline folder (e.g. baselines)")
    p.add_argument("candidate", nargs="+",
                   help="result JSON run(s) or their .journal.jsonl (a killed run's journal); several are merged")
    p.add_argument("--require-baseline", action="store_true",
                   help="exit 2 instead of warning when the folder has no baseline for this device")
    _policy_options(p)
    _output_options(p)
    p.set_defaults(func=cmd_compare)


def add_update_baselines(sub) -> None:
    p = sub.add_parser("update-baselines", help="merge runs into baselines/<device>/<env>-<profile>.json")
    p.add_argument("runs", nargs="+", help="result JSON runs (each from its own process)")
    p.add_argument("--baseline-dir", type=Path, default=Path("baselines"))
    p.add_argument("--replace", action="store_true", help="start the baseline anew instead of adding runs to it")
    p.set_defaults(func=cmd_update)


def add_report(sub) -> None:
    p = sub.add_parser("report", help="the study table (median time, %% improvement per batch size)")
    p.add_argument("runs", nargs="+", help="result JSON runs (torch1 and torch2 may be mixed)")
    p.add_argument("--reference", default="original", help="reference row (default %(default)s)")
    p.add_argument("--kind", help="one case kind (txt2img, unet-step, ...); default: a table per kind present")
    p.add_argument("--format", choices=("markdown", "text"), default="markdown")
    p.add_argument("--output", type=Path)
    p.add_argument("--plot", type=Path, help="write the bar chart PNG here")
    p.add_argument("--layout", choices=("configurations", "study"), default="configurations",
                   help="study: the PyTorch 2 study's tables, one per batch size, its release pair against "
                        "the current one (runs of torch1, torch20 and torch2)")
    p.set_defaults(func=cmd_report)


def add_run(sub) -> None:
    # `run` parses its own options (perf_tests/run.py); main() hands it the arguments before argparse sees them
    sub.add_parser("run", help="one perf run end to end: suite processes, study table, verdict (run --help)")


def add_explain_and_bisect(sub) -> None:
    from perf_tests import bisect, explain  # operator diff and bisection of one case: their own modules

    explain.add_parser(sub)
    bisect.add_parser(sub)


def add_store_history_dashboard(sub) -> None:
    from perf_tests import dashboard, fleet, history, store_cli  # the results store and what reads it

    store_cli.add_parser(sub)
    history.add_parser(sub)
    dashboard.add_parser(sub)
    fleet.add_parser(sub)


SUBCOMMANDS = (add_run, add_compare, add_update_baselines, add_report, add_explain_and_bisect,
               add_store_history_dashboard)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m perf_tests",
        description="Regression gate for the perf_tests benchmark suite.",
        epilog=VERDICT_RULES + "exit codes: 0 pass, 1 regression or failed case, 2 bad input or an error in the gate.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
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
    except Exception as exc:  # a crash inside the gate must never read as a regression (exit 1)
        where = traceback.extract_tb(exc.__traceback__)[-1]
        print(
            f"error: internal error in `python -m perf_tests {args.command}`: {type(exc).__name__}: {exc} "
            f"(at {Path(where.filename).name}:{where.lineno}). This is a bug in the gate, not a verdict on the "
            f"code measured; the inputs may be unusual. Please report it with the command line and input files.",
            file=sys.stderr,
        )
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
