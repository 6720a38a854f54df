"""`edgectl package MODEL.tflite -o BUNDLE`: bundle an existing TFLite model (MediaPipe, Model Maker, ...)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

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
    from edgefleet.converter.bundle.writer import BundleSpec, write_bundle
    from edgefleet.converter.convert.package import package
    from edgefleet.converter.convert.report import metrics, render

    out = check_output(args.output, args.force)
    key = load_key(args.key)
    data = read_tflite(args.model)
    packaged = package(args.model, data, input_mean=args.input_mean, input_std=args.input_std,
                       labels_file=args.labels, data_file=args.data, top_k=args.top_k,
                       golden_samples=args.golden_samples, latency_runs=args.latency_runs, seed=args.seed)
    report = packaged.report
    spec = BundleSpec(name=args.name, version=args.version, golden_inputs=packaged.golden_inputs,
                      labels=packaged.labels, labels_output=args.labels_output, top_k=args.top_k,
                      mean=packaged.mean, std=packaged.std, metrics=metrics(report), report=report,
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
