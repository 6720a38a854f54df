"""`edgectl fleet watch` in real terminals (tmux panes of 80, 100 and 120 columns) and piped, against a
real Mosquitto holding the retained status and state of a small fleet that keeps sending telemetry."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.converter.fleet.watch import shorten
from edgefleet.protocol import (
    DeviceState,
    ModelState,
    ModelTelemetry,
    Outcome,
    Slot,
    Status,
    Telemetry,
    Topics,
    canonical_json,
)
from edgefleet.testing.broker import Mosquitto, client
from edgefleet.testing.waiting import wait_for
from tests.support import ROOT

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")

T = Topics()
LONG_REASON = "p95 latency 12.345 ms is 8.20x the previous model's 1.505 ms (limit 1.5x)"
# device -> (online, groups, {model: (version, phase)}, cpu %, rss bytes)
FLEET: dict[str, tuple[bool, tuple[str, ...], dict[str, tuple[int, str]], float, int]] = {
    "cam-north-001": (True, ("lab", "north"), {"det": (3, "COMMITTED"), "classifier": (12, "PROBATION")},
                      12.5, 41_900_000),
    "cam-north-002": (True, ("north",), {"det": (2, "ROLLED_BACK")}, 80.25, 120_400_000),
    "cam-south-003": (True, ("south",), {"det": (3, "DOWNLOADING")}, 3.0, 30_000_000),
    "cam-south-004": (False, ("south",), {"det": (1, "COMMITTED")}, 0.0, 0),
}


def _state(device: str, models: dict[str, tuple[int, str]]) -> DeviceState:
    states = {}
    for name, (version, phase) in models.items():
        failed = phase == "ROLLED_BACK"
        outcome = Outcome(deployment_id=f"{name}-v{version}", version=version,
                          result="rolled_back" if failed else "committed", reason=LONG_REASON if failed else None,
                          ts=time.time())
        slot = Slot(version=version, deployment_id=f"{name}-v{version}", sha256="a" * 64)
        states[name] = ModelState(phase=phase, active=slot, last_outcome=outcome)  # type: ignore[arg-type]
    return DeviceState(device_id=device, ts=time.time(), agent_version="1.0", models=states)


def _telemetry(device: str) -> Telemetry:
    _, _, models, cpu, rss = FLEET[device]
    figures = tuple(ModelTelemetry(name=name, version=version, phase=phase, count=10, errors=0,
                                   p50_ms=1.25 * (i + 1), p95_ms=3.5 * (i + 1))
                    for i, (name, (version, phase)) in enumerate(sorted(models.items())))
    return Telemetry(ts=time.time(), device_id=device, agent_version="1.0", uptime_s=1.0, cpu_percent=cpu,
                     rss_bytes=rss, system_cpu_percent=20.0, mem_available_bytes=1 << 30, load1=0.5,
                     disk_free_bytes=1 << 33, temperature_c=51.5, models=figures)


@pytest.fixture
def fleet(broker: Mosquitto) -> Iterator[Mosquitto]:
    """The broker with the fleet's retained status and state, and telemetry from the online devices
    every 0.2 s (it is not retained), as agents would send it."""
    publisher = client(broker.url)
    for device, (online, groups, models, _, _) in FLEET.items():
        status = Status(status="online" if online else "offline", device_id=device, agent_version="1.0",
                        ts=time.time(), groups=groups)
        publisher.publish(T.status(device), canonical_json(status.to_dict()), retain=True, wait=5)
        publisher.publish(T.state(device), canonical_json(_state(device, models).to_dict()), retain=True, wait=5)
    stop = threading.Event()

    def send() -> None:
        while not stop.wait(0.2):
            for device, (online, *_) in FLEET.items():
                if online:
                    publisher.publish(T.telemetry(device), canonical_json(_telemetry(device).to_dict()), qos=0)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        yield broker
    finally:
        stop.set()
        sender.join()
        publisher.stop()


class Pane:
    """A detached tmux session of a given size running one shell command, on a server of its own."""

    def __init__(self, tmp_path: Path, name: str, command: str, width: int, height: int = 24) -> None:
        self.socket = str(tmp_path / f"{name}.sock")
        conf = tmp_path / "tmux.conf"
        conf.write_text("set -g remain-on-exit on\nset -g status off\n")
        self._tmux("-f", str(conf), "new-session", "-d", "-s", "w", "-x", str(width), "-y", str(height),
                   "-c", str(ROOT), command)

    def _tmux(self, *args: str) -> str:
        res = subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True, timeout=10)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def screen(self) -> list[str]:
        """The visible lines, as the terminal shows them."""
        return self._tmux("capture-pane", "-p", "-t", "w").splitlines()

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "w", *keys)

    def wait_screen(self, what: str, test: Callable[[list[str]], bool], timeout: float = 20) -> list[str]:
        wait_for(lambda: test(self.screen()), timeout=timeout, what=what)
        return self.screen()

    def resize(self, width: int, height: int = 24) -> None:
        self._tmux("resize-window", "-t", "w", "-x", str(width), "-y", str(height))

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def pane(tmp_path: Path) -> Iterator[Callable[..., Pane]]:
    """Start `edgectl fleet watch ARGS` in a tmux pane of WIDTH columns; after it ends the pane shows its exit
    code and whether the terminal is back in canonical mode with echo."""
    started: list[Pane] = []

    def start(width: int, *args: str) -> Pane:
        edgectl = shlex.join([sys.executable, "-m", "edgefleet.converter.cli", "fleet", "watch", *args])
        command = (f"env -u COLUMNS -u LINES TERM=xterm-256color {edgectl}; echo \"exit $?\"; "
                   "stty -a | tr ' ;' '\\n\\n' | grep -x -e '-*icanon' -e '-*echo'; sleep 60")
        p = Pane(tmp_path, f"tmux-{len(started)}", command, width)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


def _table(screen: list[str]) -> tuple[str, str, list[str]]:
    """The header line, the column header line and the device lines of a screen of fleet watch."""
    start = next(i for i, line in enumerate(screen) if line.startswith("device "))
    lines = [line for line in screen[start + 1:] if line.strip()][:-1]  # the last is the keys' line
    return screen[start - 1], screen[start], lines


def _ended(screen: list[str]) -> bool:
    """True once the pane shows edgectl's exit code and the terminal's echo mode after it."""
    return any(line.startswith("exit ") for line in screen) and any(line.lstrip("-") == "echo" for line in screen)


def _devices(screen: list[str]) -> list[str]:
    """The devices of a screen, in order (a device's further lines start blank)."""
    return [line.split()[0] for line in _table(screen)[2] if not line.startswith(" ")]


def _column_names(header: str) -> set[str]:
    """The columns a header line shows (columns are two spaces apart at 80 and more), by one name whether
    abbreviated or not: `p95 ms` and `p95` are both p95."""
    short = {"on": "online", "°C": "temp", "p50 ms": "p50", "p95 ms": "p95", "cpu %": "cpu", "rss MB": "rss",
             "temp °C": "temp"}
    return {short.get(name, name) for name in re.split(r"\s{2,}", header.strip())}


def _has_rows(screen: list[str]) -> bool:
    """True once the table shows the devices and their telemetry (their figures come every 0.2 s)."""
    text = "\n".join(screen)
    return all(d in text for d in FLEET) and "device " in text and "80" in text


def _check_rows(lines: list[str]) -> None:
    """Every device's first line shows its id and its first model's name, version and phase; a second
    model takes the next line."""
    starts = {line.split()[0]: i for i, line in enumerate(lines) if not line.startswith(" ")}
    assert set(starts) == set(FLEET), lines
    for device, (_, _, models, _, _) in FLEET.items():
        for i, (name, (version, phase)) in enumerate(sorted(models.items())):
            assert re.search(rf"\b{name}\s+v{version}\s+{phase}\b", lines[starts[device] + i]), (device, lines)


@pytest.mark.parametrize("width", [80])
def test_watch_fits_80_columns_and_q_quits(fleet: Mosquitto, pane: Callable[..., Pane], width: int) -> None:
    once = pane(width, "--broker", fleet.url, "--once", "--telemetry-wait", "5")
    p = pane(width, "--broker", fleet.url, "--interval", "0.5")
    screen = p.wait_screen("the fleet table with telemetry", _has_rows)
    header, columns, lines = _table(screen)
    assert all(len(line) <= width for line in screen)
    assert header.startswith(f"{fleet.url} · 4 devices, 3 online · 1 ROLLED_BACK, 1 DOWNLOADING, "), header
    assert columns.split()[:5] == ["device", "on", "model", "ver", "phase"], columns
    _check_rows(lines)
    assert "q quit" in screen[-1]
    started = time.monotonic()
    p.keys("q")
    after = p.wait_screen("edgectl to exit", _ended, timeout=5)
    assert time.monotonic() - started < 3
    assert [line for line in after if line.startswith("exit ")] == ["exit 0"]
    assert "icanon" in after and "echo" in after  # the terminal is back in its usual mode
    # --once on a terminal: the same table, printed once, fitted to the terminal
    printed = once.wait_screen("the snapshot", _ended)
    assert all(len(line) <= width for line in printed)
    start = next(i for i, line in enumerate(printed) if line.startswith("device "))
    assert printed[start - 1].startswith(f"{fleet.url} · 4 devices, 3 online · 1 ROLLED_BACK")
    _check_rows(printed[start + 1:printed.index("exit 0")])


def test_wider_terminals_show_more_columns_and_keys_filter_sort_group(
        fleet: Mosquitto, pane: Callable[..., Pane]) -> None:
    columns_at = {}
    panes = {width: pane(width, "--broker", fleet.url, "--interval", "0.5") for width in (80, 100, 120)}
    for width, p in panes.items():
        screen = p.wait_screen(f"the fleet table at {width} columns", _has_rows)
        _, columns, lines = _table(screen)
        assert all(len(line) <= width for line in screen)
        _check_rows(lines)
        columns_at[width] = _column_names(columns)
    assert set(columns_at[80]) < set(columns_at[100]) < set(columns_at[120]), columns_at
    assert {"device", "model", "ver", "phase", "online", "p95", "cpu", "last event"} <= columns_at[80]

    panes[100].resize(80)  # the table follows the terminal
    panes[100].wait_screen("the table to fit 80 columns", lambda s: _has_rows(s) and "device " in "".join(s) and
                           _column_names(_table(s)[1]) == columns_at[80] and all(len(line) <= 80 for line in s))

    p = panes[120]
    p.keys("/", "n", "o", "r", "t", "h", "Enter")
    screen = p.wait_screen("the filter to apply", lambda s: "filter 'north'" in s[0] and "q quit" in s[-1])
    assert _devices(screen) == ["cam-north-001", "cam-north-002"]
    assert "2 devices, 2 online" in screen[0]
    p.keys("/", "x", "Escape")  # typing a filter and cancelling it keeps the one applied
    p.keys("s", "s")  # device -> cpu -> rss
    screen = p.wait_screen("rss order", lambda s: "sorted by rss" in s[-1] and "filter 'north'" in s[0])
    assert _devices(screen) == ["cam-north-002", "cam-north-001"]
    p.keys("Escape", "g", "g")  # clear the filter; all groups -> lab -> north
    screen = p.wait_screen("group north", lambda s: "group north" in s[0] and "filter" not in s[0])
    assert _devices(screen) == ["cam-north-002", "cam-north-001"]  # still by rss
    p.keys("C-c")  # Ctrl-C ends it as cleanly as q
    after = p.wait_screen("edgectl to exit", _ended, timeout=5)
    assert [line for line in after if line.startswith("exit ")] == ["exit 0"] and "icanon" in after


def test_piped_output_fits_columns_and_never_cuts_numbers(fleet: Mosquitto) -> None:
    env = {**os.environ, "COLUMNS": "80"}
    base = [sys.executable, "-m", "edgefleet.converter.cli", "fleet", "watch", "--broker", fleet.url]
    once = subprocess.run([*base, "--once", "--telemetry-wait", "5"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert once.returncode == 0, once.stderr
    lines = once.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, lines
    assert lines[0].startswith(f"{fleet.url} · 4 devices, 3 online · 1 ROLLED_BACK, 1 DOWNLOADING, ")
    rows = lines[2:]
    assert {line.split()[0] for line in rows} == set(FLEET)  # the id starts every line, second models too
    assert len(rows) == 5
    cpu = re.search(r"\b80\.?\d*\b", next(line for line in rows if line.startswith("cam-north-002")))
    assert cpu is not None and cpu[0] in ("80", "80.2", "80.25")  # whole, never wrapped or cut
    # --wide: every column, however long the lines
    wide = subprocess.run([*base, "--once", "--wide", "--telemetry-wait", "5", "--filter", "NORTH-002"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert wide.returncode == 0, wide.stderr
    assert wide.stdout.splitlines()[1].split() == ["device", "online", "groups", "model", "ver", "phase", "p50", "ms",
                                                   "p95", "ms", "drift", "cpu", "%", "rss", "MB", "temp", "°C", "last",
                                                   "event", "seen"]
    assert f"det v2 ROLLED_BACK: {shorten(LONG_REASON)}" in wide.stdout and max(len(line) for line in wide.stdout.splitlines()) > 80
    # the live form, piped: a snapshot every interval until SIGTERM, then exit 0
    with open(os.devnull) as devnull:
        proc = subprocess.Popen([*base, "--interval", "0.3"], cwd=ROOT, env=env, stdin=devnull,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    seen: list[str] = []
    while sum(1 for line in seen if line.startswith(fleet.url)) < 2:
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        seen.append(line.rstrip("\n"))
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert max(len(line) for line in seen) <= 80
