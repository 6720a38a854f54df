"""A soak: steady API load from several clients while the model is updated twice and rolled back once.

Clients send paced requests (JSON and npy, each client its own connection) at a fixed total rate; the
operator's three switches happen at a quarter, half and three quarters of the run through the admin
API. Every request must succeed; latency is reported over the whole run and inside the switch windows
(from the admin call to one second after it returned), with the agent's RSS at the start and the end.
Used by tests/e2e/test_soak.py (about half a minute) and bench/reliability.py (short and 10-minute profiles).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from edgefleet.agent.api.client import ApiClient
from edgefleet.testing.reliability import AgentWith, X, build_bundle
from edgefleet.testing.waiting import wait_for

SWITCH_TAIL_S = 1.0


@dataclass
class SoakReport:
    """What a soak measured."""

    seconds: float = 0.0
    requests: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    switch_latencies_ms: list[float] = field(default_factory=list)
    steady_latencies_ms: list[float] = field(default_factory=list)
    """Latencies outside the switch windows (the baseline of the switch figures)."""
    switches: list[tuple[str, float, float, str]] = field(default_factory=list)
    """(what, start, end, outcome) of every model switch, in seconds from the start."""
    versions: Counter[int] = field(default_factory=Counter)
    rss_start: int = 0
    rss_end: int = 0

    def quantile(self, q: float, switch: bool | None = None) -> float:
        """Latency quantile in ms: over the whole run, or only inside (True) or outside (False) the switches."""
        values = self.latencies_ms if switch is None else self.switch_latencies_ms if switch else \
            self.steady_latencies_ms
        return float(np.percentile(values, q)) if values else float("nan")

    def summary(self) -> str:
        """The figures, one line each."""
        rate = self.requests / self.seconds if self.seconds else 0.0
        switches = "; ".join(f"{w} at {s:.1f}-{e:.1f} s: {o}" for w, s, e, o in self.switches)
        return "\n".join([
            f"soak: {self.requests} requests in {self.seconds:.0f} s ({rate:.1f}/s), {self.failed} failed "
            f"{dict(self.errors) if self.errors else ''}",
            f"soak: latency p50 {self.quantile(50):.2f} ms, p99 {self.quantile(99):.2f} ms overall; p99 during the "
            f"switches {self.quantile(99, True):.2f} ms over {len(self.switch_latencies_ms)} requests, "
            f"{self.quantile(99, False):.2f} ms outside them",
            f"soak: switches: {switches}",
            f"soak: versions answered {dict(sorted(self.versions.items()))}",
            f"soak: agent RSS {self.rss_start / 2**20:.1f} MiB at the start, {self.rss_end / 2**20:.1f} MiB at the end "
            f"({(self.rss_end - self.rss_start) / 2**20:+.1f} MiB)",
        ])


def soak(agent: AgentWith, updates: list[Path], *, seconds: float, rate: float = 50.0, clients: int = 5,
         progress: Callable[[str], None] | None = None) -> SoakReport:
    """Load the running `agent` (serving model "m") for `seconds`; install `updates[0]`, `updates[1]` and
    roll back at 1/4, 1/2 and 3/4 of the run."""
    assert agent.proc is not None
    report = SoakReport()
    proc = psutil.Process(agent.proc.pid)
    stop = threading.Event()
    lock = threading.Lock()
    samples: list[tuple[float, float, bool, int | None, str]] = []
    started = time.monotonic()

    def client(i: int) -> None:
        period = clients / rate
        api = ApiClient(socket_path=str(agent.socket), timeout=30)
        x = np.array(X, dtype=np.float32)
        next_at = started + i * period / clients
        while not stop.is_set():
            wait = next_at - time.monotonic()
            if wait > 0 and stop.wait(wait):
                break
            next_at += period
            t0 = time.monotonic()
            ok, version, error = True, None, ""
            try:
                if i % 2:
                    api.predict_npy("m", x)
                    version = api.last_version
                else:
                    version = int(api.predict("m", X)["edgefleet"]["model_version"])
            except Exception as err:  # every failure is counted, whatever raised it
                ok, error = False, f"{type(err).__name__}: {str(err)[:80]}"
            with lock:
                samples.append((t0 - started, (time.monotonic() - t0) * 1e3, ok, version, error))
        api.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True, name=f"soak-{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    admin = ApiClient(socket_path=str(agent.socket), timeout=600)
    stop.wait(min(2.0, seconds / 10))  # warm: connections open, first requests served
    report.rss_start = proc.memory_info().rss
    plan = [(f"install {p.name}", p) for p in updates[:2]] + [("rollback", None)]
    for k, (what, bundle) in enumerate(plan, start=1):
        stop.wait(max(0.0, started + seconds * k / 4 - time.monotonic()))
        t0 = time.monotonic() - started
        try:
            answer = admin.admin("install", {"path": str(bundle)}) if bundle else admin.admin("rollback", {"model": "m"})
            outcome = f"{answer.get('phase')} v{answer.get('version')}"
        except Exception as err:  # reported with the figures; the test asserts on it
            outcome = f"failed: {err}"
        report.switches.append((what, t0, time.monotonic() - started, outcome))
        if progress is not None:
            progress(f"soak: {what}: {outcome}")
    stop.wait(max(0.0, started + seconds - time.monotonic()))
    stop.set()
    for thread in threads:
        thread.join(60)
    report.rss_end = proc.memory_info().rss
    report.seconds = time.monotonic() - started
    windows = [(s, e + SWITCH_TAIL_S) for _, s, e, _ in report.switches]
    for t, ms, ok, version, error in samples:
        report.requests += 1
        if not ok:
            report.failed += 1
            report.errors[error] += 1
            continue
        report.latencies_ms.append(ms)
        if version is not None:
            report.versions[version] += 1
        if any(s <= t <= e for s, e in windows):
            report.switch_latencies_ms.append(ms)
        else:
            report.steady_latencies_ms.append(ms)
    return report


def soak_fresh_agent(work: Path, *, seconds: float, rate: float = 50.0,
                     progress: Callable[[str], None] | None = None) -> tuple[SoakReport, bool]:
    """Start a real agent in `work` serving a committed v1 of model "m", soak it through v2, v3 and a
    rollback; return the report and whether the agent was still running at the end."""
    agent = AgentWith(work / "agent", health={"probation_s": 3, "min_requests": 5})
    assert agent.cli("install", str(build_bundle(work / "v1", "dense_f32", version=1))).returncode == 0
    updates = [build_bundle(work / "v2", "dense_f32_v2", version=2), build_bundle(work / "v3", "dense_f32", version=3)]
    agent.start()
    try:
        agent.client.predict("m", [[0.0] * 8])
        wait_for(lambda: agent.client.admin("status")["state"]["models"]["m"]["phase"] == "COMMITTED", timeout=60,
                 what="v1 committed")
        report = soak(agent, updates, seconds=seconds, rate=rate, progress=progress)
        return report, agent.proc is not None and agent.proc.poll() is None
    finally:
        agent.kill()
