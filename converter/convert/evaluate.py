"""Validation of a converted model against its float original, and host latency, with LiteRT.

The converted model runs through `edgefleet.runtime` with XNNPACK on, exactly as the agent serves it.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefleet.converter.convert.data import dequantize_output, quantize_input
from edgefleet.converter.convert.paired import (
    CONFIDENCE,
    agreement_to_settle,
    clopper_pearson,
    drop_interval,
    mcnemar_exact_p,
    samples_to_settle,
)
from edgefleet.errors import UsageError
from edgefleet.runtime import LoadedModel

DROP_METHOD = "Tango score interval on paired outcomes; exact McNemar p"
AGREEMENT_METHOD = "Clopper-Pearson exact interval"


@dataclass(frozen=True)
class Validation:
    """How the converted model compares with the float model on the evaluation set, sample by sample."""

    samples: int
    labelled: bool
    float_accuracy: float | None
    accuracy: float | None
    accuracy_drop_pt: float | None
    top1_agreement: float | None
    max_abs_error: float
    mean_abs_error: float
    # Paired figures (labelled classifiers): samples only the float model gets right (b) and only the
    # converted one gets right (c); the drop is (b - c) / n, and only b and c say anything about it.
    float_only_correct: int | None = None
    converted_only_correct: int | None = None
    accuracy_drop_interval_pt: tuple[float, float] | None = None
    mcnemar_p: float | None = None
    confidence: float = CONFIDENCE
    method: str | None = None
    outputs: tuple[dict[str, Any], ...] = ()
    """Agreement with the float model per output: top-1, SQNR, cosine similarity, abs error."""

    def to_dict(self) -> dict[str, Any]:
        """JSON value."""
        d = asdict(self)
        d["accuracy_drop_interval_pt"] = list(self.accuracy_drop_interval_pt) if self.accuracy_drop_interval_pt else None
        d["outputs"] = [dict(o) for o in self.outputs]
        return d


@dataclass(frozen=True)
class Check:
    """One figure the gate judged: its estimate, interval (when it has one), limit and decision."""

    metric: str  # "accuracy_drop_pt", "top1_disagreement_pt", "top1_agreement_pct", "sqnr_db"
    output: str | None
    value: float | None
    interval: tuple[float, float] | None
    limit: float
    bound: str  # "max": the figure must stay at or below the limit; "min": at or above it
    decision: str  # "pass", "warn" or "refuse"
    reason: str
    settle_samples: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON value."""
        d = asdict(self)
        d["interval"] = list(self.interval) if self.interval else None
        return d


@dataclass(frozen=True)
class Gate:
    """The gate's verdict: the deciding figure (metric, value, interval, limit) and every check made."""

    metric: str  # the deciding check's metric, or "none"
    value: float | None
    limit: float
    passed: bool
    decision: str = "pass"  # "pass", "warn" (passes, with a warning) or "refuse" (exit 3)
    interval: tuple[float, float] | None = None
    confidence: float = CONFIDENCE
    method: str | None = None
    samples: int = 0
    discordant: dict[str, int] | None = None
    mcnemar_p: float | None = None
    settle_samples: int | None = None
    reason: str = "nothing to check: no evaluation data"
    checks: tuple[Check, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON value."""
        d = asdict(self)
        d["interval"] = list(self.interval) if self.interval else None
        d["checks"] = [c.to_dict() for c in self.checks]
        return d


@dataclass(frozen=True)
class Latency:
    """Host latency of one invoke, like TFLite's benchmark_model: warm-up runs, then timed runs."""

    backend: str
    xnnpack: bool
    warmup: int
    runs: int
    p50_ms: float
    p95_ms: float
    mean_ms: float

    def to_dict(self) -> dict[str, Any]:
        """JSON value."""
        return asdict(self)


def run_samples(model: LoadedModel, x: NDArray[Any]) -> NDArray[Any]:
    """The model's first output (real values, batch axis dropped) for every sample of `x`, one invoke each."""
    spec_in, spec_out = model.inputs[0], model.outputs[0]
    xq = quantize_input(x, spec_in)
    out = [dequantize_output(model.run([xq[i:i + 1]])[0], spec_out)[0] for i in range(len(xq))]
    return np.stack(out)


def run_all_outputs(model: LoadedModel, x: NDArray[Any]) -> list[NDArray[Any]]:
    """Every output of the model (real values, batch axis dropped) for every sample of `x`, one invoke each."""
    xq = quantize_input(x, model.inputs[0])
    results: list[list[NDArray[Any]]] = [[] for _ in model.outputs]
    for i in range(len(xq)):
        for j, (y, spec) in enumerate(zip(model.run([xq[i:i + 1]]), model.outputs, strict=True)):
            results[j].append(dequantize_output(y, spec)[0])
    return [np.stack(r) for r in results]


MAX_PERMUTED_OUTPUTS = 6


@dataclass(frozen=True)
class OutputMatch:
    """Which converted output stands for one float output, and how that was decided."""

    float_index: int
    name: str  # the float model's name for it
    tflite_index: int
    tflite_name: str  # the name the agent serves it under
    matched_by: str  # "name", "shape", "error" (the least-error assignment among same-shape outputs) or "only"

    def to_dict(self) -> dict[str, Any]:
        """JSON value."""
        return asdict(self)


def _relative_error(reference: NDArray[Any], converted: NDArray[Any]) -> float:
    """Σ (ref − converted)² / Σ ref²: scale-free, so outputs of different ranges weigh alike in a sum."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - converted.astype(np.float64)) ** 2))
    return noise / max(float(np.sum(ref ** 2)), 1e-30)


def match_outputs(float_names: Sequence[Sequence[str]], references: Sequence[NDArray[Any]],
                  tflite_names: Sequence[Sequence[str]], converted: Sequence[NDArray[Any]]) -> list[OutputMatch]:
    """Pair each float output with the converted output that computes it; one entry per float output.

    The converter may reorder outputs (a Keras model's TFLite outputs come out in tensor order, not
    the model's), so position says nothing. Names decide where the TFLite signature's names are the
    float model's; the rest are paired by per-sample shape, and outputs sharing a shape by the
    assignment with the least total relative error (every permutation, up to MAX_PERMUTED_OUTPUTS;
    beyond that, in order). `float_names[i]` lists every name float output i may carry, the first
    being the one reported; `tflite_names[j]` likewise, the first being the agent's name for it.
    """
    if len(references) != len(converted):
        raise UsageError(f"the converted model has {len(converted)} outputs and the float model {len(references)}: "
                         "their agreement cannot be measured")
    shape_f = [tuple(r.shape[1:]) for r in references]
    shape_t = [tuple(c.shape[1:]) for c in converted]
    pairs: dict[int, tuple[int, str]] = {}
    for i, names in enumerate(float_names):
        hits = [j for j, theirs in enumerate(tflite_names) if set(names) & set(theirs) and shape_t[j] == shape_f[i]]
        if len(hits) == 1 and hits[0] not in {j for j, _ in pairs.values()}:
            pairs[i] = (hits[0], "name")
    free_f = [i for i in range(len(references)) if i not in pairs]
    free_t = [j for j in range(len(converted)) if j not in {j for j, _ in pairs.values()}]
    if len(free_f) == 1:  # nothing to choose between: pair them whatever their shapes (as one output always was)
        pairs[free_f[0]] = (free_t[0], "shape" if len(references) > 1 and shape_f[free_f[0]] == shape_t[free_t[0]]
                            else "only")
        free_f, free_t = [], []
    # Counts are equal overall, so a shape with too few converted outputs exists whenever any count differs.
    for shape in dict.fromkeys(shape_f[i] for i in free_f):
        group_f = [i for i in free_f if shape_f[i] == shape]
        if len(group_f) > sum(shape_t[j] == shape for j in free_t):
            theirs = ", ".join(str(list(shape_t[j])) for j in free_t)
            raise UsageError(f"the float model's output {float_names[group_f[0]][0]} (per-sample shape {list(shape)}) "
                             f"has no counterpart among the converted model's outputs ({theirs})")
    for shape in dict.fromkeys(shape_f[i] for i in free_f):
        group_f = [i for i in free_f if shape_f[i] == shape]
        group_t = [j for j in free_t if shape_t[j] == shape]
        if len(group_f) == 1:
            pairs[group_f[0]] = (group_t[0], "shape")
            continue
        if len(group_f) > MAX_PERMUTED_OUTPUTS:
            best: tuple[int, ...] = tuple(group_t)
        else:
            cost = {(i, j): _relative_error(references[i], converted[j]) for i in group_f for j in group_t}
            best = min(itertools.permutations(group_t),
                       key=lambda order: sum(cost[i, j] for i, j in zip(group_f, order, strict=True)))
        for i, j in zip(group_f, best, strict=True):
            pairs[i] = (j, "error")
    return [OutputMatch(i, float_names[i][0], j, tflite_names[j][0], how) for i, (j, how) in sorted(pairs.items())]


def output_agreement(name: str, reference: NDArray[Any], converted: NDArray[Any]) -> dict[str, Any]:
    """How one converted output agrees with the float model's: top-1 (vector outputs), SQNR, cosine, abs error.

    SQNR is 10·log10(Σ ref² / Σ (ref − converted)²) over every value; None when the outputs are identical.
    Cosine similarity is taken per sample over its flattened output; mean and minimum over samples.
    """
    ref = reference.astype(np.float64).reshape(len(reference), -1)
    conv = converted.astype(np.float64).reshape(len(converted), -1)
    err = np.abs(ref - conv)
    noise, signal = float(np.sum((ref - conv) ** 2)), float(np.sum(ref ** 2))
    sqnr = None if noise == 0 else (10.0 * math.log10(signal / noise) if signal > 0 else -math.inf)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(conv, axis=1)
    dots = np.sum(ref * conv, axis=1)
    both_zero = (np.linalg.norm(ref, axis=1) == 0) & (np.linalg.norm(conv, axis=1) == 0)
    cosine = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
    out: dict[str, Any] = {
        "name": name, "samples": len(reference), "sqnr_db": None if sqnr is None else round(sqnr, 3),
        "identical": noise == 0,
        "cosine_mean": round(float(cosine.mean()), 6) if cosine.size else None,
        "cosine_min": round(float(cosine.min()), 6) if cosine.size else None,
        "max_abs_error": float(err.max()) if err.size else 0.0,
        "mean_abs_error": float(err.mean()) if err.size else 0.0,
        "top1_agreement": None, "top1_agreement_interval": None,
    }
    if reference.ndim >= 2 and reference.shape[-1] > 1:
        same = reference.argmax(axis=-1) == converted.argmax(axis=-1)
        out["top1_agreement"] = float(np.mean(same))
        if reference.ndim == 2:  # one decision per sample: samples are independent, so the interval holds
            low, high = clopper_pearson(int(same.sum()), len(same))
            out["top1_agreement_interval"] = [low, high]
            out["top1_agreeing"] = int(same.sum())
    return out


def compare(reference: NDArray[Any], converted: NDArray[Any], y: NDArray[Any] | None,
            output_name: str = "output 0") -> Validation:
    """Accuracy of both (with labels), the paired drop with its interval, agreement and output error."""
    err = np.abs(reference.astype(np.float64) - converted.astype(np.float64))
    classifier = reference.ndim == 2 and reference.shape[1] > 1
    agreement = float_acc = acc = drop = None
    b = c = None
    interval = p = None
    if classifier:
        ref_top, conv_top = reference.argmax(axis=1), converted.argmax(axis=1)
        agreement = float(np.mean(ref_top == conv_top))
        if y is not None:
            ref_ok, conv_ok = ref_top == y, conv_top == y
            float_acc = float(np.mean(ref_ok))
            acc = float(np.mean(conv_ok))
            b, c = int(np.sum(ref_ok & ~conv_ok)), int(np.sum(~ref_ok & conv_ok))
            n = len(y)
            drop = round((b - c) / n * 100.0, 4)
            low, high = drop_interval(b, c, n)
            interval = (round(low * 100.0, 4), round(high * 100.0, 4))
            p = mcnemar_exact_p(b, c)
    return Validation(
        samples=len(reference), labelled=y is not None and classifier, float_accuracy=float_acc, accuracy=acc,
        accuracy_drop_pt=drop, top1_agreement=agreement,
        max_abs_error=float(err.max()) if err.size else 0.0, mean_abs_error=float(err.mean()) if err.size else 0.0,
        float_only_correct=b, converted_only_correct=c, accuracy_drop_interval_pt=interval, mcnemar_p=p,
        method=DROP_METHOD if interval is not None else None,
        outputs=(output_agreement(output_name, reference, converted),),
    )


def compare_outputs(references: Sequence[NDArray[Any]], converted: Sequence[NDArray[Any]], y: NDArray[Any] | None,
                    matches: Sequence[OutputMatch]) -> Validation:
    """`compare` on the float model's first output and its converted counterpart (the labelled
    figures are the first output's), with agreement figures for every output and the pairing used."""
    first = matches[0]
    validation = compare(references[first.float_index], converted[first.tflite_index], y, first.name)
    outputs = tuple({**output_agreement(m.name, references[m.float_index], converted[m.tflite_index]),
                     "float_index": m.float_index, "tflite_index": m.tflite_index, "tflite_name": m.tflite_name,
                     "matched_by": m.matched_by} for m in matches)
    return replace(validation, outputs=outputs)


def _against_max(metric: str, value: float, interval: tuple[float, float], limit: float, unit: str,
                 settle: Callable[[], int | None], output: str | None = None,
                 flag: str = "--max-accuracy-drop") -> Check:
    """Decide a figure that must stay at or below `limit` from its interval: refuse when the whole
    interval lies above it, pass when the whole interval lies at or below it, warn in between."""
    low, high = interval
    shown = f"{metric} {value:.2f} {unit} (95 % CI {low:.2f} to {high:.2f})"
    if low > limit:
        return Check(metric, output, value, interval, limit, "max", "refuse",
                     f"{shown} lies wholly above {flag} {limit:g}")
    if high <= limit:
        return Check(metric, output, value, interval, limit, "max", "pass",
                     f"{shown} lies at or below {flag} {limit:g}")
    needed = settle()
    more = (f"about {needed} evaluation samples at the rates seen would settle it" if needed
            else "more evaluation samples would not settle it at the rates seen")
    return Check(metric, output, value, interval, limit, "max", "warn",
                 f"{shown} straddles {flag} {limit:g}; {more}", needed)


def _agreement_check(out: dict[str, Any], limit_pct: float) -> Check:
    """--min-top1-agreement on one output: refuse when the interval lies wholly below the limit."""
    value = round(out["top1_agreement"] * 100.0, 4)
    name = out["name"]
    if out.get("top1_agreement_interval") is None:  # several decisions per sample: no interval claimed
        decision = "pass" if value >= limit_pct else "refuse"
        return Check("top1_agreement_pct", name, value, None, limit_pct, "min", decision,
                     f"{name}: top-1 agreement {value:.2f} % (per position; no interval) "
                     f"{'meets' if decision == 'pass' else 'is below'} --min-top1-agreement {limit_pct:g}")
    low, high = (round(v * 100.0, 4) for v in out["top1_agreement_interval"])
    shown = f"{name}: top-1 agreement {value:.2f} % (95 % CI {low:.2f} to {high:.2f})"
    if high < limit_pct:
        return Check("top1_agreement_pct", name, value, (low, high), limit_pct, "min", "refuse",
                     f"{shown} lies wholly below --min-top1-agreement {limit_pct:g}")
    if low >= limit_pct:
        return Check("top1_agreement_pct", name, value, (low, high), limit_pct, "min", "pass",
                     f"{shown} lies at or above --min-top1-agreement {limit_pct:g}")
    needed = agreement_to_settle(out["top1_agreeing"], out["samples"], limit_pct / 100.0)
    more = (f"about {needed} evaluation samples at the rate seen would settle it" if needed
            else "more evaluation samples would not settle it at the rate seen")
    return Check("top1_agreement_pct", name, value, (low, high), limit_pct, "min", "warn",
                 f"{shown} straddles --min-top1-agreement {limit_pct:g}; {more}", needed)


def _sqnr_check(out: dict[str, Any], limit_db: float) -> Check:
    """--min-sqnr-db on one output: a point figure over every value of every sample (no interval)."""
    name, value = out["name"], out["sqnr_db"]
    if value is None:
        return Check("sqnr_db", name, None, None, limit_db, "min", "pass",
                     f"{name}: outputs identical to the float model's")
    ok = value >= limit_db
    return Check("sqnr_db", name, value, None, limit_db, "min", "pass" if ok else "refuse",
                 f"{name}: SQNR {value:.2f} dB {'meets' if ok else 'is below'} --min-sqnr-db {limit_db:g}")


_SEVERITY = {"pass": 0, "warn": 1, "refuse": 2}


def gate(validation: Validation | None, limit: float, *, min_top1_agreement: float | None = None,
         min_sqnr_db: float | None = None, refuse_uncertain: bool = False) -> Gate:
    """Judge the evaluation: the paired accuracy drop against `limit` points (or, without labels,
    top-1 disagreement with the float model), and the agreement flags on every output they apply to.
    The verdict is the worst of the checks; the deciding check is reported at the top level.
    With `refuse_uncertain`, a check whose interval straddles its limit refuses instead of warning."""
    if validation is None:
        return Gate("none", None, limit, True)
    checks: list[Check] = []
    discordant = None
    if validation.accuracy_drop_pt is not None and validation.accuracy_drop_interval_pt is not None:
        b, c, n = validation.float_only_correct or 0, validation.converted_only_correct or 0, validation.samples
        discordant = {"float_only_correct": b, "converted_only_correct": c}
        checks.append(_against_max("accuracy_drop_pt", validation.accuracy_drop_pt,
                                   validation.accuracy_drop_interval_pt, limit, "points",
                                   lambda: samples_to_settle(b, c, n, limit / 100.0)))
    elif validation.top1_agreement is not None and min_top1_agreement is None:
        # Without labels a classifier is judged by how often it disagrees with the float model, in points.
        first = validation.outputs[0] if validation.outputs else None
        n = validation.samples
        k = n - int(round(validation.top1_agreement * n))
        value = round(k / n * 100.0, 4)
        low, high = clopper_pearson(k, n)
        interval = (round(low * 100.0, 4), round(high * 100.0, 4))
        checks.append(_against_max("top1_disagreement_pt", value, interval, limit, "points",
                                   lambda: agreement_to_settle(k, n, limit / 100.0),
                                   first["name"] if first else None))
    for out in validation.outputs:
        if min_top1_agreement is not None and out.get("top1_agreement") is not None:
            checks.append(_agreement_check(out, min_top1_agreement))
        if min_sqnr_db is not None:
            checks.append(_sqnr_check(out, min_sqnr_db))
    if refuse_uncertain:
        checks = [replace(ch, decision="refuse", reason=f"{ch.reason} (--refuse-uncertain)")
                  if ch.decision == "warn" else ch for ch in checks]
    if not checks:
        return Gate("none", None, limit, True, samples=validation.samples,
                    reason="nothing to check: no labels, no classifier output and no agreement limits")
    decisive = max(checks, key=lambda ch: _SEVERITY[ch.decision])  # the first of the worst
    decision = decisive.decision
    primary = checks[0] if decision == "pass" else decisive
    is_drop = primary.metric == "accuracy_drop_pt"
    return Gate(
        metric=primary.metric, value=primary.value, limit=primary.limit, passed=decision != "refuse",
        decision=decision, interval=primary.interval,
        method=(DROP_METHOD if is_drop else AGREEMENT_METHOD if primary.interval else None),
        samples=validation.samples, discordant=discordant if is_drop else None,
        mcnemar_p=validation.mcnemar_p if is_drop else None, settle_samples=primary.settle_samples,
        reason=primary.reason, checks=tuple(checks),
    )


def measure_latency(model: LoadedModel, sample: list[NDArray[Any]], *, warmup: int = 10, runs: int = 100,
                    xnnpack: bool = True) -> Latency:
    """Median and 95th percentile of `runs` invokes after `warmup` untimed ones."""
    for _ in range(warmup):
        model.run(sample)
    times = np.empty(max(1, runs))
    for i in range(len(times)):
        start = time.perf_counter_ns()
        model.run(sample)
        times[i] = (time.perf_counter_ns() - start) / 1e6
    return Latency(backend=model.backend, xnnpack=xnnpack, warmup=warmup, runs=len(times),
                   p50_ms=round(float(np.percentile(times, 50)), 4), p95_ms=round(float(np.percentile(times, 95)), 4),
                   mean_ms=round(float(times.mean()), 4))


def first_sample(model: LoadedModel, x: NDArray[Any] | None, seed: int = 0) -> list[NDArray[Any]]:
    """One invoke's inputs: the first data sample when there is data, else random values."""
    from edgefleet.converter.convert.data import random_inputs

    if x is not None and len(model.inputs) == 1:
        return [quantize_input(x[:1], model.inputs[0])]
    return [a[0] for a in random_inputs(model.inputs, 1, seed)]


_DELEGATE_FAILURE = re.compile(r"failed to delegate (\w+) node #(\d+)")


def invoke_failure(err: BaseException, *, sparse_encoded: bool) -> str:
    """One line saying why a model fails at invoke and what to do, from the interpreter's error text.

    LiteRT's XNNPACK delegate, which agents serve with by default, can refuse a node only when the
    graph is prepared at the first invoke ("failed to delegate FULLY_CONNECTED node #13 ..."): the
    model loads, then every request fails.
    """
    text = " ".join(str(err).split()) or type(err).__name__
    found = _DELEGATE_FAILURE.search(text)
    if found:
        op, node = found.groups()
        cure = ("export it without sparse tensor encoding (edgectl convert --no-sparse-encoding)"
                if sparse_encoded else "set use_xnnpack = false under [runtime] on the boards that serve it")
        return (f"the XNNPACK delegate fails on {op} (node {node}) at invoke, and agents serve with XNNPACK; "
                f"{cure}")
    return f"the model fails at invoke: {text[:300]}"


def check_invokes(model: LoadedModel, sample: list[NDArray[Any]], *, sparse_encoded: bool) -> None:
    """Invoke once on `sample`; raise UsageError with `invoke_failure`'s line when the interpreter fails."""
    try:
        model.run(sample)
    except (RuntimeError, ValueError) as err:  # the interpreters report a failing invoke with these
        raise UsageError(invoke_failure(err, sparse_encoded=sparse_encoded)) from err
