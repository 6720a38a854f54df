"""The HTTP vocabulary of the local API: a parsed request, a response and how errors are answered.

The server (agent/api/server.py) turns bytes into `Request`s and `Response`s back into bytes; the
routes (agent/api/routes.py for TensorFlow Serving's shapes, agent/api/v2.py for the Open Inference
Protocol) only see these values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from edgefleet.errors import RequestError

JSON = "application/json"
_REASONS = {
    200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    411: "Length Required", 413: "Payload Too Large", 415: "Unsupported Media Type", 417: "Expectation Failed",
    422: "Unprocessable Entity", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    503: "Service Unavailable", 505: "HTTP Version Not Supported",
}


@dataclass
class Request:
    """A parsed HTTP request (path already percent-decoded, query string kept raw)."""

    method: str
    path: str
    query: str = ""
    content_type: str = ""
    content_length: int = 0
    close: bool = False
    expect_continue: bool = False
    body: bytes | bytearray = b""
    host: str | None = None
    authorization: str | None = None
    chunked: bool = False
    fds: list[int] = field(default_factory=list)
    """File descriptors the client passed with this request (admin socket only); closed after it."""
    inference_header: int | None = None
    """Inference-Header-Content-Length (the v2 binary tensor extension): the JSON part of the body."""
    origin: str | None = None
    """The Origin header, which browsers send with every POST (TCP uses it to tell a web page)."""


@dataclass
class Response:
    """An HTTP response; `encode` gives the bytes sent in one call."""

    status: int
    body: bytes
    content_type: str = JSON
    headers: list[tuple[str, str]] = field(default_factory=list)

    def encode(self, *, close: bool = False) -> bytes:
        """The whole response: status line, headers and body."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in self.headers)
        if close:
            extra += "Connection: close\r\n"
        head = (f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Unknown')}\r\n"
                f"Content-Type: {self.content_type}\r\nContent-Length: {len(self.body)}\r\n{extra}\r\n")
        return head.encode("latin-1") + self.body


def json_response(status: int, value: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    """A JSON response (NaN allowed in outputs, as TensorFlow Serving writes them)."""
    body = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return Response(status, body, JSON, headers or [])


def error_response(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    """`{"error": message}` with a 4xx/5xx status."""
    return json_response(status, {"error": message}, headers)


def require_method(req: Request, allowed: str) -> None:
    """MethodNotAllowed (405, with the Allow header) unless the request uses `allowed`."""
    if req.method != allowed:
        raise MethodNotAllowed(allowed, req)


class MethodNotAllowed(RequestError):
    """A route exists at this path, but not for this method."""

    def __init__(self, allowed: str, req: Request) -> None:
        super().__init__(f"{req.method} is not allowed on {req.path} (use {allowed})", 405)
        self.allowed = allowed
