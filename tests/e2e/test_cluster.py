"""A clustered engine: three NATS nodes on loopback (MQTT streams replicated on all three), agents
spread over the nodes, edgectl on one of them.

What a fleet on a cluster needs: a push through one node reaches the agents on every node, the
fleet view through any node shows every device, and a node that dies in the middle of a rollout does
not keep any agent from committing.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.bundle import Bundle
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.nats import NatsCluster
from edgefleet.testing.waiting import wait_for
from tests.support import ROOT
from tests.support.engines import Edgectl, Site

X = [[0.5, -1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.1]]
DEVICES = ("dev-1", "dev-2", "dev-3")


@pytest.fixture
def site(nats_cluster: NatsCluster, tmp_path: Path, key_dir: Path, edgectl: Edgectl) -> Iterator[Site]:
    """edgectl on the first node."""
    s = Site(nats_cluster.url, "auto", tmp_path / "agents", key_dir, edgectl, name="the NATS cluster")
    yield s
    s.close()


def spread(site: Site, cluster: NatsCluster) -> list[AgentProcess]:
    """dev-1 on the first node, dev-2 on the second, dev-3 on the third, each listing the other nodes
    after its own (mqtt.urls); online and in group lab."""
    n = len(cluster.urls)
    agents = [site.agent(d, urls=[cluster.urls[(i + k) % n] for k in range(n)], wait=False)
              for i, d in enumerate(DEVICES)]
    for a in agents:
        a.wait_ready()
    site.wait_online(*DEVICES)
    assert [node_of(a) for a in agents] == cluster.urls
    site.ok("inventory", "set", "lab", *DEVICES, "--key", site.key_dir)
    return agents


def node_of(a: AgentProcess) -> str | None:
    """The broker url the agent is connected to now (None while it is not)."""
    mqtt = a.client.health()["agent"]["mqtt"]
    return mqtt["url"] if mqtt["connected"] else None


def phase(a: AgentProcess, model: str = "m") -> tuple[str, int | None]:
    """The agent's phase and active version of `model`, from its local API."""
    m = a.client.health()["agent"]["models"].get(model, {})
    return m.get("phase", "IDLE"), m.get("version")


def test_a_push_through_one_node_reaches_agents_on_every_node(
        nats_cluster: NatsCluster, site: Site, make_bundle: Callable[..., Path]) -> None:
    agents = spread(site, nats_cluster)
    out = site.push(make_bundle("dense_f32", version=1), "--group", "lab")
    assert "3 committed, 0 failed" in " ".join(out.split()), out
    assert [int(a.client.predict("m", X)["edgefleet"]["model_version"]) for a in agents] == [1, 1, 1]
    # every node serves the whole fleet's retained state
    for node in nats_cluster.nodes:
        view = site.devices(url=node.url)
        assert {d: (v["online"], v["models"]["m"]["active"]["version"]) for d, v in view.items()} == {
            d: (True, 1) for d in DEVICES}, node.name


def test_a_node_killed_mid_rollout_still_ends_with_every_agent_committed(
        nats_cluster: NatsCluster, site: Site, make_bundle: Callable[..., Path]) -> None:
    agents = spread(site, nats_cluster)
    site.push(make_bundle("dense_f32", version=1), "--group", "lab")
    # v2 is a larger model in small chunks (none of which the agents hold), so that the download is
    # still going when the node dies
    bundle = make_bundle("cnn_v1", version=2, chunk_size=3072)
    assert len(Bundle.load(bundle).deployment.model.artifact.chunks) >= 290
    push = subprocess.Popen(
        [sys.executable, "-m", "edgefleet.converter.cli", "push", str(bundle), "--group", "lab",
         "--key", str(site.key_dir), "--wait", "--timeout", "120", "--broker", site.url],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = nats_cluster.nodes[1]  # dev-2's node; edgectl is on the first
    try:
        wait_for(lambda: phase(agents[1]) == ("DOWNLOADING", 1), timeout=60, interval=0.02,
                 what="dev-2 downloading v2")
        victim.kill()
        stdout, stderr = push.communicate(timeout=150)
    finally:
        push.kill()
    assert push.returncode == 0, stdout + stderr
    assert "3 committed, 0 failed" in " ".join(stdout.split()), stdout
    assert [phase(a) for a in agents] == [("COMMITTED", 2)] * 3
    # dev-2 followed the cluster to a node that lives. The others may have moved too: when the dead
    # node led JetStream's meta group or a stream, QoS 1 operations on the live nodes wait for a new
    # leader, and NATS closes MQTT connections whose JetStream acks do not come within 5 s.
    alive = {n.url for n in nats_cluster.nodes if n.running}
    assert all(node_of(a) in alive for a in agents), [node_of(a) for a in agents]
