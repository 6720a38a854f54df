"""`edgectl fleet collect --db` through a rollout and a rollback of real agents on a real Mosquitto, then
`edgectl fleet history` from what it wrote: on SQLite and on the machine's PostgreSQL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.converter.fleet.history.store import HistoryStore, is_postgres
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.broker import Mosquitto
from edgefleet.testing.waiting import wait_for
from tests.support import ROOT
from tests.support.grafana_sql import dashboard, expand, queries
from tests.support.helpers import lab_agents
from tests.support.history import history_target

X = [[0.5, -1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.1]]
Edgectl = Callable[..., tuple[int, str, str]]



@pytest.fixture(params=["sqlite", "postgresql"])
def history_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test runs on SQLite, then on PostgreSQL."""
    yield from history_target(request.param, tmp_path)


@pytest.fixture
def lab(tmp_path: Path, broker: Mosquitto, key_dir: Path, edgectl: Edgectl) -> Iterator[list[AgentProcess]]:
    """dev-1 and dev-2 in group lab (in the signed inventory too), telemetry every 0.5 s."""
    with lab_agents(tmp_path, broker.url, key_dir, edgectl, telemetry={"interval_s": 0.5}) as agents:
        yield agents

def serving(a: AgentProcess) -> tuple[str | None, int | None]:
    m = a.client.health()["agent"]["models"].get("m", {})
    return m.get("phase"), m.get("version")


def test_history_reproduces_a_rollout_and_a_rollback_per_device(
        tmp_path: Path, broker: Mosquitto, lab: list[AgentProcess], make_bundle: Callable[..., Path], key_dir: Path,
        edgectl: Edgectl, history_db: str) -> None:
    one, two = lab
    login = ("--broker", broker.url)
    collector = subprocess.Popen([sys.executable, "-m", "edgefleet.converter.cli", "fleet", "collect", "--db", history_db,
                                  "--report-every", "60", "--json", *login],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert collector.stderr is not None
        started = collector.stderr.readline()
        assert started.startswith("collecting") and "status" in started, started + collector.stderr.read()
        for version, model in ((1, "dense_f32"), (2, "dense_f32_v2")):
            code, out, err = edgectl("push", make_bundle(model, version=version), "--group", "lab", "--key", key_dir,
                                     "--wait", "--timeout", 60, *login)
            assert code == 0, out + err
            for _ in range(20):  # traffic, for latency figures in the telemetry of each version
                for a in lab:
                    a.client.predict("m", X)
            time.sleep(1.2)  # two telemetry samples of the version at least
        code, out, err = edgectl("rollback", "--device", "dev-1", "--model", "m", "--key", key_dir, "--wait", *login)
        assert code == 0, out + err
        wait_for(lambda: serving(one) == ("ROLLED_BACK", 1), timeout=30, what="dev-1 back on v1")
        time.sleep(1.2)
    finally:
        collector.send_signal(signal.SIGTERM)
        stdout, stderr = collector.communicate(timeout=30)
    assert collector.returncode == 0, stderr
    summary = json.loads(stdout)
    assert summary["history"]["rows"] > 0 and summary["history"]["failed_rows"] == 0, summary

    db = ("--db", history_db)
    code, out, err = edgectl("fleet", "history", "--device", "dev-1", "--since", "10m", "--json", *db)
    assert code == 0, err
    shown = json.loads(out)
    steps = [(s["device_id"], s["model"], s["version"], s["outcome"]) for s in shown["segments"]]
    assert steps == [("dev-1", "m", 1, "committed"), ("dev-1", "m", 2, "rolled_back"), ("dev-1", "m", 1, "restored")], steps
    v1, v2, back = shown["segments"]
    assert v1["to"] == pytest.approx(v2["from"]) and v2["to"] <= back["from"] + 0.01 and back["ongoing"]
    assert [o["result"] for o in v2["outcomes"]] == ["committed", "rolled_back"]
    assert "ordered by command" in v2["outcomes"][-1]["reason"]
    assert v1["samples"] >= 2 and v2["samples"] >= 2
    assert v1["requests"] >= 20 and v2["requests"] >= 20 and v2["error_rate"] == 0.0
    assert v2["p95_ms"] > 0 and v2["rss_mb"] > 1 and v2["cpu_percent"] is not None
    assert shown["devices"] == [{"device_id": "dev-1", "groups": ["lab"]}]

    code, out, err = edgectl("fleet", "history", "--group", "lab", "--model", "m", "--since", "10m", "--json", *db)
    assert code == 0, err
    per_device: dict[str, list[tuple[int, str]]] = {}
    for s in json.loads(out)["segments"]:
        per_device.setdefault(s["device_id"], []).append((s["version"], s["outcome"]))
    assert per_device == {"dev-1": [(1, "committed"), (2, "rolled_back"), (1, "restored")],
                          "dev-2": [(1, "committed"), (2, "committed")]}, per_device

    png = tmp_path / "dev-1.png"
    code, out, err = edgectl("fleet", "history", "--device", "dev-1", "--since", "10m", "--plot", png, *db)
    assert code == 0, err
    assert "rolled_back: rollback ordered by command" in out and f"plot written to {png}" in out, out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000

    code, _, err = edgectl("fleet", "history", "--device", "dev-1", "--since", "tomorrow", *db)
    assert code == 2 and err.strip().startswith("edgectl: error: ") and "tomorrow" in err and len(err.strip().splitlines()) == 1

    if is_postgres(history_db):
        check_dashboard(history_db)


def check_dashboard(db: str) -> None:
    """Every query of the Grafana dashboard runs on the collected tables; the main panels have rows."""
    now = time.time()
    with HistoryStore.open(db) as store:
        results = {}
        for group in ("lab", "__all"):
            for where, sql in queries(dashboard()):
                rows = store.fetch(expand(sql, since=now - 600, until=now, devices=["dev-1", "dev-2"], models=["m"],
                                          group=group))
                results[(where, group)] = rows
    by_panel = {where: rows for (where, group), rows in results.items() if group == "lab"}
    assert sorted(r[0] for r in results[("variable device", "lab")]) == ["dev-1", "dev-2"]
    assert sorted(r[0] for r in results[("variable device", "__all")]) == ["dev-1", "dev-2"]
    assert [r[0] for r in by_panel["variable group"]] == ["lab"]
    for title in ("Latency p95 per device and version (ms, 1-minute means)", "Error rate per device and version "
                  "(between samples)", "Agent CPU per device (% of one core, 1-minute means)",
                  "Agent resident memory per device (1-minute means)"):
        assert by_panel[f"panel {title!r}"], title
    outcomes = by_panel["panel 'Deployment outcomes'"]
    assert sorted((r[1], r[3], r[4]) for r in outcomes) == [
        ("dev-1", 1, "committed"), ("dev-1", 2, "committed"), ("dev-1", 2, "rolled_back"),
        ("dev-2", 1, "committed"), ("dev-2", 2, "committed")]
    now_serving = {(r[0], r[2]) for r in by_panel["panel 'Version served now (latest sample in range)'"]}
    assert now_serving == {("dev-1", 1), ("dev-2", 2)}
    assert len(by_panel["annotation 'Deployment outcomes'"]) == 5
