"""Broker options shared by every `edgectl` command that talks to MQTT, and the connection they open."""

from __future__ import annotations

import argparse
import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from edgefleet.converter.fleet.profiles import (
    BY_NAME,
    DEFAULT_CONNECT_TIMEOUT_S,
    PROTOCOLS,
    add_profile_arg,
    resolve,
)
from edgefleet.credentials import read_secret
from edgefleet.errors import ConfigError, UsageError
from edgefleet.protocol import DEFAULT_PREFIX, Topics
from edgefleet.protocol.topics import check_prefix
from edgefleet.transport import Message, MqttSettings, Transport, check_broker_url

ENV_BROKER = BY_NAME["broker"].env

log = logging.getLogger(__name__)


def add_broker_args(parser: argparse.ArgumentParser) -> None:
    """Add --profile, --broker, TLS and credential options, --prefix and --connect-timeout to a command.

    Each option left out is taken from its environment variable, then from the connection profile
    (converter/fleet/profiles.py); `edgectl` resolves them right after parsing."""
    g = parser.add_argument_group("broker (each option also from its variable, then the profile)")
    add_profile_arg(g)
    g.add_argument("--broker", metavar="URL", action="append",
                   help=f"mqtt://host[:port] or mqtts://host[:port]; repeat it for the nodes of a cluster, tried in "
                        f"turn (env ${ENV_BROKER}, a comma-separated list; no default)")
    g.add_argument("--ca", metavar="FILE", help="CA certificate(s) that verify the broker (mqtts://; default: system "
                                                "CAs; env EDGEFLEET_CA)")
    g.add_argument("--cert", metavar="FILE", help="client certificate for mutual TLS (env EDGEFLEET_CERT)")
    g.add_argument("--key-file", metavar="FILE", help="private key of --cert (env EDGEFLEET_KEY_FILE)")
    g.add_argument("--username", metavar="NAME", help="broker user name (the shipped ACL: edgefleet-operator; env "
                                                      "EDGEFLEET_USERNAME)")
    g.add_argument("--password-file", metavar="FILE",
                   help="file holding the broker password (relative names: $CREDENTIALS_DIRECTORY first; env "
                        "EDGEFLEET_PASSWORD_FILE)")
    g.add_argument("--prefix", help=f"topic prefix (default {DEFAULT_PREFIX}; env EDGEFLEET_PREFIX)")
    g.add_argument("--mqtt-protocol", choices=list(PROTOCOLS),
                   help="MQTT version (default auto: 5, falling back to 3.1.1 when the broker refuses 5; "
                        "env EDGEFLEET_MQTT_PROTOCOL)")
    g.add_argument("--connect-timeout", type=float, metavar="S",
                   help=f"give up when the broker does not answer within S seconds (default "
                        f"{DEFAULT_CONNECT_TIMEOUT_S:g}; env EDGEFLEET_CONNECT_TIMEOUT)")
    parser.set_defaults(resolve_settings=resolve)


def add_key_arg(parser: argparse.ArgumentParser, help: str, *, required: bool = False) -> None:
    """--key, the operator's signing key (env EDGEFLEET_KEY, or key in the profile); `required` is checked
    once the profile is read, so a profile's key is enough."""
    parser.add_argument("--key", metavar="KEY", help=f"{help} (env EDGEFLEET_KEY, or key in the profile)")
    if required:
        parser.set_defaults(key_required=True)


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
    """The broker urls of --broker (repeated), else of $EDGEFLEET_BROKER (comma-separated), else of the
    profile; UsageError naming the first that is wrong, or saying what to configure when none is."""
    effective = resolve(args)
    given: str | list[str] | None = effective.value("broker")
    source = effective.values.get("broker", (None, "--broker"))[1]
    if not given:
        raise UsageError(f"no broker: give --broker URL, set ${ENV_BROKER}, or add a profile to {effective.file} "
                         "(see 'edgectl profile --help')")
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
    resolve(args)
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
    with _quiet_transport() as held:
        transport.start()
        # the first failure of every url ends the command: the reconnects would only repeat it
        connected = transport.wait_connected(args.connect_timeout, until_failed=True)
    if not connected:
        tried = " or ".join(settings.urls)
        why = transport.last_error or f"cannot connect to {tried}: no answer within {args.connect_timeout:g} s"
        transport.stop(timeout=2)
        raise UsageError(why)
    failures = [r.getMessage() for r in held if r.levelno >= logging.ERROR]
    for record in held:
        if record.levelno < logging.ERROR:
            logging.getLogger(record.name).handle(record)
    if failures:  # a node of a cluster failed before another took the connection: say so, once
        log.warning("%s; connected to %s", failures[-1], transport.url)
    return transport


class _Held(logging.Handler):
    def __init__(self, held: list[logging.LogRecord]) -> None:
        super().__init__(logging.WARNING)
        self.held = held

    def emit(self, record: logging.LogRecord) -> None:
        self.held.append(record)


@contextmanager
def _quiet_transport() -> Iterator[list[logging.LogRecord]]:
    """Hold the transport's warnings and errors while connecting: the failure that ends the command is
    printed once, as its error line. With -v (INFO and below) they go out as they come."""
    held: list[logging.LogRecord] = []
    logger = logging.getLogger("edgefleet.transport")
    if logging.getLogger().isEnabledFor(logging.INFO):
        yield held
        return
    handler = _Held(held)
    logger.addHandler(handler)
    before = logger.propagate
    logger.propagate = False
    try:
        yield held
    finally:
        logger.removeHandler(handler)
        logger.propagate = before
