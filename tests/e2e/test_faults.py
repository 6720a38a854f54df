"""Faults with real processes and a real Mosquitto: SIGKILL over many update cycles, the broker killed
during a download and during probation, frozen with SIGSTOP, a full disk, and clocks that are wrong."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.testing import faults
from edgefleet.testing.killing import KillLoop
from edgefleet.testing.reliability import Fleet, X, build_bundle, running_fleet

KILL_CYCLES = 14


def test_sigkill_at_random_points_over_many_update_cycles(tmp_path: Path) -> None:
    bundles = [build_bundle(tmp_path / "a", "dense_f32", version=1), build_bundle(tmp_path / "b", "dense_f32_v2",
                                                                                   version=1)]
    loop = KillLoop(tmp_path / "loop", bundles, seed=8)
    report = loop.run(KILL_CYCLES)
    print("\n" + report.summary())
    assert not report.problems, "\n".join(report.problems)
    assert report.kills == report.cycles == KILL_CYCLES
    assert report.corrupt_states == report.lost_models == report.api_failures == 0
    assert len(report.by) >= 3, report.by  # crash points and timed kills both happened
    assert len(report.versions_seen) >= 3, report.versions_seen  # updates went through between the kills


# --- the broker -----------------------------------------------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with running_fleet(tmp_path) as f:
        yield f


def test_broker_killed_and_restarted_during_a_download(fleet: Fleet, tmp_path: Path) -> None:
    faults.broker_killed_and_restarted_during_a_download(fleet, tmp_path)


def test_broker_killed_during_probation(fleet: Fleet, tmp_path: Path) -> None:
    faults.broker_killed_during_probation(fleet, tmp_path)


def test_broker_frozen_with_sigstop_is_detected_by_keepalive(fleet: Fleet, tmp_path: Path) -> None:
    faults.broker_frozen_with_sigstop_is_detected_by_keepalive(fleet, tmp_path)


# --- clocks ---------------------------------------------------------------------------------------

RETRY = "import edgefleet.agent.fleet.link\nedgefleet.agent.fleet.link.RETRY_INTERVAL_S = 1.0\n"
"""Runs in the agent before its CLI: retry refused-as-not-yet-valid documents every second, not 30."""


def test_documents_not_yet_valid_are_retried_and_expired_ones_are_not(fleet: Fleet, tmp_path: Path) -> None:
    a = fleet.agent(prelude=RETRY, security={"max_clock_skew_s": 0}).start()
    early = int(time.time()) + 4  # the board's clock is 4 s behind the operator's
    prepared = fleet.op.push(build_bundle(tmp_path / "v1", "dense_f32", version=1), now=early)
    dep_id = prepared.deployment.deployment_id
    refused = fleet.op.step("REJECTED", 1, dep_id=dep_id)
    assert "not yet valid" in refused["reason"] and "clock" in refused["reason"]
    fleet.op.step("PROBATION", 1, dep_id=dep_id, timeout=60)
    assert time.time() >= early
    assert [e["step"] for e in fleet.op.events() if e.get("deployment_id") == dep_id].count("REJECTED") == 1
    # expired: refused once, not reported again, nothing saved
    stale = fleet.op.push(build_bundle(tmp_path / "v2", "dense_f32_v2", version=2), now=int(time.time()) - 7200,
                          expires_in=3600)
    expired = fleet.op.step("REJECTED", 2, dep_id=stale.deployment.deployment_id)
    assert "document expired" in expired["reason"]
    mark = fleet.op.mark()
    fleet.op.document(stale.document)  # delivered again (as after a reconnect): still nothing happens
    with pytest.raises(AssertionError):
        fleet.op.after(mark, lambda e: e.get("deployment_id") == stale.deployment.deployment_id, timeout=3)
    assert expired["details"]["refused"] is True
    saved = a.state_file()["models"]["m"]
    assert saved["active"]["deployment"]["model"]["version"] == 1 and saved["floor"] == -1
    assert a.client.predict("m", X)["edgefleet"]["model_version"] == 1


# --- a full disk -----------------------------------------------------------------------------------


def test_disk_filling_up_during_a_download(fleet: Fleet, tmp_path: Path) -> None:
    faults.disk_filling_up_during_a_download(fleet, tmp_path)


def test_disk_quota_refuses_a_download_before_writing(fleet: Fleet, tmp_path: Path) -> None:
    """The agent's own limit (security.max_disk_fraction) refuses a download that would fill the disk."""
    a = fleet.agent(security={"max_disk_fraction": 0.0})
    assert a.cli("install", str(build_bundle(tmp_path / "v1", "dense_f32", version=1, key=fleet.key))).returncode == 0
    a.start()
    fleet.op.push(build_bundle(tmp_path / "v2", "dense_f32_v2", version=2))
    refused = fleet.op.step("REJECTED", 2)
    assert refused["reason"].startswith("not enough disk space") and refused["details"]["failed_step"] == "DOWNLOADING"
    assert not list((a.state_dir / "partial").iterdir())
    assert a.client.predict("m", X)["edgefleet"]["model_version"] == 1
