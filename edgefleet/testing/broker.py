"""Throwaway Mosquitto brokers: each on a free port with its own config and store in a directory.

Variants: plain (anonymous, persistent) and TLS (server authentication or mutual, with certificates
from a throwaway CA made here with `cryptography`); `client()` and `Inbox` are the other end. A broker
is a `servers.ServerProcess`: killed when its owner says so and, failing that, at interpreter exit.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import queue
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.testing.servers import ServerProcess, free_port
from edgefleet.transport import Message, MqttSettings, Transport

# free_port lives in servers.py (the launchers of the other engines use it too); it stays importable here
__all__ = ["LIMITS", "MOSQUITTO", "MOSQUITTO_PASSWD", "Inbox", "Mosquitto", "Pki", "client", "free_port",
           "tls_broker_for", "write_password_file"]

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"

# The shipped config's limits (deploy/mosquitto/mosquitto.conf): chunks up to a few MiB, thousands of
# them retained and sent in bursts when a device subscribes.
LIMITS = """\
max_packet_size 8388608
max_inflight_messages 20
max_queued_messages 20000
max_queued_bytes 536870912
"""


class Mosquitto(ServerProcess):
    """One Mosquitto process with a config written into `workdir`; restarts keep the port and the store."""

    kind = "mosquitto"

    def __init__(self, workdir: Path, *, listener: str = "", general: str = "", tls: bool = False,
                 persistence: bool = True, anonymous: bool = True, port: int | None = None) -> None:
        super().__init__(workdir)  # the log file, mosquitto.log, is also the one its config logs to
        self.port = port or free_port()
        self.tls = tls
        self.conf = workdir / "mosquitto.conf"
        store = workdir / "store"
        store.mkdir(exist_ok=True)
        lines = [
            "user root" if os.geteuid() == 0 else "",  # stay root: the temp dir belongs to us
            f"allow_anonymous {'true' if anonymous else 'false'}",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {store}/",
            f"log_dest file {self.log_file}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "connection_messages true",
            LIMITS,
            general,
            f"listener {self.port} 127.0.0.1",
            listener,
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        """The broker's url for MqttSettings / --broker."""
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [MOSQUITTO, "-c", str(self.conf)]

    def ready(self) -> bool:
        # a TCP connect, not an MQTT one: the listener may want TLS and client certificates
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False


# ---------------------------------------------------------------------- certificates


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


@dataclass(frozen=True)
class Pki:
    """A test CA and the ability to issue server and client certificates from it."""

    directory: Path
    ca_cert: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey

    @property
    def ca_file(self) -> Path:
        """PEM file of the CA certificate."""
        return self.directory / "ca.pem"

    @classmethod
    def create(cls, directory: Path, name: str = "edgefleet test CA") -> Pki:
        """A fresh self-signed CA in `directory`."""
        directory.mkdir(parents=True, exist_ok=True)
        key = _key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        pki = cls(directory, cert, key)
        pki.ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return pki

    def issue(self, name: str, *, server: bool,
              names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> tuple[Path, Path]:
        """Issue a certificate (server: for `names`, DNS names and IP addresses); return (cert file, key file)."""
        key = _key()
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.ca_key.public_key()),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_file = self.directory / f"{name}.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_file, _write_key(self.directory / f"{name}.key", key)


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def tls_broker_for(workdir: Path, pki: Pki, *, mutual: bool,
                   names: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Mosquitto:
    """A TLS broker with a server certificate from `pki` for `names`; `mutual` requires client certificates too."""
    cert, key = pki.issue("broker", server=True, names=names)
    listener = "\n".join([
        f"cafile {pki.ca_file}", f"certfile {cert}", f"keyfile {key}",
        f"require_certificate {'true' if mutual else 'false'}",
    ])
    return Mosquitto(workdir, listener=listener, tls=True)


# ---------------------------------------------------------------------- password files


def write_password_file(path: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file (hashed by mosquitto_passwd) for these users."""
    path.write_text("")
    for user, password in users.items():
        subprocess.run([MOSQUITTO_PASSWD, "-b", str(path), user, password], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------------- clients


class Inbox:
    """An on_message target that collects messages and waits for the one a test expects."""

    def __init__(self) -> None:
        self.messages: queue.Queue[Message] = queue.Queue()
        self.seen: list[Message] = []

    def __call__(self, message: Message) -> None:
        self.messages.put(message)

    def wait_for(self, predicate: Callable[[Message], bool], timeout: float = 5.0) -> Message:
        """The first message (already seen or arriving within `timeout`) matching `predicate`."""
        for m in self.seen:
            if predicate(m):
                return m
        deadline = time.monotonic() + timeout
        while True:
            try:
                m = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no matching message within {timeout} s; saw {[x.topic for x in self.seen]}") from None
            self.seen.append(m)
            if predicate(m):
                return m

    def topic(self, topic: str, timeout: float = 5.0) -> Message:
        """The first message on `topic`."""
        return self.wait_for(lambda m: m.topic == topic, timeout)

    def quiet(self, seconds: float) -> list[Message]:
        """Everything that arrives within `seconds` (used to show that something does NOT arrive)."""
        deadline = time.monotonic() + seconds
        got = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                m = self.messages.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(m)
            got.append(m)
        return got


def client(url: str, inbox: Callable[[Message], None] | None = None, **settings: Any) -> Transport:
    """A started, connected Transport to `url` (AssertionError when it cannot connect)."""
    t = Transport(MqttSettings(url=url, reconnect_min_s=0.1, reconnect_max_s=1.0, **settings),
                  on_message=inbox or (lambda m: None))
    t.start()
    if not t.wait_connected(10):
        t.stop()
        raise AssertionError(f"cannot connect to {url}: {t.last_error}")
    return t
