"""push --canary end to end: real agent processes on a real Mosquitto, and the fleet view of them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from edgefleet.bundle import GOLDEN_FILE, dump_golden, load_golden
from edgefleet.errors import RequestError
from edgefleet.protocol import Policy, Topics, parse_json
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.broker import Inbox, Mosquitto, client
from edgefleet.testing.waiting import wait_for
from edgefleet.transport import Message
from tests.support import ROOT
from tests.support.helpers import retained_index, swap_file

T = Topics()
X = [[0.5, -1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.1]]
BIG = [[1000.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]  # makes fails_on_big_f32's invoke fail
Edgectl = Callable[..., tuple[int, str, str]]


def flat(text: str) -> str:
    """Output with whitespace runs folded, so table wrapping does not matter."""
    return " ".join(text.split())


class Recorder:
    """Every status and event the devices publish, as the operator sees them."""

    def __init__(self, url: str) -> None:
        self.inbox = Inbox()
        self.transport = client(url, self.inbox)
        self.transport.subscribe([T.all_devices("events"), T.all_devices("status")], wait=5)

    def events(self, device: str | None = None) -> list[dict[str, Any]]:
        self.inbox.quiet(0.05)
        return [parse_json(m.payload) for m in self.inbox.seen
                if m.topic.endswith("/events") and (device is None or m.topic == T.events(device))]

    def wait_online(self, devices: list[str], timeout: float = 30.0) -> None:
        def online(device: str) -> Callable[[Message], bool]:
            return lambda m: m.topic == T.status(device) and parse_json(m.payload)["status"] == "online"
        for d in devices:
            self.inbox.wait_for(online(d), timeout)


@pytest.fixture
def fleet(tmp_path: Path, broker: Mosquitto, key_dir: Path, edgectl: Edgectl) -> Iterator[Callable[..., list[AgentProcess]]]:
    """Start agents in group `lab` (in parallel), list them in the signed inventory, wait until they are online."""
    made: list[AgentProcess] = []
    recorder = Recorder(broker.url)

    def start(*specs: tuple[str, dict[str, Any]]) -> list[AgentProcess]:
        agents = []
        for device_id, sections in specs:
            config: dict[str, Any] = {
                "mqtt": {"url": broker.url, "reconnect_max_s": 1.0},
                "security": {"trusted_keys": [str(key_dir / "edgefleet.pub")]},
                "health": {"probation_s": 1, "min_requests": 1},
                "telemetry": {"interval_s": 0.5},
            }
            for name, values in sections.items():
                config.setdefault(name, {}).update(values)
            a = AgentProcess(tmp_path / device_id, device_id=device_id, groups=["lab"], **config)
            made.append(a)
            agents.append(a.start(wait=False))
        for a in agents:
            a.wait_ready()
        recorder.wait_online([d for d, _ in specs])
        code, _, err = edgectl("inventory", "set", "lab", *(d for d, _ in specs), "--key", key_dir,
                               "--broker", broker.url)
        assert code == 0, err
        return agents

    start.recorder = recorder  # type: ignore[attr-defined]
    yield start
    recorder.transport.stop()
    for a in made:
        a.kill()


def version(a: AgentProcess) -> int:
    return int(a.client.predict("m", X)["edgefleet"]["model_version"])


def phase(a: AgentProcess) -> tuple[str, int | None]:
    """The agent's lifecycle phase and active version of model m."""
    m = a.client.health()["agent"]["models"].get("m", {})
    return m.get("phase", "IDLE"), m.get("version")


def columns(header: str, lines: list[str]) -> list[dict[str, str]]:
    """Cells of a plain-text fleet table, cut at the header's column starts."""
    names = ["device", "online", "groups", "model", "ver", "phase", "p50 ms", "p95 ms", "cpu %", "rss MB",
             "temp °C", "last event", "seen"]
    starts = [header.index(n) for n in names] + [None]
    return [{n: line[starts[i]:starts[i + 1]].strip() for i, n in enumerate(names)} for line in lines]


def retained_documents(url: str) -> dict[str, bytes]:
    return dict(retained_index(url, T).documents)


def test_canary_commits_first_then_the_group_and_the_fleet_view_shows_it(
        broker: Mosquitto, fleet: Any, make_bundle: Callable[..., Path], key_dir: Path, edgectl: Edgectl) -> None:
    agents = fleet(("dev-1", {}), ("dev-2", {}), ("dev-3", {}))
    code, out, err = edgectl("push", make_bundle("dense_f32", version=1), "--group", "lab", "--key", key_dir,
                             "--canary", "1", "--wait", "--timeout", 60, "--broker", broker.url)
    assert code == 0, out + err
    text = flat(out)
    assert "canaries: dev-1 (1 of 3 online member(s) of lab)" in text
    assert "canary dev-1: committed v1" in text and "3 committed, 0 failed" in text
    assert [version(a) for a in agents] == [1, 1, 1]
    events = fleet.recorder.events()
    committed = next(e["ts"] for e in events if e["device_id"] == "dev-1" and e["step"] == "COMMITTED")
    others = [e["ts"] for e in events if e["device_id"] != "dev-1" and e.get("version") == 1]
    assert others and min(others) > committed  # the group document went out only after the canary passed
    # the canary's own document is withdrawn: later group pushes reach it again
    assert set(retained_documents(broker.url)) == {T.group_model("lab", "m")}

    # the fleet view of the same agents: live figures from their telemetry
    code, out, err = edgectl("fleet", "watch", "--once", "--json", "--telemetry-wait", 10, "--broker", broker.url)
    assert code == 0, err
    devices = {d["device_id"]: d for d in json.loads(out)["devices"]}
    assert set(devices) == {"dev-1", "dev-2", "dev-3"}
    for a in agents:
        tel = devices[a.config_path.parent.name]["telemetry"]
        rss = psutil.Process(a.proc.pid).memory_info().rss  # type: ignore[union-attr]
        assert 0.7 * rss < tel["rss_bytes"] < 1.3 * rss, (tel["rss_bytes"], rss)
        assert [(m["name"], m["version"], m["phase"]) for m in tel["models"]] == [("m", 1, "COMMITTED")]
    for a in agents:
        version(a)  # one request each, so the latency columns have figures
    code, out, err = edgectl("fleet", "watch", "--once", "--wide", "--sort", "rss", "--telemetry-wait", 10,
                             "--broker", broker.url)
    assert code == 0, err
    lines = out.splitlines()
    assert "3 devices, 3 online · 3 COMMITTED" in lines[0] and "sort rss" in lines[0], lines[0]
    rows = columns(lines[1], lines[2:5])
    assert [r["device"] for r in sorted(rows, key=lambda r: r["device"])] == ["dev-1", "dev-2", "dev-3"]
    assert all((r["online"], r["groups"], r["model"], r["ver"], r["phase"]) == ("yes", "lab", "m", "v1", "COMMITTED")
               for r in rows)
    rss_column = [float(r["rss MB"]) for r in rows]
    assert rss_column == sorted(rss_column, reverse=True) and rss_column[0] > 1.0
    assert all(float(r["p95 ms"]) >= float(r["p50 ms"]) > 0 and float(r["cpu %"]) >= 0 for r in rows)
    assert all(r["temp °C"] == "" for r in rows)  # no sensor on this machine: blank, not 0
    assert all(r["last event"].startswith("m v1 COMMITTED") for r in rows)
    code, out, _ = edgectl("fleet", "status", "--json", "--telemetry-wait", 10, "--broker", broker.url)
    assert code == 0
    assert all(d["telemetry"]["rss_bytes"] > 0 for d in json.loads(out)["devices"])


def test_failed_canary_is_rolled_back_and_the_group_never_sees_the_model(
        broker: Mosquitto, fleet: Any, make_bundle: Callable[..., Path], key_dir: Path, edgectl: Edgectl) -> None:
    one, two, three = fleet(("dev-1", {}), ("dev-2", {}), ("dev-3", {}))
    code, out, err = edgectl("push", make_bundle("dense_f32", version=1), "--group", "lab", "--key", key_dir,
                             "--wait", "--timeout", 60, "--broker", broker.url)
    assert code == 0, out + err
    # v2 passes validation but fails on big inputs; its signed policy holds it in probation for 20 s
    bad = make_bundle("fails_on_big_f32", version=2, policy=Policy(probation_s=20))
    push = subprocess.Popen([sys.executable, "-m", "edgefleet.converter.cli", "push", str(bad), "--group", "lab",
                             "--key", str(key_dir), "--canary", "50%", "--timeout", "60", "--broker", broker.url],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: phase(two) == ("PROBATION", 2), timeout=30, what="dev-2 on probation with v2")
        with pytest.raises(RequestError):
            two.client.predict("m", BIG)
        stdout, stderr = push.communicate(timeout=60)
    finally:
        push.kill()
    assert push.returncode == 1, stdout + stderr
    text = flat(stdout)
    assert "canaries: dev-1, dev-2 (2 of 3 online member(s) of lab)" in text
    assert "canary failed: dev-2: rolled back: error rate 100.0% over 1 requests" in text
    assert "dev-1: rolled back: restored v1" in text, stdout
    assert "the group document was not published" in text
    assert [version(a) for a in (one, two, three)] == [1, 1, 1]
    v2 = {e.get("deployment_id") for e in fleet.recorder.events() if e.get("version") == 2}
    assert len(v2) == 1
    assert not [e for e in fleet.recorder.events("dev-3") if e.get("deployment_id") in v2]
    state = one.status()["state"]["models"]["m"]
    assert state["last_outcome"]["result"] == "rolled_back" and "ordered by command" in state["last_outcome"]["reason"]
    docs = retained_documents(broker.url)
    assert set(docs) == {T.group_model("lab", "m")} and parse_json(docs[T.group_model("lab", "m")])["model"]["version"] == 1

    # a model that fails validation on the canary: nothing to roll back, the rest untouched
    worse = make_bundle("dense_f32_v2", version=3)
    ins, outs = load_golden((worse / GOLDEN_FILE).read_bytes(), 1, 1)
    swap_file(worse, GOLDEN_FILE, dump_golden(ins, [outs[0] + 0.3]))
    started = time.time()
    code, out, _ = edgectl("push", worse, "--group", "lab", "--key", key_dir, "--canary", "1", "--timeout", 60,
                           "--broker", broker.url)
    assert code == 1
    text = flat(out)
    assert "canary failed: dev-1: rejected: golden sample 0: output 0 differs" in text, text
    assert "dev-1: nothing to undo: it did not keep the deployment (v1)" in text
    assert [version(a) for a in (one, two, three)] == [1, 1, 1]
    assert not [e for e in fleet.recorder.events() if e.get("version") == 3 and e["device_id"] != "dev-1"
                and e["ts"] >= started]
