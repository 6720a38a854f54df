"""`push --wait` progress against a real agent on a real Mosquitto: piped, one line per phase the device
goes through before the verdict; with --json, JSON Lines ending with the summary document."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.converter.fleet.progress import ORDER
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.broker import Mosquitto

Edgectl = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cam(tmp_path: Path, broker: Mosquitto, key_dir: Path, edgectl: Edgectl) -> Iterator[AgentProcess]:
    """cam-1 in group lab, online and in the signed inventory, with a one-second probation."""
    agent = AgentProcess(tmp_path / "cam-1", device_id="cam-1", groups=["lab"],
                         mqtt={"url": broker.url, "reconnect_max_s": 1.0},
                         security={"trusted_keys": [str(key_dir / "edgefleet.pub")]},
                         health={"probation_s": 1, "min_requests": 1})
    try:
        agent.start()
        code, _, err = edgectl("inventory", "set", "lab", "cam-1", "--key", key_dir, "--broker", broker.url)
        assert code == 0, err
        yield agent
    finally:
        agent.kill()


def in_order(phases: list[str]) -> bool:
    """Each phase further along the lifecycle than the one before."""
    ranks = [ORDER.index(p) for p in phases]
    return ranks == sorted(ranks) and len(set(ranks)) == len(ranks)


def test_piped_push_wait_prints_each_phase_of_the_device_before_its_verdict(
        broker: Mosquitto, cam: AgentProcess, make_bundle: Callable[..., Path], key_dir: Path,
        edgectl: Edgectl) -> None:
    code, out, err = edgectl("push", make_bundle("dense_f32", version=1), "--group", "lab", "--key", key_dir,
                             "--probation", 1, "--wait", "--timeout", 60, "--broker", broker.url)
    assert code == 0, out + err
    lines = out.splitlines()
    verdict = next(i for i, line in enumerate(lines) if line.startswith("device cam-1: committed v1 after "))
    progress = [line.removeprefix("device cam-1: ") for line in lines[:verdict] if line.startswith("device cam-1: ")]
    phases = [p.split()[0].rstrip(":") for p in progress]
    assert phases[0] == "DOWNLOADING" and phases[-1] == "COMMITTED", out
    assert {"VALIDATING", "PROBATION"} <= set(phases) and in_order(phases), out
    assert progress[0].startswith("DOWNLOADING 0% (") or progress[0].startswith("DOWNLOADING 100% ("), out
    assert "PROBATION for at least 1 s" in progress, out
    assert lines[-1] == "1 committed, 0 failed, 0 unfinished, 0 pending"


def test_push_wait_json_is_json_lines_of_progress_events_then_the_summary(
        broker: Mosquitto, cam: AgentProcess, make_bundle: Callable[..., Path], key_dir: Path,
        edgectl: Edgectl) -> None:
    code, out, err = edgectl("push", make_bundle("dense_f32", version=1), "--device", "cam-1", "--key", key_dir,
                             "--wait", "--timeout", 60, "--json", "--broker", broker.url)
    assert code == 0, out + err
    docs = [json.loads(line) for line in out.splitlines()]
    *events, summary = docs
    assert {e["event"] for e in events} == {"progress"} and {e["device"] for e in events} == {"cam-1"}
    phases = [e["phase"] for i, e in enumerate(events) if i == 0 or events[i - 1]["phase"] != e["phase"]]
    assert phases[0] == "DOWNLOADING" and phases[-1] == "COMMITTED" and in_order(phases), phases
    downloaded = [e["bytes"] for e in events if e["phase"] == "DOWNLOADING"]
    assert downloaded == sorted(downloaded) and downloaded[-1] == summary["wire_bytes"]
    assert all(e["total"] == summary["wire_bytes"] and isinstance(e["t"], float) for e in events)
    assert events[-1]["bytes"] == summary["wire_bytes"] and events[-1]["online"] is True
    # the summary document keeps the fields --json printed before progress came
    assert summary["event"] == "summary" and summary["ok"] is True
    assert [(d["device_id"], d["verdict"]) for d in summary["devices"]] == [("cam-1", "committed")]
    assert {"deployment_id", "model", "version", "topics", "chunks", "wire_bytes", "publish_s"} <= set(summary)
