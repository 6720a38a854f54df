"""Keeping TensorFlow's and LiteRT's native log lines off the user's terminal.

TensorFlow's C++ runtime, the MLIR converter and LiteRT write to file descriptors 1 and 2 directly
(absl logs, "Saved artifact at ..." from the Keras export, delegate announcements); Python-level
redirection does not catch them, so the descriptors themselves are pointed at a scratch file.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@contextlib.contextmanager
def captured_native_output() -> Iterator[list[str]]:
    """Send fds 1 and 2 to a temporary file for the duration; the list gets the captured lines after."""
    lines: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    python_level = io.StringIO()  # print() goes here when sys.stdout is not fd 1 (pytest's capsys)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(python_level), \
                    contextlib.redirect_stderr(python_level):
                warnings.simplefilter("ignore")
                yield lines
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines())
            lines.extend(python_level.getvalue().splitlines())


def import_tensorflow() -> Any:
    """Import TensorFlow (and Keras) without the start-up chatter on the terminal."""
    if "tensorflow" not in sys.modules:
        try:
            with captured_native_output():
                tf = importlib.import_module("tensorflow")
                importlib.import_module("keras")
        except ImportError as err:
            from edgefleet.errors import UsageError

            raise UsageError(f"TensorFlow is not installed ({err}); `pip install 'edgefleet[converter]'` on the "
                             "workstation (convert needs it; package, inspect, push and fleet do not)") from err
        # Keras' retracing warnings come through TensorFlow's Python logger; pruning clones trigger them.
        tf.get_logger().setLevel("ERROR")
    return sys.modules["tensorflow"]
