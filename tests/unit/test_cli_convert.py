"""`edgectl convert` end to end (in process), its accuracy gate, and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgefleet.bundle import Bundle, load_golden
from edgefleet.converter.cli import main
from edgefleet.protocol import Keyring, SigningKey, load_public_key
from tests.support.convert_support import (
    WORK,
    bundle_files_absent,
    digits,
    digits_npz,
    elu_model_file,
    tiny_cnn_file,
    tiny_saved_model,
)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run edgectl in this process; return exit code, stdout, stderr."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def keys() -> Path:
    d = WORK / "keys"
    if not d.exists():
        SigningKey.generate().write(d)
    return d


@pytest.fixture(scope="module")
def labels_file() -> Path:
    p = WORK / "labels.txt"
    p.write_text("".join(f"digit {i}\n" for i in range(10)))
    return p


def test_convert_prune_int8_signed_bundle(capsys, tmp_path, keys, labels_file) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bundle"
    rc, stdout, err = run(capsys, "convert", tiny_cnn_file(), "-o", out, "--name", "digits", "--version", "3",
                          "--data", digits_npz(), "--prune", "0.5", "--prune-epochs", "1", "--quantize", "int8",
                          "--labels", labels_file, "--input-mean", "0.5", "--input-std", "0.25", "--key", keys,
                          "--max-accuracy-drop", "5", "--json")
    assert rc == 0, err
    result = json.loads(stdout)
    assert result["written"] and result["version"] == 3
    bundle = Bundle.load(out, Keyring([load_public_key(keys)]))
    spec = bundle.deployment.model
    assert (spec.name, spec.version) == ("digits", 3)
    assert spec.postprocessing.labels == tuple(f"digit {i}" for i in range(10))
    assert spec.preprocessing.mean == (0.5,) and spec.preprocessing.std == (0.25,)
    report = bundle.report
    assert report is not None
    # Bytes on the wire in the report are the chunk payloads the manifest announces.
    assert report["size"]["wire_bytes"] == spec.artifact.wire_size
    assert report["size"]["bytes"] == spec.artifact.size == len(bundle.model)
    assert report["pruning"]["method"] == "fine-tune"
    assert all(layer["reached"] == pytest.approx(0.5, abs=0.01) for layer in report["pruning"]["layers"])
    assert report["quantization"]["mode"] == "int8" and report["gate"]["passed"]
    metrics = spec.metrics
    for key in ("accuracy", "accuracy_drop_pt", "wire_bytes", "latency_p50_ms", "ratio_wire", "sparsity"):
        assert key in metrics, key
    assert all(isinstance(v, (int, float, str, bool)) for v in metrics.values())
    inputs, outputs = load_golden(bundle.golden, 1, 1)
    assert inputs[0].shape == (8, 1, 8, 8, 1) and outputs[0].shape == (8, 1, 10)
    x, _ = digits()
    assert any(np.array_equal(inputs[0][0, 0], s) for s in x)  # golden inputs are real samples


def test_convert_with_progress_and_table(capsys, tmp_path, keys) -> None:  # type: ignore[no-untyped-def]
    """Without --json: progress for fine-tuning and (two) calibration passes, then the report table."""
    out = tmp_path / "bundle"
    rc, stdout, err = run(capsys, "convert", tiny_cnn_file(), "-o", out, "--data", digits_npz(), "--prune", "0.5",
                          "--prune-epochs", "1", "--quantize", "int8", "--key", keys, "--max-accuracy-drop", "5")
    assert rc == 0, err
    assert "int8" in stdout and Bundle.load(out).deployment.model.version == 1


@pytest.mark.parametrize("source", ["h5", "saved_model"])
def test_convert_other_sources(capsys, tmp_path, source) -> None:  # type: ignore[no-untyped-def]
    src = tiny_cnn_file(".h5") if source == "h5" else tiny_saved_model()
    out = tmp_path / "b"
    # tflite-runtime 2.14 cannot load dynamic-range FULLY_CONNECTED v12 (tests/e2e/test_golden.py): LiteRT only
    rc, _, err = run(capsys, "convert", src, "-o", out, "--data", digits_npz(), "--quantize", "dynamic",
                     "--latency-runs", "5", "--interpreters", "litert,litert-no-xnnpack")
    assert rc == 0, err
    bundle = Bundle.load(out)
    assert bundle.report is not None and bundle.report["source"]["kind"] == source
    assert bundle.report["validation"]["accuracy_drop_pt"] <= 2.0


def test_existing_output_needs_force(capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "b"
    args = ["convert", tiny_cnn_file(), "-o", out, "--latency-runs", "5"]
    assert run(capsys, *args)[0] == 0
    first = Bundle.load(out).deployment.deployment_id
    rc, _, err = run(capsys, *args)
    assert rc == 2 and "already exists" in err and "--force" in err
    assert Bundle.load(out).deployment.deployment_id == first
    assert run(capsys, *args, "--force")[0] == 0
    assert Bundle.load(out).deployment.deployment_id != first


def test_without_data_the_bundle_carries_random_golden_inputs(capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "b"
    rc, stdout, _ = run(capsys, "convert", tiny_cnn_file(), "-o", out, "--quantize", "float16", "--latency-runs", "5")
    assert rc == 0 and "not validated" in stdout
    report = Bundle.load(out).report
    assert report is not None and report["validation"] is None and report["gate"]["metric"] == "none"


def test_accuracy_gate_trips_and_writes_nothing(capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "b"
    rc, stdout, err = run(capsys, "convert", tiny_cnn_file(), "-o", out, "--data", digits_npz(),
                          "--prune", "0.9", "--prune-epochs", "0", "--max-accuracy-drop", "0.5", "--json",
                          "--latency-runs", "5")
    assert rc == 3
    result = json.loads(stdout)
    assert result["written"] is False
    assert result["report"]["validation"]["accuracy_drop_pt"] > 0.5
    assert result["report"]["gate"]["passed"] is False
    lines = err.strip().splitlines()
    assert lines[-1].startswith("edgectl: error: accuracy_drop_pt") and "no bundle written" in lines[-1]
    assert "lies wholly above --max-accuracy-drop 0.5" in lines[-1]
    assert result["report"]["gate"]["decision"] == "refuse" and result["report"]["gate"]["interval"][0] > 0.5
    assert bundle_files_absent(out)


def _write(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def _bad_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    x, y = digits()
    garbage = tmp / "garbage.keras"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    wrong_ext = tmp / "model.onnx"
    wrong_ext.write_bytes(b"x")
    bad_npz = tmp / "bad.npz"
    bad_npz.write_bytes(b"not an npz file")
    labels9 = tmp / "labels9.txt"
    labels9.write_text("\n".join(str(i) for i in range(9)))
    src = str(tiny_cnn_file())
    return {
        "missing model": ([str(tmp / "nope.keras")], "no such file"),
        "corrupt model": ([str(garbage)], "cannot load the Keras model"),
        "unknown model kind": ([str(wrong_ext)], "expected a .keras or .h5"),
        "data shape": ([src, "--data", str(_write(tmp / "s.npz", x=x[..., 0], y=y))], "x has shape"),
        "data dtype": ([src, "--data", str(_write(tmp / "d.npz", x=(x * 16).astype(np.uint8), y=y))], "x is uint8"),
        "labels out of range": ([src, "--data", str(_write(tmp / "l.npz", x=x, y=np.where(y == 3, 10, y)))],
                                "label 10 is out of range"),
        "negative label": ([src, "--data", str(_write(tmp / "n.npz", x=x, y=y - 1))], "label -1 is out of range"),
        "float labels": ([src, "--data", str(_write(tmp / "f.npz", x=x, y=y.astype(np.float32)))], "integer class labels"),
        "no x": ([src, "--data", str(_write(tmp / "nox.npz", images=x))], "no array named 'x'"),
        "corrupt data": ([src, "--data", str(bad_npz)], "not a readable .npz"),
        "missing data": ([src, "--data", str(tmp / "missing.npz")], "no such file"),
        "sparsity 1.5": ([src, "--prune", "1.5"], "between 0 and 1"),
        "sparsity 0": ([src, "--prune", "0"], "between 0 and 1"),
        "sparsity text": ([src, "--prune", "lots"], "expected a fraction"),
        "unknown mode": ([src, "--quantize", "int4"], "invalid choice: 'int4'"),
        "bad structure": ([src, "--prune-structure", "4:2"], "0 < M < N"),
        "contradicting structure": ([src, "--prune", "0.8", "--prune-structure", "2:4"], "contradicts"),
        "int8 without data": ([src, "--quantize", "int8"], "needs calibration samples"),
        "int8-full float op": ([str(elu_model_file()), "--quantize", "int8-full", "--data", str(digits_npz())],
                               "ELU"),
        "labels count": ([src, "--labels", str(labels9)], "9 labels, the model has 10"),
        "std zero": ([src, "--input-std", "0"], "must not contain 0"),
        "mean channels": ([src, "--input-mean", "1,2,3"], "one per channel"),
        "version not int": ([src, "--version", "two"], "version must be an integer"),
        "bad name": ([src, "--name", "../evil"], "invalid model name"),
        "missing key": ([src, "--key", str(tmp / "nokey")], "no such file"),
        "data and split files": ([src, "--data", str(digits_npz()), "--validation", str(digits_npz())],
                                 "cannot be combined"),
        "savedmodel pruning": ([str(tiny_saved_model()), "--prune", "0.5"], "needs a Keras model"),
    }


BAD = ["missing model", "corrupt model", "unknown model kind", "data shape", "data dtype", "labels out of range",
       "negative label", "float labels", "no x", "corrupt data", "missing data", "sparsity 1.5", "sparsity 0",
       "sparsity text", "unknown mode", "bad structure", "contradicting structure", "int8 without data",
       "int8-full float op", "labels count", "std zero", "mean channels", "version not int", "bad name",
       "missing key", "data and split files", "savedmodel pruning"]


def test_every_bad_case_is_listed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert sorted(BAD) == sorted(_bad_cases(tmp_path))


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_nothing_written(capsys, tmp_path, case) -> None:  # type: ignore[no-untyped-def]
    args, message = _bad_cases(tmp_path)[case]
    out = tmp_path / "out-bundle"
    rc, stdout, err = run(capsys, "convert", *args, "-o", out)
    assert rc == 2, (case, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgectl: error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err + stdout
    assert bundle_files_absent(out)
