"""What third-party tools see of an agent over MQTT: the plain availability topic, the will, and Home
Assistant discovery checked by Home Assistant's own code (tests/support/homeassistant_env.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.config import parse_config
from edgefleet.agent.telemetry.homeassistant import Discovery, object_key
from edgefleet.errors import ConfigError, ProtocolError
from edgefleet.protocol import Status, Telemetry, Topics, parse_json
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.broker import Inbox
from edgefleet.transport import MqttSettings, Transport

T = Topics()
HA = "homeassistant"


def watch(url: str, *topics: str) -> tuple[Transport, Inbox]:
    inbox = Inbox()
    t = Transport(MqttSettings(url=url), on_message=inbox)
    t.subscribe(list(topics))
    t.start()
    assert t.wait_connected(5)
    return t, inbox


def retained(url: str, pattern: str, settle: float = 0.5) -> dict[str, bytes]:
    """The retained messages under `pattern` now (a fresh subscription gets each once)."""
    t, inbox = watch(url, pattern)
    try:
        got = {m.topic: m.payload for m in inbox.quiet(settle) if m.payload}
    finally:
        t.stop()
    return got


def test_discovery_topics_and_object_ids() -> None:
    d = Discovery(T, "dev-1", "1.2.3")
    topics = [t for t, _ in d.messages(["m", "cls.v2"])]
    assert len(topics) == len(set(topics))
    assert "homeassistant/sensor/dev-1/model_cls_2e_v2_p95/config" in topics
    assert object_key("a.b") != object_key("a_b")
    route = T.parse(T.availability("dev-1"))
    assert (route.kind, route.device) == ("availability", "dev-1")
    with pytest.raises(ProtocolError, match="object id"):
        Topics.discovery(HA, "sensor", "dev-1", "a.b")
    with pytest.raises(ProtocolError, match="prefix"):
        Topics.discovery("home/#", "sensor", "dev-1", "cpu")
    # a '.' is refused in every device id (some brokers split topics there), discovery or not
    for text in ('device_id = "board.lab"\n[homeassistant]\ndiscovery = true\n', 'device_id = "board.lab"\n'):
        with pytest.raises(ConfigError, match="device_id: 'board.lab' must be 1-64 letters, digits, '_' or '-'"):
            parse_config(text)


def test_availability_will_and_discovery_off_by_default(broker: Any, tmp_path: Path) -> None:
    a = AgentProcess(tmp_path / "a", mqtt={"url": broker.url})
    w, inbox = watch(broker.url, T.availability("dev-1"), T.status("dev-1"))
    try:
        a.start()
        assert inbox.topic(T.availability("dev-1"), 10).payload == b"online"
        online = Status.from_dict(parse_json(inbox.wait_for(
            lambda m: m.topic == T.status("dev-1") and b'"online"' in m.payload).payload))
        assert online.ts > 0
        inbox.seen.clear()
        a.kill()  # SIGKILL: no clean disconnect, so the broker publishes the will
        will = inbox.wait_for(lambda m: m.topic == T.status("dev-1"), timeout=30)
        doc = parse_json(will.payload)
        assert doc["status"] == "offline" and "ts" not in doc  # not a start time older than the `online`
        assert Status.from_dict(doc).ts == 0.0
    finally:
        w.stop()
    assert not [t for t in retained(broker.url, "homeassistant/#")]  # discovery is off unless switched on
    a.start()
    try:
        w, inbox = watch(broker.url, T.availability("dev-1"))
        assert inbox.wait_for(lambda m: m.payload == b"online", 10)
        w.stop()
        a.stop()  # a clean stop: `offline` on both topics, retained
        assert retained(broker.url, T.availability("dev-1"))[T.availability("dev-1")] == b"offline"
        assert parse_json(retained(broker.url, T.status("dev-1"))[T.status("dev-1")])["status"] == "offline"
    finally:
        a.kill()


@pytest.mark.timeout(2400)  # the first run installs Home Assistant into .cache/ (a few minutes)
def test_home_assistant_accepts_every_discovery_message(broker: Any, make_bundle: Any, tmp_path: Path) -> None:
    from tests.support.homeassistant_env import validate

    a = AgentProcess(tmp_path / "a", device_id="board-7", mqtt={"url": broker.url},
                     telemetry={"interval_s": 0.5}, homeassistant={"discovery": True})
    w, inbox = watch(broker.url, T.telemetry("board-7"))
    try:
        assert a.cli("install", str(make_bundle("dense_f32", version=2))).returncode == 0
        a.start()
        for _ in range(20):
            a.client.predict("m", [[0.0] * 8])
        # a model installed while connected is announced with the next telemetry
        assert a.client.install_bundle(make_bundle("dense_f32", name="cls.v2", version=1))
        a.client.predict("cls.v2", [[0.0] * 8])
        deadline = time.monotonic() + 15
        while True:
            doc = inbox.wait_for(lambda m: m.topic == T.telemetry("board-7"), 10)
            inbox.seen.clear()
            t = Telemetry.from_dict(parse_json(doc.payload))
            by_name = {m.name: m for m in t.models}
            if {"m", "cls.v2"} <= set(by_name) and by_name["m"].p95_ms is not None and by_name["m"].count >= 20:
                break
            assert time.monotonic() < deadline, t
        busy = doc.payload
        configs = retained(broker.url, "homeassistant/#")
        online_pair = (retained(broker.url, T.availability("board-7"))[T.availability("board-7")],
                       retained(broker.url, T.status("board-7"))[T.status("board-7")])
    finally:
        w.stop()
        a.kill()
    will_pair = (online_pair[0], retained(broker.url, T.status("board-7"))[T.status("board-7")])

    expected = Discovery(T, "board-7", t.agent_version, telemetry_interval_s=0.5).messages(["m", "cls.v2"])
    assert configs == dict(expected)  # exactly these, retained, nothing stale or extra
    idle = json.dumps({**json.loads(busy), "models": [], "channel": None, "temperature_c": None}).encode()
    idle = json.dumps({k: v for k, v in json.loads(idle).items() if v is not None}).encode()
    answer = validate(expected, [busy, idle], status=[online_pair[1], will_pair[1]],
                      availability=[online_pair[0], will_pair[0]])
    assert answer["problems"] == []
    rendered = answer["rendered"]

    def value(key: str, which: int = 0) -> str:
        return str(rendered[Topics.discovery(HA, "sensor" if key not in ("insecure", "channel_stale") else
                                             "binary_sensor", "board-7", key)][which])

    m = by_name["m"]
    assert float(value("model_m_p95")) == m.p95_ms and float(value("model_m_requests")) == m.count
    assert float(value("model_m_errors")) == m.errors == 0 and value("model_m_phase") == m.phase
    assert value("model_m_version") == "2" and value("model_cls_2e_v2_version") == "1"
    assert float(value("rss")) == t.rss_bytes and float(value("cpu")) == t.cpu_percent
    assert value("insecure") == "ON"  # AgentProcess runs without keys
    assert value("channel_stale") == "None" and value("channel_age") == "None"  # no signed timestamp yet
    assert value("model_m_p95", 1) == "None"  # a model missing from a sample is unknown, not 0
    assert value("temperature", 1) == "None"
    # online while connected; after the crash the will alone makes every entity unavailable
    assert all(v == [True, False] for v in answer["available"].values()), answer["available"]
