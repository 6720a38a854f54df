"""The routes of the local inference API: TensorFlow Serving's REST shapes, plus /healthz and /metrics.

Transport-free: `Router.handle(Request) -> Response`, so the HTTP server in agent/api/server.py stays a
byte mover and every route can be read in one place.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from typing import Any

from edgefleet.agent import actions
from edgefleet.agent.api.guard import read_passed_files
from edgefleet.agent.api.messages import (
    JSON,
    MethodNotAllowed,
    Request,
    Response,
    error_response,
    json_response,
    require_method,
)
from edgefleet.agent.api.v2 import V2Routes
from edgefleet.agent.serving import npy
from edgefleet.agent.serving.models import ServedModel, Serving
from edgefleet.agent.serving.rows import columnar_answer, decode_binary, row_answer, rows_to_columns
from edgefleet.agent.serving.stats import LATENCY_BUCKETS_S
from edgefleet.agent.telemetry.sampler import PromText
from edgefleet.errors import (
    ActionError,
    Conflict,
    InvalidInput,
    NotFound,
    RequestError,
    RuntimeBackendError,
    Unavailable,
)
from edgefleet.protocol.schema import dump
from edgefleet.tensors import short_name

log = logging.getLogger(__name__)

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


Admin = Callable[[str, dict[str, Any]], dict[str, Any]]
"""Runs an admin action (install, rollback, status) with its JSON body: the answer, or an ActionError."""

# The one place the action errors (edgefleet.errors, raised by agent/actions.py) become HTTP statuses.
_ACTION_STATUS: dict[type[ActionError], int] = {InvalidInput: 400, NotFound: 404, Conflict: 409, Unavailable: 504}


def action_status(err: ActionError) -> int:
    """The HTTP status of an action error (400 for a kind without its own)."""
    return next((_ACTION_STATUS[kind] for kind in type(err).__mro__ if kind in _ACTION_STATUS), 400)


class Router:
    """Dispatches requests to the routes; never raises: every failure becomes an error response."""

    def __init__(self, serving: Serving, *, status: Callable[[], dict[str, Any]] | None = None,
                 metrics: Callable[[], str] | None = None,
                 admin: Admin | None = None, max_file_bytes: int = 256 << 20) -> None:
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
        except MethodNotAllowed as err:
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
        if path in ("/v1/models", "/v1/models/"):
            require_method(req, "GET")
            return json_response(200, self._model_list())
        if path.startswith("/v1/models/"):
            rest = path[len("/v1/models/"):]
            rest, colon, verb = rest.partition(":")
            if colon:
                if verb not in _VERBS:
                    raise RequestError(f"unknown route {path!r} (served: :predict, :classify, :regress)", 404)
                require_method(req, "POST")
                name, version, label = _model_path(rest, path)
                if verb == "predict":
                    return self._predict(req, name, version, label)
                return self._classify_or_regress(req, verb, name, version, label)
            if rest.endswith("/metadata"):
                require_method(req, "GET")
                name, version, label = _model_path(rest[:-len("/metadata")], path)
                return json_response(200, _metadata(self.serving.resolve(name, version, label)))
            require_method(req, "GET")
            name, version, label = _model_path(rest, path)
            if version is None and label is None:
                return json_response(200, _model_status(*self.serving.versions(name)))
            return json_response(200, _model_status(self.serving.resolve(name, version, label)))
        if path.startswith("/v2") and (len(path) == 3 or path[3] == "/"):
            return self.v2.handle(req)  # the Open Inference Protocol (agent/api/v2.py)
        if path == "/healthz":
            require_method(req, "GET")
            return self._health()
        if path == "/metrics":
            require_method(req, "GET")
            text = self.metrics() if self.metrics else serving_metrics(self.serving, dict(self.requests))
            return Response(200, text.encode("utf-8"), "text/plain; version=0.0.4; charset=utf-8")
        if path.startswith("/v1/admin/"):
            require_method(req, "POST")
            return self._admin(req, path[len("/v1/admin/"):], admin)
        raise RequestError(f"unknown route {path!r}", 404)

    def _model_list(self) -> dict[str, Any]:
        """Every served model with the status of its versions, in the shape of `/v1/models/{m}`."""
        models = []
        for name in self.serving.names():
            try:
                versions = self.serving.versions(name)
            except RequestError:  # unloaded since names() was read
                continue
            models.append({"name": name, **_model_status(*versions)})
        return {"models": models}

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
            result = self.admin(action, body)
        except ActionError as err:
            raise RequestError(str(err), action_status(err)) from err
        except Exception as err:  # logged where it failed (the daemon's loop): the caller learns what it was
            return error_response(500, f"{type(err).__name__}: {err}")
        return json_response(200, result)

    # -- predict -------------------------------------------------------------------------------

    def _predict(self, req: Request, name: str, version: int | None = None, label: str | None = None) -> Response:
        if req.content_type == npy.CONTENT_TYPE:
            return self._predict_npy(req, name, version, label)
        body = self._json_request(req, _PREDICT_KEYS)
        if ("instances" in body) == ("inputs" in body):
            raise RequestError('send exactly one of "instances" (row format) or "inputs" (columnar format)')
        binary = b'"b64"' in req.body
        if "instances" in body:
            prediction = actions.predict(self.serving, name, body["instances"], version=version, label=label,
                                         binary=binary)
            return json_response(200, row_answer(prediction), [("X-Model-Version", str(prediction.version))])
        served = self.serving.resolve(name, version, label) if binary else None
        inputs = body["inputs"]
        inputs = decode_binary(inputs if isinstance(inputs, dict) else [inputs], served)
        prediction = self.serving.predict(name, inputs, batch_dim=True, version=version, label=label)
        return json_response(200, columnar_answer(prediction), [("X-Model-Version", str(prediction.version))])

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
        columns = decode_binary(rows_to_columns(rows), served if b'"b64"' in req.body else None)
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

