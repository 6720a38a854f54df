"""Publishing to the fleet: bundles (chunks, then the signed document), signed commands, and chunk gc.

Chunks go out retained at QoS 1 and before the document that names them, so a device that sees a
document finds every chunk already on the broker. Chunks are always republished, even when the
broker may hold them already: MQTT has no cheap "does this retained topic exist" question (asking
means receiving the payload, the same bytes in the other direction; bench/push.py measures both), a retained republish of identical bytes costs the host and broker one
transfer and costs devices nothing (they fetch a chunk only when they lack it), and republishing
repairs chunks that a broker without persistence lost or that `gc` cleared meanwhile.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from edgefleet.bundle import Bundle
from edgefleet.converter.fleet.observer import DeviceView, FleetObserver, Sync
from edgefleet.errors import ProtocolError, TransportError, UsageError
from edgefleet.protocol import (
    COMMAND_SCHEMA,
    Artifact,
    Command,
    Deployment,
    Policy,
    SigningKey,
    Topics,
    canonical_json,
    check_portable_name,
    dump,
    encode_chunk,
    parse,
    parse_json,
    split,
)
from edgefleet.protocol.documents import (
    TIMESTAMP_SCHEMA,
    WITHDRAWAL_SCHEMA,
    Timestamp,
    Withdrawal,
    new_deployment_id,
)
from edgefleet.protocol.phases import Phase
from edgefleet.protocol.schema import check_target
from edgefleet.transport import Message, Transport

log = logging.getLogger(__name__)

# gc clears chunks in batches of this many unacknowledged messages.
PUBLISH_WINDOW = 64
COMMAND_EXPIRY_S = 300
# A withdrawal stays retained in place of the document it takes back; it lives as long as a document.
WITHDRAWAL_EXPIRY_S = 90 * 24 * 3600


def device_target(device: str) -> str:
    """The signed target of a device's own document."""
    return f"device:{device}"


def group_target(group: str) -> str:
    """The signed target of a group's document."""
    return f"group:{group}"


def target_topic(topics: Topics, target: str, model: str) -> str:
    """The only topic a document for `target` may be published on (the agent refuses it anywhere else)."""
    problem = check_target(target)
    if problem:
        raise UsageError(f"target {target!r}: {problem}")
    kind, _, name = target.partition(":")
    return topics.device_model(name, model) if kind == "device" else topics.group_model(name, model)


@dataclass(frozen=True)
class Prepared:
    """A deployment ready to publish: its document bytes and its distinct chunk payloads."""

    deployment: Deployment
    document: bytes
    chunks: dict[str, bytes]
    raw_bytes: int
    wire_bytes: int
    compress_s: float
    resigned: bool
    key: SigningKey | None = field(default=None, repr=False, compare=False)

    def for_target(self, target: str) -> bytes:
        """This deployment's document for `target`: same id, times, policy and chunks, the target signed in.

        With the key the push was prepared with, the document is signed again for the target; an
        unsigned document (fleets whose agents trust no key) just gets the target; a signed manifest
        pushed without a key must already name exactly this target, since changing it breaks the signature.
        """
        raw = parse_json(self.document)
        if raw.get("target") == target:
            return self.document
        problem = check_target(target)
        if problem:
            raise UsageError(f"target {target!r}: {problem}")
        if self.key is not None:
            raw = self.key.sign({**raw, "target": target})
        elif raw.get("signature") is not None:
            named = f"is signed for {raw['target']}" if raw.get("target") else "is signed without a target"
            raise UsageError(f"the bundle's manifest {named}, so it cannot be sent to {target}; push it with --key "
                             "to issue a document for that target")
        else:
            raw["target"] = target
        Deployment.from_dict(raw)  # refuse to publish anything the agent would not parse
        return canonical_json(raw)


def split_parallel(data: bytes, chunk_size: int) -> tuple[Artifact, list[bytes]]:
    """`edgefleet.protocol.split` with the chunks compressed on every core (zlib releases the GIL); same result."""
    view = memoryview(data)
    pieces = [bytes(view[o:o + chunk_size]) for o in range(0, len(data), chunk_size)]
    if len(pieces) < 2:
        return split(data, chunk_size)
    with ThreadPoolExecutor(max_workers=min(len(pieces), os.cpu_count() or 1)) as pool:
        encoded = list(pool.map(encode_chunk, pieces))
    artifact = Artifact(sha256=hashlib.sha256(data).hexdigest(), size=len(data), chunk_size=chunk_size,
                        chunks=tuple(ref for ref, _ in encoded))
    return artifact, [payload for _, payload in encoded]


def prepare(bundle: Bundle, *, key: SigningKey | None = None, expires_in: int | None = None,
            allow_unsigned: bool = False, now: int | None = None, policy: dict[str, Any] | None = None,
            target: str | None = None) -> Prepared:
    """Chunk the bundle's files; with `key`, issue a fresh signed document, else check the bundle's own.

    `target` (``device:ID`` or ``group:NAME``) is signed into the document; `Prepared.for_target` makes
    the same deployment's document for other targets. A signed manifest pushed without `key` must
    already name `target`.
    """
    if target is not None and check_target(target):
        raise UsageError(f"target {target!r}: {check_target(target)}")
    dep = bundle.deployment
    if check_portable_name(dep.model.name):
        raise UsageError(f"model name {dep.model.name!r}: {check_portable_name(dep.model.name)}")
    issued = int(time.time()) if now is None else now
    started = time.perf_counter()
    model_art, model_chunks = split_parallel(bundle.model, dep.model.artifact.chunk_size)
    golden_art, golden_chunks = split_parallel(bundle.golden, dep.model.golden.chunk_size)
    compress_s = time.perf_counter() - started
    if key is not None:
        doc = dep.unsigned().to_dict()
        doc["deployment_id"] = new_deployment_id(dep.model.name, dep.model.version)
        doc["issued_at"] = issued
        doc["expires_at"] = issued + (expires_in if expires_in is not None else dep.expires_at - dep.issued_at)
        # Chunk lists from this host's zlib: the signature covers exactly the bytes published.
        doc["model"]["artifact"] = dump(model_art)
        doc["model"]["golden"] = dump(golden_art)
        if policy:
            doc["policy"] = {**doc.get("policy", {}), **policy}
        if target is not None:
            doc["target"] = target
        raw = key.sign(doc)
    else:
        raw = bundle.raw_manifest
        if expires_in is not None:
            raise UsageError("--expires-in needs --key: the expiry is part of the signed document")
        if policy:
            raise UsageError("policy options need --key: the policy is part of the signed document")
        if raw.get("signature") is None and not allow_unsigned:
            raise UsageError(f"{bundle.path}: the manifest is not signed (sign with --key, or --allow-unsigned "
                             "for agents that trust no keys)")
        if target is not None and raw.get("target") != target:
            if raw.get("signature") is not None:
                named = f"is signed for {raw['target']}" if raw.get("target") else "is signed without a target"
                raise UsageError(f"{bundle.path}: the manifest {named}, so it cannot be pushed to {target}; push it "
                                 "with --key to issue a document for that target")
            raw = {**raw, "target": target}
        if dep.expires_at <= issued:
            raise UsageError(f"{bundle.path}: the manifest expired at {dep.expires_at}; re-sign it with --key")
        if model_art != dep.model.artifact or golden_art != dep.model.golden:
            raise UsageError(f"{bundle.path}: chunks made on this host differ from the manifest's (another zlib?); "
                             "re-sign with --key")
    deployment = Deployment.from_dict(raw)
    chunks: dict[str, bytes] = {}
    for art, payloads in ((model_art, model_chunks), (golden_art, golden_chunks)):
        for ref, payload in zip(art.chunks, payloads, strict=True):
            chunks.setdefault(ref.sha256, payload)
    return Prepared(
        deployment=deployment, document=canonical_json(raw), chunks=chunks,
        raw_bytes=len(bundle.model) + len(bundle.golden),
        wire_bytes=sum(len(p) for p in chunks.values()), compress_s=compress_s, resigned=key is not None, key=key,
    )


def publish_chunks(transport: Transport, topics: Topics, chunks: dict[str, bytes], *,
                   progress: Callable[[int], None] | None = None, timeout: float = 60.0) -> float:
    """Publish every chunk retained at QoS 1 and wait for all PUBACKs; return the seconds it took.

    Everything is handed to paho at once (it holds references to payloads already in memory and keeps
    its window of unacknowledged messages full); a per-chunk wait would cost a quarter of the speed.
    `progress` gets the bytes acknowledged so far, about ten times a second. TransportError when the
    broker acknowledges nothing for `timeout` seconds.
    """
    started = time.perf_counter()
    sizes = []
    for sha, payload in chunks.items():
        transport.publish(topics.chunk(sha), payload, qos=1, retain=True)
        sizes.append(len(payload))
    acked_count = acked_bytes = 0
    last_change = time.monotonic()
    while True:
        finished = transport.drain(0, 0.1)
        done = len(sizes) if finished else len(sizes) - transport.unacked
        if done > acked_count:
            # PUBACKs come back in publish order, so the first `done` chunks are the acknowledged ones.
            acked_bytes += sum(sizes[acked_count:done])
            acked_count = done
            last_change = time.monotonic()
            if progress is not None:
                progress(acked_bytes)
        if finished:
            return time.perf_counter() - started
        if time.monotonic() - last_change > timeout:
            raise TransportError(f"the broker acknowledged no chunk for {timeout:g} s ({transport.last_error})")


def signed_policy(*, probation_s: float | None = None, max_error_rate: float | None = None,
                  max_latency_ratio: float | None = None, max_latency_ms: float | None = None,
                  allow_downgrade: bool = False, version_labels: Iterable[str] = (),
                  shadow: dict[str, Any] | None = None) -> dict[str, Any]:
    """The policy of a re-issued document from the values given (None: not set), checked as the agent
    checks it; {} when nothing is set. `shadow`: the `policy.shadow` fields given ({}: shadow probation
    with the devices' defaults; None: none)."""
    fields = {"probation_s": probation_s, "max_error_rate": max_error_rate,
              "max_latency_ratio": max_latency_ratio, "max_latency_ms": max_latency_ms}
    policy: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    if allow_downgrade:
        policy["allow_downgrade"] = True
    labels = list(version_labels)
    if labels:
        policy["version_labels"] = labels
    if shadow is not None:
        policy["shadow"] = {k: v for k, v in shadow.items() if v is not None}
    try:
        return dump(parse(Policy, policy)) if policy else {}
    except ProtocolError as err:
        raise UsageError(f"policy: {err}") from err


def push_targets(group: str | None, devices: Iterable[str]) -> list[str]:
    """The signed targets of a push: the group, or each device."""
    return [group_target(group)] if group is not None else [device_target(d) for d in dict.fromkeys(devices)]


def targeted_documents(prepared: Prepared, topics: Topics, targets: Iterable[str]) -> dict[str, bytes]:
    """Topic -> document for each target, every document naming the target of the topic it goes to."""
    name = prepared.deployment.model.name
    return {target_topic(topics, t, name): prepared.for_target(t) for t in targets}


def publish_document(transport: Transport, targets: list[str], document: bytes, timeout: float = 30.0) -> None:
    """Publish the deployment document retained at QoS 1 to each target topic, waiting for each PUBACK."""
    for topic in targets:
        transport.publish(topic, document, qos=1, retain=True, wait=timeout)


def publish_documents(transport: Transport, documents: dict[str, bytes], timeout: float = 30.0) -> None:
    """Publish each topic's own document retained at QoS 1, waiting for each PUBACK."""
    for topic, document in documents.items():
        transport.publish(topic, document, qos=1, retain=True, wait=timeout)


def make_timestamp(key: SigningKey, expires_in: int, now: int | None = None) -> dict[str, Any]:
    """A signed timestamp valid for `expires_in` seconds."""
    issued = int(time.time()) if now is None else now
    doc = {"schema": TIMESTAMP_SCHEMA, "issued_at": issued, "expires_at": issued + expires_in}
    Timestamp.from_dict(doc)
    return key.sign(doc)


def make_withdrawal(key: SigningKey, model: str, target: str, *, expires_in: int = WITHDRAWAL_EXPIRY_S,
                    now: int | None = None) -> dict[str, Any]:
    """A signed withdrawal of `target`'s document for `model`, published retained in its place."""
    issued = int(time.time()) if now is None else now
    doc = {"schema": WITHDRAWAL_SCHEMA, "model": model, "target": target, "issued_at": issued,
           "expires_at": issued + expires_in}
    Withdrawal.from_dict(doc)  # refuse to sign anything the agent would not parse
    return key.sign(doc)


def publish_withdrawals(transport: Transport, topics: Topics, key: SigningKey, model: str, targets: Iterable[str],
                        *, expires_in: int = WITHDRAWAL_EXPIRY_S, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
    """Publish a signed withdrawal retained on each target's topic for `model`; topic -> withdrawal sent."""
    sent = {}
    for target in targets:
        doc = make_withdrawal(key, model, target, expires_in=expires_in)
        topic = target_topic(topics, target, model)
        transport.publish(topic, canonical_json(doc), qos=1, retain=True, wait=timeout)
        sent[topic] = doc
    return sent


def is_withdrawal(payload: bytes) -> bool:
    """True when a retained payload on a model topic is a withdrawal (read leniently: only its schema)."""
    try:
        doc = parse_json(payload)
    except ProtocolError:
        return False
    return isinstance(doc, dict) and doc.get("schema") == WITHDRAWAL_SCHEMA


# ---------------------------------------------------------------------- following a rollout


Verdict = Literal["committed", "failed", "waiting", "pending"]


@dataclass(frozen=True)
class DeviceResult:
    """Where one targeted device stands with a deployment."""

    device_id: str
    verdict: Verdict
    detail: str = ""
    seconds: float | None = None


def judge(view: DeviceView | None, name: str, dep_id: str) -> tuple[Verdict, str] | None:
    """committed/failed (with the reason) once the device reported an end for `dep_id`, else None."""
    if view is None:
        return None
    for event in reversed(view.events):
        if event.deployment_id != dep_id or event.model != name:
            continue
        if event.step == Phase.COMMITTED and event.ok:
            return "committed", f"v{event.version}" if event.version is not None else ""
        if event.step.failed:
            return "failed", f"{event.step.lower().replace('_', ' ')}: {event.reason or 'no reason given'}"
    state = view.model(name)
    if state is None:
        return None
    outcome = state.last_outcome
    if outcome is not None and outcome.deployment_id == dep_id:
        if outcome.result == "committed":
            return "committed", f"v{outcome.version}"
        return "failed", f"{outcome.result.replace('_', ' ')}: {outcome.reason or 'no reason given'}"
    if state.phase == Phase.COMMITTED and state.active is not None and state.active.deployment_id == dep_id:
        return "committed", f"v{state.active.version}"
    return None


def select_targets(observer: FleetObserver, devices: Iterable[str]) -> dict[str, DeviceResult]:
    """Targeted devices (a group's come from the verified inventory, never from what devices claim):
    online ones are waited for, the others are pending (they catch up later)."""
    out = {}
    for d in dict.fromkeys(devices):
        view = observer.get(d)
        if view is not None and view.online:
            out[d] = DeviceResult(d, "waiting")
        elif view is None or view.status is None:
            out[d] = DeviceResult(d, "pending", "never seen on this broker (no status)")
        else:
            out[d] = DeviceResult(d, "pending", "offline; installs when it reconnects")
    return out


def wait_for_rollout(observer: FleetObserver, targets: dict[str, DeviceResult], name: str, dep_id: str,
                     timeout: float, on_result: Callable[[DeviceResult], None] | None = None,
                     clock: Callable[[], float] = time.monotonic,
                     on_tick: Callable[[], None] | None = None) -> dict[str, DeviceResult]:
    """Follow the waited-for devices until all committed, one failed, or `timeout`; return every result.

    `on_tick` runs whenever something arrived and at least once a second, before the verdicts are
    judged, so a live view of the devices' progress shows a phase before the verdict it leads to.
    """
    results = dict(targets)
    started = clock()
    deadline = started + timeout
    seen = observer.version

    def update() -> None:
        for d, r in list(results.items()):
            if r.verdict in ("committed", "failed"):
                continue
            verdict = judge(observer.get(d), name, dep_id)
            if verdict is not None:
                # A pending device that came back and finished is reported too; only its failure counts.
                results[d] = DeviceResult(d, verdict[0], verdict[1], round(clock() - started, 2))
                if on_result is not None:
                    on_result(results[d])

    while True:
        if on_tick is not None:
            on_tick()
        update()
        failed = any(r.verdict == "failed" for r in results.values())
        remaining = deadline - clock()
        if failed or remaining <= 0:
            if on_tick is not None:
                on_tick()
            update()  # whatever arrived meanwhile
            why = "stopped waiting at the first failure" if failed else f"did not finish within {timeout:g} s"
            for r in [r for r in results.values() if r.verdict == "waiting"]:
                view = observer.get(r.device_id)
                state = view.model(name) if view is not None else None
                where = f"phase {state.phase}" if state is not None else "no state for this model"
                offline = "" if view is None or view.online else ", went offline"
                results[r.device_id] = DeviceResult(r.device_id, "waiting", f"{why} ({where}{offline})")
            return results
        if not any(r.verdict == "waiting" for r in results.values()):
            return results
        seen = observer.wait_change(seen, min(remaining, 1.0))


# ---------------------------------------------------------------------- commands


def make_command(key: SigningKey, device: str, action: Literal["rollback", "report"], model: str | None = None,
                 *, expires_in: int = COMMAND_EXPIRY_S, now: int | None = None) -> dict[str, Any]:
    """A signed command document for one device."""
    issued = int(time.time()) if now is None else now
    doc = {
        "schema": COMMAND_SCHEMA, "command_id": f"{action}-{uuid.uuid4().hex[:16]}", "device_id": device,
        "action": action, "issued_at": issued, "expires_at": issued + expires_in,
    }
    if model is not None:
        doc["model"] = model
    Command.from_dict(doc)  # refuse to sign anything the agent would not parse
    return key.sign(doc)


def rollback_result(view: DeviceView | None, name: str, command_id: str, since: float) -> tuple[bool, str] | None:
    """(True, detail) once the device reports the model rolled back after `since`; (False, reason) on refusal."""
    if view is None:
        return None
    for event in reversed(view.events):
        if event.model != name or event.ts < since - 1:
            continue
        if event.details.get("command_id") == command_id and not event.ok and event.step != Phase.ROLLED_BACK:
            return False, event.reason or "refused"
        if event.step == Phase.ROLLED_BACK:
            restored = event.details.get("restored_version")
            return True, f"restored v{restored}" if restored is not None else (event.reason or "rolled back")
    return None


def wait_rollback(observer: FleetObserver, device: str, model: str, command_id: str, since: float,
                  timeout: float) -> tuple[bool, str]:
    """rollback_result once the device answers command `command_id` (sent at `since`); (False, why) after `timeout` s."""
    deadline = time.monotonic() + timeout
    seen = observer.version
    while True:
        outcome = rollback_result(observer.get(device), model, command_id, since)
        if outcome is not None:
            return outcome
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False, f"no confirmation within {timeout:g} s"
        seen = observer.wait_change(seen, min(remaining, 1.0))


# ---------------------------------------------------------------------- gc


@dataclass
class RetainedIndex:
    """Sizes of retained chunks and payloads of retained deployment documents, collected from the broker."""

    topics: Topics
    sync: Sync | None = None
    chunks: dict[str, int] = field(default_factory=dict)
    documents: dict[str, bytes] = field(default_factory=dict)
    withdrawals: dict[str, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, message: Message) -> None:
        """A Transport's on_message: remember what is retained (payloads of chunks are not kept)."""
        if self.sync is not None and self.sync.handle(message):
            return
        try:
            route = self.topics.parse(message.topic)
        except ProtocolError:
            return
        with self.lock:
            if route.kind == "chunk" and route.sha256 is not None:
                if message.payload:
                    self.chunks[route.sha256] = len(message.payload)
                else:
                    self.chunks.pop(route.sha256, None)
            elif route.kind in ("group_model", "device_model"):
                self.documents.pop(message.topic, None)
                self.withdrawals.pop(message.topic, None)
                if message.payload:
                    # A signed withdrawal held in a document's place pins no chunks.
                    held = self.withdrawals if is_withdrawal(message.payload) else self.documents
                    held[message.topic] = message.payload

    def collect(self, transport: Transport, timeout: float = 30.0) -> None:
        """Subscribe to every chunk and deployment document and wait until the retained ones are in."""
        self.sync = Sync(self.topics, transport.client_id)
        transport.subscribe([*self.topics.all_deployments(), self.topics.all_chunks(), self.sync.topic], wait=timeout)
        self.sync.wait(transport, timeout)


def referenced_chunks(payload: bytes) -> tuple[set[str], str | None]:
    """Chunk ids a deployment document names, read leniently (a document agents reject still pins its chunks)."""
    try:
        doc = parse_json(payload)
    except ProtocolError as err:
        return set(), f"not JSON ({err})"
    found: set[str] = set()
    model = doc.get("model") if isinstance(doc, dict) else None
    for part in ("artifact", "golden"):
        art = model.get(part) if isinstance(model, dict) else None
        for ref in (art.get("chunks") if isinstance(art, dict) else None) or []:
            sha = ref.get("sha256") if isinstance(ref, dict) else None
            if isinstance(sha, str):
                found.add(sha)
    return found, None if found else "names no chunks"


@dataclass(frozen=True)
class GcResult:
    """What gc found and cleared."""

    documents: int
    chunks: int
    chunk_bytes: int
    referenced: int
    cleared: dict[str, int]
    warnings: tuple[str, ...]

    @property
    def bytes_freed(self) -> int:
        """Payload bytes of the cleared chunks."""
        return sum(self.cleared.values())


def collect_garbage(transport: Transport, index: RetainedIndex, *, dry_run: bool, timeout: float = 30.0) -> GcResult:
    """Clear (empty retained payload) every retained chunk no retained deployment document names."""
    with index.lock:
        documents = dict(index.documents)
        chunks = dict(index.chunks)
    referenced: set[str] = set()
    warnings = []
    for topic, payload in sorted(documents.items()):
        shas, problem = referenced_chunks(payload)
        referenced |= shas
        if problem:
            warnings.append(f"{topic}: {problem}")
    garbage = {sha: size for sha, size in sorted(chunks.items()) if sha not in referenced}
    if not dry_run:
        for sha in garbage:
            transport.publish(index.topics.chunk(sha), b"", qos=1, retain=True)
            if not transport.drain(PUBLISH_WINDOW, timeout):
                raise TransportError(f"the broker stopped acknowledging for {timeout:g} s")
        if not transport.flush(timeout):
            raise TransportError(f"the broker stopped acknowledging for {timeout:g} s")
    return GcResult(documents=len(documents), chunks=len(chunks), chunk_bytes=sum(chunks.values()),
                    referenced=len(referenced & set(chunks)), cleared=garbage, warnings=tuple(warnings))


def check_device_names(names: Iterable[str]) -> list[str]:
    """Device ids from the command line, each a topic level every broker takes."""
    out = []
    for n in names:
        problem = check_portable_name(n)
        if problem:
            raise UsageError(f"--device {n!r}: {problem}")
        out.append(n)
    return out
