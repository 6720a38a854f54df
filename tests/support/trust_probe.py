"""A probe run through the validation child's own entry point (edgefleet.agent.lifecycle.validate.run_in_child), in place
of the model checks: it reports what a model that took over the interpreter could see and reach.

Run as ``python -m tests.support.trust_probe JSON`` with the environment the agent would have (credentials
directory, secrets, notify socket); prints the probe's findings as JSON. The probe itself is test
code: production never runs it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any


def _attempt(action: Callable[[], Any]) -> str:
    try:
        result = action()
    except OSError as err:
        return f"refused: {err.strerror or err}"
    return f"done: {result}"


def _connect_tcp(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=3):
        return "connected"


def _connect_unix(path: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        s.connect(path)
        return "connected"


def _write(path: str) -> str:
    with open(path, "w") as f:
        f.write("x")
    return "written"


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f"{len(f.read())} bytes"


def probe(payload: dict[str, Any], stage: Callable[[str], None]) -> dict[str, Any]:
    """What the child sees: environment, temporary directory, files, network."""
    stage("probe")
    tmpdir = os.environ.get("TMPDIR", "")
    return {
        "ok": True, "reason": "probe",
        "env": sorted(os.environ),
        "env_values": "\n".join(os.environ.values()),
        "tmpdir": tmpdir,
        "tmpdir_entries": len(os.listdir(tmpdir)) if tmpdir else -1,
        "tmpdir_mode": oct(os.stat(tmpdir).st_mode & 0o777) if tmpdir else "",
        "tmp_write": _attempt(lambda: _write(os.path.join(tmpdir, "scratch"))),
        "model_read": _attempt(lambda: _read(payload["model_path"])),
        "credential_read": _attempt(lambda: _read(payload["credential_file"])),
        "state_read": _attempt(lambda: _read(payload["state_file"])),
        "state_write": _attempt(lambda: _write(os.path.join(payload["state_dir"], "planted"))),
        "tcp": _attempt(lambda: _connect_tcp("127.0.0.1", payload["port"])),
        "unix": _attempt(lambda: _connect_unix(payload["unix_socket"])),
    }


def main(argv: list[str]) -> int:
    from edgefleet.agent.lifecycle.validate import run_in_child

    args = json.loads(argv[0])
    result = run_in_child(probe, args["payload"], files=args["files"], hide=args["hide"], timeout_s=60,
                          memory_mb=1024)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
