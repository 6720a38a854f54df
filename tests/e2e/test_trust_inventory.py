"""Group membership from the operator-signed inventory, targeted documents, timestamps and withdrawals.

The attack: any MQTT client that may publish a device status can claim any group. Host tools that
took membership from statuses let such a client become the canary of `push --canary` (and "commit" a
model it never ran) or be counted by `push --wait` (and veto every rollout). Membership now comes from
an inventory signed with the operator key; these tests run the attack against real agents on a real
Mosquitto and check that the claim changes nothing, and that forged or replayed inventories are
ignored with a warning.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.converter.fleet.publish import RetainedIndex
from edgefleet.protocol import Keyring, SigningKey, Status, Topics, canonical_json, parse_json
from edgefleet.protocol.documents import INVENTORY_SCHEMA, Deployment, Timestamp, Withdrawal
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.broker import Inbox, Mosquitto, client
from edgefleet.testing.waiting import wait_for
from edgefleet.transport import Transport
from tests.support import ROOT
from tests.support.fake_device import FakeDevice
from tests.support.helpers import retained_index

T = Topics()
X = [[0.5, -1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.1]]
Edgectl = Callable[..., tuple[int, str, str]]


def flat(text: str) -> str:
    return " ".join(text.split())


def retained(url: str) -> RetainedIndex:
    """The retained deployment documents, withdrawals and chunks on the broker."""
    return retained_index(url, T)


def retained_payload(url: str, topic: str) -> bytes:
    inbox = Inbox()
    t = client(url, inbox)
    try:
        t.subscribe(topic, wait=5)
        return inbox.topic(topic, timeout=5).payload
    finally:
        t.stop()


def claim(url: str, device: str, *groups: str) -> None:
    """What an impostor does: a retained `online` status for `device` claiming `groups`."""
    t = client(url)
    doc = Status(status="online", device_id=device, agent_version="1.0", ts=time.time(), groups=groups)
    t.publish(T.status(device), canonical_json(doc.to_dict()), retain=True, wait=5)
    t.stop()


def inventory_doc(key: SigningKey, version: int, groups: dict[str, list[str]], *, valid_s: int = 3600,
                  issued: int | None = None) -> bytes:
    now = int(time.time()) if issued is None else issued
    return canonical_json(key.sign({"schema": INVENTORY_SCHEMA, "version": version, "issued_at": now,
                                    "expires_at": now + valid_s, "groups": groups}))


def publish_retained(url: str, topic: str, payload: bytes) -> None:
    t = client(url)
    t.publish(topic, payload, retain=True, wait=5)
    t.stop()


def assert_targets_match_topics(index: RetainedIndex, keyring: Keyring) -> None:
    """Every retained document and withdrawal is signed and names exactly the target of its topic."""
    assert index.documents or index.withdrawals
    for topic, payload in [*index.documents.items(), *index.withdrawals.items()]:
        raw = parse_json(payload)
        keyring.verify(raw)
        route = T.parse(topic)
        expected = f"device:{route.device}" if route.kind == "device_model" else f"group:{route.group}"
        assert raw["target"] == expected, (topic, raw["target"])
        name = raw["model"] if isinstance(raw["model"], str) else raw["model"]["name"]  # withdrawal / deployment
        assert name == route.model


# ---------------------------------------------------------------------- real agents


@pytest.fixture
def prod(tmp_path: Path, broker: Mosquitto, key_dir: Path) -> Iterator[list[AgentProcess]]:
    """Two real agents in group prod that trust the operator key, online on the broker."""
    agents = []
    inbox = Inbox()
    watcher = client(broker.url, inbox)
    watcher.subscribe(T.all_devices("status"), wait=5)
    for device in ("node-1", "node-2"):
        agents.append(AgentProcess(
            tmp_path / device, device_id=device, groups=["prod"],
            mqtt={"url": broker.url, "reconnect_max_s": 1.0},
            security={"trusted_keys": [str(key_dir / "edgefleet.pub")]},
            health={"probation_s": 1, "min_requests": 1}).start(wait=False))
    try:
        for a in agents:
            a.wait_ready()
        for device in ("node-1", "node-2"):
            inbox.wait_for(lambda m, d=device: m.topic == T.status(d) and  # type: ignore[misc]
                           parse_json(m.payload)["status"] == "online", 30)
        yield agents
    finally:
        watcher.stop()
        for a in agents:
            a.kill()


def version(a: AgentProcess) -> int:
    return int(a.client.predict("m", X)["edgefleet"]["model_version"])


def test_an_impostor_claiming_the_group_is_neither_canary_nor_counted(
        broker: Mosquitto, prod: list[AgentProcess], make_bundle: Callable[..., Path], key: SigningKey,
        key_dir: Path, edgectl: Edgectl) -> None:
    # "impostor" sorts before node-1: by its claim alone it would be the first canary.
    claim(broker.url, "impostor", "prod")
    login = ["--broker", broker.url]
    code, out, err = edgectl("push", make_bundle("dense_f32", version=1), "--group", "prod", "--key", key_dir,
                             "--canary", "1", "--wait", "--timeout", 60, *login)
    assert code == 2 and "no inventory on the broker" in err  # fail closed: no inventory, no membership
    assert retained(broker.url).documents == {}

    code, out, err = edgectl("inventory", "set", "prod", "node-1", "node-2", "--key", key_dir, *login)
    assert code == 0, err
    assert "published inventory version 1" in out and "prod: node-1, node-2" in flat(out)
    code, out, err = edgectl("push", make_bundle("dense_f32", version=1), "--group", "prod", "--key", key_dir,
                             "--canary", "1", "--wait", "--timeout", 60, *login)
    assert code == 0, out + err
    text = flat(out)
    assert "canaries: node-1 (1 of 2 online member(s) of prod)" in text
    assert "device impostor: claims group prod but is not in the inventory: never a canary, not counted" in text
    assert "2 committed, 0 failed, 0 unfinished, 0 pending" in text
    assert [version(a) for a in prod] == [1, 1]
    index = retained(broker.url)
    assert set(index.documents) == {T.group_model("prod", "m")}
    assert set(index.withdrawals) == {T.device_model("node-1", "m")}  # the canary's document, taken back signed
    assert_targets_match_topics(index, Keyring([key.private_key.public_key()]))

    # the same claim against a plain --wait push: counted devices are the inventory's, nothing waits for it
    code, out, err = edgectl("push", make_bundle("dense_f32_v2", version=2), "--group", "prod", "--key", key_dir,
                             "--wait", "--timeout", 60, "--json", *login)
    assert code == 0, out + err
    report = json.loads(out.splitlines()[-1])  # the summary follows the progress events
    assert {d["device_id"]: d["verdict"] for d in report["devices"]} == {"node-1": "committed", "node-2": "committed"}
    assert report["not_in_inventory"] == ["impostor"] and report["ok"] is True
    assert [version(a) for a in prod] == [2, 2]
    doc = parse_json(retained(broker.url).documents[T.group_model("prod", "m")])
    assert doc["target"] == "group:prod" and doc["deployment_id"] == report["deployment_id"]

    # fleet status shows the claim for what it is, and the inventory's view of the real members
    code, out, err = edgectl("fleet", "status", "--trust", key_dir / "edgefleet.pub", "--json", *login)
    assert code == 0, err
    rows = {d["device_id"]: d for d in json.loads(out)["devices"]}
    assert rows["impostor"]["inventory_groups"] == [] and rows["impostor"]["claims_not_in_inventory"] == ["prod"]
    assert rows["node-1"]["inventory_groups"] == ["prod"] and rows["node-1"]["claims_not_in_inventory"] == []
    code, out, _ = edgectl("fleet", "status", "--trust", key_dir / "edgefleet.pub", *login)
    assert "prod (claims group, not in inventory)" in flat(out) and "groups from inventory version 1" in flat(out)


def test_a_device_document_names_its_device_and_a_withdrawal_takes_it_back(
        broker: Mosquitto, prod: list[AgentProcess], make_bundle: Callable[..., Path], key: SigningKey,
        key_dir: Path, edgectl: Edgectl) -> None:
    login = ["--broker", broker.url]
    code, out, err = edgectl("push", make_bundle("dense_f32", version=1), "--device", "node-1", "--device", "node-2",
                             "--key", key_dir, "--wait", "--timeout", 60, *login)
    assert code == 0, out + err
    assert [version(a) for a in prod] == [1, 1]
    index = retained(broker.url)
    assert set(index.documents) == {T.device_model("node-1", "m"), T.device_model("node-2", "m")}
    assert_targets_match_topics(index, Keyring([key.private_key.public_key()]))
    code, out, err = edgectl("withdraw", "--device", "node-2", "--model", "m", "--key", key_dir, *login)
    assert code == 0, err
    assert "withdrew the m document for device:node-2" in flat(out)
    index = retained(broker.url)
    assert set(index.documents) == {T.device_model("node-1", "m")}
    withdrawal = Withdrawal.from_dict(parse_json(index.withdrawals[T.device_model("node-2", "m")]))
    assert (withdrawal.model, withdrawal.target) == ("m", "device:node-2")
    assert [version(a) for a in prod] == [1, 1]  # a withdrawal uninstalls nothing


# ---------------------------------------------------------------------- forged and replayed inventories


@pytest.fixture
def fakes(broker: Mosquitto, key: SigningKey) -> Iterator[Callable[..., FakeDevice]]:
    started: list[FakeDevice] = []

    def start(device: str, *groups: str) -> FakeDevice:
        d = FakeDevice(broker.url, device, groups=groups, keyring=Keyring([key.private_key.public_key()])).start()
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def test_an_inventory_signed_by_an_untrusted_key_is_ignored_with_a_warning(
        broker: Mosquitto, fakes: Callable[..., FakeDevice], make_bundle: Callable[..., Path], key: SigningKey,
        key_dir: Path, edgectl: Edgectl, tmp_path: Path) -> None:
    fakes("cam-1", "prod")
    forger = SigningKey.generate()
    publish_retained(broker.url, T.inventory(), inventory_doc(forger, 7, {"prod": ["impostor", "cam-1"]}))
    claim(broker.url, "impostor", "prod")
    code, out, err = edgectl("push", make_bundle(version=1), "--group", "prod", "--key", key_dir, "--canary", "1",
                             "--broker", broker.url)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 2, err
    assert lines[0] == (f"edgectl: warning: ignoring the inventory on the broker: signed with unknown key "
                        f"{forger.key_id}")
    assert "the inventory on the broker does not verify" in lines[1] and "nothing was published" in lines[1]
    assert retained(broker.url).documents == {} and retained(broker.url).chunks == {}
    code, out, err = edgectl("inventory", "show", "--trust", key_dir, "--broker", broker.url)
    assert code == 1 and "no verified inventory: the one on the broker does not verify" in flat(out)
    # changing groups of an inventory this host cannot read would drop them: refused; a whole new one is fine
    code, _, err = edgectl("inventory", "set", "prod", "cam-1", "--key", key_dir, "--broker", broker.url)
    assert code == 2 and "does not verify with the trusted keys" in err.strip().splitlines()[-1]
    (tmp_path / "fleet.toml").write_text('[groups]\nprod = ["cam-1"]\n')
    code, out, err = edgectl("inventory", "push", tmp_path / "fleet.toml", "--key", key_dir, "--broker", broker.url)
    assert code == 0, err
    code, out, err = edgectl("push", make_bundle(version=1), "--group", "prod", "--key", key_dir, "--wait",
                             "--timeout", 20, "--json", "--broker", broker.url)
    assert code == 0, err
    report = json.loads(out.splitlines()[-1])  # the summary follows the progress events
    assert [d["device_id"] for d in report["devices"]] == ["cam-1"] and report["not_in_inventory"] == ["impostor"]


def test_an_older_inventory_published_again_is_ignored(
        broker: Mosquitto, fakes: Callable[..., FakeDevice], make_bundle: Callable[..., Path], key: SigningKey,
        key_dir: Path, edgectl: Edgectl) -> None:
    fakes("cam-1", "prod")
    retired = fakes("cam-2", "prod")
    login = ["--broker", broker.url]
    assert edgectl("inventory", "set", "prod", "cam-1", "cam-2", "--key", key_dir, *login)[0] == 0
    old = retained_payload(broker.url, T.inventory())  # what anyone who may read the topic can capture
    code, out, _ = edgectl("inventory", "remove", "prod", "cam-2", "--key", key_dir, *login)
    assert code == 0 and "published inventory version 2" in out
    publish_retained(broker.url, T.inventory(), old)  # replayed by someone without the key
    code, out, err = edgectl("inventory", "show", "--trust", key_dir, "--json", *login)
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["version"], shown["groups"], shown["source"]) == (2, {"prod": ["cam-1"]}, "cache")
    assert shown["claims_not_in_inventory"] == {"cam-2": ["prod"]}
    assert err.strip() == ("edgectl: warning: ignoring the inventory on the broker: version 1 is lower than "
                           "version 2 already seen (an old inventory published again?)")
    code, out, err = edgectl("push", make_bundle(version=1), "--group", "prod", "--key", key_dir, "--wait",
                             "--timeout", 20, "--json", *login)
    assert code == 0, err
    report = json.loads(out.splitlines()[-1])  # the summary follows the progress events
    assert [d["device_id"] for d in report["devices"]] == ["cam-1"] and report["not_in_inventory"] == ["cam-2"]
    assert "version 1 is lower than version 2" in err
    assert len(retired.deployments) == 1  # it still follows the group topic by its own config: not our count
    # the next change continues from the newest version, not from the replayed one
    code, out, _ = edgectl("inventory", "set", "staging", "cam-2", "--key", key_dir, *login)
    assert code == 0 and "published inventory version 3" in out and "prod: cam-1" in out


def test_an_expired_inventory_is_not_used_until_renewed(
        broker: Mosquitto, fakes: Callable[..., FakeDevice], make_bundle: Callable[..., Path], key: SigningKey,
        key_dir: Path, edgectl: Edgectl) -> None:
    fakes("cam-1", "prod")
    publish_retained(broker.url, T.inventory(), inventory_doc(key, 4, {"prod": ["cam-1"]}, valid_s=60,
                                                              issued=int(time.time()) - 120))
    code, _, err = edgectl("push", make_bundle(version=1), "--group", "prod", "--key", key_dir, "--wait",
                           "--broker", broker.url)
    assert code == 2 and "the inventory (version 4) has expired; renew it" in err.strip().splitlines()[-1]
    code, out, err = edgectl("inventory", "renew", "--key", key_dir, "--broker", broker.url)
    assert code == 0 and "published inventory version 5" in out and "prod: cam-1" in out, err
    code, out, err = edgectl("push", make_bundle(version=1), "--group", "prod", "--key", key_dir, "--wait",
                             "--timeout", 20, "--broker", broker.url)
    assert code == 0 and "1 committed" in out, err


def test_inventory_input_errors_are_one_line(broker: Mosquitto, key_dir: Path, edgectl: Edgectl,
                                             tmp_path: Path) -> None:
    files = {"bad.toml": "[groups\n", "other.toml": 'owner = "x"\n[groups]\n', "names.toml": '[groups]\nlab = ["a/b"]\n',
             "shape.toml": "[groups]\nlab = 3\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    cases: list[tuple[list[object], str]] = [
        (["inventory", "push", tmp_path / "bad.toml"], "bad.toml: not valid TOML"),
        (["inventory", "push", tmp_path / "other.toml"], "other.toml: owner: unknown key"),
        (["inventory", "push", tmp_path / "names.toml"], "names.toml: groups.lab: 'a/b'"),
        (["inventory", "push", tmp_path / "shape.toml"], "groups.lab: expected a list of device ids"),
        (["inventory", "push", tmp_path / "none.toml"], "none.toml: No such file"),
        (["inventory", "set", "lab", "a/b"], "invalid device 'a/b'"),
        (["inventory", "remove", "lab"], "there is no inventory to remove"),
        (["inventory", "renew"], "there is no inventory to renew"),
    ]
    for argv, fragment in cases:
        code, _, err = edgectl(*argv, "--key", key_dir, "--broker", broker.url)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and fragment in lines[0], (argv, err)
    code, _, err = edgectl("inventory", "show", "--trust", tmp_path / "missing.pub", "--broker", broker.url)
    assert code == 2 and "--trust" in err
    index = retained(broker.url)
    assert index.documents == {} and index.withdrawals == {}
    assert edgectl("inventory", "show", "--trust", key_dir, "--broker", broker.url)[0] == 1  # still none


# ---------------------------------------------------------------------- timestamp and withdraw


def test_timestamp_is_signed_retained_and_reissued(broker: Mosquitto, key: SigningKey, key_dir: Path,
                                                   edgectl: Edgectl) -> None:
    code, out, err = edgectl("timestamp", "--key", key_dir, "--expires-in", 120, "--json", "--broker", broker.url)
    assert code == 0, err
    raw = parse_json(retained_payload(broker.url, T.timestamp()))
    Keyring([key.private_key.public_key()]).verify(raw)
    ts = Timestamp.from_dict(raw)
    assert ts.expires_at - ts.issued_at == 120 and abs(ts.issued_at - time.time()) < 5
    assert json.loads(out)["expires_at"] == ts.expires_at

    code, _, err = edgectl("timestamp", "--key", key_dir, "--every", 900, "--broker", broker.url)
    assert code == 2 and "--every 900 must be below --expires-in 900" in err

    inbox = Inbox()
    watcher: Transport = client(broker.url, inbox)
    watcher.subscribe(T.timestamp(), wait=5)
    service = subprocess.Popen([sys.executable, "-m", "edgefleet.converter.cli", "timestamp", "--key", str(key_dir), "--every",
                                "1", "--expires-in", "5", "--broker", broker.url], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen: set[int] = set()

        def issued() -> bool:
            for m in inbox.quiet(0.2):
                doc: dict[str, Any] = parse_json(m.payload)
                Keyring([key.private_key.public_key()]).verify(doc)
                seen.add(doc["issued_at"])
            return len(seen) >= 3
        wait_for(issued, timeout=15, what="three timestamps from the --every service")
        service.send_signal(signal.SIGTERM)  # how systemd stops it
        stdout, stderr = service.communicate(timeout=10)
    finally:
        service.kill()
        watcher.stop()
    assert service.returncode == 0, stderr
    assert "again every 1 s until stopped" in stdout and "stopped after" in stdout


def test_withdraw_a_group_document(broker: Mosquitto, make_bundle: Callable[..., Path], key: SigningKey,
                                   key_dir: Path, edgectl: Edgectl) -> None:
    assert edgectl("push", make_bundle(version=1), "--group", "lab", "--key", key_dir, "--broker", broker.url)[0] == 0
    assert Deployment.from_json(retained(broker.url).documents[T.group_model("lab", "m")]).target == "group:lab"
    code, out, err = edgectl("withdraw", "--group", "lab", "--model", "m", "--key", key_dir, "--json",
                             "--broker", broker.url)
    assert code == 0, err
    assert json.loads(out)["withdrawn"] == [{"topic": T.group_model("lab", "m"), "target": "group:lab"}]
    index = retained(broker.url)
    assert index.documents == {} and set(index.withdrawals) == {T.group_model("lab", "m")}
    assert_targets_match_topics(index, Keyring([key.private_key.public_key()]))
    code, out, _ = edgectl("gc", "--json", "--broker", broker.url)  # a withdrawal pins no chunks
    assert code == 0 and json.loads(out)["warnings"] == [] and json.loads(out)["cleared"] > 0
