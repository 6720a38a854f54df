"""`edgectl push --group G --canary N`: the command-line side of converter/fleet/canary.py."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from edgefleet.converter.commands.mqtt import (
    _follow,
    inventory_tracker,
    policy_from_args,
    publish_chunks_with_progress,
)
from edgefleet.converter.errors import EXIT_FAILURE, EXIT_OK, UsageError
from edgefleet.converter.fleet.canary import (
    CanaryOutcome,
    CanaryRollout,
    PinnedDocuments,
    Selection,
    pick_canaries,
)
from edgefleet.converter.fleet.connect import connect, topics_from_args
from edgefleet.converter.fleet.observer import FleetObserver
from edgefleet.converter.fleet.publish import DeviceResult, group_target, prepare, select_targets
from edgefleet.converter.output import load_key, print_json, stdout_console

from edgefleet.bundle import Bundle


def _selection_line(group: str, sel: Selection) -> str:
    extra = []
    if sel.offline:
        extra.append(f"{len(sel.offline)} offline member(s) are not candidates")
    if sel.pinned:
        extra.append(f"skipped {', '.join(sel.pinned)}: pinned by their own device document")
    more = f"; {'; '.join(extra)}" if extra else ""
    return (f"canaries: {', '.join(sel.canaries)} ({len(sel.canaries)} of {len(sel.online)} online member(s) "
            f"of {group}{more})")


def run_canary_push(args: argparse.Namespace) -> int:
    """edgectl push --canary: canaries first, then the group (or a rollback of the canaries)."""
    if args.group is None:
        raise UsageError("--canary needs --group: canaries are picked among a group's members")
    key = load_key(args.key)
    if key is None:
        raise UsageError("--canary needs --key: failed canaries are rolled back with signed commands")
    bundle = Bundle.load(args.bundle)
    prepared = prepare(bundle, key=key, expires_in=args.expires_in, policy=policy_from_args(args),
                       target=group_target(args.group))
    dep = prepared.deployment
    name = dep.model.name
    topics = topics_from_args(args)
    out = stdout_console()

    def say(line: str) -> None:
        if not args.json:
            out.print(line)

    def show(r: DeviceResult) -> None:
        if r.verdict == "committed":
            say(f"canary {r.device_id}: committed {r.detail} after {r.seconds or 0:.1f} s")
        elif r.verdict == "failed":
            say(f"canary {r.device_id}: {r.detail}")

    pins = PinnedDocuments(topics, name)
    tracker = inventory_tracker(args, topics, key)
    observer = FleetObserver(topics, leaves=("status", "state", "events"), inventory=tracker)

    def on_message(message: Any) -> None:
        pins.handle(message)
        observer.handle(message)

    transport = connect(args, "edgectl-push", on_message=on_message)
    try:
        transport.subscribe(pins.subscription, wait=args.connect_timeout)
        observer.attach(transport, timeout=args.connect_timeout)  # its sync also covers the pins
        members = tracker.members(args.group, f"push --group {args.group} --canary")
        ignored = [d for d in observer.claiming(args.group) if d not in members]
        selection = pick_canaries(observer, members, args.canary, pins.devices())
        if not selection.canaries:
            why = "no online member" if not selection.pinned else "every online member is pinned by a device document"
            raise UsageError(f"--canary: group {args.group} has {why} to use as a canary "
                             f"({len(selection.offline)} offline); nothing was published")
        say(_selection_line(args.group, selection))
        for d in ignored:
            say(f"device {d}: claims group {args.group} but is not in the inventory: never a canary, not counted")
        publish_s = publish_chunks_with_progress(args, transport, topics, prepared)
        say(f"pushed {name} v{dep.model.version} (deployment {dep.deployment_id}): {len(prepared.chunks)} chunks "
            f"in {publish_s:.2f} s; document to the canaries' device topics; waiting up to {args.timeout:g} s "
            "for them to commit")
        rollout = CanaryRollout(transport, observer, topics, prepared, args.group, selection, key,
                                timeout=args.timeout, say=say, on_result=show)
        outcome = rollout.run()
        summary: dict[str, Any] = {
            "deployment_id": dep.deployment_id, "model": name, "version": dep.model.version,
            "group": args.group, "chunks": len(prepared.chunks), "wire_bytes": prepared.wire_bytes,
            "publish_s": round(publish_s, 4), "canary": _canary_json(args, outcome), "not_in_inventory": ignored,
        }
        if not outcome.passed:
            _report_failure(say, args.group, outcome)
            if args.json:
                summary["ok"] = False
                print_json(summary)
            return EXIT_FAILURE
        say(f"every canary committed: published the group document to {topics.group_model(args.group, name)}")
        say(f"withdrew the device documents of {', '.join(outcome.cleared)}: they follow the group document again")
        if not args.wait:
            if args.json:
                summary["ok"] = True
                print_json(summary)
            return EXIT_OK
        return _follow(args, observer, select_targets(observer, members), name, dep.deployment_id, summary)
    finally:
        transport.stop()


def _report_failure(say: Any, group: str, outcome: CanaryOutcome) -> None:
    for r in outcome.results.values():
        if r.verdict == "waiting":
            say(f"canary {r.device_id}: unfinished: {r.detail}")
    first = outcome.failures[0]
    say(f"canary failed: {first.device_id}: {first.detail}")
    for u in outcome.undo:
        say(f"  {u.device_id}: {u.detail}" if u.ok else f"  {u.device_id}: NOT UNDONE: {u.detail}")
    say(f"withdrew the device documents of {', '.join(outcome.cleared)}; the group document was not published, "
        f"so the other members of {group} keep their current version")


def _canary_json(args: argparse.Namespace, outcome: CanaryOutcome) -> dict[str, Any]:
    sel = outcome.selection
    failed = outcome.failures[0] if outcome.failures else None
    return {
        "size": str(args.canary), "devices": list(sel.canaries), "online": list(sel.online),
        "offline": list(sel.offline), "pinned": list(sel.pinned), "passed": outcome.passed,
        "results": [dataclasses.asdict(r) for r in outcome.results.values()],
        "failed": dataclasses.asdict(failed) if failed is not None else None,
        "undo": [dataclasses.asdict(u) for u in outcome.undo],
        "group_published": outcome.group_published, "cleared": outcome.cleared,
    }
