"""Benchmark: how small the converter makes a digits CNN, and what that costs in accuracy.

scikit-learn's bundled digits (8x8 images, 10 classes) are split once, stratified, with a fixed seed;
a small CNN is trained on the training part; the converter then produces the model in every
quantization mode, unpruned and pruned to 50, 80 and 90 % (fine-tuned under the polynomial schedule),
and validates each on the held-out part with LiteRT. The baseline for every ratio is the float32
TFLite conversion of the same trained model, measured in the same run.

The last line is ``BEST_WIRE_RATIO_AT_0.5PT=<x>``: the largest (float32 TFLite bytes / bytes on the
wire) among configurations whose accuracy drop is at most 0.5 points. Goal: >= 12.

Run: ``.venv/bin/python bench/convert_digits.py [--json FILE]`` (a few minutes on two cores); ``--json``
also writes every row and the baseline as JSON to FILE (bench/run_all.py reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from converter.native import import_tensorflow  # noqa: E402

SEED = 0
TEST_SHARE = 0.3
EPOCHS = 20
SPARSITIES = (0.5, 0.8, 0.9)
MAX_DROP_PT = 0.5
GOAL = 12.0


def digits() -> tuple:  # type: ignore[type-arg]
    """Digits as float32 images in [0, 1] with a channel axis, split stratified with a fixed seed."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int64)
    return train_test_split(x, y, test_size=TEST_SHARE, stratify=y, random_state=SEED)


def train(x, y):  # type: ignore[no-untyped-def]
    """A small CNN, trained from a fixed seed."""
    import keras

    keras.utils.set_random_seed(SEED)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=EPOCHS, verbose=0, shuffle=True)
    return model


def main() -> int:
    """Train, convert every configuration, print the table and the best ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="FILE", help="also write the rows and the baseline as JSON to FILE")
    args = ap.parse_args()
    started = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import_tensorflow()
    from converter.convert import ConvertOptions, finish, prepare, prune_source
    from converter.data import Dataset, Splits
    from converter.load import clone, from_keras
    from converter.quantize import MODES

    x_train, x_test, y_train, y_test = digits()
    model = train(x_train, y_train)
    source = from_keras(model)
    splits = Splits(
        fine_tune=Dataset(x_train, y_train, "digits train"),
        calibration=Dataset(x_train, y_train, "digits train"),
        validation=Dataset(x_test, y_test, "digits test"),
    )
    base = ConvertOptions(calibration_samples=300, latency_runs=300, seed=SEED)
    prepared = prepare(source, splits, replace(base, quantize="int8"))
    float32_bytes = len(prepared.baseline)

    rows = []
    setups = []  # (mode, sparsity) of every row, for --json
    for mode in MODES:
        conv = finish(source, prepared, None, replace(base, quantize=mode))
        rows.append((mode, conv))
        setups.append((mode, 0.0))
    for sparsity in SPARSITIES:
        pruned = clone(source)
        options = replace(base, prune=sparsity)
        pruning = prune_source(pruned, prepared, options)
        for mode in MODES:
            conv = finish(pruned, prepared, pruning, replace(options, quantize=mode))
            rows.append((f"prune {int(sparsity * 100)} % + {mode}", conv))
            setups.append((mode, sparsity))

    header = (f"{'configuration':<24} {'disk B':>8} {'wire B':>8} {'f32/wire':>9} {'accuracy':>9} "
              f"{'drop pt':>8} {'p50 ms':>8}  encoding")
    print(f"digits: {len(x_train)} train / {len(x_test)} test samples, seed {SEED}; "
          f"float32 TFLite baseline {float32_bytes} B")
    print(header)
    print("-" * len(header))
    best = 0.0
    for name, conv in rows:
        size = conv.report["size"]
        val = conv.validation
        assert val is not None and val.accuracy is not None and val.accuracy_drop_pt is not None
        ratio = float32_bytes / size["wire_bytes"]
        if val.accuracy_drop_pt <= MAX_DROP_PT:
            best = max(best, ratio)
        print(f"{name:<24} {size['bytes']:>8} {size['wire_bytes']:>8} {ratio:>8.2f}x {val.accuracy * 100:>8.2f}% "
              f"{val.accuracy_drop_pt:>8.2f} {conv.report['latency']['p50_ms']:>8.4f}  {conv.encoding.chosen}")
    float_acc = rows[0][1].validation.float_accuracy  # type: ignore[union-attr]
    print(f"float Keras accuracy {float_acc * 100:.2f} %; goal: ratio >= {GOAL:g} at a drop <= {MAX_DROP_PT} points; "
          f"run took {time.perf_counter() - started:.0f} s")
    print(f"BEST_WIRE_RATIO_AT_0.5PT={best:.2f}")
    if args.json:
        _write_json(args.json, rows, setups, float32_bytes, float_acc, best, len(x_train), len(x_test),
                    time.perf_counter() - started)
    return 0


def _write_json(path: str, rows: list, setups: list, float32_bytes: int, float_acc: float,  # type: ignore[type-arg]
                best: float, n_train: int, n_test: int, seconds: float) -> None:
    """The printed table as JSON, one object per configuration."""
    out = []
    for (name, conv), (mode, sparsity) in zip(rows, setups, strict=True):
        size, val = conv.report["size"], conv.validation
        out.append({"configuration": name, "mode": mode, "sparsity": sparsity, "bytes": size["bytes"],
                    "wire_bytes": size["wire_bytes"], "ratio": float32_bytes / size["wire_bytes"],
                    "accuracy": val.accuracy, "accuracy_drop_pt": val.accuracy_drop_pt,
                    "p50_ms": conv.report["latency"]["p50_ms"], "encoding": conv.encoding.chosen})
    doc = {"float32_tflite_bytes": float32_bytes, "float_accuracy": float_acc, "train": n_train, "test": n_test,
           "seed": SEED, "max_drop_pt": MAX_DROP_PT, "goal": GOAL, "best_wire_ratio": best,
           "seconds": round(seconds, 1), "rows": out}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
