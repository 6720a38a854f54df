"""What `edgectl package` measures about an existing .tflite model before bundling it.

The model must load and invoke with LiteRT on this host; its normalisation and labels come from the
options or its TFLite metadata; golden candidates come from the data or from random inputs; with
labelled data its accuracy goes into the report, with the host latency.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefleet.converter.bundle.golden import POOL_SAMPLES
from edgefleet.converter.bundle.reference import REFERENCE_SAMPLES
from edgefleet.converter.convert.data import (
    check_inputs,
    check_labels,
    check_normalisation,
    classes_of,
    load_labels,
    load_npz,
    parse_floats,
    quantize_input,
    random_inputs,
)
from edgefleet.converter.convert.evaluate import check_invokes, first_sample, measure_latency, run_samples
from edgefleet.converter.convert.report import package_report
from edgefleet.converter.tflite.info import read_model
from edgefleet.converter.tflite.native import captured_native_output
from edgefleet.errors import RuntimeBackendError, UsageError
from edgefleet.runtime import load_model


@dataclass(frozen=True)
class Packaged:
    """The report of a packaged model and what its bundle is written from."""

    report: dict[str, Any]
    golden_inputs: list[NDArray[Any]]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    labels: tuple[str, ...] | None
    reference_inputs: list[NDArray[Any]] | None = None
    """Samples for the drift reference (from --calibration, else --data), stacked like `golden_inputs`."""
    reference_source: dict[str, Any] | None = None


def package(path: str, data: bytes, *, input_mean: str | None = None, input_std: str | None = None,
            labels_file: str | None = None, data_file: str | None = None, top_k: int = 5, golden_samples: int = 8,
            latency_runs: int = 100, seed: int = 0, calibration_file: str | None = None) -> Packaged:
    """Check, measure and report the model `data` read from `path`; UsageError naming the file otherwise.

    Normalisation (`input_mean`, `input_std`: comma-separated) and `labels_file` default to the model's
    metadata; golden candidates come from `data_file` (a .npz with 'x', and 'y' for the accuracy) or
    from random inputs (`seed`); `top_k` is recorded for the bundle. The drift reference is counted over
    `calibration_file` (a .npz with 'x'), else over `data_file`; without either the bundle carries none.
    """
    started = time.perf_counter()
    try:
        info = read_model(data)
    except UsageError as err:
        raise UsageError(f"{path}: {err}") from err
    try:
        with captured_native_output():  # LiteRT announces its XNNPACK delegate on stderr
            model = load_model(data, "auto", use_xnnpack=True)
    except RuntimeBackendError as err:
        raise UsageError(f"{path}: {err}") from err
    try:
        check_invokes(model, first_sample(model, None, seed), sparse_encoded=info.sparse_encoded)
    except UsageError as err:
        raise UsageError(f"{path}: {err}") from err
    meta = info.metadata
    mean = parse_floats(input_mean, "--input-mean") or (meta.mean if meta else None)
    std = parse_floats(input_std, "--input-std") or (meta.std if meta else None)
    check_normalisation(mean, std, model.inputs[0])
    classes = classes_of(model.outputs[0])
    # the count is checked against the output the labels are bound to, when the bundle is written
    labels = load_labels(labels_file, None) if labels_file else (meta.labels if meta else None)
    accuracy, samples = None, 0
    if data_file:
        if len(model.inputs) != 1:
            raise UsageError(f"--data: the model has {len(model.inputs)} inputs; data files support one-input models")
        ds = check_inputs(load_npz(data_file), model.inputs[0])
        check_labels(ds, classes)
        golden = [quantize_input(ds.x[:max(golden_samples, POOL_SAMPLES)], model.inputs[0])[:, None]]
        golden_source = (f"{min(golden_samples, len(golden[0]))} of the first {len(golden[0])} samples "
                         f"of {data_file}")
        if ds.y is not None:
            predicted = run_samples(model, ds.x).argmax(axis=-1)
            accuracy, samples = float(np.mean(predicted == ds.y)), len(ds)
        sample_x = ds.x
    else:
        golden = random_inputs(model.inputs, max(golden_samples, POOL_SAMPLES), seed)
        golden_source = f"{golden_samples} of {len(golden[0])} random inputs (seed {seed})"
        sample_x = None
    reference_inputs: list[NDArray[Any]] | None = None
    reference_source: dict[str, Any] | None = None
    sample_ref: NDArray[Any] | None = sample_x
    if calibration_file:
        if len(model.inputs) != 1:
            raise UsageError(f"--calibration: the model has {len(model.inputs)} inputs; data files support "
                             "one-input models")
        sample_ref = check_inputs(load_npz(calibration_file, "--calibration"), model.inputs[0]).x
    if sample_ref is not None:
        label = "calibration" if calibration_file else "data"
        reference_source = {"file": calibration_file or data_file,
                            "samples": {label: min(len(sample_ref), REFERENCE_SAMPLES)}}
        reference_inputs = [quantize_input(sample_ref[:REFERENCE_SAMPLES], model.inputs[0])[:, None]]
    latency = measure_latency(model, first_sample(model, sample_x, seed), runs=latency_runs)
    report = package_report(path=path, info=info, validation_accuracy=accuracy, samples=samples,
                            latency=latency, golden_source=golden_source)
    report["preprocessing"] = {"mean": list(mean) if mean else None, "std": list(std) if std else None}
    report["postprocessing"] = {"labels": list(labels) if labels else None, "top_k": top_k}
    report["conversion_s"] = round(time.perf_counter() - started, 3)
    return Packaged(report=report, golden_inputs=golden, mean=mean, std=std, labels=labels,
                    reference_inputs=reference_inputs, reference_source=reference_source)
