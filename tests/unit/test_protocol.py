"""The wire contract: canonical JSON, strict parsing, signatures, chunking, topics."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest

from edgefleet.errors import ChunkError, ProtocolError, SignatureError
from edgefleet.protocol import (
    DEPLOYMENT_SCHEMA,
    Command,
    Deployment,
    Keyring,
    ModelSpec,
    SigningKey,
    TensorSpec,
    Topics,
    canonical_json,
    decode_chunk,
    join,
    parse_json,
    split,
)


def _deployment(**model_overrides: Any) -> Deployment:
    data = bytes(range(256)) * 1000
    artifact, _ = split(data, 65536)
    golden, _ = split(b"golden" * 10, 65536)
    spec = TensorSpec(name="x", dtype="float32", shape=(1, 8))
    model = dict(name="m", version=1, artifact=artifact, golden=golden, inputs=(spec,), outputs=(spec,))
    model.update(model_overrides)
    return Deployment(
        schema=DEPLOYMENT_SCHEMA, deployment_id="m-v1-abc", issued_at=100, expires_at=200,
        model=ModelSpec(**model),  # type: ignore[arg-type]
    )


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": [1.5, "é"], "c": {"z": None, "y": True}}) == (
        '{"a":[1.5,"é"],"b":1,"c":{"y":true,"z":null}}'.encode()
    )


def test_canonical_json_is_stable_across_key_order() -> None:
    a = {"x": 1, "y": {"p": 2, "q": [3, 4]}}
    b = {"y": {"q": [3, 4], "p": 2}, "x": 1}
    assert canonical_json(a) == canonical_json(b)


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


@pytest.mark.parametrize("text, problem", [
    (b'{"a":1,"a":2}', "duplicate field 'a'"),
    (b'{"a":NaN}', "NaN is not allowed"),
    (b'{"a":', "malformed JSON"),
    (b'\xff\xfe', "not UTF-8"),
])
def test_parse_json_is_strict(text: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        parse_json(text)


def test_parse_json_size_limit() -> None:
    with pytest.raises(ProtocolError, match="above the limit"):
        parse_json(b"[" + b"1," * 100 + b"1]", limit=50)


def test_deployment_round_trip() -> None:
    doc = _deployment()
    again = Deployment.from_json(doc.to_json())
    assert again == doc
    assert again.to_json() == doc.to_json()


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(extra=1), "extra: unknown field"),
    (lambda d: d["model"].update(colour="red"), "model.colour: unknown field"),
    (lambda d: d["model"].update(version="1"), "model.version: expected an integer"),
    (lambda d: d["model"].update(version=True), "model.version: expected an integer"),
    (lambda d: d["model"].update(version=-1), "model.version: expected a value >= 0"),
    (lambda d: d["model"]["artifact"]["chunks"][1].update(size="x"), r"model.artifact.chunks\[1\].size"),
    (lambda d: d["model"]["artifact"].update(sha256="ABC"), "model.artifact.sha256: expected a SHA-256"),
    (lambda d: d["model"].update(name="../etc"), "model.name: expected 1-64 characters"),
    (lambda d: d["model"].update(name="a/b"), "model.name: expected 1-64 characters"),
    (lambda d: d["model"]["inputs"][0].update(dtype="complex64"), r"model.inputs\[0\].dtype: expected one of"),
    (lambda d: d["model"].pop("golden"), "model.golden: missing field"),
    (lambda d: d.update(schema="edgefleet.deployment/2"), "schema: expected 'edgefleet.deployment/1'"),
    (lambda d: d.update(expires_at=50), "expires_at: must be after issued_at"),
    (lambda d: d["policy"].update(max_error_rate=2), "policy.max_error_rate: expected a value between 0 and 1"),
    (lambda d: d["model"]["artifact"].update(size=5), "model.artifact.chunks: sizes add up to"),
    (lambda d: d["model"].update(inputs=[]), "model.inputs: a model needs at least one input"),
    (lambda d: d.update(model=[]), "model: expected an object, got a list"),
])
def test_strict_parsing_names_the_field(mutate: Any, field: str) -> None:
    raw = _deployment().to_dict()
    raw.setdefault("policy", {})
    mutate(raw)
    with pytest.raises(ProtocolError, match=field):
        Deployment.from_dict(raw)


def test_sign_then_verify() -> None:
    key = SigningKey.generate()
    signed = key.sign(_deployment().to_dict())
    assert Keyring([key.private_key.public_key()]).verify(signed) == key.key_id
    assert Deployment.from_dict(signed).key_id == key.key_id


def test_every_tampered_byte_fails_verification() -> None:
    key = SigningKey.generate()
    keyring = Keyring([key.private_key.public_key()])
    payload = canonical_json(key.sign(_deployment().to_dict()))
    failures = 0
    for i in range(0, len(payload), 7):
        mutated = bytearray(payload)
        mutated[i] ^= 0x01
        try:
            doc = parse_json(bytes(mutated))
            keyring.verify(doc)
        except (ProtocolError, UnicodeDecodeError):
            failures += 1
    assert failures == len(range(0, len(payload), 7))


@pytest.mark.parametrize("change, problem", [
    (lambda d: d.pop("signature"), "not signed"),
    (lambda d: d.update(key_id="0" * 16), "unknown key"),
    (lambda d: d.update(signature="***"), "not valid base64"),
    (lambda d: d.update(deployment_id="m-v2-abc"), "does not match"),
])
def test_bad_signatures(change: Any, problem: str) -> None:
    key = SigningKey.generate()
    signed = key.sign(_deployment().to_dict())
    change(signed)
    with pytest.raises(SignatureError, match=problem):
        Keyring([key.private_key.public_key()]).verify(signed)


def test_other_key_is_rejected() -> None:
    signer, other = SigningKey.generate(), SigningKey.generate()
    signed = signer.sign(_deployment().to_dict())
    with pytest.raises(SignatureError, match="unknown key"):
        Keyring([other.private_key.public_key()]).verify(signed)


def test_key_files_round_trip_and_never_overwrite(tmp_path: Any) -> None:
    from edgefleet.protocol import load_public_key
    from edgefleet.protocol.signing import key_id

    key = SigningKey.generate()
    private, public = key.write(tmp_path)
    assert private.stat().st_mode & 0o777 == 0o600
    assert SigningKey.load(tmp_path).key_id == key.key_id
    assert key_id(load_public_key(public)) == key.key_id
    with pytest.raises(SignatureError, match="already exists"):
        SigningKey.generate().write(tmp_path)
    assert SigningKey.load(private).key_id == key.key_id


def test_chunks_round_trip_mixed_content() -> None:
    data = os.urandom(150_000) + bytes(200_000) + os.urandom(10)
    artifact, payloads = split(data, 65536)
    assert [c.compressed for c in artifact.chunks] == [False, False, True, True, True, True]
    assert len(artifact.chunks) == 6 and artifact.chunks[-1].size == len(data) - 5 * 65536
    assert artifact.wire_size < len(data)
    raws = [decode_chunk(ref, p) for ref, p in zip(artifact.chunks, payloads, strict=True)]
    assert join(artifact, raws) == data


def test_equal_chunks_have_equal_payloads() -> None:
    block = os.urandom(1000) * 66
    a, pa = split(block + b"x" * 10, 65536)
    b, pb = split(block + b"y" * 10, 65536)
    assert a.chunks[0] == b.chunks[0] and pa[0] == pb[0]
    assert a.chunks[1] != b.chunks[1]


def test_corrupt_chunks_are_rejected() -> None:
    artifact, payloads = split(bytes(100_000), 65536)
    ref = artifact.chunks[0]
    with pytest.raises(ChunkError, match="bytes on the wire"):
        decode_chunk(ref, payloads[0] + b"x")
    flipped = bytearray(payloads[0])
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(ChunkError):
        decode_chunk(ref, bytes(flipped))
    raw_artifact, raw_payloads = split(os.urandom(1000), 65536)
    tampered = bytearray(raw_payloads[0])
    tampered[0] ^= 1
    with pytest.raises(ChunkError, match="SHA-256 does not match"):
        decode_chunk(raw_artifact.chunks[0], bytes(tampered))
    with pytest.raises(ChunkError, match="expected"):
        join(raw_artifact, [b"short"])


def test_decompression_bomb_is_bounded() -> None:
    import zlib

    from edgefleet.protocol import ChunkRef

    bomb = zlib.compress(bytes(50_000_000))
    ref = ChunkRef(sha256="0" * 64, size=1000, wire_size=len(bomb), compressed=True)
    with pytest.raises(ChunkError, match="wrong size"):
        decode_chunk(ref, bomb)


def test_command_parsing() -> None:
    key = SigningKey.generate()
    cmd = Command(schema="edgefleet.command/1", command_id="c1", device_id="dev-1", action="rollback",
                  issued_at=1, expires_at=2, model="m")
    signed = key.sign(cmd.to_dict())
    assert Command.from_dict(signed).model == "m"
    raw = cmd.to_dict()
    raw.pop("model")
    with pytest.raises(ProtocolError, match="rollback command names the model"):
        Command.from_dict(raw)
    raw.update(action="format-disk", model="m")
    with pytest.raises(ProtocolError, match="action"):
        Command.from_dict(raw)


def test_topics_build_and_parse() -> None:
    t = Topics("fleet/site-a")
    assert t.device_model("dev-1", "digits") == "fleet/site-a/devices/dev-1/models/digits"
    assert t.group_model("line-1", "digits") == "fleet/site-a/groups/line-1/models/digits"
    route = t.parse(t.device_model("dev-1", "digits"))
    assert (route.kind, route.device, route.model) == ("device_model", "dev-1", "digits")
    assert t.parse(t.chunk("a" * 64)).sha256 == "a" * 64
    assert t.parse(t.events("dev-1")).kind == "events"


@pytest.mark.parametrize("topic", [
    "edgefleet/devices/../models/x", "edgefleet/devices/a/models/x/y", "other/devices/a/state",
    "edgefleet/chunks/xyz", "edgefleet/devices/a/secrets",
])
def test_topics_outside_the_contract(topic: str) -> None:
    with pytest.raises(ProtocolError):
        Topics().parse(topic)


@pytest.mark.parametrize("name", ["..", "a/b", "+", "#", "", "x" * 65, "-a"])
def test_unsafe_names_cannot_build_topics(name: str) -> None:
    with pytest.raises(ProtocolError):
        Topics().device_model(name, "m")
    with pytest.raises(ProtocolError):
        Topics().device_model("d", name)


@pytest.mark.parametrize("prefix", ["", "a/+/b", "#", "a//b", "$SYS"])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(ProtocolError):
        Topics(prefix)


def test_unsigned_view() -> None:
    key = SigningKey.generate()
    doc = Deployment.from_dict(key.sign(_deployment().to_dict()))
    assert doc.unsigned().signature is None and doc.unsigned().key_id is None
    assert copy.deepcopy(doc) == doc


def test_phases_are_an_enum_that_reads_and_writes_the_same_names() -> None:
    from edgefleet.protocol import Event, ModelState, Phase, dump, parse

    assert [p for p in Phase if p.in_progress] == [Phase.DOWNLOADING, Phase.VERIFYING, Phase.VALIDATING,
                                                   Phase.SHADOW, Phase.ACTIVATING]
    assert [p for p in Phase if p.resting] == [Phase.IDLE, Phase.COMMITTED, Phase.REJECTED, Phase.ROLLED_BACK]
    assert [p for p in Phase if p.failed] == [Phase.REJECTED, Phase.ROLLED_BACK]
    assert not (Phase.PROBATION.resting or Phase.PROBATION.in_progress)  # on trial: neither
    # the wire and state.json keep the bare names, and text shows them bare
    state = ModelState(phase=Phase.ROLLED_BACK)
    assert dump(state) == {"phase": "ROLLED_BACK"} and type(dump(state)["phase"]) is str
    assert canonical_json({"phase": Phase.IDLE}) == b'{"phase":"IDLE"}'
    assert parse(ModelState, {"phase": "COMMITTED"}).phase is Phase.COMMITTED
    assert f"{Phase.COMMITTED} / %s" % Phase.IDLE == "COMMITTED / IDLE"
    with pytest.raises(ProtocolError, match=r"step: expected one of 'IDLE', .*'ROLLED_BACK', got 'DONE'"):
        Event.from_dict({"ts": 1.0, "device_id": "d", "model": "m", "step": "DONE", "ok": True})
    with pytest.raises(ProtocolError, match="phase: expected one of"):
        parse(ModelState, {"phase": 3})


def test_a_signed_document_keeps_the_value_its_signature_covers() -> None:
    from edgefleet.protocol import Signed

    key = SigningKey.generate()
    keyring = Keyring([key.private_key.public_key()])
    unsigned = _deployment().to_dict()
    del unsigned["policy"]  # the signer left the defaults out: parsing adds them back
    raw = key.sign(unsigned)
    signed = Signed.parse(Deployment, raw)
    assert signed.raw is raw and signed.doc.model.name == "m" and signed.doc.policy.allow_downgrade is False
    assert keyring.verify(signed.raw) == key.key_id
    with pytest.raises(SignatureError):
        keyring.verify(signed.doc.to_dict())  # a re-dump is not what was signed
    with pytest.raises(ProtocolError, match="model: missing field"):
        Signed.parse(Deployment, {k: v for k, v in raw.items() if k != "model"})
