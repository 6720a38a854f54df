"""Canary rollouts (`edgectl push --group G --canary N`): a few members first, the group only after they pass.

The sequence (docs/operations-canary.md explains it for operators):

1. pick N canaries among the group's *online* members, sorted by device id, skipping devices that
   hold their own retained document for the model (they would not follow the group afterwards). The
   members come from the operator-signed inventory (converter/fleet/inventory.py), never from what devices
   claim in their status, so a device cannot make itself a canary nor vote on a rollout it is not part of;
2. publish the chunks, then the deployment document retained to each canary's device-level topic,
   each signed for its device (``target = device:ID``; a device document overrides the group's for
   that model on the device);
3. wait until every canary reports COMMITTED (probation passed);
4a. all passed: publish the same deployment (same id, signed for ``group:G``) to the group's topic,
   then withdraw the canaries' device documents with signed withdrawals: the group document now names
   the same deployment, and a device document left behind would pin the canaries to it even when
   later group pushes arrive;
4b. a canary rejected or rolled back the deployment, or did not finish in time: wait for canaries
   still in the middle of it, send a signed rollback command to each canary that activated it, then
   withdraw their device documents so they follow the group document again, which still names the old
   model. The group document is not published.

A withdrawal takes the order back and uninstalls nothing, and a device remembers a deployment it
rolled back and never retries it; that is why the rollback is an explicit command. Withdrawals are
signed documents retained in the withdrawn document's place: agents ignore an empty retained payload,
which anyone allowed to publish on the topic could send.
"""

from __future__ import annotations

import argparse
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, asdict, dataclass, field
from typing import Any, Literal

from edgefleet.converter.fleet.observer import DeviceView, FleetObserver
from edgefleet.converter.fleet.publish import (
    DeviceResult,
    Prepared,
    device_target,
    group_target,
    is_withdrawal,
    judge,
    make_command,
    publish_documents,
    publish_withdrawals,
    rollback_result,
    targeted_documents,
    wait_for_rollout,
)
from edgefleet.errors import ProtocolError
from edgefleet.protocol import Topics, canonical_json
from edgefleet.protocol.signing import SigningKey
from edgefleet.transport import Message, Transport

log = logging.getLogger(__name__)

UNDO_TIMEOUT_S = 60.0

Where = Literal["untouched", "in-progress", "active", "undone"]


# ---------------------------------------------------------------------- how many, which


@dataclass(frozen=True)
class CanarySize:
    """`--canary N` (a count) or `--canary P%` (a share of the group's online members)."""

    count: int | None = None
    percent: float | None = None

    def of(self, online: int) -> int:
        """How many canaries for `online` candidates: at least 1, at most all of them."""
        if self.count is not None:
            wanted = self.count
        else:
            assert self.percent is not None
            wanted = math.ceil(online * self.percent / 100.0 - 1e-9)
        return max(1, min(wanted, online))

    def __str__(self) -> str:
        return f"{self.count}" if self.count is not None else f"{self.percent:g}%"


def parse_canary(text: str) -> CanarySize:
    """argparse type for --canary: a count >= 1 or a percentage in (0, 100]."""
    raw = text.strip()
    try:
        if raw.endswith("%"):
            percent = float(raw[:-1])
            if not 0 < percent <= 100 or math.isnan(percent):
                raise argparse.ArgumentTypeError(f"--canary {text!r}: a percentage must be above 0 and at most 100")
            return CanarySize(percent=percent)
        count = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--canary {text!r}: expected a device count (3) or a percentage (10%)") \
            from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"--canary {text!r}: expected at least 1 device")
    return CanarySize(count=count)


class PinnedDocuments:
    """Devices holding their own retained deployment document for one model (fed by a Transport)."""

    def __init__(self, topics: Topics, model: str) -> None:
        self.topics = topics
        self.model = model
        self._lock = threading.Lock()
        self._devices: set[str] = set()

    @property
    def subscription(self) -> str:
        """The wildcard covering every device's document for the model."""
        return self.topics.all_device_models(self.model)

    def handle(self, message: Message) -> None:
        """Remember retained device documents (a cleared one, an empty payload, removes the pin)."""
        if not message.retain:
            return  # our own publishes coming back are not pins that existed before the push
        try:
            route = self.topics.parse(message.topic)
        except ProtocolError:
            return
        if route.kind != "device_model" or route.model != self.model or route.device is None:
            return
        with self._lock:
            if message.payload and not is_withdrawal(message.payload):
                self._devices.add(route.device)
            else:
                self._devices.discard(route.device)

    def devices(self) -> set[str]:
        """Pinned device ids."""
        with self._lock:
            return set(self._devices)


@dataclass(frozen=True)
class Selection:
    """Which members of the group become canaries, and why the others do not."""

    canaries: tuple[str, ...]
    online: tuple[str, ...]
    offline: tuple[str, ...]
    pinned: tuple[str, ...]

    def describe(self, group: str) -> str:
        """`canaries: cam-1, cam-2 (2 of 5 online member(s) of lab; ...)`."""
        extra = []
        if self.offline:
            extra.append(f"{len(self.offline)} offline member(s) are not candidates")
        if self.pinned:
            extra.append(f"skipped {', '.join(self.pinned)}: pinned by their own device document")
        more = f"; {'; '.join(extra)}" if extra else ""
        return (f"canaries: {', '.join(self.canaries)} ({len(self.canaries)} of {len(self.online)} online "
                f"member(s) of {group}{more})")


def pick_canaries(observer: FleetObserver, members: Iterable[str], size: CanarySize, pinned: set[str]) -> Selection:
    """The first N online, unpinned `members` (the group's, from the inventory) by device id (deterministic,
    so reruns agree)."""
    online: list[str] = []
    offline: list[str] = []
    for d in sorted(set(members)):
        view = observer.get(d)
        (online if view is not None and view.online else offline).append(d)
    candidates = [d for d in online if d not in pinned]
    count = size.of(len(candidates)) if candidates else 0
    return Selection(canaries=tuple(candidates[:count]), online=tuple(online), offline=tuple(offline),
                     pinned=tuple(d for d in online if d in pinned))


# ---------------------------------------------------------------------- where a canary stands


def where(view: DeviceView | None, name: str, dep_id: str) -> Where:
    """How far a device got with a deployment: untouched, in progress, active (probation or committed), undone."""
    if view is None:
        return "untouched"
    verdict = judge(view, name, dep_id)
    if verdict is not None and verdict[0] == "failed":
        return "undone"
    state = view.model(name)
    if state is not None and state.active is not None and state.active.deployment_id == dep_id:
        return "active"
    if state is not None and state.pending is not None and state.pending.deployment_id == dep_id:
        return "in-progress"
    if verdict is not None:  # committed by its events while the state document lags behind
        return "active"
    if any(e.deployment_id == dep_id and e.model == name for e in view.events):
        return "in-progress"
    return "untouched"


def current_version(view: DeviceView | None, name: str) -> str:
    """`v3`, or `no version` when the device serves none of this model."""
    state = view.model(name) if view is not None else None
    return f"v{state.active.version}" if state is not None and state.active is not None else "no version"


@dataclass(frozen=True)
class Undo:
    """What rolling one canary back did."""

    device_id: str
    ok: bool
    detail: str


@dataclass
class CanaryOutcome:
    """The result of the canary phase and of what followed it."""

    selection: Selection
    results: dict[str, DeviceResult] = field(default_factory=dict)
    passed: bool = False
    group_published: bool = False
    cleared: list[str] = field(default_factory=list)
    undo: list[Undo] = field(default_factory=list)

    @property
    def failures(self) -> list[DeviceResult]:
        """Canaries that rejected or rolled back, then the ones that did not finish."""
        failed = [r for r in self.results.values() if r.verdict == "failed"]
        return failed + [r for r in self.results.values() if r.verdict == "waiting"]

    def failure_lines(self, group: str) -> list[str]:
        """What a failed canary phase did, for the operator: the unfinished, the first failure, each undo."""
        lines = [f"canary {r.device_id}: unfinished: {r.detail}" for r in self.results.values()
                 if r.verdict == "waiting"]
        first = self.failures[0]
        lines.append(f"canary failed: {first.device_id}: {first.detail}")
        lines += [f"  {u.device_id}: {u.detail}" if u.ok else f"  {u.device_id}: NOT UNDONE: {u.detail}"
                  for u in self.undo]
        lines.append(f"withdrew the device documents of {', '.join(self.cleared)}; the group document was not "
                     f"published, so the other members of {group} keep their current version")
        return lines

    def to_dict(self, size: CanarySize) -> dict[str, Any]:
        """The canary phase as JSON (`push --canary --json`)."""
        sel = self.selection
        failed = self.failures[0] if self.failures else None
        return {
            "size": str(size), "devices": list(sel.canaries), "online": list(sel.online),
            "offline": list(sel.offline), "pinned": list(sel.pinned), "passed": self.passed,
            "results": [asdict(r) for r in self.results.values()],
            "failed": asdict(failed) if failed is not None else None,
            "undo": [asdict(u) for u in self.undo],
            "group_published": self.group_published, "cleared": self.cleared,
        }


def canary_line(r: DeviceResult) -> str | None:
    """A canary's verdict as the operator reads it; None while it is still waiting."""
    if r.verdict == "committed":
        return f"canary {r.device_id}: committed {r.detail} after {r.seconds or 0:.1f} s"
    if r.verdict == "failed":
        return f"canary {r.device_id}: {r.detail}"
    return None


# ---------------------------------------------------------------------- the rollout


@dataclass
class CanaryRollout:
    """Runs steps 2-4 of the module docstring over a connected transport and an attached observer."""

    transport: Transport
    observer: FleetObserver
    topics: Topics
    prepared: Prepared
    group: str
    selection: Selection
    key: SigningKey
    _: KW_ONLY
    timeout: float
    undo_timeout: float = UNDO_TIMEOUT_S
    say: Callable[[str], None] = lambda line: None
    on_result: Callable[[DeviceResult], None] | None = None
    on_tick: Callable[[], None] | None = None
    """Called while the canaries are waited for (wait_for_rollout's on_tick): live progress."""

    @property
    def name(self) -> str:
        """The model being rolled out."""
        return self.prepared.deployment.model.name

    @property
    def dep_id(self) -> str:
        """The deployment being rolled out."""
        return self.prepared.deployment.deployment_id

    def run(self) -> CanaryOutcome:
        """Canaries first; the group document only when every canary committed. Ctrl-C undoes, then re-raises."""
        outcome = CanaryOutcome(self.selection)
        canaries = list(self.selection.canaries)
        targets = {d: DeviceResult(d, "waiting") for d in canaries}
        publish_documents(self.transport,
                          targeted_documents(self.prepared, self.topics, [device_target(d) for d in canaries]))
        try:
            outcome.results = wait_for_rollout(self.observer, targets, self.name, self.dep_id, self.timeout,
                                               on_result=self.on_result, on_tick=self.on_tick)
        except KeyboardInterrupt:
            self.say("interrupted: rolling the canaries back")
            outcome.undo = self.undo(canaries)
            outcome.cleared = self.clear(canaries)
            raise
        outcome.passed = all(r.verdict == "committed" for r in outcome.results.values())
        if outcome.passed:
            # Group document first: cleared device documents would otherwise fall back to the old group
            # document for a moment, which the canaries refuse as a downgrade (an alarming REJECTED event).
            publish_documents(self.transport,
                              targeted_documents(self.prepared, self.topics, [group_target(self.group)]))
            outcome.group_published = True
        else:
            outcome.undo = self.undo(canaries)
        outcome.cleared = self.clear(canaries)
        return outcome

    def clear(self, devices: list[str]) -> list[str]:
        """Withdraw the canaries' device documents (signed withdrawals); they follow the group again."""
        publish_withdrawals(self.transport, self.topics, self.key, self.name, [device_target(d) for d in devices])
        return list(devices)

    def undo(self, canaries: list[str]) -> list[Undo]:
        """Let canaries finish what they are doing with the deployment, then roll back those that activated it."""
        deadline = time.monotonic() + self.undo_timeout
        self._settle(canaries, deadline)
        done: dict[str, Undo] = {}
        commands: dict[str, str] = {}
        sent_at = time.time()
        for d in canaries:
            view = self.observer.get(d)
            place = where(view, self.name, self.dep_id)
            if place == "undone":
                done[d] = Undo(d, True, f"nothing to undo: it did not keep the deployment ({current_version(view, self.name)})")
            elif place == "untouched":
                done[d] = Undo(d, True, f"nothing to undo: it never started the deployment "
                                        f"({current_version(view, self.name)})")
            elif view is None or not view.online:
                done[d] = Undo(d, False, "offline, so it cannot be ordered back (commands are not retained); "
                                         "check it and roll it back with edgectl rollback when it returns")
            elif place == "in-progress":
                done[d] = Undo(d, False, f"still busy with the deployment after {self.undo_timeout:g} s; its "
                                         "document is withdrawn, check it and roll it back with edgectl rollback")
            else:
                command = make_command(self.key, d, "rollback", self.name)
                self.transport.publish(self.topics.cmd(d), canonical_json(command), qos=1, wait=True)
                commands[d] = command["command_id"]
        seen = self.observer.version
        while commands:
            for d, command_id in list(commands.items()):
                view = self.observer.get(d)
                result = rollback_result(view, self.name, command_id, sent_at)
                if result is None and where(view, self.name, self.dep_id) == "undone":
                    result = True, f"rolled back by itself ({current_version(view, self.name)})"
                if result is not None:
                    ok, detail = result
                    if ok and not detail.startswith("rolled back"):
                        detail = f"rolled back: {detail}"
                    if not ok and where(view, self.name, self.dep_id) != "active":
                        ok, detail = True, f"{detail}; it no longer runs the deployment ({current_version(view, self.name)})"
                    elif not ok:
                        detail = f"rollback refused: {detail}; it keeps the deployment"
                    done[d] = Undo(d, ok, detail)
                    del commands[d]
            remaining = deadline - time.monotonic()
            if commands and remaining <= 0:
                for d in commands:
                    done[d] = Undo(d, False, f"sent a rollback command but no confirmation within {self.undo_timeout:g} s")
                break
            if commands:
                seen = self.observer.wait_change(seen, min(max(remaining, 0.0), 1.0))
        return [done[d] for d in canaries]

    def _settle(self, canaries: list[str], deadline: float) -> None:
        """Wait (until `deadline`) for online canaries in the middle of the deployment to reach an end."""
        seen = self.observer.version
        while True:
            busy = [d for d in canaries if (v := self.observer.get(d)) is not None and v.online
                    and where(v, self.name, self.dep_id) == "in-progress"]
            remaining = deadline - time.monotonic()
            if not busy or remaining <= 0:
                return
            seen = self.observer.wait_change(seen, min(remaining, 1.0))
