"""Issue 12, identity: the shipped broker config binds a connection's client id to its authenticated
identity (password user or certificate CN), keeps device and operator credentials on separate
listeners, and so refuses the client-id takeover a device credential could perform before.

Everything runs against real Mosquitto with deploy/mosquitto as shipped (only paths and ports changed,
tests/support/broker.py) and, for the takeover, a real `edge-agent run` process.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.config import MqttConfig
from edgefleet.converter.fleet.publish import make_command
from edgefleet.errors import TransportError
from edgefleet.protocol import SigningKey, Topics, canonical_json, parse_json
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.broker import Inbox, Pki, client
from edgefleet.testing.waiting import wait_for
from edgefleet.transport import MqttSettings, Transport
from tests.support.broker import OPERATOR, AclBroker, shipped_broker_for

T = Topics()
DEVICES = ("cam-a", "cam-b")


@dataclass
class Site:
    """The shipped broker (TLS, both listeners), the fleet key and the real cam-b agent."""

    shipped: AclBroker
    pki: Pki
    key: SigningKey
    key_dir: Path
    agent: AgentProcess
    secrets: Path

    def password_file(self, user: str) -> Path:
        path = self.secrets / f"{user}.pw"
        if not path.exists():
            path.write_text(self.shipped.passwords[user] + "\n")
        return path

    def operator(self, inbox: Callable[[Any], None] | None = None) -> Transport:
        return client(self.shipped.operator_url, inbox, ca_file=self.pki.ca_file, **self.shipped.operator_login())

    def broker_args(self) -> list[object]:
        """edgectl's options for the operator listener."""
        return ["--broker", self.shipped.operator_url, "--ca", self.pki.ca_file, "--username", OPERATOR,
                "--password-file", self.password_file(OPERATOR), "--connect-timeout", 10]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("identity")
    shipped = shipped_broker_for(root / "broker", pki, devices=DEVICES)
    shipped.broker.start()
    key = SigningKey.generate()
    key.write(root / "keys")
    secrets = root / "secrets"
    secrets.mkdir()
    agent = AgentProcess(
        root / "cam-b", "cam-b",
        mqtt={"url": shipped.url, "username": "cam-b", "password_file": str(secrets / "cam-b.pw"),
              "ca_file": str(pki.ca_file), "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        security={"trusted_keys": [str(root / "keys" / "edgefleet.pub")]},
    )
    s = Site(shipped, pki, key, root / "keys", agent, secrets)
    s.password_file("cam-b")
    try:
        agent.start()
        wait_for(lambda: "connected to" in agent.log(), timeout=30, what="cam-b connected")
        yield s
    finally:
        agent.kill()
        shipped.broker.kill()


def retained_status(site: Site, device: str) -> dict[str, Any]:
    """The retained status document of `device`, read fresh from the broker by the operator."""
    inbox = Inbox()
    op = site.operator(inbox)
    try:
        op.subscribe(T.status(device), wait=5)
        return parse_json(inbox.topic(T.status(device), timeout=5).payload)  # type: ignore[no-any-return]
    finally:
        op.stop()


def connects(agent: AgentProcess) -> int:
    return agent.log().count("connected to")


def report_reaches(site: Site, device: str) -> dict[str, Any]:
    """Send a signed `report` command over the operator listener; return the device's answer event."""
    inbox = Inbox()
    op = site.operator(inbox)
    try:
        op.subscribe(T.events(device), wait=5)
        command = make_command(site.key, device, "report")
        op.publish(T.cmd(device), canonical_json(command), wait=5)
        message = inbox.wait_for(lambda m: m.topic == T.events(device)
                                 and parse_json(m.payload)["details"].get("command_id") == command["command_id"],
                                 timeout=20)
        return parse_json(message.payload)  # type: ignore[no-any-return]
    finally:
        op.stop()


def identities(shipped: AclBroker, since: int) -> list[str]:
    """The `ID (... u'USER')` part of every client connection the broker logged after offset `since`:
    the client id and user name the broker knows it by."""
    lines = shipped.broker.log()[since:].splitlines()
    return [line.split(" as ", 1)[1] for line in lines if "New client connected" in line]


# ---------------------------------------------------------------------- the takeover attack


def test_a_device_credential_cannot_take_over_another_devices_client_id(site: Site, edgectl: Callable[..., Any]) -> None:
    agent = site.agent
    watch = Inbox()
    op = site.operator(watch)
    op.subscribe(T.status("cam-b"), wait=5)
    assert parse_json(watch.topic(T.status("cam-b"), timeout=10).payload)["status"] == "online"
    before, log_at = connects(agent), len(site.shipped.broker.log())
    attackers: list[Transport] = []
    try:
        # cam-a's credential asking for cam-b's client id, again and again (the attack of issue 12) ...
        for _ in range(5):
            t = client(site.shipped.url, ca_file=site.pki.ca_file, client_id="cam-b",
                       **site.shipped.device_login("cam-a"))
            attackers.append(t)
            time.sleep(0.3)
            t.stop()
        # ... with a random client id, and with a long-lived connection that stays (one at a time: two
        # connections of the same identity replace each other, as they should)
        t = client(site.shipped.url, ca_file=site.pki.ca_file, client_id=f"cam-b-{uuid.uuid4().hex[:6]}",
                   **site.shipped.device_login("cam-a"))
        attackers.append(t)
        t.stop()
        attackers.append(client(site.shipped.url, ca_file=site.pki.ca_file, client_id="cam-b",
                                **site.shipped.device_login("cam-a")))
        # the broker knew every one of them as cam-a, whatever id they asked for
        seen = identities(site.shipped, log_at)
        assert len(seen) == 7 and all(s.startswith("cam-a (") and "u'cam-a'" in s for s in seen), seen
        # and what cam-a may do under any client id is what cam-a may do: not write cam-b's status
        with pytest.raises(TransportError, match="Not authorized"):
            attackers[-1].publish(T.status("cam-b"), b'{"status":"offline"}', retain=True, wait=5)
        time.sleep(1.0)  # a kicked agent reconnects within reconnect_min_s (0.2 s)
        # cam-b was never disconnected: no offline will, no reconnect, its retained status still online
        assert [m for m in watch.quiet(0.2) + watch.seen
                if m.topic == T.status("cam-b") and parse_json(m.payload)["status"] != "online"] == []
        assert connects(agent) == before, agent.log()
        assert "connection to" not in agent.log()  # the transport's "connection ... lost" line
        assert retained_status(site, "cam-b")["status"] == "online"
        # the attacker is still connected right now, and the operator's signed commands reach cam-b
        assert attackers[-1].connected
        assert report_reaches(site, "cam-b")["ok"] is True
        code, out, err = edgectl("rollback", "--device", "cam-b", "--model", "m", "--key", site.key_dir, "--wait",
                                 "--timeout", 20, "--json", *site.broker_args())
        assert "offline" not in out + err and "not known" not in out + err
        result = json.loads(out)
        # it reached cam-b, which answered (it has no model "m" to roll back, so it refuses, signed and all)
        assert result["device_id"] == "cam-b" and result["confirmed"] is False and result["detail"], result
        assert code == 1
        assert connects(agent) == before
    finally:
        for t in attackers:
            t.stop()
        op.stop()


def test_an_empty_client_id_gets_the_user_name_not_a_free_one(site: Site) -> None:
    """MQTT 5 lets a client leave its id to the broker; the device listener assigns the user name."""
    log_at = len(site.shipped.broker.log())
    raw = paho.Client(CallbackAPIVersion.VERSION2, client_id="", protocol=paho.MQTTv5)
    raw.tls_set(ca_certs=str(site.pki.ca_file))
    raw.username_pw_set("cam-a", site.shipped.passwords["cam-a"])
    answers: list[Any] = []

    def on_connect(c: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        answers.append(reason)

    raw.on_connect = on_connect
    raw.connect("127.0.0.1", site.shipped.broker.port)
    raw.loop_start()
    try:
        wait_for(lambda: answers, timeout=10, what="CONNACK")
        assert not answers[0].is_failure, answers
        seen = identities(site.shipped, log_at)
        assert seen and seen[-1].startswith("cam-a ("), seen
    finally:
        raw.disconnect()
        raw.loop_stop()
    assert report_reaches(site, "cam-b")["ok"] is True


# ---------------------------------------------------------------------- the two listeners


def refused(url: str, **settings: Any) -> str:
    """The error of a connection the broker refuses (fails the test if it connects)."""
    t = Transport(MqttSettings(url=url, reconnect_min_s=0.2, reconnect_max_s=0.4, **settings),
                  on_message=lambda m: None)
    t.start()
    try:
        assert not t.wait_connected(1.5), f"{settings.get('username')} connected to {url}"
        assert t.last_error is not None
        return t.last_error
    finally:
        t.stop()


def test_device_credentials_are_refused_on_the_operator_listener(site: Site) -> None:
    for device in DEVICES:
        err = refused(site.shipped.operator_url, ca_file=site.pki.ca_file, **site.shipped.device_login(device))
        assert "refused the connection" in err


def test_the_operator_credential_is_refused_on_the_device_listener(site: Site) -> None:
    err = refused(site.shipped.url, ca_file=site.pki.ca_file, **site.shipped.operator_login())
    assert "refused the connection" in err


def test_operator_connections_coexist(site: Site) -> None:
    """Several host tools of one operator (fleet watch beside push --wait) do not kick each other."""
    inboxes = [Inbox() for _ in range(3)]
    ops = [site.operator(inbox) for inbox in inboxes]
    try:
        ids = {t.client_id for t in ops}
        assert len(ids) == 3
        for t in ops:
            t.subscribe(T.all_devices("status"), wait=5)
        time.sleep(0.5)
        for inbox in inboxes:  # every one of them is served: each gets cam-b's retained status
            assert parse_json(inbox.topic(T.status("cam-b"), timeout=5).payload)["device_id"] == "cam-b"
        assert all(t.connected and t.connects == 1 for t in ops), [(t.connects, t.last_error) for t in ops]
    finally:
        for t in ops:
            t.stop()


def test_an_operator_credential_cannot_forge_what_a_device_reports(site: Site) -> None:
    op = site.operator()
    try:
        for topic in (T.status("cam-b"), T.state("cam-b"), T.events("cam-b"), T.telemetry("cam-b")):
            with pytest.raises(TransportError, match="Not authorized"):
                op.publish(topic, b'{"status":"offline"}', retain=topic.endswith("status"), wait=5)
        # what host tools publish stays allowed
        op.publish(T.cmd("cam-a"), canonical_json(make_command(site.key, "cam-a", "report")), wait=5)
        op.publish(T.timestamp(), b"", retain=True, wait=5)
        op.publish(T.inventory(), b"", retain=True, wait=5)
    finally:
        op.stop()
    assert retained_status(site, "cam-b")["status"] == "online"


# ---------------------------------------------------------------------- certificates: the CN is the identity


def test_with_mutual_tls_the_certificate_cn_binds_the_client_id(tmp_path: Path, pki: Pki) -> None:
    shipped = shipped_broker_for(tmp_path / "broker", pki, mutual=True, devices=DEVICES)
    certs = {d: pki.issue(d, server=False) for d in DEVICES}
    with shipped.broker:
        inbox = Inbox()
        op = client(shipped.operator_url, inbox, ca_file=pki.ca_file, **shipped.operator_login())
        op.subscribe(T.status("cam-b"), wait=5)
        cert_b, key_b = certs["cam-b"]
        real_b = client(shipped.url, ca_file=pki.ca_file, cert_file=cert_b, key_file=key_b)  # no user name at all
        real_b.publish(T.status("cam-b"), b'{"status":"online"}', retain=True, wait=5)
        inbox.wait_for(lambda m: m.payload == b'{"status":"online"}')
        log_at = len(shipped.broker.log())
        # cam-a's certificate, claiming cam-b's user name, password and client id
        cert_a, key_a = certs["cam-a"]
        attacker = client(shipped.url, ca_file=pki.ca_file, cert_file=cert_a, key_file=key_a, client_id="cam-b",
                          **shipped.device_login("cam-b"))
        try:
            seen = identities(shipped, log_at)
            assert seen and seen[-1].startswith("cam-a (") and "u'cam-a'" in seen[-1], seen
            with pytest.raises(TransportError, match="Not authorized"):
                attacker.publish(T.status("cam-b"), b'{"status":"offline"}', retain=True, wait=5)
            attacker.publish(T.status("cam-a"), b'{"status":"online"}', retain=True, wait=5)
            time.sleep(0.5)
            assert real_b.connected and real_b.connects == 1, real_b.last_error
            real_b.publish(T.events("cam-b"), b"still here", wait=5)
        finally:
            attacker.stop()
            real_b.stop()
        assert not [m for m in inbox.seen + inbox.quiet(0.3) if m.payload == b'{"status":"offline"}']
        # and a device certificate is no key to the operator listener: it still needs an operator password
        assert "refused the connection" in refused(shipped.operator_url, ca_file=pki.ca_file, cert_file=cert_a,
                                                   key_file=key_a, username="cam-a")
        op.stop()


# ---------------------------------------------------------------------- the agent's defaults


def test_the_agent_logs_in_as_its_device_id_by_default() -> None:
    s = MqttConfig(url="mqtts://broker.example:8883").settings("cam-b")
    assert (s.username, s.client_id) == ("cam-b", "cam-b")
    s = MqttConfig(url="mqtts://broker.example:8883", username="other", client_id="x").settings("cam-b")
    assert (s.username, s.client_id) == ("other", "x")
