"""`edgectl broker check`: probe a broker for what edgefleet needs (converter/fleet/brokercheck.py)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Literal

from rich.table import Table
from rich.text import Text

from edgefleet.converter.fleet.brokercheck import (
    DEFAULT_TIMEOUT_S,
    Checker,
    DeviceLogin,
    Report,
    quiet_transport,
    transport_opener,
)
from edgefleet.converter.fleet.connect import (
    add_broker_args,
    secret_option,
    settings_from_args,
    topics_from_args,
)
from edgefleet.converter.output import add_json, command_group, name_type, print_json, stdout_console
from edgefleet.errors import ExitCode, UsageError
from edgefleet.transport import MqttSettings, check_broker_url

CHECK_EPILOG = """\
One row per property, each ok, warn or fail with what was measured and what it means for edgefleet:
the MQTT versions accepted (5, 3.1.1), retained messages delivered to a '+' subscription, the QoS 1
subscriptions one session is granted, the largest retained payload accepted and delivered, retained
messages kept across a broker restart, and a device credential's ACL. Exit 0 when nothing failed
(warnings are limits edgefleet works within), 1 otherwise, 2 when the broker cannot be reached.

With several --broker urls (the nodes of a cluster, or $EDGEFLEET_BROKER as a comma list) each node
is checked in turn, one table each, and --json prints {"ok": ..., "brokers": [one report per node]}.

The probes are published under PREFIX/sync/check-.../ with the --username given (the shipped
operator ACL allows it); every retained probe is cleared before the command ends.

Persistence needs a restart only the operator can do: run with --before-restart (it leaves one
retained marker, PREFIX/sync/edgectl-broker-check/restart), restart the broker, then run with
--after-restart, which looks for the marker and clears it.

The device ACL rows need a device credential (--device-user, --device-password-file; the user name
is the device id). Use a spare credential made for the check, not one a running agent uses: brokers
that bind the client id to the user name (the shipped Mosquitto config) disconnect the agent, and the
probes send it empty messages. Nothing retained is published on the device's behalf.

examples:
  edgectl broker check --broker mqtt://broker:1883
  edgectl broker check --broker mqtts://broker:8884 --ca ca.pem --username edgefleet-operator \\
      --password-file op.password --device-broker mqtts://broker:8883 --device-user check-1 \\
      --device-password-file check-1.password
  edgectl broker check --broker mqtt://broker:1883 --before-restart    # then restart the broker
  edgectl broker check --broker mqtt://broker:1883 --after-restart --json
"""


def add_parser(subparsers: Any) -> None:
    """Register `broker` with its command: check."""
    broker_commands = command_group(subparsers, "broker", title="broker commands",
                                    help="probe the MQTT broker for what edgefleet needs",
                                    description="Look at the MQTT broker.")
    c = broker_commands.add_parser("check", help="measure versions, retained delivery, limits, persistence, ACL",
                                   description="Probe the broker for what edgefleet needs and print a verdict "
                                               "per property.",
                                   epilog=CHECK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S",
                   help=f"wait at most S s for each answer of the broker, a CONNACK included (default "
                        f"{DEFAULT_TIMEOUT_S:g})")
    restart = c.add_mutually_exclusive_group()
    restart.add_argument("--before-restart", action="store_true",
                         help="leave a retained marker to look for after a broker restart")
    restart.add_argument("--after-restart", action="store_true",
                         help="look for the marker --before-restart left (and clear it)")
    device = c.add_argument_group("device ACL")
    device.add_argument("--device-user", metavar="ID", type=name_type("device"),
                        help="a device's user name (its device id)")
    device.add_argument("--device-password-file", metavar="FILE", help="file holding that device's password")
    device.add_argument("--device-broker", metavar="URL",
                        help="the device listener, when devices connect elsewhere (default: --broker)")
    add_json(c)
    add_broker_args(c)
    c.set_defaults(func=run_broker_check)


def _device_login(args: argparse.Namespace, host: MqttSettings) -> DeviceLogin | None:
    """The device credential of the ACL rows, on --device-broker or else on the node `host` checks."""
    if args.device_user is None:
        if args.device_password_file is not None or args.device_broker is not None:
            raise UsageError("--device-password-file and --device-broker need --device-user")
        return None
    password = secret_option("--device-password-file", args.device_password_file)
    url = args.device_broker or host.url
    problem = check_broker_url(url)
    if problem:
        raise UsageError(f"--device-broker: {problem}")
    settings = dataclasses.replace(host, url=url, fallback_urls=(), username=args.device_user, password=password,
                                   cert_file=None, key_file=None, client_id=args.device_user)
    return DeviceLogin(args.device_user, settings)


def report_table(report: Report) -> Table:
    """The verdict table: one row per property."""
    table = Table(show_lines=False)
    for col in ("check", "verdict", "measured", "what it means for edgefleet"):
        table.add_column(col)
    style = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
    for f in report.findings:
        table.add_row(Text(f.check), Text(f.verdict, style=style[f.verdict]), Text(f.value), Text(f.meaning))
    return table


def run_broker_check(args: argparse.Namespace) -> int:
    """edgectl broker check: every --broker url (each node of a cluster) in turn, one report each."""
    if args.timeout <= 0:
        raise UsageError(f"--timeout: expected seconds > 0, got {args.timeout:g}")
    topics = topics_from_args(args)
    settings = settings_from_args(args)
    nodes = [dataclasses.replace(settings, url=url, fallback_urls=()) for url in settings.urls]
    logins = [_device_login(args, node) for node in nodes]
    restart: Literal["before", "after"] | None = \
        "before" if args.before_restart else "after" if args.after_restart else None
    # A broker that never answers a CONNECT of one version must not hold the check for the long default.
    opener = transport_opener(topics, args.timeout, min(args.connect_timeout, args.timeout))
    reports = []
    with quiet_transport():
        for i, (node, device) in enumerate(zip(nodes, logins, strict=True)):
            # a cluster shares its retained messages: the marker is cleared once every node was asked
            checker = Checker(node, topics, opener, timeout=args.timeout, device=device, restart=restart,
                              clear_marker=i == len(nodes) - 1)
            reports.append(checker.check())
    ok = all(r.ok for r in reports)
    if args.json:
        print_json(reports[0].to_dict() if len(reports) == 1 else
                   {"ok": ok, "brokers": [r.to_dict() for r in reports]})
        return ExitCode.OK if ok else ExitCode.FAILURE
    out = stdout_console()
    for report in reports:
        out.print(report_table(report))
        failed = [f.check for f in report.findings if f.verdict == "fail"]
        verdict = f"fails {', '.join(failed)}" if failed else "has what edgefleet needs"
        out.print(Text(f"broker {report.broker} (checked with MQTT {report.protocol}) {verdict}"))
        for topic in report.leftovers:
            out.print(Text(f"warning: could not clear the retained probe {topic}; clear it by hand"))
    return ExitCode.OK if ok else ExitCode.FAILURE
