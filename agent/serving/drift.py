"""Drift of one served model: sampled live inputs and outputs binned over its bundle's reference, a sliding
window of counts, PSI scores, and the hysteresis that turns scores into DRIFT events (docs/operations.md,
"Input drift").

The request path pays one random draw per successful invoke and, for the sampled fraction, a copy of the
inputs into a bounded queue; the binning runs on the agent's loop thread (`update`), never while a
client waits. The window is kept in eighths: the counts of the newest eighth grow, and when it is full
the oldest eighth leaves, so the window covers between 7/8 and all of `window` samples with eight
count matrices per tensor, whatever the traffic.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefleet.agent.config import DriftConfig
from edgefleet.drift import (
    DriftReference,
    TensorReference,
    bin_counts,
    channel_rows,
    padded_edges,
    score,
    top1_counts,
)
from edgefleet.protocol.documents import ModelDrift, TensorSpec

log = logging.getLogger(__name__)

BLOCKS = 8
"""The window leaves in this many steps."""
PENDING = 64
"""Sampled requests waiting for the loop thread at most; more are dropped (the window is a sample anyway)."""
RECOVERY = 0.8
"""A score that crossed the threshold recovers when it falls below this fraction of it."""
OUTPUTS = "outputs"
"""The key of the outputs' score among the input names (in `drifting` and in events)."""



@dataclass(frozen=True)
class Crossing:
    """A score that crossed the threshold (drifted) or fell back below the recovery level."""

    key: str
    """An input's name, or OUTPUTS."""
    drifted: bool
    score: float
    samples: int


class _Tensor:
    """The window of one input or output: counts per block over the reference's bins."""

    def __init__(self, ref: TensorReference, spec: TensorSpec) -> None:
        self.ref = ref
        self.scale = (spec.quantization.scale, spec.quantization.zero_point) if spec.quantization else None
        self.edges = padded_edges(ref.edges) if ref.kind == "bins" else None
        width = self.edges.shape[1] + 1 if self.edges is not None else len(ref.freq[0])
        self.shape = (ref.channels, width)
        self.blocks: deque[NDArray[np.int64]] = deque([np.zeros(self.shape, dtype=np.int64)])
        self.total = np.zeros(self.shape, dtype=np.int64)

    def real(self, x: NDArray[Any]) -> NDArray[Any]:
        if self.scale is not None and x.dtype.kind in "iu":
            return (x.astype(np.float64) - self.scale[1]) * self.scale[0]
        return x

    def counts(self, x: NDArray[Any]) -> NDArray[np.int64] | None:
        """This batch's counts, or None when its shape does not fit the reference."""
        if x.ndim == 0 or x.dtype.kind not in "fiu":
            return None
        if self.edges is None:
            if x.shape[-1] != self.shape[1]:
                return None
            return top1_counts(x, self.shape[1])
        rows = channel_rows(self.real(x), self.ref.layout)
        if rows.shape[1] != self.shape[0]:
            return None
        return bin_counts(rows, self.edges)

    def add(self, counts: NDArray[np.int64], new_block: bool) -> None:
        if new_block:
            self.blocks.append(np.zeros(self.shape, dtype=np.int64))
            if len(self.blocks) > BLOCKS:
                self.total -= self.blocks.popleft()
        self.blocks[-1] += counts
        self.total += counts

    def score(self) -> float:
        return score(self.ref, self.total)


class DriftMonitor:
    """The drift of one served model version against its bundle's reference."""

    def __init__(self, reference: DriftReference, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                 output_names: Sequence[str], settings: DriftConfig, *, seed: int | None = None) -> None:
        """`output_names` name the outputs as the local API does, as the converter named them in the reference."""
        self.reference = reference
        self.settings = settings
        self.rate = settings.sample_rate
        self._random = random.Random(seed).random
        self._pending: deque[tuple[list[NDArray[Any]], list[NDArray[Any]]]] = deque(maxlen=PENDING)
        self._lock = threading.Lock()  # update() against figures() from API and telemetry threads
        if len(reference.inputs) != len(inputs):
            raise ValueError(f"the drift reference describes {len(reference.inputs)} inputs, the model has {len(inputs)}")
        self._inputs = [_Tensor(r, s) for r, s in zip(reference.inputs, inputs, strict=True)]
        index = {name: j for j, name in enumerate(output_names)}
        self._outputs = [(index[r.name], _Tensor(r, outputs[index[r.name]])) for r in reference.outputs
                         if r.name in index]
        self.samples = 0
        """Sampled instances in the window."""
        self._sizes: deque[int] = deque([0])
        """Instances per block, oldest first."""
        self.dropped = 0
        """Sampled requests dropped because the loop thread was behind."""
        self.drifting: set[str] = set()
        self._scores: dict[str, float | None] = {}

    # -- the request path ------------------------------------------------------------------------

    def offer(self, arrays: Sequence[NDArray[Any]], outputs: Sequence[NDArray[Any]]) -> None:
        """Called after a successful invoke (the caller holds the model's lock): keep a sampled copy."""
        if self._random() >= self.rate:
            return
        if len(self._pending) == PENDING:
            self.dropped += 1
        # the outputs are the interpreter's copies; the inputs may be the caller's, which it may reuse
        self._pending.append(([np.array(a) for a in arrays], list(outputs)))

    # -- the loop thread -------------------------------------------------------------------------

    def update(self) -> list[Crossing]:
        """Bin what was sampled since the last call, rescore, and return the thresholds crossed."""
        if not self._pending:
            return []
        block = max(1, self.settings.window // BLOCKS)
        with self._lock:
            while self._pending:
                arrays, outs = self._pending.popleft()
                if len(arrays) != len(self._inputs):
                    continue
                counts = [t.counts(x) for t, x in zip(self._inputs, arrays, strict=True)]
                out_counts = [t.counts(outs[j]) if j < len(outs) else None for j, t in self._outputs]
                if any(c is None for c in counts):
                    continue
                n = int(arrays[0].shape[0]) if arrays[0].ndim else 1
                new_block = self._sizes[-1] >= block
                if new_block:
                    self._sizes.append(0)
                    if len(self._sizes) > BLOCKS:
                        self.samples -= self._sizes.popleft()
                for t, c in zip(self._inputs, counts, strict=True):
                    assert c is not None
                    t.add(c, new_block)
                for (_, t), c in zip(self._outputs, out_counts, strict=True):
                    t.add(c if c is not None else np.zeros(t.shape, dtype=np.int64), new_block)
                self._sizes[-1] += n
                self.samples += n
            return self._judge()

    def _judge(self) -> list[Crossing]:
        scores: dict[str, float | None] = {}
        ready = self.samples >= self.settings.min_samples
        for t in self._inputs:
            scores[t.ref.name] = t.score() if ready else None
        outs = [t.score() for _, t in self._outputs] if ready else []
        scores[OUTPUTS] = max(outs) if outs else None
        self._scores = scores
        crossings = []
        threshold = self.settings.threshold
        for key, value in scores.items():
            if value is None:
                continue
            if key not in self.drifting and value >= threshold:
                self.drifting.add(key)
                crossings.append(Crossing(key, True, value, self.samples))
            elif key in self.drifting and value < RECOVERY * threshold:
                self.drifting.discard(key)
                crossings.append(Crossing(key, False, value, self.samples))
        return crossings

    def figures(self) -> ModelDrift:
        """The scores for telemetry, /metrics and status (null scores until the window holds min_samples)."""
        with self._lock:
            scores = dict(self._scores)
            return ModelDrift(
                inputs={t.ref.name: _r(scores.get(t.ref.name)) for t in self._inputs},
                outputs=_r(scores.get(OUTPUTS)), samples=self.samples,
                drifting=tuple(sorted(self.drifting)),
            )


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)
