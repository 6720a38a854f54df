"""Chunked, resumable, delta downloads of deployment artifacts (docs/protocol.md §1 and §5).

A download needs every chunk of the model and golden artifacts. Chunks the device already holds, in
any stored blob, are copied locally; the rest are fetched from their retained `P/chunks/{sha256}`
topics a window at a time, so memory stays bounded however large the model is.

Each artifact is assembled in place in ``partial/{sha256}.part`` (a file of the artifact's size):
every verified chunk is written at its offsets, and the finished file is fsynced and renamed into the
blob store, with no copy. A download interrupted by a reconnect, a restart or a power cut resumes with
the chunks whose bytes are already in place (each is checked against its hash).

Every byte of the file is checked once, against the digest of the chunk that carries it: a fetched
chunk when it arrives, a chunk copied from a local blob or found in place when it is read. The chunk
digests and sizes are in the signed deployment document, and the offsets follow from the sizes, so a
complete file holds exactly the bytes the publisher chunked; hashing the whole file again would read
and hash every byte a second time to learn nothing more (docs/protocol.md §5).

Chunk subscriptions are QoS 0, and at most a window of them is live at once. QoS 1 would add nothing:
a chunk is checked against its SHA-256 whatever the QoS, the session is clean (so messages in flight
at a disconnect are lost at either QoS, and the transport's resubscription after the reconnect makes
the broker send the retained chunks again), and a broker that drops messages under pressure drops
QoS 1 ones too. It would cost: a PUBACK per chunk, the broker's in-flight limit pacing the window,
and on NATS a JetStream consumer per subscription, each reserving 1024 unacknowledged messages of the
session's 65535, so at most 63 subscriptions. What a lost chunk costs instead is time: a download
that gets no chunk for a while asks again for the ones outstanding (a new SUBSCRIBE makes the broker
send the retained message again), and one that still gets none fails as stalled and resumes later.

The window adapts to what the broker grants, since brokers may cap a session's subscriptions (EMQX,
VerneMQ and HiveMQ by configuration; NATS for QoS 1): a refused subscription returns its chunk to
the queue and halves the window, and every chunk that arrives grows it by a fraction, one more per
window's worth of chunks, back up to its ceiling (additive increase, multiplicative decrease, as TCP
paces itself).

Chunks never wait for the daemon's loop thread. The MQTT network thread claims each arriving chunk
and hands it to a small pool of worker threads, which verify and write it (SHA-256, inflate, pwrite:
all release the GIL) and ask the broker for the next chunks, all
under one lock over the download state. Only a finished or failed download goes to the loop thread, as
a `ChunkStored` message on the daemon's queue, so the network thread stays free to acknowledge the
next messages and a download costs the loop thread two steps, not one per chunk.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.agent import faults
from edgefleet.agent.lifecycle.store import Store, fsync_dir
from edgefleet.errors import ChunkError, DeploymentRejected, StoreError
from edgefleet.protocol.chunks import decode_chunk
from edgefleet.protocol.documents import Artifact, ChunkRef, Deployment, Signed
from edgefleet.transport import RefusalHandler

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 64
"""Most chunk subscriptions live at once (the window's ceiling)."""
CHUNK_QOS = 0
"""The QoS of chunk subscriptions (the module docstring says why 0 is enough)."""
WORKERS = 2
HOLD_S = (0.5, 10.0)
"""After a refusal at a window of one, no chunk is asked for during a pause that doubles from the first
figure to the second while refusals go on (a broker that refuses every chunk topic is not asked five
times a second until the download fails as stalled)."""
WRITEBACK_BYTES = 4 << 20
"""Written bytes after which the kernel is asked to start writing a download out, so that the fsync
that ends it has little left to do."""

Place = tuple[Path, int]
"""Where a chunk's bytes go: a .part file and an offset in it."""


class Window:
    """How many chunk subscriptions may be live at once: halved when the broker refuses one, grown by
    one per window's worth of chunks that arrive, between 1 and `ceiling`."""

    def __init__(self, ceiling: int):
        if ceiling < 1:
            raise ValueError(f"window: expected at least 1, got {ceiling}")
        self.ceiling = ceiling
        self.size = float(ceiling)
        self.rounds = 0
        """SUBSCRIBEs sent."""
        self._shrunk_after = 0
        """Refusals of SUBSCRIBEs sent up to this round were answered by the last halving."""

    @property
    def limit(self) -> int:
        """Chunk subscriptions that may be live now."""
        return max(1, int(self.size))

    @property
    def batch(self) -> int:
        """Subscriptions are sent, and finished ones dropped, this many at a time: a few packets per
        window instead of two per chunk."""
        return max(1, self.limit // 4)

    def sent(self) -> int:
        """A SUBSCRIBE goes out: its round, for `refused`."""
        self.rounds += 1
        return self.rounds

    def arrived(self) -> None:
        """A chunk arrived: its subscription was granted."""
        self.size = min(float(self.ceiling), self.size + 1.0 / self.size)

    def refused(self, round_: int) -> bool:
        """The SUBSCRIBE of `round_` had filters refused: halve, unless a halving already answered it (the
        SUBSCRIBEs already on the wire were sized before that halving). True when the limit fell."""
        if round_ <= self._shrunk_after:
            return False
        self._shrunk_after = self.rounds
        before = self.limit
        self.size = max(1.0, self.size / 2)
        return self.limit < before


@dataclass(frozen=True)
class ChunkStored:
    """A worker verified and wrote a chunk (or could not, with the reason)."""

    model: str
    deployment_id: str
    sha256: str
    wire_bytes: int
    error: str | None = None
    disk_full: bool = False
    """The chunk could not be written for lack of space (ENOSPC, EDQUOT)."""
    complete: bool = False
    """Every chunk of the download is in place: the loop thread finishes it."""


@dataclass
class Assembly:
    """One artifact being assembled in its .part file."""

    art: Artifact
    part: Path
    offsets: list[int]
    done: list[bool]

    @property
    def in_place(self) -> int:
        """Chunks verified and written."""
        return sum(self.done)

    @property
    def complete(self) -> bool:
        """Every chunk is verified and in place."""
        return all(self.done)


@dataclass
class Job:
    """One deployment being downloaded."""

    signed: Signed[Deployment]
    refs: dict[str, ChunkRef]
    places: dict[str, list[Place]]
    where: dict[str, list[tuple[Assembly, int]]]
    missing: dict[str, None]
    """Chunks still needed, in artifact order (a dict: ordered, and O(1) to remove from)."""
    requested: set[str] = field(default_factory=set)
    """Subscribed to, not yet arrived."""
    working: set[str] = field(default_factory=set)
    """Arrived, being verified and written by a worker."""
    queue: deque[str] = field(default_factory=deque)
    """Missing chunks not yet subscribed to."""
    fetched_bytes: int = 0
    fetched_chunks: int = 0
    local_bytes: int = 0
    resumed_chunks: int = 0
    assemblies: list[Assembly] = field(default_factory=list)
    """The artifacts this job assembles."""
    unflushed: int = 0
    """Bytes written since the kernel was last asked to start writing them out."""
    ended: bool = False
    """Complete or failed: reported to the loop thread, nothing more is asked for."""
    last_progress: float = field(default_factory=time.monotonic)
    """Monotonic time the download started or last stored a chunk: a stall is measured from here."""
    asked_again: float = 0.0
    """Monotonic time the outstanding chunks were last asked for again."""
    refusals: int = 0
    """Chunk subscriptions of this download the broker refused."""
    refusal: str = ""
    """The broker's reason for the last one."""

    @property
    def doc(self) -> Deployment:
        """The deployment document."""
        return self.signed.doc

    @property
    def name(self) -> str:
        """Model name."""
        return self.doc.model.name

    @property
    def total(self) -> int:
        """Distinct chunks needed."""
        return len(self.refs)

    def progress(self) -> float:
        """Fraction of chunks in hand."""
        return 1.0 - len(self.missing) / self.total if self.total else 1.0

    def mark_done(self, sha: str) -> None:
        """A chunk is in place at every offset where its artifacts use it."""
        for assembly, index in self.where[sha]:
            assembly.done[index] = True


class Downloads:
    """Every download in progress.

    `start`, `on_stored`, `finish` and `cancel` run on the loop thread, which owns the lifecycle;
    `on_chunk` runs on the MQTT network thread and the chunk work on the pool's threads. `_lock`
    guards the jobs and their chunk sets.
    """

    def __init__(self, store: Store, *, subscribe: Callable[[list[str], RefusalHandler], None],
                 unsubscribe: Callable[[list[str]], None], chunk_topic: Callable[[str], str],
                 post: Callable[[ChunkStored], None], window: int = DEFAULT_WINDOW,
                 max_disk_fraction: float = 0.9, workers: int = WORKERS):
        self.store = store
        self._subscribe = subscribe
        """Subscribes to chunk topics; the broker's refusals go to the handler (see Transport.subscribe)."""
        self._unsubscribe = unsubscribe
        self._topic = chunk_topic
        self._post = post
        self.window = Window(window)
        self.max_disk_fraction = max_disk_fraction
        self.jobs: dict[str, Job] = {}
        self._index: dict[tuple[str, int], dict[str, int]] = {}
        self._subscribed: set[str] = set()
        """Chunks subscribed to that have not arrived (nor been refused or dropped)."""
        self._finished: dict[str, None] = {}
        """Chunks received whose subscriptions are still to be dropped (in order)."""
        self.refusals = 0
        """Chunk subscriptions the broker refused since the start."""
        self._hold = HOLD_S[0]
        self._held_until = 0.0
        self._lock = threading.RLock()
        self._send_lock = threading.Lock()
        """Held from deciding what to (un)subscribe until the transport has it: the packets go out in the
        order they were decided, so a drop decided earlier never follows a new subscription of the same
        chunk. Never taken on the network thread, which the transport's own locks may wait for."""
        self._work: queue.SimpleQueue[tuple[list[Job], ChunkRef, bytes] | None] = queue.SimpleQueue()
        self._workers = [threading.Thread(target=self._work_loop, name=f"edge-agent-chunk-{i}", daemon=True)
                         for i in range(workers)]
        self._started = self._closed = False

    def part_path(self, art: Artifact) -> Path:
        """Where an artifact is assembled."""
        return self.store.partial / f"{art.sha256}.part"

    # --- starting ------------------------------------------------------------------------------

    def start(self, signed: Signed[Deployment]) -> Job:
        """Begin (or resume) a download; the job may have nothing missing (all chunks local)."""
        self.cancel(signed.doc.model.name)
        job = self._prepare(signed)  # not under the lock: it may read and hash a lot from disk
        with self._lock:
            self.jobs[job.name] = job
        self._send(job)
        return job

    def _prepare(self, signed: Signed[Deployment]) -> Job:
        doc = signed.doc
        self._check_disk(doc)
        artifacts = [art for art in (doc.model.artifact, doc.model.golden) if not self.store.has_blob(art.sha256)]
        self._drop_stale_parts({self.part_path(a) for a in artifacts})
        refs: dict[str, ChunkRef] = {}
        places: dict[str, list[Place]] = {}
        where: dict[str, list[tuple[Assembly, int]]] = {}
        resumed_parts = set()
        assemblies: list[Assembly] = []
        for art in artifacts:
            part = self.part_path(art)
            if part.exists() and part.stat().st_size == art.size:
                resumed_parts.add(part)
            else:
                with open(part, "wb") as f:
                    f.truncate(art.size)  # sparse until written
            offsets = [0]
            for ref in art.chunks[:-1]:
                offsets.append(offsets[-1] + ref.size)
            assembly = Assembly(art=art, part=part, offsets=offsets, done=[False] * len(art.chunks))
            assemblies.append(assembly)
            for index, ref in enumerate(art.chunks):
                refs.setdefault(ref.sha256, ref)
                places.setdefault(ref.sha256, []).append((part, offsets[index]))
                where.setdefault(ref.sha256, []).append((assembly, index))
        job = Job(signed=signed, refs=refs, places=places, where=where, missing={}, assemblies=assemblies)
        local = self._local_chunks(doc.model.artifact.chunk_size, doc.model.golden.chunk_size) if refs else {}
        for sha, ref in refs.items():
            if all(p in resumed_parts for p, _ in places[sha]) and _in_place(places[sha], ref, sha):
                job.resumed_chunks += 1
            elif sha in local:
                _write_places(places[sha], self._read_local(sha, local[sha], ref.size))
                job.local_bytes += ref.size
            else:
                job.missing[sha] = None
                continue
            job.mark_done(sha)
        job.queue.extend(job.missing)
        job.ended = not job.missing
        log.info("model %s: v%s needs %d of %d chunks (%d already downloaded, %d bytes copied from local models)",
                 job.name, doc.model.version, len(job.missing), job.total, job.resumed_chunks, job.local_bytes)
        return job

    def _check_disk(self, doc: Deployment) -> None:
        need = doc.model.artifact.size + doc.model.golden.size  # assembled in place, renamed without a copy
        usage = shutil.disk_usage(self.store.root)
        if usage.used + need > usage.total * self.max_disk_fraction:
            raise DeploymentRejected(
                f"not enough disk space: the download needs {need} bytes, {usage.free} free and at most "
                f"{self.max_disk_fraction:.0%} of the disk may be used", step="DOWNLOADING")

    def _drop_stale_parts(self, keep: set[Path]) -> None:
        busy = {self.part_path(a) for j in self.jobs.values() for a in (j.doc.model.artifact, j.doc.model.golden)}
        for path in self.store.partial.iterdir():
            if path not in keep and path not in busy:
                try:
                    path.unlink() if path.is_file() else shutil.rmtree(path)
                except OSError as err:
                    log.warning("cannot remove stale partial download %s: %s", path.name, err.strerror)

    def _local_chunks(self, *chunk_sizes: int) -> dict[str, tuple[Path, int]]:
        """Chunks inside stored blobs, by digest, for the chunk sizes of this deployment."""
        found: dict[str, tuple[Path, int]] = {}
        for blob in self.store.blobs_on_disk():
            for size in set(chunk_sizes):
                key = (blob.name, size)
                if key not in self._index:
                    self._index[key] = _chunk_offsets(blob, size)
                for sha, offset in self._index[key].items():
                    found.setdefault(sha, (blob, offset))
        return found

    def _read_local(self, sha: str, where: tuple[Path, int], size: int) -> bytes:
        blob, offset = where
        with open(blob, "rb") as f:
            data = os.pread(f.fileno(), size, offset)
        if hashlib.sha256(data).hexdigest() != sha:  # the blob changed under us
            raise StoreError(f"stored blob {blob.name[:12]} no longer matches its chunk index")
        return data

    # --- receiving -----------------------------------------------------------------------------

    def live(self) -> int:
        """Chunk subscriptions the broker holds for the downloads (or is about to)."""
        with self._lock:
            return len(self._subscribed) + len(self._finished)

    def _request_more(self, job: Job) -> list[str]:
        """Chunks of `job` to subscribe to now, within its share of the window (under the lock)."""
        if job.ended or not job.queue:
            return []
        limit = self.window.limit if time.monotonic() >= self._held_until else 0
        active = sum(1 for j in self.jobs.values() if not j.ended and (j.queue or j.requested))
        share = -(-limit // max(1, active))  # the window is the session's: running downloads split it
        room = min(limit - len(self._subscribed) - len(self._finished), share - len(job.requested))
        if room < min(self.window.batch, share, len(job.queue)):
            room = 0  # wait for a batch's worth of room
        wanted: list[str] = []
        while job.queue:
            sha = job.queue[0]
            if sha in job.missing and sha not in job.requested and sha not in job.working:
                if sha in self._subscribed:
                    job.requested.add(sha)  # another download asked for it: the one message serves both
                elif len(wanted) < room:
                    job.requested.add(sha)
                    self._finished.pop(sha, None)  # still subscribed after arriving for another: asked again
                    self._subscribed.add(sha)
                    wanted.append(sha)
                else:
                    break
            job.queue.popleft()
        return wanted

    def _send(self, first: Job | None = None, flush: bool = False) -> None:
        """Drop finished subscriptions (a batch at a time, all with `flush`) and ask for the next chunks,
        of `first` before the other downloads (not under the lock: the transport has locks of its own).

        Every download is served, not only the one whose chunk just arrived: one that has nothing
        outstanding hears of no arrival, and would wait for room another one left."""
        with self._send_lock:
            with self._lock:
                done: list[str] = []
                if self._finished and (flush or len(self._finished) >= self.window.batch):
                    done = [self._topic(sha) for sha in self._finished]
                    self._finished = {}
                jobs = sorted(self.jobs.values(), key=lambda j: j is not first)
                wanted = [sha for job in jobs for sha in self._request_more(job)]
                round_ = self.window.sent() if wanted else 0
            if done:
                self._unsubscribe(done)
            if wanted:
                self._ask(wanted, round_)

    def _ask(self, shas: list[str], round_: int) -> None:
        """Subscribe to chunk topics (holding the send lock, not the lock)."""
        self._subscribe([self._topic(sha) for sha in shas], lambda refused: self._on_refused(round_, refused))

    def _on_refused(self, round_: int, refused: list[tuple[str, str]]) -> None:
        """The broker refused chunk subscriptions (network thread): their chunks go back to the front of
        their downloads' queues and the window shrinks; they are asked for again as room comes back."""
        with self._lock:
            by_topic = {self._topic(sha): sha for sha in self._subscribed}
            back = 0
            reason = ""
            for topic, reason in refused:
                sha = by_topic.get(topic)
                if sha is None:
                    continue  # arrived, dropped or cancelled meanwhile
                self._subscribed.discard(sha)
                back += 1
                for job in self.jobs.values():
                    if sha in job.requested:
                        job.requested.discard(sha)
                        job.queue.appendleft(sha)
                        job.refusals += 1
                        job.refusal = reason
            if not back:
                return
            self.refusals += back
            floor = self.window.limit == 1
            shrunk = self.window.refused(round_)
            limit = self.window.limit
            if floor:
                self._held_until = time.monotonic() + self._hold
                self._hold = min(HOLD_S[1], self._hold * 2)
        if shrunk:
            log.info("broker refused %d chunk subscription(s) (%s): at most %d at a time now", back, reason, limit)
        else:
            log.debug("broker refused %d chunk subscription(s) (%s); window %d", back, reason, limit)

    def pump(self, ask_again_after_s: float) -> None:
        """Loop thread, periodically: ask for chunks where no arrival would (a download that started while
        others held the window, or whose every subscription was refused), and ask again for the chunks of
        a download that got none for `ask_again_after_s` (a message the broker dropped)."""
        now = time.monotonic()
        for job in list(self.jobs.values()):
            again: list[str] = []
            with self._lock:
                if not job.ended and job.requested and now - max(job.last_progress, job.asked_again) >= ask_again_after_s:
                    job.asked_again = now
                    again = sorted(sha for sha in job.requested if sha in self._subscribed)
            if again:
                log.info("model %s: no chunk for %.0f s, asking again for the %d outstanding", job.name,
                         now - job.last_progress, len(again))
                with self._send_lock:
                    with self._lock:
                        round_ = self.window.sent()
                    self._ask(again, round_)
        self._send()

    def wanted(self, sha: str) -> bool:
        """True when a download in progress asked for this chunk and has not received it."""
        with self._lock:
            return any(sha in job.requested for job in self.jobs.values())

    def on_chunk(self, sha: str, payload: bytes) -> None:
        """A chunk payload arrived (MQTT network thread): hand it to a worker to verify and write."""
        with self._lock:
            jobs = [job for job in self.jobs.values() if sha in job.requested]
            if not jobs:
                return  # not asked for, or already arrived (a retained copy republished meanwhile)
            if sha in self._subscribed:
                self._subscribed.discard(sha)
                self.window.arrived()
                self._hold = HOLD_S[0]
            self._finished[sha] = None
            for job in jobs:  # every download waiting for this chunk gets it from this one message
                job.requested.discard(sha)
                job.working.add(sha)
            if not self._started and not self._closed:
                self._started = True
                for worker in self._workers:
                    worker.start()
        self._work.put((jobs, jobs[0].refs[sha], payload))

    def _work_loop(self) -> None:
        while (item := self._work.get()) is not None:
            if self._closed:
                continue  # stopping: chunks not stored yet are fetched again on resume
            try:
                self._store_chunk(*item)
            except Exception:  # a worker must outlive any one chunk
                log.exception("chunk worker failed")

    def _store_chunk(self, jobs: list[Job], ref: ChunkRef, payload: bytes) -> None:
        """Worker thread: verify one chunk and write it where each download needs it, hash what is now
        contiguous, ask for more."""
        error = None
        full = False
        try:
            _write_places([p for job in jobs for p in job.places[ref.sha256]], decode_chunk(ref, payload))
            faults.point("download:chunk")
        except ChunkError as err:
            error = str(err)  # decode_chunk names the chunk
        except OSError as err:
            error = f"cannot store chunk: {err.strerror or err}"
            full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        except Exception as err:  # report anything else too: the loop must hear back about a failure
            error = f"cannot store chunk: {type(err).__name__}: {err}"
        for job in jobs:
            if self._stored(job, ref, len(payload), error, full):
                self._send(job)

    def _stored(self, job: Job, ref: ChunkRef, wire_bytes: int, error: str | None, full: bool) -> bool:
        """Account for a chunk of `job` that a worker stored (or failed to); True while the download
        goes on, False once it ended."""
        sha = ref.sha256
        with self._lock:
            if self.jobs.get(job.name) is not job or job.ended:
                job.working.discard(sha)
                return False  # cancelled, replaced or already failed meanwhile
            if error is None and sha in job.missing:
                del job.missing[sha]
                job.last_progress = time.monotonic()
                job.fetched_bytes += wire_bytes
                job.fetched_chunks += 1
                job.mark_done(sha)
                job.unflushed += len(job.places[sha]) * ref.size
            if error is not None or (not job.missing and len(job.working) == 1):
                job.ended = True
                # posted before `working` empties: whoever sees the job idle finds the report queued
                self._post(ChunkStored(model=job.name, deployment_id=job.doc.deployment_id, sha256=sha,
                                       wire_bytes=wire_bytes, error=error, disk_full=full,
                                       complete=error is None))
                job.working.discard(sha)
                return False
            job.working.discard(sha)
            flush = job.unflushed >= WRITEBACK_BYTES
            if flush:
                job.unflushed = 0
        if flush:
            for assembly in job.assemblies:
                _start_writeback(assembly.part)
        return True

    def on_stored(self, msg: ChunkStored) -> list[Job]:
        """A download ended (loop thread): return it when it is complete.

        Raises DeploymentRejected (with the model name in `details["model"]`) when a chunk did not
        verify or could not be written: a tampered or corrupt chunk, or a full disk, ends that download.
        """
        job = self.jobs.get(msg.model)
        if job is None or job.doc.deployment_id != msg.deployment_id:
            return []  # the download was cancelled or replaced meanwhile
        if msg.error is not None:
            self.cancel(job.name)
            if msg.disk_full:  # nothing more fits: give back the space the refused download took
                self._drop_stale_parts(set())
            raise DeploymentRejected(msg.error, step="DOWNLOADING", details={"model": job.name})
        return [job] if msg.complete else []

    # --- finishing -----------------------------------------------------------------------------

    def finish(self, job: Job) -> None:
        """Check each assembled artifact and move it into the blob store (fsynced rename, no copy)."""
        self._send(flush=True)
        for assembly in job.assemblies:
            if not self.store.has_blob(assembly.art.sha256):
                finish_part(self.store, assembly)
                faults.point("download:assembled")
        with self._lock:
            self.jobs.pop(job.name, None)
        self._index = {k: v for k, v in self._index.items() if (self.store.blobs / k[0]).exists()}
        for assembly in job.assemblies:  # the new blobs' chunks are known: no need to hash them again
            index = self._index.setdefault((assembly.art.sha256, assembly.art.chunk_size), {})
            for ref, offset in zip(assembly.art.chunks, assembly.offsets, strict=True):
                index.setdefault(ref.sha256, offset)

    def cancel(self, name: str) -> None:
        """Stop a download; its assembled bytes stay in partial/ for a later resume of the same artifact."""
        with self._lock:
            job = self.jobs.pop(name, None)
            if job is not None:
                job.ended = True
                others = {sha for j in self.jobs.values() for sha in j.requested}
                for sha in job.requested - others:
                    self._subscribed.discard(sha)
                    self._finished[sha] = None
        self._send(flush=True)

    def close(self) -> None:
        """Stop the worker threads (pending chunks are fetched again on resume)."""
        self._closed = True
        for _ in self._workers:
            self._work.put(None)
        if self._started:
            for worker in self._workers:
                worker.join()

    def stalled(self, timeout_s: float) -> list[Job]:
        """Downloads that stored no chunk for `timeout_s` seconds (a withheld or lost chunk)."""
        now = time.monotonic()
        with self._lock:
            return [job for job in self.jobs.values()
                    if not job.ended and job.missing and now - job.last_progress > timeout_s]

    def cancel_if_stalled(self, job: Job, timeout_s: float) -> bool:
        """Cancel `job` if it is still the live download of its model and still stalled (a worker may have
        stored its last chunk since `stalled` looked); True when it was cancelled."""
        with self._lock:
            if self.jobs.get(job.name) is not job or job.ended or not job.missing \
                    or time.monotonic() - job.last_progress <= timeout_s:
                return False
        self.cancel(job.name)
        return True

    def names(self) -> Iterable[str]:
        """Models being downloaded."""
        return list(self.jobs)


def _write_places(places: list[Place], data: bytes) -> None:
    # No fsync per chunk (it would cost more than the network): a chunk torn by a power cut fails its
    # hash when the download resumes and is fetched again. The finished artifact is fsynced.
    for path, offset in places:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(path: Path) -> None:
    """Ask the kernel to start writing a file's dirty pages out, without waiting (Linux; elsewhere the
    final fsync does it all)."""
    if _SYNC_FILE_RANGE is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # dropped meanwhile
    try:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)
    finally:
        os.close(fd)


def _in_place(places: list[Place], ref: ChunkRef, sha: str) -> bool:
    for path, offset in places:
        with open(path, "rb") as f:
            data = os.pread(f.fileno(), ref.size, offset)
        if len(data) != ref.size or hashlib.sha256(data).hexdigest() != sha:
            return False
    return True


def _chunk_offsets(blob: Path, chunk_size: int) -> dict[str, int]:
    offsets: dict[str, int] = {}
    with open(blob, "rb") as f:
        offset = 0
        while True:
            data = f.read(chunk_size)
            if not data:
                break
            offsets.setdefault(hashlib.sha256(data).hexdigest(), offset)
            offset += len(data)
    return offsets


def finish_part(store: Store, assembly: Assembly) -> Path:
    """Check that an assembled artifact has its size and every chunk verified in place, fsync, rename into
    the store (the module docstring says why the whole file is not hashed again)."""
    art, part = assembly.art, assembly.part
    with open(part, "rb+") as f:
        size = os.fstat(f.fileno()).st_size
        if size != art.size or not assembly.complete:
            raise StoreError(f"artifact {art.sha256[:12]}: assembled {size} bytes ({assembly.in_place} of "
                             f"{len(assembly.done)} chunks), expected {art.size}")
        os.fdatasync(f.fileno())  # the size was set when the file was made: data is all that is left
    target = store.blob_path(art.sha256)
    os.replace(part, target)
    fsync_dir(target.parent)
    return target
