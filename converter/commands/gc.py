"""`edgectl gc`: clear the retained chunks that no retained deployment document names."""

from __future__ import annotations

import argparse
from typing import Any

from edgefleet.converter.fleet.connect import add_broker_args, connect, topics_from_args
from edgefleet.converter.fleet.publish import RetainedIndex, collect_garbage
from edgefleet.converter.output import add_json, print_json, size_text, stdout_console
from edgefleet.errors import ExitCode

GC_EPILOG = """\
Lists the retained deployment documents and chunks and clears (empty retained message) every chunk
that no retained document names. Run it when no push is in progress: a push publishes its chunks
before its document, and gc would clear them in between. The broker must let one client queue
every retained chunk (max_queued_messages above the chunk count; the shipped config allows 20000).
"""


def run_gc(args: argparse.Namespace) -> int:
    """edgectl gc."""
    topics = topics_from_args(args)
    index = RetainedIndex(topics)
    transport = connect(args, "edgectl-gc", on_message=index.handle)
    try:
        index.collect(transport, timeout=args.timeout)
        result = collect_garbage(transport, index, dry_run=args.dry_run, timeout=args.timeout)
    finally:
        transport.stop()
    if args.json:
        print_json({
            "documents": result.documents, "chunks": result.chunks, "chunk_bytes": result.chunk_bytes,
            "referenced": result.referenced, "cleared": len(result.cleared), "bytes_freed": result.bytes_freed,
            "cleared_chunks": sorted(result.cleared), "dry_run": args.dry_run, "warnings": list(result.warnings),
        })
        return ExitCode.OK
    out = stdout_console()
    for w in result.warnings:
        out.print(f"warning: {w}")
    verb = "would clear" if args.dry_run else "cleared"
    out.print(f"{result.documents} deployment document(s), {result.chunks} chunk(s) ({size_text(result.chunk_bytes)}) "
              f"retained; {result.referenced} in use; {verb} {len(result.cleared)} chunk(s), "
              f"{size_text(result.bytes_freed)}")
    return ExitCode.OK


def add_parser(subparsers: Any) -> None:
    """Register gc."""
    g = subparsers.add_parser("gc", help="clear retained chunks no deployment uses",
                              description="Clear retained chunks that no retained deployment document names.",
                              epilog=GC_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--dry-run", action="store_true", help="only report what would be cleared")
    g.add_argument("--timeout", type=float, default=60.0, metavar="S", help="broker time limit (60)")
    add_json(g)
    add_broker_args(g)
    g.set_defaults(func=run_gc)
