"""The phases of a model's update lifecycle (docs/protocol.md §3.4), as the agent saves and reports them.

``IDLE → DOWNLOADING → VERIFYING → VALIDATING → [SHADOW →] ACTIVATING → PROBATION → COMMITTED``, or
``→ REJECTED`` (never activated) / ``→ ROLLED_BACK`` (previous model restored). SHADOW happens only
when the deployment's policy asks for it. Both halves read them: the agent
decides with them, the host tools follow rollouts by them.
"""

from __future__ import annotations

from enum import Enum


class Phase(str, Enum):
    """A model's phase. A `str` enum: the member is its own name on the wire, in events and in
    state.json, so documents written before the enum read back unchanged."""

    IDLE = "IDLE"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    VALIDATING = "VALIDATING"
    SHADOW = "SHADOW"
    ACTIVATING = "ACTIVATING"
    PROBATION = "PROBATION"
    COMMITTED = "COMMITTED"
    REJECTED = "REJECTED"
    ROLLED_BACK = "ROLLED_BACK"

    # the name in text (logs, reasons, metric labels) on every Python version, never `Phase.IDLE`
    def __str__(self) -> str:
        return self.value

    def __format__(self, format_spec: str) -> str:
        return format(self.value, format_spec)

    @property
    def in_progress(self) -> bool:
        """An update step is running: the active model is still the old one, and a restart that finds
        the model here goes back to where it rested."""
        return self in _IN_PROGRESS

    @property
    def resting(self) -> bool:
        """No update is running and none is on trial: what the model serves is settled."""
        return self in _RESTING

    @property
    def failed(self) -> bool:
        """How a deployment ends when it does not stay: refused before activation, or rolled back."""
        return self in _FAILED


_IN_PROGRESS = frozenset({Phase.DOWNLOADING, Phase.VERIFYING, Phase.VALIDATING, Phase.SHADOW, Phase.ACTIVATING})
_RESTING = frozenset({Phase.IDLE, Phase.COMMITTED, Phase.REJECTED, Phase.ROLLED_BACK})
_FAILED = frozenset({Phase.REJECTED, Phase.ROLLED_BACK})
