"""Issue 12, attack 8: the local API, attacked over its real sockets on a real `edge-agent run`.

Each test performs one attack that used to work and checks it is refused and changes nothing:
a head announcing half a gigabyte, sixty TCP heads of 16 MiB, idle TCP connections by the dozen,
inference clients trying to install or roll back, a foreign Host, a form POST, a missing or wrong
bearer token. The agent's memory is read with psutil while it is being attacked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from edgefleet.agent.api.client import ApiClient
from edgefleet.errors import RequestError
from edgefleet.protocol import SigningKey
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.reliability import X, build_bundle, fast_tmp
from edgefleet.testing.waiting import wait_for
from tests.support.helpers import read_http_response

TOKEN = "t0ken-for-the-trust-tests"
NPY = "application/x-npy"
MiB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Agent:
    """The agent under attack and what the attacks need to reach it."""

    def __init__(self, proc: AgentProcess, port: int, v2: Path) -> None:
        self.proc = proc
        self.port = port
        self.v2 = v2
        self.admin_socket = proc.root / "admin.sock"
        self.client = proc.client
        self.tcp_client = ApiClient(url=f"http://127.0.0.1:{port}", token=TOKEN)

    def rss(self) -> int:
        assert self.proc.proc is not None
        return int(psutil.Process(self.proc.proc.pid).memory_info().rss)

    def served_version(self) -> int:
        return int(self.client.health()["models"]["m"]["version"])

    def unix(self, path: Path | None = None) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(path or self.proc.socket))
        return s

    def tcp(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    root = fast_tmp("edgefleet-trust-api-")
    key = SigningKey.generate()
    key.write(root / "keys")
    v1 = build_bundle(root / "v1", "dense_f32", version=1, key=key, labels=list("abcd"))
    v2 = build_bundle(root / "v2", "dense_f32_v2", version=2, key=key, labels=list("abcd"))
    token_file = root / "api-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    port = _free_port()
    proc = AgentProcess(root / "a", security={"trusted_keys": [str(root / "keys" / "edgefleet.pub")]},
                        api={"port": port, "token_file": str(token_file), "max_connections": 64,
                             "max_connections_per_peer": 64, "header_timeout_s": 5.0, "body_timeout_s": 10.0},
                        health={"probation_s": 0.5, "min_requests": 1})
    res = proc.cli("install", str(v1))
    assert res.returncode == 0, res.stdout + res.stderr
    proc.start()
    a = Agent(proc, port, v2)
    wait_for(lambda: a.proc.status()["state"]["models"]["m"]["phase"] == "COMMITTED", timeout=30, what="v1 commit")
    yield a
    a.tcp_client.close()
    proc.stop()
    shutil.rmtree(root, ignore_errors=True)


def _head(path: str, length: int, *, ctype: str = NPY, host: str = "localhost", token: str | None = TOKEN) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: {ctype}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _answer(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    status, headers, body = read_http_response(sock)
    return status, headers, json.loads(body)


def _refusals(socks: list[socket.socket], wait: float) -> list[str]:
    """The errors of the connections the agent refused at once (503); the others are still open."""
    refused = []
    for s in socks:
        s.settimeout(wait)
        try:
            status, _, body = _answer(s)
        except (TimeoutError, ConnectionError):
            continue
        assert status == 503, body
        refused.append(body["error"])
    return refused


def _still_serving(a: Agent) -> None:
    assert a.client.predict("m", X)["edgefleet"]["model_version"] == 1
    assert a.tcp_client.predict("m", X)["edgefleet"]["model_version"] == 1
    assert a.proc.proc is not None and a.proc.proc.poll() is None


def test_a_half_gigabyte_head_allocates_nothing(agent: Agent) -> None:
    """The reported attack: Content-Length 537919488 on the Unix socket (then an admin upload's limit)."""
    before = agent.rss()
    for target, path in ((agent.proc.socket, "/v1/admin/install"), (agent.proc.socket, "/v1/models/m:predict"),
                         (agent.admin_socket, "/v1/admin/install")):
        s = agent.unix(target)
        s.sendall(_head(path, 537919488, ctype="application/x-tar" if "admin" in path else NPY, token=None))
        status, headers, body = _answer(s)
        assert status == 413 and "above the limit" in body["error"], body
        assert headers["connection"] == "close"
        s.close()
    assert agent.rss() - before < 16 * MiB, (before, agent.rss())
    _still_serving(agent)


def test_sixty_big_tcp_heads_stay_within_the_budget(agent: Agent) -> None:
    """60 TCP heads of 16 MiB (each at the body limit), each followed by 4 MiB of real body bytes."""
    before = agent.rss()
    socks = []
    for _ in range(60):
        s = agent.tcp()
        s.sendall(_head("/v1/models/m:predict", 16 * MiB))
        socks.append(s)
    # those the budget refused answered at once; the rest are reading their bodies
    refused = _refusals(socks, 0.2)
    reading = len(socks) - len(refused)
    assert refused and all("api.max_inflight_bytes" in e for e in refused), refused[:3]
    assert reading <= 2, reading  # 64 MiB budget, TCP at most half of it: two 16 MiB bodies
    chunk = b"\0" * MiB
    for s in socks:
        s.settimeout(10)
        try:
            for _ in range(4):
                s.sendall(chunk)
        except OSError:
            pass  # a refused connection is closed by the agent
    grown = agent.rss() - before
    assert grown < 48 * MiB, grown  # a gigabyte before the budget
    # while TCP holds its share, the Unix socket still takes a big body
    import numpy as np

    from edgefleet.agent.serving import npy

    big = np.zeros((1, 8), np.float32)
    s = agent.unix()
    payload = npy.dumps(big)
    s.sendall(_head("/v1/models/m:predict", len(payload), token=None)[:-2] + b"Expect: 100-continue\r\n\r\n")
    assert s.recv(64).startswith(b"HTTP/1.1 100")
    s.sendall(payload)
    data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    s.close()
    for s in socks:
        s.close()
    wait_for(lambda: _tcp_ok(agent), timeout=15, what="TCP serving again once the heads are gone")
    _still_serving(agent)


def _tcp_ok(a: Agent) -> bool:
    try:
        return bool(a.tcp_client.predict("m", X)["edgefleet"]["model_version"] == 1)
    except RequestError:
        a.tcp_client.close()
        return False


def test_idle_tcp_connections_cannot_lock_out_the_unix_socket(agent: Agent) -> None:
    """70 idle TCP connections: TCP fills its own cap, the Unix sockets do not notice."""
    idle = [agent.tcp() for _ in range(70)]
    try:
        refused = _refusals(idle, 0.3)
        assert len(refused) >= 6 and all("too many connections" in e for e in refused), refused
        res = agent.proc.cli("status", "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["running"] is True
        assert agent.client.predict("m", X)["edgefleet"]["model_version"] == 1
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: _tcp_ok(agent), timeout=15, what="TCP serving again")


def test_inference_clients_cannot_install_or_roll_back(agent: Agent) -> None:
    state = (agent.proc.state_dir / "state.json").read_bytes()
    attempts = [(b'{"model": "m"}', "/v1/admin/rollback"), (json.dumps({"path": str(agent.v2)}).encode(),
                                                            "/v1/admin/install")]
    for body, path in attempts:
        for s, token in ((agent.unix(), None), (agent.tcp(), TOKEN)):
            s.sendall(_head(path, len(body), ctype="application/json", token=token) + body)
            status, _, answer = _answer(s)
            assert status == 403 and "admin socket" in answer["error"], answer
            s.close()
    with pytest.raises(RequestError) as info:
        agent.tcp_client.admin("rollback", {"model": "m"})
    assert info.value.status == 503 and "admin socket" in str(info.value)
    assert (agent.proc.state_dir / "state.json").read_bytes() == state
    assert agent.served_version() == 1
    mode = os.stat(agent.admin_socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(agent.proc.socket).st_mode) == 0o660


def test_tcp_requests_need_the_host_the_token_and_a_json_or_npy_body(agent: Agent) -> None:
    body = json.dumps({"instances": X}).encode()
    path = "/v1/models/m:predict"
    cases = [
        (_head(path, len(body), ctype="application/json", host="attacker.example"), 403, "not a name of this agent"),
        (_head(path, len(body), ctype="application/json", host="attacker.example:8501"), 403, "not a name"),
        (_head(path, len(body), ctype="application/x-www-form-urlencoded"), 415, "not accepted over TCP"),
        (_head(path, len(body), ctype="text/plain"), 415, "not accepted over TCP"),
        (_head(path, len(body), ctype="application/json", token=None), 401, "bearer token"),
        (_head(path, len(body), ctype="application/json", token="t0ken-for-the-trust-testz"), 401, "bearer token"),
    ]
    for raw, want, message in cases:
        s = agent.tcp()
        s.sendall(raw + body)
        status, headers, answer = _answer(s)
        assert status == want and message in answer["error"], (raw[:80], answer)
        if want == 401:
            assert headers["www-authenticate"].startswith("Bearer")
        s.close()
    for host in ("localhost", f"127.0.0.1:{agent.port}"):
        s = agent.tcp()
        s.sendall(_head(path, len(body), ctype="application/json", host=host) + body)
        status, _, answer = _answer(s)
        assert status == 200 and answer["edgefleet"]["model_version"] == 1
        s.close()
    metrics = agent.tcp_client.metrics()
    assert re.search(r'^edgefleet_api_requests_total\{(device="[^"]*",)?code="401"\} [1-9]', metrics, re.M), metrics


def test_the_cli_installs_through_passed_descriptors(agent: Agent, tmp_path: Path) -> None:
    """`edge-agent install DIR` from a directory the agent could not open by path."""
    private = tmp_path / "private"
    shutil.copytree(agent.v2, private)
    private.chmod(0o700)
    threads_before = threading.active_count()
    try:
        res = agent.proc.cli("install", str(private), "--json")
        assert res.returncode == 0, res.stdout + res.stderr
        assert json.loads(res.stdout)["version"] == 2
    finally:
        private.chmod(0o755)
    wait_for(lambda: agent.served_version() == 2, timeout=30, what="v2 served")
    res = agent.proc.cli("rollback", "--model", "m")  # the admin socket, as the agent's own user
    assert res.returncode == 0, res.stderr
    assert agent.served_version() == 1
    assert threading.active_count() == threads_before
