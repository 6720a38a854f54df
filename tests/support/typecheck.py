"""Strict mypy over the whole `edgefleet` import package: `python -m tests.support.typecheck`.

The source folders do not match the import names: setup.py installs `agent/` as `edgefleet.agent` and
`converter/` as `edgefleet.converter`, and mypy finds modules by folder (it cannot follow setuptools'
editable finder, and an installed copy would be silenced as a third-party package). So this builds, in
.cache/typecheck/, the tree that an install would produce, made of links into the repository:

    .cache/typecheck/edgefleet/<each entry of edgefleet/>  -> ../../../edgefleet/<entry>
    .cache/typecheck/edgefleet/agent                      -> ../../../agent
    .cache/typecheck/edgefleet/converter                  -> ../../../converter

runs `mypy -p edgefleet` there with the settings of [tool.mypy] in pyproject.toml, and writes the
report with repository paths (`edgefleet/agent/x.py` -> `agent/x.py`) so editors and readers can jump
to the file. The exit code is mypy's: 0 when clean. The links are brought up to date on every run
(files come and go); mypy's incremental cache in .cache/mypy keeps reruns fast.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TREE = ROOT / ".cache" / "typecheck"
CACHE = ROOT / ".cache" / "mypy"
# Import name -> repository folder, as in setup.py's package_dir.
SUBPACKAGES = {"agent": "agent", "converter": "converter"}
_BACK = re.compile(r"(?m)^edgefleet/(" + "|".join(SUBPACKAGES) + r")/")


def build_tree() -> Path:
    """The link tree rooted at .cache/typecheck; returns the folder to run mypy in."""
    package = TREE / "edgefleet"
    package.mkdir(parents=True, exist_ok=True)
    core = ROOT / "edgefleet"
    links = {e.name: os.path.relpath(e, package) for e in core.iterdir() if e.name != "__pycache__"}
    links.update({name: os.path.relpath(ROOT / folder, package) for name, folder in SUBPACKAGES.items()})
    for entry in package.iterdir():
        if entry.name not in links or not entry.is_symlink() or os.readlink(entry) != links[entry.name]:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    for name, target in links.items():
        link = package / name
        if not link.is_symlink():
            link.symlink_to(target)
    return TREE


def to_repository_paths(report: str) -> str:
    return _BACK.sub(lambda m: SUBPACKAGES[m.group(1)] + "/", report)


def run(extra: Sequence[str] = (), targets: Sequence[str] = ("-p", "edgefleet")) -> subprocess.CompletedProcess[str]:
    """mypy with the given flags over `targets` (the whole package unless told otherwise)."""
    cwd = build_tree()
    cmd = [
        sys.executable, "-m", "mypy",
        "--config-file", str(ROOT / "pyproject.toml"),
        "--cache-dir", str(CACHE),
        *extra,
        *targets,
    ]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    done.stdout = to_repository_paths(done.stdout)
    done.stderr = to_repository_paths(done.stderr)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    done = run(sys.argv[1:] if argv is None else argv)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
