"""The agent's side of MQTT: deployment documents in, chunks in, commands in; status, state, events out.

`FleetLink` is driven by the daemon's loop thread. The transport's network thread only puts messages
on the daemon's queue; everything here runs on the loop thread, so the lifecycle has one owner.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from agent import __version__
from agent.config import AgentConfig
from agent.delivery import ChunkStored, Downloads, Job
from agent.errors import DeploymentRejected, EdgefleetError, ProtocolError, StoreError, TransportError
from agent.lifecycle import Lifecycle, raw_model_name
from agent.protocol.canonical import canonical_json, parse_json
from agent.protocol.documents import Command, Event, Status, Telemetry
from agent.protocol.schema import SHA256_RE
from agent.protocol.topics import Route, Topics
from agent.transport import Message, Transport, settings_from_config

log = logging.getLogger(__name__)

STATE_INTERVAL_S = 1.0
BAD_PAYLOADS_KEPT = 1024
# Documents refused as not yet valid are tried again this often: a board without a real-time clock
# boots in the past and only later learns the time from NTP.
RETRY_INTERVAL_S = 30.0


class Connection:
    """Marker the transport's connection callback puts on the daemon's queue."""

    def __init__(self, up: bool):
        self.up = up


class FleetLink:
    """Delivery and reporting over one MQTT connection."""

    def __init__(self, config: AgentConfig, lifecycle: Lifecycle, inbox: Callable[[Any], None],
                 transport_factory: Callable[..., Transport] = Transport):
        self.config = config
        self.lifecycle = lifecycle
        self.device_id = config.device_id
        self.topics = Topics(config.mqtt.prefix)
        self._chunk_head = f"{self.topics.prefix}/chunks/"
        self.transport = transport_factory(
            settings_from_config(config.mqtt, config.device_id),
            on_message=self._on_message,
            will=(self.topics.status(self.device_id), self._status("offline"), True),
            on_connection=lambda up: inbox(Connection(up)),
        )
        self.downloads = Downloads(
            lifecycle.store, subscribe=lambda topics: self.transport.subscribe(topics),
            unsubscribe=lambda topics: self.transport.unsubscribe(topics), chunk_topic=self.topics.chunk,
            post=inbox, max_disk_fraction=config.security.max_disk_fraction,
        )
        self._inbox = inbox
        self.docs: dict[str, dict[str, dict[str, Any]]] = {}
        self._bad_payloads: OrderedDict[str, None] = OrderedDict()
        self._state_dirty = True
        self._state_sent = 0.0
        self._retrying: dict[str, Any] = {}
        self._next_retry = 0.0

    # --- start and stop ------------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to this device's topics and start connecting (returns at once)."""
        topics = [f"{self.topics.prefix}/devices/{self.device_id}/models/+", self.topics.cmd(self.device_id)]
        topics += [f"{self.topics.prefix}/groups/{g}/models/+" for g in self.config.groups]
        self.transport.subscribe(topics)
        self.transport.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Publish a retained `offline` (a clean disconnect sends no will) and disconnect."""
        if self.transport.connected:
            try:
                self.transport.publish(self.topics.status(self.device_id), self._status("offline"), retain=True,
                                       wait=timeout)
            except TransportError as err:
                log.warning("could not publish offline status: %s", err)
        self.transport.stop(timeout)
        self.downloads.close()

    def _status(self, status: str) -> bytes:
        doc = Status(status=status, device_id=self.device_id, agent_version=__version__,  # type: ignore[arg-type]
                     ts=time.time(), groups=self.config.groups)
        return canonical_json(doc.to_dict())

    # --- publishing ----------------------------------------------------------------------------

    def publish_event(self, event: Event) -> None:
        """One event per lifecycle step (QoS 1, not retained); the state follows."""
        self._publish(self.topics.events(self.device_id), canonical_json(event.to_dict()))
        self._state_dirty = True
        self.publish_state()

    def publish_state(self, force: bool = False) -> None:
        """The retained state document, at most once per interval unless forced."""
        now = time.monotonic()
        if not force and not self._state_dirty:
            return
        if not force and now - self._state_sent < STATE_INTERVAL_S and not self._state_dirty:
            return
        self._publish(self.topics.state(self.device_id), canonical_json(self.lifecycle.document().to_dict()),
                      retain=True)
        self._state_dirty = False
        self._state_sent = now

    def publish_telemetry(self, doc: Telemetry) -> None:
        """Periodic metrics (QoS 0: a lost sample is replaced by the next one)."""
        self._publish(self.topics.telemetry(self.device_id), canonical_json(doc.to_dict()), qos=0)

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        try:
            self.transport.publish(topic, payload, qos=qos, retain=retain)
        except TransportError as err:
            log.warning("cannot publish to %s: %s", topic, err)

    # --- incoming ------------------------------------------------------------------------------

    def _on_message(self, item: Message) -> None:
        """MQTT network thread: chunks are verified and written right here, without waiting for the
        loop thread; everything else goes to the loop thread's queue."""
        if item.topic.startswith(self._chunk_head):
            sha = item.topic[len(self._chunk_head):]
            if SHA256_RE.match(sha):
                self.downloads.on_chunk(sha, item.payload)
            else:
                log.warning("ignoring message on %r: not a chunk topic", item.topic[:200])
        else:
            self._inbox(item)

    def handle(self, item: Message | Connection | ChunkStored) -> None:
        """Process one item from the queue (on the loop thread)."""
        if isinstance(item, ChunkStored):
            self._on_stored(item)
            return
        if isinstance(item, Connection):
            if item.up:
                self._publish(self.topics.status(self.device_id), self._status("online"), retain=True)
                self.publish_state(force=True)
            return
        try:
            route = self.topics.parse(item.topic)
        except ProtocolError as err:
            log.warning("ignoring message: %s", err)
            return
        if route.kind in ("device_model", "group_model"):  # chunks never get here: see _on_message
            self._on_deployment(route, item.payload)
        elif route.kind == "cmd" and route.device == self.device_id:
            self._on_command(item.payload)

    def _on_deployment(self, route: Route, payload: bytes) -> None:
        assert route.model is not None
        if route.kind == "device_model":
            if route.device != self.device_id:
                return
            source = "device"
        else:
            if route.group not in self.config.groups:
                return
            source = f"group:{route.group}"
        name = route.model
        docs = self.docs.setdefault(name, {})
        if not payload:
            # A cleared retained document withdraws the order: a download it started stops (and the
            # document that applies now, if any, takes over); a model already installed stays.
            withdrawn = docs.pop(source, None)
            job = self.downloads.jobs.get(name)
            if withdrawn is not None and job is not None and job.doc.deployment_id == withdrawn.get("deployment_id"):
                self.downloads.cancel(name)
                self.lifecycle.withdraw(name, job.doc, "its deployment document was withdrawn")
                self.reconcile(name)
            return
        digest = "sha256:" + hashlib.sha256(payload).hexdigest()
        if digest in self._bad_payloads:
            return
        try:
            raw = parse_json(payload)
            if not isinstance(raw, dict):
                raise ProtocolError(f"document: expected an object, got {type(raw).__name__}")
        except ProtocolError as err:
            self._remember_bad(digest)
            self.lifecycle.reject(name, {}, DeploymentRejected(f"malformed deployment on {source}: {err}",
                                                               step="VERIFYING"))
            return
        if raw_model_name(raw) != name:
            self._remember_bad(digest)
            self.lifecycle.reject(name, raw, DeploymentRejected(
                f"document for model {raw_model_name(raw)!r} published on the topic of model {name!r}",
                step="VERIFYING"))
            return
        docs[source] = raw
        self.reconcile(name)

    def _remember_bad(self, digest: str) -> None:
        """Remember a malformed payload (bounded: the oldest are forgotten first)."""
        self._bad_payloads[digest] = None
        while len(self._bad_payloads) > BAD_PAYLOADS_KEPT:
            self._bad_payloads.popitem(last=False)

    def effective(self, name: str) -> dict[str, Any] | None:
        """The document that applies: the device's own, else the newest of its groups'."""
        docs = self.docs.get(name, {})
        if "device" in docs:
            return docs["device"]
        groups = [d for s, d in docs.items() if s.startswith("group:")]
        if not groups:
            return None

        def rank(raw: dict[str, Any]) -> tuple[int, int]:
            try:
                return int(raw["model"]["version"]), int(raw["issued_at"])
            except (KeyError, TypeError, ValueError):
                return -1, -1

        return max(groups, key=rank)

    def reconcile(self, name: str) -> None:
        """Start, keep or replace the download of `name` so it follows the effective document."""
        raw = self.effective(name)
        if raw is None:
            return
        job = self.downloads.jobs.get(name)
        if job is not None and job.doc.deployment_id == raw.get("deployment_id"):
            return
        try:
            doc = self.lifecycle.precheck(raw)
        except DeploymentRejected as err:
            if err.retry:
                if raw.get("deployment_id") == self._retrying.get(name):
                    return  # reported once; tried again quietly until it passes
                self._retrying[name] = raw.get("deployment_id")
            self.lifecycle.reject(name, raw, err)
            return
        self._retrying.pop(name, None)
        if doc is None:
            return
        self.downloads.cancel(name)
        self.lifecycle.begin(doc, raw, "DOWNLOADING")
        try:
            job = self.downloads.start(doc, raw)
        except (DeploymentRejected, StoreError, OSError) as err:
            self.lifecycle.reject(name, raw, _as_rejection(err))
            return
        self.lifecycle.progress[name] = job.progress() if job else 1.0
        if job is not None and not job.missing:
            self._complete(job)

    def _on_stored(self, msg: ChunkStored) -> None:
        jobs = {name: job.raw for name, job in self.downloads.jobs.items()}
        try:
            done = self.downloads.on_stored(msg)
        except DeploymentRejected as err:
            name = str(err.details.get("model"))
            self.lifecycle.reject(name, jobs.get(name, {}), err)
            return
        job = self.downloads.jobs.get(msg.model)
        if job is not None:
            self.lifecycle.progress[job.name] = job.progress()
        self._state_dirty = True
        for job in done:
            self._complete(job)

    def _complete(self, job: Job) -> None:
        name = job.name
        try:
            self.downloads.finish(job)
        except (StoreError, OSError) as err:
            self.downloads.cancel(name)
            self.lifecycle.reject(name, job.raw, _as_rejection(err))
            return
        self.lifecycle.progress.pop(name, None)
        self.lifecycle.emit(name, "DOWNLOADING", True, job.doc, None, fetched_bytes=job.fetched_bytes,
                            local_bytes=job.local_bytes, chunks_fetched=job.fetched_chunks, chunks_resumed=job.resumed_chunks,
                            chunks_total=job.total,
                            artifact_bytes=job.doc.model.artifact.size + job.doc.model.golden.size, done=True)
        self.lifecycle.install_stored(job.raw)
        self.publish_state(force=True)

    def _on_command(self, payload: bytes) -> None:
        raw: Any = None
        try:
            raw = parse_json(payload)
            cmd = self.lifecycle.check_command(raw)
        except (ProtocolError, DeploymentRejected) as err:
            reason = err.reason if isinstance(err, DeploymentRejected) else str(err)
            self._command_event(raw if isinstance(raw, dict) else None, False, f"command rejected: {reason}")
            return
        if cmd.action == "report":
            self.publish_state(force=True)
            self._command_event(cmd, True, None)
            return
        assert cmd.model is not None
        try:
            self.lifecycle.rollback(cmd.model, f"rollback ordered by command {cmd.command_id}", manual=True)
        except (StoreError, EdgefleetError) as err:
            self._command_event(cmd, False, f"command {cmd.command_id} failed: {err}")
            return
        active = self.lifecycle.state.record(cmd.model).active
        self._command_event(cmd, True, None, restored_version=active.version if active else None)

    def _command_event(self, cmd: Command | dict[str, Any] | None, ok: bool, reason: str | None,
                       **extra: Any) -> None:
        """Report a command's outcome; the host matches it by `details.command_id`."""
        fields = cmd.to_dict() if isinstance(cmd, Command) else (cmd or {})
        details = {k: v for k in ("command_id", "action") if isinstance(v := fields.get(k), str) and len(v) <= 128}
        model = fields.get("model")
        name = model if isinstance(model, str) and raw_model_name({"model": {"name": model}}) else "-"
        phase = self.lifecycle.state.record(name).phase if name != "-" else "IDLE"
        self.lifecycle.emit(name, phase, ok, None, reason, **details, **extra)

    def periodic(self) -> None:
        """Loop-thread housekeeping: the state document while downloads progress, refusals worth retrying."""
        for name, job in self.downloads.jobs.items():  # chunks are stored off the loop thread
            if self.lifecycle.progress.get(name) != (progress := job.progress()):
                self.lifecycle.progress[name] = progress
                self._state_dirty = True
        now = time.monotonic()
        if self._state_dirty and now - self._state_sent >= STATE_INTERVAL_S:
            self.publish_state(force=True)
        if self._retrying and now >= self._next_retry:
            self._next_retry = now + RETRY_INTERVAL_S
            for name in list(self._retrying):
                self.reconcile(name)


def _as_rejection(err: BaseException) -> DeploymentRejected:
    if isinstance(err, DeploymentRejected):
        return err
    if isinstance(err, OSError):
        return DeploymentRejected(f"download failed: {err.strerror or err}", step="DOWNLOADING")
    return DeploymentRejected(f"download failed: {err}", step="DOWNLOADING")
