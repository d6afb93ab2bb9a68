"""The one table renderer: aligned plain text and Markdown from a header and rows of strings, and the
spelling of a duration. The verdict, the study table, the operator diff and the parity report use it.
"""

from __future__ import annotations

from collections.abc import Sequence


def format_seconds(s: float | None) -> str:
    """A duration for people: ``12.34 ms`` below a second, ``1.234 s`` above, ``-`` when unknown."""
    if s is None:
        return "-"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "", *, rule: bool = True,
               indent: str = "") -> list[str]:
    """Columns padded to their widest cell, two spaces apart; ``align`` holds one ``l`` or ``r`` per column
    (default: all ``l``); ``rule`` adds a line of dashes under the header."""
    table = [list(header), *map(list, rows)]
    align = align or "l" * len(header)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = (c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align,
                                                                            strict=True))
        return (indent + "  ".join(padded)).rstrip()

    lines = [line(table[0])]
    if rule:
        lines.append(indent + "  ".join("-" * w for w in widths))
    return lines + [line(r) for r in table[1:]]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> list[str]:
    """A GitHub Markdown table; ``align`` as for :func:`text_table`; a ``|`` inside a cell is escaped."""
    align = align or "l" * len(header)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "".join("---:|" if a == "r" else "---|" for a in align), *map(line, rows)]
