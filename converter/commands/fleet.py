"""`edgectl fleet status` (retained status and state), `fleet watch` (the live table) and `fleet collect`
(telemetry and event collectors)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from typing import Any, BinaryIO

from rich.console import Group
from rich.live import Live
from rich.text import Text

from edgefleet.converter.fleet.collect import LEAVES, Collector, CollectStats, subscriptions
from edgefleet.converter.fleet.connect import add_broker_args, broker_urls, connect, topics_from_args
from edgefleet.converter.fleet.inventory import (
    InventoryCache,
    InventoryTracker,
    add_trust_args,
    keyring_from_args,
)
from edgefleet.converter.fleet.observer import FleetObserver
from edgefleet.converter.fleet.status import status_json, status_summary, status_table, with_inventory
from edgefleet.converter.fleet.watch import (
    SORT_KEYS,
    plain_table,
    rich_table,
    rows,
    summary_line,
    wait_for_telemetry,
)
from edgefleet.converter.output import (
    add_json,
    command_group,
    name_type,
    number_type,
    positive_int,
    print_json,
    stderr_console,
    stdout_console,
    stop_on_signals,
)
from edgefleet.errors import ExitCode, UsageError

WATCH_EPILOG = """\
Columns: online (retained status), each model's version and phase (retained state), p50/p95 latency
of each model, the agent's CPU (% of one core) and resident memory, the board's temperature (blank
when it has no sensor), the last event (seen while watching; before that, the last outcome from the
state) and how long ago the device last sent telemetry.

Telemetry is not retained: a device appears with figures once it has published again (every
telemetry.interval_s, 10 s by default). --once waits for that, at most --telemetry-wait seconds.
On a terminal the table refreshes in place; otherwise a plain-text table is printed every interval.

examples:
  edgectl fleet watch --group lab --sort cpu
  edgectl fleet watch --once --sort p95 | head -20
"""

COLLECT_EPILOG = """\
Each record is one JSON line: {"doc": <the document as the device sent it>, "kind": "telemetry" or
"events", "received": <unix time>, "topic": ...}. Documents that are not JSON objects of the device
their topic names are counted as bad and not written.

--share NAME subscribes with MQTT 5 shared subscriptions ($share/NAME/<prefix>/devices/+/telemetry
and .../events): every collector started with the same NAME receives a part of the stream and
together they receive all of it, so a large fleet's telemetry spreads over several processes or
hosts. Collectors with different names (or none) each receive everything.

Stops after --duration or --count, or on Ctrl-C / SIGTERM, and prints a rate summary (to stderr
when the records go to stdout).

examples:
  edgectl fleet collect --share telemetry --out /var/lib/edgefleet/telemetry-$(hostname).jsonl
  edgectl fleet collect --duration 60 --json
"""


_seconds = number_type(float, lambda v: v >= 0, "expected seconds, got {text!r}", "expected seconds >= 0, got {text!r}")


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def add_parser(subparsers: Any) -> None:
    """Register `fleet` with its commands: status, watch, collect."""
    fleet_commands = command_group(subparsers, "fleet", title="fleet commands",
                                   help="see the fleet (status, watch, collect)", description="Look at the fleet.")
    s = fleet_commands.add_parser("status", help="one line per device from the retained status and state",
                                  description="Print every device's presence, groups and models.")
    s.add_argument("--group", type=name_type("group"), help="only the devices of this group")
    add_trust_args(s)
    s.add_argument("--telemetry-wait", type=float, default=0.0, metavar="S",
                   help="also wait up to S s for telemetry from every online device (telemetry is not "
                        "retained; the agent sends it every telemetry.interval_s, 10 s by default); "
                        "--json then carries the figures")
    add_json(s)
    add_broker_args(s)
    s.set_defaults(func=run_fleet_status)

    w = fleet_commands.add_parser("watch", help="live table of devices, models, latency, CPU, memory, events",
                                  description="Watch the fleet: one row per device, refreshed live.",
                                  epilog=WATCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("--group", type=name_type("group"), help="only the devices of this group")
    w.add_argument("--sort", choices=SORT_KEYS, default="device",
                   help="row order: device id, or largest first for cpu, rss, p95, or the latest event first")
    w.add_argument("--interval", type=_positive_seconds, default=2.0, metavar="S", help="refresh every S s (2)")
    w.add_argument("--once", action="store_true", help="print one snapshot and exit")
    w.add_argument("--telemetry-wait", type=_seconds, default=11.0, metavar="S",
                   help="with --once: wait up to S s for telemetry from every online device (11)")
    add_json(w)
    add_broker_args(w)
    w.set_defaults(func=run_fleet_watch)

    c = fleet_commands.add_parser("collect", help="write the fleet's telemetry and events as JSON Lines",
                                  description="Collect telemetry and events, alone or sharing the stream "
                                              "with other collectors.",
                                  epilog=COLLECT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--share", type=name_type("share name"), metavar="NAME",
                   help="join the shared subscription NAME (MQTT 5 $share): collectors split the stream")
    c.add_argument("--out", metavar="FILE.jsonl|-", help="append records to this file ('-': stdout); "
                                                          "without it only the figures are kept")
    c.add_argument("--only", choices=LEAVES, help="collect only telemetry or only events")
    c.add_argument("--duration", type=_positive_seconds, metavar="S", help="stop after S s")
    c.add_argument("--count", type=positive_int, metavar="N", help="stop after N messages")
    c.add_argument("--report-every", type=_positive_seconds, default=10.0, metavar="S",
                   help="print the running rate on stderr every S s (10)")
    add_json(c)
    add_broker_args(c)
    c.set_defaults(func=run_fleet_collect)


# ---------------------------------------------------------------------- status


def run_fleet_status(args: argparse.Namespace) -> int:
    """edgectl fleet status."""
    topics = topics_from_args(args)
    keyring = keyring_from_args(args)
    tracker = InventoryTracker(topics, keyring, InventoryCache.for_broker(broker_urls(args)[0], topics.prefix)) \
        if keyring else None
    observer = FleetObserver(topics, leaves=("status", "state", "telemetry"), inventory=tracker)
    transport = connect(args, "edgectl-fleet", on_message=observer.handle)
    try:
        observer.attach(transport, timeout=args.connect_timeout)
        if args.telemetry_wait > 0:
            wait_for_telemetry(observer, args.telemetry_wait, args.group)
    finally:
        transport.stop()
    inventory = tracker.current() if tracker is not None else None
    views = with_inventory(observer.devices(), inventory, args.group)
    if args.json:
        print_json(status_json(views, inventory))
        return ExitCode.OK
    out = stdout_console()
    if not views:
        out.print("no devices" + (f" in group {args.group}" if args.group else ""))
        return ExitCode.OK
    out.print(status_table(views, inventory))
    out.print(status_summary(views, inventory))
    return ExitCode.OK


# ---------------------------------------------------------------------- watch


def run_fleet_watch(args: argparse.Namespace) -> int:
    """edgectl fleet watch."""
    if args.json and not args.once:
        raise UsageError("--json needs --once (a live table is for people; scripts take one snapshot)")
    topics = topics_from_args(args)
    observer = FleetObserver(topics)
    transport = connect(args, "edgectl-watch", on_message=observer.handle)
    console = stdout_console()
    try:
        observer.attach(transport, timeout=args.connect_timeout)
        if args.once:
            wait_for_telemetry(observer, args.telemetry_wait, args.group)
            _print_once(args, observer, console)
            return ExitCode.OK
        return _live(args, observer, console)
    finally:
        transport.stop()


def _print_once(args: argparse.Namespace, observer: FleetObserver, console: Any) -> None:
    views = observer.devices()
    table_rows = rows(views.values(), group=args.group, sort=args.sort)
    if args.json:
        print_json({"devices": [views[r.device_id].to_dict() for r in table_rows]})
    elif console.is_terminal:
        console.print(rich_table(table_rows))
        console.print(summary_line(table_rows, args.group, args.sort))
    else:
        sys.stdout.write(plain_table(table_rows) + "\n" + summary_line(table_rows, args.group, args.sort) + "\n")
        sys.stdout.flush()


def _live(args: argparse.Namespace, observer: FleetObserver, console: Any) -> int:
    stop = threading.Event()

    def render() -> Group:
        table_rows = rows(observer.devices().values(), group=args.group, sort=args.sort)
        return Group(rich_table(table_rows), Text(summary_line(table_rows, args.group, args.sort), style="dim"))

    try:
        if console.is_terminal:
            with Live(render(), console=console, auto_refresh=False, screen=False) as live:
                while not stop.wait(args.interval):
                    live.update(render(), refresh=True)
        else:
            while True:
                table_rows = rows(observer.devices().values(), group=args.group, sort=args.sort)
                sys.stdout.write(plain_table(table_rows) + "\n" + summary_line(table_rows, args.group, args.sort)
                                 + "\n\n")
                sys.stdout.flush()
                if stop.wait(args.interval):
                    break
    except KeyboardInterrupt:
        pass
    return ExitCode.OK


# ---------------------------------------------------------------------- collect


def _summary_text(stats: CollectStats, dropped: int) -> str:
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(stats.by_kind.items())) or "nothing"
    d = stats.to_dict()
    return (f"collected {stats.messages} message(s) ({kinds}) from {len(stats.devices)} device(s) in "
            f"{d['elapsed_s']:.1f} s: {stats.rate():.0f} msg/s while receiving; {stats.bad} bad"
            + (f", {dropped} dropped (queue full)" if dropped else ""))


def _open_out(path: str | None, stack: contextlib.ExitStack) -> BinaryIO | None:
    if path is None:
        return None
    if path == "-":
        return sys.stdout.buffer
    try:
        return stack.enter_context(open(path, "ab"))
    except OSError as err:
        raise UsageError(f"--out {path}: {err.strerror}") from err


def run_fleet_collect(args: argparse.Namespace) -> int:
    """edgectl fleet collect."""
    topics = topics_from_args(args)
    leaves = (args.only,) if args.only else LEAVES
    subs = subscriptions(topics, args.share, leaves)
    err = stderr_console()
    with contextlib.ExitStack() as stack:
        collector = Collector(topics, _open_out(args.out, stack))
        stack.callback(stop_on_signals(collector.stop))
        transport = connect(args, "edgectl-collect", on_message=collector.handle)
        stack.callback(transport.stop)
        for topic, qos in subs:
            transport.subscribe(topic, qos=qos, wait=args.connect_timeout)
        err.print(f"collecting {', '.join(t for t, _ in subs)}"
                  + (f" (shared as {args.share!r} with the other collectors of that name)" if args.share else ""))

        def report(stats: CollectStats) -> None:
            err.print(f"{stats.messages} message(s), {stats.rate():.0f} msg/s, {len(stats.devices)} device(s)")

        stats = collector.run(duration=args.duration, count=args.count, report=report,
                              report_every=args.report_every)
    summary = {**stats.to_dict(), "share": args.share, "subscriptions": [t for t, _ in subs],
               "dropped": collector.dropped}
    if args.json and args.out != "-":
        print_json(summary)
    elif args.json:
        err.print_json(data=summary)
    elif args.out == "-":
        err.print(_summary_text(stats, collector.dropped))
    else:
        stdout_console().print(_summary_text(stats, collector.dropped))
    return ExitCode.OK
