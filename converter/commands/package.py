"""`edgectl package MODEL.tflite -o BUNDLE`: bundle an existing TFLite model (MediaPipe, Model Maker, ...)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from edgefleet.converter.errors import UsageError
from edgefleet.converter.output import (
    add_json,
    check_output,
    load_key,
    model_name,
    positive_int,
    print_json,
    stdout_console,
    version_number,
)
from edgefleet.converter.tflite.interpreters import OPTION_HELP as INTERPRETERS_HELP
from edgefleet.converter.tflite.interpreters import option as interpreter_option

EPILOG = """\
The model's signature is read from the file. Golden vectors come from --data (array 'x', model-ready
inputs; float samples are quantized for integer inputs with the input's scale and zero point) or,
without data, from random inputs over each input's dtype range. With labels 'y' in the data the
model's accuracy goes into the report. Normalisation and labels are taken from the options or, when
absent, from the model's TFLite metadata (NormalizationOptions and a TENSOR_AXIS_LABELS file).

example:
  edgectl package efficientdet.tflite -o bundles/det-v1 --name det --version 1 --key keys/
"""


def add_parser(subparsers: Any) -> None:
    """Register `package`."""
    p = subparsers.add_parser(
        "package", help="bundle an existing .tflite model (golden vectors, manifest, signature)",
        description="Bundle an existing TFLite model: read its signature, compute golden vectors with "
                    "LiteRT, measure host latency, write manifest.json (signed with --key) and report.json.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL.tflite", help="the TFLite model file")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="bundle directory to write")
    p.add_argument("--name", type=model_name, required=True, help="model name")
    p.add_argument("--version", metavar="N", type=version_number, required=True, help="integer model version")
    p.add_argument("--data", metavar="FILE.npz", help="samples 'x' (and optional labels 'y') for golden vectors")
    p.add_argument("--golden-samples", metavar="N", type=positive_int, default=8, help="golden vectors to store (default 8)")
    p.add_argument("--interpreters", metavar="LIST", type=interpreter_option, default="auto", help=INTERPRETERS_HELP)
    p.add_argument("--seed", metavar="N", type=int, default=0, help="seed for random golden inputs (default 0)")
    p.add_argument("--latency-runs", metavar="N", type=positive_int, default=100, help="timed runs for host latency (100)")
    p.add_argument("--labels", metavar="FILE", help="class names, one per line (default: from TFLite metadata)")
    p.add_argument("--labels-output", metavar="OUTPUT",
                   help="the output the labels name classes of, as the agent names it (default: the first output "
                        "whose last dimension equals the number of labels)")
    p.add_argument("--top-k", metavar="K", type=positive_int, default=5, help="results the agent returns (default 5)")
    p.add_argument("--input-mean", metavar="M[,M...]", help="normalisation mean (default: from metadata)")
    p.add_argument("--input-std", metavar="S[,S...]", help="normalisation std (default: from metadata)")
    p.add_argument("--key", metavar="KEY", help="sign with this private key (file or keygen directory)")
    p.add_argument("--force", action="store_true", help="replace an existing output bundle")
    add_json(p)
    p.set_defaults(func=run)


def read_tflite(path: str) -> bytes:
    """The bytes of a model file; UsageError when missing or unreadable."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such file")
    try:
        return p.read_bytes()
    except OSError as err:
        raise UsageError(f"{p}: {err.strerror}") from err


def run(args: argparse.Namespace) -> int:
    """Package, report, write."""
    import numpy as np
    from edgefleet.converter.bundle.golden import POOL_SAMPLES
    from edgefleet.converter.bundle.writer import BundleSpec, write_bundle
    from edgefleet.converter.convert.data import (
        check_inputs,
        check_labels,
        check_normalisation,
        classes_of,
        load_labels,
        load_npz,
        parse_floats,
        quantize_input,
        random_inputs,
    )
    from edgefleet.converter.convert.evaluate import check_invokes, first_sample, measure_latency, run_samples
    from edgefleet.converter.convert.report import metrics, package_report, render
    from edgefleet.converter.tflite.info import read_model
    from edgefleet.converter.tflite.native import captured_native_output

    from edgefleet.errors import RuntimeBackendError
    from edgefleet.runtime import load_model

    started = time.perf_counter()
    out = check_output(args.output, args.force)
    key = load_key(args.key)
    data = read_tflite(args.model)
    try:
        info = read_model(data)
    except UsageError as err:
        raise UsageError(f"{args.model}: {err}") from err
    try:
        with captured_native_output():  # LiteRT announces its XNNPACK delegate on stderr
            model = load_model(data, "auto", use_xnnpack=True)
    except RuntimeBackendError as err:
        raise UsageError(f"{args.model}: {err}") from err
    try:
        check_invokes(model, first_sample(model, None, args.seed), sparse_encoded=info.sparse_encoded)
    except UsageError as err:
        raise UsageError(f"{args.model}: {err}") from err
    meta = info.metadata
    mean = parse_floats(args.input_mean, "--input-mean") or (meta.mean if meta else None)
    std = parse_floats(args.input_std, "--input-std") or (meta.std if meta else None)
    check_normalisation(mean, std, model.inputs[0])
    classes = classes_of(model.outputs[0])
    # the count is checked against the output the labels are bound to, when the bundle is written
    labels = load_labels(args.labels, None) if args.labels else (meta.labels if meta else None)
    accuracy, samples = None, 0
    if args.data:
        if len(model.inputs) != 1:
            raise UsageError(f"--data: the model has {len(model.inputs)} inputs; data files support one-input models")
        ds = check_inputs(load_npz(args.data), model.inputs[0])
        check_labels(ds, classes)
        golden = [quantize_input(ds.x[:max(args.golden_samples, POOL_SAMPLES)], model.inputs[0])[:, None]]
        golden_source = f"{min(args.golden_samples, len(golden[0]))} of the first {len(golden[0])} samples of {args.data}"
        if ds.y is not None:
            predicted = run_samples(model, ds.x).argmax(axis=-1)
            accuracy, samples = float(np.mean(predicted == ds.y)), len(ds)
        sample_x = ds.x
    else:
        golden = random_inputs(model.inputs, max(args.golden_samples, POOL_SAMPLES), args.seed)
        golden_source = f"{args.golden_samples} of {len(golden[0])} random inputs (seed {args.seed})"
        sample_x = None
    latency = measure_latency(model, first_sample(model, sample_x, args.seed), runs=args.latency_runs)
    report = package_report(path=args.model, info=info, validation_accuracy=accuracy, samples=samples,
                            latency=latency, golden_source=golden_source)
    report["preprocessing"] = {"mean": list(mean) if mean else None, "std": list(std) if std else None}
    report["postprocessing"] = {"labels": list(labels) if labels else None, "top_k": args.top_k}
    report["conversion_s"] = round(time.perf_counter() - started, 3)
    spec = BundleSpec(name=args.name, version=args.version, golden_inputs=golden, labels=labels,
                      labels_output=args.labels_output, top_k=args.top_k,
                      mean=mean, std=std, metrics=metrics(report), report=report,
                      golden_samples=args.golden_samples, seed=args.seed)
    deployment = write_bundle(out, data, spec, key=key, overwrite=args.force, interpreters=args.interpreters)
    if args.json:
        print_json({"written": True, "bundle": str(out), "name": args.name, "version": args.version,
                    "deployment_id": deployment.deployment_id, "signed_by": deployment.key_id, "report": report})
    else:
        console = stdout_console()
        render(report, console)
        signed = f"signed by key {deployment.key_id}" if deployment.key_id else "[yellow]unsigned[/yellow]"
        console.print(f"wrote [bold]{out}[/bold]: {args.name} v{args.version}, {signed}")
    return 0
