"""Latency window and model statistics: quantiles against numpy, bounded memory, windows, in-flight."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgefleet.agent.serving.stats import LatencyWindow, ModelStats


def test_quantiles_match_numpy_on_the_same_samples() -> None:
    rng = np.random.default_rng(1)
    durations = rng.lognormal(mean=-7, sigma=0.8, size=500)
    stats = ModelStats(capacity=1024)
    for i, d in enumerate(durations):
        stats.record(float(d), True, end=1000.0 + i * 0.01)
    snap = stats.snapshot()
    ms = durations * 1000
    assert snap.count == 500 and snap.errors == 0
    assert snap.p50_ms == pytest.approx(np.percentile(ms, 50))
    assert snap.p95_ms == pytest.approx(np.percentile(ms, 95))
    assert snap.p99_ms == pytest.approx(np.percentile(ms, 99))
    assert snap.max_ms == pytest.approx(ms.max())
    assert stats.total_s == pytest.approx(durations.sum())


def test_window_selects_recent_samples_and_counts_errors() -> None:
    stats = ModelStats(capacity=1024)
    durations = [0.001 * (i + 1) for i in range(100)]
    for i, d in enumerate(durations):
        stats.record(d, ok=i % 10 != 0, end=500.0 + i)  # one sample a second; every 10th fails
    snap = stats.snapshot(window_s=20.5, now=599.0)  # ends 579..599: the last 21 samples
    recent = np.array(durations[79:]) * 1000
    assert snap.count == 21
    assert snap.errors == 2  # samples 80 and 90
    assert snap.p50_ms == pytest.approx(np.percentile(recent, 50))
    assert snap.max_ms == pytest.approx(recent.max())
    assert snap.error_rate == pytest.approx(2 / 21)
    assert stats.count == 100 and stats.errors == 10


def test_ring_is_bounded_and_keeps_the_latest_samples() -> None:
    stats = ModelStats(capacity=64)
    values = np.arange(1, 1001) / 1e4
    for i, d in enumerate(values):
        stats.record(float(d), True, end=float(i))
    ends, durations, ok = stats.samples()
    assert len(durations) == 64 and len(ends) == 64 and ok.all()
    assert np.array_equal(durations, values[-64:])  # oldest first, the last 64
    assert np.all(np.diff(ends) > 0)
    snap = stats.snapshot()
    assert snap.count == 1000  # totals survive the ring
    assert snap.p50_ms == pytest.approx(np.percentile(values[-64:] * 1000, 50))


def test_window_counts_beyond_the_ring_come_from_the_previous_snapshot() -> None:
    stats = ModelStats(capacity=16)
    for i in range(40):
        stats.record(0.001, True, end=10.0 + i * 0.01)
    stats.snapshot(window_s=60.0, now=20.0)  # a periodic caller's previous look
    for i in range(100):
        stats.record(0.002, i < 7, end=21.0 + i * 0.01)
    snap = stats.snapshot(window_s=60.0, now=80.0)  # ring holds 16 samples; 100 ended in the window
    assert snap.count == 100 and snap.errors == 93
    assert snap.p50_ms == pytest.approx(2.0)


def test_empty_window_has_no_quantiles() -> None:
    stats = ModelStats()
    snap = stats.snapshot(window_s=10.0)
    assert (snap.count, snap.errors, snap.p50_ms, snap.p99_ms, snap.max_ms) == (0, 0, None, None, None)
    stats.record(0.5, True, end=1.0)
    assert stats.snapshot(window_s=10.0, now=100.0).p50_ms is None  # the sample is older than the window


def test_capacity_must_be_a_power_of_two() -> None:
    with pytest.raises(ValueError):
        LatencyWindow(1000)


def test_in_flight_shows_a_running_invocation_until_it_ends() -> None:
    stats = ModelStats()
    assert stats.in_flight() == [] and stats.oldest_in_flight_s() is None
    t0 = stats.begin()
    assert stats.in_flight() == [t0]
    age = stats.oldest_in_flight_s(now=t0 + 3.0)
    assert age == pytest.approx(3.0)
    assert t0 <= time.monotonic()  # the watchdog's clock
    duration = stats.end(t0, ok=False)
    assert stats.in_flight() == []
    assert stats.count == 1 and stats.errors == 1 and duration >= 0


def test_concurrent_records_are_all_counted() -> None:
    stats = ModelStats(capacity=256)

    def hammer() -> None:
        for _ in range(5000):
            stats.record(0.001, True)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.count == 20000
    assert stats.snapshot().count == 20000
    assert len(stats.samples()[1]) == 256
