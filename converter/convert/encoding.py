"""Choosing between dense and sparse (``EXPERIMENTAL_SPARSITY``) encoding of a pruned model.

The sparse file is kept only when it is smaller on disk, no larger on the wire, and it loads, invokes
and matches the dense model in the runtime the agent serves with (LiteRT, XNNPACK on). LiteRT 2.3, for
one, cannot delegate int8 sparse FULLY_CONNECTED to XNNPACK and fails at invoke: that model must lose.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefleet.protocol import split
from edgefleet.runtime import load_model

RunCheck = Callable[[bytes], "str | None"]


@dataclass(frozen=True)
class EncodingDecision:
    """Which encoding was kept and why, with both sizes."""

    chosen: str  # "dense" or "sparse"
    reason: str
    dense_bytes: int
    dense_wire_bytes: int
    sparse_bytes: int | None = None
    sparse_wire_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON value."""
        return asdict(self)


def wire_size(model: bytes) -> int:
    """Bytes on the wire: the sum of the chunk payloads as published."""
    return split(model)[0].wire_size


def choose_encoding(dense: bytes, sparse: bytes | None, check: RunCheck,
                    absent: str = "no pruning, so no sparse candidate") -> tuple[bytes, EncodingDecision]:
    """Keep `sparse` when it is smaller and `check` finds no problem with it; otherwise `dense`, saying why
    (`absent` says why there is no sparse candidate)."""
    dense_wire = wire_size(dense)
    if sparse is None:
        return dense, EncodingDecision("dense", absent, len(dense), dense_wire)
    sparse_wire = wire_size(sparse)

    def decide(chosen: str, reason: str) -> EncodingDecision:
        return EncodingDecision(chosen, reason, len(dense), dense_wire, len(sparse), sparse_wire)

    if len(sparse) >= len(dense) or sparse_wire > dense_wire:
        return dense, decide("dense", f"sparse encoding is not smaller ({len(sparse)} vs {len(dense)} bytes on disk, "
                                      f"{sparse_wire} vs {dense_wire} on the wire)")
    problem = check(sparse)
    if problem is not None:
        return dense, decide("dense", f"sparse encoding fails in the serving runtime, fell back to dense: {problem}")
    return sparse, decide("sparse", f"sparse encoding saves {len(dense) - len(sparse)} bytes on disk and "
                                    f"{dense_wire - sparse_wire} on the wire, and gives the same outputs")


def runs_like(dense: bytes, samples: Sequence[list[NDArray[Any]]], *, use_xnnpack: bool = True) -> RunCheck:
    """A check that a candidate loads, invokes on `samples` and matches `dense` within the golden tolerance."""
    from edgefleet.converter.bundle.writer import tolerance_for

    def check(candidate: bytes) -> str | None:
        reference = load_model(dense, "auto", use_xnnpack=use_xnnpack)
        try:
            model = load_model(candidate, "auto", use_xnnpack=use_xnnpack)
            got = [model.run(s) for s in samples]
        except Exception as err:  # load errors are RuntimeBackendError; invoke errors RuntimeError
            return _first_line(err)
        want = [reference.run(s) for s in samples]
        for g_list, w_list in zip(got, want, strict=True):
            tol = tolerance_for(reference.outputs, w_list)
            for g, w in zip(g_list, w_list, strict=False):
                if g.shape != w.shape or not np.allclose(g.astype(np.float64), w.astype(np.float64),
                                                         atol=tol.atol, rtol=tol.rtol):
                    return "outputs differ from the dense model beyond tolerance"
        return None

    return check


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]
