"""`edgectl package MODEL.tflite -o BUNDLE`: bundle an existing TFLite model (MediaPipe, Model Maker, ...)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgefleet.converter.output import (
    add_bundle_options,
    add_json,
    check_output,
    load_key,
    model_name,
    version_number,
)
from edgefleet.errors import UsageError

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
    p.add_argument("--calibration", metavar="FILE.npz",
                   help="representative samples 'x' for the drift reference the boards compare live inputs "
                        "with (default: --data)")
    p.add_argument("--seed", metavar="N", type=int, default=0, help="seed for random golden inputs (default 0)")
    add_bundle_options(p, labels_help="class names, one per line (default: from TFLite metadata)",
                       mean_help="normalisation mean (default: from metadata)",
                       std_help="normalisation std (default: from metadata)")
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
    from edgefleet.converter.bundle.writer import BundleSpec, write_bundle
    from edgefleet.converter.convert.package import package
    from edgefleet.converter.convert.report import metrics, print_written

    out = check_output(args.output, args.force)
    key = load_key(args.key)
    data = read_tflite(args.model)
    packaged = package(args.model, data, input_mean=args.input_mean, input_std=args.input_std,
                       labels_file=args.labels, data_file=args.data, top_k=args.top_k,
                       golden_samples=args.golden_samples, latency_runs=args.latency_runs, seed=args.seed,
                       calibration_file=args.calibration)
    report = packaged.report
    spec = BundleSpec(name=args.name, version=args.version, golden_inputs=packaged.golden_inputs,
                      labels=packaged.labels, labels_output=args.labels_output, top_k=args.top_k,
                      mean=packaged.mean, std=packaged.std, metrics=metrics(report), report=report,
                      golden_samples=args.golden_samples, seed=args.seed,
                      reference_inputs=packaged.reference_inputs, reference_source=packaged.reference_source or {})
    deployment = write_bundle(out, data, spec, key=key, overwrite=args.force, interpreters=args.interpreters)
    print_written(out, args.name, args.version, deployment, report, args.json)
    return 0
