"""The results store: every run of the suite, kept in one database (docs/store.md).

A SQLite file by default (no server), or a PostgreSQL server for a fleet (``postgresql://...``); both hold
the same schema. A run is stored whole: raw samples and ``extra_info`` per case, the machine's fingerprint,
its boot-scoped ``machine_id`` and boot-independent ``host_id``, the commit (and whether the tree was dirty),
the canary, the selection, skips and failures. Runs are read back as ``results.Run`` records, so everything
that judges runs (``stats.compare`` through ``results.side_from_runs``) reads the store as it reads files.

Identity: a run is keyed by its file name, start time, machine and commit (by its samples' content hash
when it recorded no start time). Recording a run that is already there adds only the cases it lacks (a
baseline file holds one run split per profile), so importing a folder twice, or a run and the baseline
made from it, stores each run and each case once. Every write is one transaction; SQLite serialises writers
(``BEGIN IMMEDIATE``), PostgreSQL resolves concurrent inserts of one run with its unique key.

The schema is versioned: ``MIGRATIONS[i]`` brings a database from version ``i`` to ``i + 1`` and is applied
in the transaction that records it; a database newer than this code is refused.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from perf_tests.records.results import CaseResult, Failure, InputError, Run, Skip, case_result

STORE_ENV = "SD_PERF_STORE"
OFF = "off"
PG_SCHEMES = ("postgresql://", "postgres://")
# Serialises schema migrations between PostgreSQL writers (pg_advisory_xact_lock takes any 64-bit key).
PG_MIGRATION_LOCK = 0x5D_9E2F_0001

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 0 -> 1
        """CREATE TABLE runs (
            id {id_type} PRIMARY KEY,
            run_key TEXT NOT NULL UNIQUE,
            source TEXT NOT NULL,
            recorded_at TEXT NOT NULL,
            started_at TEXT,
            git_commit TEXT,
            commit_sha TEXT,
            dirty INTEGER NOT NULL,
            commit_time TEXT,
            branch TEXT,
            mode TEXT NOT NULL,
            device_slug TEXT,
            device_type TEXT,
            env TEXT,
            machine_id TEXT,
            host_id TEXT,
            environment TEXT NOT NULL,
            grid_name TEXT,
            complete INTEGER NOT NULL,
            selected TEXT,
            canary TEXT NOT NULL,
            canary_timeline TEXT NOT NULL
        )""",
        "CREATE INDEX runs_by_device ON runs (device_slug, env, mode)",
        "CREATE INDEX runs_by_host ON runs (host_id, env)",
        """CREATE TABLE results (
            run_id BIGINT NOT NULL REFERENCES runs (id),
            name TEXT NOT NULL,
            kind TEXT,
            profile TEXT,
            definition_hash TEXT,
            median_s DOUBLE PRECISION NOT NULL,
            iterations INTEGER NOT NULL,
            samples TEXT NOT NULL,
            extra TEXT NOT NULL,
            PRIMARY KEY (run_id, name)
        )""",
        """CREATE TABLE skips (
            run_id BIGINT NOT NULL REFERENCES runs (id), name TEXT NOT NULL, reason TEXT NOT NULL,
            PRIMARY KEY (run_id, name)
        )""",
        """CREATE TABLE failures (
            run_id BIGINT NOT NULL REFERENCES runs (id), name TEXT NOT NULL, kind TEXT NOT NULL,
            reason TEXT NOT NULL, PRIMARY KEY (run_id, name)
        )""",
    ),
    (  # 1 -> 2: the run medians of a history read from the index alone, not from rows that hold the samples
        "CREATE INDEX results_medians ON results (run_id, name, median_s)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# CaseResult fields that results.case_result reads from extra_info: stored with the raw extra so that a
# case read back from the store is the case that was recorded, whichever file it came from.
_CASE_FIELDS = (
    "definition_hash",
    "attention_used",
    "vae_attention_used",
    "correct",
    "compile_time_s",
    "compile_cache",
    "peak_memory_bytes",
)


def default_location() -> str:
    """``$SD_PERF_STORE``, else ``$XDG_CACHE_HOME/sd-perf/store.sqlite`` (``~/.cache/...``): outside the
    clone, so a fresh clone, ``git clean`` or a CI checkout keeps the machine's history."""
    if os.environ.get(STORE_ENV):
        return os.environ[STORE_ENV]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "sd-perf", "store.sqlite")


def describe(location: str) -> str:
    """The location for messages, without a PostgreSQL password."""
    if location.startswith(PG_SCHEMES) and "@" in location:
        scheme, rest = location.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}@{host}"
    return location


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def run_key(run: Run) -> str:
    """A run's identity: file name, start time, machine and commit (content hash without a start time)."""
    parts = (
        ["run", run.source, run.datetime, run.machine_id, run.git_commit]
        if run.datetime
        else ["content", run.content_hash]
    )
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


@dataclass(frozen=True)
class RunContext:
    """What the recorder knows about a run beyond its file: where it ran and what it ran."""

    host_id: str | None = None
    commit_time: str | None = None
    branch: str | None = None
    mode: str = "solo"  # "solo" | "ab": A/B runs shared one CPU with the other tree's process


@dataclass(frozen=True)
class StoredRun:
    """A run as the store holds it: the record and where it came from."""

    id: int
    run: Run
    recorded_at: str
    commit_sha: str | None
    dirty: bool
    commit_time: str | None
    branch: str | None
    mode: str
    host_id: str | None


@dataclass(frozen=True)
class Recorded:
    key: str
    added: bool  # False: the run was already there
    new_cases: int  # cases added (all of them for a new run)


class Store:
    """One open store. ``Store.open(location)`` creates and migrates it; use it as a context manager."""

    def __init__(self, conn, dialect: str, location: str):
        self.conn, self.dialect, self.location = conn, dialect, location

    # --- opening and the schema ----------------------------------------------------------------------

    @classmethod
    def open(cls, location: str | os.PathLike | None = None, migrations=MIGRATIONS) -> Store:
        location = str(location or default_location())
        if location == OFF:
            raise InputError(
                f"the store is switched off ({STORE_ENV} or --store is {OFF!r}); pass a path or URL."
            )
        if location.startswith(PG_SCHEMES):
            try:
                import psycopg
            except ImportError:
                raise InputError(
                    f"--store {describe(location)}: PostgreSQL needs the psycopg driver: "
                    "`pip install 'psycopg[binary]>=3.1'` (the store extra: `pip install .[store]`)."
                ) from None
            try:
                conn = psycopg.connect(location, autocommit=True)  # transactions are explicit
            except psycopg.Error as exc:
                raise InputError(f"--store {describe(location)}: cannot connect ({exc}).") from None
            store = cls(conn, "postgresql", location)
        else:
            path = Path(location)
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=120, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
                conn.execute("PRAGMA foreign_keys=ON")
            except sqlite3.DatabaseError as exc:
                conn.close()
                raise InputError(
                    f"{path}: not a SQLite store ({exc}); pass another --store path."
                ) from None
            store = cls(conn, "sqlite", str(path))
        try:
            store.migrate(migrations)
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgresql" else sql

    def execute(self, sql: str, params: Sequence = ()):
        return self.conn.execute(self._sql(sql), tuple(params))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction; SQLite takes the write lock at once (no upgrade deadlock of writers)."""
        if self.dialect == "postgresql":
            with self.conn.transaction():
                yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def version(self) -> int:
        row = self.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return row[0] or 0

    def migrate(self, migrations=MIGRATIONS) -> list[int]:
        """Apply the migrations this database lacks, each with its version row, in one transaction."""
        id_type = "BIGSERIAL" if self.dialect == "postgresql" else "INTEGER"
        with self.transaction():
            if self.dialect == "postgresql":
                self.execute("SELECT pg_advisory_xact_lock(?)", (PG_MIGRATION_LOCK,))
            self.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            current = self.version()
            if current > len(migrations):
                raise InputError(
                    f"{describe(self.location)}: store schema version {current} is newer than this "
                    "perf_tests "
                    f"reads ({len(migrations)}): update this checkout, or pass another --store."
                )
            applied = []
            for version in range(current, len(migrations)):
                for statement in migrations[version]:
                    self.execute(statement.format(id_type=id_type))
                self.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version + 1, _now()),
                )
                applied.append(version + 1)
        return applied

    # --- writing ------------------------------------------------------------------------------------------

    def record(self, run: Run, context: RunContext = RunContext()) -> Recorded:
        """Store one run in one transaction; a run already there gains only the cases it lacked."""
        key = run_key(run)
        commit = run.git_commit.removesuffix("+dirty") if run.git_commit else None
        machine = run.machine
        row = (
            key,
            run.source,
            _now(),
            run.datetime,
            run.git_commit,
            commit,
            int(bool(run.git_commit and run.git_commit.endswith("+dirty"))),
            context.commit_time,
            context.branch,
            context.mode,
            machine.get("device_slug"),
            machine.get("device_type"),
            machine.get("env"),
            run.machine_id,
            context.host_id,
            json.dumps(machine, sort_keys=True),
            run.grid_name,
            int(run.complete),
            None if run.selected is None else json.dumps(list(run.selected)),
            json.dumps(list(run.canary)),
            json.dumps(list(run.canary_timeline)),
        )
        with self.transaction():
            cur = self.execute(
                "INSERT INTO runs (run_key, source, recorded_at, started_at, git_commit, commit_sha, dirty, "
                "commit_time, branch, mode, device_slug, device_type, env, machine_id, host_id, environment, "
                "grid_name, complete, selected, canary, canary_timeline) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (run_key) DO NOTHING",
                row,
            )
            added = cur.rowcount == 1
            run_id = self.execute("SELECT id FROM runs WHERE run_key = ?", (key,)).fetchone()[0]
            if not added:
                self._check_same_run(run_id, run)
            new_cases = 0
            for name, r in run.cases.items():
                extra = {
                    **r.extra,
                    "case": r.case,
                    "iterations": r.iterations,
                    **{f: getattr(r, f) for f in _CASE_FIELDS},
                }
                cur = self.execute(
                    "INSERT INTO results (run_id, name, kind, profile, definition_hash, median_s, "
                    "iterations, samples, extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (run_id, name) DO NOTHING",
                    (
                        run_id,
                        name,
                        r.case.get("kind"),
                        r.case.get("profile"),
                        r.definition_hash,
                        _median(r.samples),
                        r.iterations,
                        json.dumps(list(r.samples)),
                        json.dumps(extra, sort_keys=True, default=str),
                    ),
                )
                new_cases += cur.rowcount == 1
            for s in run.skipped.values():
                self.execute(
                    "INSERT INTO skips (run_id, name, reason) VALUES (?, ?, ?) "
                    "ON CONFLICT (run_id, name) DO NOTHING",
                    (run_id, s.name, s.reason),
                )
            for f in run.failed.values():
                self.execute(
                    "INSERT INTO failures (run_id, name, kind, reason) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (run_id, name) DO NOTHING",
                    (run_id, f.name, f.kind, f.reason),
                )
        return Recorded(key, added, new_cases)

    def _check_same_run(self, run_id: int, run: Run) -> None:
        """A run whose key is stored already must agree with it on the cases both hold: else two runs share
        a file name, start time, machine and commit, and neither may be lost silently."""
        for name, samples in self.execute("SELECT name, samples FROM results WHERE run_id = ?", (run_id,)):
            if name in run.cases and tuple(json.loads(samples)) != run.cases[name].samples:
                raise InputError(
                    f"{run.source}: has the file name, start time ({run.datetime}), machine and commit "
                    f"of a run already in the store {describe(self.location)}, but other samples for "
                    f"{name!r}; these are two runs. Give the file another name (it is part of a run's "
                    "identity) and record it again."
                )

    # --- reading ------------------------------------------------------------------------------------------

    def runs(
        self, where: str = "", params: Sequence = (), *, profiles: Sequence[str] | None = None
    ) -> list[StoredRun]:
        """Runs matching a SQL condition on ``runs`` (e.g. ``"env = ? AND host_id = ?"``), oldest recorded
        first, with their cases (only those of ``profiles`` when given), skips and failures."""
        rows = self.execute(
            "SELECT id, source, recorded_at, started_at, git_commit, commit_sha, dirty, commit_time, branch, "
            "mode, machine_id, host_id, environment, grid_name, complete, selected, canary, canary_timeline "
            f"FROM runs {'WHERE ' + where if where else ''} ORDER BY recorded_at, id",
            params,
        ).fetchall()
        if not rows:
            return []
        ids = [r[0] for r in rows]
        cases: dict[int, dict[str, CaseResult]] = {i: {} for i in ids}
        skips: dict[int, dict[str, Skip]] = {i: {} for i in ids}
        failures: dict[int, dict[str, Failure]] = {i: {} for i in ids}
        for chunk in _chunks(ids, 500):
            marks = ", ".join("?" * len(chunk))
            prof = ""
            args: list = list(chunk)
            if profiles is not None:
                prof = f" AND profile IN ({', '.join('?' * len(profiles))})"
                args += list(profiles)
            for run_id, name, iterations, samples, extra in self.execute(
                "SELECT run_id, name, iterations, samples, extra FROM results "
                f"WHERE run_id IN ({marks}){prof}",
                args,
            ):
                bench = {
                    "name": name,
                    "stats": {"data": json.loads(samples), "iterations": iterations},
                    "extra_info": json.loads(extra),
                }
                cases[run_id][name] = case_result(f"{describe(self.location)} run {run_id}", bench)
            for run_id, name, reason in self.execute(
                f"SELECT run_id, name, reason FROM skips WHERE run_id IN ({marks})", chunk
            ):
                skips[run_id][name] = Skip(name, reason)
            for run_id, name, kind, reason in self.execute(
                f"SELECT run_id, name, kind, reason FROM failures WHERE run_id IN ({marks})", chunk
            ):
                failures[run_id][name] = Failure(name, reason, kind)
        out = []
        for (
            run_id,
            source,
            recorded_at,
            started_at,
            git_commit,
            commit_sha,
            dirty,
            commit_time,
            branch,
            mode,
            machine_id,
            host_id,
            environment,
            grid_name,
            complete,
            selected,
            canary,
            timeline,
        ) in rows:
            canary_timeline = tuple(json.loads(timeline))
            run = Run(
                source=source,
                machine=json.loads(environment),
                machine_id=machine_id,
                datetime=started_at,
                git_commit=git_commit,
                cases=cases[run_id],
                skipped=skips[run_id],
                failed=failures[run_id],
                selected=None if selected is None else tuple(json.loads(selected)),
                canary=tuple(json.loads(canary)),
                canary_timeline=canary_timeline,
                grid_name=grid_name,
                complete=bool(complete),
            )
            out.append(
                StoredRun(
                    run_id, run, recorded_at, commit_sha, bool(dirty), commit_time, branch, mode, host_id
                )
            )
        return out

    def count(self, table: str = "runs") -> int:
        if table not in ("runs", "results", "skips", "failures"):
            raise ValueError(table)
        return self.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def groups(self) -> list[tuple[str, str, str, int]]:
        """(device_slug, device_type, env, runs) of every device type and environment in the store."""
        return [
            tuple(r)
            for r in self.execute(
                "SELECT device_slug, device_type, env, COUNT(*) FROM runs "
                "GROUP BY device_slug, device_type, env "
                "ORDER BY device_slug, env"
            ).fetchall()
        ]


def _median(samples: Sequence[float]) -> float:
    s = sorted(samples)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
