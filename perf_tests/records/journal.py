"""The run journal: the result file written line by line, so that a killed run keeps every finished case.

Beside ``--benchmark-json X.json`` the suite writes ``X.journal.jsonl``, one JSON object per line, each
appended, flushed and fsync'ed before the run goes on: ``start`` (machine_info and the perf_tests section:
grid, selection, ...), then ``case`` (the benchmarks[] entry, with stats.data), ``skip``, ``fail`` and
``canary`` lines as they happen, and ``end`` when the run finished. A journal without ``end`` is the
record of a run that was killed (by the OOM killer, a timeout, a Ctrl-C). perf_tests.records.results reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

JOURNAL_SUFFIX = ".journal.jsonl"


def journal_path(result_json: str | os.PathLike) -> Path:
    """``X.json`` -> ``X.journal.jsonl`` (the journal the suite writes beside its result JSON)."""
    p = Path(result_json)
    return p.with_name(p.name.removesuffix(".json") + JOURNAL_SUFFIX)


def _unserializable(obj: object) -> str:
    return f"UNSERIALIZABLE[{obj!r}]"  # as pytest-benchmark's own JSON writer does


class Journal:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")  # open for the whole run

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, default=_unserializable) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
