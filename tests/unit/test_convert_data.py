"""Data for conversion: the stratified, seeded split and the checks against the model's input."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.converter.convert.data import Dataset, check_inputs, check_labels, quantize_input, split
from edgefleet.errors import UsageError
from edgefleet.protocol import Quantization, TensorSpec


def _data(n: int = 300, classes: int = 3) -> Dataset:
    rng = np.random.default_rng(0)
    weights = np.arange(1, classes + 1)  # unbalanced classes: 1 : 2 : 3 ...
    y = np.repeat(np.arange(classes), np.diff(np.round(np.concatenate([[0], np.cumsum(weights)]) * n / weights.sum())
                                             .astype(int)))
    return Dataset(rng.random((n, 4), dtype=np.float32), y, "test data")


def test_split_is_stratified_disjoint_and_seeded() -> None:
    ds = _data()
    s = split(ds, seed=3, validation=0.2, calibration=0.2)
    assert s.validation is not None and s.calibration is not None and s.fine_tune is not None
    assert len(s.validation) + len(s.calibration) + len(s.fine_tune) == len(ds)
    for part, share in ((s.validation, 0.2), (s.calibration, 0.2)):
        for c in range(3):
            want = round(np.sum(ds.y == c) * share)
            assert np.sum(part.y == c) == want
    rows = [tuple(r) for part in (s.validation, s.calibration, s.fine_tune) for r in part.x.reshape(len(part), -1)]
    assert len(set(rows)) == len(ds)
    again = split(ds, seed=3, validation=0.2, calibration=0.2)
    np.testing.assert_array_equal(again.validation.x, s.validation.x)  # type: ignore[union-attr]
    other = split(ds, seed=4, validation=0.2, calibration=0.2)
    assert not np.array_equal(other.validation.x, s.validation.x)  # type: ignore[union-attr]


def test_split_without_labels() -> None:
    ds = Dataset(np.zeros((50, 2), np.float32), None, "unlabelled")
    s = split(ds, seed=0)
    assert s.sizes() == {"fine_tune": 30, "calibration": 10, "validation": 10}


def test_check_inputs_accepts_dynamic_dims_and_rejects_mismatches() -> None:
    spec = TensorSpec(name="in", dtype="float32", shape=(-1, -1, 4))
    ok = check_inputs(Dataset(np.zeros((2, 7, 4), np.float64), None, "d"), spec)
    assert ok.x.dtype == np.float32
    with pytest.raises(UsageError, match=r"takes \[N, \?, 4\]"):
        check_inputs(Dataset(np.zeros((2, 7, 5), np.float32), None, "d"), spec)
    with pytest.raises(UsageError, match="NaN"):
        check_inputs(Dataset(np.full((2, 7, 4), np.nan, np.float32), None, "d"), spec)


def test_labels_must_be_class_indices() -> None:
    with pytest.raises(UsageError, match="label 3 is out of range"):
        check_labels(_data(classes=4), 3)
    with pytest.raises(UsageError, match="no class axis"):
        check_labels(_data(), None)
    check_labels(_data(), 3)


def test_quantize_input_uses_scale_and_zero_point_and_saturates() -> None:
    spec = TensorSpec(name="q", dtype="uint8", shape=(1, 3), quantization=Quantization(scale=0.5, zero_point=10))
    q = quantize_input(np.array([[0.0, 1.0, 1000.0]], np.float32), spec)
    assert q.dtype == np.uint8 and q.tolist() == [[10, 12, 255]]
