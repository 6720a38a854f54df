"""A stand-in device for host-side tests: speaks the documented status/state/events, decides by script.

It connects like an agent (retained `offline` will, retained `online` status with its groups),
follows its own and its groups' deployment topics, verifies signatures when given a keyring, and
answers each deployment with the events and state a real agent reports for the scripted outcome.
It downloads nothing: the host commands under test only read what devices report.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from edgefleet.errors import ProtocolError
from edgefleet.protocol import (
    Command,
    Deployment,
    DeviceState,
    Event,
    Keyring,
    ModelState,
    Outcome,
    Slot,
    Status,
    Topics,
    canonical_json,
    parse_json,
)
from edgefleet.protocol.documents import WITHDRAWAL_SCHEMA
from edgefleet.transport import Message, MqttSettings, Transport

Behaviour = Literal["commit", "reject", "silent"]


@dataclass
class FakeDevice:
    """A scripted device on a real broker."""

    url: str
    device_id: str
    groups: tuple[str, ...] = ()
    behaviour: Behaviour = "commit"
    reason: str = "validation: output 0 differs from the golden output by 0.31 (tolerance 0.001)"
    keyring: Keyring | None = None
    prefix: str = "edgefleet"
    credentials: dict[str, Any] = field(default_factory=dict)
    deployments: list[Deployment] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.topics = Topics(self.prefix)
        self.models: dict[str, ModelState] = {}
        self._inbox: queue.Queue[Message | None] = queue.Queue()
        offline = Status(status="offline", device_id=self.device_id, agent_version="fake", groups=self.groups)
        self.transport = Transport(
            MqttSettings(url=self.url, client_id=self.device_id, reconnect_min_s=0.1, reconnect_max_s=0.5,
                         **self.credentials),
            on_message=self._inbox.put, will=(self.topics.status(self.device_id), canonical_json(offline.to_dict()), True),
        )
        self._worker = threading.Thread(target=self._run, name=f"fake-{self.device_id}", daemon=True)

    def start(self) -> FakeDevice:
        """Connect, announce online, follow the deployment and command topics."""
        t = self.transport
        t.subscribe([self.topics.device_models(self.device_id), self.topics.cmd(self.device_id),
                     *(self.topics.group_models(g) for g in self.groups)])
        self._worker.start()
        t.start()
        if not t.wait_connected(10):
            raise AssertionError(f"fake device {self.device_id} cannot connect: {t.last_error}")
        self._publish_status("online")
        self._publish_state()
        return self

    def stop(self) -> None:
        """Finish the message at hand, then disconnect cleanly (the retained status stays as it was)."""
        self._inbox.put(None)
        self._worker.join(5)
        self.transport.stop(timeout=2)

    def _publish_status(self, status: Literal["online", "offline"]) -> None:
        doc = Status(status=status, device_id=self.device_id, agent_version="fake", ts=time.time(), groups=self.groups)
        self.transport.publish(self.topics.status(self.device_id), canonical_json(doc.to_dict()), retain=True, wait=5)

    def _publish_state(self) -> None:
        doc = DeviceState(device_id=self.device_id, ts=time.time(), agent_version="fake", models=dict(self.models))
        self.transport.publish(self.topics.state(self.device_id), canonical_json(doc.to_dict()), retain=True, wait=5)

    def _event(self, dep: Deployment | None, model: str, step: Any, ok: bool, reason: str | None = None,
               **details: Any) -> None:
        event = Event(ts=time.time(), device_id=self.device_id, model=model, step=step, ok=ok,
                      deployment_id=dep.deployment_id if dep else None, version=dep.model.version if dep else None,
                      reason=reason, details=details)
        self.transport.publish(self.topics.events(self.device_id), canonical_json(event.to_dict()), wait=5)

    def _run(self) -> None:
        while (message := self._inbox.get()) is not None:
            if not message.payload:
                continue
            route = self.topics.parse(message.topic)
            if route.kind == "cmd":
                self._command(parse_json(message.payload))
            else:
                self._deploy(message.payload)

    def _deploy(self, payload: bytes) -> None:
        raw = parse_json(payload)
        if isinstance(raw, dict) and raw.get("schema") == WITHDRAWAL_SCHEMA:
            return  # a signed withdrawal: nothing to install (an agent forgets the withdrawn document)
        dep = Deployment.from_dict(raw)
        name = dep.model.name
        current = self.models.get(name, ModelState())
        if current.last_outcome is not None and current.last_outcome.deployment_id == dep.deployment_id:
            return  # a retained document seen again after a reconnect
        self.deployments.append(dep)
        if self.behaviour == "silent":
            return
        reason = self.reason
        if self.keyring is not None:
            try:
                self.keyring.verify(raw)
            except ProtocolError as err:
                reason = f"signature: {err}"
                self.behaviour = "reject"
        self._event(dep, name, "DOWNLOADING", True)
        slot = Slot(version=dep.model.version, deployment_id=dep.deployment_id, sha256=dep.model.artifact.sha256)
        if self.behaviour == "commit":
            self._event(dep, name, "COMMITTED", True)
            outcome = Outcome(deployment_id=dep.deployment_id, version=dep.model.version, result="committed",
                              ts=time.time())
            self.models[name] = ModelState(phase="COMMITTED", active=slot, previous=current.active,
                                           last_outcome=outcome)
        else:
            self._event(dep, name, "REJECTED", False, reason, failed_step="VALIDATING")
            outcome = Outcome(deployment_id=dep.deployment_id, version=dep.model.version, result="rejected",
                              reason=reason, ts=time.time())
            self.models[name] = ModelState(phase=current.phase if current.active else "REJECTED",
                                           active=current.active, previous=current.previous, last_outcome=outcome)
        self._publish_state()

    def _command(self, raw: dict[str, Any]) -> None:
        self.commands.append(raw)
        cmd = Command.from_dict(raw)
        if self.keyring is not None:
            try:
                self.keyring.verify(raw)
            except ProtocolError as err:
                self._event(None, cmd.model or "-", "IDLE", False,
                            f"command refused: {err}", command_id=cmd.command_id)
                return
        name = cmd.model or "-"
        state = self.models.get(name)
        if state is None or state.previous is None:
            self._event(None, name, "IDLE", False, "nothing to roll back to", command_id=cmd.command_id)
            return
        failed = state.active
        assert failed is not None
        self.models[name] = ModelState(
            phase="ROLLED_BACK", active=state.previous,
            last_outcome=Outcome(deployment_id=failed.deployment_id, version=failed.version, result="rolled_back",
                                 reason="rollback ordered by the operator", ts=time.time()))
        self.transport.publish(self.topics.events(self.device_id), canonical_json(Event(
            ts=time.time(), device_id=self.device_id, model=name, step="ROLLED_BACK", ok=False,
            deployment_id=failed.deployment_id, version=failed.version, reason="rollback ordered by the operator",
            details={"restored_version": state.previous.version, "command_id": cmd.command_id}).to_dict()), wait=5)
        self._publish_state()
