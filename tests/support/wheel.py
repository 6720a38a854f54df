"""The edgefleet wheel as a user builds it from a checkout, for the install tests.

The build runs on a copy of the working tree: setuptools writes build/ and *.egg-info into the source
it builds, a stale build/lib would end up in the next wheel, and an egg-info in the checkout shadows the
installed metadata for any process started there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Not part of a checkout a user builds from; copying them would only make the build slow.
NOT_SOURCE = (".git", ".venv", ".cache", ".hypothesis", ".pytest_cache", ".mypy_cache", ".ruff_cache",
              "__pycache__", "*.pyc", "build", "dist", "demo-out", "*.egg-info")


def build_wheel(workdir: Path, *pip_args: str) -> tuple[Path, str]:
    """`pip wheel --no-deps` of a copy of the working tree made in workdir: the wheel and pip's output."""
    src = workdir / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    wheels = workdir / "wheels"
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps",
                           *pip_args, "--wheel-dir", str(wheels), str(src)],
                          capture_output=True, text=True, timeout=600, cwd=workdir)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    (wheel,) = wheels.glob("edgefleet-*.whl")
    return wheel, log
