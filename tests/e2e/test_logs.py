"""Logs from the device: a real agent's warnings through a real Mosquitto to `edgectl logs`, and
`edge-agent logs` reading the journal (with a stand-in journalctl) or saying where the log goes."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.agent.cli import under_systemd
from edgefleet.protocol import Topics
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.broker import Mosquitto, client

T = Topics()
EdgectlRun = Callable[..., tuple[int, str, str]]


@pytest.fixture
def agent(tmp_path: Path, broker: Mosquitto) -> Iterator[AgentProcess]:
    """An insecure agent on the broker: it logs `INSECURE: ...` as a WARNING at every start."""
    a = AgentProcess(tmp_path / "agent", mqtt={"url": broker.url})
    a.start()
    yield a
    a.kill()


def wait_output(edgectl: EdgectlRun, argv: list[str], want: Callable[[str], bool], timeout: float = 15.0) -> str:
    """Run `edgectl logs ...` until its output satisfies `want` (the agent publishes its recent records
    a moment after connecting); the last output otherwise, for the assertion message."""
    deadline = time.monotonic() + timeout
    while True:
        code, out, err = edgectl("logs", *argv)
        assert code == 0, err
        if want(out) or time.monotonic() > deadline:
            return out
        time.sleep(0.3)


class Follower:
    """`edgectl logs --follow` in its own process, its lines collected as they come."""

    def __init__(self, broker: Mosquitto, *extra: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "edgefleet.converter.cli", "logs", "--device", "dev-1",
                                      "--follow", "--broker", broker.url, *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, want: Callable[[str], bool], timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if want(line):
                return line
        raise AssertionError(f"no matching line within {timeout} s")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)


def test_edgectl_logs_shows_recent_warnings_then_follows_live(agent: AgentProcess, broker: Mosquitto,
                                                              edgectl: EdgectlRun) -> None:
    out = wait_output(edgectl, ["--device", "dev-1", "--broker", broker.url], lambda o: "INSECURE" in o)
    (line,) = [x for x in out.splitlines() if "INSECURE" in x]
    assert " WARNING edgefleet.agent.daemon: INSECURE: security.insecure = true" in line
    code, out, _ = edgectl("logs", "--device", "dev-1", "--broker", broker.url, "--json")
    records = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and records and all(r["device_id"] == "dev-1" and r["level"] == "WARNING" for r in records)
    code, out, _ = edgectl("logs", "--device", "dev-1", "--broker", broker.url, "--level", "ERROR")
    assert code == 0 and out == ""  # only warnings so far
    code, out, _ = edgectl("logs", "--device", "dev-1", "--broker", broker.url, "--since", "1d")
    assert code == 0 and "INSECURE" in out

    follower = Follower(broker)
    try:
        follower.wait_line(lambda x: "INSECURE" in x)  # the recent records first
        pub = client(broker.url)
        try:
            pub.publish(T.timestamp(), b"not json", wait=5)  # the agent refuses it with a warning
        finally:
            pub.stop()
        live = follower.wait_line(lambda x: "timestamp refused" in x)
        assert " WARNING edgefleet.agent.fleet.link: timestamp refused:" in live
    finally:
        assert follower.stop() == 0

    # a restarted agent extends the retained recent records instead of replacing them
    agent.stop()
    agent.start()
    out = wait_output(edgectl, ["--device", "dev-1", "--broker", broker.url], lambda o: o.count("INSECURE") >= 2)
    assert out.count("INSECURE") == 2 and "timestamp refused" in out, out
    assert out.index("timestamp refused") < out.rindex("INSECURE")  # oldest first


def test_edgectl_logs_of_an_unknown_device_is_one_error_line(broker: Mosquitto, edgectl: EdgectlRun) -> None:
    code, out, err = edgectl("logs", "--device", "nobody", "--broker", broker.url)
    assert code == 1 and out == ""
    assert err.strip() == "edgectl: error: device nobody is not known to the broker (no status, no log records)"


def test_edgectl_logs_refuses_a_bad_since(edgectl: EdgectlRun) -> None:
    code, _, err = edgectl("logs", "--device", "d", "--broker", "mqtt://127.0.0.1:1", "--since", "ten minutes")
    assert code == 2 and "--since" in err and "10m" in err


# --- edge-agent logs ----------------------------------------------------------------------------


def agent_cli(config: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet.agent.cli", "--config", str(config), "logs", *args],
                          capture_output=True, text=True, env=env, timeout=30)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "cam-3"\n[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n[security]\ninsecure = true\n')
    return path


def test_edge_agent_logs_under_systemd_runs_journalctl(tmp_path: Path, config: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "journalctl"
    fake.write_text('#!/bin/sh\necho "journalctl $*"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "INVOCATION_ID": "0123abcd"}
    res = agent_cli(config, "-f", "-n", "20", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "journalctl --unit edge-agent.service --output short-iso --lines 20 --follow"
    res = agent_cli(config, env=env)
    assert res.stdout.strip() == "journalctl --unit edge-agent.service --output short-iso --no-pager"
    res = agent_cli(config, "-n", "0", env=env)
    assert res.returncode == 2 and "expected an integer >= 1" in res.stderr


@pytest.mark.skipif(under_systemd(), reason="this machine runs the agent's unit under systemd")
def test_edge_agent_logs_without_systemd_says_where_the_log_goes(config: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "INVOCATION_ID"}
    res = agent_cli(config, env=env)
    assert res.returncode == 1 and res.stdout == ""
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("edge-agent: error: no edge-agent.service here")
    assert "standard error of its `edge-agent run` process" in line and "edgectl logs --device cam-3" in line
