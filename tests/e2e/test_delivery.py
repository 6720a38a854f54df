"""Model delivery over a real Mosquitto: push, offline catch-up, resume, delta, overrides, refusals, commands."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edgefleet.bundle import GOLDEN_FILE, Bundle, dump_golden, load_golden
from edgefleet.converter.fleet.publish import (
    make_command,
    make_withdrawal,
    prepare,
    publish_chunks,
    publish_document,
)
from edgefleet.protocol import SigningKey, Topics, canonical_json, parse_json
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.broker import Inbox, Mosquitto
from edgefleet.testing.waiting import wait_for
from edgefleet.transport import Message, MqttSettings, Transport
from tests.support import ROOT
from tests.support.helpers import swap_file

X = [[0.5, -1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.1]]
T = Topics()


class Host:
    """The operator side in a test: a transport, the signing key, and every device event seen."""

    def __init__(self, broker: Mosquitto, key: SigningKey):
        self.key = key
        self.broker = broker
        self.inbox = Inbox()
        self.transport = Transport(MqttSettings(url=broker.url, client_id=f"host-{time.monotonic_ns()}"),
                                   on_message=self.inbox)
        self.transport.subscribe([T.all_devices("events"), T.all_devices("state")])
        self.transport.start()
        assert self.transport.wait_connected(10), self.transport.last_error

    def push(self, bundle: Path, *, group: str | None = None, device: str | None = None,
             withhold: int = 0, key: SigningKey | None = None) -> Any:
        """Publish the bundle's chunks (all but the last `withhold`) and its freshly signed document."""
        prepared = prepare(Bundle.load(bundle), key=key or self.key,
                           target=f"group:{group}" if group else f"device:{device or 'dev-1'}")
        items = list(prepared.chunks.items())
        publish_chunks(self.transport, T, dict(items[: len(items) - withhold]))
        target = T.group_model(group, prepared.deployment.model.name) if group else \
            T.device_model(device or "dev-1", prepared.deployment.model.name)
        publish_document(self.transport, [target], prepared.document)
        return SimpleNamespace(deployment=prepared.deployment, withheld=dict(items[len(items) - withhold:]))

    def event(self, device: str, step: str, version: int | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """The first event of `device` at `step` (for `version`)."""
        def match(m: Message) -> bool:
            if m.topic != T.events(device):
                return False
            e = parse_json(m.payload)
            return bool(e["step"] == step and (version is None or e.get("version") == version))
        return parse_json(self.inbox.wait_for(match, timeout).payload)  # type: ignore[no-any-return]

    def wait_event_where(self, pred: Any, device: str = "dev-1", timeout: float = 30.0) -> dict[str, Any]:
        """The first event of `device` for which `pred` holds."""
        def match(m: Message) -> bool:
            return m.topic == T.events(device) and bool(pred(parse_json(m.payload)))
        return parse_json(self.inbox.wait_for(match, timeout).payload)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.transport.stop()


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    k = SigningKey.generate()
    k.write(tmp_path / "keys")
    return k


@pytest.fixture
def host(broker: Mosquitto, key: SigningKey) -> Any:
    h = Host(broker, key)
    yield h
    h.close()


@pytest.fixture
def agents(tmp_path: Path, broker: Mosquitto, key: SigningKey) -> Any:
    made: list[AgentProcess] = []

    def make(device_id: str = "dev-1", groups: tuple[str, ...] = ("lab",), **sections: Any) -> AgentProcess:
        config: dict[str, Any] = {"mqtt": {"url": broker.url, "reconnect_max_s": 1.0},
                                  "security": {"trusted_keys": [str(tmp_path / "keys" / "edgefleet.pub")]}}
        for name, values in sections.items():
            config.setdefault(name, {}).update(values)
        a = AgentProcess(tmp_path / device_id, device_id=device_id, groups=list(groups), **config)
        made.append(a)
        return a

    yield make
    for a in made:
        a.kill()


def _version(a: AgentProcess) -> int:
    return int(a.client.predict("m", X)["edgefleet"]["model_version"])


def edgectl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet.converter.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def test_push_wait_to_a_group_then_a_rejected_model_fails_the_wait(
        broker: Mosquitto, agents: Any, make_bundle: Any, tmp_path: Path) -> None:
    a = agents().start()
    listed = edgectl("inventory", "set", "lab", "dev-1", "--key", str(tmp_path / "keys"), "--broker", broker.url)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    ok = edgectl("push", str(make_bundle("dense_f32", version=1)), "--group", "lab", "--key", str(tmp_path / "keys"),
                 "--broker", broker.url, "--wait", "--timeout", "60")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert _version(a) == 1
    bad = make_bundle("dense_f32_v2", version=2)
    ins, outs = load_golden((bad / GOLDEN_FILE).read_bytes(), 1, 1)
    swap_file(bad, GOLDEN_FILE, dump_golden(ins, [outs[0] + 0.3]))
    res = edgectl("push", str(bad), "--group", "lab", "--key", str(tmp_path / "keys"), "--broker", broker.url,
                  "--wait", "--timeout", "60")
    assert res.returncode == 1
    assert "dev-1" in res.stdout + res.stderr and "golden sample 0: output 0 differs" in res.stdout + res.stderr
    assert _version(a) == 1


def test_offline_device_catches_up_from_retained_messages(host: Host, agents: Any, make_bundle: Any) -> None:
    host.push(make_bundle("dense_f32", version=1), group="lab")
    a = agents()  # not running during the push
    a.start()
    host.event("dev-1", "PROBATION", 1)
    assert _version(a) == 1
    state = wait_for(lambda: a.status()["state"]["models"]["m"], what="state")
    assert state["active"]["version"] == 1
    status = a.cli("status")
    assert "broker mqtt://" in status.stdout and ": connected" in status.stdout


def test_device_document_overrides_the_group(host: Host, agents: Any, make_bundle: Any) -> None:
    one, two = agents("dev-1").start(), agents("dev-2").start()
    host.push(make_bundle("dense_f32", version=1), group="lab")
    host.event("dev-1", "PROBATION", 1)
    host.event("dev-2", "PROBATION", 1)
    host.push(make_bundle("dense_f32_v2", version=2), device="dev-1")
    host.event("dev-1", "PROBATION", 2)
    assert _version(one) == 2 and _version(two) == 1
    # a newer group document does not displace dev-1's own
    host.push(make_bundle("dense_f32", version=3), group="lab")
    host.event("dev-2", "PROBATION", 3)
    assert _version(two) == 3 and _version(one) == 2


def test_broker_restarted_mid_download(host: Host, broker: Mosquitto, agents: Any, make_bundle: Any) -> None:
    a = agents(mqtt={"url": broker.url, "reconnect_min_s": 0.2, "reconnect_max_s": 0.5}).start()
    prepared = host.push(make_bundle("cnn_v1", version=1, chunk_size=16384), group="lab", withhold=20)
    host.event("dev-1", "DOWNLOADING", 1)
    wait_for(lambda: len(list((a.state_dir / "partial").iterdir())) > 0, what="first chunks on disk")
    host.close()
    broker.restart()  # retained documents and chunks persist; connections drop
    again = Host(broker, host.key)
    try:
        publish_chunks(again.transport, T, prepared.withheld)
        again.event("dev-1", "PROBATION", 1, timeout=60)
    finally:
        again.close()
    assert a.client.model_status("m")["model_version_status"][0]["version"] == "1"


def test_killed_mid_download_resumes_without_fetching_again(host: Host, agents: Any, make_bundle: Any) -> None:
    a = agents().start()
    prepared = host.push(make_bundle("cnn_v1", version=1, chunk_size=16384), group="lab", withhold=10)
    total = len(prepared.deployment.model.artifact.chunks) + len(prepared.deployment.model.golden.chunks)
    wait_for(lambda: (a.client.admin("status")["state"]["models"].get("m", {}).get("progress") or 0)
             >= (total - 10) / total - 1e-9, what="every published chunk on disk")
    a.kill()
    a.start()
    publish_chunks(host.transport, T, prepared.withheld)
    done = host.event("dev-1", "DOWNLOADING", 1, timeout=60)
    while not done["details"].get("done"):
        done = host.event("dev-1", "DOWNLOADING", 1, timeout=60)
        host.inbox.seen.remove(next(m for m in host.inbox.seen if parse_json(m.payload) == done))
    assert done["details"]["chunks_fetched"] == 10
    assert done["details"]["chunks_resumed"] == done["details"]["chunks_total"] - 10
    host.event("dev-1", "PROBATION", 1)


def test_last_layer_fine_tune_downloads_a_small_delta(host: Host, agents: Any, make_bundle: Any) -> None:
    agents().start()
    host.push(make_bundle("cnn_v1", version=1), group="lab")
    host.event("dev-1", "PROBATION", 1)
    host.push(make_bundle("cnn_v2", version=2), group="lab")
    host.event("dev-1", "PROBATION", 2)
    done = [parse_json(m.payload) for m in host.inbox.seen if m.topic == T.events("dev-1")]
    v2 = next(e for e in done if e["step"] == "DOWNLOADING" and e["version"] == 2 and e["details"].get("done"))
    fraction = v2["details"]["fetched_bytes"] / v2["details"]["artifact_bytes"]
    assert v2["details"]["local_bytes"] > 0
    assert fraction <= 0.25, v2["details"]


def test_tampered_chunk_is_rejected_with_no_change(host: Host, agents: Any, make_bundle: Any) -> None:
    a = agents().start()
    host.push(make_bundle("dense_f32", version=1), group="lab")
    host.event("dev-1", "PROBATION", 1)
    prepared = prepare(Bundle.load(make_bundle("dense_f32_v2", version=2)), key=host.key, target="group:lab")
    chunks = dict(prepared.chunks)
    sha = next(iter(chunks))
    chunks[sha] = bytes([chunks[sha][0] ^ 1]) + chunks[sha][1:]
    publish_chunks(host.transport, T, chunks)
    publish_document(host.transport, [T.group_model("lab", "m")], prepared.document)
    rejected = host.event("dev-1", "REJECTED", 2)
    assert "chunk" in rejected["reason"] and rejected["details"]["failed_step"] == "DOWNLOADING"
    assert _version(a) == 1


@pytest.mark.parametrize("kind, reason", [
    ("unsigned", "signature: document is not signed"),
    ("forged", "signature: signed with unknown key"),
    ("expired", "document expired"),
    ("downgrade", "not above the active version 5"),
])
def test_bad_documents_are_rejected_with_no_change(
        host: Host, agents: Any, make_bundle: Any, kind: str, reason: str) -> None:
    a = agents().start()
    host.push(make_bundle("dense_f32", version=5), group="lab")
    host.event("dev-1", "PROBATION", 5)
    prepared = prepare(Bundle.load(make_bundle("dense_f32_v2", version=6 if kind != "downgrade" else 4)),
                       key=host.key, target="group:lab")
    before = a.status()["state"]["models"]["m"]
    raw = parse_json(prepared.document)
    if kind == "unsigned":
        raw.pop("signature"), raw.pop("key_id")
    elif kind == "forged":
        raw = SigningKey.generate().sign(raw)
    elif kind == "expired":
        raw = host.key.sign({**raw, "issued_at": 1000, "expires_at": 2000})
    publish_chunks(host.transport, T, prepared.chunks)
    publish_document(host.transport, [T.group_model("lab", "m")], json.dumps(raw).encode())
    rejected = host.event("dev-1", "REJECTED")
    assert reason in rejected["reason"]
    assert _version(a) == 5
    # refused before anything started: reported, and nothing saved changed
    assert rejected["details"]["refused"] is True and a.status()["state"]["models"]["m"] == before


def test_signed_rollback_command_and_its_replay(
        host: Host, broker: Mosquitto, agents: Any, make_bundle: Any, tmp_path: Path) -> None:
    a = agents(health={"probation_s": 0.5, "min_requests": 1}).start()
    host.push(make_bundle("dense_f32", version=1), group="lab")
    host.event("dev-1", "COMMITTED", 1)
    host.push(make_bundle("dense_f32_v2", version=2), group="lab")
    host.event("dev-1", "COMMITTED", 2)
    res = edgectl("rollback", "--device", "dev-1", "--model", "m", "--key", str(tmp_path / "keys"),
                  "--broker", broker.url, "--wait")
    assert res.returncode == 0, res.stdout + res.stderr
    assert _version(a) == 1
    # a command applied once is refused when replayed; a forged one is refused outright
    command = make_command(host.key, "dev-1", "report")

    def command_event(reason_part: str | None) -> Any:
        def match(m: Message) -> bool:
            if m.topic != T.events("dev-1"):
                return False
            e = parse_json(m.payload)
            if e["details"].get("command_id") != command["command_id"] and reason_part != "unknown key":
                return False
            return reason_part in (e.get("reason") or "") if reason_part else bool(e["ok"])
        return parse_json(host.inbox.wait_for(match, 10).payload)

    host.transport.publish(T.cmd("dev-1"), json.dumps(command).encode(), wait=5)
    assert command_event(None)["ok"] is True
    host.transport.publish(T.cmd("dev-1"), json.dumps(command).encode(), wait=5)
    assert command_event("replay")["ok"] is False
    forged = make_command(SigningKey.generate(), "dev-1", "rollback", "m")
    host.transport.publish(T.cmd("dev-1"), json.dumps(forged).encode(), wait=5)
    assert "signed with unknown key" in command_event("unknown key")["reason"]
    assert _version(a) == 1


def test_withdrawn_document_stops_its_download(host: Host, agents: Any, make_bundle: Any) -> None:
    a = agents().start()
    host.push(make_bundle("dense_f32", version=1), group="lab")
    host.event("dev-1", "PROBATION", 1)
    pushed = host.push(make_bundle("cnn_v1", name="m", version=2, chunk_size=16384), device="dev-1", withhold=5)
    host.event("dev-1", "DOWNLOADING", 2)
    host.transport.publish(T.device_model("dev-1", "m"), b"", retain=True, wait=5)  # a cleared document: no effect
    host.transport.publish(T.device_model("dev-1", "m"), canonical_json(make_withdrawal(host.key, "m", "device:dev-1")),
                           retain=True, wait=5)  # the operator withdraws it
    stopped = host.wait_event_where(lambda e: e["step"] == "DOWNLOADING" and e.get("version") == 2 and not e["ok"])
    assert "withdrawn" in stopped["reason"]
    publish_chunks(host.transport, T, pushed.withheld)  # the rest arrives anyway: nothing is installed
    time.sleep(1.0)
    assert _version(a) == 1
    assert a.status()["state"]["models"]["m"]["active"]["version"] == 1


def test_push_carries_a_signed_policy(broker: Mosquitto, agents: Any, make_bundle: Any, tmp_path: Path) -> None:
    a = agents().start()
    ok = edgectl("push", str(make_bundle("dense_f32", version=5)), "--device", "dev-1", "--key",
                 str(tmp_path / "keys"), "--broker", broker.url, "--wait", "--timeout", "60")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    res = edgectl("push", str(make_bundle("dense_f32_v2", version=4)), "--device", "dev-1", "--key",
                  str(tmp_path / "keys"), "--broker", broker.url, "--allow-downgrade", "--probation", "1",
                  "--max-error-rate", "0.01", "--wait", "--timeout", "60")
    assert res.returncode == 0, res.stdout + res.stderr
    assert _version(a) == 4  # a signed downgrade
    bad = edgectl("push", str(make_bundle("dense_f32", version=6)), "--device", "dev-1", "--key",
                  str(tmp_path / "keys"), "--broker", broker.url, "--max-error-rate", "3")
    assert bad.returncode == 2 and "policy: max_error_rate: expected a value between 0 and 1" in bad.stderr
    unsigned = edgectl("push", str(make_bundle("dense_f32", version=7)), "--device", "dev-1", "--broker", broker.url,
                       "--allow-unsigned", "--probation", "5")
    assert unsigned.returncode == 2 and "policy options need --key" in unsigned.stderr
