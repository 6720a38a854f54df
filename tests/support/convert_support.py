"""Tiny Keras models and digits data for the converter tests, built once per test session.

TensorFlow is fine in the pytest process (never together with the tflite-runtime backend); models
stay tiny and are trained for a few epochs on scikit-learn's digits so accuracy means something.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

WORK = Path(tempfile.mkdtemp(prefix="edgefleet-convert-tests-"))
atexit.register(shutil.rmtree, WORK, True)
SEED = 0


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    """Digits as float32 (N, 8, 8, 1) images in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32)[..., None], data.target.astype(np.int64)


@functools.cache
def digits_npz() -> Path:
    """digits as an .npz with x and y."""
    x, y = digits()
    path = WORK / "digits.npz"
    np.savez(path, x=x, y=y)
    return path


def _keras() -> Any:
    from edgefleet.converter.tflite.native import import_tensorflow

    import_tensorflow()
    import keras

    return keras


@functools.cache
def tiny_cnn() -> Any:
    """Conv, depthwise conv, 1x1 conv and two dense layers; about 5 k weights, trained for 5 epochs."""
    keras = _keras()
    keras.utils.set_random_seed(SEED)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.DepthwiseConv2D(3, padding="same", activation="relu"),
        keras.layers.Conv2D(8, 1, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    x, y = digits()
    model.fit(x, y, batch_size=64, epochs=5, verbose=0)
    return model


def fresh_tiny_cnn() -> Any:
    """An independent copy of the trained tiny CNN (pruning changes weights in place)."""
    keras = _keras()
    model = keras.models.clone_model(tiny_cnn())
    model.set_weights(tiny_cnn().get_weights())
    return model


@functools.cache
def tiny_cnn_file(suffix: str = ".keras") -> Path:
    """The tiny CNN saved as .keras or .h5."""
    path = WORK / f"tiny{suffix}"
    tiny_cnn().save(path)
    return path


@functools.cache
def tiny_saved_model() -> Path:
    """The tiny CNN exported as a SavedModel directory."""
    from edgefleet.converter.tflite.native import captured_native_output

    path = WORK / "tiny_saved_model"
    with captured_native_output():  # export prints the signature on stdout
        tiny_cnn().export(str(path))
    return path


@functools.cache
def elu_model_file() -> Path:
    """A model whose ELU activation the int8 converter leaves in float32 (untrained; only converted)."""
    keras = _keras()
    keras.utils.set_random_seed(SEED)
    model = keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(16),
        keras.layers.Activation("elu"), keras.layers.Dense(10, activation="softmax"),
    ])
    path = WORK / "elu.keras"
    model.save(path)
    return path


@functools.cache
def prepared() -> Any:
    """Checked digits splits, the float reference and the float32 baseline of the tiny CNN."""
    from edgefleet.converter.convert.data import Dataset, split
    from edgefleet.converter.convert.load import from_keras
    from edgefleet.converter.convert.pipeline import ConvertOptions, prepare

    x, y = digits()
    splits = split(Dataset(x, y, "digits"), seed=SEED)
    source = from_keras(tiny_cnn())
    return source, prepare(source, splits, ConvertOptions(quantize="int8"))


@functools.cache
def converted(mode: str) -> Any:
    """The tiny CNN converted (unpruned) in `mode`, validated on the digits validation split."""
    from edgefleet.converter.convert.pipeline import ConvertOptions, finish

    source, prep = prepared()
    return finish(source, prep, None, ConvertOptions(quantize=mode, latency_runs=20))


def bundle_files_absent(out: Path) -> bool:
    """True when neither the bundle nor a temporary sibling of it exists."""
    return not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())
