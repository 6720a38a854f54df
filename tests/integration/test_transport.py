"""edgefleet.transport against real Mosquitto brokers: plain, TLS, mutual TLS, passwords, restarts, wills."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgefleet.credentials import read_secret
from edgefleet.errors import ConfigError, TransportError
from edgefleet.testing.amqtt import Amqtt
from edgefleet.testing.broker import Inbox, Mosquitto, Pki, client
from edgefleet.testing.nats import Nats
from edgefleet.transport import Message, MqttSettings, Transport, parse_url
from tests.support.broker import OPERATOR, ROOT, AclBroker

# ---------------------------------------------------------------------- settings


@pytest.mark.parametrize(("url", "expected"), [
    ("mqtt://broker.local", (False, "broker.local", 1883)),
    ("mqtts://broker.local", (True, "broker.local", 8883)),
    ("mqtt://10.0.0.5:11883/", (False, "10.0.0.5", 11883)),
    ("mqtts://[::1]:8884", (True, "::1", 8884)),
])
def test_url_defaults_and_ports(url: str, expected: tuple[bool, str, int]) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(("url", "fragment"), [
    ("http://broker:1883", "expected mqtt://host[:port] or mqtts://host[:port]"),
    ("broker:1883", "expected mqtt://host[:port]"),
    ("mqtt://", "expected a host name"),
    ("mqtt://user:pw@broker", "no user info"),
    ("mqtt://broker/topic", "no path"),
    ("mqtt://broker:99999", "out of range"),
])
def test_bad_urls_are_refused_with_the_reason(url: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match="broker url") as err:
        MqttSettings(url=url)
    assert fragment in str(err.value)


def test_settings_keep_the_password_out_of_repr() -> None:
    s = MqttSettings(url="mqtt://h", username="u", password="hunter2")
    assert "hunter2" not in repr(s)


def test_read_secret_uses_the_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mqtt-password").write_text("s3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_secret(Path("mqtt-password")) == "s3cret"
    with pytest.raises(ConfigError, match="cannot read secret file"):
        read_secret(Path("missing"))


def test_paho_errors_are_kept_as_the_cause_and_its_debug_lines_cost_nothing() -> None:
    import paho.mqtt.client as mqtt

    formatted = []

    class Counted:
        def __str__(self) -> str:
            formatted.append(1)
            return "payload"

    t = Transport(MqttSettings(url="mqtt://127.0.0.1:9"), on_message=lambda m: None)
    paho_log = logging.getLogger("edgefleet.transport.paho")
    level = paho_log.level
    paho_log.setLevel(logging.INFO)
    try:
        for _ in range(100):  # what paho does for every packet
            t._client._easy_log(mqtt.MQTT_LOG_DEBUG, "Received PUBLISH %s", Counted())
        assert not formatted, "debug lines must not be built when nobody shows them"
        t._client._easy_log(mqtt.MQTT_LOG_ERR, "failed to receive on socket: %s", "reset")
        assert t._paho_error == "failed to receive on socket: reset"
        t._client._easy_log(mqtt.MQTT_LOG_ERR, "Client is not connected")  # paho's noise after a disconnect
        assert t._paho_error == "failed to receive on socket: reset"
        paho_log.setLevel(logging.DEBUG)
        t._client._easy_log(mqtt.MQTT_LOG_DEBUG, "Received PUBLISH %s", Counted())
        assert formatted, "shown when DEBUG is on"
    finally:
        paho_log.setLevel(level)


# ---------------------------------------------------------------------- plain broker


def newcomer_sees(url: str, topic: str) -> Message:
    """The first message a client subscribing to `topic` now is handed: the retained one."""
    inbox = Inbox()
    reader = client(url, inbox)
    try:
        reader.subscribe(topic, wait=5)
        return inbox.topic(topic)
    finally:
        reader.stop()


def test_publish_subscribe_and_retained_flag(broker: Mosquitto) -> None:
    inbox = Inbox()
    sub = client(broker.url, inbox)
    pub = client(broker.url)
    try:
        # small packets (SUBSCRIBE, PUBACK) must not wait for the broker's delayed ACK
        assert pub._client.socket().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        sub.subscribe("t/#", wait=5)
        pub.publish("t/live", b"\x00live", wait=True)
        pub.publish("t/kept", b"kept", retain=True, wait=True)
        live = inbox.topic("t/live")
        assert live == Message("t/live", b"\x00live", retain=False, qos=1)
        assert inbox.topic("t/kept").retain is False  # delivered live, not from the store

        stored = newcomer_sees(broker.url, "t/kept")
        assert stored.retain is True and stored.payload == b"kept"
        assert pub.messages_out == 2 and pub.bytes_out == len(b"\x00live") + len(b"kept")
        assert sub.messages_in >= 2 and pub.unacked == 0
    finally:
        pub.stop()
        sub.stop()


def test_start_does_not_block_when_the_broker_is_down(tmp_path: Path) -> None:
    down = Mosquitto(tmp_path / "down")  # configured, never started: nothing listens on its port
    t = Transport(MqttSettings(url=down.url, reconnect_min_s=0.1, reconnect_max_s=0.2), on_message=lambda m: None)
    t.start()
    try:
        assert t.wait_connected(0.5) is False
        assert t.last_error is not None and "cannot connect to" in t.last_error
        assert "refused" in t.last_error.lower()
        # QoS 1 is kept for later; the broker comes up and the message is delivered, retained.
        t.publish("k/v", b"queued", retain=True)
        down.start()
        assert t.wait_connected(5)
        assert t.flush(5)
        assert newcomer_sees(down.url, "k/v").payload == b"queued"
    finally:
        t.stop()
        down.kill()


def test_resubscribes_after_a_broker_restart(broker: Mosquitto) -> None:
    inbox = Inbox()
    events: list[bool] = []
    sub = Transport(MqttSettings(url=broker.url, reconnect_min_s=0.1, reconnect_max_s=0.5),
                    on_message=inbox, on_connection=events.append)
    sub.subscribe("r/#")
    sub.start()
    try:
        assert sub.wait_connected(5)
        broker.restart()
        pub = client(broker.url)
        # on_connection(True) comes after the SUBACK, so a message sent from here on must arrive.
        assert _wait(lambda: sub.reconnects == 1 and sub.connected, 10), sub.last_error
        pub.publish("r/after", b"1", wait=True)
        assert inbox.topic("r/after").payload == b"1"
        assert events == [True, False, True]
        pub.stop()
    finally:
        sub.stop()


def test_retained_messages_survive_a_broker_restart(broker: Mosquitto) -> None:
    pub = client(broker.url)
    pub.publish("p/kept", b"v1", retain=True, wait=True)
    pub.stop()
    broker.restart()
    inbox = Inbox()
    sub = client(broker.url, inbox)
    sub.subscribe("p/#", wait=5)
    assert inbox.topic("p/kept").payload == b"v1"
    sub.stop()


def test_publish_wait_raises_when_the_broker_does_not_answer(broker: Mosquitto) -> None:
    pub = client(broker.url)
    try:
        broker.pause()
        with pytest.raises(TransportError, match="not acknowledged within 0.3 s"):
            pub.publish("x/y", b"z", wait=0.3)
        assert pub.unacked == 1
        broker.resume()
        assert pub.flush(5) and pub.unacked == 0
    finally:
        broker.resume()
        pub.stop()


def test_a_raising_callback_is_logged_and_the_loop_goes_on(broker: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    inbox = Inbox()

    def handler(m: Message) -> None:
        if m.payload == b"boom":
            raise ValueError("handler bug")
        inbox(m)

    sub = client(broker.url, handler)
    pub = client(broker.url)
    try:
        sub.subscribe("c/#", wait=5)
        with caplog.at_level(logging.ERROR, logger="edgefleet.transport"):
            pub.publish("c/1", b"boom", wait=True)
            pub.publish("c/2", b"fine", wait=True)
            assert inbox.topic("c/2").payload == b"fine"
        assert sub.callback_errors == 1
        records = [r for r in caplog.records if "message callback" in r.getMessage()]
        assert len(records) == 1 and records[0].exc_info is not None
        assert "handler bug" in str(records[0].exc_info[1])
    finally:
        pub.stop()
        sub.stop()


def test_blocking_publish_from_a_callback_is_refused(broker: Mosquitto) -> None:
    errors: list[BaseException] = []
    done = threading.Event()
    holder: list[Transport] = []

    def handler(m: Message) -> None:
        try:
            holder[0].publish("d/echo", m.payload, wait=True)
        except TransportError as err:
            errors.append(err)
        finally:
            done.set()

    t = client(broker.url, handler)
    holder.append(t)
    try:
        t.subscribe("d/in", wait=5)
        t.publish("d/in", b"x", wait=True)
        assert done.wait(5)
        assert errors and "would block the network thread" in str(errors[0])
    finally:
        t.stop()


def test_will_is_published_retained_when_the_client_dies(broker: Mosquitto) -> None:
    script = textwrap.dedent("""
        import sys, threading
        from edgefleet.transport import MqttSettings, Transport
        t = Transport(MqttSettings(url=sys.argv[1], client_id="dev-w"), on_message=lambda m: None,
                      will=("edgefleet/devices/dev-w/status", b"offline", True))
        t.start()
        assert t.wait_connected(10), t.last_error
        t.publish("edgefleet/devices/dev-w/status", b"online", retain=True, wait=True)
        print("ready", flush=True)
        threading.Event().wait(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, broker.url], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        inbox = Inbox()
        watcher = client(broker.url, inbox)
        watcher.subscribe("edgefleet/devices/+/status", wait=5)
        first = inbox.topic("edgefleet/devices/dev-w/status")
        assert (first.payload, first.retain) == (b"online", True)
        proc.kill()
        proc.wait(5)
        gone = inbox.wait_for(lambda m: m.payload == b"offline")
        assert gone.topic == "edgefleet/devices/dev-w/status"
        watcher.stop()
        # The will replaced the retained "online": a newcomer sees the device offline.
        assert newcomer_sees(broker.url, "edgefleet/devices/dev-w/status").payload == b"offline"
    finally:
        proc.kill()
        proc.wait()


def test_clean_stop_does_not_send_the_will(broker: Mosquitto) -> None:
    inbox = Inbox()
    watcher = client(broker.url, inbox)
    watcher.subscribe("w/#", wait=5)
    t = Transport(MqttSettings(url=broker.url), on_message=lambda m: None, will=("w/status", b"offline", True))
    t.start()
    assert t.wait_connected(5)
    t.stop(timeout=2)
    assert not t.connected
    assert inbox.quiet(0.3) == []
    watcher.stop()


# ---------------------------------------------------------------------- TLS and credentials


def test_tls_with_the_broker_ca(tls_broker: Mosquitto, pki: Pki) -> None:
    inbox = Inbox()
    t = client(tls_broker.url, inbox, ca_file=pki.ca_file)
    t.subscribe("s/#", wait=5)
    t.publish("s/1", b"over tls", wait=True)
    assert inbox.topic("s/1").payload == b"over tls"
    t.stop()


def test_tls_with_an_unknown_ca_says_why(tls_broker: Mosquitto, tmp_path: Path) -> None:
    other = Pki.create(tmp_path / "other", name="some other CA")
    t = Transport(MqttSettings(url=tls_broker.url, ca_file=other.ca_file, reconnect_min_s=0.2, reconnect_max_s=0.4),
                  on_message=lambda m: None)
    t.start()
    try:
        assert _wait(lambda: t.last_error is not None, 5) and not t.connected
        assert t.last_error is not None and "certificate verif" in t.last_error
    finally:
        t.stop()


def test_mutual_tls(mtls_broker: Mosquitto, pki: Pki) -> None:
    cert, key = pki.issue("dev-tls", server=False)
    t = client(mtls_broker.url, ca_file=pki.ca_file, cert_file=cert, key_file=key)
    t.publish("m/1", b"x", wait=True)
    t.stop()
    anonymous = Transport(MqttSettings(url=mtls_broker.url, ca_file=pki.ca_file, reconnect_min_s=0.2, reconnect_max_s=0.4),
                          on_message=lambda m: None)
    anonymous.start()
    try:
        assert _wait(lambda: anonymous.last_error is not None, 5) and not anonymous.connected
        assert anonymous.last_error is not None and "certificate required" in anonymous.last_error
    finally:
        anonymous.stop()


def test_tls_files_need_an_mqtts_url(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="not mqtts://"):
        Transport(MqttSettings(url="mqtt://127.0.0.1", ca_file=pki.ca_file), on_message=lambda m: None)
    with pytest.raises(ConfigError, match="cannot load TLS files"):
        Transport(MqttSettings(url="mqtts://127.0.0.1", ca_file=Path("/nonexistent/ca.pem")),
                  on_message=lambda m: None)


def test_password_login(acl_broker: AclBroker) -> None:
    t = client(acl_broker.operator_url, username=OPERATOR, password=acl_broker.passwords[OPERATOR])
    t.publish("edgefleet/devices/dev-a/cmd", b"{}", wait=True)
    t.stop()


def test_bad_password_is_a_clear_error(acl_broker: AclBroker, caplog: pytest.LogCaptureFixture) -> None:
    t = Transport(MqttSettings(url=acl_broker.url, username="dev-a", password="wrong", reconnect_min_s=0.1,
                               reconnect_max_s=0.2), on_message=lambda m: None)

    def refusals() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "edgefleet.transport" and "refused the connection" in r.getMessage()]

    with caplog.at_level(logging.DEBUG, logger="edgefleet.transport"):
        t.start()
        try:
            assert _wait(lambda: len(refusals()) >= 3, 5), "the client should keep retrying"
            assert not t.connected
        finally:
            t.stop()
    assert t.last_error is not None
    assert "refused the connection" in t.last_error
    assert "Bad user name or password" in t.last_error or "Not authorized" in t.last_error
    errors = [r.getMessage() for r in refusals() if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]  # one line, and retries do not repeat it at ERROR


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll `predicate` until it holds or `timeout` passes."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        tick.wait(0.02)
    return True


def test_stop_interrupts_a_waiting_publish_and_returns_in_time(broker: Mosquitto) -> None:
    pub = client(broker.url)
    errors: list[BaseException] = []

    def waiting_publish() -> None:
        try:
            pub.publish("s/t", b"x", wait=30)
        except TransportError as err:
            errors.append(err)

    broker.pause()  # nothing will be acknowledged
    try:
        worker = threading.Thread(target=waiting_publish)
        worker.start()
        threading.Event().wait(0.2)
        started = time.monotonic()
        pub.stop(timeout=1.0)
        worker.join(2)
        assert time.monotonic() - started < 2.5
        assert not worker.is_alive()
        assert errors and "stopped before the broker acknowledged" in str(errors[0])
    finally:
        broker.resume()


# ---------------------------------------------------------------------- MQTT 5 or 3.1.1, and several urls


def _transport_lines(caplog: pytest.LogCaptureFixture, level: int, text: str = "") -> list[str]:
    """What edgefleet.transport logged at exactly `level`, containing `text`."""
    return [r.getMessage() for r in caplog.records
            if r.name == "edgefleet.transport" and r.levelno == level and text in r.getMessage()]


def _settles_on_3_1_1(url: str, caplog: pytest.LogCaptureFixture, within: float) -> Transport:
    """A transport with protocol auto and a last will, connected to a 3.1.1-only broker within `within` s,
    having said so once at INFO and never at ERROR."""
    inbox = Inbox()
    t = Transport(MqttSettings(url=url, client_id="dev-n", reconnect_min_s=0.2, reconnect_max_s=1.0),
                  on_message=inbox, will=("w/dev-n/status", b"offline", True))
    started = time.monotonic()
    t.start()
    assert t.wait_connected(within + 5), t.last_error
    took = time.monotonic() - started
    assert took < within, f"connected after {took:.1f} s"
    assert (t.protocol, t.url) == ("3.1.1", url)
    t.subscribe("w/#", wait=5)
    t.publish("w/x", b"1", wait=True)
    assert inbox.topic("w/x").payload == b"1"
    assert _transport_lines(caplog, logging.ERROR) == []
    assert _transport_lines(caplog, logging.WARNING) == []
    assert _transport_lines(caplog, logging.INFO, "speaks MQTT") == [f"broker {url} speaks MQTT 3.1.1; using it"]
    return t


def test_auto_meets_nats_in_3_1_1_without_an_error_and_keeps_to_it(nats_broker: Nats,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="edgefleet.transport"):
        t = _settles_on_3_1_1(nats_broker.url, caplog, within=3.0)
        try:
            tried = len(_transport_lines(caplog, logging.DEBUG, "trying MQTT 3.1.1"))
            assert tried == 1
            # a reconnect goes straight to 3.1.1: no second MQTT 5 attempt, no second INFO line
            nats_broker.restart()
            assert _wait(lambda: t.reconnects == 1 and t.connected, 30), t.last_error
            assert len(_transport_lines(caplog, logging.DEBUG, "trying MQTT 3.1.1")) == tried
            assert len(_transport_lines(caplog, logging.INFO, "speaks MQTT")) == 1
        finally:
            t.stop()


def test_auto_with_a_will_meets_amqtt_in_3_1_1_within_the_connack_bound(amqtt_broker: Amqtt,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    # amqtt never answers an MQTT 5 CONNECT that carries a will: paho alone would wait a keepalive
    with caplog.at_level(logging.DEBUG, logger="edgefleet.transport"):
        t = _settles_on_3_1_1(amqtt_broker.url, caplog, within=MqttSettings().connack_timeout_s + 3)
        t.stop()
    assert any("no CONNACK within 5 s" in line for line in _transport_lines(caplog, logging.DEBUG, "trying MQTT 3.1.1"))


def test_a_fixed_protocol_is_never_probed(broker: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="edgefleet.transport"):
        t = client(broker.url, protocol="3.1.1")
        assert t.protocol == "3.1.1"
        t.stop()
        t = client(broker.url)  # auto, on a broker that speaks 5
        assert t.protocol == "5"
        t.stop()
    assert _transport_lines(caplog, logging.INFO, "speaks MQTT") == []
    assert _transport_lines(caplog, logging.DEBUG, "trying MQTT 3.1.1") == []


def test_several_urls_the_next_takes_over_when_a_broker_dies(broker: Mosquitto, tmp_path: Path) -> None:
    second = Mosquitto(tmp_path / "second").start()
    inbox = Inbox()
    events: list[bool] = []
    t = Transport(MqttSettings(url=broker.url, fallback_urls=(second.url,), reconnect_min_s=0.1, reconnect_max_s=0.5),
                  on_message=inbox, on_connection=events.append)
    t.subscribe("f/#")
    t.start()
    try:
        assert t.wait_connected(5) and t.url == broker.url
        broker.kill()
        assert _wait(lambda: t.connected and t.url == second.url, 10), t.last_error
        pub = client(second.url)
        pub.publish("f/1", b"on the second", wait=True)  # subscriptions followed the transport
        assert inbox.topic("f/1").payload == b"on the second"
        pub.stop()
        # the first comes back: the transport stays where it is until that broker fails it
        broker.start()
        threading.Event().wait(1.0)
        assert t.connected and t.url == second.url
        second.kill()
        assert _wait(lambda: t.connected and t.url == broker.url, 10), t.last_error
        assert events == [True, False, True, False, True]
    finally:
        t.stop()
        second.kill()


def test_several_urls_a_dead_first_one_costs_one_error_line(broker: Mosquitto, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    dead = Mosquitto(tmp_path / "dead")  # configured, never started
    also_dead = Mosquitto(tmp_path / "also-dead")
    with caplog.at_level(logging.DEBUG, logger="edgefleet.transport"):
        t = Transport(MqttSettings(url=dead.url, fallback_urls=(broker.url,), reconnect_min_s=0.1,
                                   reconnect_max_s=0.2), on_message=lambda m: None)
        t.start()
        try:
            assert t.wait_connected(5) and t.url == broker.url
        finally:
            t.stop()
        errors = _transport_lines(caplog, logging.ERROR)
        assert len(errors) == 1 and errors[0].startswith(f"cannot connect to {dead.url}: "), errors
        # none answers: each url's failure is said once at ERROR, the rounds after at DEBUG
        caplog.clear()
        t = Transport(MqttSettings(url=dead.url, fallback_urls=(also_dead.url,), reconnect_min_s=0.05,
                                   reconnect_max_s=0.05), on_message=lambda m: None)
        t.start()
        try:
            assert _wait(lambda: len(_transport_lines(caplog, logging.DEBUG, "cannot connect to")) >= 6, 10)
        finally:
            t.stop()
    errors = _transport_lines(caplog, logging.ERROR)
    assert sorted(e.split(": ")[0] for e in errors) == sorted(f"cannot connect to {u}" for u in (dead.url, also_dead.url))


@pytest.mark.parametrize(("urls", "fragment"), [
    (("mqtt://a", "mqtts://b"), "mix mqtt:// and mqtts://"),
    (("mqtt://a", "mqtt://b", "mqtt://a"), "lists a url twice"),
    (("mqtt://a", "http://b"), "expected mqtt://host[:port]"),
])
def test_several_urls_are_checked(urls: tuple[str, ...], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        MqttSettings(url=urls[0], fallback_urls=urls[1:])
    assert fragment in str(err.value)
    assert MqttSettings(url="mqtt://a", fallback_urls=("mqtt://b:1884",)).urls == ("mqtt://a", "mqtt://b:1884")


def test_a_refused_subscription_without_a_handler_is_asked_for_again(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A subscription its owner cannot do without (a device's documents) outlives a passing refusal: here
    NATS's permissions deny it, then a reloaded config (SIGHUP) allows it, as a cluster's new leaders would
    after refusing subscriptions while they were elected."""
    import signal

    deny = 'permissions: {subscribe: {deny: ["ctl.>"]}}'
    auth = f'authorization {{\n  users = [{{user: "dev", password: "pw", {deny}}}]\n}}\nno_auth_user: "dev"\n'
    with Nats(tmp_path, extra=auth) as nats:
        inbox = Inbox()
        sub = Transport(MqttSettings(url=nats.url, protocol="3.1.1"), on_message=inbox)
        sub.start()
        try:
            assert sub.wait_connected(10)
            with caplog.at_level(logging.ERROR, logger="edgefleet.transport"):
                sub.subscribe("ctl/x")
                assert _wait(lambda: any("asking again in 2 s" in r.getMessage() for r in caplog.records), 5)
            assert sub.subscriptions == {"ctl/x": 1}  # kept, to be asked for again
            nats.conf.write_text(nats.conf.read_text().replace(deny, 'permissions: {subscribe: {allow: [">"]}}'))
            assert nats.proc is not None
            nats.proc.send_signal(signal.SIGHUP)
            pub = client(nats.url, protocol="3.1.1")
            try:
                pub.publish("ctl/x", b"kept", retain=True, wait=True)
                got = inbox.topic("ctl/x", timeout=15)  # the retry: 2 s, then 4 s after each refusal
            finally:
                pub.stop()
            assert got.payload == b"kept" and got.retain
        finally:
            sub.stop()
