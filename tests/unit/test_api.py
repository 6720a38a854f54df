"""The local inference API over real sockets: TF-Serving shapes, npy, every bad request, stop, swaps."""

from __future__ import annotations

import gc
import io
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.api.client import ApiClient
from edgefleet.agent.api.server import ApiServer
from edgefleet.agent.serving.models import Serving
from edgefleet.bundle import MODEL_FILE, Bundle
from edgefleet.errors import (
    ActionError,
    ConfigError,
    Conflict,
    InvalidInput,
    NotFound,
    RequestError,
    Unavailable,
)
from tests.support.helpers import read_http_response, read_http_responses

LABELS = ("a", "b", "c", "d")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: AF_UNIX paths are limited to 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="ef-api-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


Factory = Callable[..., tuple[ApiServer, Serving]]


@pytest.fixture
def api(make_bundle: Callable[..., Path], short_dir: Path) -> Iterator[Factory]:
    """Start a Serving + ApiServer (Unix socket and a TCP port) on a bundle; stopped at teardown."""
    servers: list[ApiServer] = []

    def start(model: str | None = "dense_f32", *, version: int = 1, serving: Serving | None = None,
              **kwargs: Any) -> tuple[ApiServer, Serving]:
        serving = serving or Serving()
        if model is not None:
            bundle = make_bundle(model, version=version, labels=LABELS)
            serving.activate("m", bundle / MODEL_FILE, Bundle.load(bundle).deployment)
        kwargs.setdefault("port", 0)
        kwargs.setdefault("admin_socket", short_dir / "admin.sock")
        server = ApiServer(serving, socket_path=short_dir / "api.sock", **kwargs)
        server.start()
        servers.append(server)
        return server, serving

    yield start
    for server in servers:
        server.stop(timeout=2)


def _client(server: ApiServer) -> ApiClient:
    return ApiClient(socket_path=str(server.socket_path))


def _exchange(sock: socket.socket, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one response."""
    sock.sendall(data)
    return read_http_response(sock)


def _unix(server: ApiServer, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(server.socket_path))
    return sock


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _npy_with_header(text: str, data_bytes: int) -> bytes:
    header = text.encode("latin-1") + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + bytes(data_bytes)


def _post(path: str, body: bytes, ctype: str = "application/json", extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"{extra}\r\n").encode() + body


def test_status_metadata_and_health_have_tf_serving_shapes(api: Factory) -> None:
    server, _ = api(version=7)
    c = _client(server)
    assert c.model_status("m") == {"model_version_status": [
        {"version": "7", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    sig = c.metadata("m")["metadata"]["signature_def"]["signature_def"]["serving_default"]
    (inp,) = sig["inputs"].values()
    assert inp["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in inp["tensor_shape"]["dim"]] == ["-1", "8"]
    assert c.metadata("m")["edgefleet"]["labels"] == list(LABELS)
    health = c.health()
    assert health["http_status"] == 200 and health["status"] == "ok"
    assert health["models"]["m"]["version"] == 7
    with pytest.raises(RequestError) as info:
        c.model_status("nope")
    assert info.value.status == 404


def test_the_model_list_names_every_served_model_with_its_versions(api: Factory,
                                                                    make_bundle: Callable[..., Path]) -> None:
    server, serving = api(version=3)
    c = _client(server)
    available = {"state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    assert c.models() == {"models": [{"name": "m", "model_version_status": [{"version": "3", **available}]}]}
    other = make_bundle("dense_f32", version=5, labels=LABELS)
    serving.activate("a-second", other / MODEL_FILE, Bundle.load(other).deployment)
    listed = c.models()["models"]
    assert [m["name"] for m in listed] == ["a-second", "m"]
    assert listed[0] == {"name": "a-second", **c.model_status("a-second")}
    status, _, body = _client(server).request("POST", "/v1/models", b"{}")
    assert status == 405, body


def test_the_model_list_is_empty_while_nothing_is_served(api: Factory) -> None:
    server, _ = api(None)
    assert _client(server).models() == {"models": []}


def test_health_is_503_while_nothing_is_served(api: Factory) -> None:
    server, _ = api(None, status=lambda: {"phase": "starting"})
    health = _client(server).health()
    assert health["http_status"] == 503 and health["status"] == "unavailable"
    assert health["agent"] == {"phase": "starting"}


def test_json_rows_and_columns_answer_like_the_in_process_path(api: Factory) -> None:
    server, serving = api()
    c = _client(server)
    x = np.random.default_rng(3).normal(size=(2, 8)).astype(np.float32)
    local = serving.predict("m", [x])
    rows = c.predict("m", x)
    assert rows["edgefleet"]["model_version"] == 1
    np.testing.assert_allclose(rows["predictions"], local.outputs[0], rtol=1e-6)
    assert rows["edgefleet"]["top_k"] == json.loads(json.dumps(local.top_k))
    assert [t["label"] for t in rows["edgefleet"]["top_k"][0]][0] == LABELS[int(np.argmax(local.outputs[0][0]))]
    cols = c.predict("m", x, columnar=True)
    np.testing.assert_allclose(cols["outputs"], local.outputs[0], rtol=1e-6)
    # TF Serving's named-input forms
    name = next(iter(c.metadata("m")["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]))
    named_rows = c.predict("m", [{name: row} for row in x.tolist()])
    np.testing.assert_allclose(named_rows["predictions"], local.outputs[0], rtol=1e-6)
    named_cols = c.predict("m", {name: x}, columnar=True)
    np.testing.assert_allclose(named_cols["outputs"], local.outputs[0], rtol=1e-6)


def test_npy_path_over_unix_socket_and_tcp(api: Factory) -> None:
    server, serving = api(version=4)
    x = np.random.default_rng(5).normal(size=(3, 8)).astype(np.float32)
    expected = serving.predict("m", [x]).outputs[0]
    for client in (_client(server), ApiClient(url=f"http://127.0.0.1:{server.port}")):
        out = client.predict_npy("m", x)
        assert out.dtype == np.float32 and out.shape == (3, 4)
        np.testing.assert_array_equal(out, expected)
        assert client.last_version == 4
    # a plain np.save body and np.load of the answer: no special client needed
    sock = _unix(server)
    status, headers, body = _exchange(sock, _post("/v1/models/m:predict", _npy(x), "application/x-npy"))
    assert status == 200 and headers["content-type"] == "application/x-npy"
    assert headers["x-model-version"] == "4"
    np.testing.assert_array_equal(np.load(io.BytesIO(body)), expected)


def test_int8_model_over_the_api(api: Factory) -> None:
    server, serving = api("dense_int8")
    c = _client(server)
    x = np.random.default_rng(8).normal(size=(2, 8)).astype(np.float32)
    floats = c.predict("m", x)
    np.testing.assert_allclose(floats["predictions"], serving.predict("m", [x]).outputs[0], rtol=1e-6)
    assert all(isinstance(v, float) for v in floats["predictions"][0])
    q = np.random.default_rng(9).integers(-128, 127, size=(1, 8), dtype=np.int8)
    native = c.predict_npy("m", q)
    assert native.dtype == np.int8
    np.testing.assert_array_equal(native, serving.predict("m", [q]).outputs[0])


BAD = [
    ("malformed JSON", "/v1/models/m:predict", b'{"instances": [1,', "application/json", 400, "malformed JSON"),
    ("not an object", "/v1/models/m:predict", b"[1, 2]", "application/json", 400, "JSON object"),
    ("both forms", "/v1/models/m:predict", b'{"instances": [[0,0,0,0,0,0,0,0]], "inputs": [[0,0,0,0,0,0,0,0]]}',
     "application/json", 400, "exactly one of"),
    ("unknown field", "/v1/models/m:predict", b'{"instancez": []}', "application/json", 400, "instancez"),
    ("wrong shape", "/v1/models/m:predict", b'{"instances": [[1, 2, 3]]}', "application/json", 400, "shape [1, 3]"),
    ("row without batch", "/v1/models/m:predict", b'{"inputs": [0,0,0,0,0,0,0,0]}', "application/json", 400,
     "does not fit"),
    ("strings", "/v1/models/m:predict", b'{"instances": [["a","b","c","d","e","f","g","h"]]}', "application/json",
     400, "strings"),
    ("ragged", "/v1/models/m:predict", b'{"instances": [[1,2,3,4,5,6,7,8],[1]]}', "application/json", 400,
     "rectangular"),
    ("empty instances", "/v1/models/m:predict", b'{"instances": []}', "application/json", 400, "non-empty"),
    ("unknown model", "/v1/models/zz:predict", b'{"instances": [[0,0,0,0,0,0,0,0]]}', "application/json", 404,
     "unknown model 'zz'"),
    ("version not served", "/v1/models/m/versions/9:predict", b'{"instances": [[0,0,0,0,0,0,0,0]]}',
     "application/json", 404, "version 9"),
    ("bad npy magic", "/v1/models/m:predict", b"not npy at all", "application/x-npy", 400, "bad magic"),
    ("npy object dtype", "/v1/models/m:predict", _npy_with_header("{'descr': '|O', 'fortran_order': False, "
                                                                  "'shape': (1, 8), }", 64),
     "application/x-npy", 400, "not supported"),
    ("npy header not a dict", "/v1/models/m:predict", _npy_with_header("__import__('os')", 32),
     "application/x-npy", 400, "header is not a dict"),
    ("npy short data", "/v1/models/m:predict", _npy(np.zeros((1, 8), np.float32))[:-4], "application/x-npy", 400,
     "data bytes"),
    ("npy wrong dtype", "/v1/models/m:predict", _npy(np.array([["x"] * 8])), "application/x-npy", 400,
     "not supported"),
    ("content type", "/v1/models/m:predict", b"<xml/>", "application/xml", 415, "Content-Type"),
    ("unknown route", "/v2/whatever", b"{}", "application/json", 404, "unknown route"),
    ("unknown verb", "/v1/models/m:explain", b"{}", "application/json", 404, ":predict, :classify, :regress"),
    ("wrong method", "/healthz", b"{}", "application/json", 405, "POST is not allowed"),
]


@pytest.mark.parametrize(("label", "path", "body", "ctype", "status", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_4xx_saying_what_is_wrong(api: Factory, label: str, path: str, body: bytes, ctype: str,
                                                     status: int, message: str) -> None:
    server, serving = api()
    sock = _unix(server)
    code, headers, answer = _exchange(sock, _post(path, body, ctype))
    assert code == status
    assert message in json.loads(answer)["error"]
    if status == 405:
        assert headers["allow"] == "GET"
    # the same connection keeps serving, and nothing changed
    code, _, answer = _exchange(sock, _post("/v1/models/m:predict", b'{"instances": [[0,0,0,0,0,0,0,0]]}'))
    assert code == 200 and len(json.loads(answer)["predictions"]) == 1
    assert serving.served("m").stats.errors == 0  # type: ignore[union-attr]


def test_oversized_body_is_refused_from_its_content_length(api: Factory) -> None:
    server, _ = api(max_body_bytes=1000)
    sock = _unix(server)
    # only the head is sent: the answer must come without the server waiting for the body
    code, headers, answer = _exchange(sock, b"POST /v1/models/m:predict HTTP/1.1\r\nContent-Length: 1000000000\r\n"
                                            b"Content-Type: application/x-npy\r\n\r\n")
    assert code == 413 and "above the limit of 1000" in json.loads(answer)["error"]
    assert headers["connection"] == "close"
    assert sock.recv(10) == b""
    assert _client(server).health()["http_status"] == 200


@pytest.mark.parametrize(("raw", "status", "message"), [
    (b"GARBAGE\r\n\r\n", 400, "malformed request line"),
    (b"GET /healthz HTTP/2.0\r\n\r\n", 505, "not supported"),
    (b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", 400, "malformed header"),
    (b"GET /healthz HTTP/1.1\r\nBad Name: x\r\n\r\n", 400, "malformed header"),
    (b"POST /v1/models/m:predict HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400, "Content-Length"),
    (b"POST /v1/models/m:predict HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400,
     "Content-Length"),
    (b"POST /v1/models/m:predict HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 501,
     "not supported"),
    (b"POST /v1/models/m:predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\nhello", 400,
     "both Content-Length and Transfer-Encoding"),
    (b"POST /v1/models/m:predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400,
     "malformed chunk size"),
    (b"POST /v1/models/m:predict HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n", 400,
     "longer than its size"),
    (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"x" * (70 << 10) + b"\r\n\r\n", 431, "request head"),
])
def test_malformed_http_is_refused_and_the_server_keeps_serving(api: Factory, raw: bytes, status: int,
                                                                message: str) -> None:
    server, _ = api()
    sock = _unix(server)
    code, _, answer = _exchange(sock, raw)
    assert code == status and message in json.loads(answer)["error"]
    assert _client(server).predict("m", [[0.0] * 8])["edgefleet"]["model_version"] == 1


def test_keep_alive_pipelining_and_expect_continue(api: Factory) -> None:
    server, _ = api()
    sock = _unix(server)
    one = _post("/v1/models/m:predict", b'{"instances": [[1,1,1,1,1,1,1,1]]}')
    sock.sendall(one + b"GET /v1/models/m HTTP/1.1\r\n\r\n" + one)  # three requests in one send
    answers = read_http_responses(sock, 3)
    assert [a[0] for a in answers] == [200, 200, 200]
    assert "predictions" in json.loads(answers[0][2]) and "model_version_status" in json.loads(answers[1][2])
    assert answers[0][2] == answers[2][2]
    body = b'{"instances": [[2,2,2,2,2,2,2,2]]}'
    sock.sendall(_post("/v1/models/m:predict", b"", extra="Expect: 100-continue\r\n").replace(
        b"Content-Length: 0", f"Content-Length: {len(body)}".encode()))
    assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    sock.sendall(body)
    assert read_http_response(sock)[0] == 200


def test_admin_actions_are_forwarded_on_the_admin_socket_only(api: Factory) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []

    # each kind of action error has its status, decided here only; anything else is the agent's fault
    failures: dict[str, tuple[Exception, int]] = {
        "bad": (InvalidInput("install needs a path"), 400), "missing": (NotFound("unknown model 'x'"), 404),
        "busy": (Conflict("m: no previous version to roll back to"), 409),
        "slow": (Unavailable("the agent did not finish status within 600s"), 504),
        "other": (ActionError("cannot do that now"), 400), "bug": (KeyError("state"), 500),
    }

    def admin(action: str, body: dict[str, Any]) -> dict[str, Any]:
        if action in failures:
            raise failures[action][0]
        calls.append((action, body))
        return {"accepted": action}

    server, _ = api(admin=admin)
    c = _client(server)
    assert c.admin("rollback", {"model": "m"}) == {"accepted": "rollback"}
    assert calls == [("rollback", {"model": "m"})]
    for action, (err, status) in failures.items():
        with pytest.raises(RequestError) as info:
            c.admin(action)
        assert info.value.status == status and str(err) in str(info.value), action
    with pytest.raises(RequestError, match="KeyError: 'state'"):
        c.admin("bug")
    # the inference socket and TCP are refused, whatever the body
    for sock in (_unix(server), socket.create_connection(("127.0.0.1", server.port))):
        code, _, answer = _exchange(sock, _post("/v1/admin/rollback", b'{"model": "m"}').replace(
            b"Host: x", b"Host: localhost"))
        assert code == 403 and "admin socket" in json.loads(answer)["error"]
    admin_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    admin_sock.connect(str(server.admin_path))
    code, _, answer = _exchange(admin_sock, _post("/v1/admin/rollback", b"[1]"))
    assert code == 400 and "JSON object" in json.loads(answer)["error"]
    code, _, answer = _exchange(admin_sock, _post("/v1/admin/rollback", b"{}", "application/x-tar"))
    assert code == 415
    assert calls == [("rollback", {"model": "m"})]


def test_metrics_default_and_from_the_callable(api: Factory) -> None:
    server, _ = api()
    c = _client(server)
    c.predict("m", [[0.0] * 8])
    text = c.metrics()
    assert 'edgefleet_inference_total{model="m"} 1' in text
    assert 'edgefleet_inference_duration_seconds_bucket{model="m",le="+Inf"} 1' in text
    assert 'edgefleet_model_version{model="m"} 1' in text
    server.stop()
    custom, _ = api(metrics=lambda: "edgefleet_custom 42\n")
    assert _client(custom).metrics() == "edgefleet_custom 42\n"


def test_connections_are_capped_and_idle_ones_time_out(api: Factory) -> None:
    server, _ = api(max_connections=2, idle_timeout_s=0.5)
    first, second = _unix(server), _unix(server)
    third = _unix(server)
    code, _, answer = read_http_response(third)
    assert code == 503 and "too many connections" in json.loads(answer)["error"]
    assert third.recv(10) == b""
    # idle connections are closed by the server after the timeout, which frees the slots
    assert first.recv(10) == b"" and second.recv(10) == b""
    assert _client(server).health()["http_status"] == 200


def test_socket_mode_and_stale_socket_file(api: Factory, short_dir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(short_dir / "api.sock"))
    stale.close()  # leaves the file behind, as a crashed agent would
    server, _ = api()
    mode = os.stat(short_dir / "api.sock").st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660
    admin_mode = os.stat(short_dir / "admin.sock").st_mode
    assert stat.S_ISSOCK(admin_mode) and stat.S_IMODE(admin_mode) == 0o600
    assert _client(server).health()["http_status"] == 200
    with pytest.raises(ConfigError, match="another process"):
        ApiServer(Serving(), socket_path=short_dir / "api.sock").start()


def test_a_regular_file_in_the_way_is_not_removed(short_dir: Path) -> None:
    path = short_dir / "api.sock"
    path.write_text("precious")
    with pytest.raises(ConfigError, match="not a socket"):
        ApiServer(Serving(), socket_path=path).start()
    assert path.read_text() == "precious"


def test_stop_finishes_the_request_in_flight(api: Factory, zoo: Callable[[str], Path],
                                             make_bundle: Callable[..., Path]) -> None:
    server, serving = api(None)
    # slow_f32 has dense_f32's signature: serve it under dense_f32's document (no 46 MB bundle to write)
    serving.activate("m", zoo("slow_f32"), Bundle.load(make_bundle("dense_f32")).deployment)
    idle = _unix(server)
    x = np.random.default_rng(1).normal(size=(256, 8)).astype(np.float32)  # about 0.1 s of work
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["out"] = _client(server).predict_npy("m", x)
        except BaseException as err:
            result["error"] = err

    caller = threading.Thread(target=call)
    caller.start()
    stats = serving.served("m").stats  # type: ignore[union-attr]
    waited = threading.Event()
    while not stats.in_flight() and caller.is_alive():
        waited.wait(0.002)
    assert stats.in_flight(), "the request never started"
    server.stop(timeout=10)
    caller.join(10)
    assert "error" not in result, result.get("error")
    assert result["out"].shape == (256, 4)
    assert idle.recv(10) == b""  # idle keep-alive connections are closed
    assert not server.socket_path.exists()  # type: ignore[union-attr]
    with pytest.raises(RequestError) as info:
        _client(server).health()
    assert info.value.status == 503


def test_clients_hammering_during_swaps_and_bad_requests(api: Factory, make_bundle: Callable[..., Path]) -> None:
    server, serving = api("dense_f32", version=1)
    v1, v2 = make_bundle("dense_f32", version=1), make_bundle("dense_f32_v2", version=2)
    d1, d2 = Bundle.load(v1).deployment, Bundle.load(v2).deployment
    x = np.random.default_rng(2).normal(size=(1, 8)).astype(np.float32)
    serving.activate("m", v1 / MODEL_FILE, d1)
    expected = {1: serving.predict("m", [x]).outputs[0]}
    serving.activate("m", v2 / MODEL_FILE, d2)
    expected[2] = serving.predict("m", [x]).outputs[0]
    stop = threading.Event()
    failures: list[BaseException] = []
    versions: list[int] = []

    def good() -> None:
        client = _client(server)
        while not stop.is_set():
            try:
                out = client.predict_npy("m", x)
                assert client.last_version is not None
                np.testing.assert_array_equal(out, expected[client.last_version])
                versions.append(client.last_version)
            except BaseException as err:
                failures.append(err)
                return

    def bad() -> None:
        sock = _unix(server)
        while not stop.is_set():
            code, _, _ = _exchange(sock, _post("/v1/models/m:predict", b"{nope"))
            if code != 400:
                failures.append(AssertionError(f"bad request answered {code}"))
                return

    threads = [threading.Thread(target=good) for _ in range(3)] + [threading.Thread(target=bad)]
    for t in threads:
        t.start()
    for i in range(12):
        serving.activate("m", (v1 if i % 2 == 0 else v2) / MODEL_FILE, d1 if i % 2 == 0 else d2)
        stop.wait(0.04)
    stop.set()
    for t in threads:
        t.join(10)
    assert failures == []
    assert set(versions) == {1, 2}


# -- hardening: budget, deadlines, per-listener caps, TCP policy, the admin socket -----------------

def _chunked(path: str, body: bytes, ctype: str = "application/json", sizes: tuple[int, ...] = (7, 1, 100)) -> bytes:
    out = (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {ctype}\r\n"
           "Transfer-Encoding: chunked\r\n\r\n").encode()
    i = 0
    for n in sizes * (len(body) // max(1, sum(sizes)) + 1):
        part = body[i:i + n]
        if not part:
            break
        out += f"{len(part):x};ext=1\r\n".encode() + part + b"\r\n"
        i += n
    return out + b"0\r\nX-Trailer: ignored\r\n\r\n"


def test_chunked_bodies_are_read_incrementally(api: Factory) -> None:
    server, serving = api()
    x = np.random.default_rng(4).normal(size=(2, 8)).astype(np.float32)
    expected = serving.predict("m", [x]).outputs[0]
    sock = _unix(server)
    body = json.dumps({"instances": x.tolist()}).encode()
    sock.sendall(_chunked("/v1/models/m:predict", body) + _chunked("/v1/models/m:predict", _npy(x), "application/x-npy"))
    (code, _, answer), (code2, _, answer2) = read_http_responses(sock, 2)
    assert code == 200 and code2 == 200
    np.testing.assert_allclose(json.loads(answer)["predictions"], expected, rtol=1e-6)
    np.testing.assert_array_equal(np.load(io.BytesIO(answer2)), expected)
    server.stop()
    small, _ = api(max_body_bytes=1000)
    code, _, answer = _exchange(_unix(small), _chunked("/v1/models/m:predict", b"1" * 2000, sizes=(600,)))
    assert code == 413 and "limit of 1000" in json.loads(answer)["error"]
    assert small.budget.used == 0


def test_heads_beyond_the_inflight_budget_are_refused_before_reading(api: Factory) -> None:
    server, _ = api(max_body_bytes=1000, max_inflight_bytes=1500)
    holder = _unix(server)
    holder.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nContent-Type: application/x-npy\r\n"
                   b"Content-Length: 1000\r\n\r\n" + b"x" * 10)  # holds 1000 bytes of the budget
    wait = threading.Event()
    while server.budget.used < 1000:
        wait.wait(0.01)
    second = _unix(server)
    code, headers, answer = _exchange(second, b"POST /v1/models/m:predict HTTP/1.1\r\nContent-Type: application/x-npy"
                                              b"\r\nContent-Length: 800\r\n\r\n")
    assert code == 503 and "api.max_inflight_bytes" in json.loads(answer)["error"]
    assert headers["retry-after"] == "1" and second.recv(10) == b""
    # small requests that arrive whole still pass, and the holder's reservation ends with its request
    assert _client(server).predict("m", [[0.0] * 8])["edgefleet"]["model_version"] == 1
    holder.close()
    while server.budget.used:
        wait.wait(0.01)


def test_slow_heads_and_bodies_get_408(api: Factory) -> None:
    server, _ = api(header_timeout_s=0.3, body_timeout_s=0.3)
    slow_head = _unix(server)
    slow_head.sendall(b"GET /healthz HTTP/1.1\r\n")
    code, _, answer = read_http_response(slow_head)
    assert code == 408 and "head" in json.loads(answer)["error"]
    slow_body = _unix(server)
    slow_body.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
    code, _, answer = read_http_response(slow_body)
    assert code == 408 and "body" in json.loads(answer)["error"]
    assert server.budget.used == 0
    assert _client(server).health()["http_status"] == 200


def _tcp(server: ApiServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    return sock


def test_tcp_checks_host_content_type_and_token(api: Factory) -> None:
    server, _ = api(token="s3cret-token", allowed_hosts=["board.example"])
    predict = b'{"instances": [[0,0,0,0,0,0,0,0]]}'
    auth = "Authorization: Bearer s3cret-token\r\n"
    cases = [
        (_post("/v1/models/m:predict", predict, extra=auth).replace(b"Host: x", b"Host: evil.example:8501"), 403,
         "is not a name of this agent"),
        (b"GET /healthz HTTP/1.1\r\n" + auth.encode() + b"\r\n", 403, "no Host header"),
        (_post("/v1/models/m:predict", predict).replace(b"Host: x", b"Host: localhost"), 401, "bearer token"),
        (_post("/v1/models/m:predict", predict, extra="Authorization: Bearer wrong\r\n").replace(
            b"Host: x", b"Host: localhost"), 401, "bearer token"),
        (_post("/v1/models/m:predict", b"instances=1", "application/x-www-form-urlencoded", auth).replace(
            b"Host: x", b"Host: 127.0.0.1:1"), 415, "not accepted over TCP"),
        (_post("/v1/models/m:predict", predict, "text/plain", auth).replace(b"Host: x", b"Host: localhost"), 415,
         "not accepted over TCP"),
        (_post("/v1/models/m:predict", predict, "multipart/form-data; boundary=x", auth).replace(
            b"Host: x", b"Host: localhost"), 415, "not accepted over TCP"),
    ]
    for raw, status, message in cases:
        code, headers, answer = _exchange(_tcp(server), raw)
        assert code == status and message in json.loads(answer)["error"], (raw[:60], code, answer)
        if status == 401:
            assert headers["www-authenticate"].startswith("Bearer")
    for host in ("localhost", "127.0.0.1:80", "BOARD.example:8501", "[::1]:1"):
        code, _, answer = _exchange(_tcp(server), _post("/v1/models/m:predict", predict, extra=auth).replace(
            b"Host: x", f"Host: {host}".encode()))
        assert code == 200, (host, answer)
    good = ApiClient(url=f"http://127.0.0.1:{server.port}", token="s3cret-token")
    assert good.health()["http_status"] == 200
    assert ApiClient(url=f"http://127.0.0.1:{server.port}").health()["http_status"] == 401
    with pytest.raises(RequestError) as info:
        ApiClient(url=f"http://127.0.0.1:{server.port}", token="wrong").predict("m", [[0.0] * 8])
    assert info.value.status == 401
    # the Unix socket needs neither token nor Host, and curl's default form type still works there
    code, _, _ = _exchange(_unix(server), _post("/v1/models/m:predict", predict, "application/x-www-form-urlencoded"))
    assert code == 200


def test_tcp_clients_cannot_lock_out_the_unix_socket(api: Factory) -> None:
    server, _ = api(max_connections=4, max_connections_per_peer=3)
    held = [_tcp(server) for _ in range(3)]
    code, _, answer = read_http_response(_tcp(server))
    assert code == 503 and "from 127.0.0.1" in json.loads(answer)["error"]
    assert _client(server).health()["http_status"] == 200  # the Unix socket has its own cap
    held += [_unix(server) for _ in range(4)]
    code, _, answer = read_http_response(_unix(server))
    assert code == 503 and "too many connections (limit 4)" in json.loads(answer)["error"]
    # ...and so does the admin socket
    admin = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    admin.connect(str(server.admin_path))
    code, _, _ = _exchange(admin, b"GET /healthz HTTP/1.1\r\n\r\n")
    assert code == 200
    for s in held:
        s.close()


def test_admin_socket_refuses_other_uids(api: Factory) -> None:
    server, _ = api(admin=lambda action, body: {}, admin_uids={os.getuid() + 4242})
    admin = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    admin.connect(str(server.admin_path))
    code, _, answer = read_http_response(admin)
    assert code == 403 and "not uid" in json.loads(answer)["error"]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_install_reads_passed_file_descriptors(api: Factory, make_bundle: Callable[..., Path]) -> None:
    got: list[dict[str, Any]] = []

    def admin(action: str, body: dict[str, Any]) -> dict[str, Any]:
        got.append(body)
        return {"phase": "PROBATION"}

    server, _ = api(admin=admin, max_file_bytes=1 << 20)
    bundle = make_bundle("dense_f32")
    gc.collect()  # models of earlier tests left in reference cycles must not close their files mid-count
    before = _open_fds()
    c = ApiClient(socket_path=server.socket_path, admin_socket=server.admin_path)
    assert c.install_bundle(bundle) == {"phase": "PROBATION"}
    files = got[0]["bundle_files"]
    assert {k: files[k] for k in ("manifest.json", "model.tflite", "golden.npz")} == {
        k: (bundle / k).read_bytes() for k in ("manifest.json", "model.tflite", "golden.npz")}
    # a pipe is not a file; indices must exist; too many descriptors are refused; none stay open
    r, w = os.pipe()
    with open(bundle / "manifest.json", "rb") as f:
        with pytest.raises(RequestError, match="not a regular file") as info:
            c.admin("install", {"files": {"manifest.json": 0, "model.tflite": 1, "golden.npz": 1}},
                    fds=[f.fileno(), r])
        assert info.value.status == 400
        with pytest.raises(RequestError, match="no passed file descriptor number 7"):
            c.admin("install", {"files": {"manifest.json": 0, "model.tflite": 0, "golden.npz": 7}}, fds=[f.fileno()])
        with pytest.raises(RequestError, match="at most 8"):
            c.admin("install", {"files": {}}, fds=[f.fileno()] * 9)
        with pytest.raises(RequestError, match="takes no file descriptors"):
            c.admin("rollback", {}, fds=[f.fileno()])
        # descriptors sent to the inference socket are dropped by the kernel, never received
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(str(server.socket_path))
        socket.send_fds(raw, [_post("/v1/admin/install", b'{"files": {}}')], [f.fileno()])
        assert read_http_response(raw)[0] == 403
        raw.close()
    os.close(r)
    os.close(w)
    assert len(got) == 1
    c.close()
    for _ in range(200):  # the server closes each connection just after its answer
        if _open_fds() == before:
            break
        threading.Event().wait(0.01)
    assert _open_fds() == before
    assert server.admin_path is not None
    big = ApiServer(Serving(), socket_path=None, admin_socket=server.admin_path.with_name("a2.sock"),
                    admin=admin, max_file_bytes=100)
    big.start()
    try:
        with pytest.raises(RequestError, match="above the limit of 100") as info:
            ApiClient(socket_path=big.admin_path, admin_socket=big.admin_path).install_bundle(bundle)
        assert info.value.status == 413
    finally:
        big.stop()
