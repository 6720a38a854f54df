"""What is deployed where (`edgectl deployments` and `push --dry-run`).

The broker holds the orders: one retained document per model on each group's and each device's
model topic, or a signed withdrawal in a document's place. The devices hold the answers: their
retained state says which version each one runs. This module reads both in one snapshot and applies
the rule the agent applies (agent/fleet/link.py, `FleetLink.effective`): a device's own document wins
over every group document for that model, and among its groups' documents the highest version (then
the newest) wins. A device whose own document overrides a group document is *pinned*: later group
pushes of that model do not reach it until its document is withdrawn.

The bytes a device would fetch for a deployment follow agent/fleet/delivery.py: an artifact it holds
as a whole blob costs nothing, and a chunk found in any blob it holds (chunked at the deployment's
chunk size) is copied locally. The host knows a device's blobs from its state (active, previous and
pending versions of every model) and their chunk lists from the retained documents that describe
them; a blob no retained document describes counts as holding nothing, so the figure is then an upper
bound (`exact` is false).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgefleet.converter.fleet.connect import add_key_arg
from edgefleet.converter.fleet.observer import DeviceView, FleetObserver
from edgefleet.converter.fleet.publish import (
    WITHDRAWAL_EXPIRY_S,
    RetainedIndex,
    device_target,
    group_target,
    is_withdrawal,
)
from edgefleet.converter.output import name_type, positive_int
from edgefleet.errors import ProtocolError, UsageError
from edgefleet.protocol import Artifact, Deployment, Event, Topics, dump, parse_json
from edgefleet.protocol.documents import Withdrawal
from edgefleet.protocol.phases import Phase
from edgefleet.transport import Message, Transport

Kind = Literal["deployment", "withdrawal", "unreadable"]


@dataclass(frozen=True)
class Document:
    """One retained message on a model topic, read leniently (a document agents refuse is still shown)."""

    topic: str
    target: str
    """``group:NAME`` or ``device:ID``, from the topic it is retained on."""
    model: str
    kind: Kind
    deployment: Deployment | None = None
    withdrawal: Withdrawal | None = None
    problem: str | None = None

    @property
    def group(self) -> str | None:
        """The group this document addresses (None for a device document)."""
        kind, _, name = self.target.partition(":")
        return name if kind == "group" else None

    @property
    def device(self) -> str | None:
        """The device this document addresses (None for a group document)."""
        kind, _, name = self.target.partition(":")
        return name if kind == "device" else None

    def live(self, now: float) -> bool:
        """A deployment an agent would follow: readable and not expired."""
        return self.deployment is not None and self.deployment.expires_at >= now

    def to_dict(self) -> dict[str, Any]:
        """The document as `deployments list/show --json` print it."""
        out: dict[str, Any] = {"topic": self.topic, "target": self.target, "model": self.model, "kind": self.kind}
        dep = self.deployment
        if dep is not None:
            out.update(deployment_id=dep.deployment_id, version=dep.model.version, issued_at=dep.issued_at,
                       expires_at=dep.expires_at, key_id=dep.key_id, signed_target=dep.target)
        if self.withdrawal is not None:
            out.update(issued_at=self.withdrawal.issued_at, expires_at=self.withdrawal.expires_at,
                       key_id=self.withdrawal.key_id)
        if self.problem is not None:
            out["problem"] = self.problem
        return out


def read_document(topics: Topics, topic: str, payload: bytes) -> Document | None:
    """The retained message on a model topic as a Document (None for any other topic)."""
    try:
        route = topics.parse(topic)
    except ProtocolError:
        return None
    if route.kind not in ("group_model", "device_model") or route.model is None:
        return None
    target = f"group:{route.group}" if route.kind == "group_model" else f"device:{route.device}"
    try:
        raw = parse_json(payload)
        if is_withdrawal(payload):
            return Document(topic, target, route.model, "withdrawal", withdrawal=Withdrawal.from_dict(raw))
        return Document(topic, target, route.model, "deployment", deployment=Deployment.from_dict(raw))
    except ProtocolError as err:
        return Document(topic, target, route.model, "unreadable", problem=str(err))


def _rank(doc: Document) -> tuple[int, int]:
    """How the agent ranks group documents: the highest version, then the newest."""
    dep = doc.deployment
    return (dep.model.version, dep.issued_at) if dep is not None else (-1, -1)


@dataclass(frozen=True)
class Snapshot:
    """The retained model documents and every device's latest status and state, read at one moment."""

    documents: tuple[Document, ...]
    devices: dict[str, DeviceView]
    taken_at: float = field(default_factory=time.time)

    def models(self) -> list[str]:
        """Every model named by a document or by a device's state."""
        names = {d.model for d in self.documents}
        for view in self.devices.values():
            names.update(view.state.models if view.state is not None else ())
        return sorted(names)

    def of_model(self, model: str) -> list[Document]:
        """The documents of one model, group documents first."""
        return sorted((d for d in self.documents if d.model == model), key=lambda d: (d.device is not None, d.target))

    def groups_of(self, device: str, groups: dict[str, tuple[str, ...]] | None = None) -> tuple[str, ...]:
        """A device's groups: the inventory's when given, else the ones its status names (the agent's own)."""
        if groups is not None:
            return tuple(g for g, members in groups.items() if device in members)
        view = self.devices.get(device)
        return view.groups if view is not None else ()

    def effective(self, device: str, model: str, groups: tuple[str, ...]) -> Document | None:
        """The document the device follows for `model`: its own, else the best of its groups' (the agent's rule)."""
        live = [d for d in self.of_model(model) if d.live(self.taken_at)]
        own = next((d for d in live if d.device == device), None)
        if own is not None:
            return own
        return max((d for d in live if d.group in groups), key=_rank, default=None)

    def group_document(self, model: str, groups: tuple[str, ...]) -> Document | None:
        """The group document a device of `groups` would follow without a document of its own."""
        return max((d for d in self.of_model(model) if d.live(self.taken_at) and d.group in groups), key=_rank,
                   default=None)

    def artifacts(self) -> dict[str, Artifact]:
        """Every artifact a retained document describes, by its SHA-256."""
        out: dict[str, Artifact] = {}
        for d in self.documents:
            if d.deployment is not None:
                out.setdefault(d.deployment.model.artifact.sha256, d.deployment.model.artifact)
                out.setdefault(d.deployment.model.golden.sha256, d.deployment.model.golden)
        return out

    def golden_of(self) -> dict[str, str]:
        """Deployment id -> SHA-256 of its golden vectors, from the retained documents."""
        return {d.deployment.deployment_id: d.deployment.model.golden.sha256
                for d in self.documents if d.deployment is not None}


def take_snapshot(transport: Transport, index: RetainedIndex, observer: FleetObserver, topics: Topics,
                  timeout: float) -> Snapshot:
    """Subscribe to the model documents, then attach the observer (whose sync also covers the documents)."""
    transport.subscribe(topics.all_deployments(), wait=timeout)
    observer.attach(transport, timeout=timeout)
    with index.lock:
        retained = {**index.documents, **index.withdrawals}
    docs = [read_document(topics, t, p) for t, p in sorted(retained.items())]
    return Snapshot(tuple(d for d in docs if d is not None), observer.devices())


def fan_out(index: RetainedIndex, observer: FleetObserver) -> Any:
    """One on_message for a transport that feeds both the document index and the observer."""
    def handle(message: Message) -> None:
        index.handle(message)
        observer.handle(message)
    return handle


# ---------------------------------------------------------------------- list


@dataclass(frozen=True)
class DeviceRow:
    """One device's place in one model's deployments."""

    device_id: str
    online: bool
    groups: tuple[str, ...]
    follows: Document | None
    group_document: Document | None
    version: int | None
    deployment_id: str | None
    phase: str | None
    last_outcome: str | None

    @property
    def pinned(self) -> bool:
        """Its own document overrides a group document of the model."""
        return self.follows is not None and self.follows.device is not None and self.group_document is not None

    @property
    def runs_wanted(self) -> bool | None:
        """Whether it runs the deployment it follows (None when it follows nothing)."""
        if self.follows is None or self.follows.deployment is None:
            return None
        return self.deployment_id == self.follows.deployment.deployment_id

    def to_dict(self) -> dict[str, Any]:
        """JSON value."""
        follows = self.follows.deployment if self.follows is not None else None
        group = self.group_document.deployment if self.group_document is not None else None
        return {
            "device_id": self.device_id, "online": self.online, "groups": list(self.groups),
            "version": self.version, "deployment_id": self.deployment_id, "phase": self.phase,
            "last_outcome": self.last_outcome,
            "follows": self.follows.target if self.follows is not None else None,
            "follows_deployment_id": follows.deployment_id if follows else None,
            "follows_version": follows.model.version if follows else None,
            "group_version": group.model.version if group else None,
            "pinned": self.pinned, "runs_wanted": self.runs_wanted,
        }


def device_rows(snap: Snapshot, model: str, inventory: dict[str, tuple[str, ...]] | None = None) -> list[DeviceRow]:
    """Every device concerned by `model`: it reports the model, or a document addresses it or its groups."""
    docs = snap.of_model(model)
    doc_groups = {d.group for d in docs if d.group is not None}
    concerned = {d.device for d in docs if d.device is not None}
    for device, seen in snap.devices.items():
        if seen.model(model) is not None or doc_groups & set(snap.groups_of(device, inventory)):
            concerned.add(device)
    if inventory is not None:
        concerned.update(m for g in doc_groups for m in inventory.get(g, ()))
    rows = []
    for device in sorted(concerned):
        view = snap.devices.get(device)
        groups = snap.groups_of(device, inventory)
        state = view.model(model) if view is not None else None
        outcome = state.last_outcome if state is not None else None
        rows.append(DeviceRow(
            device_id=device, online=view is not None and view.online, groups=groups,
            follows=snap.effective(device, model, groups), group_document=snap.group_document(model, groups),
            version=state.active.version if state is not None and state.active is not None else None,
            deployment_id=state.active.deployment_id if state is not None and state.active is not None else None,
            phase=str(state.phase) if state is not None else None,
            last_outcome=(f"v{outcome.version} {outcome.result}" + (f": {outcome.reason}" if outcome.reason else ""))
            if outcome is not None else None,
        ))
    return rows


def listing(snap: Snapshot, model: str | None = None,
            inventory: dict[str, tuple[str, ...]] | None = None) -> list[dict[str, Any]]:
    """`deployments list --json`: per model, its documents and its devices."""
    names = [model] if model is not None else snap.models()
    out = []
    for name in names:
        rows = device_rows(snap, name, inventory)
        out.append({"model": name, "documents": [d.to_dict() for d in snap.of_model(name)],
                    "devices": [r.to_dict() for r in rows], "pinned": [r.device_id for r in rows if r.pinned]})
    return out


# ---------------------------------------------------------------------- show


def mentions(view: DeviceView | None, model: str, dep_id: str) -> bool:
    """The device's state of `model` names deployment `dep_id` (running, kept, pending or its last outcome)."""
    state = view.model(model) if view is not None else None
    if state is None:
        return False
    slots = (state.active, state.previous, state.pending)
    return any(s is not None and s.deployment_id == dep_id for s in slots) or \
        (state.last_outcome is not None and state.last_outcome.deployment_id == dep_id)


def find(snap: Snapshot, what: str) -> tuple[str, list[Document], str | None]:
    """(model, documents, deployment id) for a deployment id or a model name; UsageError when neither is known."""
    by_id = [d for d in snap.documents if d.deployment is not None and d.deployment.deployment_id == what]
    if by_id:
        return by_id[0].model, by_id, what
    for view in snap.devices.values():
        for name in (view.state.models if view.state is not None else ()):
            if mentions(view, name, what):
                return name, [], what
    if what in snap.models():
        return what, snap.of_model(what), None
    raise UsageError(f"deployments show: {what!r} is neither a deployment id nor a model the broker or a device "
                     "knows (see 'edgectl deployments list')")


def device_phase(view: DeviceView | None, model: str, dep_id: str) -> str:
    """Where one device stands with deployment `dep_id`."""
    state = view.model(model) if view is not None else None
    if state is None:
        return "no state for this model"
    if state.pending is not None and state.pending.deployment_id == dep_id:
        return f"{state.phase} (pending)"
    if state.active is not None and state.active.deployment_id == dep_id:
        return str(state.phase)
    outcome = state.last_outcome
    if outcome is not None and outcome.deployment_id == dep_id:
        return f"{outcome.result.upper()}" + (f": {outcome.reason}" if outcome.reason else "")
    if state.previous is not None and state.previous.deployment_id == dep_id:
        return "previous version (kept for rollback)"
    running = f"v{state.active.version}" if state.active is not None else "no version"
    return f"not started (runs {running}, {state.phase})"


def show(snap: Snapshot, what: str, inventory: dict[str, tuple[str, ...]] | None = None) -> dict[str, Any]:
    """`deployments show`: the deployment's documents in full and every concerned device's phase."""
    model, docs, dep_id = find(snap, what)
    rows = device_rows(snap, model, inventory)
    if dep_id is not None:
        targets = {d.target for d in docs}
        rows = [r for r in rows if f"device:{r.device_id}" in targets
                or any(f"group:{g}" in targets for g in r.groups) or mentions(snap.devices.get(r.device_id), model, dep_id)]
    documents = []
    for d in docs:
        entry = d.to_dict()
        if d.deployment is not None:
            m = d.deployment.model
            entry.update(policy=dump(d.deployment.policy), chunks=len({c.sha256 for a in (m.artifact, m.golden)
                                                                        for c in a.chunks}),
                         wire_bytes=m.artifact.wire_size + m.golden.wire_size,
                         raw_bytes=m.artifact.size + m.golden.size, model_sha256=m.artifact.sha256)
        documents.append(entry)
    devices = []
    for r in rows:
        entry = r.to_dict()
        wanted = dep_id or (r.follows.deployment.deployment_id if r.follows and r.follows.deployment else None)
        entry["phase_of_deployment"] = device_phase(snap.devices.get(r.device_id), model, wanted) if wanted else None
        devices.append(entry)
    return {"model": model, "deployment_id": dep_id, "documents": documents, "devices": devices}


# ---------------------------------------------------------------------- withdraw


def add_withdraw_args(parser: argparse.ArgumentParser) -> None:
    """The options of a withdrawal (`deployments withdraw` and `withdraw`): whose document, which model, the key."""
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--group", type=name_type("group"), help="withdraw the group's document")
    target.add_argument("--device", dest="devices", action="append", type=name_type("device"), metavar="ID",
                        help="withdraw this device's own document (repeat for several)")
    parser.add_argument("--model", required=True, type=name_type("model"), help="the model whose document to withdraw")
    add_key_arg(parser, "operator signing key (file or keygen dir)", required=True)
    parser.add_argument("--expires-in", type=positive_int, default=WITHDRAWAL_EXPIRY_S, metavar="S",
                        help=f"validity of the withdrawal (default {WITHDRAWAL_EXPIRY_S // 86400} days)")


def withdrawal_targets(args: argparse.Namespace) -> list[str]:
    """The signed targets of the withdrawal options."""
    return [group_target(args.group)] if args.group else [device_target(d) for d in dict.fromkeys(args.devices)]


def withdrawable(snap: Snapshot, model: str, targets: Iterable[str]) -> list[Document]:
    """The retained deployment documents of `targets` for `model`; UsageError naming a target that has none."""
    docs = {d.target: d for d in snap.of_model(model)}
    found = []
    for target in targets:
        doc = docs.get(target)
        if doc is None or doc.kind != "deployment":
            what = "is already withdrawn" if doc is not None and doc.kind == "withdrawal" else \
                "is unreadable (push again to replace it)" if doc is not None else "does not exist"
            raise UsageError(f"deployments withdraw: the {model} document for {target} {what}; nothing was published")
        found.append(doc)
    return found


def fallback(snap: Snapshot, model: str, device: str, inventory: dict[str, tuple[str, ...]] | None = None) -> str:
    """What a device follows once its own document is withdrawn."""
    doc = snap.group_document(model, snap.groups_of(device, inventory))
    if doc is None or doc.deployment is None:
        return "no group document: it keeps what it runs"
    return f"falls back to {doc.target} (v{doc.deployment.model.version}, {doc.deployment.deployment_id})"


# ---------------------------------------------------------------------- push --dry-run


@dataclass(frozen=True)
class Fetch:
    """What one device would download for a deployment."""

    chunks: int
    wire_bytes: int
    exact: bool


def held_blobs(view: DeviceView | None, golden_of: dict[str, str]) -> tuple[set[str], bool]:
    """The blobs a device's state says it holds (model artifacts, and the golden vectors of their deployments
    where a retained document names them: `golden_of` maps deployment ids); False when one is not known."""
    held: set[str] = set()
    known = True
    if view is None or view.state is None:
        return held, known
    for state in view.state.models.values():
        for slot in (state.active, state.previous, state.pending):
            if slot is None:
                continue
            held.add(slot.sha256)
            if slot.deployment_id in golden_of:
                held.add(golden_of[slot.deployment_id])
            else:
                known = False
    return held, known


def fetch_cost(dep: Deployment, held: set[str], described: dict[str, Artifact], known: bool = True) -> Fetch:
    """The chunks and wire bytes a device holding the blobs `held` downloads for `dep` (delivery.py's rule)."""
    wanted = [a for a in (dep.model.artifact, dep.model.golden) if a.sha256 not in held]
    local: set[str] = set()
    exact = known
    for sha in held:
        art = described.get(sha)
        if art is None:
            exact = False
            continue
        if any(art.chunk_size == w.chunk_size for w in wanted):
            local.update(c.sha256 for c in art.chunks)
        elif wanted:
            exact = False  # the device would index this blob at another chunk size: unknown here
    missing = {c.sha256: c.wire_size for a in wanted for c in a.chunks if c.sha256 not in local}
    return Fetch(chunks=len(missing), wire_bytes=sum(missing.values()), exact=exact or not wanted)


def dry_run(snap: Snapshot, dep: Deployment, documents: dict[str, bytes], devices: Iterable[str],
            unverified: bool = False) -> dict[str, Any]:
    """`push --dry-run`: the documents that would be published and, per targeted device, what it would do."""
    described = {**snap.artifacts(), dep.model.artifact.sha256: dep.model.artifact,
                 dep.model.golden.sha256: dep.model.golden}
    golden_of = {**snap.golden_of(), dep.deployment_id: dep.model.golden.sha256}
    name = dep.model.name
    group_push = all("/groups/" in t for t in documents)
    rows = []
    for device in dict.fromkeys(devices):
        view = snap.devices.get(device)
        state = view.model(name) if view is not None else None
        held, known = held_blobs(view, golden_of)
        cost = fetch_cost(dep, held, described, known)
        own = next((d for d in snap.of_model(name) if d.device == device and d.live(snap.taken_at)), None)
        if group_push and own is not None and own.deployment is not None:
            effect = (f"pinned by its own document (v{own.deployment.model.version}): ignores this group push until "
                      f"'edgectl deployments withdraw --device {device} --model {name} --key KEY'")
            cost = Fetch(0, 0, True)
        elif state is not None and state.active is not None and state.active.deployment_id == dep.deployment_id:
            effect = "runs this deployment already"
        elif state is not None and state.active is not None and state.active.version >= dep.model.version \
                and not dep.policy.allow_downgrade:
            effect = f"refuses it: runs v{state.active.version}, not below v{dep.model.version} (no --allow-downgrade)"
            cost = Fetch(0, 0, True)
        else:
            effect = f"installs v{dep.model.version}"
        rows.append({
            "device_id": device, "online": view is not None and view.online, "seen": view is not None and
            view.status is not None, "runs": state.active.version if state is not None and state.active else None,
            "effect": effect, "fetch_chunks": cost.chunks, "fetch_wire_bytes": cost.wire_bytes, "exact": cost.exact,
        })
    return {"dry_run": True, "model": name, "version": dep.model.version, "deployment_id": dep.deployment_id,
            "documents": [{"topic": t, "bytes": len(p)} for t, p in documents.items()],
            "members_unverified": unverified, "devices": rows}


# ---------------------------------------------------------------------- history


@dataclass(frozen=True)
class HistoryEntry:
    """One lifecycle step of one deployment on one device, and where it was read: `events` (live),
    `collector` (a `fleet collect` file) or `state` (a device's last outcome, retained)."""

    event: Event
    source: str

    def to_dict(self) -> dict[str, Any]:
        """JSON value: the event's fields and its source."""
        return {**self.event.to_dict(), "source": self.source}


def from_states(devices: dict[str, DeviceView]) -> Iterator[HistoryEntry]:
    """Each device's last outcome per model, from its retained state (what survives when nobody listened)."""
    for device, view in devices.items():
        for name, state in (view.state.models.items() if view.state is not None else ()):
            o = state.last_outcome
            if o is not None:
                yield HistoryEntry(Event(ts=o.ts, device_id=device, model=name, step=Phase(o.result.upper()),
                                         ok=o.result == "committed", version=o.version, deployment_id=o.deployment_id,
                                         reason=o.reason), "state")


def from_collector(path: Path) -> tuple[list[HistoryEntry], int]:
    """The events of a `fleet collect --out` JSON Lines file, and how many lines were not readable events."""
    entries, bad = [], 0
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    if not isinstance(record, dict) or record.get("kind") != "events":
                        continue
                    entries.append(HistoryEntry(Event.from_dict(record["doc"]), "collector"))
                except (ValueError, KeyError, ProtocolError):
                    bad += 1
    except OSError as err:
        raise UsageError(f"--from {path}: {err.strerror or err}") from err
    return entries, bad


def select(entries: Iterable[HistoryEntry], *, model: str | None = None, device: str | None = None,
           deployment: str | None = None, since: float | None = None) -> list[HistoryEntry]:
    """Entries matching the filters, oldest first; a state outcome only when no event already reports that step."""
    def wanted(e: Event) -> bool:
        return ((model is None or e.model == model) and (device is None or e.device_id == device)
                and (deployment is None or e.deployment_id == deployment) and (since is None or e.ts >= since))

    chosen = sorted((h for h in entries if wanted(h.event)), key=lambda h: h.event.ts)
    reported = {_step(h.event) for h in chosen if h.source != "state"}
    return [h for h in chosen if h.source != "state" or _step(h.event) not in reported]


def _step(e: Event) -> tuple[str, str, str | None, str]:
    return e.device_id, e.model, e.deployment_id, str(e.step)
