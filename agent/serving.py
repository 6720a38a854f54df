"""The live models, one per name: atomic swaps, thread-safe invokes, caller-friendly pre/post-processing.

A model is loaded (and warmed up) before anything is locked, then published by replacing the
name -> model mapping in one assignment; readers never lock the mapping. Each model has one
interpreter behind one lock (an interpreter is not thread-safe). A request that already holds a
model's lock finishes on it; a request still waiting when the model is swapped out moves to the
new one, so a swap never fails or strands a request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from agent.errors import RequestError, RuntimeBackendError
from agent.protocol.documents import Deployment, TensorSpec
from agent.runtime import LoadedModel, load_model, warm_up
from agent.stats import ModelStats
from agent.tensors import dequantize, plan_input, prepare, short_name
from agent.tensors import top_k as top_k_labels

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 1024
_now = time.monotonic  # the clock of agent.stats: in_flight() start times are compared with it
_WAIT_SLICE_S = 0.05  # how often a request queued behind a busy model checks whether it was swapped


@dataclass(frozen=True)
class ServedModel:
    """What is being served under one name: the deployment, its version and live statistics."""

    name: str
    deployment: Deployment
    version: int
    stats: ModelStats
    loaded_at: float
    backend: str
    model_path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(slots=True)
class Prediction:
    """The answer to one request: outputs (batch dim first), top-k per instance when labelled, version.

    A plain (not frozen) dataclass: it is built on every request, and a frozen one costs microseconds.
    """

    name: str
    version: int
    outputs: list[NDArray[Any]]
    output_names: tuple[str, ...]
    top_k: list[list[dict[str, Any]]] | None = None
    raw: bool = False


class _Live:
    """One activated model: interpreter, lock, precomputed plans and statistics."""

    # slots keep the hot-path attributes in one compact object: after a large invoke has flushed the
    # CPU caches, every extra dict probe is a cache miss, measurable on a millisecond model
    __slots__ = ("model", "lock", "stats", "retired", "served", "in_idx", "out_idx", "n_in", "n_out", "in0",
                 "out0", "shapes", "set", "get", "invoke", "plans", "dynamic_batch", "aliases", "out_quant",
                 "labels", "top_k", "output_names", "quantized_out", "plain", "native0")

    def __init__(self, name: str, model: LoadedModel, path: Path, deployment: Deployment) -> None:
        self.model = model
        self.lock = threading.Lock()
        self.stats = ModelStats()
        self.retired = False
        self.served = ServedModel(
            name=name, deployment=deployment, version=deployment.model.version, stats=self.stats,
            loaded_at=time.time(), backend=model.backend, model_path=path,
            inputs=model.inputs, outputs=model.outputs,
        )
        it = model.interpreter
        self.in_idx = [d["index"] for d in it.get_input_details()]
        self.out_idx = [d["index"] for d in it.get_output_details()]
        self.n_in = len(self.in_idx)
        self.n_out = len(self.out_idx)
        self.in0 = self.in_idx[0]
        self.out0 = self.out_idx[0]
        self.shapes = [tuple(int(v) for v in d["shape"]) for d in it.get_input_details()]
        self.set = it.set_tensor
        self.get = it.get_tensor
        self.invoke = it.invoke
        self.plans = [plan_input(s, deployment) for s in model.inputs]
        self.dynamic_batch = all(p.rank == 0 or p.dynamic_batch for p in self.plans)
        first = self.plans[0]
        # the dtype a lone input can be passed in untouched (None: it always needs conversion)
        self.plain = first.dtype if len(self.plans) == 1 and first.mean is None else None
        self.native0 = first.dtype.kind != "f" and first.scale is not None
        self.aliases: dict[str, int] = {}
        for i, s in enumerate(model.inputs):
            self.aliases.setdefault(s.name, i)
            self.aliases.setdefault(short_name(s.name), i)
        self.out_quant = [(s.quantization.scale, s.quantization.zero_point) if s.quantization else None
                          for s in model.outputs]
        self.quantized_out = any(q is not None for q in self.out_quant)
        post = deployment.model.postprocessing
        self.labels = post.labels
        self.top_k = post.top_k
        self.output_names = tuple(short_name(s.name) for s in model.outputs)

    def resize(self, i: int, shape: tuple[int, ...]) -> None:
        """Resize input `i` for a new batch size (or other dynamic dimension); caller holds the lock."""
        expected = self.plans[i].spec.shape
        if len(shape) != len(expected) or any(e not in (-1, s) for e, s in zip(expected, shape, strict=True)):
            raise RequestError(f"input {short_name(self.plans[i].spec.name)}: shape {list(shape)} does not fit "
                               f"the model's {list(expected)}")
        it = self.model.interpreter
        it.resize_tensor_input(self.in_idx[i], list(shape))
        it.allocate_tensors()
        self.shapes = [tuple(int(v) for v in d["shape"]) for d in it.get_input_details()]

    def warm_up(self) -> None:
        """Invoke once on zeros (agent.runtime.warm_up, which validation has already run in its child)."""
        with self.lock:
            warm_up(self.model.interpreter)


class Serving:
    """Holds the live model per name and runs requests against it."""

    def __init__(self, backend: str = "auto", num_threads: int | None = None, use_xnnpack: bool = True,
                 *, max_batch: int = DEFAULT_MAX_BATCH, warm_up: bool = True) -> None:
        self.backend = backend
        self.num_threads = num_threads
        self.use_xnnpack = use_xnnpack
        self.max_batch = max_batch
        self._warm_up = warm_up
        self._live: dict[str, _Live] = {}
        self._swap_lock = threading.Lock()

    # -- the set of models -------------------------------------------------------------------

    def activate(self, name: str, model_path: Path, deployment: Deployment) -> None:
        """Load `model_path` and make it the model served as `name`; requests in flight finish on the old one."""
        model = load_model(model_path, self.backend, num_threads=self.num_threads, use_xnnpack=self.use_xnnpack)
        live = _Live(name, model, Path(model_path), deployment)
        if [(s.dtype, s.shape) for s in model.inputs] != [(s.dtype, s.shape) for s in deployment.model.inputs]:
            log.warning("model %s v%s: interpreter inputs %s differ from the deployment's", name,
                        deployment.model.version, [(s.dtype, s.shape) for s in model.inputs])
        if self._warm_up:
            try:
                live.warm_up()
            except Exception as err:  # the interpreter raises RuntimeError/ValueError on a failing invoke
                raise RuntimeBackendError(f"model {name} v{deployment.model.version} fails on zeros: {err}") from err
        with self._swap_lock:
            old = self._live.get(name)
            self._live = {**self._live, name: live}
        if old is not None:
            old.retired = True
        log.info("serving %s v%s (%s) from %s", name, deployment.model.version, model.backend, model_path)

    def deactivate(self, name: str) -> None:
        """Stop serving `name` (nothing happens when it is not served); requests in flight finish."""
        with self._swap_lock:
            old = self._live.get(name)
            if old is None:
                return
            self._live = {k: v for k, v in self._live.items() if k != name}
        old.retired = True

    def names(self) -> list[str]:
        """Names of the models being served, sorted."""
        return sorted(self._live)

    def served(self, name: str) -> ServedModel | None:
        """What is served as `name`, or None."""
        live = self._live.get(name)
        return live.served if live is not None else None

    def _lookup(self, name: str) -> _Live:
        live = self._live.get(name)
        if live is None:
            if not self._live:
                raise RequestError("no model is loaded yet", 503)
            raise RequestError(f"unknown model {name!r}; serving: {', '.join(sorted(self._live))}", 404)
        return live

    # -- running requests ----------------------------------------------------------------------

    def predict_raw(self, name: str, arrays: Sequence[NDArray[Any]]) -> list[NDArray[Any]]:
        """Run arrays already in the model's dtypes and shapes; return its raw outputs (the fast path)."""
        live = self._live.get(name)
        if live is None:
            live = self._lookup(name)
        return self._run(name, live, arrays)[1]

    def _run(self, name: str, live: _Live, arrays: Sequence[NDArray[Any]]) -> tuple[_Live, list[NDArray[Any]]]:
        """One invoke on `live` (or on the model that replaced it while we queued); return which ran it."""
        lock = live.lock
        if not lock.acquire(False):
            live = self._wait(name, live)
            lock = live.lock
        try:
            if len(arrays) != live.n_in:
                raise RequestError(f"model {name} takes {live.n_in} input(s), got {len(arrays)}")
            if live.n_in == 1:
                x = arrays[0]
                if x.shape != live.shapes[0]:
                    live.resize(0, x.shape)
                try:
                    live.set(live.in0, x)
                except ValueError as err:
                    raise _set_error(err) from err
            else:
                self._set_all(live, arrays)
            stats = live.stats
            started = stats.started
            t0 = _now()
            started[0] = t0
            try:
                live.invoke()
                if live.n_out == 1:
                    outs = [live.get(live.out0)]
                else:
                    get = live.get
                    outs = [get(index) for index in live.out_idx]
            except Exception as err:  # an invoke failure is the model's, not the caller's
                _failed(live, t0)
                raise RuntimeBackendError(f"model {name} v{live.served.version}: invoke failed: {err}") from err
            t1 = _now()
            started[0] = 0.0
            stats.add_serialised(t1 - t0, True, t1)  # the model's lock serialises its writers
            return live, outs
        finally:
            lock.release()

    @staticmethod
    def _set_all(live: _Live, arrays: Sequence[NDArray[Any]]) -> None:
        if live.n_in == 1:
            x = arrays[0]
            if x.shape != live.shapes[0]:
                live.resize(0, x.shape)
            try:
                live.set(live.in0, x)
            except ValueError as err:
                raise _set_error(err) from err
            return
        for i, (index, x) in enumerate(zip(live.in_idx, arrays, strict=True)):
            if x.shape != live.shapes[i]:
                live.resize(i, x.shape)
            try:
                live.set(index, x)
            except ValueError as err:
                raise _set_error(err) from err

    def _wait(self, name: str, live: _Live) -> _Live:
        """Block until `live`, or the model that replaced it while we waited, is free; return it locked.

        A request that has not started yet never runs on a model already swapped out: the old model
        may be the one being rolled back for hanging or failing.
        """
        while True:
            if live.lock.acquire(timeout=_WAIT_SLICE_S):
                if not live.retired:
                    return live
                live.lock.release()
            if live.retired:
                live = self._lookup(name)

    def predict(self, name: str, inputs: Sequence[Any] | Mapping[str, Any] | NDArray[Any], *, raw: bool = False,
                batch_dim: bool = False, top_k: bool = True) -> Prediction:
        """Run a request: values in signature order, a dict by input name, or one array; batch dim first.

        Float values are normalised as the deployment says and quantized for integer models; a value
        already in a quantized model's own dtype goes in untouched, and then (or with `raw`) outputs
        stay in the model's dtype, else they are dequantized. A value one rank short is taken as a
        single instance unless `batch_dim` demands the batch dimension. `top_k=False` skips the
        labelled top-k (for callers that return only the raw outputs).
        """
        live = self._lookup(name)
        if live.plain is not None and isinstance(inputs, (list, tuple)) and len(inputs) == 1:
            x = inputs[0]
            # the common case (one array already in the model's dtype, C order, no normalisation, the
            # interpreter's current shape) skips every conversion
            if type(x) is np.ndarray and x.dtype == live.plain and x.shape == live.shapes[0] and \
                    x.flags.c_contiguous and (x.ndim == 0 or 0 < x.shape[0] <= self.max_batch):
                ran, outs = self._run(name, live, [x])
                if ran is live or ran.plain == x.dtype:  # a model swapped in meanwhile took it as it was
                    return self._finish(ran, outs, raw or ran.native0, top_k)
                return self.predict(name, inputs, raw=raw, batch_dim=batch_dim, top_k=top_k)
        arrays, n, native = prepare(live.plans, live.aliases, inputs, self.max_batch, batch_dim)
        whole = live.dynamic_batch or _whole_batch(live, n)
        lock = live.lock
        if not lock.acquire(False):
            moved = self._wait(name, live)
            if moved is not live:  # swapped while we waited: prepare again, the signature may differ
                moved.lock.release()
                return self.predict(name, inputs, raw=raw, batch_dim=batch_dim, top_k=top_k)
        try:
            if whole:
                outs = self._invoke_locked(live, arrays)
            else:  # a fixed batch of one: invoke per instance, all under one lock so one model answers
                parts = [self._invoke_locked(live, [x[i:i + 1] if p.rank else x
                                                    for x, p in zip(arrays, live.plans, strict=True)])
                         for i in range(n)]
                outs = [np.concatenate(c) for c in zip(*parts, strict=True)]
        finally:
            lock.release()
        return self._finish(live, outs, raw or native, top_k)

    @staticmethod
    def _finish(live: _Live, outs: list[NDArray[Any]], keep_raw: bool, top_k: bool) -> Prediction:
        if live.quantized_out and not keep_raw:
            outs = [dequantize(y, q) for y, q in zip(outs, live.out_quant, strict=True)]
        top = None
        if top_k and live.labels is not None:
            q = live.out_quant[0]
            top = top_k_labels(dequantize(outs[0], q) if keep_raw else outs[0], live.labels, live.top_k)
        return Prediction(name=live.served.name, version=live.served.version, outputs=outs,
                          output_names=live.output_names, top_k=top, raw=keep_raw)

    def _invoke_locked(self, live: _Live, arrays: Sequence[NDArray[Any]]) -> list[NDArray[Any]]:
        self._set_all(live, arrays)
        stats = live.stats
        t0 = _now()
        stats.started[0] = t0
        try:
            live.invoke()
            outs = [live.get(live.out0)] if live.n_out == 1 else [live.get(index) for index in live.out_idx]
        except Exception as err:  # an invoke failure is the model's, not the caller's
            _failed(live, t0)
            raise RuntimeBackendError(
                f"model {live.served.name} v{live.served.version}: invoke failed: {err}") from err
        t1 = _now()
        stats.started[0] = 0.0
        stats.add_serialised(t1 - t0, True, t1)
        return outs


def _failed(live: _Live, t0: float) -> None:
    t1 = _now()
    live.stats.started[0] = 0.0
    live.stats.add_serialised(t1 - t0, False, t1)


def _set_error(err: ValueError) -> RequestError:
    return RequestError(str(err).replace("Cannot set tensor: ", "").strip())


def _whole_batch(live: _Live, n: int) -> bool:
    """Whether a batch of `n` fits the model in one invoke; raise RequestError when it fits no way."""
    plans = live.plans
    if all(p.rank == 0 or p.dynamic_batch or p.spec.shape[0] == n for p in plans):
        return True
    if all(p.rank == 0 or p.spec.shape[0] == 1 for p in plans):
        return False
    fixed = sorted({p.spec.shape[0] for p in plans if p.rank})
    raise RequestError(f"model {live.served.name} takes batches of exactly {fixed[0]}; got {n} instances")
