"""Chunked, resumable, delta downloads of deployment artifacts (DESIGN.md, "Topics" and chunking).

A download needs every chunk of the model and golden artifacts. Chunks the device already holds, in
any stored blob, are copied locally; the rest are fetched from their retained `P/chunks/{sha256}`
topics a window at a time, so memory stays bounded however large the model is.

Each artifact is assembled in place in ``partial/{sha256}.part`` (a file of the artifact's size):
every verified chunk is written at its offsets, and the finished file is hashed, fsynced and renamed
into the blob store, with no copy. A download interrupted by a reconnect, a restart or a power cut
resumes with the chunks whose bytes are already in place (each is checked against its hash).

Verifying and writing chunks (SHA-256, inflate, pwrite: all release the GIL) happens on a small pool
of worker threads; each result comes back to the loop thread, which owns the download state, as a
`ChunkStored` message on the daemon's queue.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import faults
from agent.errors import ChunkError, DeploymentRejected, StoreError
from agent.protocol.chunks import decode_chunk
from agent.protocol.documents import Artifact, ChunkRef, Deployment
from agent.store import Store, fsync_dir

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 64
WORKERS = 2

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
        """Hash the chunks that are now in place after the last one hashed (the bytes are in the page cache)."""
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

    doc: Deployment
    raw: dict[str, object]
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
        """A chunk is in place at every offset where its artifacts use it: hash what is now contiguous."""
        for assembly, index in self.where[sha]:
            assembly.done[index] = True
        for assembly in {id(a): a for a, _ in self.where[sha]}.values():
            assembly.advance()

    @property
    def assemblies(self) -> list[Assembly]:
        """The artifacts this job assembles."""
        return list({id(a): a for pairs in self.where.values() for a, _ in pairs}.values())


class Downloads:
    """Every download in progress; driven by the thread that owns the lifecycle."""

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
        self._finished_topics: list[str] = []
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edge-agent-chunk")

    def part_path(self, art: Artifact) -> Path:
        """Where an artifact is assembled."""
        return self.store.partial / f"{art.sha256}.part"

    # --- starting ------------------------------------------------------------------------------

    def start(self, doc: Deployment, raw: dict[str, object]) -> Job:
        """Begin (or resume) a download; the job may have nothing missing (all chunks local)."""
        self.cancel(doc.model.name)
        self._check_disk(doc)
        artifacts = [art for art in (doc.model.artifact, doc.model.golden) if not self.store.has_blob(art.sha256)]
        self._drop_stale_parts({self.part_path(a) for a in artifacts})
        refs: dict[str, ChunkRef] = {}
        places: dict[str, list[Place]] = {}
        where: dict[str, list[tuple[Assembly, int]]] = {}
        resumed_parts = set()
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
            for index, ref in enumerate(art.chunks):
                refs.setdefault(ref.sha256, ref)
                places.setdefault(ref.sha256, []).append((part, offsets[index]))
                where.setdefault(ref.sha256, []).append((assembly, index))
        job = Job(doc=doc, raw=raw, refs=refs, places=places, where=where, missing={})
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
        self.jobs[job.name] = job
        log.info("model %s: v%s needs %d of %d chunks (%d already downloaded, %d bytes copied from local models)",
                 job.name, doc.model.version, len(job.missing), job.total, job.resumed_chunks, job.local_bytes)
        self._request_more(job)
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

    def _request_more(self, job: Job) -> None:
        # Subscriptions go out a batch at a time (a quarter of the window) and finished ones are
        # dropped in the same breath: one packet per batch instead of two per chunk.
        while job.queue and job.queue[0] not in job.missing:
            job.queue.popleft()  # arrived meanwhile for another download
        in_flight = len(job.requested) + len(job.working)
        free = self.window - in_flight
        if job.queue and free >= min(max(1, self.window // 4), len(job.queue)):
            wanted = [job.queue.popleft() for _ in range(min(free, len(job.queue)))]
            wanted = [sha for sha in wanted if sha in job.missing]
            job.requested.update(wanted)
            self._subscribe([self._topic(sha) for sha in wanted])
            self._flush_unsubscribes()

    def _flush_unsubscribes(self) -> None:
        if self._finished_topics:
            self._unsubscribe(self._finished_topics)
            self._finished_topics = []

    def wanted(self, sha: str) -> bool:
        """True when a download in progress asked for this chunk and has not received it."""
        return any(sha in job.requested for job in self.jobs.values())

    def on_chunk(self, sha: str, payload: bytes) -> None:
        """A chunk payload arrived (loop thread): hand it to a worker to verify and write."""
        jobs = [job for job in self.jobs.values() if sha in job.requested]
        if not jobs:
            return  # not asked for, or already arrived (a retained copy republished meanwhile)
        self._finished_topics.append(self._topic(sha))
        job = jobs[0]
        for j in jobs:
            j.requested.discard(sha)
            if j is not job:  # another model needing the same chunk asks for it again later
                j.queue.appendleft(sha)
        job.working.add(sha)
        self._pool.submit(self._store_chunk, job.name, job.doc.deployment_id, job.refs[sha],
                          list(job.places[sha]), payload)

    def _store_chunk(self, model: str, deployment_id: str, ref: ChunkRef, places: list[Place], payload: bytes) -> None:
        """Worker thread: verify and write one chunk, then report to the loop thread."""
        error = None
        full = False
        try:
            _write_places(places, decode_chunk(ref, payload))
            faults.point("download:chunk")
        except ChunkError as err:
            error = str(err)  # decode_chunk names the chunk
        except OSError as err:
            error = f"cannot store chunk: {err.strerror or err}"
            full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        except Exception as err:  # report anything else too: the loop must hear back about every chunk
            error = f"cannot store chunk: {type(err).__name__}: {err}"
        self._post(ChunkStored(model=model, deployment_id=deployment_id, sha256=ref.sha256,
                               wire_bytes=len(payload), error=error, disk_full=full))

    def on_stored(self, msg: ChunkStored) -> list[Job]:
        """A worker finished a chunk (loop thread); return the jobs it completed.

        Raises DeploymentRejected (with the model name in `details["model"]`) when the chunk did not
        verify or could not be written: a tampered or corrupt chunk, or a full disk, ends that download.
        """
        done: list[Job] = []
        job = self.jobs.get(msg.model)
        if job is None or job.doc.deployment_id != msg.deployment_id:
            return done  # the download was cancelled or replaced meanwhile
        job.working.discard(msg.sha256)
        if msg.error is not None:
            self.cancel(job.name)
            if msg.disk_full:  # nothing more fits: give back the space the refused download took
                self._drop_stale_parts(set())
            raise DeploymentRejected(msg.error, step="DOWNLOADING", details={"model": job.name})
        if msg.sha256 in job.missing:
            del job.missing[msg.sha256]
            job.fetched_bytes += msg.wire_bytes
            job.fetched_chunks += 1
            job.mark_done(msg.sha256)
        if not job.missing and not job.working:
            done.append(job)
        else:
            self._request_more(job)
        self._flush_unsubscribes()
        return done

    # --- finishing -----------------------------------------------------------------------------

    def finish(self, job: Job) -> None:
        """Verify each assembled artifact and move it into the blob store (fsynced rename, no copy)."""
        for assembly in job.assemblies:
            if not self.store.has_blob(assembly.art.sha256):
                finish_part(self.store, assembly)
                faults.point("download:assembled")
        self.jobs.pop(job.name, None)
        self._index = {k: v for k, v in self._index.items() if (self.store.blobs / k[0]).exists()}

    def cancel(self, name: str) -> None:
        """Stop a download; its assembled bytes stay in partial/ for a later resume of the same artifact."""
        job = self.jobs.pop(name, None)
        if job is not None and job.requested:
            others = {sha for j in self.jobs.values() for sha in j.requested}
            self._finished_topics += [self._topic(sha) for sha in job.requested if sha not in others]
        self._flush_unsubscribes()

    def close(self) -> None:
        """Stop the worker threads (pending chunks are fetched again on resume)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

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
