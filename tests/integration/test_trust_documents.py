"""Issue 12's document attacks, performed against real agents behind the shipped broker config.

The attacker holds the operator's broker credential but not the signing key: it may publish (and clear)
anything on the deployment and command topics. Nothing it publishes may change what a device runs, what
it has saved, or which genuine document it will take up.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.bundle import MANIFEST_FILE, MODEL_FILE
from edgefleet.converter.fleet.publish import make_command
from edgefleet.protocol import SigningKey, Topics, canonical_json, parse_json
from edgefleet.testing.reliability import AgentWith, Fleet, Operator, X, build_bundle
from tests.support.broker import acl_broker_for

T = Topics()
DEVICES = ("dev-1", "dev-2")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """The shipped broker config (device and operator listeners, ACLs, identity binding), the operator's
    signing key, and agents that log in with their own device credential."""
    key = SigningKey.generate()
    key.write(tmp_path / "keys")
    shipped = acl_broker_for(tmp_path / "broker", devices=DEVICES)
    shipped.broker.start()
    op = Operator(shipped.operator_url, key, **shipped.operator_login())
    f = Fleet(tmp_path, shipped, op, key)
    try:
        yield f
    finally:
        op.close()
        for a in f.agents:
            a.kill()
        shipped.broker.kill()


@pytest.fixture
def attacker(fleet: Fleet) -> Iterator[Operator]:
    """A second host connection with the operator's broker password and a key nobody trusts."""
    op = Operator(fleet.broker.operator_url, SigningKey.generate(), **fleet.broker.operator_login())
    try:
        yield op
    finally:
        op.close()


def _agent(fleet: Fleet, device: str = "dev-1", prelude: str = "", groups: tuple[str, ...] = ("lab",),
           **sections: Any) -> AgentWith:
    """An agent that logs in with its own device credential and trusts the operator's key (not started)."""
    secret = fleet.root / f"{device}.password"
    secret.write_text(fleet.broker.passwords[device])
    config: dict[str, Any] = {
        "mqtt": {"url": fleet.broker.url, "password_file": str(secret), "reconnect_min_s": 0.2,
                 "reconnect_max_s": 1.0},
        "security": {"trusted_keys": [str(fleet.root / "keys" / "edgefleet.pub")]},
        "health": {"probation_s": 0.5, "min_requests": 1},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    a = AgentWith(fleet.root / f"agent-{len(fleet.agents)}", device, groups=list(groups), prelude=prelude, **config)
    fleet.agents.append(a)
    return a


def _served(a: AgentWith) -> int:
    return int(a.client.predict("m", X)["edgefleet"]["model_version"])


def _active(a: AgentWith) -> int:
    """The version the agent has active for m (any model shape)."""
    return int(a.client.model_status("m")["model_version_status"][0]["version"])


def _model(a: AgentWith) -> dict[str, Any]:
    return a.state_file()["models"]["m"]  # type: ignore[no-any-return]


def _refusal(fleet: Fleet, mark: int, part: str, device: str = "dev-1") -> dict[str, Any]:
    event = fleet.op.after(mark, lambda e: not e["ok"] and part in (e.get("reason") or ""), device=device)
    assert event["details"].get("refused") is True, event  # answered by an event, nothing saved
    return event


def _commit(fleet: Fleet, tmp_path: Path, version: int, model: str = "dense_f32", **push: Any) -> Any:
    mark = fleet.op.mark()
    prepared = fleet.op.push(build_bundle(tmp_path / f"v{version}-{uuid.uuid4().hex[:6]}", model, version=version),
                             **push)
    device = push.get("device", "dev-1")
    fleet.op.after(mark, lambda e: e["step"] == "COMMITTED" and e.get("version") == version, device=device,
                   timeout=60)
    return prepared


def _report(fleet: Fleet, device: str = "dev-1") -> None:
    """A signed report command, answered in order after everything published before it."""
    mark = fleet.op.mark()
    fleet.op.transport.publish(T.cmd(device), canonical_json(make_command(fleet.key, device, "report")), wait=10)
    fleet.op.after(mark, lambda e: e["ok"] and e["details"].get("action") == "report", device=device)


def test_a_signed_rollback_cannot_be_undone_without_the_key(fleet: Fleet, attacker: Operator, tmp_path: Path) -> None:
    a = fleet.start(_agent(fleet))
    _commit(fleet, tmp_path, 1)
    v2_bundle = build_bundle(tmp_path / "v2", "dense_f32_v2", version=2, key=fleet.key)
    mark = fleet.op.mark()
    v2 = fleet.op.push(v2_bundle)
    fleet.op.after(mark, lambda e: e["step"] == "COMMITTED" and e.get("version") == 2)
    mark = fleet.op.mark()
    fleet.op.transport.publish(T.cmd("dev-1"), canonical_json(make_command(fleet.key, "dev-1", "rollback", "m")),
                               wait=10)
    fleet.op.after(mark, lambda e: e["step"] == "ROLLED_BACK")
    assert _served(a) == 1 and _model(a)["floor"] == 2
    state_before = a.state_file()

    # the bundle's own signed manifest (another deployment id, no target), re-posted on the device's topic
    mark = fleet.op.mark()
    attacker.document((v2_bundle / MANIFEST_FILE).read_bytes(), device="dev-1")
    _refusal(fleet, mark, "names no target")
    # the genuine pushed document, byte for byte, replayed there and on the group's topic
    mark = fleet.op.mark()
    attacker.document(v2.document, device="dev-1")
    _refusal(fleet, mark, "version floor 2")
    mark = fleet.op.mark()
    attacker.document(v2.document, group="lab")
    _refusal(fleet, mark, "is for device:dev-1 but was published for group:lab")
    # 300 unsigned documents with fresh ids: there is no list of ids to flush out any more
    base = parse_json(v2.document)
    for i in range(300):
        forged = {k: v for k, v in base.items() if k not in ("signature", "key_id")} | {"deployment_id": f"junk-{i}"}
        attacker.document(canonical_json(forged), device="dev-1")
    attacker.document(v2.document, device="dev-1")
    _report(fleet)
    assert _served(a) == 1
    assert a.stop() == 0
    fleet.start(a)  # every document above is retained: delivered again at subscribe
    _report(fleet)
    assert _served(a) == 1
    after = a.state_file()["models"]["m"]
    assert after["phase"] == "ROLLED_BACK" and after["active"]["deployment"]["model"]["version"] == 1
    assert after["last_outcome"] == state_before["models"]["m"]["last_outcome"]

    # the operator lifts the floor on purpose: a newer signed document that allows the downgrade
    mark = fleet.op.mark()
    # (issued a second on: a permission from the same second as the failed document would not lift it)
    fleet.op.push(v2_bundle, policy={"allow_downgrade": True}, now=int(time.time()) + 1)
    fleet.op.after(mark, lambda e: e["step"] == "COMMITTED" and e.get("version") == 2)
    assert _served(a) == 2


def test_a_forged_copy_does_not_blacklist_the_genuine_document(fleet: Fleet, attacker: Operator,
                                                                 tmp_path: Path) -> None:
    a = fleet.start(_agent(fleet))
    _commit(fleet, tmp_path, 1)
    genuine = fleet.op.prepare(build_bundle(tmp_path / "v2", "dense_f32_v2", version=2))
    fleet.op.chunks(genuine.chunks)
    doc = parse_json(genuine.document)
    badly_signed = {**doc, "signature": attacker.key.sign(doc)["signature"]}  # same id, wrong signature
    mark = fleet.op.mark()
    attacker.document(canonical_json(badly_signed), device="dev-1")
    _refusal(fleet, mark, "signature")
    assert a.stop() == 0
    fleet.start(a)  # and after a restart, with the forgery still retained
    assert _served(a) == 1
    mark = fleet.op.mark()
    fleet.op.document(genuine.document, device="dev-1")
    fleet.op.after(mark, lambda e: e["step"] == "COMMITTED" and e.get("version") == 2)
    assert _served(a) == 2


def test_a_truncated_local_copy_does_not_block_the_intact_bundle(fleet: Fleet, tmp_path: Path) -> None:
    a = fleet.start(_agent(fleet))
    _commit(fleet, tmp_path, 1)
    intact = build_bundle(tmp_path / "v2", "dense_f32_v2", version=2, key=fleet.key)
    truncated = tmp_path / "v2-truncated"
    truncated.mkdir()
    for f in intact.iterdir():
        data = f.read_bytes()
        (truncated / f.name).write_bytes(data[: len(data) // 2] if f.name == MODEL_FILE else data)
    bad = a.cli("install", str(truncated))
    assert bad.returncode != 0 and "the manifest says" in bad.stdout + bad.stderr
    assert _served(a) == 1 and _model(a)["floor"] == -1
    good = a.cli("install", str(intact))
    assert good.returncode == 0, good.stdout + good.stderr
    assert _served(a) == 2


def test_unauthenticated_input_changes_no_saved_state(fleet: Fleet, attacker: Operator, tmp_path: Path) -> None:
    a = fleet.start(_agent(fleet, telemetry={"interval_s": 1}))
    _commit(fleet, tmp_path, 1)
    before = a.state_file()
    size = (a.state_dir / "state.json").stat().st_size
    mark = fleet.op.mark()
    malformed = [b"{", b"[]", b'{"model": 1}', b"\xff\xfe", b'{"a": "\\ud800"}', json.dumps({"x": "y" * 1000}).encode()]
    for payload in malformed:
        attacker.document(payload, device="dev-1")
    unsigned = parse_json(fleet.op.prepare(build_bundle(tmp_path / "u", "dense_f32_v2", version=9)).document)
    unsigned = {k: v for k, v in unsigned.items() if k not in ("signature", "key_id")}
    for i in range(1000):  # fresh model names: none may get a record
        name = f"n{i}"
        doc = {**unsigned, "model": {**unsigned["model"], "name": name}, "target": "device:dev-1"}
        attacker.transport.publish(T.device_model("dev-1", name), canonical_json(doc), retain=True)
    attacker.transport.publish(T.device_model("dev-1", "last"), b"{", retain=True, wait=30)
    _report(fleet)
    after = a.state_file()
    assert after["models"].keys() == {"m"}
    assert after["models"]["m"] == before["models"]["m"]  # phase, last outcome, floor: untouched
    assert {k: v for k, v in after.items() if k != "commands"} == {k: v for k, v in before.items() if k != "commands"}
    assert (a.state_dir / "state.json").stat().st_size < size + 100  # the signed report command's id, nothing else
    refusals = [e for e in fleet.op.since(mark) if not e["ok"]]
    assert 0 < len(refusals) <= 20, len(refusals)  # rate-limited: a flood costs the fleet a few events
    assert any("surrogate" in (e.get("reason") or "") for e in refusals[:6])
    fleet.op.transport.subscribe(T.telemetry("dev-1"), wait=10)
    mark = fleet.op.mark()
    telemetry = fleet.op.received(mark, T.telemetry("dev-1"), timeout=10)
    assert [m["name"] for m in telemetry["models"]] == ["m"]
    assert _served(a) == 1 and a.proc is not None and a.proc.poll() is None


def test_model_names_are_capped_for_signed_documents_too(fleet: Fleet, tmp_path: Path) -> None:
    a = fleet.start(_agent(fleet, store={"max_models": 2}))
    for name in ("m", "k"):
        mark = fleet.op.mark()
        fleet.op.push(build_bundle(tmp_path / name, "dense_f32", name=name, version=1))
        fleet.op.after(mark, lambda e, n=name: e["step"] == "COMMITTED" and e["model"] == n)
    mark = fleet.op.mark()
    fleet.op.push(build_bundle(tmp_path / "third", "dense_f32", name="third", version=1))
    _refusal(fleet, mark, "store.max_models")
    assert set(a.state_file()["models"]) == {"m", "k"}


def test_an_empty_payload_withdraws_nothing_but_a_signed_withdrawal_does(fleet: Fleet, attacker: Operator,
                                                                         tmp_path: Path) -> None:
    a = fleet.start(_agent(fleet))
    _commit(fleet, tmp_path, 1)
    bundle = build_bundle(tmp_path / "cnn", "cnn_v1", version=2, chunk_size=16384)
    mark = fleet.op.mark()
    prepared = fleet.op.push(bundle, withhold=3)  # the download waits for the last chunks
    fleet.op.after(mark, lambda e: e["step"] == "DOWNLOADING" and e["ok"])
    attacker.clear(T.device_model("dev-1", "m"))
    _report(fleet)
    assert _model(a)["phase"] == "DOWNLOADING"
    fleet.op.chunks(prepared.chunks)  # the rest arrives: the download was never stopped
    fleet.op.after(mark, lambda e: e["step"] == "COMMITTED" and e.get("version") == 2)

    mark = fleet.op.mark()
    v3 = fleet.op.push(build_bundle(tmp_path / "cnn3", "cnn_v2", version=3, chunk_size=16384), withhold=3)
    fleet.op.after(mark, lambda e: e["step"] == "DOWNLOADING" and e["ok"])
    issued = int(time.time()) + 1
    withdrawal = {"schema": "edgefleet.withdrawal/1", "model": "m", "target": "device:dev-1",
                  "issued_at": issued, "expires_at": issued + 300}
    attacker.document(canonical_json(attacker.key.sign(withdrawal)), device="dev-1")  # an untrusted key
    _refusal(fleet, mark, "withdrawal refused")
    fleet.op.document(canonical_json(fleet.key.sign(withdrawal)), device="dev-1")
    event = fleet.op.after(mark, lambda e: e["step"] == "DOWNLOADING" and not e["ok"])
    assert "withdrawn" in event["reason"]
    mark = fleet.op.mark()
    attacker.document(v3.document, device="dev-1")  # the withdrawn document, re-posted without the key
    _refusal(fleet, mark, "was withdrawn by a signed withdrawal")
    fleet.op.chunks(v3.chunks)
    _report(fleet)
    assert _active(a) == 2 and _model(a)["phase"] == "COMMITTED"


def test_a_withheld_chunk_fails_the_download_and_it_resumes_later(fleet: Fleet, tmp_path: Path) -> None:
    a = fleet.start(_agent(fleet, prelude="import edgefleet.agent.fleet.link as l; l.RETRY_INTERVAL_S = 2.0",
                           security={"download_stall_s": 2}))
    _commit(fleet, tmp_path, 1)
    mark = fleet.op.mark()
    prepared = fleet.op.push(build_bundle(tmp_path / "cnn", "cnn_v1", version=2, chunk_size=16384), withhold=2)
    event = fleet.op.after(mark, lambda e: e["step"] == "REJECTED" and "download stalled" in (e.get("reason") or ""))
    assert event["details"]["failed_step"] == "DOWNLOADING" and event["details"]["chunks_missing"] == 2
    assert _model(a)["floor"] == -1  # says nothing about the model: it may still come
    fleet.op.chunks(prepared.chunks)
    done = fleet.op.after(mark, lambda e: e["step"] == "DOWNLOADING" and e["ok"] and e["details"].get("done"))
    assert done["details"]["chunks_resumed"] > 0  # what had arrived was kept
    fleet.op.after(mark, lambda e: e["step"] == "COMMITTED" and e.get("version") == 2)
    assert _active(a) == 2


def test_group_documents_are_ranked_by_signed_fields_only(fleet: Fleet, attacker: Operator, tmp_path: Path) -> None:
    a = fleet.start(_agent(fleet, groups=("lab", "line-2")))
    genuine = fleet.op.prepare(build_bundle(tmp_path / "v1", "dense_f32", version=1), group="line-2")
    fleet.op.chunks(genuine.chunks)
    fake = parse_json(genuine.document)
    fake = {k: v for k, v in fake.items() if k not in ("signature", "key_id")}
    fake = {**fake, "model": {**fake["model"], "version": 999}, "deployment_id": "fake-999", "target": "group:lab",
            "issued_at": fake["issued_at"] + 10}
    attacker.document(canonical_json(fake), group="lab")
    mark = fleet.op.mark()
    fleet.op.document(genuine.document, group="line-2")
    fleet.op.after(mark, lambda e: e["step"] == "COMMITTED" and e.get("version") == 1)
    assert _served(a) == 1


def test_the_channel_heartbeat_tells_a_frozen_channel_from_a_quiet_one(fleet: Fleet, attacker: Operator,
                                                                       tmp_path: Path) -> None:
    a = fleet.start(_agent(fleet))
    _commit(fleet, tmp_path, 1)
    assert "channel" not in a.state_file()  # nothing known yet

    def publish(key: SigningKey, issued: int, lifetime: int) -> None:
        doc = {"schema": "edgefleet.timestamp/1", "issued_at": issued, "expires_at": issued + lifetime}
        fleet.op.transport.publish(T.timestamp(), canonical_json(key.sign(doc)), retain=True, wait=10)

    now = int(time.time())
    publish(fleet.key, now, 3)
    mark = fleet.op.mark()
    state = fleet.op.received(mark, T.state("dev-1"), lambda d: "channel" in d, timeout=20)
    assert state["channel"]["fresh"] is True and state["channel"]["issued_at"] == now
    assert "edgefleet_channel_fresh{" in a.client.metrics() and _metric(a, "edgefleet_channel_fresh") == 1
    publish(attacker.key, now + 100, 3600)  # a forged heartbeat is ignored
    publish(fleet.key, now - 100, 3600)  # and so is an older genuine one, replayed
    time.sleep(max(0.0, now + 3.5 - time.time()))  # the genuine heartbeat expires: nobody re-issues it
    mark = fleet.op.mark()
    _report(fleet)
    state = fleet.op.received(mark, T.state("dev-1"), lambda d: "channel" in d, timeout=20)
    assert state["channel"]["issued_at"] == now and state["channel"]["fresh"] is False
    assert _metric(a, "edgefleet_channel_fresh") == 0


def _metric(a: AgentWith, name: str) -> float:
    """The value of a one-sample gauge in the agent's /metrics."""
    for line in a.client.metrics().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_an_older_genuine_document_cannot_replace_a_newer_one(fleet: Fleet, attacker: Operator,
                                                              tmp_path: Path) -> None:
    a = fleet.start(_agent(fleet))
    mark = fleet.op.mark()
    fleet.op.push(build_bundle(tmp_path / "v1", "cnn_v1", version=1, chunk_size=16384))
    fleet.op.after(mark, lambda e: e["step"] == "COMMITTED" and e.get("version") == 1)
    older = fleet.op.prepare(build_bundle(tmp_path / "v2", "cnn_v2", version=2, chunk_size=16384),
                             now=int(time.time()) - 60)  # genuine, unexpired, issued a minute ago
    fleet.op.chunks(older.chunks)
    mark = fleet.op.mark()
    newer = fleet.op.push(build_bundle(tmp_path / "v3", "cnn_v1", version=3, chunk_size=8192), withhold=2)
    fleet.op.after(mark, lambda e: e["step"] == "DOWNLOADING" and e["ok"] and e.get("version") == 3)
    mark = fleet.op.mark()
    attacker.document(older.document, device="dev-1")  # replayed by someone without the key
    _refusal(fleet, mark, "is older than the newest device:dev-1 document")
    assert _model(a)["phase"] == "DOWNLOADING"  # the newer download goes on
    fleet.op.chunks(newer.chunks)
    fleet.op.after(mark, lambda e: e["step"] == "COMMITTED" and e.get("version") == 3)
    assert a.stop() == 0
    fleet.start(a)  # the retained topic now holds the older document: still refused after a restart
    _report(fleet)
    assert _active(a) == 3 and _model(a)["phase"] == "COMMITTED"
