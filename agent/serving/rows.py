"""TensorFlow Serving's JSON request and answer formats (rows: `instances`, columns: `inputs`) and the
values they carry, for the local API and `edge-agent predict` alike.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from edgefleet.agent.serving.models import Prediction, ServedModel
from edgefleet.errors import RequestError


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


def columnar_answer(p: Prediction) -> dict[str, Any]:
    """TensorFlow Serving's columnar answer (to `inputs`); edgefleet's own fields under "edgefleet"."""
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


def decode_binary(values: Any, served: ServedModel | None) -> Any:
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
