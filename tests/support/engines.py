"""The MQTT engines besides Mosquitto as fixtures: NATS (one node, or a three-node cluster), amqtt, and a
private RabbitMQ node (an engine edgefleet does not support: `edgectl broker check` says why).

`engine` is parametrized over every engine the suite proves edgefleet on (Mosquitto, NATS, amqtt):
a test that takes it runs once per engine. `Site` is the agents and edgectl of a test on one broker
(or on a cluster's nodes).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.amqtt import Amqtt
from edgefleet.testing.broker import Mosquitto
from edgefleet.testing.nats import Nats, NatsCluster
from edgefleet.testing.rabbitmq import RabbitMq, missing
from edgefleet.testing.waiting import wait_for

__all__ = ["amqtt_broker", "engine", "nats_broker", "nats_cluster", "rabbitmq_broker"]

Protocol = Literal["auto", "5", "3.1.1"]
Edgectl = Callable[..., tuple[int, str, str]]


@dataclass
class Engine:
    """A running broker of one engine and what a client sets to talk to it."""

    name: str
    server: Mosquitto | Nats | Amqtt
    protocol: Protocol = "auto"
    """What agents and edgectl speak to it. Every engine runs on the default, auto, as users run it:
    NATS and amqtt speak only 3.1.1, and the downgrade is negotiated (amqtt never answers an MQTT 5
    CONNECT with a will, so each agent start there waits out the negotiation's bound)."""
    speaks: Literal["5", "3.1.1"] = "5"
    """The highest MQTT version the engine speaks: what `auto` ends up with."""

    @property
    def url(self) -> str:
        """The broker's MQTT url."""
        return self.server.url

    def log(self) -> str:
        """What the broker logged so far."""
        return self.server.log()


ENGINES = ("mosquitto", "nats", "amqtt")


def make_engine(name: str, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """A started broker of engine `name`."""
    workdir = tmp_path_factory.mktemp(name)
    if name == "mosquitto":
        return Engine(name, Mosquitto(workdir).start())
    if name == "nats":
        return Engine(name, Nats(workdir).start(), speaks="3.1.1")
    if name == "amqtt":
        return Engine(name, Amqtt(workdir).start(), speaks="3.1.1")
    raise ValueError(f"unknown engine {name!r}")


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A fresh broker of each engine in turn (the test runs once per engine); killed at teardown."""
    e = make_engine(request.param, tmp_path_factory)
    try:
        yield e
    finally:
        e.server.kill()


@pytest.fixture
def nats_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nats]:
    """A fresh single NATS node (MQTT listener, JetStream) for one test."""
    with Nats(tmp_path_factory.mktemp("nats")) as n:
        yield n


@pytest.fixture
def amqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Amqtt]:
    """A fresh amqtt broker for one test."""
    with Amqtt(tmp_path_factory.mktemp("amqtt")) as a:
        yield a


@pytest.fixture
def rabbitmq_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMq]:
    """A fresh private RabbitMQ node with its MQTT plugin for one test; the test fails (never skips) when
    RabbitMQ is not installed: `make test` installs it (deploy/system-deps.sh)."""
    why = missing()
    if why:
        pytest.fail(why, pytrace=False)
    with RabbitMq(tmp_path_factory.mktemp("rabbitmq")) as r:
        yield r


@pytest.fixture
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """Three NATS nodes routed on loopback, MQTT streams replicated three times, for one test."""
    with NatsCluster(tmp_path_factory.mktemp("nats-cluster"), size=3) as c:
        yield c


class Site:
    """Agents and edgectl (the in-process `edgectl` fixture) on one broker, all speaking `protocol`.

    Agents connect to `url` unless given others (a cluster's nodes: `urls`, tried in turn); edgectl
    connects to `url`."""

    def __init__(self, url: str, protocol: Protocol, root: Path, key_dir: Path, edgectl: Edgectl,
                 name: str = "") -> None:
        self.url = url
        self.protocol = protocol
        self.root = root
        self.key_dir = key_dir
        self.edgectl = edgectl
        self.name = name or url
        self.agents: list[AgentProcess] = []

    def agent(self, device_id: str, groups: tuple[str, ...] = ("lab",), *, urls: Sequence[str] = (),
              wait: bool = True, **sections: Any) -> AgentProcess:
        """A started agent of `groups` (with `wait`, ready), committing after 1 s of probation."""
        brokers = {"urls": list(urls)} if urls else {"url": self.url}
        config: dict[str, Any] = {
            "mqtt": {**brokers, "protocol": self.protocol, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
            "security": {"trusted_keys": [str(self.key_dir / "edgefleet.pub")]},
            "health": {"probation_s": 1, "min_requests": 1},
        }
        for name, values in sections.items():
            config.setdefault(name, {}).update(values)
        a = AgentProcess(self.root / device_id, device_id=device_id, groups=list(groups), **config)
        self.agents.append(a)
        return a.start(wait=wait)

    def ctl(self, *args: object, url: str | None = None) -> tuple[int, str, str]:
        """`edgectl ARGS` against `url` (default: the site's)."""
        return self.edgectl(*args, "--broker", url or self.url, "--mqtt-protocol", self.protocol)

    def ok(self, *args: object, url: str | None = None) -> str:
        """`edgectl ARGS`, which must succeed; its standard output."""
        code, out, err = self.ctl(*args, url=url)
        assert code == 0, f"edgectl {' '.join(map(str, args[:2]))} on {self.name}: exit {code}\n{out}{err}"
        return out

    def devices(self, url: str | None = None) -> dict[str, dict[str, Any]]:
        """`fleet status --json` by device id."""
        return {d["device_id"]: d for d in json.loads(self.ok("fleet", "status", "--json", url=url))["devices"]}

    def wait_online(self, *devices: str, timeout: float = 30.0) -> None:
        """Wait until the fleet view shows every one of `devices` online."""
        wait_for(lambda: all(self.devices().get(d, {}).get("online") for d in devices), timeout=timeout,
                 interval=0.2, what=f"{', '.join(devices)} online on {self.name}")

    def push(self, bundle: Path, *target: str, timeout: float = 60) -> str:
        """A signed push to `target` (--group G / --device D) that waits for the commits; its output."""
        return self.ok("push", bundle, *target, "--key", self.key_dir, "--wait", "--timeout", timeout)

    def close(self) -> None:
        """SIGKILL every agent the site started."""
        for a in self.agents:
            a.kill()
