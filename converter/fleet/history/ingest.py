"""Turning the documents a collector receives into history rows, written in batches.

The collector hands every checked document (a JSON object from the device its topic names) to
`HistoryWriter.add`; rows pile up and go to the store in one transaction (SQLite) or one `COPY` per
table (PostgreSQL) per batch: when `batch` rows are waiting, when the collector has nothing else to do,
and at the end. A field of the wrong type is stored as NULL rather than refusing the document: a
collector keeps what devices said. A device whose clock is more than a week away from the collector's
is stored at the time of receipt (its own `ts` kept in `extra`), so a wrong clock cannot scatter rows
over years of partitions.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from edgefleet.converter.fleet.history.store import Batch, HistoryStore, Retention, Row, json_text

log = logging.getLogger(__name__)

OUTCOMES = {"COMMITTED": "committed", "REJECTED": "rejected", "ROLLED_BACK": "rolled_back"}
CLOCK_SLACK_S = 7 * 86_400
# A device row is refreshed at most this often from telemetry (a status always refreshes it).
DEVICE_REFRESH_S = 60.0
# Batches handed to the writer thread and not yet written; the collector waits beyond that.
WRITE_AHEAD = 2
MODEL_KEYS = {"name", "version", "phase", "count", "errors", "p50_ms", "p95_ms", "p99_ms", "max_ms", "drift"}
DEVICE_KEYS = {"ts", "device_id", "agent_version", "uptime_s", "cpu_percent", "rss_bytes", "system_cpu_percent",
               "mem_available_bytes", "load1", "disk_free_bytes", "temperature_c", "models", "channel", "insecure"}


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value) if -(2 ** 63) <= value < 2 ** 63 else None


def _str(value: Any) -> str | None:
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else None


def drift_score(value: Any) -> float | None:
    """A model's drift figure as one number: the number itself, or the largest score in an object of
    per-input figures (numbers, or objects with a `score`)."""
    if (n := _num(value)) is not None:
        return n
    if isinstance(value, dict) and ("inputs" in value or "outputs" in value):
        # the agent's ModelDrift: {inputs: {name: psi}, outputs: psi, samples: n, drifting: [...]}
        found = [s for s in (drift_score(value.get("inputs")), _num(value.get("outputs"))) if s is not None]
        return max(found) if found else None
    if isinstance(value, dict):
        scores = [drift_score(v.get("score") if isinstance(v, dict) else v) for v in value.values()]
        found = [s for s in scores if s is not None]
        return max(found) if found else None
    return None


def document_time(doc: dict[str, Any], received: float) -> tuple[float, dict[str, Any]]:
    """The time a row is stored at, and what to add to `extra` when the device's clock was not believed."""
    ts = _num(doc.get("ts"))
    if ts is None or not ts > 0:
        return received, {}
    if abs(ts - received) > CLOCK_SLACK_S:
        return received, {"device_ts": ts}
    return ts, {}


def telemetry_rows(device: str, doc: dict[str, Any], received: float) -> list[Row]:
    """One row per model of a telemetry document (one with model NULL when it lists none)."""
    ts, extra = document_time(doc, received)
    for key, value in doc.items():
        if key not in DEVICE_KEYS:
            extra[key] = value
    vitals = (_num(doc.get("cpu_percent")), _int(doc.get("rss_bytes")), _num(doc.get("system_cpu_percent")),
              _int(doc.get("mem_available_bytes")), _num(doc.get("load1")), _num(doc.get("temperature_c")))
    models = [m for m in doc.get("models") or () if isinstance(m, dict)] if isinstance(doc.get("models"), list) else []
    if not models:
        return [(ts, received, device, None, None, None, None, None, None, None, None, None, *vitals, 1, None,
                 json_text(extra or None))]
    out = []
    for m in models:
        unknown = {k: v for k, v in m.items() if k not in MODEL_KEYS}
        row_extra = {**extra, **({"model": unknown} if unknown else {})}
        if "drift" in m and not isinstance(m["drift"], (int, float)):
            row_extra["drift"] = m["drift"]
        out.append((ts, received, device, _str(m.get("name")), _int(m.get("version")), _str(m.get("phase")),
                    _int(m.get("count")), _int(m.get("errors")), _num(m.get("p50_ms")), _num(m.get("p95_ms")),
                    _num(m.get("p99_ms")), _num(m.get("max_ms")), *vitals, 1, drift_score(m.get("drift")),
                    json_text(row_extra or None)))
    return out


def event_row(device: str, doc: dict[str, Any], received: float) -> Row:
    ts, _ = document_time(doc, received)
    details = doc.get("details") if isinstance(doc.get("details"), dict) else {}
    return (ts, received, device, _str(doc.get("model")) or "?", _str(doc.get("step")) or "?", doc.get("ok") is True,
            _str(doc.get("deployment_id")), _int(doc.get("version")), _str(doc.get("reason")), json_text(details))


def deployment_row(event: Row, doc: dict[str, Any]) -> Row | None:
    """The outcome an event reports (COMMITTED ok, REJECTED, ROLLED_BACK), or None for the other steps."""
    step = event[4]
    result = OUTCOMES.get(step)
    if result is None or event[5] != (step == "COMMITTED"):
        return None  # COMMITTED is ok, REJECTED and ROLLED_BACK are not; the others answer commands
    details = doc.get("details")
    if not isinstance(details, dict):
        details = {}
    if details.get("adopted") is True or "command_id" in details:
        return None  # a document taken over, or a command answered: no new outcome
    return (event[0], event[1], event[2], event[3], event[6], event[7], result, event[8],
            _int(details.get("restored_version")), json_text(details))


class HistoryWriter:
    """Collects rows from documents and writes them to a store in batches; prunes it now and then."""

    def __init__(self, store: HistoryStore, *, batch: int = 5000, retention: Retention | None = None,
                 prune_every_s: float = 3600.0) -> None:
        self.store = store
        self.target = store.target
        self.schema_version = store.schema_version()
        self.batch_rows = batch
        self.retention = retention
        self.prune_every_s = prune_every_s
        self._next_prune = time.monotonic() if retention is not None else float("inf")
        self._pending = Batch([], [], [], [])
        self._device_written: dict[str, float] = {}
        self._device_rows: dict[str, Row] = {}
        self.written = 0
        self.failed = 0
        self.flushed_at: float | None = None
        """Unix time the last write ended."""
        self._tasks: queue.Queue[Batch | Retention | None] = queue.Queue(maxsize=WRITE_AHEAD)
        self._thread: threading.Thread | None = None
        self.pruned: dict[str, int] = {}

    def add(self, kind: str, device: str, doc: dict[str, Any], received: float) -> None:
        """Take one checked document (telemetry, events or status)."""
        pending = self._pending
        if kind == "telemetry":
            pending.telemetry.extend(telemetry_rows(device, doc, received))
            last = self._device_written.get(device)
            if last is None or received - last >= DEVICE_REFRESH_S:
                self._device(device, None, _str(doc.get("agent_version")), received)
        elif kind == "events":
            row = event_row(device, doc, received)
            pending.events.append(row)
            outcome = deployment_row(row, doc)
            if outcome is not None:
                pending.deployments.append(outcome)
        elif kind == "status":
            groups = doc.get("groups")
            groups = [g for g in groups if isinstance(g, str)] if isinstance(groups, list) else []
            self._device(device, json_text(groups), _str(doc.get("agent_version")), received)
        if len(pending) >= self.batch_rows:
            self.flush()

    def _device(self, device: str, groups: str | None, agent_version: str | None, seen: float) -> None:
        self._device_written[device] = seen
        previous = self._device_rows.get(device)
        if previous is not None and groups is None:
            groups = previous[1]
        self._device_rows[device] = (device, groups, agent_version, seen, seen)

    def flush(self) -> None:
        """Hand what is waiting to the writer thread (blocks while it already has WRITE_AHEAD batches)."""
        pending = self._pending
        pending.devices = list(self._device_rows.values())
        self._device_rows.clear()
        if not len(pending):
            return
        self._pending = Batch([], [], [], [])
        self._submit(pending)

    def idle(self) -> None:
        """Nothing else to do: write what is waiting, prune when it is time."""
        self.flush()
        if self.retention is not None and time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + self.prune_every_s
            self._submit(self.retention)

    def close(self) -> None:
        """Write what is waiting and wait until every batch is in the database."""
        self.flush()
        if self._thread is not None:
            self._tasks.put(None)
            self._thread.join()
            self._thread = None

    def _submit(self, task: Batch | Retention) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="history-writer", daemon=True)
            self._thread.start()
        self._tasks.put(task)

    def _work(self) -> None:
        """The writer thread: the store is used from here only, so the database's own work (a COPY, a commit)
        overlaps with the collector taking in the next messages."""
        while (task := self._tasks.get()) is not None:
            if isinstance(task, Retention):
                try:
                    self.pruned = self.store.prune(task)
                except Exception as err:
                    log.error("history: pruning %s failed: %s", self.target, err)
                continue
            try:
                self.store.write(task)
                self.written += len(task)
                self.flushed_at = time.time()
            except Exception as err:  # a database error must not end a collector that also writes JSON Lines
                self.failed += len(task)
                log.error("history: could not write %d row(s) to %s: %s", len(task), self.target, err)
