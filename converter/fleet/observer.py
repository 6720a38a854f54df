"""The fleet as the host sees it: the latest status, state, events and telemetry of every device.

`FleetObserver.handle` is a Transport's `on_message`: it parses the small device documents and keeps
the latest per device under a lock, so `push --wait`, `fleet status` and live views can read
consistent snapshots from any thread. `attach` subscribes and then waits for a private sync message
(`{prefix}/sync/{client id}`, sent to ourselves after the subscriptions): the broker delivers it
after the retained documents those subscriptions produced, so a snapshot taken then is complete
without guessing a settle time.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from edgefleet.errors import ProtocolError, TransportError
from edgefleet.protocol import DeviceState, Event, ModelState, Status, Telemetry, Topics, dump, parse_json
from edgefleet.transport import Message, Transport

if TYPE_CHECKING:
    from edgefleet.converter.fleet.inventory import InventoryTracker

log = logging.getLogger(__name__)

LEAVES = ("status", "state", "events", "telemetry")
# Settle time after the sync message, for brokers that deliver retained messages out of band.
SETTLE_S = 0.1


@dataclass(frozen=True)
class DeviceView:
    """What the fleet knows about one device."""

    device_id: str
    status: Status | None = None
    state: DeviceState | None = None
    telemetry: Telemetry | None = None
    events: tuple[Event, ...] = ()
    problems: tuple[str, ...] = ()
    updated: float = 0.0

    @property
    def online(self) -> bool:
        """True when the device's retained status says online."""
        return self.status is not None and self.status.status == "online"

    @property
    def groups(self) -> tuple[str, ...]:
        """Groups the device claims in its status: shown to people, never used for membership."""
        return self.status.groups if self.status is not None else ()

    @property
    def agent_version(self) -> str | None:
        """The agent version the device last reported."""
        doc = self.status or self.state
        return doc.agent_version if doc is not None else None

    def model(self, name: str) -> ModelState | None:
        """The device's state of one model, if it reported any."""
        return self.state.models.get(name) if self.state is not None else None

    def to_dict(self) -> dict[str, Any]:
        """JSON value for `fleet status --json`."""
        return {
            "device_id": self.device_id,
            "online": self.online,
            "groups": list(self.groups),
            "agent_version": self.agent_version,
            "status_ts": self.status.ts if self.status else None,
            "models": dump(self.state.models) if self.state else {},
            "telemetry": self.telemetry.to_dict() if self.telemetry else None,
            "problems": list(self.problems),
        }


class Sync:
    """A message to ourselves that arrives after every retained message of earlier subscriptions."""

    def __init__(self, topics: Topics, client_id: str) -> None:
        self.topic = topics.sync(client_id)
        self._token = b""
        self._done = threading.Event()

    def handle(self, message: Message) -> bool:
        """Consume the sync message; False for every other message."""
        if message.topic != self.topic:
            return False
        if message.payload == self._token:
            self._done.set()
        return True

    def wait(self, transport: Transport, timeout: float = 10.0) -> None:
        """Send the sync message and wait for it; TransportError when it does not come back."""
        self._done.clear()
        self._token = uuid.uuid4().hex.encode()
        transport.publish(self.topic, self._token, qos=1, wait=timeout)
        if not self._done.wait(timeout):
            raise TransportError(f"the broker did not deliver our sync message within {timeout:g} s")
        threading.Event().wait(SETTLE_S)


class FleetObserver:
    """The latest documents of every device, fed by a Transport, safe to read from any thread."""

    def __init__(self, topics: Topics, *, leaves: Iterable[str] = LEAVES, max_events: int = 100,
                 clock: Callable[[], float] = time.time, inventory: InventoryTracker | None = None) -> None:
        self.topics = topics
        self.inventory = inventory
        self.leaves = tuple(leaves)
        self._clock = clock
        self._cond = threading.Condition()
        self._devices: dict[str, DeviceView] = {}
        self._max_events = max_events
        self._events: deque[tuple[int, Event]] = deque(maxlen=10 * max_events)
        self._seq = 0
        self._sync: Sync | None = None

    # ------------------------------------------------------------------ wiring

    def attach(self, transport: Transport, timeout: float = 10.0) -> None:
        """Subscribe `transport` (whose on_message is `handle`) and wait until the retained documents are in."""
        self._sync = Sync(self.topics, transport.client_id)
        extra = [self.inventory.topic] if self.inventory is not None else []
        transport.subscribe([*(self.topics.all_devices(leaf) for leaf in self.leaves), *extra, self._sync.topic],
                            wait=timeout)
        self._sync.wait(transport, timeout)

    def handle(self, message: Message) -> None:
        """Take one message (a Transport's on_message): parse it and keep it as the device's latest."""
        if self._sync is not None and self._sync.handle(message):
            return
        if self.inventory is not None and self.inventory.handle(message):
            with self._cond:
                self._seq += 1
                self._cond.notify_all()
            return
        try:
            route = self.topics.parse(message.topic)
        except ProtocolError:
            log.debug("ignoring %s", message.topic)
            return
        if route.device is None or route.kind not in self.leaves:
            return
        device = route.device
        problem = None
        change: dict[str, Any] = {}
        try:
            if not message.payload:  # a cleared retained document
                change = {route.kind: None} if route.kind in ("status", "state") else {}
            elif route.kind == "status":
                change = {"status": Status.from_dict(parse_json(message.payload))}
            elif route.kind == "state":
                change = {"state": DeviceState.from_dict(parse_json(message.payload))}
            elif route.kind == "telemetry":
                change = {"telemetry": Telemetry.from_dict(parse_json(message.payload))}
            elif route.kind == "events":
                change = {"event": Event.from_dict(parse_json(message.payload))}
        except ProtocolError as err:
            problem = f"{route.kind}: {err}"
            log.warning("device %s sent a bad %s document: %s", device, route.kind, err)
        with self._cond:
            view = self._devices.get(device) or DeviceView(device_id=device)
            if problem is not None:
                view = replace(view, problems=(*view.problems, problem)[-10:])
            event = change.pop("event", None)
            if event is not None:
                self._seq += 1
                self._events.append((self._seq, event))
                view = replace(view, events=(*view.events, event)[-self._max_events:])
            view = replace(view, updated=self._clock(), **change)
            self._devices[device] = view
            self._seq += 1
            self._cond.notify_all()

    # ------------------------------------------------------------------ reading

    @property
    def version(self) -> int:
        """Increases with every message taken; pass it to `wait_change`."""
        with self._cond:
            return self._seq

    def wait_change(self, seen: int, timeout: float) -> int:
        """Block until something newer than `seen` arrived or `timeout` passed; return the current version."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > seen, timeout)
            return self._seq

    def devices(self) -> dict[str, DeviceView]:
        """A snapshot of every device seen, by id."""
        with self._cond:
            return dict(self._devices)

    def get(self, device_id: str) -> DeviceView | None:
        """The latest view of one device."""
        with self._cond:
            return self._devices.get(device_id)

    def events_after(self, cursor: int) -> tuple[list[Event], int]:
        """Events taken after `cursor` (0: every event still held) and the cursor to pass next time."""
        with self._cond:
            new = [e for seq, e in self._events if seq > cursor]
            return new, self._seq

    def claiming(self, group: str) -> list[str]:
        """Devices whose status claims `group`, online or not: for display only (any device may claim any
        group); membership comes from the signed inventory (converter/fleet/inventory.py)."""
        with self._cond:
            return sorted(d for d, v in self._devices.items() if group in v.groups)
