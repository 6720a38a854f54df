"""A device's log records as `edgectl logs` reads them: the retained recent ones, then the live ones.

The agent publishes each WARNING-and-above record on `P/devices/{id}/logs` (not retained) and keeps
the newest ones in the retained `P/devices/{id}/logs/recent` (docs/protocol.md §3.10). `LogReader`
subscribes to both and to the device's status, learns through a sync message when the retained ones
are in, and hands live records over in arrival order without repeating one the recent document held.
"""

from __future__ import annotations

import datetime
import json
import logging
import queue
import re
from dataclasses import dataclass
from typing import Any

from edgefleet.converter.fleet.observer import Sync
from edgefleet.errors import EdgefleetError
from edgefleet.protocol import Topics, parse_json
from edgefleet.transport import Message, Transport

log = logging.getLogger(__name__)

LEVELS = ("WARNING", "ERROR", "CRITICAL")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str) -> float:
    """`--since`: seconds, or a number with s, m, h or d (`90s`, `10m`, `2h`, `1d`); ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def level_number(name: str) -> int:
    """The `logging` number of a level name the agent writes (an unknown name counts as WARNING)."""
    value = logging.getLevelName(name.upper())
    return value if isinstance(value, int) else logging.WARNING


@dataclass(frozen=True)
class LogLine:
    """One record as a device published it (docs/protocol.md §3.10); `raw` is kept for --json."""

    ts: float
    level: str
    logger: str
    message: str
    raw: dict[str, Any]

    @classmethod
    def from_dict(cls, raw: Any) -> LogLine | None:
        """The record, or None for anything that is not one (a record is never trusted to be well formed)."""
        if not isinstance(raw, dict):
            return None
        ts, level, logger, message = (raw.get(k) for k in ("ts", "level", "logger", "message"))
        if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not isinstance(message, str):
            return None
        return cls(float(ts), level if isinstance(level, str) else "WARNING",
                   logger if isinstance(logger, str) else "?", message, raw)

    @property
    def key(self) -> tuple[float, str, str]:
        """What tells two records apart (the same record arrives live and in the recent document)."""
        return self.ts, self.logger, self.message

    def text(self) -> str:
        """`2025-06-01 14:03:07 WARNING logger: message`, in local time like journalctl."""
        when = datetime.datetime.fromtimestamp(self.ts).strftime("%Y-%m-%d %H:%M:%S")
        return f"{when} {self.level} {self.logger}: {self.message}"

    def to_json(self) -> str:
        """One JSON Lines line: the record as the device sent it."""
        return json.dumps(self.raw, sort_keys=True)


class LogReader:
    """The log records of one device, fed by a Transport whose on_message is `handle`."""

    def __init__(self, topics: Topics, device: str) -> None:
        self.topics = topics
        self.device = device
        self.live_topic = topics.logs(device)
        self.recent_topic = topics.logs_recent(device)
        self.status_topic = topics.status(device)
        self.recent: list[LogLine] | None = None
        """The records of the retained recent document; None when the device has none."""
        self.status: str | None = None
        """The device's retained status (`online`/`offline`), None when the broker has none."""
        self.live: queue.Queue[LogLine] = queue.Queue()
        self._seen: set[tuple[float, str, str]] = set()
        self._sync: Sync | None = None

    def attach(self, transport: Transport, timeout: float) -> None:
        """Subscribe and wait until the retained recent document and status are in."""
        self._sync = Sync(self.topics, transport.client_id)
        transport.subscribe([self.recent_topic, self.live_topic, self.status_topic, self._sync.topic], wait=timeout)
        self._sync.wait(transport, timeout)

    def handle(self, message: Message) -> None:
        """The network thread: keep the recent document and the status, queue live records."""
        if self._sync is not None and self._sync.handle(message):
            return
        try:
            doc = parse_json(message.payload) if message.payload else None
        except EdgefleetError as err:
            log.debug("ignoring a malformed message on %s: %s", message.topic, err)
            return
        if message.topic == self.status_topic:
            self.status = doc.get("status") if isinstance(doc, dict) and isinstance(doc.get("status"), str) else None
        elif message.topic == self.recent_topic:
            if self.recent is None and isinstance(doc, dict) and isinstance(doc.get("records"), list):
                lines = [line for r in doc["records"] if (line := LogLine.from_dict(r)) is not None]
                self.recent = sorted(lines, key=lambda line: line.ts)
                self._seen.update(line.key for line in lines)
        elif message.topic == self.live_topic:
            line = LogLine.from_dict(doc)
            if line is not None:
                self.live.put(line)

    def fresh(self, line: LogLine) -> bool:
        """True the first time a record is seen (a live record may also be in the recent document)."""
        if line.key in self._seen:
            return False
        self._seen.add(line.key)
        return True


def select(lines: list[LogLine], *, since: float | None, level: int, last: int | None) -> list[LogLine]:
    """The records at or above `level`, not older than `since` (a Unix time), the `last` newest of them."""
    chosen = [line for line in lines if level_number(line.level) >= level and (since is None or line.ts >= since)]
    return chosen[-last:] if last is not None else chosen
