"""Inference statistics on the hot path: a bounded latency window, counters, and invocations in flight.

Recording is a handful of stores into preallocated arrays under one lock (under a microsecond),
so it can sit around every invoke. Percentiles are computed only when someone asks (telemetry,
probation, /metrics), from the most recent `capacity` samples.
"""

from __future__ import annotations

import threading
import time
from array import array
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

# One clock for everything here: on Linux time.monotonic and time.perf_counter are the same
# CLOCK_MONOTONIC, with nanosecond resolution, and watchdogs compare against time.monotonic().
_now = time.monotonic

DEFAULT_CAPACITY = 4096
_MARKS = 64

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
)
"""Upper bounds (seconds, inclusive) of the cumulative latency histogram on /metrics: from a tiny model
on a desktop core (~10 µs) to a large one on a slow board (seconds); one more bucket counts the rest."""


@dataclass(frozen=True)
class StatsSnapshot:
    """Counts and latency quantiles over a window (all latency figures None when there were no samples)."""

    count: int
    errors: int
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    window_s: float | None = None

    @property
    def error_rate(self) -> float:
        """Errors over invocations, 0 when there were none."""
        return self.errors / self.count if self.count else 0.0


class LatencyWindow:
    """A fixed-size ring of (end time, duration, ok) samples plus totals; thread-safe, ~1 µs per sample.

    A sample is two adjacent doubles, (end, duration), with a failed invocation's end time stored
    negated (monotonic time is always positive): one cache line per write. After a large invoke has
    flushed the CPU caches every line touched here is a miss, which is what a sample really costs.
    """

    __slots__ = ("capacity", "_mask", "_ring", "count", "errors", "total_s", "created", "_marks", "_lock", "buckets")

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1 or capacity & (capacity - 1):
            raise ValueError("capacity must be a power of two")
        self.capacity = capacity
        self._mask = capacity - 1
        self._ring = array("d", bytes(16 * capacity))
        self.count = 0
        self.errors = 0
        self.total_s = 0.0
        self.created = _now()
        # (time, count, errors) whenever someone took a snapshot: the base of windowed counts once more
        # samples ended in a window than the ring holds, at no cost on the hot path
        self._marks: deque[tuple[float, int, int]] = deque(maxlen=_MARKS)
        self._lock = threading.Lock()
        self.buckets = array("Q", bytes(8 * (len(LATENCY_BUCKETS_S) + 1)))
        """Invocations per latency bucket since creation (not cumulative; the last is above every bound)."""

    def add(self, duration_s: float, ok: bool, end: float) -> None:
        """Store one sample that ended at `end` (monotonic seconds); thread-safe."""
        with self._lock:
            self.add_serialised(duration_s, ok, end)

    def add_serialised(self, duration_s: float, ok: bool, end: float) -> None:
        """`add` for a caller that already serialises every writer of this window (the hot path).

        Readers need no such care: a snapshot taken during the write sees at most one stale sample.
        """
        i = (self.count & self._mask) << 1
        ring = self._ring
        ring[i + 1] = duration_s
        if ok:
            ring[i] = end
        else:
            ring[i] = -end
            self.errors += 1
        self.total_s += duration_s
        self.buckets[bisect_left(LATENCY_BUCKETS_S, duration_s)] += 1  # one C-level search: ~0.1 µs
        self.count += 1  # last: a concurrent reader never counts a slot that is not written yet

    def samples(self) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
        """Copies of the retained (end times, durations, ok flags), oldest first."""
        with self._lock:
            count = self.count
            ring = np.frombuffer(self._ring, dtype=np.float64).reshape(-1, 2).copy()
        if count > self.capacity:
            i = count & self._mask
            ring = np.concatenate((ring[i:], ring[:i]))
        else:
            ring = ring[:count]
        signed = ring[:, 0]
        return np.abs(signed), ring[:, 1].copy(), signed > 0

    def snapshot(self, window_s: float | None = None, *, now: float | None = None) -> StatsSnapshot:
        """Count, errors and latency quantiles of the samples that ended in the last `window_s` seconds.

        With no window: totals since creation, quantiles of every retained sample. Quantiles come from
        the most recent `capacity` samples. When more invocations ended in the window than the ring
        holds, count and errors are counted from the latest snapshot taken at or before the window's
        start (a periodic caller gets exact figures), or from creation.
        """
        t = _now() if now is None else now
        with self._lock:
            count, errors = self.count, self.errors
            self._marks.append((t, count, errors))
        ends, durations, ok = self.samples()
        if window_s is None:
            window_count, window_errors = count, errors
        else:
            since = t - window_s
            ring_covers = count <= self.capacity or (len(ends) > 0 and ends[0] < since)
            sel = ends >= since
            ends, durations, ok = ends[sel], durations[sel], ok[sel]
            if ring_covers:
                window_count, window_errors = len(durations), int((~ok).sum())
            else:
                base_count, base_errors = 0, 0
                for mark_t, mark_count, mark_errors in self._marks:
                    if mark_t <= since:
                        base_count, base_errors = mark_count, mark_errors
                window_count, window_errors = count - base_count, errors - base_errors
        if len(durations) == 0:
            return StatsSnapshot(count=window_count, errors=window_errors, window_s=window_s)
        ms = durations * 1000.0
        p50, p95, p99 = np.percentile(ms, (50, 95, 99))
        return StatsSnapshot(
            count=window_count, errors=window_errors, p50_ms=float(p50), p95_ms=float(p95),
            p99_ms=float(p99), max_ms=float(ms.max()), window_s=window_s,
        )


    def histogram(self) -> tuple[list[int], float]:
        """Cumulative counts per bound of LATENCY_BUCKETS_S plus +Inf, and the sum of durations.

        The +Inf count is the sum of the buckets themselves, so it always equals the histogram's
        count, even when read while a sample is being written.
        """
        with self._lock:
            counts = self.buckets.tolist()
            total = self.total_s
        cumulative, running = [], 0
        for n in counts:
            running += n
            cumulative.append(running)
        return cumulative, total


class ModelStats(LatencyWindow):
    """Statistics of one activated model: totals, the latency window, and invocations in flight.

    `started[slot]` holds the start time of the invocation running on interpreter `slot` (0.0 when
    idle); the serving path writes it directly, which costs one store, and a watchdog reads it.
    """

    __slots__ = ("started",)

    def __init__(self, capacity: int = DEFAULT_CAPACITY, slots: int = 1) -> None:
        super().__init__(capacity)
        self.started: list[float] = [0.0] * slots

    def begin(self, slot: int = 0) -> float:
        """Mark an invocation on interpreter `slot` as started; return its start time."""
        t0 = _now()
        self.started[slot] = t0
        return t0

    def end(self, t0: float, ok: bool, slot: int = 0) -> float:
        """Mark the invocation on `slot` that began at `t0` finished, and record it; return its duration."""
        t1 = _now()
        self.started[slot] = 0.0
        self.add(t1 - t0, ok, t1)
        return t1 - t0

    def record(self, duration_s: float, ok: bool, *, end: float | None = None) -> None:
        """Count one invocation of `duration_s` seconds that succeeded (`ok`) or failed."""
        self.add(duration_s, ok, _now() if end is None else end)

    def in_flight(self) -> list[float]:
        """Start times (time.monotonic) of invocations running now; an old one is a hung invoke."""
        return sorted(t for t in list(self.started) if t)

    def oldest_in_flight_s(self, now: float | None = None) -> float | None:
        """Age in seconds of the oldest invocation still running, or None when none is."""
        running = self.in_flight()
        if not running:
            return None
        return (_now() if now is None else now) - running[0]
