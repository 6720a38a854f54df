"""Errors of the host tools and the exit codes `edgectl` maps them to."""

from __future__ import annotations

from edgefleet.errors import EdgefleetError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_GATE = 3


class UsageError(EdgefleetError):
    """Bad input from the user (file, option, data); `edgectl` exits 2 and writes nothing."""


class ConversionError(EdgefleetError):
    """TensorFlow could not convert a model for a reason that is not the user's input."""


class AccuracyGateError(EdgefleetError):
    """The converted model lost more accuracy than `--max-accuracy-drop` allows; `edgectl` exits 3."""
