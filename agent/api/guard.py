"""What the local API refuses before a request reaches a route: who may connect, how much memory
request bodies may hold, which Host and Authorization a TCP request must carry, and the file
descriptors an admin client passes instead of uploading a bundle.

Kept apart from agent/api/server.py, which moves bytes, so every rule of the trust model for the API can be
read in one place (docs/operations.md, "The local API: who may do what").
"""

from __future__ import annotations

import array
import hmac
import os
import socket
import stat
import struct
import threading
from collections.abc import Iterable
from typing import Any

from edgefleet.errors import RequestError

MAX_PASSED_FDS = 8
"""File descriptors one admin connection may pass: a bundle needs three."""
BUNDLE_PASSED = ("manifest.json", "model.tflite", "golden.npz")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Budget:
    """The bytes all request bodies in flight may hold together, reserved before a body is read.

    A request announces its size in its head (or chunk by chunk); the reservation is taken then, so a
    head that promises more than is free is refused before anything is allocated, and released once
    the answer is sent. TCP requests together may hold at most `tcp_limit`, so the Unix socket's
    clients always find room however many TCP clients hold bodies open.
    """

    def __init__(self, total: int, tcp_limit: int) -> None:
        self.total = total
        self.tcp_limit = min(total, tcp_limit)
        self.used = 0
        self.used_tcp = 0
        self._lock = threading.Lock()

    def take(self, n: int, tcp: bool) -> bool:
        """Reserve `n` bytes; False (nothing reserved) when that would go above a limit."""
        with self._lock:
            if self.used + n > self.total or (tcp and self.used_tcp + n > self.tcp_limit):
                return False
            self.used += n
            if tcp:
                self.used_tcp += n
            return True

    def give(self, n: int, tcp: bool) -> None:
        """Release a reservation."""
        if n:
            with self._lock:
                self.used -= n
                if tcp:
                    self.used_tcp -= n


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED), or None if unknown."""
    try:
        _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except (OSError, struct.error):
        return None
    return int(uid)


def default_hosts(listen_host: str) -> set[str]:
    """Host header names a loopback client uses, plus the listen address unless it is a wildcard."""
    hosts = {"localhost", "127.0.0.1", "[::1]"}
    h = listen_host.strip().lower()
    if h and h not in ("0.0.0.0", "::", "[::]"):
        hosts.add(f"[{h}]" if ":" in h and not h.startswith("[") else h)
    return hosts


def host_allowed(header: str | None, allowed: set[str]) -> bool:
    """Whether a Host header names this agent (the port, if any, is not compared: only the name)."""
    if not header:
        return False
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or (value[end + 1:] and not (value[end + 1] == ":" and value[end + 2:].isdigit())):
            return False
        name = value[:end + 1]
    else:
        name, colon, port = value.rpartition(":")
        if not colon:
            name = value
        elif not port.isdigit():
            return False
    return name in allowed


def token_matches(header: str | None, token: bytes) -> bool:
    """Whether an Authorization header carries the bearer token (compared in constant time)."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode("utf-8", "surrogateescape"), token)


def recv_with_fds(sock: socket.socket, size: int, fds: list[int]) -> bytes:
    """recv() that also keeps the file descriptors a client passed (SCM_RIGHTS), appended to `fds`.

    Descriptors beyond MAX_PASSED_FDS, or cut off by the kernel, are closed and refused, so a client
    cannot make the agent hold open files it did not ask for.
    """
    data, ancdata, flags, _ = sock.recvmsg(size, socket.CMSG_SPACE(MAX_PASSED_FDS * 4))
    got: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
            got.extend(a)
    fds.extend(got)
    if flags & socket.MSG_CTRUNC or len(fds) > MAX_PASSED_FDS:
        close_fds(fds)
        raise RequestError(f"at most {MAX_PASSED_FDS} file descriptors may be passed on one connection", 400)
    return data


def close_fds(fds: list[int]) -> None:
    """Close and forget passed descriptors."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def read_passed_files(spec: Any, fds: list[int], limit: int) -> dict[str, bytes]:
    """The bundle files a client passed as descriptors: `spec` maps each file name to its index in `fds`.

    Only regular files are read (a pipe or socket could stall the agent), each at most `limit` bytes,
    from offset 0 whatever the descriptor's position, so the client's own reads do not matter.
    """
    if not isinstance(spec, dict) or set(spec) != set(BUNDLE_PASSED):
        raise RequestError(f"install: \"files\" must map exactly {', '.join(BUNDLE_PASSED)} to the index of a "
                           "passed file descriptor")
    files: dict[str, bytes] = {}
    for name in BUNDLE_PASSED:
        index = spec[name]
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(fds):
            raise RequestError(f"install: {name}: no passed file descriptor number {index!r} "
                               f"({len(fds)} passed)")
        fd = fds[index]
        try:
            st = os.fstat(fd)
        except OSError as err:
            raise RequestError(f"install: {name}: {err.strerror}") from err
        if not stat.S_ISREG(st.st_mode):
            raise RequestError(f"install: {name}: the passed descriptor is not a regular file")
        if st.st_size > limit:
            raise RequestError(f"install: {name} is {st.st_size} bytes, above the limit of {limit}", 413)
        files[name] = _pread_all(fd, name, st.st_size, limit)
    return files


def _pread_all(fd: int, name: str, size: int, limit: int) -> bytes:
    parts: list[bytes] = []
    offset = 0
    while True:
        try:
            chunk = os.pread(fd, max(1, min(1 << 20, size - offset + 1)), offset)
        except OSError as err:
            raise RequestError(f"install: {name}: cannot read the passed file: {err.strerror}") from err
        if not chunk:
            return b"".join(parts)
        offset += len(chunk)
        if offset > limit:  # the file grew after fstat
            raise RequestError(f"install: {name} is above the limit of {limit} bytes", 413)
        parts.append(chunk)


def send_with_fds(sock: socket.socket, data: bytes, fds: Iterable[int]) -> None:
    """sendall() whose first bytes carry `fds` (SCM_RIGHTS)."""
    fds = list(fds)
    sent = socket.send_fds(sock, [data], fds) if fds else 0
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:])
