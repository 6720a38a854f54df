"""The update lifecycle of every model name, as an explicit state machine (docs/architecture.md, "The update lifecycle").

``IDLE → DOWNLOADING → VERIFYING → VALIDATING → ACTIVATING → PROBATION → COMMITTED``, or ``→ REJECTED``
(never activated) / ``→ ROLLED_BACK`` (previous model restored). One thread owns a `Lifecycle`; it
never talks to the network: every step is reported through the `emit` callback, and the owner
publishes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from edgefleet.agent import faults
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.lifecycle.store import (
    STABLE_PHASES,
    Activation,
    AgentState,
    Installed,
    ModelRecord,
    Probation,
    Store,
)
from edgefleet.agent.lifecycle.validate import ValidationRequest, validate

from edgefleet import __version__
from edgefleet.errors import (
    DeploymentRejected,
    DocumentRefused,
    EdgefleetError,
    ProtocolError,
    SignatureError,
    StoreError,
)
from edgefleet.protocol.documents import Command, Deployment, DeviceState, Event, ModelState, Outcome, Phase
from edgefleet.protocol.signing import Keyring

log = logging.getLogger(__name__)

MAX_CHUNK_SIZE = 4 << 20
ACTION_WINDOW_S = 3600.0
# Commands are short-lived orders: a bounded validity keeps the replay memory bounded too.
MAX_COMMAND_VALIDITY_S = 86400
# Applied command ids are remembered until they expire; more than this many unexpired ones at once
# would let the oldest be replayed, so the bound is far above any operator's command rate.
MAX_COMMANDS_KEPT = 4096
# Reasons travel in every event and in the retained state document.
MAX_REASON = 500
# Failures that say the model itself is unfit: they raise the version floor.
FLOOR_STEPS = ("VALIDATING", "ACTIVATING")


class StatsLike(Protocol):
    """What probation reads from the serving path."""

    @property
    def count(self) -> int: ...  # noqa: D102
    @property
    def errors(self) -> int: ...  # noqa: D102
    def snapshot(self, window_s: float | None = None) -> Any: ...  # noqa: D102
    def in_flight(self) -> list[float]: ...  # noqa: D102


class ServedLike(Protocol):
    """A model the serving path holds."""

    @property
    def stats(self) -> StatsLike: ...  # noqa: D102


class ServingLike(Protocol):
    """The serving path as the lifecycle uses it."""

    def activate(self, name: str, model_path: Path, deployment: Deployment) -> None: ...  # noqa: D102
    def deactivate(self, name: str) -> None: ...  # noqa: D102
    def served(self, name: str) -> ServedLike | None: ...  # noqa: D102


@dataclass(frozen=True)
class Limits:
    """Probation limits after a deployment's signed policy has tightened the config's."""

    probation_s: float
    max_error_rate: float
    max_latency_ratio: float
    hang_timeout_s: float
    min_requests: int

    @classmethod
    def effective(cls, config: AgentConfig, doc: Deployment) -> Limits:
        """Config limits, tightened (never loosened) by the policy."""
        h, p = config.health, doc.policy
        return cls(
            probation_s=max(h.probation_s, p.probation_s or 0.0),
            max_error_rate=min(h.max_error_rate, p.max_error_rate if p.max_error_rate is not None else 1.0),
            max_latency_ratio=min(h.max_latency_ratio, p.max_latency_ratio or float("inf")),
            hang_timeout_s=min(h.hang_timeout_s, p.hang_timeout_s or float("inf")),
            min_requests=h.min_requests,
        )


class Lifecycle:
    """Owns state.json and decides, for every model name, what is served."""

    def __init__(self, config: AgentConfig, store: Store, *, keyring: Keyring | None = None,
                 serving: ServingLike | None = None, emit: Callable[[Event], None] | None = None,
                 clock: Callable[[], float] = time.time, heartbeat: Callable[[], None] | None = None):
        self.config = config
        self.store = store
        self.keyring = keyring or Keyring()
        self.serving = serving
        self._emit = emit or (lambda event: None)
        self.clock = clock
        self.heartbeat = heartbeat
        self.state: AgentState = store.load()
        self.progress: dict[str, float] = {}
        self.unhealthy: str | None = None
        self.last_refusal: str | None = None
        """Reason of the last document refused by `precheck` (nothing is saved for those)."""

    # --- reporting -----------------------------------------------------------------------------

    def emit(self, name: str, step: Phase, ok: bool, doc: Deployment | dict[str, Any] | None = None,
             reason: str | None = None, **details: Any) -> None:
        """Report one lifecycle step."""
        reason = _clip(reason)
        dep_id = version = None
        if isinstance(doc, Deployment):
            dep_id, version = doc.deployment_id, doc.model.version
        elif isinstance(doc, dict):
            dep_id = doc.get("deployment_id") if isinstance(doc.get("deployment_id"), str) else None
            model = doc.get("model")
            v = model.get("version") if isinstance(model, dict) else None
            version = v if isinstance(v, int) and not isinstance(v, bool) else None
        event = Event(ts=self.clock(), device_id=self.config.device_id, model=name, step=step, ok=ok,
                      deployment_id=dep_id, version=version, reason=reason, details=details)
        level = logging.INFO if ok else logging.WARNING
        log.log(level, "model %s: %s%s%s", name, step, f" v{version}" if version is not None else "",
                f": {reason}" if reason else "")
        try:
            self._emit(event)
        except Exception:  # a broken publisher must never break the lifecycle
            log.exception("event handler failed")

    def document(self) -> DeviceState:
        """The retained state document (docs/protocol.md §3.4)."""
        models = {}
        for name, rec in self.state.models.items():
            pending = None
            if rec.pending is not None:
                try:
                    pending = Installed(deployment=rec.pending, installed_at=0).slot()
                except (KeyError, TypeError, ValueError):
                    pending = None
            models[name] = ModelState(
                phase=rec.phase, active=rec.active.slot() if rec.active else None,
                previous=rec.previous.slot() if rec.previous else None, pending=pending,
                last_outcome=rec.last_outcome, progress=self.progress.get(name),
            )
        return DeviceState(device_id=self.config.device_id, ts=self.clock(), agent_version=__version__,
                           models=models)

    def _save(self, state: AgentState) -> None:
        self.store.save(state)
        self.state = state

    def _set_phase(self, name: str, phase: Phase, **changes: Any) -> None:
        rec = replace(self.state.record(name), phase=phase, **changes)
        self._save(self.state.with_record(name, rec))

    # --- start and stop ------------------------------------------------------------------------

    def boot(self) -> None:
        """Start of the daemon: count a death during probation or activation, finish interrupted steps, load
        active models."""
        died = self.state.running
        state = replace(self.state, running=True)
        to_roll_back = []
        to_reject = []
        for name, rec in state.models.items():
            act = rec.activation
            if died and rec.phase == "ACTIVATING" and rec.pending is not None and act is not None \
                    and act.deployment_id == rec.pending.get("deployment_id"):
                # killed (or hung until the watchdog killed it) while the serving path loaded the new
                # model: counted like a death on probation, so a retained document cannot restart it forever
                act = replace(act, deaths=act.deaths + 1)
                log.warning("model %s: agent died while activating %s (%d time(s))", name, act.deployment_id,
                            act.deaths)
                rec = replace(rec, activation=act)
                if act.deaths >= self.config.health.max_boot_failures:
                    to_reject.append((name, rec.pending, act.deaths))
            if rec.phase in ("DOWNLOADING", "VERIFYING", "VALIDATING", "ACTIVATING"):
                # the step was interrupted before the atomic switch: the active model is still the old one
                rec = replace(rec, phase=_resting_phase(rec, "COMMITTED" if rec.active else "IDLE"), pending=None)
            if rec.phase == "PROBATION" and rec.probation is not None:
                prob = rec.probation
                if died and prob.started_at is not None:
                    prob = replace(prob, boot_failures=prob.boot_failures + 1)
                    log.warning("model %s: agent died during probation (%d time(s))", name, prob.boot_failures)
                if prob.boot_failures >= self.config.health.max_boot_failures:
                    to_roll_back.append((name, prob.boot_failures))
                elif prob.started_at is None:
                    prob = replace(prob, started_at=self.clock())
                rec = replace(rec, probation=prob)
            state = state.with_record(name, rec)
        self._save(state)
        for name, raw, deaths in to_reject:
            self.reject(name, raw, DeploymentRejected(
                f"the agent died {deaths} time(s) while activating this model (loading or warming it up in the "
                "serving path kills or hangs the agent)", step="ACTIVATING", details={"activation_deaths": deaths}))
        for name, failures in to_roll_back:
            self.rollback(name, f"agent died {failures} time(s) during probation", figures={"boot_failures": failures})
        if self.serving is not None:
            for name, rec in self.state.models.items():
                if rec.active is not None:
                    try:
                        self.serving.activate(name, self.store.blob_path(rec.active.sha256), rec.active.doc)
                    except EdgefleetError as err:
                        log.error("model %s: cannot serve v%s: %s", name, rec.active.version, err)
                        self.rollback(name, f"active model does not load at start: {err}")

    def shutdown(self) -> None:
        """Clean stop: the next start must not count this as a death."""
        self._save(replace(self.state, running=False))

    # --- verification --------------------------------------------------------------------------

    @property
    def enforcing(self) -> bool:
        """True unless the configuration says `insecure = true`: documents must carry a trusted signature
        (with no trusted key configured, none verifies, so the agent fails closed)."""
        return not self.config.security.insecure

    def authenticate(self, raw: Any, source: str | None) -> Deployment:
        """Parse a deployment document, verify its signature and that it is meant for this device.

        `source` is the target its topic stands for (``device:{id}`` or ``group:{name}``), or None
        for a bundle installed from disk. Raises DocumentRefused: nothing that fails here may change
        the saved state.
        """
        try:
            doc = Deployment.from_dict(raw)
        except ProtocolError as err:
            raise DocumentRefused(f"malformed deployment: {err}", step="VERIFYING") from err
        if self.enforcing:
            try:
                self.keyring.verify(raw)
            except SignatureError as err:
                raise DocumentRefused(f"signature: {err}", step="VERIFYING") from err
        self.check_target(doc.target, source)
        return doc

    def check_target(self, target: str | None, source: str | None) -> None:
        """A signed target must name the topic the document came on (or, from disk, this device)."""
        if source is not None:
            if target is None:
                if self.enforcing:
                    raise DocumentRefused(f"document names no target; a signed document for {source} must "
                                          "say so inside its signature (re-issue it with edgectl push --key)",
                                          step="VERIFYING")
            elif target != source:
                raise DocumentRefused(f"document is for {target} but was published for {source}", step="VERIFYING")
            return
        if target is None:
            return
        kind, _, who = target.partition(":")
        if (kind == "device" and who != self.config.device_id) or (kind == "group" and who not in self.config.groups):
            raise DocumentRefused(f"document is for {target}, not this device ({self.config.device_id}, groups: "
                                  f"{', '.join(self.config.groups) or 'none'})", step="VERIFYING")

    def precheck(self, raw: Any, source: str | None = None, *, continuing: bool = False) -> Deployment | None:
        """Checks that need only the document; None when there is nothing to do (already active or pending).

        Raises DocumentRefused when the document is not taken up (see `authenticate`, expiry, versions,
        limits) and leaves the saved state as it was. `continuing` is for the deployment that is itself
        pending (its download just finished).
        """
        doc = self.authenticate(raw, source)
        name = doc.model.name
        if name not in self.state.models and len(self.state.models) >= self.config.store.max_models:
            raise DocumentRefused(f"model {name}: this agent already keeps {len(self.state.models)} models "
                                  f"(store.max_models)", step="VERIFYING")
        rec = self.state.record(name)
        if rec.active is not None and rec.active.deployment_id == doc.deployment_id:
            return None
        if not continuing and rec.pending is not None and rec.pending.get("deployment_id") == doc.deployment_id:
            return None
        now = self.clock()
        if now > doc.expires_at:
            raise DocumentRefused(f"document expired at {doc.expires_at} (now {int(now)})", step="VERIFYING")
        if doc.issued_at > now + self.config.security.max_clock_skew_s:
            raise DocumentRefused(f"document not yet valid: issued_at {doc.issued_at} is in the future "
                                  f"(now {int(now)}; is the clock synchronised?)", step="VERIFYING", retry=True)
        active_issued = int(rec.active.deployment.get("issued_at", 0)) if rec.active is not None else 0
        if rec.active is not None and rec.active.sha256 == doc.model.artifact.sha256 \
                and rec.active.version == doc.model.version:
            if doc.issued_at > active_issued:  # a re-issue of what runs (new expiry, policy or target)
                self._adopt(doc, raw)
            return None
        if doc.model.version <= rec.floor and not (doc.policy.allow_downgrade and doc.issued_at > rec.floor_at):
            raise DocumentRefused(
                f"version {doc.model.version} is at or below the version floor {rec.floor} (a version that failed "
                f"here); only a document issued after {rec.floor_at} with allow_downgrade lifts it", step="VERIFYING")
        if rec.active is not None and doc.model.version <= rec.active.version:
            if not doc.policy.allow_downgrade:
                raise DocumentRefused(
                    f"version {doc.model.version} is not above the active version {rec.active.version} "
                    "and the document does not allow a downgrade", step="VERIFYING")
            if doc.issued_at <= active_issued:
                raise DocumentRefused(
                    f"a downgrade to version {doc.model.version} must be issued after the active version's "
                    f"document (issued_at {active_issued}); this one was issued at {doc.issued_at}",
                    step="VERIFYING")
        recent = [t for t in rec.attempts if now - t < ACTION_WINDOW_S]
        if not continuing and len(recent) >= self.config.health.max_updates_per_hour:
            wait = ACTION_WINDOW_S - (now - min(recent))
            raise DocumentRefused(
                f"{len(recent)} updates of {doc.model.name} in the last hour (limit "
                f"{self.config.health.max_updates_per_hour}); trying again in {wait / 60:.0f} min",
                step="VERIFYING", retry=True)
        sec = self.config.security
        for label, art in (("model", doc.model.artifact), ("golden", doc.model.golden)):
            if art.size > sec.max_artifact_bytes:
                raise DocumentRefused(f"{label} artifact is {art.size} bytes, above the limit of "
                                      f"{sec.max_artifact_bytes}", step="VERIFYING")
            if len(art.chunks) > sec.max_chunks:
                raise DocumentRefused(f"{label} artifact has {len(art.chunks)} chunks, above the limit of "
                                      f"{sec.max_chunks}", step="VERIFYING")
            if art.chunk_size > MAX_CHUNK_SIZE:
                raise DocumentRefused(f"{label} chunk size {art.chunk_size} is above {MAX_CHUNK_SIZE}",
                                      step="VERIFYING")
            if not art.chunks:
                raise DocumentRefused(f"{label} artifact lists no chunks", step="VERIFYING")
        return doc

    def note_source(self, name: str, source: str, issued_at: int) -> None:
        """A verified document of `source` for a known model: remember the newest `issued_at` (an unknown
        model gets no record from a document until its deployment starts)."""
        rec = self.state.models.get(name)
        if rec is None or rec.sources.get(source, -1) >= issued_at:
            return
        self._save(self.state.with_record(name, replace(rec, sources={**rec.sources, source: issued_at})))

    def abandon(self, name: str, raw: dict[str, Any], err: DeploymentRejected) -> None:
        """A started download failed (a stall, a chunk that does not verify, a full disk): back to where the
        model was, reported, and nothing learnt about the model, so neither its outcome nor its floor."""
        rec = self.state.record(name)
        self.progress.pop(name, None)
        if rec.pending is not None and rec.pending.get("deployment_id") == raw.get("deployment_id"):
            self._set_phase(name, _resting_phase(rec, "COMMITTED" if rec.active else "IDLE"), pending=None)
        self.emit(name, "REJECTED", False, raw, err.reason, failed_step=err.step, **_scalars(err.details))

    def mark_withdrawn(self, name: str, source: str, issued_at: int) -> None:
        """A signed withdrawal of `source`'s document for a known model: documents of that source issued
        no later are not taken up again (an unknown model gets no record from a withdrawal)."""
        rec = self.state.models.get(name)
        if rec is None or rec.withdrawn.get(source, -1) >= issued_at:
            return
        self._save(self.state.with_record(name, replace(rec, withdrawn={**rec.withdrawn, source: issued_at})))

    def refused(self, name: str, raw: Any, err: DeploymentRejected) -> None:
        """Report a document that was not taken up: one event, and nothing saved."""
        self.last_refusal = _clip(err.reason)
        self.emit(name, "REJECTED", False, raw if isinstance(raw, dict) else None, err.reason,
                  failed_step=err.step, refused=True, **_scalars(err.details))

    def withdraw(self, name: str, doc: Deployment, reason: str) -> None:
        """A pending deployment was called off before it was installed: back to where the model was."""
        rec = self.state.record(name)
        if rec.pending is None or rec.pending.get("deployment_id") != doc.deployment_id:
            return
        self.progress.pop(name, None)
        self._set_phase(name, _resting_phase(rec, "COMMITTED" if rec.active else "IDLE"), pending=None)
        self.emit(name, "DOWNLOADING", False, doc, reason)

    def _adopt(self, doc: Deployment, raw: dict[str, Any]) -> None:
        """A new document (a re-issue: new id, expiry or policy) for the model already running: take it over."""
        name = doc.model.name
        rec = self.state.record(name)
        assert rec.active is not None
        self._save(self.state.with_record(name, replace(rec, active=replace(rec.active, deployment=raw))))
        self.emit(name, rec.phase, True, doc, None, adopted=True)

    def reject(self, name: str, raw: Any, err: DeploymentRejected) -> None:
        """End a started deployment as REJECTED: the active model is untouched.

        A refusal of the model itself (validation, activation) raises the version floor, so the same
        version is never tried again; a failure of the download or the store does not (it says nothing
        about the model, and a stalled or tampered download is tried again later).
        """
        dep_id = raw.get("deployment_id") if isinstance(raw, dict) else None
        dep_id = dep_id if isinstance(dep_id, str) and len(dep_id) <= 128 else None
        pending = self.state.record(name).pending if name in self.state.models else None
        if isinstance(err, DocumentRefused) and (pending is None or dep_id is None
                                                 or pending.get("deployment_id") != dep_id):
            self.refused(name, raw, err)
            return
        version = raw.get("model", {}).get("version") if isinstance(raw, dict) and isinstance(
            raw.get("model"), dict) else None
        version = version if isinstance(version, int) and not isinstance(version, bool) else -1
        issued = raw.get("issued_at") if isinstance(raw, dict) else None
        issued = issued if isinstance(issued, int) and not isinstance(issued, bool) else 0
        self.progress.pop(name, None)
        if name in self.state.models or name == raw_model_name(raw):
            rec = self.state.record(name)
            outcome = Outcome(deployment_id=dep_id or "?", version=version, result="rejected",
                              reason=_clip(err.reason), ts=self.clock(), figures=_scalars(err.details))
            rec = replace(rec, phase=_resting_phase(rec, "REJECTED"), pending=None, last_outcome=outcome)
            if err.step in FLOOR_STEPS and not err.retry:
                rec = _raise_floor(rec, version, issued)
            self._save(self.state.with_record(name, rec))
        self.emit(name, "REJECTED", False, raw if isinstance(raw, dict) else None, err.reason,
                  failed_step=err.step, **_scalars(err.details))
        self.store.prune(self.state)  # a refused model's artifacts are stored before validation

    # --- commands ------------------------------------------------------------------------------

    def check_command(self, raw: Any) -> Command:
        """Verify a command (schema, signature, addressee, validity window, replay) and remember its id."""
        try:
            cmd = Command.from_dict(raw)
        except ProtocolError as err:
            raise DeploymentRejected(f"malformed command: {err}", step="VERIFYING") from err
        if self.enforcing:
            try:
                self.keyring.verify(raw)
            except SignatureError as err:
                raise DeploymentRejected(f"command signature: {err}", step="VERIFYING") from err
        now = self.clock()
        if cmd.device_id != self.config.device_id:
            raise DeploymentRejected(f"command is addressed to {cmd.device_id}, not {self.config.device_id}")
        if now > cmd.expires_at:
            raise DeploymentRejected(f"command expired at {cmd.expires_at} (now {int(now)})")
        if cmd.issued_at > now + self.config.security.max_clock_skew_s:
            raise DeploymentRejected(f"command not yet valid: issued_at {cmd.issued_at} is in the future")
        if cmd.expires_at - cmd.issued_at > MAX_COMMAND_VALIDITY_S:
            raise DeploymentRejected(f"command is valid for {cmd.expires_at - cmd.issued_at}s, more than the "
                                     f"{MAX_COMMAND_VALIDITY_S}s a command may be")
        if cmd.command_id in self.state.commands:
            raise DeploymentRejected(f"command {cmd.command_id} was already applied (replay)")
        seen = {k: v for k, v in self.state.commands.items() if v >= now}
        seen[cmd.command_id] = cmd.expires_at
        if len(seen) > MAX_COMMANDS_KEPT:
            seen = dict(sorted(seen.items(), key=lambda kv: kv[1])[-MAX_COMMANDS_KEPT:])
        self._save(replace(self.state, commands=seen))
        return cmd

    # --- the update path -----------------------------------------------------------------------

    def begin(self, doc: Deployment, raw: dict[str, Any], phase: Phase = "DOWNLOADING") -> None:
        """Record a deployment as pending (before its download or install), counting the attempt."""
        now = self.clock()
        attempts = tuple(t for t in (*self.state.record(doc.model.name).attempts, now) if now - t < ACTION_WINDOW_S)
        self.progress[doc.model.name] = 0.0
        self._set_phase(doc.model.name, phase, pending=raw, attempts=attempts)
        self.emit(doc.model.name, phase, True, doc)

    def install(self, raw: dict[str, Any], model: bytes | None, golden: bytes | None, *,
                source: str | None = None) -> Phase:
        """Run a deployment whose artifacts are in hand (or, given as None, verified in the blob store).

        `source` is the target of the topic a downloaded document came on (None: a bundle from disk).
        Returns REJECTED if this deployment was refused, else the phase the model is in afterwards.
        """
        name = raw_model_name(raw) or "?"
        self.last_refusal = None
        try:
            doc = self.precheck(raw, source, continuing=True)
            if doc is None:
                log.info("model %s: deployment %s needs no action", name, raw.get("deployment_id"))
                return self.state.record(name).phase
            if self.state.record(name).pending is None or \
                    self.state.record(name).pending.get("deployment_id") != doc.deployment_id:  # type: ignore[union-attr]
                self.begin(doc, raw, "VERIFYING")
            else:
                self._set_phase(name, "VERIFYING")
                self.emit(name, "VERIFYING", True, doc)
            faults.point("install:begun")
            if model is not None and golden is not None:
                self._store_artifacts(doc, model, golden)
            else:
                for label, art in (("model", doc.model.artifact), ("golden vectors", doc.model.golden)):
                    if not self.store.has_blob(art.sha256):
                        raise DeploymentRejected(f"{label} artifact {art.sha256[:12]} is not in the store",
                                                 step="VERIFYING")
            faults.point("install:stored")
            figures = self._validate(doc)
            faults.point("install:validated")
            self._activate(doc, raw, figures)
        except DeploymentRejected as err:
            self.reject(name, raw, err)
            return "REJECTED"
        except StoreError as err:
            self.reject(name, raw, DeploymentRejected(f"store: {err}", step="VERIFYING"))
            return "REJECTED"
        return self.state.record(name).phase

    def install_outcome(self, raw: Any, model: bytes | None, golden: bytes | None) -> dict[str, Any]:
        """Install, and describe the outcome for a person or a script: model, phase, version, reason."""
        name = raw_model_name(raw)
        if name is None:
            reason = "manifest has no valid model name"
            self.emit("?", "REJECTED", False, raw if isinstance(raw, dict) else None, reason)
            return {"model": None, "phase": "REJECTED", "version": None, "reason": reason}
        phase = self.install(raw, model, golden)
        rec = self.state.record(name)
        body: dict[str, Any] = {"model": name, "phase": phase, "version": rec.active.version if rec.active else None}
        if self.last_refusal is not None:
            body["reason"] = self.last_refusal
        elif phase in ("REJECTED", "ROLLED_BACK") and rec.last_outcome is not None:
            body["reason"] = rec.last_outcome.reason
        return body

    def install_stored(self, raw: dict[str, Any], source: str | None) -> Phase:
        """Continue a deployment whose artifacts were downloaded and verified into the blob store."""
        return self.install(raw, None, None, source=source)

    def _store_artifacts(self, doc: Deployment, model: bytes, golden: bytes) -> None:
        from edgefleet.bundle import check_artifact

        try:
            check_artifact("model", model, doc.model.artifact)
            check_artifact("golden vectors", golden, doc.model.golden)
        except ProtocolError as err:
            raise DeploymentRejected(str(err), step="VERIFYING") from err
        self.store.put_blob(model, doc.model.artifact.sha256)
        self.store.put_blob(golden, doc.model.golden.sha256)

    def _validate(self, doc: Deployment) -> dict[str, Any]:
        name = doc.model.name
        self._set_phase(name, "VALIDATING")
        self.emit(name, "VALIDATING", True, doc)
        rec = self.state.record(name)
        rt, val = self.config.runtime, self.config.validation
        req = ValidationRequest(
            model_path=str(self.store.blob_path(doc.model.artifact.sha256)),
            golden_path=str(self.store.blob_path(doc.model.golden.sha256)),
            deployment=doc.to_dict(), backend=rt.backend, num_threads=rt.num_threads,
            use_xnnpack=rt.use_xnnpack, latency_runs=val.latency_runs,
            baseline_model_path=str(self.store.blob_path(rec.active.sha256)) if rec.active else None,
            state_dir=str(self.store.root),
        )
        figures = validate(req, timeout_s=val.timeout_s, memory_mb=val.memory_mb, heartbeat=self.heartbeat)
        limits = [v for v in (val.max_latency_ms, doc.policy.max_latency_ms) if v is not None]
        if limits and figures["p95_ms"] > min(limits):
            raise DeploymentRejected(
                f"too slow: p95 latency {figures['p95_ms']:.3f} ms is above the limit of {min(limits):g} ms",
                step="VALIDATING", details={"p95_ms": figures["p95_ms"], "limit_ms": min(limits)})
        return figures

    def _activate(self, doc: Deployment, raw: dict[str, Any], figures: dict[str, Any]) -> None:
        name = doc.model.name
        rec = self.state.record(name)
        # saved before the serving path loads the model: if the agent dies in there, the next start
        # counts it against this deployment (see boot)
        prior = rec.activation
        deaths = prior.deaths if prior is not None and prior.deployment_id == doc.deployment_id else 0
        self._set_phase(name, "ACTIVATING", activation=Activation(deployment_id=doc.deployment_id, deaths=deaths))
        self.emit(name, "ACTIVATING", True, doc)
        baseline = self._baseline_p95(name, rec, figures)
        faults.point("stall:activate")
        if self.serving is not None:
            try:
                self.serving.activate(name, self.store.blob_path(doc.model.artifact.sha256), doc)
            except EdgefleetError as err:
                raise DeploymentRejected(f"activation failed: {err}", step="ACTIVATING") from err
        faults.point("activate:served")
        installed = Installed(deployment=raw, installed_at=self.clock(), validation=_scalars(figures))
        started = self.clock() if self.serving is not None else None
        # last-known-good is the last model that passed probation, never one still on trial
        previous = rec.previous if rec.probation is not None or rec.active is None else rec.active
        new = replace(rec, phase="PROBATION", active=installed, previous=previous, pending=None, activation=None,
                      probation=Probation(started_at=started, baseline_p95_ms=baseline))
        if rec.active is not None and doc.model.version < rec.active.version:
            # a signed downgrade: the version left behind must not come back through a replay of its
            # document, only through a document issued after this one
            new = _raise_floor(new, rec.active.version, doc.issued_at)
        try:
            self._save(self.state.with_record(name, new))  # the atomic switch
        except StoreError:
            if self.serving is not None:
                self._serve(name, rec.active)
            raise
        faults.point("activate:saved")
        self.progress.pop(name, None)
        self.emit(name, "PROBATION", True, doc, None, p50_ms=figures.get("p50_ms"), p95_ms=figures.get("p95_ms"),
                  baseline_p95_ms=baseline)

    def _baseline_p95(self, name: str, rec: ModelRecord, figures: dict[str, Any]) -> float | None:
        served = self.serving.served(name) if self.serving is not None else None
        if served is not None and served.stats.count >= self.config.health.min_requests:
            snap = served.stats.snapshot(self.config.telemetry.window_s)
            p95 = getattr(snap, "p95_ms", None)
            if p95 is not None:
                return float(p95)
        base = figures.get("baseline_p95_ms")
        return float(base) if base is not None else None

    def _serve(self, name: str, inst: Installed | None) -> None:
        if self.serving is None:
            return
        if inst is None:
            self.serving.deactivate(name)
        else:
            self.serving.activate(name, self.store.blob_path(inst.sha256), inst.doc)

    # --- probation -----------------------------------------------------------------------------

    def tick(self) -> None:
        """Judge every model on probation: roll back on live evidence, commit when the window passes."""
        for name, rec in list(self.state.models.items()):
            if rec.phase != "PROBATION" or rec.active is None or rec.probation is None:
                continue
            if rec.probation.started_at is None:
                continue
            verdict = self.judge(name, rec)
            if verdict is None:
                continue
            result, reason, figures = verdict
            if result == "rollback":
                if "hung_s" in figures:
                    # the stuck thread keeps the old interpreter; only a restart of the agent frees it
                    self.unhealthy = reason
                self.rollback(name, reason, figures=figures)
            else:
                self.commit(name, figures)

    def judge(self, name: str, rec: ModelRecord) -> tuple[str, str, dict[str, Any]] | None:
        """("rollback", reason, figures), ("commit", "", figures), or None to keep watching."""
        assert rec.active is not None and rec.probation is not None and rec.probation.started_at is not None
        limits = Limits.effective(self.config, rec.active.doc)
        served = self.serving.served(name) if self.serving is not None else None
        elapsed = self.clock() - rec.probation.started_at
        figures: dict[str, Any] = {"elapsed_s": round(elapsed, 3)}
        if served is not None:
            stats = served.stats
            now = time.monotonic()
            hung = [now - t for t in stats.in_flight() if now - t > limits.hang_timeout_s]
            if hung:
                figures["hung_s"] = round(max(hung), 3)
                return "rollback", f"an invocation hung for {max(hung):.1f}s (limit {limits.hang_timeout_s:g}s)", figures
            count, errors = stats.count, stats.errors
            figures.update(requests=count, errors=errors)
            judged = count >= limits.min_requests or (elapsed >= limits.probation_s and count > 0)
            if judged:
                rate = errors / count
                figures["error_rate"] = round(rate, 4)
                if rate > limits.max_error_rate:
                    return "rollback", (f"error rate {rate:.1%} over {count} requests is above the limit of "
                                        f"{limits.max_error_rate:.1%}"), figures
            snap = stats.snapshot(None)
            p95 = getattr(snap, "p95_ms", None)
            base = rec.probation.baseline_p95_ms
            if p95 is not None:
                figures["p95_ms"] = round(float(p95), 4)
            if base is not None:
                figures["baseline_p95_ms"] = round(base, 4)
            if count >= limits.min_requests and p95 is not None and base is not None and base > 0:
                ratio = float(p95) / base
                figures["latency_ratio"] = round(ratio, 3)
                if ratio > limits.max_latency_ratio and float(p95) - base > self.config.health.latency_slack_ms:
                    return "rollback", (f"p95 latency {float(p95):.3f} ms is {ratio:.2f}x the previous model's "
                                        f"{base:.3f} ms (limit {limits.max_latency_ratio:g}x)"), figures
        if elapsed >= limits.probation_s:
            return "commit", "", figures
        return None

    def commit(self, name: str, figures: dict[str, Any] | None = None) -> None:
        """Probation passed: the active model becomes the committed one."""
        rec = self.state.record(name)
        assert rec.active is not None
        outcome = Outcome(deployment_id=rec.active.deployment_id, version=rec.active.version, result="committed",
                          ts=self.clock(), figures=_scalars(figures or {}))
        faults.point("commit:before")
        self._save(self.state.with_record(name, replace(rec, phase="COMMITTED", probation=None,
                                                        last_outcome=outcome)))
        faults.point("commit:saved")
        self.emit(name, "COMMITTED", True, rec.active.deployment, None, **_scalars(figures or {}))
        self.store.prune(self.state)

    def rollback(self, name: str, reason: str, *, figures: dict[str, Any] | None = None, manual: bool = False,
                 ordered_at: int = 0) -> None:
        """Restore the last-known-good model (no download) and raise the version floor above the failed one.

        `ordered_at` is the signed `issued_at` of the command that ordered it, if any.
        """
        rec = self.state.record(name)
        failed = rec.active
        if failed is None:
            raise StoreError(f"model {name}: nothing to roll back")
        if manual and rec.previous is None:
            raise StoreError(f"model {name}: no previous version to roll back to")
        restored = rec.previous
        faults.point("rollback:before")
        try:
            self._serve(name, restored)
        except EdgefleetError as err:
            log.error("model %s: previous model does not load either: %s", name, err)
            self._serve(name, None)
            restored = None
        now = self.clock()
        outcome = Outcome(deployment_id=failed.deployment_id, version=failed.version, result="rolled_back",
                          reason=reason, ts=now, figures=_scalars(figures or {}))
        new = _raise_floor(replace(rec, phase="ROLLED_BACK", active=restored, previous=None, probation=None,
                                   last_outcome=outcome),
                           failed.version, max(ordered_at, int(failed.deployment.get("issued_at", 0))))
        faults.point("rollback:served")
        self._save(self.state.with_record(name, new))
        faults.point("rollback:saved")
        self.emit(name, "ROLLED_BACK", False, failed.deployment, reason,
                  restored_version=restored.version if restored else None, **_scalars(figures or {}))
        self.store.prune(self.state)

    def in_probation(self) -> list[str]:
        """Names of the models on probation."""
        return [n for n, r in self.state.models.items() if r.phase == "PROBATION"]

    def stable(self, name: str) -> bool:
        """True when the model is not in the middle of an update."""
        return self.state.record(name).phase in STABLE_PHASES


def _resting_phase(rec: ModelRecord, otherwise: Phase) -> Phase:
    """Where a model rests after an update attempt ends: back on probation if its active model still is."""
    return "PROBATION" if rec.probation is not None and rec.active is not None else otherwise


def raw_model_name(raw: Any) -> str | None:
    """The model name of a raw document if it has a safe one."""
    from edgefleet.protocol.schema import check_name

    try:
        name = raw["model"]["name"]
    except (KeyError, TypeError):
        return None
    return name if isinstance(name, str) and not check_name(name) else None


def _raise_floor(rec: ModelRecord, version: int, issued_at: int) -> ModelRecord:
    """The record with its version floor at least `version`, set by a document issued at `issued_at`."""
    if version < 0:
        return rec
    return replace(rec, floor=max(rec.floor, version), floor_at=max(rec.floor_at, issued_at))


def _clip(reason: str | None, limit: int = MAX_REASON) -> str | None:
    """A reason cut to `limit` characters: refusals quote the bad value, and an attacker picks its size."""
    if reason is None or len(reason) <= limit:
        return reason
    return reason[: limit - 25] + f"... ({len(reason)} characters)"


def _scalars(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool)) or v is None}
