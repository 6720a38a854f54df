"""Input drift end to end: a bundle carrying a drift reference, a real agent on a real Mosquitto, traffic
from the calibration distribution (no DRIFT event) and shifted traffic (a DRIFT event naming the input,
its score in telemetry, /metrics and status), then the recovery event when the traffic comes back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.bundle import Bundle
from edgefleet.drift import load_reference
from edgefleet.protocol import Event, Telemetry, Topics, parse_json


def _drift_events(messages: list[Any], topic: str) -> list[Event]:
    events = [Event.from_dict(parse_json(m.payload)) for m in messages if m.topic == topic]
    return [e for e in events if e.kind == "DRIFT"]


def _is_drift(topic: str, ok: bool, input_name: str | None = None) -> Any:
    def match(m: Any) -> bool:
        found = _drift_events([m], topic)
        return bool(found) and found[0].ok is ok and input_name in (None, found[0].details.get("input"))
    return match


def test_shift_raises_drift_and_in_distribution_traffic_does_not(broker: Any, make_bundle: Any, tmp_path: Path) -> None:
    from edgefleet.testing.agentproc import AgentProcess
    from edgefleet.testing.broker import Inbox
    from edgefleet.transport import MqttSettings, Transport

    rng = np.random.default_rng(5)
    calibration = rng.normal(size=(2000, 1, 8)).astype(np.float32)
    path = make_bundle("dense_f32", version=1, reference_inputs=[calibration],
                       reference_source={"samples": {"calibration": 2000}})
    bundle = Bundle.load(path)
    reference = load_reference(bundle.golden)
    assert reference is not None and reference.samples == 2000
    input_name = reference.inputs[0].name

    inbox = Inbox()
    t = Topics()
    watcher = Transport(MqttSettings(url=broker.url), on_message=inbox)
    watcher.subscribe(t.events("dev-1"))
    watcher.subscribe(t.telemetry("dev-1"))
    watcher.start()
    a = AgentProcess(tmp_path / "a", mqtt={"url": broker.url}, telemetry={"interval_s": 0.5},
                     drift={"sample_rate": 0.5, "window": 200, "min_samples": 100, "threshold": 0.25})
    try:
        assert a.cli("install", str(path)).returncode == 0
        a.start()

        def traffic(n: int, transform: Any) -> None:
            for x in transform(rng.normal(size=(n, 8)).astype(np.float32)):
                a.client.predict("m", [x.tolist()])
                time.sleep(0.004)  # a steady stream, not a burst the bounded sample queue would drop

        def telemetry_after(ts: float) -> Telemetry:
            def fresh(m: Any) -> bool:
                return m.topic == t.telemetry("dev-1") and parse_json(m.payload)["ts"] > ts
            return Telemetry.from_dict(parse_json(inbox.wait_for(fresh, 10).payload))

        traffic(500, lambda x: x)  # about the window's worth of samples, in distribution
        time.sleep(1.0)  # the loop bins every tick (0.2 s)
        calm = telemetry_after(time.time())
        drift = calm.models[0].drift
        assert drift is not None and drift.samples >= 100
        assert drift.inputs[input_name] is not None and drift.inputs[input_name] < 0.1
        assert drift.outputs is not None and drift.outputs < 0.1 and drift.drifting == ()
        inbox.quiet(0.5)
        assert _drift_events(inbox.seen, t.events("dev-1")) == []

        traffic(300, lambda x: x * 0.5 + 0.3)  # the camera moved: scaled and offset
        event = inbox.wait_for(_is_drift(t.events("dev-1"), False, input_name), 10)
        raised = _drift_events([event], t.events("dev-1"))[0]
        assert raised.model == "m" and raised.version == 1 and input_name in (raised.reason or "")
        assert raised.deployment_id is None  # not a deployment's step: rollout trackers ignore it
        assert raised.details["psi"] >= 0.25 and raised.details["samples"] >= 100
        shifted = telemetry_after(raised.ts)
        assert shifted.models[0].drift is not None
        assert shifted.models[0].drift.inputs[input_name] >= 0.25  # type: ignore[operator]
        assert input_name in shifted.models[0].drift.drifting
        drifted = [e for e in _drift_events(inbox.seen, t.events("dev-1")) if not e.ok]
        assert {e.details["input"] for e in drifted if e.details["input"]} == {input_name}
        assert len([e for e in drifted if e.details["input"] == input_name]) == 1  # one event per crossing
        metrics = a.client.metrics()
        line = next(ln for ln in metrics.splitlines()
                    if ln.startswith(f'edgefleet_drift_psi{{device="dev-1",model="m",input="{input_name}"}}'))
        assert float(line.split()[-1]) >= 0.25
        status = a.cli("status")
        assert status.returncode == 0 and "DRIFTING" in status.stdout and input_name in status.stdout

        traffic(600, lambda x: x)  # back in distribution: the window forgets the shift
        back = inbox.wait_for(_is_drift(t.events("dev-1"), True, input_name), 10)
        recovered = _drift_events([back], t.events("dev-1"))[0]
        assert recovered.details["psi"] < 0.2
    finally:
        a.kill()
        watcher.stop()
