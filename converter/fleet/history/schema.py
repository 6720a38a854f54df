"""The history database's one logical schema, written out for SQLite and for PostgreSQL, and its migrations.

Tables (every time is Unix seconds, a double, as the devices send it):

- ``telemetry``: one row per model per telemetry document (a device without models: one row, model NULL):
  the model's served version, phase, counters and latency percentiles beside the device's CPU, memory
  and temperature. ``samples`` is 1 for a received document and N for a down-sampled row (the mean of N);
  ``drift`` (the model's drift score, when the agent reports one) and ``extra`` (JSON: the fields of the
  document this schema has no column for) keep room for figures that come later.
- ``events``: every lifecycle event as sent (``details`` as JSON).
- ``deployments``: the outcomes among the events (COMMITTED, REJECTED, ROLLED_BACK) with their figures:
  what a rollout did to each device.
- ``devices``: each device's groups and agent version from its retained status, and when it was last seen.
- ``meta``: the store's own settings (how far telemetry has been down-sampled).
- ``schema_version``: one row per migration applied.

On PostgreSQL the three time-series tables are partitioned by day on ``ts`` (declarative range
partitioning, ``<table>_dYYYYMMDD``); partitions are created when a row for their day arrives and
dropped whole by retention. Migrations are numbered, each applied once in its own transaction, and
every store upgrades itself to ``LATEST`` when opened.
"""

from __future__ import annotations

from dataclasses import dataclass

SQLITE = "sqlite"
POSTGRES = "postgresql"

# logical type -> (SQLite, PostgreSQL)
TYPES = {
    "time": ("REAL", "double precision"),
    "real": ("REAL", "double precision"),
    "int": ("INTEGER", "bigint"),
    "text": ("TEXT", "text"),
    "bool": ("BOOLEAN", "boolean"),
    "json": ("TEXT", "jsonb"),
}

PARTITIONED = ("telemetry", "events", "deployments")
DAY_S = 86_400


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    not_null: bool = False

    def sql(self, dialect: str) -> str:
        kind = TYPES[self.type][0 if dialect == SQLITE else 1]
        return f"{self.name} {kind}{' NOT NULL' if self.not_null else ''}"


TELEMETRY_V1 = (
    Column("ts", "time", True), Column("received", "time", True), Column("device_id", "text", True),
    Column("model", "text"), Column("version", "int"), Column("phase", "text"),
    Column("count", "int"), Column("errors", "int"),
    Column("p50_ms", "real"), Column("p95_ms", "real"), Column("p99_ms", "real"), Column("max_ms", "real"),
    Column("cpu_percent", "real"), Column("rss_bytes", "int"), Column("system_cpu_percent", "real"),
    Column("mem_available_bytes", "int"), Column("load1", "real"), Column("temperature_c", "real"),
    Column("samples", "int", True),
)
TELEMETRY_V2 = (Column("drift", "real"), Column("extra", "json"))
EVENTS = (
    Column("ts", "time", True), Column("received", "time", True), Column("device_id", "text", True),
    Column("model", "text", True), Column("step", "text", True), Column("ok", "bool", True),
    Column("deployment_id", "text"), Column("version", "int"), Column("reason", "text"), Column("details", "json"),
)
DEPLOYMENTS = (
    Column("ts", "time", True), Column("received", "time", True), Column("device_id", "text", True),
    Column("model", "text", True), Column("deployment_id", "text"), Column("version", "int"),
    Column("result", "text", True), Column("reason", "text"), Column("restored_version", "int"),
    Column("figures", "json"),
)
DEVICES = (
    Column("device_id", "text", True), Column("groups", "json"), Column("agent_version", "text"),
    Column("first_seen", "time"), Column("last_seen", "time"),
)

# What writers insert, in this order (the columns of the latest schema).
TELEMETRY_COLUMNS = tuple(c.name for c in TELEMETRY_V1 + TELEMETRY_V2)
EVENT_COLUMNS = tuple(c.name for c in EVENTS)
DEPLOYMENT_COLUMNS = tuple(c.name for c in DEPLOYMENTS)
DEVICE_COLUMNS = tuple(c.name for c in DEVICES)


def _table(name: str, columns: tuple[Column, ...], dialect: str, *, partitioned: bool,
           primary_key: str | None = None) -> str:
    body = ", ".join([c.sql(dialect) for c in columns] + ([f"PRIMARY KEY ({primary_key})"] if primary_key else []))
    tail = " PARTITION BY RANGE (ts)" if partitioned and dialect == POSTGRES else ""
    return f"CREATE TABLE {name} ({body}){tail}"


def _migration_1(dialect: str) -> list[str]:
    """The tables, their indexes, and the store's settings."""
    return [
        _table("telemetry", TELEMETRY_V1, dialect, partitioned=True),
        _table("events", EVENTS, dialect, partitioned=True),
        _table("deployments", DEPLOYMENTS, dialect, partitioned=True),
        _table("devices", DEVICES, dialect, partitioned=False, primary_key="device_id"),
        _table("meta", (Column("key", "text", True), Column("value", "text")), dialect, partitioned=False,
               primary_key="key"),
        "CREATE INDEX telemetry_device_ts ON telemetry (device_id, ts)",
        "CREATE INDEX telemetry_model_ts ON telemetry (model, ts)",
        "CREATE INDEX events_device_ts ON events (device_id, ts)",
        "CREATE INDEX deployments_device_ts ON deployments (device_id, ts)",
        "CREATE INDEX deployments_deployment ON deployments (deployment_id)",
        *([] if dialect == POSTGRES else ["CREATE INDEX telemetry_ts ON telemetry (ts)",
                                          "CREATE INDEX events_ts ON events (ts)"]),
    ]


def _migration_2(dialect: str) -> list[str]:
    """Room for figures that arrive in telemetry later: a drift score per model and the JSON of what has no column."""
    return [f"ALTER TABLE telemetry ADD COLUMN {c.sql(dialect)}" for c in TELEMETRY_V2]


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: list[str]


def migrations(dialect: str) -> list[Migration]:
    """Every migration for `dialect`, in order."""
    return [
        Migration(1, "telemetry, events, deployments, devices, meta", _migration_1(dialect)),
        Migration(2, "telemetry.drift and telemetry.extra", _migration_2(dialect)),
    ]


LATEST = len(migrations(SQLITE))

SCHEMA_VERSION_TABLE = {
    SQLITE: "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL, "
            "description TEXT)",
    POSTGRES: "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, "
              "applied_at double precision NOT NULL, description text)",
}


def partition_name(table: str, day_start: int) -> str:
    """`telemetry_d20250131` for the UTC day that starts at `day_start`."""
    import time

    return f"{table}_d{time.strftime('%Y%m%d', time.gmtime(day_start))}"


def day_of(ts: float) -> int:
    """The start (Unix seconds) of the UTC day `ts` falls in."""
    return int(ts // DAY_S) * DAY_S
