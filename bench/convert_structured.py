"""Benchmark: does structured pruning (``--prune-channels``) make a CNN faster, and what does it cost?

Magnitude pruning leaves every tensor its shape, so the interpreter runs the same dense kernels; only
removing whole filters and units makes an invoke cheaper. This measures that on a CNN large enough
that one int8 invoke takes about a millisecond: scikit-learn's digits upsampled to 64x64 (bilinear),
four 3x3 convolutions (32, 96, 128, 128 filters) each followed by BatchNormalization and ReLU, max
pooling after the last three, Flatten, Dense 64, Dense 10.

Data: digits split once, stratified, into four disjoint parts: training (the model's fit and the
converter's fine-tuning), calibration (the converter's calibration samples), evaluation (what the
converter's gate judges on, like ``--eval-data``) and test (held out from everything; the accuracy
columns are measured there). Every configuration is converted by the converter's pipeline and run
with LiteRT. Latency is the bare interpreter (inputs set once, ``invoke()`` timed; XNNPACK, one
thread) measured in turns for all models in this run (``converter/tflite/latency.py``).

The last lines are ``STRUCTURED_SPEEDUP=<x>``: bare p50 of the int8 model without structured pruning
divided by the bare p50 of the fastest structured-pruned int8 model whose held-out accuracy is at
most 1 point below the float model's (goal >= 1.5), and ``DENSE_INT8_P50_MS=<ms>`` (the baseline's
p50; the model is meant to take at least 1 ms).

Run: ``.venv/bin/python bench/convert_structured.py [--json FILE]`` (a few minutes on two cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from convert_digits import digits_parts, gate_text, held_out  # bench/convert_digits.py, beside this program

from edgefleet.converter.tflite.native import import_tensorflow

SEED = 0
SIZE = 64
WIDTHS = (32, 96, 128, 128)
EPOCHS = 6
FINE_TUNE_EPOCHS = 4
FRACTIONS = (0.5, 0.75)
MAX_DROP_PT = 1.0
GOAL = 1.5
LATENCY_RUNS = 400
LATENCY_ROUNDS = 20


def upsample(x: Any) -> Any:
    """8x8 digits to SIZE x SIZE, bilinear."""
    import numpy as np
    import tensorflow as tf

    return np.asarray(tf.image.resize(x, (SIZE, SIZE), method="bilinear"), dtype=np.float32)


def train(x: Any, y: Any) -> Any:
    """The CNN, trained from a fixed seed."""
    import keras

    keras.utils.set_random_seed(SEED)
    L = keras.layers

    def bn() -> Any:
        # A few hundred steps of training: the default momentum (0.99) would leave the moving
        # statistics near their initial values, and inference far worse than training.
        return L.BatchNormalization(momentum=0.9)

    model = keras.Sequential([
        keras.Input((SIZE, SIZE, 1)),
        L.Conv2D(WIDTHS[0], 3, padding="same", use_bias=False), bn(), L.ReLU(),
        L.Conv2D(WIDTHS[1], 3, padding="same", use_bias=False), bn(), L.ReLU(),
        L.MaxPooling2D(),
        L.Conv2D(WIDTHS[2], 3, padding="same", use_bias=False), bn(), L.ReLU(),
        L.MaxPooling2D(),
        L.Conv2D(WIDTHS[3], 3, padding="same", use_bias=False), bn(), L.ReLU(),
        L.MaxPooling2D(),
        L.Flatten(),
        L.Dense(64, activation="relu"),
        L.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=EPOCHS, verbose=0, shuffle=True)
    return model


def main() -> int:
    """Train, convert with and without structured pruning, time every model in turns, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    args = ap.parse_args()
    started = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import_tensorflow()
    from edgefleet.converter.convert.data import Dataset, Splits
    from edgefleet.converter.convert.load import clone, from_keras
    from edgefleet.converter.convert.pipeline import (
        ConvertOptions,
        finish,
        prepare,
        prune_channels_source,
        prune_source,
    )
    from edgefleet.converter.tflite.info import read_model
    from edgefleet.converter.tflite.latency import compare_latency

    parts = {k: (upsample(x), y) for k, (x, y) in digits_parts(SEED).items()}
    (x_train, y_train), (x_cal, y_cal) = parts["train"], parts["calibration"]
    (x_eval, y_eval), (x_test, y_test) = parts["eval"], parts["test"]
    t = time.perf_counter()
    model = train(x_train, y_train)
    train_s = time.perf_counter() - t
    source = from_keras(model)
    float_test = source.predict(x_test)
    splits = Splits(fine_tune=Dataset(x_train, y_train, "train"), calibration=Dataset(x_cal, y_cal, "calibration"),
                    validation=Dataset(x_eval, y_eval, "evaluation"), held_out=True)
    base = ConvertOptions(calibration_samples=200, latency_runs=20, seed=SEED, prune_epochs=FINE_TUNE_EPOCHS)
    prepared = prepare(source, splits, replace(base, quantize="int8"))

    configs: list[tuple[str, str, float, float, Any]] = []  # name, mode, channels, sparsity, Conversion
    for mode in ("none", "int8"):
        configs.append((f"dense + {mode}", mode, 0.0, 0.0, finish(source, prepared, None, replace(base, quantize=mode))))
    for fraction in FRACTIONS:
        smaller = clone(source)
        options = replace(base, prune_channels=fraction)
        structured = prune_channels_source(smaller, prepared, options)
        for mode in ("none", "int8"):
            conv = finish(smaller, prepared, None, replace(options, quantize=mode), structured=structured)
            configs.append((f"channels {fraction:.0%} + {mode}", mode, fraction, 0.0, conv))
        if fraction == FRACTIONS[0]:
            both = clone(smaller)
            options = replace(options, prune=0.5)
            pruning = prune_source(both, prepared, options)
            conv = finish(both, prepared, pruning, replace(options, quantize="int8"), structured=structured)
            configs.append((f"channels {fraction:.0%} + prune 50 % + int8", "int8", fraction, 0.5, conv))

    latency = compare_latency({name: conv.model for name, _, _, _, conv in configs}, runs=LATENCY_RUNS,
                              rounds=LATENCY_ROUNDS)
    dense_int8 = latency["dense + int8"]["p50_ms"]
    float_acc = float((float_test.argmax(axis=1) == y_test).mean())
    rows = []
    for name, mode, fraction, sparsity, conv in configs:
        info = read_model(conv.model)
        acc, drop = held_out(conv.model, x_test, y_test, float_acc)
        p50 = latency[name]["p50_ms"]
        rows.append({"configuration": name, "mode": mode, "channels": fraction, "sparsity": sparsity,
                     "params": info.params, "macs": info.macs, "bytes": info.size, "wire_bytes": info.wire_size,
                     "accuracy": acc, "accuracy_drop_pt": drop, "gate": gate_text(conv.report),
                     "p50_ms": p50, "p95_ms": latency[name]["p95_ms"], "speedup_vs_int8": dense_int8 / p50})

    print(f"digits upsampled to {SIZE}x{SIZE}: {len(x_train)} train / {len(x_cal)} calibration / {len(x_eval)} "
          f"evaluation / {len(x_test)} test samples (disjoint), seed {SEED}; CNN trained {EPOCHS} epochs in "
          f"{train_s:.0f} s; float Keras accuracy on test {float_acc * 100:.2f} %")
    print(f"baseline: the same CNN without structured pruning, int8, bare p50 {dense_int8:.4f} ms "
          f"(LiteRT, XNNPACK, one thread, {LATENCY_RUNS} invokes in {LATENCY_ROUNDS} turns with every other model)")
    header = (f"{'configuration':<34} {'params':>9} {'MACs':>12} {'wire B':>9} {'test acc':>9} {'drop pt':>8} "
              f"{'p50 ms':>8} {'speedup':>8}  gate on evaluation split")
    print(header)
    print("-" * len(header))
    best, best_name = None, None
    for r in rows:
        print(f"{r['configuration']:<34} {r['params']:>9,} {r['macs']:>12,} {r['wire_bytes']:>9,} "
              f"{r['accuracy'] * 100:>8.2f}% {r['accuracy_drop_pt']:>8.2f} {r['p50_ms']:>8.4f} "
              f"{r['speedup_vs_int8']:>7.2f}x  {r['gate']}")
        qualifies = r["mode"] == "int8" and r["channels"] > 0 and r["accuracy_drop_pt"] <= MAX_DROP_PT
        if qualifies and (best is None or r["speedup_vs_int8"] > best):
            best, best_name = r["speedup_vs_int8"], r["configuration"]
    seconds = time.perf_counter() - started
    print(f"goal: speedup >= {GOAL:g} at a held-out drop <= {MAX_DROP_PT:g} point; best: "
          f"{best_name or 'no structured int8 row within the drop'}; run took {seconds:.0f} s")
    print(f"DENSE_INT8_P50_MS={dense_int8:.4f}")
    print(f"STRUCTURED_SPEEDUP={best:.2f}" if best is not None else "STRUCTURED_SPEEDUP=none")
    if args.json:
        doc = {"seed": SEED, "size": SIZE, "widths": list(WIDTHS), "train": len(x_train), "calibration": len(x_cal),
               "evaluation": len(x_eval), "test": len(x_test), "float_accuracy": float_acc,
               "dense_int8_p50_ms": dense_int8, "max_drop_pt": MAX_DROP_PT, "goal": GOAL,
               "structured_speedup": best, "best": best_name, "seconds": round(seconds, 1), "rows": rows}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
