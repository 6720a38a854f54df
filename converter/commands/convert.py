"""`edgectl convert SRC -o BUNDLE`: prune, quantize, validate, report, and write a signed bundle."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from collections.abc import Iterator
from typing import Any

from edgefleet.converter.errors import AccuracyGateError
from edgefleet.converter.output import (
    add_bundle_options,
    add_json,
    check_output,
    default_name,
    load_key,
    model_name,
    number_type,
    positive_int,
    print_json,
    stderr_console,
    stdout_console,
    version_number,
)
from edgefleet.errors import UsageError

log = logging.getLogger(__name__)

MODE_HELP = """\
quantization modes (--quantize):
  none       float32 weights and activations (the baseline)
  dynamic    int8 weights, float activations quantized on the fly; no calibration
  float16    float16 weights, float32 compute; no calibration
  int8       int8 weights and activations, float32 input/output; calibrates on samples
  int8-full  int8 everywhere, int8 input/output, for integer-only accelerators; fails (exit 2)
             when an operator cannot be quantized
  int16x8    int16 activations, int8 weights, float32 input/output; calibrates on samples

data (--data FILE.npz): array 'x' holds model-ready inputs (already normalised), samples on
axis 0; optional 'y' holds integer class labels. --eval-data FILE.npz holds held-out samples the
float model was never trained on: the gate judges on them, and --data is split with --seed
(stratified by label) into fine-tune / calibration sets only. Without --eval-data a validation
split of --data is held back, and the gate warns that the model may have seen it. Or give
--fine-tune and --calibration files. --input-mean/--input-std tell the agent how to normalise raw
inputs.

pruning: with labels, the model is fine-tuned while sparsity rises on a polynomial schedule;
without labels, pruning is one-shot. A pruned model is also converted with sparse encoding, which
is kept only when smaller and when it runs in LiteRT with XNNPACK like the dense one.
--prune-channels removes whole Conv filters and Dense units (smallest L1 norm first) and rebuilds
a smaller model that runs faster; it is fine-tuned like --prune and combines with it.

gate: the same evaluation samples go through the float and the converted model; the accuracy
drop (or, without labels, top-1 disagreement with the float model) is reported with a 95 %
confidence interval. The interval wholly above --max-accuracy-drop: edgectl prints the report,
writes nothing and exits 3. The interval straddling it: the bundle is written with a warning
saying how many evaluation samples would settle it. --min-top1-agreement and --min-sqnr-db add
checks of every output's agreement with the float model (for detectors, embedders, regressors).

examples:
  edgectl convert model.keras -o bundles/digits-v3 --name digits --version 3 \\
      --data digits-train.npz --eval-data digits-test.npz --prune 0.8 --quantize int8 \\
      --labels labels.txt --key keys/
  edgectl convert saved_model/ -o out --quantize float16 --json
"""


def warning_line(message: str) -> None:
    """One line on stderr for something the user should know but that does not stop the run."""
    print(f"edgectl: warning: {' '.join(str(message).split())}", file=sys.stderr)


def parse_structure(text: str) -> tuple[int, int]:
    """argparse type: 'M:N' structured sparsity."""
    try:
        m, n = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected M:N such as 2:4, got {text!r}") from None
    if not 0 < m < n:
        raise argparse.ArgumentTypeError(f"need 0 < M < N, got {text!r}")
    return m, n


channel_fraction = number_type(float, lambda v: 0.0 < v < 1.0, "expected a fraction such as 0.5, got {text!r}",
                               "fraction of filters/units to remove must be between 0 and 1 (exclusive), got {text}")
"""argparse type: the share of filters/units to remove, strictly between 0 and 1."""

sparsity = number_type(float, lambda v: 0.0 < v < 1.0, "expected a fraction such as 0.8, got {text!r}",
                       "sparsity must be between 0 and 1 (exclusive), got {text}")
"""argparse type: a fraction strictly between 0 and 1."""


def add_parser(subparsers: Any) -> None:
    """Register `convert`."""
    p = subparsers.add_parser(
        "convert", help="Keras/SavedModel -> pruned, quantized, validated, signed TFLite bundle",
        description="Convert a Keras 3 .keras file, a legacy .h5 file or a SavedModel directory into a "
                    "TFLite bundle: optional pruning, quantization calibrated on real samples, validation "
                    "with LiteRT against the float model, golden vectors, a report and a signed manifest.",
        epilog=MODE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help=".keras or .h5 file, or SavedModel directory")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="bundle directory to write")
    p.add_argument("--name", type=model_name, help="model name (default: from SRC's file name)")
    p.add_argument("--version", metavar="N", type=version_number, default=1, help="integer model version (default 1)")
    p.add_argument("--quantize", default="none", metavar="MODE",
                   choices=["none", "dynamic", "float16", "int8", "int8-full", "int16x8"],
                   help="none|dynamic|float16|int8|int8-full|int16x8 (default none)")
    g = p.add_argument_group("pruning")
    g.add_argument("--prune", type=sparsity, metavar="SPARSITY", help="target fraction of zero weights, e.g. 0.8")
    g.add_argument("--prune-structure", type=parse_structure, metavar="M:N",
                   help="keep M of every N weights along the input axis (e.g. 2:4); implies --prune 1-M/N")
    g.add_argument("--prune-channels", type=channel_fraction, metavar="FRACTION",
                   help="remove this share of the filters/units of every Conv/Dense layer that can lose them "
                        "(smallest L1 norm first; structured: the model gets smaller and faster), e.g. 0.5")
    g.add_argument("--prune-epochs", metavar="N", type=int, default=None,
                   help="fine-tuning epochs when labels exist (default: enough for 400 steps, 2 to 20)")
    g.add_argument("--batch-size", metavar="N", type=positive_int, default=32, help="fine-tuning batch size (default 32)")
    g.add_argument("--learning-rate", metavar="LR", type=float, default=1e-3, help="fine-tuning learning rate (default 1e-3)")
    g.add_argument("--no-sparse-encoding", action="store_true",
                   help="do not try TFLite's sparse tensor encoding for pruned weights")
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="FILE.npz", help="samples 'x' and optional labels 'y', split automatically")
    d.add_argument("--fine-tune", metavar="FILE.npz", help="fine-tuning set (instead of --data)")
    d.add_argument("--calibration", metavar="FILE.npz", help="calibration set (instead of --data)")
    d.add_argument("--eval-data", metavar="FILE.npz",
                   help="held-out evaluation set the gate judges on (recommended; with --data, --data is then "
                        "used for fine-tuning and calibration only)")
    d.add_argument("--validation", metavar="FILE.npz", help="evaluation set without --data (same as --eval-data)")
    d.add_argument("--validation-split", metavar="F", type=float, default=0.2, help="share of --data for validation (0.2)")
    d.add_argument("--calibration-split", metavar="F", type=float, default=0.2, help="share of --data for calibration (0.2)")
    d.add_argument("--calibration-samples", metavar="N", type=positive_int, default=200,
                   help="calibration samples used at most (default 200)")
    d.add_argument("--seed", metavar="N", type=int, default=0, help="seed of the split and fine-tuning (default 0)")
    v = p.add_argument_group("validation and bundle")
    v.add_argument("--max-accuracy-drop", type=float, default=1.0, metavar="POINTS",
                   help="largest accepted accuracy drop in percentage points (default 1.0); refused when "
                        "the 95 %% confidence interval of the drop lies wholly above it")
    v.add_argument("--refuse-uncertain", action="store_true",
                   help="refuse (exit 3) also when a check's interval straddles its limit, instead of warning")
    v.add_argument("--min-top1-agreement", type=float, default=None, metavar="PERCENT",
                   help="smallest accepted top-1 agreement with the float model, per vector output, in percent")
    v.add_argument("--min-sqnr-db", type=float, default=None, metavar="DB",
                   help="smallest accepted signal-to-quantization-noise ratio against the float model, per output")
    add_bundle_options(v, labels_help="class names, one per line, in output order",
                       mean_help="normalisation mean, scalar or per channel",
                       std_help="normalisation std, scalar or per channel")
    add_json(p)
    p.set_defaults(func=run)


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgefleet.converter.convert.pipeline import Hooks

    if not enabled:
        yield Hooks()
        return
    console = stderr_console()
    show_bars = console.is_terminal
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True, disable=not show_bars) as progress:
            tasks: dict[str, Any] = {}

            def step(kind: str) -> Any:
                def update(done: int, total: int) -> None:
                    # A second calibration pass (sparse candidate) starts a fresh bar, and so does one
                    # whose bar a new stage removed.
                    task = next((t for t in progress.tasks if t.id == tasks.get(kind)), None)
                    if task is None or (task.finished and done == 1):
                        tasks[kind] = progress.add_task(kind, total=total)
                    progress.update(tasks[kind], completed=done, total=total)
                return update

            def stage(text: str) -> None:
                for task in list(progress.tasks):  # a new stage clears the bars of the last one
                    if task.finished:
                        progress.remove_task(task.id)
                log.info("%s", text)
                if show_bars:
                    console.print(f"[dim]edgectl convert: {text}[/dim]")

            yield Hooks(stage=stage, fine_tune=step("fine-tuning"), calibration=step("calibrating"))
    finally:
        console.file.close()


def _splits(args: argparse.Namespace) -> Any:
    from edgefleet.converter.convert.data import Splits, load_npz, split

    separate = [args.fine_tune, args.calibration, args.validation]
    if args.data and any(separate):
        raise UsageError("--data cannot be combined with --fine-tune/--calibration/--validation")
    if args.eval_data and args.validation:
        raise UsageError("--eval-data and --validation both name the evaluation set; give one")
    for option, value in (("--validation-split", args.validation_split), ("--calibration-split", args.calibration_split)):
        if not 0.0 <= value < 1.0:
            raise UsageError(f"{option}: expected a fraction in [0, 1), got {value:g}")
    if args.validation_split + args.calibration_split >= 1.0:
        raise UsageError("--validation-split + --calibration-split leave nothing for fine-tuning")
    evaluation = load_npz(args.eval_data, "--eval-data") if args.eval_data else None
    if args.data:
        if evaluation is None:
            return split(load_npz(args.data), seed=args.seed, validation=args.validation_split,
                         calibration=args.calibration_split)
        # The held-out file replaces the validation split: --data goes to fine-tuning and calibration.
        parts = split(load_npz(args.data), seed=args.seed, validation=0.0, calibration=args.calibration_split)
        return Splits(fine_tune=parts.fine_tune, calibration=parts.calibration, validation=evaluation)
    return Splits(
        fine_tune=load_npz(args.fine_tune, "--fine-tune") if args.fine_tune else None,
        calibration=load_npz(args.calibration, "--calibration") if args.calibration else None,
        validation=evaluation or (load_npz(args.validation, "--validation") if args.validation else None),
    )


def run(args: argparse.Namespace) -> int:
    """Convert, report, gate, write."""
    from edgefleet.converter.convert.data import check_normalisation, classes_of, load_labels, parse_floats

    out = check_output(args.output, args.force)
    if not 0.0 <= args.max_accuracy_drop <= 100.0:
        raise UsageError(f"--max-accuracy-drop: expected points between 0 and 100, got {args.max_accuracy_drop:g}")
    if args.min_top1_agreement is not None and not 0.0 <= args.min_top1_agreement <= 100.0:
        raise UsageError(f"--min-top1-agreement: expected a percentage between 0 and 100, "
                         f"got {args.min_top1_agreement:g}")
    if args.min_sqnr_db is not None and not math.isfinite(args.min_sqnr_db):
        raise UsageError(f"--min-sqnr-db: expected a finite number of decibels, got {args.min_sqnr_db:g}")
    if args.prune_epochs is not None and args.prune_epochs < 0:
        raise UsageError(f"--prune-epochs: must be >= 0, got {args.prune_epochs}")
    key = load_key(args.key)
    mean = parse_floats(args.input_mean, "--input-mean")
    std = parse_floats(args.input_std, "--input-std")
    splits = _splits(args)

    from edgefleet.converter.bundle.writer import BundleSpec, write_bundle
    from edgefleet.converter.convert.load import load_source
    from edgefleet.converter.convert.pipeline import ConvertOptions, convert
    from edgefleet.converter.convert.report import metrics, print_written, render

    source = load_source(args.src)
    if source.inputs:
        check_normalisation(mean, std, source.inputs[0])
    # with --labels-output the count is checked against that output, when the bundle is written
    labels = load_labels(args.labels, None if args.labels_output else classes_of(source.outputs[0])) \
        if args.labels else None
    options = ConvertOptions(
        quantize=args.quantize, prune=args.prune, prune_structure=args.prune_structure,
        prune_channels=args.prune_channels,
        prune_epochs=args.prune_epochs, batch_size=args.batch_size, learning_rate=args.learning_rate,
        sparse_encoding=not args.no_sparse_encoding, max_accuracy_drop=args.max_accuracy_drop,
        min_top1_agreement=args.min_top1_agreement, min_sqnr_db=args.min_sqnr_db,
        refuse_uncertain=args.refuse_uncertain,
        calibration_samples=args.calibration_samples, golden_samples=args.golden_samples,
        latency_runs=args.latency_runs, seed=args.seed,
    )
    with _progress(not args.json) as hooks:
        result = convert(source, splits, options, hooks)
    report = result.report
    report["preprocessing"] = {"mean": list(mean) if mean else None, "std": list(std) if std else None}
    report["postprocessing"] = {"labels": list(labels) if labels else None, "top_k": args.top_k}
    for warning in report.get("warnings") or []:
        warning_line(warning)
    if not result.gate.passed:
        if args.json:
            print_json({"written": False, "report": report})
        else:
            render(report, stdout_console())
        raise AccuracyGateError(f"{result.gate.reason}; no bundle written")
    name = args.name or default_name(args.src)
    spec = BundleSpec(name=name, version=args.version, golden_inputs=result.golden_inputs, labels=labels,
                      labels_output=args.labels_output, top_k=args.top_k, mean=mean, std=std, metrics=metrics(report), report=report,
                      golden_samples=args.golden_samples, seed=args.seed,
                      reference_inputs=result.reference_inputs, reference_source=result.reference_source)
    deployment = write_bundle(out, result.model, spec, key=key, overwrite=args.force, interpreters=args.interpreters)
    print_written(out, name, args.version, deployment, report, args.json)
    return 0
