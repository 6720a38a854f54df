"""What is deployed where (converter/fleet/deployments.py): the agent's document rule, pinned devices,
withdrawable documents, history merging and the bytes a device would fetch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefleet.converter.fleet.deployments import (
    Snapshot,
    device_rows,
    dry_run,
    fetch_cost,
    from_collector,
    from_states,
    read_document,
    select,
    show,
    withdrawable,
)
from edgefleet.converter.fleet.observer import DeviceView
from edgefleet.errors import UsageError
from edgefleet.protocol import (
    DEPLOYMENT_SCHEMA,
    Deployment,
    DeviceState,
    ModelSpec,
    ModelState,
    Status,
    TensorSpec,
    Topics,
    canonical_json,
    split,
)
from edgefleet.protocol.documents import Outcome, Slot
from edgefleet.protocol.phases import Phase

T = Topics()
CHUNK = 1024
SPEC = TensorSpec(name="x", dtype="float32", shape=(1, 8))


def blob(seed: int, size: int = 4 * CHUNK) -> bytes:
    return bytes((seed * 31 + i * 7) % 251 for i in range(size))


def deployment(version: int, model: bytes, golden: bytes, target: str, issued: int = 1000) -> Deployment:
    artifact, _ = split(model, CHUNK, compress=False)
    gold, _ = split(golden, CHUNK, compress=False)
    return Deployment(schema=DEPLOYMENT_SCHEMA, deployment_id=f"m-v{version}-{target.replace(':', '-')}",
                      issued_at=issued, expires_at=4_000_000_000, target=target,
                      model=ModelSpec(name="m", version=version, artifact=artifact, golden=gold, inputs=(SPEC,),
                                      outputs=(SPEC,)))


def topic(target: str) -> str:
    kind, _, name = target.partition(":")
    return T.group_model(name, "m") if kind == "group" else T.device_model(name, "m")


def doc(dep: Deployment) -> object:
    assert dep.target is not None
    found = read_document(T, topic(dep.target), canonical_json(dep.to_dict()))
    assert found is not None
    return found


def device(name: str, dep: Deployment | None, phase: Phase = Phase.COMMITTED, outcome: Outcome | None = None,
           groups: tuple[str, ...] = ("lab",)) -> DeviceView:
    active = Slot(version=dep.model.version, deployment_id=dep.deployment_id, sha256=dep.model.artifact.sha256) \
        if dep is not None else None
    state = DeviceState(device_id=name, ts=1.0, agent_version="1",
                        models={"m": ModelState(phase=phase, active=active, last_outcome=outcome)})
    return DeviceView(name, status=Status(status="online", device_id=name, agent_version="1", groups=groups),
                      state=state)


V1 = deployment(1, blob(1), blob(100), "group:lab", issued=1000)
V2_DEV = deployment(2, blob(2), blob(200), "device:cam-1", issued=2000)
V3 = deployment(3, blob(1)[:2 * CHUNK] + blob(3)[:2 * CHUNK], blob(300), "group:lab", issued=3000)


def snapshot() -> Snapshot:
    rejected = Outcome(deployment_id=V2_DEV.deployment_id, version=2, result="rejected", reason="golden mismatch")
    return Snapshot(documents=(doc(V3), doc(V2_DEV)),  # type: ignore[arg-type]
                    devices={"cam-1": device("cam-1", V1, Phase.REJECTED, rejected), "cam-2": device("cam-2", V3)})


def test_a_device_document_wins_over_the_group_and_pins_the_device() -> None:
    rows = {r.device_id: r for r in device_rows(snapshot(), "m")}
    assert rows["cam-1"].pinned and rows["cam-1"].follows is not None and rows["cam-1"].follows.target == "device:cam-1"
    assert rows["cam-1"].version == 1 and rows["cam-1"].runs_wanted is False
    assert not rows["cam-2"].pinned and rows["cam-2"].runs_wanted is True
    # the inventory decides the groups when given: cam-2 outside every group follows nothing
    rows = {r.device_id: r for r in device_rows(snapshot(), "m", {"lab": ("cam-1",)})}
    assert rows["cam-2"].follows is None and rows["cam-1"].pinned


def test_the_highest_group_version_wins_and_expired_documents_order_nothing() -> None:
    old = deployment(5, blob(5), blob(500), "group:old", issued=500)
    late = deployment(4, blob(4), blob(400), "group:lab", issued=9000)
    snap = Snapshot(documents=(doc(old), doc(late)), devices={}, taken_at=1.0)  # type: ignore[arg-type]
    chosen = snap.effective("cam-9", "m", ("lab", "old"))
    assert chosen is not None and chosen.target == "group:old"
    snap = Snapshot(documents=snap.documents, devices={}, taken_at=5_000_000_000.0)
    assert snap.effective("cam-9", "m", ("lab", "old")) is None


def test_show_names_each_device_phase_of_a_deployment() -> None:
    shown = show(snapshot(), V2_DEV.deployment_id)
    assert [d["target"] for d in shown["documents"]] == ["device:cam-1"]
    assert shown["documents"][0]["chunks"] == 8 and shown["documents"][0]["raw_bytes"] == 8 * CHUNK
    assert {d["device_id"]: d["phase_of_deployment"] for d in shown["devices"]} == \
        {"cam-1": "REJECTED: golden mismatch"}
    with pytest.raises(UsageError, match="neither a deployment id nor a model"):
        show(snapshot(), "nothing-here")


def test_only_an_existing_document_can_be_withdrawn() -> None:
    snap = snapshot()
    assert [d.target for d in withdrawable(snap, "m", ["device:cam-1"])] == ["device:cam-1"]
    with pytest.raises(UsageError, match="the m document for device:cam-2 does not exist; nothing was published"):
        withdrawable(snap, "m", ["device:cam-2"])


def test_a_device_fetches_only_the_chunks_no_blob_it_holds_contains() -> None:
    held = {V1.model.artifact.sha256, V1.model.golden.sha256}
    described = {a.sha256: a for a in (V1.model.artifact, V1.model.golden)}
    cost = fetch_cost(V3, held, described)
    assert (cost.chunks, cost.wire_bytes, cost.exact) == (2 + 4, 6 * CHUNK, True)  # 2 new model chunks, 4 golden
    assert fetch_cost(V1, held, described).wire_bytes == 0  # it holds both blobs
    unknown = fetch_cost(V3, {"f" * 64}, described)
    assert unknown.wire_bytes == V3.model.artifact.size + V3.model.golden.size and not unknown.exact


def test_dry_run_says_who_is_pinned_and_who_installs() -> None:
    snap = Snapshot(documents=(doc(V1), doc(V2_DEV)), devices={"cam-1": device("cam-1", V1),  # type: ignore[arg-type]
                                                             "cam-2": device("cam-2", V1)})
    plan = dry_run(snap, V3, {topic("group:lab"): b"{}"}, ["cam-1", "cam-2", "cam-3"])
    rows = {r["device_id"]: r for r in plan["devices"]}
    assert rows["cam-1"]["effect"].startswith("pinned by its own document (v2)") and rows["cam-1"]["fetch_wire_bytes"] == 0
    assert rows["cam-2"]["effect"] == "installs v3" and rows["cam-2"]["fetch_wire_bytes"] == 6 * CHUNK
    assert rows["cam-3"]["seen"] is False and rows["cam-3"]["fetch_wire_bytes"] == 8 * CHUNK


def test_history_merges_collector_events_and_state_outcomes_once(tmp_path: Path) -> None:
    event = {"ts": 10.0, "device_id": "cam-1", "model": "m", "step": "REJECTED", "ok": False,
             "deployment_id": V2_DEV.deployment_id, "version": 2, "reason": "golden mismatch"}
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({"doc": event, "kind": "events", "received": 10.1, "topic": T.events("cam-1")}) + "\n"
                    + json.dumps({"doc": {"x": 1}, "kind": "telemetry"}) + "\n" + "not json\n")
    entries, bad = from_collector(path)
    assert bad == 1 and [(h.event.device_id, h.event.step, h.source) for h in entries] == \
        [("cam-1", Phase.REJECTED, "collector")]
    merged = select([*entries, *from_states(snapshot().devices)], device="cam-1")
    assert [(h.event.step, h.source) for h in merged] == [(Phase.REJECTED, "collector")]  # the state repeats it
    assert [h.source for h in select(from_states(snapshot().devices), device="cam-1")] == ["state"]
    with pytest.raises(UsageError, match="--from"):
        from_collector(tmp_path / "missing.jsonl")
