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
from typing import Any

from rich.console import Console

from edgefleet.errors import UsageError
from edgefleet.protocol import SigningKey, check_name


def stdout_console() -> Console:
    """Console for results (tables) on stdout."""
    return Console(highlight=False, soft_wrap=False)


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
    """argparse type: a model name safe as a path component and topic level."""
    problem = check_name(text)
    if problem:
        raise argparse.ArgumentTypeError(f"invalid model name {text!r}: {problem}")
    return text


def version_number(text: str) -> int:
    """argparse type: a non-negative integer version."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"version must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"version must not be negative, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def default_name(path: str) -> str:
    """A model name derived from a file name (letters, digits, '_', '.', '-')."""
    stem = Path(path.rstrip("/")).stem or "model"
    cleaned = "".join(c if c.isalnum() or c in "_.-" else "-" for c in stem).strip(".-_")[:64] or "model"
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


def name_type(kind: str) -> Callable[[str], str]:
    """An argparse type for a device, group or model name, refused with the reason when unsafe."""
    def check(text: str) -> str:
        problem = check_name(text)
        if problem:
            raise argparse.ArgumentTypeError(f"invalid {kind} {text!r}: {problem}")
        return text
    return check
