"""Attacks through a real broker on real agents: replayed deployments and commands, downgrades, keys
rotated out, device credentials used against other devices through the shipped ACL, and names built
to escape the state directory. (test_delivery and test_acl cover the single-step refusals; these are
the multi-step versions an attacker would actually try.)"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.converter.fleet.publish import make_command
from edgefleet.errors import RequestError, TransportError
from edgefleet.protocol import SigningKey, Topics, canonical_json, parse_json
from edgefleet.testing.broker import client
from edgefleet.testing.reliability import AgentWith, Fleet, Operator, X, build_bundle, running_fleet
from edgefleet.transport import MqttSettings, Transport
from tests.support.broker import OPERATOR, acl_broker_for
from tests.support.inproc import tree

T = Topics()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(tmp_path) as f:
        yield f


def _served(a: AgentWith) -> int:
    return int(a.client.predict("m", X)["edgefleet"]["model_version"])


def _refused(fleet: Fleet, mark: int, part: str, device: str = "dev-1") -> dict[str, object]:
    event = fleet.op.after(mark, lambda e: not e["ok"], device=device)
    assert part in (event["reason"] or ""), event
    return event


def test_replayed_deployments_are_refused_after_a_newer_one_and_after_a_restart(fleet: Fleet, tmp_path: Path) -> None:
    a = fleet.agent(health={"probation_s": 0.5}).start()
    old = fleet.op.push(build_bundle(tmp_path / "v1", "dense_f32", version=1), group="lab")
    fleet.op.step("COMMITTED", 1)
    fleet.op.push(build_bundle(tmp_path / "v2", "dense_f32_v2", version=2), group="lab")
    fleet.op.step("COMMITTED", 2)
    # the genuine, still unexpired v1 document, byte for byte, replayed on the group's topic ...
    mark = fleet.op.mark()
    fleet.op.document(old.document, group="lab")
    _refused(fleet, mark, "is older than the newest group:lab document")
    # ... and on the device's own topic, which would override the group's: its signed target says group:lab
    mark = fleet.op.mark()
    fleet.op.document(old.document, device="dev-1")
    _refused(fleet, mark, "document is for group:lab but was published for device:dev-1")
    assert _served(a) == 2
    assert a.stop() == 0
    a.start()  # the replayed documents are retained: delivered again at subscribe, still refused
    mark = fleet.op.mark()
    fleet.op.push(build_bundle(tmp_path / "v3", "dense_f32", version=3))  # replaces the replayed device document
    fleet.op.after(mark, lambda e: e["step"] == "PROBATION" and e["version"] == 3)
    assert not [e for e in fleet.op.since(mark) if e.get("version") == 1 and e["ok"]]
    assert _served(a) == 3


def test_replayed_commands_are_refused_even_after_a_restart(fleet: Fleet, tmp_path: Path) -> None:
    a = fleet.agent(health={"probation_s": 0.5}).start()
    fleet.op.push(build_bundle(tmp_path / "v1", "dense_f32", version=1))
    fleet.op.step("COMMITTED", 1)
    fleet.op.push(build_bundle(tmp_path / "v2", "dense_f32_v2", version=2))
    fleet.op.step("COMMITTED", 2)
    rollback = canonical_json(make_command(fleet.key, "dev-1", "rollback", "m"))
    mark = fleet.op.mark()
    fleet.op.transport.publish(T.cmd("dev-1"), rollback, wait=10)
    fleet.op.after(mark, lambda e: e["step"] == "ROLLED_BACK")
    assert _served(a) == 1
    fleet.op.push(build_bundle(tmp_path / "v3", "dense_f32_v2", version=3))
    fleet.op.step("COMMITTED", 3)
    mark = fleet.op.mark()
    fleet.op.transport.publish(T.cmd("dev-1"), rollback, wait=10)  # captured and replayed
    _refused(fleet, mark, "already applied (replay)")
    assert a.stop() == 0
    fleet.start(a)  # the memory of applied commands is in state.json
    mark = fleet.op.mark()
    fleet.op.transport.publish(T.cmd("dev-1"), rollback, wait=10)
    _refused(fleet, mark, "already applied (replay)")
    other = canonical_json(make_command(fleet.key, "dev-2", "rollback", "m"))  # another device's, replayed here
    mark = fleet.op.mark()
    fleet.op.transport.publish(T.cmd("dev-1"), other, wait=10)
    _refused(fleet, mark, "addressed to dev-2")
    stale = canonical_json(make_command(fleet.key, "dev-1", "rollback", "m", now=1_000_000, expires_in=300))
    mark = fleet.op.mark()
    fleet.op.transport.publish(T.cmd("dev-1"), stale, wait=10)
    _refused(fleet, mark, "command expired")
    assert _served(a) == 3 and a.state_file()["models"]["m"]["active"]["deployment"]["model"]["version"] == 3


def test_a_downgrade_needs_a_permission_inside_the_signature(fleet: Fleet, tmp_path: Path) -> None:
    a = fleet.agent().start()
    fleet.op.push(build_bundle(tmp_path / "v5", "dense_f32", version=5))
    fleet.op.step("PROBATION", 5)
    old = fleet.op.prepare(build_bundle(tmp_path / "v3", "dense_f32_v2", version=3))
    fleet.op.chunks(old.chunks)
    signed = parse_json(old.document)
    attempts = [
        (signed, "not above the active version 5"),
        ({**signed, "policy": {**signed.get("policy", {}), "allow_downgrade": True}, "deployment_id": "altered-v3"},
         "signature does not match"),
        ({k: v for k, v in signed.items() if k not in ("signature", "key_id")} | {"policy": {"allow_downgrade": True},
                                                                                   "deployment_id": "unsigned-v3"},
         "document is not signed"),
        (SigningKey.generate().sign({**signed, "policy": {"allow_downgrade": True}, "deployment_id": "forged-v3"}),
         "signed with unknown key"),
    ]
    for doc, reason in attempts:
        mark = fleet.op.mark()
        fleet.op.document(canonical_json(doc))
        _refused(fleet, mark, reason)
        assert _served(a) == 5
    permitted = fleet.key.sign({**signed, "policy": {"allow_downgrade": True}, "deployment_id": "permitted-v3",
                                "issued_at": signed["issued_at"] + 1})  # issued after what runs
    fleet.op.document(canonical_json(permitted))
    fleet.op.step("PROBATION", 3, dep_id="permitted-v3")
    assert _served(a) == 3


def test_key_rotation_two_keys_then_one(fleet: Fleet, tmp_path: Path) -> None:
    old, new = fleet.key, SigningKey.generate()
    new.write(tmp_path / "new-keys")
    both = [str(tmp_path / "keys" / "edgefleet.pub"), str(tmp_path / "new-keys" / "edgefleet.pub")]
    a = fleet.agent(security={"trusted_keys": both}).start()
    fleet.op.push(build_bundle(tmp_path / "v1", "dense_f32", version=1), key=old)
    fleet.op.step("PROBATION", 1)
    fleet.op.push(build_bundle(tmp_path / "v2", "dense_f32_v2", version=2), key=new)
    fleet.op.step("PROBATION", 2)
    assert a.stop() == 0
    # the old key is retired: the same state directory, a config that trusts only the new key
    b = AgentWith(a.root, groups=["lab"], mqtt={"url": fleet.broker.url, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
                  security={"trusted_keys": both[1:]}, health={"probation_s": 600, "min_requests": 1})
    fleet.agents.append(b)
    fleet.start(b)
    assert _served(b) == 2
    mark = fleet.op.mark()
    fleet.op.push(build_bundle(tmp_path / "v3", "dense_f32", version=3), key=old)
    _refused(fleet, mark, f"signed with unknown key {old.key_id}")
    mark = fleet.op.mark()
    fleet.op.transport.publish(T.cmd("dev-1"), canonical_json(make_command(old, "dev-1", "rollback", "m")), wait=10)
    _refused(fleet, mark, f"signed with unknown key {old.key_id}")
    assert _served(b) == 2
    fleet.op.push(build_bundle(tmp_path / "v3b", "dense_f32", version=3), key=new)
    fleet.op.step("PROBATION", 3, timeout=60)
    assert _served(b) == 3


def test_a_device_credential_cannot_order_another_device_through_the_shipped_acl(tmp_path: Path) -> None:
    acl = acl_broker_for(tmp_path / "broker", devices=("dev-a", "dev-b"))
    acl.broker.start()
    key = SigningKey.generate()
    key.write(tmp_path / "keys")
    (tmp_path / "dev-a.pw").write_text(acl.passwords["dev-a"])
    op = Operator(acl.operator_url, key, username=OPERATOR, password=acl.passwords[OPERATOR])
    a = AgentWith(tmp_path / "dev-a", "dev-a", groups=["lab"],
                  mqtt={"url": acl.url, "username": "dev-a", "password_file": str(tmp_path / "dev-a.pw"),
                        "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
                  security={"trusted_keys": [str(tmp_path / "keys" / "edgefleet.pub")]},
                  health={"probation_s": 600, "min_requests": 1})
    attacker = None
    try:
        a.start()
        op.push(build_bundle(tmp_path / "v1", "dense_f32", version=1), device="dev-a")
        op.step("PROBATION", 1, device="dev-a")
        # dev-b's credential, with a genuine signed v2 document it captured from a group topic it may read
        captured = op.prepare(build_bundle(tmp_path / "v2", "dense_f32_v2", version=2))
        attacker = client(acl.url, username="dev-b", password=acl.passwords["dev-b"], client_id=f"dev-b-{uuid.uuid4().hex[:6]}")
        sha = next(iter(captured.chunks))
        attempts = {
            T.device_model("dev-a", "m"): captured.document,
            T.group_model("lab", "m"): captured.document,
            T.cmd("dev-a"): canonical_json(make_command(key, "dev-a", "rollback", "m")),
            T.chunk(sha): b"poisoned chunk",
            T.status("dev-a"): b'{"status":"offline"}',
        }
        for topic, payload in attempts.items():
            with pytest.raises(TransportError, match="Not authorized"):
                attacker.publish(topic, payload, retain=True, wait=10)
        # nothing reached the agent: a barrier from the operator arrives, and nothing before it
        mark = op.mark()
        op.transport.publish(T.cmd("dev-a"), canonical_json(make_command(key, "dev-a", "report")), wait=10)
        op.after(mark, lambda e: e["ok"], device="dev-a")
        assert not [e for e in op.events("dev-a") if e.get("version") == 2 or e["step"] == "ROLLED_BACK"]
        assert a.client.predict("m", X)["edgefleet"]["model_version"] == 1
        # dev-b asking for dev-a's client id gets its own (the device listener binds the client id to the
        # user name): dev-a stays connected, and the publish is refused all the same. (The first dev-b
        # connection goes first: two connections of one identity replace each other.)
        attacker.stop()
        attacker = None
        connects = a.log().count("connected to")
        takeover = Transport(MqttSettings(url=acl.url, username="dev-b", password=acl.passwords["dev-b"],
                                          client_id="dev-a", reconnect_min_s=5, reconnect_max_s=5),
                             on_message=lambda m: None)
        takeover.start()
        takeover.wait_connected(10)
        with pytest.raises(TransportError, match="Not authorized"):
            takeover.publish(T.device_model("dev-a", "m"), captured.document, retain=True, wait=10)
        takeover.stop()
        mark = op.mark()
        op.transport.publish(T.cmd("dev-a"), canonical_json(make_command(key, "dev-a", "report")), wait=10)
        op.after(mark, lambda e: e["ok"], device="dev-a")
        assert a.log().count("connected to") == connects, a.log()
        assert a.client.predict("m", X)["edgefleet"]["model_version"] == 1
        assert a.state_file()["models"]["m"]["active"]["deployment"]["model"]["version"] == 1
    finally:
        if attacker is not None:
            attacker.stop()
        op.close()
        a.kill()
        acl.broker.kill()


ESCAPES = ["..", "%2e%2e", "..%2f..%2fescape", "\u2024\u2024", "\uff0e\uff0e", "\u2025", "\u2215escape",
           "escape\u200b", ".", "-escape", "e" * 60_000]


def test_names_built_to_escape_the_state_directory(fleet: Fleet, tmp_path: Path) -> None:
    a = fleet.agent().start()
    v1 = build_bundle(tmp_path / "v1", "dense_f32", version=1)
    fleet.op.push(v1)
    fleet.op.step("PROBATION", 1)
    doc = parse_json(fleet.op.prepare(build_bundle(tmp_path / "v2", "dense_f32_v2", version=2)).document)
    before = tree(tmp_path)
    marks = []
    for i, name in enumerate(ESCAPES + ["../../escape", "/tmp/escape", "a\x00b", "m/../../escape"]):
        evil = fleet.key.sign({**doc, "deployment_id": f"escape-{i}", "model": {**doc["model"], "name": name}})
        marks.append(fleet.op.mark())
        fleet.op.document(canonical_json(evil))  # on the topic of model "m": a name that differs
        if "/" not in name and "\x00" not in name:
            fleet.op.transport.publish(f"edgefleet/devices/dev-1/models/{name}", canonical_json(evil), retain=True,
                                       wait=10)
            fleet.op.transport.publish(f"edgefleet/groups/lab/models/{name}", canonical_json(evil), retain=True,
                                       wait=10)
        if "\x00" not in name:  # MQTT forbids NUL in a topic name (the broker would drop the operator)
            fleet.op.transport.publish(f"edgefleet/chunks/{name[:200]}", b"x", retain=True, wait=10)
    for mark in marks:
        fleet.op.after(mark, lambda e: e["step"] == "REJECTED")
    # the admin API: inference clients cannot install at all; on the admin socket, passed files whose
    # names climb out are refused, and a manifest that names a model so is rejected
    status, _, body = a.client.request("POST", "/v1/admin/install", b"{}", retry=False)
    assert status == 403 and "admin socket" in json.loads(body)["error"]
    with open(v1 / "manifest.json", "rb") as f, pytest.raises(RequestError, match="must map exactly") as refused:
        a.client.admin("install", {"files": {"../../escape": 0, "manifest.json": 0, "model.tflite": 0,
                                             "golden.npz": 0}}, fds=[f.fileno()])
    assert refused.value.status == 400
    raw = parse_json((v1 / "manifest.json").read_bytes())
    raw["model"]["name"] = "../../escape"
    (tmp_path / "evil").mkdir()
    for f in ("model.tflite", "golden.npz"):
        (tmp_path / "evil" / f).write_bytes((v1 / f).read_bytes())
    (tmp_path / "evil" / "manifest.json").write_bytes(canonical_json(raw))
    answer = a.client.admin("install", {"path": str(tmp_path / "evil")})
    assert answer["phase"] == "REJECTED" and "no valid model name" in answer["reason"]
    status, _, body = a.client.request("GET", "/v1/models/..%2f..%2fescape")
    assert status == 404 and "unknown" in json.loads(body)["error"]
    # nothing outside the state directory changed, and inside it only the store's own files
    after = tree(tmp_path)
    changed = {p for p in after if before.get(p) != after[p]} | (set(before) - set(after))
    allowed = ("agent-0/agent.log", "agent-0/state/", "broker/", "evil/")
    assert all(p.startswith(allowed) for p in changed), sorted(p for p in changed if not p.startswith(allowed))
    assert not [p for p in after if "escape" in p], [p for p in after if "escape" in p]
    top = {p.split("/")[2] for p in after if p.startswith("agent-0/state/") and p.count("/") in (2, 3)}
    assert top <= {"", "state.json", "state.json.bak", "lock", "blobs", "partial"}, top
    assert _served(a) == 1 and set(a.state_file()["models"]) == {"m"}
