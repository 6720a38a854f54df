"""Downloads on their own: the chunk work happens on the network and worker threads, the loop thread
only starts and finishes. A stand-in broker delivers the chunks it was asked for from a thread of its
own, as paho's network thread does, and can cap the subscriptions it grants or lose a chunk; the
store, the files and the hashing are real. The last tests fetch about 300 chunks from a real NATS
server, which grants a session at most 63 QoS 1 subscriptions."""

from __future__ import annotations

import functools
import hashlib
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest

from edgefleet.agent.fleet import delivery
from edgefleet.agent.fleet.delivery import ChunkStored, Downloads, Job
from edgefleet.agent.lifecycle.store import Store
from edgefleet.errors import DeploymentRejected
from edgefleet.protocol import Topics
from edgefleet.protocol.chunks import split
from edgefleet.protocol.documents import Artifact, Signed
from edgefleet.testing.nats import Nats
from edgefleet.testing.waiting import wait_for
from edgefleet.transport import Message, MqttSettings, RefusalHandler, Transport

T = Topics()
CHUNK = 4096


@dataclass(frozen=True)
class _Model:
    name: str
    version: int
    artifact: Artifact
    golden: Artifact


@dataclass(frozen=True)
class _Doc:
    """The fields of a deployment document that a download reads."""

    deployment_id: str
    model: _Model


class Broker:
    """Retained chunks by topic; delivers each subscribed one once per SUBSCRIBE, in subscription order,
    from its own thread, and keeps count of what was subscribed and not yet dropped.

    `cap` limits the live subscriptions as a broker's per-session limit does: a SUBSCRIBE beyond it is
    refused, reported from the broker's thread as a SUBACK is. `lose` names chunks whose first delivery
    is lost, as a QoS 0 message a broker drops."""

    def __init__(self, payloads: dict[str, bytes], cap: int | None = None):
        self.payloads = payloads
        self.cap = cap
        self.lose: set[str] = set()
        self.pending: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.live: set[str] = set()
        self.most_live = 0
        self.subscribes: list[list[str]] = []
        self.unsubscribes: list[list[str]] = []
        self.refused: list[str] = []
        self.downloads: Downloads | None = None
        self.running = threading.Event()
        self.running.set()
        self.thread = threading.Thread(target=self._deliver, daemon=True)

    def subscribe(self, topics: list[str], on_refused: RefusalHandler | None = None) -> None:
        refused: list[tuple[str, str]] = []
        with self.lock:
            self.subscribes.append(list(topics))
            for topic in topics:
                if topic not in self.live and self.cap is not None and len(self.live) >= self.cap:
                    refused.append((topic, "Quota exceeded"))
                    continue
                self.live.add(topic)
                self.pending.put(functools.partial(self._send, topic))
            self.most_live = max(self.most_live, len(self.live))
            self.refused += [t for t, _ in refused]
        if refused and on_refused is not None:
            self.pending.put(lambda: on_refused(refused))

    def unsubscribe(self, topics: list[str]) -> None:
        with self.lock:
            self.unsubscribes.append(list(topics))
            self.live.difference_update(topics)

    def retain(self, payloads: dict[str, bytes]) -> None:
        self.payloads.update(payloads)

    def start(self) -> None:
        self.thread.start()

    def _send(self, topic: str) -> None:
        with self.lock:
            if topic not in self.live or self.downloads is None or topic not in self.payloads:
                return
            if topic in self.lose:
                self.lose.discard(topic)
                return
        self.downloads.on_chunk(topic.rsplit("/", 1)[1], self.payloads[topic])

    def _deliver(self) -> None:
        while (item := self.pending.get()) is not None:
            self.running.wait()
            item()

    def close(self) -> None:
        self.pending.put(None)
        self.thread.join(10)


class LiveBroker:
    """The stand-in's interface over a real MQTT connection, as the agent's link makes it: chunk
    subscriptions at `qos` (the agent's CHUNK_QOS unless a test says otherwise) after the agent's own
    `held` subscriptions, refusals reported back, chunks handed over on paho's network thread."""

    def __init__(self, url: str, *, qos: int = delivery.CHUNK_QOS, held: int = 4) -> None:
        self.qos = qos
        self.downloads: Downloads | None = None
        self.refused: list[str] = []
        self.transport = Transport(MqttSettings(url=url, protocol="3.1.1", client_id=f"dev-{time.monotonic_ns()}"),
                                   on_message=self._on_message)
        self.transport.subscribe([f"edgefleet/held/{i}" for i in range(held)], qos=1)
        self.publisher = Transport(MqttSettings(url=url, protocol="3.1.1", client_id=f"host-{time.monotonic_ns()}"),
                                   on_message=lambda m: None)

    def start(self) -> None:
        for t in (self.transport, self.publisher):
            t.start()
            assert t.wait_connected(30), t.last_error

    def retain(self, payloads: dict[str, bytes]) -> None:
        for topic, payload in payloads.items():
            self.publisher.publish(topic, payload, qos=1, retain=True)
        assert self.publisher.flush(60), "the broker did not take every chunk"

    def subscribe(self, topics: list[str], on_refused: RefusalHandler) -> None:
        def refused(filters: list[tuple[str, str]]) -> None:
            self.refused += [f for f, _ in filters]
            on_refused(filters)

        self.transport.subscribe(topics, qos=self.qos, on_refused=refused)

    def unsubscribe(self, topics: list[str]) -> None:
        self.transport.unsubscribe(topics)

    def _on_message(self, m: Message) -> None:
        sha = T.chunk_id(m.topic)
        if self.downloads is not None and sha is not None:
            self.downloads.on_chunk(sha, m.payload)

    def close(self) -> None:
        self.transport.stop()
        self.publisher.stop()


B = TypeVar("B", Broker, LiveBroker)


class Rig(Generic[B]):
    """Downloads with a broker (a stand-in or a real one) and the loop thread's side played by `run`."""

    def __init__(self, root: Path, broker: B, window: int = 8):
        self.store = Store(root)
        self.broker = broker
        self.posted: queue.SimpleQueue[ChunkStored] = queue.SimpleQueue()
        self.downloads = Downloads(self.store, subscribe=self.broker.subscribe, unsubscribe=self.broker.unsubscribe,
                                   chunk_topic=T.chunk, post=self.posted.put, window=window)
        self.broker.downloads = self.downloads
        self.broker.start()

    def start(self, name: str, data: bytes, golden: bytes, version: int = 1, chunk_size: int = CHUNK) -> Job:
        """Retain the chunks of a deployment of `data` (and `golden`) on the broker and download it."""
        art, art_payloads = split(data, chunk_size)
        gold, gold_payloads = split(golden, chunk_size)
        retained = {T.chunk(ref.sha256): payload for a, payloads in ((art, art_payloads), (gold, gold_payloads))
                    for ref, payload in zip(a.chunks, payloads, strict=True)}
        self.broker.retain(retained)
        doc: Any = _Doc(deployment_id=f"{name}-{version}", model=_Model(name, version, art, gold))
        return self.downloads.start(Signed(doc, {}))

    def run(self, jobs: int, timeout: float = 30.0, ask_again_after_s: float | None = None,
            ) -> tuple[list[Job], list[DeploymentRejected]]:
        """Play the loop thread until `jobs` downloads ended; finish the complete ones. With
        `ask_again_after_s`, pump the downloads as the loop's tick does."""
        finished: list[Job] = []
        failed: list[DeploymentRejected] = []
        deadline = time.monotonic() + timeout
        while len(finished) + len(failed) < jobs:
            if ask_again_after_s is None:
                msg = self.posted.get(timeout=timeout)
            else:
                try:
                    msg = self.posted.get(timeout=0.05)
                except queue.Empty:
                    assert time.monotonic() < deadline, "no download ended in time"
                    self.downloads.pump(ask_again_after_s)
                    continue
            try:
                done = self.downloads.on_stored(msg)
            except DeploymentRejected as err:
                failed.append(err)
                continue
            for job in done:
                self.downloads.finish(job)
                finished.append(job)
        return finished, failed

    def close(self) -> None:
        self.broker.close()
        self.downloads.close()


@pytest.fixture
def rig_factory(tmp_path: Path) -> Any:
    rigs: list[Rig[Broker]] = []

    def make(window: int = 8, cap: int | None = None) -> Rig[Broker]:
        rigs.append(Rig(tmp_path / f"state{len(rigs)}", Broker({}, cap=cap), window=window))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.close()


def _data(seed: int, chunks: int) -> bytes:
    return random.Random(seed).randbytes(chunks * CHUNK - 123)


def test_two_models_sharing_chunks_both_complete_and_no_subscription_is_left(rig_factory: Any) -> None:
    # both ask for the shared chunks at once: the first to get one takes it, the other asks again
    shared = random.Random(0).randbytes(20 * CHUNK)
    a = shared + random.Random(1).randbytes(30 * CHUNK)
    b = shared + random.Random(2).randbytes(25 * CHUNK + 7)
    rig = rig_factory(window=8)
    rig.broker.running.clear()
    job_a = rig.start("a", a, b"golden a" * 100)
    job_b = rig.start("b", b, b"golden b" * 100)
    assert job_a.requested == job_b.requested, "both must be waiting for the same chunks"
    rig.broker.running.set()
    finished, failed = rig.run(2)
    assert not failed
    assert {j.name for j in finished} == {"a", "b"}
    for data in (a, b, b"golden a" * 100, b"golden b" * 100):
        blob = rig.store.blob_path(hashlib.sha256(data).hexdigest())
        assert blob.read_bytes() == data
    assert not rig.broker.live, f"subscriptions left behind: {sorted(rig.broker.live)[:3]}"
    assert not list(rig.store.partial.iterdir())
    assert not rig.downloads.jobs


def test_at_most_a_window_is_asked_for_and_finished_subscriptions_go_in_batches(rig_factory: Any) -> None:
    data = _data(3, 120)
    rig = rig_factory(window=16)
    asked: list[int] = []
    subscribe = rig.broker.subscribe

    def counting(topics: list[str], on_refused: RefusalHandler) -> None:
        asked.append(rig.downloads.live())  # the new ones included
        subscribe(topics, on_refused)

    rig.downloads._subscribe = counting
    rig.start("m", data, b"g" * 10)
    finished, failed = rig.run(1)
    assert finished and not failed
    assert max(asked) <= 16 and rig.broker.most_live <= 16, (asked, rig.broker.most_live)
    assert sum(len(t) for t in rig.broker.subscribes) == 121  # 120 chunks + 1 golden, each asked for once
    assert len(rig.broker.subscribes) < 121 / 2, "subscriptions should go out in batches"
    assert len(rig.broker.unsubscribes) < 121 / 2, "finished subscriptions should be dropped in batches"


def test_the_kernel_is_asked_to_write_out_as_the_download_fills(rig_factory: Any, monkeypatch: Any) -> None:
    kicks: list[Path] = []
    monkeypatch.setattr(delivery, "WRITEBACK_BYTES", 8 * CHUNK)
    monkeypatch.setattr(delivery, "_start_writeback", kicks.append)
    data = _data(4, 80)
    rig = rig_factory()
    job = rig.start("m", data, b"g")
    parts = {a.part for a in job.assemblies}
    finished, _ = rig.run(1)
    assert finished
    # 80 chunks written, a kick every 8: about 10 rounds over both .part files (the last may not come)
    assert 8 * len(parts) <= len(kicks) <= 10 * len(parts), len(kicks)
    assert set(kicks) == parts


def test_a_tampered_chunk_ends_the_download_once_and_stores_nothing(rig_factory: Any) -> None:
    data = _data(5, 40)
    rig = rig_factory()
    job = rig.start("m", data, b"g")
    bad = job.doc.model.artifact.chunks[17].sha256
    topic = T.chunk(bad)
    rig.broker.payloads[topic] = rig.broker.payloads[topic][:-1] + bytes([rig.broker.payloads[topic][-1] ^ 1])
    finished, failed = rig.run(1)
    assert not finished and len(failed) == 1
    assert failed[0].reason.startswith(f"chunk {bad[:12]}"), failed[0].reason
    assert failed[0].details["model"] == "m"
    assert not rig.store.has_blob(job.doc.model.artifact.sha256)
    assert not rig.downloads.jobs and not rig.broker.live
    with pytest.raises(queue.Empty):  # one report, not one per chunk still arriving
        rig.posted.get(timeout=0.5)


def test_chunks_arriving_after_a_cancel_are_ignored(rig_factory: Any) -> None:
    data = _data(6, 60)
    rig = rig_factory(window=60)
    rig.broker.downloads = None  # the chunks are delivered by hand, after the cancel
    job = rig.start("m", data, b"g")
    wanted = sorted(job.requested)
    assert len(wanted) == 60
    rig.downloads.cancel("m")
    assert not rig.broker.live
    for sha in wanted:
        rig.downloads.on_chunk(sha, rig.broker.payloads[T.chunk(sha)])
    with pytest.raises(queue.Empty):
        rig.posted.get(timeout=0.5)
    assert not rig.downloads.jobs
    assert os.path.exists(job.assemblies[0].part), "a cancelled download keeps its bytes for a resume"


# --- the window against what the broker grants ---------------------------------------------------


def test_window_halves_once_per_round_trip_and_grows_back_by_one_per_window() -> None:
    w = delivery.Window(64)
    first, second = w.sent(), w.sent()  # both on the wire before any answer
    assert w.refused(first) and w.limit == 32
    assert not w.refused(second) and w.limit == 32, "sent before the halving: already answered by it"
    assert w.refused(w.sent()) and w.limit == 16
    for _ in range(17):  # a window's worth (it grows as it goes)
        w.arrived()
    assert w.limit == 17, "one more per window's worth of chunks"
    for _ in range(5000):
        w.arrived()
    assert w.limit == 64, "never above the ceiling"
    for _ in range(10):
        w.refused(w.sent())
    assert w.limit == 1 and w.batch == 1, "never below one"
    with pytest.raises(ValueError):
        delivery.Window(0)


def test_a_broker_that_caps_subscriptions_shrinks_the_window_and_the_download_completes(rig_factory: Any) -> None:
    # a broker granting 10 live subscriptions to a window of 64: the refused chunks go back to the
    # queue, the window comes down to what is granted, and every chunk still arrives
    data = _data(7, 200)
    rig = rig_factory(window=64, cap=10)
    job = rig.start("m", data, b"g" * 10)
    finished, failed = rig.run(1, ask_again_after_s=5.0)
    assert finished and not failed
    assert rig.store.blob_path(hashlib.sha256(data).hexdigest()).read_bytes() == data
    assert rig.broker.refused and rig.downloads.refusals == len(rig.broker.refused)
    assert job.refusals == len(rig.broker.refused) and job.refusal == "Quota exceeded"
    assert 2 <= rig.downloads.window.limit <= 11, rig.downloads.window.limit
    # after the first round trip the window fits the cap: refusals are a few per window, not most chunks
    assert len(rig.broker.refused) < 54 + 60, len(rig.broker.refused)
    assert not rig.broker.live and rig.downloads.live() == 0


def test_a_broker_that_refuses_every_chunk_fails_the_download_as_stalled_without_a_storm(rig_factory: Any) -> None:
    data = _data(8, 30)
    rig = rig_factory(window=64, cap=0)
    job = rig.start("m", data, b"g")
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # the loop's tick, 20 times a second
        rig.downloads.pump(ask_again_after_s=60.0)
        time.sleep(0.05)
    assert rig.downloads.window.limit == 1
    # 64, then halved by each refusal down to one, then paused 0.5, 1, 2 s between tries: not 60 tries
    assert 7 <= len(rig.broker.subscribes) <= 12, [len(t) for t in rig.broker.subscribes]
    assert job.refusals == len(rig.broker.refused) > 0 and job.refusal == "Quota exceeded"
    assert rig.downloads.stalled(1.0) == [job] and job.progress() == 0.0
    assert rig.downloads.cancel_if_stalled(job, 1.0)
    assert not rig.downloads.jobs and rig.downloads.live() == 0


def test_a_chunk_the_broker_dropped_is_asked_for_again(rig_factory: Any) -> None:
    data = _data(9, 40)
    rig = rig_factory(window=16)
    job = rig.start("m", data, b"g")
    lost = T.chunk(job.doc.model.artifact.chunks[-1].sha256)
    rig.broker.lose.add(lost)
    finished, failed = rig.run(1, timeout=10, ask_again_after_s=0.3)
    assert finished and not failed
    assert sum(t.count(lost) for t in rig.broker.subscribes) == 2, "asked once, lost, asked again once"


def test_a_stalled_download_resumes_later_without_fetching_finished_chunks(rig_factory: Any) -> None:
    data = _data(10, 120)
    rig = rig_factory(window=16)
    job = rig.start("m", data, b"g")
    withheld = {T.chunk(ref.sha256) for ref in job.doc.model.artifact.chunks[50:55]}
    payloads = {t: rig.broker.payloads.pop(t) for t in withheld}
    deadline = time.monotonic() + 20
    while len(job.missing) > len(withheld):
        assert time.monotonic() < deadline, f"{len(job.missing)} chunks missing"
        rig.downloads.pump(ask_again_after_s=60.0)
        time.sleep(0.05)
    assert set(job.missing) == {t.rsplit("/", 1)[1] for t in withheld}
    time.sleep(0.2)
    assert rig.downloads.stalled(0.1) == [job] and rig.downloads.cancel_if_stalled(job, 0.1)
    assert rig.downloads.live() == 0 and not rig.broker.live

    rig.broker.payloads.update(payloads)  # published at last; the download is tried again
    asked = len(rig.broker.subscribes)
    again = rig.downloads.start(job.signed)
    assert again.resumed_chunks == again.total - len(withheld) and len(again.missing) == len(withheld)
    finished, failed = rig.run(1)
    assert finished == [again] and not failed
    assert sorted(t for ts in rig.broker.subscribes[asked:] for t in ts) == sorted(withheld)
    assert rig.store.blob_path(hashlib.sha256(data).hexdigest()).read_bytes() == data


def test_downloads_share_one_window(rig_factory: Any) -> None:
    rig = rig_factory(window=16)
    rig.broker.running.clear()
    one = rig.start("a", _data(11, 60), b"golden a")
    two = rig.start("b", _data(12, 60), b"golden b")
    assert rig.downloads.live() == 16 and len(one.requested) == 16 and not two.requested
    rig.broker.running.set()
    finished, failed = rig.run(2, ask_again_after_s=30.0)
    assert {j.name for j in finished} == {"a", "b"} and not failed
    assert rig.broker.most_live <= 16


# --- a real NATS server: a session gets at most 63 QoS 1 subscriptions --------------------------------

NATS_CHUNK = 1024
"""Small chunks make a bundle of about 300 cheap."""


def _nats_rig(tmp_path: Path, nats: Nats, qos: int) -> Rig[LiveBroker]:
    return Rig(tmp_path / f"state-qos{qos}", LiveBroker(nats.url, qos=qos), window=delivery.DEFAULT_WINDOW)


@pytest.mark.parametrize("qos", [delivery.CHUNK_QOS, 1], ids=["chunk-qos", "qos1"])
def test_three_hundred_chunks_from_nats(nats_broker: Nats, tmp_path: Path, qos: int) -> None:
    # At the shipped QoS 0 the limit does not apply; at QoS 1 NATS refuses the subscriptions beyond
    # 63 (the 4 held ones included) and the window comes down to what it grants.
    rig = _nats_rig(tmp_path, nats_broker, qos)
    try:
        data = random.Random(13).randbytes(295 * NATS_CHUNK + 5)
        job = rig.start("m", data, b"golden" * 50, chunk_size=NATS_CHUNK)
        assert job.total >= 297
        finished, failed = rig.run(1, timeout=120, ask_again_after_s=10.0)
        assert finished and not failed, failed
        assert rig.store.blob_path(hashlib.sha256(data).hexdigest()).read_bytes() == data
        assert job.fetched_chunks == job.total
        if qos == 0:
            assert not rig.broker.refused and rig.downloads.window.limit == delivery.DEFAULT_WINDOW
        else:
            assert rig.broker.refused, "NATS should have refused QoS 1 subscriptions beyond 63"
            assert rig.downloads.refusals == len(rig.broker.refused)
            assert rig.downloads.window.limit < delivery.DEFAULT_WINDOW
        # nothing left behind: no chunk subscription, none to be sent again after a reconnect
        assert not [t for t in rig.broker.transport.subscriptions if T.chunk_id(t)]
    finally:
        rig.close()


def test_the_transport_reports_the_filters_nats_refuses_and_forgets_them(nats_broker: Nats) -> None:
    refused: list[tuple[str, str]] = []
    t = Transport(MqttSettings(url=nats_broker.url, protocol="3.1.1", client_id="limits", reconnect_min_s=0.2,
                               reconnect_max_s=0.5), on_message=lambda m: None)
    t.start()
    try:
        assert t.wait_connected(30), t.last_error
        names = [f"limits/{i}" for i in range(70)]
        t.subscribe(names, qos=1, on_refused=refused.extend)
        t.subscribe([f"limits/zero/{i}" for i in range(100)], qos=0, on_refused=refused.extend)
        t.subscribe("limits/last", qos=0, wait=10)  # SUBACKs come in order: the others are in by now
        assert [name for name, _ in refused] == names[63:], refused
        assert {reason for _, reason in refused} == {"Unspecified error"}
        assert {n for n in t.subscriptions if n.startswith("limits/") and "/zero/" not in n} == \
            {*names[:63], "limits/last"}, "a refused filter is not sent again"
        # the reconnect sends what was granted, in one SUBSCRIBE: all of it is granted again
        nats_broker.restart()
        wait_for(lambda: t.reconnects >= 1 and t.connected, timeout=30, what="the reconnect")
        t.subscribe("limits/after", qos=0, wait=10)
        assert len(refused) == 7, refused[7:]
    finally:
        t.stop()
