"""`edgectl push`: publish a bundle to a group or to devices, follow the rollout (--wait), canaries
first (--canary). The work is done in converter/fleet/: publish.py (documents, chunks, verdicts),
rollout.py (progress and following), canary.py (the canary sequence), inventory.py (group members)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Any

from edgefleet.bundle import Bundle
from edgefleet.converter.fleet.canary import (
    CanaryRollout,
    PinnedDocuments,
    canary_line,
    parse_canary,
    pick_canaries,
)
from edgefleet.converter.fleet.connect import add_broker_args, add_key_arg, connect, topics_from_args
from edgefleet.converter.fleet.deployments import dry_run, fan_out, take_snapshot
from edgefleet.converter.fleet.inventory import add_trust_args, tracker_from_args
from edgefleet.converter.fleet.observer import FleetObserver
from edgefleet.converter.fleet.progress import ProgressFeed
from edgefleet.converter.fleet.publish import (
    DeviceResult,
    Prepared,
    RetainedIndex,
    group_target,
    prepare,
    publish_documents,
    push_targets,
    select_targets,
    signed_policy,
    targeted_documents,
)
from edgefleet.converter.fleet.rollout import (
    follow,
    nobody_to_follow,
    publish_with_progress,
    rollout_progress,
)
from edgefleet.converter.output import (
    add_json,
    load_key,
    name_type,
    positive_int,
    print_json,
    size_text,
    stdout_console,
)
from edgefleet.errors import ExitCode, UsageError
from edgefleet.protocol import SigningKey

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
Meanwhile each device's phase and download show as they change: a table redrawn in place when
stderr is a terminal, else one plain line per phase per device (a download's percentage at most
every 5 s); with --json, JSON Lines on stdout, one {"event": "progress", ...} object per change and
the summary ("event": "summary") as the last line.
When no targeted device ever reported a status on the broker, --wait has nothing to follow: it
stops before publishing and exits 2 (push without --wait to publish for devices still to come).
With --group, the devices waited for and counted are the group's members in the operator-signed
inventory (edgectl inventory; verified with --trust and the public half of --key), never the devices
that claim the group in their status; without a verified inventory the push stops before publishing.

--dry-run publishes nothing: it prints the documents it would publish and, for each targeted device,
what it would do (install, refuse a version not above its own, ignore a group push because its own
device document pins it) and how many bytes it would fetch, counting the chunks it already holds.

--canary N (or P%) deploys to N online members of the group first, with device-level documents,
waits (--timeout) until every canary committed (probation passed), then publishes the group
document and withdraws the canaries' own documents. If a canary rejects or rolls back the model, or
does not finish in time, the canaries that activated it get a signed rollback command, their
documents are withdrawn, the group document is not published, and the exit code is 1. With --wait
the rest of the group is then followed as above.

examples:
  edgectl push bundles/det-v2 --group lab --key keys/ --wait --timeout 300
  edgectl push bundles/det-v2 --group lab --key keys/ --canary 10% --wait
  edgectl push bundles/det-v2 --group lab --key keys/ --dry-run   # who would install it, and what each fetches
  edgectl push bundles/det-v2 --device cam-1 --device cam-2 --broker mqtts://broker:8883 --ca ca.pem \\
      --username edgefleet-operator --password-file op.password
"""


def add_parser(subparsers: Any) -> None:
    """Register push."""
    p = subparsers.add_parser("push", help="publish a bundle to a group or devices over MQTT",
                              description="Publish a bundle's chunks and its signed deployment document.",
                              epilog=PUSH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", metavar="BUNDLE", help="bundle directory (edgectl convert/package)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--group", type=name_type("group"), help="deploy to every device of this group")
    target.add_argument("--device", dest="devices", action="append", type=name_type("device"), metavar="ID",
                        help="deploy to this device (repeat for several)")
    add_key_arg(p, "issue a fresh document signed with this key (file or keygen dir)")
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
    pol.add_argument("--shadow", action="store_true",
                     help="shadow probation: before the switch the new model runs beside the active one on a "
                          "sampled share of live requests and must agree with it (each device's [shadow] "
                          "defaults; the --shadow-* options set their own and imply --shadow)")
    pol.add_argument("--shadow-sample-rate", type=float, metavar="F", help="share of live requests copied (0-1)")
    pol.add_argument("--shadow-min-samples", type=int, metavar="N", help="compared requests needed for a verdict")
    pol.add_argument("--shadow-min-agreement", type=float, metavar="F",
                     help="share of compared requests that must agree (0-1; top-1 class for classifiers)")
    pol.add_argument("--shadow-atol", type=float, metavar="A", help="absolute tolerance for outputs that are not "
                                                                     "class scores")
    pol.add_argument("--shadow-rtol", type=float, metavar="R", help="relative tolerance, as --shadow-atol")
    pol.add_argument("--shadow-max-latency-ratio", type=float, metavar="X",
                     help="reject when the new model's median invoke is above X times the active one's")
    pol.add_argument("--shadow-window", type=float, metavar="S",
                     help="reject when fewer than the samples needed came in S seconds (not enough traffic)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be published, to whom, and what each device would fetch; publish nothing")
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


def _policy(args: argparse.Namespace) -> dict[str, Any]:
    """The signed policy options given on the command line."""
    return signed_policy(probation_s=args.probation, max_error_rate=args.max_error_rate,
                         max_latency_ratio=args.max_latency_ratio, max_latency_ms=args.max_latency_ms,
                         allow_downgrade=args.allow_downgrade, version_labels=args.version_labels or (),
                         shadow=_shadow_policy(args))


def _shadow_policy(args: argparse.Namespace) -> dict[str, Any] | None:
    """`policy.shadow` from --shadow and the --shadow-* options (None: no shadow probation asked for)."""
    fields = {"sample_rate": args.shadow_sample_rate, "min_samples": args.shadow_min_samples,
              "min_agreement": args.shadow_min_agreement, "atol": args.shadow_atol, "rtol": args.shadow_rtol,
              "max_latency_ratio": args.shadow_max_latency_ratio, "window_s": args.shadow_window}
    given = {k: v for k, v in fields.items() if v is not None}
    return given if args.shadow or given else None


def _sayer(args: argparse.Namespace) -> Callable[[str], None]:
    """Print lines for people; none with --json, which prints one document at the end."""
    if args.json:
        return lambda line: None
    out = stdout_console()
    return lambda line: out.print(line)


def _progress(args: argparse.Namespace, observer: FleetObserver, devices: Iterable[str], prepared: Prepared,
              after: ProgressFeed | None = None) -> ProgressFeed | None:
    """Each device's phase and download while edgectl waits: JSON Lines with --json --wait (--json alone
    keeps its single document), else a live table on a terminal or plain lines when piped."""
    if args.json and not args.wait:
        return None
    return rollout_progress(observer, devices, prepared, as_json=args.json, say=_sayer(args), after=after)


def _print_summary(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    """--json's result: one document, or with --wait the last line of the JSON Lines after the progress
    events (the same fields, and "event": "summary")."""
    if args.wait:
        sys.stdout.write(json.dumps({"event": "summary", **summary}, sort_keys=True, default=str) + "\n")
        sys.stdout.flush()
    else:
        print_json(summary)


def _follow(args: argparse.Namespace, observer: FleetObserver, targets: dict[str, DeviceResult], name: str,
            dep_id: str, summary: dict[str, Any], ignored: Sequence[str] = (),
            progress: ProgressFeed | None = None) -> int:
    """--wait: follow the targets to their verdicts, showing `progress` meanwhile; exit 0 when none failed
    or is unfinished."""
    say = _sayer(args)
    if ignored:
        summary["not_in_inventory"] = list(ignored)
        for d in ignored:
            say(f"device {d}: claims group {args.group} but is not in the inventory: not counted")
    with progress if progress is not None else nullcontext():
        followed = follow(observer, targets, name, dep_id, timeout=args.timeout, group=args.group, say=say,
                          progress=progress)
    if args.json:
        summary["devices"] = followed.devices()
        summary["ok"] = followed.ok
        _print_summary(args, summary)
    else:
        say(followed.summary_line())
    return ExitCode.OK if followed.ok else ExitCode.FAILURE


def _dry_run(args: argparse.Namespace, prepared: Prepared, documents: dict[str, bytes], key: SigningKey | None) -> int:
    """push --dry-run: the documents, the devices they reach and what each would fetch; nothing published."""
    topics = topics_from_args(args)
    tracker = tracker_from_args(args, topics, key) if args.group is not None else None
    index = RetainedIndex(topics)
    observer = FleetObserver(topics, leaves=("status", "state"), inventory=tracker)
    transport = connect(args, "edgectl-push", on_message=fan_out(index, observer))
    try:
        snap = take_snapshot(transport, index, observer, topics, args.connect_timeout)
    finally:
        transport.stop()
    current = tracker.current() if tracker is not None else None
    unverified = args.group is not None and current is None
    if args.group is None:
        devices: list[str] = list(args.devices)
    elif current is not None:
        devices = list(current.inventory.members(args.group))
    else:
        devices = observer.claiming(args.group)
    plan = dry_run(snap, prepared.deployment, documents, devices, unverified)
    plan.update(chunks=len(prepared.chunks), wire_bytes=prepared.wire_bytes, raw_bytes=prepared.raw_bytes)
    if args.json:
        print_json(plan)
        return ExitCode.OK
    out = stdout_console()
    dep = prepared.deployment
    out.print(f"dry run: nothing was published. {dep.model.name} v{dep.model.version} (deployment "
              f"{dep.deployment_id}): {len(prepared.chunks)} chunks, {size_text(prepared.wire_bytes)} on the wire")
    for d in plan["documents"]:
        out.print(f"  would publish the document to {d['topic']} ({d['bytes']} bytes)")
    if unverified:
        out.print(f"  no verified inventory: the devices below only claim group {args.group}")
    if not plan["devices"]:
        out.print("  no targeted device is known on this broker")
    for r in plan["devices"]:
        where = "online" if r["online"] else ("offline" if r["seen"] else "never seen")
        runs = f"runs v{r['runs']}" if r["runs"] is not None else "runs no version"
        fetch = f"{'' if r['exact'] else 'at most '}{size_text(r['fetch_wire_bytes'])} in {r['fetch_chunks']} chunk(s)"
        out.print(f"  device {r['device_id']} ({where}, {runs}): {r['effect']}; would fetch {fetch}")
    return ExitCode.OK


def run_push(args: argparse.Namespace) -> int:
    """edgectl push."""
    if args.dry_run and (args.wait or args.canary is not None):
        raise UsageError("--dry-run publishes nothing, so it takes neither --wait nor --canary")
    if args.canary is not None:
        return run_canary_push(args)
    bundle = Bundle.load(args.bundle)
    key = load_key(args.key)
    push_to = push_targets(args.group, args.devices or [])
    prepared = prepare(bundle, key=key, expires_in=args.expires_in, allow_unsigned=args.allow_unsigned,
                       policy=_policy(args), target=push_to[0])
    dep = prepared.deployment
    name = dep.model.name
    topics = topics_from_args(args)
    documents = targeted_documents(prepared, topics, push_to)
    targets_topics = list(documents)
    if args.dry_run:
        return _dry_run(args, prepared, documents, key)
    say = _sayer(args)
    tracker = tracker_from_args(args, topics, key) if args.wait and args.group is not None else None
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
            nobody = nobody_to_follow(observer, targets, args.group)
            if nobody is not None:
                raise UsageError(nobody)
        publish_s = publish_with_progress(transport, topics, prepared, quiet=args.json)
        publish_documents(transport, documents)
        summary: dict[str, Any] = {
            "deployment_id": dep.deployment_id, "model": name, "version": dep.model.version,
            "topics": targets_topics, "chunks": len(prepared.chunks), "wire_bytes": prepared.wire_bytes,
            "raw_bytes": prepared.raw_bytes, "document_bytes": len(prepared.document),
            "compress_s": round(prepared.compress_s, 4), "publish_s": round(publish_s, 4),
            "resigned": prepared.resigned, "expires_at": dep.expires_at,
        }
        rate = prepared.wire_bytes / publish_s / 1e6 if publish_s > 0 else 0.0
        say(f"pushed {name} v{dep.model.version} (deployment {dep.deployment_id}) to {', '.join(targets_topics)}")
        say(f"  {len(prepared.chunks)} chunks, {size_text(prepared.wire_bytes)} on the wire "
            f"({size_text(prepared.raw_bytes)} raw); chunking+compression {prepared.compress_s:.2f} s, "
            f"publishing {publish_s:.2f} s ({rate:.0f} MB/s)")
        if not args.wait:
            if args.json:
                print_json(summary)
            return ExitCode.OK
        return _follow(args, observer, targets, name, dep.deployment_id, summary, ignored,
                       progress=_progress(args, observer, targets, prepared))
    finally:
        transport.stop()


def run_canary_push(args: argparse.Namespace) -> int:
    """edgectl push --canary: canaries first, then the group (or a rollback of the canaries)."""
    if args.group is None:
        raise UsageError("--canary needs --group: canaries are picked among a group's members")
    key = load_key(args.key)
    if key is None:
        raise UsageError("--canary needs --key: failed canaries are rolled back with signed commands")
    bundle = Bundle.load(args.bundle)
    prepared = prepare(bundle, key=key, expires_in=args.expires_in, policy=_policy(args),
                       target=group_target(args.group))
    dep = prepared.deployment
    name = dep.model.name
    topics = topics_from_args(args)
    say = _sayer(args)
    pins = PinnedDocuments(topics, name)
    tracker = tracker_from_args(args, topics, key)
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
            why = ("has no online member to use as a canary" if not selection.pinned
                   else "has no online member free to be a canary (every one is pinned by a device document)")
            raise UsageError(f"--canary: group {args.group} {why} "
                             f"({len(selection.offline)} offline); nothing was published")
        say(selection.describe(args.group))
        for d in ignored:
            say(f"device {d}: claims group {args.group} but is not in the inventory: never a canary, not counted")
        publish_s = publish_with_progress(transport, topics, prepared, quiet=args.json)
        say(f"pushed {name} v{dep.model.version} (deployment {dep.deployment_id}): {len(prepared.chunks)} chunks "
            f"in {publish_s:.2f} s; document to the canaries' device topics; waiting up to {args.timeout:g} s "
            "for them to commit")
        progress = _progress(args, observer, selection.canaries, prepared)

        def show(r: DeviceResult) -> None:
            if progress is not None:
                progress.tick()  # the canary's last phase before its verdict
            line = canary_line(r)
            if line is not None:
                say(line)

        with progress if progress is not None else nullcontext():
            rollout = CanaryRollout(transport, observer, topics, prepared, args.group, selection, key,
                                    timeout=args.timeout, say=say, on_result=show,
                                    on_tick=progress.tick if progress is not None else None)
            outcome = rollout.run()
        summary: dict[str, Any] = {
            "deployment_id": dep.deployment_id, "model": name, "version": dep.model.version,
            "group": args.group, "chunks": len(prepared.chunks), "wire_bytes": prepared.wire_bytes,
            "publish_s": round(publish_s, 4), "canary": outcome.to_dict(args.canary), "not_in_inventory": ignored,
        }
        if not outcome.passed:
            for line in outcome.failure_lines(args.group):
                say(line)
            if args.json:
                summary["ok"] = False
                _print_summary(args, summary)
            return ExitCode.FAILURE
        say(f"every canary committed: published the group document to {topics.group_model(args.group, name)}")
        say(f"withdrew the device documents of {', '.join(outcome.cleared)}: they follow the group document again")
        if not args.wait:
            if args.json:
                summary["ok"] = True
                print_json(summary)
            return ExitCode.OK
        rest = _progress(args, observer, members, prepared, after=progress)
        return _follow(args, observer, select_targets(observer, members), name, dep.deployment_id, summary,
                       progress=rest)
    finally:
        transport.stop()
