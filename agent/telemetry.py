"""Telemetry: process and system figures from psutil plus per-model inference figures (DESIGN.md,
"Telemetry document"), as the periodic MQTT document and as Prometheus text for /metrics.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

from agent import __version__
from agent.protocol.documents import ModelTelemetry, Phase, Telemetry

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

    `phases` maps every known model name to (phase, active version); `serving` is agent.serving.Serving.
    """
    out = []
    for name, (phase, version) in sorted(phases.items()):
        served = serving.served(name)  # type: ignore[attr-defined]
        if served is None:
            out.append(ModelTelemetry(name=name, version=version, phase=phase, count=0, errors=0))
            continue
        snap = served.stats.snapshot(window_s)
        out.append(ModelTelemetry(
            name=name, version=served.version, phase=phase, count=served.stats.count, errors=served.stats.errors,
            p50_ms=_r(snap.p50_ms), p95_ms=_r(snap.p95_ms), p99_ms=_r(snap.p99_ms), max_ms=_r(snap.max_ms),
        ))
    return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def prometheus(t: Telemetry) -> str:
    """Prometheus text of a telemetry sample: the same figures MQTT carries."""
    dev = _esc(t.device_id)
    gauges = [
        ("edgefleet_process_cpu_percent", "CPU of the agent process, percent of one core.", t.cpu_percent),
        ("edgefleet_process_rss_bytes", "Resident memory of the agent process.", t.rss_bytes),
        ("edgefleet_system_cpu_percent", "CPU of the whole board, percent.", t.system_cpu_percent),
        ("edgefleet_memory_available_bytes", "Memory available to new processes.", t.mem_available_bytes),
        ("edgefleet_load1", "One-minute load average.", t.load1),
        ("edgefleet_disk_free_bytes", "Free space on the state directory's filesystem.", t.disk_free_bytes),
        ("edgefleet_uptime_seconds", "Seconds since the agent started.", t.uptime_s),
        # always present, so an alert on `edgefleet_insecure == 1` also sees the boards that are fine
        ("edgefleet_insecure", "1 when the agent runs with security.insecure = true (accepts unsigned documents).",
         int(t.insecure)),
    ]
    if t.temperature_c is not None:
        gauges.append(("edgefleet_temperature_celsius", "SoC temperature.", t.temperature_c))
    if t.channel is not None:
        gauges.append(("edgefleet_channel_fresh", "1 while the newest signed timestamp of the update channel is "
                       "valid; 0 when it expired (a frozen or withheld channel).", int(t.channel.fresh)))
        gauges.append(("edgefleet_channel_age_seconds", "Age of the newest signed timestamp of the update channel.",
                       t.channel.age_s))
    lines = []
    for name, help_text, value in gauges:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f'{name}{{device="{dev}"}} {value!r}']
    lines += ["# HELP edgefleet_model_phase Lifecycle phase of each model (1 for the current phase).",
              "# TYPE edgefleet_model_phase gauge"]
    for m in t.models:
        lines.append(f'edgefleet_model_phase{{model="{_esc(m.name)}",phase="{m.phase}"}} 1')
    lines += ["# HELP edgefleet_inference_latency_ms Invoke latency over the telemetry window.",
              "# TYPE edgefleet_inference_latency_ms gauge"]
    for m in t.models:
        for label, v in (("p50", m.p50_ms), ("p95", m.p95_ms), ("p99", m.p99_ms), ("max", m.max_ms)):
            if v is not None:
                lines.append(f'edgefleet_inference_latency_ms{{model="{_esc(m.name)}",stat="{label}"}} {v!r}')
    return "\n".join(lines) + "\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
