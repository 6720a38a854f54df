"""A lean keep-alive client of the local inference API, over the Unix socket or TCP.

Used by `edge-agent predict`/`status` and the benchmarks: one connection reused across calls,
one send per request, and the response read with a minimal parser (the server always sends
Content-Length).
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np
from numpy.typing import NDArray

from edgefleet.agent.api.guard import send_with_fds
from edgefleet.agent.api.server import set_timeouts
from edgefleet.agent.serving import npy
from edgefleet.errors import RequestError

DEFAULT_SOCKET = "/run/edge-agent/api.sock"
ADMIN_SOCKET_NAME = "admin.sock"
_MAX_HEAD = 64 << 10


class ApiClient:
    """Talks to one agent; not thread-safe (use one client per thread)."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, url: str | None = None, *,
                 timeout: float = 30.0, admin_socket: str | os.PathLike[str] | None = None,
                 token: str | None = None) -> None:
        if socket_path is None and url is None:
            socket_path = DEFAULT_SOCKET
        self.socket_path = os.fspath(socket_path) if socket_path is not None else None
        if admin_socket is None and self.socket_path is not None:
            admin_socket = Path(self.socket_path).parent / ADMIN_SOCKET_NAME  # the agent's default beside it
        self.admin_socket = os.fspath(admin_socket) if admin_socket is not None else None
        """Where admin actions go (install, rollback, status); never the inference socket or TCP."""
        self.timeout = timeout
        self._auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self._tcp: tuple[str, int] | None = None
        if socket_path is None and url is not None:
            parts = urlsplit(url if "://" in url else f"http://{url}")
            if parts.scheme != "http" or not parts.hostname:
                raise ValueError(f"api url {url!r}: expected http://HOST:PORT")
            self._tcp = (parts.hostname, parts.port or 80)
        self._host = "localhost" if self._tcp is None else f"{self._tcp[0]}:{self._tcp[1]}"
        self._sock: socket.socket | None = None
        self._buf = b""
        self.last_version: int | None = None
        self._paths: dict[str, str] = {}
        self._v2_inputs: dict[str, list[str]] = {}
        self._v2_requests: dict[tuple[Any, ...], tuple[str, bytes, str]] = {}
        self._v2_answers: dict[bytes, list[tuple[str, np.dtype[Any], tuple[int, ...]]]] = {}

    @property
    def address(self) -> str:
        """The socket path or host:port this client talks to."""
        return self.socket_path if self.socket_path is not None else self._host

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buf = b""

    # -- the API -------------------------------------------------------------------------------

    def predict(self, name: str, data: Any, *, columnar: bool = False) -> dict[str, Any]:
        """Predict with JSON: `data` is the instances (rows, batch first) or, with `columnar`, the inputs."""
        if isinstance(data, np.ndarray):
            data = data.tolist()
        elif isinstance(data, dict):
            data = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in data.items()}
        body = json.dumps({"inputs" if columnar else "instances": data}, separators=(",", ":")).encode()
        return self._json("POST", f"/v1/models/{quote(name)}:predict", body)  # type: ignore[no-any-return]

    def predict_npy(self, name: str, array: NDArray[Any]) -> NDArray[Any]:
        """Predict with a binary `.npy` body; return the first output (version in `last_version`)."""
        path = self._paths.get(name)
        if path is None:
            path = f"/v1/models/{quote(name)}:predict"
            if len(self._paths) < 64:
                self._paths[name] = path
        status, headers, body = self.request("POST", path, npy.dumps(array), npy.CONTENT_TYPE)
        if status != 200:
            raise RequestError(_error_text(body, status), status)
        version = headers.get("x-model-version")
        self.last_version = int(version) if version and version.isdigit() else None
        return npy.loads(body)

    def predict_v2(self, name: str, inputs: NDArray[Any] | Mapping[str, NDArray[Any]], *,
                   version: int | None = None, outputs: Sequence[str] | None = None) -> dict[str, NDArray[Any]]:
        """Infer with the Open Inference Protocol and its binary tensor extension; return outputs by name.

        `inputs` is one array (for a single-input model) or arrays by input name, batch dimension
        first; tensors travel as raw bytes both ways, never as JSON numbers. The version that
        answered is in `last_version`.
        """
        if isinstance(inputs, np.ndarray):
            names = self._v2_inputs.get(name)
            if names is None:
                names = [i["name"] for i in self._json("GET", f"/v2/models/{quote(name)}")["inputs"]]
                if len(self._v2_inputs) < 64:
                    self._v2_inputs[name] = names
            if len(names) != 1:
                raise RequestError(f"model {name} takes {len(names)} inputs: pass them by name", 400)
            inputs = {names[0]: inputs}
        arrays: list[Any] = [
            _v2_bytes(v) if v.dtype.kind in "OSU" else v if v.flags.c_contiguous and v.dtype.byteorder != ">"
            else np.ascontiguousarray(v, v.dtype.newbyteorder("<")) for v in inputs.values()]
        strings = any(isinstance(v, bytes) for v in arrays)
        key = (name, version, tuple(inputs), tuple((v.dtype, v.shape) for v in inputs.values()),
               tuple(outputs) if outputs is not None else None)
        cached = None if strings else self._v2_requests.get(key)  # string sizes vary: no fixed header
        if cached is None:
            doc: dict[str, Any] = {"inputs": [
                {"name": k, "shape": list(v.shape),
                 "datatype": "BYTES" if isinstance(a, bytes) else _V2_BY_DTYPE.get(v.dtype) or v.dtype.name,
                 "parameters": {"binary_data_size": len(a) if isinstance(a, bytes) else a.nbytes}}
                for (k, v), a in zip(inputs.items(), arrays, strict=True)]}
            if outputs is not None:
                doc["outputs"] = [{"name": o, "parameters": {"binary_data": True}} for o in outputs]
            else:
                doc["parameters"] = {"binary_data_output": True}
            header = json.dumps(doc, separators=(",", ":")).encode()
            path = f"/v2/models/{quote(name)}" + (f"/versions/{version}" if version is not None else "") + "/infer"
            # the header of one request shape never changes: built once, like the npy route's path
            cached = (path, header, f"Inference-Header-Content-Length: {len(header)}\r\n")
            if not strings:
                if len(self._v2_requests) >= 64:
                    self._v2_requests.clear()
                self._v2_requests[key] = cached
        path, header, extra = cached
        parts = [a if isinstance(a, bytes) else a.data for a in arrays]
        status, headers, body = self.request("POST", path, b"".join([header, *parts]),
                                             "application/octet-stream", extra_headers=extra)
        if status != 200:
            self._v2_inputs.pop(name, None)  # the model may have been replaced by one with other inputs
            raise RequestError(_error_text(body, status), status)
        version_text = headers.get("x-model-version")
        self.last_version = int(version_text) if version_text and version_text.isdigit() else None
        end_text = headers.get("inference-header-content-length")
        end = int(end_text) if end_text and end_text.isdigit() else len(body)
        layout = self._v2_answers.get(body[:end]) if end < len(body) else None
        if layout is None:
            out, binary = _v2_outputs(body, end)
            if binary and end < len(body):
                if len(self._v2_answers) >= 64:
                    self._v2_answers.clear()
                self._v2_answers[body[:end]] = [(k, o.dtype, o.shape) for k, o in out.items()]
            return out
        # an answer header seen before (same outputs, shapes and version): only the tensor bytes are new
        result: dict[str, NDArray[Any]] = {}
        for k, dt, shape in layout:
            n = math.prod(shape)
            result[k] = np.frombuffer(body, dt, n, end).reshape(shape)
            end += n * dt.itemsize
        return result

    def models(self) -> dict[str, Any]:
        """Every served model and its versions' status (`GET /v1/models`)."""
        return self._json("GET", "/v1/models")  # type: ignore[no-any-return]

    def model_status(self, name: str) -> dict[str, Any]:
        """TensorFlow Serving's model status document."""
        return self._json("GET", f"/v1/models/{quote(name)}")  # type: ignore[no-any-return]

    def metadata(self, name: str) -> dict[str, Any]:
        """The model's signature and edgefleet details."""
        return self._json("GET", f"/v1/models/{quote(name)}/metadata")  # type: ignore[no-any-return]

    def health(self) -> dict[str, Any]:
        """The /healthz document, whether the agent is serving (200) or not (503); `http_status` added."""
        status, _, body = self.request("GET", "/healthz")
        value = _decode(body, status)
        if not isinstance(value, dict):
            raise RequestError("healthz: not a JSON object", 502)
        value["http_status"] = status
        return value

    def metrics(self) -> str:
        """The Prometheus text."""
        status, _, body = self.request("GET", "/metrics")
        if status != 200:
            raise RequestError(_error_text(body, status), status)
        return body.decode("utf-8")

    def admin(self, action: str, body: dict[str, Any] | None = None, *, fds: list[int] | None = None) -> dict[str, Any]:
        """Run an admin action over the admin socket (passing `fds` with it, SCM_RIGHTS); raise
        RequestError with the agent's message on failure."""
        if self.admin_socket is None:
            raise RequestError("admin actions need the agent's admin socket (api.admin_socket); "
                               "this client has none", 503)
        data = json.dumps(body or {}, separators=(",", ":")).encode()
        # not idempotent: never resent, so a fresh connection that cannot be stale, closed afterwards
        with ApiClient(socket_path=self.admin_socket, admin_socket=self.admin_socket,
                       timeout=self.timeout) as conn:
            status, _, answer = conn.request("POST", f"/v1/admin/{quote(action)}", data, retry=False, fds=fds)
        value = _decode(answer, status)
        if status >= 300:
            raise RequestError(value.get("error", f"HTTP {status}") if isinstance(value, dict) else
                               f"HTTP {status}", status)
        return value  # type: ignore[no-any-return]

    def install_bundle(self, bundle: Path) -> dict[str, Any]:
        """Install a bundle directory: its files are opened here and passed to the agent as descriptors.

        The agent runs as its own user in a sandbox (systemd ProtectHome, PrivateTmp) and may not see
        the caller's path; the caller can read the files, so it opens them and hands over the open
        files (SCM_RIGHTS on the admin socket). Nothing is uploaded through the agent's memory as a body.
        """
        from edgefleet.agent.api.guard import BUNDLE_PASSED

        fds: list[int] = []
        try:
            for name in BUNDLE_PASSED:
                try:
                    fds.append(os.open(Path(bundle) / name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY))
                except OSError as err:
                    raise RequestError(f"{Path(bundle) / name}: {err.strerror}", 400) from err
            return self.admin("install", {"files": {n: i for i, n in enumerate(BUNDLE_PASSED)}}, fds=fds)
        finally:
            for fd in fds:
                os.close(fd)

    # -- HTTP ----------------------------------------------------------------------------------

    def _json(self, method: str, path: str, body: bytes = b"", *, retry: bool = True) -> Any:
        status, _, data = self.request(method, path, body, "application/json", retry=retry)
        value = _decode(data, status)
        if status >= 300:
            raise RequestError(value.get("error", f"HTTP {status}") if isinstance(value, dict) else
                               f"HTTP {status}", status)
        return value

    def request(self, method: str, path: str, body: bytes = b"", content_type: str = "application/json",
                *, retry: bool = True, fds: list[int] | None = None,
                extra_headers: str = "") -> tuple[int, dict[str, str], bytes]:
        """Send one request (with `fds` passed along on a Unix socket, `extra_headers` as CRLF-ended
        lines); return (status, lower-cased headers, body). Reconnects once if the agent closed an
        idle connection; raise RequestError(503) when the agent cannot be reached."""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self._host}\r\n{self._auth}Content-Type: {content_type}\r\n"
                f"{extra_headers}Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        message = head + body
        for attempt in (0, 1):
            fresh = self._sock is None
            try:
                sock = self._connect()
                if fds:
                    send_with_fds(sock, message, fds)
                else:
                    sock.sendall(message)
                return self._read_response(sock)
            except (ConnectionError, _Closed) as err:
                self.close()
                if fresh or not retry or attempt:
                    raise RequestError(f"the agent at {self.address} closed the connection ({err})", 503) from err
            except (TimeoutError, BlockingIOError) as err:  # BlockingIOError: the kernel's SO_RCVTIMEO
                self.close()
                raise RequestError(f"no answer from the agent at {self.address} within {self.timeout} s",
                                   504) from err
            except OSError as err:
                self.close()
                raise RequestError(f"cannot reach the agent at {self.address}: {err.strerror or err}",
                                   503) from err
        raise AssertionError("unreachable")

    def _connect(self) -> socket.socket:
        if self._sock is None:
            if self._tcp is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                try:
                    sock.connect(str(self.socket_path))
                except OSError:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection(self._tcp, timeout=self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_timeouts(sock, self.timeout)
            self._sock = sock
            self._buf = b""
        return self._sock

    def _read_response(self, sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
        buf = self._buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(buf) > _MAX_HEAD:
                raise _Closed("response head too large")
            more = sock.recv(65536)
            if not more:
                raise _Closed("connection closed before a response")
            buf += more
        lines = buf[:end].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise _Closed(f"malformed status line {lines[0][:60]!r}")
        status = int(parts[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if status == 100:
            self._buf = buf[end + 4:]
            return self._read_response(sock)
        length = int(headers.get("content-length", "0"))
        start = end + 4
        while len(buf) - start < length:
            more = sock.recv(max(65536, length - (len(buf) - start)))
            if not more:
                raise _Closed("connection closed in the middle of a response")
            buf += more
        body = buf[start:start + length]
        self._buf = buf[start + length:]
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body


class _Closed(Exception):
    """The server closed the connection or sent something unreadable."""


_V2_TYPES = {"bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
             "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16",
             "float32": "FP32", "float64": "FP64"}
_V2_DTYPES = {v: np.dtype(k).newbyteorder("<") for k, v in _V2_TYPES.items()}
_V2_BY_DTYPE = {np.dtype(k): v for k, v in _V2_TYPES.items()}  # dtype.name costs µs per call; a dict probe does not


def _v2_bytes(x: NDArray[Any]) -> bytes:
    """A string tensor in the binary tensor extension's layout: per element a 4-byte length, then its bytes."""
    values = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in x.reshape(-1).tolist()]
    return b"".join(len(v).to_bytes(4, "little") + v for v in values)


def _v2_outputs(body: bytes, end: int) -> tuple[dict[str, NDArray[Any]], bool]:
    """The outputs of a v2 inference response whose JSON header ends at `end`, by name (binary ones as
    views on `body`, JSON ones as arrays), and whether all of them were binary numbers."""
    offset = end
    binary = True
    out: dict[str, NDArray[Any]] = {}
    for o in json.loads(body[:end])["outputs"]:
        shape = tuple(o["shape"])
        size = (o.get("parameters") or {}).get("binary_data_size")
        if o["datatype"] == "BYTES":
            if size is None:
                values: list[Any] = list(o["data"])
            else:
                values, pos = [], offset
                while pos < offset + size:
                    n = int.from_bytes(body[pos:pos + 4], "little")
                    values.append(body[pos + 4:pos + 4 + n])
                    pos += 4 + n
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[o["name"]] = arr.reshape(shape)
        elif size is None:
            out[o["name"]] = np.array(o["data"], dtype=_V2_DTYPES[o["datatype"]]).reshape(shape)
        else:
            dt = _V2_DTYPES[o["datatype"]]
            out[o["name"]] = np.frombuffer(body, dt, size // dt.itemsize, offset).reshape(shape)
        offset += size or 0
        binary = binary and size is not None and o["datatype"] != "BYTES"
    return out, binary


def _decode(body: bytes, status: int) -> Any:
    try:
        return json.loads(body)
    except ValueError as err:
        raise RequestError(f"HTTP {status} with a body that is not JSON", 502) from err


def _error_text(body: bytes, status: int) -> str:
    try:
        value = json.loads(body)
    except ValueError:
        return f"HTTP {status}"
    return str(value.get("error", f"HTTP {status}")) if isinstance(value, dict) else f"HTTP {status}"
