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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefleet.agent.serving.drift import DriftMonitor
from edgefleet.agent.serving.shadow import Comparator, ShadowFigures, ShadowRunner
from edgefleet.agent.serving.stats import ModelStats
from edgefleet.errors import RequestError, RuntimeBackendError
from edgefleet.protocol.documents import Deployment, TensorSpec
from edgefleet.runtime import LoadedModel, load_model, warm_up
from edgefleet.tensors import (
    dequantize,
    distinct_names,
    labelled_output,
    plan_input,
    prepare,
    short_name,
    signature_names,
)
from edgefleet.tensors import top_k as top_k_labels

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 1024
_now = time.monotonic  # the clock of edgefleet.agent.serving.stats: in_flight() start times are compared with it
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
    input_names: tuple[str, ...] = ()
    """Caller-facing input names, in `inputs` order (edgefleet.tensors.distinct_names)."""
    output_names: tuple[str, ...] = ()
    """Caller-facing output names, in `outputs` order: distinct even when the tensors' short names collide."""
    labelled_output: int | None = None
    """Index of the output the deployment's labels belong to, or None when it has no labels (or none fits)."""


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
                 "labels", "top_k", "output_names", "quantized_out", "plain", "native0", "good", "reload",
                 "label_out", "drift")

    def __init__(self, name: str, model: LoadedModel, path: Path, deployment: Deployment,
                 reload: Callable[[], LoadedModel] | None = None) -> None:
        self.model = model
        self.reload = reload
        """Builds a fresh interpreter of the same model, for when a failure may have left this one unusable."""
        self.lock = threading.Lock()
        self.stats = ModelStats()
        self.retired = False
        self.drift: DriftMonitor | None = None
        """Samples this model's live traffic for drift while it is the active version (agent/serving/drift.py)."""
        it = model.interpreter
        in_details = it.get_input_details()
        input_names = distinct_names(model.inputs, signature_names(it, "inputs"))
        self.output_names = distinct_names(model.outputs, signature_names(it, "outputs"))
        post = deployment.model.postprocessing
        self.labels = post.labels
        self.top_k = post.top_k
        self.label_out = labelled_output(model.outputs, self.output_names, post.labels, post.output)
        if post.labels and self.label_out is None:
            log.warning("model %s v%s: no output fits the %d labels (postprocessing.output %s); no top-k",
                        name, deployment.model.version, len(post.labels), post.output)
        self.served = ServedModel(
            name=name, deployment=deployment, version=deployment.model.version, stats=self.stats,
            loaded_at=time.time(), backend=model.backend, model_path=path,
            inputs=model.inputs, outputs=model.outputs, input_names=input_names, output_names=self.output_names,
            labelled_output=self.label_out,
        )
        self.in_idx = [d["index"] for d in it.get_input_details()]
        self.out_idx = [d["index"] for d in it.get_output_details()]
        self.n_in = len(self.in_idx)
        self.n_out = len(self.out_idx)
        self.in0 = self.in_idx[0]
        self.out0 = self.out_idx[0]
        self.shapes = [tuple(int(v) for v in d["shape"]) for d in in_details]
        self.good = list(self.shapes)
        """The input shapes of the last invoke that worked: what a failed request restores."""
        self.set = it.set_tensor
        self.get = it.get_tensor
        self.invoke = it.invoke
        self.plans = [plan_input(s, deployment) for s in model.inputs]
        for plan, label in zip(self.plans, input_names, strict=True):
            plan.label = label  # errors name an input as callers do
        self.dynamic_batch = all(p.rank == 0 or p.dynamic_batch for p in self.plans)
        first = self.plans[0]
        # the dtype a lone input can be passed in untouched (None: it always needs conversion)
        self.plain = first.dtype if len(self.plans) == 1 and first.mean is None else None
        self.native0 = first.dtype.kind != "f" and first.scale is not None
        self.aliases: dict[str, int] = {}
        for i, s in enumerate(model.inputs):
            self.aliases.setdefault(s.name, i)
            self.aliases.setdefault(input_names[i], i)
            self.aliases.setdefault(short_name(s.name), i)
        self.out_quant = [(s.quantization.scale, s.quantization.zero_point) if s.quantization else None
                          for s in model.outputs]
        self.quantized_out = any(q is not None for q in self.out_quant)

    def check_shapes(self, arrays: Sequence[NDArray[Any]]) -> bool:
        """Whether the interpreter must be resized for `arrays`; RequestError (nothing touched) when one
        cannot fit the model. The caller holds the lock."""
        resize = False
        for i, x in enumerate(arrays):
            shape = x.shape
            if shape != self.shapes[i]:
                expected = self.plans[i].spec.shape
                if len(shape) != len(expected) or any(e not in (-1, s) for e, s in zip(expected, shape, strict=True)):
                    raise RequestError(f"input {self.plans[i].label}: shape {list(shape)} does not fit "
                                       f"the model's {list(expected)}")
                resize = True
        return resize

    def resize(self, arrays: Sequence[NDArray[Any]]) -> None:
        """Give every input its array's shape, then allocate once.

        Allocating after each input would plan the graph with inputs of different batch sizes, which
        a multi-input model rejects (XNNPACK: "failed to reshape"), leaving the interpreter unusable.
        """
        it = self.model.interpreter
        for i, x in enumerate(arrays):
            if x.shape != self.shapes[i]:
                it.resize_tensor_input(self.in_idx[i], list(x.shape))
        self.shapes = [tuple(x.shape) for x in arrays]
        it.allocate_tensors()

    def restore(self) -> None:
        """After a failed resize or invoke: a fresh interpreter in the last good shapes (caller holds the lock).

        Resizing the failed interpreter back is not enough: after a failed allocation, tflite-runtime
        can crash the process on the next one. The model file is already validated; loading it again
        costs about what one activation does, and only failed requests pay it.
        """
        if self.reload is None:  # an in-process caller without a model file: put the shapes back in place
            try:
                it = self.model.interpreter
                for i, shape in enumerate(self.good):
                    it.resize_tensor_input(self.in_idx[i], list(shape))
                it.allocate_tensors()
                self.shapes = list(self.good)
            except Exception:
                log.exception("model %s: could not restore the input shapes after a failure", self.served.name)
            return
        try:
            model = self.reload()
            it = model.interpreter
            default = [tuple(int(v) for v in d["shape"]) for d in it.get_input_details()]
            if self.good != default:
                for i, shape in enumerate(self.good):
                    it.resize_tensor_input(self.in_idx[i], list(shape))
                it.allocate_tensors()
        except Exception:  # the old interpreter stays: the next request decides whether it still works
            log.exception("model %s v%s: could not rebuild the interpreter after a failure", self.served.name,
                          self.served.version)
            return
        self.model = model
        self.set, self.get, self.invoke = it.set_tensor, it.get_tensor, it.invoke
        self.shapes = list(self.good)

    def warm_up(self) -> None:
        """Invoke once on zeros (edgefleet.runtime.warm_up, which validation has already run in its child)."""
        with self.lock:
            warm_up(self.model.interpreter)


@dataclass(frozen=True)
class Roles:
    """What the lifecycle says about the versions of one model name (read by version-addressed requests)."""

    on_probation: bool
    """The active version is a canary: it has not passed probation yet."""
    previous: tuple[int, Path, Deployment] | None = None
    """The rollback target (version, model file, deployment), or None."""


class Serving:
    """Holds the live model per name (and the previous one, while it is the rollback target) and runs
    requests against them."""

    def __init__(self, backend: str = "auto", num_threads: int | None = None, use_xnnpack: bool = True,
                 *, max_batch: int = DEFAULT_MAX_BATCH, warm_up: bool = True, keep_previous: bool = True,
                 keep_previous_max_mb: float = 256.0, roles: Callable[[str], Roles | None] | None = None,
                 drift: Callable[[str, Deployment, tuple[str, ...]], DriftMonitor | None] | None = None) -> None:
        self.drift = drift
        """Builds the drift monitor of an activated model (name, deployment, output names), or None."""
        self.backend = backend
        self.num_threads = num_threads
        self.use_xnnpack = use_xnnpack
        self.max_batch = max_batch
        self._warm_up = warm_up
        self._live: dict[str, _Live] = {}
        self._swap_lock = threading.Lock()
        self.keep_previous = keep_previous
        """Keep the model a new version replaced loaded, so it answers by version and label and a
        rollback to it swaps without loading (runtime.keep_previous_loaded)."""
        self.keep_previous_max_mb = keep_previous_max_mb
        """Largest model file kept loaded beside the active one (runtime.keep_previous_max_mb)."""
        self.roles = roles
        """Which version is on probation and which is the rollback target; None: no lifecycle (tests, CLI)."""
        self._kept: dict[str, _Live] = {}
        self._shadows: dict[str, ShadowRunner] = {}
        """Candidates shadowing the active model, per name; replaced whole, read without a lock."""
        self._load_lock = threading.Lock()  # one on-demand load of a previous version at a time

    # -- the set of models -------------------------------------------------------------------

    def activate(self, name: str, model_path: Path, deployment: Deployment) -> None:
        """Load `model_path` and make it the model served as `name`; requests in flight finish on the old one.

        When the model is the one kept loaded as the previous version (a rollback), it is swapped back
        in without loading.
        """
        kept = self._kept.get(name)
        if kept is not None and kept.served.deployment.deployment_id == deployment.deployment_id and \
                kept.served.model_path == Path(model_path):
            live = kept
        else:
            live = self._load(name, model_path, deployment)
        self.stop_shadow(name)  # it compared against the model being replaced
        with self._swap_lock:
            old = self._live.get(name)
            self._live = {**self._live, name: live}
            live.retired = False
            if live.drift is None and self.drift is not None:
                live.drift = self.drift(name, deployment, live.output_names)
            if self._kept.get(name) is live:
                del self._kept[name]
            if old is not None and self._keepable(old, live):
                self._kept[name] = old
        if old is not None:
            old.retired = True
        log.info("serving %s v%s (%s) from %s%s", name, deployment.model.version, live.served.backend, model_path,
                 " (kept loaded, no reload)" if live is kept else "")

    def _load(self, name: str, model_path: Path, deployment: Deployment) -> _Live:
        model = load_model(model_path, self.backend, num_threads=self.num_threads, use_xnnpack=self.use_xnnpack)

        def reload() -> LoadedModel:
            return load_model(model_path, model.backend, num_threads=self.num_threads, use_xnnpack=self.use_xnnpack)

        live = _Live(name, model, Path(model_path), deployment, reload)
        if [(s.dtype, s.shape) for s in model.inputs] != [(s.dtype, s.shape) for s in deployment.model.inputs]:
            log.warning("model %s v%s: interpreter inputs %s differ from the deployment's", name,
                        deployment.model.version, [(s.dtype, s.shape) for s in model.inputs])
        if self._warm_up:
            try:
                live.warm_up()
            except Exception as err:  # the interpreter raises RuntimeError/ValueError on a failing invoke
                raise RuntimeBackendError(f"model {name} v{deployment.model.version} fails on zeros: {err}") from err
        return live

    def _keepable(self, old: _Live, new: _Live) -> bool:
        """Whether the model `new` replaces stays loaded as the previous version."""
        if not self.keep_previous or old.served.version == new.served.version:
            return False
        try:
            size = old.served.model_path.stat().st_size
        except OSError:
            return False
        return size <= self.keep_previous_max_mb * (1 << 20)

    def deactivate(self, name: str) -> None:
        """Stop serving `name` (nothing happens when it is not served); requests in flight finish."""
        self.stop_shadow(name)
        with self._swap_lock:
            self._kept.pop(name, None)
            old = self._live.get(name)
            if old is None:
                return
            self._live = {k: v for k, v in self._live.items() if k != name}
        old.retired = True

    def sync(self) -> None:
        """Unload every kept model that is no longer its name's rollback target (called periodically)."""
        if self.roles is None:
            return
        for name, kept in list(self._kept.items()):
            if self._is_target(name, kept) is None:
                with self._swap_lock:
                    if self._kept.get(name) is kept:
                        del self._kept[name]
                log.info("model %s: v%s unloaded (no longer the rollback target)", name, kept.served.version)

    def drift_monitor(self, name: str) -> DriftMonitor | None:
        """The drift monitor of the version served as `name`, or None (no reference, or not served)."""
        live = self._live.get(name)
        return live.drift if live is not None else None

    def names(self) -> list[str]:
        """Names of the models being served, sorted."""
        return sorted(self._live)

    def served(self, name: str) -> ServedModel | None:
        """What is served as `name`, or None."""
        live = self._live.get(name)
        return live.served if live is not None else None

    def version_labels(self, name: str) -> dict[str, int]:
        """Label -> version for `name`: `stable`, `canary` and the deployments' own labels (404 when not served).

        While a version is on probation it is `canary` and the rollback target is `stable`; otherwise
        the active version is `stable`. A user label on both versions names the active one.
        """
        live = self._lookup(name)
        roles = self.roles(name) if self.roles is not None else None
        prev = roles.previous if roles is not None else None
        labels: dict[str, int] = {}
        if prev is not None:
            for label in prev[2].policy.version_labels or ():
                labels[label] = prev[0]
        for label in live.served.deployment.policy.version_labels or ():
            labels[label] = live.served.version
        if roles is not None and roles.on_probation:
            labels["canary"] = live.served.version
            if prev is not None:
                labels["stable"] = prev[0]
        else:
            labels["stable"] = live.served.version
        return labels

    def versions(self, name: str) -> list[ServedModel]:
        """Every version of `name` that answers requests: the active one, then the previous one when it is
        loaded and still the rollback target (404 when `name` is not served)."""
        live = self._lookup(name)
        out = [live.served]
        kept = self._kept.get(name)
        if kept is not None and self._is_target(name, kept) is not None:
            out.append(kept.served)
        return out

    def rollback_target(self, name: str) -> tuple[int, Path, Deployment] | None:
        """The version a rollback of `name` would restore (version, model file, deployment), if known."""
        if self.roles is None:
            kept = self._kept.get(name)
            return (kept.served.version, kept.served.model_path, kept.served.deployment) if kept else None
        roles = self.roles(name)
        return roles.previous if roles is not None else None

    def _is_target(self, name: str, kept: _Live) -> tuple[int, Path, Deployment] | None:
        target = self.rollback_target(name)
        if target is None or target[0] != kept.served.version or target[1] != kept.served.model_path:
            return None
        return target

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> ServedModel:
        """What answers for `name` at `version` or `label` (RequestError 404 when nothing does)."""
        return self._resolve(name, version, label).served

    def _resolve(self, name: str, version: int | None, label: str | None) -> _Live:
        live = self._lookup(name)
        if label is not None:
            labels = self.version_labels(name)
            if label not in labels:
                known = ", ".join(f"{k} (v{v})" for k, v in sorted(labels.items()))
                raise RequestError(f"model {name!r} has no version labelled {label!r}; labels: {known}", 404)
            version = labels[label]
        if version is None or version == live.served.version:
            return live
        target = self.rollback_target(name)
        if target is None or target[0] != version:
            served = ", ".join(f"v{m.version}" for m in self.versions(name))
            raise RequestError(f"model {name!r} version {version} is not served (serving {served})", 404)
        kept = self._kept.get(name)
        if kept is not None and self._is_target(name, kept) is not None:
            return kept
        if not self.keep_previous:
            raise RequestError(f"model {name!r} version {version} is the rollback target but is not kept loaded "
                               "(runtime.keep_previous_loaded = false)", 404)
        with self._load_lock:  # loaded on first use: after a restart, or when the agent started without it
            kept = self._kept.get(name)
            if kept is not None and self._is_target(name, kept) is not None:
                return kept
            _, path, doc = target
            try:
                size = path.stat().st_size
            except OSError as err:
                raise RequestError(f"model {name!r} version {version}: its file is gone ({err.strerror})",
                                   404) from err
            if size > self.keep_previous_max_mb * (1 << 20):
                raise RequestError(f"model {name!r} version {version} is the rollback target but is not kept "
                                   f"loaded: {size >> 20} MB is above runtime.keep_previous_max_mb", 404)
            try:
                kept = self._load(name, path, doc)
            except RuntimeBackendError as err:
                raise RequestError(f"model {name!r} version {version} does not load: {err}", 503) from err
            kept.retired = True  # never takes over a request that was waiting for the active model
            with self._swap_lock:
                if self._live.get(name) is live:
                    self._kept[name] = kept
            return kept

    # -- shadow runs (agent/serving/shadow.py) -------------------------------------------------

    def start_shadow(self, name: str, model_path: Path, deployment: Deployment, *, sample_rate: float,
                     queue_size: int, atol: float | None = None, rtol: float | None = None) -> None:
        """Load `model_path` beside the active model of `name` and have it answer a sampled share of the
        requests the active model serves, off the request path.

        RequestError when nothing is served as `name`; RuntimeBackendError when the candidate does not
        load. `atol`/`rtol` replace the candidate's golden tolerances for outputs that are not class scores.
        """
        active = self._lookup(name)
        cand = self._load(name, model_path, deployment)
        cand.retired = True  # never takes over a request waiting for the active model
        spec = deployment.model
        tolerances = tuple(
            (atol if atol is not None else spec.output_tolerance(i).atol,
             rtol if rtol is not None else spec.output_tolerance(i).rtol)
            if i < len(spec.outputs) else (atol or 1e-4, rtol or 1e-3)
            for i in range(cand.n_out))
        classes = (active.label_out, cand.label_out) if active.label_out is not None and \
            cand.label_out is not None else None
        comparator = Comparator(classes=classes, active_labels=active.labels, candidate_labels=cand.labels,
                                tolerances=tolerances)
        max_batch = self.max_batch

        def run(inputs: Any, batch_dim: bool) -> tuple[list[NDArray[Any]], float]:
            arrays, n, _ = prepare(cand.plans, cand.aliases, inputs, max_batch, batch_dim)
            whole = cand.dynamic_batch or _whole_batch(cand, n)
            with cand.lock:
                t0 = _now()
                if whole:
                    outs = _invoke(cand, arrays)
                else:
                    parts = [_invoke(cand, [x[i:i + 1] if p.rank else x for x, p in
                                            zip(arrays, cand.plans, strict=True)]) for i in range(n)]
                    outs = [np.concatenate(c) for c in zip(*parts, strict=True)]
                seconds = _now() - t0
            return [dequantize(y, q) for y, q in zip(outs, cand.out_quant, strict=True)], seconds

        def active_p50(window_s: float) -> float | None:
            current = self._live.get(name)
            if current is None:
                return None
            return current.stats.snapshot(max(window_s, 1.0)).p50_ms

        runner = ShadowRunner(deployment.deployment_id, active.served.deployment.deployment_id, run, comparator,
                              sample_rate=sample_rate, queue_size=queue_size, active_p50_ms=active_p50)
        runner.start()
        with self._swap_lock:
            old = self._shadows.get(name)
            self._shadows = {**self._shadows, name: runner}
        if old is not None:
            old.stop()
        log.info("model %s: v%s shadows v%s on %.0f%% of requests", name, spec.version, active.served.version,
                 100 * sample_rate)

    def stop_shadow(self, name: str) -> None:
        """End the shadow run of `name`, if any, and unload its candidate."""
        with self._swap_lock:
            runner = self._shadows.get(name)
            if runner is None:
                return
            self._shadows = {k: v for k, v in self._shadows.items() if k != name}
        runner.stop()
        log.info("model %s: shadow run of %s ended, candidate unloaded", name, runner.deployment_id)

    def shadow_figures(self, name: str) -> ShadowFigures | None:
        """What the shadow run of `name` measured so far (None: none runs)."""
        runner = self._shadows.get(name)
        return runner.figures() if runner is not None else None

    def _offer(self, name: str, live: _Live, inputs: Any, batch_dim: bool, outs: list[NDArray[Any]]) -> None:
        """A request the active model answered: the shadow run of `name` may sample it."""
        runner = self._shadows.get(name)
        if runner is not None and runner.against == live.served.deployment.deployment_id:
            runner.offer(inputs, batch_dim, outs, live.out_quant)

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
        ran, outs = self._run(name, live, arrays)
        if self._shadows:
            self._offer(name, ran, list(arrays), True, outs)
        return outs

    def _run(self, name: str, live: _Live, arrays: Sequence[NDArray[Any]]) -> tuple[_Live, list[NDArray[Any]]]:
        """One invoke on `live` (or on the model that replaced it while we queued); return which ran it."""
        lock = live.lock
        if not lock.acquire(False):
            live = self._wait(name, live)
            lock = live.lock
        try:
            if len(arrays) != live.n_in:
                raise RequestError(f"model {name} takes {live.n_in} input(s), got {len(arrays)}")
            return live, _invoke(live, arrays)
        finally:
            lock.release()

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
                batch_dim: bool = False, top_k: bool = True, version: int | None = None,
                label: str | None = None) -> Prediction:
        """Run a request: values in signature order, a dict by input name, or one array; batch dim first.

        Float values are normalised as the deployment says and quantized for integer models; a value
        already in a quantized model's own dtype goes in untouched, and then (or with `raw`) outputs
        stay in the model's dtype, else they are dequantized. A value one rank short is taken as a
        single instance unless `batch_dim` demands the batch dimension. `top_k=False` skips the
        labelled top-k (for callers that return only the raw outputs). `version` or `label` address
        a version (the active one, or the previous one while it is the rollback target).
        """
        if version is None and label is None:
            live = self._lookup(name)
            pinned = False
        else:
            live = self._resolve(name, version, label)
            pinned = live is not self._live.get(name)  # the previous version: runs even though not active
        if live.plain is not None and not pinned and isinstance(inputs, (list, tuple)) and len(inputs) == 1:
            x = inputs[0]
            # the common case (one array already in the model's dtype, C order, no normalisation, the
            # interpreter's current shape) skips every conversion
            if type(x) is np.ndarray and x.dtype == live.plain and x.shape == live.shapes[0] and \
                    x.flags.c_contiguous and (x.ndim == 0 or 0 < x.shape[0] <= self.max_batch):
                ran, outs = self._run(name, live, [x])
                if self._shadows:
                    self._offer(name, ran, inputs, batch_dim, outs)
                if ran is live or ran.plain == x.dtype:  # a model swapped in meanwhile took it as it was
                    return self._finish(ran, outs, raw or ran.native0, top_k)
                return self.predict(name, inputs, raw=raw, batch_dim=batch_dim, top_k=top_k, version=version,
                                    label=label)
        arrays, n, native = prepare(live.plans, live.aliases, inputs, self.max_batch, batch_dim)
        whole = live.dynamic_batch or _whole_batch(live, n)
        lock = live.lock
        if pinned:
            lock.acquire()
        elif not lock.acquire(False):
            moved = self._wait(name, live)
            if moved is not live:  # swapped while we waited: prepare again, the signature may differ
                moved.lock.release()
                return self.predict(name, inputs, raw=raw, batch_dim=batch_dim, top_k=top_k, version=version,
                                    label=label)
        try:
            if whole:
                outs = _invoke(live, arrays)
            else:  # a fixed batch of one: invoke per instance, all under one lock so one model answers
                parts = [_invoke(live, [x[i:i + 1] if p.rank else x for x, p in zip(arrays, live.plans, strict=True)])
                         for i in range(n)]
                outs = [np.concatenate(c) for c in zip(*parts, strict=True)]
        finally:
            lock.release()
        if self._shadows and not pinned:
            self._offer(name, live, inputs, batch_dim, outs)
        return self._finish(live, outs, raw or native, top_k)

    @staticmethod
    def _finish(live: _Live, outs: list[NDArray[Any]], keep_raw: bool, top_k: bool) -> Prediction:
        if live.quantized_out and not keep_raw:
            outs = [dequantize(y, q) for y, q in zip(outs, live.out_quant, strict=True)]
        top = None
        j = live.label_out
        if top_k and j is not None:
            top = top_k_labels(dequantize(outs[j], live.out_quant[j]) if keep_raw else outs[j], live.labels or (),
                               live.top_k)
        return Prediction(name=live.served.name, version=live.served.version, outputs=outs,
                          output_names=live.output_names, top_k=top, raw=keep_raw)


def _invoke(live: _Live, arrays: Sequence[NDArray[Any]]) -> list[NDArray[Any]]:
    """Set the inputs (resizing all of them, then allocating once), invoke, read the outputs.

    The caller holds the model's lock. Once the interpreter has been touched, a failure counts as a
    failed invocation in the statistics probation and /metrics read, and when the request had changed
    the input shapes the interpreter is rebuilt in the last shapes that worked before answering, so
    one bad request never breaks the next ones.
    """
    if live.n_in == 1:
        x = arrays[0]
        resize = x.shape != live.shapes[0] and live.check_shapes(arrays)
    else:
        resize = live.check_shapes(arrays)
    stats = live.stats
    t0 = _now()
    stats.started[0] = t0
    try:
        if resize:
            live.resize(arrays)
        if live.n_in == 1:
            live.set(live.in0, arrays[0])
        else:
            for index, x in zip(live.in_idx, arrays, strict=True):
                live.set(index, x)
        live.invoke()
        outs = [live.get(live.out0)] if live.n_out == 1 else [live.get(index) for index in live.out_idx]
    except Exception as err:
        refused = isinstance(err, ValueError) and str(err).startswith("Cannot set tensor")
        if refused and not resize:  # the interpreter checked the value before writing it: nothing changed
            stats.started[0] = 0.0
            raise _set_error(err) from err
        _failed(live, t0)
        if resize:
            live.restore()
        if refused:
            raise _set_error(err) from err  # the caller's value, refused by the interpreter: 400
        # an invoke (or allocation) failure is the model's, not the caller's
        raise RuntimeBackendError(f"model {live.served.name} v{live.served.version}: invoke failed: "
                                  f"{_first_line(err)}") from err
    t1 = _now()
    stats.started[0] = 0.0
    stats.add_serialised(t1 - t0, True, t1)  # the model's lock serialises its writers
    if live.drift is not None:
        live.drift.offer(arrays, outs)
    if resize:
        live.good = live.shapes
    return outs


def _failed(live: _Live, t0: float) -> None:
    t1 = _now()
    live.stats.started[0] = 0.0
    live.stats.add_serialised(t1 - t0, False, t1)


def _set_error(err: Exception) -> RequestError:
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


def _first_line(err: BaseException) -> str:
    """The interpreter's message, on one line (its errors can span several, ending in a log line)."""
    lines = [ln.strip() for ln in (str(err) or type(err).__name__).splitlines() if ln.strip()]
    return "; ".join(lines[:3]) if lines else type(err).__name__

