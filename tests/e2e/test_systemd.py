"""sd_notify messages on a real datagram socket, and the shipped unit file through systemd-analyze."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomllib

from edgefleet.agent.config import AgentConfig, describe, load_config, parse_config
from edgefleet.agent.systemd import Notifier

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "edge-agent.service"
DROPIN_EXAMPLES = ROOT / "systemd" / "edge-agent.service.d"
EXAMPLE_CONFIG = ROOT / "systemd" / "agent.toml"
EXEC_START = "/opt/edge-agent/venv/bin/edge-agent --config /etc/edge-agent/agent.toml run"


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound AF_UNIX datagram socket standing in for systemd's notify socket."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield path, sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    """The fields of the next datagram."""
    return sock.recv(4096).decode().split("\n")


def nothing_pending(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(2.0)
    return False


def test_each_message_on_the_socket(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    with Notifier(path, watchdog_usec=30_000_000) as n:
        assert n.enabled
        assert n.ready(status="serving m v3")
        assert received(sock) == ["READY=1", "STATUS=serving m v3"]
        assert n.ready()
        assert received(sock) == ["READY=1"]
        assert n.status("downloading m v4\n3/10 chunks")
        assert received(sock) == ["STATUS=downloading m v4 3/10 chunks"]  # one line, no bogus field
        assert n.watchdog()
        assert received(sock) == ["WATCHDOG=1"]
        assert n.extend_timeout(2.5)
        assert received(sock) == ["EXTEND_TIMEOUT_USEC=2500000"]
        assert n.reloading()
        fields = received(sock)
        assert fields[0] == "RELOADING=1" and re.fullmatch(r"MONOTONIC_USEC=\d+", fields[1])
        assert n.stopping(status="stopping")
        assert received(sock) == ["STOPPING=1", "STATUS=stopping"]
    assert nothing_pending(sock)


def test_abstract_socket_name() -> None:
    name = f"edgefleet-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2.0)
    try:
        env = {"NOTIFY_SOCKET": "@" + name}
        n = Notifier.from_environment(env)
        assert n.ready(status="ok")
        assert received(sock) == ["READY=1", "STATUS=ok"]
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent(listener: tuple[str, socket.socket],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _, sock = listener
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")  # a watchdog without a socket cannot be served
    n = Notifier.from_environment()
    assert not n.enabled
    assert n.watchdog_interval() is None
    assert not n.ready(status="x")
    assert not n.status("x")
    assert not n.watchdog()
    assert not n.watchdog_if_due()
    assert not n.stopping()
    assert n._sock is None  # not even a socket was opened
    assert nothing_pending(sock)


def test_from_environment_unsets_variables_for_children(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid()), "HOME": "/x"}
    n = Notifier.from_environment(env)
    assert env == {"HOME": "/x"}
    assert n.watchdog_interval() == 2.0
    assert n.watchdog()
    assert received(sock) == ["WATCHDOG=1"]

    kept = {"NOTIFY_SOCKET": path}
    Notifier.from_environment(kept, unset_environment=False)
    assert kept == {"NOTIFY_SOCKET": path}


def test_a_child_started_by_the_agent_notifies_nothing(listener: tuple[str, socket.socket],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    Notifier.from_environment()
    assert "NOTIFY_SOCKET" not in os.environ
    code = "from edgefleet.agent.systemd import Notifier; import sys; sys.exit(Notifier.from_environment().ready())"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0
    assert nothing_pending(sock)


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),  # no WATCHDOG_PID: meant for us
        ("30000000", "self", 15.0),
        ("30000000", "other", None),  # inherited from a watched parent
        ("30000000", "garbage", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        (None, "self", None),
    ],
)
def test_watchdog_interval(usec: str | None, pid: str | None, expected: float | None, tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "n.sock")}
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid is not None:
        env["WATCHDOG_PID"] = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid)
    n = Notifier.from_environment(env)
    assert n.watchdog_interval() == expected
    if expected is None:
        assert not n.watchdog()


def test_watchdog_if_due_paces_pings(listener: tuple[str, socket.socket]) -> None:
    path, sock = listener
    n = Notifier(path, watchdog_usec=10_000_000)  # ping every 5 s
    assert n.watchdog_if_due(now=100.0)
    assert received(sock) == ["WATCHDOG=1"]
    assert not n.watchdog_if_due(now=104.9)
    assert nothing_pending(sock)
    assert n.watchdog_if_due(now=105.0)
    assert received(sock) == ["WATCHDOG=1"]
    assert not Notifier(path).watchdog_if_due(now=1e9)  # no WatchdogSec=: never pings
    assert nothing_pending(sock)


def test_send_failure_is_logged_once_and_never_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier(str(tmp_path / "nobody-listens.sock"), watchdog_usec=2_000_000)
    with caplog.at_level(logging.DEBUG, logger="edgefleet.agent.systemd"):
        assert not n.ready()
        assert not n.watchdog()
        assert not n.stopping()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "nobody-listens.sock" in warnings[0].getMessage()
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 2


def test_unusable_socket_value_disables_notifications(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edgefleet.agent.systemd"):
        n = Notifier.from_environment({"NOTIFY_SOCKET": "relative/notify.sock", "WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog_interval() is None and not n.ready()
    assert "relative/notify.sock" in caplog.text


# --- the unit file -----------------------------------------------------------------------------------


def systemd_analyze() -> str:
    """systemd-analyze's path; the test fails (never skips) without it: .ci/run installs Debian's systemd."""
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze not found: install Debian's systemd package (.ci/run does this)")
    return path


def staged_unit(tmp_path: Path, text: str | None = None) -> Path:
    """The shipped unit in a temp dir with ExecStart pointing at a binary that exists on this machine.

    verify checks that ExecStart's binary exists; /opt/edge-agent is not installed on a workstation.
    """
    text = UNIT.read_text() if text is None else text
    exec_line = f"ExecStart={EXEC_START}"
    assert exec_line in text
    true = shutil.which("true") or "/bin/true"
    out = tmp_path / "unit" / UNIT.name
    out.parent.mkdir()
    out.write_text(text.replace(exec_line, f"ExecStart={true} --config /etc/edge-agent/agent.toml run"))
    return out


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="")
    return subprocess.run([systemd_analyze(), "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, env=env, timeout=120)


def test_unit_verifies_without_warnings(tmp_path: Path) -> None:
    result = verify(staged_unit(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == "", result.stdout + result.stderr


def test_verify_does_report_a_broken_unit(tmp_path: Path) -> None:
    # Proves the test above could fail: a typo'd directive is reported on this machine's systemd.
    broken = UNIT.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
    result = verify(staged_unit(tmp_path, broken))
    assert "NoNewPrivilege" in result.stdout + result.stderr


def test_unit_contract() -> None:
    """The settings the agent and install.sh rely on; a refactor of the unit must keep them."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    expect = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30", "Restart": "on-failure",
        "RestartPreventExitStatus": "2",
        "User": "edge-agent", "Group": "edge-agent", "StateDirectory": "edge-agent",
        "RuntimeDirectory": "edge-agent", "ConfigurationDirectory": "edge-agent",
        "ProtectSystem": "strict", "NoNewPrivileges": "yes", "CapabilityBoundingSet": "",
        "UMask": "0027", "MemoryMax": "512M", "CPUQuota": "150%",
    }
    for key, value in expect.items():
        assert settings.get(key) == [value], key
    assert settings["ExecStart"] == [EXEC_START]
    assert settings["SystemCallFilter"] == ["@system-service", "~@privileged"]
    assert set(settings["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}


def enable_example(example: Path) -> str:
    """The drop-in example with every commented-out setting (`#Key=value`) switched on."""
    return "\n".join(line[1:] if re.match(r"^#[A-Z][A-Za-z]+=", line) else line
                     for line in example.read_text().splitlines()) + "\n"


@pytest.mark.parametrize("name", ["credentials.conf.example", "hardware.conf.example", "resources.conf.example"])
def test_dropin_examples_verify(name: str, tmp_path: Path) -> None:
    """Each shipped drop-in example, with all its settings enabled, is valid for this systemd."""
    enabled = enable_example(DROPIN_EXAMPLES / name)
    unit = staged_unit(tmp_path)
    dropin = unit.parent / f"{UNIT.name}.d"
    dropin.mkdir()
    (dropin / name.removesuffix(".example")).write_text(enabled)
    result = verify(unit)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr
    # verify really reads drop-ins next to the unit: a typo there is reported.
    (dropin / name.removesuffix(".example")).write_text(enabled.replace("[Service]", "[Service]\nMemoryMaxx=1G"))
    broken = verify(unit)
    assert "MemoryMaxx" in broken.stdout + broken.stderr


def test_exec_start_arguments_fit_the_cli() -> None:
    """The unit's command line is one the real `edge-agent` parses (checked with check-config, not run)."""
    binary, *args = EXEC_START.split()
    assert binary == "/opt/edge-agent/venv/bin/edge-agent" and args[-1] == "run"
    args = [str(EXAMPLE_CONFIG) if a == "/etc/edge-agent/agent.toml" else a for a in args[:-1]]
    result = subprocess.run([sys.executable, "-m", "edgefleet.agent.cli", *args, "check-config"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    # The example, as shipped, lists no trusted key: it loads (so the arguments fit), and it fails
    # closed with the one line that says what to add, until the operator lists the fleet's key.
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("edge-agent: error: security.trusted_keys: no trusted key"), result.stderr


def test_credentials_dropin_names_the_config_credentials() -> None:
    """The credential ids are the ones the example agent.toml and the docs use."""
    enabled = enable_example(DROPIN_EXAMPLES / "credentials.conf.example")
    assert "\nLoadCredential=mqtt-password:/etc/edge-agent/mqtt-password\n" in enabled
    assert "\nLoadCredential=mqtt-key:/etc/edge-agent/client.key\n" in enabled


MDWE_PROBE = r"""
import ctypes, mmap, sys
import numpy as np

# PR_SET_MDWE (Linux >= 6.3) with PR_MDWE_REFUSE_EXEC_GAIN: the kernel's form of the unit's
# MemoryDenyWriteExecute=yes; systemd >= 257 applies it the same way when the kernel has it.
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(f"PR_SET_MDWE failed: errno {ctypes.get_errno()}")
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("W+X mapping still allowed: the restriction is not in force")
except PermissionError:
    pass

import paho.mqtt.client, psutil
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from edgefleet.runtime import load_model

key = Ed25519PrivateKey.generate()
key.public_key().verify(key.sign(b"doc"), b"doc")
psutil.Process().memory_info(); psutil.cpu_percent(); psutil.virtual_memory()
model = load_model(sys.argv[1], backend=sys.argv[2], use_xnnpack=True)
x = np.ones((1, *model.inputs[0].shape[1:]), np.dtype(model.inputs[0].dtype))
print(model.run([x])[0].shape)
"""


@pytest.mark.parametrize(("backend", "model"), [("litert", "dense_f32"), ("litert", "dense_int8"),
                                                ("tflite", "dense_f32")])
def test_inference_runs_without_writable_executable_memory(backend: str, model: str, zoo: Callable[[str], Path]) -> None:
    """MemoryDenyWriteExecute=yes is safe: the agent's libraries and XNNPACK inference never map W+X memory."""
    path = zoo(model)
    # A fresh process that never imported TensorFlow (tflite_runtime cannot share a process with it).
    result = subprocess.run([sys.executable, "-c", MDWE_PROBE, str(path), backend], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(1, 4)"


# --- the example configuration ---------------------------------------------------------------------

SHOWN_AS_EXAMPLE = {"device_id", "groups", "security.trusted_keys", "api.allowed_hosts"}  # the file shows an example, not the default


def uncommented_example() -> str:
    """The example config with every `#key = value` line switched on."""
    return "\n".join(line[1:] if re.match(r"^#[a-z_]+ = ", line) else line
                     for line in EXAMPLE_CONFIG.read_text().splitlines()) + "\n"


def test_example_config_as_shipped_is_all_defaults() -> None:
    assert load_config(EXAMPLE_CONFIG) == AgentConfig()


def test_example_config_documents_every_key_with_its_default() -> None:
    """Every schema key appears once, in its section; switched on, defaults are unchanged (no drift)."""
    text = uncommented_example()
    config = parse_config(text, source=str(EXAMPLE_CONFIG))  # unknown keys or bad values raise here
    shown = tomllib.loads(text)
    defaults = describe(AgentConfig())
    loaded = describe(config)
    for name, default in defaults.items():
        if isinstance(default, dict):
            section = {f.name for f in dataclasses.fields(getattr(AgentConfig(), name))}
            assert set(shown.get(name, {})) == section, f"[{name}] keys differ from the schema"
            pairs = [(f"{name}.{k}", v, loaded[name][k]) for k, v in default.items()]
        else:
            assert name in shown, f"{name} missing from the example config"
            pairs = [(name, default, loaded[name])]
        for key, want, got in pairs:
            if want is None or key in SHOWN_AS_EXAMPLE:
                assert got is not None and got != [], f"{key}: the example shows no value"
            else:
                assert got == want, f"{key}: example shows {got!r}, the default is {want!r}"
    assert len(re.findall(r"^#[a-z_]+ = ", EXAMPLE_CONFIG.read_text(), re.M)) == sum(
        len(v) if isinstance(v, dict) else 1 for v in defaults.values())


def test_security_exposure_stays_low(tmp_path: Path) -> None:
    """`systemd-analyze security` scores the sandbox; losing a hardening line raises the score."""
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="", SYSTEMD_COLORS="0")
    result = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager",
                             str(staged_unit(tmp_path))], capture_output=True, text=True, env=env, timeout=120)
    match = re.search(r"Overall exposure level for edge-agent\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 1.2, result.stdout  # as shipped; 9.6 for a bare unit
