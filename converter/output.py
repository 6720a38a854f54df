"""Terminal output shared by the commands: rich consoles, JSON, option helpers."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from edgefleet.converter.tflite.interpreters import OPTION_HELP as INTERPRETERS_HELP
from edgefleet.converter.tflite.interpreters import option as interpreter_option
from edgefleet.errors import ExitCode, UsageError
from edgefleet.protocol import SigningKey, check_portable_name

N = TypeVar("N", int, float)


class _PipeConsole(Console):
    """A rich Console that leaves a closed pipe to edgectl's main, which ends every command the same way."""

    def on_broken_pipe(self) -> None:
        """Raise BrokenPipeError (rich's own handling exits 1, which reads as a failed command)."""
        self.quiet = True
        raise BrokenPipeError


def stdout_console() -> Console:
    """Console for results (tables) on stdout."""
    return _PipeConsole(highlight=False, soft_wrap=False)


def stderr_console() -> Console:
    """Console for progress and stage messages, on a duplicate of fd 2.

    Conversion sends fd 2 to a scratch file while TensorFlow talks; a console on a duplicate keeps the
    progress bar visible meanwhile.
    """
    stream = os.fdopen(os.dup(2), "w", buffering=1, closefd=True)
    return Console(file=stream, highlight=False)


def print_json(value: Any) -> None:
    """Machine-readable result on stdout."""
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def add_json(parser: argparse.ArgumentParser) -> None:
    """The `--json` flag."""
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout instead of tables")


def add_bundle_options(group: Any, *, labels_help: str, mean_help: str, std_help: str) -> None:
    """The options of the commands that write a bundle (`convert`, `package`): golden vectors,
    interpreters, latency, labels, normalisation, signing and --force, on a parser or argument group."""
    group.add_argument("--golden-samples", metavar="N", type=positive_int, default=8,
                       help="golden vectors to store (default 8)")
    group.add_argument("--interpreters", metavar="LIST", type=interpreter_option, default="auto",
                       help=INTERPRETERS_HELP)
    group.add_argument("--latency-runs", metavar="N", type=positive_int, default=100,
                       help="timed runs for host latency (100)")
    group.add_argument("--labels", metavar="FILE", help=labels_help)
    group.add_argument("--labels-output", metavar="OUTPUT",
                       help="the output the labels name classes of, as the agent names it (default: the first "
                            "output whose last dimension equals the number of labels)")
    group.add_argument("--top-k", metavar="K", type=positive_int, default=5, help="results the agent returns (default 5)")
    group.add_argument("--input-mean", metavar="M[,M...]", help=mean_help)
    group.add_argument("--input-std", metavar="S[,S...]", help=std_help)
    group.add_argument("--key", metavar="KEY", help="sign with this private key (file or keygen directory)")
    group.add_argument("--force", action="store_true", help="replace an existing output bundle")


def size_text(n: int) -> str:
    """A byte count in the largest binary unit it reaches: `1.50 MiB`."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def stop_on_signals(stop: Callable[[], None], signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
                    ) -> Callable[[], None]:
    """Call `stop` on these signals instead of dying, so a long-running command ends cleanly and still
    prints its summary (systemd stops a service with SIGTERM); returns a function restoring the handlers.
    Handlers can only be set from the main thread: elsewhere nothing is changed."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.signal(s, lambda signum, frame: stop()) for s in signals}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


def model_name(text: str) -> str:
    """argparse type: a model name safe as a path component and as a topic level on every broker."""
    problem = check_portable_name(text)
    if problem:
        raise argparse.ArgumentTypeError(f"invalid model name {text!r}: {problem}")
    return text


def number_type(parse: Callable[[str], N], accept: Callable[[N], bool], unparsable: str,
                refused: str) -> Callable[[str], N]:
    """An argparse type: `parse` the text and keep the values `accept` takes.

    The messages are format strings over `text` (as given) and, for `refused`, `value` (as parsed).
    """
    def check(text: str) -> N:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(unparsable.format(text=text)) from None
        if not accept(value):
            raise argparse.ArgumentTypeError(refused.format(text=text, value=value))
        return value
    return check


version_number = number_type(int, lambda v: v >= 0, "version must be an integer, got {text!r}",
                             "version must not be negative, got {value}")
"""argparse type: a non-negative integer version."""

positive_int = number_type(int, lambda v: v >= 1, "expected an integer, got {text!r}",
                           "expected an integer >= 1, got {value}")
"""argparse type: an integer >= 1."""


def default_name(path: str) -> str:
    """A model name derived from a file name (ASCII letters, digits, '_', '-': `check_portable_name`)."""
    stem = Path(path.rstrip("/")).stem or "model"
    cleaned = "".join(c if (c.isascii() and c.isalnum()) or c in "_-" else "-" for c in stem).strip("-_")[:64] or "model"
    return cleaned if cleaned[0].isalnum() else f"m{cleaned}"[:64]


def load_key(path: str | None) -> SigningKey | None:
    """The signing key given with --key, or None."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--key {p}: no such file or directory")
    return SigningKey.load(p)


def check_output(path: str, force: bool) -> Path:
    """The bundle destination; an existing one is an error unless --force."""
    out = Path(path)
    if out.exists() and not force:
        raise UsageError(f"{out} already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a bundle directory; refusing to replace it")
    return out


def command_group(subparsers: Any, name: str, *, title: str, **kwargs: Any) -> Any:
    """Register a command with commands of its own (`fleet`, `inventory`, `broker`) and return its
    subparsers; given alone, it prints its help and exits 2."""
    parser = subparsers.add_parser(name, **kwargs)

    def show_help(args: argparse.Namespace) -> int:
        parser.print_help()
        return ExitCode.USAGE

    parser.set_defaults(func=show_help)
    return parser.add_subparsers(title=title, metavar="COMMAND")


def name_type(kind: str) -> Callable[[str], str]:
    """An argparse type for a device, group or model name, refused with the rule when unsafe on some broker."""
    def check(text: str) -> str:
        problem = check_portable_name(text)
        if problem:
            raise argparse.ArgumentTypeError(f"invalid {kind} {text!r}: {problem}")
        return text
    return check
