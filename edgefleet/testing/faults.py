"""Broker and disk faults against real agents and a real Mosquitto, each a function of a running `Fleet`.

The broker killed (SIGKILL) and restarted during a download and during probation, frozen with SIGSTOP,
and the agent's disk filling up during a download. Each scenario raises AssertionError when the agent
does not come through; tests/e2e/test_faults.py runs each once, bench/reliability.py a few rounds.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgefleet.protocol import parse_json
from edgefleet.testing.reliability import AgentWith, Fleet, X, build_bundle, small_filesystem
from edgefleet.testing.waiting import wait_for


def broker_killed_and_restarted_during_a_download(fleet: Fleet, work: Path) -> None:
    """SIGKILL the broker with part of a bundle on disk: after the restart the download resumes and completes."""
    a = fleet.agent().start()
    withheld = 25
    prepared = fleet.op.push(build_bundle(work / "cnn", "cnn_v1", version=1, chunk_size=16384), withhold=withheld)
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


def broker_killed_during_probation(fleet: Fleet, work: Path) -> None:
    """Probation is judged and committed with no broker; the events queued meanwhile arrive after it returns."""
    a = fleet.agent(health={"probation_s": 3}).start()
    fleet.op.push(build_bundle(work / "v1", "dense_f32", version=1))
    fleet.op.step("COMMITTED", 1, timeout=60)
    fleet.op.push(build_bundle(work / "v2", "dense_f32_v2", version=2))
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


def broker_frozen_with_sigstop_is_detected_by_keepalive(fleet: Fleet, work: Path) -> None:
    """A broker that holds its sockets but answers nothing is noticed within the keep alive; serving goes on."""
    keepalive = 2
    a = fleet.agent(mqtt={"keepalive_s": keepalive}).start()
    fleet.op.push(build_bundle(work / "v1", "dense_f32", version=1))
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
    fleet.op.push(build_bundle(work / "v2", "dense_f32_v2", version=2))
    fleet.op.step("PROBATION", 2, timeout=60)
    assert a.client.predict("m", X)["edgefleet"]["model_version"] == 2


def _inside(a: AgentWith) -> Path:
    """The agent's state directory as the agent sees it (its own mount namespace)."""
    assert a.proc is not None
    return Path(f"/proc/{a.proc.pid}/root{a.state_dir}")


def disk_filling_up_during_a_download(fleet: Fleet, work: Path) -> None:
    """A real full disk: the agent's state directory is a 1.5 MB tmpfs of its own (a mount namespace)."""
    state_dir = fleet.root / f"agent-{len(fleet.agents)}" / "state"  # where fleet.agent() puts the next agent's
    state_dir.mkdir(parents=True)
    prefix = small_filesystem(state_dir, 1536)
    assert prefix is not None, "cannot mount a small filesystem here (needs root or user namespaces)"
    a = fleet.agent(prefix=prefix, security={"max_disk_fraction": 1.0}).start()
    fleet.op.push(build_bundle(work / "v1", "dense_f32", version=1))
    fleet.op.step("PROBATION", 1)
    withheld = 30
    prepared = fleet.op.push(build_bundle(work / "cnn", "cnn_v1", version=2, chunk_size=16384), withhold=withheld)
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
    fleet.op.push(build_bundle(work / "cnn2", "cnn_v1", version=3, chunk_size=16384))
    fleet.op.step("PROBATION", 3, timeout=60)


SCENARIOS: tuple[Callable[[Fleet, Path], None], ...] = (
    broker_killed_and_restarted_during_a_download,
    broker_killed_during_probation,
    broker_frozen_with_sigstop_is_detected_by_keepalive,
    disk_filling_up_during_a_download,
)
"""Every scenario, in the order the benchmark runs them."""
