"""Telemetry and event collectors that can share a fleet's stream (`edgectl fleet collect`).

With `share`, the subscriptions are MQTT 5 shared subscriptions, `$share/{share}/{prefix}/devices/+/telemetry`
(and events): the broker hands each message to one member of the share, so several collector processes
(on one host or many) split the fleet between them. Without it every collector receives everything.

The network thread only queues messages (`handle`); `Collector.run` checks and writes them on the
calling thread: each JSON Lines record is `{"doc":<the payload as sent>,"kind":...,"received":...,"topic":...}`
with the payload's bytes copied, not re-encoded, after a parse shows it is a JSON object (no NaN or
Infinity) from the device its topic names. The parse is the standard library's, not the wire contract's
stricter `parse_json` (which also refuses duplicate keys at a third more per message): a collector
keeps a log of what devices said at a fleet's rate, it does not act on the documents.

With a history database (`--db`) every checked document also goes to a `HistoryWriter`
(converter/fleet/history/ingest.py), which writes rows in batches; the collector then also subscribes to
the retained status documents, for each device's groups.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from edgefleet.errors import ProtocolError
from edgefleet.protocol import Topics
from edgefleet.transport import Message

if TYPE_CHECKING:
    from edgefleet.converter.fleet.history.ingest import HistoryWriter

log = logging.getLogger(__name__)

LEAVES = ("telemetry", "events")
# The writer takes at most this many messages between looks at the clock and the stop flag, and pauses
# this long when nothing is waiting.
BATCH = 1000
IDLE_WAIT_S = 0.01
# Telemetry is QoS 0 on the wire (a lost sample is replaced by the next); events are QoS 1.
QOS = {"telemetry": 0, "events": 1, "status": 1}


def subscriptions(topics: Topics, share: str | None, leaves: tuple[str, ...] = LEAVES) -> list[tuple[str, int]]:
    """(topic filter, QoS) per leaf; `$share/NAME/...` when sharing."""
    out = []
    for leaf in leaves:
        filt = topics.all_devices(leaf)
        out.append((Topics.shared(share, filt) if share is not None else filt, QOS[leaf]))
    return out


@dataclass
class CollectStats:
    """What a collector took in."""

    messages: int = 0
    bytes: int = 0
    bad: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    devices: set[str] = field(default_factory=set)
    first: float | None = None
    """Unix time of the first message."""
    last: float | None = None
    """Unix time of the latest message."""
    started: float = field(default_factory=time.monotonic)

    def rate(self) -> float:
        """Messages per second between the first and the last message (0 for fewer than two)."""
        if self.first is None or self.last is None or self.last <= self.first or self.messages < 2:
            return 0.0
        return (self.messages - 1) / (self.last - self.first)

    def to_dict(self) -> dict[str, object]:
        """JSON value of the summary."""
        elapsed = time.monotonic() - self.started
        return {
            "messages": self.messages, "bytes": self.bytes, "bad": self.bad, "by_kind": dict(self.by_kind),
            "devices": len(self.devices), "elapsed_s": round(elapsed, 3),
            "active_s": round((self.last - self.first), 3) if self.first is not None and self.last is not None else 0.0,
            "first_received": self.first, "last_received": self.last, "msgs_per_s": round(self.rate(), 1),
        }


class Collector:
    """Takes messages from a Transport (`handle`) and writes them as JSON Lines (`run`)."""

    def __init__(self, topics: Topics, out: BinaryIO | None = None, *, max_queue: int = 1_000_000,
                 history: HistoryWriter | None = None) -> None:
        self.topics = topics
        self.out = out
        self.history = history
        self.stats = CollectStats()
        # A deque, not a queue.Queue: appending needs no lock and wakes nobody, so the network thread
        # never hands the GIL to the writer per message; the writer takes what piled up in batches.
        self._inbox: deque[Message] = deque()
        self._max_queue = max_queue
        # A plain flag, not an Event: it is set from a signal handler.
        self._stopping = False
        self._idle = threading.Event()  # never set: its wait is the writer's pause when nothing came
        self.dropped = 0

    def handle(self, message: Message) -> None:
        """A Transport's on_message: hand the message over and return (never blocks the network thread)."""
        if len(self._inbox) >= self._max_queue:
            self.dropped += 1
            return
        self._inbox.append(message)

    @property
    def pending(self) -> int:
        """Messages received and not yet processed."""
        return len(self._inbox)

    def stop(self) -> None:
        """Make `run` return once the messages already received are written (safe from a signal handler)."""
        self._stopping = True

    def run(self, *, duration: float | None = None, count: int | None = None,
            report: Callable[[CollectStats], None] | None = None, report_every: float = 10.0) -> CollectStats:
        """Process messages until `stop`, `duration` seconds or `count` messages; return the figures."""
        stats = self.stats
        inbox = self._inbox
        deadline = None if duration is None else time.monotonic() + duration
        next_report = time.monotonic() + report_every
        while count is None or stats.messages < count:
            if self._stopping:
                self._drain(count)
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if report is not None and now >= next_report:
                report(stats)
                next_report = now + report_every
            if not inbox:
                if self.out is not None:
                    self.out.flush()  # a quiet moment: let readers of the file see what came so far
                if self.history is not None:
                    self.history.idle()
                self._idle.wait(IDLE_WAIT_S)
                continue
            for _ in range(min(len(inbox), BATCH if count is None else min(BATCH, count - stats.messages))):
                self._take(inbox.popleft())
        if self.out is not None:
            self.out.flush()
        if self.history is not None:
            self.history.close()
        return stats

    def _drain(self, count: int | None) -> None:
        """What the network thread already handed over is still written when stopping."""
        while self._inbox and (count is None or self.stats.messages < count):
            self._take(self._inbox.popleft())

    def _take(self, message: Message) -> None:
        stats = self.stats
        received = time.time()
        if stats.first is None:
            stats.first = received
        stats.last = received
        stats.messages += 1
        stats.bytes += len(message.payload)
        topic = message.topic
        matched = self.topics.device_leaf(topic)
        if matched is None or matched[1] not in QOS:
            stats.bad += 1
            return
        device, kind = matched
        try:
            doc = json.loads(message.payload.decode("utf-8"), parse_constant=_no_constants)
            if not isinstance(doc, dict) or doc.get("device_id") != device:
                raise ProtocolError("not a document of the device its topic names")
        except (ProtocolError, ValueError) as err:  # ValueError: JSONDecodeError and UnicodeDecodeError
            stats.bad += 1
            log.debug("bad %s message from %s: %s", kind, device, err)
            return
        stats.by_kind[kind] = stats.by_kind.get(kind, 0) + 1
        stats.devices.add(device)
        if self.history is not None:
            self.history.add(kind, device, doc, received)
        if self.out is not None and kind != "status":
            self.out.write(b'{"doc":%s,"kind":"%s","received":%.3f,"topic":"%s"}\n'
                           % (message.payload, kind.encode(), received, topic.encode()))


def _no_constants(name: str) -> None:
    raise ProtocolError(f"{name} is not JSON")
