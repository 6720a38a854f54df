"""Shadow probation with the real agent on live traffic: a candidate whose classes are permuted passes its
goldens but is rejected on what the device really sees; a faithful re-packaging of the active model
commits; no traffic rejects at the end of the window (docs/operations.md, "Shadow probation")."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.api.client import ApiClient
from edgefleet.protocol.documents import Policy, ShadowPolicy
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.waiting import wait_for
from tests.support.helpers import swap_file
from tests.support.permute import permute_classes

LABELS = ("cat", "dog", "bird", "fish")


class Traffic:
    """A thread sending requests of varied inputs through the agent's local API until stopped."""

    def __init__(self, socket: Path) -> None:
        self.client = ApiClient(socket_path=socket, timeout=10)
        self.stop = threading.Event()
        self.sent = 0
        self.versions: set[int] = set()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(5)
        while not self.stop.is_set():
            x = rng.normal(size=(1, 8)).astype(np.float32).tolist()
            try:
                self.versions.add(self.client.predict("m", x)["edgefleet"]["model_version"])
                self.sent += 1
            except Exception:
                pass
            self.stop.wait(0.005)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


@pytest.fixture
def agent(tmp_path: Path, make_bundle: Any) -> Iterator[AgentProcess]:
    """An agent serving a committed v1 of dense_f32 with labels; shadow runs need 40 samples."""
    a = AgentProcess(tmp_path / "a", health={"probation_s": 1, "min_requests": 5},
                     shadow={"min_samples": 40, "sample_rate": 0.5, "window_s": 60})
    assert a.cli("install", str(make_bundle("dense_f32", version=1, labels=LABELS))).returncode == 0
    a.start()
    for _ in range(10):
        a.client.predict("m", [[0.5, -1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.1]])
    wait_for(lambda: _model(a)["phase"] == "COMMITTED", what="v1 commit")
    yield a
    a.kill()


def _model(a: AgentProcess) -> dict[str, Any]:
    return a.client.admin("status")["state"]["models"]["m"]  # type: ignore[no-any-return]


def _bundle(make_bundle: Any, zoo: Any, *, permuted: bool, **shadow: Any) -> Path:
    """v2 with a shadow policy: dense_f32 itself (a faithful re-packaging), or its classes permuted with
    golden outputs made from the permuted model, as a converter would have written them."""
    bundle = make_bundle("dense_f32", version=2, labels=LABELS, policy=Policy(shadow=ShadowPolicy(**shadow)))
    if permuted:
        from edgefleet.bundle import GOLDEN_FILE, dump_golden, load_golden
        from edgefleet.converter.bundle.writer import run_samples
        from edgefleet.runtime import load_model

        model = permute_classes(zoo("dense_f32").read_bytes(), [1, 2, 3, 0])
        swap_file(bundle, "model.tflite", model)
        ins, _ = load_golden((bundle / GOLDEN_FILE).read_bytes(), 1, 1)
        swap_file(bundle, GOLDEN_FILE, dump_golden(ins, run_samples(load_model(model), ins)))
    return bundle


def _ended(a: AgentProcess) -> dict[str, Any] | None:
    m = _model(a)
    return m if m["phase"] in ("COMMITTED", "REJECTED") and m["last_outcome"]["version"] == 2 else None


def test_a_candidate_with_permuted_classes_passes_its_goldens_but_is_rejected_on_live_traffic(
        agent: AgentProcess, make_bundle: Any, zoo: Any) -> None:
    with Traffic(agent.socket) as traffic:
        res = agent.cli("install", str(_bundle(make_bundle, zoo, permuted=True)))
        assert res.returncode == 0 and "SHADOW (v2)" in res.stdout, res.stdout + res.stderr
        model = wait_for(lambda: _ended(agent), what="shadow verdict")
        assert traffic.versions == {1}  # v2 never answered a client
    outcome = model["last_outcome"]
    assert model["phase"] == "REJECTED" and model["active"]["version"] == 1, model
    assert "disagreed with the active model" in outcome["reason"], outcome
    assert outcome["figures"]["agreement"] < 0.5 and outcome["figures"]["samples"] >= 1
    assert outcome["figures"]["min_agreement"] == 0.98
    assert outcome["figures"]["disagreements"] > outcome["figures"]["samples"] * 0.02
    status = agent.cli("status")
    assert "last: v2 rejected: shadow: the candidate disagreed" in status.stdout, status.stdout


def test_a_faithful_repackaging_commits_after_shadowing(agent: AgentProcess, make_bundle: Any, zoo: Any) -> None:
    with Traffic(agent.socket) as traffic:
        res = agent.cli("install", str(_bundle(make_bundle, zoo, permuted=False)))
        assert res.returncode == 0 and "SHADOW (v2)" in res.stdout, res.stdout + res.stderr
        shadowing = wait_for(lambda: _model(agent) if _model(agent).get("shadow") else None, what="shadow figures")
        assert shadowing["phase"] == "SHADOW" and shadowing["shadow"]["min_samples"] == 40
        assert 1 in traffic.versions
        model = wait_for(lambda: _ended(agent), what="shadow verdict")
        wait_for(lambda: _model(agent)["phase"] == "COMMITTED", what="v2 commit")
        assert 2 in traffic.versions
    assert model["active"]["version"] == 2
    assert "model m: SHADOW v2" in agent.log_path.read_text()


def test_no_traffic_rejects_at_the_end_of_the_window_without_raising_the_floor(
        agent: AgentProcess, make_bundle: Any, zoo: Any) -> None:
    res = agent.cli("install", str(_bundle(make_bundle, zoo, permuted=False, window_s=2)))
    assert res.returncode == 0 and "SHADOW (v2)" in res.stdout, res.stdout + res.stderr
    model = wait_for(lambda: _ended(agent), what="shadow verdict")
    outcome = model["last_outcome"]
    assert model["phase"] == "REJECTED" and "not enough traffic: 0 of 40" in outcome["reason"], outcome
    # the same version may be tried again when the device is busier
    with Traffic(agent.socket):
        res = agent.cli("install", str(_bundle(make_bundle, zoo, permuted=False)))
        assert "SHADOW (v2)" in res.stdout, res.stdout + res.stderr
        wait_for(lambda: _model(agent)["phase"] == "COMMITTED" and _model(agent)["active"]["version"] == 2,
                 what="v2 commit")


def test_push_wait_and_fleet_watch_show_shadow_progress_over_mqtt(
        tmp_path: Path, broker: Any, key_dir: Path, edgectl: Any, make_bundle: Any) -> None:
    agent = AgentProcess(tmp_path / "cam-1", device_id="cam-1", mqtt={"url": broker.url, "reconnect_max_s": 1.0},
                         security={"trusted_keys": [str(key_dir / "edgefleet.pub")]},
                         health={"probation_s": 1, "min_requests": 1},
                         shadow={"min_samples": 40, "sample_rate": 0.5, "window_s": 60})
    try:
        agent.start()
        code, out, err = edgectl("push", make_bundle("dense_f32", version=1, labels=LABELS), "--device", "cam-1",
                                 "--key", key_dir, "--wait", "--timeout", 60, "--broker", broker.url)
        assert code == 0, out + err
        with Traffic(agent.socket):
            code, out, err = edgectl("push", make_bundle("dense_f32", version=2, labels=LABELS), "--device", "cam-1",
                                     "--key", key_dir, "--shadow", "--shadow-min-samples", 80, "--broker", broker.url)
            assert code == 0, out + err

            def shadow_row() -> str | None:
                code, out, _ = edgectl("fleet", "watch", "--once", "--telemetry-wait", 0, "--broker", broker.url)
                row = next((line for line in out.splitlines() if "cam-1" in line and "SHADOW " in line), None)
                return row if code == 0 and row and "/80" in row else None

            row = wait_for(shadow_row, what="SHADOW in fleet watch")
            assert re.search(r"SHADOW \d+/80( \d+\.\d%)?", row), row
            wait_for(lambda: _model(agent)["phase"] == "COMMITTED" and _model(agent)["active"]["version"] == 2,
                     timeout=60, what="v2 commit")
            code, out, err = edgectl("push", make_bundle("dense_f32", version=3, labels=LABELS), "--device", "cam-1",
                                     "--key", key_dir, "--shadow", "--wait", "--json", "--timeout", 60,
                                     "--broker", broker.url)
        assert code == 0, out + err
        *events, summary = [json.loads(line) for line in out.splitlines()]
        shadowing = [e for e in events if e["phase"] == "SHADOW"]
        assert shadowing and any(re.fullmatch(r"\d+/40 \d+\.\d%", e.get("shadow", "")) for e in shadowing), [e.get("shadow") for e in shadowing]
        assert [(d["device_id"], d["verdict"]) for d in summary["devices"]] == [("cam-1", "committed")]
    finally:
        agent.kill()


def test_a_document_withdrawn_during_shadow_is_never_activated(
        tmp_path: Path, broker: Any, key_dir: Path, edgectl: Any, make_bundle: Any) -> None:
    agent = AgentProcess(tmp_path / "cam-1", device_id="cam-1", mqtt={"url": broker.url, "reconnect_max_s": 1.0},
                         security={"trusted_keys": [str(key_dir / "edgefleet.pub")]},
                         health={"probation_s": 1, "min_requests": 1}, shadow={"min_samples": 40})
    try:
        agent.start()
        code, out, err = edgectl("push", make_bundle("dense_f32", version=1, labels=LABELS), "--device", "cam-1",
                                 "--key", key_dir, "--wait", "--timeout", 60, "--broker", broker.url)
        assert code == 0, out + err
        code, out, err = edgectl("push", make_bundle("dense_f32", version=2, labels=LABELS), "--device", "cam-1",
                                 "--key", key_dir, "--shadow", "--broker", broker.url)
        assert code == 0, out + err
        wait_for(lambda: _model(agent)["phase"] == "SHADOW", timeout=30, what="SHADOW")
        code, out, err = edgectl("deployments", "withdraw", "--device", "cam-1", "--model", "m", "--key", key_dir,
                                 "--broker", broker.url)
        assert code == 0, out + err
        model = wait_for(lambda: _model(agent) if _model(agent)["phase"] != "SHADOW" else None, what="withdrawal")
        assert model["phase"] == "COMMITTED" and model["active"]["version"] == 1 and "pending" not in model, model
        assert "shadow run of m-v2" in agent.log_path.read_text()  # the candidate was unloaded
        with Traffic(agent.socket) as traffic:
            wait_for(lambda: traffic.sent >= 100, what="traffic")
        assert traffic.versions == {1} and _model(agent)["active"]["version"] == 1
    finally:
        agent.kill()
