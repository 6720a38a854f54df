"""The exception family of edgefleet: every message says what is wrong and, where it helps, what to do."""

from __future__ import annotations


class EdgefleetError(Exception):
    """Base class of every error edgefleet raises on purpose."""


class ProtocolError(EdgefleetError):
    """A document, chunk or topic does not follow the wire contract."""


class SignatureError(ProtocolError):
    """A signature is missing, forged, or made with a key that is not trusted."""


class ChunkError(ProtocolError):
    """A chunk payload does not match its reference (hash, size or encoding)."""


class ConfigError(EdgefleetError):
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


class RequestError(EdgefleetError):
    """An inference request is malformed; carries the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class TransportError(EdgefleetError):
    """The broker cannot be reached, refused the connection, or did not acknowledge a message."""
