"""The routes of the local inference API: TensorFlow Serving's REST shapes, plus /healthz and /metrics.

Transport-free: `Router.handle(Request) -> Response`, so the HTTP server in agent/api/server.py stays a
byte mover and every route can be read in one place.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgefleet.agent.api.guard import read_passed_files
from edgefleet.agent.serving import npy
from edgefleet.agent.serving.models import Prediction, ServedModel, Serving
from edgefleet.agent.serving.stats import LATENCY_BUCKETS_S
from edgefleet.agent.telemetry.sampler import PromText

from edgefleet.errors import EdgefleetError, RequestError, RuntimeBackendError
from edgefleet.protocol.schema import dump
from edgefleet.tensors import short_name

log = logging.getLogger(__name__)

JSON = "application/json"
_REASONS = {
    200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    411: "Length Required", 413: "Payload Too Large", 415: "Unsupported Media Type", 417: "Expectation Failed",
    422: "Unprocessable Entity", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    503: "Service Unavailable", 505: "HTTP Version Not Supported",
}
_TF_DTYPES = {
    "float32": "DT_FLOAT", "float16": "DT_HALF", "int8": "DT_INT8", "uint8": "DT_UINT8", "int16": "DT_INT16",
    "int32": "DT_INT32", "int64": "DT_INT64", "bool": "DT_BOOL", "string": "DT_STRING",
}
_ACTION = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_PREDICT_KEYS = frozenset({"instances", "inputs", "signature_name"})
_EXAMPLE_KEYS = frozenset({"examples", "context", "signature_name"})
_VERBS = ("predict", "classify", "regress")
SIGNATURE = "serving_default"
"""The only signature a TFLite model is served under (TensorFlow Serving's default key)."""


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


def serving_metrics(serving: Serving, requests: dict[int, int] | None = None, out: PromText | None = None) -> str:
    """Prometheus text of the per-model counters and latency histograms (and API requests by status).

    With `out`, the families are added to it (the daemon renders all of /metrics as one exposition)
    and "" is returned; without, a stand-alone text without a `device` label.
    """
    own = out is None
    w = out if out is not None else PromText()
    served = [m for m in (serving.served(n) for n in serving.names()) if m is not None]
    if served:
        w.family("edgefleet_model_version", "gauge", "Version of the model served under a name.")
        for m in served:
            w.sample("edgefleet_model_version", m.version, model=m.name)
        w.family("edgefleet_inference_total", "counter", "Invocations since the model was activated.")
        for m in served:
            w.sample("edgefleet_inference_total", m.stats.count, model=m.name)
        w.family("edgefleet_inference_errors_total", "counter", "Failed invocations since the model was activated.")
        for m in served:
            w.sample("edgefleet_inference_errors_total", m.stats.errors, model=m.name)
        w.family("edgefleet_inference_duration_seconds", "histogram",
                 "Invoke latency since the model was activated.")
        for m in served:
            cumulative, total = m.stats.histogram()
            for bound, n in zip(LATENCY_BUCKETS_S, cumulative, strict=False):
                w.sample("edgefleet_inference_duration_seconds_bucket", n, model=m.name, le=repr(bound))
            w.sample("edgefleet_inference_duration_seconds_bucket", cumulative[-1], model=m.name, le="+Inf")
            w.sample("edgefleet_inference_duration_seconds_sum", total, model=m.name)
            w.sample("edgefleet_inference_duration_seconds_count", cumulative[-1], model=m.name)
    if requests is not None:
        w.family("edgefleet_api_requests_total", "counter", "API requests answered, by HTTP status.")
        for code, n in sorted(requests.items()):
            w.sample("edgefleet_api_requests_total", n, code=str(code))
    return w.text() if own else ""


class Router:
    """Dispatches requests to the routes; never raises: every failure becomes an error response."""

    def __init__(self, serving: Serving, *, status: Callable[[], dict[str, Any]] | None = None,
                 metrics: Callable[[], str] | None = None,
                 admin: Callable[[str, dict[str, Any]], tuple[int, dict[str, Any]]] | None = None,
                 max_file_bytes: int = 256 << 20) -> None:
        self.serving = serving
        self.status = status
        self.metrics = metrics
        self.admin = admin
        self.max_file_bytes = max_file_bytes
        """Largest bundle file read from a passed descriptor."""
        self.requests: dict[int, int] = {}
        self._count_lock = threading.Lock()
        # one bundle read into memory at a time, however many admin connections ask
        self._install_lock = threading.Lock()
        from edgefleet.agent.api.v2 import (
            V2Routes,  # here, not at the top: edgefleet.agent.api.v2 builds on this module
        )

        self.v2 = V2Routes(serving, status)

    def count(self, status: int) -> None:
        """Count an answer the HTTP layer gave without routing (refusals), for /metrics."""
        with self._count_lock:
            self.requests[status] = self.requests.get(status, 0) + 1

    def handle(self, request: Request, *, unix: bool, admin: bool = False) -> Response:
        """The response to one request; `admin` when it came over the admin socket."""
        try:
            path = request.path
            if request.content_type == npy.CONTENT_TYPE and path.endswith(":predict") and \
                    path.startswith("/v1/models/") and request.method == "POST" and "/" not in path[11:]:
                response = self._predict_npy(request, path[11:-8])  # the binary fast path, no routing
            else:
                response = self._route(request, unix, admin)
        except _NotAllowed as err:
            response = error_response(405, str(err), [("Allow", err.allowed)])
        except RequestError as err:
            response = error_response(err.status, str(err))
        except RuntimeBackendError as err:
            log.warning("inference failed: %s", err)
            response = error_response(500, str(err))
        except Exception as err:  # a bug in a route must not kill the connection or the server
            log.exception("api: %s %s failed", request.method, request.path)
            response = error_response(500, f"internal error: {type(err).__name__}")
        with self._count_lock:
            self.requests[response.status] = self.requests.get(response.status, 0) + 1
        return response

    def _route(self, req: Request, unix: bool, admin: bool) -> Response:
        path = req.path
        if path.startswith("/v1/models/"):
            rest = path[len("/v1/models/"):]
            rest, colon, verb = rest.partition(":")
            if colon:
                if verb not in _VERBS:
                    raise RequestError(f"unknown route {path!r} (served: :predict, :classify, :regress)", 404)
                _method(req, "POST")
                name, version, label = _model_path(rest, path)
                if verb == "predict":
                    return self._predict(req, name, version, label)
                return self._classify_or_regress(req, verb, name, version, label)
            if rest.endswith("/metadata"):
                _method(req, "GET")
                name, version, label = _model_path(rest[:-len("/metadata")], path)
                return json_response(200, _metadata(self.serving.resolve(name, version, label)))
            _method(req, "GET")
            name, version, label = _model_path(rest, path)
            if version is None and label is None:
                return json_response(200, _model_status(*self.serving.versions(name)))
            return json_response(200, _model_status(self.serving.resolve(name, version, label)))
        if path.startswith("/v2") and (len(path) == 3 or path[3] == "/"):
            return self.v2.handle(req)  # the Open Inference Protocol (agent/api/v2.py)
        if path == "/healthz":
            _method(req, "GET")
            return self._health()
        if path == "/metrics":
            _method(req, "GET")
            text = self.metrics() if self.metrics else serving_metrics(self.serving, dict(self.requests))
            return Response(200, text.encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8")
        if path.startswith("/v1/admin/"):
            _method(req, "POST")
            return self._admin(req, path[len("/v1/admin/"):], admin)
        raise RequestError(f"unknown route {path!r}", 404)

    def _health(self) -> Response:
        models = {}
        for name in self.serving.names():
            m = self.serving.served(name)
            if m is not None:
                models[name] = {"version": m.version, "backend": m.backend, "loaded_at": m.loaded_at,
                                "deployment_id": m.deployment.deployment_id}
        body: dict[str, Any] = {"status": "ok" if models else "unavailable", "models": models}
        if self.status is not None:
            body["agent"] = self.status()
            if models and body["agent"].get("status") == "unhealthy":
                # the models still answer, but the agent behind them is stuck or waits for its restart
                body["status"] = "unhealthy"
        return json_response(200 if body["status"] == "ok" else 503, body)

    def _admin(self, req: Request, action: str, admin: bool) -> Response:
        if not admin:
            # inference clients (the inference socket's group, TCP) never install or roll back
            raise RequestError("admin actions are accepted only on the admin socket (api.admin_socket)", 403)
        if self.admin is None:
            raise RequestError("admin actions are not available on this server", 404)
        if not _ACTION.fullmatch(action):
            raise RequestError(f"unknown admin action {action!r}", 404)
        if req.body and req.content_type not in ("", JSON):
            raise RequestError(f"unsupported Content-Type {req.content_type!r} for an admin action; send {JSON}", 415)
        body = _json_body(req) if req.body else {}
        if not isinstance(body, dict):
            raise RequestError("admin body: expected a JSON object")
        if action == "install" and "files" in body:
            # the bundle's files were opened by the caller and passed as descriptors: read them here,
            # so the sandboxed agent needs no access to the caller's path and nothing is uploaded
            if not self._install_lock.acquire(blocking=False):
                raise RequestError("another install is being read; try again when it is done", 409)
            try:
                files = read_passed_files(body["files"], req.fds, self.max_file_bytes)
                return self._call_admin(action, {"bundle_files": files})
            finally:
                self._install_lock.release()
        if req.fds:
            raise RequestError(f"admin action {action!r} takes no file descriptors")
        return self._call_admin(action, body)

    def _call_admin(self, action: str, body: dict[str, Any]) -> Response:
        assert self.admin is not None
        try:
            status, result = self.admin(action, body)
        except EdgefleetError as err:
            raise RequestError(str(err), getattr(err, "status", 400)) from err
        return json_response(status, result)

    # -- predict -------------------------------------------------------------------------------

    def _predict(self, req: Request, name: str, version: int | None = None, label: str | None = None) -> Response:
        if req.content_type == npy.CONTENT_TYPE:
            return self._predict_npy(req, name, version, label)
        body = self._json_request(req, _PREDICT_KEYS)
        if ("instances" in body) == ("inputs" in body):
            raise RequestError('send exactly one of "instances" (row format) or "inputs" (columnar format)')
        served = self.serving.resolve(name, version, label) if b'"b64"' in req.body else None
        if "instances" in body:
            columns = rows_to_columns(body["instances"])
            prediction = self.serving.predict(name, _binary(columns, served), batch_dim=True, version=version,
                                              label=label)
            return json_response(200, row_answer(prediction), [("X-Model-Version", str(prediction.version))])
        inputs = body["inputs"]
        inputs = _binary(inputs if isinstance(inputs, dict) else [inputs], served)
        prediction = self.serving.predict(name, inputs, batch_dim=True, version=version, label=label)
        return json_response(200, _columnar_answer(prediction), [("X-Model-Version", str(prediction.version))])

    def _json_request(self, req: Request, keys: frozenset[str]) -> dict[str, Any]:
        """The JSON object of a TensorFlow Serving request, its signature_name checked."""
        if req.content_type not in ("", JSON, "text/json", "application/x-www-form-urlencoded"):
            raise RequestError(f"unsupported Content-Type {req.content_type!r}; send {JSON} or "
                               f"{npy.CONTENT_TYPE}", 415)
        body = _json_body(req)
        if not isinstance(body, dict):
            raise RequestError(f"expected a JSON object with {' or '.join(sorted(keys - {'signature_name'}))}")
        unknown = set(body) - keys
        if unknown:
            raise RequestError(f"unknown field(s) {', '.join(sorted(unknown))}; expected "
                               f"{', '.join(sorted(keys))}")
        signature = body.get("signature_name", SIGNATURE)
        if signature not in ("", SIGNATURE):  # "" is how TensorFlow Serving's clients say the default
            raise RequestError(f"signature_name {str(signature)[:100]!r} not found: a TFLite model served here "
                               f"has one signature, {SIGNATURE!r}")
        return body

    def _classify_or_regress(self, req: Request, verb: str, name: str, version: int | None,
                             label: str | None) -> Response:
        """TensorFlow Serving's :classify and :regress, for models whose outputs fit them.

        Examples are objects of input name -> value (one instance each); `context` holds values
        shared by every example. The model runs once on the whole batch.
        """
        body = self._json_request(req, _EXAMPLE_KEYS)
        served = self.serving.resolve(name, version, label)
        index = _classify_output(served) if verb == "classify" else _regress_output(served)
        examples = body.get("examples")
        if not isinstance(examples, list) or not examples:
            raise RequestError('"examples": expected a non-empty list of objects')
        context = body.get("context", {})
        if not isinstance(context, dict):
            raise RequestError('"context": expected an object')
        rows = []
        for n, example in enumerate(examples):
            if not isinstance(example, dict):
                raise RequestError(f'"examples"[{n}]: expected an object of input name -> value')
            both = set(context) & set(example)
            if both:
                raise RequestError(f'"examples"[{n}]: {", ".join(sorted(both))} also in "context"')
            rows.append({**context, **example})
        columns = _binary(rows_to_columns(rows), served if b'"b64"' in req.body else None)
        prediction = self.serving.predict(name, columns, batch_dim=True, top_k=False, version=version, label=label)
        scores = prediction.outputs[index]
        extra = {"model_version": prediction.version}
        if verb == "regress":
            return json_response(200, {"result": scores.reshape(len(scores)).tolist(), "edgefleet": extra},
                                 [("X-Model-Version", str(prediction.version))])
        labels = served.deployment.model.postprocessing.labels if served.labelled_output == index else None
        rows_out = scores.reshape(len(scores), -1).tolist()
        names = [labels[j] if labels is not None and j < len(labels) else str(j) for j in range(len(rows_out[0]))]
        result = [[[names[j], v] for j, v in enumerate(row)] for row in rows_out]
        return json_response(200, {"result": result, "edgefleet": extra},
                             [("X-Model-Version", str(prediction.version))])

    def _predict_npy(self, req: Request, name: str, version: int | None = None, label: str | None = None) -> Response:
        if not name:
            raise RequestError(f"unknown route {req.path!r}", 404)
        arr = npy.loads(req.body)
        # the answer is the first output only
        prediction = self.serving.predict(name, [arr], top_k=False, version=version, label=label)
        return Response(200, npy.dumps(prediction.outputs[0]), npy.CONTENT_TYPE,
                        [("X-Model-Version", str(prediction.version))])


def _method(req: Request, allowed: str) -> None:
    if req.method != allowed:
        raise _NotAllowed(allowed, req)


class _NotAllowed(RequestError):
    def __init__(self, allowed: str, req: Request) -> None:
        super().__init__(f"{req.method} is not allowed on {req.path} (use {allowed})", 405)
        self.allowed = allowed


def _model_path(rest: str, path: str) -> tuple[str, int | None, str | None]:
    """(model, version, label) of `{m}`, `{m}/versions/{v}` or `{m}/labels/{label}`."""
    parts = rest.split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None, None
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2].isascii() and parts[2].isdigit() \
            and len(parts[2]) <= 18:
        return parts[0], int(parts[2]), None
    if len(parts) == 3 and parts[0] and parts[1] == "labels" and parts[2]:
        return parts[0], None, parts[2]
    raise RequestError(f"unknown route {path!r}", 404)


def _json_body(req: Request) -> Any:
    if not req.body:
        raise RequestError("empty body: expected JSON")
    try:
        return json.loads(req.body)
    except UnicodeDecodeError as err:
        raise RequestError(f"malformed JSON: not UTF-8 ({err.reason})") from err
    except RecursionError as err:
        raise RequestError("malformed JSON: nested too deeply") from err
    except json.JSONDecodeError as err:
        raise RequestError(f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from err


def rows_to_columns(instances: Any) -> list[Any] | dict[str, Any]:
    """Row format to columns: a list of values (one input) or of {input: value} objects."""
    if not isinstance(instances, list) or not instances:
        raise RequestError('"instances": expected a non-empty list')
    dicts = [isinstance(i, dict) and set(i) != {"b64"} for i in instances]  # {"b64": ...} is one value
    if not any(dicts):
        return [instances]
    if not all(dicts):
        raise RequestError('"instances": mixes objects and plain values')
    keys = set(instances[0])
    for n, inst in enumerate(instances):
        if set(inst) != keys:
            raise RequestError(f'"instances"[{n}]: has inputs {sorted(inst)}, the first has {sorted(keys)}')
    return {k: [inst[k] for inst in instances] for k in keys}


def row_answer(p: Prediction) -> dict[str, Any]:
    """TensorFlow Serving's row-format answer; edgefleet's own fields under "edgefleet"."""
    if len(p.outputs) == 1:
        predictions: list[Any] = _values(p.outputs[0])
    else:
        cols = [_values(y) for y in p.outputs]
        predictions = [{k: c[i] for k, c in zip(p.output_names, cols, strict=True)} for i in range(len(cols[0]))]
    return {"predictions": predictions, "edgefleet": _extras(p)}


def _columnar_answer(p: Prediction) -> dict[str, Any]:
    outputs: Any = _values(p.outputs[0]) if len(p.outputs) == 1 else {
        k: _values(y) for k, y in zip(p.output_names, p.outputs, strict=True)}
    return {"outputs": outputs, "edgefleet": _extras(p)}


def _extras(p: Prediction) -> dict[str, Any]:
    """What edgefleet adds to TensorFlow Serving's answers: the version that answered, and the
    labelled top-k when the deployment has labels."""
    extras: dict[str, Any] = {"model_version": p.version}
    if p.top_k is not None:
        extras["top_k"] = p.top_k
    return extras


def _values(y: Any) -> Any:
    """An output as JSON values; string tensors as text, or {"b64": ...} when not UTF-8 (as TensorFlow
    Serving writes binary values)."""
    if y.dtype.kind not in "SO":
        return y.tolist()
    return _strings(y.tolist())


def _strings(v: Any) -> Any:
    if isinstance(v, list):
        return [_strings(x) for x in v]
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(v).decode("ascii")}
    return v


def _binary(values: Any, served: ServedModel | None) -> Any:
    """The caller's values with every {"b64": "..."} decoded to bytes, for the model's string inputs.

    `served` is None when the body holds no "b64" at all (the common case pays for one substring
    search of the body). A b64 value for a numeric input is refused: TensorFlow Serving would decode
    it into a string tensor, which such an input cannot take.
    """
    if served is None:
        return values
    dtypes = {}
    for i, spec in enumerate(served.inputs):
        dtypes[spec.name] = dtypes[served.input_names[i]] = spec.dtype
    if isinstance(values, dict):
        return {k: _decode_b64(v, dtypes.get(k, ""), str(k)) for k, v in values.items()}
    names = served.input_names
    return [_decode_b64(v, served.inputs[i].dtype if i < len(names) else "", names[i] if i < len(names) else str(i))
            for i, v in enumerate(values)]


def _decode_b64(value: Any, dtype: str, name: str) -> Any:
    if isinstance(value, list):
        return [_decode_b64(v, dtype, name) for v in value]
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise RequestError(f'input {name}: an object value must be {{"b64": "<base64 text>"}}')
        if dtype != "string":
            raise RequestError(f'input {name}: {{"b64": ...}} values are for string inputs; {name} takes '
                               f"{dtype or 'no such input'} (send numbers)")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError) as err:
            raise RequestError(f"input {name}: b64 value is not valid base64 ({err})") from err
    return value


def _classify_output(m: ServedModel) -> int:
    """The output :classify reports: the labelled one, or the model's only output when it scores classes."""
    if m.labelled_output is not None:
        return m.labelled_output
    if len(m.outputs) == 1 and len(m.outputs[0].shape) == 2 and m.outputs[0].shape[-1] != 1:
        return 0
    shapes = ", ".join(f"{n} {list(s.shape)}" for n, s in zip(m.output_names, m.outputs, strict=True))
    raise RequestError(f"model {m.name!r} does not fit :classify: it needs labels bound to an output, or one "
                       f"output of class scores [batch, classes]; its outputs: {shapes}")


def _regress_output(m: ServedModel) -> int:
    """The output :regress reports: the model's only output, one value per example."""
    if len(m.outputs) == 1 and (len(m.outputs[0].shape) == 1 or
                                (len(m.outputs[0].shape) == 2 and m.outputs[0].shape[-1] == 1)):
        return 0
    shapes = ", ".join(f"{n} {list(s.shape)}" for n, s in zip(m.output_names, m.outputs, strict=True))
    raise RequestError(f"model {m.name!r} does not fit :regress: it needs one output of one value per example; "
                       f"its outputs: {shapes}")


def _model_status(*served: ServedModel) -> dict[str, Any]:
    return {"model_version_status": [{
        "version": str(m.version), "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""},
    } for m in served]}


def _tensor_info(specs: tuple[Any, ...], names: tuple[str, ...]) -> dict[str, Any]:
    return {n: {
        "dtype": _TF_DTYPES.get(s.dtype, "DT_INVALID"), "name": s.name,
        "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in s.shape], "unknown_rank": False},
    } for s, n in zip(specs, names or tuple(short_name(s.name) for s in specs), strict=True)}


def _metadata(m: ServedModel) -> dict[str, Any]:
    model = m.deployment.model
    return {
        "model_spec": {"name": m.name, "signature_name": "", "version": str(m.version)},
        "metadata": {"signature_def": {"signature_def": {"serving_default": {
            "inputs": _tensor_info(m.inputs, m.input_names), "outputs": _tensor_info(m.outputs, m.output_names),
            "method_name": "tensorflow/serving/predict",
        }}}},
        "edgefleet": {
            "deployment_id": m.deployment.deployment_id, "backend": m.backend, "loaded_at": m.loaded_at,
            "inputs": [dump(s) for s in m.inputs], "outputs": [dump(s) for s in m.outputs],
            "preprocessing": dump(model.preprocessing), "labels": list(model.postprocessing.labels or []),
            "labels_output": m.output_names[m.labelled_output] if m.labelled_output is not None else None,
            "top_k": model.postprocessing.top_k,
        },
    }

