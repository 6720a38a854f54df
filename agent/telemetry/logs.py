"""The agent's warnings and errors on the broker: what `edgectl logs --device ID` shows (docs/protocol.md §3.10).

`LogForwarder` is a `logging.Handler` on the root logger. Its `emit` runs on whichever thread logged
(the loop, the MQTT network thread, an API thread) and only turns the record into a small dict and
appends it to a bounded queue; the daemon's loop thread calls `pump`, which publishes what is queued.
So logging never waits for the broker, a dead broker costs at most the queue's few hundred records,
and the transport's own log lines can never re-enter the transport from inside it.

Three bounds keep a log storm from becoming a broker storm: a token bucket (`logs_per_s`,
`logs_burst`) whose refusals are counted and reported as one "N log records suppressed" record, a
message cut at MAX_MESSAGE_BYTES, and a queue of QUEUE_MAX records while the broker is away (the
oldest are dropped, and counted the same way). Records are published at QoS 0, which draws no PUBACK:
a broker whose ACL refuses the logs topic drops them silently instead of answering with a refusal
the transport would log, which would be one more record to publish.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

from edgefleet.errors import EdgefleetError
from edgefleet.protocol.canonical import canonical_json, parse_json

MAX_MESSAGE_BYTES = 2048
"""A record's message (with its traceback, if any) is cut to this many UTF-8 bytes."""
QUEUE_MAX = 200
"""Records waiting for the broker at most; older ones are dropped and counted."""
RECENT_INTERVAL_S = 5.0
"""The retained recent-records document is published at most this often."""
SEED_WAIT_S = 2.0
"""After connecting, how long the previous run's retained recent document may take to arrive before
this run's own replaces it (a broker sends retained messages right after the subscription's SUBACK)."""
RECENT_MAX_BYTES = 128 << 10
"""The recent-records document's size at most; the oldest records go first."""
SUMMARY_LOGGER = __name__
"""The `logger` of the records this module makes itself (suppression summaries)."""

LEVELS = {"warning": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}

Publish = Callable[[str, bytes, bool], None]
"""(topic, payload, retain): hand one QoS 0 message to the transport; may raise EdgefleetError."""


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; `take` spends one when there is one."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        """Spend one token; False when the bucket is empty (the caller drops or counts its record)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def truncate(text: str, limit: int = MAX_MESSAGE_BYTES) -> tuple[str, bool]:
    """`text` cut to `limit` UTF-8 bytes (never inside a character), and whether it was cut."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= limit:
        return text, False
    return data[:limit].decode("utf-8", errors="ignore"), True


class LogForwarder(logging.Handler):
    """Queues this agent's log records of `level` and above and publishes them from the loop thread."""

    def __init__(self, device_id: str, topic: str, recent_topic: str, *, level: str = "warning",
                 per_s: float = 10.0, burst: int = 50, recent: int = 100,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic) -> None:
        super().__init__(LEVELS[level])
        self.device_id = device_id
        self.topic = topic
        self.recent_topic = recent_topic
        self.per_s = per_s
        self._clock = clock
        self._monotonic = monotonic
        self._bucket = TokenBucket(per_s, burst, monotonic)
        self._queue: deque[dict[str, Any]] = deque()
        self._recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self._keep_recent = recent > 0
        self._mutex = threading.RLock()
        """Guards the queue, the counters and the bucket between `emit` (any thread) and `pump` (the loop)."""
        self._busy = threading.local()
        """Set on the thread that is publishing: what the transport logs meanwhile is not forwarded."""
        self.suppressed = 0
        """Records refused by the rate limit since the last summary."""
        self.dropped = 0
        """Records dropped from a full queue (the broker away) since the last summary."""
        self.published = 0
        self.failed = 0
        self._recent_dirty = False
        self._recent_sent = -RECENT_INTERVAL_S
        self._was_connected = False
        self._connected_at = 0.0
        self.seeded = not self._keep_recent
        """The previous run's recent records were taken (or given up on): our own document may replace it."""

    # --- any thread ----------------------------------------------------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        """Queue one record; never raises, never blocks on I/O."""
        if getattr(self._busy, "on", False):
            return
        try:
            with self._mutex:
                if not self._bucket.take():
                    self.suppressed += 1
                    return
                if self.suppressed:  # the summary of a storm goes before the first record after it
                    self._flush_counts()
            doc = self.to_dict(record)  # formatting (a traceback) outside the lock
            with self._mutex:
                self._append(doc)
        except Exception:  # noqa: S110 - a record that cannot be forwarded must not disturb the logger
            pass

    def to_dict(self, record: logging.LogRecord) -> dict[str, Any]:
        """The wire form of one record (docs/protocol.md §3.10)."""
        text = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        message, cut = truncate(text)
        doc: dict[str, Any] = {"ts": round(record.created, 3), "device_id": self.device_id,
                               "level": record.levelname, "logger": record.name, "message": message,
                               "suppressed": 0}
        if cut:
            doc["truncated"] = True
        return doc

    def _append(self, doc: dict[str, Any], *, bounded: bool = True) -> None:
        """Queue a record, dropping the oldest when full; a summary is never dropped for (it counts the drops)."""
        if bounded and len(self._queue) >= QUEUE_MAX:
            self._queue.popleft()
            self.dropped += 1
        self._queue.append(doc)

    def _flush_counts(self) -> None:
        """Queue one summary of what was suppressed or dropped since the last one (under the lock)."""
        lost = self.suppressed + self.dropped
        if not lost:
            return
        parts = []
        if self.suppressed:
            parts.append(f"{self.suppressed} suppressed by the rate limit ({self.per_s:g}/s)")
        if self.dropped:
            parts.append(f"{self.dropped} dropped while the broker was unreachable ({QUEUE_MAX} kept)")
        self.suppressed = self.dropped = 0
        self._append({"ts": round(self._clock(), 3), "device_id": self.device_id, "level": "WARNING",
                      "logger": SUMMARY_LOGGER, "message": f"{lost} log records not sent: {'; '.join(parts)}",
                      "suppressed": lost}, bounded=False)

    # --- the loop thread ----------------------------------------------------------------------

    def seed(self, payload: bytes) -> None:
        """Take the records of the retained recent document a previous run left, once, before ours."""
        if self.seeded:
            return
        self.seeded = True
        try:
            doc = parse_json(payload) if payload else None
        except EdgefleetError:
            return
        old = doc.get("records") if isinstance(doc, dict) else None
        if not isinstance(old, list):
            return
        with self._mutex:
            first = self._recent[0]["ts"] if self._recent else float("inf")
            keep = [r for r in old if isinstance(r, dict) and isinstance(r.get("ts"), (int, float)) and r["ts"] < first]
            mine = list(self._recent)
            self._recent.clear()
            self._recent.extend([*keep, *mine])  # maxlen keeps the newest
            self._recent_dirty = bool(mine) or self._recent_dirty

    def pump(self, connected: bool, publish: Publish, *, final: bool = False) -> None:
        """Publish what is queued (connected only: QoS 0 is lost while away), then the recent document
        when it changed and its interval has passed (`final`, as the agent stops: whatever the interval)."""
        now = self._monotonic()
        if connected and not self._was_connected:
            self._connected_at = now
            self._recent_dirty = self._recent_dirty or bool(self._recent)  # the broker may have lost it
        self._was_connected = connected
        if not connected:
            return
        with self._mutex:
            if self.dropped or (self.suppressed and self._bucket.take()):
                self._flush_counts()  # not only before the next record: a storm may be the last thing logged
            batch = list(self._queue)
            self._queue.clear()
        for doc in batch:
            self._send(publish, self.topic, canonical_json(doc), False)
        if batch:
            with self._mutex:
                self._recent.extend(batch)
                self._recent_dirty = self._keep_recent
        if not self.seeded and now - self._connected_at >= SEED_WAIT_S:
            self.seeded = True  # no earlier document came: ours is the first
        if self._recent_dirty and self.seeded and (final or now - self._recent_sent >= RECENT_INTERVAL_S):
            self._recent_sent = now
            self._recent_dirty = False
            self._send(publish, self.recent_topic, self.recent_document(), True)

    def recent_document(self) -> bytes:
        """The retained document of the newest records, within RECENT_MAX_BYTES."""
        with self._mutex:
            records = list(self._recent)
        while True:
            data = canonical_json({"device_id": self.device_id, "ts": round(self._clock(), 3), "records": records})
            if len(data) <= RECENT_MAX_BYTES or not records:
                return data
            records = records[max(1, len(records) // 10):]

    def _send(self, publish: Publish, topic: str, payload: bytes, retain: bool) -> None:
        self._busy.on = True
        try:
            publish(topic, payload, retain)
            self.published += 1
        except EdgefleetError:
            self.failed += 1  # not logged: that line would be one more record to send
        finally:
            self._busy.on = False
