"""Choosing dense or sparse (EXPERIMENTAL_SPARSITY) encoding for a pruned model, and falling back."""

from __future__ import annotations

import os

import numpy as np
import pytest

from edgefleet.converter.convert.encoding import choose_encoding, runs_like
from edgefleet.converter.convert.load import from_keras
from edgefleet.converter.convert.pipeline import ConvertOptions, finish
from edgefleet.converter.convert.prune import PruneConfig, prune
from edgefleet.converter.convert.quantize import convert_tflite
from edgefleet.converter.tflite.info import read_model
from edgefleet.runtime import load_model
from tests.support.convert_support import fresh_tiny_cnn, prepared


def _never(candidate: bytes) -> str | None:
    raise AssertionError("the run check must not be called")


def test_no_pruning_means_dense_without_a_check() -> None:
    dense = os.urandom(3000)
    chosen, decision = choose_encoding(dense, None, _never)
    assert chosen is dense and decision.chosen == "dense" and decision.sparse_bytes is None


def test_larger_sparse_file_is_dropped_without_running_it() -> None:
    dense, sparse = os.urandom(2000), os.urandom(2500)
    chosen, decision = choose_encoding(dense, sparse, _never)
    assert chosen is dense and "not smaller" in decision.reason
    assert (decision.dense_bytes, decision.sparse_bytes) == (2000, 2500)


def test_smaller_sparse_file_that_fails_to_run_falls_back_to_dense() -> None:
    dense, sparse = os.urandom(3000), os.urandom(1000)
    chosen, decision = choose_encoding(dense, sparse, lambda b: "failed to delegate FULLY_CONNECTED")
    assert chosen is dense and decision.chosen == "dense"
    assert "fell back to dense" in decision.reason and "FULLY_CONNECTED" in decision.reason


def test_smaller_sparse_file_that_runs_is_kept() -> None:
    dense, sparse = os.urandom(3000), os.urandom(1000)
    seen = []
    chosen, decision = choose_encoding(dense, sparse, lambda b: seen.append(b))  # type: ignore[func-returns-value]
    assert chosen is sparse and decision.chosen == "sparse" and seen == [sparse]


@pytest.fixture(scope="module")
def pruned_source():  # type: ignore[no-untyped-def]
    model = fresh_tiny_cnn()
    result = prune(model, PruneConfig(0.9))
    return from_keras(model), result


def _runs(model: bytes, x: np.ndarray) -> bool:
    try:
        loaded = load_model(model, "auto", use_xnnpack=True)
        loaded.run([x])
    except Exception:
        return False
    return True


@pytest.mark.parametrize("mode", ["none", "int8"])
def test_run_check_agrees_with_the_runtime(pruned_source, mode: str) -> None:  # type: ignore[no-untyped-def]
    source, _ = pruned_source
    _, prep = prepared()
    cal = prep.calibration
    dense = convert_tflite(source, mode, cal)
    sparse = convert_tflite(source, mode, cal, sparse=True)
    assert read_model(sparse).sparse_encoded and not read_model(dense).sparse_encoded
    x = prep.splits.validation.x[:1]
    verdict = runs_like(dense, [[x]])(sparse)
    # Whatever this LiteRT can do (int8 sparse FULLY_CONNECTED fails under XNNPACK in 2.3), the check
    # must say the same as loading and invoking the model directly.
    assert (verdict is None) == _runs(sparse, x) or (verdict is not None and "differ" in verdict)


def test_pipeline_falls_back_to_dense_when_sparse_does_not_run(pruned_source, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    source, pruning = pruned_source
    _, prep = prepared()
    options = ConvertOptions(quantize="none", latency_runs=5)
    honest = finish(source, prep, pruning, options)
    assert honest.encoding.sparse_bytes is not None and honest.encoding.sparse_bytes < honest.encoding.dense_bytes
    if honest.encoding.chosen == "sparse":
        assert read_model(honest.model).sparse_encoded
    import edgefleet.converter.convert.pipeline as pipeline

    monkeypatch.setattr(pipeline, "runs_like", lambda dense, samples: lambda b: "simulated delegate failure")
    result = finish(source, prep, pruning, options)
    assert result.encoding.chosen == "dense" and "simulated delegate failure" in result.encoding.reason
    assert not read_model(result.model).sparse_encoded
    assert result.report["encoding"]["chosen"] == "dense"
    assert _runs(result.model, prep.splits.validation.x[:1])


def test_int8_pruned_model_that_ships_runs_with_xnnpack(pruned_source) -> None:  # type: ignore[no-untyped-def]
    source, pruning = pruned_source
    _, prep = prepared()
    result = finish(source, prep, pruning, ConvertOptions(quantize="int8", latency_runs=5))
    assert _runs(result.model, prep.splits.validation.x[:1])
    assert result.encoding.sparse_bytes is not None  # a sparse candidate was made and judged
    assert result.report["pruning"]["overall"] == pytest.approx(0.9, abs=0.01)
