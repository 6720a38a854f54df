"""A server process of the kit (a broker other than Mosquitto): started, waited for, stopped, killed.

Each kind says how it is started (`command()`) and when it serves (`ready()`); its output goes to a
log file in its work directory. Every process started here is killed when its owner says so and,
failing that, at interpreter exit. `mqtt_accepts` is the readiness probe of an MQTT listener: a port
that accepts TCP is not yet a broker that accepts sessions (NATS, for one, needs JetStream first).
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TypeVar

_running: set[subprocess.Popen[bytes]] = set()

S = TypeVar("S", bound="ServerProcess")


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


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports on 127.0.0.1 (free_port may hand out a port it gave a moment ago)."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _read_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = s.recv(n - len(data))
        if not part:
            break
        data += part
    return data


def mqtt_accepts(port: int, timeout: float = 5.0) -> bool:
    """True when an MQTT 3.1.1 CONNECT (clean session) to 127.0.0.1:`port` is accepted by a CONNACK."""
    client_id = f"edgefleet-probe-{os.urandom(4).hex()}".encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x1e" + len(client_id).to_bytes(2, "big") + client_id
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(bytes([0x10, len(body)]) + body)
            reply = _read_exactly(s, 4)
            if reply == b"\x20\x02\x00\x00":
                s.sendall(b"\xe0\x00")  # DISCONNECT: a clean goodbye, no will, no dangling session
                return True
    except OSError:
        pass
    return False


class ServerProcess:
    """One server process; `start()` waits until `ready()`, restarts keep the ports and the store."""

    kind = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_file = workdir / f"{self.kind}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """The command line that runs the server in the foreground."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether the server serves now (called until it does, or the start times out)."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """What the server printed so far."""
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def start(self: S, timeout: float = 30.0, *, wait: bool = True) -> S:
        """Start the process; with `wait`, return once `ready()` holds."""
        if self.running:
            raise RuntimeError(f"{self.kind} already running")
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir)
        _running.add(self.proc)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until `ready()`; RuntimeError with the server's log when it exits or times out."""
        assert self.proc is not None, "not started"
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.kind} not ready within {timeout} s:\n{self.log()[-4000:]}")
            time.sleep(0.05)

    def _reap(self, timeout: float) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _running.discard(self.proc)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (the server shuts down cleanly), escalating to SIGKILL."""
        if not self.running:
            return
        assert self.proc is not None
        self.resume()
        self.proc.terminate()
        self._reap(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        if not self.running:
            return
        assert self.proc is not None
        self.proc.kill()
        self._reap(5.0)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop and start again with the same ports and store."""
        self.stop()
        self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: the server holds its sockets but answers nothing."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)

    def __enter__(self: S) -> S:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
