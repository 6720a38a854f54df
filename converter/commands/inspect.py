"""`edgectl inspect PATH`: what a .tflite file or a bundle holds, and whether a bundle is intact and signed."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from edgefleet.converter.output import add_json, print_json, stdout_console
from edgefleet.errors import UsageError

EPILOG = """\
For a bundle, the model and golden files are checked against the manifest's SHA-256 and sizes, the
model's signature against the manifest's, and with --pubkey the Ed25519 signature against that key.
A bundle that fails any check is an error (exit 2).

examples:
  edgectl inspect model.tflite
  edgectl inspect bundles/digits-v3 --pubkey keys/edgefleet.pub --json
"""


def add_parser(subparsers: Any) -> None:
    """Register `inspect`."""
    p = subparsers.add_parser(
        "inspect", help="show a .tflite model or a bundle: signature, operators, sizes, sparsity, signing",
        description="Show what a .tflite model or a bundle directory holds: input/output signature with "
                    "quantization, operators with versions, sizes on disk and on the wire, sparsity per "
                    "kernel, quantization mode, TFLite metadata; for a bundle also the manifest, the "
                    "converter's figures and the validity of its files and signature.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", metavar="PATH", help="a .tflite file or a bundle directory")
    p.add_argument("--pubkey", metavar="KEY", help="verify the bundle's signature with this public key (or directory)")
    p.add_argument("--latency-runs", metavar="N", type=int, default=50,
                   help="time N bare invokes with LiteRT on this host (default 50; 0 skips)")
    add_json(p)
    p.set_defaults(func=run)


def host_latency(result: dict[str, Any], runs: int) -> dict[str, Any] | None:
    """Bare LiteRT latency of the inspected model on this host (inputs set once, invoke timed); None for 0 runs."""
    if runs <= 0:
        return None
    from edgefleet.converter.bundle.describe import model_file
    from edgefleet.converter.tflite.latency import bare_latency

    return bare_latency(model_file(result).read_bytes(), runs=runs)


def fmt_latency(lat: dict[str, Any] | None) -> str:
    """One line for a bare latency measurement (or why there is none)."""
    if lat is None:
        return "-"
    if "error" in lat:
        return f"not measured: {lat['error']}"
    return f"p50 {lat['p50_ms']:.4f} ms, p95 {lat['p95_ms']:.4f} ms (bare invoke, {lat['backend']}, " \
           f"xnnpack={'on' if lat['xnnpack'] else 'off'}, {lat['runs']} runs)"


def render(result: dict[str, Any]) -> None:
    """Print an inspect result as tables."""
    from rich.table import Table

    from edgefleet.converter.convert.report import (
        agreement_line,
        fmt_bytes,
        fmt_pct,
        gate_line,
        operator_table,
        signature_table,
    )

    console = stdout_console()
    model = result["model"]
    table = Table(title=f"{result['kind']}: {result['path']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    if result["kind"] == "bundle":
        m = result["manifest"]
        sig = result["signature"]
        if sig["verified"]:
            signed = f"[green]valid[/green], key {sig['key_id']}"
        elif sig["signed"]:
            signed = f"signed by key {sig['key_id']} ([yellow]not verified: pass --pubkey[/yellow])"
        else:
            signed = "[yellow]unsigned[/yellow]"
        table.add_row("model", f"{m['name']} v{m['version']}")
        table.add_row("deployment", m["deployment_id"])
        table.add_row("signature", signed)
        table.add_row("files", ", ".join(f"{k} {v}" for k, v in result["files"].items()))
        table.add_row("expires", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["expires_at"]))
                      + (" [red](expired)[/red]" if m["expired"] else ""))
        table.add_row("golden vectors", f"{m['golden_samples']} samples, atol {m['tolerance']['atol']:g} "
                                        f"rtol {m['tolerance']['rtol']:g}")
        pre = m["preprocessing"]
        if pre["mean"] is not None or pre["std"] is not None:
            table.add_row("normalisation", f"mean {pre['mean']} std {pre['std']}")
        labels = m["postprocessing"]["labels"]
        if labels:
            shown = ", ".join(labels[:6]) + (", ..." if len(labels) > 6 else "")
            table.add_row("labels", f"{len(labels)}: {shown} (top-{m['postprocessing']['top_k']})")
        metrics = m["metrics"]
        if metrics.get("accuracy") is not None:
            drop = metrics.get("accuracy_drop_pt")
            table.add_row("accuracy", fmt_pct(metrics["accuracy"]) + (f" (drop {drop:.2f} points)" if drop is not None else ""))
        if metrics.get("accuracy_drop_low_pt") is not None:
            table.add_row("paired drop", f"95 % CI {metrics['accuracy_drop_low_pt']:.2f} to "
                                         f"{metrics['accuracy_drop_high_pt']:.2f} points on "
                                         f"{int(metrics.get('validation_samples') or 0)} samples "
                                         f"({int(metrics.get('float_only_correct') or 0)} right only in float, "
                                         f"{int(metrics.get('converted_only_correct') or 0)} right only converted)")
        report = result.get("report") or {}
        per_output = ((report.get("validation") or {}).get("outputs")) or []
        if len(per_output) > 1:
            for o in per_output:
                table.add_row(f"agreement {o['name']}", agreement_line(o))
        elif metrics.get("sqnr_db") is not None or metrics.get("cosine_min") is not None:
            table.add_row("agreement", f"SQNR {metrics.get('sqnr_db', '-')} dB, "
                                       f"min cosine {metrics.get('cosine_min', '-')}")
        evaluation = report.get("evaluation") or {}
        if evaluation.get("source"):
            seen = "held out" if evaluation.get("held_out") else "[yellow]not held out[/yellow]"
            table.add_row("evaluation data", f"{evaluation['source']}, {evaluation['samples']} samples, {seen}")
        if report.get("gate"):
            method = report["gate"].get("method")
            table.add_row("accuracy gate", gate_line(report["gate"]) + (f" [{method}]" if method else ""))
        for warning in report.get("warnings") or []:
            table.add_row("[yellow]warning[/yellow]", warning)
        if metrics.get("latency_p50_ms") is not None:
            table.add_row("host latency", f"p50 {metrics['latency_p50_ms']} ms, p95 {metrics.get('latency_p95_ms')} ms")
    table.add_row("bytes on disk", fmt_bytes(model["bytes"]))
    table.add_row("bytes on the wire", f"{fmt_bytes(model['wire_bytes'])} in {model['chunks']} chunk(s)")
    table.add_row("parameters", f"{model.get('params', 0):,}")
    table.add_row("MACs per invoke", f"{model.get('macs', 0):,} (" + ", ".join(
        f"{op} {n:,}" for op, n in (model.get("macs_by_op") or {}).items()) + ")")
    if "host_latency" in result:
        table.add_row("host latency here", fmt_latency(result["host_latency"]))
    table.add_row("quantization", model["quantization"])
    table.add_row("sparsity (kernels)", fmt_pct(model["sparsity"]) + (", sparse encoding" if model["sparse_encoding"] else ""))
    if model.get("min_runtime_version"):
        table.add_row("min runtime version", model["min_runtime_version"])
    meta = model.get("metadata")
    if meta:
        table.add_row("TFLite metadata", f"mean {meta['mean']} std {meta['std']} labels {meta['labels']}")
    console.print(table)
    console.print(operator_table(model["operators"]))
    console.print(signature_table(model))
    if model["weights"]:
        weights = Table(title="Kernels")
        for col in ("tensor", "shape", "dtype", "sparsity", "encoding"):
            weights.add_column(col)
        for w in model["weights"]:
            weights.add_row(w["name"], str(w["shape"]), w["dtype"], fmt_pct(w["sparsity"]), w["encoding"])
        console.print(weights)


def run(args: argparse.Namespace) -> int:
    """Inspect a model or bundle."""
    path = Path(args.path)
    if args.latency_runs < 0:
        raise UsageError(f"--latency-runs: must be >= 0, got {args.latency_runs}")
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    if args.pubkey and not Path(args.pubkey).exists():
        raise UsageError(f"--pubkey {args.pubkey}: no such file or directory")
    from edgefleet.converter.bundle.describe import describe_bundle, describe_tflite

    if path.is_dir():
        result = describe_bundle(path, args.pubkey)
    else:
        if args.pubkey:
            raise UsageError("--pubkey applies to bundles, not to a .tflite file")
        result = describe_tflite(path)
    if args.latency_runs:
        result["host_latency"] = host_latency(result, args.latency_runs)
    if args.json:
        print_json(result)
    else:
        render(result)
    return 0
