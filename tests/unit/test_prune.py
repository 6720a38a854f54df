"""Magnitude pruning on Keras 3: masks, the polynomial schedule, one-shot and fine-tuned pruning, m:n."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.converter.convert.prune import (
    PruneConfig,
    m_by_n_mask,
    magnitude_mask,
    polynomial_sparsity,
    prunable_kernels,
    prune,
)
from edgefleet.errors import UsageError
from tests.support.convert_support import digits, fresh_tiny_cnn


def test_magnitude_mask_zeroes_exactly_the_smallest() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(16, 8))
    mask = magnitude_mask(w, 0.75)
    assert mask.sum() == 32
    assert np.abs(w[~mask]).max() <= np.abs(w[mask]).min()


def test_m_by_n_mask_keeps_m_largest_per_group_along_the_axis() -> None:
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 3, 8, 4))  # conv kernel: input axis -2
    mask = m_by_n_mask(w, 2, 4, -2)
    groups = np.moveaxis(mask, -2, -1).reshape(3, 3, 4, 2, 4)
    assert np.all(groups.sum(axis=-1) == 2)
    vals = np.abs(np.moveaxis(w, -2, -1).reshape(3, 3, 4, 2, 4))
    kept = np.where(groups, vals, np.inf).min(axis=-1)
    dropped = np.where(groups, -np.inf, vals).max(axis=-1)
    assert np.all(kept >= dropped)


def test_polynomial_schedule_follows_the_cubic_curve() -> None:
    assert polynomial_sparsity(0, 0, 100, 0.0, 0.8) == 0.0
    assert polynomial_sparsity(100, 0, 100, 0.0, 0.8) == pytest.approx(0.8)
    assert polynomial_sparsity(500, 0, 100, 0.0, 0.8) == pytest.approx(0.8)
    assert polynomial_sparsity(50, 0, 100, 0.0, 0.8) == pytest.approx(0.8 - 0.8 * 0.5 ** 3)
    values = [polynomial_sparsity(t, 10, 90, 0.2, 0.9) for t in range(0, 101)]
    assert values[0] == 0.2 and all(b >= a for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("sparsity", [0.0, 1.0, -0.1, 1.5])
def test_sparsity_outside_open_interval_is_rejected(sparsity: float) -> None:
    with pytest.raises(UsageError, match="between 0 and 1"):
        PruneConfig(sparsity)


def _kernels(model) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return {f"{t.layer}/{t.attr}": np.asarray(t.variable.numpy()) for t in prunable_kernels(model)}


def test_one_shot_reaches_the_target_in_every_kernel_including_depthwise() -> None:
    model = fresh_tiny_cnn()
    result = prune(model, PruneConfig(0.6))
    assert result.method == "one-shot"
    assert {s.layer.split("_")[0] for s in result.layers} >= {"conv2d", "depthwise", "dense"}
    for name, w in _kernels(model).items():
        assert abs(np.mean(w == 0) - 0.6) < 0.5 / w.size + 1e-9, name
    assert result.overall == pytest.approx(0.6, abs=0.01)


def test_fine_tuning_keeps_the_masks_and_recovers_accuracy() -> None:
    from edgefleet.converter.convert.data import Dataset

    x, y = digits()
    model = fresh_tiny_cnn()
    one_shot = fresh_tiny_cnn()
    prune(one_shot, PruneConfig(0.8))
    result = prune(model, PruneConfig(0.8, epochs=3, batch_size=64), Dataset(x[:1200], y[:1200], "digits"))
    assert result.method == "fine-tune" and result.steps == 3 * 19
    for layer in result.layers:
        assert layer.reached == pytest.approx(0.8, abs=0.02), layer
    held_out = (x[1200:], y[1200:])
    tuned = np.mean(model.predict(held_out[0], verbose=0).argmax(1) == held_out[1])
    raw = np.mean(one_shot.predict(held_out[0], verbose=0).argmax(1) == held_out[1])
    assert tuned > raw + 0.05


def test_two_four_structure_along_the_input_axis() -> None:
    model = fresh_tiny_cnn()
    result = prune(model, PruneConfig(0.5, structure=(2, 4)))
    skipped = {s.layer: s.skipped for s in result.layers if s.skipped}
    assert any("depthwise" in reason for reason in skipped.values())
    assert any("not a multiple of 4" in reason for reason in skipped.values())  # the first conv: 1 channel
    pruned = [t for t in prunable_kernels(model, (2, 4)) if not t.skipped]
    assert pruned
    for t in pruned:
        w = np.moveaxis(np.asarray(t.variable.numpy()), t.input_axis, -1)  # type: ignore[arg-type]
        groups = (w != 0).reshape(*w.shape[:-1], -1, 4)
        assert np.all(groups.sum(axis=-1) <= 2), t.layer
    for s in result.layers:
        if not s.skipped:
            assert s.reached == pytest.approx(0.5, abs=0.01)


def test_m_by_n_with_no_eligible_kernel_is_a_usage_error() -> None:
    model = fresh_tiny_cnn()
    with pytest.raises(UsageError, match="no kernel"):
        prune(model, PruneConfig(2 / 3, structure=(1, 3)))
