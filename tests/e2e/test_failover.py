"""Several broker urls: a real agent and edgectl follow the next broker when theirs dies.

Two independent Mosquitto brokers stand in for two nodes of a cluster (they share no retained state,
so what the agent does on the second comes from what is pushed there).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.broker import Mosquitto
from edgefleet.testing.waiting import wait_for
from tests.support.engines import Edgectl, Site

X = [[0.5, -1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.1]]


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    first, second = Mosquitto(tmp_path / "first").start(), Mosquitto(tmp_path / "second").start()
    try:
        yield first, second
    finally:
        first.kill()
        second.kill()


def version(a: AgentProcess) -> int:
    return int(a.client.predict("m", X)["edgefleet"]["model_version"])


def test_an_agent_follows_the_next_broker_when_its_broker_dies(
        brokers: tuple[Mosquitto, Mosquitto], tmp_path: Path, key_dir: Path, edgectl: Edgectl,
        make_bundle: Callable[..., Path]) -> None:
    first, second = brokers
    site = Site(first.url, "auto", tmp_path / "agents", key_dir, edgectl, name="two brokers")
    try:
        a = site.agent("dev-1", mqtt={"urls": [first.url, second.url]})
        site.wait_online("dev-1")
        site.push(make_bundle("dense_f32", version=1), "--device", "dev-1")
        assert version(a) == 1
        assert a.status()["health"]["mqtt"]["url"] == first.url

        first.kill()
        wait_for(lambda: (a.status()["health"]["mqtt"] or {}).get("url") == second.url
                 and a.status()["health"]["mqtt"]["connected"], timeout=20, interval=0.2,
                 what="dev-1 connected to the second broker")
        text = a.cli("status").stdout
        assert f"broker {second.url}: connected" in text, text
        assert version(a) == 1  # what runs keeps running through the move

        # edgectl given both urls finds the live one; the agent takes a push through it
        both = ("--broker", first.url, "--broker", second.url)
        code, out, err = site.edgectl("push", make_bundle("dense_f32_v2", version=2), "--device", "dev-1",
                                      "--key", key_dir, "--wait", "--timeout", 60, *both)
        assert code == 0, out + err
        assert "1 committed, 0 failed" in " ".join(out.split()), out
        assert version(a) == 2
        code, out, err = site.edgectl("fleet", "status", "--json", *both)
        assert code == 0, err
        rows = {d["device_id"]: d for d in json.loads(out)["devices"]}
        assert rows["dev-1"]["online"] is True
    finally:
        site.close()


def test_edgectl_takes_a_comma_separated_broker_list_from_the_environment(
        brokers: tuple[Mosquitto, Mosquitto], edgectl: Edgectl, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = brokers
    first.kill()
    monkeypatch.setenv("EDGEFLEET_BROKER", f"{first.url}, {second.url}")
    code, out, err = edgectl("fleet", "status", "--json", "--connect-timeout", "10")
    assert code == 0, err
    assert json.loads(out)["devices"] == []
    monkeypatch.setenv("EDGEFLEET_BROKER", f"{second.url},http://nowhere")
    code, out, err = edgectl("fleet", "status", "--json")
    assert code == 2
    assert err.strip().splitlines() == [
        "edgectl: error: $EDGEFLEET_BROKER: expected mqtt://host[:port] or mqtts://host[:port], got 'http://nowhere'"]
