"""The brokers' fixtures, and the shipped `deploy/mosquitto` config on a real Mosquitto.

The launchers themselves are the kit's (`edgefleet.testing.broker`: plain and TLS brokers, `client`,
`Inbox`); this module adds the shipped config (device and operator listeners, their password files
and ACLs, with or without its TLS) and wraps every kind of broker in a fixture that kills it at teardown.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgefleet.protocol import SigningKey
from edgefleet.testing.broker import Mosquitto, Pki, free_port, tls_broker_for, write_password_file

# The fixtures (tests/conftest.py loads this module as a pytest plugin); helpers are imported by name.
__all__ = ["acl_broker", "broker", "edgectl", "key", "key_dir", "mtls_broker", "pki", "tls_broker"]

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = "edgefleet-operator"
SHIPPED_ACL = ROOT / "deploy" / "mosquitto" / "acl"

# ---------------------------------------------------------------------- the shipped config


SHIPPED_DIR = ROOT / "deploy" / "mosquitto"
SHIPPED_CONF = SHIPPED_DIR / "mosquitto.conf"
SHIPPED_OPERATOR_ACL = SHIPPED_DIR / "operator-acl"
SHIPPED_STORE = "persistence_location /var/lib/mosquitto-edgefleet/"
SHIPPED_LOG = "log_dest stderr"
DEVICE_LISTENER = "listener 8883\n"
OPERATOR_LISTENER = "listener 8884\n"
# The device listener's commented-out mutual TLS switches (the operator listener has its own).
DEVICE_MTLS = "#require_certificate true\n#use_identity_as_username true\n"
OPERATOR_MTLS = "password.\n#require_certificate true\n"
TLS_OPTIONS = ("cafile ", "certfile ", "keyfile ", "tls_version ")


@dataclass
class AclBroker:
    """The shipped broker config on a real Mosquitto: the device listener (`url`: passwd + acl, client id
    bound to the user name) and the operator listener (`operator_url`: operator-passwd + operator-acl).

    `passwords` holds every user: the operators (only valid on the operator listener) and the devices
    (only valid on the device listener)."""

    broker: Mosquitto
    passwords: dict[str, str]
    operator_port: int
    operators: tuple[str, ...] = (OPERATOR,)

    @property
    def url(self) -> str:
        """The device listener's url (what agents connect to)."""
        return self.broker.url

    @property
    def operator_url(self) -> str:
        """The operator listener's url (what edgectl and other host tools connect to)."""
        return f"{'mqtts' if self.broker.tls else 'mqtt'}://127.0.0.1:{self.operator_port}"

    def operator_login(self, user: str = OPERATOR) -> dict[str, Any]:
        """Settings (for `client` / MqttSettings) that log in as an operator on the operator listener."""
        return {"username": user, "password": self.passwords[user]}

    def device_login(self, device: str) -> dict[str, Any]:
        """Settings that log in as `device` (user name = device id)."""
        return {"username": device, "password": self.passwords[device]}


def _shipped(workdir: Path, *, pki: Pki | Path | None, mutual: bool, devices: tuple[str, ...],
             operators: tuple[str, ...], operator_certificate: bool = False) -> AclBroker:
    """deploy/mosquitto as shipped, its files beside it in `workdir` (the directory Mosquitto runs in, as
    the systemd drop-in makes it); only the store, the log, the ports and the switches asked for change.

    `pki` is a test CA or a directory `make-certs` wrote (ca.pem, server.pem, server.key). Without it
    the TLS lines are dropped (both listeners speak plain MQTT); everything about identities
    (per-listener users, ACLs, client id binding) stays exactly as shipped. `operator_certificate`
    uncomments the operator listener's require_certificate."""
    workdir.mkdir(parents=True, exist_ok=True)
    etc = workdir
    shutil.copy(SHIPPED_ACL, etc / "acl")
    shutil.copy(SHIPPED_OPERATOR_ACL, etc / "operator-acl")
    if isinstance(pki, Path):
        for name in ("ca.pem", "server.pem", "server.key"):
            shutil.copy(pki / name, etc / name)
    elif pki is not None:
        shutil.copy(pki.ca_file, etc / "ca.pem")
        cert, key = pki.issue("broker", server=True)
        shutil.copy(cert, etc / "server.pem")
        shutil.copy(key, etc / "server.key")
    passwords = {name: secrets.token_urlsafe(12) for name in (*operators, *devices)}
    write_password_file(etc / "passwd", {d: passwords[d] for d in devices})
    write_password_file(etc / "operator-passwd", {o: passwords[o] for o in operators})
    b = Mosquitto(workdir, tls=pki is not None)
    operator_port = free_port()
    text = SHIPPED_CONF.read_text()
    (workdir / "store").mkdir(exist_ok=True)
    replacements = {
        SHIPPED_STORE: f"persistence_location {workdir / 'store'}/",
        SHIPPED_LOG: f"log_dest file {b.log_file}",
        DEVICE_LISTENER: f"listener {b.port} 127.0.0.1\n",
        OPERATOR_LISTENER: f"listener {operator_port} 127.0.0.1\n",
    }
    if mutual:
        replacements[DEVICE_MTLS] = DEVICE_MTLS.replace("#", "")
    if operator_certificate:
        replacements[OPERATOR_MTLS] = OPERATOR_MTLS.replace("#", "")
    for old, new in replacements.items():
        if old not in text:
            raise AssertionError(f"shipped mosquitto.conf no longer contains {old!r}")
        text = text.replace(old, new)
    if pki is None:
        text = "\n".join(line for line in text.splitlines() if not line.startswith(TLS_OPTIONS)) + "\n"
    b.conf.write_text(("user root\n" if os.geteuid() == 0 else "") + text)
    return AclBroker(b, passwords, operator_port, operators)


def acl_broker_for(workdir: Path, devices: tuple[str, ...] = ("dev-a", "dev-b"),
                   operators: tuple[str, ...] = (OPERATOR,)) -> AclBroker:
    """The shipped config without TLS (plain mqtt:// on both listeners): users, ACLs and identity binding as shipped."""
    return _shipped(workdir, pki=None, mutual=False, devices=devices, operators=operators)


def shipped_broker_for(workdir: Path, pki: Pki | Path, *, mutual: bool = False,
                       devices: tuple[str, ...] = ("dev-a", "dev-b"),
                       operators: tuple[str, ...] = (OPERATOR,), operator_certificate: bool = False) -> AclBroker:
    """deploy/mosquitto/mosquitto.conf as shipped, TLS included (a test CA, or a `make-certs` directory);
    `mutual` uncomments the device listener's certificate switches (require_certificate +
    use_identity_as_username: the CN is the device's identity), `operator_certificate` the operator
    listener's require_certificate."""
    return _shipped(workdir, pki=pki, mutual=mutual, devices=devices, operators=operators,
                    operator_certificate=operator_certificate)


# ---------------------------------------------------------------------- fixtures


def _running(b: Mosquitto) -> Iterator[Mosquitto]:
    """Start `b` for the fixture's user; SIGKILL it at teardown (a test's broker keeps nothing)."""
    try:
        yield b.start()
    finally:
        b.kill()


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A fresh plain broker (anonymous, persistent) for one test."""
    yield from _running(Mosquitto(tmp_path_factory.mktemp("mosquitto")))


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA shared by the session."""
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mosquitto]:
    """A TLS broker (server authentication only)."""
    yield from _running(tls_broker_for(tmp_path_factory.mktemp("mosquitto-tls"), pki, mutual=False))


@pytest.fixture
def mtls_broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mosquitto]:
    """A TLS broker that requires a client certificate from the test CA."""
    yield from _running(tls_broker_for(tmp_path_factory.mktemp("mosquitto-mtls"), pki, mutual=True))


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclBroker]:
    """The shipped broker config without TLS (device and operator listeners), shared by a test module."""
    b = acl_broker_for(tmp_path_factory.mktemp("mosquitto-acl"))
    try:
        b.broker.start()
        yield b
    finally:
        b.broker.kill()


# ---------------------------------------------------------------------- the host CLI against these brokers


@pytest.fixture
def edgectl(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[int, str, str]]:
    """Run `edgectl ARGS...` in-process; return (exit code, stdout, stderr) as the file descriptors saw them."""
    monkeypatch.setenv("COLUMNS", "250")

    def run(*argv: object) -> tuple[int, str, str]:
        capfd.readouterr()
        from edgefleet.converter.cli import main

        code = main([str(a) for a in argv])
        out, err = capfd.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="module")
def key() -> SigningKey:
    """The operator's signing key."""
    return SigningKey.generate()


@pytest.fixture
def key_dir(tmp_path: Path, key: SigningKey) -> Path:
    """The signing key as `edgectl keygen` writes it."""
    key.write(tmp_path / "keys")
    return tmp_path / "keys"
