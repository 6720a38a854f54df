"""edgectl push / rollback / gc on a real broker, read back with plain paho and the wire contract."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.bundle import Bundle
from edgefleet.converter.fleet.publish import split_parallel
from edgefleet.errors import ExitCode
from edgefleet.protocol import (
    Command,
    Deployment,
    Keyring,
    SigningKey,
    Topics,
    decode_chunk,
    encode_chunk,
    join,
    split,
)
from edgefleet.testing.broker import Inbox, Mosquitto, client
from tests.support.fake_device import FakeDevice

T = Topics("edgefleet")


def retained(url: str, topics: list[str], settle: float = 0.5) -> dict[str, bytes]:
    """Every retained message on `topics`, read with plain paho (no edgefleet code)."""
    got: dict[str, bytes] = {}
    lock = threading.Lock()
    host, port = url.split("//")[1].split(":")

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        if m.retain:
            with lock:
                got[m.topic] = m.payload

    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = on_message
    c.connect(host, int(port))
    c.subscribe([(t, 1) for t in topics])
    c.loop_start()
    threading.Event().wait(settle)
    c.disconnect()
    c.loop_stop()
    return got


def test_push_publishes_chunks_and_a_document_that_reassemble(broker: Mosquitto, make_bundle: Callable[..., Path],
                                                             key: SigningKey, edgectl: Callable[..., tuple[int, str, str]]
                                                             ) -> None:
    path = make_bundle("dense_f32", name="m", version=1, key=key, target="device:dev-1")
    bundle = Bundle.load(path)
    code, out, err = edgectl("push", path, "--device", "dev-1", "--broker", broker.url, "--json")
    assert code == 0, err
    report = json.loads(out)
    got = retained(broker.url, ["edgefleet/#"])
    doc_payload = got[T.device_model("dev-1", "m")]
    # Published as it is: the bundle's own signed manifest, verifiable with the operator's public key.
    Keyring([key.private_key.public_key()]).verify(json.loads(doc_payload))
    dep = Deployment.from_json(doc_payload)
    assert dep.deployment_id == bundle.deployment.deployment_id == report["deployment_id"]
    assert dep.target == "device:dev-1"
    for art, data in ((dep.model.artifact, bundle.model), (dep.model.golden, bundle.golden)):
        raws = [decode_chunk(ref, got[T.chunk(ref.sha256)]) for ref in art.chunks]
        assert join(art, raws) == data
    chunk_topics = {t for t in got if t.startswith("edgefleet/chunks/")}
    assert report["chunks"] == len(chunk_topics)
    assert report["wire_bytes"] == sum(len(got[t]) for t in chunk_topics)
    assert report["publish_s"] > 0 and report["compress_s"] > 0
    assert set(got) == chunk_topics | {T.device_model("dev-1", "m")}


def test_push_with_key_issues_a_fresh_signed_document(broker: Mosquitto, make_bundle: Callable[..., Path],
                                                      key: SigningKey, key_dir: Path,
                                                      edgectl: Callable[..., tuple[int, str, str]]) -> None:
    path = make_bundle("dense_f32", name="m", version=3)  # unsigned bundle, signed at push time
    before = int(time.time())
    code, out, _ = edgectl("push", path, "--group", "lab", "--key", key_dir, "--expires-in", 3600,
                           "--broker", broker.url, "--json")
    assert code == 0
    doc = json.loads(retained(broker.url, [T.group_model("lab", "m")])[T.group_model("lab", "m")])
    Keyring([key.private_key.public_key()]).verify(doc)
    dep = Deployment.from_dict(doc)
    assert dep.deployment_id != Bundle.load(path).deployment.deployment_id
    assert dep.deployment_id == json.loads(out)["deployment_id"]
    assert before <= dep.issued_at <= int(time.time())
    assert dep.expires_at == dep.issued_at + 3600
    assert dep.model.artifact == Bundle.load(path).deployment.model.artifact
    assert dep.target == "group:lab"  # inside the signature checked above


def test_push_refuses_a_signed_manifest_for_another_target(broker: Mosquitto, make_bundle: Callable[..., Path],
                                                           key: SigningKey, key_dir: Path,
                                                           edgectl: Callable[..., tuple[int, str, str]]) -> None:
    untargeted = make_bundle("dense_f32", name="m", version=1, key=key)
    for_dev1 = make_bundle("dense_f32", name="m", version=1, key=key, target="device:dev-1")
    cases = [
        (untargeted, ["--device", "dev-1"], "the manifest is signed without a target, so it cannot be pushed to "
                                            "device:dev-1; push it with --key"),
        (for_dev1, ["--device", "dev-2"], "the manifest is signed for device:dev-1, so it cannot be pushed to "
                                          "device:dev-2"),
        (for_dev1, ["--group", "lab"], "is signed for device:dev-1, so it cannot be pushed to group:lab"),
        (for_dev1, ["--device", "dev-1", "--device", "dev-2"], "is signed for device:dev-1, so it cannot be sent "
                                                              "to device:dev-2"),
    ]
    for path, where, fragment in cases:
        code, _, err = edgectl("push", path, *where, "--broker", broker.url)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and fragment in lines[0], (where, err)
    assert retained(broker.url, ["edgefleet/#"], settle=0.2) == {}  # nothing was published
    # with the key, one document per device, each signed for its own device
    code, _, err = edgectl("push", untargeted, "--device", "dev-1", "--device", "dev-2", "--key", key_dir,
                           "--broker", broker.url)
    assert code == 0, err
    got = retained(broker.url, ["edgefleet/devices/+/models/m"])
    assert set(got) == {T.device_model("dev-1", "m"), T.device_model("dev-2", "m")}
    docs = {topic: json.loads(payload) for topic, payload in got.items()}
    for device in ("dev-1", "dev-2"):
        doc = docs[T.device_model(device, "m")]
        Keyring([key.private_key.public_key()]).verify(doc)
        assert doc["target"] == f"device:{device}"
    assert len({d["deployment_id"] for d in docs.values()}) == 1  # one deployment, one document per target


def test_push_refuses_an_unsigned_manifest(broker: Mosquitto, make_bundle: Callable[..., Path],
                                           edgectl: Callable[..., tuple[int, str, str]]) -> None:
    path = make_bundle("dense_f32", name="m", version=1)
    code, out, err = edgectl("push", path, "--device", "dev-1", "--broker", broker.url)
    assert code == 2
    assert "manifest is not signed" in err and len(err.strip().splitlines()) == 1
    assert retained(broker.url, ["edgefleet/#"], settle=0.2) == {}
    code, _, _ = edgectl("push", path, "--device", "dev-1", "--broker", broker.url, "--allow-unsigned")
    assert code == 0
    doc = json.loads(retained(broker.url, ["edgefleet/#"])[T.device_model("dev-1", "m")])
    assert doc["target"] == "device:dev-1" and "signature" not in doc  # the target, unsigned


def test_push_expiry_needs_the_key(broker: Mosquitto, make_bundle: Callable[..., Path], key: SigningKey,
                                   edgectl: Callable[..., tuple[int, str, str]]) -> None:
    path = make_bundle("dense_f32", key=key)
    code, _, err = edgectl("push", path, "--device", "dev-1", "--expires-in", 60, "--broker", broker.url)
    assert code == 2 and "--expires-in needs --key" in err


def test_push_to_a_broker_that_is_down(tmp_path: Path, make_bundle: Callable[..., Path], key: SigningKey,
                                       edgectl: Callable[..., tuple[int, str, str]]) -> None:
    down = Mosquitto(tmp_path / "down")  # never started
    code, _, err = edgectl("push", make_bundle(key=key, target="device:d"), "--device", "d", "--broker", down.url,
                           "--connect-timeout", 0.5)
    assert code == 2
    assert err.strip().splitlines() == [f"edgectl: error: cannot connect to {down.url}: connection refused: nothing "
                                        f"listens on 127.0.0.1:{down.port} (is the broker running, is the port right?)"]


def test_rollback_sends_a_signed_command_the_device_verifies(broker: Mosquitto, key: SigningKey, key_dir: Path,
                                                              edgectl: Callable[..., tuple[int, str, str]]) -> None:
    dev = FakeDevice(broker.url, "dev-1", keyring=Keyring([key.private_key.public_key()])).start()
    try:
        code, out, _ = edgectl("rollback", "--device", "dev-1", "--model", "m", "--key", key_dir,
                               "--broker", broker.url, "--json")
        assert code == 0
        sent = json.loads(out)
        deadline = time.monotonic() + 5
        while not dev.commands and time.monotonic() < deadline:
            threading.Event().wait(0.02)
        (raw,) = dev.commands
        Keyring([key.private_key.public_key()]).verify(raw)
        cmd = Command.from_dict(raw)
        assert (cmd.action, cmd.device_id, cmd.model, cmd.command_id) == ("rollback", "dev-1", "m", sent["command_id"])
        assert cmd.expires_at - cmd.issued_at == 300
    finally:
        dev.stop()


def test_rollback_to_an_offline_device_sends_nothing(broker: Mosquitto, key_dir: Path,
                                                     edgectl: Callable[..., tuple[int, str, str]]) -> None:
    inbox = Inbox()
    watcher = client(broker.url, inbox)
    watcher.subscribe(T.all_devices("cmd"), wait=5)
    code, out, err = edgectl("rollback", "--device", "ghost", "--model", "m", "--key", key_dir, "--broker", broker.url)
    assert code == ExitCode.FAILURE and out == ""
    assert err.splitlines() == ["edgectl: error: device ghost is not known to the broker (no status): commands are "
                                "not retained, so nothing was sent"], err
    assert inbox.quiet(0.3) == []
    watcher.stop()


@pytest.fixture
def two_versions(broker: Mosquitto, make_bundle: Callable[..., Path], key: SigningKey,
                 edgectl: Callable[..., tuple[int, str, str]]) -> Iterator[tuple[Bundle, Bundle]]:
    """v1 then v2 of model m pushed to dev-1 (v2's document replaces v1's), plus one orphan chunk."""
    v1 = Bundle.load(make_bundle("dense_f32", name="m", version=1, key=key, target="device:dev-1"))
    v2 = Bundle.load(make_bundle("dense_f32_v2", name="m", version=2, key=key, target="device:dev-1"))
    for b in (v1, v2):
        assert edgectl("push", b.path, "--device", "dev-1", "--broker", broker.url)[0] == 0
    other = Bundle.load(make_bundle("dense_f32", name="other", version=5, key=key, target="group:lab"))
    assert edgectl("push", other.path, "--group", "lab", "--broker", broker.url)[0] == 0
    ref, payload = encode_chunk(b"orphan chunk no document names")
    pub = client(broker.url)
    pub.publish(T.chunk(ref.sha256), payload, retain=True, wait=True)
    pub.stop()
    yield v1, v2


def _chunk_ids(*bundles: Bundle) -> set[str]:
    return {c.sha256 for b in bundles for a in (b.deployment.model.artifact, b.deployment.model.golden) for c in a.chunks}


def test_gc_clears_only_unreferenced_chunks(broker: Mosquitto, two_versions: tuple[Bundle, Bundle], make_bundle: object,
                                            edgectl: Callable[..., tuple[int, str, str]]) -> None:
    v1, v2 = two_versions
    before = {t.rsplit("/", 1)[1] for t in retained(broker.url, [T.all_chunks()])}
    code, out, _ = edgectl("gc", "--dry-run", "--json", "--broker", broker.url)
    assert code == 0
    dry = json.loads(out)
    in_use = before - set(dry["cleared_chunks"])
    assert {t.rsplit("/", 1)[1] for t in retained(broker.url, [T.all_chunks()])} == before  # dry run: untouched
    assert dry["documents"] == 2 and dry["chunks"] == len(before)
    v1_only = _chunk_ids(v1) - in_use
    assert v1_only and v1_only <= set(dry["cleared_chunks"])
    code, out, _ = edgectl("gc", "--json", "--broker", broker.url)
    assert code == 0
    done = json.loads(out)
    assert done["cleared_chunks"] == dry["cleared_chunks"] and done["bytes_freed"] > 0
    after = {t.rsplit("/", 1)[1] for t in retained(broker.url, [T.all_chunks()])}
    assert after == in_use
    assert _chunk_ids(v2) <= after  # everything the current document needs is still there
    assert len(set(dry["cleared_chunks"]) - _chunk_ids(v1)) == 1  # the orphan
    code, out, _ = edgectl("gc", "--broker", broker.url)
    assert code == 0 and "cleared 0 chunk(s)" in " ".join(out.split())


@pytest.mark.parametrize("data", [
    bytes(200_000),  # compresses
    np.random.default_rng(1).bytes(200_000),  # does not
    b"tiny",
])
def test_parallel_chunking_gives_exactly_the_protocol_split(data: bytes) -> None:
    assert split_parallel(data, 65536) == split(data, 65536)
