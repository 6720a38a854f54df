"""Chunked, resumable, delta downloads of deployment artifacts (DESIGN.md, "Topics" and chunking).

A download needs every chunk of the model and golden artifacts. Chunks the device already holds, in
any stored blob, are copied locally; the rest are fetched from their retained `P/chunks/{sha256}`
topics a window at a time, so memory stays bounded however large the model is. Each verified chunk is
written to ``partial/{sha256}`` at once: a download interrupted by a reconnect, a restart or a power
cut resumes with what is already there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent import faults
from agent.errors import ChunkError, DeploymentRejected, StoreError
from agent.protocol.chunks import decode_chunk
from agent.protocol.documents import Artifact, ChunkRef, Deployment
from agent.store import Store

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 32


@dataclass
class Job:
    """One deployment being downloaded."""

    doc: Deployment
    raw: dict[str, object]
    refs: dict[str, ChunkRef]
    missing: list[str]
    requested: set[str] = field(default_factory=set)
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


class Downloads:
    """Every download in progress; driven by the thread that owns the lifecycle."""

    def __init__(self, store: Store, *, subscribe: Callable[[list[str]], None],
                 unsubscribe: Callable[[list[str]], None], chunk_topic: Callable[[str], str],
                 window: int = DEFAULT_WINDOW, max_disk_fraction: float = 0.9):
        self.store = store
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        self._topic = chunk_topic
        self.window = window
        self.max_disk_fraction = max_disk_fraction
        self.jobs: dict[str, Job] = {}
        self._index: dict[tuple[str, int], dict[str, int]] = {}

    # --- starting ------------------------------------------------------------------------------

    def start(self, doc: Deployment, raw: dict[str, object]) -> Job | None:
        """Begin (or resume) a download; returns None when every chunk is already local."""
        self.cancel(doc.model.name)
        refs: dict[str, ChunkRef] = {}
        for art in (doc.model.artifact, doc.model.golden):
            for ref in art.chunks:
                refs.setdefault(ref.sha256, ref)
        self._check_disk(doc)
        job = Job(doc=doc, raw=raw, refs=refs, missing=[])
        local = self._local_chunks(doc.model.artifact.chunk_size, doc.model.golden.chunk_size)
        for sha, ref in refs.items():
            if self._have_partial(sha, ref):
                job.resumed_chunks += 1
                continue
            if sha in local:
                self._copy_local(sha, local[sha], ref.size)
                job.local_bytes += ref.size
                continue
            job.missing.append(sha)
        self.jobs[job.name] = job
        log.info("model %s: v%s needs %d of %d chunks (%d already downloaded, %d bytes copied from local models)",
                 job.name, doc.model.version, len(job.missing), job.total, job.resumed_chunks, job.local_bytes)
        self._request_more(job)
        return job

    def _check_disk(self, doc: Deployment) -> None:
        need = 2 * (doc.model.artifact.size + doc.model.golden.size)  # partial chunks + assembled blob
        usage = shutil.disk_usage(self.store.root)
        if usage.used + need > usage.total * self.max_disk_fraction:
            raise DeploymentRejected(
                f"not enough disk space: the download needs {need} bytes, {usage.free} free and at most "
                f"{self.max_disk_fraction:.0%} of the disk may be used", step="DOWNLOADING")

    def _have_partial(self, sha: str, ref: ChunkRef) -> bool:
        path = self.store.partial / sha
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return False
        if len(data) == ref.size and hashlib.sha256(data).hexdigest() == sha:
            return True
        path.unlink(missing_ok=True)  # torn by a power cut: fetch it again
        return False

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

    def _copy_local(self, sha: str, where: tuple[Path, int], size: int) -> None:
        blob, offset = where
        with open(blob, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if hashlib.sha256(data).hexdigest() != sha:  # the blob changed under us: fetch instead
            raise StoreError(f"stored blob {blob.name[:12]} no longer matches its chunk index")
        _write_chunk(self.store.partial / sha, data)

    # --- receiving -----------------------------------------------------------------------------

    def _request_more(self, job: Job) -> None:
        wanted = [sha for sha in job.missing if sha not in job.requested][: max(0, self.window - len(job.requested))]
        if wanted:
            job.requested.update(wanted)
            self._subscribe([self._topic(sha) for sha in wanted])

    def wanted(self, sha: str) -> bool:
        """True when a download in progress still needs this chunk."""
        return any(sha in job.requested for job in self.jobs.values())

    def on_chunk(self, sha: str, payload: bytes) -> list[Job]:
        """A chunk payload arrived: verify, store, ask for the next ones; return the jobs it completed.

        Raises DeploymentRejected (with the job's model name in `details["model"]`) when the payload
        does not match its reference: a tampered or corrupt chunk ends that deployment.
        """
        done: list[Job] = []
        jobs = [job for job in self.jobs.values() if sha in job.requested]
        if not jobs:
            return done
        self._unsubscribe([self._topic(sha)])
        try:
            raw = decode_chunk(jobs[0].refs[sha], payload)
        except ChunkError as err:
            for job in jobs:
                self.cancel(job.name)
            raise DeploymentRejected(f"chunk {sha[:12]}: {err}", step="DOWNLOADING",
                                     details={"model": jobs[0].name}) from err
        try:
            _write_chunk(self.store.partial / sha, raw)
            faults.point("download:chunk")
        except OSError as err:
            for job in jobs:
                self.cancel(job.name)
            raise DeploymentRejected(f"cannot store chunk: {err.strerror}", step="DOWNLOADING",
                                     details={"model": jobs[0].name}) from err
        for job in jobs:
            job.requested.discard(sha)
            if sha in job.missing:
                job.missing.remove(sha)
                job.fetched_bytes += len(payload)
                job.fetched_chunks += 1
            if not job.missing:
                done.append(job)
            else:
                self._request_more(job)
        return done

    def resubscribe(self) -> None:
        """After a reconnect the transport restores subscriptions; nothing is lost, nothing to do."""

    # --- finishing -----------------------------------------------------------------------------

    def finish(self, job: Job) -> None:
        """Assemble both artifacts into the blob store and clear the job's partial chunks."""
        for art in (job.doc.model.artifact, job.doc.model.golden):
            if not self.store.has_blob(art.sha256):
                assemble(self.store, art)
                faults.point("download:assembled")
        self.jobs.pop(job.name, None)
        still_needed = {sha for other in self.jobs.values() for sha in other.refs}
        for sha in job.refs:
            if sha not in still_needed:
                (self.store.partial / sha).unlink(missing_ok=True)
        self._index = {k: v for k, v in self._index.items() if (self.store.blobs / k[0]).exists()}

    def cancel(self, name: str) -> None:
        """Stop a download (its chunks stay in partial/ for a later resume)."""
        job = self.jobs.pop(name, None)
        if job is not None and job.requested:
            others = {sha for j in self.jobs.values() for sha in j.requested}
            drop = [sha for sha in job.requested if sha not in others]
            if drop:
                self._unsubscribe([self._topic(sha) for sha in drop])

    def names(self) -> Iterable[str]:
        """Models being downloaded."""
        return list(self.jobs)


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


def _write_chunk(path: Path, data: bytes) -> None:
    # No fsync per chunk (it would cost more than the network): a chunk torn by a power cut fails its
    # hash when the download resumes and is fetched again. The assembled blob is fsynced.
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def assemble(store: Store, art: Artifact) -> Path:
    """Join an artifact's chunks from partial/ into a verified blob (streamed, fsynced, atomic)."""
    digest = hashlib.sha256()
    target = store.blob_path(art.sha256)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        with open(tmp, "wb") as out:
            for ref in art.chunks:
                data = (store.partial / ref.sha256).read_bytes()
                if len(data) != ref.size:
                    raise StoreError(f"chunk {ref.sha256[:12]} has {len(data)} bytes, expected {ref.size}")
                digest.update(data)
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != art.sha256:
            raise StoreError(f"artifact {art.sha256[:12]}: SHA-256 of the joined chunks does not match")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target
