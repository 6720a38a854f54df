"""Input and output drift: the reference a bundle carries and the population stability index (docs/operations.md,
"Input drift").

The converter records, per model input, the distribution of the calibration data over a few quantile bins
(per feature for small inputs, per channel of the last axis otherwise), and the distribution of the
converted model's outputs on the same data (top-1 class frequencies for a classifier, quantile bins
otherwise). The agent bins sampled live values over the same edges and compares the two histograms with the
population stability index

    PSI = sum_i (p_i - q_i) ln(p_i / q_i)

(p: live frequencies, q: reference frequencies, both floored at `EPSILON`). Both halves bin with
`bin_counts`, so a value on an edge falls into the same bin on the workstation and on the board.

The reference travels inside the golden vectors (`golden.npz`, array `drift_reference`: the canonical
JSON's bytes), whose SHA-256 the signed deployment document carries: it is as trustworthy as the goldens,
agents that predate it ignore the extra array, and the retained deployment document does not grow.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from edgefleet.errors import ProtocolError
from edgefleet.protocol.canonical import canonical_json, parse_json
from edgefleet.protocol.schema import checked, dump, parse, positive

REFERENCE_SCHEMA = "edgefleet.drift-reference/1"
REFERENCE_ARRAY = "drift_reference"
"""The name of the array in golden.npz that holds the reference."""
BINS = 10
"""Quantile bins per channel: the deciles of the calibration data (fewer when values repeat)."""
MAX_CHANNELS = 64
"""Inputs with at most this many values per sample are binned per feature; larger ones per channel of the
last axis when it has at most this many, else as one channel. Bounds the reference to a few KB."""
MAX_CLASSES = 1000
"""A rank-2 output with 2 to this many scores is judged by its top-1 class frequencies."""
MAX_ROWS = 4096
"""Values binned per channel and sample at most (a large image is strided): bounds the agent's work."""
EPSILON = 1e-4
"""Floor of every frequency in the PSI: an empty bin on either side gives a large but finite term."""

Layout = Literal["feature", "channel", "tensor"]


@dataclass(frozen=True, kw_only=True)
class TensorReference:
    """The reference distribution of one input or output: its bins (or classes) and their frequencies."""

    name: str
    kind: Literal["bins", "top1"] = "bins"
    layout: Layout = "tensor"
    """How a sample's values become channels: every value its own channel (`feature`), one channel per
    index of the last axis (`channel`), or all values one channel (`tensor`). Unused for `top1`."""
    edges: tuple[tuple[float, ...], ...] = ()
    """Per channel, the interior bin edges, ascending and distinct: bin k holds edges[k-1] <= x < edges[k]."""
    freq: tuple[tuple[float, ...], ...] = ()
    """Per channel, the reference frequency of each bin (len(edges) + 1 of them), or for `top1` one row:
    the frequency of each class as the top-1 answer."""
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    """Per channel mean and standard deviation of the reference data (informational)."""

    def __post_init__(self) -> None:
        if self.kind == "top1":
            if len(self.freq) != 1 or len(self.freq[0]) < 2:
                raise ProtocolError(f"{self.name}: a top1 reference has one row of at least 2 class frequencies")
            return
        if len(self.edges) != len(self.freq) or not self.edges:
            raise ProtocolError(f"{self.name}: edges and freq need one row per channel")
        for e, f in zip(self.edges, self.freq, strict=True):
            if len(f) != len(e) + 1:
                raise ProtocolError(f"{self.name}: each channel has one frequency more than edges")
            if any(b <= a for a, b in zip(e, e[1:], strict=False)):
                raise ProtocolError(f"{self.name}: edges must be ascending and distinct")

    @property
    def channels(self) -> int:
        """Channels compared (1 for top1)."""
        return len(self.freq)

    @property
    def informative(self) -> NDArray[np.bool_]:
        """Channels whose reference spreads over at least two bins: a constant channel cannot show a shift
        through its edges, and averaging it in would only dilute the score."""
        return np.array([sum(1 for v in f if v > 0) >= 2 for f in self.freq], dtype=bool)


@dataclass(frozen=True, kw_only=True)
class DriftReference:
    """What the live traffic of a model is compared with."""

    schema: str = REFERENCE_SCHEMA
    samples: int = checked(positive)
    """Reference samples the frequencies were counted over."""
    inputs: tuple[TensorReference, ...] = ()
    outputs: tuple[TensorReference, ...] = ()
    bins: int = BINS
    source: dict[str, Any] = field(default_factory=dict)
    """Where the data came from (informational: the converter's data set and its sizes)."""

    def __post_init__(self) -> None:
        if self.schema != REFERENCE_SCHEMA:
            raise ProtocolError(f"schema: expected {REFERENCE_SCHEMA!r}, got {self.schema!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON value of this reference."""
        return dump(self)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, value: Any) -> DriftReference:
        """Strictly parse a reference."""
        return parse(cls, value)


# -- binning, shared by both halves -----------------------------------------------------------------

def layout_for(shape: Sequence[int]) -> Layout:
    """How a sample of this shape (batch dimension first, -1 for dynamic) is split into channels."""
    per_sample = [max(1, int(d)) for d in shape[1:]] if len(shape) > 1 else [1]
    size = int(np.prod(per_sample))
    if size <= MAX_CHANNELS:
        return "feature"
    if per_sample and 1 < per_sample[-1] <= MAX_CHANNELS:
        return "channel"
    return "tensor"


def channel_rows(x: NDArray[Any], layout: Layout) -> NDArray[np.float64]:
    """Values of stacked samples (axis 0) as rows x channels, at most MAX_ROWS rows per sample."""
    n = x.shape[0] if x.ndim else 1
    flat = np.asarray(x, dtype=np.float64).reshape(n, -1)
    if layout == "feature":
        return flat
    width = x.shape[-1] if layout == "channel" and x.ndim > 1 else 1
    per_sample = flat.shape[1] // width
    rows = flat.reshape(n, per_sample, width)
    if per_sample > MAX_ROWS:
        rows = rows[:, :: math.ceil(per_sample / MAX_ROWS)]
    return rows.reshape(-1, width)


def padded_edges(edges: Sequence[Sequence[float]]) -> NDArray[np.float64]:
    """Edges as a channels x max-edges matrix padded with +inf (a padded edge is never reached)."""
    width = max((len(e) for e in edges), default=0)
    out = np.full((len(edges), max(width, 1)), np.inf)
    for c, e in enumerate(edges):
        out[c, :len(e)] = e
    return out


def bin_counts(rows: NDArray[np.float64], edges: NDArray[np.float64]) -> NDArray[np.int64]:
    """Counts per channel and bin (channels x (max edges + 1)) of `rows` (rows x channels) over padded
    `edges`: a value's bin is the number of edges at or below it (numpy's searchsorted, side right)."""
    channels, width = edges.shape
    index = (rows[:, :, None] >= edges[None, :, :]).sum(axis=2)
    flat = index + np.arange(channels)[None, :] * (width + 1)
    return np.bincount(flat.ravel(), minlength=channels * (width + 1)).reshape(channels, width + 1)


def top1_counts(y: NDArray[Any], classes: int) -> NDArray[np.int64]:
    """How often each class is the top-1 answer over stacked outputs (any leading dims, classes last)."""
    flat = np.asarray(y).reshape(-1, y.shape[-1])
    return np.bincount(flat.argmax(axis=1), minlength=classes)[:classes].reshape(1, classes)


def psi(live: NDArray[Any], reference: NDArray[Any], eps: float = EPSILON) -> NDArray[np.float64]:
    """The population stability index per row of two count or frequency matrices of equal shape."""
    p = np.asarray(live, dtype=np.float64)
    q = np.asarray(reference, dtype=np.float64)
    p = np.maximum(p / np.maximum(p.sum(axis=-1, keepdims=True), 1e-300), eps)
    q = np.maximum(q / np.maximum(q.sum(axis=-1, keepdims=True), 1e-300), eps)
    return np.sum((p - q) * np.log(p / q), axis=-1)  # type: ignore[no-any-return]


def score(ref: TensorReference, counts: NDArray[Any]) -> float:
    """One input's or output's drift: the mean PSI over its informative channels (all when none is)."""
    values = psi(counts, reference_matrix(ref))
    mask = ref.informative
    chosen = values[mask] if mask.any() else values
    return float(np.mean(chosen))


def reference_matrix(ref: TensorReference) -> NDArray[np.float64]:
    """The reference frequencies as channels x bins, padded with zeros like `bin_counts`."""
    width = max(len(f) for f in ref.freq)
    out = np.zeros((len(ref.freq), width))
    for c, f in enumerate(ref.freq):
        out[c, :len(f)] = f
    return out


# -- building a reference (the converter) -------------------------------------------------------------

def quantile_edges(column: NDArray[np.float64], bins: int = BINS) -> tuple[float, ...]:
    """The distinct interior quantiles that cut `column` into `bins` bins of equal mass (fewer on ties)."""
    if column.size == 0:
        return (0.0,)
    qs = np.quantile(column, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    edges = tuple(float(f"{v:.6g}") for v in np.unique(qs))
    return edges or (float(column[0]),)


def tensor_reference(name: str, x: NDArray[Any], layout: Layout, bins: int = BINS) -> TensorReference:
    """The binned reference of stacked samples `x` (axis 0) of one tensor."""
    rows = channel_rows(x, layout)
    edges = tuple(quantile_edges(rows[:, c], bins) for c in range(rows.shape[1]))
    counts = bin_counts(rows, padded_edges(edges))
    total = max(len(rows), 1)
    freq = tuple(tuple(round(float(v) / total, 6) for v in counts[c, :len(e) + 1]) for c, e in enumerate(edges))
    return TensorReference(name=name, layout=layout, edges=edges, freq=freq,
                           mean=tuple(round(float(v), 6) for v in rows.mean(axis=0)),
                           std=tuple(round(float(v), 6) for v in rows.std(axis=0)))


def top1_reference(name: str, y: NDArray[Any]) -> TensorReference:
    """The reference of a classifier output: how often each class is the top-1 answer."""
    classes = int(y.shape[-1])
    counts = top1_counts(y, classes)[0]
    total = max(int(counts.sum()), 1)
    return TensorReference(name=name, kind="top1", freq=(tuple(round(float(v) / total, 6) for v in counts),))


def is_classifier(shape: Sequence[int]) -> bool:
    """Whether an output of this shape is judged by its top-1 class: [batch, classes] with 2..MAX_CLASSES."""
    return len(shape) == 2 and 2 <= int(shape[-1]) <= MAX_CLASSES


# -- carrying it --------------------------------------------------------------------------------------

def reference_array(ref: DriftReference) -> NDArray[np.uint8]:
    """The reference as the golden.npz array: the bytes of its canonical JSON."""
    return np.frombuffer(canonical_json(ref.to_dict()), dtype=np.uint8)


def load_reference(golden: bytes) -> DriftReference | None:
    """The reference inside golden.npz bytes, or None when the bundle has none (ProtocolError when it is
    there but malformed)."""
    try:
        with np.load(io.BytesIO(golden), allow_pickle=False) as npz:
            if REFERENCE_ARRAY not in npz.files:
                return None
            data = npz[REFERENCE_ARRAY]
    except (ValueError, OSError, EOFError) as err:
        raise ProtocolError(f"golden vectors: not a valid .npz file ({err})") from err
    if data.dtype != np.uint8 or data.ndim != 1:
        raise ProtocolError(f"{REFERENCE_ARRAY}: expected the bytes of a JSON document")
    return DriftReference.from_dict(parse_json(data.tobytes()))
