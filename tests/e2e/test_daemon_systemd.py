"""The agent's side of the systemd contract, with the real process and a notify socket the test reads."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.api.client import ApiClient
from edgefleet.protocol import Topics, parse_json
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.broker import Inbox, Mosquitto
from edgefleet.transport import MqttSettings, Transport


class NotifySocket:
    """A datagram socket standing in for systemd's: records every message with its arrival time."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def first(self, key: str, timeout: float = 30.0) -> tuple[float, dict[str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, m in list(self.messages):
                if key in m:
                    return t, m
            time.sleep(0.02)
        raise AssertionError(f"no {key} within {timeout}s; got {[m for _, m in self.messages]}")

    def times(self, key: str) -> list[float]:
        return [t for t, m in list(self.messages) if key in m]

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Any:
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


def _start(a: AgentProcess, notify: NotifySocket, **env: str) -> None:
    a.start(wait=False, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "600000", **env})


def test_ready_watchdog_status_stopping(tmp_path: Path, notify: NotifySocket, make_bundle: Any) -> None:
    a = AgentProcess(tmp_path / "a")
    assert a.cli("install", str(make_bundle("dense_f32", version=4))).returncode == 0
    try:
        _start(a, notify)
        ready_at, ready = notify.first("READY")
        # READY only once the model answers: the API is up and serves v4 at that moment
        assert a.client.predict("m", [[0.0] * 8])["edgefleet"]["model_version"] == 4
        assert "m v4" in ready.get("STATUS", "")
        time.sleep(2.0)
        pings = [t for t in notify.times("WATCHDOG") if t > ready_at]
        assert len(pings) >= 4  # every 0.3 s (half of WATCHDOG_USEC) while healthy
        assert max(b - a_ for a_, b in zip(pings, pings[1:], strict=False)) < 0.6
        assert a.proc is not None
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(5) == 0
        notify.first("STOPPING")
    finally:
        a.kill()


def test_watchdog_stops_when_the_loop_stalls(tmp_path: Path, notify: NotifySocket) -> None:
    a = AgentProcess(tmp_path / "a")
    try:
        _start(a, notify, EDGEFLEET_FAULT="stall:loop#5")  # the 5th tick (about 1 s in) never returns
        notify.first("READY")
        time.sleep(4.0)
        pings = notify.times("WATCHDOG")
        assert pings, "no watchdog ping before the stall"
        assert time.monotonic() - pings[-1] > 2.0  # silence: systemd would now restart the agent
        assert a.client.health()["agent"]["device_id"] == "dev-1"  # the API threads still answer; only the loop hangs
    finally:
        a.kill()


def test_graceful_stop_finishes_requests_and_publishes_offline(
        tmp_path: Path, notify: NotifySocket, broker: Mosquitto, make_bundle: Any) -> None:
    a = AgentProcess(tmp_path / "a", mqtt={"url": broker.url})
    assert a.cli("install", str(make_bundle("slow_f32", version=1))).returncode == 0
    inbox = Inbox()
    watcher = Transport(MqttSettings(url=broker.url), on_message=inbox)
    watcher.subscribe(Topics().status("dev-1"))
    watcher.start()
    try:
        _start(a, notify)
        notify.first("READY")
        online = inbox.wait_for(lambda m: parse_json(m.payload)["status"] == "online", 10)
        assert parse_json(online.payload)["device_id"] == "dev-1"
        result: dict[str, Any] = {}

        def slow_request() -> None:
            client = ApiClient(socket_path=a.socket, timeout=60)
            result["answer"] = client.predict("m", [[0.1] * 8] * 400)

        worker = threading.Thread(target=slow_request)
        worker.start()
        time.sleep(0.3)  # the request is in flight
        assert a.proc is not None
        started = time.monotonic()
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(10) == 0
        assert time.monotonic() - started < 6
        worker.join(10)
        assert len(result["answer"]["predictions"]) == 400  # finished, not cut off
        offline = inbox.wait_for(lambda m: parse_json(m.payload)["status"] == "offline", 10)
        assert offline.retain or json.loads(offline.payload)["device_id"] == "dev-1"
    finally:
        a.kill()
        watcher.stop()


def test_nothing_is_sent_without_notify_socket(tmp_path: Path, notify: NotifySocket) -> None:
    a = AgentProcess(tmp_path / "a")
    try:
        a.start()  # no NOTIFY_SOCKET in its environment
        time.sleep(1.0)
        assert notify.messages == []
    finally:
        a.kill()
