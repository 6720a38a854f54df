"""Generated hostile requests to the local API, as raw bytes over its Unix sockets (inference and admin).

The agent is the real daemon (loop thread, ApiServer, Serving, admin actions) in-process; every case
opens a connection, sends one request built from hostile parts (methods, targets with escaping names,
headers, lengths that lie, JSON and npy bodies of every wrong shape and type, admin bodies), closes
its sending side and reads what comes back. Each case must get a 2xx or a 4xx with an error message
(never a 5xx but 505 for an HTTP version it does not speak), or, only when the request promised more body than it sent, a closed connection; and
afterwards state.json is byte-for-byte the same, the same model answers the same, and /healthz is up.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import string
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.agent.api.client import ApiClient
from edgefleet.agent.api.server import ADMIN_BODY_BYTES
from edgefleet.protocol import SigningKey
from edgefleet.testing.reliability import AgentWith, X, build_bundle, fast_tmp
from edgefleet.testing.waiting import wait_for
from tests.support.fuzzing import CASES, E2E, FUZZ, JSON, NAMES, TIMEOUT_S
from tests.support.inproc import InProcessAgent, tree

pytestmark = pytest.mark.timeout(TIMEOUT_S)

MAX_BODY = 1 << 20
ADMIN_BODY = ADMIN_BODY_BYTES  # admin bodies are small JSON: bundles come as passed descriptors or a path
ROW = st.lists(st.floats(allow_nan=False, width=32) | st.integers(-10, 10), min_size=8, max_size=8)
INSTANCES = st.one_of(
    st.lists(ROW, min_size=1, max_size=4), st.lists(ROW, max_size=0), st.lists(st.lists(st.floats(), max_size=12),
                                                                               max_size=3),
    st.lists(st.dictionaries(st.sampled_from(["x", "input", "serving_default_keras_tensor:0", ""]), ROW, max_size=2),
             max_size=3),
    st.sampled_from([[[1e308] * 8], [[-1e308] * 8], [["1"] * 8], [[True] * 8], [[None] * 8], [[[0.5] * 8]],
                     [[0.5] * 8] * 1025, [[0.5] * 7], [[0.5] * 9], [[[[[[0.5]]]]]], "rows", 5, {"x": 1}]),
    JSON,
)


def json_body(draw: Any) -> bytes:
    """A predict body: instances or inputs of every wrong kind, with the odd extra field or literal."""
    kind = draw(st.sampled_from(["instances", "instances", "inputs", "both", "extra", "neither", "value", "literal"]))
    value = draw(INSTANCES)
    if kind == "instances":
        doc: Any = {"instances": value}
    elif kind == "inputs":
        doc = {"inputs": value if draw(st.booleans()) else {"x": value}}
    elif kind == "both":
        doc = {"instances": value, "inputs": value}
    elif kind == "extra":
        doc = {"instances": value, draw(st.text(max_size=8)): 1}
    elif kind == "neither":
        doc = {"signature_name": "serving_default"}
    elif kind == "value":
        doc = value
    else:
        return draw(st.sampled_from([b'{"instances":[[NaN,0,0,0,0,0,0,0]]}', b'{"instances":[[Infinity,1,1,1,1,1,1,1]]}',
                                     b'{"instances":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b'{"instances":[[1e999',
                                     b'\xef\xbb\xbf{"instances":[[0,0,0,0,0,0,0,0]]}', b'{"a":1,"a":2}']))
    return json.dumps(doc).encode()


def npy_body(draw: Any) -> bytes:
    """An .npy body: any dtype and shape, data of the right or wrong length, broken headers."""
    dtype = draw(st.sampled_from(["<f4", "<f8", "|i1", "|u1", "<i8", "|b1", "<U3", ">f4", "<c8", "|O", "<f2", "zz"]))
    shape = draw(st.lists(st.integers(0, 9), max_size=4).map(tuple) | st.sampled_from([(1, 8), (2, 8), (1 << 40, 8)]))
    order = draw(st.sampled_from(["False", "True", "1"]))
    header = f"{{'descr': '{dtype}', 'fortran_order': {order}, 'shape': {shape}, }}"
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    magic = draw(st.sampled_from([b"\x93NUMPY\x01\x00", b"\x93NUMPY\x02\x00", b"\x93NUMPY\x03\x00", b"NUMPY\x01\x00x"]))
    length = len(header).to_bytes(2 if magic[6] == 1 else 4, "little") if magic.startswith(b"\x93") else b"\xff\xff"
    items = int(np.prod(shape)) if all(d < 1000 for d in shape) else 4
    size = draw(st.sampled_from([items * 4, items * 8, 0, 3, items * 4 + 1]))
    return magic + length + header.encode("latin-1") + bytes(min(size, 1 << 16))


def tar_body(draw: Any, v1: Path) -> bytes:
    """A tar of a bundle, as bundles were once uploaded: it must install nothing (names that escape,
    links, lies in headers, junk), whichever socket it is sent to."""
    import io
    import tarfile

    kind = draw(st.sampled_from(["escape", "link", "junk files", "missing file", "the active bundle", "truncated",
                                 "random", "size lie"]))
    if kind == "random":
        return draw(st.binary(max_size=4000))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tar:
        def add(name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.size, info.type, info.linkname = len(data), kind, link
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        files = {n: (v1 / n).read_bytes() for n in ("manifest.json", "model.tflite", "golden.npz")}
        if kind == "escape":
            files[draw(st.sampled_from(["../manifest.json", "/etc/passwd", "a/../../model.tflite", "./golden.npz",
                                        "..", "state/../x"]) | NAMES)] = b"x"
        elif kind == "junk files":
            files = {n: draw(st.binary(max_size=200)) for n in files}
        elif kind == "missing file":
            files.pop(draw(st.sampled_from(sorted(files))))
        for name, data in files.items():
            add(name, data)
        if kind == "link":
            add(draw(st.sampled_from(["report.json", "manifest.json"])), b"", draw(st.sampled_from(
                [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE, tarfile.DIRTYPE])), "/etc/passwd")
    data = buf.getvalue()
    if kind == "truncated":
        return data[: draw(st.integers(1, len(data) - 1))]
    if kind == "size lie":  # the first member claims far more bytes than the archive has
        return data[:124] + b"77777777777\x00" + data[136:]
    return data


def target(draw: Any) -> str:
    """A request target: real routes, names built to escape, percent-encoding, junk."""
    name = draw(NAMES)
    name = quote(name, safe="") if draw(st.booleans()) else name
    return draw(st.sampled_from([
        "/v1/models/m", "/v1/models/m:predict", "/v1/models/m/metadata", "/v1/models/m/versions/1",
        "/v1/models/m/versions/2:predict", f"/v1/models/{name}", f"/v1/models/{name}:predict",
        f"/v1/models/{name}/metadata", f"/v1/models/m/versions/{name}", "/healthz", "/metrics", "/v1/admin/status",
        "/v1/admin/install", "/v1/admin/rollback", f"/v1/admin/{name}", "/", "*", "/v1/models/", "/v1/models/:predict",
        f"/{name}", "/v1/models/m:predict?x=1&y", "/%00", "/v1/models/%2e%2e%2fm:predict", "//v1/models/m",
    ]))


def request_case(draw: Any, v1: Path) -> tuple[bytes, bool, str, bool]:
    """(raw request, whether a response is owed, what it is, whether it goes to the admin socket): a sane
    request with 0-3 layers broken; admin routes go to the admin socket or, refused there, the inference one."""
    broken = set(draw(st.lists(st.sampled_from(["method", "version", "target", "content type", "length", "header",
                                                "body"]), max_size=3)))
    path = target(draw) if "target" in broken or draw(st.booleans()) else draw(st.sampled_from(
        ["/v1/models/m:predict"] * 4 + ["/v1/models/m", "/v1/models/m/metadata", "/healthz", "/metrics",
                                        "/v1/admin/status", "/v1/admin/install", "/v1/admin/rollback"]))
    post = path.endswith(":predict") or path.startswith("/v1/admin/")
    method = ("POST" if post else "GET") if "method" not in broken else draw(
        st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "get", "P/ST", ""])
        | st.text(string.ascii_letters, min_size=1, max_size=8))
    version = "HTTP/1.1" if "version" not in broken else draw(
        st.sampled_from(["HTTP/1.0", "HTTP/2", "HTTP/1.1 x", "", "http/1.1", "HTTP/1.1\x00"]))
    body_kind = draw(st.sampled_from(["json", "json", "npy", "npy", "admin", "tar", "bytes", "none"]))
    if path.startswith("/v1/admin/") and "body" not in broken:
        body_kind = draw(st.sampled_from(["admin", "tar"]))
    ctype = {"json": "application/json", "npy": "application/x-npy", "tar": "application/x-tar"}.get(
        body_kind, "application/json")
    if body_kind == "json":
        body = json_body(draw)
    elif body_kind == "npy":
        body = npy_body(draw)
    elif body_kind == "admin":
        body = json.dumps(draw(st.sampled_from([{"path": "/"}, {"path": "/dev/null"}, {"path": "."}, {"model": "m"},
                                                {"model": None}, {"path": 5}, [], {"model": "../m"}, {}])
                               | st.dictionaries(st.sampled_from(["path", "model"]), JSON, max_size=2))).encode()
    elif body_kind == "tar":
        body = tar_body(draw, v1)
    elif body_kind == "bytes":
        body = draw(st.binary(max_size=3000))
    else:
        body = b""
    if "content type" in broken:
        ctype = draw(st.sampled_from(["text/plain", "", "application/x-npy", "application/json; charset=x",
                                      "multipart/form-data", "APPLICATION/X-NPY"]))
    headers: list[tuple[str, str | None]] = [("Host", "localhost"), ("Content-Type", ctype)]
    length: str | None = str(len(body))
    lie = "none" if "length" not in broken else draw(st.sampled_from(
        ["missing", "more", "less", "text", "negative", "huge", "twice", "conflict", "chunked", "expect",
         "expect other"]))
    if lie == "missing":
        length = None
    elif lie == "more":
        length = str(len(body) + draw(st.integers(1, 100)))
    elif lie == "less":
        length = str(max(0, len(body) - draw(st.integers(1, 100))))
    elif lie == "text":
        length = draw(st.sampled_from(["abc", "1e3", "", " 5", "0x10", "+1"]))
    elif lie == "negative":
        length = "-1"
    elif lie == "huge":
        length = str(draw(st.sampled_from([MAX_BODY + 1, ADMIN_BODY + 1, 10**12, 10**30])))
    if length is not None:
        headers.append(("Content-Length", length))
    if lie == "twice" and length is not None:
        headers.append(("Content-Length", length))
    elif lie == "conflict" and length is not None:
        headers.append(("Content-Length", str(int(length) + 1)))
    elif lie == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
    elif lie in ("expect", "expect other"):
        headers.append(("Expect", "100-continue" if lie == "expect" else "magic"))
    if "header" in broken:
        headers += draw(st.sampled_from([[("Connection", "close")], [("X-Junk", "a" * 70_000)], [("NoColon", None)],
                                         [("Bad Name", "x")], [(" Lead", "x")], [("X", "\x00\xff")]]))
    lines = [f"{method} {path} {version}".replace("\r", "").replace("\n", "")]
    lines += [k if v is None else f"{k}: {v}" for k, v in headers]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogatepass") + body
    # a promised body that never comes may be answered by closing; everything else is owed an answer
    declared = [v.strip() for k, v in headers if k == "Content-Length" and v is not None]
    admin = path.startswith("/v1/admin/") and draw(st.integers(0, 3)) > 0
    limit = ADMIN_BODY if admin else MAX_BODY
    owed = not (declared and all(d.isdigit() for d in declared) and len(set(declared)) == 1
                and len(body) < int(declared[0]) <= limit)
    where = "admin socket" if admin else "inference socket"
    return raw, owed, f"{method} {path[:60]!r} {version} {body_kind} {lie} {sorted(broken)} on the {where}", admin


def exchange(sock_path: Path, raw: bytes) -> tuple[int | None, dict[str, str], bytes]:
    """Send `raw`, close the sending side, read one response (None if the server just closed)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(sock_path))
        try:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early (e.g. 431) and closed: read what it sent
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    while data.startswith(b"HTTP/1.1 100"):
        data = data[data.index(b"\r\n\r\n") + 4:]
    if not data:
        return None, {}, b""
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, rest[: int(headers.get("content-length", "0"))]


def check_answer(status: int | None, headers: dict[str, str], body: bytes, owed: bool, what: str) -> str:
    """The rules every answer follows; returns a label for the tally."""
    if status is None:
        assert not owed, f"{what}: the connection closed without an answer"
        return "closed (body never sent)"
    assert status < 500 or status == 505, f"{what}: {status} {body[:300]!r}"  # 505: HTTP/2 and the like
    if status >= 400:
        message = json.loads(body)["error"]
        assert isinstance(message, str) and message.strip(), what
        return f"{status}"
    return "2xx"


@pytest.fixture(scope="module")
def agent() -> Iterator[InProcessAgent]:
    root = fast_tmp("edgefleet-fuzz-api-")
    key = SigningKey.generate()
    a = InProcessAgent.create(root, build_bundle(root / "v1", "dense_f32", version=1, key=key, labels=list("abcd")),
                              key, mqtt=False, api={"max_body_bytes": MAX_BODY})
    a.start_loop()
    wait_for(lambda: (root / "api.sock").exists(), timeout=30, what="the API socket")
    yield a
    a.stop_loop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e308 sent as float32
def test_generated_api_requests(agent: InProcessAgent) -> None:
    sock = agent.root / "api.sock"
    client = ApiClient(socket_path=str(sock))
    state = agent.state_bytes()
    before = agent.snapshot()
    files = tree(agent.root)
    tally: Counter[str] = Counter()

    @FUZZ
    @given(data=st.data())
    def case(data: Any) -> None:
        raw, owed, what, admin = request_case(data.draw, agent.root / "v1")
        status, headers, body = exchange(agent.root / "admin.sock" if admin else sock, raw)
        tally[check_answer(status, headers, body, owed, what)] += 1
        assert agent.state_bytes() == state, what
        assert agent.predict() == before.prediction, what
        assert client.health()["http_status"] == 200, what
        tally["cases"] += 1

    case()
    assert agent.snapshot() == before
    assert tree(agent.root).keys() == files.keys()
    assert agent.thread is not None and agent.thread.is_alive()
    print(f"API fuzz: {dict(tally)}")
    assert tally["cases"] >= CASES and tally["2xx"] > 50 and tally["400"] > 100, tally
    metrics = client.metrics()
    assert re.search(r'^edgefleet_api_requests_total\{(device="[^"]*",)?code="400"\} [1-9]', metrics, re.M), metrics
    assert not re.search(r'^edgefleet_api_requests_total\{(device="[^"]*",)?code="500"\}', metrics, re.M), metrics


def test_generated_api_requests_to_a_real_agent(tmp_path: Path) -> None:
    a = AgentWith(tmp_path / "agent", api={"max_body_bytes": MAX_BODY})
    v1 = build_bundle(tmp_path / "v1", "dense_f32", version=1, key=None)
    assert a.cli("install", str(v1)).returncode == 0
    a.start()
    try:
        state = (a.state_dir / "state.json").read_bytes()
        answer = a.client.predict("m", X)
        seen: Counter[str] = Counter()

        @E2E
        @given(data=st.data())
        def case(data: Any) -> None:
            raw, owed, what, admin = request_case(data.draw, v1)
            status, headers, body = exchange(a.root / "admin.sock" if admin else a.socket, raw)
            seen[check_answer(status, headers, body, owed, what)] += 1

        case()
        assert a.proc is not None and a.proc.poll() is None, a.log()[-3000:]
        assert (a.state_dir / "state.json").read_bytes() == state
        assert a.client.predict("m", X) == answer
        assert "Traceback" not in a.log(), a.log()[-3000:]
        assert sum(seen.values()) >= E2E.max_examples, seen
    finally:
        a.kill()
