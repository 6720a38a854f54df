"""The errors only the converter raises; the family and the exit codes are in edgefleet/errors.py."""

from __future__ import annotations

from edgefleet.errors import EdgefleetError, ExitCode


class ConversionError(EdgefleetError):
    """TensorFlow could not convert a model for a reason that is not the user's input."""


class AccuracyGateError(EdgefleetError, exit_code=ExitCode.GATE):
    """The converted model lost more accuracy than `--max-accuracy-drop` allows; `edgectl` exits 3."""
