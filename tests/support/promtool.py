"""promtool, Prometheus's own linter, for the tests: from PATH, or extracted from Debian's `prometheus`
package into .cache/promtool/ (the package's binaries only: nothing is installed, no service starts).

`promtool_path()` skips the calling test, with the reason, when it cannot be had (not root for apt, no
apt-get or dpkg-deb, no package lists and no network to fetch them).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "promtool"
BINARY = CACHE / "promtool"


def _works(path: Path | str) -> bool:
    try:
        return subprocess.run([str(path), "--version"], capture_output=True, timeout=30).returncode == 0
    except OSError:
        return False


def _download(into: Path) -> Path | None:
    """`apt-get download prometheus` into `into`; the .deb, or None when apt cannot get it."""
    for attempt in range(2):
        done = subprocess.run(["apt-get", "download", "-q", "prometheus"], cwd=into, capture_output=True,
                              text=True, timeout=600)
        debs = sorted(into.glob("prometheus_*.deb"))
        if done.returncode == 0 and debs:
            return debs[-1]
        if attempt == 0:  # a fresh machine has no package lists yet: fetch them once and try again
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600)
    return None


def promtool_path() -> Path:
    """A working promtool, fetching it on first use; skips the test when none can be had."""
    found = shutil.which("promtool")
    if found and _works(found):
        return Path(found)
    if BINARY.exists() and _works(BINARY):
        return BINARY
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"promtool is not on PATH and cannot be fetched: no {', '.join(missing)} (not a Debian system)")
    if os.geteuid() != 0:
        pytest.skip("promtool is not on PATH and fetching Debian's prometheus package needs root (apt-get)")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download when several test processes ask at once
        if BINARY.exists() and _works(BINARY):
            return BINARY
        downloads = CACHE / "deb"
        shutil.rmtree(downloads, ignore_errors=True)
        downloads.mkdir()
        deb = _download(downloads)
        if deb is None:
            pytest.skip("promtool: `apt-get download prometheus` failed, even after `apt-get update` "
                        "(no Debian package source reachable)")
        tree = downloads / "root"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True, timeout=300)
        shutil.copy2(tree / "usr" / "bin" / "promtool", BINARY.with_suffix(".new"))
        os.replace(BINARY.with_suffix(".new"), BINARY)  # the rest of the package (the server, ~70 MB) is not kept
        shutil.rmtree(downloads, ignore_errors=True)
    if not _works(BINARY):
        pytest.fail(f"promtool extracted from Debian's prometheus package does not run: {BINARY}")
    return BINARY


def check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    """`promtool check metrics` on `text` (its exit code and its complaints, one a line)."""
    return subprocess.run([str(promtool_path()), "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)
