"""The local inference API (DESIGN.md, "Local inference API"): TensorFlow-Serving-shaped HTTP.

A lean blocking server, one thread per connection, over a Unix socket and optionally TCP. The
stdlib's http.server costs about 400 µs per request here and asyncio about 270 µs, against 44 µs
for a raw socket ping-pong; this parser reads only what a request needs (request line, a few
headers, a Content-Length body) and answers with one send, so the binary `.npy` path stays within
a couple of hundred microseconds of an in-process call.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from agent.api_routes import Request, Router, error_response
from agent.errors import ConfigError
from agent.serving import Serving

log = logging.getLogger(__name__)

MAX_HEAD = 64 << 10
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_IDLE_TIMEOUT_S = 60.0
_RECV = 65536


class _Conn:
    """One client connection; `idle` while it waits for the first byte of a request."""

    def __init__(self, sock: socket.socket, unix: bool) -> None:
        self.sock = sock
        self.unix = unix
        self.idle = True
        self.lock = threading.Lock()


class _BadRequest(Exception):
    """A request the HTTP layer refuses before routing; answered, then the connection is closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ApiServer:
    """The HTTP API on a Unix socket and/or a TCP port; start() binds, stop() drains and closes."""

    def __init__(self, serving: Serving, *, socket_path: Path | None, port: int | None = None,
                 host: str = "127.0.0.1", max_body_bytes: int = 16 << 20,
                 status: Callable[[], dict[str, Any]] | None = None,
                 metrics: Callable[[], str] | None = None,
                 admin: Callable[[str, dict[str, Any]], tuple[int, dict[str, Any]]] | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S, admin_body_bytes: int = 1 << 30) -> None:
        if socket_path is None and port is None:
            raise ConfigError("api: neither a socket nor a port is configured")
        self.serving = serving
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.host = host
        self._want_port = port
        self.max_body_bytes = max_body_bytes
        self.admin_body_bytes = admin_body_bytes
        """Admin requests on the Unix socket may be larger: a bundle upload carries the model."""
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.router = Router(serving, status=status, metrics=metrics, admin=admin)
        self._listeners: list[tuple[socket.socket, bool]] = []
        self._threads: list[threading.Thread] = []
        self._conns: dict[_Conn, threading.Thread] = {}
        self._conns_lock = threading.Lock()
        self._stopping = threading.Event()
        self._socket_ino: int | None = None
        self._port: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """Where the API listens: the socket path, else host:port."""
        if self.socket_path is not None:
            return str(self.socket_path)
        return f"{self.host}:{self._port}"

    @property
    def port(self) -> int | None:
        """The bound TCP port (useful with port=0), or None without TCP."""
        return self._port

    def start(self) -> None:
        """Bind the listeners and start accepting; return once they listen."""
        try:
            if self.socket_path is not None:
                self._listeners.append((self._bind_unix(self.socket_path), True))
            if self._want_port is not None:
                tcp = socket.create_server((self.host, self._want_port), backlog=128, reuse_port=False)
                self._port = tcp.getsockname()[1]
                self._listeners.append((tcp, False))
        except OSError as err:
            self._close_listeners()
            raise ConfigError(f"api: cannot listen on {self.address}: {err.strerror or err}") from err
        for sock, unix in self._listeners:
            t = threading.Thread(target=self._accept_loop, args=(sock, unix), daemon=True,
                                 name=f"api-accept-{'unix' if unix else 'tcp'}")
            t.start()
            self._threads.append(t)
        log.info("inference API listening on %s", ", ".join(
            str(self.socket_path) if unix else f"{self.host}:{self._port}" for _, unix in self._listeners))

    def _bind_unix(self, path: Path) -> socket.socket:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise OSError(0, f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                pass  # nobody answers: a stale file from a previous run, replaced below
            else:
                raise OSError(0, f"another process is serving on {path}")
            finally:
                probe.close()
        # bind beside the target, set the mode, then rename into place: no moment with a wider mode
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, 0o660)
            os.replace(tmp, path)
            sock.listen(128)
        except OSError:
            sock.close()
            tmp.unlink(missing_ok=True)
            raise
        self._socket_ino = path.stat().st_ino
        return sock

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, let requests in flight finish (up to `timeout`), close everything."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._close_listeners()
        for t in self._threads:
            t.join(timeout)
        with self._conns_lock:
            conns = list(self._conns.items())
        for conn, _ in conns:
            with conn.lock:
                if conn.idle:
                    _shutdown(conn.sock, socket.SHUT_RD)  # wakes its recv; busy ones close after answering
        deadline = time.monotonic() + timeout
        for conn, t in conns:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                _shutdown(conn.sock, socket.SHUT_RDWR)
                t.join(0.5)
        if self.socket_path is not None and self._socket_ino is not None:
            try:
                if self.socket_path.stat().st_ino == self._socket_ino:
                    self.socket_path.unlink()
            except OSError:
                pass
        log.info("inference API stopped")

    def _close_listeners(self) -> None:
        for sock, _ in self._listeners:
            _shutdown(sock, socket.SHUT_RDWR)  # wakes a thread blocked in accept() on Linux
            sock.close()

    # -- connections ---------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket, unix: bool) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = listener.accept()
            except OSError as err:
                if self._stopping.is_set():
                    return
                log.warning("api: accept failed: %s", err)
                self._stopping.wait(0.1)  # e.g. out of file descriptors: do not spin
                continue
            if not unix:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._conns_lock:
                full = len(self._conns) >= self.max_connections
                if not full:
                    conn = _Conn(sock, unix)
                    t = threading.Thread(target=self._serve, args=(conn,), daemon=True, name="api-conn")
                    self._conns[conn] = t
            if full:
                self._refuse(sock)
                continue
            t.start()

    def _refuse(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(1.0)
            sock.sendall(error_response(503, f"too many connections (limit {self.max_connections})").encode(
                close=True))
        except OSError:
            pass
        finally:
            sock.close()

    def _serve(self, conn: _Conn) -> None:
        sock = conn.sock
        set_timeouts(sock, self.idle_timeout_s)
        buf = b""
        try:
            while True:
                if not buf:
                    with conn.lock:
                        if self._stopping.is_set():
                            return
                        conn.idle = True
                    buf = sock.recv(_RECV)
                    if not buf:
                        return
                    with conn.lock:
                        conn.idle = False
                try:
                    request, buf = self._read_request(sock, buf, conn.unix)
                except _BadRequest as err:
                    sock.sendall(error_response(err.status, str(err)).encode(close=True))
                    return
                if request is None:
                    return
                response = self.router.handle(request, unix=conn.unix)
                close = request.close or self._stopping.is_set()
                sock.sendall(response.encode(close=close))
                if close:
                    return
        except (TimeoutError, BlockingIOError, ConnectionError):
            return  # idle too long (the kernel timeout raises BlockingIOError), or the client left
        except OSError as err:
            log.debug("api: connection error: %s", err)
        except Exception:  # a bug must not take the server down: log it and drop this connection
            log.exception("api: unexpected error on a connection")
        finally:
            sock.close()
            with self._conns_lock:
                self._conns.pop(conn, None)

    def _read_request(self, sock: socket.socket, buf: bytes, unix: bool = False) -> tuple[Request | None, bytes]:
        """One request from `buf` plus whatever more the socket sends; leftover bytes are returned."""
        end = buf.find(b"\r\n\r\n")
        while end < 0:
            if len(buf) > MAX_HEAD:
                raise _BadRequest(431, f"request head above {MAX_HEAD} bytes")
            more = sock.recv(_RECV)
            if not more:
                return None, b""
            buf += more
            end = buf.find(b"\r\n\r\n", max(0, len(buf) - len(more) - 3))
        if end > MAX_HEAD:
            raise _BadRequest(431, f"request head above {MAX_HEAD} bytes")
        request = _parse_head(buf[:end])
        body_start = end + 4
        length = request.content_length
        limit = self.admin_body_bytes if unix and request.path.startswith("/v1/admin/") else self.max_body_bytes
        if length > limit:
            raise _BadRequest(413, f"request body of {length} bytes is above the limit of {limit}")
        have = len(buf) - body_start
        if have >= length:
            request.body = buf[body_start:body_start + length]
            return request, buf[body_start + length:]
        if request.expect_continue:
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = bytearray(length)
        view = memoryview(body)
        view[:have] = buf[body_start:]
        while have < length:
            n = sock.recv_into(view[have:], length - have, socket.MSG_WAITALL)  # one wake-up, not one per chunk
            if n == 0:
                return None, b""
            have += n
        request.body = body  # no copy: npy and JSON readers take a bytearray as it is
        return request, b""


def _parse_head(head: bytes) -> Request:
    """Request line and the headers that matter, strictly; raise _BadRequest on anything malformed."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as err:  # latin-1 decodes every byte; kept for clarity of intent
        raise _BadRequest(400, "request head is not text") from err
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith("/"):
        raise _BadRequest(400, f"malformed request line {lines[0][:80]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(505, f"HTTP version {version[:16]!r} is not supported")
    length: int | None = None
    content_type = ""
    connection = ""
    expect = False
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise _BadRequest(400, f"malformed header line {line[:80]!r}")
        key = name.lower()
        value = value.strip()
        if key == "content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise _BadRequest(400, f"bad Content-Length {value[:40]!r}")
            length = int(value)
        elif key == "transfer-encoding":
            raise _BadRequest(411, "chunked or encoded request bodies are not supported; send Content-Length")
        elif key == "content-type":
            content_type = value.split(";", 1)[0].strip().lower()
        elif key == "connection":
            connection = value.lower()
        elif key == "expect":
            if value.lower() != "100-continue":
                raise _BadRequest(417, f"cannot meet Expect: {value[:40]}")
            expect = True
    path, _, query = target.partition("?")
    close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
    return Request(method=method, path=unquote(path), query=query, content_type=content_type,
                   content_length=length or 0, close=close, expect_continue=expect)


def set_timeouts(sock: socket.socket, seconds: float) -> None:
    """Kernel receive/send timeouts on a blocking socket.

    socket.settimeout would make every recv a poll() plus a recv(); SO_RCVTIMEO costs nothing per
    call. A timed-out call raises BlockingIOError.
    """
    sock.settimeout(None)
    whole = int(seconds)
    tv = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass

