"""Input drift on real agents (issue 18, "Input drift"): how fast a shift is caught, and that in-distribution
traffic raises nothing.

Two agents (real processes, one real Mosquitto) serve the same bundle, whose drift reference was counted
over 2,000 calibration samples of its input distribution (8 features, standard normal), with the default
`[drift]` settings (10 % sampling, a window of 400 samples, judged from 200, threshold 0.25). Each gets
50 requests/s over its local API:

  1. both get in-distribution traffic for 10 minutes (--quick: 1 minute): every DRIFT event is a false
     alarm (DRIFT_FALSE_ALARMS, goal 0);
  2. then agent A's traffic is shifted (x * 0.5 + 0.3, as after a camera's exposure changed) while B, the
     control, stays in distribution: DRIFT_DETECT_S is the time from the first shifted request to A's
     DRIFT event (goal <= 60), DRIFT_CONTROL_EVENTS the events B raises meanwhile (expected 0).

The baseline in the same run, DRIFT_DETECT_THEORY_S, is the time the window needs in theory: the shifted
samples that must enter a full in-distribution window before its PSI reaches the threshold (found by
feeding the same monitor in this process, sample by sample), divided by the sampled rate (50 x 10 %/s).

Run: .venv/bin/python bench/drift.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edgefleet.agent.config import DriftConfig
from edgefleet.agent.serving.drift import DriftMonitor
from edgefleet.bundle import Bundle
from edgefleet.converter.bundle.writer import BundleSpec, write_bundle
from edgefleet.drift import load_reference
from edgefleet.protocol import Event, Topics, parse_json
from edgefleet.runtime import load_model
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.broker import Mosquitto
from edgefleet.testing.reliability import zoo_model
from edgefleet.transport import Message, MqttSettings, Transport

RATE = 50.0
FALSE_ALARM_S = 600.0
QUICK_FALSE_ALARM_S = 60.0
DETECT_TIMEOUT_S = 180.0
GOALS = {"detect_s": 60.0, "false_alarms": 0}


def shift(x: np.ndarray) -> np.ndarray:
    return x * 0.5 + 0.3


def theory(bundle: Bundle, settings: DriftConfig, sampled_per_s: float) -> tuple[int, float]:
    """Shifted samples a full in-distribution window needs before the score reaches the threshold, and the
    seconds that takes at `sampled_per_s` (median over 5 seeds)."""
    ref = load_reference(bundle.golden)
    assert ref is not None
    model = load_model(bundle.model)
    needed = []
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        monitor = DriftMonitor(ref, model.inputs, model.outputs, [o.name for o in ref.outputs],
                               dataclasses.replace(settings, sample_rate=1.0), seed=seed)
        for _ in range(settings.window):
            x = rng.normal(size=(1, 8)).astype(np.float32)
            monitor.offer([x], model.run([x]))
            monitor.update()
        for k in range(1, 10 * settings.window):
            x = shift(rng.normal(size=(1, 8)).astype(np.float32))
            monitor.offer([x], model.run([x]))
            if any(c.drifted for c in monitor.update()):
                needed.append(k)
                break
    k = int(np.median(needed))
    return k, k / sampled_per_s


class Traffic(threading.Thread):
    """Requests at RATE per second to one agent, in distribution until `shifted` is set."""

    def __init__(self, agent: AgentProcess, seed: int) -> None:
        super().__init__(daemon=True)
        self.agent = agent
        self.rng = np.random.default_rng(seed)
        self.shifted = threading.Event()
        self.shift_started: float | None = None
        self.stop = threading.Event()
        self.sent = 0
        self.errors = 0

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop.is_set():
            x = self.rng.normal(size=(8,)).astype(np.float32)
            if self.shifted.is_set():
                if self.shift_started is None:
                    self.shift_started = time.time()
                x = shift(x)
            try:
                self.agent.client.predict("m", [x.tolist()])
                self.sent += 1
            except Exception:
                self.errors += 1
            next_at += 1.0 / RATE
            time.sleep(max(0.0, next_at - time.monotonic()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_FALSE_ALARM_S:g} s of in-distribution traffic "
                    f"instead of {FALSE_ALARM_S:g}")
    args = ap.parse_args()
    calm_s = QUICK_FALSE_ALARM_S if args.quick else FALSE_ALARM_S
    settings = DriftConfig()
    work = Path(tempfile.mkdtemp(prefix="bench-drift-"))
    rng = np.random.default_rng(1)
    calibration = rng.normal(size=(2000, 1, 8)).astype(np.float32)
    write_bundle(work / "bundle", zoo_model("dense_f32").read_bytes(),
                 BundleSpec(name="m", version=1, golden_inputs=[calibration[:8]], reference_inputs=[calibration],
                            reference_source={"samples": {"calibration": 2000}}))
    bundle = Bundle.load(work / "bundle")
    k, theory_s = theory(bundle, settings, RATE * settings.sample_rate)

    broker = Mosquitto(work / "broker")
    broker.start()
    topics = Topics()
    events: list[tuple[float, Event]] = []
    lock = threading.Lock()

    def on_message(m: Message) -> None:
        event = Event.from_dict(parse_json(m.payload))
        if event.kind == "DRIFT":
            with lock:
                events.append((time.time(), event))

    watcher = Transport(MqttSettings(url=broker.url), on_message=on_message)
    watcher.subscribe(topics.all_devices("events"))
    watcher.start()
    agents = [AgentProcess(work / name, device_id=name, mqtt={"url": broker.url}) for name in ("shifted", "control")]
    traffic: list[Traffic] = []
    try:
        for a in agents:
            assert a.cli("install", str(work / "bundle")).returncode == 0, a.log()
            a.start()
        traffic = [Traffic(a, seed) for seed, a in enumerate(agents)]
        for t in traffic:
            t.start()
        print(f"{len(agents)} agents, {RATE:g} requests/s each, drift defaults: sample_rate {settings.sample_rate:g}, "
              f"window {settings.window}, min_samples {settings.min_samples}, threshold {settings.threshold:g}")
        started = time.time()
        time.sleep(calm_s)
        with lock:
            false_alarms = [e for _, e in events if not e.ok]
        print(f"in distribution for {calm_s:.0f} s on both agents ({sum(t.sent for t in traffic)} requests, "
              f"{sum(t.errors for t in traffic)} failed): {len(false_alarms)} DRIFT event(s)")
        for e in false_alarms:
            print(f"  false alarm on {e.device_id}: {e.reason}")
        traffic[0].shifted.set()
        deadline = time.monotonic() + DETECT_TIMEOUT_S
        detected: tuple[float, Event] | None = None
        while time.monotonic() < deadline and detected is None:
            time.sleep(0.1)
            with lock:
                detected = next(((ts, e) for ts, e in events if e.device_id == "shifted" and not e.ok
                                 and ts >= (traffic[0].shift_started or started + calm_s)), None)
        shift_at = traffic[0].shift_started or time.time()
        with lock:
            control = [e for ts, e in events if e.device_id == "control" and ts >= shift_at and not e.ok]
        if detected is None:
            print(f"shift x*0.5+0.3 on agent 'shifted': NOT detected within {DETECT_TIMEOUT_S:g} s")
            detect = "none"
        else:
            detect = f"{detected[0] - shift_at:.1f}"
            print(f"shift x*0.5+0.3 on agent 'shifted': DRIFT after {detect} s: {detected[1].reason}")
        print(f"in theory (baseline): {k} shifted samples must enter a full window, {theory_s:.1f} s at "
              f"{RATE * settings.sample_rate:g} sampled/s")
        print(f"control agent during the shift: {len(control)} DRIFT event(s)")
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        print(f"DRIFT_DETECT_S={detect} DRIFT_DETECT_THEORY_S={theory_s:.1f} DRIFT_FALSE_ALARMS={len(false_alarms)} "
              f"DRIFT_FALSE_ALARM_S={calm_s:.0f} DRIFT_CONTROL_EVENTS={len(control)}")
        return 0
    finally:
        for t in traffic:
            t.stop.set()
        for a in agents:
            a.kill()
        watcher.stop()
        broker.stop()


if __name__ == "__main__":
    raise SystemExit(main())
