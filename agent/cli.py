"""`edge-agent`: the device command line (docs/install.md).

Commands that change state (`install`, `rollback`) go through the running daemon when there is one
(it holds the state directory's lock and owns state.json) and work on the state directory directly
when there is none. Exit codes (``ExitCode`` in edgefleet/errors.py, the same as edgectl's): 0 done,
1 the operation failed (a rejected model, an unreachable daemon), 2 bad input or configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet import __version__
from edgefleet.agent.config import (
    DEFAULT_PATH,
    AgentConfig,
    describe,
    insecure_warning,
    load_config,
    security_problems,
)
from edgefleet.completion import add_shell_argument
from edgefleet.completion import script as completion_script
from edgefleet.errors import EdgefleetError, ExitCode, RequestError, UsageError, exit_code, guard_pipe
from edgefleet.protocol.phases import Phase

log = logging.getLogger("edge-agent")

def setup_logging(level: str) -> None:
    """One line per record on stderr (journald adds its own timestamps; a terminal gets ours)."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    if sys.stderr.isatty():
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=getattr(logging, level.upper()), format=fmt, stream=sys.stderr, force=True)


def _client(config: AgentConfig) -> Any:
    from edgefleet.agent.api.client import ApiClient

    if config.api.socket is None:
        raise EdgefleetError("the agent is running but api.socket is disabled, so it cannot be reached")
    return ApiClient(socket_path=config.api.socket)


def _admin_client(config: AgentConfig) -> Any:
    """A client whose admin actions go to the admin socket (root and the agent's user only)."""
    from edgefleet.agent.api.client import ApiClient

    path = config.api.admin_socket_path()
    if path is None:
        raise EdgefleetError("the agent is running but api.admin_socket is disabled, so install, rollback and "
                             "status cannot reach it")
    return ApiClient(socket_path=path, admin_socket=path)


def _admin_error(err: RequestError) -> str:
    """The agent's message, with what to do when the admin socket refused this user."""
    text = str(err)
    if "Permission denied" in text or (err.status == 403 and "admin socket" in text):
        text += " (admin actions need root or the agent's own user: try sudo)"
    return text


def _daemon_running(config: AgentConfig) -> bool:
    from edgefleet.agent.lifecycle.store import Store

    store = Store.from_config(config)
    if store.try_lock():
        store.unlock()
        return False
    return True


def config_path(args: argparse.Namespace) -> str | None:
    """The configuration file a command runs with; None when there is none and the defaults apply."""
    if args.config is not None:
        return str(args.config)
    return str(DEFAULT_PATH) if DEFAULT_PATH.exists() else None


def config_source(args: argparse.Namespace) -> str:
    """Which configuration a command runs with, in words."""
    return config_path(args) or f"no {DEFAULT_PATH}: using the built-in defaults (--config FILE names another)"


def _print(data: Any, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


# --- commands ----------------------------------------------------------------------------------

def cmd_run(args: argparse.Namespace, config: AgentConfig) -> int:
    """Run the daemon in the foreground (systemd runs it this way)."""
    import faulthandler

    from edgefleet.agent.daemon import run_daemon

    faulthandler.enable()  # a watchdog abort (SIGABRT) then leaves every thread's stack in the journal
    # The same checks as check-config, before anything listens: a board that cannot verify what it
    # receives does not start. Exit 2 is the unit's RestartPreventExitStatus, so this is one failed
    # start with these lines in the journal, not a restart loop.
    problems = security_problems(config)
    if problems:
        for problem in problems:
            print(f"edge-agent: error: {problem}", file=sys.stderr)
        return ExitCode.USAGE
    return run_daemon(config)


def cmd_check_config(args: argparse.Namespace, config: AgentConfig) -> int:
    """The configuration loaded and every file it names checked: print the effective values, or every problem."""
    problems = security_problems(config)
    for problem in problems:
        print(f"edge-agent: error: {problem}", file=sys.stderr)
    if problems:
        return ExitCode.USAGE
    warning = insecure_warning(config)
    if warning:
        print(f"edge-agent: warning: {warning}", file=sys.stderr)
    _print(describe(config), args.json, f"{config_path(args) or 'built-in defaults'}: ok (device {config.device_id})"
           + (", INSECURE" if warning else ""))
    return ExitCode.OK


def cmd_install(args: argparse.Namespace, config: AgentConfig) -> int:
    """Install a bundle directory through the full lifecycle."""
    path = Path(args.bundle).resolve()
    if not path.is_dir():
        raise UsageError(f"{args.bundle}: not a bundle directory")
    if _daemon_running(config):
        try:
            body = _admin_client(config).install_bundle(path)
        except RequestError as err:
            raise (UsageError if err.status in (400, 413) else EdgefleetError)(_admin_error(err)) from err
    else:
        body = _install_offline(config, path)
    ok = not Phase(body["phase"]).failed
    text = install_line(body, ok)
    _print(body, args.json, text)
    return ExitCode.OK if ok else ExitCode.FAILURE


def install_line(body: dict[str, Any], ok: bool) -> str:
    """One line for an install's outcome: the bundle's version, and on a refusal why and what stays active
    ("version" is the active version afterwards, which is not the bundle's when it was refused)."""
    version = body.get("bundle_version", body.get("version"))
    text = f"{body.get('model')}: {body.get('phase')}" + (f" (v{version})" if version is not None else "")
    if ok:
        return text
    active = body.get("version")
    return text + f": {body.get('reason')}" + (f"; v{active} stays active" if active is not None else "")


def _install_offline(config: AgentConfig, path: Path) -> dict[str, Any]:
    from edgefleet.agent import actions
    from edgefleet.agent.lifecycle.machine import Lifecycle
    from edgefleet.agent.lifecycle.store import Store
    from edgefleet.protocol.signing import Keyring

    store = Store.from_config(config)
    if not store.try_lock():
        raise EdgefleetError("the agent started while installing; try again")
    try:
        lifecycle = Lifecycle(config, store, keyring=Keyring.from_files(config.security.trusted_keys))
        result = actions.install_path(lifecycle, path)
        body = result.to_dict()
        if result.phase is Phase.PROBATION:
            body["note"] = "probation starts when the agent runs"
        return body
    finally:
        store.unlock()


def cmd_rollback(args: argparse.Namespace, config: AgentConfig) -> int:
    """Restore the previous model of one model name."""
    if _daemon_running(config):
        try:
            body = _admin_client(config).admin("rollback", {"model": args.model} if args.model else {})
        except RequestError as err:
            raise (UsageError if err.status in (400, 404) else EdgefleetError)(_admin_error(err)) from err
    else:
        body = _rollback_offline(config, args.model)
    _print(body, args.json, f"{body['model']}: {body['phase']} (now v{body['version']})")
    return ExitCode.OK


def _rollback_offline(config: AgentConfig, name: str | None) -> dict[str, Any]:
    from edgefleet.agent import actions
    from edgefleet.agent.lifecycle.machine import Lifecycle
    from edgefleet.agent.lifecycle.store import Store

    store = Store.from_config(config)
    if not store.try_lock():
        raise EdgefleetError("the agent started meanwhile; try again")
    try:
        return actions.rollback(Lifecycle(config, store), name).to_dict()
    finally:
        store.unlock()


def cmd_status(args: argparse.Namespace, config: AgentConfig) -> int:
    """What each model is doing: from the daemon when it runs, else from state.json."""
    running = config.state_dir.exists() and _daemon_running(config)
    health = None
    if running:
        try:
            body = _admin_client(config).admin("status", {})
            state, health = body["state"], body["health"]
        except (OSError, EdgefleetError, KeyError) as err:
            log.warning("agent is running but did not answer: %s",
                        _admin_error(err) if isinstance(err, RequestError) else err)
            running = False
    if not running:
        state = _state_offline(config)
    # what the running agent says it runs with; the config file when it is not running
    insecure = bool(health.get("insecure", False)) if health else config.security.insecure
    out = {"device_id": config.device_id, "running": running, "insecure": insecure, "state": state,
           "health": health, "config": config_path(args)}
    if args.json:
        _print(out, True, "")
        return ExitCode.OK
    lines = [f"device {config.device_id}: agent {'running' if running else 'not running'}",
             f"  config: {config_source(args)}"]
    if insecure:
        lines.append("  INSECURE: security.insecure = true, unsigned documents are accepted")
    if health and health.get("reason"):
        lines.append(f"  unhealthy: {health['reason']}")
    mqtt = health.get("mqtt") if health else None
    if mqtt:
        state_text = "connected" if mqtt["connected"] else f"not connected ({mqtt.get('last_error') or 'connecting'})"
        lines.append(f"  broker {mqtt['url']}: {state_text}")
    channel = state.get("channel")
    if channel:
        freshness = "fresh" if channel["fresh"] else "STALE (expired: updates may be withheld)"
        lines.append(f"  update channel: {freshness}, last signed timestamp {channel['age_s']:.0f} s ago")
    for name, m in sorted(state.get("models", {}).items()):
        active = m.get("active")
        prev = m.get("previous")
        line = f"  {name}: {m.get('phase')}  active v{active['version']}" if active else f"  {name}: {m.get('phase')}  no active model"
        if prev:
            line += f"  previous v{prev['version']}"
        lines.append(line)
        shadow, pending = m.get("shadow"), m.get("pending")
        if shadow and pending:
            lines.append(f"    shadow: v{pending['version']} {shadow_line(shadow)}")
        drift = ((health or {}).get("models") or {}).get(name, {}).get("drift")
        if drift:
            lines.append(f"    drift: {drift_line(drift)}")
        outcome = m.get("last_outcome")
        if outcome:
            reason = f": {outcome['reason']}" if outcome.get("reason") else ""
            lines.append(f"    last: v{outcome['version']} {outcome['result']}{reason}")
    if not state.get("models"):
        lines.append("  no model installed")
    print("\n".join(lines))
    return ExitCode.OK


def drift_line(drift: dict[str, Any]) -> str:
    """`x 0.031, outputs 0.012 over 400 samples` (`DRIFTING: x` when past the threshold)."""
    scores = [f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in sorted((drift.get("inputs") or {}).items())]
    if "outputs" in drift:
        scores.append(f"outputs {drift['outputs']:.3f}")
    text = f"{', '.join(scores) or 'no scores'} over {drift.get('samples', 0)} samples"
    if drift.get("drifting"):
        text += f"; DRIFTING: {', '.join(drift['drifting'])}"
    elif all(v is None for v in (drift.get("inputs") or {}).values()):
        text += " (too few to judge yet)"
    return text


def shadow_line(shadow: dict[str, Any]) -> str:
    """`120/200 compared, agreement 98.3%, latency 1.02x, 31/600 s`: a shadow run's figures so far."""
    parts = [f"{shadow.get('samples', 0)}/{shadow.get('min_samples', '?')} compared"]
    if shadow.get("agreement") is not None:
        parts.append(f"agreement {shadow['agreement']:.1%}")
    if shadow.get("latency_ratio") is not None:
        parts.append(f"latency {shadow['latency_ratio']:.2f}x")
    parts.append(f"{shadow.get('elapsed_s', 0):.0f}/{shadow.get('window_s', 0):g} s")
    if shadow.get("dropped"):
        parts.append(f"{shadow['dropped']} dropped")
    return ", ".join(parts)


def _state_offline(config: AgentConfig) -> dict[str, Any]:
    from edgefleet.agent import actions
    from edgefleet.agent.lifecycle.machine import Lifecycle
    from edgefleet.agent.lifecycle.store import Store

    if not config.state_dir.exists():
        return {"models": {}}
    return actions.status(Lifecycle(config, Store.from_config(config))).to_dict()


def cmd_predict(args: argparse.Namespace, config: AgentConfig) -> int:
    """Run one prediction through the agent's API (or in-process when the agent is not running)."""
    if args.input:
        try:
            x: Any = np.load(args.input, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UsageError(f"{args.input}: not a readable .npy file ({err})") from err
    else:
        try:
            x = json.loads(args.input_json)
        except json.JSONDecodeError as err:
            raise UsageError(f"--input-json: not valid JSON ({err.msg})") from err
    if config.state_dir.exists() and _daemon_running(config):
        try:
            result = _client(config).predict(args.model, x.tolist() if isinstance(x, np.ndarray) else x)
        except RequestError as err:
            raise (UsageError if 400 <= err.status < 500 else EdgefleetError)(str(err)) from err
    else:
        result = _predict_offline(config, args.model, x)
    print(json.dumps(result, sort_keys=True) if args.json else prediction_lines(result))
    return ExitCode.OK


def prediction_lines(answer: dict[str, Any]) -> str:
    """One line per instance for a person: its best label when the model has labels, else its values."""
    extras = answer.get("edgefleet", {})
    top = extras.get("top_k") or []
    lines = [f"model version {extras.get('model_version')}"]
    for i, row in enumerate(answer.get("predictions", [])):
        if i < len(top) and top[i]:
            best = top[i][0]
            lines.append(f"  {i}: {best['label'] if best['label'] is not None else best['index']} "
                         f"({best['score']:.4g})")
        else:
            lines.append(f"  {i}: {json.dumps(row)}")
    return "\n".join(lines)


def _predict_offline(config: AgentConfig, name: str, x: Any) -> dict[str, Any]:
    from edgefleet.agent import actions
    from edgefleet.agent.lifecycle.machine import Lifecycle
    from edgefleet.agent.lifecycle.store import Store
    from edgefleet.agent.serving.models import Serving
    from edgefleet.agent.serving.rows import row_answer

    serving = Serving(config.runtime.backend, config.runtime.num_threads, config.runtime.use_xnnpack)
    lifecycle = Lifecycle(config, Store.from_config(config), serving=serving)
    active = lifecycle.state.record(name).active
    if active is None:
        raise UsageError(f"no active model named {name!r}")
    lifecycle.serve(name, active)
    try:
        return row_answer(actions.predict(serving, name, x.tolist() if isinstance(x, np.ndarray) else x))
    except RequestError as err:
        raise UsageError(str(err)) from err


UNIT = "edge-agent.service"
UNIT_DIRS = (Path("/etc/systemd/system"), Path("/run/systemd/system"), Path("/usr/lib/systemd/system"),
             Path("/lib/systemd/system"))
"""Where systemd finds units: install.sh puts the agent's in /usr/lib/systemd/system."""


def under_systemd() -> bool:
    """True when this agent's logs are in the journal: run by systemd (INVOCATION_ID, which systemd sets
    for a unit's processes), or on a machine where systemd runs and the agent's unit is installed."""
    if os.environ.get("INVOCATION_ID"):
        return True
    return Path("/run/systemd/system").is_dir() and any((d / UNIT).is_file() for d in UNIT_DIRS)


def journal_command(follow: bool, lines: int | None) -> list[str]:
    """The journalctl command line of `edge-agent logs`: the unit's messages with their time."""
    argv = ["journalctl", "--unit", UNIT, "--output", "short-iso"]
    if lines is not None:
        argv += ["--lines", str(lines)]
    if follow:
        argv.append("--follow")
    elif lines is None:
        argv.append("--no-pager")  # the whole journal of the unit, for grep or a file; journalctl's own pager with -n
    return argv


def cmd_logs(args: argparse.Namespace, config: AgentConfig) -> int:
    """Show the agent's log: journalctl in place of this process when systemd runs the agent."""
    if not under_systemd():
        where = (f"its warnings and errors also reach `edgectl logs --device {config.device_id}` on the broker"
                 if config.mqtt.url is not None and config.telemetry.logs else "nothing else keeps them")
        raise EdgefleetError(f"no {UNIT} here, so there is no journal to read: the agent logs to the standard error "
                             f"of its `edge-agent run` process (redirect it to a file to keep it); {where}")
    argv = journal_command(args.follow, args.lines)
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as err:
        raise EdgefleetError(f"cannot run journalctl: {err.strerror or err}; the agent's log is in the journal of "
                             f"{UNIT}") from err
    return ExitCode.FAILURE  # pragma: no cover - execvp does not return


class GlobalOptionsParser(argparse.ArgumentParser):
    """argparse with the global options on every level, so they are accepted before the command and
    after it (`edge-agent status --config X`); each command's parser is made by this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # SUPPRESS as the default: a command's parser then leaves a value given before the command alone
        self.add_argument("--config", default=argparse.SUPPRESS, help=f"configuration file (default {DEFAULT_PATH})")
        self.add_argument("--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"],
                          help="override log_level")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `edge-agent`."""
    p = GlobalOptionsParser(
        prog="edge-agent",
        description="edgefleet device agent: receives model bundles, validates them in a child process, "
                    "swaps them in atomically, serves local inference and rolls back bad models.",
        epilog="Configuration: TOML at /etc/edge-agent/agent.toml (see `check-config`). "
               "Exit codes: 0 ok, 1 operation failed, 2 bad input or configuration, 141 the output's reader "
               "went away. --config and --log-level go before or after the command.",
    )
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("run", help="run the daemon in the foreground (what systemd starts)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("install", help="install a bundle directory (the same checks as a bundle from MQTT)")
    s.add_argument("bundle", help="bundle directory written by `edgectl convert` or `edgectl package`")
    s.add_argument("--json", action="store_true", help="print the outcome as JSON")
    s.set_defaults(func=cmd_install)

    s = sub.add_parser("status", help="each model's phase, active and previous versions, last outcome")
    s.add_argument("--json", action="store_true", help="print as JSON")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("rollback", help="restore the previous version of a model")
    s.add_argument("--model", help="model name (optional when only one model is installed)")
    s.add_argument("--json", action="store_true", help="print the outcome as JSON")
    s.set_defaults(func=cmd_rollback)

    s = sub.add_parser("predict", help="run a prediction through the local API")
    s.add_argument("--model", required=True, help="model name")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--input", help=".npy file holding one input tensor (batch included)")
    g.add_argument("--input-json", metavar="JSON", help="instances as JSON, e.g. '[[0.1, 0.2]]'")
    s.add_argument("--json", action="store_true",
                   help="print the whole answer as one JSON document (default: one line per instance)")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("logs", help="the agent's log: its journal under systemd (journalctl -u edge-agent.service)")
    s.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C")
    s.add_argument("-n", "--lines", type=_positive, metavar="N", help="only the last N lines")
    s.set_defaults(func=cmd_logs)

    s = sub.add_parser("check-config", help="validate the configuration and every file it names (keys, CA, "
                                            "certificates, secrets); print the effective values or each problem")
    s.add_argument("--json", action="store_true", help="print every effective value as JSON")
    s.set_defaults(func=cmd_check_config)

    s = sub.add_parser("completion", help="print the shell completion script (bash, zsh, fish); install.sh "
                                          "installs all three")
    add_shell_argument(s)
    s.set_defaults(func=cmd_completion)
    return p


def cmd_completion(args: argparse.Namespace, config: AgentConfig | None) -> int:
    """Print the completion script; it needs no configuration (install.sh runs it before there is one)."""
    print(completion_script(build_parser(), args.shell), end="")
    return ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of `edge-agent`."""
    return guard_pipe(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.config = getattr(args, "config", None)
    if args.command == "completion":  # no configuration needed, nor read
        return cmd_completion(args, None)
    try:
        config = load_config(args.config)
    except EdgefleetError as err:
        print(f"edge-agent: error: {err}", file=sys.stderr)
        return ExitCode.USAGE
    setup_logging(getattr(args, "log_level", None) or config.log_level)
    if args.config is None and not DEFAULT_PATH.exists():
        print(f"edge-agent: warning: {config_source(args)}", file=sys.stderr)
    try:
        return int(args.func(args, config))
    except EdgefleetError as err:  # each kind carries its exit code (edgefleet/errors.py), as in edgectl
        print(f"edge-agent: error: {err}", file=sys.stderr)
        return exit_code(err)
    except KeyboardInterrupt as err:
        return exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
