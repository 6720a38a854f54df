"""Magnitude pruning of Keras 3 models (Dense, Conv and DepthwiseConv kernels), without tfmot.

Without labelled data the kernels are pruned once to the target sparsity. With labels the model is
fine-tuned while the sparsity follows a polynomial schedule (as in the TensorFlow pruning guide:
``s(t) = s_f + (s_i - s_f) * (1 - (t - begin) / (end - begin)) ** 3``); masks are recomputed from
weight magnitudes every few steps and re-applied after every batch, so pruned weights stay zero.
``m:n`` structure keeps the m largest weights in every group of n along a kernel's input axis.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefleet.converter.convert.data import Dataset
from edgefleet.errors import UsageError

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True, kw_only=True)
class FineTuning:
    """The fine-tuning after pruning, when the data has labels (both kinds of pruning share it)."""

    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1:
            raise UsageError("--prune-epochs must be >= 0 and --batch-size >= 1")


@dataclass(frozen=True)
class PruneConfig(FineTuning):
    """How to prune: target, optional m:n structure, and the fine-tuning schedule when labels exist."""

    sparsity: float
    structure: tuple[int, int] | None = None
    initial_sparsity: float = 0.0
    end_fraction: float = 0.75  # the schedule reaches the target after this share of the steps
    updates: int = 10  # how many times the masks are recomputed on the way to the target
    power: int = 3

    def __post_init__(self) -> None:
        if not 0.0 < self.sparsity < 1.0:
            raise UsageError(f"--prune: sparsity must be between 0 and 1 (exclusive), got {self.sparsity:g}")
        if self.structure is not None:
            m, n = self.structure
            if not 0 < m < n:
                raise UsageError(f"--prune-structure: need 0 < M < N in M:N, got {m}:{n}")
        super().__post_init__()


@dataclass(frozen=True)
class LayerSparsity:
    """The sparsity one kernel reached (or why it was left dense)."""

    layer: str
    weight: str
    shape: tuple[int, ...]
    target: float
    reached: float
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON value."""
        return {"layer": self.layer, "weight": self.weight, "shape": list(self.shape), "target": self.target,
                "reached": round(self.reached, 4), "skipped": self.skipped}


@dataclass(frozen=True)
class PruneResult:
    """What pruning did: method, schedule, and per-kernel sparsity."""

    method: str  # "one-shot" or "fine-tune"
    target: float
    structure: str | None
    layers: tuple[LayerSparsity, ...]
    epochs: int = 0
    steps: int = 0

    @property
    def overall(self) -> float:
        """Fraction of zeros over all prunable kernels."""
        total = sum(math.prod(s.shape) for s in self.layers)
        return sum(s.reached * math.prod(s.shape) for s in self.layers) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON value for the report."""
        return {"method": self.method, "target": self.target, "structure": self.structure,
                "overall": round(self.overall, 4), "epochs": self.epochs, "steps": self.steps,
                "layers": [s.to_dict() for s in self.layers]}


@dataclass
class _Target:
    layer: str
    attr: str
    variable: Any
    input_axis: int | None  # axis m:n groups run along; None when the kernel has none (depthwise)
    skipped: str | None = None
    mask: NDArray[np.bool_] | None = None


def _kernel_table() -> list[tuple[type[Any], tuple[tuple[str, int | None], ...]]]:
    import keras

    layers = keras.layers
    return [
        (layers.Dense, (("kernel", 0),)),
        (layers.SeparableConv1D, (("depthwise_kernel", None), ("pointwise_kernel", -2))),
        (layers.SeparableConv2D, (("depthwise_kernel", None), ("pointwise_kernel", -2))),
        (layers.DepthwiseConv1D, (("kernel", None),)),
        (layers.DepthwiseConv2D, (("kernel", None),)),
        (layers.Conv1D, (("kernel", -2),)),
        (layers.Conv2D, (("kernel", -2),)),
        (layers.Conv3D, (("kernel", -2),)),
    ]


def _walk(model: Any) -> list[Any]:
    out = []
    for layer in getattr(model, "layers", []):
        out.append(layer)
        if getattr(layer, "layers", None):
            out.extend(_walk(layer))
    return out


def prunable_kernels(model: Any, structure: tuple[int, int] | None = None) -> list[_Target]:
    """The kernels pruning acts on, with the reason any of them is left alone under m:n structure."""
    table = _kernel_table()
    targets = []
    for layer in _walk(model):
        for cls, kernels in table:
            if isinstance(layer, cls):
                for attr, axis in kernels:
                    var = getattr(layer, attr, None)
                    if var is None:
                        continue
                    t = _Target(layer.name, attr, var, axis)
                    if structure is not None:
                        n = structure[1]
                        if axis is None:
                            t.skipped = "depthwise kernel has no input axis for m:n groups"
                        elif var.shape[axis] % n:
                            t.skipped = f"input axis of size {var.shape[axis]} is not a multiple of {n}"
                    targets.append(t)
                break
    return targets


def magnitude_mask(weights: NDArray[Any], sparsity: float) -> NDArray[np.bool_]:
    """Keep-mask zeroing exactly round(sparsity * size) of the smallest-magnitude weights."""
    k = int(round(sparsity * weights.size))
    mask = np.ones(weights.size, dtype=bool)
    if k > 0:
        mask[np.argpartition(np.abs(weights).ravel(), k - 1)[:k]] = False
    return mask.reshape(weights.shape)


def m_by_n_mask(weights: NDArray[Any], m: int, n: int, axis: int) -> NDArray[np.bool_]:
    """Keep-mask holding the m largest-magnitude weights of every group of n along `axis`."""
    moved = np.moveaxis(weights, axis, -1)
    groups = np.abs(moved).reshape(*moved.shape[:-1], moved.shape[-1] // n, n)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :m], True, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def polynomial_sparsity(step: int, begin: int, end: int, initial: float, final: float, power: int = 3) -> float:
    """The sparsity the schedule asks for at `step` (constant outside [begin, end])."""
    if end <= begin or step >= end:
        return final if step >= begin else initial
    if step <= begin:
        return initial
    frac = (step - begin) / (end - begin)
    return final + (initial - final) * (1.0 - frac) ** power


def _compute_masks(targets: list[_Target], sparsity: float, structure: tuple[int, int] | None) -> None:
    for t in targets:
        if t.skipped:
            continue
        w = np.asarray(t.variable.numpy())
        if structure is not None:
            t.mask = m_by_n_mask(w, structure[0], structure[1], t.input_axis)  # type: ignore[arg-type]
        else:
            t.mask = magnitude_mask(w, sparsity)


def _apply_masks(targets: list[_Target]) -> None:
    for t in targets:
        if t.mask is not None:
            t.variable.assign(np.asarray(t.variable.numpy()) * t.mask)


def _result(targets: list[_Target], config: PruneConfig, method: str, steps: int) -> PruneResult:
    target = 1.0 - config.structure[0] / config.structure[1] if config.structure else config.sparsity
    layers = []
    for t in targets:
        w = np.asarray(t.variable.numpy())
        layers.append(LayerSparsity(layer=t.layer, weight=t.attr, shape=tuple(int(d) for d in w.shape),
                                    target=0.0 if t.skipped else round(target, 4),
                                    reached=float(np.mean(w == 0)), skipped=t.skipped))
    structure = f"{config.structure[0]}:{config.structure[1]}" if config.structure else None
    return PruneResult(method=method, target=round(target, 4), structure=structure, layers=tuple(layers),
                       epochs=config.epochs if method == "fine-tune" else 0, steps=steps)


def _is_probabilities(model: Any, x: NDArray[Any]) -> bool:
    out = np.asarray(model.predict(x[:32], verbose=0))
    return bool(np.all(out >= 0) and np.all(out <= 1) and np.allclose(out.sum(axis=-1), 1.0, atol=1e-3))


def prune(model: Any, config: PruneConfig, data: Dataset | None = None,
          on_step: StepCallback | None = None) -> PruneResult:
    """Prune `model` in place; fine-tune under the schedule when `data` has labels, else one-shot."""
    targets = prunable_kernels(model, config.structure)
    if not targets:
        raise UsageError("--prune: the model has no Dense or Conv kernels to prune")
    if all(t.skipped for t in targets):
        raise UsageError(f"--prune-structure: no kernel can take it ({targets[0].skipped})")
    if data is None or data.y is None or config.epochs == 0:
        _compute_masks(targets, config.sparsity, config.structure)
        _apply_masks(targets)
        return _result(targets, config, "one-shot", 0)
    return _fine_tune(model, targets, config, data, on_step)


def fine_tune(model: Any, config: PruneConfig, data: Dataset, on_step: StepCallback | None = None) -> int:
    """Fine-tune `model` with the same loop, optimizer and loss as pruning, but no masks; return the steps.

    Structured pruning uses it after removing channels (the smaller model has no zeros to keep).
    """
    return _fine_tune(model, [], config, data, on_step).steps


def _fine_tune(model: Any, targets: list[_Target], config: PruneConfig, data: Dataset,
               on_step: StepCallback | None) -> PruneResult:
    import keras

    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total = steps_per_epoch * config.epochs
    end = max(1, int(total * config.end_fraction))
    every = max(1, end // max(1, config.updates))

    class MaskUpdate(keras.callbacks.Callback):  # type: ignore[misc]  # keras ships no types
        """Recompute masks on the schedule, re-apply them after every batch."""

        def __init__(self) -> None:
            super().__init__()
            self.step = 0

        def _update(self) -> None:
            s = polynomial_sparsity(self.step, 0, end, config.initial_sparsity, config.sparsity, config.power)
            _compute_masks(targets, s, config.structure)

        def on_train_begin(self, logs: Any = None) -> None:
            self._update()
            _apply_masks(targets)

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.step += 1
            if self.step <= end and (self.step % every == 0 or self.step == end):
                self._update()
            _apply_masks(targets)
            if on_step is not None:
                on_step(self.step, total)

    from_logits = not _is_probabilities(model, data.x)
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits))
    keras.utils.set_random_seed(config.seed)
    model.fit(data.x, data.y, batch_size=config.batch_size, epochs=config.epochs, shuffle=True,
              verbose=0, callbacks=[MaskUpdate()])
    # The last mask update happened at `end`; make sure the final target holds exactly.
    _compute_masks(targets, config.sparsity, config.structure)
    _apply_masks(targets)
    return _result(targets, config, "fine-tune", total)
