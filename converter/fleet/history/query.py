"""What ran where, when, and how it behaved: segments of a device's model versions from the history.

A segment is a stretch of time during which one device served one version of one model, as its telemetry
(the served version in every sample) and its events (PROBATION starts serving a candidate, ROLLED_BACK
restores the previous version) tell it. Each carries the outcomes recorded for that version on that
device in its time (committed, rejected, rolled back; "restored" when a rollback brought it back) and
the figures of its telemetry samples: the median of the samples' p50 and p95 latency and the worst p95,
requests and errors counted from the cumulative counters (a counter that went down restarted from zero),
mean CPU, mean and peak resident memory, and the largest drift score when there is one.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from edgefleet.converter.fleet.history.store import HistoryStore
from edgefleet.errors import UsageError

DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_time(text: str, now: float | None = None) -> float:
    """`2h` / `30m` / `7d` (that long ago), `now`, a Unix time, or an ISO 8601 time (local when it names no zone)."""
    now = time.time() if now is None else now
    text = text.strip()
    if text == "now":
        return now
    m = DURATION.fullmatch(text)
    if m:
        return now - float(m.group(1)) * UNITS[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise UsageError(f"expected a time such as 2h, 30m, 7d, 2025-06-01T12:00 or a Unix time, got {text!r}") from None


@dataclass
class Sample:
    """One telemetry row of a device's model."""

    ts: float
    version: int | None
    phase: str | None
    count: int | None
    errors: int | None
    p50_ms: float | None
    p95_ms: float | None
    cpu_percent: float | None
    rss_bytes: int | None
    drift: float | None
    samples: int
    error_rate: float | None = None
    """errors / requests since the previous sample of the same version (None without requests)."""


@dataclass
class Segment:
    device_id: str
    model: str
    version: int | None
    start: float
    end: float
    ongoing: bool
    outcome: str | None = None
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    samples: int = 0
    requests: int = 0
    errors: int = 0
    error_rate: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p95_max_ms: float | None = None
    cpu_percent: float | None = None
    rss_mb: float | None = None
    rss_max_mb: float | None = None
    drift: float | None = None
    series: list[Sample] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("series")
        d["from"], d["to"] = d.pop("start"), d.pop("end")
        d["from_iso"], d["to_iso"] = iso(self.start), iso(self.end)
        return d


@dataclass
class History:
    since: float
    until: float
    devices: dict[str, list[str]]
    segments: list[Segment]
    deployments: list[dict[str, Any]]
    store: str
    schema_version: int

    def to_dict(self) -> dict[str, Any]:
        return {"since": self.since, "until": self.until, "since_iso": iso(self.since), "until_iso": iso(self.until),
                "store": self.store, "schema_version": self.schema_version,
                "devices": [{"device_id": d, "groups": g} for d, g in sorted(self.devices.items())],
                "segments": [s.to_dict() for s in self.segments], "deployments": self.deployments}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def _in(column: str, values: list[str]) -> tuple[str, list[Any]]:
    return f"{column} IN ({', '.join('?' * len(values))})", list(values)


def load(store: HistoryStore, *, since: float, until: float, devices: list[str] | None = None,
         group: str | None = None, model: str | None = None) -> History:
    """The segments and outcomes of the devices asked for (all when none is named) in [since, until]."""
    known: dict[str, list[str]] = {}
    for device_id, groups in store.fetch("SELECT device_id, groups FROM devices"):
        parsed = json.loads(groups) if isinstance(groups, str) else groups
        known[str(device_id)] = [str(g) for g in parsed] if isinstance(parsed, list) else []
    wanted = list(devices or [])
    if group is not None:
        members = [d for d, g in known.items() if group in g]
        wanted = [d for d in wanted if d in members] if wanted else members
        if not wanted:
            return History(since, until, {}, [], [], store.target, store.schema_version())
    where = ["ts >= ?", "ts <= ?"]
    params: list[Any] = [since, until]
    if wanted:
        clause, values = _in("device_id", wanted)
        where.append(clause)
        params += values
    if model is not None:
        where.append("model = ?")
        params.append(model)
    cond = " AND ".join(where)
    telemetry = store.fetch(
        "SELECT device_id, model, ts, version, phase, count, errors, p50_ms, p95_ms, cpu_percent, rss_bytes, drift, "
        f"samples FROM telemetry WHERE {cond} AND model IS NOT NULL ORDER BY device_id, model, ts", params)
    outcomes = store.fetch(
        "SELECT device_id, model, ts, deployment_id, version, result, reason, restored_version, figures "
        f"FROM deployments WHERE {cond} ORDER BY ts", params)
    starts = store.fetch(f"SELECT device_id, model, ts, version FROM events WHERE {cond} AND step = 'PROBATION' "
                         "AND ok ORDER BY ts", params)

    deployments = [{"device_id": r[0], "model": r[1], "ts": float(r[2]), "ts_iso": iso(float(r[2])),
                    "deployment_id": r[3], "version": r[4], "result": r[5], "reason": r[6], "restored_version": r[7],
                    "figures": json.loads(r[8]) if isinstance(r[8], str) else r[8]} for r in outcomes]
    # the version each (device, model) served from a point in time on: telemetry and the events that switch
    points: dict[tuple[str, str], list[tuple[float, int | None, Sample | None]]] = defaultdict(list)
    for r in telemetry:
        sample = Sample(float(r[2]), r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], int(r[12] or 1))
        points[(str(r[0]), str(r[1]))].append((sample.ts, sample.version, sample))
    for r in starts:
        points[(str(r[0]), str(r[1]))].append((float(r[2]), r[3], None))
    for d in deployments:
        if d["result"] == "rolled_back":
            points[(d["device_id"], d["model"])].append((d["ts"], d["restored_version"], None))
        elif d["result"] == "committed":
            points[(d["device_id"], d["model"])].append((d["ts"], d["version"], None))
    segments = []
    for (device_id, name), seq in sorted(points.items()):
        seq.sort(key=lambda p: (p[0], p[2] is not None))
        current: Segment | None = None
        for ts, version, point in seq:
            if current is None or version != current.version:
                if current is not None:
                    current.end = ts
                    current.ongoing = False
                current = Segment(device_id, name, version, ts, ts, True)
                if point is not None:
                    current.series.append(point)
                segments.append(current)
                continue
            current.end = max(current.end, ts)
            if point is not None:
                current.series.append(point)
    by_device: dict[tuple[str, str], list[Segment]] = defaultdict(list)
    for s in segments:
        by_device[(s.device_id, s.model)].append(s)
    for (device_id, name), segs in by_device.items():
        for i, s in enumerate(segs):
            _figures(s, started_here=i > 0)
            upto = segs[i + 1].start if i + 1 < len(segs) else until
            mine = [d for d in deployments if d["device_id"] == device_id and d["model"] == name
                    and d["version"] == s.version and s.start - 1.0 <= d["ts"] <= upto + 1.0]
            s.outcomes = [{k: d[k] for k in ("ts", "ts_iso", "deployment_id", "result", "reason")} for d in mine]
            if mine:
                s.outcome = mine[-1]["result"]
            elif any(d["device_id"] == device_id and d["model"] == name and d["result"] == "rolled_back"
                     and d["restored_version"] == s.version and abs(d["ts"] - s.start) <= 1.0 for d in deployments):
                s.outcome = "restored"
    # What ran: a time when no version served (the first download) is left out, and so is a version with
    # neither telemetry nor an outcome.
    segments = [s for s in segments if s.version is not None and (s.series or s.outcomes or s.outcome)]
    devices_shown = {s.device_id for s in segments} | {d["device_id"] for d in deployments}
    return History(since, until, {d: known.get(d, []) for d in sorted(devices_shown)}, segments, deployments,
                   store.target, store.schema_version())


def _figures(s: Segment, *, started_here: bool) -> None:
    """Fill a segment's figures from its samples. `started_here`: the version was activated inside the range,
    so its counters started from zero at the segment's start."""
    series = s.series
    s.samples = sum(x.samples for x in series)
    if not series:
        return
    prev_count = 0 if started_here else (series[0].count or 0)
    prev_errors = 0 if started_here else (series[0].errors or 0)
    requests = errors = 0
    for x in series:
        if x.count is None or x.errors is None:
            continue
        dc = x.count - prev_count if x.count >= prev_count else x.count
        de = x.errors - prev_errors if x.errors >= prev_errors else x.errors
        requests += dc
        errors += de
        x.error_rate = de / dc if dc > 0 else None
        prev_count, prev_errors = x.count, x.errors
    s.requests, s.errors = requests, errors
    s.error_rate = errors / requests if requests else None
    p50 = [x.p50_ms for x in series if x.p50_ms is not None]
    p95 = [x.p95_ms for x in series if x.p95_ms is not None]
    cpu = [x.cpu_percent for x in series if x.cpu_percent is not None]
    rss = [x.rss_bytes for x in series if x.rss_bytes is not None]
    drift = [x.drift for x in series if x.drift is not None]
    s.p50_ms = round(statistics.median(p50), 3) if p50 else None
    s.p95_ms = round(statistics.median(p95), 3) if p95 else None
    s.p95_max_ms = round(max(p95), 3) if p95 else None
    s.cpu_percent = round(statistics.fmean(cpu), 2) if cpu else None
    s.rss_mb = round(statistics.fmean(rss) / 1e6, 1) if rss else None
    s.rss_max_mb = round(max(rss) / 1e6, 1) if rss else None
    s.drift = round(max(drift), 4) if drift else None
