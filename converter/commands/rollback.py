"""`edgectl rollback`: a signed rollback command to one device, and its confirmation with --wait."""

from __future__ import annotations

import argparse
import time
from typing import Any

from edgefleet.converter.fleet.connect import add_broker_args, add_key_arg, connect, topics_from_args
from edgefleet.converter.fleet.observer import FleetObserver
from edgefleet.converter.fleet.publish import make_command, wait_rollback
from edgefleet.converter.output import add_json, load_key, name_type, positive_int, print_json, stdout_console
from edgefleet.errors import EdgefleetError, ExitCode, UsageError
from edgefleet.protocol import canonical_json


def add_parser(subparsers: Any) -> None:
    """Register rollback."""
    r = subparsers.add_parser("rollback", help="order a device to restore its previous model",
                              description="Send a signed rollback command to one device (its previous "
                                          "model comes back without a download).")
    r.add_argument("--device", required=True, type=name_type("device"), metavar="ID", help="the device")
    r.add_argument("--model", required=True, type=name_type("model"), help="the model to roll back")
    add_key_arg(r, "signing key the device trusts", required=True)
    r.add_argument("--expires-in", type=positive_int, default=300, metavar="S",
                   help="the device ignores the command after S s (300)")
    r.add_argument("--wait", action="store_true", help="wait for the device to confirm the rollback")
    r.add_argument("--timeout", type=float, default=120.0, metavar="S", help="give up waiting after S s (120)")
    add_json(r)
    add_broker_args(r)
    r.set_defaults(func=run_rollback)


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
            # the operation failed (exit 1), and says so on stderr like every other failure
            raise EdgefleetError(f"device {args.device} {why}: commands are not retained, so nothing was sent")
        command = make_command(key, args.device, "rollback", args.model, expires_in=args.expires_in)
        sent_at = time.time()
        transport.publish(topics.cmd(args.device), canonical_json(command), qos=1, retain=False, wait=True)
        result: dict[str, Any] = {"device_id": args.device, "model": args.model, "command_id": command["command_id"]}
        if not args.json:
            out.print(f"rollback of {args.model} sent to {args.device} (command {command['command_id']})")
        code = ExitCode.OK
        if args.wait:
            outcome = wait_rollback(observer, args.device, args.model, command["command_id"], sent_at, args.timeout)
            result["confirmed"], result["detail"] = outcome
            code = ExitCode.OK if outcome[0] else ExitCode.FAILURE
            if not args.json:
                out.print(f"device {args.device}: " + ("rolled back: " if outcome[0] else "not rolled back: ")
                          + outcome[1])
        if args.json:
            print_json(result)
        return code
    finally:
        transport.stop()
