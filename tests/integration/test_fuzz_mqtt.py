"""Generated hostile MQTT input: deployment documents, commands, chunk payloads and topic names.

Each property runs `fuzzing.CASES` cases against the real agent in-process (tests/support/inproc.py) and
checks, case by case: nothing escapes FleetLink (the daemon would only log it), the installed models,
what is served and the blob store are unchanged, the answer to a fixed input is the same, and the
refusal is reported as an event with ok=False and a reason. A few cases of each kind then go through
a real agent process and a real Mosquitto, and must come back as events on the broker.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from edgefleet.bundle import GOLDEN_FILE, MODEL_FILE
from edgefleet.errors import ProtocolError
from edgefleet.protocol import (
    COMMAND_SCHEMA,
    SigningKey,
    Topics,
    canonical_json,
    check_name,
    dump,
    parse_json,
    split,
)
from edgefleet.testing.broker import Mosquitto
from edgefleet.testing.reliability import AgentWith, Operator, build_bundle, fast_tmp
from tests.support.fuzzing import (
    CASES,
    E2E,
    FUZZ,
    JSON,
    TIMEOUT_S,
    break_chunk,
    break_command,
    break_document,
    break_signature,
    break_text,
    mqtt_topic_ok,
    topic_for,
)
from tests.support.inproc import InProcessAgent, LogCapture, Snapshot, tree

pytestmark = pytest.mark.timeout(TIMEOUT_S)

T = Topics()
STATE_FILES = {"state.json", "state.json.bak", "lock"}


@dataclass
class World:
    """Keys, bundles and one in-process agent per property."""

    root: Path
    key: SigningKey
    other: SigningKey
    v1: Path
    v2: Path
    agents: dict[str, InProcessAgent] = field(default_factory=dict)
    counter: Iterator[int] = field(default_factory=itertools.count)
    now: int = field(default_factory=lambda: int(time.time()))
    """One clock reading for the whole run: a case must draw the same way when hypothesis replays it."""

    def id(self, prefix: str) -> str:
        """A fresh id of fixed length (the length of a document must not vary between replays)."""
        return f"{prefix}-{next(self.counter):08d}"

    def agent(self, name: str) -> InProcessAgent:
        """A fresh agent for one property (they accumulate refusals, so each gets its own)."""
        if name not in self.agents:
            a = InProcessAgent.create(self.root / name, self.v1, self.key)
            a.boot()
            self.agents[name] = a
        return self.agents[name]

    def v2_doc(self, dep_id: str, *, compress: bool = True) -> dict[str, Any]:
        """v2's unsigned document with a fresh id and validity (its chunks are never published);
        `compress=False` describes every chunk as sent raw."""
        raw = parse_json((self.v2 / "manifest.json").read_bytes())
        raw.pop("signature", None)
        raw.pop("key_id", None)
        raw.update(deployment_id=dep_id, issued_at=self.now - 60, expires_at=self.now + 86400, target="device:dev-1")
        if not compress:
            for field_name, file in (("artifact", MODEL_FILE), ("golden", GOLDEN_FILE)):
                raw["model"][field_name] = dump(split((self.v2 / file).read_bytes(), 1024, compress=False)[0])
        return raw  # type: ignore[no-any-return]

    def v2_payloads(self) -> dict[str, bytes]:
        """Every v2 chunk's raw bytes and zlib payload, by digest (keys `sha` and `sha:raw`)."""
        out: dict[str, bytes] = {}
        for file in (MODEL_FILE, GOLDEN_FILE):
            data = (self.v2 / file).read_bytes()
            for compress in (True, False):
                art, payloads = split(data, 1024, compress=compress)
                for ref, p in zip(art.chunks, payloads, strict=True):
                    out[ref.sha256 + ("" if ref.compressed else ":raw")] = p
        return out


# Every generated refusal must be reported here, so the agents under test lift the refusal events'
# rate limit (which tests/integration/test_trust_documents.py checks with a flood).
UNLIMITED_REFUSALS = 10**9


@pytest.fixture(scope="module", autouse=True)
def _report_every_refusal() -> Iterator[None]:
    from edgefleet.agent.fleet import link

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(link, "REFUSALS_PER_MINUTE", UNLIMITED_REFUSALS)
        yield


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = fast_tmp("edgefleet-fuzz-")
    key = SigningKey.generate()
    w = World(root, key, SigningKey.generate(), build_bundle(root / "v1", "dense_f32", version=1, key=key),
              build_bundle(root / "v2", "dense_f32_v2", version=2, chunk_size=1024))
    yield w
    for a in w.agents.values():
        a.daemon.lifecycle.shutdown()
    shutil.rmtree(root, ignore_errors=True)


def assert_unchanged(agent: InProcessAgent, before: Snapshot, what: str) -> None:
    """The installed models, served versions, answer and blobs are as they were."""
    after = agent.snapshot()
    assert {n: after.models[n] for n in before.models} == before.models, what
    for name in set(after.models) - set(before.models):  # a new model name may start downloading, nothing more
        assert not check_name(name) and after.models[name] == {"active": None, "previous": None, "probation": None}
    assert after.served == before.served, what
    assert after.prediction == before.prediction, what
    assert after.blobs == before.blobs, what
    assert agent.daemon.lifecycle.state.record("m").phase in ("COMMITTED", "REJECTED", "DOWNLOADING"), what


def assert_files_in_place(agent: InProcessAgent) -> None:
    """Only the store's own files exist under the agent's directory, and nothing beside it."""
    for rel in tree(agent.root):
        parts = rel.rstrip("/").split("/")
        if parts[0] in ("keys", "api.sock", "admin.sock"):
            continue
        assert parts[0] == "state", rel
        if len(parts) == 1:
            continue
        if len(parts) == 2:
            assert parts[1] in STATE_FILES | {"blobs", "partial"} or parts[1].startswith(".state.json."), rel
        else:
            assert parts[1] in ("blobs", "partial") and len(parts) == 3, rel
            name = parts[2].lstrip(".").removesuffix(".tmp").removesuffix(".part")
            assert len(name) == 64 and all(c in "0123456789abcdef" for c in name), rel


def _read_at(path: Path, offset: int, size: int) -> bytes:
    """Bytes of a partial artifact at an offset (empty if the file is gone)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    except FileNotFoundError:
        return b""


def refused(events: list[Any], what: str) -> Any:
    """The REJECTED event among `events` (ok=False with a reason)."""
    bad = [e for e in events if e.step == "REJECTED"]
    assert bad, f"{what}: no REJECTED event (events: {[(e.step, e.ok, e.reason) for e in events]})"
    event = bad[-1]
    assert event.ok is False and event.reason and event.reason.strip(), what
    # the reason goes into every event and retained state document: an attacker must not size it
    assert len(event.reason) <= 2000, f"{what}: a reason of {len(event.reason)} characters"
    return event


# --- deployment documents -----------------------------------------------------------------------


def deployment_case(world: World, draw: Any, dep_id: str) -> tuple[bytes, str, bool]:
    """(payload, what it is, must be refused) for one generated deployment document."""
    base = world.v2_doc(dep_id)
    now = world.now
    mode = draw(st.sampled_from(["document"] * 6 + ["signature", "text", "text", "garbage", "json"]))
    if mode == "document":
        doc, what, must = break_document(base, draw, now=now)
        return canonical_json(world.key.sign(doc)), what, must
    if mode == "signature":
        doc, what = break_signature(base, draw, world.key.sign, world.other.sign)
        return canonical_json(doc), what, True
    if mode == "text":
        payload, what = break_text(canonical_json(world.key.sign(base)), draw)
        return payload, what, True
    if mode == "garbage":
        return draw(st.binary(min_size=1, max_size=3000)), "random bytes", True
    value = draw(JSON)
    return canonical_json(value), f"json {type(value).__name__}", True


def test_generated_deployment_documents(world: World) -> None:
    agent = world.agent("deployments")
    seen: set[str] = set()
    tally: Counter[str] = Counter()

    @FUZZ
    @given(data=st.data())
    def case(data: Any) -> None:
        payload, what, must = deployment_case(world, data.draw, world.id("fz"))
        before = agent.snapshot()
        events = agent.deliver(T.device_model("dev-1", "m"), payload)
        assert_unchanged(agent, before, what)
        tally["cases"] += 1
        digest = hashlib.sha256(payload).hexdigest()
        if digest in seen:  # remembered (no event) or, without an id to remember, refused again
            assert all(e.step == "REJECTED" and not e.ok for e in events), what
            return
        seen.add(digest)
        if must or any(e.step == "REJECTED" for e in events):
            refused(events, what)
            tally["refused"] += 1
        else:
            assert [e.step for e in events] == ["DOWNLOADING"] and events[0].ok, what
            tally["accepted for download"] += 1

    case()
    print(f"deployment documents: {dict(tally)}")
    assert_files_in_place(agent)
    assert tally["cases"] >= CASES, tally
    assert tally["refused"] > 0.8 * tally["cases"], tally


# --- commands -----------------------------------------------------------------------------------


def command_case(world: World, draw: Any, cmd_id: str) -> tuple[bytes, str, bool]:
    """(payload, what it is, must be refused) for one generated command."""
    now = world.now
    base = {"schema": COMMAND_SCHEMA, "command_id": cmd_id, "device_id": "dev-1", "action": "report",
            "issued_at": now - 5, "expires_at": now + 300}
    mode = draw(st.sampled_from(["command"] * 6 + ["signature", "text", "garbage", "json"]))
    if mode == "command":
        cmd, what, must = break_command(base, draw, now=now)
        return canonical_json(world.key.sign(cmd)), what, must
    if mode == "signature":
        cmd, what = break_signature(base, draw, world.key.sign, world.other.sign)
        return canonical_json(cmd), what, True
    if mode == "text":
        text = canonical_json(world.key.sign(base))
        pos = draw(st.integers(0, len(text) - 1))
        return text[:pos], "truncated", True
    if mode == "garbage":
        return draw(st.binary(max_size=2000)), "random bytes", True
    return canonical_json(draw(JSON)), "json value", True


def test_generated_commands(world: World) -> None:
    agent = world.agent("commands")
    tally: Counter[str] = Counter()

    @FUZZ
    @given(data=st.data())
    def case(data: Any) -> None:
        cmd_id = world.id("cmd")
        payload, what, must = command_case(world, data.draw, cmd_id)
        before = agent.snapshot()
        applied = dict(agent.daemon.lifecycle.state.commands)
        events = agent.deliver(T.cmd("dev-1"), payload)
        assert_unchanged(agent, before, what)
        assert len(events) == 1, f"{what}: {events}"
        event = events[0]
        if must or not event.ok:
            assert event.ok is False and event.reason and event.reason.strip(), what
            assert len(event.reason) <= 2000, f"{what}: a reason of {len(event.reason)} characters"
            if event.reason.startswith("command rejected"):
                assert agent.daemon.lifecycle.state.commands == applied, f"{what}: a refused command was remembered"
            else:  # verified, so consumed (never applied twice), but it could not be carried out
                assert event.reason.startswith(f"command {cmd_id} failed"), event.reason
            tally["refused"] += 1
        else:
            assert event.details.get("command_id") == cmd_id, what
            tally["applied"] += 1
        tally["cases"] += 1

    case()
    print(f"commands: {dict(tally)}")
    assert tally["cases"] >= CASES, tally
    assert tally["refused"] > 0.8 * tally["cases"], tally


# --- chunk payloads -----------------------------------------------------------------------------


def test_generated_chunk_payloads(world: World) -> None:
    agent = world.agent("chunks")
    payloads = world.v2_payloads()
    tally: Counter[str] = Counter()

    @FUZZ
    @given(data=st.data())
    def case(data: Any) -> None:
        compress = data.draw(st.booleans())
        doc = world.key.sign(world.v2_doc(world.id("ck"), compress=compress))
        started = agent.deliver(T.device_model("dev-1", "m"), canonical_json(doc))
        assert [e.step for e in started] == ["DOWNLOADING"], [(e.step, e.reason) for e in started]
        job = agent.link.downloads.jobs["m"]
        sha = data.draw(st.sampled_from(sorted(job.requested)))
        ref = job.refs[sha]
        payload, what = break_chunk(payloads[sha + ("" if ref.compressed else ":raw")], ref.wire_size, data.draw)
        places = list(job.places[sha])
        in_place = [_read_at(path, offset, ref.size) for path, offset in places]
        before = agent.snapshot()
        events = agent.deliver(T.chunk(sha), payload)
        what = f"{what} (compressed={ref.compressed})"
        assert_unchanged(agent, before, what)
        event = refused(events, what)
        assert event.reason.startswith(f"chunk {sha[:12]}"), event.reason
        assert event.details["failed_step"] == "DOWNLOADING"
        assert [_read_at(path, offset, ref.size) for path, offset in places] == in_place, f"{what}: bytes written"
        assert "m" not in agent.link.downloads.jobs and not agent.link.downloads.wanted(sha)
        tally[str(ref.compressed)] += 1
        tally["cases"] += 1

    case()
    print(f"chunk payloads (by compressed): {dict(tally)}")
    assert_files_in_place(agent)
    assert tally["cases"] >= CASES and tally["True"] and tally["False"], tally


# --- topic names --------------------------------------------------------------------------------


def test_generated_topic_names(world: World) -> None:
    agent = world.agent("topics")
    tally: Counter[str] = Counter()
    with LogCapture() as logs:

        @FUZZ
        @given(data=st.data())
        def case(data: Any) -> None:
            topic, level = topic_for(data.draw)
            name = level if isinstance(level, str) and not check_name(level) else "m"
            doc = world.v2_doc(world.id("tp"))
            doc["model"]["name"] = name
            payload = canonical_json(world.key.sign(doc))
            before, state = agent.snapshot(), agent.state_bytes()
            logged = logs.count
            events = agent.deliver(topic, payload)
            assert_unchanged(agent, before, topic)
            assert all(not check_name(n) for n in agent.daemon.lifecycle.state.models), topic
            try:
                route = T.parse(topic)
            except ProtocolError:
                assert not events and agent.state_bytes() == state, topic
                assert any("ignoring message" in m for m in logs.since(logged)), topic
                tally["refused by the router"] += 1
                return
            finally:
                tally["cases"] += 1
            ours = (route.kind == "device_model" and route.device == "dev-1") or \
                   (route.kind == "group_model" and route.group == "lab")
            if not ours:
                assert not events and agent.state_bytes() == state, topic
                tally["not for this device"] += 1
            elif route.model != "m" and name == "m":
                refused(events, topic)
                tally["name mismatch refused"] += 1
            elif route.kind == "group_model":
                # every generated document is signed for device:dev-1: on a group's topic it is refused
                assert "but was published for group:lab" in (refused(events, topic).reason or ""), topic
                tally["target mismatch refused"] += 1
            else:
                assert events and events[-1].step in ("DOWNLOADING", "REJECTED"), topic
                tally["routed"] += 1

        case()
    print(f"topic names: {dict(tally)}")
    assert_files_in_place(agent)
    assert tally["cases"] >= CASES and tally["refused by the router"] > 100, tally


# --- the same cases through a real agent and a real broker --------------------------------------


@pytest.fixture(scope="module")
def live(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentWith, Operator]]:
    broker = Mosquitto(tmp_path_factory.mktemp("fuzz-broker")).start()
    (world.root / "live-keys").mkdir()
    (world.root / "live-keys" / "edgefleet.pub").write_bytes(world.key.public_pem())
    agent = AgentWith(tmp_path_factory.mktemp("fuzz-agent"), groups=["lab"],
                      prelude=f"import edgefleet.agent.fleet.link; edgefleet.agent.fleet.link.REFUSALS_PER_MINUTE = {UNLIMITED_REFUSALS}",
                      mqtt={"url": broker.url, "reconnect_max_s": 1.0},
                      security={"trusted_keys": [str(world.root / "live-keys" / "edgefleet.pub")]},
                      health={"probation_s": 3600, "max_updates_per_hour": 1_000_000})
    assert agent.cli("install", str(world.v1)).returncode == 0
    agent.start()
    op = Operator(broker.url, world.key)
    try:
        yield agent, op
    finally:
        op.close()
        agent.kill()
        broker.kill()
    assert agent.proc is not None and agent.proc.returncode == -9, "the agent died during the run"


def assert_live_unchanged(agent: AgentWith) -> None:
    """The real agent is up and still serves v1."""
    assert agent.proc is not None and agent.proc.poll() is None, agent.log()[-3000:]
    assert agent.client.predict("m", [[0.5, -1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.1]])["edgefleet"]["model_version"] == 1


def test_live_agent_refuses_generated_documents_and_commands(world: World, live: tuple[AgentWith, Operator]) -> None:
    agent, op = live
    seen: set[str] = set()
    count: Counter[str] = Counter()

    @E2E
    @given(data=st.data())
    def documents(data: Any) -> None:
        payload, what, must = deployment_case(world, data.draw, world.id("live"))
        assume(hashlib.sha256(payload).hexdigest() not in seen and must)
        seen.add(hashlib.sha256(payload).hexdigest())
        mark = op.mark()
        op.document(payload)
        event = op.after(mark, lambda e: e["step"] in ("REJECTED", "DOWNLOADING"))
        assert event["step"] == "REJECTED" and event["ok"] is False and event["reason"], (what, event)
        count["documents"] += 1

    @E2E
    @given(data=st.data())
    def commands(data: Any) -> None:
        payload, what, must = command_case(world, data.draw, world.id("live-cmd"))
        assume(must and payload)
        mark = op.mark()
        op.transport.publish(T.cmd("dev-1"), payload, wait=30)
        event = op.after(mark)
        assert event["ok"] is False and event["reason"], (what, event)
        count["commands"] += 1

    documents()
    commands()
    assert_live_unchanged(agent)
    assert count["documents"] >= E2E.max_examples // 2 and count["commands"] >= E2E.max_examples // 2, count


def test_live_agent_refuses_generated_chunks_and_topics(world: World, live: tuple[AgentWith, Operator]) -> None:
    agent, op = live
    payloads: dict[str, bytes] = {}
    refs: dict[str, Any] = {}
    for name in (MODEL_FILE, GOLDEN_FILE):
        art, chunks = split((world.v2 / name).read_bytes(), 1024)
        payloads.update({ref.sha256: p for ref, p in zip(art.chunks, chunks, strict=True)})
        refs.update({ref.sha256: ref for ref in art.chunks})
    for name in (MODEL_FILE, GOLDEN_FILE):  # chunks v1 also has are copied locally, never fetched
        for ref in split((world.v1 / name).read_bytes(), 1024)[0].chunks:
            payloads.pop(ref.sha256, None)
    count: Counter[str] = Counter()

    @E2E
    @given(data=st.data())
    def chunks(data: Any) -> None:
        doc = world.key.sign(world.v2_doc(world.id("live-ck")))
        sha = data.draw(st.sampled_from(sorted(payloads)))
        payload, what = break_chunk(payloads[sha], refs[sha].wire_size, data.draw)
        assume(payload)  # an empty retained publish clears the topic instead of delivering anything
        mark = op.mark()
        op.transport.publish(T.chunk(sha), payload, retain=True, wait=30)
        op.document(canonical_json(doc))
        event = op.after(mark, lambda e: e["step"] == "REJECTED" and e.get("deployment_id") == doc["deployment_id"])
        assert event["reason"].startswith("chunk ") and event["details"]["failed_step"] == "DOWNLOADING", event
        op.clear(T.chunk(sha))
        count["chunks"] += 1

    @E2E
    @given(data=st.data())
    def topics(data: Any) -> None:
        topic, level = topic_for(data.draw)
        assume(mqtt_topic_ok(topic) and topic.startswith("edgefleet/") and isinstance(level, str)
               and check_name(level) is not None and "/" not in level)
        doc = world.v2_doc(world.id("live-tp"))
        doc["model"]["name"] = level
        op.transport.publish(topic, canonical_json(world.key.sign(doc)), retain=True, wait=30)
        op.clear(topic)
        count["topics"] += 1

    chunks()
    topics()
    # the last word: a valid but unavailable v3 is taken up, proving the agent still listens
    doc = copy.deepcopy(world.v2_doc(world.id("live-final")))
    mark = op.mark()
    op.document(canonical_json(world.key.sign(doc)))
    assert op.after(mark, lambda e: e["step"] == "DOWNLOADING")["ok"] is True
    assert_live_unchanged(agent)
    assert "Traceback" not in agent.log(), agent.log()[-3000:]
    assert not [p for p in tree(agent.root) if not p.startswith(("state", "agent", "api.sock", "admin.sock"))]
    assert count["chunks"] >= E2E.max_examples // 2 and count["topics"] >= 1, count
