"""The agent's log forwarder (agent/telemetry/logs.py) with a fake publisher and a fake clock: rate limit,
bounds, the recent-records document, and no recursion when publishing logs itself."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from edgefleet.agent.telemetry.logs import (
    MAX_MESSAGE_BYTES,
    QUEUE_MAX,
    SEED_WAIT_S,
    SUMMARY_LOGGER,
    LogForwarder,
    TokenBucket,
)
from edgefleet.errors import TransportError

TOPIC, RECENT = "edgefleet/devices/dev-1/logs", "edgefleet/devices/dev-1/logs/recent"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Publisher:
    """Records what the forwarder publishes, as (topic, document, retain)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any], bool]] = []

    def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        self.sent.append((topic, json.loads(payload), retain))

    def records(self) -> list[dict[str, Any]]:
        return [doc for topic, doc, _ in self.sent if topic == TOPIC]

    def recent(self) -> list[dict[str, Any]]:
        return [doc for topic, doc, _ in self.sent if topic == RECENT]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def forwarder(clock: Clock) -> Iterator[LogForwarder]:
    handler = LogForwarder("dev-1", TOPIC, RECENT, per_s=10, burst=50, recent=100, clock=clock, monotonic=clock)
    yield handler


@pytest.fixture
def logger(forwarder: LogForwarder) -> Iterator[logging.Logger]:
    """A logger of its own, so the test's records reach only this forwarder."""
    lg = logging.getLogger(f"test.agent.logs.{id(forwarder)}")
    lg.propagate = False
    lg.setLevel(logging.DEBUG)
    lg.addHandler(forwarder)
    yield lg
    lg.removeHandler(forwarder)


def test_token_bucket_spends_the_burst_then_refills_at_the_rate(clock: Clock) -> None:
    bucket = TokenBucket(2.0, 3, clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.5
    assert bucket.take() and not bucket.take()
    clock.now += 100  # a long quiet spell saves up the burst, no more
    assert sum(bucket.take() for _ in range(10)) == 3


def test_only_warnings_and_above_with_the_documented_fields(forwarder: LogForwarder, logger: logging.Logger) -> None:
    pub = Publisher()
    logger.info("not forwarded")
    logger.warning("disk %s%% full", 93)
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("a sink failed")
    forwarder.pump(True, pub)
    first, second = pub.records()
    assert set(first) == {"ts", "device_id", "level", "logger", "message", "suppressed"}
    assert first["message"] == "disk 93% full" and first["level"] == "WARNING" and first["logger"] == logger.name
    assert first["device_id"] == "dev-1" and first["suppressed"] == 0
    assert second["level"] == "ERROR" and "ValueError: boom" in second["message"]  # the traceback comes along
    assert all(not retain for topic, _, retain in pub.sent if topic == TOPIC)


def test_a_storm_is_cut_to_the_burst_and_reported_as_one_suppressed_record(
        forwarder: LogForwarder, logger: logging.Logger, clock: Clock) -> None:
    pub = Publisher()
    for i in range(500):
        logger.warning("line %d", i)
    forwarder.pump(True, pub)
    assert [r["message"] for r in pub.records()] == [f"line {i}" for i in range(50)]
    clock.now += 1.0  # the storm is over: the next pump says what was left out
    forwarder.pump(True, pub)
    summary = pub.records()[-1]
    assert summary["logger"] == SUMMARY_LOGGER and summary["suppressed"] == 450
    assert summary["message"].startswith("450 log records not sent: 450 suppressed by the rate limit (10/s)")
    clock.now += 1.0
    logger.error("after the storm")
    forwarder.pump(True, pub)
    assert pub.records()[-1]["message"] == "after the storm" and pub.records()[-1]["suppressed"] == 0
    assert len(pub.records()) == 52


def test_a_long_message_is_cut_to_2_kib(forwarder: LogForwarder, logger: logging.Logger) -> None:
    pub = Publisher()
    logger.warning("é" * 5000)  # two bytes each: the cut never splits a character
    forwarder.pump(True, pub)
    (record,) = pub.records()
    assert len(record["message"].encode()) <= MAX_MESSAGE_BYTES and record["message"] == "é" * 1024
    assert record["truncated"] is True


def test_a_dead_broker_keeps_a_bounded_queue(clock: Clock, logger: logging.Logger, forwarder: LogForwarder) -> None:
    pub = Publisher()
    for i in range(QUEUE_MAX + 120):
        clock.now += 0.2  # slow enough for the rate limit: only the queue bound applies
        logger.warning("offline %d", i)
        forwarder.pump(False, pub)
    assert not pub.sent and len(forwarder._queue) == QUEUE_MAX
    clock.now += 1.0
    forwarder.pump(True, pub)
    records = pub.records()
    assert records[0]["message"] == f"offline {120}"  # the oldest went first
    assert records[-1]["suppressed"] == 120 and "120 dropped while the broker was unreachable" in records[-1]["message"]


def test_what_the_transport_logs_while_publishing_is_not_forwarded(forwarder: LogForwarder, logger: logging.Logger,
                                                                    clock: Clock) -> None:
    calls = 0

    def noisy(topic: str, payload: bytes, retain: bool) -> None:
        nonlocal calls
        calls += 1
        logger.warning("cannot publish to %s", topic)  # as a transport would
        raise TransportError("not connected")

    logger.warning("first")
    for _ in range(5):
        clock.now += 10
        forwarder.pump(True, noisy)
    assert calls == 2  # the record and, once, the recent document: nothing fed back
    assert forwarder.failed == 2 and not forwarder._queue


def test_recent_document_waits_for_the_previous_runs_then_extends_it(forwarder: LogForwarder,
                                                                     logger: logging.Logger, clock: Clock) -> None:
    pub = Publisher()
    logger.warning("new run")
    forwarder.pump(True, pub)
    assert pub.records() and not pub.recent()  # the previous run's document may still be on its way
    old = {"device_id": "dev-1", "ts": 1.0, "records": [{"ts": 5.0, "level": "ERROR", "message": "before restart",
                                                          "logger": "x", "device_id": "dev-1", "suppressed": 0}]}
    forwarder.seed(json.dumps(old).encode())
    forwarder.pump(True, pub)
    (doc,) = pub.recent()
    assert [r["message"] for r in doc["records"]] == ["before restart", "new run"]
    assert [retain for topic, _, retain in pub.sent if topic == RECENT] == [True]
    forwarder.seed(json.dumps(old).encode())  # once only: our own document coming back adds nothing
    logger.warning("later")
    forwarder.pump(True, pub)
    assert len(pub.recent()) == 1  # at most every RECENT_INTERVAL_S
    clock.now += 5
    forwarder.pump(True, pub)
    assert [r["message"] for r in pub.recent()[-1]["records"]] == ["before restart", "new run", "later"]


def test_recent_document_without_a_previous_one(forwarder: LogForwarder, logger: logging.Logger, clock: Clock) -> None:
    pub = Publisher()
    logger.warning("only line")
    forwarder.pump(True, pub)
    assert not pub.recent()
    clock.now += SEED_WAIT_S
    forwarder.pump(True, pub)
    assert [r["message"] for r in pub.recent()[0]["records"]] == ["only line"]


def test_recent_document_keeps_the_newest_records(clock: Clock) -> None:
    forwarder = LogForwarder("dev-1", TOPIC, RECENT, per_s=1000, burst=1000, recent=3, clock=clock, monotonic=clock)
    forwarder.seed(b"")
    lg = logging.getLogger("test.agent.logs.ring")
    lg.propagate = False
    lg.addHandler(forwarder)
    try:
        pub = Publisher()
        for i in range(7):
            lg.warning("r%d", i)
        forwarder.pump(True, pub)
        assert [r["message"] for r in pub.recent()[0]["records"]] == ["r4", "r5", "r6"]
    finally:
        lg.removeHandler(forwarder)


def test_the_last_records_go_out_as_the_agent_stops(forwarder: LogForwarder, logger: logging.Logger,
                                                     clock: Clock) -> None:
    pub = Publisher()
    forwarder.seed(b"")
    logger.warning("one")
    forwarder.pump(True, pub)
    logger.error("stopping after this")
    forwarder.pump(True, pub)
    assert len(pub.recent()) == 1  # within the interval: not yet
    forwarder.pump(True, pub, final=True)
    assert [r["message"] for r in pub.recent()[-1]["records"]] == ["one", "stopping after this"]
