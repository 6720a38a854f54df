"""Telemetry: process and system figures from psutil plus per-model inference figures (docs/protocol.md
§3.6), as the periodic MQTT document and as Prometheus text for /metrics.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

from edgefleet import __version__
from edgefleet.protocol.documents import ModelTelemetry, Telemetry
from edgefleet.protocol.phases import Phase

log = logging.getLogger(__name__)

# Sensor names boards use for the SoC temperature, most specific first (Raspberry Pi, Jetson, x86).
_SENSORS = ("cpu_thermal", "soc_thermal", "cpu-thermal", "thermal-fan-est", "coretemp", "k10temp", "acpitz")


def read_temperature(thermal_root: Path = Path("/sys/class/thermal")) -> float | None:
    """SoC temperature in °C, or None when the board exposes no sensor (absent, never a made-up 0)."""
    try:
        sensors = psutil.sensors_temperatures() if hasattr(psutil, "sensors_temperatures") else {}
    except (OSError, RuntimeError):
        sensors = {}
    for name in (*_SENSORS, *sorted(sensors)):
        readings = sensors.get(name)
        if readings:
            return float(readings[0].current)
    for zone in sorted(thermal_root.glob("thermal_zone*")):  # psutil reads hwmon; some boards only have these
        try:
            return int((zone / "temp").read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
    return None


class Sampler:
    """Takes telemetry samples; CPU percentages cover the time since the previous sample."""

    def __init__(self, device_id: str, state_dir: Path, *, temperature: Callable[[], float | None] = read_temperature,
                 insecure: bool = False):
        self.device_id = device_id
        self.insecure = insecure
        self.state_dir = state_dir
        self.process = psutil.Process()
        self.started = time.monotonic()
        self._temperature = temperature
        self.process.cpu_percent(None)  # primes the counters: the first sample then covers a real interval
        psutil.cpu_percent(None)

    def sample(self, models: Iterable[ModelTelemetry] = ()) -> Telemetry:
        """A Telemetry document of the figures right now."""
        with self.process.oneshot():
            cpu = self.process.cpu_percent(None)
            rss = self.process.memory_info().rss
        try:
            free = shutil.disk_usage(self.state_dir).free
        except OSError:
            free = 0
        return Telemetry(
            ts=time.time(), device_id=self.device_id, agent_version=__version__,
            uptime_s=round(time.monotonic() - self.started, 3), cpu_percent=cpu, rss_bytes=rss,
            system_cpu_percent=psutil.cpu_percent(None), mem_available_bytes=psutil.virtual_memory().available,
            load1=os.getloadavg()[0], disk_free_bytes=free, temperature_c=self._temperature(),
            models=tuple(models), insecure=self.insecure,
        )


def model_figures(serving: object, phases: dict[str, tuple[Phase, int | None]], window_s: float) -> list[ModelTelemetry]:
    """Per-model figures: totals since activation and latency quantiles over the last `window_s` seconds.

    `phases` maps every known model name to (phase, active version); `serving` is edgefleet.agent.serving.models.Serving.
    """
    out = []
    for name, (phase, version) in sorted(phases.items()):
        served = serving.served(name)  # type: ignore[attr-defined]
        if served is None:
            out.append(ModelTelemetry(name=name, version=version, phase=phase, count=0, errors=0))
            continue
        snap = served.stats.snapshot(window_s)
        drift_monitor = getattr(serving, "drift_monitor", None)
        monitor = drift_monitor(name) if drift_monitor is not None else None
        out.append(ModelTelemetry(
            name=name, version=served.version, phase=phase, count=served.stats.count, errors=served.stats.errors,
            p50_ms=_r(snap.p50_ms), p95_ms=_r(snap.p95_ms), p99_ms=_r(snap.p99_ms), max_ms=_r(snap.max_ms),
            drift=monitor.figures() if monitor is not None else None,
        ))
    return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


class PromText:
    """Prometheus text exposition (format 0.0.4): every family once, with HELP and TYPE, and the same
    `device` label first on every sample, so series of one board join on it whatever the scraper's
    own target labels are. Values that are unknown are left out, never written as NaN.
    """

    def __init__(self, device: str | None = None) -> None:
        self._base = f'device="{_esc(device)}"' if device is not None else ""
        self._lines: list[str] = []
        self._families: set[str] = set()

    def family(self, name: str, kind: str, help_text: str) -> None:
        """Start a family; a second one of the same name is a bug (the text would not parse)."""
        if name in self._families:
            raise ValueError(f"metric family {name} rendered twice")
        self._families.add(name)
        self._lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float | int | None, **labels: str) -> None:
        """One sample of the current family (`name` may carry a suffix: _bucket, _sum, _count)."""
        if value is None:
            return
        pairs = ([self._base] if self._base else []) + [f'{k}="{_esc(v)}"' for k, v in labels.items()]
        self._lines.append(f"{name}{{{','.join(pairs)}}} {_number(value)}" if pairs else f"{name} {_number(value)}")

    def gauge(self, name: str, help_text: str, value: float | int | None, **labels: str) -> None:
        """A family of one gauge sample, left out entirely when the value is unknown."""
        if value is not None:
            self.family(name, "gauge", help_text)
            self.sample(name, value, **labels)

    def text(self) -> str:
        """The exposition, newline-terminated."""
        return "\n".join(self._lines) + "\n" if self._lines else ""


def _number(value: float | int) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if value != value:  # NaN: callers leave unknown values out; this keeps a bug from writing one
        raise ValueError("NaN sample")
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def prometheus(t: Telemetry, out: PromText | None = None, *, mqtt_connected: bool | None = None) -> str:
    """Prometheus text of a telemetry sample: the figures MQTT carries, in base units (seconds, bytes,
    ratios 0-1), plus the build and, when MQTT is configured, the broker connection.

    With `out`, the families are added to it (one exposition for all of /metrics) and "" is returned.
    """
    own = out is None
    w = out if out is not None else PromText(t.device_id)
    w.gauge("edgefleet_build_info", "The agent's build: its version in a label, value always 1.", 1,
            version=t.agent_version)
    if mqtt_connected is not None:
        w.gauge("edgefleet_mqtt_connected", "1 while the agent is connected to its MQTT broker, else 0.",
                int(mqtt_connected))
    w.gauge("edgefleet_process_cpu_ratio", "CPU of the agent process since the previous scrape, in cores "
            "(1 = one core busy; above 1 with several threads running).", t.cpu_percent / 100.0)
    w.gauge("edgefleet_process_rss_bytes", "Resident memory of the agent process.", t.rss_bytes)
    w.gauge("edgefleet_system_cpu_ratio", "CPU of the whole board since the previous scrape, 0-1.",
            t.system_cpu_percent / 100.0)
    w.gauge("edgefleet_memory_available_bytes", "Memory available to new processes.", t.mem_available_bytes)
    w.gauge("edgefleet_load1", "One-minute load average.", t.load1)
    w.gauge("edgefleet_disk_free_bytes", "Free space on the state directory's filesystem.", t.disk_free_bytes)
    w.gauge("edgefleet_uptime_seconds", "Seconds since the agent started.", t.uptime_s)
    # always present, so an alert on `edgefleet_insecure == 1` also sees the boards that are fine
    w.gauge("edgefleet_insecure", "1 when the agent runs with security.insecure = true (accepts unsigned "
            "documents), else 0.", int(t.insecure))
    w.gauge("edgefleet_temperature_celsius", "SoC temperature (absent when the board has no sensor).",
            t.temperature_c)
    if t.channel is not None:
        w.gauge("edgefleet_channel_fresh", "1 while the newest signed timestamp of the update channel is "
                "valid; 0 when it expired (a frozen or withheld channel).", int(t.channel.fresh))
        w.gauge("edgefleet_channel_age_seconds", "Age of the newest signed timestamp of the update channel.",
                t.channel.age_s)
    if t.models:
        # a state set: every phase of every model, 1 for the current one, so `== 1` alerts and
        # changes() both work and a phase that ends does not leave a stale series behind
        w.family("edgefleet_model_phase", "gauge", "Lifecycle phase of each model: 1 for the current phase, "
                 "0 for the others.")
        for m in t.models:
            for phase in Phase:
                w.sample("edgefleet_model_phase", int(phase == m.phase), model=m.name, phase=phase)
    drifting = [m for m in t.models if m.drift is not None]
    if drifting:
        w.family("edgefleet_drift_psi", "gauge", "Drift of each model input: population stability index of the "
                 "sampled live values against the bundle's calibration data (0.1 moderate, 0.25 large); absent "
                 "until the window holds drift.min_samples.")
        for m in drifting:
            assert m.drift is not None
            for name, value in sorted(m.drift.inputs.items()):
                w.sample("edgefleet_drift_psi", value, model=m.name, input=name)
        w.family("edgefleet_drift_output_psi", "gauge", "Drift of each model's outputs: the largest population "
                 "stability index over its outputs against the converted model's answers to the calibration data.")
        for m in drifting:
            assert m.drift is not None
            w.sample("edgefleet_drift_output_psi", m.drift.outputs, model=m.name)
        w.family("edgefleet_drift_samples", "gauge", "Sampled live instances the drift scores cover.")
        for m in drifting:
            assert m.drift is not None
            w.sample("edgefleet_drift_samples", m.drift.samples, model=m.name)
    return w.text() if own else ""


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
