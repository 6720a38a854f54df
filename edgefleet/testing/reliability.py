"""Models, bundles, agents behind a broker and an operator: the pieces the fault, fuzz and soak runs share.

The model zoo (`zoo.py`, built once per version of that file in a TensorFlow-only subprocess) is
cached under `cache_dir()`; the pytest fixtures use the same cache, so a benchmark and the suite build
it once between them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.protocol import SigningKey
from edgefleet.testing.agentproc import AgentProcess

ZOO = Path(__file__).resolve().parent / "zoo.py"
CACHE_ENV = "EDGEFLEET_CACHE_DIR"
X = [[0.5, -1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.1]]
"""One input of the zoo's dense models (8 floats)."""


def cache_dir() -> Path:
    """Where built models are kept: $EDGEFLEET_CACHE_DIR, else the user's cache directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgefleet"


def zoo_dir() -> Path:
    """The folder of every zoo model, built on first use for this version of zoo.py."""
    out = cache_dir() / "zoo" / hashlib.sha256(ZOO.read_bytes()).hexdigest()[:16]
    marker = out / ".complete"
    if not marker.exists():
        subprocess.run([sys.executable, str(ZOO), str(out)], check=True, timeout=900)
        marker.touch()
    return out


def zoo_model(name: str) -> Path:
    """Path of a zoo model by name (a function of zoo.py)."""
    path = zoo_dir() / f"{name}.tflite"
    if not path.exists():
        raise LookupError(f"no zoo model {name!r}; add it to {ZOO}")
    return path


def build_bundle(dest: Path, model: str | bytes, *, name: str = "m", version: int = 1,
                 key: SigningKey | None = None, samples: int = 4, **spec: Any) -> Path:
    """A bundle of a zoo model (by name) or of raw model bytes, as the `make_bundle` fixture writes it."""
    from edgefleet.converter.bundle.writer import BundleSpec, write_bundle
    from edgefleet.runtime import load_model

    data = zoo_model(model).read_bytes() if isinstance(model, str) else model
    loaded = load_model(data)
    rng = np.random.default_rng(version)
    golden = []
    for s in loaded.inputs:
        shape = tuple(1 if d == -1 else d for d in s.shape)
        golden.append(rng.normal(size=(samples, *shape)).astype(s.dtype))
    write_bundle(dest, data, BundleSpec(name=name, version=version, golden_inputs=golden, **spec), key=key)
    return dest


def fast_tmp(prefix: str) -> Path:
    """A private directory on a RAM filesystem when there is one: thousands of fsyncs cost nothing there."""
    import tempfile

    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


class AgentWith(AgentProcess):
    """A real `edge-agent run`, optionally behind a command prefix (`unshare ...`) or with a Python prelude.

    The prelude runs in the agent process before the CLI, e.g. to shorten a module constant such as
    `edgefleet.agent.fleet.link.RETRY_INTERVAL_S`; the code under test is otherwise the shipped one.
    """

    def __init__(self, root: Path, device_id: str = "dev-1", *, prefix: list[str] | None = None,
                 prelude: str = "", **sections: Any):
        super().__init__(root, device_id, **sections)
        self.device_id = device_id
        self.prefix = prefix or []
        self.prelude = prelude

    def start(self, wait: bool = True, env: dict[str, str] | None = None, timeout: float = 60.0) -> AgentWith:
        """Start the agent (see AgentProcess.start)."""
        if not self.prefix and not self.prelude:
            super().start(wait, env, timeout)
            return self
        code = f"{self.prelude}\nimport sys\nfrom edgefleet.agent.cli import main\nsys.exit(main(sys.argv[1:]))"
        argv = [*self.prefix, sys.executable, "-c", code, "--config", str(self.config_path), "run"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(env))
        if wait:
            self.wait_ready(timeout)
        return self


class Operator:
    """The host side over a real broker: publishes bundles, documents and commands; collects device events."""

    def __init__(self, url: str, key: SigningKey, **settings: Any) -> None:
        from edgefleet.protocol import Topics
        from edgefleet.testing.broker import Inbox
        from edgefleet.transport import MqttSettings, Transport

        self.key = key
        self.topics = Topics()
        self.inbox = Inbox()
        self.transport = Transport(MqttSettings(url=url, client_id=f"operator-{os.getpid()}-{id(self)}",
                                                reconnect_min_s=0.2, reconnect_max_s=1.0, **settings),
                                   on_message=self.inbox)
        self.transport.subscribe([self.topics.all_devices("events"), self.topics.all_devices("state")])
        self.transport.start()
        if not self.transport.wait_connected(20):
            raise AssertionError(f"operator cannot connect to {url}: {self.transport.last_error}")

    def prepare(self, bundle: Path, *, device: str = "dev-1", group: str | None = None, **kwargs: Any) -> Any:
        """The bundle chunked and freshly signed for a device (or a group) (edgefleet.converter.fleet.publish.prepare)."""
        from edgefleet.bundle import Bundle
        from edgefleet.converter.fleet.publish import prepare

        target = f"group:{group}" if group else f"device:{device}"
        return prepare(Bundle.load(bundle), key=kwargs.pop("key", self.key), target=kwargs.pop("target", target),
                       **kwargs)

    def push(self, bundle: Path, *, device: str = "dev-1", group: str | None = None, withhold: int = 0,
             **kwargs: Any) -> Any:
        """Publish the chunks (all but the last `withhold`) and a freshly signed document; return the Prepared."""
        prepared = self.prepare(bundle, device=device, group=group, **kwargs)
        items = list(prepared.chunks.items())
        self.chunks(dict(items[: len(items) - withhold]))
        self.document(prepared.document, prepared.deployment.model.name, device=device, group=group)
        return prepared

    def chunks(self, chunks: dict[str, bytes]) -> None:
        """Publish chunk payloads retained."""
        from edgefleet.converter.fleet.publish import publish_chunks

        publish_chunks(self.transport, self.topics, chunks)

    def document(self, payload: bytes, name: str = "m", *, device: str = "dev-1", group: str | None = None) -> None:
        """Publish a deployment document (any bytes) retained on the device's or the group's topic."""
        topic = self.topics.group_model(group, name) if group else self.topics.device_model(device, name)
        self.transport.publish(topic, payload, retain=True, wait=30)

    def events(self, device: str = "dev-1") -> list[dict[str, Any]]:
        """Every event of `device` received so far (waiting for none)."""
        from edgefleet.protocol import parse_json

        self.inbox.quiet(0)
        return [parse_json(m.payload) for m in self.inbox.seen if m.topic == self.topics.events(device)]

    def event(self, match: Callable[[dict[str, Any]], bool], device: str = "dev-1",
              timeout: float = 60.0) -> dict[str, Any]:
        """The first event of `device` (seen or arriving within `timeout`) for which `match` is true."""
        from edgefleet.protocol import parse_json

        topic = self.topics.events(device)
        msg = self.inbox.wait_for(lambda m: m.topic == topic and match(parse_json(m.payload)), timeout)
        return parse_json(msg.payload)  # type: ignore[no-any-return]

    def step(self, step: str, version: int | None = None, device: str = "dev-1", timeout: float = 60.0,
             dep_id: str | None = None) -> dict[str, Any]:
        """The first event at `step` (for `version` / deployment id)."""
        return self.event(lambda e: e["step"] == step and (version is None or e.get("version") == version)
                          and (dep_id is None or e.get("deployment_id") == dep_id), device, timeout)

    def since(self, mark: int, device: str = "dev-1") -> list[dict[str, Any]]:
        """Every event of `device` received after `mark` (waiting for none)."""
        from edgefleet.protocol import parse_json

        self.inbox.quiet(0)
        topic = self.topics.events(device)
        return [parse_json(m.payload) for m in self.inbox.seen[mark:] if m.topic == topic]

    def mark(self) -> int:
        """A position in the message stream: `after(mark, ...)` sees only what arrives later."""
        self.inbox.quiet(0)
        return len(self.inbox.seen)

    def after(self, mark: int, match: Callable[[dict[str, Any]], bool] = lambda e: True, device: str = "dev-1",
              timeout: float = 30.0) -> dict[str, Any]:
        """The first event of `device` received after `mark` for which `match` is true."""
        return self.received(mark, self.topics.events(device), match, timeout)

    def received(self, mark: int, topic: str, match: Callable[[dict[str, Any]], bool] = lambda d: True,
                 timeout: float = 30.0) -> dict[str, Any]:
        """The first JSON document on `topic` received after `mark` for which `match` is true."""
        from edgefleet.protocol import parse_json

        deadline = time.monotonic() + timeout
        checked = mark
        while True:
            for m in self.inbox.seen[checked:]:
                if m.topic == topic and match(doc := parse_json(m.payload)):
                    return doc  # type: ignore[no-any-return]
            checked = len(self.inbox.seen)
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing matching on {topic} within {timeout} s")
            self.inbox.quiet(0.05)

    def clear(self, topic: str) -> None:
        """Clear a retained message."""
        self.transport.publish(topic, b"", retain=True, wait=30)

    def close(self) -> None:
        """Disconnect."""
        self.transport.stop()


# --- hostile models --------------------------------------------------------------------------------


def hostile_document(base: dict[str, Any], model: bytes, *, version: int, dep_id: str,
                     key: SigningKey | None) -> dict[str, Any]:
    """`base` (a bundle's manifest) re-described for other model bytes: a consistent, signed lie."""
    import copy

    from edgefleet.protocol import dump, split

    raw = copy.deepcopy(base)
    raw.pop("signature", None)
    raw.pop("key_id", None)
    raw["deployment_id"] = dep_id
    raw["model"]["version"] = version
    raw["model"]["artifact"] = dump(split(model, raw["model"]["artifact"]["chunk_size"])[0])
    return key.sign(raw) if key is not None else raw


@dataclass
class HostileReport:
    """What a run of hostile models did."""

    ran: int = 0
    rejected: int = 0
    accepted: int = 0
    """Files whose golden outputs were within tolerance (validation passed them): activated, then rolled back."""
    kinds: Counter[str] = field(default_factory=Counter)
    agent_crashes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for logs and the bench."""
        from edgefleet.testing.hostile import tally

        return (f"{self.ran} hostile models in {self.seconds:.1f} s: {self.rejected} rejected, {self.accepted} "
                f"passed validation (golden outputs within tolerance), agent crashes {self.agent_crashes}; outcomes: "
                f"{tally(list(self.kinds.elements()))}")


def run_hostile_through_agent(agent: AgentProcess, v1: Path, files: list[Any], key: SigningKey | None,
                              work: Path, *, first_version: int = 1000) -> HostileReport:
    """Install every hostile file through a real agent's admin API; the agent must keep serving v1.

    The agent serves a committed v1 (bundle `v1`); each file becomes a bundle whose manifest tells the
    truth about the bytes (so only validation can catch it). A file that still computes the golden
    outputs is activated by the agent, then rolled back to v1 before the next one.
    """
    import shutil

    from edgefleet.bundle import MANIFEST_FILE, MODEL_FILE
    from edgefleet.errors import RequestError
    from edgefleet.protocol import canonical_json, parse_json
    from edgefleet.testing.hostile import outcome_kind

    report = HostileReport()
    started = time.monotonic()
    base = parse_json((v1 / MANIFEST_FILE).read_bytes())
    expected = np.array(agent.client.predict("m", X)["predictions"])
    for i, hostile in enumerate(files):
        bundle = work / f"hostile-{i}"
        shutil.copytree(v1, bundle)
        (bundle / MODEL_FILE).write_bytes(hostile.data)
        raw = hostile_document(base, hostile.data, version=first_version + i, dep_id=f"hostile-{i}-{os.getpid()}",
                               key=key)
        (bundle / MANIFEST_FILE).write_bytes(canonical_json(raw))
        try:
            answer = agent.client.admin("install", {"path": str(bundle)})
        except RequestError as err:
            answer = {"phase": "ERROR", "reason": str(err)}
        report.ran += 1
        if agent.proc is None or agent.proc.poll() is not None:
            report.agent_crashes += 1
            report.kinds["agent died"] += 1
            agent.client.close()
            agent.start()
        elif answer.get("phase") == "REJECTED":
            report.rejected += 1
            report.kinds[outcome_kind(answer.get("reason"))] += 1
        elif answer.get("phase") == "PROBATION":
            # validation found its golden outputs within tolerance (a flip in bytes nobody reads, or in a
            # weight's last bits): activated, as it should be; how it answers another input is recorded
            report.accepted += 1
            got = np.array(agent.client.predict("m", X)["predictions"])
            if np.array_equal(got, expected):
                report.kinds["accepted: same answers"] += 1
            elif np.allclose(got, expected, rtol=1e-3, atol=1e-4):
                report.kinds["accepted: answers within tolerance"] += 1
            else:
                report.kinds["accepted: answers differ beyond tolerance"] += 1
            agent.client.admin("rollback", {"model": "m"})
        else:
            report.kinds[f"unexpected: {answer}"[:80]] += 1
        shutil.rmtree(bundle, ignore_errors=True)
        served = agent.client.predict("m", X)
        if served["edgefleet"]["model_version"] != 1 or not np.array_equal(np.array(served["predictions"]), expected):
            report.kinds["lost the previous model"] += 1
    report.seconds = time.monotonic() - started
    return report


def small_filesystem(path: Path, size_kb: int) -> list[str] | None:
    """A command prefix that runs a program with a `size_kb` tmpfs mounted on `path` in its own mount
    namespace (as root, or as a user where user namespaces are allowed); None where neither works.

    The program sees the small filesystem; everyone else sees `path` as it was, and can look inside
    through /proc/PID/root.
    """
    import shutil as sh

    unshare = sh.which("unshare")
    if unshare is None:
        return None
    script = f'mount -t tmpfs -o size={size_kb}k edgefleet-test "$0" && exec "$@"'
    for flags in (["--mount", "--propagation", "private"], ["--user", "--map-root-user", "--mount"]):
        probe = subprocess.run([unshare, *flags, "sh", "-c", script, str(path), "true"], capture_output=True,
                               timeout=30)
        if probe.returncode == 0:
            return [unshare, *flags, "sh", "-c", script, str(path)]
    return None


# --- a broker, an operator and agents ---------------------------------------------------------------


@dataclass
class Fleet:
    """A broker, the operator and a factory of agents trusting the operator's key."""

    root: Path
    broker: Any
    op: Operator
    key: SigningKey
    agents: list[AgentWith] = field(default_factory=list)

    def agent(self, prelude: str = "", device_id: str = "dev-1", prefix: list[str] | None = None,
              **sections: Any) -> AgentWith:
        """An agent of group "lab" on this broker (not started)."""
        config: dict[str, Any] = {"mqtt": {"url": self.broker.url, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
                                  "security": {"trusted_keys": [str(self.root / "keys" / "edgefleet.pub")]},
                                  "health": {"probation_s": 600, "min_requests": 1}}
        for name, values in sections.items():
            config.setdefault(name, {}).update(values)
        a = AgentWith(self.root / f"agent-{len(self.agents)}", device_id, groups=["lab"], prelude=prelude,
                      prefix=prefix, **config)
        self.agents.append(a)
        return a

    def start(self, a: AgentWith) -> AgentWith:
        """Start an agent and wait until it says it is online: connected and subscribed (commands are
        not retained, so one sent earlier would be lost)."""
        self.op.transport.subscribe(self.op.topics.status(a.device_id), wait=30)
        mark = self.op.mark()
        a.start()
        self.op.received(mark, self.op.topics.status(a.device_id), lambda d: d["status"] == "online", timeout=60)
        return a

    def model(self, a: AgentWith) -> dict[str, Any]:
        """The agent's view of model m ({} before it knows the model)."""
        return a.client.admin("status")["state"]["models"].get("m", {})  # type: ignore[no-any-return]


@contextlib.contextmanager
def running_fleet(root: Path) -> Iterator[Fleet]:
    """A fresh broker and operator key under `root`; every agent and the broker are killed at the end."""
    from edgefleet.testing.broker import Mosquitto

    key = SigningKey.generate()
    key.write(root / "keys")
    broker = Mosquitto(root / "broker").start()
    f = Fleet(root, broker, Operator(broker.url, key), key)
    try:
        yield f
    finally:
        f.op.close()
        for a in f.agents:
            a.kill()
        broker.kill()
