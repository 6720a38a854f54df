"""`edgectl broker check`'s logic against a stand-in broker: what none of the engines the suite runs
does (no retained messages at all, a refused payload, no MQTT version accepted), the judging of
limits, and the cleanup of every retained probe. The real engines, RabbitMQ 3.10 without retained
messages on wildcard subscriptions among them, are in tests/integration/test_broker_check.py."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from edgefleet.converter.fleet.brokercheck import (
    AGENT_SUBSCRIPTIONS,
    CHUNK_WINDOW,
    Checker,
    judge_payload,
    judge_subscriptions,
)
from edgefleet.errors import TransportError, UsageError
from edgefleet.protocol import Topics
from edgefleet.transport import Message, MqttSettings

T = Topics("edgefleet")


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic filter matching ('+' one level, '#' the rest)."""
    f, t = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


class StandIn:
    """An in-memory broker whose behaviour the test chooses."""

    def __init__(self, *, versions: tuple[str, ...] = ("5", "3.1.1"), max_subscriptions: int | None = None,
                 max_payload: int | None = None, persistent: bool = True) -> None:
        self.versions = versions
        self.max_subscriptions = max_subscriptions
        self.max_payload = max_payload
        self.persistent = persistent
        self.retained: dict[str, bytes] = {}
        self.sessions: list[StandInSession] = []

    def open(self, settings: MqttSettings) -> StandInSession:
        if settings.protocol not in self.versions:
            raise TransportError(f"broker {settings.url} refused the connection: Unsupported protocol version")
        session = StandInSession(self)
        self.sessions.append(session)
        return session

    def route(self, topic: str, payload: bytes, retain: bool) -> None:
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        for s in self.sessions:
            if not s.closed and any(matches(f, topic) for f in s.filters):
                s.inbox.append(Message(topic, payload, False, 1))

    def restart(self) -> None:
        if not self.persistent:
            self.retained.clear()


class StandInSession:
    def __init__(self, broker: StandIn) -> None:
        self.broker = broker
        self.filters: list[str] = []
        self.inbox: list[Message] = []
        self.closed = False

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        assert not self.closed
        if self.broker.max_payload is not None and len(payload) > self.broker.max_payload:
            self.closed = True
            raise TransportError("the broker closed the connection")
        self.broker.route(topic, payload, retain)

    def subscribe(self, topic_filter: str) -> None:
        limit = self.broker.max_subscriptions
        if limit is not None and len(self.filters) >= limit:
            raise TransportError(f"broker refused the subscription {topic_filter}: Unspecified error")
        self.filters.append(topic_filter)
        for topic, payload in self.broker.retained.items():
            if matches(topic_filter, topic):
                self.inbox.append(Message(topic, payload, True, 1))

    def settle(self) -> None:
        """Everything is delivered at once here."""

    def wait_for(self, topic: str, timeout: float,
                 match: Callable[[Message], bool] = lambda m: True) -> Message | None:
        return next((m for m in self.inbox if m.topic == topic and match(m)), None)

    def close(self) -> None:
        self.closed = True


def run(broker: StandIn, **kwargs: object) -> Checker:
    return Checker(MqttSettings(url="mqtt://stand-in:1883"), T, broker.open, timeout=0.1, **kwargs)  # type: ignore[arg-type]


def probes_left(broker: StandIn) -> list[str]:
    return [t for t in broker.retained if t.startswith("edgefleet/sync/")]


def test_a_conforming_broker_passes_and_keeps_no_probe() -> None:
    broker = StandIn()
    report = run(broker).check()
    assert report.ok
    verdicts = {f.check: f.verdict for f in report.findings}
    assert verdicts == {"MQTT versions": "ok", "retained on wildcard": "ok", "QoS 1 subscriptions": "ok",
                        "max payload": "ok", "retained after restart": "skip", "device ACL": "skip"}
    assert report.finding("QoS 1 subscriptions").value == "at least 128 (none refused)"
    assert report.finding("max payload").value == "4 MiB accepted (the largest tried)"
    assert probes_left(broker) == [] and report.leftovers == ()
    assert report.protocol == "5"


def test_a_broker_without_retained_messages_is_told_apart() -> None:
    class NoRetain(StandIn):
        def route(self, topic: str, payload: bytes, retain: bool) -> None:
            super().route(topic, payload, False)

    report = run(NoRetain()).check()
    assert report.finding("retained on wildcard").value == "no retained message delivered at all"
    assert not report.ok


def test_a_subscription_limit_is_measured_and_judged() -> None:
    report = run(StandIn(max_subscriptions=63)).check()  # NATS's limit per session
    found = report.finding("QoS 1 subscriptions")
    assert found.verdict == "ok"  # chunk subscriptions are QoS 0 and the download window adapts
    assert found.value == "63 granted, subscription 64 refused (Unspecified error)"
    assert "download window shrinks to what the broker grants" in found.meaning
    assert report.ok
    assert judge_subscriptions(AGENT_SUBSCRIPTIONS + 1, "refused", 128).verdict == "ok"
    assert judge_subscriptions(AGENT_SUBSCRIPTIONS + CHUNK_WINDOW, "refused", 128).verdict == "ok"
    assert judge_subscriptions(AGENT_SUBSCRIPTIONS, "refused", 128).verdict == "fail"


def test_the_payload_probe_stops_at_the_first_refusal() -> None:
    broker = StandIn(max_payload=300 << 10)
    report = run(broker).check()
    found = report.finding("max payload")
    assert found.verdict == "warn"
    assert found.value == "256 KiB accepted; 1 MiB refused (the broker closed the connection)"
    assert probes_left(broker) == []
    assert judge_payload(16 << 10, "64 KiB refused").verdict == "fail"


def test_only_3_1_1_is_a_warning_and_the_other_checks_use_it() -> None:
    report = run(StandIn(versions=("3.1.1",))).check()
    found = report.finding("MQTT versions")
    assert found.verdict == "warn"
    assert found.value == "3.1.1 only (5: refused the connection: Unsupported protocol version)"
    assert report.protocol == "3.1.1" and report.ok


def test_a_broker_that_accepts_no_version_is_one_usage_error() -> None:
    with pytest.raises(UsageError, match=r"^cannot use the broker mqtt://stand-in:1883: refused the connection: "
                                         r"Unsupported protocol version$"):
        run(StandIn(versions=())).check()


@pytest.mark.parametrize(("persistent", "verdict"), [(True, "ok"), (False, "fail")])
def test_the_restart_marker_is_left_then_found_and_cleared(persistent: bool, verdict: str) -> None:
    broker = StandIn(persistent=persistent)
    before = run(broker, restart="before").check()
    assert before.finding("retained after restart").value == "marker left"
    assert probes_left(broker) == ["edgefleet/sync/edgectl-broker-check/restart"]
    broker.restart()
    after = run(broker, restart="after").check()
    assert after.finding("retained after restart").verdict == verdict
    assert after.ok is persistent
    assert probes_left(broker) == []
