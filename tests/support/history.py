"""History databases for tests: a SQLite file, or a schema of its own in the machine's PostgreSQL
(postgresql://postgres@127.0.0.1:5432/test, trust authentication), dropped afterwards so parallel runs never
share tables. EDGEFLEET_TEST_PG overrides the server URL."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_SERVER = os.environ.get("EDGEFLEET_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def pg_available() -> str | None:
    """None when the test server answers, else why not."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        psycopg.connect(PG_SERVER, connect_timeout=3).close()
    except psycopg.Error as err:
        return f"no PostgreSQL at {PG_SERVER}: {str(err).strip().splitlines()[0] if str(err).strip() else err}"
    return None


def pg_schema_url() -> Iterator[str]:
    """A URL naming a fresh schema; the schema is dropped when the generator is closed."""
    import psycopg

    schema = f"edgefleet_test_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    try:
        yield f"{PG_SERVER}?schema={schema}"
    finally:
        with psycopg.connect(PG_SERVER, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def history_target(kind: str, tmp_path: Path) -> Iterator[str]:
    """A history database target for a test's fixture: a SQLite path ("sqlite"), or a PostgreSQL schema of
    its own ("postgresql", skipped without a server)."""
    if kind == "sqlite":
        yield str(tmp_path / "history.sqlite")
        return
    why = pg_available()
    if why is not None:
        pytest.skip(why)
    yield from pg_schema_url()
