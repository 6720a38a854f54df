"""`edgectl push`, `rollback`, `fleet status` and `gc`: the commands that talk to the broker."""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

from edgefleet.converter.commands.fleet import add_fleet_commands
from edgefleet.converter.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError
from edgefleet.converter.fleet.canary import parse_canary
from edgefleet.converter.fleet.connect import add_broker_args, connect, topics_from_args
from edgefleet.converter.fleet.inventory import (
    InventoryCache,
    InventoryTracker,
    Verified,
    add_trust_args,
    keyring_from_args,
)
from edgefleet.converter.fleet.observer import DeviceView, FleetObserver
from edgefleet.converter.fleet.publish import (
    DeviceResult,
    Prepared,
    RetainedIndex,
    collect_garbage,
    make_command,
    prepare,
    publish_chunks,
    publish_documents,
    push_targets,
    rollback_result,
    select_targets,
    targeted_documents,
    wait_for_rollout,
)
from edgefleet.converter.fleet.watch import wait_for_telemetry
from edgefleet.converter.output import (
    add_json,
    load_key,
    name_type,
    positive_int,
    print_json,
    stderr_console,
    stdout_console,
)
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from edgefleet.bundle import Bundle
from edgefleet.protocol import Topics, canonical_json
from edgefleet.transport import Transport

PUSH_EPILOG = """\
Chunks are published retained (QoS 1) first, then the deployment document to the group's or each
device's topic. Every document names its target inside the signature (target "group:G", or
"device:ID", one document per device), and agents refuse a document on any other topic. With --key
the document is issued again (new deployment id, issued now, --expires-in) and signed for each
target. Without --key the bundle's own signed manifest is published as it is, which works only when
it already names this target; an unsigned manifest (--allow-unsigned, for agents that trust no key)
gets the target written in.

--wait follows the targeted devices that are online: exit 0 when every one committed the
deployment, 1 as soon as one rejects it or rolls it back (the reason is printed), 1 on --timeout.
Offline devices are listed as pending: they install from the retained messages when they return.
With --group, the devices waited for and counted are the group's members in the operator-signed
inventory (edgectl inventory; verified with --trust and the public half of --key), never the devices
that claim the group in their status; without a verified inventory the push stops before publishing.

--canary N (or P%) deploys to N online members of the group first, with device-level documents,
waits (--timeout) until every canary committed (probation passed), then publishes the group
document and withdraws the canaries' own documents. If a canary rejects or rolls back the model, or
does not finish in time, the canaries that activated it get a signed rollback command, their
documents are withdrawn, the group document is not published, and the exit code is 1. With --wait
the rest of the group is then followed as above.

examples:
  edgectl push bundles/det-v2 --group lab --key keys/ --wait --timeout 300
  edgectl push bundles/det-v2 --group lab --key keys/ --canary 10% --wait
  edgectl push bundles/det-v2 --device cam-1 --device cam-2 --broker mqtts://broker:8883 --ca ca.pem \\
      --username edgefleet-operator --password-file op.password
"""

GC_EPILOG = """\
Lists the retained deployment documents and chunks and clears (empty retained message) every chunk
that no retained document names. Run it when no push is in progress: a push publishes its chunks
before its document, and gc would clear them in between. The broker must let one client queue
every retained chunk (max_queued_messages above the chunk count; the shipped config allows 20000).
"""


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def policy_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The signed policy fields given on the command line, checked as the agent checks them."""
    from edgefleet.errors import ProtocolError
    from edgefleet.protocol import Policy, dump, parse

    fields = {"probation_s": args.probation, "max_error_rate": args.max_error_rate,
              "max_latency_ratio": args.max_latency_ratio, "max_latency_ms": args.max_latency_ms}
    policy: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    if args.allow_downgrade:
        policy["allow_downgrade"] = True
    if getattr(args, "version_labels", None):
        policy["version_labels"] = list(args.version_labels)
    try:
        return dump(parse(Policy, policy)) if policy else {}  # type: ignore[no-any-return]
    except ProtocolError as err:
        raise UsageError(f"policy: {err}") from err


def add_parser(subparsers: Any) -> None:
    """Register push, rollback, fleet and gc."""
    p = subparsers.add_parser("push", help="publish a bundle to a group or devices over MQTT",
                              description="Publish a bundle's chunks and its signed deployment document.",
                              epilog=PUSH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory (edgectl convert/package)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--group", type=name_type("group"), help="deploy to every device of this group")
    target.add_argument("--device", dest="devices", action="append", type=name_type("device"), metavar="ID",
                        help="deploy to this device (repeat for several)")
    p.add_argument("--key", metavar="KEY", help="issue a fresh document signed with this key (file or keygen dir)")
    p.add_argument("--expires-in", type=positive_int, metavar="S", help="validity of the re-issued document (--key)")
    p.add_argument("--allow-unsigned", action="store_true", help="publish an unsigned manifest")
    pol = p.add_argument_group("signed policy (with --key; it can only tighten each device's own limits)")
    pol.add_argument("--probation", type=float, metavar="S", help="watch the new model at least S seconds")
    pol.add_argument("--max-error-rate", type=float, metavar="F", help="roll back above this error rate (0-1)")
    pol.add_argument("--max-latency-ratio", type=float, metavar="X",
                     help="roll back when p95 latency exceeds X times the previous model's")
    pol.add_argument("--max-latency-ms", type=float, metavar="MS", help="refuse a model slower than this at validation")
    pol.add_argument("--allow-downgrade", action="store_true",
                     help="let devices install a version not above the one they run (a signed downgrade)")
    pol.add_argument("--version-label", dest="version_labels", action="append", metavar="LABEL",
                     help="a name for this version on the devices' local API (/v1/models/M/labels/LABEL); repeat "
                          "for several")
    p.add_argument("--wait", action="store_true", help="wait until the online targets committed the deployment")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="give up waiting after S s (600)")
    p.add_argument("--canary", type=parse_canary, metavar="N|P%",
                   help="with --group and --key: deploy to N online members (or P%% of them, at least one) "
                        "first and publish the group document only when all of them committed; a failed "
                        "canary is rolled back and the push stops (docs/operations-canary.md)")
    add_trust_args(p)
    add_json(p)
    add_broker_args(p)
    p.set_defaults(func=run_push)

    r = subparsers.add_parser("rollback", help="order a device to restore its previous model",
                              description="Send a signed rollback command to one device (its previous "
                                          "model comes back without a download).")
    r.add_argument("--device", required=True, type=name_type("device"), metavar="ID", help="the device")
    r.add_argument("--model", required=True, type=name_type("model"), help="the model to roll back")
    r.add_argument("--key", required=True, metavar="KEY", help="signing key the device trusts")
    r.add_argument("--expires-in", type=positive_int, default=300, metavar="S",
                   help="the device ignores the command after S s (300)")
    r.add_argument("--wait", action="store_true", help="wait for the device to confirm the rollback")
    r.add_argument("--timeout", type=float, default=120.0, metavar="S", help="give up waiting after S s (120)")
    add_json(r)
    add_broker_args(r)
    r.set_defaults(func=run_rollback)

    f = subparsers.add_parser("fleet", help="see the fleet (status, watch, collect)", description="Look at the fleet.")
    fleet_commands = f.add_subparsers(title="fleet commands", metavar="COMMAND")

    def fleet_help(args: argparse.Namespace) -> int:
        f.print_help()
        return EXIT_USAGE

    f.set_defaults(func=fleet_help)
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
    add_fleet_commands(fleet_commands)

    g = subparsers.add_parser("gc", help="clear retained chunks no deployment uses",
                              description="Clear retained chunks that no retained deployment document names.",
                              epilog=GC_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("--dry-run", action="store_true", help="only report what would be cleared")
    g.add_argument("--timeout", type=float, default=60.0, metavar="S", help="broker time limit (60)")
    add_json(g)
    add_broker_args(g)
    g.set_defaults(func=run_gc)


# ---------------------------------------------------------------------- push


def run_push(args: argparse.Namespace) -> int:
    """edgectl push."""
    if args.canary is not None:
        from edgefleet.converter.commands.canary import run_canary_push

        return run_canary_push(args)
    bundle = Bundle.load(args.bundle)
    key = load_key(args.key)
    push_to = push_targets(args.group, args.devices or [])
    prepared = prepare(bundle, key=key, expires_in=args.expires_in, allow_unsigned=args.allow_unsigned,
                       policy=policy_from_args(args), target=push_to[0])
    dep = prepared.deployment
    name = dep.model.name
    topics = topics_from_args(args)
    documents = targeted_documents(prepared, topics, push_to)
    targets_topics = list(documents)
    out = stdout_console()
    tracker = inventory_tracker(args, topics, key) if args.wait and args.group is not None else None
    observer = FleetObserver(topics, leaves=("status", "state", "events"), inventory=tracker)
    transport = connect(args, "edgectl-push", on_message=observer.handle)
    try:
        targets: dict[str, DeviceResult] = {}
        ignored: list[str] = []
        if args.wait:
            observer.attach(transport, timeout=args.connect_timeout)
            if tracker is not None:
                members = tracker.members(args.group, f"push --group {args.group} --wait")
                ignored = [d for d in observer.claiming(args.group) if d not in members]
            else:
                members = tuple(args.devices)
            targets = select_targets(observer, members)
        publish_s = publish_chunks_with_progress(args, transport, topics, prepared)
        publish_documents(transport, documents)
        summary: dict[str, Any] = {
            "deployment_id": dep.deployment_id, "model": name, "version": dep.model.version,
            "topics": targets_topics, "chunks": len(prepared.chunks), "wire_bytes": prepared.wire_bytes,
            "raw_bytes": prepared.raw_bytes, "document_bytes": len(prepared.document),
            "compress_s": round(prepared.compress_s, 4), "publish_s": round(publish_s, 4),
            "resigned": prepared.resigned, "expires_at": dep.expires_at,
        }
        if not args.json:
            rate = prepared.wire_bytes / publish_s / 1e6 if publish_s > 0 else 0.0
            out.print(f"pushed {name} v{dep.model.version} (deployment {dep.deployment_id}) to "
                      f"{', '.join(targets_topics)}")
            out.print(f"  {len(prepared.chunks)} chunks, {_size(prepared.wire_bytes)} on the wire "
                      f"({_size(prepared.raw_bytes)} raw); chunking+compression {prepared.compress_s:.2f} s, "
                      f"publishing {publish_s:.2f} s ({rate:.0f} MB/s)")
        if not args.wait:
            if args.json:
                print_json(summary)
            return EXIT_OK
        return _follow(args, observer, targets, name, dep.deployment_id, summary, ignored)
    finally:
        transport.stop()


def inventory_tracker(args: argparse.Namespace, topics: Topics, key: Any = None) -> InventoryTracker:
    """The verified-inventory reader for this command's broker, trusted keys and cache."""
    return InventoryTracker(topics, keyring_from_args(args, key), InventoryCache.for_broker(args.broker, topics.prefix))


def publish_chunks_with_progress(args: argparse.Namespace, transport: Transport, topics: Topics,
                                 prepared: Prepared) -> float:
    """publish_chunks with a progress bar on a terminal's stderr; the seconds it took."""
    err = stderr_console()
    with Progress(TextColumn("chunks"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err, transient=True,
                  disable=args.json or not err.is_terminal) as bar:
        task = bar.add_task("publish", total=prepared.wire_bytes)
        return publish_chunks(transport, topics, prepared.chunks,
                              progress=lambda done: bar.update(task, completed=done))


def _follow(args: argparse.Namespace, observer: FleetObserver, targets: dict[str, DeviceResult], name: str,
            dep_id: str, summary: dict[str, Any], ignored: list[str] | None = None) -> int:
    out = stdout_console()
    ignored = ignored or []
    if ignored:
        summary["not_in_inventory"] = ignored
        if not args.json:
            for d in ignored:
                out.print(f"device {d}: claims group {args.group} but is not in the inventory: not counted")

    def show(r: DeviceResult) -> None:
        if args.json:
            return
        if r.verdict == "failed":
            out.print(f"device {r.device_id}: {r.detail}")
        elif r.verdict == "committed":
            out.print(f"device {r.device_id}: committed {r.detail} after {r.seconds or 0:.1f} s")
        else:
            out.print(f"device {r.device_id}: {'pending' if r.verdict == 'pending' else 'unfinished'}: {r.detail}")

    if not targets and not args.json:
        out.print(f"no device announces group {args.group}" if args.group else "no targeted device")
    for r in targets.values():
        if r.verdict == "pending":
            show(r)
    waiting = sum(1 for r in targets.values() if r.verdict == "waiting")
    if waiting and not args.json:
        out.print(f"waiting for {waiting} online device(s), up to {args.timeout:g} s")
    results = wait_for_rollout(observer, targets, name, dep_id, args.timeout, on_result=show)
    for r in results.values():
        if r.verdict == "waiting":
            show(r)
    counts = {v: sum(1 for r in results.values() if r.verdict == v) for v in ("committed", "failed", "waiting", "pending")}
    ok = counts["failed"] == 0 and counts["waiting"] == 0
    if args.json:
        summary["devices"] = [dataclasses.asdict(r) for r in results.values()]
        summary["ok"] = ok
        print_json(summary)
    else:
        out.print(f"{counts['committed']} committed, {counts['failed']} failed, {counts['waiting']} unfinished, "
                  f"{counts['pending']} pending")
    return EXIT_OK if ok else EXIT_FAILURE


# ---------------------------------------------------------------------- rollback


def run_rollback(args: argparse.Namespace) -> int:
    """edgectl rollback."""
    key = load_key(args.key)
    if key is None:
        raise UsageError("rollback needs --key: devices accept only signed commands")
    topics = topics_from_args(args)
    out = stdout_console()
    observer = FleetObserver(topics, leaves=("status", "state", "events"))
    transport = connect(args, "edgectl-rollback", on_message=observer.handle)
    try:
        observer.attach(transport, timeout=args.connect_timeout)
        view = observer.get(args.device)
        if view is None or not view.online:
            why = "is not known to the broker (no status)" if view is None else "is offline"
            out.print(f"device {args.device} {why}: commands are not retained, so nothing was sent")
            return EXIT_FAILURE
        command = make_command(key, args.device, "rollback", args.model, expires_in=args.expires_in)
        sent_at = time.time()
        transport.publish(topics.cmd(args.device), canonical_json(command), qos=1, retain=False, wait=True)
        result: dict[str, Any] = {"device_id": args.device, "model": args.model, "command_id": command["command_id"]}
        if not args.json:
            out.print(f"rollback of {args.model} sent to {args.device} (command {command['command_id']})")
        code = EXIT_OK
        if args.wait:
            outcome = _wait_rollback(observer, args.device, args.model, command["command_id"], sent_at, args.timeout)
            result["confirmed"], result["detail"] = outcome
            code = EXIT_OK if outcome[0] else EXIT_FAILURE
            if not args.json:
                out.print(f"device {args.device}: " + ("rolled back: " if outcome[0] else "not rolled back: ")
                          + outcome[1])
        if args.json:
            print_json(result)
        return code
    finally:
        transport.stop()


def _wait_rollback(observer: FleetObserver, device: str, model: str, command_id: str, since: float,
                   timeout: float) -> tuple[bool, str]:
    deadline = time.monotonic() + timeout
    seen = observer.version
    while True:
        outcome = rollback_result(observer.get(device), model, command_id, since)
        if outcome is not None:
            return outcome
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False, f"no confirmation within {timeout:g} s"
        seen = observer.wait_change(seen, min(remaining, 1.0))


# ---------------------------------------------------------------------- fleet status


def _models_cell(view: DeviceView) -> str:
    if view.state is None:
        return "-"
    parts = []
    for name, m in sorted(view.state.models.items()):
        version = f" v{m.active.version}" if m.active else ""
        pending = f" (-> v{m.pending.version})" if m.pending else ""
        parts.append(f"{name}{version} {m.phase}{pending}")
    return "\n".join(parts) or "-"


def _outcome_cell(view: DeviceView) -> str:
    if view.state is None:
        return "-"
    parts = []
    for name, m in sorted(view.state.models.items()):
        o = m.last_outcome
        if o is not None:
            reason = f": {o.reason}" if o.reason else ""
            parts.append(f"{name} v{o.version} {o.result}{reason}")
    return "\n".join(parts) or "-"


NOT_IN_INVENTORY = "claims group, not in inventory"


def groups_cell(view: DeviceView, inventory: Verified | None) -> str:
    """The device's groups: the inventory's, then groups it only claims, marked; its claims without an inventory."""
    if inventory is None:
        return ", ".join(view.groups) or "-"
    listed = inventory.groups_of(view.device_id)
    claimed = [f"{g} ({NOT_IN_INVENTORY})" for g in view.groups if g not in listed]
    return ", ".join([*listed, *claimed]) or "-"


def with_inventory(views: dict[str, DeviceView], inventory: Verified | None, group: str | None) -> dict[str, DeviceView]:
    """The devices to show: the inventory's members (seen or not) and every device seen, of `group` if given."""
    out = dict(views)
    if inventory is not None:
        for members in inventory.inventory.groups.values():
            for d in members:
                out.setdefault(d, DeviceView(device_id=d))
    if group is None:
        return out
    listed = set(inventory.inventory.members(group)) if inventory is not None else set()
    return {d: v for d, v in out.items() if d in listed or group in v.groups}


def run_fleet_status(args: argparse.Namespace) -> int:
    """edgectl fleet status."""
    topics = topics_from_args(args)
    keyring = keyring_from_args(args)
    tracker = InventoryTracker(topics, keyring, InventoryCache.for_broker(args.broker, topics.prefix)) \
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
        devices = []
        for d in sorted(views):
            row = views[d].to_dict()
            if inventory is not None:
                listed = inventory.groups_of(d)
                row["inventory_groups"] = list(listed)
                row["claims_not_in_inventory"] = [g for g in views[d].groups if g not in listed]
            devices.append(row)
        print_json({"devices": devices, "inventory": None if inventory is None else {
            "version": inventory.inventory.version, "key_id": inventory.key_id,
            "expires_at": inventory.inventory.expires_at}})
        return EXIT_OK
    out = stdout_console()
    if not views:
        out.print("no devices" + (f" in group {args.group}" if args.group else ""))
        return EXIT_OK
    table = Table(show_lines=False)
    for col in ("device", "online", "groups", "models", "last outcome", "status age"):
        table.add_column(col)
    now = time.time()
    for d in sorted(views):
        v = views[d]
        age = f"{now - v.status.ts:.0f} s" if v.status is not None and v.status.ts else "-"
        presence = "yes" if v.online else ("never seen" if v.status is None else "no")
        table.add_row(d, presence, groups_cell(v, inventory), _models_cell(v), _outcome_cell(v), age)
    out.print(table)
    online = sum(1 for v in views.values() if v.online)
    source = f"groups from inventory version {inventory.inventory.version}" if inventory is not None else \
        "groups as the devices claim them (no verified inventory)"
    out.print(f"{len(views)} device(s), {online} online; {source}")
    return EXIT_OK


# ---------------------------------------------------------------------- gc


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
        return EXIT_OK
    out = stdout_console()
    for w in result.warnings:
        out.print(f"warning: {w}")
    verb = "would clear" if args.dry_run else "cleared"
    out.print(f"{result.documents} deployment document(s), {result.chunks} chunk(s) ({_size(result.chunk_bytes)}) "
              f"retained; {result.referenced} in use; {verb} {len(result.cleared)} chunk(s), "
              f"{_size(result.bytes_freed)}")
    return EXIT_OK
