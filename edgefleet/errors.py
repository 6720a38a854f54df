"""The exception family of edgefleet, and the exit codes both command lines give it.

Every message says what is wrong and, where it helps, what to do. Each class carries the exit code
`edgectl` and `edge-agent` end with when it reaches them (`exit_code`): the two command lines print
the message as one line and map it the same way.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from enum import IntEnum
from typing import Any, ClassVar


class ExitCode(IntEnum):
    """The exit codes of `edgectl` and `edge-agent`."""

    OK = 0
    FAILURE = 1
    """The operation failed: conversion, runtime, I/O, a rejected model, an unreachable daemon."""
    USAGE = 2
    """Bad input: a missing or corrupt file, a bad option, data or configuration, a tampered bundle or
    document, a broker that cannot be reached with the given settings. Nothing was written or changed."""
    GATE = 3
    """`edgectl convert`: the accuracy gate refused the converted model; no bundle was written."""
    INTERRUPTED = 130
    """Ctrl-C (128 + SIGINT, as shells report it)."""
    BROKEN_PIPE = 141
    """The reader of the output went away (`... | head`): 128 + SIGPIPE, what a shell reports for a
    program the signal ended, without a traceback."""


class EdgefleetError(Exception):
    """Base class of every error edgefleet raises on purpose.

    A subclass names its exit code in its class line (`class E(EdgefleetError, exit_code=...)`); one
    that does not keeps its base's."""

    exit_code: ClassVar[ExitCode] = ExitCode.FAILURE

    def __init_subclass__(cls, exit_code: ExitCode | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if exit_code is not None:
            cls.exit_code = exit_code


def exit_code(err: BaseException) -> ExitCode:
    """The exit code a command line ends with when `err` reaches it."""
    if isinstance(err, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if isinstance(err, EdgefleetError):
        return err.exit_code
    return ExitCode.FAILURE


def guard_pipe(command: Callable[[], int]) -> int:
    """Run a command whose output may go to a reader that stops early (`check-config --json | head`):
    then end quietly with BROKEN_PIPE, as the programs that die of SIGPIPE do, instead of a traceback.
    Python ignores SIGPIPE, so the closed pipe shows up as BrokenPipeError on a write or the flush."""
    try:
        try:
            return command()
        finally:  # what is still buffered meets the closed pipe here, not at the interpreter's exit
            sys.stdout.flush()
    except BrokenPipeError:
        # the interpreter flushes stdout once more on exit: point it at /dev/null so that is silent too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return ExitCode.BROKEN_PIPE


class UsageError(EdgefleetError, exit_code=ExitCode.USAGE):
    """Bad input from the user (file, option, data); the command changes nothing."""


class ProtocolError(EdgefleetError, exit_code=ExitCode.USAGE):
    """A document, chunk or topic does not follow the wire contract."""


class SignatureError(ProtocolError):
    """A signature is missing, forged, or made with a key that is not trusted."""


class ChunkError(ProtocolError):
    """A chunk payload does not match its reference (hash, size or encoding)."""


class ConfigError(EdgefleetError, exit_code=ExitCode.USAGE):
    """The agent configuration is invalid; the message names the key."""


class RuntimeBackendError(EdgefleetError):
    """No interpreter backend could be loaded, or a model could not be run."""


class StoreError(EdgefleetError):
    """The on-disk model store is unusable (full disk, corrupt state, bad permissions)."""


class DeploymentRejected(EdgefleetError):
    """A deployment failed verification or validation; the message is the reason reported."""

    def __init__(self, reason: str, *, step: str = "verify", details: dict[str, object] | None = None,
                 retry: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.step = step
        self.details = details or {}
        self.retry = retry
        """True when the refusal may pass later (a clock not yet synchronised): not remembered."""


class DocumentRefused(DeploymentRejected):
    """A deployment document was not taken up: malformed, unauthenticated, for another target, or a
    replay (expired, not above the active version or the version floor). Nothing is started, so
    nothing in the saved state changes: the refusal is reported as an event at most."""


class ActionError(EdgefleetError):
    """An agent action (install, rollback, status, predict) that cannot be done as asked; nothing changed.

    Raised the same whichever way the action was asked for (the admin API, `edge-agent` on the state
    directory, a signed command): only the API turns the kind into an HTTP status, and the CLI into
    an exit code."""


class InvalidInput(ActionError, exit_code=ExitCode.USAGE):
    """The request itself is wrong: an unreadable bundle, a missing or mistyped field."""


class NotFound(ActionError, exit_code=ExitCode.USAGE):
    """The request names something the agent does not have: a model, an action."""


class Conflict(ActionError):
    """The model's state does not allow the action now (there is nothing to roll back to)."""


class Unavailable(ActionError):
    """The agent did not finish the action in time (its loop thread is busy or stuck)."""


class RequestError(EdgefleetError):
    """An inference request is malformed; carries the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class TransportError(EdgefleetError):
    """The broker cannot be reached, refused the connection, or did not acknowledge a message."""
