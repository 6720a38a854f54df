"""/metrics as Prometheus and its tools read it: promtool's linter, prometheus-client's parser, the
histogram's arithmetic, on a real agent after real traffic (successes and errors)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from edgefleet import __version__
from edgefleet.agent.serving.stats import LATENCY_BUCKETS_S, LatencyWindow
from edgefleet.agent.telemetry.sampler import PromText, Sampler, prometheus
from edgefleet.protocol.phases import Phase
from tests.support.promtool import check_metrics

NO_DEVICE_LABEL: set[str] = set()
"""Families allowed without the `device` label (none: every sample of one board joins on it)."""


def families(text: str) -> dict[str, Any]:
    """Parsed families by name (prometheus-client's parser raises on anything malformed)."""
    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in out, f"family {fam.name} twice"
        out[fam.name] = fam
    return out


def samples(fam: Any, name: str | None = None, **labels: str) -> list[Sample]:
    return [s for s in fam.samples if (name is None or s.name == name)
            and all(s.labels.get(k) == v for k, v in labels.items())]


def test_histogram_buckets_are_cumulative_and_match_the_count() -> None:
    w = LatencyWindow(capacity=8)
    durations = [0.00005, 0.0001, 0.0003, 0.002, 0.002, 0.7, 12.0, 0.0101]  # 0.0001 lands in le=0.0001
    for i, d in enumerate(durations):
        w.add(d, ok=i != 3, end=float(i + 1))
    cumulative, total = w.histogram()
    assert len(cumulative) == len(LATENCY_BUCKETS_S) + 1
    for bound, n in zip(LATENCY_BUCKETS_S, cumulative, strict=False):
        assert n == sum(1 for d in durations if d <= bound), bound
    assert cumulative[-1] == w.count == len(durations)
    assert total == pytest.approx(sum(durations))
    assert cumulative == sorted(cumulative)


def test_writer_refuses_nan_and_a_family_twice() -> None:
    w = PromText("d")
    w.gauge("edgefleet_x_seconds", "x", None)  # unknown: left out, family and all
    assert w.text() == ""
    w.family("edgefleet_x_seconds", "gauge", "x")
    with pytest.raises(ValueError, match="NaN"):
        w.sample("edgefleet_x_seconds", float("nan"))
    with pytest.raises(ValueError, match="twice"):
        w.family("edgefleet_x_seconds", "gauge", "x")


def test_telemetry_text_in_base_units(tmp_path: Path) -> None:
    t = Sampler("dev-9", tmp_path, temperature=lambda: 41.0).sample()
    text = prometheus(t, mqtt_connected=False)
    fams = families(text)
    assert samples(fams["edgefleet_build_info"])[0].labels == {"device": "dev-9", "version": __version__}
    assert samples(fams["edgefleet_mqtt_connected"])[0].value == 0
    assert samples(fams["edgefleet_process_cpu_ratio"])[0].value == pytest.approx(t.cpu_percent / 100)
    assert 0.0 <= samples(fams["edgefleet_system_cpu_ratio"])[0].value <= 1.0
    assert not [n for n in fams if "percent" in n or n.endswith("_ms")]
    assert check_metrics(text).returncode == 0, check_metrics(text).stdout


def test_busy_agent_metrics_lint_clean(broker: Any, make_bundle: Any, tmp_path: Path) -> None:
    from edgefleet.testing.agentproc import AgentProcess

    a = AgentProcess(tmp_path / "a", device_id="dev-7", mqtt={"url": broker.url})
    try:
        assert a.cli("install", str(make_bundle("dense_f32", version=4))).returncode == 0
        a.start()
        idle = a.client.metrics()  # a model with no traffic yet: no NaN anywhere, still lint-clean
        assert "NaN" not in idle
        assert check_metrics(idle).returncode == 0, check_metrics(idle).stdout
        x = np.zeros((1, 8), np.float32)
        for _ in range(25):
            a.client.predict("m", [[0.0] * 8])
        for _ in range(5):
            a.client.predict_npy("m", x)
        bad = [a.client.request("POST", "/v1/models/m:predict", b'{"instances": [[1, 2]]}')[0],  # wrong shape
               a.client.request("POST", "/v1/models/m:predict", b"{not json")[0],
               a.client.request("GET", "/v1/models/nope")[0],
               a.client.request("DELETE", "/metrics")[0]]
        assert sorted(bad) == [400, 400, 404, 405]
        deadline = time.monotonic() + 10
        while True:  # the MQTT connection is up within a moment of the start
            text = a.client.metrics()
            if "edgefleet_mqtt_connected{device=\"dev-7\"} 1" in text or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        a.kill()

    lint = check_metrics(text)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint.stdout + lint.stderr
    assert "NaN" not in text
    fams = families(text)
    for fam in fams.values():
        for s in fam.samples:
            assert s.labels.get("device") == "dev-7" or fam.name in NO_DEVICE_LABEL, (fam.name, s)
            assert not math.isnan(s.value), s
        if fam.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in fam.samples), fam.name
    assert samples(fams["edgefleet_mqtt_connected"])[0].value == 1
    assert samples(fams["edgefleet_build_info"], version=__version__)[0].value == 1
    assert samples(fams["edgefleet_model_version"], model="m")[0].value == 4
    assert samples(fams["edgefleet_insecure"])[0].value == 1  # AgentProcess runs without keys
    phases = {s.labels["phase"]: s.value for s in samples(fams["edgefleet_model_phase"], model="m")}
    assert sum(phases.values()) == 1 and set(phases) == {p.value for p in Phase}

    # the histogram: every request that reached the model, cumulative buckets, +Inf == count
    served = samples(fams["edgefleet_inference"], "edgefleet_inference_total", model="m")[0].value
    assert served >= 30  # 25 JSON and 5 .npy predictions (the warm-up is not counted)
    hist = fams["edgefleet_inference_duration_seconds"]
    assert hist.type == "histogram"
    buckets = [(float(s.labels["le"]), s.value) for s in samples(hist, "edgefleet_inference_duration_seconds_bucket",
                                                                  model="m")]
    assert [b for b, _ in buckets] == [*LATENCY_BUCKETS_S, math.inf]
    counts = [n for _, n in buckets]
    assert counts == sorted(counts) and counts[-1] == served
    assert samples(hist, "edgefleet_inference_duration_seconds_count", model="m")[0].value == served
    total = samples(hist, "edgefleet_inference_duration_seconds_sum", model="m")[0].value
    assert 0 < total < served * 1.0  # a small model: well under a second each
    errors = samples(fams["edgefleet_inference_errors"], model="m")[0].value
    assert errors >= 0
    requests = {s.labels["code"]: s.value for s in fams["edgefleet_api_requests"].samples}
    assert requests["200"] >= 31 and requests["400"] == 2 and requests["404"] == 1 and requests["405"] == 1
