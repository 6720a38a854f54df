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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from edgefleet import __version__
from edgefleet.agent import faults
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.lifecycle.probation import Decision, Limits, ServedLike, judge
from edgefleet.agent.lifecycle.shadow import ShadowLimits, figures_of
from edgefleet.agent.lifecycle.shadow import judge as judge_shadow
from edgefleet.agent.lifecycle.store import (
    Activation,
    AgentState,
    Installed,
    ModelRecord,
    Probation,
    Store,
)
from edgefleet.agent.lifecycle.validate import ValidationRequest, validate
from edgefleet.agent.serving.shadow import ShadowFigures
from edgefleet.errors import (
    Conflict,
    DeploymentRejected,
    DocumentRefused,
    EdgefleetError,
    ProtocolError,
    SignatureError,
    StoreError,
)
from edgefleet.protocol.documents import (
    Command,
    Deployment,
    DeviceState,
    Event,
    ModelState,
    Outcome,
    ShadowProgress,
    Signed,
    Timestamp,
    Withdrawal,
)
from edgefleet.protocol.phases import Phase
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
FLOOR_STEPS = frozenset({Phase.VALIDATING, Phase.SHADOW, Phase.ACTIVATING})
# A SHADOW event with the figures so far this often while a shadow run collects samples.
SHADOW_REPORT_S = 5.0

_D = TypeVar("_D", Deployment, Command, Withdrawal, Timestamp)


class ServingLike(Protocol):
    """The serving path as the lifecycle uses it."""

    def activate(self, name: str, model_path: Path, deployment: Deployment) -> None: ...  # noqa: D102
    def deactivate(self, name: str) -> None: ...  # noqa: D102
    def start_shadow(self, name: str, model_path: Path, deployment: Deployment, *, sample_rate: float,  # noqa: D102
                     queue_size: int, atol: float | None = None, rtol: float | None = None) -> None: ...
    def stop_shadow(self, name: str) -> None: ...  # noqa: D102
    def shadow_figures(self, name: str) -> ShadowFigures | None: ...  # noqa: D102
    def served(self, name: str) -> ServedLike | None: ...  # noqa: D102


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
        self.shadows: dict[str, _ShadowRun] = {}
        """Deployments in SHADOW, per name: kept in memory only (a restart starts their shadow run again)."""

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
                shadow=self._shadow_progress(name, rec),
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
            if died and rec.phase is Phase.ACTIVATING and rec.pending is not None and act is not None \
                    and act.deployment_id == rec.pending_id:
                # killed (or hung until the watchdog killed it) while the serving path loaded the new
                # model: counted like a death on probation, so a retained document cannot restart it forever
                act = replace(act, deaths=act.deaths + 1)
                log.warning("model %s: agent died while activating %s (%d time(s))", name, act.deployment_id,
                            act.deaths)
                rec = replace(rec, activation=act)
                if act.deaths >= self.config.health.max_boot_failures:
                    to_reject.append((name, rec.pending, act.deaths))
            if rec.phase.in_progress:
                # the step was interrupted before the atomic switch: the active model is still the old one
                rec = replace(rec, phase=_resting_phase(rec), pending=None)
            if rec.phase is Phase.PROBATION and rec.probation is not None:
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
                "serving path kills or hangs the agent)", step=Phase.ACTIVATING, details={"activation_deaths": deaths}))
        for name, failures in to_roll_back:
            self.rollback(name, f"agent died {failures} time(s) during probation", figures={"boot_failures": failures})
        if self.serving is not None:
            for name, rec in self.state.models.items():
                if rec.active is not None:
                    try:
                        self.serve(name, rec.active)
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

    def verified(self, kind: type[_D], raw: Any) -> Signed[_D]:
        """Parse a signed document of `kind` and, unless the agent runs insecure, check its signature.

        ProtocolError when it is no such document, SignatureError (a ProtocolError) when the signature
        is missing, forged or made with a key this agent does not trust."""
        signed = Signed.parse(kind, raw)
        if self.enforcing:
            self.keyring.verify(signed.raw)
        return signed

    def authenticate(self, raw: Any, source: str | None) -> Signed[Deployment]:
        """Parse a deployment document, verify its signature and that it is meant for this device.

        `source` is the target its topic stands for (``device:{id}`` or ``group:{name}``), or None
        for a bundle installed from disk. Raises DocumentRefused: nothing that fails here may change
        the saved state.
        """
        try:
            signed = self.verified(Deployment, raw)
        except SignatureError as err:
            raise DocumentRefused(f"signature: {err}", step=Phase.VERIFYING) from err
        except ProtocolError as err:
            raise DocumentRefused(f"malformed deployment: {err}", step=Phase.VERIFYING) from err
        self.check_target(signed.doc.target, source)
        return signed

    def check_target(self, target: str | None, source: str | None) -> None:
        """A signed target must name the topic the document came on (or, from disk, this device)."""
        if source is not None:
            if target is None:
                if self.enforcing:
                    raise DocumentRefused(f"document names no target; a signed document for {source} must "
                                          "say so inside its signature (re-issue it with edgectl push --key)",
                                          step=Phase.VERIFYING)
            elif target != source:
                raise DocumentRefused(f"document is for {target} but was published for {source}", step=Phase.VERIFYING)
            return
        if target is None:
            return
        kind, _, who = target.partition(":")
        if (kind == "device" and who != self.config.device_id) or (kind == "group" and who not in self.config.groups):
            raise DocumentRefused(f"document is for {target}, not this device ({self.config.device_id}, groups: "
                                  f"{', '.join(self.config.groups) or 'none'})", step=Phase.VERIFYING)

    def precheck(self, signed: Signed[Deployment], *, continuing: bool = False) -> Signed[Deployment] | None:
        """Checks of an authenticated document against the saved state; None when there is nothing to do
        (already active or pending).

        Raises DocumentRefused when the document is not taken up (expiry, versions, limits) and leaves
        the saved state as it was. `continuing` is for the deployment that is itself pending (its
        download just finished).
        """
        doc = signed.doc
        name = doc.model.name
        if name not in self.state.models and len(self.state.models) >= self.config.store.max_models:
            raise DocumentRefused(f"model {name}: this agent already keeps {len(self.state.models)} models "
                                  f"(store.max_models)", step=Phase.VERIFYING)
        rec = self.state.record(name)
        if rec.active is not None and rec.active.deployment_id == doc.deployment_id:
            return None
        if not continuing and rec.pending_id == doc.deployment_id:
            return None
        now = self.clock()
        if now > doc.expires_at:
            raise DocumentRefused(f"document expired at {doc.expires_at} (now {int(now)})", step=Phase.VERIFYING)
        if doc.issued_at > now + self.config.security.max_clock_skew_s:
            raise DocumentRefused(f"document not yet valid: issued_at {doc.issued_at} is in the future "
                                  f"(now {int(now)}; is the clock synchronised?)", step=Phase.VERIFYING, retry=True)
        active_issued = int(rec.active.deployment.get("issued_at", 0)) if rec.active is not None else 0
        if rec.active is not None and rec.active.sha256 == doc.model.artifact.sha256 \
                and rec.active.version == doc.model.version:
            if doc.issued_at > active_issued:  # a re-issue of what runs (new expiry, policy or target)
                self._adopt(signed)
            return None
        if doc.model.version <= rec.floor and not (doc.policy.allow_downgrade and doc.issued_at > rec.floor_at):
            raise DocumentRefused(
                f"version {doc.model.version} is at or below the version floor {rec.floor} (a version that failed "
                f"here); only a document issued after {rec.floor_at} with allow_downgrade lifts it", step=Phase.VERIFYING)
        if rec.active is not None and doc.model.version <= rec.active.version:
            if not doc.policy.allow_downgrade:
                raise DocumentRefused(
                    f"version {doc.model.version} is not above the active version {rec.active.version} "
                    "and the document does not allow a downgrade", step=Phase.VERIFYING)
            if doc.issued_at <= active_issued:
                raise DocumentRefused(
                    f"a downgrade to version {doc.model.version} must be issued after the active version's "
                    f"document (issued_at {active_issued}); this one was issued at {doc.issued_at}",
                    step=Phase.VERIFYING)
        recent = [t for t in rec.attempts if now - t < ACTION_WINDOW_S]
        if not continuing and len(recent) >= self.config.health.max_updates_per_hour:
            wait = ACTION_WINDOW_S - (now - min(recent))
            raise DocumentRefused(
                f"{len(recent)} updates of {doc.model.name} in the last hour (limit "
                f"{self.config.health.max_updates_per_hour}); trying again in {wait / 60:.0f} min",
                step=Phase.VERIFYING, retry=True)
        sec = self.config.security
        for label, art in (("model", doc.model.artifact), ("golden", doc.model.golden)):
            if art.size > sec.max_artifact_bytes:
                raise DocumentRefused(f"{label} artifact is {art.size} bytes, above the limit of "
                                      f"{sec.max_artifact_bytes}", step=Phase.VERIFYING)
            if len(art.chunks) > sec.max_chunks:
                raise DocumentRefused(f"{label} artifact has {len(art.chunks)} chunks, above the limit of "
                                      f"{sec.max_chunks}", step=Phase.VERIFYING)
            if art.chunk_size > MAX_CHUNK_SIZE:
                raise DocumentRefused(f"{label} chunk size {art.chunk_size} is above {MAX_CHUNK_SIZE}",
                                      step=Phase.VERIFYING)
            if not art.chunks:
                raise DocumentRefused(f"{label} artifact lists no chunks", step=Phase.VERIFYING)
        return signed

    def note_source(self, name: str, source: str, issued_at: int) -> None:
        """A verified document of `source` for a known model: remember the newest `issued_at` (an unknown
        model gets no record from a document until its deployment starts)."""
        rec = self.state.models.get(name)
        if rec is None or rec.sources.get(source, -1) >= issued_at:
            return
        self._save(self.state.with_record(name, replace(rec, sources={**rec.sources, source: issued_at})))

    def abandon(self, name: str, doc: Deployment, err: DeploymentRejected) -> None:
        """A started download failed (a stall, a chunk that does not verify, a full disk): back to where the
        model was, reported, and nothing learnt about the model, so neither its outcome nor its floor."""
        rec = self.state.record(name)
        self.progress.pop(name, None)
        if rec.pending is not None and rec.pending_id == doc.deployment_id:
            self._set_phase(name, _resting_phase(rec), pending=None)
        self.emit(name, Phase.REJECTED, False, doc, err.reason, failed_step=err.step, **_scalars(err.details))

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
        self.emit(name, Phase.REJECTED, False, raw if isinstance(raw, dict) else None, err.reason,
                  failed_step=err.step, refused=True, **_scalars(err.details))

    def withdraw(self, name: str, doc: Deployment, reason: str) -> None:
        """A pending deployment was called off before it was installed: back to where the model was."""
        rec = self.state.record(name)
        if rec.pending is None or rec.pending_id != doc.deployment_id:
            return
        self.progress.pop(name, None)
        if rec.phase is Phase.SHADOW:
            self._end_shadow(name)
        self._set_phase(name, _resting_phase(rec), pending=None)
        self.emit(name, Phase.SHADOW if rec.phase is Phase.SHADOW else Phase.DOWNLOADING, False, doc, reason)

    def _adopt(self, signed: Signed[Deployment]) -> None:
        """A new document (a re-issue: new id, expiry or policy) for the model already running: take it over."""
        name = signed.doc.model.name
        rec = self.state.record(name)
        assert rec.active is not None
        active = Installed.of(signed, installed_at=rec.active.installed_at, validation=rec.active.validation)
        self._save(self.state.with_record(name, replace(rec, active=active)))
        self.emit(name, rec.phase, True, signed.doc, None, adopted=True)

    def reject(self, name: str, raw: Any, err: DeploymentRejected) -> None:
        """End a started deployment as REJECTED: the active model is untouched.

        A refusal of the model itself (validation, activation) raises the version floor, so the same
        version is never tried again; a failure of the download or the store does not (it says nothing
        about the model, and a stalled or tampered download is tried again later).
        """
        dep_id = raw.get("deployment_id") if isinstance(raw, dict) else None
        dep_id = dep_id if isinstance(dep_id, str) and len(dep_id) <= 128 else None
        pending = self.state.record(name).pending_id if name in self.state.models else None
        if isinstance(err, DocumentRefused) and (pending is None or dep_id is None or pending != dep_id):
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
            rec = replace(rec, phase=_resting_phase(rec, Phase.REJECTED), pending=None, last_outcome=outcome)
            if err.step in FLOOR_STEPS and not err.retry:
                rec = _raise_floor(rec, version, issued)
            self._save(self.state.with_record(name, rec))
        self.emit(name, Phase.REJECTED, False, raw if isinstance(raw, dict) else None, err.reason,
                  failed_step=err.step, **_scalars(err.details))
        self.store.prune(self.state)  # a refused model's artifacts are stored before validation

    # --- commands ------------------------------------------------------------------------------

    def check_command(self, raw: Any) -> Command:
        """Verify a command (schema, signature, addressee, validity window, replay) and remember its id."""
        try:
            cmd = self.verified(Command, raw).doc
        except SignatureError as err:
            raise DeploymentRejected(f"command signature: {err}", step=Phase.VERIFYING) from err
        except ProtocolError as err:
            raise DeploymentRejected(f"malformed command: {err}", step=Phase.VERIFYING) from err
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

    def begin(self, signed: Signed[Deployment], phase: Phase = Phase.DOWNLOADING) -> None:
        """Record a deployment as pending (before its download or install), counting the attempt."""
        name = signed.doc.model.name
        now = self.clock()
        attempts = tuple(t for t in (*self.state.record(name).attempts, now) if now - t < ACTION_WINDOW_S)
        self.progress[name] = 0.0
        self._set_phase(name, phase, pending=signed.raw, attempts=attempts)
        self.emit(name, phase, True, signed.doc)

    def install_bundle(self, raw: Any, model: bytes, golden: bytes) -> Phase:
        """Run a bundle from disk: its manifest is authenticated here (it came on no topic, so a target it
        names must be this device or one of its groups), then installed."""
        self.last_refusal = None
        try:
            signed = self.authenticate(raw, None)
        except DocumentRefused as err:
            self.reject(raw_model_name(raw) or "?", raw, err)
            return Phase.REJECTED
        return self.install(signed, model, golden)

    def install(self, signed: Signed[Deployment], model: bytes | None, golden: bytes | None) -> Phase:
        """Run an authenticated deployment whose artifacts are in hand (or, given as None, verified in the
        blob store by a download).

        Returns REJECTED if this deployment was refused, else the phase the model is in afterwards.
        """
        doc = signed.doc
        name = doc.model.name
        self.last_refusal = None
        try:
            if self.precheck(signed, continuing=True) is None:
                log.info("model %s: deployment %s needs no action", name, doc.deployment_id)
                return self.state.record(name).phase
            if self.state.record(name).pending_id != doc.deployment_id:
                self.begin(signed, Phase.VERIFYING)
            else:
                self._set_phase(name, Phase.VERIFYING)
                self.emit(name, Phase.VERIFYING, True, doc)
            faults.point("install:begun")
            if model is not None and golden is not None:
                self._store_artifacts(doc, model, golden)
            else:
                for label, art in (("model", doc.model.artifact), ("golden vectors", doc.model.golden)):
                    if not self.store.has_blob(art.sha256):
                        raise DeploymentRejected(f"{label} artifact {art.sha256[:12]} is not in the store",
                                                 step=Phase.VERIFYING)
            faults.point("install:stored")
            figures = self._validate(doc)
            faults.point("install:validated")
            if self._wants_shadow(doc):
                self._start_shadow(signed, figures)
                return Phase.SHADOW
            self._activate(signed, figures)
        except DeploymentRejected as err:
            self.reject(name, signed.raw, err)
            return Phase.REJECTED
        except StoreError as err:
            self.reject(name, signed.raw, DeploymentRejected(f"store: {err}", step=Phase.VERIFYING))
            return Phase.REJECTED
        return self.state.record(name).phase

    def _store_artifacts(self, doc: Deployment, model: bytes, golden: bytes) -> None:
        from edgefleet.bundle import check_artifact

        try:
            check_artifact("model", model, doc.model.artifact)
            check_artifact("golden vectors", golden, doc.model.golden)
        except ProtocolError as err:
            raise DeploymentRejected(str(err), step=Phase.VERIFYING) from err
        self.store.put_blob(model, doc.model.artifact.sha256)
        self.store.put_blob(golden, doc.model.golden.sha256)

    def _validate(self, doc: Deployment) -> dict[str, Any]:
        name = doc.model.name
        self._set_phase(name, Phase.VALIDATING)
        self.emit(name, Phase.VALIDATING, True, doc)
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
                step=Phase.VALIDATING, details={"p95_ms": figures["p95_ms"], "limit_ms": min(limits)})
        return figures

    def _activate(self, signed: Signed[Deployment], figures: dict[str, Any]) -> None:
        doc = signed.doc
        name = doc.model.name
        rec = self.state.record(name)
        # saved before the serving path loads the model: if the agent dies in there, the next start
        # counts it against this deployment (see boot)
        prior = rec.activation
        deaths = prior.deaths if prior is not None and prior.deployment_id == doc.deployment_id else 0
        self._set_phase(name, Phase.ACTIVATING, activation=Activation(deployment_id=doc.deployment_id, deaths=deaths))
        self.emit(name, Phase.ACTIVATING, True, doc)
        baseline = self._baseline_p95(name, rec, figures)
        faults.point("stall:activate")
        if self.serving is not None:
            try:
                self.serving.activate(name, self.store.blob_path(doc.model.artifact.sha256), doc)
            except EdgefleetError as err:
                raise DeploymentRejected(f"activation failed: {err}", step=Phase.ACTIVATING) from err
        faults.point("activate:served")
        installed = Installed.of(signed, installed_at=self.clock(), validation=_scalars(figures))
        started = self.clock() if self.serving is not None else None
        # last-known-good is the last model that passed probation, never one still on trial
        previous = rec.previous if rec.probation is not None or rec.active is None else rec.active
        new = replace(rec, phase=Phase.PROBATION, active=installed, previous=previous, pending=None, activation=None,
                      probation=Probation(started_at=started, baseline_p95_ms=baseline))
        if rec.active is not None and doc.model.version < rec.active.version:
            # a signed downgrade: the version left behind must not come back through a replay of its
            # document, only through a document issued after this one
            new = _raise_floor(new, rec.active.version, doc.issued_at)
        try:
            self._save(self.state.with_record(name, new))  # the atomic switch
        except StoreError:
            if self.serving is not None:
                self.serve(name, rec.active)
            raise
        faults.point("activate:saved")
        self.progress.pop(name, None)
        self.emit(name, Phase.PROBATION, True, doc, None, p50_ms=figures.get("p50_ms"), p95_ms=figures.get("p95_ms"),
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

    def serve(self, name: str, inst: Installed | None) -> None:
        """Have the serving path serve `inst` under `name` (nothing: stop serving it)."""
        if self.serving is None:
            return
        if inst is None:
            self.serving.deactivate(name)
        else:
            self.serving.activate(name, self.store.blob_path(inst.sha256), inst.doc)

    # --- probation -----------------------------------------------------------------------------

    def tick(self) -> None:
        """Judge every model on probation: roll back on live evidence, commit when the window passes; and
        every shadow run: activate or reject its candidate once the figures decide."""
        for name in list(self.shadows):
            self._tick_shadow(name)
        for name, rec in list(self.state.models.items()):
            if rec.phase is not Phase.PROBATION or rec.active is None or rec.probation is None:
                continue
            if rec.probation.started_at is None:
                continue
            served = self.serving.served(name) if self.serving is not None else None
            verdict = judge(Limits.effective(self.config, rec.active.doc), rec.probation, served, self.clock())
            if verdict is None:
                continue
            if verdict.decision is Decision.ROLLBACK:
                if verdict.hung:
                    # the stuck thread keeps the old interpreter; only a restart of the agent frees it
                    self.unhealthy = verdict.reason
                self.rollback(name, verdict.reason, figures=verdict.figures)
            else:
                self.commit(name, verdict.figures)

    # --- shadow probation ---------------------------------------------------------------------

    def _wants_shadow(self, doc: Deployment) -> bool:
        """The policy asks for shadow probation and there is an active model to shadow (a first install
        has nothing to compare with: it goes on to ACTIVATING and probation as usual)."""
        if doc.policy.shadow is None or self.serving is None:
            return False
        if self.serving.served(doc.model.name) is None:
            log.info("model %s: no active model to shadow; v%s goes on without shadow probation", doc.model.name,
                     doc.model.version)
            return False
        return True

    def _start_shadow(self, signed: Signed[Deployment], figures: dict[str, Any]) -> None:
        """Load the validated candidate beside the active model and start sampling live requests."""
        doc = signed.doc
        name = doc.model.name
        assert self.serving is not None and doc.policy.shadow is not None
        limits = ShadowLimits.effective(self.config, doc.policy.shadow)
        self._set_phase(name, Phase.SHADOW)
        try:
            self.serving.start_shadow(name, self.store.blob_path(doc.model.artifact.sha256), doc,
                                      sample_rate=limits.sample_rate, queue_size=limits.queue_size,
                                      atol=limits.atol, rtol=limits.rtol)
        except EdgefleetError as err:
            raise DeploymentRejected(f"shadow: the candidate does not load beside the active model: {err}",
                                     step=Phase.SHADOW) from err
        self.shadows[name] = _ShadowRun(signed=signed, validation=figures, limits=limits,
                                        next_report=self.clock() + SHADOW_REPORT_S)
        self.emit(name, Phase.SHADOW, True, doc, None, sample_rate=limits.sample_rate, min_samples=limits.min_samples,
                  min_agreement=limits.min_agreement, max_latency_ratio=limits.max_latency_ratio,
                  window_s=limits.window_s)

    def _end_shadow(self, name: str) -> _ShadowRun | None:
        """Stop the shadow run of `name` and unload its candidate."""
        run = self.shadows.pop(name, None)
        if self.serving is not None:
            self.serving.stop_shadow(name)
        return run

    def _tick_shadow(self, name: str) -> None:
        run = self.shadows[name]
        doc = run.signed.doc
        rec = self.state.record(name)
        if rec.phase is not Phase.SHADOW or rec.pending_id != doc.deployment_id:
            self._end_shadow(name)  # superseded by another document, withdrawn or rejected meanwhile
            return
        assert self.serving is not None
        measured = self.serving.shadow_figures(name)
        if measured is None or measured.deployment_id != doc.deployment_id:
            self._end_shadow(name)
            self.reject(name, run.signed.raw, DeploymentRejected(
                "shadow: the active model changed during shadow probation (a rollback); push again",
                step=Phase.SHADOW, retry=True))
            return
        verdict = judge_shadow(run.limits, measured)
        run.figures = verdict.figures if verdict is not None else figures_of(measured, run.limits)
        if verdict is None:
            if self.clock() >= run.next_report:
                run.next_report = self.clock() + SHADOW_REPORT_S
                self.emit(name, Phase.SHADOW, True, doc, None, **_scalars(run.figures))
            return
        self._end_shadow(name)  # the candidate is unloaded before anything else: memory
        if not verdict.passed:
            self.reject(name, run.signed.raw, DeploymentRejected(
                verdict.reason, step=Phase.SHADOW, details=verdict.figures, retry=verdict.retry))
            return
        self.emit(name, Phase.SHADOW, True, doc, None, passed=True, **_scalars(verdict.figures))
        figures = {**run.validation, **{f"shadow_{k}": v for k, v in verdict.figures.items()
                                        if k in ("samples", "agreement", "latency_ratio")}}
        try:
            self._activate(run.signed, figures)
        except DeploymentRejected as err:
            self.reject(name, run.signed.raw, err)
        except StoreError as err:
            self.reject(name, run.signed.raw, DeploymentRejected(f"store: {err}", step=Phase.ACTIVATING))

    def _shadow_progress(self, name: str, rec: ModelRecord) -> ShadowProgress | None:
        """The state document's `shadow` of a model in SHADOW: the figures of the last tick."""
        run = self.shadows.get(name)
        if run is None or rec.phase is not Phase.SHADOW or rec.pending_id != run.signed.doc.deployment_id:
            return None
        f = run.figures
        return ShadowProgress(samples=int(f.get("samples") or 0), min_samples=run.limits.min_samples,
                              agreement=f.get("agreement"), latency_ratio=f.get("latency_ratio"),
                              elapsed_s=float(f.get("elapsed_s") or 0.0), window_s=run.limits.window_s,
                              dropped=int(f.get("dropped") or 0))

    def commit(self, name: str, figures: dict[str, Any] | None = None) -> None:
        """Probation passed: the active model becomes the committed one."""
        rec = self.state.record(name)
        assert rec.active is not None
        outcome = Outcome(deployment_id=rec.active.deployment_id, version=rec.active.version, result="committed",
                          ts=self.clock(), figures=_scalars(figures or {}))
        faults.point("commit:before")
        self._save(self.state.with_record(name, replace(rec, phase=Phase.COMMITTED, probation=None,
                                                        last_outcome=outcome)))
        faults.point("commit:saved")
        self.emit(name, Phase.COMMITTED, True, rec.active.deployment, None, **_scalars(figures or {}))
        self.store.prune(self.state)

    def rollback(self, name: str, reason: str, *, figures: dict[str, Any] | None = None, manual: bool = False,
                 ordered_at: int = 0) -> None:
        """Restore the last-known-good model (no download) and raise the version floor above the failed one.

        `manual` (an operator's or a command's order, not probation's): refused with Conflict when no
        previous version is kept. `ordered_at` is the signed `issued_at` of the command that ordered
        it, if any.
        """
        rec = self.state.record(name)
        failed = rec.active
        if failed is None:
            raise Conflict(f"model {name}: nothing to roll back")
        if manual and rec.previous is None:
            raise Conflict(f"model {name}: no previous version to roll back to")
        restored = rec.previous
        faults.point("rollback:before")
        try:
            self.serve(name, restored)
        except EdgefleetError as err:
            log.error("model %s: previous model does not load either: %s", name, err)
            self.serve(name, None)
            restored = None
        now = self.clock()
        outcome = Outcome(deployment_id=failed.deployment_id, version=failed.version, result="rolled_back",
                          reason=reason, ts=now, figures=_scalars(figures or {}))
        new = _raise_floor(replace(rec, phase=Phase.ROLLED_BACK, active=restored, previous=None, probation=None,
                                   last_outcome=outcome),
                           failed.version, max(ordered_at, int(failed.deployment.get("issued_at", 0))))
        faults.point("rollback:served")
        self._save(self.state.with_record(name, new))
        faults.point("rollback:saved")
        self.emit(name, Phase.ROLLED_BACK, False, failed.deployment, reason,
                  restored_version=restored.version if restored else None, **_scalars(figures or {}))
        self.store.prune(self.state)


@dataclass
class _ShadowRun:
    """A deployment in SHADOW: its document, its validation figures (for the activation that may follow),
    its limits, and the figures of the last tick."""

    signed: Signed[Deployment]
    validation: dict[str, Any]
    limits: ShadowLimits
    next_report: float
    figures: dict[str, Any] = field(default_factory=dict)


def _resting_phase(rec: ModelRecord, otherwise: Phase | None = None) -> Phase:
    """Where a model rests after an update attempt ends: back on probation if its active model still is,
    else `otherwise`, by default COMMITTED with an active model and IDLE without."""
    if rec.probation is not None and rec.active is not None:
        return Phase.PROBATION
    if otherwise is not None:
        return otherwise
    return Phase.COMMITTED if rec.active is not None else Phase.IDLE


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
