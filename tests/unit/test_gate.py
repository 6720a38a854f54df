"""The accuracy gate with stated confidence, agreement checks for unlabelled models, and the one-line messages.

A small digits CNN is trained on a training split only; the converter gets that split as `--data`
and a held-out split as `--eval-data`, so the drop it reports can be checked against the drop
measured here, with LiteRT, on samples neither training nor conversion saw.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.bundle import Bundle
from edgefleet.converter.cli import main
from edgefleet.converter.convert import paired
from edgefleet.converter.convert.evaluate import Validation, compare, gate, invoke_failure
from edgefleet.runtime import load_model
from tests.support.convert_support import WORK, bundle_files_absent, digits

GATE = WORK / "gate"


def run(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    """Run edgectl in this process; return exit code, stdout, stderr."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@functools.cache
def split_digits() -> dict[str, np.ndarray]:
    """A stratified 70/30 split of digits: 1,257 training and 540 held-out samples."""
    from sklearn.model_selection import train_test_split

    x, y = digits()
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


@functools.cache
def cnn_file() -> Path:
    """A small digits CNN trained on the training split only (a few seconds)."""
    from edgefleet.converter.tflite.native import import_tensorflow

    import_tensorflow()
    import keras

    d = split_digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(d["x_train"], d["y_train"], batch_size=32, epochs=8, verbose=0)
    GATE.mkdir(parents=True, exist_ok=True)
    path = GATE / "digits-cnn.keras"
    model.save(path)
    return path


@functools.cache
def float_predictions() -> np.ndarray:
    """The float model's classes on the held-out split."""
    import keras

    model = keras.models.load_model(cnn_file())
    return np.asarray(model.predict(split_digits()["x_test"], verbose=0)).argmax(axis=1)


def npz(name: str, **arrays: np.ndarray) -> Path:
    GATE.mkdir(parents=True, exist_ok=True)
    path = GATE / name
    if not path.exists():
        np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def train_npz() -> Path:
    d = split_digits()
    return npz("train.npz", x=d["x_train"], y=d["y_train"])


def held_out_npz() -> Path:
    d = split_digits()
    return npz("test.npz", x=d["x_test"], y=d["y_test"])


# --- the statistics ---------------------------------------------------------------------------------


def test_exact_mcnemar_is_the_binomial_test_on_discordant_pairs() -> None:
    assert paired.mcnemar_exact_p(6, 0) == pytest.approx(2 / 64)
    assert paired.mcnemar_exact_p(0, 0) == 1.0
    # 3 of 10 at 1/2: P(X <= 3) = (1 + 10 + 45 + 120) / 1024, doubled
    assert paired.mcnemar_exact_p(3, 7) == pytest.approx(2 * 176 / 1024)


def test_clopper_pearson_edges() -> None:
    low, high = paired.clopper_pearson(0, 100)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 100))
    low, high = paired.clopper_pearson(100, 100)
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 100))


def test_restricted_estimate_maximises_the_likelihood() -> None:
    from scipy import optimize

    rng = np.random.default_rng(3)
    for _ in range(100):
        n = int(rng.integers(10, 600))
        b, c = (int(v) for v in rng.integers(0, n // 3 + 1, size=2))
        delta = float(rng.uniform(-0.4, 0.4))
        lo, hi = max(0.0, -delta) + 1e-12, (1 - delta) / 2 - 1e-12

        def nll(t: float, b: int = b, c: int = c, n: int = n, delta: float = delta) -> float:
            return -(b * math.log(max(t + delta, 1e-300)) + c * math.log(max(t, 1e-300))
                     + (n - b - c) * math.log(max(1 - 2 * t - delta, 1e-300)))

        best = optimize.minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12})
        t = paired._restricted_p01(b, c, n, delta)
        assert nll(t) <= best.fun + 1e-6 * abs(best.fun) + 1e-9


def test_drop_interval_keeps_its_coverage_with_few_disagreements() -> None:
    """Simulated evaluations of 540 samples with a handful of disagreements: the 95 % interval must
    contain the true drop at least 94 % of the time (the exact conditional interval, which collapses to
    [0, 0] without disagreements, is the one that does not)."""
    rng = np.random.default_rng(0)
    for p10, p01 in ((0.004, 0.0), (0.01, 0.005), (0.003, 0.003), (0.02, 0.0)):
        draws = rng.multinomial(540, [p10, p01, 1 - p10 - p01], size=600)
        inside = 0
        for b, c, _ in draws:
            low, high = paired.drop_interval(int(b), int(c), 540)
            inside += low <= p10 - p01 + 1e-12 and p10 - p01 - 1e-12 <= high
        assert inside / len(draws) >= 0.94, (p10, p01, inside / len(draws))


def test_no_disagreement_is_not_certainty() -> None:
    low, high = paired.drop_interval(0, 0, 50)
    assert low < -0.05 and high > 0.05  # 50 samples cannot show a drop under 5 points
    low, high = paired.drop_interval(0, 0, 5000)
    assert -0.001 < low < 0 < high < 0.001


def test_samples_to_settle_is_the_smallest_that_settles() -> None:
    b, c, n, limit = 2, 0, 540, 0.01
    needed = paired.samples_to_settle(b, c, n, limit)
    assert needed is not None and needed > n

    def settled(size: int) -> bool:
        low, high = paired.drop_interval(b * size / n, c * size / n, size)
        return low > limit or high <= limit

    assert settled(needed) and not settled(needed - 2)
    assert paired.samples_to_settle(1, 1, 540, 0.0) is None  # the estimate sits on the limit


def _validation(b: int, c: int, n: int) -> Validation:
    """A labelled evaluation with `b` samples right only in float and `c` right only converted."""
    y = np.zeros(n, dtype=np.int64)
    ref = np.zeros((n, 2), np.float32)
    conv = np.zeros((n, 2), np.float32)
    ref[:, 0] = conv[:, 0] = 1.0
    ref[:c, :] = [0, 1]  # float wrong, converted right
    conv[c:c + b, :] = [0, 1]  # float right, converted wrong
    return compare(ref, conv, y)


def test_gate_rule_refuse_warn_pass() -> None:
    refused = gate(_validation(13, 0, 540), 1.0)
    assert refused.decision == "refuse" and not refused.passed and refused.interval is not None
    assert refused.interval[0] > 1.0 and refused.discordant == {"float_only_correct": 13, "converted_only_correct": 0}
    assert "lies wholly above --max-accuracy-drop 1" in refused.reason

    straddling = gate(_validation(6, 0, 269), 1.0)  # the 2.23 points on 269 samples
    assert straddling.decision == "warn" and straddling.passed
    assert straddling.interval is not None and straddling.interval[0] < 1.0 < straddling.interval[1]
    assert straddling.settle_samples is not None and straddling.settle_samples > 269
    assert f"about {straddling.settle_samples} evaluation samples" in straddling.reason

    strict = gate(_validation(6, 0, 269), 1.0, refuse_uncertain=True)
    assert strict.decision == "refuse" and not strict.passed and strict.reason.endswith("(--refuse-uncertain)")
    assert gate(_validation(1, 1, 540), 1.0, refuse_uncertain=True).decision == "pass"

    passed = gate(_validation(1, 1, 540), 1.0)
    assert passed.decision == "pass" and passed.interval is not None and passed.interval[1] <= 1.0
    assert passed.mcnemar_p == 1.0 and passed.method is not None and "McNemar" in passed.method


def test_agreement_figures_of_an_unlabelled_output() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(200, 16)).astype(np.float32)
    noisy = ref + rng.normal(scale=0.01, size=ref.shape).astype(np.float32)
    v = compare(ref, noisy, None, "embedding")
    out = v.outputs[0]
    assert out["name"] == "embedding" and 35 < out["sqnr_db"] < 45  # signal 1, noise 1e-4: 40 dB
    assert out["cosine_min"] > 0.99 and out["top1_agreement"] > 0.9
    assert out["max_abs_error"] == pytest.approx(float(np.abs(ref - noisy).max()), rel=1e-6)
    assert gate(v, 1.0, min_sqnr_db=30).decision == "warn" or gate(v, 1.0, min_sqnr_db=30).passed
    strict = gate(v, 100.0, min_sqnr_db=50)
    assert strict.decision == "refuse" and strict.metric == "sqnr_db" and "--min-sqnr-db 50" in strict.reason
    agreeing = gate(v, 100.0, min_top1_agreement=50.0)
    assert agreeing.decision == "pass" and agreeing.checks[0].metric == "top1_agreement_pct"


# --- the converter, end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def held_out_bundle() -> Path:
    """int8 conversion with --data from the training split and --eval-data from the held-out split."""
    out = GATE / "held-out-bundle"
    if not out.exists():
        assert main([str(a) for a in ("convert", cnn_file(), "-o", out, "--data", train_npz(),
                                      "--eval-data", held_out_npz(), "--quantize", "int8",
                                      "--max-accuracy-drop", "1", "--latency-runs", "5", "--json")]) == 0
    return out


def test_held_out_conversion_passes_and_reports_the_true_drop(held_out_bundle: Path) -> None:
    bundle = Bundle.load(held_out_bundle)
    report = bundle.report
    assert report is not None
    d = split_digits()
    # The drop measured here, on the held-out split, with LiteRT as the agent serves the model.
    model = load_model(bundle.model, "auto", use_xnnpack=True)
    converted = np.array([model.run([d["x_test"][i:i + 1]])[0][0].argmax() for i in range(len(d["x_test"]))])
    true_drop = (np.mean(float_predictions() == d["y_test"]) - np.mean(converted == d["y_test"])) * 100
    assert abs(true_drop) < 0.5  # well under the 1-point limit
    val, g = report["validation"], report["gate"]
    assert val["samples"] == len(d["x_test"]) == g["samples"]
    assert val["accuracy_drop_pt"] == pytest.approx(true_drop, abs=1e-4)
    low, high = val["accuracy_drop_interval_pt"]
    assert low <= val["accuracy_drop_pt"] <= high and high - low < 3.0
    assert g["decision"] in ("pass", "warn") and g["passed"] and g["limit"] == 1.0
    assert g["interval"] == [low, high] and "Tango" in g["method"]
    assert set(g["discordant"]) == {"float_only_correct", "converted_only_correct"}
    b, c = g["discordant"]["float_only_correct"], g["discordant"]["converted_only_correct"]
    assert val["accuracy_drop_pt"] == pytest.approx((b - c) / val["samples"] * 100, abs=1e-4)
    assert report["evaluation"]["held_out"] is True and report["evaluation"]["overlap"] == 0
    assert report["data"]["validation"] == len(d["x_test"])
    assert report["data"]["fine_tune"] + report["data"]["calibration"] == len(d["x_train"])
    assert not any("trained on" in w or "100 %" in w for w in report["warnings"])
    metrics = bundle.deployment.model.metrics
    assert metrics["accuracy_drop_low_pt"] == low and metrics["accuracy_drop_high_pt"] == high
    assert metrics["gate_decision"] == g["decision"] and metrics["eval_held_out"] is True


def test_inspect_and_diff_show_the_gate(capsys: pytest.CaptureFixture[str], held_out_bundle: Path) -> None:
    rc, out, err = run(capsys, "inspect", held_out_bundle, "--json")
    assert rc == 0, err
    shown = json.loads(out)
    metrics = shown["manifest"]["metrics"]
    assert shown["report"]["gate"]["interval"] == [metrics["accuracy_drop_low_pt"], metrics["accuracy_drop_high_pt"]]
    assert metrics["float_only_correct"] + metrics["converted_only_correct"] >= 0 and metrics["mcnemar_p"] <= 1.0
    rc, out, err = run(capsys, "inspect", held_out_bundle)
    assert rc == 0, err
    assert "paired drop" in out and "95 % CI" in out and "accuracy gate" in out and "held out" in out
    rc, out, err = run(capsys, "diff", held_out_bundle, held_out_bundle, "--json")
    assert rc == 0, err
    rows = {r["field"]: r for r in json.loads(out)["rows"]}
    assert rows["accuracy drop 95 % CI"]["a"].endswith("points")
    assert rows["gate"]["a"].startswith(("pass:", "warn:")) and "accuracy_drop_pt" in rows["gate"]["a"]
    assert rows["evaluation held out"]["a"] is True and "Tango" in rows["gate method"]["a"]
    assert rows["right only in float / only converted"]["a"] == "{} / {}".format(
        int(metrics["float_only_correct"]), int(metrics["converted_only_correct"]))


def test_damaged_calibration_is_refused_with_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    """Calibration data scaled x255 (a forgotten / 255) wrecks the int8 ranges: the gate must refuse."""
    d = split_digits()
    damaged = npz("damaged-calibration.npz", x=d["x_train"][:300] * 255.0)
    out = GATE / "damaged"
    rc, stdout, err = run(capsys, "convert", cnn_file(), "-o", out, "--calibration", damaged,
                          "--eval-data", held_out_npz(), "--quantize", "int8", "--max-accuracy-drop", "1",
                          "--latency-runs", "5", "--json")
    assert rc == 3, err
    report = json.loads(stdout)["report"]
    g = report["gate"]
    assert g["decision"] == "refuse" and not g["passed"] and g["interval"][0] > 1.0
    assert report["validation"]["accuracy_drop_pt"] > 20
    last = err.strip().splitlines()[-1]
    assert last.startswith("edgectl: error: accuracy_drop_pt") and "lies wholly above --max-accuracy-drop 1" in last
    assert "no bundle written" in last
    assert bundle_files_absent(out)


def test_training_data_as_evaluation_warns(capsys: pytest.CaptureFixture[str]) -> None:
    """Evaluating on training samples the float model gets right: both the 100 % and the overlap warnings."""
    import keras

    d = split_digits()
    model = keras.models.load_model(cnn_file())
    right = np.asarray(model.predict(d["x_train"], verbose=0)).argmax(axis=1) == d["y_train"]
    seen = npz("seen.npz", x=d["x_train"][right][:200], y=d["y_train"][right][:200])
    out = GATE / "seen-bundle"
    rc, stdout, err = run(capsys, "convert", cnn_file(), "-o", out, "--data", train_npz(), "--eval-data", seen,
                          "--latency-runs", "5", "--json")
    assert rc == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("edgectl: warning: ")]
    assert any("scores 100 % on the 200 evaluation samples" in w for w in warnings), err
    assert any("200 of the 200 evaluation samples also appear in the fine-tuning or calibration data" in w
               for w in warnings), err
    evaluation = json.loads(stdout)["report"]["evaluation"]
    assert evaluation == {"source": f"--eval-data {seen}", "samples": 200, "held_out": False, "overlap": 200,
                          "float_perfect": True}


def test_without_eval_data_the_split_is_flagged(capsys: pytest.CaptureFixture[str]) -> None:
    out = GATE / "split-bundle"
    rc, stdout, err = run(capsys, "convert", cnn_file(), "-o", out, "--data", train_npz(), "--latency-runs", "5",
                          "--json")
    assert rc == 0, err
    assert "edgectl: warning: the gate judges on --data" in err and "pass held-out samples with --eval-data" in err
    report = json.loads(stdout)["report"]
    assert report["evaluation"]["held_out"] is False and report["evaluation"]["overlap"] == 0
    assert any("may have been trained on" in w for w in report["warnings"])


def test_a_straddling_interval_passes_with_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    out = GATE / "straddle-bundle"
    rc, stdout, err = run(capsys, "convert", cnn_file(), "-o", out, "--data", train_npz(), "--eval-data", held_out_npz(),
                          "--max-accuracy-drop", "0.1", "--latency-runs", "5", "--json")
    assert rc == 0, err
    g = json.loads(stdout)["report"]["gate"]
    assert g["decision"] == "warn" and g["interval"][0] <= 0.1 < g["interval"][1]
    line = next(ln for ln in err.splitlines() if "straddles --max-accuracy-drop 0.1" in ln)
    assert line.startswith("edgectl: warning: gate: ") and "would" in line and "settle it" in line
    assert Bundle.load(out).deployment.model.metrics["gate_decision"] == "warn"


def test_unlabelled_classifier_and_agreement_flags(capsys: pytest.CaptureFixture[str]) -> None:
    d = split_digits()
    unlabelled = npz("unlabelled.npz", x=d["x_test"])
    calibration = npz("calibration-x.npz", x=d["x_train"][:200])
    out = GATE / "unlabelled-bundle"
    common = ["convert", cnn_file(), "--calibration", calibration, "--eval-data", unlabelled, "--quantize", "int8",
              "--latency-runs", "5", "--json"]
    rc, stdout, err = run(capsys, *common, "-o", out, "--min-top1-agreement", "90", "--min-sqnr-db", "10")
    assert rc == 0, err
    report = json.loads(stdout)["report"]
    out0 = report["validation"]["outputs"][0]
    assert out0["sqnr_db"] > 10 and 0.9 < out0["cosine_min"] <= 1.0 + 1e-6 and out0["top1_agreement"] > 0.9
    assert {c["metric"] for c in report["gate"]["checks"]} == {"top1_agreement_pct", "sqnr_db"}
    assert report["validation"]["float_accuracy"] is None
    rc, stdout, err = run(capsys, *common, "-o", GATE / "unlabelled-strict", "--min-sqnr-db", "90")
    assert rc == 3
    assert err.strip().splitlines()[-1].startswith("edgectl: error: ") and "is below --min-sqnr-db 90" in err
    rc, stdout, err = run(capsys, *common, "-o", GATE / "unlabelled-default")
    assert rc == 0, err
    g = json.loads(stdout)["report"]["gate"]
    assert g["metric"] == "top1_disagreement_pt" and g["interval"][0] <= g["value"] <= g["interval"][1]


def test_regressor_is_judged_by_sqnr(capsys: pytest.CaptureFixture[str]) -> None:
    import keras

    d = split_digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(d["x_train"], d["y_train"].astype(np.float32), epochs=3, verbose=0)
    path = GATE / "regressor.keras"
    model.save(path)
    common = ["convert", path, "--calibration", npz("calibration-x.npz", x=d["x_train"][:200]),
              "--eval-data", npz("unlabelled.npz", x=d["x_test"]), "--quantize", "int8", "--latency-runs", "5",
              "--json"]
    rc, stdout, err = run(capsys, *common, "-o", GATE / "regressor-ok", "--min-sqnr-db", "15")
    assert rc == 0, err
    report = json.loads(stdout)["report"]
    assert report["gate"]["metric"] == "sqnr_db" and report["gate"]["decision"] == "pass"
    assert report["validation"]["outputs"][0]["top1_agreement"] is None
    rc, _, err = run(capsys, *common, "-o", GATE / "regressor-strict", "--min-sqnr-db", "80")
    assert rc == 3 and "is below --min-sqnr-db 80" in err.strip().splitlines()[-1]


# --- several outputs: each one judged against its float counterpart -----------------------------------


@functools.cache
def two_output_file(same_shape: bool) -> Path:
    """Untrained (a seed is enough for agreement) two-output model: softmax classes, and an exponential
    head whose heavy-tailed values int8 keeps about 10 dB worse than the softmax's."""
    from edgefleet.converter.tflite.native import import_tensorflow

    import_tensorflow()
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Dense(16, activation="relu")(keras.layers.Flatten()(inp))
    classes = keras.layers.Dense(10, activation="softmax", name="classes")(h)
    head = keras.layers.Dense(10 if same_shape else 3, activation="exponential", name="size")
    size = head(h)
    kernel, bias = head.get_weights()
    head.set_weights([kernel * 3.0, bias])
    model = keras.Model(inp, [classes, size])
    GATE.mkdir(parents=True, exist_ok=True)
    path = GATE / f"two-outputs-{'same' if same_shape else 'different'}.keras"
    model.save(path)
    return path


def _converted_against_float(bundle_dir: Path, model_file: Path, x: np.ndarray) -> np.ndarray:
    """Relative squared error of every converted output (columns) against every float output (rows)."""
    import keras

    float_outs = keras.models.load_model(model_file).predict(x, verbose=0)
    served = load_model(Bundle.load(bundle_dir).model, "auto", use_xnnpack=True)
    converted = [np.stack(ys) for ys in zip(*(served.run([x[i:i + 1]]) for i in range(len(x))), strict=True)]
    errors = np.full((len(float_outs), len(converted)), np.inf)
    for i, f in enumerate(float_outs):
        for j, c in enumerate(converted):
            if c.shape[1:] == (1, *f.shape[1:]):
                errors[i, j] = float(np.sum((c[:, 0] - f) ** 2) / np.sum(f ** 2))
    return errors


@pytest.mark.parametrize("same_shape", [False, True], ids=["different-shapes", "same-shape"])
def test_every_output_is_judged(capsys: pytest.CaptureFixture[str], same_shape: bool) -> None:
    d = split_digits()
    path = two_output_file(same_shape)
    common = ["convert", path, "--data", npz("multi-x.npz", x=d["x_train"][:400]), "--quantize", "int8",
              "--max-accuracy-drop", "50", "--latency-runs", "2", "--interpreters", "none", "--json"]
    out = GATE / f"two-outputs-{same_shape}"
    rc, stdout, err = run(capsys, *common, "-o", out)
    assert rc == 0, err
    report = json.loads(stdout)["report"]
    outputs = report["validation"]["outputs"]
    assert [o["name"] for o in outputs] == ["classes", "size"] and [o["float_index"] for o in outputs] == [0, 1]
    assert {o["tflite_index"] for o in outputs} == {0, 1} and all(o["matched_by"] == "name" for o in outputs)
    # The pairing is the one the converted model computes: each float output is closest to its partner.
    errors = _converted_against_float(out, path, d["x_train"][:40])
    for o in outputs:
        assert int(np.argmin(errors[o["float_index"]])) == o["tflite_index"], errors
    classes, size = outputs
    assert classes["top1_agreement"] is not None and classes["cosine_min"] > 0.99
    assert size["sqnr_db"] < classes["sqnr_db"] - 3  # the heavy-tailed head is the worse one
    assert report["validation"]["top1_agreement"] == classes["top1_agreement"]  # the first output's, as before
    metrics = Bundle.load(out).deployment.model.metrics
    assert metrics["sqnr_db"] == classes["sqnr_db"] and metrics["output.size.sqnr_db"] == size["sqnr_db"]
    assert metrics["output.classes.served_as"] == classes["tflite_name"]

    rc, shown, err = run(capsys, "inspect", out)
    assert rc == 0, err
    assert "agreement classes" in shown and "agreement size" in shown and "served as output_1" in shown
    rc, shown, err = run(capsys, "diff", out, out, "--latency-runs", "0", "--json")
    assert rc == 0, err
    rows = {r["field"]: r for r in json.loads(shown)["rows"]}
    assert rows["agreement size"]["a"].startswith(f"SQNR {size['sqnr_db']:.1f} dB")

    limit = round((size["sqnr_db"] + classes["sqnr_db"]) / 2, 1)  # above the head, below the softmax
    rc, stdout, err = run(capsys, *common, "-o", GATE / f"two-outputs-strict-{same_shape}", "--min-sqnr-db", limit)
    assert rc == 3, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("edgectl: error: size: SQNR ") and f"is below --min-sqnr-db {limit:g}" in last
    checks = json.loads(stdout)["report"]["gate"]["checks"]
    assert [(c["output"], c["decision"]) for c in checks if c["metric"] == "sqnr_db"] == [
        ("classes", "pass"), ("size", "refuse")]
    assert bundle_files_absent(GATE / f"two-outputs-strict-{same_shape}")


def test_outputs_are_matched_by_name_shape_then_least_error() -> None:
    from edgefleet.converter.convert.evaluate import match_outputs
    from edgefleet.errors import UsageError

    rng = np.random.default_rng(0)
    refs = [rng.normal(size=(50, 4)).astype(np.float32) for _ in range(3)] + [rng.normal(size=(50, 7))]
    noisy = [r + rng.normal(scale=0.01, size=r.shape) for r in refs]
    order = [3, 2, 0, 1]  # the converted model lists them in another order, names unrelated
    converted = [noisy[i] for i in order]
    unnamed = [(f"t{j}",) for j in range(4)]
    matches = match_outputs([("a",), ("b",), ("c",), ("d",)], refs, unnamed, converted)
    assert [(m.name, m.tflite_index, m.matched_by) for m in matches] == [
        ("a", 2, "error"), ("b", 3, "error"), ("c", 1, "error"), ("d", 0, "shape")]
    named = match_outputs([("a", "output_0"), ("b", "output_1"), ("c", "output_2"), ("d", "output_3")], refs,
                          [("output_3",), ("output_2",), ("output_0",), ("output_1",)], converted)
    assert [(m.tflite_index, m.tflite_name, m.matched_by) for m in named] == [
        (2, "output_0", "name"), (3, "output_1", "name"), (1, "output_2", "name"), (0, "output_3", "name")]
    with pytest.raises(UsageError, match="output d .*has no counterpart"):
        match_outputs([("a",), ("b",), ("c",), ("d",)], refs, unnamed, [*converted[1:], converted[1]])
    with pytest.raises(UsageError, match="has 3 outputs and the float model 4"):
        match_outputs([("a",), ("b",), ("c",), ("d",)], refs, unnamed[:3], converted[:3])


@pytest.mark.parametrize("args, message", [
    (["--min-top1-agreement", "101"], "--min-top1-agreement: expected a percentage between 0 and 100"),
    (["--min-sqnr-db", "nan"], "--min-sqnr-db: expected a finite number"),
    (["--eval-data", "MISSING"], "--eval-data"),
    (["--eval-data", "TEST", "--validation", "TEST"], "--eval-data and --validation both name"),
])
def test_gate_options_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str],
                                message: str) -> None:
    args = [str(held_out_npz()) if a == "TEST" else str(tmp_path / "missing.npz") if a == "MISSING" else a for a in args]
    out = tmp_path / "b"
    rc, _, err = run(capsys, "convert", cnn_file(), "-o", out, *args)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgectl: error: ") and message in lines[0], err
    assert bundle_files_absent(out)


# --- the one-line messages --------------------------------------------------------------------------


@functools.cache
def pruned_int8_models() -> tuple[bytes, bytes]:
    """The CNN pruned one-shot to 90 % and converted to int8, dense and with sparse encoding."""
    import keras

    from edgefleet.converter.convert.load import from_keras
    from edgefleet.converter.convert.prune import PruneConfig, prune
    from edgefleet.converter.convert.quantize import convert_tflite

    model = keras.models.load_model(cnn_file())
    prune(model, PruneConfig(0.9))
    source = from_keras(model)
    calibration = split_digits()["x_train"][:100]
    return convert_tflite(source, "int8", calibration), convert_tflite(source, "int8", calibration, sparse=True)


def test_package_reports_a_delegate_failure_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _, sparse = pruned_int8_models()
    path = tmp_path / "sparse-int8.tflite"
    path.write_bytes(sparse)
    try:
        load_model(sparse, "auto", use_xnnpack=True).run([split_digits()["x_test"][:1]])
    except RuntimeError as err:
        assert "failed to delegate" in str(err)
    else:
        pytest.skip("this LiteRT delegates int8 sparse FULLY_CONNECTED to XNNPACK: nothing fails")
    out = tmp_path / "b"
    rc, stdout, err = run(capsys, "package", path, "-o", out, "--name", "m", "--version", "1")
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"edgectl: error: {path}: the XNNPACK delegate fails on FULLY_CONNECTED (node ")
    assert "--no-sparse-encoding" in lines[0] and "Traceback" not in err + stdout
    assert bundle_files_absent(out)


def test_invoke_failure_lines() -> None:
    err = RuntimeError("failed to delegate FULLY_CONNECTED node #13Node number 19 (TfLiteXNNPackDelegate) "
                       "failed to prepare.")
    assert "use_xnnpack = false" in invoke_failure(err, sparse_encoded=False)
    assert "FULLY_CONNECTED (node 13)" in invoke_failure(err, sparse_encoded=True)
    assert invoke_failure(RuntimeError("boom\nmore"), sparse_encoded=False) == "the model fails at invoke: boom more"


@pytest.mark.parametrize("command", ["inspect", "package"])
def test_truncated_tflite_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str) -> None:
    dense, _ = pruned_int8_models()
    path = tmp_path / "model.tflite"
    path.write_bytes(dense[:len(dense) // 3])
    extra = ["-o", tmp_path / "b", "--name", "m", "--version", "1"] if command == "package" else []
    rc, stdout, err = run(capsys, command, path, *extra)
    assert rc == 2
    assert err.strip() == f"edgectl: error: {path}: truncated or not a TFLite flatbuffer ({len(dense) // 3} bytes)"


def test_no_sparse_encoding_on_a_pruned_model_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    out = GATE / "no-sparse"
    rc, stdout, err = run(capsys, "convert", cnn_file(), "-o", out, "--prune", "0.9", "--prune-epochs", "0",
                          "--no-sparse-encoding", "--latency-runs", "5", "--json")
    assert rc == 0, err
    encoding = json.loads(stdout)["report"]["encoding"]
    assert encoding["chosen"] == "dense" and encoding["reason"] == "sparse encoding switched off (--no-sparse-encoding)"


def test_keygen_onto_an_existing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "keyfile"
    target.write_text("precious")
    rc, _, err = run(capsys, "keygen", "-o", target)
    assert rc == 2 and err.strip() == (f"edgectl: error: -o {target}: exists and is not a directory; keygen writes "
                                       "edgefleet.key and edgefleet.pub into a directory and never overwrites a file")
    assert target.read_text() == "precious"
    rc, _, err = run(capsys, "keygen", "-o", target / "sub")
    assert rc == 2 and err.strip() == f"edgectl: error: -o {target / 'sub'}: {target} is a file, not a directory"
    assert run(capsys, "keygen", "-o", tmp_path / "keys")[0] == 0
    rc, _, err = run(capsys, "keygen", "-o", tmp_path / "keys")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "refusing to overwrite a key" in err


def test_the_verbose_hint_names_the_flag_that_works(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from edgefleet.converter.commands import keygen

    def broken(args: Any) -> int:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(keygen, "run", broken)
    rc, _, err = run(capsys, "keygen", "-o", tmp_path / "k")
    assert rc == 1 and err.strip() == ("edgectl: error: unexpected RuntimeError: simulated bug "
                                       "(run with -v for the traceback)")
    rc, _, err = run(capsys, "-v", "keygen", "-o", tmp_path / "k")
    assert rc == 1 and "Traceback (most recent call last)" in err and "simulated bug" in err
