"""Interpreter backends behind one small interface (docs/architecture.md).

`auto` prefers LiteRT, then tflite-runtime, then TensorFlow's own interpreter. TensorFlow is imported
only when that last backend is chosen: the agent never pays for it otherwise.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefleet.errors import RuntimeBackendError
from edgefleet.protocol.documents import Quantization, TensorSpec

log = logging.getLogger(__name__)

BACKENDS = ("litert", "tflite", "tensorflow")
_MODULES = {
    "litert": "ai_edge_litert.interpreter",
    "tflite": "tflite_runtime.interpreter",
    "tensorflow": "tensorflow.lite",
}
_lock = threading.Lock()
_create_lock = threading.Lock()
_loaded: dict[str, Any] = {}


def _module(backend: str) -> Any:
    with _lock:
        if backend not in _loaded:
            if backend == "tensorflow":
                os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
                _loaded[backend] = importlib.import_module("tensorflow").lite
            else:
                _loaded[backend] = importlib.import_module(_MODULES[backend])
        return _loaded[backend]


def resolve_backend(name: str = "auto") -> str:
    """The concrete backend for a config value, importing it; raise RuntimeBackendError if unavailable."""
    if name not in ("auto", *BACKENDS):
        raise RuntimeBackendError(f"unknown backend {name!r}; expected auto, {', '.join(BACKENDS)}")
    candidates = BACKENDS if name == "auto" else (name,)
    problems = []
    for backend in candidates:
        try:
            _module(backend)
            return backend
        except Exception as err:  # an import can fail in many ways (numpy ABI, missing .so)
            problems.append(f"{backend}: {type(err).__name__}: {err}")
    raise RuntimeBackendError("no interpreter backend available (" + "; ".join(problems) + ")")


def _spec(detail: dict[str, Any]) -> TensorSpec:
    shape = detail.get("shape_signature")
    if shape is None or len(shape) == 0:
        shape = detail["shape"]
    scale, zero_point = detail.get("quantization", (0.0, 0))
    quant = Quantization(scale=float(scale), zero_point=int(zero_point)) if scale else None
    return TensorSpec(
        name=str(detail["name"]),
        # TFLite string tensors come as numpy bytes_; the wire calls them "string"
        dtype="string" if np.dtype(detail["dtype"]).kind in "SO" else np.dtype(detail["dtype"]).name,  # type: ignore[arg-type]
        shape=tuple(int(d) for d in shape), quantization=quant,
    )


@dataclass
class LoadedModel:
    """A model loaded in one interpreter. Not thread-safe: callers serialise `run`."""

    backend: str
    interpreter: Any
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        self._in = [d["index"] for d in self.interpreter.get_input_details()]
        self._out = [d["index"] for d in self.interpreter.get_output_details()]
        self._shapes = [tuple(d["shape"]) for d in self.interpreter.get_input_details()]
        self._set = self.interpreter.set_tensor
        self._get = self.interpreter.get_tensor
        self._invoke = self.interpreter.invoke

    def run(self, inputs: Sequence[NDArray[Any]]) -> list[NDArray[Any]]:
        """Invoke once; inputs in signature order with the model's dtypes; outputs are copies."""
        if len(inputs) != len(self._in):
            raise RuntimeBackendError(f"model takes {len(self._in)} inputs, got {len(inputs)}")
        changed = [i for i, x in enumerate(inputs) if x.shape != self._shapes[i]]
        if changed:
            self._resize(changed, [inputs[i].shape for i in changed])
        for index, x in zip(self._in, inputs, strict=True):
            self._set(index, x)
        self._invoke()
        return [self._get(index) for index in self._out]

    def _resize(self, which: list[int], shapes: list[tuple[int, ...]]) -> None:
        """Resize every changed input, then allocate once: a multi-input model planned with inputs of
        different batch sizes fails to allocate (see edgefleet.agent.serving.models)."""
        for i, shape in zip(which, shapes, strict=True):
            expected = self.inputs[i].shape
            if len(shape) != len(expected) or any(e not in (-1, s) for e, s in zip(expected, shape, strict=True)):
                raise RuntimeBackendError(f"input {self.inputs[i].name}: shape {list(shape)} does not fit "
                                          f"{list(expected)}")
        for i, shape in zip(which, shapes, strict=True):
            self.interpreter.resize_tensor_input(self._in[i], list(shape))
        self.interpreter.allocate_tensors()
        self._shapes = [tuple(d["shape"]) for d in self.interpreter.get_input_details()]


def warm_up(interpreter: Any) -> None:
    """Invoke once on zeros in the interpreter's current input shapes, as the serving path does before
    it swaps a model in (the first real request then does not pay for lazy delegate set-up).

    The validation child runs this very function on a freshly loaded interpreter, so a model that
    hangs or crashes on it is refused there, in the child, and never reaches the agent's loop thread.
    Callers serialise access to the interpreter.
    """
    for d in interpreter.get_input_details():
        interpreter.set_tensor(d["index"], np.zeros(d["shape"], dtype=d["dtype"]))
    interpreter.invoke()


def load_model(model: bytes | str | os.PathLike[str], backend: str = "auto", *,
               num_threads: int | None = None, use_xnnpack: bool = True) -> LoadedModel:
    """Load and allocate a TFLite model; raise RuntimeBackendError with the interpreter's reason on failure."""
    name = resolve_backend(backend)
    mod = _module(name)
    kwargs: dict[str, Any] = {"num_threads": num_threads}
    if isinstance(model, bytes):
        kwargs["model_content"] = model
    else:
        kwargs["model_path"] = os.fspath(model)
    if not use_xnnpack:
        kwargs["experimental_op_resolver_type"] = mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        with _create_lock:  # LiteRT's wrapper is not safe to build from several threads at once
            interpreter = mod.Interpreter(**kwargs)
            interpreter.allocate_tensors()
        inputs = tuple(_spec(d) for d in interpreter.get_input_details())
        outputs = tuple(_spec(d) for d in interpreter.get_output_details())
    except Exception as err:  # the interpreters raise ValueError/RuntimeError with the reason
        raise RuntimeBackendError(f"{name} cannot load the model: {_first_line(err)}") from err
    return LoadedModel(name, interpreter, inputs, outputs)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
