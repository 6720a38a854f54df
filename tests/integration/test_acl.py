"""The shipped broker config (deploy/mosquitto): what a device credential can and cannot do, on a real broker."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.errors import TransportError
from edgefleet.protocol import Topics
from edgefleet.testing.broker import Inbox, Pki, client
from edgefleet.transport import MqttSettings, Transport
from tests.support.broker import OPERATOR, AclBroker, shipped_broker_for

T = Topics("edgefleet")
CHUNK = T.chunk(hashlib.sha256(b"chunk").hexdigest())


@pytest.fixture(scope="module")
def operator_inbox() -> Inbox:
    """Everything the operator sees under the prefix."""
    return Inbox()


@pytest.fixture(scope="module")
def operator(acl_broker: AclBroker, operator_inbox: Inbox) -> Iterator[Transport]:
    """The operator credential, subscribed to the whole prefix."""
    t = client(acl_broker.operator_url, operator_inbox, username=OPERATOR, password=acl_broker.passwords[OPERATOR])
    t.subscribe("edgefleet/#", wait=5)
    yield t
    t.stop()


def device(acl_broker: AclBroker, name: str, inbox: Inbox | None = None, **settings: object) -> Transport:
    """A connection with a device's credential."""
    return client(acl_broker.url, inbox, username=name, password=acl_broker.passwords[name],
                  client_id=f"{name}-{uuid.uuid4().hex[:6]}", **settings)


def assert_refused(settings: MqttSettings, reason: str) -> None:
    """A connection with these settings never comes up, and the transport says `reason`."""
    t = Transport(settings, on_message=lambda m: None)
    t.start()
    try:
        assert not t.wait_connected(1)
        assert t.last_error is not None and reason in t.last_error, t.last_error
    finally:
        t.stop()


def assert_never_delivered(inbox: Inbox, topic: str, payload: bytes, barrier: bytes) -> None:
    """Wait for `barrier` (sent after the attempt on the same connection) and check `payload` came before it never."""
    inbox.wait_for(lambda m: m.payload == barrier)
    assert not [m for m in inbox.seen if m.payload == payload], f"{topic} was delivered"


DENIED_WRITES = {
    "own deployment": T.device_model("dev-a", "m"),
    "group deployment": T.group_model("line-1", "m"),
    "another device's deployment": T.device_model("dev-b", "m"),
    "own command": T.cmd("dev-a"),
    "another device's command": T.cmd("dev-b"),
    "another device's state": T.state("dev-b"),
    "another device's status": T.status("dev-b"),
    "another device's availability": T.availability("dev-b"),
    "another device's events": T.events("dev-b"),
    "another device's logs": T.logs("dev-b"),
    "another device's recent logs": T.logs_recent("dev-b"),
    "a chunk": CHUNK,
}


@pytest.mark.parametrize("topic", DENIED_WRITES.values(), ids=DENIED_WRITES.keys())
def test_device_cannot_publish_outside_its_reports(acl_broker: AclBroker, operator: Transport,
                                                   operator_inbox: Inbox, topic: str) -> None:
    dev = device(acl_broker, "dev-a")
    token, barrier = uuid.uuid4().bytes, uuid.uuid4().bytes
    try:
        with pytest.raises(TransportError, match="Not authorized"):
            dev.publish(topic, token, retain=True, wait=5)
        dev.publish(T.events("dev-a"), barrier, wait=5)
    finally:
        dev.stop()
    assert_never_delivered(operator_inbox, topic, token, barrier)


def test_denied_publish_is_silently_dropped_under_mqtt_3_1_1(acl_broker: AclBroker, operator: Transport,
                                                             operator_inbox: Inbox) -> None:
    dev = device(acl_broker, "dev-a", protocol="3.1.1")
    token, barrier = uuid.uuid4().bytes, uuid.uuid4().bytes
    try:
        dev.publish(T.group_model("line-1", "m"), token, retain=True, wait=5)  # acknowledged, then dropped
        dev.publish(T.events("dev-a"), barrier, wait=5)
    finally:
        dev.stop()
    assert_never_delivered(operator_inbox, "group deployment", token, barrier)


def test_device_may_write_its_own_reports(acl_broker: AclBroker, operator: Transport, operator_inbox: Inbox) -> None:
    dev = device(acl_broker, "dev-a")
    token = uuid.uuid4().hex.encode()
    mine = [T.status("dev-a"), T.availability("dev-a"), T.state("dev-a"), T.events("dev-a"), T.telemetry("dev-a"),
            T.logs("dev-a"), T.logs_recent("dev-a")]
    try:
        for topic in mine:
            dev.publish(topic, token, retain=topic.endswith(("status", "availability", "state")), wait=5)
    finally:
        dev.stop()
    for topic in mine:
        operator_inbox.wait_for(lambda m, t=topic: m.topic == t and m.payload == token)  # type: ignore[misc]


def test_home_assistant_discovery_only_for_the_device_itself(acl_broker: AclBroker) -> None:
    """A device writes the discovery configs of its own node id; Home Assistant, with an operator-listener
    user, reads them (and may announce itself on homeassistant/status)."""
    ha_inbox = Inbox()
    ha = client(acl_broker.operator_url, ha_inbox, username=OPERATOR, password=acl_broker.passwords[OPERATOR])
    ha.subscribe("homeassistant/#", wait=5)
    dev = device(acl_broker, "dev-a")
    own, other = T.discovery("homeassistant", "sensor", "dev-a", "cpu"), T.discovery("homeassistant", "sensor",
                                                                                       "dev-b", "cpu")
    token, barrier = uuid.uuid4().hex.encode(), uuid.uuid4().hex.encode()
    try:
        ha.publish("homeassistant/status", b"online", wait=5)
        with pytest.raises(TransportError, match="Not authorized"):
            dev.publish(other, token, retain=True, wait=5)
        with pytest.raises(TransportError, match="Not authorized"):
            dev.publish("homeassistant/status", token, retain=True, wait=5)
        dev.publish(own, barrier, retain=True, wait=5)
        ha_inbox.wait_for(lambda m: m.topic == own and m.payload == barrier)
        ha_inbox.wait_for(lambda m: m.topic == "homeassistant/status" and m.payload == b"online")
        assert not [m for m in ha_inbox.seen if m.payload == token]
        dev.publish(own, b"", retain=True, wait=5)  # leave no retained config behind for other tests
    finally:
        dev.stop()
        ha.stop()


def test_device_reads_only_its_own_deployments_and_commands(acl_broker: AclBroker, operator: Transport) -> None:
    token = uuid.uuid4().hex.encode()
    readable = [T.device_model("dev-a", "m"), T.group_model("line-1", "m"), CHUNK, T.timestamp()]
    hidden = [T.device_model("dev-b", "m"), T.inventory()]
    for topic in readable + hidden:
        operator.publish(topic, token, retain=True, wait=5)
    inbox = Inbox()
    dev = device(acl_broker, "dev-a", inbox)
    try:
        # Wide subscriptions on purpose: the broker must filter by the ACL, not by what was asked.
        dev.subscribe([*T.all_deployments(), T.all_chunks(), T.all_devices("cmd"), T.timestamp(), T.inventory()],
                      wait=5)
        operator.publish(T.cmd("dev-b"), token, wait=5)
        operator.publish(T.cmd("dev-a"), token, wait=5)  # the barrier: the broker delivers in order
        inbox.wait_for(lambda m: m.topic == T.cmd("dev-a"))
    finally:
        dev.stop()
    got = {m.topic for m in inbox.seen if m.payload == token}
    assert got == {*readable, T.cmd("dev-a")}


def test_device_reads_back_only_its_own_recent_logs(acl_broker: AclBroker) -> None:
    """A restarted agent reads its own retained recent-records document to extend it; another device's stays hidden."""
    token = uuid.uuid4().hex.encode()
    for name in ("dev-a", "dev-b"):
        writer = device(acl_broker, name)
        try:
            writer.publish(T.logs_recent(name), token, retain=True, wait=5)
        finally:
            writer.stop()
    inbox = Inbox()
    dev = device(acl_broker, "dev-a", inbox)
    try:
        dev.subscribe(f"{T.prefix}/devices/+/logs/#", wait=5)  # wide on purpose: the ACL filters
        inbox.topic(T.logs_recent("dev-a"), timeout=5)
        # the barrier (every retained message of the subscription came before it), and nothing left retained
        dev.publish(T.logs_recent("dev-a"), b"", retain=True, wait=5)
        inbox.wait_for(lambda m: m.topic == T.logs_recent("dev-a") and m.payload == b"")
    finally:
        dev.stop()
    assert {m.topic for m in inbox.seen if m.payload == token} == {T.logs_recent("dev-a")}
    cleaner = device(acl_broker, "dev-b")
    cleaner.publish(T.logs_recent("dev-b"), b"", retain=True, wait=5)
    cleaner.stop()


def test_unknown_user_is_refused(acl_broker: AclBroker) -> None:
    assert_refused(MqttSettings(url=acl_broker.url, username="intruder", password="x", reconnect_min_s=0.2,
                                reconnect_max_s=0.4), "refused the connection")


# ---------------------------------------------------------------------- the shipped mosquitto.conf


def test_shipped_mosquitto_conf_serves_tls_passwords_and_large_chunks(tmp_path: Path, pki: Pki) -> None:
    shipped = shipped_broker_for(tmp_path, pki)
    with shipped.broker:
        op = client(shipped.operator_url, username=OPERATOR, password=shipped.passwords[OPERATOR], ca_file=pki.ca_file)
        big = bytes(range(256)) * (4 << 12)  # 4 MiB, far above the 64 KiB default chunk
        op.publish(CHUNK, big, retain=True, wait=10)
        inbox = Inbox()
        dev = client(shipped.url, inbox, username="dev-a", password=shipped.passwords["dev-a"],
                     ca_file=pki.ca_file)
        dev.subscribe(CHUNK, wait=5)
        assert inbox.topic(CHUNK, timeout=10).payload == big
        with pytest.raises(TransportError, match="Not authorized"):
            dev.publish(T.device_model("dev-a", "m"), b"{}", wait=5)
        dev.stop()
        op.stop()
        log = shipped.broker.log()
        assert "Error" not in log
        # Only the two TLS listeners (devices, operators): a listener option misplaced in the global
        # section would open 1883 as well.
        assert log.count("Opening ipv4 listen socket") == 2, log


def test_shipped_mosquitto_conf_with_mutual_tls(tmp_path: Path, pki: Pki) -> None:
    shipped = shipped_broker_for(tmp_path, pki, mutual=True)
    cert, key = pki.issue("dev-a", server=False)
    with shipped.broker:
        dev = client(shipped.url, username="dev-a", password=shipped.passwords["dev-a"], ca_file=pki.ca_file,
                     cert_file=cert, key_file=key)
        dev.publish(T.status("dev-a"), b"online", retain=True, wait=5)
        dev.stop()
        assert_refused(MqttSettings(url=shipped.url, username="dev-a", password=shipped.passwords["dev-a"],
                                    ca_file=pki.ca_file, reconnect_min_s=0.2, reconnect_max_s=0.4),
                       "certificate required")
