"""Home Assistant itself, for checking our MQTT discovery messages with its own schemas and templates.

Home Assistant pins dozens of packages (cryptography, aiohttp, jinja2, urllib3...) that must not
replace the project's, so it gets its own virtual environment in .cache/homeassistant/, made on
first use with pip from the package index. HA_VERSION is the last release that runs on Python 3.11
(the project's Python); its MQTT integration needs paho-mqtt 1.6.1, which it lists in its manifest.
`validate()` runs tests/support/ha_validate.py inside that environment.
"""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
HA_VERSION = "2024.3.3"
PACKAGES = [f"homeassistant=={HA_VERSION}", "paho-mqtt==1.6.1"]
CACHE = ROOT / ".cache" / "homeassistant"
VENV = CACHE / f"venv-{HA_VERSION}"
PYTHON = VENV / "bin" / "python"
VALIDATOR = Path(__file__).resolve().parent / "ha_validate.py"


def _ready() -> bool:
    if not (VENV / ".complete").exists():
        return False
    probe = subprocess.run([str(PYTHON), "-c", "import homeassistant.components.mqtt.sensor"],
                           capture_output=True, timeout=120)
    return probe.returncode == 0


def ha_python() -> Path:
    """The interpreter of the Home Assistant environment, creating it on first use (a few minutes);
    skips the test, with pip's last words, when the package index cannot be reached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _ready():
            return PYTHON
        base = getattr(sys, "_base_executable", sys.executable)  # a venv of the real interpreter, not of ours
        subprocess.run([base, "-m", "venv", "--clear", str(VENV)], check=True, timeout=300)
        done = subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                               *PACKAGES], capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            pytest.skip(f"cannot install Home Assistant {HA_VERSION} from the package index: {' | '.join(tail)}")
        (VENV / ".complete").touch()
    if not _ready():
        pytest.fail(f"Home Assistant {HA_VERSION} installed in {VENV} but its MQTT integration does not import")
    return PYTHON


def validate(messages: list[tuple[str, bytes]], telemetry: list[bytes], status: list[bytes],
             availability: list[bytes]) -> dict[str, Any]:
    """Check discovery messages with Home Assistant's own code; see tests/support/ha_validate.py for the answer."""
    request = {
        "messages": [[t, p.decode()] for t, p in messages],
        "telemetry": [p.decode() for p in telemetry],
        "status": [p.decode() for p in status],
        "availability": [p.decode() for p in availability],
    }
    done = subprocess.run([str(ha_python()), str(VALIDATOR)], input=json.dumps(request), capture_output=True,
                          text=True, timeout=300, cwd=CACHE)
    assert done.returncode == 0, done.stderr[-3000:]
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer
