"""The real agent driven in-process, for thousands of hostile inputs per second.

`InProcessAgent` is the shipped `Daemon` (store, lifecycle with the real validation child, real
Serving with a real interpreter, FleetLink, API server) on a private state directory. Only the MQTT
transport is replaced, by `StubTransport`, which records what the agent publishes and subscribes;
messages are handed to `FleetLink.handle` exactly as the daemon's loop does. `snapshot()` captures
what must not change when an input is refused: the installed models, what is served, and the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.config import parse_config
from edgefleet.agent.daemon import Daemon
from edgefleet.agent.fleet.delivery import ChunkStored
from edgefleet.agent.fleet.link import FleetLink
from edgefleet.bundle import GOLDEN_FILE, MODEL_FILE
from edgefleet.protocol import Event, SigningKey, Topics, parse_json
from edgefleet.testing.agentproc import toml
from edgefleet.testing.reliability import X
from edgefleet.transport import Message

TOPICS = Topics()


class StubTransport:
    """Stands in for edgefleet.transport.Transport: always connected, records every call."""

    def __init__(self, settings: Any, *, on_message: Callable[[Message], None], will: Any = None,
                 on_connection: Callable[[bool], None] | None = None) -> None:
        self.settings = settings
        self.on_message = on_message
        self.published: list[tuple[str, bytes, bool]] = []
        self.subscriptions: set[str] = set()
        self.connected = True

    def start(self) -> None:
        """Nothing to connect."""

    def stop(self, timeout: float = 3.0) -> None:
        """Nothing to disconnect."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, wait: Any = False) -> None:
        """Record a publish."""
        self.published.append((topic, payload, retain))
        del self.published[:-200]  # a long fuzz run must not keep every state document

    def subscribe(self, topics: Any, qos: int = 1, wait: Any = False, on_refused: Any = None) -> None:
        """Record subscriptions (all granted)."""
        self.subscriptions.update([topics] if isinstance(topics, str) else topics)

    def unsubscribe(self, topics: Any) -> None:
        """Forget subscriptions."""
        self.subscriptions.difference_update([topics] if isinstance(topics, str) else topics)


def tree(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> SHA-256 of its content; sockets and dirs by kind)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root) + "/"] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            try:
                with open(path, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
            except OSError:
                out[rel] = "special"
    return out


@dataclass(frozen=True)
class Snapshot:
    """What a refused input must leave as it was."""

    models: dict[str, Any]
    served: dict[str, tuple[int, str]]
    prediction: list[float]
    blobs: frozenset[str]


@dataclass
class InProcessAgent:
    """A Daemon on `root/state` serving a committed v1 of model "m" (see the module docstring)."""

    root: Path
    key: SigningKey
    daemon: Daemon
    events: list[Event] = field(default_factory=list)
    thread: threading.Thread | None = None

    @classmethod
    def create(cls, root: Path, v1: Path, key: SigningKey, *, mqtt: bool = True, **sections: Any) -> InProcessAgent:
        """Install and commit the bundle `v1` on a fresh state directory and build the daemon on it."""
        keys = root / "keys"
        if not (keys / "edgefleet.pub").exists():
            key.write(keys)
        config: dict[str, Any] = {
            "device_id": "dev-1", "groups": ["lab"], "state_dir": str(root / "state"),
            "api": {"socket": str(root / "api.sock")},
            "security": {"trusted_keys": [str(keys / "edgefleet.pub")]},
            "validation": {"timeout_s": 20, "latency_runs": 5},
            # thousands of deployments an hour here: the cap on update attempts would put them off
            "health": {"probation_s": 3600, "min_requests": 5, "max_updates_per_hour": 1_000_000},
            "telemetry": {"interval_s": 3600},
        }
        if mqtt:
            config["mqtt"] = {"url": "mqtt://127.0.0.1:9"}  # never dialled: the transport is a stub
        for name, values in sections.items():
            config.setdefault(name, {}).update(values)
        cfg = parse_config(toml(config))
        daemon = Daemon(cfg)
        agent = cls(root, key, daemon)
        if mqtt:
            assert daemon.link is not None
            daemon.sinks.remove(daemon.link.publish_event)
            daemon.link = FleetLink(cfg, daemon.lifecycle, inbox=daemon.queue.put, transport_factory=StubTransport)
            daemon.sinks.append(daemon.link.publish_event)
        daemon.sinks.append(agent.events.append)
        lc = daemon.lifecycle
        if lc.state.record("m").active is None:
            raw = parse_json((v1 / "manifest.json").read_bytes())
            assert lc.install_bundle(raw, (v1 / MODEL_FILE).read_bytes(), (v1 / GOLDEN_FILE).read_bytes()) == "PROBATION"
            lc.commit("m")
        return agent

    # --- driving -------------------------------------------------------------------------------

    @property
    def link(self) -> FleetLink:
        """The daemon's MQTT side (with the stub transport)."""
        assert self.daemon.link is not None
        return self.daemon.link

    @property
    def transport(self) -> StubTransport:
        """The stub transport."""
        return self.link.transport  # type: ignore[return-value]

    def boot(self) -> None:
        """Load the active models into serving, as the daemon does at start (no loop thread)."""
        self.daemon.lifecycle.boot()

    def deliver(self, topic: str, payload: bytes) -> list[Event]:
        """Hand one message to FleetLink as the MQTT network thread would, then handle what reaches the
        loop thread's queue (the message itself, what the chunk workers post back) until no chunk is being
        worked on; return the events it caused."""
        before = len(self.events)
        self.link._on_message(Message(topic=topic, payload=payload))
        self.settle()
        return self.events[before:]

    def settle(self, timeout: float = 60.0) -> None:
        """Handle what reaches the daemon's queue (messages, what the download workers post) until none is busy."""
        deadline = time.monotonic() + timeout
        while True:
            busy = any(job.working for job in self.link.downloads.jobs.values())
            try:
                item = self.daemon.queue.get(timeout=0.01 if busy else 0)
            except queue.Empty:
                if not busy:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError("a chunk worker never reported back") from None
                continue
            if isinstance(item, (Message, ChunkStored)):
                self.link.handle(item)

    def start_loop(self) -> None:
        """Run the daemon's loop (API server included) in a thread."""
        self.thread = threading.Thread(target=self.daemon.run, name="daemon-loop", daemon=True)
        self.thread.start()

    def stop_loop(self) -> None:
        """Stop the loop thread."""
        if self.thread is not None:
            self.daemon.request_stop()
            self.thread.join(30)
            assert not self.thread.is_alive(), "the daemon loop did not stop"

    # --- checking ------------------------------------------------------------------------------

    def predict(self) -> list[float]:
        """The served model's answer to a fixed input (raises if nothing answers)."""
        out = self.daemon.serving.predict("m", np.array(X, dtype=np.float32), top_k=False).outputs[0]
        return [float(v) for v in out.ravel()]

    def snapshot(self) -> Snapshot:
        """Installed models, served versions, an answer, and the blob store."""
        state = json.loads(self.daemon.store.state_path.read_bytes())
        models = {name: {k: rec.get(k) for k in ("active", "previous", "probation")}
                  for name, rec in state["models"].items()}
        served = {}
        for name in self.daemon.serving.names():
            m = self.daemon.serving.served(name)
            if m is not None:
                served[name] = (m.version, m.deployment.deployment_id)
        blobs = frozenset(p.name for p in self.daemon.store.blobs_on_disk())
        return Snapshot(models, served, self.predict(), blobs)

    def state_bytes(self) -> bytes:
        """state.json as on disk."""
        return self.daemon.store.state_path.read_bytes()


class LogCapture(logging.Handler):
    """Collects WARNING+ records of the agent's loggers while installed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.count = 0
        """Records seen so far (only the last hundred are kept)."""

    def emit(self, record: logging.LogRecord) -> None:
        """Keep the record."""
        self.count += 1
        self.records.append(record)
        del self.records[:-100]

    def since(self, count: int) -> list[str]:
        """Messages logged after `count` records had been seen (at most the last hundred)."""
        return [r.getMessage() for r in self.records[len(self.records) - min(len(self.records), self.count - count):]]

    def __enter__(self) -> LogCapture:
        logging.getLogger("edgefleet.agent").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("edgefleet.agent").removeHandler(self)
