"""The agent's side of MQTT: deployment documents in, chunks in, commands in; status, state, events out.

`FleetLink` is driven by the daemon's loop thread. The transport's network thread only puts messages
on the daemon's queue; everything here runs on the loop thread, so the lifecycle has one owner.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

from edgefleet import __version__
from edgefleet.agent import actions
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.fleet.delivery import CHUNK_QOS, ChunkStored, Downloads, Job
from edgefleet.agent.lifecycle.machine import Lifecycle, raw_model_name
from edgefleet.agent.telemetry.homeassistant import Discovery
from edgefleet.errors import (
    DeploymentRejected,
    DocumentRefused,
    EdgefleetError,
    ProtocolError,
    SignatureError,
    StoreError,
    TransportError,
)
from edgefleet.protocol.canonical import canonical_json, parse_json
from edgefleet.protocol.documents import (
    WITHDRAWAL_SCHEMA,
    ChannelState,
    Command,
    Deployment,
    Event,
    Signed,
    Status,
    Telemetry,
    Timestamp,
    Withdrawal,
)
from edgefleet.protocol.phases import Phase
from edgefleet.protocol.topics import Route, Topics
from edgefleet.transport import Message, Transport

log = logging.getLogger(__name__)

STATE_INTERVAL_S = 1.0
REFUSED_PAYLOADS_KEPT = 1024
"""Refused payloads (by SHA-256) whose refusal is not reported again; memory only, never saved."""
REFUSALS_PER_MINUTE = 20
"""Refusal events a minute at most: a flood of bad documents costs the fleet a few events."""
RETRY_MAX_S = 3600.0
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
        self.transport = transport_factory(
            config.mqtt.settings(config.device_id),
            on_message=self._on_message,
            # MQTT allows one will per connection: the JSON status holds it (edgectl and other hosts
            # read it); it carries no `ts`, since the broker sends it long after it was made
            will=(self.topics.status(self.device_id), self._status("offline", will=True), True),
            on_connection=lambda up: inbox(Connection(up)),
        )
        self.downloads = Downloads(
            lifecycle.store,
            subscribe=lambda topics, refused: self.transport.subscribe(topics, qos=CHUNK_QOS, on_refused=refused),
            unsubscribe=lambda topics: self.transport.unsubscribe(topics), chunk_topic=self.topics.chunk,
            post=inbox, max_disk_fraction=config.security.max_disk_fraction,
        )
        self._inbox = inbox
        self.docs: dict[str, dict[str, Signed[Deployment]]] = {}
        """Per model, per source (``device:{id}``, ``group:{name}``): the verified document."""
        self._refused: OrderedDict[bytes, None] = OrderedDict()
        self._refusal_times: deque[float] = deque()
        self.refusals_suppressed = 0
        """Refusal events left out by the rate limit (a flood of bad documents)."""
        self._backoff: dict[str, tuple[str, float, float]] = {}
        """Per model: the deployment whose download failed, when to try it again, the current delay."""
        self.timestamp: Timestamp | None = None
        self._withdrawn: dict[tuple[str, str], int] = {}
        self._withdrawn_ids: dict[tuple[str, str], set[str]] = {}
        """Deployment ids withdrawn this run per (model, source): the same-second case of `_withdrawn`."""
        self._newest: dict[tuple[str, str], int] = {}
        """The newest `issued_at` taken up per (model, source) this run; known models keep it in state.json."""
        """Signed withdrawals seen this run, per (model, source); known models also keep them in state.json."""
        self._state_dirty = True
        self._state_sent = 0.0
        self._retrying: dict[str, Any] = {}
        self._next_retry = 0.0
        ha = config.homeassistant
        self._discovery = Discovery(self.topics, self.device_id, __version__, ha_prefix=ha.prefix,
                                    telemetry_interval_s=config.telemetry.interval_s) if ha.discovery else None
        self._announced: set[str] = set()
        """Models whose Home Assistant discovery was published on this connection."""

    # --- start and stop ------------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to this device's topics and start connecting (returns at once)."""
        topics = [self.topics.device_models(self.device_id), self.topics.cmd(self.device_id)]
        topics += [self.topics.group_models(g) for g in self.config.groups]
        topics.append(self.topics.timestamp())
        self.transport.subscribe(topics)
        self.transport.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Publish a retained `offline` (a clean disconnect sends no will) and disconnect."""
        if self.transport.connected:
            try:
                self.transport.publish(self.topics.availability(self.device_id), b"offline", retain=True)
                self.transport.publish(self.topics.status(self.device_id), self._status("offline"), retain=True,
                                       wait=timeout)  # QoS 1 in order: this ack covers both
            except TransportError as err:
                log.warning("could not publish offline status: %s", err)
        self.transport.stop(timeout)
        self.downloads.close()

    def _status(self, status: str, *, will: bool = False) -> bytes:
        doc = Status(status=status, device_id=self.device_id, agent_version=__version__,  # type: ignore[arg-type]
                     ts=time.time(), groups=self.config.groups, insecure=self.config.security.insecure)
        value = doc.to_dict()
        if will:
            del value["ts"]  # readers take a status without ts as "time unknown" (Status.ts defaults to 0)
        return canonical_json(value)

    def _announce(self, models: Iterable[str], *, device: bool = False) -> None:
        """Publish Home Assistant discovery (retained) for the device and models not announced yet."""
        if self._discovery is None:
            return
        new = sorted(set(models) - self._announced)
        messages = self._discovery.device_entities() if device else []
        for model in new:
            messages += self._discovery.model_entities(model)
        for topic, payload in messages:
            self._publish(topic, payload, retain=True)
        self._announced.update(new)

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
        doc = actions.status(self.lifecycle, self.channel())
        self._publish(self.topics.state(self.device_id), canonical_json(doc.to_dict()), retain=True)
        self._state_dirty = False
        self._state_sent = now

    def publish_telemetry(self, doc: Telemetry) -> None:
        """Periodic metrics (QoS 0: a lost sample is replaced by the next one)."""
        self._announce(m.name for m in doc.models)  # a model that appeared since the connect
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
        sha = self.topics.chunk_id(item.topic)
        if sha is not None:
            self.downloads.on_chunk(sha, item.payload)
        else:
            self._inbox(item)  # a malformed chunk topic too: the loop thread's parse refuses it

    def handle(self, item: Message | Connection | ChunkStored) -> None:
        """Process one item from the queue (on the loop thread)."""
        if isinstance(item, ChunkStored):
            self._on_stored(item)
            return
        if isinstance(item, Connection):
            if item.up:
                self._publish(self.topics.status(self.device_id), self._status("online"), retain=True)
                self._publish(self.topics.availability(self.device_id), b"online", retain=True)
                self._announced.clear()  # again on every connect: the broker may have lost its retained store
                self._announce(self.lifecycle.state.models, device=True)
                self.publish_state(force=True)
            return
        try:
            route = self.topics.parse(item.topic)
        except ProtocolError as err:
            log.warning("ignoring message: %s", err)
            return
        if route.kind in ("device_model", "group_model"):  # chunks never get here: see _on_message
            self._on_deployment(route, item.payload)
        elif route.kind == "timestamp":
            self._on_timestamp(item.payload)
        elif route.kind == "cmd" and route.device == self.device_id:
            self._on_command(item.payload)

    def _on_deployment(self, route: Route, payload: bytes) -> None:
        assert route.model is not None
        if route.kind == "device_model":
            if route.device != self.device_id:
                return
            source = f"device:{self.device_id}"
        else:
            if route.group not in self.config.groups:
                return
            source = f"group:{route.group}"
        name = route.model
        if not payload:
            # Anyone allowed to publish here can clear a retained message: that withdraws nothing on
            # the device. Only a signed Withdrawal does.
            log.debug("model %s: empty payload on the %s document topic ignored", name, source)
            return
        digest = _digest(source, payload)
        try:
            raw = parse_json(payload)
            if not isinstance(raw, dict):
                raise ProtocolError(f"document: expected an object, got {type(raw).__name__}")
        except ProtocolError as err:
            self._refuse(name, None, DocumentRefused(f"malformed document on {source}: {err}",
                                                     step=Phase.VERIFYING), digest)
            return
        if raw.get("schema") == WITHDRAWAL_SCHEMA:
            self._on_withdrawal(name, source, raw, digest)
            return
        if raw_model_name(raw) != name:
            self._refuse(name, raw, DocumentRefused(
                f"document for model {raw_model_name(raw)!r} published on the topic of model {name!r}",
                step=Phase.VERIFYING), digest)
            return
        try:
            signed = self.lifecycle.authenticate(raw, source)
            doc = signed.doc
            now = self.lifecycle.clock()
            if now > doc.expires_at:
                raise DocumentRefused(f"document expired at {doc.expires_at} (now {int(now)})", step=Phase.VERIFYING)
            withdrawn = self._withdrawn_at(name, source)
            # a document of the same second as the withdrawal is a new order (a canary pushed again right
            # after one was withdrawn), unless it is the very document that was withdrawn
            if doc.issued_at < withdrawn or (doc.issued_at == withdrawn and doc.deployment_id
                                             in self._withdrawn_ids.get((name, source), ())):
                raise DocumentRefused(f"the {source} document was withdrawn by a signed withdrawal issued at "
                                      f"{withdrawn}; this one was issued at {doc.issued_at}", step=Phase.VERIFYING)
            newest = self._newest_at(name, source)
            if doc.issued_at < newest:
                # an older genuine document re-posted by someone without the key must not replace a newer one
                raise DocumentRefused(f"document issued at {doc.issued_at} is older than the newest {source} "
                                      f"document this device took up (issued at {newest})", step=Phase.VERIFYING)
        except DocumentRefused as err:
            self._refuse(name, raw, err, digest)
            return
        self.docs.setdefault(name, {})[source] = signed
        self._newest[(name, source)] = max(doc.issued_at, self._newest.get((name, source), -1))
        self.lifecycle.note_source(name, source, doc.issued_at)
        self.reconcile(name)

    def _newest_at(self, name: str, source: str) -> int:
        """`issued_at` of the newest document of `source` for `name` taken up so far (-1: none)."""
        rec = self.lifecycle.state.models.get(name)
        return max(self._newest.get((name, source), -1), rec.sources.get(source, -1) if rec else -1)

    def _withdrawn_at(self, name: str, source: str) -> int:
        """`issued_at` of the newest signed withdrawal of `source`'s document for `name` (-1: none)."""
        rec = self.lifecycle.state.models.get(name)
        return max(self._withdrawn.get((name, source), -1), rec.withdrawn.get(source, -1) if rec else -1)

    def _on_withdrawal(self, name: str, source: str, raw: dict[str, Any], digest: bytes) -> None:
        """A signed order to forget `source`'s document for `name`; a download it started stops."""
        try:
            wd = self.lifecycle.verified(Withdrawal, raw).doc
            self.lifecycle.check_target(wd.target, source)
            if wd.model != name:
                raise DocumentRefused(f"withdrawal of model {wd.model!r} published on the topic of model {name!r}")
            now = self.lifecycle.clock()
            if now > wd.expires_at:
                raise DocumentRefused(f"withdrawal expired at {wd.expires_at} (now {int(now)})")
        except (ProtocolError, SignatureError, DocumentRefused) as err:
            reason = err.reason if isinstance(err, DocumentRefused) else str(err)
            self._refuse(name, raw, DocumentRefused(f"withdrawal refused: {reason}", step=Phase.VERIFYING), digest)
            return
        docs = self.docs.get(name, {})
        current = docs.get(source)
        if current is not None and wd.issued_at < current.doc.issued_at:  # the same second counts: a canary is undone at once
            self._refuse(name, raw, DocumentRefused(
                f"withdrawal issued at {wd.issued_at} is older than the document it would withdraw "
                f"(issued at {current.doc.issued_at})", step=Phase.VERIFYING), digest)
            return
        self._withdrawn[(name, source)] = max(wd.issued_at, self._withdrawn.get((name, source), -1))
        self.lifecycle.mark_withdrawn(name, source, wd.issued_at)
        if current is None:
            return
        self._withdrawn_ids.setdefault((name, source), set()).add(current.doc.deployment_id)
        del docs[source]
        log.info("model %s: the %s document was withdrawn", name, source)
        job = self.downloads.jobs.get(name)
        if job is not None and job.doc.deployment_id == current.doc.deployment_id:
            self.downloads.cancel(name)
            self.lifecycle.withdraw(name, job.doc, "its deployment document was withdrawn")
        elif self.lifecycle.state.record(name).phase is Phase.SHADOW:
            # downloaded and validated, still shadowing: it must not be activated any more
            self.lifecycle.withdraw(name, current.doc, "its deployment document was withdrawn")
        self._backoff.pop(name, None)
        self.reconcile(name)

    def _refuse(self, name: str, raw: Any, err: DeploymentRejected, digest: bytes | None) -> None:
        """Report a refused document once per payload, at most REFUSALS_PER_MINUTE a minute; save nothing."""
        if digest is not None:
            if digest in self._refused:
                return
            self._refused[digest] = None
            while len(self._refused) > REFUSED_PAYLOADS_KEPT:
                self._refused.popitem(last=False)
        if self._refusal_allowed():
            self.lifecycle.refused(name, raw, err)
        else:
            log.debug("model %s: refusal not reported (rate limit): %s", name, err.reason)

    def _refusal_allowed(self) -> bool:
        """The rate limit shared by refused documents and refused commands."""
        now = time.monotonic()
        while self._refusal_times and now - self._refusal_times[0] > 60.0:
            self._refusal_times.popleft()
        if len(self._refusal_times) >= REFUSALS_PER_MINUTE:
            self.refusals_suppressed += 1
            return False
        self._refusal_times.append(now)
        return True

    def _on_timestamp(self, payload: bytes) -> None:
        """The signed heartbeat of the update channel: keep the newest valid one."""
        if not payload:
            return
        try:
            ts = self.lifecycle.verified(Timestamp, parse_json(payload)).doc
        except ProtocolError as err:
            log.warning("timestamp refused: %s", str(err)[:200])
            return
        if ts.issued_at > time.time() + self.config.security.max_clock_skew_s:
            # kept, it would hide every genuine heartbeat until a restart
            log.warning("timestamp refused: issued_at %d is in the future", ts.issued_at)
            return
        if self.timestamp is not None and ts.issued_at <= self.timestamp.issued_at:
            return
        self.timestamp = ts
        self._state_dirty = True

    def channel(self) -> ChannelState | None:
        """How fresh the update channel is, from the newest valid signed timestamp (None: never seen one)."""
        ts = self.timestamp
        if ts is None:
            return None
        now = time.time()
        fresh = now <= ts.expires_at
        max_age = self.config.security.max_timestamp_age_s
        if max_age is not None and now - ts.issued_at > max_age:
            fresh = False
        return ChannelState(issued_at=ts.issued_at, expires_at=ts.expires_at, fresh=fresh,
                            age_s=round(max(0.0, now - ts.issued_at), 1))

    def effective(self, name: str) -> tuple[str, Signed[Deployment]] | None:
        """The verified document that applies, with its source: the device's own, else the newest of
        its groups' (ranked by signed fields only)."""
        now = self.lifecycle.clock()
        # an expired document orders nothing: it must not hide the documents that still apply
        docs = {s: d for s, d in self.docs.get(name, {}).items() if d.doc.expires_at >= now}
        own = f"device:{self.device_id}"
        if own in docs:
            return own, docs[own]
        groups = [(s, d) for s, d in docs.items() if s.startswith("group:")]
        if not groups:
            return None
        return max(groups, key=lambda g: (g[1].doc.model.version, g[1].doc.issued_at))

    def reconcile(self, name: str) -> None:
        """Start, keep or replace the download of `name` so it follows the effective document."""
        chosen = self.effective(name)
        if chosen is None:
            return
        source, signed = chosen
        doc = signed.doc
        job = self.downloads.jobs.get(name)
        if job is not None and job.doc.deployment_id == doc.deployment_id:
            return
        digest: bytes | None = _digest(source, canonical_json(signed.raw))
        try:
            checked = self.lifecycle.precheck(signed)
        except DocumentRefused as err:
            if err.retry:
                if doc.deployment_id == self._retrying.get(name):
                    return  # reported once; tried again quietly until it passes
                self._retrying[name] = doc.deployment_id
                digest = None
            self._refuse(name, signed.raw, err, digest)
            return
        self._retrying.pop(name, None)
        backoff = self._backoff.get(name)
        if backoff is not None and (checked is None or backoff[0] != doc.deployment_id):
            del self._backoff[name]  # superseded, or nothing left to do: no more retries
            backoff = None
        if checked is None:
            return
        if backoff is not None and time.monotonic() < backoff[1]:
            return  # a failed download of this document is tried again later (periodic)
        self.downloads.cancel(name)
        self.lifecycle.begin(checked, Phase.DOWNLOADING)
        try:
            job = self.downloads.start(checked)
        except (DeploymentRejected, StoreError, OSError) as err:
            self._download_failed(name, doc, _as_rejection(err))
            return
        self.lifecycle.progress[name] = job.progress() if job else 1.0
        if job is not None and not job.missing:
            self._complete(job)

    def _download_failed(self, name: str, doc: Deployment, err: DeploymentRejected) -> None:
        """A download ended without the artifacts: reported REJECTED, tried again with a growing delay.

        A failed download says nothing about the model (a withheld or overwritten chunk, a full disk): the
        model goes back to where it was, with no outcome or version floor saved; the chunks already in
        partial/ are kept for the next try.
        """
        dep_id = doc.deployment_id
        previous = self._backoff.get(name)
        delay = min(RETRY_MAX_S, previous[2] * 2) if previous and previous[0] == dep_id else RETRY_INTERVAL_S
        self._backoff[name] = (dep_id, time.monotonic() + delay, delay)
        self.lifecycle.abandon(name, doc, DeploymentRejected(
            f"{err.reason}; trying again in {delay:.0f} s", step=err.step, details=err.details))

    def _on_stored(self, msg: ChunkStored) -> None:
        jobs = {name: job.doc for name, job in self.downloads.jobs.items()}
        try:
            done = self.downloads.on_stored(msg)
        except DeploymentRejected as err:
            name = str(err.details.get("model"))
            if name in jobs:  # on_stored names the job that failed, which was running just before
                self._download_failed(name, jobs[name], err)
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
            self._download_failed(name, job.doc, _as_rejection(err))
            return
        self._backoff.pop(name, None)
        self.lifecycle.progress.pop(name, None)
        self.lifecycle.emit(name, Phase.DOWNLOADING, True, job.doc, None, fetched_bytes=job.fetched_bytes,
                            local_bytes=job.local_bytes, chunks_fetched=job.fetched_chunks, chunks_resumed=job.resumed_chunks,
                            chunks_total=job.total,
                            artifact_bytes=job.doc.model.artifact.size + job.doc.model.golden.size, done=True)
        self.lifecycle.install(job.signed, None, None)
        self.publish_state(force=True)

    def _on_command(self, payload: bytes) -> None:
        raw: Any = None
        try:
            raw = parse_json(payload)
            cmd = self.lifecycle.check_command(raw)
        except (ProtocolError, DeploymentRejected) as err:
            reason = err.reason if isinstance(err, DeploymentRejected) else str(err)
            if self._refusal_allowed():
                self._command_event(raw if isinstance(raw, dict) else None, False, f"command rejected: {reason}")
            return
        if cmd.action == "report":
            self.publish_state(force=True)
            self._command_event(cmd, True, None)
            return
        assert cmd.model is not None
        try:
            result = actions.rollback(self.lifecycle, cmd.model, reason=f"rollback ordered by command {cmd.command_id}",
                                      ordered_at=cmd.issued_at)
        except EdgefleetError as err:
            self._command_event(cmd, False, f"command {cmd.command_id} failed: {err}")
            return
        self._command_event(cmd, True, None, restored_version=result.version)

    def _command_event(self, cmd: Command | dict[str, Any] | None, ok: bool, reason: str | None,
                       **extra: Any) -> None:
        """Report a command's outcome; the host matches it by `details.command_id`."""
        fields = cmd.to_dict() if isinstance(cmd, Command) else (cmd or {})
        details = {k: v for k in ("command_id", "action") if isinstance(v := fields.get(k), str) and len(v) <= 128}
        model = fields.get("model")
        name = model if isinstance(model, str) and raw_model_name({"model": {"name": model}}) else "-"
        phase = self.lifecycle.state.record(name).phase if name != "-" else Phase.IDLE
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
        due = list(self._retrying) if self._retrying and now >= self._next_retry else []
        if due:
            self._next_retry = now + RETRY_INTERVAL_S
        stall_s = self.config.security.download_stall_s
        self.downloads.pump(ask_again_after_s=stall_s / 4)
        for job in self.downloads.stalled(stall_s):
            if not self.downloads.cancel_if_stalled(job, stall_s):
                continue  # its last chunk arrived meanwhile
            self._download_failed(job.name, job.doc, _stalled(job, stall_s, self.downloads.window.limit))
        due += [name for name, (_dep, when, _delay) in self._backoff.items()
                if now >= when and name not in self.downloads.jobs]
        for name in dict.fromkeys(due):
            try:
                self.reconcile(name)
            except Exception:  # like a message: a retry that fails must never stop the agent's loop
                log.exception("model %s: retrying its deployment failed", name)


def _digest(source: str, payload: bytes) -> bytes:
    """What a refusal is remembered by: the payload and where it came (the same bytes may be refused
    on one topic for a reason that does not hold on another)."""
    return hashlib.sha256(source.encode() + b"\0" + payload).digest()


def _stalled(job: Job, stall_s: float, window: int) -> DeploymentRejected:
    """Why a download that got no chunk for `stall_s` failed: the chunks missing and, when the broker
    refused chunk subscriptions, that too (a subscription limit or an ACL that no window fits)."""
    reason = f"download stalled: no chunk arrived for {stall_s:g} s ({len(job.missing)} of {job.total} chunks missing)"
    details: dict[str, Any] = {"chunks_missing": len(job.missing), "chunks_total": job.total}
    if job.refusals:
        reason += (f"; the broker refused {job.refusals} chunk subscription(s) ({job.refusal}), "
                   f"{window} allowed at a time now")
        details["subscriptions_refused"] = job.refusals
    return DeploymentRejected(reason, step=Phase.DOWNLOADING, details=details)


def _as_rejection(err: BaseException) -> DeploymentRejected:
    if isinstance(err, DeploymentRejected):
        return err
    if isinstance(err, OSError):
        return DeploymentRejected(f"download failed: {err.strerror or err}", step=Phase.DOWNLOADING)
    return DeploymentRejected(f"download failed: {err}", step=Phase.DOWNLOADING)
