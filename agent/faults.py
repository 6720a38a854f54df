"""Crash points for the crash-safety tests: ``EDGEFLEET_FAULT=name`` (or ``name#n``, the n-th time)
makes the agent kill itself with SIGKILL when it reaches that point, as a power cut would. Names
starting with ``stall:`` freeze the calling thread instead, as a deadlock would.

Unset (always, in production) the check is one dictionary lookup of a constant.
"""

from __future__ import annotations

import os
import signal
import threading

_SPEC = os.environ.get("EDGEFLEET_FAULT")
_NAME, _, _NTH = (_SPEC or "").partition("#")
_TARGET = int(_NTH) if _NTH.isdigit() else 1
_hits = 0


def point(name: str) -> None:
    """Die here if this is the configured crash point."""
    global _hits
    if _SPEC is None or name != _NAME:
        return
    _hits += 1
    if _hits == _TARGET:
        if name.startswith("stall:"):
            threading.Event().wait()
        os.kill(os.getpid(), signal.SIGKILL)
