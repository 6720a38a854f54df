"""Broker options shared by every `edgectl` command that talks to MQTT, and the connection they open."""

from __future__ import annotations

import argparse
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from edgefleet.credentials import read_secret
from edgefleet.errors import ConfigError, UsageError
from edgefleet.protocol import DEFAULT_PREFIX, Topics
from edgefleet.protocol.topics import check_prefix
from edgefleet.transport import Message, MqttSettings, Transport, check_broker_url

ENV_BROKER = "EDGEFLEET_BROKER"
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


def add_broker_args(parser: argparse.ArgumentParser) -> None:
    """Add --broker, TLS and credential options, --prefix and --connect-timeout to a command."""
    g = parser.add_argument_group("broker")
    g.add_argument("--broker", metavar="URL", action="append",
                   help=f"mqtt://host[:port] or mqtts://host[:port]; repeat it for the nodes of a cluster, tried in "
                        f"turn (default: ${ENV_BROKER}, a comma-separated list, or {DEFAULT_BROKER})")
    g.add_argument("--ca", metavar="FILE", help="CA certificate(s) that verify the broker (mqtts://; default: system CAs)")
    g.add_argument("--cert", metavar="FILE", help="client certificate for mutual TLS")
    g.add_argument("--key-file", metavar="FILE", help="private key of --cert")
    g.add_argument("--username", metavar="NAME", help="broker user name (the shipped ACL: edgefleet-operator)")
    g.add_argument("--password-file", metavar="FILE",
                   help="file holding the broker password (relative names: $CREDENTIALS_DIRECTORY first)")
    g.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"topic prefix (default {DEFAULT_PREFIX})")
    g.add_argument("--mqtt-protocol", choices=["auto", "5", "3.1.1"],
                   default=os.environ.get("EDGEFLEET_MQTT_PROTOCOL", "auto"),
                   help="MQTT version (default auto: 5, falling back to 3.1.1 when the broker refuses 5; "
                        "env EDGEFLEET_MQTT_PROTOCOL)")
    g.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="give up when the broker does not accept us within S seconds (default 10)")


def _existing(option: str, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(value)
    if not p.is_file():
        raise UsageError(f"{option} {p}: no such file")
    return p


def secret_option(option: str, value: str | None) -> str | None:
    """The secret in the file an option names (None when the option is not given); UsageError naming it."""
    if value is None:
        return None
    try:
        return read_secret(Path(value))
    except ConfigError as err:
        raise UsageError(f"{option}: {err}") from err


def broker_urls(args: argparse.Namespace) -> list[str]:
    """The broker urls of --broker (repeated), else of $EDGEFLEET_BROKER (comma-separated), else the default;
    UsageError naming the first that is wrong."""
    given: str | list[str] | None = getattr(args, "broker", None)
    source = "--broker"
    if given is None:
        env = os.environ.get(ENV_BROKER, "").strip()
        given, source = ([u.strip() for u in env.split(",")], f"${ENV_BROKER}") if env else ([DEFAULT_BROKER], "")
    urls = [given] if isinstance(given, str) else list(given)
    for url in urls:
        problem = check_broker_url(url)
        if problem:
            raise UsageError(f"{source}: {problem}")
    return urls


def settings_from_args(args: argparse.Namespace, client_id: str = "") -> MqttSettings:
    """MqttSettings from the broker options; UsageError naming the option that is wrong."""
    urls = broker_urls(args)
    password = secret_option("--password-file", args.password_file)
    if args.password_file is not None and args.username is None:
        raise UsageError("--password-file needs --username")
    if args.key_file is not None and args.cert is None:
        raise UsageError("--key-file needs --cert")
    try:
        return MqttSettings(
            url=urls[0], fallback_urls=tuple(urls[1:]), username=args.username, password=password,
            ca_file=_existing("--ca", args.ca), cert_file=_existing("--cert", args.cert),
            key_file=_existing("--key-file", args.key_file), client_id=client_id,
            reconnect_min_s=0.5, reconnect_max_s=5.0, protocol=getattr(args, "mqtt_protocol", "auto"),
            # an unanswered MQTT 5 CONNECT leaves time for the 3.1.1 one within --connect-timeout
            connack_timeout_s=min(max(getattr(args, "connect_timeout", 10.0), 0.2) / 2, 5.0),
        )
    except ConfigError as err:
        raise UsageError(f"--broker: {err}") from err


def topics_from_args(args: argparse.Namespace) -> Topics:
    """The Topics for --prefix."""
    problem = check_prefix(args.prefix)
    if problem:
        raise UsageError(f"--prefix: {problem}")
    return Topics(args.prefix)


def connect(args: argparse.Namespace, client_id_prefix: str = "edgectl",
            on_message: Callable[[Message], None] | None = None) -> Transport:
    """A connected Transport for the broker options; UsageError (exit 2) when unreachable or refused."""
    client_id = f"{client_id_prefix}-{uuid.uuid4().hex[:10]}"
    settings = settings_from_args(args, client_id)
    try:
        transport = Transport(settings, on_message=on_message or (lambda m: None))
    except ConfigError as err:
        raise UsageError(str(err)) from err
    transport.start()
    if not transport.wait_connected(args.connect_timeout):
        tried = " or ".join(settings.urls)
        why = transport.last_error or f"cannot connect to {tried}: no answer within {args.connect_timeout:g} s"
        transport.stop(timeout=2)
        raise UsageError(why)
    return transport
