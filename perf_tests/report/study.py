"""The study's table and figure, built from saved pytest-benchmark JSON (one or several runs).

Rows are configurations — original, original+xformers, sdpa-math, sdpa-mem-efficient,
sdpa-mem-efficient+compile (the PyTorch blog study's five), then every other backend/compile mode that
ran — columns are batch sizes, and a cell is the median time with the % improvement against a reference
row, ``(t_ref - t) / t_ref``, as in the study. Runs from several environments (torch1/torch20/torch2),
precisions, devices or profiles can be mixed: whatever differs between benchmarks is added to the row label in
brackets (``original [torch1]``). Samples of the same benchmark from several runs are pooled. Nothing is
rerun: only the result files are read, through ``results.read_run`` (each cell from the raw samples).

    table = build_study_table(load_runs(paths), reference="original")
    print(table.to_markdown()); plot_study(table, "study.png")

The study's own layout (``build_study_layout``, ``report --layout study``): one table per batch size, its five
configurations as rows, the study's release pair (original code on torch1, optimized on torch20) and the
current release (torch2) as columns, each cell the time over runs with its interval (run_interval).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from perf_tests.analysis.stats import Policy, ratio_interval
from perf_tests.errors import InputError
from perf_tests.records.names import (
    ATTENTION_BACKENDS,
    COMPILE_MODES,
    ENV_LABELS,
    KINDS,
    MEMORY_FORMATS,
    PRECISIONS,
    PROJECTIONS,
    Case,
    parse_name,
)
from perf_tests.records.results import Run, read_run, run_from_doc
from perf_tests.report.tabular import format_seconds, markdown_table, text_table

STUDY_ROWS = ("original", "original+xformers", "sdpa-math", "sdpa-mem-efficient",
              "sdpa-mem-efficient+compile")
_COMPILE_ORDER = ("eager", *COMPILE_MODES)


def run_interval(runs: Sequence[Sequence[float]], confidence: float = Policy.confidence_level
                 ) -> tuple[float, float | None, float | None]:
    """One case's time on one side, by the comparator's model: exp of the mean log run median, and its
    two-sided ``confidence`` t interval over runs (none from a single run)."""
    y = np.log([float(np.median(r)) for r in runs])
    if y.size < 2:
        return float(np.exp(y.mean())), None, None
    se = float(y.std(ddof=1)) / math.sqrt(y.size)
    return float(np.exp(y.mean())), *ratio_interval(float(y.mean()), se, y.size - 1, confidence)


def config_label(attention: str, compile: str, memory_format: str = MEMORY_FORMATS[0],
                 projections: str = PROJECTIONS[0]) -> str:
    """'xformers'/'eager' -> 'original+xformers' (the study's name: the original code with xFormers); the
    ladder's steps beyond compile are added when they are not the default ('sdpa+compile+channels-last')."""
    base = "original+xformers" if attention == "xformers" else attention
    steps = [compile] if compile != "eager" else []
    steps += [v for v, default in ((memory_format, MEMORY_FORMATS[0]), (projections,
                                                                        PROJECTIONS[0])) if v != default]
    return "+".join([base, *steps])


@dataclass
class Cell:
    median_s: float
    rounds: int
    improvement: float | None = None  # fraction; positive = faster than the reference


@dataclass
class Row:
    label: str
    config: str  # label without qualifiers
    qualifiers: dict  # e.g. {"env": "torch1"}
    sort_key: tuple
    cells: dict = field(default_factory=dict)  # batch size -> Cell


@dataclass
class StudyTable:
    kind: str
    title: str
    batch_sizes: list
    rows: list
    reference: str | None
    notes: list = field(default_factory=list)

    def row(self, label: str) -> Row:
        return next(r for r in self.rows if r.label == label)

    def cell_text(self, row: Row, bs: int) -> str:
        cell = row.cells.get(bs)
        if cell is None:
            return "–"
        if row.label == self.reference:
            return f"{format_seconds(cell.median_s)} (ref)"
        if cell.improvement is None:
            return format_seconds(cell.median_s)
        return f"{format_seconds(cell.median_s)} ({cell.improvement * 100:+.1f}%)"

    def _grid(self) -> tuple[list, list]:
        header = ["configuration", *[f"batch {b}" for b in self.batch_sizes]]
        body = [[r.label, *[self.cell_text(r, b) for b in self.batch_sizes]] for r in self.rows]
        return header, body

    def to_markdown(self) -> str:
        header, body = self._grid()
        lines = [f"### {self.title}", "", *markdown_table(header, body, "l" + "r" * len(self.batch_sizes))]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def to_text(self) -> str:
        header, body = self._grid()
        lines = [self.title, *text_table(header, body, "l" + "r" * len(self.batch_sizes))]
        lines += [f"  * {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    return [read_run(p) for p in paths]


@dataclass
class _Entry:
    case: Case
    env: str
    device: str
    samples: list
    vae_attention: str | None = None  # the VAE's kernel where it is not the case's (its head is too wide)
    # extra_info.attention_kernels: {part: [kernel, ...]} (perf_tests.measure.kernels)
    kernels: dict | None = None


def _entries(runs: Iterable[Run | Mapping]) -> list[_Entry]:
    """One entry per (benchmark name, env, device), samples pooled over runs; foreign benchmarks left out.
    A run may also be a pytest-benchmark document in memory (the suite's own summary); it is read as a file
    would be."""
    pooled: dict[tuple, _Entry] = {}
    for run in runs:
        run = run if isinstance(run, Run) else run_from_doc(run, "this run")
        for name, result in run.cases.items():
            try:
                case = Case(**result.case)
            except TypeError:
                continue  # not a perf_tests benchmark: its case fields are unknown
            env = result.extra.get("env") or run.machine.get("env") or "?"
            device = run.machine.get("device_slug") or "?"
            key = (name, env, device)
            vae = result.vae_attention_used if result.vae_attention_used not in (None,
                                                                                 case.attention) else None
            kernels = result.extra.get("attention_kernels")
            key = (*key, kernel_note(case.attention, vae, kernels))  # another kernel ran: another row
            if key in pooled:
                pooled[key].samples.extend(result.samples)
            else:
                pooled[key] = _Entry(case, env, device, list(result.samples), vae, kernels)
    return list(pooled.values())


# The kernel families a forced backend may run (perf_tests.measure.kernels names them; on a CPU, PyTorch's
# flash
# backend is its CPU flash kernel).
_FORCED = {"sdpa-flash": {"flash", "flash-cpu"}, "sdpa-mem-efficient": {"mem-efficient"},
           "sdpa-cudnn": {"cudnn"}, "sdpa-math": {"math"}}


def kernel_note(attention: str, vae_attention: str | None, kernels: Mapping | None) -> str:
    """What a row label adds about the kernels that ran: the kernel plain ``sdpa`` dispatched to (or a
    forced backend that ran another), and the VAE's where it is not the UNet's. "" when nothing is known
    or everything is as asked."""
    if not kernels:
        return ""
    notes = []
    unet = list(kernels.get("unet") or [])
    if unet and (attention == "sdpa" or (attention in _FORCED and not set(unet) <= _FORCED[attention])):
        notes.append(f"ran {'+'.join(unet)}")
    vae = list(kernels.get("vae") or [])
    if vae and (vae_attention or vae != unet):
        notes.append(f"VAE ran {'+'.join(vae)}")
    return f" <{'; '.join(notes)}>" if notes else ""


def _sort_key(config_attention: str, compile: str, qualifiers: dict, label: str) -> tuple:
    config = config_label(config_attention, compile)
    study = STUDY_ROWS.index(config) if config in STUDY_ROWS else len(STUDY_ROWS)
    a = ATTENTION_BACKENDS.index(config_attention) if config_attention in ATTENTION_BACKENDS else 99
    c = _COMPILE_ORDER.index(compile) if compile in _COMPILE_ORDER else 99
    env = qualifiers.get("env", "")
    env = (ENV_LABELS.index(env), env) if env in ENV_LABELS else (len(ENV_LABELS), env)
    prec = qualifiers.get("precision", "")
    p = PRECISIONS.index(prec) if prec in PRECISIONS else 99
    return (study, a, c, env, p, qualifiers.get("device", ""), qualifiers.get("profile", ""), label)


def available_kinds(runs: list[Run]) -> list[str]:
    kinds = {e.case.kind for e in _entries(runs)}
    return [k for k in KINDS if k in kinds] + sorted(kinds - set(KINDS))


def build_study_table(runs: list[Run], reference: str = "original", kind: str | None = None) -> StudyTable:
    """The study table of one case kind (default: txt2img if present, else the first kind that ran)."""
    entries = _entries(runs)
    if kind is None:
        kinds = available_kinds(runs)
        kind = "txt2img" if "txt2img" in kinds else (kinds[0] if kinds else "txt2img")
    entries = [e for e in entries if e.case.kind == kind]

    # Dimensions that vary between benchmarks go into the row label.
    dims = {
        "env": {e.env for e in entries},
        "precision": {e.case.precision for e in entries},
        "device": {e.device for e in entries},
        "profile": {e.case.profile for e in entries},
    }
    varying = [d for d in ("env", "precision", "device", "profile") if len(dims[d]) > 1]
    constant = {d: next(iter(v)) for d, v in dims.items() if len(v) == 1}

    rows: dict[str, Row] = {}
    vae_rows: set[str] = set()
    samples: dict[tuple, list] = {}  # (label, batch size) -> pooled samples
    for e in entries:
        values = {"env": e.env, "precision": e.case.precision, "device": e.device, "profile": e.case.profile}
        qualifiers = {d: values[d] for d in varying}
        config = config_label(e.case.attention, e.case.compile, e.case.memory_format, e.case.projections)
        label = config + (f" [{', '.join(qualifiers.values())}]" if qualifiers else "")
        if e.vae_attention:  # the UNet ran the kernel asked for, the VAE another one: say so in the row
            label += f" (VAE: {e.vae_attention})"
            vae_rows.add(label)
        label += kernel_note(e.case.attention, e.vae_attention, e.kernels)
        row = rows.get(label)
        if row is None:
            row = rows[label] = Row(label, config, qualifiers, _sort_key(e.case.attention, e.case.compile,
                                                                         qualifiers, label))
        pooled = samples.setdefault((label, e.case.batch_size), [])
        pooled.extend(e.samples)
        row.cells[e.case.batch_size] = Cell(statistics.median(pooled), len(pooled))
    ordered = sorted(rows.values(), key=lambda r: r.sort_key)
    batch_sizes = sorted({b for r in ordered for b in r.cells})

    ref_row = _find_reference(ordered, reference)
    notes = []
    if ref_row is None:
        notes.append(f"reference {reference!r} is not in these runs: no % improvement shown")
    else:
        for r in ordered:
            for b, cell in r.cells.items():
                ref_cell = ref_row.cells.get(b)
                if ref_cell is not None and ref_cell.median_s > 0:
                    cell.improvement = (ref_cell.median_s - cell.median_s) / ref_cell.median_s
        notes.append(f"% = (t_ref - t) / t_ref against {ref_row.label!r}; positive is faster")
    if vae_rows:
        notes.append("(VAE: k): the VAE's attention has one head of width 512, which the requested kernel "
                     "does not run; the UNet used the requested kernel, the VAE kernel k (sd.attention's "
                     "fallback order)")
    if any("<" in r.label for r in ordered):
        notes.append("<ran k>: the SDPA kernel the profiler saw in one call of the case "
                     "(perf_tests.measure.kernels): the one plain sdpa dispatched to, or the VAE's where it "
                     "differs from the UNet's")
    rounds = sorted({c.rounds for r in ordered for c in r.cells.values()})
    if rounds:
        notes.append("median of " + (f"{rounds[0]}" if len(rounds) == 1 else f"{rounds[0]}–{rounds[-1]}")
                     + " timed rounds per cell")
    where = ", ".join(constant[d] for d in ("profile", "device", "env", "precision") if d in constant)
    title = f"{kind} — {where}" if where else kind
    return StudyTable(kind, title, batch_sizes, ordered, ref_row.label if ref_row else None, notes)


def build_study_tables(runs: list[Run], reference: str = "original") -> list[StudyTable]:
    """One table per case kind present in the runs."""
    return [build_study_table(runs, reference, kind) for kind in available_kinds(runs)]


def _find_reference(rows: list[Row], reference: str) -> Row | None:
    exact = [r for r in rows if r.label == reference]
    if exact:
        return exact[0]
    same = [r for r in rows if r.config == reference]
    # The study's reference is the original code on PyTorch 1.12: prefer torch1, then fp32/autocast order.
    same.sort(key=lambda r: (r.qualifiers.get("env", "torch1") != "torch1", r.sort_key))
    return same[0] if same else None


# ---------------------------------------------------------------------------------------------------------
# The optimization ladder: each step the fast SD pipelines take, on top of the one before


# (label, attention, compile, memory format, projections, precision); "low" is fp16 on CUDA, bf16 elsewhere
LADDER = (
    ("reference (original attention)", "original", "eager", "contiguous", "separate", "fp32"),
    ("+ SDPA", "sdpa", "eager", "contiguous", "separate", "fp32"),
    ("+ torch.compile", "sdpa", "compile", "contiguous", "separate", "fp32"),
    ("+ channels_last", "sdpa", "compile", "channels-last", "separate", "fp32"),
    ("+ fused projections", "sdpa", "compile", "channels-last", "fused", "fp32"),
    ("+ fp16/bf16 weights", "sdpa", "compile", "channels-last", "fused", "low"),
)


@dataclass
class LadderRung:
    label: str
    case: str  # the case id it was read from, e.g. tiny-sdpa-compile-bs2-fp32-channels-last
    median_s: float
    gain: float | None  # (t_above - t) / t_above against the rung above that ran; positive is faster


@dataclass
class Ladder:
    title: str
    rungs: list[LadderRung]
    notes: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        rows = [[r.label, f"`{r.case}`", format_seconds(r.median_s),
                 "–" if r.gain is None else f"{r.gain * 100:+.1f}%"]
                for r in self.rungs]
        lines = [f"### {self.title}", "",
                 *markdown_table(["step", "case", "median", "gain over the step above"], rows, "llrr")]
        return "\n".join([*lines, "", *[f"- {n}" for n in self.notes]]).rstrip() + "\n"


def build_ladder(runs: list[Run], kind: str = "unet-step", batch_size: int | None = None) -> Ladder:
    """The ladder's rows (LADDER) that these runs measured, for one kind and batch size (default: the
    smallest that has the reference rung), each with its median time and its gain over the row above."""
    entries = [e for e in _entries(runs) if e.case.kind == kind]
    envs = sorted({e.env for e in entries}, key=lambda e: (ENV_LABELS.index(e) if e in ENV_LABELS else -1, e))
    entries = [e for e in entries if e.env == envs[-1]] if envs else []  # one environment: the newest label
    sizes = sorted({e.case.batch_size for e in entries})
    batch_size = batch_size if batch_size is not None else (sizes[0] if sizes else 1)
    devices = {e.device for e in entries}
    low = "fp16" if any(d.startswith("nvidia") for d in devices) else "bf16"
    rungs, skipped, above = [], [], None
    for label, attention, compile, memory_format, projections, precision in LADDER:
        precision = low if precision == "low" else precision
        found = [e for e in entries if (e.case.attention, e.case.compile, e.case.memory_format,
                                        e.case.projections,
                                        e.case.precision, e.case.batch_size)
                 == (attention, compile, memory_format, projections, precision, batch_size)]
        if not found:
            skipped.append(label)
            continue
        median = statistics.median(s for e in found for s in e.samples)
        gain = None if above is None else (above - median) / above
        rungs.append(LadderRung(label, str(found[0].case), median, gain))
        above = median
    notes = ["gain = (t_above - t) / t_above against the step above that ran; positive is faster"]
    if skipped:
        notes.append("not measured in these runs: " + ", ".join(skipped))
    where = ", ".join(sorted(devices)) + (f", {envs[-1]}" if envs else "")
    return Ladder(f"Optimization ladder — {kind}, batch {batch_size} ({where})", rungs, notes)


# ---------------------------------------------------------------------------------------------------------


def plot_study(table: StudyTable, path: str | Path) -> Path:
    """Grouped bar chart like the study's figures: one group per batch size, one bar per configuration,
    the % improvement against the reference written above each bar."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    n_rows, n_bs = len(table.rows), len(table.batch_sizes)
    fig = Figure(figsize=(max(6.0, 1.2 + n_bs * (0.45 * n_rows + 0.6)), 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(n_rows, 1)
    colors = colormaps["tab20"].colors
    for i, row in enumerate(table.rows):
        xs, ys, notes = [], [], []
        for j, b in enumerate(table.batch_sizes):
            cell = row.cells.get(b)
            if cell is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            ys.append(cell.median_s)
            if row.label == table.reference:
                notes.append("ref")
            else:
                notes.append("" if cell.improvement is None else f"{cell.improvement * 100:+.0f}%")
        bars = ax.bar(xs, ys, width * 0.95, label=row.label, color=colors[i % len(colors)])
        for bar, note in zip(bars, notes, strict=True):
            ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                        va="bottom", fontsize=7, rotation=90 if n_rows > 6 else 0, xytext=(0, 2),
                        textcoords="offset points")
    ax.set_xticks(range(n_bs))
    ax.set_xticklabels([f"batch {b}" for b in table.batch_sizes])
    ax.set_ylabel("median time (s)")
    ax.set_title(table.title, fontsize=10)
    ax.margins(y=0.15)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def study_text(runs: list[Run], reference: str = "original", kind: str | None = None,
               fmt: str = "markdown") -> tuple[str, list[StudyTable]]:
    """The study tables in ``fmt`` (one per kind present, or ``kind``'s), each followed by the optimization
    ladder of its kind where the runs measured two of its steps; and the tables."""
    kinds = [kind] if kind else available_kinds(runs)
    tables = [build_study_table(runs, reference, k) for k in kinds]
    text = "\n".join(t.to_markdown() if fmt == "markdown" else t.to_text() for t in tables)
    ladders = [ladder for k in kinds if len((ladder := build_ladder(runs, k)).rungs) >= 2]
    text += "".join("\n" + ladder.to_markdown() for ladder in ladders)
    return (text if text.endswith("\n") else text + "\n"), tables


def write_study(runs: list[Run], output: str | Path | None, *, reference: str = "original",
                kind: str | None = None, fmt: str | None = None,
                plot: str | Path | None = None) -> list[Path]:
    """The one writer of the study table: :func:`study_text` into ``output`` (Markdown, or plain text for a
    ``.txt`` file unless ``fmt`` says), and with ``plot`` a bar chart per table: ``plot`` itself for one
    table, ``<plot stem>-<kind>.png`` for several. Returns the files written."""
    fmt = fmt or ("text" if output is not None and Path(output).suffix == ".txt" else "markdown")
    text, tables = study_text(runs, reference, kind, fmt)
    written = []
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
        written.append(output)
    if plot is not None:
        plot = Path(plot)
        for t in tables:
            path = plot if len(tables) == 1 else plot.with_name(f"{plot.stem}-{t.kind}{plot.suffix}")
            written.append(plot_study(t, path))
    return written


# ---------------------------------------------------------------------------------------------------------
# The study's layout: per batch size, its five configurations on its releases and on the current one


STUDY_NAMES = {
    "original": "original (no xFormers)",
    "original+xformers": "original with xFormers",
    "sdpa-math": "optimized, math SDPA",
    "sdpa-mem-efficient": "optimized, memory-efficient SDPA",
    "sdpa-mem-efficient+compile": "optimized, memory-efficient SDPA + compile",
}
# (column, {configuration: the environment it is measured in}): the study's pair, then the current release.
STUDY_COLUMNS = (
    ("study", {"original": "torch1", "original+xformers": "torch1", "sdpa-math": "torch20",
               "sdpa-mem-efficient": "torch20", "sdpa-mem-efficient+compile": "torch20"}),
    ("current", dict.fromkeys(STUDY_ROWS, "torch2")),
)
# The study's reference, then the one where xFormers does not run.
STUDY_REFERENCES = ("original+xformers", "original")


@dataclass
class StudyCell:
    time_s: float | None = None  # run_interval's centre: exp(mean log run median)
    low_s: float | None = None
    high_s: float | None = None
    runs: int = 0
    improvement: float | None = None  # (t_ref - t) / t_ref; positive is faster
    compile_s: float | None = None  # median first-call compile time, excluded from time_s
    why_not: str | None = None  # why the configuration did not run here


@dataclass
class StudyLayout:
    """The study's tables: one per batch size, rows its configurations, one column per STUDY_COLUMNS."""

    kind: str
    where: str  # profile, device, precision
    columns: list[str]  # headings, with the torch releases that ran
    batch_sizes: list[int]
    cells: dict  # (configuration, column index, batch size) -> StudyCell
    references: dict  # batch size -> configuration of the reference cell (column 0)
    notes: list = field(default_factory=list)

    def cell_text(self, config: str, col: int, bs: int) -> str:
        c = self.cells.get((config, col, bs))
        if c is None or c.time_s is None:
            return f"not run: {c.why_not}" if c is not None and c.why_not else "not run"
        text = format_seconds(c.time_s)
        if c.low_s is not None:
            text += f" [{format_seconds(c.low_s)}, {format_seconds(c.high_s)}]"
        if col == 0 and config == self.references.get(bs):
            text += " (ref)"
        elif c.improvement is not None:
            text += f" ({c.improvement * 100:+.1f}%)"
        if c.compile_s is not None:
            text += f"; compile {format_seconds(c.compile_s)}"
        return text

    def to_markdown(self) -> str:
        out = []
        for bs in self.batch_sizes:
            out += [f"### {self.kind}, batch {bs} — {self.where}", "",
                    "| configuration | " + " | ".join(self.columns) + " |",
                    "|---|" + "---:|" * len(self.columns)]
            out += [f"| {STUDY_NAMES[config]} | " + " | ".join(self.cell_text(config, col, bs)
                                                               for col in range(len(self.columns))) + " |"
                    for config in STUDY_ROWS]
            out.append("")
        return "\n".join([*out, *[f"- {n}" for n in self.notes]]).rstrip() + "\n"

    def as_study_table(self) -> StudyTable:
        """The measured cells as a StudyTable (rows `configuration [column]`), for plot_study."""
        rows = []
        for col, heading in enumerate(self.columns):
            for config in STUDY_ROWS:
                label = f"{config} [{heading.split(':')[0]}]"
                cells = {bs: Cell(c.time_s, c.runs, c.improvement) for bs in self.batch_sizes
                         if (c := self.cells.get((config, col, bs))) is not None and c.time_s is not None}
                if cells:
                    rows.append(Row(label, config, {}, (col, STUDY_ROWS.index(config)), cells))
        reference = self.references.get(self.batch_sizes[0]) if self.batch_sizes else None
        ref_label = f"{reference} [{self.columns[0].split(':')[0]}]" if reference else None
        title = f"{self.kind} — {self.where}"
        return StudyTable(self.kind, title, self.batch_sizes, rows, ref_label, self.notes)


def build_study_layout(runs: list[Run], kind: str = "txt2img") -> StudyLayout:
    """The study's tables from runs of several environments (torch1, torch20, torch2): per batch size and
    configuration, the time over runs with its interval, the % against the study's reference, the compile
    time apart, and for a configuration that did not run, the reason its runs recorded."""
    per_run: dict[tuple, list] = {}  # (config, env, bs) -> [samples of one run, ...]
    compiles: dict[tuple, list] = {}
    why_not: dict[tuple, str] = {}
    versions: dict[str, set] = {}
    where: set = set()
    for run in runs:
        env = run.machine.get("env") or "?"
        versions.setdefault(env, set()).add(str(run.machine.get("torch_version", "?")).split("+")[0])
        named = [(r.case, r) for r in run.cases.values()]
        named += [(_parsed(n), s) for n, s in (*run.skipped.items(), *run.failed.items())]
        for case_dict, record in named:
            try:
                case = Case(**case_dict)
            except TypeError:
                continue
            config = config_label(case.attention, case.compile, case.memory_format, case.projections)
            if case.kind != kind or config not in STUDY_ROWS:
                continue
            key = (config, env, case.batch_size)
            where.add((case.profile, run.machine.get("device_slug") or "?", case.precision))
            if hasattr(record, "samples"):
                per_run.setdefault(key, []).append(record.samples)
                if record.compile_time_s is not None:
                    compiles.setdefault(key, []).append(record.compile_time_s)
            else:
                why_not.setdefault(key, ("failed: " if hasattr(record, "kind") else "") + record.reason)
    if len(where) > 1:
        raise InputError(f"the runs mix profiles, devices or precisions ({sorted(where)}); the study's "
                         f"table compares configurations of one: pass the runs of one profile, device and "
                         f"precision.")
    batch_sizes = sorted({bs for _, _, bs in (*per_run, *why_not)})
    cells, columns = {}, []
    for col, (heading, envs) in enumerate(STUDY_COLUMNS):
        releases = [f"{'/'.join(sorted(versions[e]))}" for e in dict.fromkeys(envs.values()) if e in versions]
        columns.append(f"{heading}: PyTorch {' / '.join(releases) if releases else '(not run)'}")
        for config, env in envs.items():
            for bs in batch_sizes:
                key = (config, env, bs)
                if key in per_run:
                    t, lo, hi = run_interval(per_run[key])
                    compile_s = statistics.median(compiles[key]) if key in compiles else None
                    cells[(config, col, bs)] = StudyCell(t, lo, hi, len(per_run[key]), compile_s=compile_s)
                else:
                    reason = why_not.get(key) or (f"no {env} run in these files" if env not in versions
                                                  else f"not selected in the {env} runs")
                    cells[(config, col, bs)] = StudyCell(why_not=reason)
    references, notes = {}, []
    for bs in batch_sizes:
        ref = next((r for r in STUDY_REFERENCES if cells[(r, 0, bs)].time_s is not None), None)
        if ref is None:
            continue
        references[bs] = ref
        base = cells[(ref, 0, bs)].time_s
        for (_, _, b), c in cells.items():
            if b == bs and c.time_s is not None:
                c.improvement = (base - c.time_s) / base
    used = set(references.values())
    if "original+xformers" in used:
        notes.append("% = (t_ref - t) / t_ref against the original code with xFormers on the study's release "
                     "(as the study), in both columns; positive is faster")
    if "original" in used:
        sizes = [b for b, r in references.items() if r == "original"]
        why = cells[("original+xformers", 0, sizes[0])].why_not
        notes.append(f"batch {', '.join(map(str, sizes))}: xFormers did not run with the study's release "
                     f"here ({why}), so % is against the original code without it")
    n_runs = sorted({c.runs for c in cells.values() if c.runs})
    if n_runs:
        counts = f"{n_runs[0]}" if len(n_runs) == 1 else f"{n_runs[0]}–{n_runs[-1]}"
        notes.append(f"time: exp(mean log median) over {counts} run(s) (processes) "
                     f"[{Policy.confidence_level:.0%} interval over runs; none from one run]")
    else:
        notes.append("no configuration of the study ran in these runs")
    if compiles:
        notes.append("compile: median time of the first call (tracing and compilation), excluded from the "
                     "time")
    profile, device, precision = next(iter(where)) if where else ("?", "?", "?")
    where_text = f"{profile}, {device}, {precision}"
    return StudyLayout(kind, where_text, columns, batch_sizes, cells, references, notes)


def _parsed(name: str) -> dict:
    try:
        return parse_name(name).as_dict()
    except ValueError:
        return {}
