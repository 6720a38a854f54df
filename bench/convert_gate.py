"""Benchmark: does the accuracy gate refuse conversions that are in fact good?

Seed after seed, until 20 conversions are good (at most 40 seeds), scikit-learn's digits are split (stratified, with that seed) into three
disjoint parts: training (60 %: the CNN's fit, and the converter's ``--data``), evaluation (20 %:
the converter's ``--eval-data``, what the gate judges on) and test (20 %: held out from everything).
A small CNN is trained on the training part and converted with the command line, in this process:
``edgectl convert --data train.npz --eval-data eval.npz --prune 0.8 --quantize int8
--max-accuracy-drop 1`` (the conversion of issue 14 whose gate decided by chance). The converted
model's true drop is then measured with LiteRT on the test part, against the float model on the
same samples. A refused conversion is run again with the gate opened (``--max-accuracy-drop 100``;
TensorFlow's op determinism is on, so it is the same model) to measure its drop.

The last lines are ``GATE_FALSE_REJECTS=<n>``: conversions refused by the gate (exit 3) among those
whose held-out drop is under 0.5 points (goal 0), ``GATE_GOOD_CONVERSIONS=<n>`` (how many seeds were
that good) and ``GATE_REFUSED=<n>`` (refusals over all seeds).

Run: ``.venv/bin/python bench/convert_gate.py [--good N] [--max-seeds N] [--json FILE]`` (a few minutes on two
cores).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from convert_digits import held_out  # bench/convert_digits.py, beside this program

from edgefleet.converter.tflite.native import import_tensorflow

GOOD = 20
"""Good conversions (held-out drop under GOOD_DROP_PT) the figure is counted over."""
MAX_SEEDS = 40
EPOCHS = 15
GOOD_DROP_PT = 0.5
LIMIT_PT = 1.0
SHARES = {"test": 0.2, "eval": 0.2}  # the rest, 60 %, is training


def parts(seed: int) -> dict[str, tuple[Any, Any]]:
    """Training, evaluation and test parts of digits, disjoint and stratified, for one seed."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    y = data.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=SHARES["test"], stratify=y, random_state=seed)
    x_train, x_eval, y_train, y_eval = train_test_split(x_rest, y_rest, test_size=SHARES["eval"] / (1 - SHARES["test"]),
                                                        stratify=y_rest, random_state=seed)
    return {"train": (x_train, y_train), "eval": (x_eval, y_eval), "test": (x_test, y_test)}


def train(x: Any, y: Any, seed: int) -> Any:
    """A small digits CNN, trained from `seed`."""
    import keras

    keras.utils.set_random_seed(seed)
    L = keras.layers
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        L.Conv2D(16, 3, padding="same", activation="relu"),
        L.Conv2D(32, 3, padding="same", activation="relu"),
        L.MaxPooling2D(),
        L.Flatten(),
        L.Dense(64, activation="relu"),
        L.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=EPOCHS, verbose=0, shuffle=True)
    return model


def edgectl(*args: object) -> tuple[int, str, str]:
    """`edgectl ARGS` in this process (TensorFlow stays loaded); exit code, stdout, stderr."""
    from edgefleet.converter.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def gate_of(stdout: str) -> dict[str, Any]:
    """The gate's fields from `convert --json` output (read defensively: the report may lack some)."""
    try:
        return dict((json.loads(stdout).get("report") or {}).get("gate") or {})
    except (ValueError, AttributeError):
        return {}


def main() -> int:
    """Train and convert once per seed; count refusals of conversions that are good on held-out data."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--good", type=int, default=GOOD, help=f"good conversions to count over (default {GOOD})")
    ap.add_argument("--max-seeds", type=int, default=MAX_SEEDS, help=f"seeds at most (default {MAX_SEEDS})")
    ap.add_argument("--json", metavar="FILE", help="also write every seed's figures as JSON to FILE")
    args = ap.parse_args()
    started = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = import_tensorflow()
    # A refused conversion is rerun with the gate opened to measure its model: it must be the same model.
    tf.config.experimental.enable_op_determinism()
    import numpy as np

    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-gate-"))
    print(f"digits, seeds until {args.good} good conversions (at most {args.max_seeds}): 60 % train (fit and --data) / 20 % --eval-data / 20 % test, disjoint; "
          f"edgectl convert --prune 0.8 --quantize int8 --max-accuracy-drop {LIMIT_PT:g}")
    header = f"{'seed':>4} {'exit':>4} {'test drop pt':>12} {'eval drop pt':>12}  gate interval (pt)  decision"
    print(header)
    print("-" * len(header))
    for seed in range(args.max_seeds):
        if sum(1 for r in rows if r["test_drop_pt"] < GOOD_DROP_PT) >= args.good:
            break
        p = parts(seed)
        (x_train, y_train), (x_eval, y_eval), (x_test, y_test) = p["train"], p["eval"], p["test"]
        model = train(x_train, y_train, seed)
        float_acc = float((model.predict(x_test, verbose=0).argmax(axis=1) == y_test).mean())
        d = work / f"seed{seed}"
        d.mkdir()
        model.save(d / "digits.keras")
        np.savez(d / "train.npz", x=x_train, y=y_train)
        np.savez(d / "eval.npz", x=x_eval, y=y_eval)
        common = ["convert", d / "digits.keras", "--data", d / "train.npz", "--eval-data", d / "eval.npz",
                  "--prune", "0.8", "--quantize", "int8", "--seed", seed, "--latency-runs", "10", "--json"]
        rc, out, err = edgectl(*common, "-o", d / "bundle", "--max-accuracy-drop", LIMIT_PT)
        gate = gate_of(out)
        bundle = d / "bundle"
        if rc == 3:
            rc_open, out_open, err_open = edgectl(*common, "-o", d / "opened", "--max-accuracy-drop", 100)
            if rc_open != 0:
                problems.append(f"seed {seed}: the rerun with the gate opened failed ({err_open.strip()[-300:]})")
                continue
            if gate_of(out_open).get("value") != gate.get("value"):
                problems.append(f"seed {seed}: the rerun measured {gate_of(out_open).get('value')} points on the "
                                f"evaluation part, the gated run {gate.get('value')}: not the same model")
            bundle = d / "opened"
        elif rc != 0:
            problems.append(f"seed {seed}: edgectl convert exited {rc}: {err.strip()[-300:]}")
            continue
        acc, drop = held_out((bundle / "model.tflite").read_bytes(), x_test, y_test, float_acc)
        interval = gate.get("interval")
        rows.append({"seed": seed, "exit": rc, "refused": rc == 3, "test_drop_pt": drop, "test_accuracy": acc,
                     "float_test_accuracy": float_acc, "eval_drop_pt": gate.get("value"), "interval": interval,
                     "decision": gate.get("decision") or ("pass" if rc == 0 else "refuse")})
        shown = f"[{interval[0]:+.2f}, {interval[1]:+.2f}]" if isinstance(interval, list) and len(interval) == 2 else "-"
        value = gate.get("value")
        print(f"{seed:>4} {rc:>4} {drop:>12.2f} {value if value is None else f'{value:.2f}':>12}  {shown:<18}  "
              f"{rows[-1]['decision']}")
    good = [r for r in rows if r["test_drop_pt"] < GOOD_DROP_PT]
    false_rejects = sum(1 for r in good if r["refused"])
    refused = sum(1 for r in rows if r["refused"])
    seconds = time.perf_counter() - started
    for line in problems:
        print(f"problem: {line}")
    print(f"{len(good)} of {len(rows)} conversions drop less than {GOOD_DROP_PT} points on the test part; "
          f"the gate refused {false_rejects} of those and {refused} in all; run took {seconds:.0f} s")
    complete = not problems and len(good) >= args.good
    print(f"GATE_GOOD_CONVERSIONS={len(good)}")
    print(f"GATE_REFUSED={refused}")
    print(f"GATE_FALSE_REJECTS={false_rejects}" if complete else "GATE_FALSE_REJECTS=none")
    if args.json:
        Path(args.json).write_text(json.dumps({"seeds": len(rows), "limit_pt": LIMIT_PT, "good_drop_pt": GOOD_DROP_PT,
                                               "false_rejects": false_rejects if complete else None,
                                               "refused": refused, "problems": problems, "seconds": round(seconds, 1),
                                               "rows": rows}, indent=1) + "\n")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
