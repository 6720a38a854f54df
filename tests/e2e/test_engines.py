"""One integration loop on every MQTT engine edgefleet supports: Mosquitto, NATS (one node) and amqtt.

Real `edge-agent` processes and `edgectl` against a real broker of each engine (the `engine`
fixture runs each test once per engine): pushes with --wait, a device running two models,
predictions, a signed rollback, the fleet view, a late joiner served from retained documents, an
agent restart, a SIGKILL seen through the last will, and a bundle of about 300 chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.bundle import Bundle
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.waiting import wait_for
from tests.support.engines import Edgectl, Engine, Site

X = [[0.5, -1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.1]]


@pytest.fixture
def site(engine: Engine, tmp_path: Path, key_dir: Path, edgectl: Edgectl) -> Iterator[Site]:
    s = Site(engine.url, engine.protocol, tmp_path / "agents", key_dir, edgectl, name=engine.name)
    yield s
    s.close()


def version(a: AgentProcess, model: str = "m") -> int:
    """The version that answers a prediction of `model`."""
    return int(a.client.predict(model, X)["edgefleet"]["model_version"])


def test_push_rollback_fleet_view_late_joiner_restart_and_last_will(
        engine: Engine, site: Site, make_bundle: Callable[..., Path], key_dir: Path) -> None:
    one = site.agent("dev-1")
    site.wait_online("dev-1")
    assert one.client.health()["agent"]["mqtt"]["protocol"] == engine.speaks  # negotiated from auto
    site.ok("inventory", "set", "lab", "dev-1", "--key", key_dir)

    # v1 then v2 to the group, each push waiting for the commit
    site.push(make_bundle("dense_f32", version=1), "--group", "lab")
    assert version(one) == 1
    out = site.push(make_bundle("dense_f32_v2", version=2), "--group", "lab")
    assert "1 committed, 0 failed" in " ".join(out.split()), out
    assert version(one) == 2

    # a second model on the same device, addressed to the device alone
    site.push(make_bundle("regress_f32", name="r", version=1), "--device", "dev-1")
    assert version(one, "r") == 1 and version(one) == 2

    # a signed rollback of one model leaves the other alone
    site.ok("rollback", "--device", "dev-1", "--model", "m", "--key", key_dir, "--wait")
    assert version(one) == 1 and version(one, "r") == 1

    # the fleet view: presence and both models, as the device reported them
    row = site.devices()["dev-1"]
    assert row["online"] is True and row["groups"] == ["lab"]
    assert {name: (m["phase"], m["active"]["version"]) for name, m in row["models"].items()} == {
        "m": ("ROLLED_BACK", 1), "r": ("COMMITTED", 1)}

    # a device started after the pushes gets the group's model from the retained document
    late = site.agent("dev-2")
    wait_for(lambda: late.status()["state"]["models"].get("m", {}).get("phase") == "COMMITTED", timeout=60,
             interval=0.2, what=f"the late joiner committed on {engine.name}")
    assert version(late) == 2

    # a restart keeps what runs: the rolled-back v2 stays refused, nothing is fetched again
    assert one.stop() == 0
    one.start()
    site.wait_online("dev-1")
    assert version(one) == 1 and version(one, "r") == 1
    assert one.status()["state"]["models"]["m"]["active"]["version"] == 1

    # SIGKILL: the broker publishes the agent's will, which the fleet view shows (a will has no time)
    late.kill()
    wait_for(lambda: site.devices()["dev-2"]["online"] is False, timeout=30, interval=0.2,
             what=f"dev-2's last will on {engine.name}")
    assert site.devices()["dev-2"]["status_ts"] == 0


def test_a_bundle_of_three_hundred_chunks(
        engine: Engine, site: Site, make_bundle: Callable[..., Path]) -> None:
    bundle = make_bundle("cnn_v1", version=1, chunk_size=3072)
    model = Bundle.load(bundle).deployment.model
    chunks = len(model.artifact.chunks) + len(model.golden.chunks)
    assert chunks >= 295
    # a stall fails the download within the push's wait (and says so) instead of hanging it
    a = site.agent("dev-1", security={"download_stall_s": 20})
    site.wait_online("dev-1")
    site.push(bundle, "--device", "dev-1", timeout=120)
    status = a.client.model_status("m")["model_version_status"][0]
    assert status["version"] == "1" and status["state"] == "AVAILABLE"
