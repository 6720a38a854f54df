"""Tiny models the tests build for themselves, converted to TFLite in a separate process.

Run as ``python -m edgefleet.testing.zoo OUTDIR NAME...``. TensorFlow is imported only here, in its own process,
so test processes that use tflite-runtime never see it (docs/architecture.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _tf() -> Any:
    import tensorflow as tf

    tf.keras.backend.clear_session()  # layer names restart, as in a fresh process: a stable file layout
    tf.keras.utils.set_random_seed(7)
    return tf


def _convert(model, quant: str | None = None, rep=None) -> bytes:  # type: ignore[no-untyped-def]
    tf = _tf()
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if quant == "int8-full":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    return bytes(conv.convert())


def _dense(tf: Any, batch_size: int | None = None) -> Any:
    """8 floats in, a hidden Dense of 16, softmax over 4 classes out (weights from the current seed)."""
    return tf.keras.Sequential([
        tf.keras.Input((8,), batch_size=batch_size), tf.keras.layers.Dense(16, activation="relu"),
        tf.keras.layers.Dense(4, activation="softmax"),
    ])


def dense_f32() -> bytes:
    """8 floats in, softmax over 4 classes out."""
    tf = _tf()
    m = _dense(tf)
    return _convert(m)


def dense_f32_v2() -> bytes:
    """Same signature as dense_f32, different weights."""
    tf = _tf()
    tf.keras.utils.set_random_seed(8)
    m = _dense(tf)
    return _convert(m)


def dense_int8() -> bytes:
    """dense_f32's architecture, fully int8 (integer inputs and outputs)."""
    import numpy as np

    tf = _tf()
    m = _dense(tf)
    rng = np.random.default_rng(0)

    def rep():  # type: ignore[no-untyped-def]
        for _ in range(32):
            yield [rng.normal(size=(1, 8)).astype(np.float32)]

    return _convert(m, "int8-full", rep)


def other_signature() -> bytes:
    """A model whose input shape (1, 5) differs from dense_f32's."""
    tf = _tf()
    m = tf.keras.Sequential([tf.keras.Input((5,)), tf.keras.layers.Dense(4, activation="softmax")])
    return _convert(m)


def slow_f32() -> bytes:
    """dense_f32's signature behind a long stack of wide layers: the same contract, far slower."""
    tf = _tf()
    layers = [tf.keras.Input((8,))]
    layers += [tf.keras.layers.Dense(1024, activation="relu") for _ in range(12)]
    layers += [tf.keras.layers.Dense(4, activation="softmax")]
    return _convert(tf.keras.Sequential(layers))


def dense_f32_batch1() -> bytes:
    """dense_f32's layers with a fixed batch of 1 (input shape (1, 8), no dynamic dimension)."""
    tf = _tf()
    m = _dense(tf, batch_size=1)
    return _convert(m)


def _while_model(grow: bool) -> bytes:
    tf = _tf()

    class Loop(tf.Module):  # type: ignore[misc,name-defined]
        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
        def __call__(self, x):  # type: ignore[no-untyped-def]
            def cond(i, y):  # type: ignore[no-untyped-def]
                return tf.reduce_sum(y) > -1e30

            def body(i, y):  # type: ignore[no-untyped-def]
                return i + 1, (tf.concat([y, y], axis=1) if grow else y * 1.0)

            _, y = tf.while_loop(cond, body, [tf.constant(0), x],
                                 shape_invariants=[tf.TensorShape([]), tf.TensorShape([None, None])])
            return tf.nn.softmax(tf.reshape(y[:, :4], [-1, 4]))

    m = Loop()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([m.__call__.get_concrete_function()], m)
    return bytes(conv.convert())


def hang_f32() -> bytes:
    """dense_f32's signature, but its WHILE loop never ends: invoking it hangs the interpreter."""
    return _while_model(grow=False)


def memhog_f32() -> bytes:
    """dense_f32's signature, but a WHILE loop doubles a tensor forever: it eats all memory it may."""
    return _while_model(grow=True)


def hang_on_big_f32() -> bytes:
    """dense_f32's signature; fine on ordinary inputs, but loops forever when an input value exceeds 100."""
    tf = _tf()

    class Loop(tf.Module):  # type: ignore[misc,name-defined]
        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
        def __call__(self, x):  # type: ignore[no-untyped-def]
            _, y = tf.while_loop(lambda i, y: tf.reduce_max(y) > 100.0, lambda i, y: (i + 1, y * 1.0),
                                 [tf.constant(0), x])
            return tf.nn.softmax(y[:, :4])

    m = Loop()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([m.__call__.get_concrete_function()], m)
    return bytes(conv.convert())


def fails_on_big_f32() -> bytes:
    """dense_f32's signature; an invoke fails (gather index out of bounds) when the first value exceeds 100."""
    tf = _tf()

    class Gather(tf.Module):  # type: ignore[misc,name-defined]
        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
        def __call__(self, x):  # type: ignore[no-untyped-def]
            table = tf.constant([[0.0], [0.0]])
            idx = tf.cast(tf.reduce_max(x[:, :1]) > 100.0, tf.int32) * 1000
            bump = tf.gather(table, idx)
            return tf.nn.softmax(x[:, :4] + bump)

    m = Gather()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([m.__call__.get_concrete_function()], m)
    return bytes(conv.convert())


def _cnn(last_layer_seed: int | None = None) -> bytes:
    tf = _tf()
    m = tf.keras.Sequential([
        tf.keras.Input((28, 28, 1)),
        tf.keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        tf.keras.layers.MaxPooling2D(),
        tf.keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        tf.keras.layers.MaxPooling2D(),
        tf.keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(64, activation="relu"),
        tf.keras.layers.Dense(10, activation="softmax"),
    ])
    import numpy as np

    for layer in m.layers:  # trained-looking biases (freshly initialised ones are all zero)
        if layer.get_weights():
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, np.random.default_rng(3).normal(0, 0.1, bias.shape).astype(np.float32)])
    if last_layer_seed is not None:  # a fine-tune of the last layer only
        kernel, bias = m.layers[-1].get_weights()
        rng = np.random.default_rng(last_layer_seed)
        m.layers[-1].set_weights([kernel + rng.normal(0, 0.05, kernel.shape).astype(np.float32),
                                  bias + rng.normal(0, 0.05, bias.shape).astype(np.float32)])
    return _convert(m)


def cnn_v1() -> bytes:
    """A small CNN (28x28x1 -> 10 classes, about 900 KB of float weights)."""
    return _cnn()


def cnn_v2() -> bytes:
    """cnn_v1 with only its last layer changed, as after a last-layer fine-tune."""
    return _cnn(last_layer_seed=1)


def two_in_two_out() -> bytes:
    """Inputs `a` (3 floats) and `b` (2 floats); outputs `output_0` (1 value) and `output_1` (softmax
    over 3 classes). The TFLite file orders inputs b, a and outputs output_1, output_0, and both outputs
    are named `StatefulPartitionedCall_1:N`: what multi-tensor serving gets wrong first."""
    tf = _tf()
    a = tf.keras.Input((3,), name="a")
    b = tf.keras.Input((2,), name="b")
    h = tf.keras.layers.Dense(8, activation="relu")(tf.keras.layers.Concatenate()([a, b]))
    value = tf.keras.layers.Dense(1, name="value")(h)
    scores = tf.keras.layers.Dense(3, activation="softmax", name="scores")(h)
    return _convert(tf.keras.Model([a, b], [value, scores]))


def regress_f32() -> bytes:
    """8 floats in, one value out per example: the shape TensorFlow Serving's :regress answers for."""
    tf = _tf()
    m = tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.Dense(4, activation="relu"),
                             tf.keras.layers.Dense(1)])
    return _convert(m)


def text_is_cat() -> bytes:
    """A string input `text` (any number of strings) and a float output `is_cat`: 1.0 where the string is
    exactly b"cat". TFLite string tensors are what TensorFlow Serving's {"b64": ...} values feed."""
    tf = _tf()

    class Text(tf.Module):  # type: ignore[misc,name-defined]
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
        def __call__(self, x):  # type: ignore[no-untyped-def]
            return {"is_cat": tf.cast(tf.equal(x, "cat"), tf.float32)}

    m = Text()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([m.__call__.get_concrete_function()], m)
    return bytes(conv.convert())


MODELS = {f.__name__: f for f in (dense_f32, dense_f32_v2, dense_int8, other_signature, slow_f32,
                                  hang_f32, memhog_f32, dense_f32_batch1, hang_on_big_f32, fails_on_big_f32,
                                  cnn_v1, cnn_v2, two_in_two_out, regress_f32, text_is_cat)}


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for name in argv[1:] or list(MODELS):
        target = out / f"{name}.tflite"
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(MODELS[name]())
            tmp.rename(target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
