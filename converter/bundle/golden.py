"""Golden vectors that hold on every interpreter: per-output tolerances, a cross-interpreter check, and the
choice of golden samples (docs/converter.md, "Golden vectors and their tolerances").

An agent accepts a model only when it reproduces the golden outputs within the manifest's tolerance. The
interpreters a fleet runs do not compute a quantized model identically: XNNPACK requantizes in float32,
the builtin kernels in fixed point, and the two round a value that falls between two steps differently.
On the digits CNN that moves an int8 output by one step on 14 to 22 % of inputs, and a softmax output
by up to nine (one step of the logits moves a probability by up to half a logit step). A tolerance
that ignores this rejects good models at random on part of a fleet; one that is simply wide stops
catching broken runtimes. So:

- a quantized output (or a float output behind a DEQUANTIZE) may move by a stated number of steps of the
  tensor that produces it, plus, behind a softmax, logistic or tanh, the same number of steps of that
  op's input times the op's largest slope;
- a float output may move by the largest disagreement measured between the interpreters on the
  candidate samples, times a margin, and never less than the old floor of 1e-4 of its range;
- the candidate samples run on every interpreter installed on the host, each in its own process; a
  model that one of them cannot run, or that disagrees beyond the tolerance, is refused;
- the golden samples are the candidates on which the interpreters disagree most, beside random ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefleet.converter.tflite.info import OutputSource, output_sources
from edgefleet.converter.tflite.interpreters import Interpreter, Run, run_all
from edgefleet.errors import UsageError
from edgefleet.protocol import TensorSpec, Tolerance
from edgefleet.tensors import beyond_tolerance

POOL_SAMPLES = 128
"""Candidate samples run on every interpreter; the golden ones are chosen among them."""
STEPS = {"int8": 2, "uint8": 2, "int16": 4}
"""Quantization steps an output may move by. Measured between LiteRT 2.3 (with and without XNNPACK) and
tflite-runtime 2.14 over all 1,797 digits: int8 logits move by at most one step, int16 logits by at most
two (a 16-bit grid is 256 times finer, so rounding differences of earlier layers show as more steps)."""
SLOPES = {"SOFTMAX": 0.5, "LOGISTIC": 0.25, "TANH": 1.0}
"""The largest change of the op's output per unit change of its input (for softmax, in the max norm:
sum_j |dp_i/dz_j| = 2 p_i (1 - p_i) <= 1/2)."""
FLOAT_MARGIN = 4.0
FLOAT_FLOOR = 1e-4
"""Float outputs: at least 1e-4 x max(1, max |y|), and a relative 1e-3 on top (the rule before this one)."""
FLOAT_RTOL = 1e-3
INTEGER_FLOOR = 1.0
"""Integer outputs that are not quantized (class indices, counts): one unit, or the measured maximum."""


class GoldenCheckError(UsageError):
    """An interpreter cannot run the model, or disagrees with the reference beyond the tolerance (exit 2)."""


@dataclass(frozen=True)
class OutputRule:
    """One output's tolerance and how it was derived."""

    tolerance: Tolerance
    rule: str
    scale: float | None = None
    """Scale of the quantized tensor behind the output (None for float outputs)."""
    steps: float | None = None
    """The tolerance in steps of that scale."""

    def to_dict(self) -> dict[str, Any]:
        """JSON value for the report."""
        return {"atol": self.tolerance.atol, "rtol": self.tolerance.rtol, "rule": self.rule,
                "scale": self.scale, "steps": self.steps}


def quantized_rule(source: OutputSource) -> OutputRule | None:
    """The tolerance of an output behind a quantized tensor, from quantization parameters alone."""
    q = source.quantized
    if q is None or q.quantization is None or q.dtype not in STEPS:
        return None
    steps = STEPS[q.dtype]
    atol = steps * q.quantization.scale
    rule = f"{steps} steps of {q.dtype} scale {q.quantization.scale:.6g}"
    inner = source.op_input
    slope = SLOPES.get(source.op or "")
    if slope is not None and inner is not None and inner.quantization is not None and inner.dtype in STEPS:
        inner_steps = STEPS[inner.dtype]
        atol += inner_steps * slope * inner.quantization.scale
        rule += (f" + {inner_steps} steps of the {source.op} input ({inner.dtype} scale "
                 f"{inner.quantization.scale:.6g}) x slope {slope:g}")
    return OutputRule(Tolerance(atol=atol, rtol=0.0), rule, scale=q.quantization.scale,
                      steps=atol / q.quantization.scale)


def dequantized(y: NDArray[Any], spec: TensorSpec) -> NDArray[Any]:
    """Real values of an output as the agent compares them (agent/lifecycle/validate.py)."""
    out = y.astype(np.float64)
    if spec.quantization is not None and y.dtype.kind in "iu":
        out = (out - spec.quantization.zero_point) * spec.quantization.scale
    return out


def measured_rule(spec: TensorSpec, reference: NDArray[Any], measured: float | None) -> OutputRule:
    """The tolerance of a float (or unquantized integer) output, from the cross-interpreter measurement."""
    seen = f"{measured:.3g} measured across interpreters" if measured is not None else "not measured"
    if reference.dtype.kind == "f":
        floor = FLOAT_FLOOR * max(1.0, float(np.max(np.abs(reference))) if reference.size else 1.0)
        atol = max(floor, FLOAT_MARGIN * (measured or 0.0))
        rule = (f"max({FLOAT_MARGIN:g} x the largest disagreement ({seen}), {FLOAT_FLOOR:g} x max(1, max |y|) "
                f"= {floor:.3g}) + {FLOAT_RTOL:g} x |y|")
        return OutputRule(Tolerance(atol=atol, rtol=FLOAT_RTOL), rule)
    atol = max(INTEGER_FLOOR, measured or 0.0)
    return OutputRule(Tolerance(atol=atol, rtol=0.0), f"max({INTEGER_FLOOR:g}, the largest disagreement ({seen}))")


@dataclass
class InterpreterFigures:
    """How one interpreter compared with the reference on the candidates."""

    name: str
    description: str
    max_abs_error: list[float] = field(default_factory=list)
    max_steps: list[float | None] = field(default_factory=list)
    samples_differing: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON value for the report."""
        return {"name": self.name, "description": self.description,
                "max_abs_error": [float(f"{e:.6g}") for e in self.max_abs_error],
                "max_steps": [None if s is None else round(s, 3) for s in self.max_steps],
                "samples_differing": self.samples_differing, "seconds": round(self.seconds, 3)}


@dataclass
class GoldenPlan:
    """The chosen golden samples, the per-output tolerances and everything measured on the way."""

    indices: list[int]
    rules: list[OutputRule]
    figures: list[InterpreterFigures]
    ranked: list[int]
    """The chosen samples picked for the interpreters' disagreement (the others are random)."""
    pool: int

    @property
    def tolerances(self) -> list[Tolerance]:
        """One tolerance per output."""
        return [r.tolerance for r in self.rules]

    def to_dict(self) -> dict[str, Any]:
        """The report's `golden_check` section."""
        return {
            "candidates": self.pool, "chosen": self.indices, "chosen_for_disagreement": self.ranked,
            "interpreters": [f.to_dict() for f in self.figures],
            "tolerances": [r.to_dict() for r in self.rules],
        }


def manifest_tolerances(tolerances: Sequence[Tolerance]) -> tuple[Tolerance, tuple[Tolerance, ...] | None]:
    """`tolerance` and `tolerances` for the manifest: one value when the outputs share it (readable by
    agents older than the per-output field), else the loosest as `tolerance` and the list beside it."""
    first = tolerances[0]
    if all(t == first for t in tolerances):
        return first, None
    loosest = Tolerance(atol=max(t.atol for t in tolerances), rtol=max(t.rtol for t in tolerances))
    return loosest, tuple(tolerances)


def plan(model_bytes: bytes, outputs: Sequence[TensorSpec], pool_inputs: Sequence[NDArray[Any]],
         reference: Sequence[NDArray[Any]], interpreters: Sequence[Interpreter], *, samples: int | None,
         seed: int = 0) -> GoldenPlan:
    """Run the candidates on `interpreters`, derive each output's tolerance, refuse a model that an
    interpreter cannot run or that disagrees beyond it, and choose `samples` golden samples (all of them
    when None). `reference` holds the outputs of the reference interpreter (the host's LiteRT with
    XNNPACK, as the agent serves) on the candidates."""
    pool = len(pool_inputs[0]) if pool_inputs else 0
    runs = run_all(model_bytes, pool_inputs, interpreters)
    for run in runs:
        if run.problem is not None:
            raise GoldenCheckError(f"golden check: {run.interpreter.name} ({run.interpreter.description}) cannot "
                                   f"run the model: {run.problem}; boards running it would reject the bundle "
                                   "(leave it out with --interpreters only if no board runs it)")
    ref = [dequantized(y, spec) for y, spec in zip(reference, outputs, strict=True)]
    runs_real = [[dequantized(y, spec) for y, spec in zip(_outputs(run), outputs, strict=True)] for run in runs]
    for run, got in zip(runs, runs_real, strict=True):
        for j, (g, r) in enumerate(zip(got, ref, strict=True)):
            if g.shape != r.shape:
                raise GoldenCheckError(f"golden check: {run.interpreter.name} gives output {j} the shape "
                                       f"{list(g.shape[1:])}, the reference {list(r.shape[1:])}")
    try:
        sources: Sequence[OutputSource | None] = output_sources(model_bytes)
    except UsageError:
        sources = [None] * len(outputs)
    if len(sources) != len(outputs):
        sources = [None] * len(outputs)
    rules = []
    for j, (spec, source) in enumerate(zip(outputs, sources, strict=True)):
        rule = quantized_rule(source) if source is not None else None
        if rule is None:
            measured = max((float(np.max(np.abs(got[j] - ref[j]))) if ref[j].size else 0.0 for got in runs_real),
                           default=None)
            rule = measured_rule(spec, reference[j], measured)
        rules.append(rule)
    figures = []
    score = np.zeros(pool)
    for run, got in zip(runs, runs_real, strict=True):
        fig = InterpreterFigures(run.interpreter.name, run.interpreter.description, seconds=run.seconds)
        differing = np.zeros(pool, dtype=bool)
        for j, (g, r, rule) in enumerate(zip(got, ref, rules, strict=True)):
            err = np.abs(g - r).reshape(pool, -1)
            worst = float(err.max()) if err.size else 0.0
            fig.max_abs_error.append(worst)
            fig.max_steps.append(worst / rule.scale if rule.scale else None)
            differing |= err.max(axis=1) > 0 if err.size else differing
            bound = (rule.tolerance.atol + rule.tolerance.rtol * np.abs(r)).reshape(pool, -1)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(bound > 0, err / np.where(bound > 0, bound, 1.0), np.where(err > 0, np.inf, 0.0))
            score = np.maximum(score, ratio.max(axis=1) if ratio.size else score)
            beyond = beyond_tolerance(g, r, rule.tolerance.atol, rule.tolerance.rtol).reshape(pool, -1).any(axis=1)
            if beyond.any():
                s = int(np.argmax(beyond))
                diff = float(err[s].max())
                steps = f" ({diff / rule.scale:.3g} steps)" if rule.scale else ""
                raise GoldenCheckError(
                    f"golden check: {run.interpreter.name} ({run.interpreter.description}) differs from the "
                    f"reference by {diff:.6g}{steps} on output {j} of candidate sample {s}, beyond its tolerance "
                    f"{rule.tolerance.atol:.6g} ({rule.rule}); boards running it would reject the bundle")
        fig.samples_differing = int(differing.sum())
        figures.append(fig)
    indices, ranked = choose(score, samples, seed)
    return GoldenPlan(indices=indices, rules=rules, figures=figures, ranked=ranked, pool=pool)


def _outputs(run: Run) -> list[NDArray[Any]]:
    assert run.outputs is not None  # runs with a problem were refused above
    return run.outputs


def choose(score: NDArray[Any], samples: int | None, seed: int) -> tuple[list[int], list[int]]:
    """Half the golden samples (rounded up) where the interpreters disagree most (score > 0, the worst
    first), the rest drawn at random from the other candidates; all candidates when they are few."""
    pool = len(score)
    if samples is None or samples >= pool:
        return list(range(pool)), [i for i in np.argsort(-score, kind="stable").tolist() if score[i] > 0]
    order = np.argsort(-score, kind="stable")
    ranked = [int(i) for i in order[:math.ceil(samples / 2)] if score[i] > 0]
    rest = np.setdiff1d(np.arange(pool), ranked)
    rng = np.random.default_rng(seed)
    random = sorted(int(i) for i in rng.choice(rest, size=samples - len(ranked), replace=False))
    return ranked + random, ranked
