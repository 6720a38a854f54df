"""Loading the model to convert: a Keras 3 ``.keras`` file, a legacy ``.h5``, or a SavedModel directory.

TensorFlow and Keras are imported on first use, so only ``convert`` (and the benchmark) pay for them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefleet.converter.tflite.native import import_tensorflow
from edgefleet.errors import UsageError
from edgefleet.protocol import TensorSpec

log = logging.getLogger(__name__)

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


@dataclass
class SourceModel:
    """The float model a conversion starts from, with its signature and a way to run it."""

    path: str
    kind: str  # "keras", "h5", "saved_model" or "object" (a model built in this process)
    keras_model: Any | None
    saved_model_dir: Path | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def prunable(self) -> bool:
        """Pruning works on Keras layers only."""
        return self.keras_model is not None

    @property
    def output_names(self) -> tuple[str, ...]:
        """The float model's name for each output, in `outputs` order: the Keras output layer's name
        (its tensor names, `keras_tensor_N`, say nothing), or the SavedModel signature's key."""
        names = getattr(self.keras_model, "output_names", None) if self.keras_model is not None else None
        if names and len(names) == len(self.outputs):
            return tuple(str(n) for n in names)
        return tuple(o.name for o in self.outputs)

    def output_aliases(self) -> tuple[tuple[str, ...], ...]:
        """Every name each output may carry in a TFLite signature converted from this model.

        TFLiteConverter.from_keras_model names a Keras model's outputs `output_0`, `output_1`, ... in
        the model's output order, whatever the layers are called; a SavedModel keeps its signature keys.
        """
        if self.keras_model is None:
            return tuple((n,) for n in self.output_names)
        return tuple((n, f"output_{i}") for i, n in enumerate(self.output_names))

    def predict(self, x: NDArray[Any], batch_size: int = 256) -> NDArray[np.float32]:
        """The float model's first output for a batch of samples."""
        return self.predict_all(x, batch_size)[0]

    def predict_all(self, x: NDArray[Any], batch_size: int = 256) -> list[NDArray[np.float32]]:
        """Every output of the float model for a batch of samples, in `outputs` order."""
        if self.keras_model is not None:
            out = self.keras_model.predict(x, batch_size=batch_size, verbose=0)
            if isinstance(out, dict):  # a model built with a dict of outputs predicts a dict keyed by name
                out = [out[n] for n in self.output_names] if set(self.output_names) <= set(out) else list(out.values())
            elif not isinstance(out, (list, tuple)):
                out = [out]
            return [np.asarray(o, dtype=np.float32) for o in out]
        import tensorflow as tf

        fn = _signature(self.saved_model_dir)  # type: ignore[arg-type]
        name = self.inputs[0].name
        results: list[list[NDArray[np.float32]]] = [[] for _ in self.outputs]
        for start in range(0, len(x), batch_size):
            out = fn(**{name: tf.constant(x[start:start + batch_size])})
            for j, spec in enumerate(self.outputs):
                results[j].append(np.asarray(out[spec.name], dtype=np.float32))
        return [np.concatenate(r) for r in results]

    def tflite_converter(self) -> Any:
        """A fresh `tf.lite.TFLiteConverter` for this model."""
        import tensorflow as tf

        if self.keras_model is not None:
            return tf.lite.TFLiteConverter.from_keras_model(self.keras_model)
        return tf.lite.TFLiteConverter.from_saved_model(str(self.saved_model_dir))


_signatures: dict[Path, Any] = {}


def _signature(path: Path) -> Any:
    import tensorflow as tf

    if path not in _signatures:
        _signatures[path] = tf.saved_model.load(str(path)).signatures["serving_default"]
    return _signatures[path]


def _dtype(value: Any) -> str:
    name = getattr(value, "name", None) or str(value)
    return str(np.dtype(name).name)


def _keras_spec(tensor: Any, fallback: str) -> TensorSpec:
    shape = tuple(-1 if d is None else int(d) for d in tensor.shape)
    name = getattr(tensor, "name", None) or fallback
    return TensorSpec(name=str(name), dtype=_dtype(tensor.dtype), shape=shape)  # type: ignore[arg-type]


def from_keras(model: Any, path: str = "<in-memory model>", kind: str = "object") -> SourceModel:
    """Wrap a Keras model object."""
    inputs = tuple(_keras_spec(t, f"input_{i}") for i, t in enumerate(model.inputs))
    outputs = tuple(_keras_spec(t, f"output_{i}") for i, t in enumerate(model.outputs))
    return SourceModel(path=path, kind=kind, keras_model=model, saved_model_dir=None, inputs=inputs, outputs=outputs)


def clone(source: SourceModel) -> SourceModel:
    """An independent copy of a Keras source (pruning changes weights in place)."""
    if source.keras_model is None:
        return source
    import keras

    model = keras.models.clone_model(source.keras_model)
    model.set_weights(source.keras_model.get_weights())
    return from_keras(model, source.path, source.kind)


@contextlib.contextmanager
def _quiet_tf() -> Iterator[None]:
    import tensorflow as tf

    level = tf.get_logger().level
    tf.get_logger().setLevel(logging.ERROR)
    try:
        yield
    finally:
        tf.get_logger().setLevel(level)


def load_source(path: str | os.PathLike[str]) -> SourceModel:
    """Load SRC; raise UsageError naming the path when it is missing, of an unknown kind, or unreadable."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file or directory")
    if p.is_dir():
        if not (p / "saved_model.pb").is_file():
            raise UsageError(f"{p}: a directory, but not a SavedModel (no saved_model.pb)")
        return _load_saved_model(p)
    if p.suffix.lower() not in KERAS_SUFFIXES:
        raise UsageError(f"{p}: expected a .keras or .h5 file or a SavedModel directory")
    import_tensorflow()
    import keras

    try:
        with _quiet_tf():
            model = keras.saving.load_model(p, compile=False)
    except Exception as err:  # Keras raises ValueError, OSError, zip and h5 errors for bad files
        raise UsageError(f"{p}: cannot load the Keras model ({_first_line(err)})") from err
    if not getattr(model, "inputs", None):
        raise UsageError(f"{p}: the model has no defined inputs (build it with an Input layer before saving)")
    return from_keras(model, str(p), "h5" if p.suffix.lower() != ".keras" else "keras")


def _load_saved_model(p: Path) -> SourceModel:
    import_tensorflow()
    try:
        with _quiet_tf():
            fn = _signature(p)
    except KeyError as err:
        raise UsageError(f"{p}: the SavedModel has no 'serving_default' signature") from err
    except Exception as err:  # TensorFlow raises many kinds for a damaged SavedModel
        raise UsageError(f"{p}: cannot load the SavedModel ({_first_line(err)})") from err
    specs = fn.structured_input_signature[1]
    inputs = tuple(
        TensorSpec(name=name, dtype=_dtype(s.dtype), shape=tuple(-1 if d is None else int(d) for d in s.shape))  # type: ignore[arg-type]
        for name, s in sorted(specs.items())
    )
    outputs = tuple(
        TensorSpec(name=name, dtype=_dtype(s.dtype), shape=tuple(-1 if d is None else int(d) for d in s.shape))  # type: ignore[arg-type]
        for name, s in sorted(fn.structured_outputs.items())
    )
    return SourceModel(path=str(p), kind="saved_model", keras_model=None, saved_model_dir=p,
                       inputs=inputs, outputs=outputs)


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]
