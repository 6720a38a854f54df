"""`edgectl deployments list|show|withdraw|history`: what is deployed where, taking a document back, and
what happened. The work is in converter/fleet/deployments.py."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from edgefleet.converter.fleet.connect import add_broker_args, broker_urls, connect, topics_from_args
from edgefleet.converter.fleet.deployments import (
    HistoryEntry,
    Snapshot,
    add_withdraw_args,
    fallback,
    fan_out,
    from_collector,
    from_states,
    listing,
    select,
    show,
    take_snapshot,
    withdrawable,
    withdrawal_targets,
)
from edgefleet.converter.fleet.inventory import (
    InventoryCache,
    InventoryTracker,
    add_trust_args,
    keyring_from_args,
)
from edgefleet.converter.fleet.observer import FleetObserver
from edgefleet.converter.fleet.publish import RetainedIndex, publish_withdrawals
from edgefleet.converter.output import (
    add_json,
    command_group,
    load_key,
    name_type,
    number_type,
    print_json,
    stdout_console,
)
from edgefleet.errors import ExitCode, UsageError
from edgefleet.transport import Transport

EPILOG = """\
A device follows its own document for a model when it has one, else the highest version among its
groups' documents. A device whose own document overrides its group's is PINNED: later group pushes
of that model do not reach it (a failed 'push --device' leaves it so). 'deployments withdraw
--device ID --model M --key KEY' publishes a signed withdrawal in place of its document, and the
device follows its group's document again. An empty retained payload withdraws nothing.

Groups are taken from the signed inventory when --trust (or the public half of --key) verifies one,
else from what each device's status names.

examples:
  edgectl deployments list
  edgectl deployments list --model det --json
  edgectl deployments show det                       # or a deployment id
  edgectl deployments withdraw --device cam-1 --model det --key keys
  edgectl deployments history --model det --duration 60
  edgectl deployments history --from /var/lib/edgefleet/events.jsonl --since 3600
"""

_seconds = number_type(float, lambda v: v > 0, "expected seconds, got {text!r}", "expected seconds > 0, got {text!r}")


def add_parser(subparsers: Any) -> None:
    """Register `deployments` with list, show, withdraw and history."""
    commands = command_group(subparsers, "deployments", title="deployments commands",
                             help="what is deployed where; withdraw a document; history",
                             description="List, show, withdraw and trace deployments.",
                             epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)

    def common(p: argparse.ArgumentParser) -> None:
        add_trust_args(p)
        add_json(p)
        add_broker_args(p)

    ls = commands.add_parser("list", help="per model: group and device documents, who runs what, pinned devices",
                             description="Per model, what each retained group and device document says and what "
                                         "each device runs; pinned devices are marked.")
    ls.add_argument("--model", type=name_type("model"), help="only this model")
    common(ls)
    ls.set_defaults(func=run_list)

    sh = commands.add_parser("show", help="one deployment (or a model's) in full, with each device's phase",
                             description="Show a deployment's documents (policy, target, chunks, bytes) and the "
                                         "phase of every device it concerns.")
    sh.add_argument("what", metavar="DEPLOYMENT_ID|MODEL")
    common(sh)
    sh.set_defaults(func=run_show)

    w = commands.add_parser("withdraw", help="withdraw a device's or group's document, signed",
                            description="Publish a signed withdrawal in place of a device's (or group's) document "
                                        "for one model; a device then follows its group's document.")
    add_withdraw_args(w)
    common(w)
    w.set_defaults(func=run_withdraw)

    h = commands.add_parser("history", help="deployment steps from the devices' states, live events or a collector file",
                            description="Each device's last outcome per model (retained state), the events that "
                                        "arrive within --duration, and the events of a 'fleet collect --out' file.")
    h.add_argument("--model", type=name_type("model"), help="only this model")
    h.add_argument("--device", type=name_type("device"), metavar="ID", help="only this device")
    h.add_argument("--deployment", metavar="ID", help="only this deployment id")
    h.add_argument("--duration", type=_seconds, metavar="S", help="also listen to live events for S s")
    h.add_argument("--from", dest="source", metavar="FILE.jsonl",
                   help="read events from a 'fleet collect --out' file (without --duration, the broker is not asked)")
    h.add_argument("--since", type=_seconds, metavar="S", help="only entries of the last S s")
    common(h)
    h.set_defaults(func=run_history)


# ---------------------------------------------------------------------- reading


def _read(args: argparse.Namespace, *, events_for: float = 0.0,
          then: Callable[[Transport, Snapshot], None] | None = None,
          ) -> tuple[Snapshot, dict[str, tuple[str, ...]] | None, FleetObserver]:
    """One snapshot of the documents and the devices (and, with `events_for`, the events of that window);
    `then` acts on it over the same connection."""
    topics = topics_from_args(args)
    key = load_key(getattr(args, "key", None))
    keyring = keyring_from_args(args, key)
    tracker = InventoryTracker(topics, keyring, InventoryCache.for_broker(broker_urls(args)[0], topics.prefix)) \
        if keyring else None
    index = RetainedIndex(topics)
    leaves = ("status", "state", "events") if events_for else ("status", "state")
    observer = FleetObserver(topics, leaves=leaves, inventory=tracker, max_events=10_000)
    transport = connect(args, "edgectl-deployments", on_message=fan_out(index, observer))
    try:
        snap = take_snapshot(transport, index, observer, topics, args.connect_timeout)
        if events_for:
            time.sleep(events_for)
        if then is not None:
            then(transport, snap)
    finally:
        transport.stop()
    current = tracker.current() if tracker is not None else None
    groups = {g: tuple(m) for g, m in current.inventory.groups.items()} if current is not None else None
    return snap, groups, observer


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


# ---------------------------------------------------------------------- list / show


def run_list(args: argparse.Namespace) -> int:
    """edgectl deployments list"""
    snap, groups, _ = _read(args)
    models = listing(snap, args.model, groups)
    if args.json:
        print_json({"models": models})
        return ExitCode.OK
    out = stdout_console()
    if not models:
        out.print("no deployments: no model document is retained on the broker and no device reports a model")
        return ExitCode.OK
    for m in models:
        docs = Table(title=f"model {m['model']}", title_justify="left")
        for col in ("document", "version", "deployment", "issued", "expires"):
            docs.add_column(col)
        for d in m["documents"]:
            if d["kind"] == "deployment":
                docs.add_row(d["target"], f"v{d['version']}", d["deployment_id"], _when(d["issued_at"]),
                             _when(d["expires_at"]))
            else:
                docs.add_row(d["target"], d["kind"], d.get("problem", "-"), _when(d.get("issued_at")),
                             _when(d.get("expires_at")))
        out.print(docs)
        devices = Table()
        for col in ("device", "online", "groups", "runs", "phase", "follows", "note"):
            devices.add_column(col)
        for r in m["devices"]:
            follows = f"{r['follows']} v{r['follows_version']}" if r["follows"] else "-"
            note = ""
            if r["pinned"]:
                note = f"[bold red]PINNED[/] (group has v{r['group_version']})"
            elif r["runs_wanted"] is False:
                note = "not on the version it follows"
            devices.add_row(r["device_id"], "yes" if r["online"] else "no", ", ".join(r["groups"]) or "-",
                            f"v{r['version']}" if r["version"] is not None else "-", r["phase"] or "-", follows, note)
        out.print(devices)
        if m["pinned"]:
            out.print(f"pinned: {', '.join(m['pinned'])}; 'edgectl deployments withdraw --device ID --model "
                      f"{m['model']} --key KEY' returns a device to its group's document")
    return ExitCode.OK


def run_show(args: argparse.Namespace) -> int:
    """edgectl deployments show"""
    snap, groups, _ = _read(args)
    found = show(snap, args.what, groups)
    if args.json:
        print_json(found)
        return ExitCode.OK
    out = stdout_console()
    title = f"deployment {found['deployment_id']}" if found["deployment_id"] else "all documents"
    out.print(f"model {found['model']}: {title}")
    if not found["documents"]:
        out.print("  no retained document names it (devices may still run it)")
    for d in found["documents"]:
        if d["kind"] != "deployment":
            out.print(f"  {d['target']}: {d['kind']} {d.get('problem', '')} ({d['topic']})")
            continue
        out.print(f"  {d['target']}: v{d['version']} {d['deployment_id']} ({d['topic']})")
        out.print(f"    issued {_when(d['issued_at'])}, expires {_when(d['expires_at'])}, key {d['key_id'] or '-'}")
        out.print(f"    {d['chunks']} chunks, {d['wire_bytes']} bytes on the wire ({d['raw_bytes']} raw), model "
                  f"{d['model_sha256'][:12]}")
        policy = ", ".join(f"{k}={v}" for k, v in d["policy"].items() if v not in (None, False)) or "defaults"
        out.print(f"    policy: {policy}")
    for r in found["devices"]:
        pinned = " PINNED" if r["pinned"] else ""
        runs = f"v{r['version']}" if r["version"] is not None else "no version"
        out.print(f"  device {r['device_id']}: {r['phase_of_deployment'] or '-'} (runs {runs}, follows "
                  f"{r['follows'] or 'nothing'}){pinned}")
    return ExitCode.OK


# ---------------------------------------------------------------------- withdraw


def run_withdraw(args: argparse.Namespace) -> int:
    """edgectl deployments withdraw"""
    key = load_key(args.key)
    assert key is not None  # --key is required
    targets = withdrawal_targets(args)
    sent: dict[str, dict[str, Any]] = {}

    def publish(transport: Transport, snap: Snapshot) -> None:
        withdrawable(snap, args.model, targets)  # refuses before anything is published
        sent.update(publish_withdrawals(transport, topics, key, args.model, targets,
                                        expires_in=args.expires_in, timeout=args.connect_timeout))

    topics = topics_from_args(args)
    snap, groups, _ = _read(args, then=publish)
    result = []
    for topic, doc in sent.items():
        device = doc["target"].partition(":")[2] if doc["target"].startswith("device:") else None
        then = fallback(snap, args.model, device, groups) if device is not None else \
            "its members without a document of their own keep what they run"
        result.append({"topic": topic, "target": doc["target"], "then": then})
    if args.json:
        print_json({"model": args.model, "withdrawn": result})
        return ExitCode.OK
    out = stdout_console()
    for r in result:
        out.print(f"withdrew the {args.model} document for {r['target']}: {r['then']}")
    return ExitCode.OK


# ---------------------------------------------------------------------- history


def run_history(args: argparse.Namespace) -> int:
    """edgectl deployments history"""
    entries: list[HistoryEntry] = []
    bad = 0
    if args.source is not None:
        if not Path(args.source).is_file():
            raise UsageError(f"--from {args.source}: no such file")
        entries, bad = from_collector(Path(args.source))
    if args.source is None or args.duration is not None:
        snap, _, observer = _read(args, events_for=args.duration or 0.0)
        entries += list(from_states(snap.devices))
        events, _ = observer.events_after(0)
        entries += [HistoryEntry(e, "events") for e in events]
    since = time.time() - args.since if args.since is not None else None
    chosen = select(entries, model=args.model, device=args.device, deployment=args.deployment, since=since)
    if args.json:
        print_json({"entries": [e.to_dict() for e in chosen], "unreadable_lines": bad})
        return ExitCode.OK
    out = stdout_console()
    if not chosen:
        out.print("no deployment history matches" + ("" if args.duration or args.source else
                                                    " (only each device's last outcome is retained; listen with "
                                                    "--duration S or read a collector file with --from FILE)"))
    for h in chosen:
        e = h.event
        reason = f": {e.reason}" if e.reason else ""
        version = f"v{e.version}" if e.version is not None else "-"
        out.print(f"{_when(e.ts)}  {e.device_id}  {e.model} {version}  {e.step}{'' if e.ok else ' (failed)'}"
                  f"{reason}  [{e.deployment_id or '-'}, {h.source}]", markup=False, highlight=False)
    if bad:
        out.print(f"{bad} line(s) of {args.source} were not readable events")
    return ExitCode.OK
