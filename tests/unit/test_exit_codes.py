"""One error family, one set of exit codes: `edgectl` and `edge-agent` end the same way on the same error.

Each command line is run in this process with one command replaced by a function that raises; both
must print one `PROG: error: ...` line and exit with the code the error's class carries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent import cli as agent_cli
from edgefleet.converter import cli as edgectl_cli
from edgefleet.converter.commands import keygen
from edgefleet.converter.errors import AccuracyGateError, ConversionError
from edgefleet.errors import (
    ConfigError,
    EdgefleetError,
    ExitCode,
    InvalidInput,
    NotFound,
    ProtocolError,
    RuntimeBackendError,
    SignatureError,
    UsageError,
    exit_code,
)

CASES = [
    (UsageError("bad option"), ExitCode.USAGE),
    (ProtocolError("not a deployment document"), ExitCode.USAGE),
    (SignatureError("signature does not verify"), ExitCode.USAGE),
    (ConfigError("mqtt.url: not a broker URL"), ExitCode.USAGE),
    (InvalidInput("no such field"), ExitCode.USAGE),
    (NotFound("no model named x"), ExitCode.USAGE),
    (AccuracyGateError("accuracy dropped"), ExitCode.GATE),
    (ConversionError("TensorFlow failed"), ExitCode.FAILURE),
    (RuntimeBackendError("no interpreter"), ExitCode.FAILURE),
    (EdgefleetError("broker unreachable"), ExitCode.FAILURE),
]


def raising(err: BaseException) -> Any:
    def command(*args: Any) -> int:
        raise err

    return command


def run_edgectl(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                err: BaseException) -> tuple[int, str]:
    monkeypatch.setattr(keygen, "run", raising(err))
    rc = edgectl_cli.main(["keygen", "-o", str(tmp_path / "keys")])
    return rc, capsys.readouterr().err


def run_agent(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
              err: BaseException) -> tuple[int, str]:
    config = tmp_path / "agent.toml"
    config.write_text('device_id = "d1"\n')
    monkeypatch.setattr(agent_cli, "cmd_check_config", raising(err))
    monkeypatch.setattr(agent_cli, "setup_logging", lambda level: None)  # keeps pytest's log capture
    rc = agent_cli.main(["--config", str(config), "check-config"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("err, code", CASES, ids=[type(e).__name__ for e, _ in CASES])
def test_both_command_lines_give_an_error_the_same_exit_code(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        err: EdgefleetError, code: ExitCode) -> None:
    assert exit_code(err) == err.exit_code == code
    rc, stderr = run_edgectl(monkeypatch, capsys, tmp_path, err)
    assert (rc, stderr) == (code, f"edgectl: error: {err}\n")
    rc, stderr = run_agent(monkeypatch, capsys, tmp_path, err)
    assert (rc, stderr) == (code, f"edge-agent: error: {err}\n")
    assert not (tmp_path / "keys").exists()


def test_ctrl_c_is_130_in_both(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                               tmp_path: Path) -> None:
    assert run_edgectl(monkeypatch, capsys, tmp_path, KeyboardInterrupt())[0] == ExitCode.INTERRUPTED == 130
    assert run_agent(monkeypatch, capsys, tmp_path, KeyboardInterrupt())[0] == ExitCode.INTERRUPTED


def test_the_codes_are_the_documented_numbers() -> None:
    assert [int(c) for c in ExitCode] == [0, 1, 2, 3, 130, 141]
    assert exit_code(RuntimeError("a bug")) == ExitCode.FAILURE
