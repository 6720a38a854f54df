"""The one module that talks to paho-mqtt: settings in, typed messages out.

A `Transport` owns one paho client and its network thread. Paho callbacks do no work: an incoming
message becomes a frozen `Message` handed to the owner's `on_message` (a `queue.put`), and any
exception raised there is logged with its traceback and counted in `callback_errors`, never allowed
to stop the network loop. Subscriptions are remembered and sent again after every reconnect; the
owner hears `on_connection(True)` only once the broker has acknowledged them. A filter the broker
refuses is forgotten and reported to the owner that asked to hear of it (`on_refused`: chunk
subscriptions, which the download window gives back); any other is asked for again with a growing delay.

MQTT 5 by default (reason codes make refused publishes and subscriptions visible); nothing here needs
it. With `protocol = "auto"` a broker that refuses an MQTT 5 CONNECT, closes it, or leaves it
unanswered for `connack_timeout_s` is tried in 3.1.1 at once, quietly; once it answers, its version is
logged once at INFO and kept for the session. `MqttSettings.protocol` fixes either version.

Several urls (`MqttSettings.fallback_urls`, the nodes of a cluster): an attempt that fails or a
connection that ends moves on to the next url, in turn, with the reconnect backoff; subscriptions
follow, and `Transport.url` says which broker is in use.

A failed attempt is put in the operator's words by `edgefleet.diagnose` (refused, unreachable, TLS
expected or not expected on the port, a certificate for other names), in `last_error`. The transport
itself keeps trying, as a daemon wants; a command line waits with `wait_connected(until_failed=True)`
and gives up once every url has failed an attempt.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.diagnose import closed_before_connack, connect_failure
from edgefleet.errors import ConfigError, TransportError

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
DEFAULT_PUBLISH_TIMEOUT_S = 30.0
RESUBSCRIBE_MIN_S = 2.0
RESUBSCRIBE_MAX_S = 60.0
# Remembered SUBACKs, so a subscribe(wait=...) that loses the race against its own SUBACK still finds it.
_MAX_SUBACKS = 256

RefusalHandler = Callable[[list[tuple[str, str]]], None]
"""Told the filters the broker refused, each with the broker's reason (`subscribe(on_refused=...)`)."""

__all__ = ["DEFAULT_PORTS", "Message", "MqttSettings", "RefusalHandler", "Transport", "check_broker_url",
           "parse_url"]

_URL_FORM = "expected mqtt://host[:port] or mqtts://host[:port]"
# A host is a bracketed IPv6 address or a name without the characters that end a url's host part;
# whitespace and control characters never reach a resolver.
_BROKER_URL = re.compile(r"(mqtts?)://(\[[0-9A-Fa-f:.]+\]|[^\s\x00-\x1f\x7f/?#@\[\]:]+)(?::([0-9]{1,5}))?/?")


def _split_url(url: object) -> tuple[bool, str, int] | str:
    """(tls, host, port) of a broker url, or what is wrong with it."""
    if not isinstance(url, str):
        return f"{_URL_FORM}, got {url!r}"
    m = _BROKER_URL.fullmatch(url)
    if m is None:
        scheme, sep, rest = url.partition("://")
        authority, _, path = rest.partition("/")
        if sep and scheme in DEFAULT_PORTS and not any(c.isspace() or not c.isprintable() for c in url):
            if "@" in authority or not authority or authority.startswith(":"):
                return f"expected a host name and no user info, got {url!r}"
            if path or any(c in authority for c in "?#"):
                return f"expected no path, query or fragment, got {url!r}"
            port_text = authority.rpartition("]")[2].rpartition(":")[2] if ":" in authority.rpartition("]")[2] else ""
            if port_text and not port_text.isdigit():
                return f"the port must be a number 1-65535, got {port_text!r} in {url!r}"
        return f"{_URL_FORM}, got {url!r}"
    scheme, host, port_text = m.groups()
    if host.startswith("["):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{_URL_FORM}, got {url!r}"
    port = int(port_text) if port_text else DEFAULT_PORTS[scheme]
    if not 0 < port <= 65535:
        return f"port out of range 1-65535, got {url!r}"
    return scheme == "mqtts", host, port


def check_broker_url(url: object) -> str | None:
    """What is wrong with a broker url (`mqtt://host[:port]`, `mqtts://host[:port]`), None when nothing.

    The one rule for both halves: the agent's `mqtt.url` and edgectl's `--broker`."""
    split = _split_url(url)
    return split if isinstance(split, str) else None


def parse_url(url: str) -> tuple[bool, str, int]:
    """Split `mqtt://host[:port]` or `mqtts://host[:port]` into (tls, host, port); ConfigError otherwise."""
    split = _split_url(url)
    if isinstance(split, str):
        raise ConfigError(f"broker url: {split}")
    return split


@dataclass(frozen=True)
class MqttSettings:
    """Everything needed to reach a broker; secrets are values here, read from files by the caller."""

    url: str = "mqtt://127.0.0.1:1883"
    """`mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (TLS, default port 8883)."""
    username: str | None = None
    """Broker user name (the shipped ACL expects the device id for devices)."""
    password: str | None = field(default=None, repr=False)
    """The password itself (see `edgefleet.credentials.read_secret`)."""
    ca_file: Path | None = None
    """CA bundle that verifies the broker; the system CAs when unset."""
    cert_file: Path | None = None
    """Client certificate (mutual TLS)."""
    key_file: Path | None = None
    """Private key of the client certificate."""
    keepalive: int = 30
    """Seconds between pings; a silent broker is detected within 1.5x this."""
    reconnect_min_s: float = 1.0
    """First reconnect delay; doubles on every failed attempt."""
    reconnect_max_s: float = 60.0
    """Cap of the reconnect delay."""
    client_id: str = ""
    """MQTT client id; empty means a random `edgefleet-...` id."""
    max_inflight: int = 20
    """QoS 1 messages sent and not yet acknowledged; Mosquitto's receive maximum is 20 by default."""
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    """MQTT protocol version; auto speaks 5 and falls back to 3.1.1 when the broker refuses 5."""
    fallback_urls: tuple[str, ...] = ()
    """More brokers of the same fleet (the other nodes of a cluster), same scheme as `url`: a connection
    that fails or ends moves on to the next url of `urls`, in turn, with the reconnect backoff."""
    connack_timeout_s: float = 5.0
    """With protocol auto: an MQTT 5 CONNECT unanswered this long is taken as a broker that cannot
    parse it (some 3.1.1 brokers never answer one), and the next attempt speaks 3.1.1."""

    def __post_init__(self) -> None:
        tls = parse_url(self.url)[0]
        for url in self.fallback_urls:
            if parse_url(url)[0] != tls:
                raise ConfigError(f"broker urls: {self.url} and {url} mix mqtt:// and mqtts://; use one scheme")
        if len(set(self.urls)) != len(self.urls):
            raise ConfigError(f"broker urls: {', '.join(self.urls)} lists a url twice")
        if not self.connack_timeout_s > 0:
            raise ConfigError(f"connack_timeout_s: expected seconds > 0, got {self.connack_timeout_s}")
        if self.keepalive <= 0:
            raise ConfigError(f"keepalive: expected seconds > 0, got {self.keepalive}")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError("reconnect_min_s: expected 0 < reconnect_min_s <= reconnect_max_s")
        if self.max_inflight <= 0:
            raise ConfigError(f"max_inflight: expected > 0, got {self.max_inflight}")
        if (self.cert_file is None) != (self.key_file is None) and self.key_file is not None:
            raise ConfigError("key_file: given without cert_file")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(f"protocol: expected 'auto', '5' or '3.1.1', got {self.protocol!r}")

    @property
    def urls(self) -> tuple[str, ...]:
        """Every broker url, in the order they are tried: `url`, then `fallback_urls`."""
        return (self.url, *self.fallback_urls)

    @property
    def tls(self) -> bool:
        """Whether the url asks for TLS."""
        return parse_url(self.url)[0]

    @property
    def host(self) -> str:
        """Broker host."""
        return parse_url(self.url)[1]

    @property
    def port(self) -> int:
        """Broker port."""
        return parse_url(self.url)[2]


@dataclass(frozen=True)
class Message:
    """One incoming message; `retain` is true when the broker sent it from its retained store."""

    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 0


@dataclass
class _Asked:
    """A SUBSCRIBE on the wire: each filter with the token of the `subscribe` call that sent it."""

    filters: list[tuple[str, int]]
    waited: bool = False
    """A `subscribe(wait=...)` wants the reason codes."""


# paho's own log lines go here at DEBUG: the transport reports failures itself, once, with their reason.
_paho_log = logging.getLogger(f"{__name__}.paho")


class _Client(mqtt.Client):
    """paho's client, remembering why the last connection attempt failed (paho drops the exception).

    `before_attempt` runs in the network thread before every attempt (it picks the url and the
    protocol); `connack_overdue`, asked on every turn of the network loop, ends an attempt whose
    CONNACK is late the way paho ends one on a keepalive timeout (paho itself waits a keepalive)."""

    last_exception: OSError | None = None
    before_attempt: Callable[[], None] | None = None
    connack_overdue: Callable[[], bool] | None = None

    def reconnect(self) -> MQTTErrorCode:
        if self.before_attempt is not None:
            self.before_attempt()
        try:
            return super().reconnect()
        except OSError as err:
            self.last_exception = err
            raise

    def loop_misc(self) -> MQTTErrorCode:
        overdue = self.connack_overdue
        if overdue is not None and self._sock is not None and overdue():
            self._sock_close()
            self._do_on_disconnect(packet_from_broker=False, v1_rc=MQTTErrorCode.MQTT_ERR_KEEPALIVE)
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        return super().loop_misc()


class _PahoLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """paho's log lines: errors are kept as the cause of the next failure, the rest go out at DEBUG.

    paho formats a line for every packet when an `on_log` callback is set; through a logger, a line
    costs nothing unless DEBUG is on."""

    def __init__(self, transport: Transport):
        super().__init__(_paho_log, {})
        self._transport = transport

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        # called inside paho's network loop, which must not see an exception from here
        try:
            if level >= logging.ERROR:
                self._transport._paho_logged_error(str(msg) % args if args else str(msg))
            if self.logger.isEnabledFor(logging.DEBUG):
                self.logger.debug(msg, *args)
        except Exception:  # noqa: S110 - a malformed log line is not worth a failure
            pass


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Send small packets at once: without TCP_NODELAY a SUBSCRIBE or PUBACK can wait for the peer's
    delayed ACK (40 ms on Linux), which stalls a download between windows of chunks."""
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as err:
        _paho_log.debug("cannot set TCP_NODELAY: %s", err)


@dataclass
class _Attempt:
    """One connection attempt: where to, in which protocol, and what the broker has said so far."""

    url: str
    protocol: Literal["5", "3.1.1"]
    probe: bool
    """An MQTT 5 CONNECT to a broker whose protocol is not known yet (protocol auto)."""
    sent_at: float | None = None
    answered: bool = False
    overdue: bool = False
    settled: bool = False
    """Its outcome is handled (a refused CONNACK): the disconnect that follows says nothing more."""


def _trim(remembered: dict[int, Any]) -> None:
    """Keep the newest _MAX_SUBACKS entries of a packet-id map (a reply that never came leaks nothing)."""
    while len(remembered) > _MAX_SUBACKS:
        del remembered[next(iter(remembered))]


class Transport:
    """One MQTT connection: reconnects by itself, resubscribes, and hands messages to its owner.

    Started once and stopped once; to connect again after `stop`, make a new Transport.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        on_message: Callable[[Message], None],
        will: tuple[str, bytes, bool] | None = None,
        on_connection: Callable[[bool], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_message = on_message
        self._on_connection = on_connection
        client_id = settings.client_id or f"edgefleet-{uuid.uuid4().hex[:12]}"
        self.client_id = client_id
        if settings.protocol != "3.1.1":
            client = _Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        else:
            client = _Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                             clean_session=True)
        self._client = client
        # A raising callback of ours is already caught below; this keeps paho's own loop alive regardless.
        client.suppress_exceptions = True
        client.enable_logger(cast(logging.Logger, _PahoLog(self)))
        client.on_socket_open = self._socket_opened
        client.before_attempt = self._before_attempt
        client.connack_overdue = self._connack_overdue
        client.max_inflight_messages_set(settings.max_inflight)
        # paho annotates these as int but computes with them as float seconds.
        client.reconnect_delay_set(cast(int, settings.reconnect_min_s), cast(int, settings.reconnect_max_s))
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            try:
                client.tls_set(
                    ca_certs=str(settings.ca_file) if settings.ca_file else None,
                    certfile=str(settings.cert_file) if settings.cert_file else None,
                    keyfile=str(settings.key_file) if settings.key_file else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ValueError) as err:
                raise ConfigError(f"cannot load TLS files: {err}") from err
        elif settings.ca_file or settings.cert_file:
            raise ConfigError(f"TLS files given but {settings.url} is not mqtts://")
        if will is not None:
            topic, payload, retain = will
            client.will_set(topic, payload, qos=1, retain=retain)
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe

        self._lock = threading.Condition()
        self._subscriptions: dict[str, int] = {}
        self._subacks: dict[int, list[ReasonCode]] = {}
        """Reason codes a `subscribe(wait=...)` waits for, by packet id."""
        self._asked: dict[int, _Asked] = {}
        """SUBSCRIBEs sent and not yet answered, by packet id."""
        self._early: dict[int, list[ReasonCode]] = {}
        """SUBACKs that arrived before `subscribe` learned its packet id from paho."""
        self._sub_tokens: dict[str, int] = {}
        """Per filter, the latest `subscribe` call: a refusal of an older one, asked again since, is stale."""
        self._token = 0
        self._refusal_handlers: dict[str, RefusalHandler] = {}
        self._retry_delay: dict[str, float] = {}
        """Per refused filter without a refusal handler, the delay before it is asked for again."""
        self._resubscribe_mid: int | None = None
        self._ready = threading.Event()
        self._outcome = threading.Event()
        """Set once connected, or once every url has failed an attempt (see `wait_connected`)."""
        self._failed: set[str] = set()
        self._started = False
        self._stopping = False
        self._loop_thread: threading.Thread | None = None
        self._paho_error: str | None = None
        self._pending: deque[mqtt.MQTTMessageInfo] = deque()
        self._refused: dict[int, str] = {}
        self.last_error: str | None = None
        """Why the transport is not connected (refused credentials, TLS, unreachable), or None."""
        self.connects = 0
        self.reconnects = 0
        self.messages_in = 0
        self.bytes_in = 0
        self.messages_out = 0
        self.bytes_out = 0
        self.dropped_out = 0
        self.refused_out = 0
        self.callback_errors = 0
        self._url_index = 0
        self._spoken: dict[str, Literal["5", "3.1.1"]] = {}
        """The protocol each broker url answered, kept for the session: later attempts go straight to it."""
        self._trying_311: set[str] = set()
        self._attempt: _Attempt | None = None
        self._reported: dict[str, str] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start connecting in the background; returns at once, whether or not the broker is up."""
        if self._started:
            raise TransportError("transport already started")
        self._started = True
        s = self.settings
        if s.protocol != "3.1.1":
            self._client.connect_async(s.host, s.port, s.keepalive, clean_start=True)
        else:
            self._client.connect_async(s.host, s.port, s.keepalive)
        self._client.loop_start()

    def wait_connected(self, timeout: float | None = None, *, until_failed: bool = False) -> bool:
        """Block until connected with subscriptions restored; False on timeout (see `last_error`).

        With `until_failed`, also return False as soon as every url has failed an attempt (refused,
        unreachable, a TLS or credential error: the cause is in `last_error`), instead of waiting through
        the reconnects; a command line gives up there, a daemon keeps waiting."""
        if not until_failed:
            return self._ready.wait(timeout)
        self._outcome.wait(timeout)
        return self._ready.is_set()

    @property
    def connected(self) -> bool:
        """True while connected and subscribed."""
        return self._ready.is_set()

    @property
    def url(self) -> str:
        """The broker url connected to, or tried now (one of `settings.urls`)."""
        a = self._attempt
        return a.url if a is not None else self.settings.url

    @property
    def protocol(self) -> Literal["5", "3.1.1"]:
        """The MQTT version of the current connection (or attempt)."""
        a = self._attempt
        if a is not None:
            return a.protocol
        return "3.1.1" if self.settings.protocol == "3.1.1" else "5"

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no will is sent) and join the network thread, waiting at most `timeout`."""
        if not self._started or self._stopping:
            return
        self._stopping = True
        self._client.disconnect()
        stopper = threading.Thread(target=self._client.loop_stop, name="mqtt-stop", daemon=True)
        stopper.start()
        stopper.join(timeout)
        if stopper.is_alive():
            log.warning("MQTT network thread did not stop within %.1f s", timeout)
        self._ready.clear()

    def __enter__(self) -> Transport:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ publish

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                wait: bool | float = False) -> None:
        """Queue a message; QoS 1 survives reconnects. With `wait`, block until acknowledged or raise.

        `wait=True` waits up to DEFAULT_PUBLISH_TIMEOUT_S, a number waits that many seconds. QoS 0
        while disconnected is dropped (counted in `dropped_out`). A PUBACK with a failure reason
        (MQTT 5, e.g. "Not authorized") raises TransportError when waiting and is logged otherwise.
        """
        if wait is not False and threading.current_thread() is self._loop_thread:
            raise TransportError("publish(wait=...) from an MQTT callback would block the network thread")
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as err:
            raise TransportError(f"cannot publish to {topic}: {err}") from err
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            if qos == 0:
                self.dropped_out += 1
                log.debug("not connected: QoS 0 message to %s dropped", topic)
                return
            # paho keeps QoS > 0 messages and sends them after the reconnect: not an error.
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"cannot publish to {topic}: {mqtt.error_string(info.rc)}")
        with self._lock:
            self.messages_out += 1
            self.bytes_out += len(payload)
            if qos > 0:
                self._pending.append(info)
                self._prune()
        if wait is False:
            return
        timeout = DEFAULT_PUBLISH_TIMEOUT_S if wait is True else float(wait)
        deadline = time.monotonic() + timeout
        try:
            while not info.is_published():
                if self._stopping:
                    raise TransportError(f"publish to {topic}: the transport was stopped before the broker acknowledged")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    why = f" ({self.last_error})" if self.last_error else ""
                    raise TransportError(f"publish to {topic}: not acknowledged within {timeout:g} s{why}")
                info.wait_for_publish(min(remaining, 0.1))
        except (RuntimeError, ValueError) as err:
            raise TransportError(f"publish to {topic} failed: {err}") from err
        refused = self._refused.pop(info.mid, None)
        if refused is not None:
            raise TransportError(f"broker refused the message to {topic}: {refused}")

    def _prune(self) -> None:
        while self._pending and self._pending[0].is_published():
            self._pending.popleft()

    @property
    def unacked(self) -> int:
        """QoS > 0 messages handed to the broker and not yet acknowledged (or not yet sent)."""
        with self._lock:
            self._prune()
            return sum(1 for i in self._pending if not i.is_published())

    def drain(self, max_unacked: int = 0, timeout: float | None = None) -> bool:
        """Block until at most `max_unacked` QoS > 0 messages await acknowledgement; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                self._prune()
                head = self._pending[0] if len(self._pending) > max_unacked else None
            if head is None:
                return True
            if self._stopping:
                return False
            remaining = 1.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return False
            head.wait_for_publish(min(remaining, 0.1))

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every QoS > 0 message is acknowledged; False on timeout."""
        return self.drain(0, timeout)

    # ------------------------------------------------------------------ subscribe

    def subscribe(self, topics: str | Iterable[str], qos: int = 1, wait: bool | float = False,
                  on_refused: RefusalHandler | None = None) -> None:
        """Subscribe now (or at the next connect) and again after every reconnect.

        With `wait`, block until the broker acknowledged (connecting first if needed) and raise
        TransportError when it refused a topic. A filter the broker refuses, now or when it is sent
        again after a reconnect, is with `on_refused` forgotten (not sent again) and reported there with
        the broker's reason, on the network thread (or on this one when the SUBACK came first); the
        handler must not block. Without it the filter is one its owner cannot do without: it is logged
        as an error, kept, and asked for again after a delay that doubles from RESUBSCRIBE_MIN_S to
        RESUBSCRIBE_MAX_S, since a refusal can pass (a cluster electing new leaders, an ACL reloaded).
        """
        names = [topics] if isinstance(topics, str) else list(topics)
        if not names:
            return
        if wait is not False and threading.current_thread() is self._loop_thread:
            raise TransportError("subscribe(wait=...) from an MQTT callback would block the network thread")
        with self._lock:
            asked = _Asked([], waited=wait is not False)
            for name in names:
                self._subscriptions[name] = qos
                self._token += 1
                self._sub_tokens[name] = self._token
                asked.filters.append((name, self._token))
                if on_refused is not None:
                    self._refusal_handlers[name] = on_refused
                else:
                    self._refusal_handlers.pop(name, None)
        try:
            rc, mid = self._client.subscribe([(n, qos) for n in names])
        except ValueError as err:
            with self._lock:
                for name in names:
                    self._forget(name)
            raise TransportError(f"cannot subscribe to {names}: {err}") from err
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._answered(mid, asked=asked)
        if wait is False:
            return
        timeout = DEFAULT_PUBLISH_TIMEOUT_S if wait is True else float(wait)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            # Not connected: the subscription goes out with the others when the connection is made.
            if not self._ready.wait(timeout):
                raise TransportError(f"subscribe {names}: not connected within {timeout:g} s ({self.last_error})")
            return
        with self._lock:
            if not self._lock.wait_for(lambda: mid in self._subacks, timeout):
                asked.waited = False  # a late SUBACK is settled, not kept for a waiter that left
                raise TransportError(f"subscribe {names}: not acknowledged within {timeout:g} s")
            codes = self._subacks.pop(mid)
        refused = [f"{n}: {c}" for n, c in zip(names, codes, strict=False) if c.is_failure]
        if refused:
            raise TransportError(f"broker refused the subscription {'; '.join(refused)}")

    def unsubscribe(self, topics: str | Iterable[str]) -> None:
        """Stop receiving these topics (and do not subscribe them again on reconnect)."""
        names = [topics] if isinstance(topics, str) else list(topics)
        with self._lock:
            for name in names:
                self._forget(name)
        if names and self.connected:
            self._client.unsubscribe(names)

    def _forget(self, name: str) -> None:
        """Drop a filter from what is sent again after a reconnect (under the lock)."""
        self._subscriptions.pop(name, None)
        self._sub_tokens.pop(name, None)
        self._refusal_handlers.pop(name, None)
        self._retry_delay.pop(name, None)

    def _answered(self, mid: int, *, asked: _Asked | None = None, codes: list[ReasonCode] | None = None) -> None:
        """The two halves of a SUBSCRIBE's answer meet here, in either order: the filters sent, once paho
        returned the packet id, and the SUBACK's reason codes, which paho's network thread may handle
        first. The second to come settles the subscription."""
        with self._lock:
            if asked is None:
                asked = self._asked.pop(mid, None)
                if asked is None:
                    self._early[mid] = codes or []
                    _trim(self._early)
                    return
            else:
                codes = self._early.pop(mid, None)
                if codes is None:
                    self._asked[mid] = asked
                    _trim(self._asked)
                    return
            assert codes is not None
            if asked.waited:
                self._subacks[mid] = codes
                _trim(self._subacks)
                self._lock.notify_all()
        self._settle(asked.filters, codes)

    def _settle(self, filters: list[tuple[str, int]], codes: list[ReasonCode]) -> None:
        """A SUBACK answered `filters`: forget the refused ones and report them (any thread, no lock held)."""
        handled: dict[int, tuple[RefusalHandler, list[tuple[str, str]]]] = {}
        unhandled: list[str] = []
        retries: list[tuple[str, int, float]] = []
        with self._lock:
            for (name, token), code in zip(filters, codes, strict=False):
                if self._sub_tokens.get(name) != token:
                    continue  # asked again since: the newer SUBACK decides
                if not code.is_failure:
                    self._retry_delay.pop(name, None)
                    continue
                handler = self._refusal_handlers.get(name)
                if handler is None:
                    delay = self._retry_delay.get(name, RESUBSCRIBE_MIN_S)
                    self._retry_delay[name] = min(2 * delay, RESUBSCRIBE_MAX_S)
                    retries.append((name, token, delay))
                    unhandled.append(str(code))
                else:
                    self._forget(name)
                    handled.setdefault(id(handler), (handler, []))[1].append((name, str(code)))
        if unhandled:
            log.error("broker refused %d subscription(s): %s; asking again in %g s", len(unhandled),
                      ", ".join(sorted(set(unhandled))), min(d for _, _, d in retries))
        for name, token, delay in retries:
            timer = threading.Timer(delay, self._resubscribe_refused, (name, token))
            timer.daemon = True
            timer.start()
        for handler, refused in handled.values():
            log.debug("broker refused %d subscription(s), reported to their owner", len(refused))
            try:
                handler(refused)
            except Exception:
                self._callback_failed("subscription refusal")

    def _resubscribe_refused(self, name: str, token: int) -> None:
        """Ask again for a refused filter its owner still wants (a timer thread)."""
        with self._lock:
            qos = self._subscriptions.get(name)
            if self._stopping or qos is None or self._sub_tokens.get(name) != token:
                return  # stopped, unsubscribed, or subscribed again since
        self.subscribe(name, qos)  # the delay so far stays: a new refusal doubles it

    @property
    def subscriptions(self) -> dict[str, int]:
        """The topics (and QoS) subscribed again after every reconnect."""
        with self._lock:
            return dict(self._subscriptions)

    # ------------------------------------------------------------------ paho callbacks (network thread)

    def _callback_failed(self, where: str) -> None:
        self.callback_errors += 1
        log.exception("error in MQTT %s callback (the network loop continues)", where)

    def _set_error(self, text: str, url: str | None = None) -> None:
        # once at ERROR per url and cause: retries, and the turns of several urls, repeat it at DEBUG
        url = url or self.url
        if text != self._reported.get(url):
            log.error("%s", text)
        else:
            log.debug("%s", text)
        self._reported[url] = text
        self.last_error = text

    def _attempt_failed(self, text: str, url: str) -> None:
        """An attempt at `url` failed for good (not a protocol probe): once every url has, waiters learn it."""
        self._set_error(text, url)
        self._failed.add(url)
        if self._failed.issuperset(self.settings.urls):
            self._outcome.set()

    def _closed_early(self, a: _Attempt, why: object) -> bool:
        """An attempt closed before any CONNACK: when TLS explains it (a TLS port for a plain url, a client
        certificate the broker wants or refuses), report that (True)."""
        tls, host, port = parse_url(a.url)
        known = closed_before_connack(str(why), tls=tls, host=host, port=port)
        if known is None:
            return False
        a.settled = True
        self._next_url()
        self._attempt_failed(f"cannot connect to {a.url}: {known}", a.url)
        return True

    # -- which url, which protocol

    def _protocol_for(self, url: str) -> Literal["5", "3.1.1"]:
        if self.settings.protocol != "auto":
            return self.settings.protocol
        return self._spoken.get(url) or ("3.1.1" if url in self._trying_311 else "5")

    def _before_attempt(self) -> None:
        """Point paho at the url whose turn it is, in the protocol known (or to be tried) there."""
        url = self.settings.urls[self._url_index]
        protocol = self._protocol_for(url)
        _, host, port = parse_url(url)
        c = self._client
        # paho has no public switch between attempts (its setters refuse while it reconnects)
        c._host, c._port = host, port
        if protocol == "5":
            c._protocol = mqtt.MQTTv5
        elif c._protocol != mqtt.MQTTv31:  # paho steps down to 3.1 by itself after a 3.1.1 refusal
            c._protocol = mqtt.MQTTv311
            c._clean_session = True
        probe = self.settings.protocol == "auto" and protocol == "5" and url not in self._spoken
        self._attempt = _Attempt(url, protocol, probe)

    def _socket_opened(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # the CONNACK clock starts once TCP (and TLS) is up, right before the CONNECT goes out
        _no_delay(client, userdata, sock)
        if self._attempt is not None:
            self._attempt.sent_at = time.monotonic()

    def _connack_overdue(self) -> bool:
        a = self._attempt
        if a is None or not a.probe or a.answered or a.overdue or a.sent_at is None:
            return False
        if time.monotonic() - a.sent_at < self.settings.connack_timeout_s:
            return False
        a.overdue = True
        return True

    def _next_url(self) -> None:
        """The next attempt goes to the next url (a cluster's next node), in turn."""
        self._url_index = (self._url_index + 1) % len(self.settings.urls)

    def _try_311(self, a: _Attempt, why: str) -> None:
        """After an MQTT 5 CONNECT the broker did not take: try 3.1.1 there, quietly (nothing needs 5)."""
        log.debug("broker %s: %s to an MQTT 5 CONNECT; trying MQTT 3.1.1", a.url, why)
        self._trying_311.add(a.url)
        a.settled = True

    def _learned(self, a: _Attempt) -> None:
        """The broker answered a CONNECT of this protocol: keep it for every later attempt there."""
        if self.settings.protocol != "auto" or a.url in self._spoken:
            return
        self._spoken[a.url] = a.protocol
        self._trying_311.discard(a.url)
        if a.protocol == "3.1.1":
            log.info("broker %s speaks MQTT 3.1.1; using it", a.url)

    # -- callbacks

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                        reason_code: ReasonCode, properties: Properties | None) -> None:
        try:
            self._loop_thread = threading.current_thread()
            a = self._attempt or _Attempt(self.settings.url, self.protocol, probe=False)
            a.answered = True
            if reason_code.is_failure and a.probe and "protocol version" in str(reason_code).lower():
                self._try_311(a, f"refused ({reason_code})")
                return
            self._learned(a)
            if reason_code.is_failure:
                a.settled = True
                self._next_url()
                hint = " (check user name, password and certificate)" if reason_code.value in (134, 135) else ""
                self._attempt_failed(f"broker {a.url} refused the connection: {reason_code}{hint}", a.url)
                return
            self._paho_error = None
            self.connects += 1
            if self.connects > 1:
                self.reconnects += 1
            self.last_error = None
            self._reported.pop(a.url, None)
            limit = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
            if limit is not None and limit < self.settings.max_inflight:
                log.warning("broker receive maximum %s is below max_inflight %s", limit, self.settings.max_inflight)
            log.info("connected to %s as %s", a.url, self.client_id)
            with self._lock:
                subs = list(self._subscriptions.items())
                asked = _Asked([(name, self._sub_tokens.get(name, 0)) for name, _qos in subs])
            if subs:
                rc, mid = client.subscribe(subs)
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                    self._resubscribe_mid = mid
                    self._answered(mid, asked=asked)
                    return  # ready once the SUBACK arrives
            self._became_ready()
        except Exception:
            self._callback_failed("connect")

    def _became_ready(self) -> None:
        self._failed.clear()
        self._ready.set()
        self._outcome.set()
        if self._on_connection is not None:
            self._on_connection(True)

    def _paho_logged_error(self, text: str) -> None:
        # paho 2.2 logs "Client is not connected" at ERROR after every disconnect: not a cause.
        if not text.startswith("Client is not connected"):
            self._paho_error = text

    def _handle_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        try:
            url = self.url
            self._next_url()
            err = self._client.last_exception
            tls, host, port = parse_url(url)
            why = connect_failure(err, tls=tls, host=host, port=port) if err is not None else "connection failed"
            self._attempt_failed(f"cannot connect to {url}: {why}", url)
        except Exception:
            self._callback_failed("connect_fail")

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                           reason_code: ReasonCode, properties: Properties | None) -> None:
        try:
            was_ready = self._ready.is_set()
            self._ready.clear()
            if was_ready:  # a waiter after this one waits for the next connection or the next failures
                self._outcome.clear()
            with self._lock:  # unanswered SUBSCRIBEs die with the connection; the reconnect sends them again
                self._asked.clear()
            a = self._attempt or _Attempt(self.settings.url, self.protocol, probe=False)
            why = self._paho_error or reason_code
            self._paho_error = None
            if self._stopping:
                log.info("disconnected from %s", a.url)
            elif not was_ready and a.probe and not a.answered and not a.overdue and self._closed_early(a, why):
                pass  # a TLS matter, not an MQTT 3.1.1 one: reported as such, no 3.1.1 attempt
            elif not was_ready and a.probe and not a.answered:
                # Some 3.1.1 brokers close an MQTT 5 CONNECT they cannot parse, others never answer it.
                self._try_311(a, f"no CONNACK within {self.settings.connack_timeout_s:g} s" if a.overdue
                              else f"connection closed without a CONNACK ({why})")
            elif was_ready:
                self._next_url()
                self._set_error(f"connection to {a.url} lost: {why}", a.url)
            elif not a.settled:
                if not a.answered:
                    self._trying_311.discard(a.url)  # 3.1.1 went unanswered too: not a protocol matter
                if a.answered or not self._closed_early(a, why):
                    self._next_url()
                    self._attempt_failed(f"connection to {a.url} closed before it was ready: {why}", a.url)
            if was_ready and self._on_connection is not None:
                self._on_connection(False)
        except Exception:
            self._callback_failed("disconnect")

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
            self.messages_in += 1
            self.bytes_in += len(payload)
            self._on_message(Message(topic=msg.topic, payload=payload, retain=bool(msg.retain), qos=msg.qos))
        except Exception:
            self._callback_failed("message")

    def _handle_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: ReasonCode,
                        properties: Properties | None) -> None:
        try:
            # Runs before paho marks the message published, so a waiting publish() sees the refusal.
            if reason_code.is_failure:
                self.refused_out += 1
                self._refused[mid] = str(reason_code)
                log.warning("broker refused message %d: %s", mid, reason_code)
            else:
                self._refused.pop(mid, None)  # a stale refusal of an earlier message with this mid
        except Exception:
            self._callback_failed("publish")

    def _handle_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                          reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        try:
            self._answered(mid, codes=reason_codes)
            if mid == self._resubscribe_mid:
                self._resubscribe_mid = None
                self._became_ready()
        except Exception:
            self._callback_failed("subscribe")
