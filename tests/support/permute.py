"""A classifier with its classes in another order: the same weights, the last layer's rows permuted in the
TFLite file itself (no TensorFlow), so every answer names another class than the original's."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgefleet.runtime import load_model


def permute_classes(data: bytes, perm: Sequence[int]) -> bytes:
    """`data` with output class `i` answered at position `perm[i]`: the constant weight (and bias) tensors
    whose first dimension is the number of classes have their rows moved; the file keeps its size."""
    it = load_model(data).interpreter
    classes = int(it.get_output_details()[0]["shape"][-1])
    assert sorted(perm) == list(range(classes)), "perm must reorder every class"
    inverse = np.argsort(np.asarray(perm))
    out = bytearray(data)
    moved = 0
    for d in it.get_tensor_details():
        shape = tuple(int(v) for v in d["shape"])
        if not shape or shape[0] != classes or len(shape) > 2:
            continue
        try:
            value = it.get_tensor(d["index"])
        except ValueError:  # not a constant: no data before allocation
            continue
        raw = value.tobytes()
        at = bytes(out).find(raw)
        if at < 0 or bytes(out).find(raw, at + 1) >= 0:
            continue
        out[at:at + len(raw)] = np.ascontiguousarray(value[inverse]).tobytes()
        moved += 1
    assert moved, "no class-sized constant tensor found"
    return bytes(out)
