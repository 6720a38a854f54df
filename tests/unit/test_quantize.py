"""Every quantization mode on a tiny CNN: what the converted file holds, and how it validates in LiteRT."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.converter.convert.data import quantize_input
from edgefleet.converter.convert.quantize import MODES, convert_tflite
from edgefleet.converter.tflite.info import read_model
from edgefleet.errors import UsageError
from edgefleet.runtime import load_model
from tests.support.convert_support import converted, elu_model_file, prepared

# mode -> (dtype of the largest kernel, input dtype). Dynamic range quantization leaves kernels
# under 1024 weights in float32, so only the largest kernel is checked for every mode.
EXPECTED = {
    "none": ("float32", "float32"),
    "dynamic": ("int8", "float32"),
    "float16": ("float16", "float32"),
    "int8": ("int8", "float32"),
    "int8-full": ("int8", "int8"),
    "int16x8": ("int8", "float32"),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_produces_the_promised_tensors_and_validates(mode: str) -> None:
    result = converted(mode)
    info = read_model(result.model)
    kernel, input_dtype = EXPECTED[mode]
    assert max(info.weights, key=lambda w: int(np.prod(w.shape))).dtype == kernel
    assert info.inputs[0].dtype == input_dtype
    assert info.quantization == mode
    val = result.validation
    assert val is not None and val.samples > 300
    assert val.float_accuracy is not None and val.float_accuracy > 0.85
    assert val.accuracy_drop_pt is not None and val.accuracy_drop_pt <= 3.0
    assert val.top1_agreement is not None and val.top1_agreement >= 0.95
    assert result.gate.passed and result.gate.metric == "accuracy_drop_pt"
    report = result.report
    assert report["quantization"]["mode"] == mode
    assert report["size"]["float32_tflite_bytes"] == len(prepared()[1].baseline)
    assert report["latency"]["p50_ms"] > 0 and report["latency"]["p95_ms"] >= report["latency"]["p50_ms"]
    assert any(op["name"] == "CONV_2D" and op["version"] >= 1 for op in report["operators"])


def test_integer_and_float16_modes_shrink_the_file() -> None:
    f32 = len(converted("none").model)
    for mode in ("dynamic", "int8", "int8-full", "int16x8"):
        assert len(converted(mode).model) < 0.6 * f32, mode
        assert all(w.dtype == "int8" for w in read_model(converted(mode).model).weights if mode != "dynamic")
    assert len(converted("float16").model) < 0.8 * f32


def test_int16x8_keeps_int16_activations() -> None:
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(converted("int16x8").model, 0)
    types = {t.type for t in model.subgraphs[0].tensors}
    assert schema.TensorType.INT16 in types


def test_int8_full_golden_inputs_are_quantized_with_the_input_parameters() -> None:
    result = converted("int8-full")
    spec = load_model(result.model).inputs[0]
    assert spec.dtype == "int8" and spec.quantization is not None
    _, prep = prepared()
    want = quantize_input(prep.splits.validation.x[:len(result.golden_inputs[0])], spec)
    assert result.golden_inputs[0].dtype == np.int8
    np.testing.assert_array_equal(result.golden_inputs[0][:, 0], want)
    # The integer model, fed those, agrees with the float model on (almost) every validation sample.
    assert result.validation.max_abs_error < 0.2


def test_int8_full_rejects_an_operator_left_in_float() -> None:
    from edgefleet.converter.convert.load import load_source

    source = load_source(elu_model_file())
    calibration = np.random.default_rng(0).random((16, 8, 8, 1), dtype=np.float32)
    with pytest.raises(UsageError, match="int8-full: operator.*ELU"):
        convert_tflite(source, "int8-full", calibration)
    # The same model is fine in int8 mode (ELU falls back to float there).
    info = read_model(convert_tflite(source, "int8", calibration))
    assert "ELU" in info.float_ops


def test_calibrated_modes_need_samples() -> None:
    source, _ = prepared()
    with pytest.raises(UsageError, match="needs calibration samples"):
        convert_tflite(source, "int8", None)


def test_unknown_mode_is_a_usage_error() -> None:
    source, _ = prepared()
    with pytest.raises(UsageError, match="unknown mode 'int4'"):
        convert_tflite(source, "int4")
