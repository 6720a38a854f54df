"""`edgectl logs`: a device's warnings and errors, the recent ones at once, then live with --follow."""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from typing import Any

from edgefleet.converter.fleet.connect import add_broker_args, connect, topics_from_args
from edgefleet.converter.fleet.logs import LEVELS, LogLine, LogReader, level_number, parse_since, select
from edgefleet.converter.output import name_type, number_type, positive_int, stop_on_signals
from edgefleet.errors import EdgefleetError, ExitCode

EPILOG = """\
The agent publishes its records of WARNING and above (telemetry.logs_level) and keeps the newest
ones (telemetry.logs_recent, 100) in a retained document on the broker: without --follow, those are
printed and the command ends, whether or not the device is online. With --follow, records that
arrive afterwards are printed as they come, until Ctrl-C. A storm is rate-limited on the device
(telemetry.logs_per_s): what it left out shows as one "N log records not sent" record.
Everything the agent logs, at every level, stays in the board's journal: `edge-agent logs` there.

examples:
  edgectl logs --device cam-17
  edgectl logs --device cam-17 --since 10m --level ERROR
  edgectl logs --device cam-17 --follow --json | jq -r .message
"""

seconds_ago = number_type(parse_since, lambda v: v > 0,
                          "expected seconds or a number with s, m, h or d (e.g. 90, 10m, 2h), got {text!r}",
                          "expected a duration above 0, got {text!r}")


def add_parser(subparsers: Any) -> None:
    """Register logs."""
    p = subparsers.add_parser("logs", help="a device's warnings and errors (recent, or live with --follow)",
                              description="Print the log records a device published: its recent ones at once, "
                                          "and with --follow the new ones as they arrive.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", required=True, type=name_type("device"), metavar="ID", help="the device")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new records until Ctrl-C")
    p.add_argument("--since", type=seconds_ago, metavar="AGE",
                   help="only records of the last AGE: seconds, or with s, m, h or d (10m, 2h)")
    p.add_argument("--level", type=str.upper, choices=LEVELS, default="WARNING",
                   help="the least severe level shown (WARNING)")
    p.add_argument("-n", "--lines", type=positive_int, metavar="N", help="only the N newest of the recent records")
    p.add_argument("--json", action="store_true", help="one JSON object per record (JSON Lines), as the device sent it")
    add_broker_args(p)
    p.set_defaults(func=run_logs)


def _printer(as_json: bool) -> Any:
    def show(line: LogLine) -> None:
        sys.stdout.write((line.to_json() if as_json else line.text()) + "\n")
        sys.stdout.flush()  # a pipe (`| grep`) sees each record as it comes
    return show


def run_logs(args: argparse.Namespace) -> int:
    """edgectl logs."""
    topics = topics_from_args(args)
    reader = LogReader(topics, args.device)
    since = time.time() - args.since if args.since is not None else None
    level = level_number(args.level)
    show = _printer(args.json)
    transport = connect(args, "edgectl-logs", on_message=reader.handle)
    try:
        reader.attach(transport, timeout=args.connect_timeout)
        if reader.recent is None and reader.status is None and not args.follow:
            raise EdgefleetError(f"device {args.device} is not known to the broker (no status, no log records)")
        for line in select(reader.recent or [], since=since, level=level, last=args.lines):
            show(line)
        if reader.recent is None:
            print(f"edgectl: device {args.device} has published no recent log records (an agent with "
                  "telemetry.logs = false, or one older than this feature, publishes none)", file=sys.stderr)
        elif reader.status == "offline":
            print(f"edgectl: device {args.device} is offline: these are the records it published before",
                  file=sys.stderr)
        if not args.follow:
            return ExitCode.OK
        if reader.status is None:
            print(f"edgectl: device {args.device} is not known to the broker yet; waiting for its records",
                  file=sys.stderr)
        stop = threading.Event()
        restore = stop_on_signals(stop.set)
        try:
            while not stop.is_set():
                try:
                    line = reader.live.get(timeout=0.2)
                except queue.Empty:
                    continue
                if reader.fresh(line) and level_number(line.level) >= level:
                    show(line)
        finally:
            restore()
        return ExitCode.OK
    finally:
        transport.stop()
