"""Failing closed: an agent that could not verify what it receives does not start, and one told to run
insecure says so everywhere an operator looks.

Real `edge-agent run` processes against a real Mosquitto, and the real `edge-agent check-config` on
one configuration per problem: each is refused with its one line and exit 2, and each insecure
combination is accepted only with `security.insecure = true`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgefleet.protocol import SigningKey, Topics, parse_json
from edgefleet.protocol.documents import Status, Telemetry
from edgefleet.testing.agentproc import AgentProcess, toml
from edgefleet.testing.broker import Inbox, Mosquitto, Pki, client
from tests.support import ROOT

ERROR = "edge-agent: error: "


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A fresh fleet key pair in tmp_path/keys (edgefleet.key, edgefleet.pub)."""
    SigningKey.generate().write(tmp_path / "keys")
    return tmp_path / "keys"


def check(tmp_path: Path, config: dict[str, Any], env: dict[str, str] | None = None,
          command: str = "check-config") -> subprocess.CompletedProcess[str]:
    """`edge-agent check-config` (or `run`) on this configuration."""
    path = tmp_path / "agent.toml"
    config = {"device_id": "dev-1", "state_dir": str(tmp_path / "state"), **config}
    config.setdefault("api", {}).setdefault("socket", str(tmp_path / "api.sock"))
    path.write_text(toml(config))
    environ = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgefleet.agent.cli", "--config", str(path), command],
                          capture_output=True, text=True, cwd=ROOT, env=environ, timeout=60)


def errors(res: subprocess.CompletedProcess[str]) -> list[str]:
    """The problem lines of a refused configuration (exit 2, nothing on stdout)."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert res.stdout == "", res.stdout
    lines = res.stderr.splitlines()
    assert lines and all(line.startswith(ERROR) for line in lines), res.stderr
    return [line.removeprefix(ERROR) for line in lines]


def one_error(res: subprocess.CompletedProcess[str]) -> str:
    lines = errors(res)
    assert len(lines) == 1, lines
    return lines[0]


# --- the daemon refuses to start open ---------------------------------------------------------------


def test_agent_with_mqtt_and_no_key_refuses_to_start(broker: Mosquitto, tmp_path: Path) -> None:
    inbox = Inbox()
    watcher = client(broker.url, inbox)
    watcher.subscribe(f"{Topics().prefix}/#", wait=10)
    a = AgentProcess(tmp_path / "a", mqtt={"url": broker.url}, security={"insecure": False})
    try:
        a.start(wait=False)
        code = a.wait_exit(30)
        assert code == 2, a.log()  # the unit's RestartPreventExitStatus: one failed start, no loop
        lines = [line for line in a.log().splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"{ERROR}security.trusted_keys: no trusted key"), lines
        assert "mqtt.url" in lines[0] and "security.insecure = true" in lines[0] and "edgectl keygen" in lines[0]
        # it never listened and never reached the broker
        assert not a.socket.exists()
        assert not (a.state_dir / "state.json").exists()
        assert inbox.quiet(1.0) == []
    finally:
        a.kill()
        watcher.stop()


def test_agent_with_only_the_api_and_no_key_refuses_to_start(tmp_path: Path) -> None:
    """The local API installs bundles too: it alone is enough to need a key."""
    a = AgentProcess(tmp_path / "a", security={"insecure": False})
    try:
        a.start(wait=False)
        assert a.wait_exit(30) == 2
        assert a.log().strip().startswith(f"{ERROR}security.trusted_keys: no trusted key, so any bundle that "
                                          f"reaches api.socket or api.admin_socket would install unsigned"), a.log()
    finally:
        a.kill()


def test_insecure_agent_says_so_in_status_telemetry_metrics_and_cli(broker: Mosquitto, tmp_path: Path) -> None:
    t = Topics()
    inbox = Inbox()
    watcher = client(broker.url, inbox)
    watcher.subscribe([t.status("dev-1"), t.telemetry("dev-1")], wait=10)
    a = AgentProcess(tmp_path / "a", mqtt={"url": broker.url}, telemetry={"interval_s": 0.5},
                     security={"insecure": True})
    try:
        a.start()
        status = Status.from_dict(parse_json(inbox.wait_for(
            lambda m: m.topic == t.status("dev-1") and b'"online"' in m.payload, 15).payload))
        assert status.status == "online" and status.insecure is True
        telemetry = Telemetry.from_dict(parse_json(inbox.topic(t.telemetry("dev-1"), 15).payload))
        assert telemetry.insecure is True
        metrics = a.client.metrics()
        assert re.search(r'^edgefleet_insecure\{device="dev-1"\} 1$', metrics, re.M), metrics
        assert a.client.health()["agent"]["insecure"] is True
        assert re.search(r"^WARNING edgefleet\.agent\.daemon: INSECURE: security\.insecure = true \(no trusted key\)",
                         a.log(), re.M), a.log()
        res = a.cli("status")
        assert res.returncode == 0 and "INSECURE" in res.stdout, res.stdout + res.stderr
        assert a.status()["insecure"] is True
    finally:
        a.stop()
        watcher.stop()


def test_secure_agent_reports_as_before(broker: Mosquitto, keys: Path, tmp_path: Path) -> None:
    """With a key the agent starts, and its status and telemetry carry no `insecure` field at all, so
    hosts that predate it (their reader refuses unknown fields) read them as before."""
    t = Topics()
    inbox = Inbox()
    watcher = client(broker.url, inbox)
    watcher.subscribe([t.status("dev-1"), t.telemetry("dev-1")], wait=10)
    a = AgentProcess(tmp_path / "a", mqtt={"url": broker.url}, telemetry={"interval_s": 0.5},
                     security={"trusted_keys": [str(keys / "edgefleet.pub")]})
    try:
        a.start()
        status = inbox.wait_for(lambda m: m.topic == t.status("dev-1") and b'"online"' in m.payload, 15)
        assert b"insecure" not in status.payload
        assert b"insecure" not in inbox.topic(t.telemetry("dev-1"), 15).payload
        assert re.search(r'^edgefleet_insecure\{device="dev-1"\} 0$', a.client.metrics(), re.M)
        assert "INSECURE" not in a.log() and "INSECURE" not in a.cli("status").stdout
        assert a.status()["insecure"] is False
    finally:
        a.stop()
        watcher.stop()


# --- check-config: every file loaded, every insecure combination named ----------------------------------


def _mismatched_pair(pki: Pki) -> tuple[Path, Path]:
    # names of their own: the session's CA directory is shared with the broker tests
    cert, _ = pki.issue("trust-config-a", server=False)
    _, other_key = pki.issue("trust-config-b", server=False)
    return cert, other_key


def test_private_key_listed_as_trusted(keys: Path, tmp_path: Path) -> None:
    private = keys / "edgefleet.key"
    line = one_error(check(tmp_path, {"security": {"trusted_keys": [str(private)]}}))
    assert line == f"security.trusted_keys[0]: {private} is a private key; list its public key (.pub)"


def test_missing_trusted_key_file(keys: Path, tmp_path: Path) -> None:
    missing = keys / "fleet-2027.pub"
    res = check(tmp_path, {"security": {"trusted_keys": [str(keys / "edgefleet.pub"), str(missing)]}})
    assert one_error(res) == f"security.trusted_keys[1]: {missing}: no such file"


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty"),
    (b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ1 ops@host\n", "is not a PEM public key"),
    (None, "is not an Ed25519 public key"),
])
def test_trusted_key_that_is_not_an_ed25519_public_key(content: bytes | None, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "fleet.pub"
    path.write_bytes(content if content is not None else ec.generate_private_key(ec.SECP256R1()).public_key()
                     .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    line = one_error(check(tmp_path, {"security": {"trusted_keys": [str(path)]}}))
    assert line.startswith(f"security.trusted_keys[0]: {path} {expected}"), line


def test_missing_and_garbage_ca_file(keys: Path, tmp_path: Path) -> None:
    trusted = {"trusted_keys": [str(keys / "edgefleet.pub")]}
    missing = tmp_path / "ca.pem"
    res = check(tmp_path, {"mqtt": {"url": "mqtts://broker.example.com", "ca_file": str(missing)}, "security": trusted})
    assert one_error(res) == f"mqtt.ca_file: {missing}: no such file"
    missing.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n")
    res = check(tmp_path, {"mqtt": {"url": "mqtts://broker.example.com", "ca_file": str(missing)}, "security": trusted})
    assert one_error(res) == f"mqtt.ca_file: {missing} holds no PEM certificate"


def test_client_certificate_and_key_must_match(pki: Pki, keys: Path, tmp_path: Path) -> None:
    cert, other_key = _mismatched_pair(pki)
    config: dict[str, Any] = {
        "mqtt": {"url": "mqtts://broker.example.com", "ca_file": str(pki.ca_file), "cert_file": str(cert),
                 "key_file": str(other_key)},
        "security": {"trusted_keys": [str(keys / "edgefleet.pub")]}}
    assert one_error(check(tmp_path, config)) == f"mqtt.key_file: {other_key} does not match the certificate {cert}"
    config["mqtt"]["key_file"] = str(cert)  # a certificate where the key belongs
    assert one_error(check(tmp_path, config)) == f"mqtt.key_file: {cert} is not a PEM private key"


def test_plain_mqtt_with_a_password_to_another_host(keys: Path, tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    config: dict[str, Any] = {"mqtt": {"url": "mqtt://broker.example.com:1883", "username": "dev-1",
                                       "password_file": str(tmp_path / "pw")},
                              "security": {"trusted_keys": [str(keys / "edgefleet.pub")]}}
    line = one_error(check(tmp_path, config))
    assert line.startswith("mqtt.url: mqtt://broker.example.com:1883 is plain TCP to another host, so the password "
                           "in mqtt.password_file would cross the network in clear text; use mqtts://"), line
    del config["mqtt"]["password_file"]
    line = one_error(check(tmp_path, config))
    assert line.startswith("mqtt.url: mqtt://broker.example.com:1883 is plain TCP to another host"), line
    # a broker on the board itself: nothing crosses a network
    config["mqtt"].update(url="mqtt://127.0.0.1:1883", password_file=str(tmp_path / "pw"))
    ok = check(tmp_path, config)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr


def test_require_signature_false_needs_insecure(keys: Path, tmp_path: Path) -> None:
    trusted = [str(keys / "edgefleet.pub")]
    line = one_error(check(tmp_path, {"security": {"trusted_keys": trusted, "require_signature": False}}))
    assert line == ("security.require_signature: false is accepted only with security.insecure = true "
                    "(require_signature is deprecated: set insecure = true instead)")
    ok = check(tmp_path, {"security": {"trusted_keys": trusted, "require_signature": False, "insecure": True}})
    assert ok.returncode == 0 and "INSECURE" in ok.stdout and "warning: security.insecure = true" in ok.stderr


def test_network_api_without_a_token(keys: Path, tmp_path: Path) -> None:
    trusted = {"trusted_keys": [str(keys / "edgefleet.pub")]}
    line = one_error(check(tmp_path, {"api": {"port": 8501, "host": "0.0.0.0"}, "security": trusted}))
    assert line.startswith("api.host: 0.0.0.0 puts the inference API on the network with no api.token_file"), line
    for host in ("127.0.0.1", "::1", "localhost"):
        ok = check(tmp_path, {"api": {"port": 8501, "host": host}, "security": trusted})
        assert ok.returncode == 0, (host, ok.stderr)
    token = tmp_path / "api-token"
    token.write_text("")
    config = {"api": {"port": 8501, "host": "0.0.0.0", "token_file": str(token)}, "security": trusted}
    assert one_error(check(tmp_path, config)) == f"api.token_file: {token} is empty"
    token.write_text("0123456789abcdef0123456789abcdef\n")
    ok = check(tmp_path, config)
    assert ok.returncode == 0, ok.stderr


def test_missing_and_empty_secrets(keys: Path, tmp_path: Path) -> None:
    config: dict[str, Any] = {"mqtt": {"url": "mqtts://broker.example.com", "username": "dev-1",
                                       "password_file": "mqtt-password"},
                              "security": {"trusted_keys": [str(keys / "edgefleet.pub")]}}
    line = one_error(check(tmp_path, config))  # a credential id outside the service: where it is looked up
    assert line.startswith("mqtt.password_file: mqtt-password: no such file (a relative name is a systemd credential "
                           "id, found in $CREDENTIALS_DIRECTORY, which is not set"), line
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt-password").write_text("\n")
    line = one_error(check(tmp_path, config, env={"CREDENTIALS_DIRECTORY": str(creds)}))
    assert line == f"mqtt.password_file: {creds / 'mqtt-password'} is empty"
    (creds / "mqtt-password").write_text("s3cret\n")
    assert check(tmp_path, config, env={"CREDENTIALS_DIRECTORY": str(creds)}).returncode == 0


def test_every_problem_on_its_own_line(keys: Path, tmp_path: Path) -> None:
    """Several problems: all of them, one line each, and `run` refuses on the same lines."""
    config = {"mqtt": {"url": "mqtt://10.0.0.5", "ca_file": str(tmp_path / "nope.pem")},
              "security": {"trusted_keys": [str(keys / "edgefleet.key"), str(tmp_path / "gone.pub")]},
              "api": {"port": 8501, "host": "0.0.0.0"}}
    lines = errors(check(tmp_path, config))
    assert [line.split(":")[0] for line in lines] == [
        "security.trusted_keys[0]", "security.trusted_keys[1]", "mqtt.url", "mqtt.ca_file", "api.host"], lines
    assert errors(check(tmp_path, config, command="run")) == lines
    assert not (tmp_path / "api.sock").exists()


def test_insecure_accepts_the_combinations_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    config: dict[str, Any] = {"mqtt": {"url": "mqtt://broker.example.com", "username": "dev-1",
                                       "password_file": str(tmp_path / "pw")},
              "api": {"port": 8501, "host": "0.0.0.0"}, "security": {"insecure": True}}
    res = check(tmp_path, config)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith(": ok (device dev-1), INSECURE")
    assert res.stderr.startswith("edge-agent: warning: security.insecure = true (no trusted key)")
    # files are still checked: insecure accepts what cannot be verified, not what cannot work
    config["mqtt"]["password_file"] = str(tmp_path / "missing")
    assert one_error(check(tmp_path, config)) == f"mqtt.password_file: {tmp_path / 'missing'}: no such file"


def test_good_config_passes(pki: Pki, keys: Path, tmp_path: Path) -> None:
    """mqtts with a CA, a client certificate and its key as a credential, a password as a credential."""
    cert, key = pki.issue("trust-config-good", server=False)
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "mqtt-password").write_text("s3cret\n")
    (creds / "mqtt-key").write_bytes(key.read_bytes())
    config = {"groups": ["lab"],
              "mqtt": {"url": "mqtts://broker.example.com:8883", "username": "dev-1", "password_file": "mqtt-password",
                       "ca_file": str(pki.ca_file), "cert_file": str(cert), "key_file": "mqtt-key"},
              "security": {"trusted_keys": [str(keys / "edgefleet.pub"), str(keys)]},  # a directory: its .pub
              "api": {"port": 8501}}
    res = check(tmp_path, config, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert res.stdout.strip().endswith(": ok (device dev-1)")
