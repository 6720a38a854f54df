"""The conversion report: one dict (``report.json``), flat metrics for the manifest, rich tables."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from edgefleet.converter.output import print_json, stdout_console

if TYPE_CHECKING:
    from pathlib import Path

    from edgefleet.converter.convert.evaluate import Latency
    from edgefleet.converter.tflite.info import ModelInfo
    from edgefleet.protocol import Deployment

REPORT_SCHEMA = "edgefleet.report/1"


def package_report(*, path: str, info: ModelInfo, validation_accuracy: float | None, samples: int,
                   latency: Latency, golden_source: str) -> dict[str, Any]:
    """What `package` measured about an existing TFLite model."""
    model = info.to_dict()
    return {
        "schema": REPORT_SCHEMA,
        "kind": "package",
        "source": {"path": path, "kind": "tflite"},
        "quantization": {"mode": info.quantization, "detected": info.quantization},
        "size": {"bytes": info.size, "wire_bytes": info.wire_size, "chunks": info.chunks},
        "operators": model["operators"], "inputs": model["inputs"], "outputs": model["outputs"],
        "weights": model["weights"], "sparsity": model["sparsity"],
        "metadata": model["metadata"],
        "validation": {"samples": samples, "accuracy": validation_accuracy} if samples else None,
        "latency": latency.to_dict(),
        "golden": golden_source,
    }


def metrics(report: dict[str, Any]) -> dict[str, float | int | str | bool | None]:
    """The key figures as flat scalars, for the manifest's `model.metrics`."""
    size = report.get("size") or {}
    val = report.get("validation") or {}
    lat = report.get("latency") or {}
    pruning = report.get("pruning") or {}
    gate = report.get("gate") or {}
    interval = val.get("accuracy_drop_interval_pt") or [None, None]
    outputs = val.get("outputs") or []
    first = outputs[0] if outputs else {}
    out: dict[str, Any] = {
        "quantization": (report.get("quantization") or {}).get("mode"),
        "bytes": size.get("bytes"),
        "wire_bytes": size.get("wire_bytes"),
        "float32_tflite_bytes": size.get("float32_tflite_bytes"),
        "ratio_wire": size.get("ratio_wire"),
        "sparsity": report.get("sparsity"),
        "prune_target": pruning.get("target"),
        "prune_channels": (report.get("structured_pruning") or {}).get("fraction"),
        "params": (report.get("compute") or {}).get("params"),
        "macs": (report.get("compute") or {}).get("macs"),
        "sparse_encoding": (report.get("encoding") or {}).get("chosen") == "sparse",
        "accuracy": val.get("accuracy"),
        "float_accuracy": val.get("float_accuracy"),
        "accuracy_drop_pt": val.get("accuracy_drop_pt"),
        "top1_agreement": val.get("top1_agreement"),
        "max_abs_error": val.get("max_abs_error"),
        "validation_samples": val.get("samples"),
        "accuracy_drop_low_pt": interval[0],
        "accuracy_drop_high_pt": interval[1],
        "float_only_correct": val.get("float_only_correct"),
        "converted_only_correct": val.get("converted_only_correct"),
        "mcnemar_p": val.get("mcnemar_p"),
        "sqnr_db": first.get("sqnr_db"),  # the first output's, as before outputs were judged one by one
        "cosine_min": first.get("cosine_min"),
        "gate_decision": gate.get("decision") if gate.get("metric") not in (None, "none") else None,
        "gate_metric": gate.get("metric") if gate.get("metric") not in (None, "none") else None,
        "eval_held_out": (report.get("evaluation") or {}).get("held_out"),
        "latency_p50_ms": lat.get("p50_ms"),
        "latency_p95_ms": lat.get("p95_ms"),
        "conversion_s": report.get("conversion_s"),
        "tensorflow": report.get("tensorflow"),
    }
    out.update(output_metrics(outputs))
    return {k: v for k, v in out.items() if v is not None}


OUTPUT_FIGURES = ("top1_agreement", "sqnr_db", "cosine_min", "max_abs_error", "mean_abs_error")


def output_metrics(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every output's agreement figures as flat scalars: `output.<name>.<figure>` (manifest metrics are flat)."""
    flat: dict[str, Any] = {}
    for o in outputs:
        for fig in OUTPUT_FIGURES:
            flat[f"output.{o['name']}.{fig}"] = o.get(fig)
        if o.get("tflite_name") is not None:
            flat[f"output.{o['name']}.served_as"] = o["tflite_name"]
    return flat


def agreement_line(o: dict[str, Any]) -> str:
    """One output's agreement with the float model in one line."""
    parts = ["identical" if o.get("identical") else
             "SQNR -" if o.get("sqnr_db") is None else f"SQNR {o['sqnr_db']:.1f} dB"]
    if o.get("cosine_min") is not None:
        parts.append(f"min cosine {o['cosine_min']:.4f}")
    if o.get("top1_agreement") is not None:
        parts.append(f"top-1 {o['top1_agreement'] * 100:.2f} %")
    if o.get("max_abs_error") is not None:
        parts.append(f"max abs error {o['max_abs_error']:.3g}")
    line = ", ".join(parts)
    if o.get("tflite_name") is not None:
        line += f" (served as {o['tflite_name']}, matched by {o.get('matched_by')})"
    return line


def fmt_bytes(n: int | None) -> str:
    """Human-readable byte count with the exact figure."""
    if n is None:
        return "-"
    if n < 10_000:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB ({n})"


def fmt_pct(v: float | None) -> str:
    """A fraction as a percentage."""
    return "-" if v is None else f"{v * 100:.2f} %"


def tensor_rows(table: Table, kind: str, tensors: list[dict[str, Any]]) -> None:
    """Add one row per tensor (I/O signature) to `table`."""
    for t in tensors:
        q = t.get("quantization")
        table.add_row(kind, t["name"], t["dtype"], str(t["shape"]),
                      f"scale={q['scale']:.6g} zp={q['zero_point']}" if q else "-")


def signature_table(report: dict[str, Any], title: str = "Signature") -> Table:
    """Input/output signature with quantization parameters."""
    table = Table(title=title)
    for col in ("", "name", "dtype", "shape", "quantization"):
        table.add_column(col)
    tensor_rows(table, "input", report.get("inputs") or [])
    tensor_rows(table, "output", report.get("outputs") or [])
    return table


def operator_table(operators: list[dict[str, Any]]) -> Table:
    """Operators with their versions and node counts."""
    table = Table(title="Operators")
    for col, justify in (("operator", "left"), ("version", "right"), ("nodes", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for op in operators:
        table.add_row(op["name"], str(op["version"]), str(op["count"]))
    return table


GATE_COLOURS = {"pass": "green", "warn": "yellow", "refuse": "red"}


def gate_line(gate: dict[str, Any]) -> str:
    """The gate's verdict in one line: decision, figure, interval, limit and the reason."""
    decision = gate.get("decision") or ("pass" if gate.get("passed") else "refuse")
    colour = GATE_COLOURS.get(decision, "white")
    if gate.get("metric") in (None, "none"):
        return f"[{colour}]{decision}[/{colour}]: {gate.get('reason') or 'nothing to check'}"
    return f"[{colour}]{decision.upper()}[/{colour}]: {gate.get('reason')}"


def agreement_table(outputs: list[dict[str, Any]]) -> Table:
    """Agreement of each converted output with the float model's."""
    table = Table(title="Agreement with the float model")
    for col in ("output", "converted output", "top-1 agreement", "SQNR dB", "cosine mean / min", "max abs error",
                "mean abs error"):
        table.add_column(col)
    for o in outputs:
        top1 = "-" if o.get("top1_agreement") is None else fmt_pct(o["top1_agreement"])
        if o.get("top1_agreement_interval"):
            low, high = o["top1_agreement_interval"]
            top1 += f" (CI {low * 100:.2f}-{high * 100:.2f})"
        sqnr = "identical" if o.get("identical") else ("-" if o.get("sqnr_db") is None else f"{o['sqnr_db']:.1f}")
        cosine = "-" if o.get("cosine_mean") is None else f"{o['cosine_mean']:.6f} / {o['cosine_min']:.6f}"
        served = "-" if o.get("tflite_name") is None else f"{o['tflite_name']} (by {o.get('matched_by')})"
        table.add_row(str(o["name"]), served, top1, sqnr, cosine, f"{o['max_abs_error']:.6g}",
                      f"{o['mean_abs_error']:.6g}")
    return table


def render(report: dict[str, Any], console: Console) -> None:
    """Print the report as tables."""
    size = report.get("size") or {}
    val = report.get("validation") or {}
    lat = report.get("latency") or {}
    summary = Table(title=f"edgectl {report.get('kind', 'convert')}: {report['source']['path']}", show_header=False)
    summary.add_column("figure", style="bold")
    summary.add_column("value")
    q = report.get("quantization") or {}
    summary.add_row("quantization", f"{q.get('mode')}" + (f" ({q['summary']})" if q.get("summary") else ""))
    if report.get("float_ops") and q.get("mode") not in ("none", "float16", "dynamic"):
        summary.add_row("float fallback", "operators left in float32: " + ", ".join(report["float_ops"]))
    pruning = report.get("pruning")
    if pruning:
        structure = f", {pruning['structure']} structure" if pruning.get("structure") else ""
        summary.add_row("pruning", f"target {fmt_pct(pruning['target'])}{structure}, reached "
                                   f"{fmt_pct(pruning['overall'])} ({pruning['method']}, {pruning['steps']} steps)")
    channels = report.get("structured_pruning")
    if channels:
        cut = [f"{c['layer']} {c['before']}->{c['after']}" for c in channels["layers"] if not c.get("skipped")]
        summary.add_row("structured pruning", f"{fmt_pct(channels['fraction'])} of filters/units removed "
                                              f"({channels['method']}, {channels['steps']} steps): " + ", ".join(cut))
    enc = report.get("encoding")
    if enc:
        summary.add_row("encoding", f"{enc['chosen']}: {enc['reason']}")
    summary.add_row("bytes on disk", fmt_bytes(size.get("bytes")))
    summary.add_row("bytes on the wire", f"{fmt_bytes(size.get('wire_bytes'))} in {size.get('chunks')} chunk(s)")
    compute = report.get("compute")
    if compute:
        summary.add_row("parameters, MACs", f"{compute['params']:,} params, {compute['macs']:,} MACs per invoke "
                                            f"(float32 original: {compute['float32_params']:,}, "
                                            f"{compute['float32_macs']:,})")
    if size.get("float32_tflite_bytes"):
        summary.add_row("float32 TFLite", fmt_bytes(size["float32_tflite_bytes"]))
        summary.add_row("ratio (float32 / wire)", f"{size.get('ratio_wire')}x  (disk: {size.get('ratio_disk')}x)")
    if val:
        if val.get("float_accuracy") is not None:
            summary.add_row("accuracy", f"{fmt_pct(val['float_accuracy'])} float -> {fmt_pct(val['accuracy'])} "
                                        f"converted (drop {val['accuracy_drop_pt']:.2f} points)")
        if val.get("accuracy_drop_interval_pt"):
            low, high = val["accuracy_drop_interval_pt"]
            summary.add_row("paired drop", f"{val['accuracy_drop_pt']:.2f} points, 95 % CI {low:.2f} to {high:.2f} "
                                           f"({val['float_only_correct']} right only in float, "
                                           f"{val['converted_only_correct']} right only converted; "
                                           f"exact McNemar p = {val['mcnemar_p']:.3g})")
        elif val.get("accuracy") is not None:
            summary.add_row("accuracy", fmt_pct(val["accuracy"]))
        if val.get("top1_agreement") is not None:
            summary.add_row("top-1 agreement", fmt_pct(val["top1_agreement"]))
        if val.get("max_abs_error") is not None:
            summary.add_row("max abs error", f"{val['max_abs_error']:.6g}")
        summary.add_row("validation samples", str(val.get("samples")))
    else:
        summary.add_row("validation", "[yellow]not validated: no data[/yellow]")
    if lat:
        summary.add_row("host latency", f"p50 {lat['p50_ms']:.4f} ms, p95 {lat['p95_ms']:.4f} ms "
                                        f"({lat['backend']}, xnnpack={'on' if lat['xnnpack'] else 'off'}, "
                                        f"{lat['runs']} runs after {lat['warmup']} warm-up)")
    if report.get("conversion_s") is not None:
        summary.add_row("conversion time", f"{report['conversion_s']:.1f} s")
    evaluation = report.get("evaluation")
    if evaluation and evaluation.get("source"):
        seen = ("held out" if evaluation.get("held_out") else
                "[yellow]not held out: the model may have seen these samples[/yellow]")
        summary.add_row("evaluation data", f"{evaluation['source']}, {evaluation['samples']} samples, {seen}")
    gate = report.get("gate")
    if gate:
        summary.add_row("accuracy gate", gate_line(gate))
    console.print(summary)
    outputs = val.get("outputs") or []
    if outputs:
        console.print(agreement_table(outputs))
    if pruning:
        layers = Table(title="Sparsity per layer")
        for col in ("layer", "weight", "shape", "target", "reached"):
            layers.add_column(col)
        for layer in pruning["layers"]:
            reached = f"skipped: {layer['skipped']}" if layer.get("skipped") else fmt_pct(layer["reached"])
            layers.add_row(layer["layer"], layer["weight"], str(layer["shape"]), fmt_pct(layer["target"]), reached)
        console.print(layers)
    console.print(operator_table(report.get("operators") or []))
    console.print(signature_table(report))


def print_written(out: Path, name: str, version: int, deployment: Deployment, report: dict[str, Any],
                  as_json: bool) -> None:
    """What `convert` and `package` print once the bundle is written: the report and a line, or JSON."""
    if as_json:
        print_json({"written": True, "bundle": str(out), "name": name, "version": version,
                    "deployment_id": deployment.deployment_id, "signed_by": deployment.key_id, "report": report})
        return
    console = stdout_console()
    render(report, console)
    signed = f"signed by key {deployment.key_id}" if deployment.key_id else "[yellow]unsigned[/yellow]"
    console.print(f"wrote [bold]{out}[/bold]: {name} v{version}, {signed}")
