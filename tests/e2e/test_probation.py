"""Probation on live traffic with the real agent: slow, failing and hanging models roll back; a healthy one commits."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.api.client import ApiClient
from edgefleet.errors import RequestError
from edgefleet.testing.agentproc import AgentProcess
from edgefleet.testing.waiting import wait_for
from tests.support.helpers import swap_file

SMALL = [[0.5, -1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.1]]
BIG = [[500.0, 1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.1]]


@pytest.fixture
def agent(tmp_path: Path, make_bundle: Any) -> Any:
    """An agent serving a committed v1 of dense_f32 with some traffic behind it."""
    a = AgentProcess(tmp_path / "a", health={"probation_s": 3, "min_requests": 10, "hang_timeout_s": 1.0,
                                              "max_latency_ratio": 1.5, "max_error_rate": 0.05})
    assert a.cli("install", str(make_bundle("dense_f32", version=1))).returncode == 0
    a.start()
    for _ in range(30):
        a.client.predict("m", SMALL)
    wait_for(lambda: a.client.admin("status")["state"]["models"]["m"]["phase"] == "COMMITTED", what="v1 commit")
    yield a
    a.kill()


def _model(a: AgentProcess) -> dict[str, Any]:
    return a.client.admin("status")["state"]["models"]["m"]  # type: ignore[no-any-return]


def _install_v2(a: AgentProcess, make_bundle: Any, zoo: Any, model: str) -> None:
    bundle = make_bundle("dense_f32_v2", version=2)
    if model != "dense_f32_v2":
        swap_file(bundle, "model.tflite", zoo(model).read_bytes())
        # golden outputs of the new model on the same inputs, as its converter would have made them
        from edgefleet.bundle import GOLDEN_FILE, dump_golden, load_golden
        from edgefleet.converter.bundle.writer import run_samples
        from edgefleet.runtime import load_model

        ins, _ = load_golden((bundle / GOLDEN_FILE).read_bytes(), 1, 1)
        swap_file(bundle, GOLDEN_FILE, dump_golden(ins, run_samples(load_model(zoo(model)), ins)))
    res = a.cli("install", str(bundle))
    assert res.returncode == 0 and "PROBATION (v2)" in res.stdout, res.stdout + res.stderr


def test_a_healthy_model_commits(agent: AgentProcess, make_bundle: Any, zoo: Any) -> None:
    _install_v2(agent, make_bundle, zoo, "dense_f32_v2")
    for _ in range(20):
        assert agent.client.predict("m", SMALL)["edgefleet"]["model_version"] == 2
    wait_for(lambda: _model(agent)["phase"] == "COMMITTED", what="v2 commit")
    assert _model(agent)["last_outcome"]["result"] == "committed"


def test_a_slower_model_is_rolled_back(agent: AgentProcess, make_bundle: Any, zoo: Any) -> None:
    _install_v2(agent, make_bundle, zoo, "slow_f32")
    for _ in range(15):
        agent.client.predict("m", SMALL)
    outcome = wait_for(lambda: _model(agent)["last_outcome"] if _model(agent)["phase"] == "ROLLED_BACK" else None,
                       what="rollback")
    assert "p95 latency" in outcome["reason"] and "the previous model's" in outcome["reason"]
    assert outcome["figures"]["latency_ratio"] > 1.5 and outcome["figures"]["baseline_p95_ms"] > 0
    assert agent.client.predict("m", SMALL)["edgefleet"]["model_version"] == 1


def test_a_model_failing_on_real_inputs_is_rolled_back(agent: AgentProcess, make_bundle: Any, zoo: Any) -> None:
    _install_v2(agent, make_bundle, zoo, "fails_on_big_f32")
    failures = 0
    for i in range(20):
        try:
            agent.client.predict("m", BIG if i % 2 else SMALL)
        except RequestError as err:
            failures += 1
            assert err.status == 500 or err.status == 400
    assert failures >= 5
    outcome = wait_for(lambda: _model(agent)["last_outcome"] if _model(agent)["phase"] == "ROLLED_BACK" else None,
                       what="rollback")
    assert "error rate" in outcome["reason"] and outcome["figures"]["error_rate"] > 0.05
    assert agent.client.predict("m", BIG)["edgefleet"]["model_version"] == 1


def test_a_hung_invocation_rolls_back_and_answers_continue(agent: AgentProcess, make_bundle: Any, zoo: Any) -> None:
    _install_v2(agent, make_bundle, zoo, "hang_on_big_f32")
    assert agent.client.predict("m", SMALL)["edgefleet"]["model_version"] == 2

    def hang() -> None:
        try:
            ApiClient(socket_path=agent.socket, timeout=60).predict("m", BIG)
        except Exception:
            pass

    threading.Thread(target=hang, daemon=True).start()
    started = time.monotonic()
    outcome = wait_for(lambda: _model(agent)["last_outcome"] if _model(agent)["phase"] == "ROLLED_BACK" else None,
                       what="rollback")
    assert time.monotonic() - started < 5
    assert "hung" in outcome["reason"] and outcome["figures"]["hung_s"] >= 1.0
    assert agent.client.predict("m", SMALL)["edgefleet"]["model_version"] == 1  # the board keeps answering
    health = agent.client.health()
    assert "hung" in (health["agent"]["reason"] or "")  # under systemd: no more watchdog pings
