"""`edgectl fleet status` (retained status and state), `fleet watch` (the live table) and `fleet collect`
(telemetry and event collectors)."""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import threading
import time
from typing import Any, BinaryIO

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from edgefleet.converter.fleet.collect import LEAVES, Collector, CollectStats, subscriptions
from edgefleet.converter.fleet.connect import add_broker_args, broker_urls, connect, topics_from_args
from edgefleet.converter.fleet.history import HistoryStore, display
from edgefleet.converter.fleet.history.cli import (
    add_db_arg,
    add_history_parser,
    add_retention_args,
    db_target,
    retention_from_args,
)
from edgefleet.converter.fleet.history.ingest import HistoryWriter
from edgefleet.converter.fleet.inventory import (
    InventoryCache,
    InventoryTracker,
    add_trust_args,
    keyring_from_args,
)
from edgefleet.converter.fleet.observer import FleetObserver
from edgefleet.converter.fleet.status import status_json, status_summary, status_table, with_inventory
from edgefleet.converter.fleet.watch import (
    PIPE_WIDTH,
    SORT_KEYS,
    WatchState,
    cbreak,
    decode_keys,
    fit,
    header_line,
    plain_text,
    rows,
    styled,
    table_lines,
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
The header names the broker, the group and filter shown, the device and online counts, the phases
of the models shown, the sort key and the time. Columns: device, model, version (ver) and phase
always; then, as the width allows, by priority: online, p95 latency (ms), CPU (% of one core), the
last event (seen while watching; before that, the last outcome from the state), resident memory
(MB), how long ago the device last sent telemetry (seen), p50 latency, the board's temperature (°C,
blank without a sensor) and the groups it claims. A column is abbreviated before it is dropped; a
number is never cut. A device with several models takes a line per model.

On a terminal the table fills the screen and follows its size. Keys: q quit, / filter by device id
or model name (Enter applies, Esc cancels), Esc clear the filter, s next sort key, g next group
(then all groups again). Ctrl-C also quits.

Piped, or with --once, plain lines fit $COLUMNS (80 when unset; --wide: every column); a device's
id starts each of its lines. Without --once a snapshot is printed every interval.

Telemetry is not retained: a device appears with figures once it has published again (every
telemetry.interval_s, 10 s by default). --once waits for that, at most --telemetry-wait seconds.

examples:
  edgectl fleet watch --group lab --sort cpu
  edgectl fleet watch --once --sort p95 | head -20
  edgectl fleet watch --once --wide --filter det > fleet.txt
"""

COLLECT_EPILOG = """\
Each record is one JSON line: {"doc": <the document as the device sent it>, "kind": "telemetry" or
"events", "received": <unix time>, "topic": ...}. Documents that are not JSON objects of the device
their topic names are counted as bad and not written.

--share NAME subscribes with MQTT 5 shared subscriptions ($share/NAME/<prefix>/devices/+/telemetry
and .../events): every collector started with the same NAME receives a part of the stream and
together they receive all of it, so a large fleet's telemetry spreads over several processes or
hosts. Collectors with different names (or none) each receive everything.

With --db (and without --out), the records go to the fleet history database instead or as well:
telemetry, events, deployment outcomes and each device's groups (from its retained status), written
in batches to a SQLite file (the default: $XDG_DATA_HOME/edgefleet/history.sqlite) or PostgreSQL
(postgresql://...: one table per kind, partitioned by day). Every hour the collector applies the
retention settings (--keep-days, --keep-events-days, --downsample-after). `edgectl fleet history` reads it.

Stops after --duration or --count, or on Ctrl-C / SIGTERM, and prints a rate summary (to stderr
when the records go to stdout).

examples:
  edgectl fleet collect --share telemetry --out /var/lib/edgefleet/telemetry-$(hostname).jsonl
  edgectl fleet collect --db postgresql://edgefleet@db.lan/fleet --share history
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
                                   help="see the fleet (status, watch, collect, history)",
                                   description="Look at the fleet.")
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
    w.add_argument("--filter", metavar="TEXT", help="only the devices whose id or a model name contains TEXT "
                                                    "(any case); on a terminal, / changes it")
    w.add_argument("--wide", action="store_true",
                   help="every column at full width, however wide the lines get (default: fit the terminal, "
                        "or $COLUMNS or 80 columns when piped)")
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
                                                          "without it (or --db) they go to the history database")
    add_db_arg(c, collect=True)
    add_retention_args(c)
    c.add_argument("--only", choices=LEAVES, help="collect only telemetry or only events")
    c.add_argument("--duration", type=_positive_seconds, metavar="S", help="stop after S s")
    c.add_argument("--count", type=positive_int, metavar="N", help="stop after N messages")
    c.add_argument("--report-every", type=_positive_seconds, default=10.0, metavar="S",
                   help="print the running rate on stderr every S s (10)")
    add_json(c)
    add_broker_args(c)
    c.set_defaults(func=run_fleet_collect)

    add_history_parser(fleet_commands)


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
        broker = transport.url
        if args.once:
            wait_for_telemetry(observer, args.telemetry_wait, args.group)
            _print_once(args, observer, console, broker)
            return ExitCode.OK
        stop = threading.Event()
        restore = stop_on_signals(stop.set)
        try:
            if console.is_terminal:
                _live_terminal(args, observer, console, broker, stop)
            else:
                _live_plain(args, observer, broker, stop)
        finally:
            restore()
        return ExitCode.OK
    finally:
        transport.stop()


def _pipe_width(args: argparse.Namespace) -> int | None:
    """None (every column) with --wide, else $COLUMNS, else 80: a pipe has no width of its own."""
    if args.wide:
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else PIPE_WIDTH


def _terminal_size(console: Console, fd: int) -> tuple[int, int]:
    """The size of the terminal on `fd` now (it may have been resized), whatever $COLUMNS said at start."""
    try:
        size = os.get_terminal_size(fd)
        return size.columns, size.lines
    except OSError:
        return console.width, console.height


def _print_once(args: argparse.Namespace, observer: FleetObserver, console: Console, broker: str) -> None:
    views = observer.devices()
    table_rows = rows(views.values(), group=args.group, sort=args.sort, text=args.filter)
    if args.json:
        print_json({"devices": [views[r.device_id].to_dict() for r in table_rows]})
    elif console.is_terminal:
        width = None if args.wide else _terminal_size(console, sys.stdout.fileno())[0]
        console.print(Text(header_line(table_rows, broker=broker, group=args.group, text=args.filter,
                                       sort=args.sort, width=width), style="bold", no_wrap=True, overflow="crop"))
        for line in table_lines(table_rows, width):
            console.print(styled(line))
    else:
        sys.stdout.write(plain_text(table_rows, _pipe_width(args), broker=broker, group=args.group, text=args.filter,
                                    sort=args.sort) + "\n")
        sys.stdout.flush()


def _live_plain(args: argparse.Namespace, observer: FleetObserver, broker: str, stop: threading.Event) -> None:
    """Not a terminal: a snapshot every interval, a blank line between them, until stopped."""
    while True:
        table_rows = rows(observer.devices().values(), group=args.group, sort=args.sort, text=args.filter)
        sys.stdout.write(plain_text(table_rows, _pipe_width(args), broker=broker, group=args.group, text=args.filter,
                                    sort=args.sort) + "\n\n")
        sys.stdout.flush()
        if stop.wait(args.interval):
            return


def _keys_fd() -> int | None:
    """stdin's descriptor when keys can be read from it (a terminal), else None."""
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return fd if os.isatty(fd) else None


def _frame(state: WatchState, observer: FleetObserver, broker: str, size: tuple[int, int], wide: bool) -> Group:
    """One screen: header, column headers, as many device lines as fit, and on the last line the keys (or
    the filter being typed)."""
    width, height = size
    table_rows = rows(observer.devices().values(), group=state.group, sort=state.sort, text=state.text)
    lines = table_lines(table_rows, None if wide else width)
    room = max(1, height - 3)  # header line, column headers, footer
    body = lines[1:]
    more = 0
    if len(body) > room:
        more = len(body) - room
        body = body[:room]
    header = header_line(table_rows, broker=broker, group=state.group, text=state.text, sort=state.sort,
                         width=width)
    footer = Text(fit(state.footer(more), width).rstrip(), style="dim" if state.editing is None else "bold",
                  no_wrap=True, overflow="crop")
    blank = [Text("") for _ in range(room - len(body))]  # the keys' line stays at the bottom of the screen
    return Group(Text(header, style="bold", no_wrap=True, overflow="crop"),
                 *(styled(line) for line in [lines[0], *body]), *blank, footer)


def _live_terminal(args: argparse.Namespace, observer: FleetObserver, console: Console, broker: str,
                   stop: threading.Event) -> None:
    """The full-screen live table: redrawn every interval, at once after a key or a resize; keys when stdin
    is a terminal too. The screen and the terminal mode are restored however it ends."""
    state = WatchState(sort=args.sort, group=args.group, text=args.filter)
    fd = _keys_fd()
    out_fd = sys.stdout.fileno()  # before Live stands in for sys.stdout
    with contextlib.ExitStack() as stack:
        if fd is not None:
            stack.enter_context(cbreak(fd))
        live = stack.enter_context(Live(console=console, screen=True, auto_refresh=False, transient=True))
        next_at = 0.0
        shown: tuple[int, int] | None = None
        redraw = True
        while not stop.is_set() and not state.quit:
            size = _terminal_size(console, out_fd)
            now = time.monotonic()
            if redraw or now >= next_at or size != shown:
                console.size = size
                live.update(_frame(state, observer, broker, size, args.wide), refresh=True)
                shown, redraw = size, False
                if now >= next_at:
                    next_at = now + args.interval
            timeout = max(0.0, min(next_at - time.monotonic(), 0.25))
            if fd is None:
                stop.wait(timeout)
                continue
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                continue
            data = os.read(fd, 1024)
            if not data:  # stdin closed: no more keys, keep refreshing
                fd = None
                continue
            groups = sorted({g for v in observer.devices().values() for g in v.groups})
            for key in decode_keys(data):
                state.key(key, groups)
            redraw = True


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


def _open_history(db: str, args: argparse.Namespace, stack: contextlib.ExitStack) -> HistoryWriter:
    store = stack.enter_context(HistoryStore.open(db))
    return HistoryWriter(store, retention=retention_from_args(args))


def run_fleet_collect(args: argparse.Namespace) -> int:
    """edgectl fleet collect."""
    topics = topics_from_args(args)
    leaves = (args.only,) if args.only else LEAVES
    db = db_target(args.db) if args.db is not None or args.out is None else None
    if db is not None:
        leaves = (*leaves, "status")  # each device's groups, for `fleet history --group`
    subs = subscriptions(topics, args.share, leaves)
    err = stderr_console()
    with contextlib.ExitStack() as stack:
        history = _open_history(db, args, stack) if db is not None else None
        collector = Collector(topics, _open_out(args.out, stack), history=history)
        stack.callback(stop_on_signals(collector.stop))
        transport = connect(args, "edgectl-collect", on_message=collector.handle)
        stack.callback(transport.stop)
        for topic, qos in subs:
            transport.subscribe(topic, qos=qos, wait=args.connect_timeout)
        err.print(f"collecting {', '.join(t for t, _ in subs)}"
                  + (f" (shared as {args.share!r} with the other collectors of that name)" if args.share else "")
                  + (f" into {display(history.store.target)}" if history is not None else ""))

        def report(stats: CollectStats) -> None:
            err.print(f"{stats.messages} message(s), {stats.rate():.0f} msg/s, {len(stats.devices)} device(s)")

        stats = collector.run(duration=args.duration, count=args.count, report=report,
                              report_every=args.report_every)
    summary = {**stats.to_dict(), "share": args.share, "subscriptions": [t for t, _ in subs],
               "dropped": collector.dropped}
    if history is not None:
        summary["history"] = {"db": display(history.target), "rows": history.written,
                              "failed_rows": history.failed, "schema_version": history.schema_version,
                              "written_at": history.flushed_at}
    if args.json and args.out != "-":
        print_json(summary)
    elif args.json:
        err.print_json(data=summary)
    elif args.out == "-":
        err.print(_summary_text(stats, collector.dropped))
    else:
        stdout_console().print(_summary_text(stats, collector.dropped))
    return ExitCode.OK
