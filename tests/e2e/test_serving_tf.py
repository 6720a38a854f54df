"""Serving that a request cannot corrupt, and TensorFlow Serving's REST API as the agent serves it.

Multi-tensor batching on both interpreter packages, distinct output names, labels bound to an output,
version labels and the previous version, signature_name, b64 strings, :classify / :regress and
chunked bodies: in process where the route is enough, through a real agent process where the
lifecycle or the HTTP server takes part.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.api.messages import Request
from edgefleet.agent.api.routes import Router
from edgefleet.agent.serving.models import Serving
from edgefleet.bundle import MODEL_FILE, Bundle
from edgefleet.converter.bundle.writer import BundleSpec, write_bundle
from edgefleet.converter.cli import main as edgectl
from edgefleet.errors import RuntimeBackendError, UsageError
from edgefleet.protocol.documents import Policy
from edgefleet.runtime import load_model
from edgefleet.tensors import signature_names
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.waiting import wait_for

X8 = [[0.5, -1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.1]]
BIG = [[500.0, 1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.1]]
LABELS3 = ("low", "mid", "high")


def _two(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(size=(n, 3)).astype(np.float32), "b": rng.normal(size=(n, 2)).astype(np.float32)}


def _expected_two(model_path: Path, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each instance run alone (batch 1) by a fresh interpreter, keyed by the signature's output names."""
    ref = load_model(model_path)
    order = [d["name"] for d in ref.interpreter.get_input_details()]
    out_names = signature_names(ref.interpreter, "outputs")
    assert out_names is not None
    rows = []
    for i in range(len(x["a"])):
        args = [x["a"][i:i + 1] if name.endswith("_a:0") else x["b"][i:i + 1] for name in order]
        rows.append(ref.run(args))
    return {n: np.concatenate([r[j] for r in rows]) for j, n in enumerate(out_names)}


def _in_a_process_without_tensorflow(request: pytest.FixtureRequest, backend: str) -> bool:
    """tflite-runtime must never share a process with TensorFlow, which earlier tests of a full run import
    into this one: then run this very test again in a fresh pytest process and take its verdict.
    True when that happened (the caller returns), False when the test may run here."""
    import subprocess
    import sys

    if backend != "tflite" or "tensorflow" not in sys.modules:
        return False
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and " passed" in result.stdout, result.stdout[-3000:] + result.stderr[-2000:]
    return True


def _serve(serving: Serving, bundle: Path, name: str = "m") -> None:
    serving.activate(name, bundle / MODEL_FILE, Bundle.load(bundle).deployment)


def _post(router: Router, path: str, body: Any) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    res = router.handle(Request("POST", path, content_type="application/json", body=raw), unix=True)
    return res.status, json.loads(res.body)


def _get(router: Router, path: str) -> tuple[int, Any]:
    res = router.handle(Request("GET", path), unix=True)
    return res.status, json.loads(res.body)


# -- in process: the serving path -------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["litert", "tflite"])
def test_two_inputs_two_outputs_batch_2_then_1(make_bundle: Callable[..., Path], backend: str,
                                               request: pytest.FixtureRequest) -> None:
    if _in_a_process_without_tensorflow(request, backend):
        return
    bundle = make_bundle("two_in_two_out", labels=LABELS3)
    serving = Serving(backend)
    _serve(serving, bundle)
    served = serving.served("m")
    assert served is not None and served.backend == backend
    # the two outputs share the short name StatefulPartitionedCall_1: the signature's names keep them apart
    assert sorted(served.output_names) == ["output_0", "output_1"]
    assert served.labelled_output is not None and served.outputs[served.labelled_output].shape[-1] == 3
    for n in (2, 1, 3, 1):
        x = _two(n, seed=n)
        p = serving.predict("m", x, batch_dim=True)
        expected = _expected_two(bundle / MODEL_FILE, x)
        got = dict(zip(p.output_names, p.outputs, strict=True))
        assert set(got) == set(expected)
        for k, y in expected.items():
            np.testing.assert_allclose(got[k], y, rtol=1e-5, atol=1e-6)
        # the labels name the 3-class output, whatever its position in the file
        assert p.top_k is not None and len(p.top_k) == n
        scores = got[served.output_names[served.labelled_output]]
        assert [t[0]["label"] for t in p.top_k] == [LABELS3[int(np.argmax(r))] for r in scores]
    assert served.stats.errors == 0 and served.stats.count == 4
    # the interpreter wrapper validation and edgectl use resizes the same way
    ref = load_model(bundle / MODEL_FILE, backend)
    x = _two(2)
    args = [x["a"] if s.name.endswith("_a:0") else x["b"] for s in ref.inputs]
    assert [y.shape[0] for y in ref.run(args)] == [2, 2]
    assert [y.shape[0] for y in ref.run([v[:1] for v in args])] == [1, 1]


@pytest.mark.parametrize("backend", ["litert", "tflite"])
def test_a_failed_invoke_after_a_resize_restores_the_model(make_bundle: Callable[..., Path], backend: str,
                                                           request: pytest.FixtureRequest) -> None:
    if _in_a_process_without_tensorflow(request, backend):
        return
    serving = Serving(backend)
    _serve(serving, make_bundle("fails_on_big_f32"))
    good = serving.predict("m", [np.array(X8 * 2, np.float32)]).outputs[0]
    with pytest.raises(RuntimeBackendError, match="invoke failed"):
        serving.predict("m", [np.array(BIG * 3, np.float32)])  # a new batch size, and the invoke fails
    stats = serving.served("m").stats  # type: ignore[union-attr]
    assert stats.errors == 1 and stats.count == 2  # the failure is counted for probation and /metrics
    np.testing.assert_array_equal(serving.predict("m", [np.array(X8 * 2, np.float32)]).outputs[0], good)
    assert serving.predict("m", [np.array(X8, np.float32)]).outputs[0].shape == (1, 4)
    assert stats.errors == 1 and stats.count == 4


def test_labels_bound_to_a_named_output(make_bundle: Callable[..., Path], tmp_path: Path) -> None:
    serving = Serving()
    _serve(serving, make_bundle("two_in_two_out", labels=("only",), labels_output="output_0"))
    served = serving.served("m")
    assert served is not None and served.output_names[served.labelled_output or 0] == "output_0"
    p = serving.predict("m", _two(2), batch_dim=True)
    assert p.top_k is not None and [t[0]["label"] for t in p.top_k] == ["only", "only"]
    # a count that fits no output, or the named one, is refused when the bundle is written
    with pytest.raises(UsageError, match="2 labels, but no output has 2 classes"):
        make_bundle("two_in_two_out", labels=("x", "y"))
    with pytest.raises(UsageError, match="3 labels, but output output_0 has 1 classes"):
        make_bundle("two_in_two_out", labels=LABELS3, labels_output="output_0")


def test_edgectl_package_refuses_labels_that_fit_no_output(zoo: Callable[[str], Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("x\ny\n")
    out = tmp_path / "bundle"
    rc = edgectl(["package", str(zoo("two_in_two_out")), "-o", str(out), "--name", "m", "--version", "1",
                  "--labels", str(labels), "--latency-runs", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert len(err) == 1 and "2 labels, but no output has 2 classes" in err[0], err
    labels.write_text("x\ny\nz\n")
    rc = edgectl(["package", str(zoo("two_in_two_out")), "-o", str(out), "--name", "m", "--version", "1",
                  "--labels", str(labels), "--latency-runs", "2", "--labels-output", "output_1"])
    assert rc == 0, capsys.readouterr().err
    assert Bundle.load(out).deployment.model.postprocessing.output == "output_1"


# -- in process: the TensorFlow Serving routes ------------------------------------------------------


def test_predict_answers_both_outputs_by_name_and_extras_under_one_key(make_bundle: Callable[..., Path]) -> None:
    bundle = make_bundle("two_in_two_out", labels=LABELS3)
    serving = Serving()
    _serve(serving, bundle)
    router = Router(serving)
    x = _two(2)
    expected = _expected_two(bundle / MODEL_FILE, x)
    status, rows = _post(router, "/v1/models/m:predict",
                         {"instances": [{"a": x["a"][i].tolist(), "b": x["b"][i].tolist()} for i in range(2)]})
    assert status == 200 and set(rows) == {"predictions", "edgefleet"}
    assert rows["edgefleet"]["model_version"] == 1 and len(rows["edgefleet"]["top_k"]) == 2
    for i, row in enumerate(rows["predictions"]):
        assert set(row) == {"output_0", "output_1"}
        for k in row:
            np.testing.assert_allclose(row[k], expected[k][i], rtol=1e-5)
    status, cols = _post(router, "/v1/models/m:predict", {"inputs": {k: v.tolist() for k, v in x.items()},
                                                          "signature_name": "serving_default"})
    assert status == 200 and set(cols["outputs"]) == {"output_0", "output_1"}
    status, meta = _get(router, "/v1/models/m/metadata")
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert set(sig["outputs"]) == {"output_0", "output_1"} and set(sig["inputs"]) == {"a", "b"}
    assert {o["name"] for o in sig["outputs"].values()} == {"StatefulPartitionedCall_1:0", "StatefulPartitionedCall_1:1"}


def test_signature_name_is_checked(make_bundle: Callable[..., Path]) -> None:
    serving = Serving()
    _serve(serving, make_bundle("dense_f32"))
    router = Router(serving)
    assert _post(router, "/v1/models/m:predict", {"instances": X8, "signature_name": ""})[0] == 200
    status, answer = _post(router, "/v1/models/m:predict", {"instances": X8, "signature_name": "classify_x"})
    assert status == 400 and "signature_name 'classify_x' not found" in answer["error"]
    assert serving.served("m").stats.count == 1  # type: ignore[union-attr]  # refused before the model


def test_b64_feeds_string_inputs_and_is_refused_for_numbers(zoo: Callable[[str], Path], tmp_path: Path,
                                                            make_bundle: Callable[..., Path]) -> None:
    bundle = tmp_path / "text"
    write_bundle(bundle, zoo("text_is_cat").read_bytes(),
                 BundleSpec(name="t", version=1, golden_inputs=[np.array([[b"cat"], [b"dog"]])]))
    serving = Serving()
    _serve(serving, bundle, "t")
    _serve(serving, make_bundle("dense_f32"), "m")
    router = Router(serving)
    b64 = [{"b64": base64.b64encode(v).decode()} for v in (b"cat", b"ca\x00t", b"\xff\xfe")]
    status, answer = _post(router, "/v1/models/t:predict", {"instances": [*b64, "cat"]})
    assert status == 200 and answer["predictions"] == [1.0, 0.0, 0.0, 1.0]
    status, answer = _post(router, "/v1/models/t:predict", {"inputs": {"text": b64[:1]}})
    assert status == 200 and answer["outputs"] == [1.0]
    status, answer = _post(router, "/v1/models/m:predict", {"instances": [[{"b64": "AAAA"}] * 8]})
    assert status == 400 and "values are for string inputs" in answer["error"]
    status, answer = _post(router, "/v1/models/t:predict", {"instances": [{"b64": "not base64!"}]})
    assert status == 400 and "not valid base64" in answer["error"]
    status, answer = _post(router, "/v1/models/t:predict", {"instances": [1.5]})
    assert status == 400 and "expected strings" in answer["error"]
    status, meta = _get(router, "/v1/models/t/metadata")
    assert meta["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["text"]["dtype"] == "DT_STRING"


def test_classify_and_regress_where_the_signature_fits(make_bundle: Callable[..., Path]) -> None:
    serving = Serving()
    _serve(serving, make_bundle("dense_f32", labels=("a", "b", "c", "d")), "cls")
    _serve(serving, make_bundle("dense_f32"), "plain")
    _serve(serving, make_bundle("regress_f32"), "reg")
    _serve(serving, make_bundle("two_in_two_out"), "two")
    router = Router(serving)
    rows = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)
    scores = serving.predict("cls", [rows]).outputs[0]
    status, answer = _post(router, "/v1/models/cls:classify", {"examples": [{"keras_tensor": r.tolist()} for r in rows]})
    assert status == 200, answer
    assert [[c for c, _ in row] for row in answer["result"]] == [["a", "b", "c", "d"]] * 3
    np.testing.assert_allclose([[s for _, s in row] for row in answer["result"]], scores, rtol=1e-6)
    status, answer = _post(router, "/v1/models/plain:classify", {"examples": [{"keras_tensor": rows[0].tolist()}]})
    assert status == 200 and [c for c, _ in answer["result"][0]] == ["0", "1", "2", "3"]
    expected = serving.predict("reg", [rows]).outputs[0].reshape(-1)
    status, answer = _post(router, "/v1/models/reg:regress", {"examples": [{"keras_tensor": r.tolist()} for r in rows]})
    assert status == 200 and answer["edgefleet"]["model_version"] == 1
    np.testing.assert_allclose(answer["result"], expected, rtol=1e-6)
    # context values are shared by every example
    x = _two(2)
    status, answer = _post(router, "/v1/models/two:predict", {"instances": [{"a": x["a"][0].tolist(), "b": x["b"][0].tolist()}]})
    assert status == 200
    for path, needs in (("/v1/models/reg:classify", ":classify"), ("/v1/models/cls:regress", ":regress"),
                        ("/v1/models/two:regress", ":regress")):
        status, answer = _post(router, path, {"examples": [{"keras_tensor": rows[0].tolist()}],
                                              "context": {}})
        assert status == 400 and f"does not fit {needs}" in answer["error"], answer
    status, answer = _post(router, "/v1/models/two:classify",
                           {"context": {"b": x["b"][0].tolist()}, "examples": [{"a": x["a"][0].tolist()}]})
    assert status == 400 and "does not fit :classify" in answer["error"]  # no labels, two outputs
    status, answer = _post(router, "/v1/models/cls:classify", {"examples": []})
    assert status == 400 and "non-empty list" in answer["error"]


# -- through a real agent: versions, labels, failures, chunked bodies -------------------------------


@pytest.mark.parametrize("backend", ["litert", "tflite"])
def test_real_agent_two_input_model_batch_2_then_1(tmp_path: Path, make_bundle: Callable[..., Path],
                                                   backend: str) -> None:
    bundle = make_bundle("two_in_two_out", labels=LABELS3)
    a = AgentProcess(tmp_path / "a", runtime={"backend": backend})
    assert a.cli("install", str(bundle)).returncode == 0
    a.start()
    try:
        for n in (2, 1, 2):
            x = _two(n, seed=10 + n)
            answer = a.client.predict("m", {k: v.tolist() for k, v in x.items()}, columnar=True)
            expected = _expected_two(bundle / MODEL_FILE, x)
            assert set(answer["outputs"]) == set(expected)
            for k, y in expected.items():
                np.testing.assert_allclose(answer["outputs"][k], y, rtol=1e-5, atol=1e-6)
        health = a.client.health()
        assert health["models"]["m"]["backend"] == backend
        assert "edgefleet_inference_errors_total" in a.client.metrics()
        assert a.status()["health"]["models"]["m"]["errors"] == 0
    finally:
        a.kill()


def _wait_committed(a: AgentProcess, version: int) -> None:
    """Until `version` has passed probation: only a committed version becomes the rollback target."""
    def committed() -> bool:
        m = a.client.admin("status")["state"]["models"]["m"]
        return bool(m["phase"] == "COMMITTED" and m["active"]["version"] == version)
    wait_for(committed, what=f"v{version} commit")


def _request(a: AgentProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    raw = b"" if body is None else json.dumps(body).encode()
    status, _, data = a.client.request(method, path, raw)
    return status, json.loads(data)


def test_real_agent_forced_invoke_failure_is_counted_and_rolled_back(tmp_path: Path,
                                                                    make_bundle: Callable[..., Path],
                                                                    zoo: Callable[[str], Path]) -> None:
    from tests.e2e.test_probation import _install_v2

    # judged when the probation window ends (min_requests is out of reach), so /metrics can be read first
    a = AgentProcess(tmp_path / "a", health={"probation_s": 3, "min_requests": 1000, "max_error_rate": 0.2})
    assert a.cli("install", str(make_bundle("dense_f32", version=1))).returncode == 0
    a.start()
    try:
        a.client.predict("m", X8)
        _wait_committed(a, 1)
        _install_v2(a, make_bundle, zoo, "fails_on_big_f32")
        for _ in range(3):
            status, answer = _request(a, "POST", "/v1/models/m:predict", {"instances": BIG * 2})
            assert status == 500 and "invoke failed" in answer["error"]
            status, answer = _request(a, "POST", "/v1/models/m:predict", {"instances": X8})
            assert status == 200 and answer["edgefleet"]["model_version"] == 2  # still serving, batch 1
            status, answer = _request(a, "POST", "/v1/models/m:predict", {"instances": X8 * 2})
            assert status == 200 and len(answer["predictions"]) == 2
        metrics = a.client.metrics()
        assert any(line.startswith("edgefleet_inference_errors_total{") and line.endswith(" 3")
                   for line in metrics.splitlines()), metrics
        model = wait_for(lambda: (m := a.client.admin("status")["state"]["models"]["m"])["phase"] == "ROLLED_BACK"
                         and m, what="rollback on the counted failures")
        assert "error rate" in model["last_outcome"]["reason"] and model["last_outcome"]["figures"]["errors"] == 3
        assert a.client.predict("m", X8)["edgefleet"]["model_version"] == 1
    finally:
        a.kill()


def test_real_agent_versions_and_labels(tmp_path: Path, make_bundle: Callable[..., Path]) -> None:
    a = AgentProcess(tmp_path / "a", health={"probation_s": 0.5, "min_requests": 1000})
    v1 = make_bundle("dense_f32", version=1, policy=Policy(version_labels=("prod",)))
    # v2's signed policy keeps it on probation (a policy may lengthen it) for the whole test
    v2 = make_bundle("dense_f32_v2", version=2, policy=Policy(version_labels=("next",), probation_s=600))
    assert a.cli("install", str(v1)).returncode == 0
    a.start()
    try:
        y1 = np.array(a.client.predict("m", X8)["predictions"])
        _wait_committed(a, 1)
        res = a.cli("install", str(v2))
        assert res.returncode == 0 and "PROBATION (v2)" in res.stdout, res.stdout + res.stderr
        y2 = np.array(a.client.predict("m", X8)["predictions"])
        assert not np.allclose(y1, y2)
        answers = {}
        for path in ("versions/1", "versions/2", "labels/stable", "labels/canary", "labels/prod", "labels/next"):
            status, answer = _request(a, "POST", f"/v1/models/m/{path}:predict", {"instances": X8})
            assert status == 200, (path, answer)
            answers[path] = (answer["edgefleet"]["model_version"], np.array(answer["predictions"]))
        assert {p: v for p, (v, _) in answers.items()} == {
            "versions/1": 1, "versions/2": 2, "labels/stable": 1, "labels/canary": 2, "labels/prod": 1,
            "labels/next": 2}
        np.testing.assert_allclose(answers["versions/1"][1], y1, rtol=1e-6)
        np.testing.assert_allclose(answers["labels/canary"][1], y2, rtol=1e-6)
        status, st = _request(a, "GET", "/v1/models/m")
        assert status == 200 and [v["version"] for v in st["model_version_status"]] == ["2", "1"]
        status, st = _request(a, "GET", "/v1/models/m/labels/stable")
        assert [v["version"] for v in st["model_version_status"]] == ["1"]
        status, meta = _request(a, "GET", "/v1/models/m/versions/1/metadata")
        assert status == 200 and meta["model_spec"]["version"] == "1"
        # the requests to v1 do not count for v2's probation
        assert a.status()["health"]["models"]["m"]["requests"] == 4
        for path, status_code in (("versions/7", 404), ("labels/nope", 404)):
            status, answer = _request(a, "POST", f"/v1/models/m/{path}:predict", {"instances": X8})
            assert status == status_code and "error" in answer
        # a rollback: v1 is active and stable again, v2 is gone
        assert a.client.admin("rollback", {"model": "m"})["version"] == 1
        status, answer = _request(a, "POST", "/v1/models/m/versions/2:predict", {"instances": X8})
        assert status == 404  # rolled back: v2 is nobody's target any more
        status, answer = _request(a, "POST", "/v1/models/m/labels/stable:predict", {"instances": X8})
        assert status == 200 and answer["edgefleet"]["model_version"] == 1
        status, answer = _request(a, "POST", "/v1/models/m/labels/canary:predict", {"instances": X8})
        assert status == 404 and "labels: prod (v1), stable (v1)" in answer["error"]
    finally:
        a.kill()


def test_real_agent_previous_version_after_a_commit(tmp_path: Path, make_bundle: Callable[..., Path]) -> None:
    a = AgentProcess(tmp_path / "a", health={"probation_s": 0.5, "min_requests": 1000})
    assert a.cli("install", str(make_bundle("dense_f32", version=1))).returncode == 0
    a.start()
    try:
        y1 = a.client.predict("m", X8)["predictions"]
        _wait_committed(a, 1)
        assert a.cli("install", str(make_bundle("dense_f32_v2", version=2))).returncode == 0
        a.client.predict("m", X8)
        _wait_committed(a, 2)
        status, answer = _request(a, "POST", "/v1/models/m/labels/stable:predict", {"instances": X8})
        assert status == 200 and answer["edgefleet"]["model_version"] == 2
        status, answer = _request(a, "POST", "/v1/models/m/versions/1:predict", {"instances": X8})
        assert status == 200 and answer["predictions"] == y1  # still the rollback target
        # a restart: the previous version is loaded again on its first request
        a.stop()
        a.start()
        status, answer = _request(a, "POST", "/v1/models/m/versions/1:predict", {"instances": X8})
        assert status == 200 and answer["predictions"] == y1
    finally:
        a.kill()


def test_real_agent_previous_version_not_kept_when_switched_off(tmp_path: Path,
                                                                make_bundle: Callable[..., Path]) -> None:
    a = AgentProcess(tmp_path / "a", runtime={"keep_previous_loaded": False},
                     health={"probation_s": 0.5, "min_requests": 1000})
    assert a.cli("install", str(make_bundle("dense_f32", version=1))).returncode == 0
    a.start()
    try:
        _wait_committed(a, 1)
        v2 = make_bundle("dense_f32_v2", version=2, policy=Policy(probation_s=600))
        assert a.cli("install", str(v2)).returncode == 0
        status, answer = _request(a, "POST", "/v1/models/m/labels/stable:predict", {"instances": X8})
        assert status == 404 and "keep_previous_loaded = false" in answer["error"]
        assert a.client.predict("m", X8)["edgefleet"]["model_version"] == 2
    finally:
        a.kill()


def test_real_agent_chunked_predict(tmp_path: Path, make_bundle: Callable[..., Path]) -> None:
    a = AgentProcess(tmp_path / "a")
    assert a.cli("install", str(make_bundle("dense_f32"))).returncode == 0
    a.start()
    try:
        expected = a.client.predict("m", X8 * 3)["predictions"]
        body = json.dumps({"instances": X8 * 3}).encode()
        pieces = [body[i:i + 17] for i in range(0, len(body), 17)]
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(a.socket))
            s.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, payload = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert json.loads(payload)["predictions"] == expected
    finally:
        a.kill()


def test_edgectl_push_signs_version_labels() -> None:
    from edgefleet.converter.fleet.publish import signed_policy

    assert signed_policy(version_labels=["prod", "eu-1"]) == {"allow_downgrade": False,
                                                              "version_labels": ["prod", "eu-1"]}
    with pytest.raises(UsageError, match="set by the agent itself"):
        signed_policy(version_labels=["canary"])
