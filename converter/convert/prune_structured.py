"""Structured pruning: whole Conv filters and Dense units removed, the smaller Keras model rebuilt.

Magnitude pruning (``converter/convert/prune.py``) leaves the tensors their shapes, so the interpreter still
runs dense kernels over zeros; removing whole output channels makes every kernel smaller, and the
model cheaper to run on any CPU.

Saliency: the L1 norm of each filter's (or unit's) kernel weights over the input channels that are
kept (Li et al., "Pruning Filters for Efficient ConvNets", 2017). In every eligible layer the
``round(fraction * n)`` filters with the smallest norm go (at least one stays); biases follow
their filter. The layers after it are sliced to match: BatchNormalization parameters, depthwise
kernels (depth multiplier 1) and the next Conv/Dense kernel's input axis; through Flatten the kept
channel positions repeat at every spatial position, through global pooling they become the kept
features.

What is pruned: ``Conv1D``/``Conv2D`` (channels_last, ``groups=1``) and ``Dense`` layers of a
Sequential or functional model whose output reaches, through the layers above and channel-wise
layers (activations, dropout, pooling, padding, cropping, upsampling), only Conv/Dense layers that
can take fewer inputs. A layer is left whole, with the reason in the result, when its output is (or
flows unchanged into) a model output (so the outputs keep their shape: the last Dense is never
pruned), or reaches anything else: ``Add``, ``Concatenate``, ``Multiply``, ``Reshape``, layer or
group normalisation, ``PReLU``, a nested model, a layer used twice, channels_first layers.

With labelled data the smaller model is then fine-tuned with the loop magnitude pruning uses
(``edgefleet.converter.convert.prune.fine_tune``); without labels the pruning is one-shot.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefleet.converter.convert.data import Dataset
from edgefleet.converter.convert.prune import FineTuning, PruneConfig, fine_tune
from edgefleet.converter.errors import ConversionError
from edgefleet.errors import UsageError

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class StructuredConfig(FineTuning):
    """How much to remove from every eligible layer, and the fine-tuning that follows."""

    fraction: float

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise UsageError(f"--prune-channels: fraction must be between 0 and 1 (exclusive), got {self.fraction:g}")
        super().__post_init__()


@dataclass(frozen=True)
class LayerChannels:
    """One Conv/Dense layer: its output channels before and after, or why it was left whole."""

    layer: str
    kind: str  # "filters" or "units"
    before: int
    after: int
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON value."""
        return {"layer": self.layer, "kind": self.kind, "before": self.before, "after": self.after,
                "skipped": self.skipped}


@dataclass(frozen=True)
class StructuredResult:
    """What structured pruning did: per layer channels, parameters before and after, fine-tuning."""

    fraction: float
    method: str  # "one-shot" or "fine-tune"
    layers: tuple[LayerChannels, ...]
    params_before: int
    params_after: int
    epochs: int = 0
    steps: int = 0
    saliency: str = "l1"

    @property
    def pruned_layers(self) -> int:
        """Layers that lost channels."""
        return sum(1 for layer in self.layers if layer.skipped is None)

    def to_dict(self) -> dict[str, Any]:
        """JSON value for the report."""
        return {"fraction": self.fraction, "method": self.method, "saliency": self.saliency,
                "params_before": self.params_before, "params_after": self.params_after,
                "epochs": self.epochs, "steps": self.steps, "layers": [layer.to_dict() for layer in self.layers]}


# ------------------------------------------------------------------------------------------------ graph


def _types() -> dict[str, tuple[type, ...]]:
    import keras

    L = keras.layers
    return {
        # exact types: subclasses (custom layers) may compute something else with the same weights
        "producer": (L.Conv1D, L.Conv2D, L.Dense),
        # element-wise or per-channel over the last axis with no weights: channels pass through
        "passthrough": (L.Activation, L.ReLU, L.LeakyReLU, L.ELU, L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D,
                        L.SpatialDropout3D, L.GaussianNoise, L.GaussianDropout, L.AlphaDropout,
                        L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D, L.AveragePooling1D, L.AveragePooling2D,
                        L.AveragePooling3D, L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D, L.Cropping1D,
                        L.Cropping2D, L.Cropping3D, L.UpSampling1D, L.UpSampling2D, L.UpSampling3D,
                        L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
                        L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D),
        "per_channel": (L.BatchNormalization, L.DepthwiseConv1D, L.DepthwiseConv2D),
        "flatten": (L.Flatten,),
    }


@dataclass
class _Graph:
    """The model's own call graph: layers in topological order, their parents, children and call count."""

    order: list[Any]
    parents: dict[int, list[Any]]
    children: dict[int, list[Any]]
    calls: dict[int, int]
    outputs: set[int]

    def uses(self, layer: Any) -> int:
        return self.calls.get(id(layer), 0)


def _graph(model: Any) -> _Graph:
    # A layer's own _inbound_nodes also hold the calls of other models that used it, and a Sequential
    # model adds nodes each time it rebuilds itself; the nodes of this model's graph are the truth.
    graph = model._functional if hasattr(model, "_functional") else model
    by_depth = graph._nodes_by_depth
    order: list[Any] = []
    parents: dict[int, list[Any]] = {}
    children: dict[int, list[Any]] = {}
    calls: dict[int, int] = {}
    for depth in sorted(by_depth, reverse=True):  # inputs have the largest depth
        for node in by_depth[depth]:
            layer = node.operation
            calls[id(layer)] = calls.get(id(layer), 0) + 1
            if calls[id(layer)] == 1:
                order.append(layer)
            ins = [t._keras_history.operation for t in node.input_tensors]
            parents.setdefault(id(layer), []).extend(ins)
            for parent in ins:
                children.setdefault(id(parent), []).append(layer)
    outputs = {id(t._keras_history.operation) for t in graph.outputs}
    return _Graph(order, parents, children, calls, outputs)


def _channels_last(layer: Any) -> bool:
    return getattr(layer, "data_format", "channels_last") == "channels_last"


def _last_axis(layer: Any) -> bool:
    axis = getattr(layer, "axis", -1)
    rank = len(layer.input.shape)
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return len(axes) == 1 and axes[0] in (-1, rank - 1)


def _why_not_consumer(layer: Any, graph: _Graph, kinds: dict[str, tuple[type, ...]]) -> str | None:
    """None when `layer` takes a channel-sliced input unchanged in meaning; else the reason it cannot."""
    kind = type(layer)
    name = f"{layer.name} ({kind.__name__})"
    if graph.uses(layer) != 1:
        return f"feeds {name}, which is used more than once"
    if kind in kinds["producer"]:
        if not _channels_last(layer) or getattr(layer, "groups", 1) != 1:
            return f"feeds {name}, which is channels_first or grouped"
        return None
    if kind in kinds["passthrough"] or kind in kinds["flatten"]:
        return None if _channels_last(layer) else f"feeds {name}, which is channels_first"
    if kind is kinds["per_channel"][0]:  # BatchNormalization
        return None if _last_axis(layer) else f"feeds {name}, which normalises another axis"
    if kind in kinds["per_channel"]:  # depthwise
        if getattr(layer, "depth_multiplier", 1) != 1 or not _channels_last(layer):
            return f"feeds {name}, whose depth multiplier is not 1 or which is channels_first"
        return None
    return f"feeds {name}, which structured pruning does not slice"


@dataclass
class _Plan:
    """Keep-masks over the last axis: each pruned producer's output, and each layer's input."""

    out_keep: dict[str, NDArray[Any]] = field(default_factory=dict)
    in_keep: dict[str, NDArray[Any]] = field(default_factory=dict)


def _walk(producer: Any, graph: _Graph, kinds: dict[str, tuple[type, ...]]) -> str | None:
    """Why `producer`'s channels cannot be removed, or None when every path ends in a consumer."""
    frontier = [producer]
    while frontier:
        layer = frontier.pop()
        if id(layer) in graph.outputs:
            return "its output is a model output" if layer is producer else f"flows into the model output {layer.name}"
        for child in graph.children.get(id(layer), []):
            reason = _why_not_consumer(child, graph, kinds)
            if reason is not None:
                return reason
            if type(child) not in kinds["producer"]:
                frontier.append(child)
    return None


def _l1_keep(kernel: NDArray[Any], in_keep: NDArray[Any] | None, in_axis: int, fraction: float) -> NDArray[Any]:
    """Keep-mask over the output axis (last): drop round(fraction * n) filters with the smallest L1 norm."""
    if in_keep is not None:
        kernel = np.compress(in_keep, kernel, axis=in_axis)
    n = kernel.shape[-1]
    norms = np.abs(kernel).reshape(-1, n).sum(axis=0)
    keep_n = max(1, n - int(round(fraction * n)))
    keep = np.zeros(n, dtype=bool)
    keep[np.sort(np.argsort(-norms, kind="stable")[:keep_n])] = True
    return keep


def _propagate(layer: Any, mask: NDArray[Any], kinds: dict[str, tuple[type, ...]]) -> NDArray[Any]:
    """The keep-mask over `layer`'s output last axis, given the one over its input's."""
    if type(layer) in kinds["flatten"]:
        shape = layer.input.shape
        spatial = math.prod(int(d) for d in shape[1:-1])
        return np.tile(mask, spatial)  # channels_last flattening: channel index runs fastest
    return mask


def plan(model: Any, fraction: float) -> tuple[_Plan, list[LayerChannels]]:
    """Which channels each layer keeps, and the per-layer record (with reasons for layers left whole)."""
    import keras

    # Subclassed models have no graph to follow; Sequential and functional models do.
    if not (isinstance(model, keras.Sequential) or type(model).__name__ == "Functional"):
        raise UsageError("--prune-channels needs a Sequential or functional Keras model")
    kinds = _types()
    graph = _graph(model)
    out = _Plan()
    records: list[LayerChannels] = []
    for layer in graph.order:
        parents = graph.parents.get(id(layer), [])
        in_mask = out.out_keep.get(parents[0].name) if len(parents) == 1 else None
        if in_mask is not None:
            out.in_keep[layer.name] = in_mask
            if type(layer) not in kinds["producer"]:
                out.out_keep[layer.name] = _propagate(layer, in_mask, kinds)
        if type(layer) not in kinds["producer"]:
            if isinstance(layer, keras.Model):
                log.debug("structured pruning leaves the nested model %s whole", layer.name)
            continue
        kind = "units" if isinstance(layer, keras.layers.Dense) else "filters"
        n = int(layer.kernel.shape[-1])
        reason = None
        if graph.uses(layer) != 1:
            reason = "the layer is used more than once"
        elif not _channels_last(layer) or getattr(layer, "groups", 1) != 1:
            reason = "channels_first or grouped convolution"
        else:
            reason = _walk(layer, graph, kinds)
        if reason is None and n - max(1, n - int(round(fraction * n))) == 0:
            reason = f"{round(fraction * n)} of {n} {kind} round to none"
        if reason is not None:
            records.append(LayerChannels(layer.name, kind, n, n, reason))
            continue
        kernel = np.asarray(layer.kernel.numpy())
        keep = _l1_keep(kernel, in_mask, kernel.ndim - 2, fraction)
        out.out_keep[layer.name] = keep
        records.append(LayerChannels(layer.name, kind, n, int(keep.sum())))
    return out, records


# ---------------------------------------------------------------------------------------------- rebuild


def _sliced_weights(layer: Any, weights: list[NDArray[Any]], in_keep: NDArray[Any] | None,
                    out_keep: NDArray[Any] | None, kinds: dict[str, tuple[type, ...]]) -> list[NDArray[Any]]:
    if type(layer) in kinds["producer"]:
        kernel, rest = weights[0], weights[1:]
        in_axis = kernel.ndim - 2  # Dense (in, out), Conv1D (k, in, out), Conv2D (kh, kw, in, out)
        if in_keep is not None:
            kernel = np.compress(in_keep, kernel, axis=in_axis)
        if out_keep is not None:
            kernel = np.compress(out_keep, kernel, axis=-1)
            rest = [np.compress(out_keep, w, axis=-1) for w in rest]
        return [kernel, *rest]
    if in_keep is None:
        return weights
    if type(layer) is kinds["per_channel"][0]:  # BatchNormalization: gamma, beta, mean, variance
        return [np.compress(in_keep, w, axis=-1) for w in weights]
    if type(layer) in kinds["per_channel"]:  # depthwise kernel (..., channels, 1) and bias (channels,)
        kernel, rest = weights[0], weights[1:]
        return [np.compress(in_keep, kernel, axis=-2), *(np.compress(in_keep, w, axis=-1) for w in rest)]
    return weights


def rebuild(model: Any, layout: _Plan) -> Any:
    """A new model with the planned channels removed and the remaining weights copied in."""
    import keras

    kinds = _types()

    def clone(layer: Any) -> Any:
        config = layer.get_config()
        keep = layout.out_keep.get(layer.name)
        if keep is not None and type(layer) in kinds["producer"]:
            config["units" if "units" in config else "filters"] = int(keep.sum())
        return layer.__class__.from_config(config)

    try:
        smaller = keras.models.clone_model(model, clone_function=clone)
    except Exception as err:  # Keras raises ValueError/TypeError for models it cannot re-trace
        raise UsageError(f"--prune-channels: cannot rebuild the model ({type(err).__name__}: {err})") from err
    new_layers = {layer.name: layer for layer in smaller.layers}
    for layer in model.layers:
        weights = [np.asarray(w) for w in layer.get_weights()]
        if not weights:
            continue
        target = new_layers.get(layer.name)
        if target is None:
            raise ConversionError(f"--prune-channels: layer {layer.name} is missing from the rebuilt model")
        out_keep = layout.out_keep.get(layer.name) if type(layer) in kinds["producer"] else None
        new = _sliced_weights(layer, weights, layout.in_keep.get(layer.name), out_keep, kinds)
        want = [tuple(w.shape) for w in target.get_weights()]
        if [w.shape for w in new] != want:
            raise ConversionError(f"--prune-channels: layer {layer.name}: sliced weights "
                                  f"{[list(w.shape) for w in new]} do not fit the rebuilt {[list(s) for s in want]}")
        target.set_weights(new)
    return smaller


def count_params(model: Any) -> int:
    """Weights of the model (trainable and not)."""
    return int(sum(math.prod(int(d) for d in w.shape) for w in model.weights))


def prune_channels(model: Any, config: StructuredConfig, data: Dataset | None = None,
                   on_step: StepCallback | None = None) -> tuple[Any, StructuredResult]:
    """The smaller model and what was removed; fine-tuned when `data` has labels and epochs > 0.

    The input model is left unchanged. UsageError when no layer can lose channels.
    """
    layout, records = plan(model, config.fraction)
    if not any(r.skipped is None for r in records):
        reasons = "; ".join(f"{r.layer}: {r.skipped}" for r in records) or "it has no Conv1D, Conv2D or Dense layer"
        raise UsageError(f"--prune-channels: no layer can lose filters or units ({reasons})")
    smaller = rebuild(model, layout)
    steps = 0
    method = "one-shot"
    if data is not None and data.y is not None and config.epochs > 0:
        steps = fine_tune(smaller, PruneConfig(sparsity=config.fraction, epochs=config.epochs,
                                               batch_size=config.batch_size, learning_rate=config.learning_rate,
                                               seed=config.seed), data, on_step)
        method = "fine-tune"
    result = StructuredResult(fraction=config.fraction, method=method, layers=tuple(records),
                              params_before=count_params(model), params_after=count_params(smaller),
                              epochs=config.epochs if method == "fine-tune" else 0, steps=steps)
    log.info("structured pruning: %d of %d layers pruned, %d -> %d weights", result.pruned_layers,
             len(records), result.params_before, result.params_after)
    return smaller, result
