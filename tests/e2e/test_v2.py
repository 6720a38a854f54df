"""The Open Inference Protocol (KServe v2) on the agent's listeners, spoken by the real clients.

tritonclient[http] and the kserve SDK's REST client (both from the package index, in the dev extra)
talk to a real `edge-agent run` over its TCP listener; agent/api/client.py's predict_v2 talks to it over
the Unix socket. Every answer is compared with what the TensorFlow Serving route gives for the same
input. Malformed requests are answered with the protocol's `{"error": ...}` and change nothing.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as tritonhttp
from tritonclient.utils import InferenceServerException

from edgefleet.agent.api.client import ApiClient
from edgefleet.agent.api.server import ApiServer
from edgefleet.agent.serving.models import Serving
from edgefleet.bundle import MODEL_FILE, Bundle
from edgefleet.errors import RequestError
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.broker import free_port
from edgefleet.testing.reliability import build_bundle, fast_tmp
from edgefleet.testing.waiting import wait_for
from tests.support.helpers import read_http_response

LABELS = ["a", "b", "c", "d"]


class Agent:
    def __init__(self, proc: AgentProcess, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"127.0.0.1:{port}"
        self.client = ApiClient(socket_path=proc.socket)

    def tcp(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send raw bytes over TCP; the one response (the agent closes after it when asked)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(raw)
            return read_http_response(s)


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    root = fast_tmp("edgefleet-v2-")
    port = free_port()
    proc = AgentProcess(root / "a", api={"port": port}, health={"probation_s": 0.5, "min_requests": 1})
    for bundle in (build_bundle(root / "m", "dense_f32", version=1, labels=LABELS),
                   build_bundle(root / "q", "dense_int8", name="q", version=1)):
        res = proc.cli("install", str(bundle))
        assert res.returncode == 0, res.stdout + res.stderr
    proc.start()
    a = Agent(proc, port)
    wait_for(lambda: sorted(a.client.health().get("models", {})) == ["m", "q"], timeout=30, what="both models served")
    yield a
    a.client.close()
    proc.stop()
    shutil.rmtree(root, ignore_errors=True)


def _x(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)


def _tf_route(agent: Agent, name: str, x: np.ndarray) -> dict[str, Any]:
    """What TensorFlow Serving's REST route answers for the same instances."""
    return agent.client.predict(name, x)


def _triton_input(name: str, x: np.ndarray, datatype: str, binary: bool) -> Any:
    i = tritonhttp.InferInput(name, list(x.shape), datatype)
    i.set_data_from_numpy(x, binary_data=binary)
    return i


# -- tritonclient[http] against the agent process --------------------------------------------------

def test_tritonclient_health_and_metadata(agent: Agent) -> None:
    c = tritonhttp.InferenceServerClient(agent.url)
    try:
        assert c.is_server_live() is True
        assert c.is_server_ready() is True
        assert c.is_model_ready("m") is True
        assert c.is_model_ready("m", "1") is True
        assert c.is_model_ready("m", "7") is False  # a version that is not served
        assert c.is_model_ready("nope") is False
        server = c.get_server_metadata()
        assert server["name"] == "edge-agent" and "binary_tensor_data" in server["extensions"]
        meta = c.get_model_metadata("m")
        assert meta == c.get_model_metadata("m", "1")
        tf_meta = agent.client.metadata("m")["metadata"]["signature_def"]["signature_def"]["serving_default"]
        assert meta["name"] == "m" and meta["versions"] == ["1"] and meta["platform"] == "tflite"
        assert [i["name"] for i in meta["inputs"]] == list(tf_meta["inputs"])  # one model, one set of names
        assert [o["name"] for o in meta["outputs"]] == list(tf_meta["outputs"])
        assert meta["inputs"][0]["datatype"] == "FP32" and meta["inputs"][0]["shape"] == [-1, 8]
        assert meta["outputs"][0]["shape"] == [-1, 4]
        q = c.get_model_metadata("q")
        assert q["inputs"][0]["datatype"] == "INT8" and q["outputs"][0]["datatype"] == "INT8"
        with pytest.raises(InferenceServerException) as err:
            c.get_model_metadata("nope")
        assert err.value.status() == "404" and "unknown model 'nope'" in err.value.message()
    finally:
        c.close()


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_tritonclient_infer_matches_the_tf_serving_route(agent: Agent, binary_in: bool, binary_out: bool) -> None:
    x = _x()
    expected = np.asarray(_tf_route(agent, "m", x)["predictions"], dtype=np.float32)
    c = tritonhttp.InferenceServerClient(agent.url)
    try:
        meta = c.get_model_metadata("m")
        in_name, out_name = meta["inputs"][0]["name"], meta["outputs"][0]["name"]
        result = c.infer("m", [_triton_input(in_name, x, "FP32", binary_in)],
                         outputs=[tritonhttp.InferRequestedOutput(out_name, binary_data=binary_out)],
                         request_id="req-42", model_version="1")
        response = result.get_response()
        assert response["id"] == "req-42" and response["model_name"] == "m" and response["model_version"] == "1"
        assert ("parameters" in response["outputs"][0]) is binary_out  # binary_data_size only when binary
        y = result.as_numpy(out_name)
        assert y.dtype == np.float32 and y.shape == (3, 4)
        np.testing.assert_array_equal(y, expected)
        # no outputs named: tritonclient asks for all of them in binary
        np.testing.assert_array_equal(c.infer("m", [_triton_input(in_name, x, "FP32", binary_in)]).as_numpy(out_name),
                                      expected)
    finally:
        c.close()


def test_tritonclient_classification_uses_the_models_labels(agent: Agent) -> None:
    x = _x(2, seed=5)
    top = _tf_route(agent, "m", x)["edgefleet"]["top_k"]
    c = tritonhttp.InferenceServerClient(agent.url)
    try:
        out_name = c.get_model_metadata("m")["outputs"][0]["name"]
        for binary in (False, True):
            result = c.infer("m", [_triton_input(c.get_model_metadata("m")["inputs"][0]["name"], x, "FP32", True)],
                             outputs=[tritonhttp.InferRequestedOutput(out_name, binary_data=binary, class_count=2)])
            classes = result.as_numpy(out_name)
            assert classes.shape == (2, 2)
            for row, best in zip(classes, top, strict=True):
                got = [(v.decode() if isinstance(v, bytes) else v).split(":") for v in row]
                assert [(int(i), label) for _, i, label in got] == [(b["index"], b["label"]) for b in best[:2]]
                np.testing.assert_allclose([float(s) for s, _, _ in got], [b["score"] for b in best[:2]], rtol=1e-5)
    finally:
        c.close()


def test_tritonclient_quantized_model_like_the_tf_serving_route(agent: Agent) -> None:
    """INT8 in gives the model's own INT8 out (as the .npy route); FP32 in is quantized (as the JSON route)."""
    c = tritonhttp.InferenceServerClient(agent.url)
    try:
        meta = c.get_model_metadata("q")
        in_name, out_name = meta["inputs"][0]["name"], meta["outputs"][0]["name"]
        q = np.random.default_rng(3).integers(-128, 128, size=(2, 8)).astype(np.int8)
        native = c.infer("q", [_triton_input(in_name, q, "INT8", True)]).as_numpy(out_name)
        assert native.dtype == np.int8
        np.testing.assert_array_equal(native, agent.client.predict_npy("q", q))
        x = _x(2, seed=4)
        floats = c.infer("q", [_triton_input(in_name, x, "FP32", False)]).as_numpy(out_name)
        assert floats.dtype == np.float32
        np.testing.assert_array_equal(floats, np.asarray(_tf_route(agent, "q", x)["predictions"], np.float32))
    finally:
        c.close()


def test_tritonclient_errors(agent: Agent) -> None:
    c = tritonhttp.InferenceServerClient(agent.url)
    x = _x()
    try:
        in_name = c.get_model_metadata("m")["inputs"][0]["name"]
        cases = [
            (lambda: c.infer("nope", [_triton_input(in_name, x, "FP32", True)]), "404", "unknown model 'nope'"),
            (lambda: c.infer("m", [_triton_input(in_name, x, "FP32", True)], model_version="9"), "404",
             "version 9 is not served"),
            (lambda: c.infer("m", [_triton_input("other", x, "FP32", True)]), "400", "unknown input 'other'"),
            (lambda: c.infer("m", [_triton_input(in_name, x[:, :5], "FP32", True)]), "400", "does not fit"),
            (lambda: c.infer("m", [_triton_input(in_name, x, "FP32", True)],
                             outputs=[tritonhttp.InferRequestedOutput("nope")]), "400", "unknown output 'nope'"),
        ]
        for call, status, text in cases:
            with pytest.raises(InferenceServerException) as err:
                call()
            assert err.value.status() == status and text in err.value.message(), err.value
    finally:
        c.close()


# -- the kserve SDK's REST client -------------------------------------------------------------------

def test_kserve_rest_client(agent: Agent) -> None:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    x = _x(4, seed=9)
    expected = np.asarray(_tf_route(agent, "m", x)["predictions"], dtype=np.float32)
    meta = agent.client.request("GET", "/v2/models/m")
    in_name = json.loads(meta[2])["inputs"][0]["name"]
    out_name = json.loads(meta[2])["outputs"][0]["name"]
    base = f"http://{agent.url}"

    async def run() -> list[np.ndarray]:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
        try:
            assert await client.is_server_live(base) is True
            assert await client.is_server_ready(base) is True
            assert await client.is_model_ready(base, "m") is True
            assert await client.is_model_ready(base, "nope") is False
            answers = []
            for binary in (False, True):
                i = InferInput(in_name, list(x.shape), "FP32")
                i.set_data_from_numpy(x, binary_data=binary)
                headers: dict[str, str] = {}
                res = await client.infer(base, InferRequest(
                    model_name="m", infer_inputs=[i], request_id=f"k-{binary}",
                    request_outputs=[RequestedOutput(out_name, parameters={"binary_data": binary})]),
                    model_name="m", response_headers=headers)
                assert res.id == f"k-{binary}" and res.model_name == "m" and headers["x-model-version"] == "1"
                answers.append(res.outputs[0].as_numpy())
            res = await client.infer(base, {"inputs": [{"name": in_name, "shape": list(x.shape), "datatype": "FP32",
                                                        "data": x.ravel().tolist()}]}, model_name="m")
            answers.append(res.outputs[0].as_numpy())
            return answers
        finally:
            await client.close()

    for y in asyncio.run(run()):
        np.testing.assert_array_equal(np.asarray(y, np.float32).reshape(expected.shape), expected)


# -- agent/api/client.py over the Unix socket -----------------------------------------------------------

def test_predict_v2_over_the_unix_socket(agent: Agent) -> None:
    x = _x(2, seed=11)
    out = agent.client.predict_v2("m", x)
    assert list(out) == [json.loads(agent.client.request("GET", "/v2/models/m")[2])["outputs"][0]["name"]]
    np.testing.assert_array_equal(next(iter(out.values())), agent.client.predict_npy("m", x))
    assert agent.client.last_version == 1
    np.testing.assert_array_equal(next(iter(agent.client.predict_v2("m", x, version=1).values())),
                                  agent.client.predict_npy("m", x))
    with pytest.raises(RequestError) as err:
        agent.client.predict_v2("m", x, version=3)
    assert err.value.status == 404
    # one request shape, new values each time: headers are reused on both sides, never the numbers
    for seed in range(20, 26):
        x = _x(2, seed=seed)
        np.testing.assert_array_equal(next(iter(agent.client.predict_v2("m", x).values())),
                                      agent.client.predict_npy("m", x))


def test_repeated_binary_requests_echo_their_own_id_and_numbers(agent: Agent) -> None:
    c = tritonhttp.InferenceServerClient(agent.url)
    try:
        in_name = c.get_model_metadata("m")["inputs"][0]["name"]
        for seed, request_id in ((1, "a"), (2, "a"), (3, "b"), (3, "")):
            x = _x(2, seed=seed)
            result = c.infer("m", [_triton_input(in_name, x, "FP32", True)], request_id=request_id)
            assert result.get_response().get("id", "") == request_id
            (name,) = [o["name"] for o in result.get_response()["outputs"]]
            np.testing.assert_array_equal(result.as_numpy(name), agent.client.predict_npy("m", x))
    finally:
        c.close()


# -- malformed requests: the protocol's error shape, nothing changed --------------------------------

def _v2(path: str, body: bytes, *, header: int | None = None, ctype: str | None = None, extra: str = "") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", f"Content-Length: {len(body)}", "Connection: close"]
    if ctype is not None:
        lines.append(f"Content-Type: {ctype}")
    if header is not None:
        lines.append(f"Inference-Header-Content-Length: {header}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode() + body


def test_malformed_requests_get_the_protocol_error_and_change_nothing(agent: Agent) -> None:
    x = _x(2, seed=13)
    before = agent.client.predict_npy("m", x)
    name = json.loads(agent.client.request("GET", "/v2/models/m")[2])["inputs"][0]["name"]

    def doc(**fields: Any) -> dict[str, Any]:
        tensor = {"name": name, "shape": [2, 8], "datatype": "FP32", "data": x.ravel().tolist()}
        tensor.update(fields)
        return {"inputs": [tensor]}

    def binary(size: int, payload: bytes) -> bytes:
        """A binary-extension request announcing `size` bytes of tensor data and carrying `payload`."""
        d = doc(parameters={"binary_data_size": size})
        del d["inputs"][0]["data"]
        head = json.dumps(d).encode()
        return _v2("/v2/models/m/infer", head + payload, header=len(head))

    raw = x.tobytes()
    cases: list[tuple[bytes, int, str]] = [
        (_v2("/v2/models/m/infer", b"{not json", ctype="application/json"), 400, "malformed JSON"),
        (_v2("/v2/models/m/infer", b"[]", ctype="application/json"), 400, "must be a JSON object"),
        (_v2("/v2/models/m/infer", json.dumps(doc(datatype="BF16")).encode()), 400, "datatype 'BF16'"),
        (_v2("/v2/models/m/infer", json.dumps(doc(datatype="BYTES")).encode()), 400, "BYTES data must be strings"),
        (_v2("/v2/models/m/infer", json.dumps(doc(datatype="BYTES", data=["x"] * 16)).encode()), 400,
         "expected numbers"),
        (_v2("/v2/models/m/infer", json.dumps(doc(shape=[3, 8])).encode()), 400, "data has 16 values"),
        (_v2("/v2/models/m/infer", json.dumps(doc(data=[["x"] * 8] * 2)).encode()), 400, "must be numbers"),
        (_v2("/v2/models/m/infer", json.dumps({"inputs": [], "extra": 1}).encode()), 400, "unknown field(s) extra"),
        (_v2("/v2/models/m/infer", json.dumps({**doc(), "outputs": [{"name": "zz"}]}).encode()), 400,
         "unknown output 'zz'"),
        (binary(len(raw), raw[:-4]), 400, "the body ends 4 bytes before"),
        (binary(len(raw) - 4, raw), 400, "binary_data_size is 60 bytes"),
        (binary(len(raw), raw + b"xx"), 400, "2 bytes after the binary inputs"),
        (_v2("/v2/models/m/infer", b"{}", header=99), 400, "Inference-Header-Content-Length is 99"),
        (_v2("/v2/models/m/infer", b"{}", header=1, extra="Content-Encoding: gzip\r\n"), 415, "Content-Encoding"),
        (_v2("/v2/models/nope/infer", json.dumps(doc()).encode()), 404, "unknown model 'nope'"),
        (_v2("/v2/models/m/versions/x1/infer", json.dumps(doc()).encode()), 400, "positive integers"),
        (_v2("/v2/models/m/config", b"", ctype="application/json"), 404, "no config, stats or repository"),
        (_v2("/v2/repository/index", b"", ctype="application/json"), 404, "unknown route"),
        (_v2("/v2/models/m", b"", ctype="application/json"), 405, "use GET"),
        (b"GET /v2/models/m/infer HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", 405, "use POST"),
    ]
    for raw_request, status, text in cases:
        got, headers, body = agent.tcp(raw_request)
        assert (got, headers["content-type"]) == (status, "application/json"), (raw_request[:120], body)
        error = json.loads(body)
        assert list(error) == ["error"] and text in error["error"], (raw_request[:120], error)
        assert "\n" not in error["error"]
    np.testing.assert_array_equal(agent.client.predict_npy("m", x), before)
    assert agent.proc.proc is not None and agent.proc.proc.poll() is None


def test_tcp_refuses_what_a_web_page_could_send(agent: Agent) -> None:
    """A page can POST without a Content-Type or with text/plain, but never without its Origin header or
    with Inference-Header-Content-Length (that takes a CORS preflight the agent never approves)."""
    x = _x(1)
    name = json.loads(agent.client.request("GET", "/v2/models/m")[2])["inputs"][0]["name"]
    body = json.dumps({"inputs": [{"name": name, "shape": [1, 8], "datatype": "FP32", "data": x.ravel().tolist()}]})
    page = "Origin: http://evil.example\r\n"
    assert agent.tcp(_v2("/v2/models/m/infer", body.encode(), extra=page))[0] == 415
    assert agent.tcp(_v2("/v2/models/m/infer", body.encode(), ctype="text/plain"))[0] == 415
    assert agent.tcp(_v2("/v2/models/m/infer", body.encode(), ctype="application/octet-stream"))[0] == 415
    assert agent.tcp(_v2("/v1/models/m:predict", b'{"instances": [[0,0,0,0,0,0,0,0]]}'))[0] == 415
    # programs: no Origin, or the binary extension's header
    assert agent.tcp(_v2("/v2/models/m/infer", body.encode()))[0] == 200
    assert agent.tcp(_v2("/v2/models/m/infer", body.encode(), header=len(body), ctype="application/octet-stream",
                         extra=page))[0] == 200


# -- in-process: failures are counted, the serving path stays intact ----------------------------------

@pytest.fixture
def server(make_bundle: Any) -> Iterator[tuple[ApiServer, Serving]]:
    root = fast_tmp("ef-v2-")
    serving = Serving()
    bundle = make_bundle("fails_on_big_f32", version=2)
    serving.activate("m", bundle / MODEL_FILE, Bundle.load(bundle).deployment)
    srv = ApiServer(serving, socket_path=root / "api.sock")
    srv.start()
    yield srv, serving
    srv.stop(timeout=2)
    shutil.rmtree(root, ignore_errors=True)


def test_a_failed_inference_counts_as_an_error_and_the_model_keeps_serving(server: tuple[ApiServer, Serving]) -> None:
    srv, serving = server
    client = ApiClient(socket_path=srv.socket_path)
    good = np.zeros((1, 8), np.float32)
    expected = client.predict_npy("m", good)
    served = serving.served("m")
    assert served is not None
    errors = served.stats.errors
    with pytest.raises(RequestError) as err:
        client.predict_v2("m", np.full((1, 8), 500.0, np.float32))
    assert err.value.status == 500 and "invoke failed" in str(err.value)
    assert served.stats.errors == errors + 1
    np.testing.assert_array_equal(next(iter(client.predict_v2("m", good).values())), expected)
    client.close()


def test_server_ready_follows_the_models_and_the_agents_health(make_bundle: Any) -> None:
    root = fast_tmp("ef-v2-")
    serving = Serving()
    state = {"status": "ok"}
    srv = ApiServer(serving, socket_path=root / "api.sock", status=lambda: dict(state))
    srv.start()
    client = ApiClient(socket_path=srv.socket_path)
    try:
        def probe(path: str) -> tuple[int, Any]:
            status, _, body = client.request("GET", path)
            return status, json.loads(body)

        assert probe("/v2/health/live") == (200, {"live": True})
        assert probe("/v2/health/ready") == (503, {"ready": False})  # nothing to serve yet
        assert probe("/v2/models/m/ready")[0] == 404
        bundle = make_bundle("dense_f32", version=4)
        serving.activate("m", bundle / MODEL_FILE, Bundle.load(bundle).deployment)
        assert probe("/v2/health/ready") == (200, {"ready": True})
        assert probe("/v2/models/m/ready") == (200, {"name": "m", "ready": True})
        assert probe("/v2/models/m/versions/4/ready") == (200, {"name": "m", "ready": True})
        assert probe("/v2")[1]["extensions"] == ["binary_tensor_data", "classification"]
        state["status"] = "unhealthy"  # the loop thread is stuck: a liveness probe should restart the agent
        assert probe("/v2/health/live") == (503, {"live": False})
        assert probe("/v2/health/ready") == (503, {"ready": False})
    finally:
        client.close()
        srv.stop(timeout=2)
        shutil.rmtree(root, ignore_errors=True)


# -- several inputs and outputs; string tensors ----------------------------------------------------

@pytest.fixture
def tcp_server(make_bundle: Any) -> Iterator[Any]:
    """Start an in-process Serving + ApiServer (Unix socket and TCP) on zoo models; stopped at teardown."""
    root = fast_tmp("ef-v2-")
    servers: list[ApiServer] = []

    def start(**models: str | Path) -> tuple[ApiServer, ApiClient, Any]:
        """Serve zoo models (by name) or bundles (by path) under the given names."""
        serving = Serving()
        for name, model in models.items():
            bundle = make_bundle(model, name=name, version=2) if isinstance(model, str) else model
            serving.activate(name, bundle / MODEL_FILE, Bundle.load(bundle).deployment)
        srv = ApiServer(serving, socket_path=root / "api.sock", port=0)
        srv.start()
        servers.append(srv)
        return srv, ApiClient(socket_path=srv.socket_path), tritonhttp.InferenceServerClient(f"127.0.0.1:{srv.port}")

    yield start
    for srv in servers:
        srv.stop(timeout=2)
    shutil.rmtree(root, ignore_errors=True)


def test_two_inputs_two_outputs_batch_2_then_1(tcp_server: Any) -> None:
    srv, client, triton = tcp_server(two="two_in_two_out")
    meta = triton.get_model_metadata("two")
    assert sorted(i["name"] for i in meta["inputs"]) == ["a", "b"]
    outs = [o["name"] for o in meta["outputs"]]
    assert len(set(outs)) == 2  # both outputs, under distinct names
    rng = np.random.default_rng(21)
    for n, binary in ((2, True), (1, False), (2, False), (1, True)):
        a = rng.normal(size=(n, 3)).astype(np.float32)
        b = rng.normal(size=(n, 2)).astype(np.float32)
        tf = client.predict("two", {"a": a, "b": b}, columnar=True)["outputs"]
        result = triton.infer("two", [_triton_input("b", b, "FP32", binary), _triton_input("a", a, "FP32", binary)],
                              outputs=[tritonhttp.InferRequestedOutput(o, binary_data=binary) for o in outs])
        for o in outs:
            np.testing.assert_array_equal(result.as_numpy(o), np.asarray(tf[o], np.float32))
        mine = client.predict_v2("two", {"a": a, "b": b})
        assert list(mine) == outs
        for o in outs:
            np.testing.assert_array_equal(mine[o], np.asarray(tf[o], np.float32))
        # one output asked for: only it comes back
        only = triton.infer("two", [_triton_input("a", a, "FP32", True), _triton_input("b", b, "FP32", True)],
                            outputs=[tritonhttp.InferRequestedOutput(outs[1])]).get_response()["outputs"]
        assert [o["name"] for o in only] == [outs[1]]
    with pytest.raises(InferenceServerException) as err:
        triton.infer("two", [_triton_input("a", np.zeros((2, 3), np.float32), "FP32", True),
                             _triton_input("b", np.zeros((1, 2), np.float32), "FP32", True)])
    assert err.value.status() == "400" and "batch" in err.value.message()
    triton.close()
    client.close()


def test_string_inputs_as_bytes(tcp_server: Any, zoo: Any, tmp_path: Path) -> None:
    from edgefleet.converter.bundle.writer import BundleSpec, write_bundle

    bundle = tmp_path / "text"
    write_bundle(bundle, zoo("text_is_cat").read_bytes(),
                 BundleSpec(name="text", version=1, golden_inputs=[np.array([[b"cat"], [b"dog"]])]))
    srv, client, triton = tcp_server(text=bundle)
    meta = triton.get_model_metadata("text")
    assert meta["inputs"][0]["datatype"] == "BYTES"
    in_name, out_name = meta["inputs"][0]["name"], meta["outputs"][0]["name"]
    words = np.array([b"cat", b"dog", b"cat\x00", b"cat"], dtype=object)  # a NUL byte survives only binary
    expected = np.asarray(client.predict("text", [w.decode("latin-1") for w in words])["predictions"], np.float32)
    np.testing.assert_array_equal(expected, [1, 0, 0, 1])
    for binary in (False, True):
        words_in = words if binary else np.array([b"cat", b"dog", b"cat!", b"cat"], dtype=object)
        got = triton.infer("text", [_triton_input(in_name, words_in, "BYTES", binary)]).as_numpy(out_name)
        np.testing.assert_array_equal(got, [1, 0, 0, 1])
    np.testing.assert_array_equal(next(iter(client.predict_v2("text", words).values())), [1, 0, 0, 1])
    triton.close()
    client.close()


def test_the_previous_version_is_addressable_while_it_is_the_rollback_target() -> None:
    root = fast_tmp("edgefleet-v2v-")
    port = free_port()
    proc = AgentProcess(root / "a", api={"port": port}, health={"probation_s": 0.5, "min_requests": 1000})
    try:
        assert proc.cli("install", str(build_bundle(root / "v1", "dense_f32", version=1))).returncode == 0
        proc.start()
        # v1 must pass its probation to become the last-known-good that v2 can be rolled back to
        wait_for(lambda: proc.status()["state"]["models"]["m"]["phase"] == "COMMITTED", timeout=30, what="v1 commit")
        res = proc.cli("install", str(build_bundle(root / "v2", "dense_f32_v2", version=2)))
        assert res.returncode == 0, res.stdout + res.stderr
        wait_for(lambda: proc.client.health()["models"]["m"]["version"] == 2, timeout=30, what="v2 active")
        c = tritonhttp.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert c.is_model_ready("m", "1") and c.is_model_ready("m", "2") and not c.is_model_ready("m", "3")
            meta = c.get_model_metadata("m")
            # the versions that answer, as TensorFlow Serving's model status lists them
            tf_status = proc.client.model_status("m")["model_version_status"]
            assert meta["versions"] == [v["version"] for v in tf_status] == ["2", "1"]
            x = _x(2, seed=17)
            answers = {}
            for version in ("1", "2", ""):
                tf = json.loads(proc.client.request(
                    "POST", f"/v1/models/m{'/versions/' + version if version else ''}:predict",
                    json.dumps({"instances": x.tolist()}).encode())[2])
                result = c.infer("m", [_triton_input(meta["inputs"][0]["name"], x, "FP32", True)],
                                 model_version=version)
                assert result.get_response()["model_version"] == (version or "2")
                answers[version] = result.as_numpy(meta["outputs"][0]["name"])
                np.testing.assert_array_equal(answers[version], np.asarray(tf["predictions"], np.float32))
            assert not np.array_equal(answers["1"], answers["2"])  # two models really answered
            np.testing.assert_array_equal(answers[""], answers["2"])
        finally:
            c.close()
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)
