"""Caller values to model tensors and back: checks, normalisation, quantization, top-k.

Everything here is precomputed per input at activation (`InputPlan`) so that a request pays only
for the conversions it needs; every refusal is a RequestError naming the input and the problem.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefleet.errors import RequestError
from edgefleet.protocol.documents import Deployment, TensorSpec

log = logging.getLogger(__name__)

def short_name(tensor_name: str) -> str:
    """A tensor's name without the converter's decorations: `serving_default_x:0` -> `x`."""
    name = tensor_name.split(":", 1)[0]
    return name.removeprefix("serving_default_")


def distinct_names(specs: Sequence[TensorSpec], signature: Sequence[str | None] | None = None) -> tuple[str, ...]:
    """Caller-facing names of a model's tensors: the short names, unless two of them collide.

    Several outputs of one Keras model are all `StatefulPartitionedCall_1:N`: their short names
    collide, and a dict keyed by them would silently keep one. Then the signature's own names
    (`output_0`, ..., the names TensorFlow Serving would show) are used when the model has them for
    every tensor and they are distinct, else the full tensor names, which keep the `:N` suffix.
    """
    short = tuple(short_name(s.name) for s in specs)
    if len(set(short)) == len(short):
        return short
    if signature is not None and all(signature) and len(set(signature)) == len(signature) == len(specs):
        return tuple(str(n) for n in signature)
    full = tuple(s.name for s in specs)
    if len(set(full)) == len(full):
        return full
    return tuple(f"{s.name}#{i}" for i, s in enumerate(specs))  # nameless tensors: their position decides


def signature_names(interpreter: Any, which: str) -> list[str | None] | None:
    """The names the model's only signature gives its input or output tensors (`which`), in the
    interpreter's tensor order; None when the model has no signature, or several."""
    try:
        signatures = interpreter.get_signature_list()
        if len(signatures) != 1:
            return None
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        details = runner.get_input_details() if which == "inputs" else runner.get_output_details()
        order = interpreter.get_input_details() if which == "inputs" else interpreter.get_output_details()
    except Exception:  # a model converted without signatures, or an interpreter without the API
        return None
    by_index = {int(d["index"]): str(n) for n, d in details.items()}
    return [by_index.get(int(d["index"])) for d in order]


def labelled_output(specs: Sequence[TensorSpec], names: Sequence[str], labels: Sequence[str] | None,
                    output: str | None) -> int | None:
    """Index of the output the labels name classes of (Postprocessing.output), or None when none does."""
    if not labels:
        return None
    if output is not None:
        return next((i for i, (s, n) in enumerate(zip(specs, names, strict=True)) if output in (n, s.name)), None)
    return next((i for i, s in enumerate(specs) if s.shape and s.shape[-1] == len(labels)), None)


def label_binding_problem(specs: Sequence[TensorSpec], names: Sequence[str], labels: Sequence[str],
                          output: str | None) -> str | None:
    """Why `labels` cannot name the classes of `output` (or of the default output), or None.

    Used when a bundle is made, so a count that fits no output is refused there, not discovered on a board.
    """
    shown = ", ".join(f"{n} {list(s.shape)}" for n, s in zip(names, specs, strict=True))
    i = labelled_output(specs, names, labels, output)
    if output is not None and i is None:
        return f"the model has no output {output!r}; its outputs: {shown}"
    if i is None:
        return (f"{len(labels)} labels, but no output has {len(labels)} classes in its last dimension "
                f"(outputs: {shown})")
    last = specs[i].shape[-1] if specs[i].shape else 1
    if last not in (-1, len(labels)):
        return f"{len(labels)} labels, but output {names[i]} has {last} classes in its last dimension"
    return None


@dataclass
class InputPlan:
    """How a caller's value becomes this input's tensor (precomputed at activation)."""

    spec: TensorSpec
    dtype: np.dtype[Any]
    rank: int
    label: str = ""
    tail: tuple[int, ...] | None = None  # the dims after the batch dim when none of them is dynamic
    mean: NDArray[Any] | None = None
    std: NDArray[Any] | None = None
    scale: float | None = None
    zero_point: int = 0
    lo: int = 0
    hi: int = 0

    @property
    def dynamic_batch(self) -> bool:
        """Whether the batch dimension is dynamic (-1), so any batch runs in one invoke."""
        return self.rank > 0 and self.spec.shape[0] == -1


def plan_input(spec: TensorSpec, deployment: Deployment) -> InputPlan:
    """The plan for one input: its normalisation (when the deployment's fits it) and quantization."""
    dtype: np.dtype[Any] = np.dtype(object) if spec.dtype == "string" else np.dtype(spec.dtype)  # strings: bytes
    tail = tuple(spec.shape[1:])
    plan = InputPlan(spec=spec, dtype=dtype, rank=len(spec.shape), label=short_name(spec.name),
                      tail=None if -1 in tail else tail)
    pre = deployment.model.preprocessing
    if (pre.mean is not None or pre.std is not None) and dtype.kind in "fiu" and (
            dtype.kind == "f" or spec.quantization is not None):
        channels = {len(v) for v in (pre.mean, pre.std) if v is not None}
        last = spec.shape[-1] if spec.shape else 1
        if all(c == 1 or c == last or last == -1 for c in channels):
            plan.mean = np.asarray(pre.mean if pre.mean is not None else (0.0,), dtype=np.float32)
            plan.std = np.asarray(pre.std if pre.std is not None else (1.0,), dtype=np.float32)
        else:
            log.warning("input %s: normalisation over %s channels does not fit shape %s; not applied",
                        plan.label, sorted(channels), list(spec.shape))
    if dtype.kind in "iu":
        info = np.iinfo(dtype.type)
        plan.lo, plan.hi = int(info.min), int(info.max)
        if spec.quantization is not None:
            plan.scale = spec.quantization.scale
            plan.zero_point = spec.quantization.zero_point
    return plan


def prepare(plans: list[InputPlan], aliases: dict[str, int],
            inputs: Sequence[Any] | Mapping[str, Any] | NDArray[Any], max_batch: int, batch_dim: bool) -> tuple[list[NDArray[Any]], int, bool]:
    """The caller's values as model tensors (batch dim first), the batch size, and whether they were native."""
    if not isinstance(inputs, (list, tuple)) and isinstance(inputs, Mapping):
        values: list[Any] = [None] * len(plans)
        for key, value in inputs.items():
            i = aliases.get(key)
            if i is None:
                names = ", ".join(short_name(p.spec.name) for p in plans)
                raise RequestError(f"unknown input {key!r}; the model's inputs: {names}")
            values[i] = value
        missing = [short_name(p.spec.name) for p, v in zip(plans, values, strict=True) if v is None]
        if missing:
            raise RequestError(f"missing input(s): {', '.join(missing)}")
    elif isinstance(inputs, np.ndarray):
        values = [inputs]  # one array: the value of a single-input model
    else:
        values = list(inputs) if not isinstance(inputs, list) else inputs
        if len(values) != len(plans):
            raise RequestError(f"the model takes {len(plans)} input(s), got {len(values)}")
    arrays: list[NDArray[Any]] = []
    native = False
    n: int | None = None
    for plan, value in zip(plans, values, strict=True):
        x, was_native = _convert(plan, value, batch_dim)
        native = native or was_native
        if plan.rank:
            if n is None:
                n = x.shape[0]
            elif x.shape[0] != n:
                raise RequestError(f"inputs disagree on the batch size: {n} and {x.shape[0]}")
        arrays.append(x)
    batch = 1 if n is None else n
    if batch == 0:
        raise RequestError("empty batch: send at least one instance")
    if batch > max_batch:
        raise RequestError(f"batch of {batch} instances is above the limit of {max_batch}", 413)
    return arrays, batch, native


def _convert(plan: InputPlan, value: Any, batch_dim: bool) -> tuple[NDArray[Any], bool]:
    """One caller value as this input's tensor; raise RequestError naming the input when it cannot be."""
    label = plan.label
    if plan.dtype.kind == "O":  # a string input: bytes and text may mix, which np.asarray cannot type
        try:
            x = value if isinstance(value, np.ndarray) else np.array(value, dtype=object)
        except (ValueError, TypeError) as err:
            raise RequestError(f"input {label}: not a rectangular array of strings ({err})") from err
        return _string_tensor(plan, value, x, batch_dim), False
    try:
        x = value if isinstance(value, np.ndarray) else np.asarray(value)
    except (ValueError, TypeError) as err:
        raise RequestError(f"input {label}: not a rectangular array of numbers ({err})") from err
    if x.dtype.kind not in "biuf":
        raise RequestError(f"input {label}: expected numbers, got {_kind_name(x.dtype)}")
    if plan.rank and x.ndim == plan.rank - 1 and not batch_dim:
        x = x[None]  # one instance without its batch dimension
    shape = plan.spec.shape
    if x.ndim != plan.rank or (x.shape[1:] != plan.tail if plan.tail is not None else any(
            e not in (-1, d) for e, d in zip(shape[1:], x.shape[1:], strict=True))):
        raise RequestError(f"input {label}: shape {list(x.shape)} does not fit the model's {list(shape)} "
                           f"(-1 = any size)")
    dt = plan.dtype
    if x.dtype == dt and plan.mean is None:
        return _contiguous(x), dt.kind != "f" and plan.scale is not None  # the model's own values
    if dt.kind == "f":
        if x.dtype.kind == "b":
            raise RequestError(f"input {label}: expected numbers, got booleans")
        with np.errstate(over="ignore", invalid="ignore"):
            y = x.astype(np.float32, copy=False)
        if not np.isfinite(y).all():
            raise RequestError(f"input {label}: values must be finite and within the float32 range")
        if plan.mean is not None:
            y = _normalise(plan, y, label)
        return _contiguous(y, dtype=dt), False
    if dt.kind == "b":
        if x.dtype.kind == "b" or (x.dtype.kind in "iu" and np.isin(x, (0, 1)).all()):
            return _contiguous(x, dtype=dt), False
        raise RequestError(f"input {label}: the model takes booleans, got {_kind_name(x.dtype)}")
    # integer model input
    if x.dtype.kind == "f" and plan.scale is not None:
        y = x.astype(np.float32, copy=False)
        if plan.mean is not None:
            y = _normalise(plan, y, label)
        if not np.isfinite(y).all():
            raise RequestError(f"input {label}: NaN or infinite values cannot be quantized")
        q = y / np.float32(plan.scale)
        q = np.trunc(q + np.copysign(np.float32(0.5), q)) + plan.zero_point  # round half away, as TFLite does
        return _contiguous(np.clip(q, plan.lo, plan.hi).astype(dt)), False
    if x.dtype.kind == "f":
        if not np.array_equal(x, np.rint(x)):
            raise RequestError(f"input {label}: the model takes {dt.name}, got non-integer values")
    elif x.dtype.kind == "b":
        raise RequestError(f"input {label}: the model takes {dt.name}, got booleans")
    if x.size and (x.min() < plan.lo or x.max() > plan.hi):
        raise RequestError(f"input {label}: values outside the {dt.name} range [{plan.lo}, {plan.hi}]")
    # integers from a wider type (JSON numbers) go in as the model's own values; outputs stay friendly
    return _contiguous(x.astype(dt)), False


def _string_tensor(plan: InputPlan, value: Any, x: NDArray[Any], batch_dim: bool) -> NDArray[Any]:
    """A string input's value: text (UTF-8) or bytes (decoded {"b64": ...}), as an array of Python bytes.

    Object arrays keep every byte; numpy's fixed-width bytes type would drop trailing NULs.
    """
    label = plan.label
    if x.dtype.kind not in "USO":
        raise RequestError(f"input {label}: expected strings (or {{\"b64\": ...}} values), got {_kind_name(x.dtype)}")
    flat = x.reshape(-1).tolist() if x.dtype.kind != "O" else list(x.reshape(-1))
    out = np.empty(len(flat), dtype=object)
    for i, v in enumerate(flat):
        if isinstance(v, str):
            out[i] = v.encode("utf-8")
        elif isinstance(v, bytes):
            out[i] = v
        else:
            raise RequestError(f"input {label}: expected strings, got {type(v).__name__} values")
    y = out.reshape(x.shape)
    if plan.rank and y.ndim == plan.rank - 1 and not batch_dim:
        y = y[None]
    if y.ndim != plan.rank or any(e not in (-1, d) for e, d in zip(plan.spec.shape, y.shape, strict=False)):
        raise RequestError(f"input {label}: shape {list(y.shape)} does not fit the model's {list(plan.spec.shape)} "
                           f"(-1 = any size)")
    return y


def _contiguous(x: NDArray[Any], dtype: np.dtype[Any] | None = None) -> NDArray[Any]:
    """`x` in C order (and `dtype`), keeping 0-d arrays 0-d, which np.ascontiguousarray does not."""
    if dtype is not None and x.dtype != dtype:
        return x.astype(dtype, order="C")
    return x if x.flags.c_contiguous else x.copy(order="C")


def _normalise(plan: InputPlan, y: NDArray[Any], label: str) -> NDArray[Any]:
    assert plan.mean is not None and plan.std is not None
    try:
        out: NDArray[Any] = (y - plan.mean) / plan.std
    except ValueError as err:
        raise RequestError(f"input {label}: normalisation with {len(plan.mean)} channel(s) does not fit shape "
                           f"{list(y.shape)}") from err
    return out


def _kind_name(dtype: np.dtype[Any]) -> str:
    return {"U": "strings", "S": "bytes", "O": "mixed or nested values", "b": "booleans",
            "V": "structured records", "c": "complex numbers"}.get(dtype.kind, dtype.name)


def dequantize(y: NDArray[Any], quant: tuple[float, int] | None) -> NDArray[Any]:
    if quant is None:
        return y
    scale, zero_point = quant
    return (y.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)


def beyond_tolerance(a: NDArray[Any], b: NDArray[Any], atol: float, rtol: float) -> NDArray[Any]:
    """Where `a` (the device's output) is farther from `b` (the golden one) than `atol + rtol * |b|`; both
    dequantized to real values. Tolerances are whole quantization steps, and a difference of exactly
    that many steps comes out of a float32 dequantization a rounding error above or below the bound:
    the comparison is made in float64 with a slack of a few float32 epsilons of the values compared
    (for int8 values, about 1e-4 of one step) and a relative 1e-9 of the bound."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    bound = atol + rtol * np.abs(b64)
    rounding = 4 * float(np.finfo(np.float32).eps) * (np.abs(a64) + np.abs(b64))
    return np.abs(a64 - b64) > bound * (1 + 1e-9) + rounding  # type: ignore[no-any-return]


def top_k(scores: NDArray[Any], labels: tuple[str, ...], k: int) -> list[list[dict[str, Any]]]:
    """The k best classes per instance (axis 0), as {label, index, score}; ties keep class order."""
    rows = scores.reshape(scores.shape[0], -1) if scores.ndim else scores.reshape(1, 1)
    k = min(k, rows.shape[1])
    n_labels = len(labels)
    out = []
    for row in rows:
        if row.size <= 64:  # a Python sort of a few values beats numpy's per-call overhead
            values = row.tolist()
            best = sorted(range(len(values)), key=values.__getitem__, reverse=True)[:k]
        else:
            best = np.argsort(-row, kind="stable")[:k].tolist()
            values = row
        out.append([{"label": labels[j] if j < n_labels else None, "index": j, "score": float(values[j])}
                    for j in best])
    return out
