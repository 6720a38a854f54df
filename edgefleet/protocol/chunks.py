"""Chunking: fixed-size pieces, each addressed by the SHA-256 of its raw bytes and compressed on its own."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator

from edgefleet.errors import ChunkError
from edgefleet.protocol.documents import Artifact, ChunkRef

DEFAULT_CHUNK_SIZE = 64 * 1024
COMPRESSION_LEVEL = 6
# A chunk is sent compressed only when that saves at least this fraction of its bytes. Dense float32
# weights shrink by about 7 %: inflating them on a board (about 50 MB/s on a Raspberry Pi 4) costs more
# time than those bytes take on any link faster than about 3.5 MB/s, so they go raw. Pruned and
# quantized weights shrink by 30-70 % and go compressed.
MIN_SAVING = 0.2


def encode_chunk(raw: bytes, *, compress: bool = True) -> tuple[ChunkRef, bytes]:
    """The reference and wire payload of one chunk; deterministic, so equal chunks give equal payloads."""
    digest = hashlib.sha256(raw).hexdigest()
    if compress:
        packed = zlib.compress(raw, COMPRESSION_LEVEL)
        if len(packed) <= len(raw) * (1 - MIN_SAVING):
            return ChunkRef(sha256=digest, size=len(raw), wire_size=len(packed), compressed=True), packed
    return ChunkRef(sha256=digest, size=len(raw), wire_size=len(raw), compressed=False), raw


def split(data: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE, *, compress: bool = True
          ) -> tuple[Artifact, list[bytes]]:
    """Cut `data` into chunks; return the artifact description and the payloads in order."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    refs, payloads = [], []
    view = memoryview(data)
    for offset in range(0, len(data), chunk_size):
        ref, payload = encode_chunk(bytes(view[offset:offset + chunk_size]), compress=compress)
        refs.append(ref)
        payloads.append(payload)
    artifact = Artifact(
        sha256=hashlib.sha256(data).hexdigest(), size=len(data), chunk_size=chunk_size, chunks=tuple(refs)
    )
    return artifact, payloads


def decode_chunk(ref: ChunkRef, payload: bytes) -> bytes:
    """Raw bytes of a chunk payload, checked against its reference; raises ChunkError saying what differs."""
    if len(payload) != ref.wire_size:
        raise ChunkError(f"chunk {ref.sha256[:12]}: {len(payload)} bytes on the wire, expected {ref.wire_size}")
    if ref.compressed:
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(payload, ref.size + 1)
        except zlib.error as err:
            raise ChunkError(f"chunk {ref.sha256[:12]}: not a valid zlib stream ({err})") from err
        if not inflater.eof or len(raw) != ref.size or inflater.unused_data:
            raise ChunkError(f"chunk {ref.sha256[:12]}: inflates to the wrong size (expected {ref.size})")
    else:
        raw = payload
    if hashlib.sha256(raw).hexdigest() != ref.sha256:
        raise ChunkError(f"chunk {ref.sha256[:12]}: SHA-256 does not match")
    return raw


def join(artifact: Artifact, raws: Iterator[bytes] | list[bytes]) -> bytes:
    """Reassemble an artifact from its raw chunks and check its size and SHA-256."""
    data = b"".join(raws)
    if len(data) != artifact.size:
        raise ChunkError(f"artifact is {len(data)} bytes, expected {artifact.size}")
    if hashlib.sha256(data).hexdigest() != artifact.sha256:
        raise ChunkError(f"artifact {artifact.sha256[:12]}: SHA-256 does not match")
    return data
