"""The command-line side of the fleet history: `fleet collect --db`, `fleet history` and `fleet history prune`
(registered by converter/commands/fleet.py)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from edgefleet.converter.fleet.history.store import HistoryStore, Retention, default_path, display
from edgefleet.converter.output import add_json, name_type, number_type, print_json, stdout_console
from edgefleet.errors import ExitCode, UsageError

DB_HELP = ("history database: a SQLite file or postgresql://USER@HOST/DB[?schema=NAME] "
           "(default: $XDG_DATA_HOME/edgefleet/history.sqlite)")

HISTORY_EPILOG = """\
One line per device, model and version served in the time range: from and to (to is "now" while it still
serves), the outcome recorded for that version on that device (committed, rejected, rolled_back, or
restored when a rollback brought it back), the median p50 and p95 latency of its telemetry samples,
its error rate (errors / requests from the agent's counters), the agent's mean CPU (% of one core)
and resident memory (MB), and its drift score when the agent reports one. Times are local.

--json prints the same with every outcome and its figures; --plot FILE.png draws latency, error rate,
CPU, memory (and drift) per version over time, with a vertical line at each outcome (needs matplotlib).

`edgectl fleet history prune` applies the retention and down-sampling settings at once (the collector
does it every hour).

examples:
  edgectl fleet history --device cam-7 --since 2h
  edgectl fleet history --group lab --model det --since 2025-06-01T08:00 --until 2025-06-01T12:00 --json
  edgectl fleet history --model det --since 1d --plot det.png --db postgresql://edgefleet@db.lan/fleet
"""

_days = number_type(float, lambda v: v >= 0, "expected days, got {text!r}", "expected days >= 0, got {text!r}")
_bucket = number_type(int, lambda v: v > 0, "expected seconds, got {text!r}", "expected seconds > 0, got {text!r}")


def add_db_arg(parser: argparse.ArgumentParser, *, collect: bool) -> None:
    if collect:
        parser.add_argument("--db", nargs="?", const="", metavar="PATH|URL",
                            help=DB_HELP + "; --db alone: the default file. Without --out, records go there anyway")
    else:
        parser.add_argument("--db", metavar="PATH|URL", default="", help=DB_HELP)


def add_retention_args(parser: argparse.ArgumentParser) -> None:
    r = Retention()
    parser.add_argument("--keep-days", type=_days, default=r.telemetry_days, metavar="N",
                        help=f"delete telemetry older than N days (0: keep it all; {r.telemetry_days:g})")
    parser.add_argument("--keep-events-days", type=_days, default=r.events_days, metavar="N",
                        help=f"delete events and outcomes older than N days (0: keep them all; {r.events_days:g})")
    parser.add_argument("--downsample-after", type=_days, default=r.downsample_after_days, metavar="N",
                        help="keep telemetry older than N days as one mean per device, model, version and "
                             f"--downsample-s (0: never; {r.downsample_after_days:g})")
    parser.add_argument("--downsample-s", type=_bucket, default=r.bucket_s, metavar="S",
                        help=f"the down-sampling interval in seconds ({r.bucket_s})")


def retention_from_args(args: argparse.Namespace) -> Retention:
    return Retention(telemetry_days=args.keep_days, events_days=args.keep_events_days,
                     downsample_after_days=args.downsample_after, bucket_s=args.downsample_s)


def db_target(value: str | None) -> str:
    """The database a --db value names ('' or None: the default SQLite file)."""
    return value or str(default_path())


def add_history_parser(fleet_commands: Any) -> None:
    """Register `fleet history` and `fleet history prune`."""
    h = fleet_commands.add_parser("history", help="what ran where and when, and how it behaved (from the history "
                                                  "database)",
                                  description="Versions, outcomes and figures per device from the fleet history "
                                              "that `fleet collect` writes.",
                                  epilog=HISTORY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    h.add_argument("--device", type=name_type("device"), action="append", metavar="ID",
                   help="only this device (repeatable)")
    h.add_argument("--group", type=name_type("group"), help="only the devices of this group (from their status)")
    h.add_argument("--model", type=name_type("model"), help="only this model")
    h.add_argument("--since", default="24h", metavar="TIME",
                   help="from TIME: 2h, 30m, 7d ago, an ISO time (2025-06-01T08:00, local unless it names a zone) "
                        "or a Unix time (24h)")
    h.add_argument("--until", default="now", metavar="TIME", help="up to TIME (now)")
    h.add_argument("--plot", metavar="FILE.png", help="also draw the figures over time into this PNG")
    add_db_arg(h, collect=False)
    add_json(h)
    h.set_defaults(func=run_fleet_history)
    sub = h.add_subparsers(title="history commands", metavar="COMMAND")
    p = sub.add_parser("prune", help="apply retention and down-sampling now",
                       description="Delete history older than the retention settings and down-sample old "
                                   "telemetry, as the collector does every hour.")
    add_retention_args(p)
    add_db_arg(p, collect=False)
    add_json(p)
    p.set_defaults(func=run_history_prune)


def run_fleet_history(args: argparse.Namespace) -> int:
    """edgectl fleet history."""
    from edgefleet.converter.fleet.history.query import load, parse_time

    now = time.time()
    since, until = parse_time(args.since, now), parse_time(args.until, now)
    if since >= until:
        raise UsageError(f"--since {args.since} is not before --until {args.until}")
    plot_to = Path(args.plot) if args.plot else None
    if plot_to is not None and plot_to.suffix.lower() != ".png":
        raise UsageError(f"--plot {args.plot}: expected a .png file name")
    with HistoryStore.open(db_target(args.db), create=False) as store:
        history = load(store, since=since, until=until, devices=args.device, group=args.group, model=args.model)
    if plot_to is not None:
        from edgefleet.converter.fleet.history.plot import plot

        what = ", ".join(filter(None, [
            f"device {', '.join(args.device)}" if args.device else None,
            f"group {args.group}" if args.group else None, f"model {args.model}" if args.model else None])) or "fleet"
        plot(history, plot_to, f"{what}: {len(history.segments)} version segment(s)")
    if args.json:
        print_json({**history.to_dict(), "plot": str(plot_to) if plot_to else None})
        return ExitCode.OK
    out = stdout_console()
    if not history.segments:
        out.print(f"no history in {display(history.store)} for that selection between {_when(since)} and {_when(until)}")
        return ExitCode.OK
    table = Table(box=None, header_style="bold", pad_edge=False)
    for name, right in (("device", False), ("model", False), ("ver", True), ("from", False), ("to", False),
                        ("outcome", False), ("p50 ms", True), ("p95 ms", True), ("err %", True), ("req", True),
                        ("cpu %", True), ("rss MB", True), ("drift", True)):
        table.add_column(name, justify="right" if right else "left", no_wrap=True)
    for s in history.segments:
        outcome = s.outcome or ""
        reason = next((o["reason"] for o in reversed(s.outcomes) if o["reason"]), None)
        if reason and outcome in ("rejected", "rolled_back"):
            outcome += f": {reason[:60]}{'…' if len(reason) > 60 else ''}"
        table.add_row(s.device_id, s.model, "-" if s.version is None else str(s.version), _when(s.start),
                      "now" if s.ongoing and until >= now - 60 else _when(s.end), outcome, _num(s.p50_ms),
                      _num(s.p95_ms), _num(None if s.error_rate is None else 100 * s.error_rate, 1), str(s.requests),
                      _num(s.cpu_percent, 1), _num(s.rss_mb, 1), _num(s.drift, 3))
    out.print(table)
    out.print(f"{len(history.segments)} segment(s), {len(history.deployments)} outcome(s), "
              f"{_when(since)} to {_when(until)}" + (f"; plot written to {plot_to}" if plot_to else ""))
    return ExitCode.OK


def run_history_prune(args: argparse.Namespace) -> int:
    """edgectl fleet history prune."""
    retention = retention_from_args(args)
    with HistoryStore.open(db_target(args.db), create=False) as store:
        report = store.prune(retention)
        target = store.target
    if args.json:
        print_json({"store": display(target), **report})
    else:
        stdout_console().print(
            f"{display(target)}: deleted {report['telemetry_deleted']} telemetry row(s), {report['events_deleted']} "
            f"event(s), {report['deployments_deleted']} outcome(s); down-sampled {report['telemetry_downsampled']} "
            f"telemetry row(s) into {report['telemetry_means']} mean(s)")
    return ExitCode.OK


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _num(value: float | None, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"
