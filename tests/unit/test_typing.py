"""Strict mypy over the whole `edgefleet` package (core, agent, converter), as `make lint` runs it."""

from __future__ import annotations

from pathlib import Path

from tests.support import typecheck


def test_the_package_is_clean_under_strict_mypy() -> None:
    done = typecheck.run()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found" in done.stdout
    # Every source file of the three folders was checked, under its installed name.
    folders = ("edgefleet", "agent", "converter")
    files = sum(1 for folder in folders for _ in (typecheck.ROOT / folder).rglob("*.py"))
    assert f"in {files} source files" in done.stdout, done.stdout


def test_errors_are_reported_at_repository_paths(tmp_path: Path) -> None:
    # The check sees through the package_dir mapping: `edgefleet.agent` resolves to agent/ with its
    # types; a module mypy failed to find would be Any (ignore_missing_imports) and pass silently.
    bad = tmp_path / "bad.py"
    bad.write_text("from edgefleet.agent.config import load_config\n\nx: int = load_config\n")
    done = typecheck.run(targets=[str(bad)])
    assert done.returncode == 1, done.stdout
    assert 'bad.py:3: error: Incompatible types in assignment (expression has type "Callable' in done.stdout, done.stdout
    back = typecheck.to_repository_paths
    assert back("edgefleet/agent/daemon.py:3: error: x\n") == "agent/daemon.py:3: error: x\n"
    assert back("edgefleet/converter/cli.py:3: error: x") == "converter/cli.py:3: error: x"
    assert back("edgefleet/errors.py:1: error: x") == "edgefleet/errors.py:1: error: x"
