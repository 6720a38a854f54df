"""fleet watch rows and table, fleet collect with shared subscriptions, canary sizes and choices, bad options."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.converter.fleet.canary import CanarySize, parse_canary, pick_canaries
from edgefleet.converter.fleet.collect import Collector, subscriptions
from edgefleet.converter.fleet.observer import DeviceView, FleetObserver
from edgefleet.converter.fleet.watch import make_row, plain_text, rows, table_lines
from edgefleet.protocol import (
    DeviceState,
    Event,
    Keyring,
    ModelState,
    ModelTelemetry,
    Outcome,
    SigningKey,
    Slot,
    Status,
    Telemetry,
    Topics,
    canonical_json,
)
from edgefleet.testing.broker import Mosquitto, client
from edgefleet.testing.waiting import wait_for
from edgefleet.transport import Message, Transport
from tests.support import ROOT
from tests.support.broker import OPERATOR, AclBroker
from tests.support.helpers import retained_index

T = Topics()
Edgectl = Callable[..., tuple[int, str, str]]


def status(device: str, online: bool = True, groups: tuple[str, ...] = ("lab",)) -> Status:
    return Status(status="online" if online else "offline", device_id=device, agent_version="1.0", ts=time.time(),
                  groups=groups)


def state(device: str, version: int, phase: str = "COMMITTED", reason: str | None = None) -> DeviceState:
    slot = Slot(version=version, deployment_id=f"m-v{version}", sha256="a" * 64)
    outcome = Outcome(deployment_id=f"m-v{version}", version=version,
                      result="committed" if reason is None else "rolled_back", reason=reason, ts=time.time())
    return DeviceState(device_id=device, ts=time.time(), agent_version="1.0",
                       models={"m": ModelState(phase=phase, active=slot, last_outcome=outcome)})  # type: ignore[arg-type]


def telemetry(device: str, cpu: float, rss: int, p95: float | None, temp: float | None = None, seq: int = 0) -> Telemetry:
    model = ModelTelemetry(name="m", version=1, phase="COMMITTED", count=10, errors=0,
                           p50_ms=None if p95 is None else p95 / 2, p95_ms=p95)
    return Telemetry(ts=time.time(), device_id=device, agent_version="1.0", uptime_s=float(seq), cpu_percent=cpu,
                     rss_bytes=rss, system_cpu_percent=20.0, mem_available_bytes=1 << 30, load1=0.5,
                     disk_free_bytes=1 << 33, temperature_c=temp, models=(model,))


def view(device: str, *, online: bool = True, groups: tuple[str, ...] = ("lab",), tel: Telemetry | None = None,
         events: tuple[Event, ...] = (), reason: str | None = None) -> DeviceView:
    return DeviceView(device_id=device, status=status(device, online, groups), state=state(device, 1, reason=reason),
                      telemetry=tel, events=events)


# ---------------------------------------------------------------------- rows and table


def test_rows_sort_filter_and_blank_figures() -> None:
    views = [
        view("cam-a", tel=telemetry("cam-a", 5.0, 90_000_000, 2.0)),
        view("cam-b", tel=telemetry("cam-b", 40.0, 30_000_000, 0.5, temp=61.25)),
        view("cam-c", online=False, groups=("north",)),
        view("cam-d", tel=telemetry("cam-d", 40.0, 10_000_000, None)),
    ]
    assert [r.device_id for r in rows(views, sort="cpu")] == ["cam-b", "cam-d", "cam-a", "cam-c"]  # ties by id
    assert [r.device_id for r in rows(views, sort="rss")] == ["cam-a", "cam-b", "cam-d", "cam-c"]
    assert [r.device_id for r in rows(views, sort="p95")] == ["cam-a", "cam-b", "cam-c", "cam-d"]
    assert [r.device_id for r in rows(views, group="north")] == ["cam-c"]
    b = make_row(views[1])
    assert (b.cpu_percent, b.rss_mb, b.temperature_c, b.p95_ms) == (40.0, 30.0, 61.25, 0.5)
    cam_c = next(line for line in table_lines(rows(views), None) if line.row is not None and line.row.device_id == "cam-c")
    cells = {key: cam_c.text[start:end].strip() for key, (start, end) in cam_c.spans.items()}
    assert cells["online"] == "no" and cells["cpu"] == cells["rss"] == cells["temp"] == cells["p95"] == ""
    text = plain_text(rows(views), None, broker="mqtt://fleet.example:1883")
    assert text.splitlines()[0].startswith("mqtt://fleet.example:1883 · all groups · 4 devices, 3 online · 4 COMMITTED")
    assert text.splitlines()[3].split()[:9] == ["cam-b", "yes", "lab", "m", "v1", "COMMITTED", "0.250", "0.500", "40.0"]
    assert "61.2" in text.splitlines()[3] and "30.0" in text.splitlines()[3]


def test_last_event_prefers_events_seen_and_shortens_reasons() -> None:
    long_reason = "p95 latency 12.345 ms is 8.20x the previous model's 1.505 ms (limit 1.5x) " * 3
    e = Event(ts=time.time(), device_id="cam-a", model="m", step="ROLLED_BACK", ok=False, version=2, reason=long_reason)
    row = make_row(view("cam-a", events=(e,)))
    assert row.last_event.startswith("m v2 ROLLED_BACK: p95 latency 12.345 ms") and row.last_event.endswith("…")
    assert len(row.last_event) < 80
    quiet = make_row(view("cam-b", reason="error rate 50.0% over 10 requests"))
    assert quiet.last_event == "m v1 ROLLED_BACK: error rate 50.0% over 10 requests"


# ---------------------------------------------------------------------- canary sizes and choices


def test_canary_sizes() -> None:
    assert parse_canary("3") == CanarySize(count=3)
    assert parse_canary("10%") == CanarySize(percent=10.0)
    assert [CanarySize(percent=10.0).of(n) for n in (1, 9, 10, 11, 200)] == [1, 1, 1, 2, 20]
    assert CanarySize(percent=50.0).of(3) == 2 and CanarySize(count=5).of(3) == 3
    for bad in ("0", "-1", "0%", "101%", "ten", "nan%", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_canary(bad)


def test_canaries_are_online_unpinned_members_by_id() -> None:
    observer = FleetObserver(T)
    for device, online, groups in [("cam-3", True, ("lab",)), ("cam-1", False, ("lab",)), ("cam-2", True, ("lab",)),
                                   ("cam-4", True, ("lab",)), ("cam-0", True, ("lab",)), ("cam-5", True, ("north",))]:
        observer.handle(Message(T.status(device), canonical_json(status(device, online, groups).to_dict()), retain=True))
    # the members come from the inventory: cam-0 claims lab in its status but is not a member
    members = ["cam-4", "cam-3", "cam-2", "cam-1", "cam-6"]
    sel = pick_canaries(observer, members, CanarySize(count=2), pinned={"cam-2"})
    assert sel.canaries == ("cam-3", "cam-4")
    assert (sel.online, sel.offline, sel.pinned) == (("cam-2", "cam-3", "cam-4"), ("cam-1", "cam-6"), ("cam-2",))
    assert pick_canaries(observer, [], CanarySize(count=1), set()).canaries == ()


# ---------------------------------------------------------------------- against a broker


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[Transport]:
    t = client(broker.url)
    yield t
    t.stop()


def test_watch_once_shows_devices_and_figures(broker: Mosquitto, publisher: Transport, edgectl: Edgectl) -> None:
    for d, online, groups in [("cam-a", True, ("lab",)), ("cam-b", True, ("lab", "north")), ("cam-c", False, ("lab",))]:
        publisher.publish(T.status(d), canonical_json(status(d, online, groups).to_dict()), retain=True, wait=5)
        publisher.publish(T.state(d), canonical_json(state(d, 3).to_dict()), retain=True, wait=5)
    stop = threading.Event()

    def send() -> None:  # telemetry is not retained: it keeps coming, as from agents
        while not stop.wait(0.1):
            for doc in (telemetry("cam-a", 12.5, 41_900_000, 1.5), telemetry("cam-b", 80.0, 20_000_000, 3.0, 55.5)):
                publisher.publish(T.telemetry(doc.device_id), canonical_json(doc.to_dict()), qos=0)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        code, out, err = edgectl("fleet", "watch", "--once", "--sort", "cpu", "--telemetry-wait", 5,
                                 "--broker", broker.url)
        code2, out2, _ = edgectl("fleet", "watch", "--once", "--group", "north", "--json", "--telemetry-wait", 5,
                                 "--broker", broker.url)
    finally:
        stop.set()
        sender.join()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"{broker.url} · all groups · 3 devices, 2 online · 3 COMMITTED · sort cpu")
    assert [line.split()[0] for line in lines[2:5]] == ["cam-b", "cam-a", "cam-c"]
    assert lines[2].split()[:9] == ["cam-b", "yes", "lab,north", "m", "v3", "COMMITTED", "1.500", "3.000", "80.0"]
    assert "20.0" in lines[2] and "55.5" in lines[2]
    assert lines[3].split()[6:10] == ["0.750", "1.500", "12.5", "41.9"]
    assert lines[4].split()[:6] == ["cam-c", "no", "lab", "m", "v3", "COMMITTED"]
    assert code2 == 0
    devices = json.loads(out2)["devices"]
    assert [d["device_id"] for d in devices] == ["cam-b"]
    assert devices[0]["telemetry"]["cpu_percent"] == 80.0 and devices[0]["telemetry"]["temperature_c"] == 55.5


def _collector(broker: Mosquitto, out: Path, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "edgefleet.converter.cli", "fleet", "collect", "--out", str(out), "--json",
                             "--broker", broker.url, *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()  # printed once the broker acknowledged the subscriptions
    assert line.startswith("collecting"), line + proc.stderr.read()
    return proc


def test_two_collectors_share_the_stream(broker: Mosquitto, publisher: Transport, tmp_path: Path) -> None:
    everything = Collector(T)
    solo = client(broker.url, everything.handle)
    for topic, qos in subscriptions(T, None):
        solo.subscribe(topic, qos=qos, wait=5)
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    procs = [_collector(broker, f, "--share", "col") for f in files]
    try:
        for i in range(300):
            doc = telemetry(f"cam-{i % 20}", 1.0, 1, 1.0, seq=i)
            publisher.publish(T.telemetry(doc.device_id), canonical_json(doc.to_dict()), qos=1)
        for i in range(10):
            e = Event(ts=time.time(), device_id="cam-1", model="m", step="COMMITTED", ok=True, version=i)
            publisher.publish(T.events("cam-1"), canonical_json(e.to_dict()), qos=1)
        publisher.publish(T.telemetry("cam-1"), b"{not json", qos=1)
        publisher.publish(T.telemetry("cam-2"), canonical_json(telemetry("cam-9", 1, 1, 1).to_dict()), qos=1)
        assert publisher.flush(10)

        def lines() -> int:
            return sum(len(f.read_text().splitlines()) for f in files if f.exists())

        wait_for(lambda: lines() == 310, timeout=10, what="310 records between the two collectors")
        for p in procs:
            p.send_signal(signal.SIGTERM)
        results = [p.communicate(timeout=10) for p in procs]
    finally:
        for p in procs:
            p.kill()
        solo.stop()
    assert [p.returncode for p in procs] == [0, 0]
    summaries = [json.loads(out) for out, _ in results]
    assert all(s["messages"] > 0 and s["subscriptions"][0] == "$share/col/edgefleet/devices/+/telemetry"
               for s in summaries)
    assert sum(s["by_kind"]["telemetry"] for s in summaries) == 300
    assert sum(s["by_kind"].get("events", 0) for s in summaries) == 10
    assert sum(s["bad"] for s in summaries) == 2  # not JSON; a document of another device than its topic
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted(r["doc"]["uptime_s"] for r in records if r["kind"] == "telemetry") == [float(i) for i in range(300)]
    assert all(r["topic"] == f"edgefleet/devices/{r['doc']['device_id']}/{r['kind']}" for r in records)
    # a collector outside the share received everything
    wait_for(lambda: everything.pending >= 312, timeout=5, what="the unshared collector's copy")
    stats = everything.run(count=312)
    assert (stats.by_kind, stats.bad) == ({"telemetry": 300, "events": 10}, 2)


def test_shared_subscriptions_through_the_shipped_acl(acl_broker: AclBroker) -> None:
    pw = acl_broker.passwords
    operator, snoop = Collector(T), Collector(T)
    op = client(acl_broker.operator_url, operator.handle, username=OPERATOR, password=pw[OPERATOR])
    dev_b = client(acl_broker.url, snoop.handle, username="dev-b", password=pw["dev-b"])
    dev_a = client(acl_broker.url, username="dev-a", password=pw["dev-a"])
    doc = canonical_json(telemetry("dev-a", 1.0, 1, 1.0).to_dict())
    try:
        for topic, qos in subscriptions(T, "ops-7f3a"):
            op.subscribe(topic, qos=qos, wait=5)
        for topic, qos in subscriptions(T, "guess"):
            dev_b.subscribe(topic, qos=qos, wait=5)  # Mosquitto grants it and checks every delivery instead
        for _ in range(10):
            dev_a.publish(T.telemetry("dev-a"), doc, qos=1, wait=5)
        wait_for(lambda: operator.pending == 10, timeout=5, what="the operator's shared copy")
        time.sleep(0.3)  # a leak to the device would have arrived by now
        assert snoop.pending == 0  # dev-b may not read dev-a's telemetry, shared or not
        # A device that joins the operator's share name takes its turn at messages that the broker then
        # drops for it (docs/operations-scaling.md: share names devices cannot guess).
        for topic, qos in subscriptions(T, "ops-7f3a"):
            dev_b.subscribe(topic, qos=qos, wait=5)
        for _ in range(10):
            dev_a.publish(T.telemetry("dev-a"), doc, qos=1, wait=5)
        time.sleep(0.5)
        assert operator.pending < 20 and snoop.pending == 0
    finally:
        for t in (op, dev_b, dev_a):
            t.stop()


def test_bad_options_and_empty_groups_change_nothing(broker: Mosquitto, make_bundle: Callable[..., Path],
                                                     key_dir: Path, edgectl: Edgectl, tmp_path: Path) -> None:
    bundle = make_bundle(name="det")
    cases = [
        (["push", bundle, "--device", "cam-1", "--canary", "1", "--key", key_dir], "--canary needs --group"),
        (["push", bundle, "--group", "lab", "--canary", "1"], "--canary needs --key"),
        (["push", bundle, "--group", "lab", "--canary", "0%", "--key", key_dir], "a percentage must be above 0"),
        (["push", bundle, "--group", "lab", "--canary", "1", "--key", key_dir],
         "push --group lab --canary takes group membership from the signed inventory, and there is no inventory "
         "on the broker; publish one with 'edgectl inventory set GROUP DEVICE... --key KEY'; nothing was published"),
        (["push", bundle, "--group", "lab", "--wait", "--key", key_dir],
         "push --group lab --wait takes group membership from the signed inventory, and there is no inventory"),
        (["fleet", "collect", "--share", "a/b"], "invalid share name 'a/b'"),
        (["fleet", "collect", "--out", tmp_path / "no" / "such.jsonl"], "--out"),
        (["fleet", "watch", "--json"], "--json needs --once"),
        (["fleet", "watch", "--sort", "temp"], "invalid choice: 'temp'"),
    ]
    for argv, fragment in cases:
        code, _, err = edgectl(*argv, "--broker", broker.url)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and fragment in lines[0], (argv, err)
    index = retained_index(broker.url, T)
    assert index.documents == {} and index.chunks == {}


def test_canary_that_never_answers_times_out_and_the_group_is_left_alone(
        broker: Mosquitto, publisher: Transport, make_bundle: Callable[..., Path], key: SigningKey, key_dir: Path,
        edgectl: Edgectl) -> None:
    from edgefleet.bundle import Bundle
    from edgefleet.converter.fleet.publish import prepare
    from tests.support.fake_device import FakeDevice

    pinned = FakeDevice(broker.url, "cam-0", groups=("lab",)).start()
    silent = FakeDevice(broker.url, "cam-1", groups=("lab",), behaviour="silent").start()
    other = FakeDevice(broker.url, "cam-2", groups=("lab",)).start()
    try:
        # cam-0 follows its own document for this model, so it cannot stand for the group
        own = prepare(Bundle.load(make_bundle(name="det", version=1)), key=key, target="device:cam-0").document
        publisher.publish(T.device_model("cam-0", "det"), own, retain=True, wait=5)
        code, _, err = edgectl("inventory", "set", "lab", "cam-0", "cam-1", "cam-2", "--key", key_dir,
                               "--broker", broker.url)
        assert code == 0, err
        started = time.monotonic()
        code, out, _ = edgectl("push", make_bundle(name="det", version=2), "--group", "lab", "--key", key_dir,
                               "--canary", "1", "--timeout", 1, "--broker", broker.url)
        assert time.monotonic() - started < 15
    finally:
        for d in (pinned, silent, other):
            d.stop()
    text = " ".join(out.split())
    assert code == 1
    assert "canaries: cam-1 (1 of 3 online member(s) of lab; skipped cam-0: pinned by their own device document)" in text
    assert "canary failed: cam-1: did not finish within 1 s (no state for this model)" in text
    assert "cam-1: nothing to undo: it never started the deployment (no version)" in text
    assert len(silent.deployments) == 1 and other.deployments == []
    index = retained_index(broker.url, T)
    assert set(index.documents) == {T.device_model("cam-0", "det")}  # cam-1's withdrawn, no group document
    withdrawal = json.loads(index.withdrawals[T.device_model("cam-1", "det")])
    Keyring([key.private_key.public_key()]).verify(withdrawal)  # signed: agents ignore empty payloads
    assert (withdrawal["model"], withdrawal["target"]) == ("det", "device:cam-1")
