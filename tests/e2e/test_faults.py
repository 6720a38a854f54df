"""Faults with real processes and a real Mosquitto: SIGKILL over many update cycles, the broker killed
during a download and during probation, frozen with SIGSTOP, a full disk, and clocks that are wrong."""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.protocol import parse_json
from tests.support.helpers import wait_for
from tests.support.killing import KillLoop
from tests.support.reliability import AgentWith, Fleet, X, build_bundle, running_fleet, small_filesystem

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
    a = fleet.agent().start()
    withheld = 25
    prepared = fleet.op.push(build_bundle(tmp_path / "cnn", "cnn_v1", version=1, chunk_size=16384), withhold=withheld)
    total = len(prepared.chunks)
    wait_for(lambda: (fleet.model(a).get("progress") or 0) >= (total - withheld) / total - 1e-9, timeout=60,
             what="every published chunk on disk")
    fleet.broker.kill()  # SIGKILL: the retained chunks and documents it had not saved are gone
    fleet.broker.start()
    wait_for(lambda: fleet.op.transport.connected and "connected to" in a.log().split(" lost")[-1], timeout=60,
             what="both sides reconnected")
    # only what the agent still lacks is published again: a chunk it dropped would never come back
    fleet.op.document(prepared.document)
    fleet.op.chunks(dict(list(prepared.chunks.items())[total - withheld:]))
    done = fleet.op.event(lambda e: e["step"] == "DOWNLOADING" and e["details"].get("done"), timeout=120)
    assert done["details"]["chunks_total"] == total
    fleet.op.step("PROBATION", 1, timeout=60)
    assert a.client.predict("m", np.zeros((1, 28, 28, 1)).tolist())["edgefleet"]["model_version"] == 1


def test_broker_killed_during_probation(fleet: Fleet, tmp_path: Path) -> None:
    a = fleet.agent(health={"probation_s": 3}).start()
    fleet.op.push(build_bundle(tmp_path / "v1", "dense_f32", version=1))
    fleet.op.step("COMMITTED", 1, timeout=60)
    fleet.op.push(build_bundle(tmp_path / "v2", "dense_f32_v2", version=2))
    fleet.op.step("PROBATION", 2)
    fleet.broker.kill()
    answers = [a.client.predict("m", X)["edgefleet"]["model_version"] for _ in range(20)]  # traffic judges the probation
    assert answers == [2] * 20
    wait_for(lambda: fleet.model(a)["phase"] == "COMMITTED", timeout=60, what="v2 committed with no broker")
    # the operator must be subscribed again before the agent reconnects, or the broker drops the events
    # the agent queued (events are not retained): hold the agent still meanwhile
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    try:
        mark = fleet.op.mark()
        fleet.broker.start()
        wait_for(lambda: fleet.op.transport.connected, timeout=60, what="the operator reconnected")
    finally:
        a.proc.send_signal(signal.SIGCONT)
    state = fleet.op.received(mark, fleet.op.topics.state("dev-1"),
                              lambda d: d["models"].get("m", {}).get("phase") == "COMMITTED", timeout=60)
    assert state["models"]["m"]["active"]["version"] == 2
    committed = fleet.op.step("COMMITTED", 2, timeout=30)  # the event queued while offline still arrives
    assert committed["ok"] is True
    assert a.proc is not None and a.proc.poll() is None


def test_broker_frozen_with_sigstop_is_detected_by_keepalive(fleet: Fleet, tmp_path: Path) -> None:
    keepalive = 2
    a = fleet.agent(mqtt={"keepalive_s": keepalive}).start()
    fleet.op.push(build_bundle(tmp_path / "v1", "dense_f32", version=1))
    fleet.op.step("PROBATION", 1)
    connects = a.log().count("connected to")
    fleet.broker.pause()
    frozen = time.monotonic()
    try:
        wait_for(lambda: "connection to" in a.log() and " lost" in a.log(), timeout=30, what="keepalive timeout")
        detected = time.monotonic() - frozen
        assert a.client.predict("m", X)["edgefleet"]["model_version"] == 1  # serving never depended on the broker
    finally:
        fleet.broker.resume()
    print(f"\nbroker frozen: the agent noticed after {detected:.1f} s (keep alive {keepalive} s)")
    assert detected <= 2 * keepalive + 3, detected  # paho's rule: no PINGRESP within 1.5 keep alive periods
    wait_for(lambda: a.log().count("connected to") > connects, timeout=60, what="reconnected after SIGCONT")
    fleet.op.push(build_bundle(tmp_path / "v2", "dense_f32_v2", version=2))
    fleet.op.step("PROBATION", 2, timeout=60)
    assert a.client.predict("m", X)["edgefleet"]["model_version"] == 2


# --- clocks ---------------------------------------------------------------------------------------

RETRY = "import edgefleet.agent.fleet.link\nagent.link.RETRY_INTERVAL_S = 1.0\n"
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


def _inside(a: AgentWith) -> Path:
    """The agent's state directory as the agent sees it (its own mount namespace)."""
    assert a.proc is not None
    return Path(f"/proc/{a.proc.pid}/root{a.state_dir}")


def test_disk_filling_up_during_a_download(fleet: Fleet, tmp_path: Path) -> None:
    """A real full disk: the agent's state directory is a 1.5 MB tmpfs of its own (a mount namespace)."""
    (tmp_path / "agent-0" / "state").mkdir(parents=True)
    prefix = small_filesystem(tmp_path / "agent-0" / "state", 1536)
    assert prefix is not None, "cannot mount a small filesystem here (needs root or user namespaces)"
    a = fleet.agent(prefix=prefix, security={"max_disk_fraction": 1.0}).start()
    fleet.op.push(build_bundle(tmp_path / "v1", "dense_f32", version=1))
    fleet.op.step("PROBATION", 1)
    withheld = 30
    prepared = fleet.op.push(build_bundle(tmp_path / "cnn", "cnn_v1", version=2, chunk_size=16384), withhold=withheld)
    total = len(prepared.chunks)
    wait_for(lambda: (fleet.model(a).get("progress") or 0) >= (total - withheld) / total - 1e-9, timeout=60,
             what="the published chunks on disk")
    state = _inside(a)
    filler = state / "filler"  # someone else's data takes the rest of the disk
    with open(filler, "wb") as f:
        f.write(b"\0" * (shutil.disk_usage(state).free - (64 << 10)))
    free = shutil.disk_usage(state).free
    fleet.op.chunks(dict(list(prepared.chunks.items())[total - withheld:]))
    refused = fleet.op.step("REJECTED", 2, timeout=60)
    assert "No space left on device" in refused["reason"] and refused["details"]["failed_step"] == "DOWNLOADING"
    assert a.client.predict("m", X)["edgefleet"]["model_version"] == 1 and a.proc is not None and a.proc.poll() is None
    assert not list((state / "partial").iterdir()), "the refused download's partial data was kept on a full disk"
    assert shutil.disk_usage(state).free > free + 400_000
    assert parse_json((state / "state.json").read_bytes())["models"]["m"]["active"]["deployment"]["model"]["version"] == 1
    filler.unlink()  # space again: the same model, pushed again, goes through
    fleet.op.push(build_bundle(tmp_path / "cnn2", "cnn_v1", version=3, chunk_size=16384))
    fleet.op.step("PROBATION", 3, timeout=60)


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
