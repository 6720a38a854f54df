"""Benchmark: how small the converter makes a digits CNN, and what that costs in accuracy.

scikit-learn's bundled digits (8x8 images, 10 classes) are split once, stratified, with a fixed seed,
into four disjoint parts: training (the CNN's fit, and the converter's fine-tuning when it prunes),
calibration (the converter's calibration samples), evaluation (what the converter's accuracy gate
judges on, as ``--eval-data`` would give it) and test (held out from everything). The converter
produces the model in every quantization mode, unpruned and pruned to 50, 80 and 90 % (fine-tuned
under the polynomial schedule); the accuracy columns are measured with LiteRT on the test part,
against the float Keras model on the same samples, and the gate's verdict and interval on the
evaluation part are printed beside them. The baseline for every ratio is the float32 TFLite
conversion of the same trained model, measured in the same run.

The last line is ``BEST_WIRE_RATIO_AT_0.5PT=<x>``: the largest (float32 TFLite bytes / bytes on the
wire) among configurations whose held-out accuracy drop is at most 0.5 points. Goal: >= 12.

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
from typing import Any

from edgefleet.converter.tflite.native import import_tensorflow

SEED = 0
# Shares of the four disjoint parts (see the module docstring).
SHARES = {"train": 0.5, "calibration": 0.1, "eval": 0.2, "test": 0.2}
EPOCHS = 20
SPARSITIES = (0.5, 0.8, 0.9)
MAX_DROP_PT = 0.5
GOAL = 12.0


def digits_parts(seed: int = SEED) -> dict[str, tuple[Any, Any]]:
    """Digits as float32 images in [0, 1] with a channel axis, in four disjoint stratified parts (SHARES)."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int64)
    parts: dict[str, tuple[Any, Any]] = {}
    left = 1.0
    for name in ("test", "eval", "calibration"):
        x, x_part, y, y_part = train_test_split(x, y, test_size=SHARES[name] / left, stratify=y, random_state=seed)
        parts[name] = (x_part, y_part)
        left -= SHARES[name]
    parts["train"] = (x, y)
    return parts


def held_out(model: bytes, x: Any, y: Any, float_accuracy: float) -> tuple[float, float]:
    """Accuracy of a converted model on samples nothing in the conversion saw (LiteRT, XNNPACK, as the
    agent serves it), and its drop in points against the float model's accuracy on the same samples."""
    import numpy as np

    from edgefleet.converter.convert.evaluate import run_samples
    from edgefleet.converter.tflite.native import captured_native_output
    from edgefleet.runtime import load_model

    with captured_native_output():
        served = load_model(model, "auto", use_xnnpack=True)
    acc = float(np.mean(run_samples(served, x).argmax(axis=1) == y))
    return acc, round((float_accuracy - acc) * 100.0, 4)


def gate_text(report: dict[str, Any]) -> str:
    """The gate's verdict on the evaluation part, with its confidence interval when the report has one."""
    g = report.get("gate") or {}
    if not g:
        return "-"
    decision = g.get("decision") or ("pass" if g.get("passed") else "refuse")
    value = g.get("value")
    text = f"{decision} {g.get('metric', '')}"
    if isinstance(value, (int, float)):
        text += f" {value:+.2f}"
    interval = g.get("interval")
    if isinstance(interval, (list, tuple)) and len(interval) == 2:
        text += f" [{interval[0]:+.2f}, {interval[1]:+.2f}]"
        if g.get("confidence"):
            text += f" ({g['confidence'] * 100:.0f} %)" if g["confidence"] < 1 else f" ({g['confidence']:g} %)"
    return text


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
    from edgefleet.converter.convert.data import Dataset, Splits
    from edgefleet.converter.convert.load import clone, from_keras
    from edgefleet.converter.convert.pipeline import ConvertOptions, finish, prepare, prune_source
    from edgefleet.converter.convert.quantize import MODES

    parts = digits_parts(SEED)
    (x_train, y_train), (x_cal, y_cal) = parts["train"], parts["calibration"]
    (x_eval, y_eval), (x_test, y_test) = parts["eval"], parts["test"]
    model = train(x_train, y_train)
    source = from_keras(model)
    float_acc = float((source.predict(x_test).argmax(axis=1) == y_test).mean())
    splits = Splits(
        fine_tune=Dataset(x_train, y_train, "digits train"),
        calibration=Dataset(x_cal, y_cal, "digits calibration"),
        validation=Dataset(x_eval, y_eval, "digits evaluation"),
        held_out=True,
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

    header = (f"{'configuration':<24} {'disk B':>8} {'wire B':>8} {'f32/wire':>9} {'test acc':>9} "
              f"{'drop pt':>8} {'p50 ms':>8}  {'encoding':<8}  gate on the evaluation part")
    print(f"digits: {len(x_train)} train / {len(x_cal)} calibration / {len(x_eval)} evaluation / {len(x_test)} test "
          f"samples (disjoint, stratified), seed {SEED}; float32 TFLite baseline {float32_bytes} B; "
          "accuracy and drop on the test part")
    print(header)
    print("-" * len(header))
    best = 0.0
    measured = []
    for name, conv in rows:
        size = conv.report["size"]
        acc, drop = held_out(conv.model, x_test, y_test, float_acc)
        measured.append((acc, drop))
        ratio = float32_bytes / size["wire_bytes"]
        if drop <= MAX_DROP_PT:
            best = max(best, ratio)
        print(f"{name:<24} {size['bytes']:>8} {size['wire_bytes']:>8} {ratio:>8.2f}x {acc * 100:>8.2f}% "
              f"{drop:>8.2f} {conv.report['latency']['p50_ms']:>8.4f}  {conv.encoding.chosen:<8}  "
              f"{gate_text(conv.report)}")
    print(f"float Keras accuracy {float_acc * 100:.2f} % on the test part; goal: ratio >= {GOAL:g} at a held-out "
          f"drop <= {MAX_DROP_PT} points; run took {time.perf_counter() - started:.0f} s")
    print(f"BEST_WIRE_RATIO_AT_0.5PT={best:.2f}")
    if args.json:
        _write_json(args.json, rows, setups, measured, float32_bytes, float_acc, best,
                    {"train": len(x_train), "calibration": len(x_cal), "evaluation": len(x_eval), "test": len(x_test)},
                    time.perf_counter() - started)
    return 0


def _write_json(path: str, rows: list, setups: list, measured: list, float32_bytes: int,  # type: ignore[type-arg]
                float_acc: float, best: float, sizes: dict[str, int], seconds: float) -> None:
    """The printed table as JSON, one object per configuration."""
    out = []
    for (name, conv), (mode, sparsity), (acc, drop) in zip(rows, setups, measured, strict=True):
        size = conv.report["size"]
        val = conv.validation
        out.append({"configuration": name, "mode": mode, "sparsity": sparsity, "bytes": size["bytes"],
                    "wire_bytes": size["wire_bytes"], "ratio": float32_bytes / size["wire_bytes"],
                    "accuracy": acc, "accuracy_drop_pt": drop,
                    "eval_accuracy_drop_pt": val.accuracy_drop_pt if val is not None else None,
                    "gate": gate_text(conv.report), "gate_interval": (conv.report.get("gate") or {}).get("interval"),
                    "p50_ms": conv.report["latency"]["p50_ms"], "encoding": conv.encoding.chosen})
    doc = {"float32_tflite_bytes": float32_bytes, "float_accuracy": float_acc, **sizes,
           "seed": SEED, "max_drop_pt": MAX_DROP_PT, "goal": GOAL, "best_wire_ratio": best,
           "seconds": round(seconds, 1), "rows": out}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
