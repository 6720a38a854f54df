"""The conversion pipeline behind ``edgectl convert``, usable from Python (the benchmark calls it).

float model → (prune) → TFLite in the chosen quantization mode (dense, and sparse when pruned) →
validation with LiteRT against the float model → accuracy gate → report and golden inputs.
Writing the bundle is the caller's last step, so a run that fails anywhere leaves nothing behind.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from edgefleet.converter.bundle.golden import POOL_SAMPLES
from edgefleet.converter.bundle.reference import REFERENCE_SAMPLES
from edgefleet.converter.convert.data import (
    Dataset,
    Splits,
    check_inputs,
    check_labels,
    classes_of,
    overlap,
    quantize_input,
    random_inputs,
)
from edgefleet.converter.convert.encoding import EncodingDecision, choose_encoding, runs_like
from edgefleet.converter.convert.evaluate import (
    Gate,
    Latency,
    Validation,
    compare_outputs,
    first_sample,
    gate,
    match_outputs,
    measure_latency,
    run_all_outputs,
)
from edgefleet.converter.convert.load import SourceModel
from edgefleet.converter.convert.prune import FineTuning, PruneConfig, PruneResult, prune
from edgefleet.converter.convert.prune_structured import StructuredConfig, StructuredResult, prune_channels
from edgefleet.converter.convert.quantize import MODES, convert_tflite, mode
from edgefleet.converter.convert.report import REPORT_SCHEMA
from edgefleet.converter.tflite.info import ModelInfo, read_model
from edgefleet.converter.tflite.native import captured_native_output
from edgefleet.errors import UsageError
from edgefleet.runtime import load_model

log = logging.getLogger(__name__)

Step = Callable[[int, int], None]
C = TypeVar("C", bound=FineTuning)
# Fine-tuning under the pruning schedule needs a few hundred steps to recover accuracy; small data sets
# get more epochs so that they reach it (the TF guide's 2 epochs of MNIST are ~3,400 steps).
MIN_FINE_TUNE_STEPS = 400
MAX_AUTO_EPOCHS = 20


def _ignore(done: int, total: int) -> None:
    """No progress display."""


@dataclass(frozen=True)
class Hooks:
    """Progress callbacks: stage changes, fine-tuning steps, calibration samples."""

    stage: Callable[[str], None] = lambda text: None
    fine_tune: Step = _ignore
    calibration: Step = _ignore


@dataclass(frozen=True)
class ConvertOptions:
    """Everything `edgectl convert` can be told, with its defaults."""

    quantize: str = "none"
    prune: float | None = None
    prune_structure: tuple[int, int] | None = None
    prune_channels: float | None = None  # fraction of filters/units removed per layer (structured)
    prune_epochs: int | None = None  # None: enough epochs for MIN_FINE_TUNE_STEPS steps
    batch_size: int = 32
    learning_rate: float = 1e-3
    sparse_encoding: bool = True
    max_accuracy_drop: float = 1.0
    min_top1_agreement: float | None = None  # percent, per vector output; None: not checked
    min_sqnr_db: float | None = None  # per output; None: not checked
    refuse_uncertain: bool = False  # a straddling interval refuses instead of warning
    calibration_samples: int = 200
    golden_samples: int = 8
    latency_warmup: int = 10
    latency_runs: int = 100
    seed: int = 0

    def _epochs(self, fine_tune: Dataset | None) -> int:
        if self.prune_epochs is not None:
            return self.prune_epochs
        steps = math.ceil(len(fine_tune) / self.batch_size) if fine_tune is not None else 1
        return min(MAX_AUTO_EPOCHS, max(2, math.ceil(MIN_FINE_TUNE_STEPS / steps)))

    def channels_config(self, fine_tune: Dataset | None) -> StructuredConfig | None:
        """The structured (filter/unit) pruning configuration, or None when not asked for."""
        if self.prune_channels is None:
            return None
        return StructuredConfig(fraction=self.prune_channels, epochs=self._epochs(fine_tune),
                                batch_size=self.batch_size, learning_rate=self.learning_rate, seed=self.seed)

    def prune_config(self, fine_tune: Dataset | None) -> PruneConfig | None:
        """The pruning configuration for this fine-tune set, or None when not pruning."""
        if self.prune is None and self.prune_structure is None:
            return None
        sparsity = self.prune
        if self.prune_structure is not None:
            implied = 1.0 - self.prune_structure[0] / self.prune_structure[1]
            if sparsity is not None and abs(sparsity - implied) > 1e-6:
                raise UsageError(f"--prune {sparsity:g} contradicts --prune-structure "
                                 f"{self.prune_structure[0]}:{self.prune_structure[1]} (which means {implied:g})")
            sparsity = implied
        epochs = self._epochs(fine_tune)
        return PruneConfig(sparsity=float(sparsity), structure=self.prune_structure,  # type: ignore[arg-type]
                           epochs=epochs, batch_size=self.batch_size,
                           learning_rate=self.learning_rate, seed=self.seed)


@dataclass
class Conversion:
    """The result: model bytes, golden inputs, the report, and the gate's verdict."""

    model: bytes
    golden_inputs: list[NDArray[Any]]
    report: dict[str, Any]
    gate: Gate
    validation: Validation | None
    encoding: EncodingDecision
    pruning: PruneResult | None
    timings: dict[str, float] = field(default_factory=dict)
    structured: StructuredResult | None = None
    reference_inputs: list[NDArray[Any]] | None = None
    """Representative samples for the bundle's drift reference, stacked like `golden_inputs` (None: no data)."""
    reference_source: dict[str, Any] = field(default_factory=dict)

    @property
    def wire_bytes(self) -> int:
        """Bytes on the wire of the model artifact."""
        return int(self.report["size"]["wire_bytes"])


def check_data(source: SourceModel, splits: Splits) -> Splits:
    """Check every set against the model's input and classes; return them in the input's dtype."""
    present = [d for d in (splits.fine_tune, splits.calibration, splits.validation) if d is not None]
    if not present:
        return splits
    if len(source.inputs) != 1:
        raise UsageError(f"--data: the model has {len(source.inputs)} inputs; data files support one-input models")
    classes = classes_of(source.outputs[0])
    checked: list[Dataset | None] = []
    for ds in (splits.fine_tune, splits.calibration, splits.validation):
        if ds is None:
            checked.append(None)
            continue
        ds = check_inputs(ds, source.inputs[0])
        check_labels(ds, classes)
        checked.append(ds)
    return Splits(fine_tune=checked[0], calibration=checked[1], validation=checked[2], held_out=splits.held_out)


@dataclass
class Prepared:
    """What every conversion of one float model shares: checked data, float reference, float32 baseline."""

    splits: Splits
    reference: NDArray[Any] | None
    """The float model's first output on the evaluation samples (its labelled accuracy is judged on it)."""
    baseline: bytes
    calibration: NDArray[Any] | None
    seconds: float
    evaluation: dict[str, Any] = field(default_factory=dict)
    """Where the evaluation samples come from and whether the conversion has seen them."""
    references: list[NDArray[Any]] | None = None
    """Every output of the float model on the evaluation samples, in the float model's output order."""
    output_names: tuple[tuple[str, ...], ...] = ()
    """The names each float output may carry in the converted model's signature (SourceModel.output_aliases)."""


def prepare(source: SourceModel, splits: Splits, options: ConvertOptions, hooks: Hooks | None = None) -> Prepared:
    """Check the data against the model, run the float model on the validation set, convert the float32 baseline."""
    hooks = hooks or Hooks()
    started = time.perf_counter()
    qmode = mode(options.quantize)
    splits = check_data(source, splits)
    calibration = splits.calibration.x[:options.calibration_samples] if splits.calibration is not None else None
    if qmode.needs_calibration and calibration is None:
        raise UsageError(f"--quantize {qmode.name} needs calibration samples: pass --data or --calibration")
    references = source.predict_all(splits.validation.x) if splits.validation is not None else None
    reference = references[0] if references else None
    evaluation = describe_evaluation(splits, reference)
    hooks.stage("converting the float32 baseline")
    baseline = convert_tflite(source, "none")
    return Prepared(splits, reference, baseline, calibration, time.perf_counter() - started, evaluation,
                    references, source.output_aliases())


def describe_evaluation(splits: Splits, reference: NDArray[Any] | None) -> dict[str, Any]:
    """Provenance of the evaluation set and the signs that it is not held out, with a warning for each."""
    val = splits.validation
    if val is None:
        return {"source": None, "samples": 0, "held_out": None, "overlap": 0, "float_perfect": False, "warnings": []}
    warnings = []
    if not splits.held_out:
        warnings.append(f"the gate judges on {val.source}, which the float model may have been trained on; "
                        "pass held-out samples with --eval-data")
    shared = overlap(val, [splits.fine_tune, splits.calibration])
    if shared:
        warnings.append(f"{shared} of the {len(val)} evaluation samples also appear in the fine-tuning or "
                        "calibration data: the gate judges partly on samples the conversion has seen")
    perfect = False
    if val.y is not None and reference is not None and reference.ndim == 2 and reference.shape[1] > 1:
        perfect = bool(np.all(reference.argmax(axis=1) == val.y))
        if perfect:
            warnings.append(f"the float model scores 100 % on the {len(val)} evaluation samples: they look like "
                            "training data, so the gate's drop is measured where the model cannot err")
    return {"source": val.source, "samples": len(val), "held_out": splits.held_out and not shared,
            "overlap": shared, "float_perfect": perfect, "warnings": warnings}


def _require_keras(source: SourceModel, flag: str) -> None:
    if not source.prunable:
        raise UsageError(f"{flag} needs a Keras model (.keras or .h5); {source.path} is a SavedModel")


def _start_pruning(source: SourceModel, flag: str, config: C | None, fine_tune: Dataset | None, hooks: Hooks,
                   stages: tuple[str, str]) -> C | None:
    """`config` (None when `flag` was not given) once `source` is known to be prunable, with the stage
    announced: the first of `stages` when the fine-tune set has labels and there are epochs to run,
    else the second (one-shot)."""
    if config is None:
        return None
    _require_keras(source, flag)
    tuned = fine_tune is not None and fine_tune.y is not None and config.epochs > 0
    hooks.stage(stages[0] if tuned else stages[1])
    return config


def prune_source(source: SourceModel, prepared: Prepared, options: ConvertOptions,
                 hooks: Hooks | None = None) -> PruneResult | None:
    """Prune `source` in place as the options say (fine-tuning on the fine-tune set when it has labels)."""
    hooks = hooks or Hooks()
    fine_tune = prepared.splits.fine_tune
    config = _start_pruning(source, "--prune", options.prune_config(fine_tune), fine_tune, hooks,
                            ("pruning and fine-tuning", "pruning (one-shot)"))
    return None if config is None else prune(source.keras_model, config, fine_tune, hooks.fine_tune)


def prune_channels_source(source: SourceModel, prepared: Prepared, options: ConvertOptions,
                          hooks: Hooks | None = None) -> StructuredResult | None:
    """Replace `source`'s Keras model by one with fewer filters/units, as `--prune-channels` asks.

    Runs before magnitude pruning, which then acts on the smaller model's kernels.
    """
    hooks = hooks or Hooks()
    fine_tune = prepared.splits.fine_tune
    config = _start_pruning(source, "--prune-channels", options.channels_config(fine_tune), fine_tune, hooks,
                            ("removing filters and units, fine-tuning", "removing filters and units (one-shot)"))
    if config is None:
        return None
    smaller, result = prune_channels(source.keras_model, config, fine_tune, hooks.fine_tune)
    source.keras_model = smaller
    return result


def convert(source: SourceModel, splits: Splits, options: ConvertOptions, hooks: Hooks | None = None) -> Conversion:
    """Run the whole pipeline; raise UsageError for bad input. The gate verdict is returned, not raised."""
    mode(options.quantize)
    # Reject bad pruning options before any slow work.
    if options.prune_config(None) is not None:
        _require_keras(source, "--prune")
    if options.channels_config(None) is not None:
        _require_keras(source, "--prune-channels")
    prepared = prepare(source, splits, options, hooks)
    t = time.perf_counter()
    structured = prune_channels_source(source, prepared, options, hooks)
    pruning = prune_source(source, prepared, options, hooks)
    prune_s = time.perf_counter() - t
    return finish(source, prepared, pruning, options, hooks,
                  timings={"baseline_s": prepared.seconds, **({"prune_s": prune_s} if pruning or structured else {})},
                  structured=structured)


def finish(source: SourceModel, prepared: Prepared, pruning: PruneResult | None, options: ConvertOptions,
           hooks: Hooks | None = None, timings: dict[str, float] | None = None,
           structured: StructuredResult | None = None) -> Conversion:
    """Quantize (dense, and sparse when pruned), pick the encoding, validate with LiteRT, gate, report."""
    hooks = hooks or Hooks()
    started = time.perf_counter()
    timings = dict(timings or {})
    qmode = mode(options.quantize)
    validation = prepared.splits.validation
    val_x = validation.x if validation is not None else None
    calibration = prepared.calibration
    if qmode.needs_calibration and calibration is None:
        raise UsageError(f"--quantize {qmode.name} needs calibration samples: pass --data or --calibration")

    t = time.perf_counter()
    hooks.stage(f"converting ({qmode.name})")
    if qmode.name == "none" and pruning is None and structured is None:
        dense = prepared.baseline
    else:
        dense = convert_tflite(source, qmode.name, calibration, on_sample=hooks.calibration)
    sparse = None
    if pruning is not None and options.sparse_encoding:
        hooks.stage(f"converting ({qmode.name}, sparse encoding)")
        sparse = convert_tflite(source, qmode.name, calibration, sparse=True, on_sample=hooks.calibration)
    timings["convert_s"] = time.perf_counter() - t

    t = time.perf_counter()
    hooks.stage("validating with LiteRT")
    with captured_native_output():  # LiteRT announces its XNNPACK delegate on stderr
        dense_model = load_model(dense, "auto", use_xnnpack=True)
    absent = ("sparse encoding switched off (--no-sparse-encoding)" if pruning is not None
              else "channel pruning leaves dense kernels, so no sparse candidate" if structured is not None
              else "no pruning, so no sparse candidate")
    model_bytes, encoding = choose_encoding(dense, sparse, runs_like(dense, _check_samples(dense_model, val_x)),
                                            absent)
    served = load_model(model_bytes, "auto", use_xnnpack=True)
    result = None
    if validation is not None and prepared.reference is not None:
        references = prepared.references or [prepared.reference]
        converted = run_all_outputs(served, validation.x)
        matches = match_outputs(prepared.output_names or [(f"output {i}",) for i in range(len(references))],
                                references, served_output_names(served), converted)
        result = compare_outputs(references, converted, validation.y, matches)
    verdict = gate(result, options.max_accuracy_drop, min_top1_agreement=options.min_top1_agreement,
                   min_sqnr_db=options.min_sqnr_db, refuse_uncertain=options.refuse_uncertain)
    timings["validate_s"] = time.perf_counter() - t
    latency = measure_latency(served, first_sample(served, val_x), warmup=options.latency_warmup,
                              runs=options.latency_runs)
    # candidates: the bundle keeps golden_samples of them, chosen where the interpreters disagree most
    golden = golden_inputs(served.inputs, val_x, max(options.golden_samples, POOL_SAMPLES), options.seed)
    reference_inputs, reference_source = representative_inputs(served.inputs, prepared.splits)
    timings["total_s"] = timings.get("baseline_s", 0.0) + timings.get("prune_s", 0.0) + time.perf_counter() - started
    info = read_model(model_bytes)
    rep = convert_report(
        source=source, options=options, info=info, baseline_bytes=len(prepared.baseline), pruning=pruning,
        encoding=encoding, validation=result, gate=verdict, latency=latency, timings=timings,
        data_sizes=prepared.splits.sizes(), tensorflow_version=_tf_version(),
    )
    rep["evaluation"] = {k: v for k, v in prepared.evaluation.items() if k != "warnings"}
    rep["warnings"] = list(prepared.evaluation.get("warnings", []))
    if verdict.decision == "warn":
        rep["warnings"].append(f"gate: {verdict.reason}")
    rep["structured_pruning"] = structured.to_dict() if structured else None
    baseline_info = read_model(prepared.baseline)  # the unpruned float32 model: what MACs are compared with
    rep["compute"] = {"params": info.params, "macs": info.macs, "float32_params": baseline_info.params,
                      "float32_macs": baseline_info.macs}
    return Conversion(model=model_bytes, golden_inputs=golden, report=rep, gate=verdict, validation=result,
                      encoding=encoding, pruning=pruning, timings=timings, structured=structured,
                      reference_inputs=reference_inputs, reference_source=reference_source)


def representative_inputs(specs: Any, splits: Splits) -> tuple[list[NDArray[Any]] | None, dict[str, Any]]:
    """The samples the drift reference is counted over: the calibration set first, then the evaluation and
    fine-tuning sets (all drawn from what the model will see), up to REFERENCE_SAMPLES, in the input's dtype."""
    if len(specs) != 1:
        return None, {}
    parts, used = [], {}
    room = REFERENCE_SAMPLES
    for label, ds in (("calibration", splits.calibration), ("validation", splits.validation),
                      ("fine_tune", splits.fine_tune)):
        if ds is None or room <= 0:
            continue
        take = ds.x[:room]
        parts.append(take)
        used[label] = len(take)
        room -= len(take)
    if not parts:
        return None, {}
    x = np.concatenate(parts)
    return [quantize_input(x, specs[0])[:, None]], {"samples": used}


def _ratio(a: int | None, b: int | None) -> float | None:
    return round(a / b, 3) if a and b else None


def convert_report(*, source: SourceModel, options: ConvertOptions, info: ModelInfo, baseline_bytes: int,
                   pruning: PruneResult | None, encoding: EncodingDecision, validation: Validation | None,
                   gate: Gate, latency: Latency, timings: dict[str, float], data_sizes: dict[str, int],
                   tensorflow_version: str) -> dict[str, Any]:
    """Everything `convert` measured, as a JSON-ready dict."""
    model = info.to_dict()
    return {
        "schema": REPORT_SCHEMA,
        "kind": "convert",
        "source": {"path": source.path, "kind": source.kind},
        "tensorflow": tensorflow_version,
        "quantization": {"mode": options.quantize, "summary": MODES[options.quantize].summary,
                         "detected": info.quantization},
        "size": {
            "bytes": info.size, "wire_bytes": info.wire_size, "chunks": info.chunks,
            "float32_tflite_bytes": baseline_bytes,
            "ratio_disk": _ratio(baseline_bytes, info.size), "ratio_wire": _ratio(baseline_bytes, info.wire_size),
        },
        "pruning": pruning.to_dict() if pruning else None,
        "encoding": encoding.to_dict(),
        "operators": model["operators"],
        "inputs": model["inputs"],
        "outputs": model["outputs"],
        "weights": model["weights"],
        "sparsity": model["sparsity"],
        "float_ops": model["float_ops"],
        "validation": validation.to_dict() if validation else None,
        "gate": gate.to_dict(),
        "latency": latency.to_dict(),
        "conversion_s": round(timings.get("total_s", 0.0), 3),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "data": {**data_sizes, "seed": options.seed, "calibration_used": min(data_sizes.get("calibration", 0),
                                                                               options.calibration_samples)},
        "options": {
            "prune": options.prune, "prune_structure": (f"{options.prune_structure[0]}:{options.prune_structure[1]}"
                                                        if options.prune_structure else None),
            "prune_epochs": options.prune_epochs, "batch_size": options.batch_size,
            "learning_rate": options.learning_rate, "sparse_encoding": options.sparse_encoding,
            "max_accuracy_drop": options.max_accuracy_drop, "min_top1_agreement": options.min_top1_agreement,
            "min_sqnr_db": options.min_sqnr_db, "refuse_uncertain": options.refuse_uncertain,
        },
    }


def served_output_names(model: Any) -> list[tuple[str, ...]]:
    """Each converted output's names: the agent's name for it first, then its signature name and tensor name."""
    from edgefleet.tensors import distinct_names, signature_names

    signature = signature_names(model.interpreter, "outputs")
    served = distinct_names(model.outputs, signature)
    return [tuple(dict.fromkeys(n for n in (served[j], signature[j] if signature else None, spec.name) if n))
            for j, spec in enumerate(model.outputs)]


def golden_inputs(specs: Any, x: NDArray[Any] | None, samples: int, seed: int = 0) -> list[NDArray[Any]]:
    """Golden inputs stacked over samples, each one invoke's tensor (batch of one), in the input's dtype."""
    if x is not None and len(specs) == 1:
        chosen = quantize_input(x[:samples], specs[0])
        return [chosen[:, None]]
    return random_inputs(specs, samples, seed)


def _check_samples(model: Any, x: NDArray[Any] | None, count: int = 8) -> list[list[NDArray[Any]]]:
    if x is not None and len(model.inputs) == 1:
        xq = quantize_input(x[:count], model.inputs[0])
        return [[xq[i:i + 1]] for i in range(len(xq))]
    golden = random_inputs(model.inputs, count)
    return [[g[i] for g in golden] for i in range(count)]


def _tf_version() -> str:
    import tensorflow as tf

    return str(tf.__version__)
