"""The drift reference of a bundle: what the calibration data and the model's answers to it look like
(edgefleet/drift.py for the format, docs/converter.md "Drift reference" for what is recorded).

The outputs are those of the converted model, the one the boards run: comparing the boards' outputs with
the float model's would count the quantization error as drift on every board, from the first request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefleet.drift import (
    DriftReference,
    TensorReference,
    is_classifier,
    layout_for,
    tensor_reference,
    top1_reference,
)
from edgefleet.protocol import TensorSpec
from edgefleet.runtime import LoadedModel
from edgefleet.tensors import distinct_names, signature_names

REFERENCE_SAMPLES = 2000
"""Samples the reference is counted over at most. The reference's own sampling noise adds about
(bins - 1) / samples to every live score: 0.0045 at 2,000, against a threshold of 0.25."""
MIN_SAMPLES = 50
"""Fewer samples than this make no reference: its deciles would be noise."""


def real_values(x: NDArray[Any], spec: TensorSpec) -> NDArray[np.float64]:
    """A tensor's real values: dequantized when the tensor is quantized, as the agent bins them."""
    out = np.asarray(x, dtype=np.float64)
    if spec.quantization is not None and np.asarray(x).dtype.kind in "iu":
        out = (out - spec.quantization.zero_point) * spec.quantization.scale
    return out


def unstack(x: NDArray[Any]) -> NDArray[Any]:
    """Stacked invocations (samples x batch-of-one tensor) as one batch of samples."""
    return x.reshape((-1, *x.shape[2:])) if x.ndim >= 2 else x


def build_reference(model: LoadedModel, inputs: Sequence[NDArray[Any]], outputs: Sequence[NDArray[Any]], *,
                    labelled_output: int | None = None, source: dict[str, Any] | None = None) -> DriftReference | None:
    """The reference of stacked invocations `inputs` (in the model's dtypes) and the model's `outputs` on them;
    None when there are too few samples or a string input."""
    if not inputs or len(inputs[0]) < MIN_SAMPLES:
        return None
    if any(s.dtype == "string" for s in model.inputs):
        return None
    in_names = distinct_names(model.inputs, signature_names(model.interpreter, "inputs"))
    out_names = distinct_names(model.outputs, signature_names(model.interpreter, "outputs"))
    refs_in = tuple(tensor_reference(name, real_values(unstack(x), spec), layout_for(spec.shape))
                    for name, x, spec in zip(in_names, inputs, model.inputs, strict=True))
    refs_out: list[TensorReference] = []
    for j, (name, y, spec) in enumerate(zip(out_names, outputs, model.outputs, strict=True)):
        if spec.dtype in ("string", "bool"):
            continue
        values = real_values(unstack(y), spec)
        if j == labelled_output or (labelled_output is None and is_classifier(spec.shape)):
            refs_out.append(top1_reference(name, values))
        else:
            refs_out.append(tensor_reference(name, values, layout_for(spec.shape)))
    return DriftReference(samples=len(inputs[0]), inputs=refs_in, outputs=tuple(refs_out), source=dict(source or {}))
