"""Models for tests/e2e/test_trust_child.py, built with TensorFlow in their own process and cached.

Run as ``python tests/support/trust_models.py OUTDIR``. TensorFlow is imported only here, never in a test
process that loads an interpreter.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[2]


def hang_on_zeros_f32() -> bytes:
    """dense_f32's signature (8 floats in, 4 out); answers any input with a non-zero value at once, but
    on all zeros -- the serving path's warm-up input -- a WHILE loop whose trip count is 1/sum(|x|)
    never ends."""
    import tensorflow as tf

    class Loop(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
        def __call__(self, x):  # type: ignore[no-untyped-def]
            trips = tf.math.divide_no_nan(1.0, tf.reduce_sum(tf.abs(x)))  # 0 for any non-zero input ...
            trips = tf.where(tf.reduce_sum(tf.abs(x)) > 0.0, trips * 0.0, tf.constant(float("inf")))  # ... inf on zeros
            _, y = tf.while_loop(lambda i, y: tf.cast(i, tf.float32) < trips, lambda i, y: (i + 1, y * 1.0),
                                 [tf.constant(0), x])
            return tf.nn.softmax(y[:, :4])

    m = Loop()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([m.__call__.get_concrete_function()], m)
    return bytes(conv.convert())


MODELS = {"hang_on_zeros_f32": hang_on_zeros_f32}


def model(name: str) -> Path:
    """Path of a model, built once per version of this file (in a TensorFlow subprocess)."""
    out = ROOT / ".cache" / "trust" / hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    path = out / f"{name}.tflite"
    if not path.exists():
        subprocess.run([sys.executable, __file__, str(out), name], check=True, timeout=600, cwd=ROOT)
    return path


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for name in argv[1:] or list(MODELS):
        tmp = out / f"{name}.{os.getpid()}.tmp"
        tmp.write_bytes(MODELS[name]())
        tmp.rename(out / f"{name}.tflite")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
