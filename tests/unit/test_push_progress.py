"""`push --wait` progress: how devices' events and state documents become phases and download bytes, and
how the three views (plain lines, JSON Lines, the live table) render and throttle them. The observer is
fed the documents an agent publishes, without a broker."""

from __future__ import annotations

import io
import json

from rich.console import Console

from edgefleet.converter.fleet.observer import FleetObserver
from edgefleet.converter.fleet.progress import (
    DeviceProgress,
    JsonLines,
    LiveTable,
    PlainLines,
    ProgressFeed,
    RolloutProgress,
    progress_line,
)
from edgefleet.converter.fleet.publish import DeviceResult
from edgefleet.converter.fleet.rollout import follow
from edgefleet.protocol import DeviceState, Event, ModelState, Outcome, Slot, Status, Topics, canonical_json
from edgefleet.protocol.phases import Phase
from edgefleet.transport import Message

T = Topics()
DEP = "m-v2-0123456789ab"
TOTAL = 20 * (1 << 20)


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def online(observer: FleetObserver, device: str, status: str = "online") -> None:
    doc = Status(status=status, device_id=device, agent_version="t", groups=("lab",))
    observer.handle(Message(T.status(device), canonical_json(doc.to_dict()), retain=True))


def event(observer: FleetObserver, device: str, step: Phase, ok: bool = True, reason: str | None = None,
          dep: str = DEP, **details: object) -> None:
    ev = Event(ts=1.0, device_id=device, model="m", step=step, ok=ok, deployment_id=dep, version=2, reason=reason,
               details=dict(details))
    observer.handle(Message(T.events(device), canonical_json(ev.to_dict())))


def state(observer: FleetObserver, device: str, phase: Phase, *, progress: float | None = None,
          pending: str | None = DEP, active: str | None = None, outcome: Outcome | None = None) -> None:
    def slot(dep: str) -> Slot:
        return Slot(version=2, deployment_id=dep, sha256="ab" * 32)

    model = ModelState(phase=phase, pending=slot(pending) if pending else None, active=slot(active) if active else None,
                       progress=progress, last_outcome=outcome)
    doc = DeviceState(device_id=device, ts=1.0, agent_version="t", models={"m": model})
    observer.handle(Message(T.state(device), canonical_json(doc.to_dict()), retain=True))


def tracker(observer: FleetObserver, *devices: str, clock: Clock | None = None,
            probation_s: float | None = None) -> RolloutProgress:
    return RolloutProgress(observer, devices, "m", DEP, total_bytes=TOTAL, probation_s=probation_s,
                           clock=clock or Clock())


def test_events_and_state_give_each_phase_in_order_with_download_bytes() -> None:
    observer = FleetObserver(T)
    online(observer, "cam-1")
    progress = tracker(observer, "cam-1")
    assert progress.poll() == []  # online and silent: nothing to report yet
    event(observer, "cam-1", Phase.DOWNLOADING)
    state(observer, "cam-1", Phase.DOWNLOADING, progress=0.45)
    (p,) = progress.poll()
    assert (p.phase, p.bytes, p.percent) == ("DOWNLOADING", round(0.45 * TOTAL), 45)
    seen = []
    for step in (Phase.VERIFYING, Phase.VALIDATING, Phase.ACTIVATING):
        event(observer, "cam-1", step)
        seen += [c.phase for c in progress.poll()]
    event(observer, "cam-1", Phase.PROBATION)
    event(observer, "cam-1", Phase.COMMITTED)
    # two steps in one poll: both are shown, in order
    assert [c.phase for c in progress.poll()] == ["PROBATION", "COMMITTED"]
    assert seen == ["VERIFYING", "VALIDATING", "ACTIVATING"]
    assert progress.devices["cam-1"].bytes == TOTAL


def test_other_deployments_commands_and_stale_state_do_not_move_a_device() -> None:
    observer = FleetObserver(T)
    online(observer, "cam-1")
    state(observer, "cam-1", Phase.COMMITTED, pending=None, active="m-v1-old")  # the retained state of v1
    progress = tracker(observer, "cam-1", "cam-2")
    event(observer, "cam-1", Phase.DOWNLOADING, dep="m-v1-old")
    event(observer, "cam-1", Phase.PROBATION, command_id="report-1", action="report")
    assert progress.poll() == []
    assert progress.devices["cam-1"].phase == "WAITING"
    # an event reaches the device it came from, whatever device_id it claims
    ev = Event(ts=1.0, device_id="cam-2", model="m", step=Phase.COMMITTED, ok=True, deployment_id=DEP)
    observer.handle(Message(T.events("cam-1"), canonical_json(ev.to_dict())))
    assert [c.device_id for c in progress.poll()] == []


def test_state_moves_forward_only_and_carries_a_failure_reason() -> None:
    observer = FleetObserver(T)
    online(observer, "cam-1")
    progress = tracker(observer, "cam-1")
    event(observer, "cam-1", Phase.VALIDATING)
    progress.poll()
    state(observer, "cam-1", Phase.DOWNLOADING, progress=0.9)  # sent before the event, arrived after
    assert progress.poll() == []
    outcome = Outcome(deployment_id=DEP, version=2, result="rejected", reason="too slow")
    state(observer, "cam-1", Phase.REJECTED, pending=None, outcome=outcome)
    (p,) = progress.poll()
    assert (p.phase, p.reason) == ("REJECTED", "too slow")


def test_plain_lines_print_each_phase_and_a_download_percentage_at_most_every_interval() -> None:
    observer = FleetObserver(T)
    online(observer, "cam-1")
    clock = Clock()
    progress = tracker(observer, "cam-1", clock=clock, probation_s=60)
    lines: list[str] = []
    view = PlainLines(progress, lines.append, interval=5.0)
    event(observer, "cam-1", Phase.DOWNLOADING)
    view.show(progress.poll())
    for fraction in (0.1, 0.2, 0.3):
        clock.now += 1
        state(observer, "cam-1", Phase.DOWNLOADING, progress=fraction)
        view.show(progress.poll())
    clock.now += 5
    state(observer, "cam-1", Phase.DOWNLOADING, progress=0.45)
    view.show(progress.poll())
    event(observer, "cam-1", Phase.VALIDATING)
    view.show(progress.poll())
    event(observer, "cam-1", Phase.PROBATION)
    view.show(progress.poll())
    online(observer, "cam-1", "offline")
    view.show(progress.poll())
    assert lines == [
        "device cam-1: DOWNLOADING 0% (0.0/20.0 MiB)",
        "device cam-1: DOWNLOADING 45% (9.0/20.0 MiB)",
        "device cam-1: VALIDATING",
        "device cam-1: PROBATION for at least 60 s",
        "device cam-1: offline (PROBATION for at least 60 s)",
    ]


def test_plain_lines_leave_a_failures_reason_to_the_verdict_line_but_show_a_download_retry() -> None:
    observer = FleetObserver(T)
    online(observer, "cam-1")
    progress = tracker(observer, "cam-1")
    lines: list[str] = []
    view = PlainLines(progress, lines.append)
    event(observer, "cam-1", Phase.DOWNLOADING, ok=False, reason="chunk withheld; trying again in 5 s")
    view.show(progress.poll())
    event(observer, "cam-1", Phase.VALIDATING)
    event(observer, "cam-1", Phase.REJECTED, ok=False, reason="golden sample 0 differs")
    view.show(progress.poll())
    assert lines == ["device cam-1: DOWNLOADING 0% (0.0/20.0 MiB): chunk withheld; trying again in 5 s",
                     "device cam-1: VALIDATING", "device cam-1: REJECTED"]


def test_progress_line_names_the_reason_and_small_sizes() -> None:
    p = DeviceProgress("cam-1", phase="DOWNLOADING", bytes=512, total=2048)
    assert progress_line(p) == "device cam-1: DOWNLOADING 25% (0.5/2.0 KiB)"
    assert progress_line(DeviceProgress("cam-1", phase="DOWNLOADING", bytes=5, total=10)) == \
        "device cam-1: DOWNLOADING 50% (5/10 B)"
    failed = DeviceProgress("cam-1", phase="ROLLED_BACK", reason="error rate 50.0% is above 5.0%")
    assert progress_line(failed) == "device cam-1: ROLLED_BACK: error rate 50.0% is above 5.0%"


def test_json_lines_are_one_object_per_change() -> None:
    observer = FleetObserver(T)
    online(observer, "cam-1")
    progress = tracker(observer, "cam-1")
    out: list[str] = []
    view = JsonLines(out.append)
    event(observer, "cam-1", Phase.DOWNLOADING)
    view.show(progress.poll())
    event(observer, "cam-1", Phase.REJECTED, ok=False, reason="chunk missing")
    view.show(progress.poll())
    docs = [json.loads(line) for line in out]
    assert [(d["event"], d["device"], d["phase"]) for d in docs] == [
        ("progress", "cam-1", "DOWNLOADING"), ("progress", "cam-1", "REJECTED")]
    assert docs[0]["bytes"] == 0 and docs[0]["total"] == TOTAL and docs[0]["t"] == 1000.0
    assert docs[1]["reason"] == "chunk missing" and "reason" not in docs[0]


def test_live_table_shows_counts_and_the_failed_and_busy_devices_of_a_big_group() -> None:
    observer = FleetObserver(T)
    devices = [f"cam-{i:03d}" for i in range(50)]
    for d in devices:
        online(observer, d)
    clock = Clock()
    progress = tracker(observer, *devices, clock=clock, probation_s=60)
    for d in devices[:40]:
        event(observer, d, Phase.COMMITTED)
    event(observer, "cam-045", Phase.DOWNLOADING)
    state(observer, "cam-045", Phase.DOWNLOADING, progress=0.5)
    event(observer, "cam-046", Phase.PROBATION)
    event(observer, "cam-047", Phase.REJECTED, ok=False, reason="golden sample 0 differs")
    progress.poll()
    clock.now += 12
    console = Console(file=io.StringIO(), force_terminal=True, width=120, height=20)
    table = LiveTable(progress, console, title="m v2: ", max_rows=20)
    try:
        shown, hidden = table.rows()
        assert [p.device_id for p in shown[:3]] == ["cam-047", "cam-045", "cam-046"]  # failed first, then busy
        assert len(shown) == 14 and hidden == 36  # the terminal's 20 lines leave 14 rows
        record = Console(record=True, width=120, file=io.StringIO())
        record.print(table.render())
        text = record.export_text()
    finally:
        table.close()
    assert "m v2: 50 device(s): 7 WAITING, 1 DOWNLOADING, 1 PROBATION, 40 COMMITTED, 1 REJECTED" in text
    assert "50% (10.0/20.0 MiB)" in text
    assert "probation 12 s, at least 48 s left" in text
    assert "golden sample 0 differs" in text
    assert "... 36 more device(s), counted above" in text


def test_follow_shows_a_devices_last_phase_before_its_verdict() -> None:
    observer = FleetObserver(T)
    online(observer, "cam-1")
    state(observer, "cam-1", Phase.PROBATION, pending=None, active=DEP)
    event(observer, "cam-1", Phase.PROBATION)
    event(observer, "cam-1", Phase.COMMITTED)
    lines: list[str] = []
    progress = tracker(observer, "cam-1")
    with ProgressFeed(progress, PlainLines(progress, lines.append)) as feed:
        followed = follow(observer, {"cam-1": DeviceResult("cam-1", "waiting")}, "m", DEP, timeout=5,
                          say=lines.append, progress=feed)
    assert followed.ok
    assert lines[0] == "waiting for 1 online device(s), up to 5 s"
    assert lines[1:3] == ["device cam-1: PROBATION", "device cam-1: COMMITTED"]
    assert lines[3].startswith("device cam-1: committed v2 after ")
    assert len(lines) == 4
