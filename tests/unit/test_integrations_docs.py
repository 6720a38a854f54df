"""The snippets of docs/integrations.md, the Grafana dashboard and the Prometheus rules, checked against
what the agent really produces: its /metrics exposition and its telemetry document."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib
import yaml

from edgefleet.agent.api.routes import serving_metrics
from edgefleet.agent.config import parse_config
from edgefleet.agent.serving.models import Serving
from edgefleet.agent.telemetry.sampler import PromText, Sampler, model_figures, prometheus
from edgefleet.bundle import Bundle
from edgefleet.protocol import Topics
from edgefleet.protocol.canonical import canonical_json
from edgefleet.protocol.documents import ChannelState

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "integrations.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "edgefleet-agents.json"
ALERTS = ROOT / "deploy" / "prometheus" / "edgefleet-alerts.yml"
METRIC = re.compile(r"\bedgefleet_[a-z0-9_]+")


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", DOC.read_text(), re.S | re.M)


@pytest.fixture(scope="module")
def board(make_bundle_module: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """A real exposition (busy model, MQTT up, a signed timestamp held) and the telemetry JSON of board-7."""
    serving = Serving()
    serving.activate("m", make_bundle_module / "model.tflite", Bundle.load(make_bundle_module).deployment)
    for _ in range(10):
        serving.predict_raw("m", [np.zeros((1, 8), np.float32)])
    figures = model_figures(serving, {"m": ("COMMITTED", 1)}, 60.0)
    t = Sampler("board-7", tmp_path_factory.mktemp("state"), temperature=lambda: 48.0).sample(figures)
    t = dataclasses.replace(t, channel=ChannelState(issued_at=1, expires_at=2, fresh=True, age_s=0.5))
    out = PromText("board-7")
    prometheus(t, out, mqtt_connected=True)
    serving_metrics(serving, {200: 10, 404: 1}, out)
    return out.text(), json.loads(canonical_json(t.to_dict()))


@pytest.fixture(scope="module")
def make_bundle_module(zoo: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of the zoo's small dense model, written once for the module."""
    from edgefleet.converter.bundle.writer import BundleSpec, write_bundle

    data = zoo("dense_f32").read_bytes()
    out = tmp_path_factory.mktemp("bundle") / "m"
    write_bundle(out, data, BundleSpec(name="m", version=1, golden_inputs=[np.zeros((2, 1, 8), np.float32)]))
    return out


def exposed_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
    return names


def referenced(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", n) if n.startswith("edgefleet_inference_duration_seconds") else n
            for n in METRIC.findall(expr)}


def test_metric_table_documents_exactly_what_is_exposed(board: tuple[str, dict[str, Any]]) -> None:
    text, _ = board
    section = DOC.read_text().split("### The metrics", 1)[1].split("###", 1)[0]
    documented = {n for row in section.splitlines() if row.startswith("| `edgefleet_")
                  for n in METRIC.findall(row.split("|")[1])}
    assert documented == exposed_names(text)


def test_dashboard_and_alert_queries(board: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    from tests.support.promtool import promtool_path

    text, _ = board
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    doc_table = DOC.read_text().split("### Grafana", 1)[1].split("##", 1)[0]
    exprs += [m for m in re.findall(r"^\| [^|]+ \| `([^`]+)` \|$", doc_table, re.M)]
    assert len(exprs) > len(dashboard["panels"])
    alerts = yaml.safe_load(ALERTS.read_text())
    exprs += [r["expr"] for g in alerts["groups"] for r in g["rules"]]
    exposed = exposed_names(text)
    for expr in exprs:
        assert referenced(expr) and referenced(expr) <= exposed, expr
    # every query parses as PromQL: promtool checks them as recording rules
    rules = {"groups": [{"name": "docs", "rules": [{"record": f"edgefleet:doc_query_{i}", "expr": e}
                                                   for i, e in enumerate(exprs)]}]}
    (tmp_path / "queries.yml").write_text(yaml.safe_dump(rules))
    for path in (tmp_path / "queries.yml", ALERTS):
        done = subprocess.run([str(promtool_path()), "check", "rules", str(path)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def gjson(doc: Any, path: str) -> Any:
    """The value at a plain GJSON path (dot-separated keys and array indexes, as the snippet uses)."""
    value = doc
    for part in path.split("."):
        if isinstance(value, list) and part.isdigit():
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(path)
    return value


def test_telegraf_snippet_reads_the_real_telemetry(board: tuple[str, dict[str, Any]]) -> None:
    _, telemetry = board
    (snippet,) = [b for b in blocks("toml") if "mqtt_consumer" in b]
    (consumer,) = tomllib.loads(snippet)["inputs"]["mqtt_consumer"]
    assert consumer["topics"] == [Topics().all_devices("telemetry")]
    assert consumer["data_format"] == "json_v2" and consumer["qos"] == 0
    assert all(s.startswith("ssl://") and s.endswith(":8884") for s in consumer["servers"])  # the operator listener
    types = {"float": float, "int": int}
    for parser in consumer["json_v2"]:
        assert isinstance(gjson(telemetry, parser["timestamp_path"]), float)
        for tag in parser.get("tag", []):
            assert isinstance(gjson(telemetry, tag["path"]), str), tag
        for field in parser.get("field", []):
            value = gjson(telemetry, field["path"])
            assert isinstance(value, (int, float)) and not isinstance(value, bool), field
            if field.get("type") == "int":
                assert isinstance(value, types["int"]), field
        for obj in parser.get("object", []):
            items = gjson(telemetry, obj["path"])
            assert isinstance(items, list) and items
            for item in items:
                assert set(obj["tags"]) <= set(item) and set(item) <= set(obj["included_keys"]), item


def test_agent_toml_snippets_are_valid_config() -> None:
    snippets = [b for b in blocks("toml") if b.startswith("# agent.toml")]
    assert len(snippets) == 2
    for snippet in snippets:
        parse_config('device_id = "board-7"\n' + snippet)  # raises naming the bad key
    assert parse_config('device_id = "board-7"\n' + snippets[1]).homeassistant.discovery


def test_prometheus_scrape_snippet() -> None:
    (snippet,) = [yaml.safe_load(b) for b in blocks("yaml") if "scrape_configs" in b]
    (job,) = snippet["scrape_configs"]
    assert job["authorization"]["credentials_file"] and job["static_configs"][0]["targets"]


@pytest.mark.timeout(2400)  # the first run installs Home Assistant into .cache/
def test_home_assistant_manual_yaml(board: tuple[str, dict[str, Any]]) -> None:
    from tests.support.homeassistant_env import validate

    _, telemetry = board
    (snippet,) = [yaml.safe_load(b) for b in blocks("yaml") if "mqtt:" in b]
    sensors = snippet["mqtt"]["sensor"]
    for s in sensors:
        assert s["state_topic"] == Topics().telemetry("board-7")
    messages = [(f"homeassistant/sensor/board-7/manual_{i}/config", json.dumps(s).encode())
                for i, s in enumerate(sensors)]
    online = json.dumps({"status": "online", "device_id": "board-7", "agent_version": "x"}).encode()
    answer = validate(messages, [json.dumps(telemetry).encode()], status=[online], availability=[b"online"])
    assert answer["problems"] == []
    assert float(answer["rendered"][messages[0][0]][0]) == telemetry["models"][0]["p95_ms"]
    assert float(answer["rendered"][messages[1][0]][0]) == telemetry["rss_bytes"]
