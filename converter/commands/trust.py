"""`edgectl inventory`, `timestamp` and `withdraw`: the operator-signed documents besides deployments.

- the inventory (``P/inventory``, retained) says which devices form each group; host tools take group
  membership from it and never from what a device claims (converter/fleet/inventory.py);
- the timestamp (``P/timestamp``, retained) is the short-lived signed heartbeat of the update channel:
  a device whose newest timestamp expired knows its channel is frozen or withheld, not just quiet;
- a withdrawal takes a retained deployment document back, signed, in the document's place.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.converter.fleet.connect import add_broker_args, add_key_arg, connect, topics_from_args
from edgefleet.converter.fleet.deployments import add_withdraw_args, withdrawal_targets
from edgefleet.converter.fleet.inventory import (
    DEFAULT_EXPIRY_S,
    InventoryTracker,
    add_trust_args,
    issue,
    read_inventory_file,
    tracker_from_args,
    warn,
)
from edgefleet.converter.fleet.observer import FleetObserver
from edgefleet.converter.fleet.publish import (
    make_timestamp,
    publish_withdrawals,
)
from edgefleet.converter.output import (
    add_json,
    command_group,
    load_key,
    name_type,
    positive_int,
    print_json,
    stdout_console,
    stop_on_signals,
)
from edgefleet.errors import ExitCode, ProtocolError, TransportError, UsageError
from edgefleet.protocol import SigningKey, Topics, canonical_json

TIMESTAMP_EXPIRY_S = 900

INVENTORY_EPILOG = """\
The inventory is one document, signed with an operator key and retained on the broker: for each
group, its member devices. 'push --group --wait' and 'push --canary' take group membership only
from it (a device's status may claim any group; it is shown, never believed). Each change publishes
the whole inventory again with version = the highest version seen + 1.

Hosts verify it with the keys given by --trust (default $EDGEFLEET_TRUST) plus the public half of
--key, and remember the newest verified version per broker and prefix (in $EDGEFLEET_STATE_DIR, by
default ~/.local/state/edgefleet): an inventory that does not verify, or whose version is lower than
one already seen, is ignored with a warning.

examples:
  edgectl inventory set lab cam-1 cam-2 cam-3 --key keys
  edgectl inventory remove lab cam-3 --key keys
  edgectl inventory push fleet.toml --key keys        # [groups] lab = ["cam-1", "cam-2"]
  edgectl inventory show --trust keys/edgefleet.pub
  edgectl inventory renew --key keys                  # same groups, new version and expiry
"""

TIMESTAMP_EPILOG = """\
Publishes a signed timestamp retained on <prefix>/timestamp. Agents that hold trusted keys report in
their status, telemetry and metrics whether their newest valid timestamp is still fresh: when it has
expired, updates may be withheld or the channel frozen. Run it as a service with --every (for
example every 60 s with --expires-in 300), so a stopped heartbeat shows within minutes.

example:
  edgectl timestamp --key keys --every 60 --expires-in 300
"""

WITHDRAW_EPILOG = """\
Publishes a signed withdrawal retained on the device's or group's model topic, in place of the
deployment document there. The devices forget that document (a download in progress stops); what
they already run keeps running (roll it back with 'edgectl rollback'). Agents ignore empty retained
payloads, which anyone allowed to publish on the topic could send: only a signed withdrawal counts.
'edgectl deployments withdraw' does the same after checking that the document exists, and says what
each device falls back to ('edgectl deployments list' shows the pinned devices).

example:
  edgectl withdraw --group lab --model det --key keys
"""


def add_parser(subparsers: Any) -> None:
    """Register inventory, timestamp and withdraw."""
    commands = command_group(subparsers, "inventory", title="inventory commands",
                             help="the signed inventory of groups and their devices",
                             description="Publish or show the operator-signed inventory (group membership).",
                             epilog=INVENTORY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)

    def common(p: argparse.ArgumentParser, signing: bool) -> None:
        if signing:
            add_key_arg(p, "operator signing key (file or keygen dir)", required=True)
            p.add_argument("--expires-in", type=positive_int, default=DEFAULT_EXPIRY_S, metavar="S",
                           help=f"validity of the new inventory in seconds (default {DEFAULT_EXPIRY_S // 86400} days)")
        add_trust_args(p)
        add_json(p)
        add_broker_args(p)

    # set and remove take the same GROUP DEVICE... arguments; only remove may name no device
    for name, devices, func, summary, description in (
        ("set", "+", run_inventory_set, "make DEVICE... the members of GROUP",
         "Publish the inventory with GROUP's members replaced by DEVICE..."),
        ("remove", "*", run_inventory_remove, "remove devices from GROUP, or GROUP itself",
         "Publish the inventory without DEVICE... in GROUP (without the whole group when no device is named)."),
    ):
        g = commands.add_parser(name, help=summary, description=description)
        g.add_argument("group", type=name_type("group"), metavar="GROUP")
        g.add_argument("devices", nargs=devices, type=name_type("device"), metavar="DEVICE")
        common(g, signing=True)
        g.set_defaults(func=func)

    pu = commands.add_parser("push", help="publish a whole inventory from a TOML file",
                             description="Publish the inventory described by FILE ([groups] NAME = [DEVICE, ...]), "
                                         "replacing the current one.")
    pu.add_argument("file", metavar="FILE.toml")
    common(pu, signing=True)
    pu.set_defaults(func=run_inventory_push)

    rn = commands.add_parser("renew", help="publish the current inventory again (new version and expiry)",
                             description="Re-issue the current inventory unchanged, with a new version and expiry.")
    common(rn, signing=True)
    rn.set_defaults(func=run_inventory_renew)

    sh = commands.add_parser("show", help="the verified inventory and where its devices are",
                             description="Show the newest verified inventory, each member's presence, and the "
                                         "devices that claim a group without being in it.")
    common(sh, signing=False)
    sh.set_defaults(func=run_inventory_show)

    t = subparsers.add_parser("timestamp", help="publish the signed heartbeat of the update channel",
                              description="Publish a signed, short-lived timestamp (retained).",
                              epilog=TIMESTAMP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_key_arg(t, "operator signing key (file or keygen dir)", required=True)
    t.add_argument("--expires-in", type=positive_int, default=TIMESTAMP_EXPIRY_S, metavar="S",
                   help=f"validity of each timestamp in seconds (default {TIMESTAMP_EXPIRY_S})")
    t.add_argument("--every", type=positive_int, metavar="S",
                   help="issue a new timestamp every S seconds until interrupted (S below --expires-in)")
    add_json(t)
    add_broker_args(t)
    t.set_defaults(func=run_timestamp)

    w = subparsers.add_parser("withdraw", help="take back a retained deployment document, signed",
                              description="Publish a signed withdrawal in place of a device's or group's "
                                          "deployment document for one model.",
                              epilog=WITHDRAW_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_withdraw_args(w)
    add_json(w)
    add_broker_args(w)
    w.set_defaults(func=run_withdraw)


def _key(args: argparse.Namespace) -> SigningKey:
    key = load_key(args.key)
    assert key is not None  # --key is required
    return key


# ---------------------------------------------------------------------- inventory


def _read(args: argparse.Namespace, key: SigningKey | None) -> tuple[Any, InventoryTracker, FleetObserver, Topics]:
    """Connect and read the retained inventory (and device statuses); the transport is left open."""
    topics = topics_from_args(args)
    tracker = tracker_from_args(args, topics, key)
    observer = FleetObserver(topics, leaves=("status",), inventory=tracker)
    transport = connect(args, "edgectl-inventory", on_message=observer.handle)
    try:
        observer.attach(transport, timeout=args.connect_timeout)
    except BaseException:
        transport.stop()
        raise
    return transport, tracker, observer, topics


def _publish(args: argparse.Namespace, change: Callable[[dict[str, list[str]]], dict[str, list[str]]], action: str,
             *, replace_all: bool = False, need_base: bool = False) -> int:
    """Read the current inventory, apply `change` (groups -> groups), publish the result as the next version.

    `replace_all` (inventory push) does not need to read the current groups, so an inventory this host
    cannot verify may be replaced; otherwise changing it is refused (its groups would be lost).
    """
    key = _key(args)
    transport, tracker, _, topics = _read(args, key)
    try:
        base = tracker.latest if replace_all else tracker.editable(f"inventory {action}")
        if base is None and need_base:
            raise UsageError(f"inventory {action}: there is no inventory to {action}; publish one with "
                             "'edgectl inventory set GROUP DEVICE... --key KEY'")
        groups: dict[str, list[str]] = {g: list(m) for g, m in (base.inventory.groups.items() if base else ())}
        new_groups = change(groups)
        version = (base.inventory.version if base is not None else 0) + 1
        try:
            raw = issue(key, new_groups, version, expires_in=args.expires_in)
        except ProtocolError as err:
            raise UsageError(f"inventory {action}: {err}") from err
        transport.publish(topics.inventory(), canonical_json(raw), qos=1, retain=True, wait=args.connect_timeout)
        tracker.accept(raw)
    finally:
        transport.stop()
    if args.json:
        print_json({"version": raw["version"], "key_id": raw["key_id"], "issued_at": raw["issued_at"],
                    "expires_at": raw["expires_at"], "groups": raw["groups"], "topic": topics.inventory()})
        return ExitCode.OK
    out = stdout_console()
    out.print(f"published inventory version {raw['version']} to {topics.inventory()} (key {raw['key_id']}, "
              f"expires {_when(raw['expires_at'])})")
    for g, members in raw["groups"].items():
        out.print(f"  {g}: {', '.join(members)}")
    if not raw["groups"]:
        out.print("  (no groups)")
    return ExitCode.OK


def run_inventory_set(args: argparse.Namespace) -> int:
    """edgectl inventory set GROUP DEVICE..."""
    def change(groups: dict[str, list[str]]) -> dict[str, list[str]]:
        return {**groups, args.group: list(args.devices)}
    return _publish(args, change, "set")


def run_inventory_remove(args: argparse.Namespace) -> int:
    """edgectl inventory remove GROUP [DEVICE...]"""
    def change(groups: dict[str, list[str]]) -> dict[str, list[str]]:
        if args.group not in groups:
            raise UsageError(f"inventory remove: group {args.group} is not in the inventory; nothing was published")
        if not args.devices:
            return {g: m for g, m in groups.items() if g != args.group}
        missing = [d for d in args.devices if d not in groups[args.group]]
        if missing:
            raise UsageError(f"inventory remove: {', '.join(missing)} not in group {args.group}; nothing was published")
        return {**groups, args.group: [d for d in groups[args.group] if d not in args.devices]}
    return _publish(args, change, "remove", need_base=True)


def run_inventory_push(args: argparse.Namespace) -> int:
    """edgectl inventory push FILE.toml"""
    groups = read_inventory_file(Path(args.file))
    key = _key(args)
    try:
        issue(key, groups, 1)  # check the names before connecting
    except ProtocolError as err:
        raise UsageError(f"{args.file}: {err}") from err
    return _publish(args, lambda _: groups, "push", replace_all=True)


def run_inventory_renew(args: argparse.Namespace) -> int:
    """edgectl inventory renew"""
    return _publish(args, lambda groups: groups, "renew", need_base=True)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def run_inventory_show(args: argparse.Namespace) -> int:
    """edgectl inventory show"""
    transport, tracker, observer, topics = _read(args, None)
    transport.stop()
    latest = tracker.latest
    if latest is None:
        why = "no operator key is trusted (give --trust PUB)" if not tracker.keyring else (
            "the one on the broker does not verify" if tracker.received else "there is none on the broker")
        stdout_console().print(f"no verified inventory: {why}; publish one with 'edgectl inventory set GROUP "
                               "DEVICE... --key KEY'")
        return ExitCode.FAILURE
    inv = latest.inventory
    views = observer.devices()
    members = {d for m in inv.groups.values() for d in m}

    def presence(d: str) -> str:
        v = views.get(d)
        return "never seen" if v is None or v.status is None else ("online" if v.online else "offline")

    claims = {d: [g for g in v.groups if d not in inv.members(g)] for d, v in sorted(views.items())}
    claims = {d: gs for d, gs in claims.items() if gs}
    expired = latest.expired(time.time())
    if args.json:
        print_json({"version": inv.version, "key_id": latest.key_id, "issued_at": inv.issued_at,
                    "expires_at": inv.expires_at, "expired": expired, "source": latest.source,
                    "groups": {g: list(m) for g, m in inv.groups.items()},
                    "devices": {d: presence(d) for d in sorted(members)}, "claims_not_in_inventory": claims})
        return ExitCode.OK
    out = stdout_console()
    state = "EXPIRED" if expired else "valid"
    where = "" if latest.source == "broker" else " (from this host's memory: the broker holds none newer that verifies)"
    out.print(f"inventory version {inv.version}, signed by key {latest.key_id}, issued {_when(inv.issued_at)}, "
              f"{state} until {_when(inv.expires_at)}{where}")
    for g, m in inv.groups.items():
        out.print(f"  {g}: " + ", ".join(f"{d} ({presence(d)})" for d in m))
    for d, gs in claims.items():
        out.print(f"  {d}: claims group {', '.join(gs)}, not in inventory (ignored)")
    return ExitCode.OK


# ---------------------------------------------------------------------- timestamp


def run_timestamp(args: argparse.Namespace) -> int:
    """edgectl timestamp"""
    key = _key(args)
    if args.every is not None and args.every >= args.expires_in:
        raise UsageError(f"--every {args.every} must be below --expires-in {args.expires_in}: otherwise every "
                         "timestamp expires before the next one and devices see a frozen channel")
    topics = topics_from_args(args)
    out = stdout_console()
    stop = threading.Event()
    restore = stop_on_signals(stop.set) if args.every is not None else (lambda: None)
    transport = connect(args, "edgectl-timestamp")
    issued = 0
    try:
        while True:
            doc = make_timestamp(key, args.expires_in)
            try:
                transport.publish(topics.timestamp(), canonical_json(doc), qos=1, retain=True,
                                  wait=args.connect_timeout)
            except TransportError as err:
                if args.every is None:
                    raise
                warn(f"timestamp not acknowledged ({err}); trying again in {args.every} s")
            else:
                issued += 1
                if args.json:
                    print_json({"topic": topics.timestamp(), "issued_at": doc["issued_at"],
                                "expires_at": doc["expires_at"], "key_id": doc["key_id"]})
                elif args.every is None or issued == 1:
                    again = f"; again every {args.every} s until stopped" if args.every is not None else ""
                    out.print(f"timestamp published to {topics.timestamp()} (key {doc['key_id']}), valid until "
                              f"{_when(doc['expires_at'])}{again}")
            if args.every is None or stop.wait(args.every):
                break
    finally:
        restore()
        transport.stop()
    if args.every is not None and not args.json:
        out.print(f"stopped after {issued} timestamp(s)")
    return ExitCode.OK


# ---------------------------------------------------------------------- withdraw


def run_withdraw(args: argparse.Namespace) -> int:
    """edgectl withdraw"""
    key = _key(args)
    topics = topics_from_args(args)
    targets = withdrawal_targets(args)
    transport = connect(args, "edgectl-withdraw")
    try:
        sent = publish_withdrawals(transport, topics, key, args.model, targets, expires_in=args.expires_in,
                                   timeout=args.connect_timeout)
    finally:
        transport.stop()
    if args.json:
        print_json({"model": args.model, "withdrawn": [{"topic": t, "target": d["target"]} for t, d in sent.items()]})
        return ExitCode.OK
    out = stdout_console()
    for topic, doc in sent.items():
        out.print(f"withdrew the {args.model} document for {doc['target']} ({topic}); what runs there keeps running")
    return ExitCode.OK
