"""Shadow runs: a candidate model answers a sampled share of live requests beside the active model, off
the request path (docs/architecture.md, "The update lifecycle"; docs/operations.md, "Shadow probation").

The request thread only draws a random number and, for a sampled request, copies its inputs onto a
bounded queue (dropped, never waited for, when the queue is full): the client's answer never waits
for the candidate. One worker thread per shadow run takes the copies, runs the candidate, and compares
its outputs with the ones the active model returned to the client: top-1 agreement when the output is
a class score vector, else a tolerance per value. It also times the candidate's invokes, so the
lifecycle can weigh them against the active model's. The lifecycle reads `ShadowRunner.figures` and
decides; this module only measures.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefleet.tensors import beyond_tolerance, dequantize

log = logging.getLogger(__name__)

_LATENCIES_KEPT = 4096
_POLL_S = 0.2

Quant = tuple[float, int] | None
RunCandidate = Callable[[Any, bool], tuple[list[NDArray[Any]], float]]
"""Runs the candidate on a request's inputs (as the caller sent them, and whether they carry the batch
dimension); returns its outputs as real values and the seconds its invoke took."""


@dataclass(frozen=True)
class Comparator:
    """How the candidate's outputs are compared with the active model's on one request.

    `classes`: the (active, candidate) indices of the class score outputs, when both deployments
    label one: then the request agrees when every instance's top-1 class is the same, by label name
    when both have labels (a label list in another order is a disagreement, as the client would see
    it). Otherwise every output must match within `tolerances` (atol, rtol per candidate output).
    """

    classes: tuple[int, int] | None = None
    active_labels: tuple[str, ...] | None = None
    candidate_labels: tuple[str, ...] | None = None
    tolerances: tuple[tuple[float, float], ...] = ()

    def agree(self, active: Sequence[NDArray[Any]], candidate: Sequence[NDArray[Any]]) -> bool:
        """Whether the candidate's real-valued outputs agree with the active model's."""
        if self.classes is not None:
            i, j = self.classes
            if i >= len(active) or j >= len(candidate):
                return False
            a, c = np.asarray(active[i]), np.asarray(candidate[j])
            if a.shape != c.shape or a.ndim == 0:
                return False
            top_a, top_c = np.argmax(a, axis=-1), np.argmax(c, axis=-1)
            if self.active_labels and self.candidate_labels:
                names_a = np.asarray(self.active_labels, dtype=object)[top_a]
                names_c = np.asarray(self.candidate_labels, dtype=object)[top_c]
                return bool(np.all(names_a == names_c))
            return bool(np.all(top_a == top_c))
        if len(active) != len(candidate):
            return False
        for k, (a, c) in enumerate(zip(active, candidate, strict=True)):
            a, c = np.asarray(a), np.asarray(c)
            if a.shape != c.shape:
                return False
            atol, rtol = self.tolerances[k] if k < len(self.tolerances) else (1e-4, 1e-3)
            if a.dtype.kind in "fiub" and c.dtype.kind in "fiub":
                if bool(np.any(beyond_tolerance(c, a, atol, rtol))):
                    return False
            elif not np.array_equal(a, c):
                return False
        return True


@dataclass(frozen=True)
class ShadowFigures:
    """What a shadow run measured so far."""

    deployment_id: str
    samples: int
    """Requests the candidate answered or failed on, each compared."""
    agreed: int
    errors: int
    """Requests on which the candidate's invoke failed (counted as disagreements too)."""
    dropped: int
    """Sampled requests dropped because the queue was full."""
    elapsed_s: float
    candidate_p50_ms: float | None = None
    active_p50_ms: float | None = None
    """The active model's median invoke time over the same period (its own statistics)."""
    last_error: str | None = None

    @property
    def agreement(self) -> float | None:
        """Share of compared requests that agreed (None before the first)."""
        return self.agreed / self.samples if self.samples else None

    @property
    def latency_ratio(self) -> float | None:
        """The candidate's median invoke time over the active model's (None until both are known)."""
        if self.candidate_p50_ms is None or not self.active_p50_ms:
            return None
        return self.candidate_p50_ms / self.active_p50_ms


def copy_inputs(inputs: Any) -> Any:
    """The request's inputs, detached from buffers a caller may reuse once answered."""
    if isinstance(inputs, np.ndarray):
        return inputs.copy()
    if isinstance(inputs, Mapping):
        return {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return [v.copy() if isinstance(v, np.ndarray) else v for v in inputs]
    return inputs


class ShadowRunner:
    """One candidate shadowing the active model of one name: the sampling tap, the queue and the worker."""

    def __init__(self, deployment_id: str, against: str, run: RunCandidate, comparator: Comparator, *,
                 sample_rate: float, queue_size: int, active_p50_ms: Callable[[float], float | None] | None = None,
                 draw: Callable[[], float] = random.random, clock: Callable[[], float] = time.monotonic,
                 on_stop: Callable[[], None] | None = None) -> None:
        self.deployment_id = deployment_id
        """The candidate's deployment."""
        self.against = against
        """The deployment id of the active model whose requests are sampled."""
        self.sample_rate = sample_rate
        self._run = run
        self.comparator = comparator
        self._active_p50 = active_p50_ms
        self._draw = draw
        self._clock = clock
        self._on_stop = on_stop
        self._queue: queue.Queue[tuple[Any, bool, list[NDArray[Any]], Sequence[Quant]]] = queue.Queue(queue_size)
        self._lock = threading.Lock()
        self._samples = 0
        self._agreed = 0
        self._errors = 0
        self._dropped = 0
        self._last_error: str | None = None
        self._latencies: deque[float] = deque(maxlen=_LATENCIES_KEPT)
        self._started = clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name=f"shadow-{deployment_id}", daemon=True)

    def start(self) -> None:
        """Start the worker thread."""
        self._started = self._clock()
        self._thread.start()

    def offer(self, inputs: Any, batch_dim: bool, outputs: list[NDArray[Any]], quant: Sequence[Quant]) -> None:
        """Called on the request thread after the active model answered: maybe queue a copy, never wait."""
        if self._draw() >= self.sample_rate:
            return
        try:
            self._queue.put_nowait((copy_inputs(inputs), batch_dim, outputs, quant))
        except queue.Full:
            self._dropped += 1  # a lost increment under a race only under-counts drops

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                inputs, batch_dim, outputs, quant = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            self.compare(inputs, batch_dim, outputs, quant)

    def compare(self, inputs: Any, batch_dim: bool, outputs: list[NDArray[Any]], quant: Sequence[Quant]) -> bool:
        """Run the candidate on one sampled request and count the comparison; whether it agreed."""
        try:
            answer, seconds = self._run(inputs, batch_dim)
        except Exception as err:  # a failing candidate is a disagreeing one
            with self._lock:
                self._samples += 1
                self._errors += 1
                self._last_error = (str(err).splitlines() or [type(err).__name__])[0][:200]
            return False
        active = [dequantize(y, q) for y, q in zip(outputs, quant, strict=False)]
        try:
            agreed = self.comparator.agree(active, answer)
        except Exception:  # outputs that do not compare (shapes, dtypes) disagree
            log.debug("shadow %s: outputs do not compare", self.deployment_id, exc_info=True)
            agreed = False
        with self._lock:
            self._samples += 1
            self._agreed += agreed
            self._latencies.append(seconds)
        return agreed

    def figures(self) -> ShadowFigures:
        """The counts and latencies so far."""
        with self._lock:
            samples, agreed, errors, dropped = self._samples, self._agreed, self._errors, self._dropped
            latencies = list(self._latencies)
            last_error = self._last_error
        elapsed = self._clock() - self._started
        cand = float(np.median(latencies)) * 1000.0 if latencies else None
        active = self._active_p50(elapsed) if self._active_p50 is not None else None
        return ShadowFigures(deployment_id=self.deployment_id, samples=samples, agreed=agreed, errors=errors,
                             dropped=dropped, elapsed_s=elapsed, candidate_p50_ms=cand, active_p50_ms=active,
                             last_error=last_error)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the worker and let go of the candidate (a hung invoke keeps only its daemon thread)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._run = _stopped
        if self._on_stop is not None:
            self._on_stop()
            self._on_stop = None


def _stopped(inputs: Any, batch_dim: bool) -> tuple[list[NDArray[Any]], float]:
    raise RuntimeError("shadow run stopped")
