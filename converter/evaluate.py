"""Validation of a converted model against its float original, and host latency, with LiteRT.

The converted model runs through `agent.runtime` with XNNPACK on, exactly as the agent serves it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from agent.runtime import LoadedModel
from converter.data import dequantize_output, quantize_input


@dataclass(frozen=True)
class Validation:
    """How the converted model compares with the float model on the validation set."""

    samples: int
    labelled: bool
    float_accuracy: float | None
    accuracy: float | None
    accuracy_drop_pt: float | None
    top1_agreement: float | None
    max_abs_error: float
    mean_abs_error: float

    def to_dict(self) -> dict[str, Any]:
        """JSON value."""
        return asdict(self)


@dataclass(frozen=True)
class Gate:
    """The accuracy gate: which figure was checked, against which limit, and the verdict."""

    metric: str  # "accuracy_drop_pt", "top1_disagreement_pt" or "none"
    value: float | None
    limit: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON value."""
        return asdict(self)


@dataclass(frozen=True)
class Latency:
    """Host latency of one invoke, like TFLite's benchmark_model: warm-up runs, then timed runs."""

    backend: str
    xnnpack: bool
    warmup: int
    runs: int
    p50_ms: float
    p95_ms: float
    mean_ms: float

    def to_dict(self) -> dict[str, Any]:
        """JSON value."""
        return asdict(self)


def run_samples(model: LoadedModel, x: np.ndarray) -> np.ndarray:
    """The model's first output (real values, batch axis dropped) for every sample of `x`, one invoke each."""
    spec_in, spec_out = model.inputs[0], model.outputs[0]
    xq = quantize_input(x, spec_in)
    out = [dequantize_output(model.run([xq[i:i + 1]])[0], spec_out)[0] for i in range(len(xq))]
    return np.stack(out)


def compare(reference: np.ndarray, converted: np.ndarray, y: np.ndarray | None) -> Validation:
    """Accuracy of both (with labels), drop in points, top-1 agreement, and output error."""
    err = np.abs(reference.astype(np.float64) - converted.astype(np.float64))
    classifier = reference.ndim == 2 and reference.shape[1] > 1
    agreement = float_acc = acc = drop = None
    if classifier:
        ref_top, conv_top = reference.argmax(axis=1), converted.argmax(axis=1)
        agreement = float(np.mean(ref_top == conv_top))
        if y is not None:
            float_acc = float(np.mean(ref_top == y))
            acc = float(np.mean(conv_top == y))
            drop = round((float_acc - acc) * 100.0, 4)
    return Validation(
        samples=len(reference), labelled=y is not None and classifier, float_accuracy=float_acc, accuracy=acc,
        accuracy_drop_pt=drop, top1_agreement=agreement,
        max_abs_error=float(err.max()) if err.size else 0.0, mean_abs_error=float(err.mean()) if err.size else 0.0,
    )


def gate(validation: Validation | None, limit: float) -> Gate:
    """Check the accuracy drop (or, without labels, disagreement with the float model) against `limit` points."""
    if validation is None:
        return Gate("none", None, limit, True)
    if validation.accuracy_drop_pt is not None:
        return Gate("accuracy_drop_pt", validation.accuracy_drop_pt, limit, validation.accuracy_drop_pt <= limit)
    if validation.top1_agreement is not None:
        value = round((1.0 - validation.top1_agreement) * 100.0, 4)
        return Gate("top1_disagreement_pt", value, limit, value <= limit)
    return Gate("none", None, limit, True)


def measure_latency(model: LoadedModel, sample: list[np.ndarray], *, warmup: int = 10, runs: int = 100,
                    xnnpack: bool = True) -> Latency:
    """Median and 95th percentile of `runs` invokes after `warmup` untimed ones."""
    for _ in range(warmup):
        model.run(sample)
    times = np.empty(max(1, runs))
    for i in range(len(times)):
        start = time.perf_counter_ns()
        model.run(sample)
        times[i] = (time.perf_counter_ns() - start) / 1e6
    return Latency(backend=model.backend, xnnpack=xnnpack, warmup=warmup, runs=len(times),
                   p50_ms=round(float(np.percentile(times, 50)), 4), p95_ms=round(float(np.percentile(times, 95)), 4),
                   mean_ms=round(float(times.mean()), 4))


def first_sample(model: LoadedModel, x: np.ndarray | None, seed: int = 0) -> list[np.ndarray]:
    """One invoke's inputs: the first data sample when there is data, else random values."""
    from converter.data import random_inputs

    if x is not None and len(model.inputs) == 1:
        return [quantize_input(x[:1], model.inputs[0])]
    return [a[0] for a in random_inputs(model.inputs, 1, seed)]
