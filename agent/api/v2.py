"""The Open Inference Protocol (KServe v2, Triton's HTTP API) on the agent's listeners.

Health, server and model metadata, readiness and `/infer` with JSON tensors and the binary tensor
extension (`Inference-Header-Content-Length`: a JSON header, then raw little-endian tensor bytes).
Inputs go through the same Serving.predict as the TensorFlow Serving route, so checks,
normalisation and quantization behave the same whichever protocol a client speaks; only the
envelope differs. docs/serving.md lists every difference from the specification.

The binary path is the one built for speed: the JSON header is parsed once, each binary input is
a numpy view on the request body (no copy unless it is misaligned), and binary outputs are
written after the header without passing through JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

import edgefleet
from edgefleet.agent.api.messages import JSON, Request, Response, json_response, require_method
from edgefleet.agent.serving.models import Prediction, ServedModel, Serving
from edgefleet.errors import RequestError
from edgefleet.tensors import dequantize, short_name, top_k

HEADER_LENGTH = "Inference-Header-Content-Length"
OCTET = "application/octet-stream"
PLATFORM = "tflite"
SERVER_NAME = "edge-agent"
EXTENSIONS = ("binary_tensor_data", "classification")
"""What GET /v2 announces: Triton's binary tensor data and classification extensions."""

# the protocol's datatype names by numpy dtype (little-endian on the wire), both ways
_DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
_NAMES: dict[str, str] = {dt.name: name for name, dt in _DATATYPES.items()}
_BY_DTYPE: dict[np.dtype[Any], str] = {dt: name for name, dt in _DATATYPES.items()}
_BYTES = np.dtype(object)
"""BYTES tensors (a model's string tensors) are object arrays of Python bytes, as edgefleet.tensors makes them."""
"""Keyed by the dtype itself: dtype.name builds a new string on every call, several µs each."""
_ACCEPTED_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}
"""Which JSON value kinds each datatype family takes (integers written as 1.0 are taken as integers too)."""
_INFER_KEYS = frozenset({"id", "inputs", "outputs", "parameters", "model_name", "model_version"})
_INPUT_KEYS = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_KEYS = frozenset({"name", "parameters"})
_BODY_TYPES = frozenset({"", JSON, "text/json", OCTET, "application/x-www-form-urlencoded"})
"""What /infer takes: curl -d sends the form type (refused over TCP, which only a program gets past)."""
_MAX_CLASSES = 1000
_PARSED_CACHE = 64
"""Distinct binary request headers remembered per model (emptied when full)."""
_CACHED_HEADER_MAX = 4096
"""Longer headers (a padded one, a long id) are parsed every time: the caches stay small."""


def datatype_name(dtype: str | np.dtype[Any]) -> str:
    """The protocol's name for a numpy dtype or a TensorSpec dtype (`float32` -> `FP32`)."""
    if isinstance(dtype, str) and dtype == "string":
        return "BYTES"
    return _NAMES.get(np.dtype(dtype).name, "BYTES")


@dataclass
class _ModelInfo:
    """What the v2 routes precompute per served model: names, metadata and the input index."""

    served: ServedModel
    inputs: dict[str, int]
    """Input name -> position, under its short name and the TFLite name."""
    single: str | None
    """The short name of the only input, when there is one (the fast path passes a list)."""
    output_names: tuple[str, ...]
    metadata: bytes
    labels: tuple[str, ...] | None
    labelled: int
    """Index of the output the labels belong to (-1: none)."""
    parsed: dict[bytes, _Parsed] = field(default_factory=dict)
    """Checked binary-only request headers, by their bytes."""
    answers: dict[tuple[Any, ...], tuple[bytes, list[tuple[str, str]]]] = field(default_factory=dict)
    """Headers of all-binary answers, by version, request id and the outputs' dtypes and shapes."""


class V2Routes:
    """The `/v2` routes; `handle` answers one request whose path starts with `/v2`."""

    def __init__(self, serving: Serving, status: Callable[[], dict[str, Any]] | None = None) -> None:
        self.serving = serving
        self.status = status
        self._info: dict[tuple[str, int], _ModelInfo] = {}
        server = {"name": SERVER_NAME, "version": edgefleet.__version__, "extensions": list(EXTENSIONS)}
        self._server_metadata = json.dumps(server, separators=(",", ":")).encode()

    def handle(self, req: Request) -> Response:
        path = req.path
        if path.startswith("/v2/models/"):
            name, version, action = _model_route(path)
            if action == "infer":
                require_method(req, "POST")
                return self._infer(req, name, version)
            require_method(req, "GET")
            info = self._model(name, version)
            if action == "ready":
                return json_response(200, {"name": name, "ready": True})
            versions = ",".join(f'"{m.version}"' for m in self.serving.versions(name))
            return Response(200, info.metadata.replace(b'"versions":[]', b'"versions":[' + versions.encode() + b"]"))
        if path in ("/v2", "/v2/"):
            require_method(req, "GET")
            return Response(200, self._server_metadata)
        if path == "/v2/health/live":
            require_method(req, "GET")
            live = self._agent_state() != "unhealthy"
            return json_response(200 if live else 503, {"live": live})
        if path == "/v2/health/ready":
            require_method(req, "GET")
            ready = bool(self.serving.names()) and self._agent_state() != "unhealthy"
            return json_response(200 if ready else 503, {"ready": ready})
        raise RequestError(f"unknown route {path!r}: the agent serves /v2, /v2/health/live|ready and "
                           "/v2/models/NAME[/versions/N][/ready|/infer]", 404)

    def _agent_state(self) -> str:
        if self.status is None:
            return "ok"
        return str(self.status().get("status", "ok"))

    # -- models ----------------------------------------------------------------------------------

    def _model(self, name: str, version: int | None) -> _ModelInfo:
        """The precomputed view of what is served as `name` (at `version`, when given)."""
        if not self.serving.names():
            raise RequestError(f"unknown model {name!r}; no model is loaded yet", 404)
        # the active version, or the previous one while it is the rollback target (Serving decides)
        served = self.serving.resolve(name, version)
        key = (name, served.version)
        info = self._info.get(key)
        if info is None or info.served is not served:
            info = _model_info(served)
            names = set(self.serving.names())
            # replaced whole, never mutated: a reader holding the old one still sees a consistent view
            self._info = {**{k: v for k, v in self._info.items() if k[0] in names and k != key}, key: info}
        return info

    # -- inference -------------------------------------------------------------------------------

    def _infer(self, req: Request, name: str, version: int | None) -> Response:
        info = self._model(name, version)
        if req.content_type not in _BODY_TYPES:
            raise RequestError(f"unsupported Content-Type {req.content_type!r}; send {JSON}, or {OCTET} with "
                               f"{HEADER_LENGTH}", 415)
        body = req.body
        header_len = req.inference_header
        if header_len is None:
            header_len = len(body)
        elif header_len > len(body):
            raise RequestError(f"{HEADER_LENGTH} is {header_len} but the body has only {len(body)} bytes")
        if header_len == 0:
            raise RequestError("empty body: expected the JSON inference request" if not body else
                               f"{HEADER_LENGTH} is 0: the JSON inference request must come first")
        if req.inference_header is None:
            parsed = self._parse(info, body)
        else:
            header = bytes(body[:header_len])
            cached = info.parsed.get(header)
            if cached is None:
                cached = self._parse(info, header)
                if cached.binary_only and header_len <= _CACHED_HEADER_MAX:
                    # a client sends the same header for every request of one shape: check it once
                    if len(info.parsed) >= _PARSED_CACHE:
                        info.parsed.clear()
                    info.parsed[header] = cached
            parsed = cached
        arrays = _materialize(parsed.inputs, body, header_len)
        if info.single is not None and len(arrays) == 1:
            key, x = next(iter(arrays.items()))
            if info.inputs.get(key) != 0:
                raise RequestError(f"unknown input {key!r}; the model's input: {info.single}")
            prediction = self.serving.predict(name, [x], batch_dim=True, top_k=False, version=version)
        else:
            prediction = self.serving.predict(name, arrays, batch_dim=True, top_k=False, version=version)
        return self._answer(info, prediction, parsed.wanted, parsed.request_id)

    def _parse(self, info: _ModelInfo, header: bytes | bytearray) -> _Parsed:
        """The checked inference request of a JSON header; RequestError naming the field otherwise."""
        doc = _json(header)
        if not isinstance(doc, dict):
            raise RequestError("the inference request must be a JSON object")
        unknown = doc.keys() - _INFER_KEYS
        if unknown:
            raise RequestError(f"unknown field(s) {', '.join(sorted(unknown))} in the inference request")
        request_id = doc.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise RequestError('"id" must be a string')
        params = _params(doc.get("parameters"), "parameters")
        binary_default = _flag(params, "binary_data_output", "parameters")
        inputs = _parse_inputs(doc.get("inputs"))
        wanted = self._wanted(info, doc.get("outputs"), binary_default)
        return _Parsed(inputs, wanted, request_id, all(i.size is not None for i in inputs))

    @staticmethod
    def _wanted(info: _ModelInfo, value: Any, binary_default: bool) -> list[tuple[int, bool, int]]:
        """(output index, as binary, classes for the classification extension or 0) per requested output."""
        if value is None:
            return [(i, binary_default, 0) for i in range(len(info.output_names))]
        if not isinstance(value, list):
            raise RequestError('"outputs": expected a list of {"name": ...} objects')
        wanted = []
        seen = set()
        for n, item in enumerate(value):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise RequestError(f'"outputs"[{n}]: expected an object with a "name"')
            unknown = item.keys() - _OUTPUT_KEYS
            if unknown:
                raise RequestError(f'"outputs"[{n}]: unknown field(s) {", ".join(sorted(unknown))}')
            name = item["name"]
            index = _output_index(info, name)
            if index in seen:
                raise RequestError(f"output {name!r} is requested twice")
            seen.add(index)
            params = _params(item.get("parameters"), f"output {name!r} parameters")
            binary = _flag(params, "binary_data", f"output {name!r} parameters") if "binary_data" in params \
                else binary_default
            classes = params.get("classification", 0)
            if type(classes) is not int or not 0 <= classes <= _MAX_CLASSES:
                raise RequestError(f"output {name!r}: classification must be an integer from 1 to {_MAX_CLASSES}")
            wanted.append((index, binary, classes))
        return wanted

    @staticmethod
    def _answer(info: _ModelInfo, p: Prediction, wanted: list[tuple[int, bool, int]],
                request_id: str | None) -> Response:
        if (request_id is None or len(request_id) <= 128) and \
                all(binary and not classes for _, binary, classes in wanted) and \
                all(i < len(p.outputs) and p.outputs[i].dtype.kind != "O" for i, _, _ in wanted):
            ys = [p.outputs[i] for i, _, _ in wanted]
            key = (p.version, request_id, tuple((i, y.dtype, y.shape) for (i, _, _), y in zip(wanted, ys, strict=True)))
            cached = info.answers.get(key)
            if cached is not None and all(y.flags.c_contiguous for y in ys):
                # binary answers of one shape share their header: only the tensor bytes differ
                return Response(200, b"".join([cached[0], *(y.data for y in ys)]), OCTET, list(cached[1]))
        else:
            key = None
        outputs: list[dict[str, Any]] = []
        blobs: list[bytes | memoryview] = []
        for index, binary, classes in wanted:
            if index >= len(p.outputs):  # the model was swapped for one with fewer outputs meanwhile
                raise RequestError(f"model {p.name} v{p.version} has no output #{index}", 409)
            y = p.outputs[index]
            name = p.output_names[index]
            if classes:
                out, blob = _classify(name, y, classes, info.labels if index == info.labelled else None, binary,
                                      info.served.outputs[index] if p.raw else None)
                outputs.append(out)
                if blob is not None:
                    blobs.append(blob)
                continue
            if y.dtype.kind == "O":  # a string output
                out, blob = _bytes_output(name, y, binary)
                outputs.append(out)
                if blob is not None:
                    blobs.append(blob)
                continue
            datatype = _BY_DTYPE.get(y.dtype)
            if datatype is None:  # outputs are the model's numeric dtypes or float32 after dequantization
                raise RequestError(f"output {name!r} has dtype {y.dtype.name}, which the protocol cannot carry", 500)
            if binary:
                if y.dtype.byteorder == ">" or not y.flags.c_contiguous:
                    y = np.ascontiguousarray(y, y.dtype.newbyteorder("<"))
                outputs.append({"name": name, "datatype": datatype, "shape": list(y.shape),
                                "parameters": {"binary_data_size": y.nbytes}})
                blobs.append(y.data)  # the array's own bytes: joined once into the body, no tobytes() copy
            else:
                outputs.append({"name": name, "datatype": datatype, "shape": list(y.shape),
                                "data": y.ravel().tolist()})
        answer: dict[str, Any] = {"model_name": p.name, "model_version": str(p.version)}
        if request_id is not None:
            answer["id"] = request_id
        answer["outputs"] = outputs
        head = json.dumps(answer, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        headers = [("X-Model-Version", str(p.version))]
        if not blobs:
            return Response(200, head, JSON, headers)
        headers.append((HEADER_LENGTH, str(len(head))))
        if key is not None:
            if len(info.answers) >= _PARSED_CACHE:
                info.answers.clear()
            info.answers[key] = (head, headers)
        return Response(200, b"".join([head, *blobs]), OCTET, headers)


# -- helpers -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Input:
    """One checked input of a request: its tensor's name, dtype and shape, and where its values are."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    count: int
    size: int | None
    """Bytes of binary data after the header, or None when the values are JSON `data`."""
    data: Any = None


@dataclass(frozen=True)
class _Parsed:
    """A checked inference request header (inputs, requested outputs, id); cached when it holds no data."""

    inputs: tuple[_Input, ...]
    wanted: list[tuple[int, bool, int]]
    request_id: str | None
    binary_only: bool


def _parse_inputs(value: Any) -> tuple[_Input, ...]:
    if not isinstance(value, list) or not value:
        raise RequestError('"inputs": expected a non-empty list of tensors')
    inputs: list[_Input] = []
    names: set[str] = set()
    for n, item in enumerate(value):
        where = f'"inputs"[{n}]'
        if not isinstance(item, dict):
            raise RequestError(f"{where}: expected an object with name, shape, datatype and data")
        unknown = item.keys() - _INPUT_KEYS
        if unknown:
            raise RequestError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f'{where}: "name" must be a non-empty string')
        where = f"input {name!r}"
        if name in names:
            raise RequestError(f"{where} is given twice")
        names.add(name)
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 1 << 62 for d in shape):
            raise RequestError(f'{where}: "shape" must be a list of non-negative integers')
        datatype = item.get("datatype")
        dt = (_BYTES if datatype == "BYTES" else _DATATYPES.get(datatype)) if isinstance(datatype, str) else None
        if dt is None:
            shown = datatype if isinstance(datatype, str) else type(datatype).__name__
            raise RequestError(f"{where}: datatype {shown!r} is not accepted (use one of "
                               f"{', '.join(_DATATYPES)}, BYTES)")
        count = math.prod(shape)
        params = _params(item.get("parameters"), f"{where} parameters")
        size = params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise RequestError(f"{where}: binary_data_size must be a non-negative integer")
            if "data" in item:
                raise RequestError(f'{where}: has both "data" and binary_data_size; send one')
            if dt is _BYTES:
                if size < 4 * count:
                    raise RequestError(f"{where}: binary_data_size {size} is too small for {count} BYTES elements "
                                       f"(each is a 4-byte length, then its bytes)")
            elif size != count * dt.itemsize:
                raise RequestError(f"{where}: binary_data_size is {size} bytes but shape {shape} of {datatype} "
                                   f"takes {count * dt.itemsize}")
        elif "data" not in item:
            raise RequestError(f'{where}: no "data" and no binary_data_size parameter')
        inputs.append(_Input(name, dt, tuple(shape), count, size, item.get("data")))
    return tuple(inputs)


def _materialize(inputs: tuple[_Input, ...], body: bytes | bytearray, offset: int) -> dict[str, NDArray[Any]]:
    """The input arrays by name: binary ones are views on `body` from `offset` on (no copy)."""
    arrays: dict[str, NDArray[Any]] = {}
    end = len(body)
    for i in inputs:
        size = i.size
        if size is None:
            arrays[i.name] = _from_json(f"input {i.name!r}", i.data, i.dtype, list(i.shape), i.count)
            continue
        if offset + size > end:
            raise RequestError(f"input {i.name!r}: the body ends {offset + size - end} bytes before its binary "
                               f"data does")
        if i.dtype is _BYTES:
            arrays[i.name] = _bytes_tensor(f"input {i.name!r}", body, offset, size, i.count, i.shape)
            offset += size
            continue
        x = np.frombuffer(body, i.dtype, i.count, offset).reshape(i.shape)
        if i.dtype.kind == "b" and size and np.frombuffer(body, np.uint8, size, offset).max() > 1:
            raise RequestError(f"input {i.name!r}: BOOL bytes must be 0 or 1")
        arrays[i.name] = x
        offset += size
    if offset != end:
        raise RequestError(f"{end - offset} bytes after the binary inputs belong to no input "
                           f"(check binary_data_size and {HEADER_LENGTH})")
    return arrays


def _model_route(path: str) -> tuple[str, int | None, str]:
    """`/v2/models/NAME[/versions/N][/ready|/infer]` -> (name, version, action: "", "ready" or "infer")."""
    parts = path[len("/v2/models/"):].split("/")
    action = ""
    if len(parts) in (2, 4) and parts[-1] in ("ready", "infer"):
        action = parts.pop()
    if len(parts) == 1 and parts[0]:
        return parts[0], None, action
    if len(parts) == 3 and parts[0] and parts[1] == "versions":
        if not (parts[2].isascii() and parts[2].isdigit()) or len(parts[2]) > 18:
            raise RequestError(f"version {parts[2][:40]!r}: the agent's versions are positive integers", 400)
        return parts[0], int(parts[2]), action
    raise RequestError(f"unknown route {path!r}: the agent serves /v2/models/NAME[/versions/N][/ready|/infer] "
                       "(no config, stats or repository routes)", 404)


def _model_info(served: ServedModel) -> _ModelInfo:
    # the names the TensorFlow Serving route shows, so a client sees one model whichever protocol it speaks
    in_names = served.input_names or tuple(short_name(s.name) for s in served.inputs)
    names = served.output_names or tuple(short_name(s.name) for s in served.outputs)
    inputs: dict[str, int] = {}
    for i, (n, s) in enumerate(zip(in_names, served.inputs, strict=True)):
        inputs.setdefault(n, i)
        inputs.setdefault(s.name, i)
    post = served.deployment.model.postprocessing
    meta = {
        "name": served.name, "versions": [], "platform": PLATFORM,  # filled per request: the set changes
        "inputs": [{"name": n, "datatype": datatype_name(s.dtype), "shape": list(s.shape)}
                   for n, s in zip(in_names, served.inputs, strict=True)],
        "outputs": [{"name": n, "datatype": datatype_name(s.dtype), "shape": list(s.shape)}
                    for n, s in zip(names, served.outputs, strict=True)],
    }
    return _ModelInfo(served=served, inputs=inputs,
                      single=in_names[0] if len(served.inputs) == 1 else None,
                      output_names=tuple(names), metadata=json.dumps(meta, separators=(",", ":")).encode(),
                      labels=post.labels if served.labelled_output is not None else None,
                      labelled=served.labelled_output if served.labelled_output is not None else -1)


def _output_index(info: _ModelInfo, name: str) -> int:
    if name in info.output_names:
        return info.output_names.index(name)
    for i, s in enumerate(info.served.outputs):
        if s.name == name:
            return i
    raise RequestError(f"unknown output {name!r}; the model's outputs: {', '.join(info.output_names)}")


def _json(data: bytes | bytearray) -> Any:
    try:
        return json.loads(data)
    except UnicodeDecodeError as err:
        raise RequestError(f"malformed JSON: not UTF-8 ({err.reason})") from err
    except RecursionError as err:
        raise RequestError("malformed JSON: nested too deeply") from err
    except json.JSONDecodeError as err:
        raise RequestError(f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}"
                           + (f" (is {HEADER_LENGTH} right?)" if "Extra data" in err.msg else "")) from err


def _params(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"{where}: expected an object")
    return value


def _flag(params: dict[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise RequestError(f"{where}: {key} must be true or false")
    return value


def _from_json(where: str, data: Any, dt: np.dtype[Any], shape: list[int], count: int) -> NDArray[Any]:
    """A JSON tensor (nested or flat, row-major) as an array of `dt` in `shape`; 400 on anything else."""
    if not isinstance(data, list):
        raise RequestError(f'{where}: "data" must be a list of values in row-major order')
    if dt is _BYTES:
        flat = _flatten(data)
        if not all(isinstance(v, str) for v in flat):
            raise RequestError(f"{where}: BYTES data must be strings")
        if len(flat) != count:
            raise RequestError(f"{where}: data has {len(flat)} values; shape {shape} needs {count}")
        out = np.empty(count, dtype=object)
        out[:] = [v.encode("utf-8") for v in flat]
        return out.reshape(shape)
    try:
        x = np.array(data)
    except (ValueError, TypeError) as err:
        raise RequestError(f"{where}: data is not a rectangular array of numbers") from err
    if x.size != count:
        raise RequestError(f"{where}: data has {x.size} values; shape {shape} needs {count}")
    if count and x.dtype.kind not in _ACCEPTED_KINDS[dt.kind]:
        kind = {"U": "strings", "O": "mixed values", "b": "booleans", "f": "non-integer numbers"}.get(
            x.dtype.kind, x.dtype.name)
        if not (x.dtype.kind == "f" and dt.kind in "iu" and np.array_equal(x, np.rint(x))):
            raise RequestError(f"{where}: {_NAMES[dt.name]} data must be "
                               f"{'true/false' if dt.kind == 'b' else 'numbers'}, got {kind}")
    if dt.kind in "iu" and count:
        info = np.iinfo(dt)
        if x.min() < info.min or x.max() > info.max:
            raise RequestError(f"{where}: values outside the {_NAMES[dt.name]} range [{info.min}, {info.max}]")
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(dt, copy=False).reshape(shape)


def _classify(name: str, y: NDArray[Any], k: int, labels: tuple[str, ...] | None, binary: bool,
              raw_spec: Any) -> tuple[dict[str, Any], bytes | None]:
    """Triton's classification extension: the k best classes per instance as "score:index[:label]"."""
    if raw_spec is not None and raw_spec.quantization is not None:
        y = dequantize(y, (raw_spec.quantization.scale, raw_spec.quantization.zero_point))
    if y.ndim == 0:
        raise RequestError(f"output {name!r} is a scalar; classification needs scores per class")
    best = top_k(y.astype(np.float32, copy=False), labels or (), k)
    rows = [[f"{c['score']:g}:{c['index']}" + (f":{c['label']}" if c["label"] is not None else "") for c in row]
            for row in best]
    shape = [len(rows), len(rows[0]) if rows else 0]
    if not binary:
        return {"name": name, "datatype": "BYTES", "shape": shape, "data": [s for r in rows for s in r]}, None
    blob = b"".join(len(b).to_bytes(4, "little") + b for r in rows for b in (s.encode() for s in r))
    return {"name": name, "datatype": "BYTES", "shape": shape, "parameters": {"binary_data_size": len(blob)}}, blob


def _flatten(data: list[Any]) -> list[Any]:
    """The leaves of nested lists, in row-major order."""
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def _bytes_tensor(where: str, body: bytes | bytearray, offset: int, size: int, count: int,
                  shape: tuple[int, ...]) -> NDArray[Any]:
    """A binary BYTES tensor: `count` elements, each a 4-byte little-endian length and its bytes."""
    out = np.empty(count, dtype=object)
    pos, end = offset, offset + size
    for k in range(count):
        if pos + 4 > end:
            raise RequestError(f"{where}: binary data ends inside element {k} of {count}")
        n = int.from_bytes(body[pos:pos + 4], "little")
        if pos + 4 + n > end:
            raise RequestError(f"{where}: element {k} is {n} bytes long, past the end of its binary data")
        out[k] = bytes(body[pos + 4:pos + 4 + n])
        pos += 4 + n
    if pos != end:
        raise RequestError(f"{where}: {end - pos} bytes of binary data are left after its {count} elements")
    return out.reshape(shape)


def _bytes_output(name: str, y: NDArray[Any], binary: bool) -> tuple[dict[str, Any], bytes | None]:
    """A string output as BYTES: length-prefixed in binary, UTF-8 text in JSON."""
    values = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in y.reshape(-1).tolist()]
    if binary:
        blob = b"".join(len(v).to_bytes(4, "little") + v for v in values)
        return {"name": name, "datatype": "BYTES", "shape": list(y.shape),
                "parameters": {"binary_data_size": len(blob)}}, blob
    try:
        text = [v.decode("utf-8") for v in values]
    except UnicodeDecodeError as err:
        raise RequestError(f"output {name!r} holds bytes that are not UTF-8 text: ask for it with "
                           f'"binary_data": true') from err
    return {"name": name, "datatype": "BYTES", "shape": list(y.shape), "data": text}, None
