"""`edgectl broker check`: what a broker does with the messages edgefleet relies on, measured.

Every property is measured through real client sessions, never read from a version string: the MQTT
versions the broker accepts, whether a retained message reaches a wildcard subscription (agents find
their deployment documents through `models/+`, hosts the devices through `devices/+/status`), how many
QoS 1 subscriptions one session is granted (an agent holds its own few plus one per chunk it is
downloading), the largest retained payload accepted and delivered, whether retained messages survive
a broker restart (a marker left with `--before-restart` and looked for with `--after-restart`), and
what a device credential may read and publish.

The probes live under `P/sync/{run}/...`, the hosts' own area, with a fresh run id each time; every
retained probe is cleared before the check returns (only the restart marker stays, when asked for).
A `Session` is one client connection; `TransportSession` is the real one, and the checks take any
opener, so their logic runs against a stand-in broker in the unit tests too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from edgefleet.converter.fleet.observer import Sync
from edgefleet.errors import TransportError, UsageError
from edgefleet.protocol import DEFAULT_CHUNK_SIZE, Topics
from edgefleet.protocol.canonical import MAX_DOCUMENT_BYTES
from edgefleet.transport import Message, MqttSettings, Transport

log = logging.getLogger(__name__)

Verdict = Literal["ok", "warn", "fail", "skip"]
Version = Literal["5", "3.1.1"]
VERDICTS: tuple[Verdict, ...] = ("ok", "warn", "fail", "skip")

DEFAULT_TIMEOUT_S = 5.0
# An agent's own subscriptions: its deployment documents, its commands, the channel heartbeat and
# (typically) one group's documents; each chunk it is downloading takes one more.
AGENT_SUBSCRIPTIONS = 4
CHUNK_WINDOW = 64
MAX_SUBSCRIPTIONS = 128
# Growing retained payloads: a small document, one chunk of the default size, the largest document an
# agent reads, then the sizes a bundle written with a larger chunk size needs.
PAYLOAD_SIZES = (16 << 10, DEFAULT_CHUNK_SIZE, 256 << 10, MAX_DOCUMENT_BYTES, 2 << 20, 4 << 20)
# The restart marker keeps one name, so that a later run finds what an earlier one left.
MARKER_RUN = "edgectl-broker-check"
MARKER_NAME = "restart"
RABBITMQ_NOTE = ("RabbitMQ 3.10's MQTT plugin behaves like this: agents never receive their group's "
                 "documents, a late joiner never gets the model, and push --wait sees no device")


@dataclass(frozen=True)
class Finding:
    """One measured property: its verdict, what was measured, and what that means for edgefleet."""

    check: str
    verdict: Verdict
    value: str
    meaning: str

    def to_dict(self) -> dict[str, str]:
        """The finding as JSON-ready values."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Report:
    """Every finding about one broker; `ok` unless a finding failed (warnings and skips are ok)."""

    broker: str
    protocol: str
    findings: tuple[Finding, ...]
    leftovers: tuple[str, ...] = ()
    """Retained probes that could not be cleared (the operator clears them by hand)."""

    @property
    def ok(self) -> bool:
        return all(f.verdict != "fail" for f in self.findings)

    def finding(self, check: str) -> Finding:
        """The finding of one check, by its name."""
        return next(f for f in self.findings if f.check == check)

    def to_dict(self) -> dict[str, Any]:
        """The report as one JSON-ready document."""
        return {"broker": self.broker, "protocol": self.protocol, "ok": self.ok,
                "checks": [f.to_dict() for f in self.findings], "leftovers": list(self.leftovers)}


class Session(Protocol):
    """One connected client as the checks use it. Every call waits for the broker's answer and raises
    TransportError when the broker refuses, does not answer in time or closes the connection."""

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the acknowledgement."""

    def subscribe(self, topic_filter: str) -> None:
        """Subscribe at QoS 1 and wait for the SUBACK."""

    def settle(self) -> None:
        """Return once every message the broker routed to this session so far has arrived."""

    def wait_for(self, topic: str, timeout: float,
                 match: Callable[[Message], bool] = lambda m: True) -> Message | None:
        """The first message on `topic` satisfying `match`, already received or arriving within `timeout`."""

    def close(self) -> None:
        """Disconnect."""


Opener = Callable[[MqttSettings], Session]


class TransportSession:
    """A Session over an edgefleet Transport, connected when constructed."""

    def __init__(self, settings: MqttSettings, topics: Topics, timeout: float = DEFAULT_TIMEOUT_S,
                 connect_timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout = timeout
        self._cond = threading.Condition()
        self._inbox: list[Message] = []
        self._lost = threading.Event()
        self._subscribed_sync = False
        self.transport = Transport(settings, on_message=self._on_message, on_connection=self._on_connection)
        self._sync = Sync(topics, self.transport.client_id)
        self.transport.start()
        deadline = time.monotonic() + connect_timeout
        # The first answer decides: a connection probe must not sit through the reconnect backoff.
        while not self.transport.wait_connected(0.05):
            why = self.transport.last_error
            if why is None and time.monotonic() > deadline:
                why = f"no CONNACK from {settings.url} within {connect_timeout:g} s"
            if why is not None:
                self.transport.stop(timeout=2)
                raise TransportError(why)

    def _on_message(self, message: Message) -> None:
        if self._sync.handle(message):
            return
        with self._cond:
            self._inbox.append(message)
            self._cond.notify_all()

    def _on_connection(self, up: bool) -> None:
        if not up:
            self._lost.set()

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if self._lost.is_set():
            raise TransportError("the broker closed the connection earlier")
        refused = self.transport.refused_out
        self.transport.publish(topic, payload, qos=1, retain=retain)
        deadline = time.monotonic() + self.timeout
        # Polled rather than waited in the transport: a broker that drops the connection over a
        # message would otherwise have it sent again after every reconnect until the timeout.
        while not self.transport.drain(0, 0.05):
            if self._lost.is_set():
                raise TransportError("the broker closed the connection")
            if time.monotonic() > deadline:
                raise TransportError(f"not acknowledged within {self.timeout:g} s")
        if self.transport.refused_out > refused:
            raise TransportError("the broker refused it")

    def subscribe(self, topic_filter: str) -> None:
        if self._lost.is_set():
            raise TransportError("the broker closed the connection earlier")
        self.transport.subscribe(topic_filter, qos=1, wait=self.timeout)

    def settle(self) -> None:
        if not self._subscribed_sync:
            self.transport.subscribe(self._sync.topic, qos=1, wait=self.timeout)
            self._subscribed_sync = True
        self._sync.wait(self.transport, self.timeout)

    def wait_for(self, topic: str, timeout: float,
                 match: Callable[[Message], bool] = lambda m: True) -> Message | None:
        def found() -> Message | None:
            return next((m for m in self._inbox if m.topic == topic and match(m)), None)

        with self._cond:
            self._cond.wait_for(lambda: found() is not None, timeout)
            return found()

    def close(self) -> None:
        self.transport.stop(timeout=2)


def transport_opener(topics: Topics, timeout: float, connect_timeout: float = DEFAULT_TIMEOUT_S) -> Opener:
    """Open real sessions (Transport) with these time limits."""
    return lambda settings: TransportSession(settings, topics, timeout, connect_timeout)


@dataclass(frozen=True)
class DeviceLogin:
    """A device credential to check the ACL with: its settings (user name = device id)."""

    device_id: str
    settings: MqttSettings


@dataclass
class Checker:
    """One run of the checks against one broker."""

    settings: MqttSettings
    topics: Topics
    opener: Opener
    timeout: float = DEFAULT_TIMEOUT_S
    device: DeviceLogin | None = None
    restart: Literal["before", "after"] | None = None
    clear_marker: bool = True
    """With restart "after": clear the marker once found (not before the last node of a cluster was asked)."""
    max_subscriptions: int = MAX_SUBSCRIPTIONS
    run: str = field(default_factory=lambda: f"check-{uuid.uuid4().hex[:12]}")
    retained: set[str] = field(default_factory=set)
    """Retained probes published so far, cleared at the end."""

    def session(self, protocol: Version, device: DeviceLogin | None = None) -> Session:
        """A connected session speaking `protocol`: the host's, or with `device`'s credential and client id."""
        if device is not None:
            return self.opener(dataclasses.replace(device.settings, protocol=protocol))
        client_id = f"edgectl-{self.run}-{uuid.uuid4().hex[:6]}"
        return self.opener(dataclasses.replace(self.settings, protocol=protocol, client_id=client_id))

    # ------------------------------------------------------------------ the whole run

    def check(self) -> Report:
        """Run every check; UsageError when the broker accepts neither MQTT version."""
        versions, protocol = self.check_versions()
        findings = [versions]
        checks: list[tuple[str, Callable[[Version], Finding | list[Finding]]]] = [
            ("retained on wildcard", self.check_retained_wildcard),
            ("QoS 1 subscriptions", self.check_subscriptions),
            ("max payload", self.check_payload),
            ("retained after restart", self.check_restart),
            ("device ACL", self.check_device_acl),
        ]
        try:
            for name, run in checks:
                try:
                    found = run(protocol)
                except TransportError as err:  # the broker went away or stopped answering mid-check
                    found = Finding(name, "fail", f"probe failed: {err}", "could not finish the check")
                findings.extend(found if isinstance(found, list) else [found])
        finally:
            leftovers = self.clear_retained(protocol)
        return Report(self.settings.url, protocol, tuple(findings), leftovers)

    def clear_retained(self, protocol: Version) -> tuple[str, ...]:
        """Clear every retained probe published so far; the topics that could not be cleared."""
        if not self.retained:
            return ()
        try:
            session = self.session(protocol)
        except TransportError as err:
            log.info("cannot connect to clear the probes: %s", err)
            return tuple(sorted(self.retained))
        left = []
        try:
            for topic in sorted(self.retained):
                try:
                    session.publish(topic, b"", retain=True)
                    self.retained.discard(topic)
                except TransportError as err:
                    log.info("cannot clear %s: %s", topic, err)
                    left.append(topic)
        finally:
            session.close()
        return tuple(left)

    def _publish_retained(self, session: Session, topic: str, payload: bytes) -> None:
        self.retained.add(topic)
        session.publish(topic, payload, retain=True)

    # ------------------------------------------------------------------ MQTT versions

    def check_versions(self) -> tuple[Finding, Version]:
        """Connect with MQTT 5 and with 3.1.1; the finding and the version the other checks use."""
        why: dict[str, str] = {}
        versions: tuple[Version, ...] = ("5", "3.1.1")
        url = self.settings.url
        for version in versions:
            try:
                self.session(version).close()
            except TransportError as err:
                # the url is said once, where the line starts: "refused the connection: ..." says the rest
                why[version] = str(err).removeprefix(f"broker {url} ")
        accepted = [v for v in versions if v not in why]
        if not accepted:
            reasons = set(why.values())
            detail = why["5"] if len(reasons) == 1 else f"MQTT 5: {why['5']}; MQTT 3.1.1: {why['3.1.1']}"
            raise UsageError(f"cannot use the broker {url}: {detail}")
        protocol = next((v for v in accepted if v == self.settings.protocol), accepted[0])
        if len(accepted) == 2:
            return Finding("MQTT versions", "ok", "5 and 3.1.1",
                           "agents and edgectl speak MQTT 5; refused messages and subscriptions are reported"), protocol
        if accepted == ["5"]:
            return Finding("MQTT versions", "ok", f"5 only (3.1.1: {why['3.1.1']})",
                           "edgefleet speaks MQTT 5; clients limited to 3.1.1 cannot connect"), protocol
        return Finding("MQTT versions", "warn", f"3.1.1 only (5: {why['5']})",
                       "works with protocol \"auto\" or \"3.1.1\"; refused publishes and subscriptions go "
                       "unnoticed and fleet collect --share needs MQTT 5"), protocol

    # ------------------------------------------------------------------ retained on wildcards

    def check_retained_wildcard(self, protocol: Version) -> Finding:
        """Publish a retained probe, then look for it through a fresh `+` subscription (and, when that
        gets nothing, through the exact topic, to tell "no retained on wildcards" from "no retained")."""
        name = "retained on wildcard"
        topic = self.topics.probe(self.run, "retained")
        token = uuid.uuid4().hex.encode()
        try:
            writer = self.session(protocol)
            try:
                self._publish_retained(writer, topic, token)
            finally:
                writer.close()
            reader = self.session(protocol)
            try:
                reader.subscribe(self.topics.probes(self.run))
                reader.settle()
                if reader.wait_for(topic, 0.0, carrying(token)) is not None:
                    return Finding(name, "ok", "delivered to a '+' subscription",
                                   "agents find their group's documents (models/+), hosts the devices "
                                   "(devices/+/status), late joiners the model")
                reader.subscribe(topic)
                reader.settle()
                exact = reader.wait_for(topic, 0.0, carrying(token)) is not None
            finally:
                reader.close()
        except TransportError as err:
            return Finding(name, "fail", f"probe failed: {err}", "edgefleet needs retained messages")
        return judge_retained(exact)

    # ------------------------------------------------------------------ QoS 1 subscriptions

    def check_subscriptions(self, protocol: Version) -> Finding:
        """Subscribe distinct QoS 1 filters in one session until the broker refuses one (or the cap)."""
        name = "QoS 1 subscriptions"
        session = self.session(protocol)
        granted, refusal = 0, ""
        try:
            for i in range(self.max_subscriptions):
                topic = self.topics.probe(self.run, f"sub-{i}")
                try:
                    session.subscribe(topic)
                except TransportError as err:
                    refusal = str(err).replace(f"broker refused the subscription {topic}: ", "")
                    break
                granted += 1
        finally:
            session.close()
        return judge_subscriptions(granted, refusal, self.max_subscriptions, name)

    # ------------------------------------------------------------------ payload size

    def check_payload(self, protocol: Version) -> Finding:
        """Publish growing retained payloads and read each back; stop at the first refusal or disconnect."""
        topic = self.topics.probe(self.run, "payload")
        largest, refused = 0, ""
        session = self.session(protocol)
        try:
            session.subscribe(topic)
            for size in PAYLOAD_SIZES:
                payload = uuid.uuid4().hex.encode().ljust(size, b"p")
                try:
                    self._publish_retained(session, topic, payload)
                except TransportError as err:
                    refused = f"{_size(size)} refused ({err})"
                    break
                if session.wait_for(topic, self.timeout, carrying(payload)) is None:
                    refused = f"{_size(size)} accepted but not delivered within {self.timeout:g} s"
                    break
                largest = size
        except TransportError as err:
            refused = f"probe failed: {err}"
        finally:
            session.close()
        return judge_payload(largest, refused)

    # ------------------------------------------------------------------ persistence

    def check_restart(self, protocol: Version) -> Finding:
        """Leave the restart marker (--before-restart), or look for it and clear it (--after-restart)."""
        name = "retained after restart"
        topic = self.topics.probe(MARKER_RUN, MARKER_NAME)
        if self.restart is None:
            return Finding(name, "skip", "not checked",
                           "run with --before-restart, restart the broker, then run with --after-restart")
        session = self.session(protocol)
        try:
            if self.restart == "before":
                marker = json.dumps({"left_at": time.time(), "broker": self.settings.url}).encode()
                session.publish(topic, marker, retain=True)
                return Finding(name, "skip", "marker left",
                               "restart the broker now, then run edgectl broker check --after-restart")
            session.subscribe(topic)
            session.settle()
            found = session.wait_for(topic, 0.0, lambda m: bool(m.payload))
        finally:
            session.close()
        if found is not None and self.clear_marker:
            self.retained.add(topic)  # cleared with the other probes
        return judge_restart(found)

    # ------------------------------------------------------------------ a device's ACL

    def check_device_acl(self, protocol: Version) -> list[Finding]:
        """What a device credential may read and publish (nothing retained is sent on its behalf)."""
        if self.device is None:
            return [Finding("device ACL", "skip", "not checked",
                            "give --device-user and --device-password-file (a spare device credential) to check")]
        return DeviceAclProbe(self, self.device, protocol).run()


def carrying(payload: bytes) -> Callable[[Message], bool]:
    """A match for the message that carries exactly `payload`."""
    return lambda m: m.payload == payload


def judge_retained(exact: bool) -> Finding:
    """The retained-on-wildcard verdict once the `+` subscription got nothing: `exact` tells whether the
    exact topic got the probe."""
    name = "retained on wildcard"
    if exact:
        return Finding(name, "fail", "none on a '+' subscription; delivered on the exact topic",
                       f"unsupported: edgefleet subscribes with '+' to retained documents. {RABBITMQ_NOTE}")
    return Finding(name, "fail", "no retained message delivered at all",
                   "unsupported: chunks, deployment documents and device status are retained messages")


def judge_subscriptions(granted: int, refusal: str, cap: int, name: str = "QoS 1 subscriptions") -> Finding:
    """The subscription limit's verdict: `granted` filters before `refusal` (empty: none refused up to `cap`)."""
    if not refusal:
        value = f"at least {granted} (none refused)" if granted >= cap else f"{granted}"
    else:
        value = f"{granted} granted, subscription {granted + 1} refused ({refusal})"
    if not refusal or granted > AGENT_SUBSCRIPTIONS:
        return Finding(name, "ok", value, f"an agent holds {AGENT_SUBSCRIPTIONS} QoS 1 subscriptions; its chunk "
                       f"subscriptions (up to {CHUNK_WINDOW}) are QoS 0, and its download window shrinks to what "
                       "the broker grants")
    return Finding(name, "fail", value, f"an agent needs {AGENT_SUBSCRIPTIONS} QoS 1 subscriptions plus at least one "
                   "for the chunk it downloads")


def judge_payload(largest: int, refused: str) -> Finding:
    """The payload verdict: the `largest` size accepted and delivered, and why the next one was not."""
    name = "max payload"
    value = f"{_size(largest) if largest else 'nothing'} accepted"
    value += f"; {refused}" if refused else " (the largest tried)"
    if largest >= MAX_DOCUMENT_BYTES:
        return Finding(name, "ok", value, f"chunks ({_size(DEFAULT_CHUNK_SIZE)} by default) and documents up to "
                       f"{_size(MAX_DOCUMENT_BYTES)} fit")
    if largest >= DEFAULT_CHUNK_SIZE:
        return Finding(name, "warn", value, f"chunks of {_size(DEFAULT_CHUNK_SIZE)} fit; a document or bundle "
                       "chunk above the accepted size is refused")
    return Finding(name, "fail", value, f"a chunk of the default {_size(DEFAULT_CHUNK_SIZE)} does not fit")


def judge_restart(found: Message | None) -> Finding:
    """The persistence verdict from the marker found after the restart (None: gone)."""
    name = "retained after restart"
    if found is None:
        return Finding(name, "fail", "marker gone (or --before-restart was not run with this --prefix)",
                       "a broker restart loses the retained chunks and documents: devices that were offline "
                       "get nothing until the next push")
    try:
        age = f", left {time.time() - float(json.loads(found.payload)['left_at']):.0f} s ago"
    except (ValueError, KeyError, TypeError):
        age = ""
    return Finding(name, "ok", f"marker kept{age}", "retained chunks and documents survive a broker restart")


class DeviceAclProbe:
    """A device session subscribes to its topics and another device's; the host publishes on them
    (forbidden ones first: messages from one client arrive in order, so once the allowed ones are in,
    a forbidden one would have come). Then the device publishes where it may and where it must not,
    and the host, subscribed to all of it, sees what got through. Payloads are empty and not
    retained: an agent ignores an empty document, so a probe can change nothing."""

    def __init__(self, checker: Checker, device: DeviceLogin, protocol: Version) -> None:
        self.checker = checker
        self.device = device
        self.protocol = protocol
        t = checker.topics
        me = device.device_id
        suffix = uuid.uuid4().hex[:8]
        other, group, model = f"check-device-{suffix}", f"check-group-{suffix}", f"check-model-{suffix}"
        fake_chunk = t.chunk(uuid.uuid4().hex * 2)
        # name: (topic the host publishes on, filter the device subscribes)
        self.reads = {
            "its deployment documents": (t.device_model(me, model), t.device_models(me)),
            "its commands": (t.cmd(me), t.cmd(me)),
            "group documents": (t.group_model(group, model), t.group_models(group)),
            "chunks": (fake_chunk, fake_chunk),
            "the channel heartbeat": (t.timestamp(), t.timestamp()),
        }
        self.forbidden_reads = {
            "another device's documents": (t.device_model(other, model), t.device_models(other)),
            "another device's commands": (t.cmd(other), t.cmd(other)),
        }
        self.writes = {"its events": t.events(me)}
        self.forbidden_writes = {"another device's events": t.events(other)}
        self.deployment_writes = {
            "a group document": t.group_model(group, model),
            "its own deployment document": t.device_model(me, model),
            "a chunk": fake_chunk,
            "the channel heartbeat": t.timestamp(),
        }

    def run(self) -> list[Finding]:
        me = self.device.device_id
        try:
            device = self.checker.session(self.protocol, self.device)
        except TransportError as err:
            return [Finding("device ACL: own topics", "fail", f"cannot connect as {me}: {err}",
                            "an agent with this credential cannot reach the broker")]
        try:
            host = self.checker.session(self.protocol)
            try:
                read, other_read = self._reads(host, device)
                wrote, other_wrote, deployed = self._writes(host, device)
            finally:
                host.close()
        except TransportError as err:
            return [Finding("device ACL: own topics", "fail", f"probe failed: {err}", "could not finish the check")]
        finally:
            device.close()
        return judge_device_acl(me, read, wrote, other_read, other_wrote, deployed)

    @staticmethod
    def _empty(m: Message) -> bool:
        return not m.retain and not m.payload

    def _reads(self, host: Session, device: Session) -> tuple[dict[str, str], dict[str, str]]:
        """What the device got of the host's probes: name → "" when received, else why not."""
        refused: dict[str, str] = {}
        for name, (_, topic_filter) in {**self.forbidden_reads, **self.reads}.items():
            try:
                device.subscribe(topic_filter)
            except TransportError as err:
                refused[name] = f"subscription refused ({err})"
        for topic, _ in [*self.forbidden_reads.values(), *self.reads.values()]:
            host.publish(topic, b"")
        got: dict[str, str] = {}
        deadline = time.monotonic() + self.checker.timeout
        for name, (topic, _) in self.reads.items():
            if name in refused:
                got[name] = refused[name]
                continue
            left = max(0.0, deadline - time.monotonic())
            got[name] = "" if device.wait_for(topic, left, self._empty) is not None else "nothing received"
        other: dict[str, str] = {}
        for name, (topic, _) in self.forbidden_reads.items():
            received = name not in refused and device.wait_for(topic, 0.2, self._empty) is not None
            other[name] = "" if received else refused.get(name, "nothing received")
        return got, other

    def _writes(self, host: Session, device: Session) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
        """What got through of the device's publishes: name → "" when the host received it, else why not."""
        groups = (self.writes, self.forbidden_writes, self.deployment_writes)
        for probes in groups:
            for topic in probes.values():
                host.subscribe(topic)
        outcome: dict[str, str] = {}
        for probes in groups:
            for topic in probes.values():
                try:
                    device.publish(topic, b"")
                except TransportError as err:
                    outcome[topic] = f"refused ({err})"
        host.settle()
        results: list[dict[str, str]] = []
        for probes in groups:
            result: dict[str, str] = {}
            for name, topic in probes.items():
                if topic in outcome:
                    result[name] = outcome[topic]
                else:
                    arrived = host.wait_for(topic, 0.0, self._empty) is not None
                    result[name] = "" if arrived else "dropped by the broker"
            results.append(result)
        return results[0], results[1], results[2]


def judge_device_acl(device: str, read: dict[str, str], wrote: dict[str, str], other_read: dict[str, str],
                     other_wrote: dict[str, str], deployed: dict[str, str]) -> list[Finding]:
    """The three ACL findings. Each dict maps a probe to "" when it got through, else why not."""
    missing = [f"{n}: {why}" for n, why in {**read, **wrote}.items() if why]
    own = Finding("device ACL: own topics", "fail" if missing else "ok",
                  "; ".join(missing) if missing else "reads and publishes all of its own",
                  f"{device} cannot work as an agent" if missing else
                  f"{device} receives its documents, commands, group documents, chunks and the heartbeat, "
                  "and publishes its reports")
    leaked = [n for n, why in other_read.items() if not why]
    forged = [n for n, why in other_wrote.items() if not why]
    if forged:
        others = Finding("device ACL: other devices", "fail", f"may publish {', '.join(forged)}",
                         f"{device} can forge another device's reports")
    elif leaked:
        others = Finding("device ACL: other devices", "warn", f"may read {', '.join(leaked)}",
                         "signed, so nothing can be forged, but a device sees what others are sent")
    else:
        others = Finding("device ACL: other devices", "ok", "refused",
                         f"{device} neither reads another device's documents or commands nor publishes its reports")
    allowed = [n for n, why in deployed.items() if not why]
    deploy = Finding("device ACL: deployments", "fail" if allowed else "ok",
                     f"may publish {', '.join(allowed)}" if allowed else "refused",
                     f"{device} could replace or clear retained documents and chunks for the fleet" if allowed
                     else "a device cannot publish documents, chunks or the heartbeat")
    return [own, others, deploy]


def _size(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


@contextmanager
def quiet_transport() -> Iterator[None]:
    """Keep the transport's error lines off the terminal while probing: a refusal is what a probe looks
    for, and the table reports it. With -v (INFO and below) they stay."""
    logger = logging.getLogger("edgefleet.transport")
    if logging.getLogger().isEnabledFor(logging.INFO):
        yield
        return
    before = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(before)
