"""Downloads on their own: the chunk work happens on the network and worker threads, the loop thread
only starts and finishes. A stand-in broker delivers the chunks it was asked for from a thread of its
own, as paho's network thread does; the store, the files and the hashing are real."""

from __future__ import annotations

import hashlib
import os
import queue
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.fleet import delivery
from edgefleet.agent.fleet.delivery import ChunkStored, Downloads, Job
from edgefleet.agent.lifecycle.store import Store
from edgefleet.errors import DeploymentRejected
from edgefleet.protocol import Topics
from edgefleet.protocol.chunks import split
from edgefleet.protocol.documents import Artifact, Signed

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
    """Retained chunks by topic; delivers each subscribed one once, in subscription order, from its own
    thread, and keeps count of what was subscribed and not yet dropped."""

    def __init__(self, payloads: dict[str, bytes]):
        self.payloads = payloads
        self.pending: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.live: set[str] = set()
        self.subscribes: list[list[str]] = []
        self.unsubscribes: list[list[str]] = []
        self.downloads: Downloads | None = None
        self.running = threading.Event()
        self.running.set()
        self.thread = threading.Thread(target=self._deliver, daemon=True)

    def subscribe(self, topics: list[str]) -> None:
        with self.lock:
            self.subscribes.append(list(topics))
            self.live.update(topics)
        for topic in topics:
            self.pending.put(topic)

    def unsubscribe(self, topics: list[str]) -> None:
        with self.lock:
            self.unsubscribes.append(list(topics))
            self.live.difference_update(topics)

    def _deliver(self) -> None:
        while (topic := self.pending.get()) is not None:
            self.running.wait()
            with self.lock:
                if topic not in self.live or self.downloads is None:
                    continue
            self.downloads.on_chunk(topic.rsplit("/", 1)[1], self.payloads[topic])

    def close(self) -> None:
        self.pending.put(None)
        self.thread.join(10)


class Rig:
    """Downloads with a stand-in broker and the loop thread's side played by `run`."""

    def __init__(self, root: Path, payloads: dict[str, bytes], window: int = 8):
        self.store = Store(root)
        self.broker = Broker({T.chunk(sha): p for sha, p in payloads.items()})
        self.posted: queue.SimpleQueue[ChunkStored] = queue.SimpleQueue()
        self.downloads = Downloads(self.store, subscribe=self.broker.subscribe, unsubscribe=self.broker.unsubscribe,
                                   chunk_topic=T.chunk, post=self.posted.put, window=window)
        self.broker.downloads = self.downloads
        self.broker.thread.start()

    def start(self, name: str, data: bytes, golden: bytes, version: int = 1) -> Job:
        art, art_payloads = split(data, CHUNK)
        gold, gold_payloads = split(golden, CHUNK)
        for a, payloads in ((art, art_payloads), (gold, gold_payloads)):
            for ref, payload in zip(a.chunks, payloads, strict=True):
                self.broker.payloads[T.chunk(ref.sha256)] = payload
        doc: Any = _Doc(deployment_id=f"{name}-{version}", model=_Model(name, version, art, gold))
        return self.downloads.start(Signed(doc, {}))

    def run(self, jobs: int, timeout: float = 30.0) -> tuple[list[Job], list[DeploymentRejected]]:
        """Play the loop thread until `jobs` downloads ended; finish the complete ones."""
        finished: list[Job] = []
        failed: list[DeploymentRejected] = []
        while len(finished) + len(failed) < jobs:
            msg = self.posted.get(timeout=timeout)
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
    rigs: list[Rig] = []

    def make(payloads: dict[str, bytes] | None = None, window: int = 8) -> Rig:
        rigs.append(Rig(tmp_path / f"state{len(rigs)}", payloads or {}, window=window))
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

    def counting(topics: list[str]) -> None:
        with rig.downloads._lock:
            asked.append(sum(len(j.requested) + len(j.working) for j in rig.downloads.jobs.values()))
        subscribe(topics)

    rig.downloads._subscribe = counting
    rig.start("m", data, b"g" * 10)
    finished, failed = rig.run(1)
    assert finished and not failed
    assert max(asked) <= 16, asked
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
