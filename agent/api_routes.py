"""The routes of the local inference API: TensorFlow Serving's REST shapes, plus /healthz and /metrics.

Transport-free: `Router.handle(Request) -> Response`, so the HTTP server in agent/api.py stays a
byte mover and every route can be read in one place.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent import npy
from agent.api_guard import read_passed_files
from agent.errors import EdgefleetError, RequestError, RuntimeBackendError
from agent.protocol.schema import dump
from agent.serving import Prediction, ServedModel, Serving
from agent.tensors import short_name

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
    "int32": "DT_INT32", "int64": "DT_INT64", "bool": "DT_BOOL",
}
_ACTION = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_PREDICT_KEYS = {"instances", "inputs", "signature_name"}


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


def serving_metrics(serving: Serving, requests: dict[int, int] | None = None) -> str:
    """Prometheus text of the per-model counters and latency quantiles (and API requests by status)."""
    lines = [
        "# HELP edgefleet_model_version Version of the model served under a name.",
        "# TYPE edgefleet_model_version gauge",
    ]
    served = [m for m in (serving.served(n) for n in serving.names()) if m is not None]
    for m in served:
        lines.append(f'edgefleet_model_version{{model="{_esc(m.name)}"}} {m.version}')
    lines += ["# HELP edgefleet_inference_total Invocations since the model was activated.",
              "# TYPE edgefleet_inference_total counter"]
    lines += [f'edgefleet_inference_total{{model="{_esc(m.name)}"}} {m.stats.count}' for m in served]
    lines += ["# HELP edgefleet_inference_errors_total Failed invocations since the model was activated.",
              "# TYPE edgefleet_inference_errors_total counter"]
    lines += [f'edgefleet_inference_errors_total{{model="{_esc(m.name)}"}} {m.stats.errors}' for m in served]
    lines += ["# HELP edgefleet_inference_seconds Invoke latency over the recent samples.",
              "# TYPE edgefleet_inference_seconds summary"]
    for m in served:
        snap = m.stats.snapshot()
        label = _esc(m.name)
        for q, v in (("0.5", snap.p50_ms), ("0.95", snap.p95_ms), ("0.99", snap.p99_ms)):
            lines.append(f'edgefleet_inference_seconds{{model="{label}",quantile="{q}"}} '
                         f'{"NaN" if v is None else repr(v / 1000.0)}')
        lines.append(f'edgefleet_inference_seconds_sum{{model="{label}"}} {m.stats.total_s!r}')
        lines.append(f'edgefleet_inference_seconds_count{{model="{label}"}} {m.stats.count}')
    if requests is not None:
        lines += ["# HELP edgefleet_api_requests_total API requests answered, by HTTP status.",
                  "# TYPE edgefleet_api_requests_total counter"]
        lines += [f'edgefleet_api_requests_total{{code="{code}"}} {n}' for code, n in sorted(requests.items())]
    return "\n".join(lines) + "\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


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
                if verb != "predict":
                    raise RequestError(f"unknown route {path!r} (only :predict is served)", 404)
                _method(req, "POST")
                name, version = _model_path(rest, path)
                return self._predict(req, name, version)
            if rest.endswith("/metadata"):
                _method(req, "GET")
                name, version = _model_path(rest[:-len("/metadata")], path)
                return json_response(200, _metadata(self._served(name, version)))
            _method(req, "GET")
            name, version = _model_path(rest, path)
            return json_response(200, _model_status(self._served(name, version)))
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

    def _served(self, name: str, version: int | None) -> ServedModel:
        served = self.serving.served(name)
        if served is None:
            names = self.serving.names()
            raise RequestError(f"unknown model {name!r}" + (f"; serving: {', '.join(names)}" if names else
                                                             "; no model is loaded yet"), 404)
        if version is not None and version != served.version:
            raise RequestError(f"model {name!r} version {version} is not served (version {served.version} is)", 404)
        return served

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

    def _predict(self, req: Request, name: str, version: int | None) -> Response:
        if version is not None:
            self._served(name, version)
        if req.content_type == npy.CONTENT_TYPE:
            return self._predict_npy(req, name)
        if req.content_type not in ("", JSON, "text/json", "application/x-www-form-urlencoded"):
            raise RequestError(f"unsupported Content-Type {req.content_type!r}; send {JSON} or "
                               f"{npy.CONTENT_TYPE}", 415)
        body = _json_body(req)
        if not isinstance(body, dict):
            raise RequestError('expected a JSON object with "instances" or "inputs"')
        unknown = set(body) - _PREDICT_KEYS
        if unknown:
            raise RequestError(f"unknown field(s) {', '.join(sorted(unknown))}; expected instances or inputs")
        if ("instances" in body) == ("inputs" in body):
            raise RequestError('send exactly one of "instances" (row format) or "inputs" (columnar format)')
        if "instances" in body:
            prediction = self.serving.predict(name, rows_to_columns(body["instances"]), batch_dim=True)
            return json_response(200, row_answer(prediction), [("X-Model-Version", str(prediction.version))])
        inputs = body["inputs"]
        prediction = self.serving.predict(name, inputs if isinstance(inputs, dict) else [inputs], batch_dim=True)
        return json_response(200, _columnar_answer(prediction), [("X-Model-Version", str(prediction.version))])

    def _predict_npy(self, req: Request, name: str) -> Response:
        if not name:
            raise RequestError(f"unknown route {req.path!r}", 404)
        arr = npy.loads(req.body)
        prediction = self.serving.predict(name, [arr], top_k=False)  # the answer is the first output only
        return Response(200, npy.dumps(prediction.outputs[0]), npy.CONTENT_TYPE,
                        [("X-Model-Version", str(prediction.version))])


def _method(req: Request, allowed: str) -> None:
    if req.method != allowed:
        raise _NotAllowed(allowed, req)


class _NotAllowed(RequestError):
    def __init__(self, allowed: str, req: Request) -> None:
        super().__init__(f"{req.method} is not allowed on {req.path} (use {allowed})", 405)
        self.allowed = allowed


def _model_path(rest: str, path: str) -> tuple[str, int | None]:
    parts = rest.split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2].isdigit():
        return parts[0], int(parts[2])
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
    dicts = [isinstance(i, dict) for i in instances]
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
    if len(p.outputs) == 1:
        predictions: list[Any] = p.outputs[0].tolist()
    else:
        cols = [y.tolist() for y in p.outputs]
        predictions = [{k: c[i] for k, c in zip(p.output_names, cols, strict=True)} for i in range(len(cols[0]))]
    answer: dict[str, Any] = {"predictions": predictions, "model_version": p.version}
    if p.top_k is not None:
        answer["top_k"] = p.top_k
    return answer


def _columnar_answer(p: Prediction) -> dict[str, Any]:
    outputs: Any = p.outputs[0].tolist() if len(p.outputs) == 1 else {
        k: y.tolist() for k, y in zip(p.output_names, p.outputs, strict=True)}
    answer: dict[str, Any] = {"outputs": outputs, "model_version": p.version}
    if p.top_k is not None:
        answer["top_k"] = p.top_k
    return answer


def _model_status(m: ServedModel) -> dict[str, Any]:
    return {"model_version_status": [{
        "version": str(m.version), "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""},
    }]}


def _tensor_info(specs: tuple[Any, ...]) -> dict[str, Any]:
    return {short_name(s.name): {
        "dtype": _TF_DTYPES.get(s.dtype, "DT_INVALID"), "name": s.name,
        "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in s.shape], "unknown_rank": False},
    } for s in specs}


def _metadata(m: ServedModel) -> dict[str, Any]:
    model = m.deployment.model
    return {
        "model_spec": {"name": m.name, "signature_name": "", "version": str(m.version)},
        "metadata": {"signature_def": {"signature_def": {"serving_default": {
            "inputs": _tensor_info(m.inputs), "outputs": _tensor_info(m.outputs),
            "method_name": "tensorflow/serving/predict",
        }}}},
        "edgefleet": {
            "deployment_id": m.deployment.deployment_id, "backend": m.backend, "loaded_at": m.loaded_at,
            "inputs": [dump(s) for s in m.inputs], "outputs": [dump(s) for s in m.outputs],
            "preprocessing": dump(model.preprocessing), "labels": list(model.postprocessing.labels or []),
            "top_k": model.postprocessing.top_k,
        },
    }

