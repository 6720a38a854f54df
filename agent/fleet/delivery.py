"""Chunked, resumable, delta downloads of deployment artifacts (docs/protocol.md §1 and §5).

A download needs every chunk of the model and golden artifacts. Chunks the device already holds, in
any stored blob, are copied locally; the rest are fetched from their retained `P/chunks/{sha256}`
topics a window at a time, so memory stays bounded however large the model is.

Each artifact is assembled in place in ``partial/{sha256}.part`` (a file of the artifact's size):
every verified chunk is written at its offsets, and the finished file is hashed, fsynced and renamed
into the blob store, with no copy. A download interrupted by a reconnect, a restart or a power cut
resumes with the chunks whose bytes are already in place (each is checked against its hash).

Chunks never wait for the daemon's loop thread. The MQTT network thread claims each arriving chunk
and hands it to a small pool of worker threads, which verify and write it (SHA-256, inflate, pwrite:
all release the GIL), hash what has become contiguous, and ask the broker for the next chunks, all
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
from typing import Any

from edgefleet.agent import faults
from edgefleet.agent.lifecycle.store import Store, fsync_dir
from edgefleet.errors import ChunkError, DeploymentRejected, StoreError
from edgefleet.protocol.chunks import decode_chunk
from edgefleet.protocol.documents import Artifact, ChunkRef, Deployment, Signed

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 64
WORKERS = 2
WRITEBACK_BYTES = 4 << 20
"""Written bytes after which the kernel is asked to start writing a download out, so that the fsync
that ends it has little left to do."""

Place = tuple[Path, int]
"""Where a chunk's bytes go: a .part file and an offset in it."""


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
    """One artifact being assembled in its .part file, hashed in order as its chunks arrive."""

    art: Artifact
    part: Path
    offsets: list[int]
    done: list[bool]
    next: int = 0
    hasher: Any = field(default_factory=hashlib.sha256)

    def advance(self) -> None:
        """Hash the chunks that are now in place after the last one hashed (the bytes are in the page cache).

        One thread at a time (the caller holds the job's hashing lock)."""
        if self.next < len(self.done) and self.done[self.next]:
            with open(self.part, "rb") as f:
                while self.next < len(self.done) and self.done[self.next]:
                    size = self.art.chunks[self.next].size
                    self.hasher.update(os.pread(f.fileno(), size, self.offsets[self.next]))
                    self.next += 1

    @property
    def complete(self) -> bool:
        """Every chunk is in place and hashed."""
        return self.next == len(self.done)


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
    hashing: threading.Lock = field(default_factory=threading.Lock)
    """Held while an artifact's running hash advances."""
    last_progress: float = field(default_factory=time.monotonic)
    """Monotonic time the download started or last stored a chunk: a stall is measured from here."""

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

    def advance(self, wait: bool = True) -> None:
        """Hash what is now contiguous in each artifact. Without `wait`, leave it to a thread already
        hashing (it, or the final `advance` before the artifact is checked, picks up these chunks)."""
        if self.hashing.acquire(blocking=wait):
            try:
                for assembly in self.assemblies:
                    assembly.advance()
            except OSError as err:
                if wait:
                    raise
                # the download was cancelled and its file dropped meanwhile; a live one is hashed
                # again, and any error reported, by the final advance before its check
                log.debug("model %s: hashing deferred: %s", self.name, err)
            finally:
                self.hashing.release()


class Downloads:
    """Every download in progress.

    `start`, `on_stored`, `finish` and `cancel` run on the loop thread, which owns the lifecycle;
    `on_chunk` runs on the MQTT network thread and the chunk work on the pool's threads. `_lock`
    guards the jobs and their chunk sets.
    """

    def __init__(self, store: Store, *, subscribe: Callable[[list[str]], None],
                 unsubscribe: Callable[[list[str]], None], chunk_topic: Callable[[str], str],
                 post: Callable[[ChunkStored], None], window: int = DEFAULT_WINDOW,
                 max_disk_fraction: float = 0.9, workers: int = WORKERS):
        self.store = store
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        self._topic = chunk_topic
        self._post = post
        self.window = window
        self.max_disk_fraction = max_disk_fraction
        self.jobs: dict[str, Job] = {}
        self._index: dict[tuple[str, int], dict[str, int]] = {}
        self._finished: list[str] = []
        """Chunks received whose subscriptions are still to be dropped."""
        self._lock = threading.RLock()
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
        job.advance()
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

    def _request_more(self, job: Job) -> list[str]:
        """Chunks to subscribe to now (under the lock; `_send` subscribes after it is released).

        Subscriptions go out a batch at a time (a quarter of the window) and finished ones are
        dropped a window at a time: a few packets per window instead of two per chunk."""
        if job.ended:
            return []
        while job.queue and job.queue[0] not in job.missing:
            job.queue.popleft()  # arrived meanwhile for another download
        free = self.window - len(job.requested) - len(job.working)
        if not job.queue or free < min(max(1, self.window // 4), len(job.queue)):
            return []
        wanted = [job.queue.popleft() for _ in range(min(free, len(job.queue)))]
        wanted = [sha for sha in wanted if sha in job.missing]
        job.requested.update(wanted)
        return [self._topic(sha) for sha in wanted]

    def _send(self, job: Job | None, flush: bool = False) -> None:
        """Ask for the next chunks of `job` and drop finished subscriptions (not under the lock: the
        transport has locks of its own)."""
        with self._lock:
            topics = self._request_more(job) if job is not None else []
            done: list[str] = []
            if self._finished and (flush or topics or len(self._finished) >= self.window):
                asked = {sha for j in self.jobs.values() for sha in j.requested}  # asked for again since
                done = [self._topic(sha) for sha in self._finished if sha not in asked]
                self._finished = []
        if topics:
            self._subscribe(topics)
        if done:
            self._unsubscribe(done)

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
            self._finished.append(sha)
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
                job.advance(wait=False)
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
        """Verify each assembled artifact and move it into the blob store (fsynced rename, no copy)."""
        self._send(None, flush=True)
        with job.hashing:  # a worker may still be about to advance the hash
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
                self._finished += [sha for sha in job.requested if sha not in others]
        self._send(None, flush=True)

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
    """Check an assembled artifact's size and SHA-256 (hashed as its chunks arrived), fsync, rename into the store."""
    art, part = assembly.art, assembly.part
    assembly.advance()
    with open(part, "rb+") as f:
        size = os.fstat(f.fileno()).st_size
        if size != art.size or not assembly.complete:
            raise StoreError(f"artifact {art.sha256[:12]}: assembled {size} bytes ({assembly.next} of "
                             f"{len(assembly.done)} chunks), expected {art.size}")
        if assembly.hasher.hexdigest() != art.sha256:
            part.unlink(missing_ok=True)
            raise StoreError(f"artifact {art.sha256[:12]}: SHA-256 of the assembled chunks does not match")
        os.fsync(f.fileno())
    target = store.blob_path(art.sha256)
    os.replace(part, target)
    fsync_dir(target.parent)
    return target
