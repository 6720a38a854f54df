"""What `edgectl` says when it cannot connect, measured against real Mosquitto brokers: one line naming the
cause, exit 2, within 2 s of the broker's answer; and the connection profile that makes it connect."""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.testing.broker import Mosquitto, Pki, free_port, tls_broker_for, write_password_file
from edgefleet.transport import MqttSettings, Transport

Edgectl = Callable[..., tuple[int, str, str]]
# A TEST-NET address as the broker's only name: a certificate that does not fit 127.0.0.1
ODD_NAMES = ("broker.example", "192.0.2.10")


@pytest.fixture
def password_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    workdir = tmp_path_factory.mktemp("mosquitto-pw")
    passwd = write_password_file(workdir / "passwd", {"op": "right"})
    b = Mosquitto(workdir, anonymous=False, general=f"password_file {passwd}").start()
    yield b
    b.kill()


@pytest.fixture
def odd_name_broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Mosquitto]:
    b = tls_broker_for(tmp_path_factory.mktemp("mosquitto-odd"), pki, mutual=False, names=ODD_NAMES).start()
    yield b
    b.kill()


def fails_fast(edgectl: Edgectl, *options: object) -> str:
    """Run `fleet status` with these options: exit 2 with one stderr line within 2.5 s; return that line."""
    started = time.monotonic()
    code, _, err = edgectl("fleet", "status", *options)
    took = time.monotonic() - started
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("edgectl: error: "), err
    assert took < 2.5, f"{took:.1f} s: {lines[0]}"
    return lines[0]


def test_a_closed_port_is_refused(edgectl: Edgectl) -> None:
    port = free_port()
    line = fails_fast(edgectl, "--broker", f"mqtt://127.0.0.1:{port}")
    assert f"connection refused: nothing listens on 127.0.0.1:{port}" in line


def test_a_wrong_password_is_not_authorised(edgectl: Edgectl, password_broker: Mosquitto, tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("wrong\n")
    line = fails_fast(edgectl, "--broker", password_broker.url, "--username", "op", "--password-file", tmp_path / "pw")
    assert "refused the connection: Not authorized" in line


def test_a_plain_client_on_a_tls_port_is_told_to_use_tls(edgectl: Edgectl, tls_broker: Mosquitto) -> None:
    line = fails_fast(edgectl, "--broker", f"mqtt://127.0.0.1:{tls_broker.port}")
    assert f"TLS expected: 127.0.0.1:{tls_broker.port} speaks TLS; use mqtts://127.0.0.1:{tls_broker.port}" in line


def test_a_tls_client_on_a_plain_port_is_told_to_drop_tls(edgectl: Edgectl, broker: Mosquitto, pki: Pki) -> None:
    line = fails_fast(edgectl, "--broker", f"mqtts://127.0.0.1:{broker.port}", "--ca", pki.ca_file)
    assert f"TLS not expected: 127.0.0.1:{broker.port} speaks plain MQTT; use mqtt://127.0.0.1:{broker.port}" in line


def test_a_certificate_for_other_names_says_which_would_match(edgectl: Edgectl, odd_name_broker: Mosquitto,
                                                               pki: Pki) -> None:
    line = fails_fast(edgectl, "--broker", odd_name_broker.url, "--ca", pki.ca_file)
    assert "certificate name mismatch: the broker's certificate is for broker.example, 192.0.2.10, not 127.0.0.1" in line
    assert f"connect to mqtts://broker.example:{odd_name_broker.port}" in line


def test_an_unknown_host_and_a_bad_port(edgectl: Edgectl) -> None:
    assert "unknown host no-such-host.invalid" in fails_fast(edgectl, "--broker", "mqtt://no-such-host.invalid")
    assert "the port must be a number 1-65535, got 'abc'" in fails_fast(edgectl, "--broker", "mqtt://127.0.0.1:abc")


def test_an_unreachable_network(edgectl: Edgectl) -> None:
    # the limited broadcast address has no TCP route on Linux: the kernel answers at once
    try:
        socket.create_connection(("255.255.255.255", 1883), timeout=1).close()
        pytest.skip("this host routes TCP to 255.255.255.255")
    except OSError as err:
        if err.errno not in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            pytest.skip(f"this host answers {err!r}")
    assert "255.255.255.255 is unreachable" in fails_fast(edgectl, "--broker", "mqtt://255.255.255.255")


def test_every_node_of_a_cluster_is_tried_before_giving_up(edgectl: Edgectl, broker: Mosquitto,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"
    code, _, err = edgectl("fleet", "status", "--broker", dead, "--broker", broker.url, "--json")
    assert code == 0, err
    # the dead node is mentioned once, as a warning naming the node in use, never as an error
    said = [(r.levelno, r.getMessage()) for r in caplog.records if dead in r.getMessage()]
    assert said == [(logging.WARNING, f"cannot connect to {dead}: connection refused: nothing listens on "
                                      f"127.0.0.1:{dead.rsplit(':', 1)[1]} (is the broker running, is the port "
                                      f"right?); connected to {broker.url}")]


def test_the_agent_side_keeps_retrying_a_wrong_password(password_broker: Mosquitto) -> None:
    # a daemon waits without until_failed: the failure is reported and the reconnects go on
    t = Transport(MqttSettings(url=password_broker.url, username="op", password="wrong", reconnect_min_s=0.1,
                               reconnect_max_s=0.2), on_message=lambda m: None)
    t.start()
    try:
        assert t.wait_connected(5, until_failed=True) is False and t.last_error is not None
        assert not t.wait_connected(0.5)
        assert "Not authorized" in (t.last_error or "")
        before = t.connects
        write_password_file(password_broker.workdir / "passwd", {"op": "wrong"})
        password_broker.restart()  # the password the agent holds is right now
        assert t.wait_connected(10), t.last_error
        assert t.connects == before + 1
    finally:
        t.stop()


# ---------------------------------------------------------------------- profiles against a real broker


def test_a_profile_connects_and_show_masks_the_password(edgectl: Edgectl, password_broker: Mosquitto,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    folder = tmp_path / "edgefleet"
    folder.mkdir()
    (folder / "op.password").write_text("right\n")
    (folder / "edgectl.toml").write_text(
        f'default = "site"\n[profiles.site]\nbroker = "{password_broker.url}"\nusername = "op"\n'
        'password_file = "op.password"\n')
    code, out, err = edgectl("fleet", "status", "--json")
    assert code == 0, err
    code, out, err = edgectl("profile", "show")
    assert code == 0, err
    assert "right" not in out
    assert f"{folder / 'op.password'} (contents not shown)" in out
    assert any(line.split()[:2] == ["broker", password_broker.url] and line.endswith("profile site")
               for line in out.splitlines()), out
    code, out, _ = edgectl("profile", "list")
    assert (code, out.split()) == (0, ["*", "site", password_broker.url])
    # without the file, nothing is connected to by default
    (folder / "edgectl.toml").unlink()
    line = fails_fast(edgectl)
    assert "no broker: give --broker URL, set $EDGEFLEET_BROKER, or add a profile to" in line


def test_mutual_tls_without_a_client_certificate(edgectl: Edgectl, mtls_broker: Mosquitto, pki: Pki) -> None:
    line = fails_fast(edgectl, "--broker", mtls_broker.url, "--ca", pki.ca_file)
    assert "the broker requires a client certificate (TLS alert: certificate required)" in line
