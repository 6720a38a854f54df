"""Quantization modes behind one small interface, and the TFLite conversion itself.

Every mode is a `QuantMode` that configures a `tf.lite.TFLiteConverter`; calibration for the integer
modes comes from real samples through the representative dataset. TensorFlow is imported lazily.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefleet.converter.convert.load import SourceModel
from edgefleet.converter.errors import ConversionError
from edgefleet.converter.tflite.native import captured_native_output, import_tensorflow
from edgefleet.errors import UsageError

log = logging.getLogger(__name__)

SampleCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class QuantMode:
    """One quantization mode: what it does and how it sets up the converter."""

    name: str
    summary: str
    needs_calibration: bool
    configure: Callable[[Any, Any], None]


def _none(conv: Any, tf: Any) -> None:
    conv.optimizations = []


def _dynamic(conv: Any, tf: Any) -> None:
    conv.optimizations = [tf.lite.Optimize.DEFAULT]


def _float16(conv: Any, tf: Any) -> None:
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_types = [tf.float16]


def _int8(conv: Any, tf: Any) -> None:
    conv.optimizations = [tf.lite.Optimize.DEFAULT]


def _int8_full(conv: Any, tf: Any) -> None:
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8


def _int16x8(conv: Any, tf: Any) -> None:
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]


MODES: dict[str, QuantMode] = {m.name: m for m in (
    QuantMode("none", "float32 weights and activations", False, _none),
    QuantMode("dynamic", "int8 weights, float activations quantized on the fly", False, _dynamic),
    QuantMode("float16", "float16 weights, float32 compute", False, _float16),
    QuantMode("int8", "int8 weights and activations, float32 input/output", True, _int8),
    QuantMode("int8-full", "int8 everywhere including input/output, for integer-only accelerators", True, _int8_full),
    QuantMode("int16x8", "int16 activations, int8 weights, float32 input/output", True, _int16x8),
)}


def mode(name: str) -> QuantMode:
    """The mode called `name`; UsageError for an unknown one."""
    try:
        return MODES[name]
    except KeyError as err:
        raise UsageError(f"--quantize: unknown mode {name!r}; choose from {', '.join(MODES)}") from err


_FLEX = re.compile(r"'(tf\.\w+)' op is neither a custom op nor a flex op")


def convert_tflite(source: SourceModel, mode_name: str, calibration: NDArray[Any] | None = None, *,
                   sparse: bool = False, on_sample: SampleCallback | None = None) -> bytes:
    """Convert `source` in the given mode; int8-full also checks that no compute stayed in float."""
    qm = mode(mode_name)
    if qm.needs_calibration and (calibration is None or len(calibration) == 0):
        raise UsageError(f"--quantize {mode_name} needs calibration samples: pass --data or --calibration")
    if qm.needs_calibration and len(source.inputs) != 1:
        raise UsageError(f"--quantize {mode_name}: calibration supports single-input models only")
    tf = import_tensorflow()
    with captured_native_output():  # building a converter from Keras exports it and prints the signature
        conv = source.tflite_converter()
    qm.configure(conv, tf)
    if sparse:
        conv.optimizations = [*conv.optimizations, tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    if qm.needs_calibration:
        samples = np.asarray(calibration, dtype=np.float32)

        def representative() -> Iterator[list[NDArray[np.float32]]]:
            for i in range(len(samples)):
                yield [samples[i:i + 1]]
                if on_sample is not None:
                    on_sample(i + 1, len(samples))

        conv.representative_dataset = representative
    try:
        with captured_native_output():
            model = bytes(conv.convert())
    except Exception as err:  # ConverterError and friends; the message carries MLIR diagnostics
        raise _conversion_error(err, mode_name) from err
    if mode_name == "int8-full":
        _check_integer_only(model)
    return model


def _conversion_error(err: Exception, mode_name: str) -> Exception:
    text = str(err)
    flex = sorted(set(_FLEX.findall(text)))
    if flex:
        return UsageError(f"the model uses TensorFlow ops with no TFLite builtin kernel: {', '.join(flex)}")
    first = next((ln.strip() for ln in text.splitlines() if "error" in ln.lower()), text.strip()[:200])
    if mode_name == "int8-full" and "quantiz" in text.lower():
        return UsageError(f"--quantize int8-full: the model cannot be fully quantized to int8 ({first[:300]})")
    return ConversionError(f"TFLite conversion ({mode_name}) failed: {first[:300]}")


def _check_integer_only(model: bytes) -> None:
    # TFLITE_BUILTINS_INT8 alone does not stop the converter from wrapping an op it cannot quantize
    # in DEQUANTIZE/QUANTIZE and running it in float; an integer-only accelerator cannot run that.
    from edgefleet.converter.tflite.info import read_model

    info = read_model(model)
    if info.float_ops:
        raise UsageError(f"--quantize int8-full: operator(s) {', '.join(info.float_ops)} cannot be quantized "
                         "to int8 and would run in float32; use --quantize int8 (float fallback) instead")
