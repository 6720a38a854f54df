"""The agent daemon: wires store, lifecycle, serving, API, systemd and (when configured) MQTT delivery.

One thread, the loop in `Daemon.run`, owns the lifecycle. Everything else (API admin requests, MQTT
messages, signals) reaches it through one queue; periodic work (probation, hang detection, watchdog)
happens in the same loop, so a stalled loop stops the systemd watchdog and gets the agent restarted.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgefleet import __version__
from edgefleet.agent import actions, faults
from edgefleet.agent.api.routes import serving_metrics
from edgefleet.agent.api.server import ApiServer
from edgefleet.agent.config import AgentConfig, insecure_warning, security_problems
from edgefleet.agent.fleet.delivery import ChunkStored
from edgefleet.agent.fleet.link import Connection, FleetLink
from edgefleet.agent.lifecycle.machine import Lifecycle
from edgefleet.agent.lifecycle.store import Store
from edgefleet.agent.serving.drift import OUTPUTS, DriftMonitor
from edgefleet.agent.serving.models import Roles, Serving
from edgefleet.agent.systemd import Notifier
from edgefleet.agent.telemetry.logs import LogForwarder
from edgefleet.agent.telemetry.sampler import PromText, Sampler, model_figures, prometheus
from edgefleet.drift import load_reference
from edgefleet.errors import ActionError, ConfigError, EdgefleetError, InvalidInput, NotFound, Unavailable
from edgefleet.protocol.documents import Deployment, Event, Telemetry
from edgefleet.protocol.phases import Phase
from edgefleet.protocol.schema import dump
from edgefleet.protocol.signing import Keyring
from edgefleet.transport import Message

log = logging.getLogger(__name__)

TICK_S = 0.2
ADMIN_TIMEOUT_S = 600.0


@dataclass
class Request:
    """Work handed to the loop thread, with a place for its answer."""

    action: str
    body: dict[str, Any]
    reply: queue.Queue[dict[str, Any] | Exception] = field(default_factory=lambda: queue.Queue(maxsize=1))
    """The answer, or the exception the action raised (re-raised in the thread that asked)."""


class Daemon:
    """A running agent."""

    def __init__(self, config: AgentConfig, *, notifier: Notifier | None = None):
        if not config.security.trusted_keys and not config.security.insecure:
            # `edge-agent run` refuses this earlier with every problem listed; this keeps any other
            # way of building a daemon from running open
            refused = [p for p in security_problems(config) if p.startswith("security.trusted_keys:")]
            if refused:
                raise ConfigError(refused[0])
        self.config = config
        self.store = Store.from_config(config)
        self.keyring = Keyring.from_files(config.security.trusted_keys)
        self.serving = Serving(config.runtime.backend, config.runtime.num_threads, config.runtime.use_xnnpack,
                               keep_previous=config.runtime.keep_previous_loaded,
                               keep_previous_max_mb=config.runtime.keep_previous_max_mb, roles=self._roles,
                               drift=self._drift_monitor if config.drift.enabled else None)
        self.notifier = notifier or Notifier.from_environment()
        self.queue: queue.Queue[Any] = queue.Queue()
        self.stop_event = threading.Event()
        self.started = time.monotonic()
        self.sinks: list[Callable[[Event], None]] = []
        self.unhealthy: str | None = None
        self._hung_reported: set[tuple[str, float]] = set()
        self._loop_beat: float | None = None
        """When the loop thread last showed it was alive (a tick, or a heartbeat during validation)."""
        self.lifecycle = Lifecycle(config, self.store, keyring=self.keyring, serving=self.serving,
                                   emit=self._on_event, heartbeat=self._heartbeat)
        self.api: ApiServer | None = None
        if config.api.socket is not None or config.api.port is not None:
            self.api = ApiServer.from_config(
                self.serving, config.api, status=self.health, admin=self.admin, metrics=self.metrics_text,
                max_file_bytes=config.security.max_artifact_bytes,
            )
        # two samplers: CPU percentages are "since this sampler's last call", and /metrics is
        # scraped on its own schedule from API threads
        self.sampler = Sampler(config.device_id, config.state_dir, insecure=config.security.insecure)
        self._metrics_sampler = Sampler(config.device_id, config.state_dir, insecure=config.security.insecure)
        self._next_telemetry = 0.0
        self._status_text = ""
        self.link: FleetLink | None = None
        self.logs: LogForwarder | None = None
        """The warnings and errors forwarded to the broker (`telemetry.logs`), with MQTT only."""
        if config.mqtt.url is not None:
            self.link = FleetLink(config, self.lifecycle, inbox=self.queue.put)
            self.sinks.append(self.link.publish_event)
            tc = config.telemetry
            if tc.logs:
                topics = self.link.topics
                self.logs = LogForwarder(config.device_id, topics.logs(config.device_id),
                                         topics.logs_recent(config.device_id), level=tc.logs_level,
                                         per_s=tc.logs_per_s, burst=tc.logs_burst, recent=tc.logs_recent)

    # --- outside world -> loop -----------------------------------------------------------------

    def admin(self, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """Called from API threads: run an admin action on the loop thread and wait for its answer.

        Raises what the action raised (ActionError and its kinds for a request that cannot be done),
        NotFound for an unknown action, Unavailable when the loop does not answer in time."""
        if action not in ("install", "rollback", "status"):
            raise NotFound(f"unknown admin action {action!r}; expected install, rollback or status")
        req = Request(action, body)
        self.queue.put(req)
        try:
            answer = req.reply.get(timeout=ADMIN_TIMEOUT_S)
        except queue.Empty:
            raise Unavailable(f"the agent did not finish {action} within {ADMIN_TIMEOUT_S:g}s") from None
        if isinstance(answer, Exception):
            raise answer
        return answer

    def request_stop(self, *_: Any) -> None:
        """Ask the loop to stop (signal handler)."""
        self.stop_event.set()
        self.queue.put(None)

    # --- reporting -----------------------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        for sink in self.sinks:
            try:
                sink(event)
            except Exception:  # one broken sink must not silence the others or the lifecycle
                log.exception("event sink failed")
        self._update_status()

    def _heartbeat(self) -> None:
        """Called during long steps (validation) so a busy loop is not mistaken for a stalled one."""
        self._loop_beat = time.monotonic()
        if self.unhealthy is None:
            self.notifier.watchdog_if_due()

    def _roles(self, name: str) -> Roles | None:
        """For the serving path (API threads): whether `name` is on probation and its rollback target.

        Reads the lifecycle's current state, which is replaced whole on every change, never mutated."""
        lifecycle = getattr(self, "lifecycle", None)
        rec = lifecycle.state.models.get(name) if lifecycle is not None else None
        if rec is None:
            return None
        prev = rec.previous
        try:
            target = (prev.version, self.store.blob_path(prev.sha256), prev.doc) if prev is not None else None
        except (KeyError, TypeError, ValueError, EdgefleetError):  # a record that does not parse is no target
            target = None
        return Roles(on_probation=rec.phase is Phase.PROBATION, previous=target)

    def _drift_monitor(self, name: str, doc: Deployment, output_names: tuple[str, ...]) -> DriftMonitor | None:
        """For the serving path: the drift monitor of a model being activated, from the reference its
        golden vectors carry (None without one; a reference that does not fit the model is logged)."""
        try:
            reference = load_reference(self.store.blob_path(doc.model.golden.sha256).read_bytes())
            if reference is None:
                return None
            return DriftMonitor(reference, doc.model.inputs, doc.model.outputs, output_names, self.config.drift)
        except (OSError, ValueError, EdgefleetError) as err:
            log.warning("model %s v%s: no drift watch: %s", name, doc.model.version, err)
            return None

    def _check_drift(self) -> None:
        """Bin the sampled traffic of every served model; report each threshold crossing once (a DRIFT
        event, not a lifecycle step), and its recovery."""
        threshold = self.config.drift.threshold
        for name in self.serving.names():
            monitor = self.serving.drift_monitor(name)
            served = self.serving.served(name)
            if monitor is None or served is None:
                continue
            for c in monitor.update():
                what = "the outputs" if c.key == OUTPUTS else f"input {c.key!r}"
                if c.drifted:
                    reason = (f"{what} of {name} v{served.version} drifted: PSI {c.score:.3f} over {c.samples} "
                              f"samples is at or above drift.threshold {threshold:g}")
                else:
                    reason = (f"{what} of {name} v{served.version} is back: PSI {c.score:.3f} over {c.samples} "
                              f"samples, below {0.8 * threshold:g}")
                rec = self.lifecycle.state.record(name)
                details = {"input": c.key if c.key != OUTPUTS else None, "outputs": c.key == OUTPUTS,
                           "psi": round(c.score, 4), "samples": c.samples, "threshold": threshold,
                           "scores": dump(monitor.figures())}
                event = Event(ts=time.time(), device_id=self.config.device_id, model=name, step=rec.phase,
                              ok=not c.drifted, version=served.version, reason=reason, details=details, kind="DRIFT")
                log.log(logging.INFO if event.ok else logging.WARNING, "model %s: DRIFT: %s", name, reason)
                self._on_event(event)

    def health(self) -> dict[str, Any]:
        """Live summary for /healthz and `edge-agent status`."""
        models = {}
        for name, rec in self.lifecycle.state.models.items():
            served = self.serving.served(name)
            models[name] = {
                "phase": rec.phase,
                "version": rec.active.version if rec.active else None,
                "serving": served is not None,
                "requests": served.stats.count if served else 0,
                "errors": served.stats.errors if served else 0,
            }
            monitor = self.serving.drift_monitor(name)
            if monitor is not None:
                models[name]["drift"] = dump(monitor.figures())
        mqtt = None
        if self.link is not None:
            t = self.link.transport
            # the url in use: with several (mqtt.urls), the node this device follows now
            mqtt = {"url": t.url, "protocol": t.protocol, "connected": t.connected, "last_error": t.last_error,
                    "reconnects": t.reconnects}
        reason = self.unhealthy or self._loop_stall()
        return {"status": "unhealthy" if reason else "ok", "reason": reason,
                "device_id": self.config.device_id, "agent_version": __version__,
                "uptime_s": round(time.monotonic() - self.started, 1), "models": models, "mqtt": mqtt,
                "trusted_keys": self.keyring.key_ids, "insecure": self.config.security.insecure}

    def _loop_stall(self) -> str | None:
        """Why the loop thread looks stuck (a model hanging its activation, a deadlock), or None.

        The loop is silent for longer than an invocation may run (`health.hang_timeout_s`): the
        watchdog is not fed either, so under systemd a restart follows; /healthz says so meanwhile.
        """
        beat = self._loop_beat
        if beat is None:
            return None
        silent = time.monotonic() - beat
        if silent <= self.config.health.hang_timeout_s:
            return None
        busy = [f"{name} {rec.phase}" for name, rec in sorted(self.lifecycle.state.models.items())
                if rec.phase.in_progress]
        return (f"the agent's loop has not run for {silent:.1f}s (limit {self.config.health.hang_timeout_s:g}s)"
                + (f" while {', '.join(busy)}" if busy else ""))

    def telemetry(self, sampler: Sampler | None = None) -> Telemetry:
        """A telemetry sample of the agent and every model it knows."""
        phases = {name: (rec.phase, rec.active.version if rec.active else None)
                  for name, rec in self.lifecycle.state.models.items()}
        models = model_figures(self.serving, phases, self.config.telemetry.window_s)
        sample = (sampler or self.sampler).sample(models)
        return replace(sample, channel=self.link.channel()) if self.link is not None else sample

    def metrics_text(self) -> str:
        """/metrics: the telemetry figures, the serving counters and histograms and the API's requests,
        as one exposition with the `device` label on every sample."""
        requests = dict(self.api.router.requests) if self.api is not None else None
        out = PromText(self.config.device_id)
        prometheus(self.telemetry(self._metrics_sampler), out,
                   mqtt_connected=self.link.transport.connected if self.link is not None else None)
        serving_metrics(self.serving, requests, out)
        return out.text()

    def _status_line(self) -> str:
        parts = []
        for name, rec in sorted(self.lifecycle.state.models.items()):
            version = f"v{rec.active.version}" if rec.active else "none"
            parts.append(f"{name} {version} {rec.phase}")
        return "serving " + ", ".join(parts) if parts else "no model installed"

    def _update_status(self) -> None:
        text = self._status_line()
        if text != self._status_text:
            self._status_text = text
            self.notifier.status(text)

    # --- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM/SIGINT or `request_stop`; return the exit code."""
        if not self.store.try_lock():
            log.error("another agent is already running on %s", self.store.root)
            return 1
        if self.logs is not None:  # before the first warning, which is often the one that matters
            logging.getLogger().addHandler(self.logs)
        try:
            warning = insecure_warning(self.config)
            if warning:
                log.warning("INSECURE: %s", warning)
            self.lifecycle.boot()
            if self.api is not None:
                self.api.start()
            self.start_extensions()
            self.notifier.ready(self._status_line())
            self._status_text = self._status_line()
            log.info("agent %s ready: %s", __version__, self._status_text)
            next_tick = 0.0
            while not self.stop_event.is_set():
                try:
                    item = self.queue.get(timeout=max(0.0, next_tick - time.monotonic()))
                except queue.Empty:
                    item = None
                if item is not None:
                    self._handle(item)
                if time.monotonic() >= next_tick:  # not once per message: a download brings thousands
                    next_tick = time.monotonic() + TICK_S
                    self.periodic()
            self.notifier.stopping("stopping")
            log.info("stopping")
            self.stop_extensions()
            if self.api is not None:
                self.api.stop(timeout=5.0)
            self.lifecycle.shutdown()
            return 0
        finally:
            if self.logs is not None:
                logging.getLogger().removeHandler(self.logs)
            self.store.unlock()

    def start_extensions(self) -> None:
        """Start the optional parts: MQTT delivery when a broker is configured."""
        if self.link is not None:
            if self.logs is not None and not self.logs.seeded:
                # the previous run's recent records, so that ours extend them instead of replacing them
                self.link.transport.subscribe(self.logs.recent_topic, on_refused=lambda _refused: None)
            self.link.start()

    def stop_extensions(self) -> None:
        """Stop what start_extensions started."""
        if self.link is not None:
            if self.logs is not None:
                self._pump_logs(self.link, final=True)  # the last records go out before the offline status
            self.link.stop()

    def periodic(self) -> None:
        """Work done every tick on the loop thread."""
        self._loop_beat = time.monotonic()
        faults.point("stall:loop")
        self.lifecycle.tick()
        self.serving.sync()  # unload a previous version that is no longer the rollback target
        if self.lifecycle.unhealthy is not None:
            self.mark_unhealthy(self.lifecycle.unhealthy)
        self._check_hangs()
        self._check_drift()
        self._update_status()
        if self.link is not None:
            self.link.periodic()
            now = time.monotonic()
            if now >= self._next_telemetry:
                self._next_telemetry = now + self.config.telemetry.interval_s
                self.link.publish_telemetry(self.telemetry())
            if self.logs is not None:
                self._pump_logs(self.link)
        if self.unhealthy is None:
            self.notifier.watchdog_if_due()

    def _pump_logs(self, link: FleetLink, *, final: bool = False) -> None:
        """Publish the queued log records; stop listening for the previous run's once that is settled."""
        assert self.logs is not None
        transport = link.transport
        seeded = self.logs.seeded
        self.logs.pump(transport.connected,
                       lambda topic, payload, retain: transport.publish(topic, payload, qos=0, retain=retain),
                       final=final)
        if self.logs.seeded and not seeded:
            transport.unsubscribe(self.logs.recent_topic)

    def _handle(self, req: Any) -> None:
        if isinstance(req, Message) and self.logs is not None and req.topic == self.logs.recent_topic:
            self.logs.seed(req.payload)
            if self.link is not None:
                self.link.transport.unsubscribe(self.logs.recent_topic)
            return
        if isinstance(req, (Message, Connection, ChunkStored)):
            if self.link is not None:
                try:
                    self.link.handle(req)
                except Exception:  # a bad message must never stop the agent
                    log.exception("failed to handle %s", getattr(req, "topic", "connection change"))
            return
        answer: dict[str, Any] | Exception
        try:
            answer = self._dispatch(req)
        except ActionError as err:  # a request that cannot be done: the caller is told why
            answer = err
        except Exception as err:  # the loop must survive any single bad request
            log.exception("admin %s failed", req.action)
            answer = err
        try:
            req.reply.put_nowait(answer)
        except queue.Full:
            pass

    def _dispatch(self, req: Request) -> dict[str, Any]:
        """Run one admin action (agent/actions.py) and give its JSON answer."""
        lc = self.lifecycle
        if req.action == "install":
            if "bundle_files" in req.body:  # read by the API from descriptors `edge-agent install` passed
                return actions.install_files(lc, req.body["bundle_files"]).to_dict()
            path = req.body.get("path")
            if not isinstance(path, str):
                raise InvalidInput("install needs passed bundle files or {\"path\": \"/path/to/bundle\"}")
            # the request worked: the outcome, even a rejection, is in the answer
            return actions.install_path(lc, Path(path)).to_dict()
        if req.action == "rollback":
            name = req.body.get("model")
            if name is not None and not isinstance(name, str):
                raise InvalidInput(f"rollback: \"model\" must be a model name, not {name!r}")
            return actions.rollback(lc, name).to_dict()
        state = actions.status(lc, self.link.channel() if self.link is not None else None)
        return {"state": state.to_dict(), "health": self.health()}

    def _check_hangs(self) -> None:
        """An invoke stuck past the limit: report it, serve a fresh interpreter, and let systemd restart us."""
        limit = self.config.health.hang_timeout_s
        now = time.monotonic()
        for name in list(self.serving.names()):
            served = self.serving.served(name)
            if served is None:
                continue
            for started in served.stats.in_flight():
                if now - started <= limit or (name, started) in self._hung_reported:
                    continue
                self._hung_reported.add((name, started))
                rec = self.lifecycle.state.record(name)
                if rec.phase is Phase.PROBATION:
                    continue  # the lifecycle's probation check rolls it back
                reason = f"an invocation of {name} hung for {now - started:.1f}s (limit {limit:g}s)"
                self.lifecycle.emit(name, rec.phase, False, rec.active.deployment if rec.active else None,
                                    reason, hung_s=round(now - started, 3))
                if rec.active is not None:
                    try:
                        self.lifecycle.serve(name, rec.active)
                    except EdgefleetError as err:
                        log.error("model %s: cannot reload after a hang: %s", name, err)
                self.mark_unhealthy(reason)

    def mark_unhealthy(self, reason: str) -> None:
        """Stop feeding the watchdog: under systemd the agent is restarted, which frees a stuck interpreter."""
        if self.unhealthy is None:
            self.unhealthy = reason
            log.error("unhealthy: %s; no more watchdog pings", reason)
            self.notifier.status(f"unhealthy: {reason}")


def run_daemon(config: AgentConfig) -> int:
    """`edge-agent run`: install signal handlers and run the daemon in this thread."""
    daemon = Daemon(config)
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    return daemon.run()
