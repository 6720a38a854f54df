"""Telemetry figures against psutil in the same process, Prometheus text, and the MQTT stream."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from edgefleet.agent.serving.models import Serving
from edgefleet.agent.telemetry.sampler import Sampler, model_figures, prometheus, read_temperature
from edgefleet.bundle import Bundle
from edgefleet.protocol import Telemetry, Topics, parse_json


def test_figures_match_psutil(tmp_path: Path) -> None:
    sampler = Sampler("dev-1", tmp_path, temperature=lambda: None)
    deadline = time.process_time() + 0.4
    while time.process_time() < deadline:  # burn CPU in this process
        pass
    t = sampler.sample()
    me = psutil.Process()
    assert abs(t.rss_bytes - me.memory_info().rss) < 8 << 20
    assert 40.0 <= t.cpu_percent <= 100.0 * (os.cpu_count() or 1) + 5
    assert abs(t.mem_available_bytes - psutil.virtual_memory().available) < 0.05 * psutil.virtual_memory().total
    assert abs(t.disk_free_bytes - shutil.disk_usage(tmp_path).free) < 64 << 20
    assert abs(t.load1 - os.getloadavg()[0]) < 1.0
    assert 0.0 <= t.system_cpu_percent <= 100.0
    assert 0.3 <= t.uptime_s < 30
    assert t.device_id == "dev-1" and "temperature_c" not in t.to_dict()  # absent, not zero
    time.sleep(0.3)  # CPU time advances in clock ticks: over a sub-millisecond interval one tick reads as >1000 %
    idle = sampler.sample()
    assert idle.cpu_percent < t.cpu_percent  # percentages cover the time since the previous sample


def test_temperature_from_thermal_zone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: {}, raising=False)
    assert read_temperature(tmp_path) is None
    (tmp_path / "thermal_zone0").mkdir()
    (tmp_path / "thermal_zone0" / "temp").write_text("47250\n")
    assert read_temperature(tmp_path) == 47.25


def test_temperature_prefers_the_soc_sensor(monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import namedtuple

    Reading = namedtuple("Reading", "label current high critical")
    sensors = {"nvme": [Reading("", 38.0, None, None)], "cpu_thermal": [Reading("", 61.5, None, None)]}
    monkeypatch.setattr(psutil, "sensors_temperatures", lambda: sensors, raising=False)
    assert read_temperature(Path("/nonexistent")) == 61.5


def test_model_figures_and_prometheus(make_bundle: Any, tmp_path: Path) -> None:
    bundle = Bundle.load(make_bundle("dense_f32", version=3))
    serving = Serving()
    serving.activate("m", bundle.path / "model.tflite", bundle.deployment)
    x = np.zeros((1, 8), np.float32)
    for _ in range(40):
        serving.predict_raw("m", [x])
    figures = model_figures(serving, {"m": ("PROBATION", 3), "gone": ("ROLLED_BACK", None)}, 60.0)
    by_name = {m.name: m for m in figures}
    m = by_name["m"]
    snap = serving.served("m").stats.snapshot(60.0)  # type: ignore[union-attr]
    assert m.count == 40 + (serving.served("m").stats.count - 40) and m.errors == 0  # type: ignore[union-attr]
    assert m.version == 3 and m.phase == "PROBATION"
    assert m.p50_ms is not None and abs(m.p50_ms - snap.p50_ms) < 0.05  # type: ignore[operator]
    assert by_name["gone"].count == 0 and by_name["gone"].p95_ms is None
    t = Sampler("dev-1", tmp_path, temperature=lambda: 55.5).sample(figures)
    text = prometheus(t)
    values = dict(re.findall(r'^(edgefleet_\w+)\{device="dev-1"\} (\S+)$', text, re.M))
    assert float(values["edgefleet_process_rss_bytes"]) == t.rss_bytes
    assert float(values["edgefleet_disk_free_bytes"]) == t.disk_free_bytes
    assert float(values["edgefleet_temperature_celsius"]) == 55.5
    assert 'edgefleet_model_phase{device="dev-1",model="m",phase="PROBATION"} 1' in text
    assert 'edgefleet_model_phase{device="dev-1",model="gone",phase="PROBATION"} 0' in text
    # window quantiles travel in the MQTT document; /metrics has the histogram (tests/e2e/test_metrics.py)
    assert "_ms" not in text and "quantile" not in text and "NaN" not in text
    assert Telemetry.from_dict(t.to_dict()) == t


def test_agent_publishes_telemetry_and_serves_metrics(broker: Any, make_bundle: Any, tmp_path: Path) -> None:
    from edgefleet.testing.agentproc import AgentProcess
    from edgefleet.testing.broker import Inbox
    from edgefleet.transport import MqttSettings, Transport

    inbox = Inbox()
    t = Topics()
    watcher = Transport(MqttSettings(url=broker.url), on_message=inbox)
    watcher.subscribe(t.telemetry("dev-1"))
    watcher.start()
    a = AgentProcess(tmp_path / "a", mqtt={"url": broker.url}, telemetry={"interval_s": 0.5})
    try:
        assert a.cli("install", str(make_bundle("dense_f32", version=1))).returncode == 0
        a.start()
        for _ in range(12):
            a.client.predict("m", [[0.0] * 8])
        docs = []
        deadline = time.monotonic() + 10
        # two samples at least (the first may already count every request), the last with all 12
        while time.monotonic() < deadline and not (len(docs) >= 2 and docs[-1].models
                                                   and docs[-1].models[0].count >= 12):
            docs.append(Telemetry.from_dict(parse_json(inbox.topic(t.telemetry("dev-1"), 5).payload)))
            inbox.seen.clear()
        last = docs[-1]
        assert last.models[0].name == "m" and last.models[0].count >= 12 and last.models[0].p95_ms is not None
        assert last.rss_bytes > 10 << 20 and last.device_id == "dev-1"
        assert len(docs) >= 2 and docs[-1].ts > docs[0].ts
        metrics = a.client.metrics()
        assert 'edgefleet_inference_total{device="dev-1",model="m"}' in metrics
        assert "edgefleet_process_rss_bytes" in metrics
        assert 'edgefleet_api_requests_total{device="dev-1",code="200"}' in metrics
    finally:
        a.kill()
        watcher.stop()
