"""What the agent does when asked: install a bundle, roll a model back, report its state, predict.

One implementation for every way of asking. The admin API runs these on the daemon's loop thread
(which owns the lifecycle), `edge-agent` runs them on the state directory when no daemon runs, and a
signed MQTT command rolls back through the same function, and the local API and `edge-agent predict`
share `predict`. Failures are the domain errors of edgefleet.errors (`InvalidInput`, `NotFound`,
`Conflict`): only the API turns them into HTTP statuses, only the command line into exit codes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgefleet.agent.lifecycle.machine import Lifecycle, raw_model_name
from edgefleet.agent.serving.models import Prediction, Serving
from edgefleet.agent.serving.rows import decode_binary, rows_to_columns
from edgefleet.bundle import GOLDEN_FILE, MANIFEST_FILE, MODEL_FILE, read_bundle_files
from edgefleet.errors import InvalidInput, NotFound, ProtocolError
from edgefleet.protocol.canonical import parse_json
from edgefleet.protocol.documents import ChannelState, DeviceState
from edgefleet.protocol.phases import Phase

OPERATOR_ROLLBACK = "rollback requested by the operator"


@dataclass(frozen=True)
class Result:
    """Where an install or a rollback left the model, for a person or a script."""

    model: str | None
    """None when the manifest names no usable model."""
    phase: Phase
    version: int | None
    """The active version afterwards (None: nothing is active)."""
    reason: str | None = None
    """Why an install was refused, rejected or rolled back."""
    bundle_version: int | None = None
    """An install's: the version the bundle's manifest names, which differs from `version` when the
    bundle was refused and the model active before it stays."""

    @property
    def ok(self) -> bool:
        """The deployment went on (it was neither refused nor rolled back)."""
        return not self.phase.failed

    def to_dict(self) -> dict[str, Any]:
        """The JSON answer: model, phase and version always, the reason when there is one."""
        body: dict[str, Any] = {"model": self.model, "phase": self.phase.value, "version": self.version}
        if self.reason is not None:
            body["reason"] = self.reason
        if self.bundle_version is not None:
            body["bundle_version"] = self.bundle_version
        return body


def install(lifecycle: Lifecycle, raw: Any, model: bytes, golden: bytes) -> Result:
    """Install a bundle's manifest (as read, not yet checked), model and golden vectors through the full
    lifecycle. A refused or rejected bundle is a Result too: the request worked, the model did not."""
    name = raw_model_name(raw)
    if name is None:
        unnamed = "manifest has no valid model name"
        lifecycle.emit("?", Phase.REJECTED, False, raw if isinstance(raw, dict) else None, unnamed)
        return Result(None, Phase.REJECTED, None, unnamed)
    phase = lifecycle.install_bundle(raw, model, golden)
    rec = lifecycle.state.record(name)
    reason = lifecycle.last_refusal
    if reason is None and phase.failed and rec.last_outcome is not None:
        reason = rec.last_outcome.reason
    return Result(name, phase, rec.active.version if rec.active else None, reason, _raw_version(raw))


def _raw_version(raw: Any) -> int | None:
    """The model version a raw manifest names, when it names one (it may not have passed its checks)."""
    try:
        version = raw["model"]["version"]
    except (KeyError, TypeError):
        return None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def install_path(lifecycle: Lifecycle, path: Path) -> Result:
    """Install a bundle directory; InvalidInput when its files cannot be read."""
    try:
        raw, model, golden = read_bundle_files(path)
    except ProtocolError as err:
        raise InvalidInput(str(err)) from err
    return install(lifecycle, raw, model, golden)


def install_files(lifecycle: Lifecycle, files: Mapping[str, bytes]) -> Result:
    """Install a bundle whose files were read by the caller (the API reads the descriptors `edge-agent
    install` passes); InvalidInput when the manifest is not JSON."""
    try:
        raw = parse_json(files[MANIFEST_FILE])
    except ProtocolError as err:
        raise InvalidInput(f"{MANIFEST_FILE}: {err}") from err
    return install(lifecycle, raw, files[MODEL_FILE], files[GOLDEN_FILE])


def rollback(lifecycle: Lifecycle, name: str | None, *, reason: str = OPERATOR_ROLLBACK,
             ordered_at: int = 0) -> Result:
    """Restore the previous version of `name` (None: the only model there is).

    InvalidInput when no model is named and there is not exactly one, NotFound for a model the agent
    does not know, Conflict when it keeps no previous version. `ordered_at` is the signed `issued_at`
    of the command that ordered it.
    """
    names = list(lifecycle.state.models)
    if name is None:
        if len(names) != 1:
            raise InvalidInput(f"name the model to roll back (models: {', '.join(names) or 'none'})")
        name = names[0]
    if name not in lifecycle.state.models:
        raise NotFound(f"unknown model {name!r}")
    lifecycle.rollback(name, reason, manual=True, ordered_at=ordered_at)
    rec = lifecycle.state.record(name)
    return Result(name, rec.phase, rec.active.version if rec.active else None)


def status(lifecycle: Lifecycle, channel: ChannelState | None = None) -> DeviceState:
    """The state document: every model's phase and versions, and the update channel's freshness when
    the agent has a broker."""
    return replace(lifecycle.document(), channel=channel)


def predict(serving: Serving, name: str, instances: Any, *, version: int | None = None,
            label: str | None = None, binary: bool = False) -> Prediction:
    """Run TensorFlow Serving's row format (`instances`) on what `serving` serves as `name`.

    `binary`: the values may hold ``{"b64": ...}`` for string inputs (decoded here; the API knows
    from one search of the body, so a request without any pays nothing). RequestError, with the
    status to answer with, when the request does not fit the model.
    """
    served = serving.resolve(name, version, label) if binary else None
    columns = rows_to_columns(instances)
    return serving.predict(name, decode_binary(columns, served), batch_dim=True, version=version, label=label)
