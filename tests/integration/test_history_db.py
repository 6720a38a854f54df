"""The fleet history database on SQLite and on the machine's PostgreSQL: migrations from an old schema,
rows from documents, the segments `fleet history` shows, retention and down-sampling."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.converter.fleet.history.ingest import HistoryWriter
from edgefleet.converter.fleet.history.query import load, parse_time
from edgefleet.converter.fleet.history.schema import LATEST, TELEMETRY_V1
from edgefleet.converter.fleet.history.store import (
    HistoryStore,
    PostgresStore,
    Retention,
    SQLiteStore,
    is_postgres,
)
from tests.support.history import history_target


@pytest.fixture(params=["sqlite", "postgresql"])
def history_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test runs on SQLite, then on PostgreSQL."""
    yield from history_target(request.param, tmp_path)


def raw_open(target: str) -> HistoryStore:
    """A store opened without migrating it."""
    return PostgresStore.connect(target) if is_postgres(target) else SQLiteStore.connect(target)


def telemetry(device: str, ts: float, version: int, count: int, errors: int, *, p95: float = 2.0,
              rss: int = 50_000_000, **model: Any) -> dict[str, Any]:
    return {"ts": ts, "device_id": device, "agent_version": "0.1.0", "uptime_s": 5.0, "cpu_percent": 3.5,
            "rss_bytes": rss, "system_cpu_percent": 10.0, "mem_available_bytes": 10 ** 9, "load1": 0.5,
            "disk_free_bytes": 10 ** 10,
            "models": [{"name": "m", "version": version, "phase": "COMMITTED", "count": count, "errors": errors,
                        "p50_ms": p95 / 2, "p95_ms": p95, "p99_ms": p95, "max_ms": p95, **model}]}


def event(device: str, ts: float, step: str, ok: bool, version: int, **details: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"ts": ts, "device_id": device, "model": "m", "step": step, "ok": ok,
                           "deployment_id": f"m-v{version}-x", "version": version, "details": details}
    if not ok:
        doc["reason"] = f"{step.lower()} for a reason"
    return doc


def test_an_old_schema_is_upgraded_when_opened_and_keeps_its_rows(history_db: str) -> None:
    store = raw_open(history_db)
    assert store.migrate(target=1) == [1] and store.schema_version() == 1
    if is_postgres(history_db):
        assert isinstance(store, PostgresStore)
        store.ensure_partitions("telemetry", [1_750_000_000.0])
    names = ", ".join(c.name for c in TELEMETRY_V1)
    store.execute(f"INSERT INTO telemetry ({names}) VALUES ({', '.join('?' * len(TELEMETRY_V1))})",
                  (1_750_000_000.0, 1_750_000_000.5, "old-1", "m", 1, "COMMITTED", 10, 0, 1.0, 2.0, 3.0, 4.0, 5.0,
                   1000, 6.0, 2000, 0.1, None, 1))
    store.close()

    with HistoryStore.open(history_db) as upgraded:
        assert upgraded.schema_version() == LATEST == 2
        assert [r[0] for r in upgraded.fetch("SELECT version FROM schema_version ORDER BY version")] == [1, 2]
        assert upgraded.fetch("SELECT device_id, version, p95_ms, drift, extra FROM telemetry") == \
            [("old-1", 1, 2.0, None, None)]
        writer = HistoryWriter(upgraded)
        writer.add("telemetry", "new-1", telemetry("new-1", 1_750_000_010.0, 2, 5, 0, drift={"x": {"score": 0.4},
                                                                                              "y": 0.1}), 1_750_000_010.2)
        writer.close()
        assert writer.failed == 0
        (row,) = upgraded.fetch("SELECT drift, extra FROM telemetry WHERE device_id = 'new-1'")
        assert row[0] == pytest.approx(0.4)
        extra = json.loads(row[1]) if isinstance(row[1], str) else row[1]
        assert extra == {"drift": {"x": {"score": 0.4}, "y": 0.1}}
    with HistoryStore.open(history_db) as again:  # opening an up-to-date store applies nothing
        assert again.migrate() == [] and again.schema_version() == LATEST


def test_a_rollout_and_a_rollback_become_segments_with_outcomes_and_figures(history_db: str) -> None:
    t0 = time.time() - 600
    docs: list[tuple[str, str, dict[str, Any]]] = []
    for i in range(5):  # v1, 10 requests per sample, no errors
        docs.append(("telemetry", "d1", telemetry("d1", t0 + i, 1, 10 * (i + 1), 0, p95=2.0)))
    docs.append(("events", "d1", event("d1", t0 + 5.0, "PROBATION", True, 2, p50_ms=1.0, p95_ms=3.0)))
    docs.append(("events", "d1", event("d1", t0 + 6.0, "COMMITTED", True, 2, requests=5, errors=0)))
    for i in range(4):  # v2: counters from zero, 1 error in 10
        docs.append(("telemetry", "d1", telemetry("d1", t0 + 7 + i, 2, 10 * (i + 1), i + 1, p95=8.0)))
    docs.append(("events", "d1", event("d1", t0 + 11.0, "ROLLED_BACK", False, 2, restored_version=1)))
    docs.append(("events", "d1", {**event("d1", t0 + 11.0, "ROLLED_BACK", True, 2, command_id="c1",
                                        action="rollback", restored_version=1)}))
    for i in range(3):
        docs.append(("telemetry", "d1", telemetry("d1", t0 + 12 + i, 1, 5 * (i + 1), 0, p95=2.5)))
    docs.append(("status", "d1", {"status": "online", "device_id": "d1", "agent_version": "0.1.0",
                                  "groups": ["lab"]}))
    docs.append(("telemetry", "d2", telemetry("d2", t0 + 3, 1, 1, 0)))
    docs.append(("status", "d2", {"status": "online", "device_id": "d2", "agent_version": "0.1.0",
                                  "groups": ["yard"]}))
    with HistoryStore.open(history_db) as store:
        writer = HistoryWriter(store, batch=4)  # several batches
        for kind, device, doc in docs:
            writer.add(kind, device, doc, float(doc.get("ts", t0 + 20)) + 0.01)
        writer.close()
        assert writer.failed == 0 and writer.written > 0
        assert store.fetch("SELECT count(*) FROM deployments")[0][0] == 2  # the command's answer is no outcome

        history = load(store, since=t0 - 60, until=t0 + 60, group="lab")
        assert set(history.devices) == {"d1"} and history.devices["d1"] == ["lab"]
        segs = [(s.version, s.outcome, s.ongoing) for s in history.segments]
        assert segs == [(1, None, False), (2, "rolled_back", False), (1, "restored", True)], segs
        v1, v2, back = history.segments
        assert v1.requests == 40 and v1.error_rate == 0.0 and v1.p95_ms == 2.0  # first sample is the baseline
        assert v2.requests == 40 and v2.errors == 4 and v2.error_rate == pytest.approx(0.1) and v2.p95_ms == 8.0
        assert [o["result"] for o in v2.outcomes] == ["committed", "rolled_back"]
        assert v2.start == pytest.approx(t0 + 5.0) and v2.end == pytest.approx(t0 + 11.0)
        assert back.requests == 15 and back.rss_mb == 50.0 and back.cpu_percent == 3.5
        assert [s.device_id for s in load(store, since=t0 - 60, until=t0 + 60).segments].count("d2") == 1
        assert load(store, since=t0 - 60, until=t0 + 60, group="nobody").segments == []
        assert load(store, since=t0 + 100, until=t0 + 200).segments == []


def test_retention_drops_old_rows_and_down_samples_old_telemetry_to_means(history_db: str) -> None:
    now = time.time()
    old = (int(now) // 86_400 - 20) * 86_400 + 3600.0  # 20 days ago, on the hour
    middle = (int(now) // 86_400 - 10) * 86_400 + 3600.0
    with HistoryStore.open(history_db) as store:
        writer = HistoryWriter(store)
        for base in (old, middle, now - 60):
            for i in range(12):  # two minutes of samples every 10 s
                doc = telemetry("d1", base + 10 * i, 1, i, 0, p95=float(i))
                writer.add("telemetry", "d1", doc, doc["ts"])
            writer.add("events", "d1", event("d1", base, "COMMITTED", True, 1), base)
        writer.close()
        assert store.fetch("SELECT count(*) FROM telemetry")[0][0] == 36
        report = store.prune(Retention(telemetry_days=15, events_days=15, downsample_after_days=7, bucket_s=60), now)
        assert report["telemetry_deleted"] == 12 and report["events_deleted"] == 1 and report["deployments_deleted"] == 1
        assert report["telemetry_downsampled"] == 12 and report["telemetry_means"] == 2
        means = store.fetch("SELECT ts, samples, p95_ms, count FROM telemetry WHERE ts < ? ORDER BY ts", (now - 86_400,))
        assert [(r[0], r[1], r[2], r[3]) for r in means] == [(middle, 6, 2.5, 5), (middle + 60, 6, 8.5, 11)]
        assert store.fetch("SELECT count(*) FROM telemetry WHERE ts > ?", (now - 3600,))[0][0] == 12  # recent: raw
        again = store.prune(Retention(telemetry_days=15, events_days=15, downsample_after_days=7, bucket_s=60), now)
        assert again["telemetry_downsampled"] == 0 and again["telemetry_deleted"] == 0
        if isinstance(store, PostgresStore):  # whole days went with their partitions
            days = {p.rsplit("_d", 1)[1] for p in store.partitions("telemetry")}
            assert time.strftime("%Y%m%d", time.gmtime(old)) not in days and len(days) >= 2


def test_times_are_read_as_durations_iso_or_unix() -> None:
    now = 1_750_000_000.0
    assert parse_time("2h", now) == now - 7200 and parse_time("90s", now) == now - 90 and parse_time("7d", now) == now - 7 * 86_400
    assert parse_time("now", now) == now and parse_time("1700000000", now) == 1_700_000_000.0
    assert parse_time("2025-06-01T12:00:00Z", now) == 1_748_779_200.0
    with pytest.raises(Exception, match="expected a time"):
        parse_time("yesterday", now)
