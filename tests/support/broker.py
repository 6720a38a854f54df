"""Real Mosquitto brokers for the tests: each on a free port with its own config in a temp directory.

Variants: plain (anonymous, persistent), TLS (server-auth or mutual, certificates made here with
`cryptography`) and the shipped `deploy/mosquitto` config itself (device and operator listeners, their
password files and ACLs), with or without its TLS. Every process started
here is killed at teardown and, failing that, at interpreter exit.
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.protocol import SigningKey
from edgefleet.transport import Message, MqttSettings, Transport

# The fixtures (tests/conftest.py loads this module as a pytest plugin); helpers are imported by name.
__all__ = ["acl_broker", "broker", "edgectl", "key", "key_dir", "mtls_broker", "pki", "tls_broker"]

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_ACL = ROOT / "deploy" / "mosquitto" / "acl"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
OPERATOR = "edgefleet-operator"

# The shipped config's limits (deploy/mosquitto/mosquitto.conf): chunks up to a few MiB, thousands of
# them retained and sent in bursts when a device subscribes.
LIMITS = """\
max_packet_size 8388608
max_inflight_messages 20
max_queued_messages 20000
max_queued_bytes 536870912
"""

_running: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_running):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """One Mosquitto process with a config written into `workdir`; restarts keep the port and the store."""

    def __init__(self, workdir: Path, *, listener: str = "", general: str = "", tls: bool = False,
                 persistence: bool = True, anonymous: bool = True, port: int | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.tls = tls
        self.conf = workdir / "mosquitto.conf"
        self.log_file = workdir / "mosquitto.log"
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
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The broker's url for MqttSettings / --broker."""
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def log(self) -> str:
        """What the broker logged so far."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def start(self, timeout: float = 10.0) -> Mosquitto:
        """Start the process and wait until the port accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("broker already running")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        _running.add(self.proc)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err}\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"mosquitto did not listen on {self.port}:\n{self.log()}") from None
                time.sleep(0.02)

    def _wait(self, timeout: float) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _running.discard(self.proc)
        if self.proc.stderr:
            self.proc.stderr.close()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (the broker saves its store), escalating to SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.resume()
        self.proc.terminate()
        self._wait(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash; whatever the store had not saved is lost."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.kill()
        self._wait(5.0)

    def restart(self) -> None:
        """Stop and start again on the same port with the same store."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the broker holds its sockets but answers nothing."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


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

    def issue(self, name: str, *, server: bool) -> tuple[Path, Path]:
        """Issue a certificate (server: for 127.0.0.1 and localhost); return (cert file, key file)."""
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
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        cert_file = self.directory / f"{name}.pem"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_file, _write_key(self.directory / f"{name}.key", key)


def tls_broker_for(workdir: Path, pki: Pki, *, mutual: bool) -> Mosquitto:
    """A TLS broker with a server certificate from `pki`; `mutual` requires client certificates too."""
    cert, key = pki.issue("broker", server=True)
    listener = "\n".join([
        f"cafile {pki.ca_file}", f"certfile {cert}", f"keyfile {key}",
        f"require_certificate {'true' if mutual else 'false'}",
    ])
    return Mosquitto(workdir, listener=listener, tls=True)


# ---------------------------------------------------------------------- password + ACL: the shipped config


def write_password_file(path: Path, users: dict[str, str]) -> Path:
    """A Mosquitto password file (hashed by mosquitto_passwd) for these users."""
    path.write_text("")
    for user, password in users.items():
        subprocess.run([MOSQUITTO_PASSWD, "-b", str(path), user, password], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)
    path.chmod(0o600)
    return path


SHIPPED_DIR = ROOT / "deploy" / "mosquitto"
SHIPPED_CONF = SHIPPED_DIR / "mosquitto.conf"
SHIPPED_OPERATOR_ACL = SHIPPED_DIR / "operator-acl"
SHIPPED_ETC = "/etc/mosquitto/edgefleet/"
DEVICE_LISTENER = "listener 8883\n"
OPERATOR_LISTENER = "listener 8884\n"
# The device listener's commented-out mutual TLS switches (the operator listener has its own).
DEVICE_MTLS = "#require_certificate true\n#use_identity_as_username true\n"
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


def _shipped(workdir: Path, *, pki: Pki | None, mutual: bool, devices: tuple[str, ...],
             operators: tuple[str, ...]) -> AclBroker:
    """deploy/mosquitto as shipped; only paths, ports and the switches asked for change.

    Without `pki` the TLS lines are dropped (both listeners speak plain MQTT); everything about
    identities (per-listener users, ACLs, client id binding) stays exactly as shipped."""
    workdir.mkdir(parents=True, exist_ok=True)
    etc = workdir / "etc"
    etc.mkdir(exist_ok=True)
    shutil.copy(SHIPPED_ACL, etc / "acl")
    shutil.copy(SHIPPED_OPERATOR_ACL, etc / "operator-acl")
    if pki is not None:
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
    replacements = {
        SHIPPED_ETC: f"{etc}/",
        "persistence_location /var/lib/mosquitto/": f"persistence_location {workdir / 'store'}/",
        "log_dest syslog": f"log_dest file {b.log_file}",
        DEVICE_LISTENER: f"listener {b.port} 127.0.0.1\n",
        OPERATOR_LISTENER: f"listener {operator_port} 127.0.0.1\n",
    }
    if mutual:
        replacements[DEVICE_MTLS] = DEVICE_MTLS.replace("#", "")
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


def shipped_broker_for(workdir: Path, pki: Pki, *, mutual: bool = False,
                       devices: tuple[str, ...] = ("dev-a", "dev-b"),
                       operators: tuple[str, ...] = (OPERATOR,)) -> AclBroker:
    """deploy/mosquitto/mosquitto.conf as shipped, TLS included; `mutual` uncomments the device listener's
    certificate switches (require_certificate + use_identity_as_username: the CN is the device's identity)."""
    return _shipped(workdir, pki=pki, mutual=mutual, devices=devices, operators=operators)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A fresh plain broker (anonymous, persistent) for one test."""
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    try:
        yield b.start()
    finally:
        b.kill()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA shared by the session."""
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mosquitto]:
    """A TLS broker (server authentication only)."""
    b = tls_broker_for(tmp_path_factory.mktemp("mosquitto-tls"), pki, mutual=False)
    try:
        yield b.start()
    finally:
        b.kill()


@pytest.fixture
def mtls_broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mosquitto]:
    """A TLS broker that requires a client certificate from the test CA."""
    b = tls_broker_for(tmp_path_factory.mktemp("mosquitto-mtls"), pki, mutual=True)
    try:
        yield b.start()
    finally:
        b.kill()


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclBroker]:
    """The shipped broker config without TLS (device and operator listeners), shared by a test module."""
    b = acl_broker_for(tmp_path_factory.mktemp("mosquitto-acl"))
    try:
        b.broker.start()
        yield b
    finally:
        b.broker.kill()


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
    """A started, connected Transport to `url` (fails the test when it cannot connect)."""
    t = Transport(MqttSettings(url=url, reconnect_min_s=0.1, reconnect_max_s=1.0, **settings),
                  on_message=inbox or (lambda m: None))
    t.start()
    if not t.wait_connected(10):
        t.stop()
        raise AssertionError(f"cannot connect to {url}: {t.last_error}")
    return t


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
