"""The local inference API (docs/architecture.md): TensorFlow-Serving-shaped HTTP.

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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from edgefleet.agent.api.guard import (
    Budget,
    close_fds,
    default_hosts,
    host_allowed,
    peer_uid,
    recv_with_fds,
    token_matches,
)
from edgefleet.agent.api.messages import JSON, Request, error_response
from edgefleet.agent.api.routes import Admin, Router
from edgefleet.agent.api.v2 import OCTET
from edgefleet.agent.serving import npy
from edgefleet.agent.serving.models import Serving
from edgefleet.errors import ConfigError, RequestError

if TYPE_CHECKING:
    from edgefleet.agent.config import ApiConfig

log = logging.getLogger(__name__)

MAX_HEAD = 64 << 10
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_PEER_CONNECTIONS = 16
DEFAULT_ADMIN_CONNECTIONS = 8
DEFAULT_IDLE_TIMEOUT_S = 60.0
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 60.0
DEFAULT_INFLIGHT_BYTES = 64 << 20
ADMIN_BODY_BYTES = 64 << 10
"""Admin bodies are small JSON: bundles arrive as passed file descriptors or a path, never as a body."""
UNIX, TCP, ADMIN = "unix", "tcp", "admin"
_RECV = 65536
_EAGER_BODY = 1 << 20
"""Bodies up to this size are allocated whole once reserved; larger ones grow as their bytes arrive."""
_TCP_POST_TYPES = frozenset({JSON, "text/json", npy.CONTENT_TYPE})
"""What a POST over TCP may carry: none of them is a type a web page can send without a CORS preflight."""


class _Conn:
    """One client connection; `idle` while it waits for the first byte of a request."""

    def __init__(self, sock: socket.socket, kind: str, peer: str | None = None) -> None:
        self.sock = sock
        self.kind = kind
        self.unix = kind != TCP
        self.peer = peer
        self.idle = True
        self.lock = threading.Lock()
        self.fds: list[int] = []
        """Descriptors passed on the admin socket, closed after the request they came with."""
        self.reserved = 0
        """Bytes of the in-flight budget this connection's current request holds."""
        self.rcvtimeo = 0.0
        self.recv: Callable[[int], bytes] = sock.recv
        if kind == ADMIN:
            self.recv = lambda n: recv_with_fds(sock, n, self.fds)


class _BadRequest(Exception):
    """A request the HTTP layer refuses before routing; answered, then the connection is closed."""

    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or []


class ApiServer:
    """The HTTP API on a Unix socket and/or a TCP port, and the admin socket; start() binds, stop()
    drains and closes.

    Each listener has its own connection cap (TCP also one per client address), so no number of TCP
    clients can lock out the Unix sockets; every request has a deadline for its head and its body;
    bodies are reserved against one in-flight byte budget before they are read. Admin routes answer
    only on the admin socket, to root and the agent's own user (SO_PEERCRED). TCP requests must name
    an allowed Host, carry the bearer token when one is configured, and POST only JSON or .npy.
    """

    def __init__(self, serving: Serving, *, socket_path: Path | None, port: int | None = None,
                 host: str = "127.0.0.1", max_body_bytes: int = 16 << 20,
                 status: Callable[[], dict[str, Any]] | None = None,
                 metrics: Callable[[], str] | None = None,
                 admin: Admin | None = None,
                 admin_socket: Path | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_connections_per_peer: int = DEFAULT_PEER_CONNECTIONS,
                 admin_connections: int = DEFAULT_ADMIN_CONNECTIONS,
                 idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
                 header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
                 max_inflight_bytes: int = DEFAULT_INFLIGHT_BYTES,
                 allowed_hosts: Iterable[str] = (), token: str | None = None,
                 admin_uids: Iterable[int] | None = None, max_file_bytes: int = 256 << 20) -> None:
        if socket_path is None and port is None and admin_socket is None:
            raise ConfigError("api: neither a socket nor a port is configured")
        self.serving = serving
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.admin_path = Path(admin_socket) if admin_socket is not None else None
        self.host = host
        self._want_port = port
        self.max_body_bytes = max_body_bytes
        self.admin_body_bytes = ADMIN_BODY_BYTES
        self.limits = {UNIX: max_connections, TCP: max_connections, ADMIN: admin_connections}
        """Open connections per listener kind."""
        self.max_connections_per_peer = max_connections_per_peer
        self.idle_timeout_s = idle_timeout_s
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.budget = Budget(max(max_inflight_bytes, max_body_bytes),
                             tcp_limit=max(max_body_bytes, max_inflight_bytes // 2))
        self.allowed_hosts = default_hosts(host) | {h.lower() for h in allowed_hosts}
        self._token = token.encode("utf-8") if token else None
        self.admin_uids = frozenset(admin_uids) if admin_uids is not None else frozenset({0, os.getuid()})
        """Who may use the admin socket besides its file mode: root and the agent's own user."""
        self.router = Router(serving, status=status, metrics=metrics, admin=admin, max_file_bytes=max_file_bytes)
        self._listeners: list[tuple[socket.socket, str]] = []
        self._threads: list[threading.Thread] = []
        self._conns: dict[_Conn, threading.Thread] = {}
        self._conns_lock = threading.Lock()
        self._counts = {UNIX: 0, TCP: 0, ADMIN: 0}
        self._peers: dict[str, int] = {}
        self._stopping = threading.Event()
        self._socket_inos: dict[Path, int] = {}
        self._port: int | None = None

    @classmethod
    def from_config(cls, serving: Serving, api: ApiConfig, *, status: Callable[[], dict[str, Any]] | None = None,
                    metrics: Callable[[], str] | None = None,
                    admin: Admin | None = None,
                    max_file_bytes: int = 256 << 20) -> ApiServer:
        """The server the [api] section describes; the token file is read here (ConfigError if unusable)."""
        from edgefleet.credentials import read_secret

        token = None
        if api.token_file is not None:
            token = read_secret(api.token_file).strip()
            if not token:
                raise ConfigError(f"api.token_file: {api.token_file} is empty")
        return cls(serving, socket_path=api.socket, port=api.port, host=api.host,
                   max_body_bytes=api.max_body_bytes, status=status, metrics=metrics, admin=admin,
                   admin_socket=api.admin_socket_path() if admin is not None else None,
                   max_connections=api.max_connections, max_connections_per_peer=api.max_connections_per_peer,
                   idle_timeout_s=api.idle_timeout_s, header_timeout_s=api.header_timeout_s,
                   body_timeout_s=api.body_timeout_s, max_inflight_bytes=api.max_inflight_bytes,
                   allowed_hosts=api.allowed_hosts, token=token, max_file_bytes=max_file_bytes)

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """Where the API listens: the socket path, else host:port."""
        if self.socket_path is not None:
            return str(self.socket_path)
        if self._want_port is None and self.admin_path is not None:
            return str(self.admin_path)
        return f"{self.host}:{self._port}"

    @property
    def port(self) -> int | None:
        """The bound TCP port (useful with port=0), or None without TCP."""
        return self._port

    def start(self) -> None:
        """Bind the listeners and start accepting; return once they listen."""
        where = self.address
        try:
            if self.socket_path is not None:
                self._listeners.append((self._bind_unix(self.socket_path, 0o660), UNIX))
            if self.admin_path is not None:
                where = str(self.admin_path)
                self._listeners.append((self._bind_unix(self.admin_path, 0o600), ADMIN))
            if self._want_port is not None:
                where = f"{self.host}:{self._want_port}"
                tcp = socket.create_server((self.host, self._want_port), backlog=128, reuse_port=False)
                self._port = tcp.getsockname()[1]
                self._listeners.append((tcp, TCP))
        except OSError as err:
            self._close_listeners()
            self._unlink_sockets()
            raise ConfigError(f"api: cannot listen on {where}: {err.strerror or err}") from err
        for sock, kind in self._listeners:
            t = threading.Thread(target=self._accept_loop, args=(sock, kind), daemon=True, name=f"api-accept-{kind}")
            t.start()
            self._threads.append(t)
        names = {UNIX: str(self.socket_path), ADMIN: f"{self.admin_path} (admin)", TCP: f"{self.host}:{self._port}"}
        log.info("inference API listening on %s", ", ".join(names[kind] for _, kind in self._listeners))

    def _bind_unix(self, path: Path, mode: int) -> socket.socket:
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
            os.chmod(tmp, mode)
            os.replace(tmp, path)
            sock.listen(128)
        except OSError:
            sock.close()
            tmp.unlink(missing_ok=True)
            raise
        self._socket_inos[path] = path.stat().st_ino
        return sock

    def _unlink_sockets(self) -> None:
        """Remove the socket files this server bound, unless another process replaced them since."""
        for path, ino in self._socket_inos.items():
            try:
                if path.stat().st_ino == ino:
                    path.unlink()
            except OSError:
                pass
        self._socket_inos.clear()

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
        self._unlink_sockets()
        log.info("inference API stopped")

    def _close_listeners(self) -> None:
        for sock, _ in self._listeners:
            _shutdown(sock, socket.SHUT_RDWR)  # wakes a thread blocked in accept() on Linux
            sock.close()

    # -- connections ---------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket, kind: str) -> None:
        limit = self.limits[kind]
        while not self._stopping.is_set():
            try:
                sock, addr = listener.accept()
            except OSError as err:
                if self._stopping.is_set():
                    return
                log.warning("api: accept failed: %s", err)
                self._stopping.wait(0.1)  # e.g. out of file descriptors: do not spin
                continue
            peer = None
            if kind == TCP:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = str(addr[0])
            elif kind == ADMIN:
                uid = peer_uid(sock)
                if uid not in self.admin_uids:
                    self._refuse(sock, 403, f"the admin socket is for root and the agent's user, not uid {uid}")
                    continue
            refusal = None
            with self._conns_lock:
                if self._counts[kind] >= limit:
                    refusal = f"too many connections (limit {limit})"
                elif peer is not None and self._peers.get(peer, 0) >= self.max_connections_per_peer:
                    refusal = f"too many connections from {peer} (limit {self.max_connections_per_peer})"
                else:
                    conn = _Conn(sock, kind, peer)
                    t = threading.Thread(target=self._serve, args=(conn,), daemon=True, name=f"api-{kind}")
                    self._conns[conn] = t
                    self._counts[kind] += 1
                    if peer is not None:
                        self._peers[peer] = self._peers.get(peer, 0) + 1
            if refusal is not None:
                self._refuse(sock, 503, refusal)
                continue
            t.start()

    def _refuse(self, sock: socket.socket, status: int, message: str) -> None:
        self.router.count(status)
        try:
            sock.settimeout(1.0)
            sock.sendall(error_response(status, message).encode(close=True))
        except OSError:
            pass
        finally:
            sock.close()

    def _forget(self, conn: _Conn) -> None:
        with self._conns_lock:
            if self._conns.pop(conn, None) is None:
                return
            self._counts[conn.kind] -= 1
            if conn.peer is not None:
                left = self._peers[conn.peer] - 1
                if left:
                    self._peers[conn.peer] = left
                else:
                    del self._peers[conn.peer]

    def _serve(self, conn: _Conn) -> None:
        sock = conn.sock
        set_timeouts(sock, self.idle_timeout_s)
        conn.rcvtimeo = self.idle_timeout_s
        buf = b""
        try:
            while True:
                if not buf:
                    with conn.lock:
                        if self._stopping.is_set():
                            return
                        conn.idle = True
                    buf = conn.recv(_RECV)
                    if not buf:
                        return
                    with conn.lock:
                        conn.idle = False
                try:
                    request, buf = self._read_request(conn, buf)
                except _BadRequest as err:
                    self._fail(conn, err)
                    return
                if request is None:
                    return
                request.fds = conn.fds
                try:
                    response = self.router.handle(request, unix=conn.unix, admin=conn.kind == ADMIN)
                finally:
                    if conn.fds:
                        close_fds(conn.fds)
                close = request.close or self._stopping.is_set()
                del request  # the body's memory goes before its reservation is given back
                sock.sendall(response.encode(close=close))
                self._release(conn)
                if conn.rcvtimeo != self.idle_timeout_s:
                    _set_rcvtimeo(sock, self.idle_timeout_s)
                    conn.rcvtimeo = self.idle_timeout_s
                if close:
                    return
        except RequestError as err:  # passed descriptors the admin socket refuses
            self._fail(conn, _BadRequest(err.status, str(err)))
        except (TimeoutError, BlockingIOError, ConnectionError):
            return  # idle too long (the kernel timeout raises BlockingIOError), or the client left
        except OSError as err:
            log.debug("api: connection error: %s", err)
        except Exception:  # a bug must not take the server down: log it and drop this connection
            log.exception("api: unexpected error on a connection")
        finally:
            close_fds(conn.fds)
            self._release(conn)
            sock.close()
            self._forget(conn)

    def _fail(self, conn: _Conn, err: _BadRequest) -> None:
        """Answer a refused request and let the caller close: its body (if any) was never read."""
        self._release(conn)
        self.router.count(err.status)
        try:
            # a client that does not read must not hold this thread for the whole send timeout
            _set_sndtimeo(conn.sock, 1.0)
            conn.sock.sendall(error_response(err.status, str(err), err.headers).encode(close=True))
        except OSError:
            pass

    def _release(self, conn: _Conn) -> None:
        if conn.reserved:
            self.budget.give(conn.reserved, conn.kind == TCP)
            conn.reserved = 0

    def _reserve(self, conn: _Conn, n: int) -> None:
        """Take `n` bytes of the in-flight budget for this connection's request, or refuse it with 503."""
        if not self.budget.take(n, conn.kind == TCP):
            raise _BadRequest(503, f"the agent is busy: request bodies in flight would go above "
                                   f"{self.budget.tcp_limit if conn.kind == TCP else self.budget.total} bytes "
                                   f"(api.max_inflight_bytes); retry later", [("Retry-After", "1")])
        conn.reserved += n

    def _recv(self, conn: _Conn, n: int, deadline: float, what: str, view: memoryview | None = None) -> Any:
        """recv (or recv_into `view`) that gives up at `deadline` with 408."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise _BadRequest(408, f"{what} did not arrive in time")
        if left < conn.rcvtimeo:
            conn.rcvtimeo = max(left, 0.001)  # a zero timeout would mean none at all
            _set_rcvtimeo(conn.sock, conn.rcvtimeo)
        try:
            if view is not None:
                return conn.sock.recv_into(view, n, socket.MSG_WAITALL)  # one wake-up, not one per chunk
            return conn.recv(n)
        except (TimeoutError, BlockingIOError) as err:
            raise _BadRequest(408, f"{what} did not arrive in time") from err

    def _read_request(self, conn: _Conn, buf: bytes) -> tuple[Request | None, bytes]:
        """One request from `buf` plus whatever more the socket sends; leftover bytes are returned."""
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            deadline = time.monotonic() + self.header_timeout_s
            while end < 0:
                if len(buf) > MAX_HEAD:
                    raise _BadRequest(431, f"request head above {MAX_HEAD} bytes")
                more = self._recv(conn, _RECV, deadline, "the request head")
                if not more:
                    return None, b""
                buf += more
                end = buf.find(b"\r\n\r\n", max(0, len(buf) - len(more) - 3))
        if end > MAX_HEAD:
            raise _BadRequest(431, f"request head above {MAX_HEAD} bytes")
        request = _parse_head(buf[:end])
        if conn.kind == TCP:
            self._check_tcp(request)
        body_start = end + 4
        limit = self.admin_body_bytes if conn.kind == ADMIN else self.max_body_bytes
        if request.chunked:
            return self._read_chunked(conn, request, buf, body_start, limit)
        length = request.content_length
        if length > limit:
            raise _BadRequest(413, f"request body of {length} bytes is above the limit of {limit}")
        have = len(buf) - body_start
        if have >= length:
            request.body = buf[body_start:body_start + length]
            return request, buf[body_start + length:]
        # the body is still to come: reserve it first, so a head alone never makes the agent allocate
        self._reserve(conn, length)
        if request.expect_continue:
            conn.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        deadline = time.monotonic() + self.body_timeout_s
        if length <= _EAGER_BODY and conn.kind != ADMIN:
            body = bytearray(length)
            view = memoryview(body)
            view[:have] = buf[body_start:]
            while have < length:
                n = self._recv(conn, length - have, deadline, "the request body", view[have:])
                if n == 0:
                    return None, b""
                have += n
        else:
            # grows with what arrives: memory follows the bytes a client really sent
            body = bytearray(buf[body_start:])
            while len(body) < length:
                more = self._recv(conn, min(length - len(body), _EAGER_BODY), deadline, "the request body")
                if not more:
                    return None, b""
                body += more
        request.body = body  # no copy: npy and JSON readers take a bytearray as it is
        return request, b""

    def _check_tcp(self, request: Request) -> None:
        """What a TCP request must carry: an allowed Host, the bearer token, a non-form body type."""
        if not host_allowed(request.host, self.allowed_hosts):
            shown = "no Host header" if request.host is None else f"Host {request.host[:80]!r}"
            raise _BadRequest(403, f"{shown} is not a name of this agent (see api.allowed_hosts)")
        if self._token is not None and not token_matches(request.authorization, self._token):
            raise _BadRequest(401, "a bearer token is required: send Authorization: Bearer <token from api.token_file>",
                              [("WWW-Authenticate", 'Bearer realm="edge-agent"')])
        carries_body = request.method == "POST" or request.content_length or request.chunked
        if carries_body and request.content_type not in _TCP_POST_TYPES and not _v2_client(request):
            shown = repr(request.content_type) if request.content_type else "no Content-Type"
            raise _BadRequest(415, f"{shown} is not accepted over TCP; send {JSON} or {npy.CONTENT_TYPE}")

    def _read_chunked(self, conn: _Conn, request: Request, buf: bytes, pos: int,
                      limit: int) -> tuple[Request | None, bytes]:
        """A Transfer-Encoding: chunked body, each chunk reserved against the budget before it is read."""
        if request.expect_continue:
            conn.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        deadline = time.monotonic() + self.body_timeout_s
        body = bytearray()
        trailer = 0
        while True:
            line, buf, pos = self._line(conn, buf, pos, deadline)
            size_text = line.split(b";", 1)[0].strip()
            if not size_text or len(size_text) > 15 or size_text.strip(b"0123456789abcdefABCDEF"):
                raise _BadRequest(400, f"malformed chunk size {bytes(line[:40])!r}")
            size = int(size_text, 16)
            if size == 0:
                break
            if len(body) + size > limit:
                raise _BadRequest(413, f"chunked request body above the limit of {limit} bytes")
            self._reserve(conn, size)
            take = min(len(buf) - pos, size)
            body += buf[pos:pos + take]
            pos += take
            while take < size:
                more = self._recv(conn, min(size - take, _EAGER_BODY), deadline, "the request body")
                if not more:
                    return None, b""
                body += more
                take += len(more)
            line, buf, pos = self._line(conn, buf, pos, deadline)
            if line:
                raise _BadRequest(400, "chunk data longer than its size")
        while True:  # trailer fields, ignored, up to the empty line
            line, buf, pos = self._line(conn, buf, pos, deadline)
            if not line:
                break
            trailer += len(line)
            if trailer > MAX_HEAD:
                raise _BadRequest(431, f"chunked trailer above {MAX_HEAD} bytes")
        request.body = body
        return request, buf[pos:]

    def _line(self, conn: _Conn, buf: bytes, pos: int, deadline: float) -> tuple[bytes, bytes, int]:
        """The next CRLF-terminated line of a chunked body: (line, buffer, position after it)."""
        end = buf.find(b"\r\n", pos)
        while end < 0:
            if len(buf) - pos > 4096:
                raise _BadRequest(400, "malformed chunked body (line too long)")
            more = self._recv(conn, _RECV, deadline, "the request body")
            if not more:
                raise ConnectionResetError("the client left in the middle of a chunked body")
            buf, pos = buf[pos:] + more, 0
            end = buf.find(b"\r\n")
        return buf[pos:end], buf, end + 2


def _v2_client(request: Request) -> bool:
    """Whether a TCP POST without a JSON/.npy type is an Open Inference Protocol client, not a web page.

    tritonclient sends no Content-Type and kserve's binary requests send application/octet-stream,
    types a page could send too. A request carrying Inference-Header-Content-Length cannot come from a
    page without a CORS preflight, which the agent never approves; one without a type and without the
    Origin header browsers put on every POST comes from a program.
    """
    if not request.path.startswith("/v2/") or request.content_type not in ("", OCTET):
        return False
    return request.inference_header is not None or (request.content_type == "" and request.origin is None)


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
    chunked = False
    host: str | None = None
    authorization: str | None = None
    inference_header: int | None = None
    origin: str | None = None
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise _BadRequest(400, f"malformed header line {line[:80]!r}")
        key = name.lower()
        value = value.strip()
        if key == "content-length":
            if not (value.isascii() and value.isdigit()) or (length is not None and int(value) != length):
                raise _BadRequest(400, f"bad Content-Length {value[:40]!r}")
            length = int(value)
        elif key == "transfer-encoding":
            if value.lower() != "chunked" or chunked:
                raise _BadRequest(501, f"Transfer-Encoding {value[:40]!r} is not supported; send chunked or "
                                       "Content-Length")
            chunked = True
        elif key == "host":
            if host is not None:
                raise _BadRequest(400, "more than one Host header")
            host = value
        elif key == "authorization":
            authorization = value
        elif key == "content-type":
            content_type = value.split(";", 1)[0].strip().lower()
        elif key == "connection":
            connection = value.lower()
        elif key == "expect":
            if value.lower() != "100-continue":
                raise _BadRequest(417, f"cannot meet Expect: {value[:40]}")
            expect = True
        elif key == "inference-header-content-length":
            if not (value.isascii() and value.isdigit()) or len(value) > 15:
                raise _BadRequest(400, f"bad Inference-Header-Content-Length {value[:40]!r}")
            inference_header = int(value)
        elif key == "origin":
            origin = value
        elif key == "content-encoding" and value.lower() != "identity":
            # a compressed body would otherwise reach the routes as garbage JSON or tensor bytes
            raise _BadRequest(415, f"Content-Encoding {value[:40]!r} is not supported; send the body uncompressed")
    if chunked and length is not None:
        # the two framings disagreeing is how requests are smuggled past a proxy: refuse both
        raise _BadRequest(400, "both Content-Length and Transfer-Encoding: send one")
    path, _, query = target.partition("?")
    close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
    return Request(method=method, path=unquote(path), query=query, content_type=content_type,
                   content_length=length or 0, close=close, expect_continue=expect, host=host,
                   authorization=authorization, chunked=chunked, inference_header=inference_header,
                   origin=origin)


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


def _set_rcvtimeo(sock: socket.socket, seconds: float) -> None:
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", whole, int((seconds - whole) * 1e6)))


def _set_sndtimeo(sock: socket.socket, seconds: float) -> None:
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", whole, int((seconds - whole) * 1e6)))


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass

