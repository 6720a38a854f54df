"""Small helpers the tests share: altering bundles the way an attacker or a broken pipeline would."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgefleet.bundle import GOLDEN_FILE, MANIFEST_FILE, MODEL_FILE
from edgefleet.converter.fleet.publish import RetainedIndex
from edgefleet.protocol import SigningKey, Topics, canonical_json, dump, parse_json, split
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.broker import client


def retained_index(url: str, topics: Topics | None = None) -> RetainedIndex:
    """The retained deployment documents, withdrawals and chunks on the broker at `url`."""
    index = RetainedIndex(topics or Topics())
    t = client(url, index.handle)
    try:
        index.collect(t, timeout=10)
    finally:
        t.stop()
    return index


def read_manifest(bundle: Path) -> dict[str, Any]:
    """The raw manifest of a bundle."""
    return parse_json((bundle / MANIFEST_FILE).read_bytes())  # type: ignore[no-any-return]


def rewrite_manifest(bundle: Path, mutate: Callable[[dict[str, Any]], None], key: SigningKey | None = None) -> None:
    """Change the manifest in place; re-sign it with `key`, or drop the signature when no key is given."""
    raw = read_manifest(bundle)
    mutate(raw)
    raw.pop("signature", None)
    raw.pop("key_id", None)
    if key is not None:
        raw = key.sign(raw)
    (bundle / MANIFEST_FILE).write_bytes(canonical_json(raw))


def swap_file(bundle: Path, filename: str, data: bytes, key: SigningKey | None = None) -> None:
    """Replace model.tflite or golden.npz and make the manifest describe the new bytes (a consistent lie)."""
    (bundle / filename).write_bytes(data)
    field = {MODEL_FILE: "artifact", GOLDEN_FILE: "golden"}[filename]

    def mutate(raw: dict[str, Any]) -> None:
        artifact, _ = split(data, raw["model"][field]["chunk_size"])
        raw["model"][field] = dump(artifact)

    rewrite_manifest(bundle, mutate, key)


def read_http_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 response from `sock`: status, lower-cased headers and the body (Content-Length)."""
    return read_http_responses(sock, 1)[0]


def read_http_responses(sock: socket.socket, n: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Read `n` responses, keeping bytes of one response that arrived with the previous one."""
    buf = b""
    out = []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            more = sock.recv(65536)
            if not more:
                raise ConnectionError(f"closed after {buf!r}")
            buf += more
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        length = int(headers["content-length"])
        while len(rest) < length:
            more = sock.recv(65536)
            if not more:
                raise ConnectionError(f"closed {length - len(rest)} bytes before the end of the body")
            rest += more
        out.append((int(lines[0].split()[1]), headers, rest[:length]))
        buf = rest[length:]
    return out


@contextmanager
def lab_agents(root: Path, url: str, key_dir: Path, edgectl: Callable[..., tuple[int, str, str]],
               **sections: Any) -> Iterator[list[AgentProcess]]:
    """dev-1 and dev-2 in group lab, online and listed in the signed inventory, probation 1 s; killed after."""
    agents = [AgentProcess(root / d, device_id=d, groups=["lab"], mqtt={"url": url, "reconnect_max_s": 1.0},
                           security={"trusted_keys": [str(key_dir / "edgefleet.pub")]},
                           health={"probation_s": 1, "min_requests": 1}, **sections) for d in ("dev-1", "dev-2")]
    try:
        for a in agents:
            a.start(wait=False)
        for a in agents:
            a.wait_ready()
        code, _, err = edgectl("inventory", "set", "lab", "dev-1", "dev-2", "--key", key_dir, "--broker", url)
        assert code == 0, err
        yield agents
    finally:
        for a in agents:
            a.kill()
