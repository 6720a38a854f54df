"""Structured pruning (`--prune-channels`): whole filters and units removed, the model rebuilt smaller.

The models are tiny Keras CNNs on scikit-learn's digits; conversions run through the real pipeline
and are validated with LiteRT; MACs and parameters are read back from the TFLite files.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.converter.cli import main
from edgefleet.converter.convert.prune_structured import StructuredConfig, count_params, prune_channels
from edgefleet.converter.tflite.info import read_model
from edgefleet.errors import UsageError
from tests.support.convert_support import (
    WORK,
    bundle_files_absent,
    digits,
    digits_npz,
    fresh_tiny_cnn,
    tiny_cnn_file,
    tiny_saved_model,
)

MODES = ["none", "dynamic", "float16", "int8", "int8-full", "int16x8"]


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _keras() -> Any:
    from edgefleet.converter.tflite.native import import_tensorflow

    import_tensorflow()
    import keras

    return keras


def _channels(model: Any) -> dict[str, int]:
    keras = _keras()
    return {layer.name: int(layer.kernel.shape[-1]) for layer in model.layers
            if type(layer) in (keras.layers.Conv2D, keras.layers.Dense)}


def _zero_half(weights: np.ndarray, axis: int = -1) -> np.ndarray:
    """Zero the odd channels along `axis` (the ones structured pruning must then find and remove)."""
    w = np.array(weights)
    index = [slice(None)] * w.ndim
    index[axis] = slice(1, None, 2)
    w[tuple(index)] = 0.0
    return w


def test_removing_dead_channels_leaves_the_outputs_unchanged() -> None:
    """Half of every prunable layer's channels contribute exactly nothing; pruning 50 % must find those
    (L1 norm zero) and slice BatchNormalization, the depthwise kernel, the next conv and the Dense after
    Flatten consistently, so the smaller model computes the very same function."""
    keras = _keras()
    keras.utils.set_random_seed(3)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = keras.layers.Conv2D(8, 1, activation="relu", name="c2")(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="relu", name="d1")(h)
    out = keras.layers.Dense(10, name="d2")(h)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    for layer in model.layers:  # random non-trivial weights everywhere, BN statistics included
        layer.set_weights([rng.normal(size=w.shape).astype(np.float32) if i < 3 else
                           rng.uniform(0.5, 2.0, size=w.shape).astype(np.float32)
                           for i, w in enumerate(layer.get_weights())])
    # dead channels: kernel and bias zero, and the layers after them map a zero channel to zero
    for name in ("c1", "c2", "d1"):
        layer = model.get_layer(name)
        layer.set_weights([_zero_half(w) for w in layer.get_weights()])
    bn = model.get_layer("bn")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([gamma, _zero_half(beta), _zero_half(mean), var])
    dw = model.get_layer("dw")
    kernel, bias = dw.get_weights()
    dw.set_weights([kernel, _zero_half(bias)])

    x, _ = digits()
    smaller, result = prune_channels(model, StructuredConfig(0.5))
    assert _channels(smaller) == {"c1": 4, "c2": 4, "d1": 8, "d2": 10}
    assert {r.layer: r.skipped for r in result.layers}["d2"] == "its output is a model output"
    assert smaller.get_layer("bn").get_weights()[0].shape == (4,)
    assert smaller.get_layer("dw").get_weights()[0].shape == (3, 3, 4, 1)
    assert smaller.get_layer("d1").get_weights()[0].shape == (4 * 4 * 4, 8)
    np.testing.assert_allclose(smaller.predict(x[:64], verbose=0), model.predict(x[:64], verbose=0),
                               rtol=1e-4, atol=1e-4)
    assert result.params_after < result.params_before == count_params(model)
    assert result.params_after == count_params(smaller)
    # the original model is left as it was
    assert _channels(model) == {"c1": 8, "c2": 8, "d1": 16, "d2": 10}


def test_l1_saliency_picks_the_smallest_filters() -> None:
    keras = _keras()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="a"), keras.layers.Dense(2, name="b")])
    kernel = np.array([[1.0, -5.0, 0.1, 3.0]] * 4, dtype=np.float32)  # L1 per unit: 4, 20, 0.4, 12
    model.get_layer("a").set_weights([kernel, np.array([9.0, 0.0, 0.0, 0.0], dtype=np.float32)])
    smaller, _ = prune_channels(model, StructuredConfig(0.5))
    kept = smaller.get_layer("a").get_weights()[0]
    np.testing.assert_array_equal(kept, kernel[:, [1, 3]])  # the bias plays no part in the saliency


def test_layers_feeding_add_or_concatenate_are_left_whole_with_the_reason() -> None:
    keras = _keras()
    inp = keras.Input((8, 8, 1))
    a = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inp)
    b = keras.layers.Conv2D(8, 3, padding="same", name="left")(a)
    c = keras.layers.Conv2D(8, 3, padding="same", name="right")(a)
    s = keras.layers.Add()([b, c])
    d = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="wide")(s)
    e = keras.layers.Conv2D(4, 1, name="side")(d)
    f = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(d), keras.layers.Flatten()(e)])
    g = keras.layers.Dense(16, activation="relu", name="hidden")(f)
    model = keras.Model(inp, keras.layers.Dense(10, name="head")(g))
    smaller, result = prune_channels(model, StructuredConfig(0.5))
    reasons = {r.layer: r.skipped for r in result.layers}
    assert reasons["stem"] is None and reasons["hidden"] is None
    assert "add" in reasons["left"] and "add" in reasons["right"]
    assert "concatenate" in reasons["wide"] and "concatenate" in reasons["side"]
    assert reasons["head"] == "its output is a model output"
    assert _channels(smaller)["stem"] == 4 and _channels(smaller)["hidden"] == 8
    x, _ = digits()
    assert smaller.predict(x[:2], verbose=0).shape == (2, 10)


def test_global_pooling_and_batch_norm_on_a_functional_model_rebuild_and_run() -> None:
    keras = _keras()
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(12, 3, padding="same", name="c1")(inp)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Activation("relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dropout(0.1)(h)
    model = keras.Model(inp, keras.layers.Dense(10, activation="softmax")(h))
    smaller, result = prune_channels(model, StructuredConfig(0.25))
    assert _channels(smaller)["c1"] == 9
    x, _ = digits()
    assert smaller.predict(x[:3], verbose=0).shape == (3, 10)


def test_a_model_with_nothing_to_remove_is_a_usage_error() -> None:
    keras = _keras()
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    with pytest.raises(UsageError, match="no layer can lose filters or units.*model output"):
        prune_channels(model, StructuredConfig(0.5))


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_fraction_outside_the_open_interval_is_rejected(fraction: float) -> None:
    with pytest.raises(UsageError, match="between 0 and 1"):
        StructuredConfig(fraction)


# ------------------------------------------------------------------------- through the conversion pipeline


@functools.cache
def _pipeline() -> tuple[Any, Any, Any, Any]:
    """The tiny CNN pruned 50 % structurally (fine-tuned 2 epochs) on digits, and its preparation."""
    from edgefleet.converter.convert.data import Dataset, split
    from edgefleet.converter.convert.load import from_keras
    from edgefleet.converter.convert.pipeline import ConvertOptions, prepare, prune_channels_source

    x, y = digits()
    splits = split(Dataset(x, y, "digits"), seed=0)
    source = from_keras(fresh_tiny_cnn())
    options = ConvertOptions(quantize="int8", prune_channels=0.5, prune_epochs=2, latency_runs=10)
    prepared = prepare(source, splits, options)
    before = _channels(source.keras_model)
    structured = prune_channels_source(source, prepared, options)
    return source, prepared, structured, before


def test_pruned_model_has_fewer_filters_and_units_and_the_same_output_shape() -> None:
    source, _, structured, before = _pipeline()
    after = _channels(source.keras_model)
    # Keras numbers layer names per session, so compare in layer order: conv, 1x1 conv, dense, head
    assert list(before.values()) == [8, 8, 32, 10]
    assert list(after.values()) == [4, 4, 16, 10]
    assert structured.method == "fine-tune" and structured.steps > 0
    x, _ = digits()
    assert source.keras_model.predict(x[:5], verbose=0).shape == (5, 10)


@pytest.mark.parametrize("mode", MODES)
def test_every_quantization_mode_converts_runs_and_has_fewer_macs(mode: str) -> None:
    from dataclasses import replace

    from edgefleet.converter.convert.pipeline import ConvertOptions, finish

    source, prepared, structured, _ = _pipeline()
    options = replace(ConvertOptions(quantize=mode, prune_channels=0.5, latency_runs=10), quantize=mode)
    conv = finish(source, prepared, None, options, structured=structured)
    info = read_model(conv.model)
    baseline = read_model(prepared.baseline)
    assert info.outputs[0].shape[-1] == 10
    assert info.macs < 0.6 * baseline.macs and info.params < 0.6 * baseline.params
    assert conv.report["compute"]["macs"] == info.macs
    assert conv.report["structured_pruning"]["layers"][0]["after"] == 4
    assert conv.validation is not None and conv.validation.top1_agreement is not None
    assert conv.validation.top1_agreement > 0.8  # LiteRT runs the converted smaller model like the Keras one


def test_composes_with_magnitude_pruning() -> None:
    from edgefleet.converter.convert.load import clone
    from edgefleet.converter.convert.pipeline import ConvertOptions, finish, prune_source

    source, prepared, structured, _ = _pipeline()
    both = clone(source)
    options = ConvertOptions(quantize="int8", prune=0.5, prune_channels=0.5, prune_epochs=1, latency_runs=10)
    pruning = prune_source(both, prepared, options)
    assert pruning is not None
    shapes = [layer.shape for layer in pruning.layers]
    assert (64, 16) in shapes and (16, 10) in shapes and (1, 1, 4, 4) in shapes  # the smaller kernels
    conv = finish(both, prepared, pruning, options, structured=structured)
    info = read_model(conv.model)
    assert info.sparsity == pytest.approx(0.5, abs=0.05)
    assert info.macs == read_model(finish(source, prepared, None, ConvertOptions(quantize="int8", latency_runs=10),
                                          structured=structured).model).macs


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def cli_bundles() -> tuple[Path, Path]:
    """The tiny CNN converted to int8 without and with --prune-channels 0.5 (and --prune 0.5)."""
    root = WORK / "structured-cli"
    root.mkdir(exist_ok=True)
    dense, pruned = root / "dense", root / "pruned"
    common = ["convert", str(tiny_cnn_file()), "--data", str(digits_npz()), "--quantize", "int8",
              "--prune-epochs", "1", "--max-accuracy-drop", "100", "--latency-runs", "5", "--json"]
    if not dense.exists():
        assert main([*common, "-o", str(dense), "--version", "1"]) == 0
    if not pruned.exists():
        assert main([*common, "-o", str(pruned), "--version", "2", "--prune-channels", "0.5", "--prune", "0.5"]) == 0
    return dense, pruned


def test_cli_convert_inspect_and_diff_show_params_macs_and_latency(capsys, cli_bundles) -> None:  # type: ignore[no-untyped-def]
    dense, pruned = cli_bundles
    report = json.loads((pruned / "report.json").read_text())
    assert report["structured_pruning"]["fraction"] == 0.5 and report["pruning"]["target"] == 0.5
    rc, out, err = run(capsys, "inspect", pruned, "--json", "--latency-runs", "7")
    assert rc == 0, err
    got = json.loads(out)
    rc, out, err = run(capsys, "inspect", dense, "--json", "--latency-runs", "7")
    assert rc == 0, err
    ref = json.loads(out)
    assert got["model"]["macs"] < 0.6 * ref["model"]["macs"]
    assert got["model"]["params"] < 0.6 * ref["model"]["params"]
    assert got["manifest"]["metrics"]["macs"] == got["model"]["macs"]
    assert got["host_latency"]["runs"] == 7 and got["host_latency"]["p50_ms"] > 0
    rc, out, err = run(capsys, "inspect", pruned)  # the table
    assert rc == 0, err
    assert "MACs per invoke" in out and "parameters" in out and "host latency here" in out
    rc, out, err = run(capsys, "diff", dense, pruned, "--json", "--latency-runs", "5")
    assert rc == 0, err
    rows = {r["field"]: r for r in json.loads(out)["rows"]}
    assert rows["MACs per invoke"]["b"] < rows["MACs per invoke"]["a"] and rows["MACs per invoke"]["changed"]
    assert rows["parameters"]["b"] < rows["parameters"]["a"]
    assert isinstance(rows["bare p50 ms here"]["a"], float) and isinstance(rows["bare p50 ms here"]["b"], float)


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.5", "half"])
def test_bad_fraction_is_one_line_exit_2_and_nothing_written(capsys, tmp_path, value) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bundle"
    rc, stdout, err = run(capsys, "convert", tiny_cnn_file(), "-o", out, "--data", digits_npz(),
                          "--prune-channels", value)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgectl: error:") and "--prune-channels" in lines[0], err
    assert bundle_files_absent(out)


def test_saved_model_source_cannot_be_pruned_structurally(capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bundle"
    rc, _, err = run(capsys, "convert", tiny_saved_model(), "-o", out, "--prune-channels", "0.5")
    assert rc == 2 and err.count("\n") == 1 and "--prune-channels needs a Keras model" in err
    assert bundle_files_absent(out)


def test_negative_latency_runs_is_exit_2(capsys, cli_bundles) -> None:  # type: ignore[no-untyped-def]
    rc, _, err = run(capsys, "inspect", cli_bundles[0], "--latency-runs", "-1")
    assert rc == 2 and "--latency-runs" in err and err.count("\n") == 1
