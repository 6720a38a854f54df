"""Opening a history database (SQLite file or PostgreSQL URL), writing batches to it, pruning it, reading it.

SQLite is the zero-setup default: one file in WAL mode (readers such as `fleet history` never wait for the
collector), a transaction per batch. PostgreSQL takes the rows of a batch with `COPY` into day partitions
that are created the first time a row for their day arrives. Both upgrade their schema when opened.
"""

from __future__ import annotations

import calendar
import json
import math
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from edgefleet.converter.fleet.history.schema import (
    DAY_S,
    DEPLOYMENT_COLUMNS,
    DEVICE_COLUMNS,
    EVENT_COLUMNS,
    LATEST,
    PARTITIONED,
    POSTGRES,
    SCHEMA_VERSION_TABLE,
    SQLITE,
    TELEMETRY_COLUMNS,
    day_of,
    migrations,
    partition_name,
)
from edgefleet.errors import UsageError

Row = tuple[Any, ...]
SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def default_path() -> Path:
    """$XDG_DATA_HOME/edgefleet/history.sqlite (~/.local/share/... when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgefleet" / "history.sqlite"


def is_postgres(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


def display(target: str) -> str:
    """The target without a password, for messages."""
    if not is_postgres(target):
        return target
    parts = urlsplit(target)
    if parts.password is None:
        return target
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass
class Batch:
    """Rows for one write, in the column order of schema.py."""

    telemetry: list[Row]
    events: list[Row]
    deployments: list[Row]
    devices: list[Row]

    def __len__(self) -> int:
        return len(self.telemetry) + len(self.events) + len(self.deployments) + len(self.devices)


@dataclass(frozen=True)
class Retention:
    """How long rows are kept (days; 0: forever) and when telemetry is down-sampled to `bucket_s` means."""

    telemetry_days: float = 30.0
    events_days: float = 365.0
    downsample_after_days: float = 7.0
    bucket_s: int = 60


class HistoryStore:
    """One open history database."""

    dialect: str
    target: str

    def __init__(self, conn: Any, target: str) -> None:
        self.conn = conn
        self.target = target

    # ------------------------------------------------------------------ opening

    @staticmethod
    def open(target: str, *, upgrade: bool = True, create: bool = True) -> HistoryStore:
        """Open (and, unless `create` is false, create) the database `target` and bring its schema to LATEST."""
        store: HistoryStore = PostgresStore.connect(target) if is_postgres(target) \
            else SQLiteStore.connect(target, create=create)
        try:
            if upgrade:
                store.migrate()
            elif store.schema_version() != LATEST:
                raise UsageError(f"{display(target)}: schema version {store.schema_version()}, expected {LATEST}")
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> HistoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ schema

    def schema_version(self) -> int:
        rows = self.fetch("SELECT max(version) FROM schema_version") if self._has_table("schema_version") else []
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

    def migrate(self, target: int = LATEST) -> list[int]:
        """Apply the migrations above the current version up to `target`; return the versions applied."""
        self._execute_script([SCHEMA_VERSION_TABLE[self.dialect]])
        applied = []
        for m in migrations(self.dialect):
            if m.version > target:
                break
            if m.version <= self.schema_version():
                continue
            self._execute_script([*m.statements, self._sql(
                "INSERT INTO schema_version (version, applied_at, description) VALUES (?, ?, ?)")],
                params_last=(m.version, time.time(), m.description))
            applied.append(m.version)
        return applied

    # ------------------------------------------------------------------ engine specifics

    def _has_table(self, name: str) -> bool:
        raise NotImplementedError

    def _execute_script(self, statements: Sequence[str], params_last: Row | None = None) -> None:
        """Run `statements` in one transaction (the last one with `params_last`)."""
        raise NotImplementedError

    def _sql(self, query: str) -> str:
        return query

    def fetch(self, query: str, params: Sequence[Any] = ()) -> list[Row]:
        """Rows of a query written with `?` placeholders."""
        raise NotImplementedError

    def execute(self, statement: str, params: Sequence[Any] = ()) -> None:
        """Run one statement written with `?` placeholders in a transaction of its own."""
        self._execute_script([self._sql(statement)], params_last=tuple(params))

    def write(self, batch: Batch) -> None:
        """Store a batch in one transaction."""
        raise NotImplementedError

    def bucket_expr(self, bucket_s: int) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------ retention

    def get_meta(self, key: str) -> str | None:
        rows = self.fetch("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows and rows[0][0] is not None else None

    def prune(self, retention: Retention, now: float | None = None) -> dict[str, int]:
        """Apply retention and down-sampling; return how many rows each step removed or wrote."""
        now = time.time() if now is None else now
        report = {"telemetry_deleted": 0, "events_deleted": 0, "deployments_deleted": 0,
                  "telemetry_downsampled": 0, "telemetry_means": 0}
        for table, days in (("telemetry", retention.telemetry_days), ("events", retention.events_days),
                            ("deployments", retention.events_days)):
            if days > 0:
                report[f"{table}_deleted"] = self._delete_before(table, now - days * DAY_S)
        if retention.downsample_after_days > 0:
            cutoff = (int(now - retention.downsample_after_days * DAY_S) // retention.bucket_s) * retention.bucket_s
            start = float(self.get_meta("downsampled_until") or 0.0)
            if retention.telemetry_days > 0:  # what retention just deleted needs no means
                start = max(start, now - retention.telemetry_days * DAY_S)
            if cutoff > start:
                report["telemetry_downsampled"], report["telemetry_means"] = \
                    self._downsample(start, float(cutoff), retention.bucket_s)
        return report

    def _downsample(self, start: float, cutoff: float, bucket_s: int) -> tuple[int, int]:
        """Replace the telemetry rows in [start, cutoff) by one row of means per device, model, version and bucket."""
        bucket = self.bucket_expr(bucket_s)
        means = ("ts, received, device_id, model, version, phase, count, errors, p50_ms, p95_ms, p99_ms, max_ms, "
                 "cpu_percent, rss_bytes, system_cpu_percent, mem_available_bytes, load1, temperature_c, samples, "
                 "drift")  # extra is not averaged: the means have none
        select = (
            f"SELECT {bucket} AS ts, max(received) AS received, device_id, model, version, max(phase) AS phase, "
            "max(count) AS count, max(errors) AS errors, avg(p50_ms) AS p50_ms, avg(p95_ms) AS p95_ms, "
            "avg(p99_ms) AS p99_ms, avg(max_ms) AS max_ms, avg(cpu_percent) AS cpu_percent, "
            "CAST(avg(rss_bytes) AS BIGINT) AS rss_bytes, avg(system_cpu_percent) AS system_cpu_percent, "
            "CAST(avg(mem_available_bytes) AS BIGINT) AS mem_available_bytes, avg(load1) AS load1, "
            "avg(temperature_c) AS temperature_c, sum(samples) AS samples, max(drift) AS drift "
            f"FROM telemetry WHERE ts >= {start!r} AND ts < {cutoff!r} GROUP BY device_id, model, version, {bucket}")
        counted = self.fetch(f"SELECT count(*) FROM telemetry WHERE ts >= {start!r} AND ts < {cutoff!r}")
        raw = int(counted[0][0])
        self._execute_script([
            "DROP TABLE IF EXISTS edgefleet_downsample",
            f"CREATE TEMP TABLE edgefleet_downsample AS {select}",
            f"DELETE FROM telemetry WHERE ts >= {start!r} AND ts < {cutoff!r}",
            f"INSERT INTO telemetry ({means}) SELECT * FROM edgefleet_downsample",
            "DROP TABLE edgefleet_downsample",
            self._sql(self.upsert_meta_sql()),
        ], params_last=("downsampled_until", repr(cutoff)))
        written = self.fetch(f"SELECT count(*) FROM telemetry WHERE ts >= {start!r} AND ts < {cutoff!r}")
        return raw, int(written[0][0])

    def upsert_meta_sql(self) -> str:
        return "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"

    def _delete_before(self, table: str, cutoff: float) -> int:
        raise NotImplementedError


def json_text(value: object) -> str | None:
    """JSON text for a JSON column (None stays NULL); NUL characters, which PostgreSQL refuses, replaced."""
    if value is None:
        return None
    return json.dumps(value, separators=(",", ":"), allow_nan=False).replace("\\u0000", "\\ufffd")


class SQLiteStore(HistoryStore):
    dialect = SQLITE

    @classmethod
    def connect(cls, target: str, *, create: bool = True) -> SQLiteStore:
        path = Path(target.removeprefix("sqlite://")).expanduser()
        if not create and not path.exists():
            raise UsageError(f"--db {target}: no such history database (start `edgectl fleet collect --db` first)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        except (OSError, sqlite3.Error) as err:
            raise UsageError(f"--db {target}: {getattr(err, 'strerror', None) or err}") from err
        return cls(conn, str(path))

    def _has_table(self, name: str) -> bool:
        return bool(self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                      (name,)).fetchone())

    def _execute_script(self, statements: Sequence[str], params_last: Row | None = None) -> None:
        cur = self.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for i, statement in enumerate(statements):
                last = i == len(statements) - 1
                cur.execute(statement, params_last if last and params_last is not None else ())
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def fetch(self, query: str, params: Sequence[Any] = ()) -> list[Row]:
        return list(self.conn.execute(query, tuple(params)).fetchall())

    def write(self, batch: Batch) -> None:
        cur = self.conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            for table, columns, rows in (("telemetry", TELEMETRY_COLUMNS, batch.telemetry),
                                         ("events", EVENT_COLUMNS, batch.events),
                                         ("deployments", DEPLOYMENT_COLUMNS, batch.deployments)):
                if rows:
                    cur.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
                                    f"({', '.join('?' * len(columns))})", rows)
            if batch.devices:
                cur.executemany(DEVICE_UPSERT, batch.devices)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def bucket_expr(self, bucket_s: int) -> str:
        return f"(CAST(ts / {bucket_s} AS INTEGER) * {bucket_s})"

    def _delete_before(self, table: str, cutoff: float) -> int:
        cur = self.conn.execute(f"DELETE FROM {table} WHERE ts < ?", (cutoff,))
        return int(cur.rowcount)


# A device's groups and agent version change only with its status: keep what a status said when a telemetry
# document (which has no groups) updates the row.
DEVICE_UPSERT = (
    f"INSERT INTO devices ({', '.join(DEVICE_COLUMNS)}) VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET "
    "groups = COALESCE(excluded.groups, devices.groups), "
    "agent_version = COALESCE(excluded.agent_version, devices.agent_version), "
    "first_seen = CASE WHEN devices.first_seen IS NULL OR excluded.first_seen < devices.first_seen "
    "THEN excluded.first_seen ELSE devices.first_seen END, "
    "last_seen = CASE WHEN devices.last_seen IS NULL OR excluded.last_seen > devices.last_seen "
    "THEN excluded.last_seen ELSE devices.last_seen END"
)


class PostgresStore(HistoryStore):
    """PostgreSQL through psycopg 3. `?schema=NAME` in the URL keeps the tables in that schema (created when
    missing); without it they go where the connection's search_path says (usually `public`)."""

    dialect = POSTGRES

    def __init__(self, conn: Any, target: str, schema: str | None) -> None:
        super().__init__(conn, target)
        self.schema = schema
        self._partitions: set[str] = set()

    @classmethod
    def connect(cls, target: str) -> PostgresStore:
        try:
            import psycopg
        except ImportError as err:
            raise UsageError("a PostgreSQL history needs psycopg 3: pip install 'edgefleet[fleet]' "
                             "(or pip install psycopg)") from err
        parts = urlsplit(target)
        query = parse_qsl(parts.query, keep_blank_values=True)
        schema = next((v for k, v in query if k == "schema"), None)
        if schema is not None and not SCHEMA_NAME.fullmatch(schema):
            raise UsageError(f"--db: schema {schema!r} is not a plain SQL name")
        url = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k != "schema"])))
        try:
            conn = psycopg.connect(url, connect_timeout=5, autocommit=True)
        except psycopg.Error as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"--db {display(target)}: {first}") from err
        try:
            if schema is not None:
                conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
                conn.execute(f'SET search_path TO "{schema}"')
        except psycopg.Error as err:
            conn.close()
            raise UsageError(f"--db {display(target)}: {err}") from err
        return cls(conn, target, schema)

    def _sql(self, query: str) -> str:
        return query.replace("?", "%s")

    def _has_table(self, name: str) -> bool:
        rows = self.fetch("SELECT to_regclass(?) IS NOT NULL", (name,))
        return bool(rows[0][0])

    def _execute_script(self, statements: Sequence[str], params_last: Row | None = None) -> None:
        with self.conn.transaction():
            for i, statement in enumerate(statements):
                last = i == len(statements) - 1
                self.conn.execute(statement, params_last if last and params_last is not None else None)

    def fetch(self, query: str, params: Sequence[Any] = ()) -> list[Row]:
        with self.conn.transaction():
            return list(self.conn.execute(self._sql(query), tuple(params) if params else None).fetchall())

    def bucket_expr(self, bucket_s: int) -> str:
        return f"(floor(ts / {bucket_s}) * {bucket_s})"

    def partitions(self, table: str) -> list[str]:
        """The day partitions of `table` in this store's schema."""
        rows = self.fetch("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                          "WHERE i.inhparent = to_regclass(?) ORDER BY c.relname", (table,))
        return [str(r[0]) for r in rows]

    def ensure_partitions(self, table: str, times: Iterable[float]) -> None:
        """Create the day partitions the rows at `times` need (each in its own transaction, so that another
        collector creating the same partition at the same moment costs a retry, not a batch)."""
        import psycopg

        for day in sorted({day_of(t) for t in times}):
            name = partition_name(table, day)
            if name in self._partitions:
                continue
            if not self._partitions:
                for t in PARTITIONED:
                    self._partitions.update(self.partitions(t))
                if name in self._partitions:
                    continue
            try:
                with self.conn.transaction():
                    self.conn.execute(f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} "
                                      f"FOR VALUES FROM ({day}) TO ({day + DAY_S})")
            except (psycopg.errors.DuplicateTable, psycopg.errors.UniqueViolation):
                pass
            self._partitions.add(name)

    def write(self, batch: Batch) -> None:
        for table, rows in (("telemetry", batch.telemetry), ("events", batch.events),
                            ("deployments", batch.deployments)):
            if rows:
                self.ensure_partitions(table, (r[0] for r in rows))
        with self.conn.transaction(), self.conn.cursor() as cur:
            for table, columns, rows in (("telemetry", TELEMETRY_COLUMNS, batch.telemetry),
                                         ("events", EVENT_COLUMNS, batch.events),
                                         ("deployments", DEPLOYMENT_COLUMNS, batch.deployments)):
                if rows:
                    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                        copy.write(copy_text(rows))
            if batch.devices:
                cur.executemany(self._sql(DEVICE_UPSERT), batch.devices)

    def _delete_before(self, table: str, cutoff: float) -> int:
        """Drop the partitions that end before `cutoff`, then delete the older rows of the one it falls in."""
        removed = 0
        for name in self.partitions(table):
            m = re.fullmatch(rf"{table}_d(\d{{8}})", name)
            if m is None:
                continue
            day = calendar.timegm(time.strptime(m.group(1), "%Y%m%d"))
            if day + DAY_S <= cutoff:
                removed += int(self.fetch(f"SELECT count(*) FROM {name}")[0][0])
                self._execute_script([f"DROP TABLE {name}"])
                self._partitions.discard(name)
        with self.conn.transaction():
            cur = self.conn.execute(f"DELETE FROM {table} WHERE ts < %s", (cutoff,))
            removed += int(cur.rowcount)
        return removed


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_value(value: Any) -> str:
    kind = type(value)
    if kind is float:
        return repr(value) if math.isfinite(value) else "\\N"
    if value is None:
        return "\\N"
    if kind is bool:
        return "t" if value else "f"
    if kind is int:
        return str(value)
    text = str(value)
    return text.translate(_COPY_ESCAPES) if ("\\" in text or "\t" in text or "\n" in text or "\r" in text) else text


def copy_text(rows: Sequence[Row]) -> bytes:
    """Rows in COPY's text format: the lines are made here in one pass rather than value by value through
    psycopg's adapters, which takes most of a batch's time at tens of thousands of rows a second."""
    value = _copy_value
    return "".join(["\t".join([value(v) for v in row]) + "\n" for row in rows]).encode("utf-8")
