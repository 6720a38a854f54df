"""`edgectl deployments` and `push --dry-run` against real agents on a real Mosquitto: a failed device push
pins the device, the listing shows it, and a signed withdrawal returns it to its group's version."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.bundle import GOLDEN_FILE, dump_golden, load_golden
from edgefleet.protocol import Topics
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.broker import Inbox, Mosquitto, client
from edgefleet.testing.waiting import wait_for
from tests.support import ROOT
from tests.support.helpers import lab_agents, swap_file

T = Topics()
X = [[0.5, -1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.1]]
Edgectl = Callable[..., tuple[int, str, str]]


@pytest.fixture
def lab(tmp_path: Path, broker: Mosquitto, key_dir: Path, edgectl: Edgectl) -> Iterator[list[AgentProcess]]:
    """dev-1 and dev-2 in group lab, online, listed in the signed inventory."""
    with lab_agents(tmp_path, broker.url, key_dir, edgectl) as agents:
        yield agents


def running(a: AgentProcess) -> int | None:
    """The version of model m the agent serves (None: none)."""
    return a.client.health()["agent"]["models"].get("m", {}).get("version")  # type: ignore[no-any-return]


def committed(a: AgentProcess, version: int) -> bool:
    m = a.client.health()["agent"]["models"].get("m", {})
    return bool(m.get("phase") == "COMMITTED" and m.get("version") == version)


def retained(url: str) -> dict[str, bytes]:
    """Every retained model document, withdrawal and chunk on the broker, by topic."""
    inbox = Inbox()
    subscriber = client(url, inbox)
    subscriber.subscribe([*T.all_deployments(), T.all_chunks()], wait=5)
    inbox.quiet(0.5)
    subscriber.stop()
    return {m.topic: m.payload for m in inbox.seen if m.retain}


def test_failed_device_push_pins_the_device_until_its_document_is_withdrawn(
        tmp_path: Path, broker: Mosquitto, lab: list[AgentProcess], make_bundle: Callable[..., Path], key_dir: Path,
        edgectl: Edgectl) -> None:
    one, two = lab
    login = ("--broker", broker.url)
    code, out, err = edgectl("push", make_bundle("dense_f32", version=1), "--group", "lab", "--key", key_dir,
                             "--wait", "--timeout", 60, *login)
    assert code == 0, out + err
    # v2 fails validation on dev-1 (its golden outputs are off): the device document stays retained
    bad = make_bundle("dense_f32_v2", version=2)
    ins, outs = load_golden((bad / GOLDEN_FILE).read_bytes(), 1, 1)
    swap_file(bad, GOLDEN_FILE, dump_golden(ins, [outs[0] + 0.3]))
    code, out, err = edgectl("push", bad, "--device", "dev-1", "--key", key_dir, "--wait", "--timeout", 60, *login)
    assert code == 1 and "rejected" in out, out + err
    assert running(one) == 1

    # the dry run of the next group push: dev-1 is pinned, dev-2 fetches only the new golden vectors
    v3 = make_bundle("dense_f32", version=3)
    before = retained(broker.url)
    code, out, err = edgectl("push", v3, "--group", "lab", "--key", key_dir, "--dry-run", "--json", *login)
    assert code == 0, err
    plan = json.loads(out)
    assert retained(broker.url) == before  # nothing published
    assert [d["topic"] for d in plan["documents"]] == [T.group_model("lab", "m")]
    rows = {r["device_id"]: r for r in plan["devices"]}
    assert set(rows) == {"dev-1", "dev-2"} and not plan["members_unverified"]
    assert rows["dev-1"]["effect"].startswith("pinned by its own document (v2)") and rows["dev-1"]["fetch_wire_bytes"] == 0
    assert rows["dev-2"]["effect"] == "installs v3" and rows["dev-2"]["exact"]
    assert 0 < rows["dev-2"]["fetch_wire_bytes"] < plan["wire_bytes"]  # the model blob is the one it runs
    code, out, _ = edgectl("push", v3, "--group", "lab", "--key", key_dir, "--dry-run", *login)
    assert code == 0 and "dry run: nothing was published" in out and "device dev-1" in out

    code, out, err = edgectl("push", v3, "--group", "lab", "--key", key_dir, *login)
    assert code == 0, err
    wait_for(lambda: committed(two, 3), timeout=60, what="dev-2 on v3")
    assert running(one) == 1  # pinned: the group push does not reach it

    code, out, err = edgectl("deployments", "list", "--json", *login)
    assert code == 0, err
    (model,) = json.loads(out)["models"]
    assert model["model"] == "m" and model["pinned"] == ["dev-1"]
    devices = {d["device_id"]: d for d in model["devices"]}
    assert (devices["dev-1"]["version"], devices["dev-1"]["follows"], devices["dev-1"]["follows_version"],
            devices["dev-1"]["group_version"]) == (1, "device:dev-1", 2, 3)
    assert (devices["dev-2"]["version"], devices["dev-2"]["follows"], devices["dev-2"]["pinned"]) == (3, "group:lab", False)
    assert {d["target"]: d["version"] for d in model["documents"]} == {"group:lab": 3, "device:dev-1": 2}
    code, out, _ = edgectl("deployments", "list", *login)
    assert code == 0 and "PINNED" in out and "pinned: dev-1" in out

    pinned_by = next(d["deployment_id"] for d in model["documents"] if d["target"] == "device:dev-1")
    code, out, err = edgectl("deployments", "show", pinned_by, "--json", *login)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["deployment_id"] == pinned_by and shown["documents"][0]["chunks"] > 0
    phases = {d["device_id"]: d["phase_of_deployment"] for d in shown["devices"]}
    assert phases["dev-1"].startswith("REJECTED"), phases
    code, out, _ = edgectl("deployments", "show", "m", *login)
    assert code == 0 and "group:lab: v3" in out and "device dev-1: REJECTED" in out and "PINNED" in out, out

    # a collector writes the events of what follows, for the history
    events = tmp_path / "events.jsonl"
    collector = subprocess.Popen([sys.executable, "-m", "edgefleet.converter.cli", "fleet", "collect", "--only",
                                  "events", "--out", str(events), "--report-every", "60", *login],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert collector.stderr is not None and collector.stderr.readline().startswith("collecting")
        code, out, err = edgectl("deployments", "withdraw", "--device", "dev-1", "--model", "m", "--key", key_dir,
                                 *login)
        assert code == 0, err
        assert "falls back to group:lab (v3" in out
        wait_for(lambda: committed(one, 3), timeout=60, what="dev-1 back on its group's version")
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.communicate(timeout=30)
    code, out, err = edgectl("deployments", "history", "--from", events, "--device", "dev-1", "--json")
    assert code == 0, err
    steps = [(e["step"], e["version"], e["source"]) for e in json.loads(out)["entries"]]
    assert steps[0] == ("DOWNLOADING", 3, "collector") and steps[-1] == ("COMMITTED", 3, "collector"), steps
    code, out, _ = edgectl("deployments", "history", "--from", events, "--device", "dev-1")
    assert code == 0 and "dev-1  m v3  COMMITTED" in out, out
    code, out, _ = edgectl("deployments", "list", "--json", *login)
    assert json.loads(out)["models"][0]["pinned"] == []

    # nothing left to withdraw: one line, exit 2, nothing published
    before = retained(broker.url)
    code, out, err = edgectl("deployments", "withdraw", "--device", "dev-1", "--model", "m", "--key", key_dir, *login)
    assert code == 2 and err.startswith("edgectl: error: deployments withdraw: the m document for device:dev-1 is "
                                        "already withdrawn") and len(err.splitlines()) == 1
    assert retained(broker.url) == before

    code, out, err = edgectl("deployments", "history", "--model", "m", "--json", *login)
    assert code == 0, err
    last = {(e["device_id"], e["step"], e["version"]) for e in json.loads(out)["entries"]}
    assert {("dev-1", "COMMITTED", 3), ("dev-2", "COMMITTED", 3)} <= last


def test_bad_input_is_one_line_and_publishes_nothing(broker: Mosquitto, make_bundle: Callable[..., Path],
                                                     key_dir: Path, edgectl: Edgectl, tmp_path: Path) -> None:
    login = ("--broker", broker.url)
    bundle = make_bundle("dense_f32", version=1)
    for argv, message in (
        (("push", bundle, "--group", "lab", "--key", key_dir, "--dry-run", "--wait"), "--dry-run publishes nothing"),
        (("deployments", "show", "m-v9-nothing"), "'m-v9-nothing' is neither a deployment id nor a model"),
        (("deployments", "withdraw", "--group", "lab", "--model", "m", "--key", key_dir),
         "the m document for group:lab does not exist; nothing was published"),
        (("deployments", "history", "--from", tmp_path / "none.jsonl"), "--from"),
    ):
        code, out, err = edgectl(*argv, *login)
        assert code == 2 and err.startswith("edgectl: error: ") and message in err and len(err.splitlines()) == 1, err
    assert retained(broker.url) == {}
