"""deploy/mosquitto as an operator installs it: `make-certs` issues the CA, broker, operator and device
certificates, the shipped config runs with them from the directory it is installed in, and the systemd
drop-in agrees with the config on that directory and on the store."""

from __future__ import annotations

import ipaddress
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.protocol import Topics
from edgefleet.testing.broker import client
from edgefleet.transport import MqttSettings, Transport
from tests.support.broker import OPERATOR, SHIPPED_CONF, SHIPPED_DIR, SHIPPED_STORE, shipped_broker_for

MAKE_CERTS = SHIPPED_DIR / "make-certs"
DROP_IN = SHIPPED_DIR / "mosquitto.service.d" / "edgefleet.conf"
SHELLCHECK = Path(sys.executable).parent / "shellcheck"
T = Topics()


def make_certs(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MAKE_CERTS), *map(str, args)], capture_output=True, text=True, timeout=120)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs") / "site"
    res = make_certs("-d", out, "-s", "localhost", "-s", "127.0.0.1", "-s", "DNS:broker.example.net",
                     "-o", "alice", "cam-1", "cam-2")
    assert res.returncode == 0, res.stderr
    return out


def test_make_certs_is_shellcheck_clean() -> None:
    res = subprocess.run([str(SHELLCHECK), str(MAKE_CERTS)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout


def test_every_certificate_chains_to_the_ca_with_its_names_and_uses(certs: Path) -> None:
    issued = ["server", "alice", "cam-1", "cam-2"]
    res = subprocess.run(["openssl", "verify", "-CAfile", str(certs / "ca.pem"),
                          *(str(certs / f"{n}.pem") for n in issued)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and res.stdout.count(": OK") == 4, res.stdout + res.stderr
    ca = load(certs / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = load(certs / "server.pem")
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "broker.example.net"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    operator = load(certs / "alice.pem")
    # a colon no device id has: the operator's certificate is never a device identity on 8883
    assert (cn(operator), eku(operator)) == ("operator:alice", [ExtendedKeyUsageOID.CLIENT_AUTH])
    for device in ("cam-1", "cam-2"):
        cert = load(certs / f"{device}.pem")
        cert.verify_directly_issued_by(ca)
        assert (cn(cert), eku(cert)) == (device, [ExtendedKeyUsageOID.CLIENT_AUTH])
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in certs.glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_devices_are_added_later_with_the_same_ca_and_nothing_is_replaced(tmp_path: Path) -> None:
    site = tmp_path / "site"
    assert make_certs("-d", site, "-s", "broker.example.net", "cam-1").returncode == 0
    before = {p.name: p.read_bytes() for p in site.iterdir()}
    res = make_certs("-d", site, "-s", "other.example.net", "cam-1", "cam-9")
    assert res.returncode == 0, res.stderr
    assert "server.pem: exists, kept" in res.stdout and "cam-1.pem: exists, kept" in res.stdout
    assert all((site / name).read_bytes() == data for name, data in before.items() if name != "ca.srl")
    load(site / "cam-9.pem").verify_directly_issued_by(load(site / "ca.pem"))


@pytest.mark.parametrize("args, said", [
    (("cam/1",), "cam/1: a name is 1-64 letters, digits, '_', '.' or '-'"),
    (("-o", "op#1"), "op#1: a name is 1-64 letters, digits, '_', '.' or '-'"),
    (("-D", "soon", "cam-1"), "-D soon: not a number of days"),
])
def test_bad_names_are_refused_before_anything_is_written(tmp_path: Path, args: tuple[str, ...], said: str) -> None:
    res = make_certs("-d", tmp_path / "site", *args)
    assert (res.returncode, res.stderr) == (2, f"make-certs: error: {said}\n")
    assert not (tmp_path / "site").exists()


def test_the_shipped_broker_runs_on_these_certificates_with_client_certificates_on_both_listeners(
        tmp_path: Path, certs: Path) -> None:
    shipped = shipped_broker_for(tmp_path / "broker", certs, mutual=True, devices=("cam-1", "cam-2"),
                                 operator_certificate=True)
    ca = certs / "ca.pem"
    with shipped.broker:
        dev = client(shipped.url, ca_file=ca, cert_file=certs / "cam-1.pem", key_file=certs / "cam-1.key")
        dev.publish(T.status("cam-1"), b"online", retain=True, wait=5)
        dev.stop()
        op = client(shipped.operator_url, ca_file=ca, cert_file=certs / "alice.pem", key_file=certs / "alice.key",
                    **shipped.operator_login())
        op.stop()
        assert "Error" not in shipped.broker.log()
        # with require_certificate on the operator listener, a password alone no longer gets in
        alone = Transport(MqttSettings(url=shipped.operator_url, ca_file=ca, reconnect_min_s=0.2,
                                       reconnect_max_s=0.4, username=OPERATOR,
                                       password=shipped.passwords[OPERATOR]), on_message=lambda m: None)
        alone.start()
        try:
            assert not alone.wait_connected(1)
            assert alone.last_error is not None and "certificate required" in alone.last_error, alone.last_error
        finally:
            alone.stop()


def test_the_drop_in_runs_the_config_from_its_directory_with_its_own_store() -> None:
    conf = SHIPPED_CONF.read_text()
    drop_in = DROP_IN.read_text()
    (workdir,) = re.findall(r"^WorkingDirectory=(\S+)$", drop_in, re.M)
    assert re.findall(r"^ExecStart=(.*)$", drop_in, re.M) == ["", f"/usr/sbin/mosquitto -c {workdir}/mosquitto.conf"]
    store = SHIPPED_STORE.split()[1].rstrip("/")
    assert SHIPPED_STORE in conf.splitlines() and store != "/var/lib/mosquitto"
    assert f"ExecStartPre=/bin/mkdir -m 0700 -p {store}" in drop_in
    assert f"ExecStartPre=/bin/chown mosquitto:mosquitto {store}" in drop_in
    # every file the config names is relative: resolved in the drop-in's WorkingDirectory
    named = re.findall(r"^\s*(?:cafile|certfile|keyfile|password_file|acl_file)\s+(\S+)", conf, re.M)
    assert len(named) == 10 and not [n for n in named if n.startswith("/")], named
    assert f"cd {workdir} && mosquitto -c mosquitto.conf" in conf
