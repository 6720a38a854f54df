"""`edgectl diff BUNDLE_A BUNDLE_B`: what an update changes, before it is pushed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgefleet.converter.output import add_json, print_json, stdout_console
from edgefleet.errors import UsageError

EPILOG = """\
Compares sizes, the chunks B shares with A (what a device that holds A still has to download),
accuracy, host latency, quantization, sparsity, operators and their versions, the input/output
signature and the pre- and post-processing. Changed rows are marked; a changed signature means
clients of the model must change too.

example:
  edgectl diff bundles/digits-v2 bundles/digits-v3
"""


def add_parser(subparsers: Any) -> None:
    """Register `diff`."""
    p = subparsers.add_parser(
        "diff", help="compare two bundles side by side",
        description="Show two bundles (or .tflite files) side by side so an operator sees what an update changes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("a", metavar="BUNDLE_A", help="the current bundle (or .tflite)")
    p.add_argument("b", metavar="BUNDLE_B", help="the new bundle (or .tflite)")
    p.add_argument("--latency-runs", metavar="N", type=int, default=50,
                   help="time N bare invokes of each model with LiteRT on this host (default 50; 0 skips)")
    add_json(p)
    p.set_defaults(func=run)


def _load(path: str) -> dict[str, Any]:
    from edgefleet.converter.bundle.describe import describe_bundle, describe_tflite

    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such file or directory")
    return describe_bundle(p) if p.is_dir() else describe_tflite(p)


def _show(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)) and len(v) > 6:
        return f"{len(v)} items: " + ", ".join(map(str, v[:4])) + ", ..."
    return str(v)


def render(result: dict[str, Any]) -> None:
    """Print a diff as tables, changed rows highlighted."""
    from rich.table import Table

    console = stdout_console()
    for title, key, first in (("Bundles", "rows", "field"), ("Operators", "operators", "name"),
                              ("Signature", "signature", "tensor")):
        table = Table(title=title if key != "rows" else f"A = {result['a']}\nB = {result['b']}")
        for col in (first, "A", "B", ""):
            table.add_column(col)
        for r in result[key]:
            mark = "[yellow]changed[/yellow]" if r["changed"] else ""
            table.add_row(str(r[first]), _show(r["a"]), _show(r["b"]), mark)
        console.print(table)
    if result["signature_changed"]:
        console.print("[red]the input/output signature changes: clients must change with it[/red]")
    up = result.get("update")
    if up:
        console.print(f"update A -> B: {up['new_chunks']} of {up['chunks']} model chunks are new, "
                      f"{up['new_wire_bytes']} of {up['wire_bytes']} bytes on the wire")


def run(args: argparse.Namespace) -> int:
    """Compare two bundles."""
    if args.latency_runs < 0:
        raise UsageError(f"--latency-runs: must be >= 0, got {args.latency_runs}")
    a, b = _load(args.a), _load(args.b)
    if args.latency_runs:
        from edgefleet.converter.bundle.describe import model_file
        from edgefleet.converter.tflite.latency import compare_latency

        # Measured in turns on this host in this run, so the two figures compare with each other.
        lat = compare_latency({"a": model_file(a).read_bytes(), "b": model_file(b).read_bytes()},
                              runs=args.latency_runs)
        a["host_latency"], b["host_latency"] = lat["a"], lat["b"]
    from edgefleet.converter.bundle.compare import compare

    result = compare(a, b)
    if args.json:
        print_json(result)
    else:
        render(result)
    return 0
