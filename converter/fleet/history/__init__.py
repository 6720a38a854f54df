"""Fleet history: telemetry, events and deployment outcomes in SQLite or PostgreSQL (`edgectl fleet collect
--db`), read back by `edgectl fleet history`. schema.py has the tables and migrations, store.py the engines,
ingest.py the collector's writer, query.py the segments `fleet history` shows, plot.py its PNG."""

from edgefleet.converter.fleet.history.store import (
    HistoryStore,
    Retention,
    default_path,
    display,
    is_postgres,
)

__all__ = ["HistoryStore", "Retention", "default_path", "display", "is_postgres"]
