"""The real `edge-agent` as a process: its own config, state directory and API socket.

The process runs the installed `edgefleet.agent` with this interpreter, in the caller's working directory.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgefleet.agent.api.client import ApiClient
from edgefleet.errors import RequestError


def toml_value(v: Any) -> str:
    """A TOML literal for a Python value (strings escaped as JSON does, which TOML reads alike)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def toml(sections: dict[str, Any]) -> str:
    """TOML text for an agent config: top-level keys first, then one table per dict (any key, any value)."""
    top = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in sections.items() if not isinstance(v, dict)]
    tables = []
    for name, values in sections.items():
        if isinstance(values, dict):
            tables.append(f"[{json.dumps(name)}]")
            tables += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(top + tables) + "\n"


class AgentProcess:
    """One agent: `start()`, `cli(...)`, `client`, `stop()`, `kill()`; logs in `log_path`."""

    def __init__(self, root: Path, device_id: str = "dev-1", **sections: Any):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.socket = root / "api.sock"
        self.state_dir = root / "state"
        self.log_path = root / "agent.log"
        config: dict[str, Any] = {
            "device_id": device_id, "state_dir": str(self.state_dir),
            "api": {"socket": str(self.socket)},
            "health": {"probation_s": 2, "min_requests": 5},
            "validation": {"timeout_s": 20},
        }
        for key, value in sections.items():
            if isinstance(value, dict):
                config.setdefault(key, {}).update(value)
            else:
                config[key] = value
        security = config.setdefault("security", {})
        if not security.get("trusted_keys") and "insecure" not in security:
            # A test that gives no key checks no signatures, which the agent runs only when told so
            # (it refuses to start otherwise). Tests of signatures give keys; `insecure=False`
            # keeps the refusal for tests of it.
            security["insecure"] = True
        self.config_path = root / "agent.toml"
        self.config_path.write_text(toml(config))
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = ApiClient(socket_path=self.socket)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        env.update(extra or {})
        return env

    def start(self, wait: bool = True, env: dict[str, str] | None = None, timeout: float = 30.0) -> AgentProcess:
        """Start `edge-agent run`; with `wait`, return once /healthz answers."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgefleet.agent.cli", "--config", str(self.config_path), "run"],
                stdout=log, stderr=subprocess.STDOUT, env=self.env(env),
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.client.health()
                return
            except (RequestError, OSError):
                time.sleep(0.05)
        raise AssertionError(f"agent not ready within {timeout}s:\n{self.log()}")

    def cli(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run an `edge-agent` command against this agent's config."""
        return subprocess.run([sys.executable, "-m", "edgefleet.agent.cli", "--config", str(self.config_path), *args],
                              capture_output=True, text=True, env=self.env(env), timeout=timeout)

    def status(self) -> dict[str, Any]:
        res = self.cli("status", "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)  # type: ignore[no-any-return]

    def state_file(self) -> dict[str, Any]:
        return json.loads((self.state_dir / "state.json").read_text())  # type: ignore[no-any-return]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; return the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.client.close()

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)
