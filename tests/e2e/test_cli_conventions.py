"""What both command lines do the way other command lines do: options after the command, a reader that
stops early, saying which configuration is in use, and messages that name the right version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.config import DEFAULT_PATH
from edgefleet.errors import ExitCode
from edgefleet.testing.agentproc import AgentProcess

BIN = Path(sys.executable).parent


def run(program: str, *args: object, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / program), *map(str, args)], stdout=stdout, stderr=subprocess.PIPE, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})


def closed_pipe_run(program: str, args: Sequence[object]) -> subprocess.CompletedProcess[str]:
    """Run with stdout a pipe whose reader is already gone (`... | head` once head has exited)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return run(program, *args, stdout=write)
    finally:
        os.close(write)


@pytest.fixture
def board(tmp_path: Path) -> AgentProcess:
    """An agent's configuration (the daemon is not started)."""
    return AgentProcess(tmp_path / "board", "cam-1")


def test_edge_agent_takes_its_global_options_after_the_command_too(board: AgentProcess) -> None:
    after = run("edge-agent", "status", "--config", board.config_path, "--json", "--log-level", "debug")
    assert after.returncode == 0, after.stderr
    before = run("edge-agent", "--config", board.config_path, "status", "--json")
    assert json.loads(after.stdout)["device_id"] == json.loads(before.stdout)["device_id"] == "cam-1"
    assert json.loads(after.stdout)["config"] == str(board.config_path)
    # given on both sides, the one after the command wins, as for any repeated option
    both = run("edge-agent", "--config", "/nonexistent/agent.toml", "check-config", "--config", board.config_path)
    assert both.returncode == 0 and both.stdout.startswith(f"{board.config_path}: ok"), both.stderr
    missing = run("edge-agent", "check-config", "--config", "/nonexistent/agent.toml")
    assert (missing.returncode, missing.stderr) == (ExitCode.USAGE,
                                                    "edge-agent: error: /nonexistent/agent.toml: no such file\n")


def test_edgectl_takes_verbose_after_the_command_too(tmp_path: Path) -> None:
    res = run("edgectl", "keygen", "-o", tmp_path / "keys", "-v", "--json")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "keys" / "edgefleet.key").exists() and json.loads(res.stdout)


def test_a_reader_that_went_away_ends_both_command_lines_quietly(board: AgentProcess, tmp_path: Path) -> None:
    for program, args in (("edge-agent", ("--config", board.config_path, "check-config", "--json")),
                          ("edge-agent", ("--config", board.config_path, "status")),
                          ("edgectl", ("keygen", "-o", tmp_path / "keys"))):
        res = closed_pipe_run(program, args)
        assert res.returncode == ExitCode.BROKEN_PIPE, (program, args, res.stderr)
        # no traceback, no error: only what the command warns about anyway (this board is insecure)
        assert all(line.startswith(f"{program}: warning: ") for line in res.stderr.splitlines()), res.stderr
    assert (tmp_path / "keys" / "edgefleet.key").exists()  # the work was done; only its report was lost


def test_status_names_its_configuration(board: AgentProcess) -> None:
    res = run("edge-agent", "--config", board.config_path, "status")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert res.stdout.splitlines()[:2] == ["device cam-1: agent not running", f"  config: {board.config_path}"]


@pytest.mark.skipif(DEFAULT_PATH.exists(), reason=f"{DEFAULT_PATH} exists on this machine")
def test_without_a_configuration_file_the_agent_says_it_runs_on_defaults() -> None:
    res = run("edge-agent", "status")
    assert res.returncode == 0, res.stderr
    said = f"no {DEFAULT_PATH}: using the built-in defaults (--config FILE names another)"
    assert res.stderr == f"edge-agent: warning: {said}\n"
    assert res.stdout.splitlines()[1] == f"  config: {said}"
    res = run("edge-agent", "status", "--json")
    assert json.loads(res.stdout)["config"] is None


def test_a_refused_install_names_the_bundles_version_and_what_stays_active(board: AgentProcess,
                                                                           make_bundle: Any) -> None:
    res = board.cli("install", str(make_bundle("dense_f32", version=2)))
    assert (res.returncode, res.stdout.strip()) == (0, "m: PROBATION (v2)"), res.stderr
    res = board.cli("install", str(make_bundle("dense_f32", version=1)))
    assert res.returncode == ExitCode.FAILURE
    line = res.stdout.strip()
    assert line.startswith("m: REJECTED (v1): ") and line.endswith("; v2 stays active"), line
    body = json.loads(board.cli("install", str(make_bundle("dense_f32", version=1)), "--json").stdout)
    assert (body["bundle_version"], body["version"]) == (1, 2), body
