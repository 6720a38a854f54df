"""push --wait, rollback --wait, fleet status and the broker options, with scripted devices on a real broker."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgefleet.converter.fleet.connect import add_broker_args, settings_from_args
from edgefleet.converter.fleet.observer import FleetObserver
from edgefleet.protocol import Keyring, SigningKey, Status, Topics, canonical_json
from edgefleet.testing.broker import Inbox, Mosquitto, client
from tests.support.broker import OPERATOR, AclBroker
from tests.support.fake_device import FakeDevice

T = Topics("edgefleet")
Edgectl = Callable[..., tuple[int, str, str]]


def flat(text: str) -> str:
    """Output with all whitespace runs folded, so table wrapping does not matter."""
    return " ".join(text.split())


@pytest.fixture
def devices(broker: Mosquitto) -> Iterator[Callable[..., FakeDevice]]:
    """Start scripted devices on the plain broker; all are stopped at teardown."""
    started: list[FakeDevice] = []

    def start(device_id: str, **kwargs: object) -> FakeDevice:
        d = FakeDevice(broker.url, device_id, **kwargs).start()  # type: ignore[arg-type]
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def set_inventory(edgectl: Edgectl, key_dir: Path, group: str, *devices: str, login: list[object]) -> None:
    """The operator's signed inventory: `devices` form `group` (push --group --wait counts only them)."""
    code, _, err = edgectl("inventory", "set", group, *devices, "--key", key_dir, *login)
    assert code == 0, err


def announce_offline(url: str, device_id: str, groups: tuple[str, ...]) -> None:
    """A retained offline status, as the will of a device that went away leaves it."""
    t = client(url)
    doc = Status(status="offline", device_id=device_id, agent_version="1.0", ts=time.time(), groups=groups)
    t.publish(T.status(device_id), canonical_json(doc.to_dict()), retain=True, wait=True)
    t.stop()


def test_push_wait_succeeds_when_every_online_member_commits(broker: Mosquitto, devices: Callable[..., FakeDevice],
                                                             make_bundle: Callable[..., Path], key: SigningKey,
                                                             key_dir: Path, edgectl: Edgectl) -> None:
    keyring = Keyring([key.private_key.public_key()])
    a = devices("cam-1", groups=("lab",), keyring=keyring)
    b = devices("cam-2", groups=("lab", "north"), keyring=keyring)
    devices("cam-9", groups=("south",))  # not in the group: never targeted
    announce_offline(broker.url, "cam-3", ("lab",))
    set_inventory(edgectl, key_dir, "lab", "cam-1", "cam-2", "cam-3", login=["--broker", broker.url])
    bundle = make_bundle("dense_f32", name="det", version=2)
    code, out, err = edgectl("push", bundle, "--group", "lab", "--key", key_dir, "--wait", "--timeout", 20,
                             "--broker", broker.url, "--json")
    assert code == 0, err
    report = json.loads(out.splitlines()[-1])  # the summary follows the progress events (JSON Lines)
    verdicts = {d["device_id"]: d["verdict"] for d in report["devices"]}
    assert verdicts == {"cam-1": "committed", "cam-2": "committed", "cam-3": "pending"}
    assert report["ok"] is True
    assert [d.deployment_id for d in a.deployments] == [report["deployment_id"]]
    assert [d.deployment_id for d in b.deployments] == [report["deployment_id"]]


def test_push_wait_fails_with_the_device_reason(broker: Mosquitto, devices: Callable[..., FakeDevice],
                                                make_bundle: Callable[..., Path], key: SigningKey, key_dir: Path,
                                                edgectl: Edgectl) -> None:
    devices("cam-1", groups=("lab",))
    devices("cam-2", groups=("lab",), behaviour="reject", reason="validation: output 0 differs by 0.31")
    set_inventory(edgectl, key_dir, "lab", "cam-1", "cam-2", login=["--broker", broker.url])
    bundle = make_bundle("dense_f32", name="det", version=2)
    code, out, _ = edgectl("push", bundle, "--group", "lab", "--key", key_dir, "--wait", "--timeout", 20,
                           "--broker", broker.url)
    assert code == 1
    assert "device cam-2: rejected: validation: output 0 differs by 0.31" in flat(out)


def test_push_wait_reports_a_device_that_does_not_trust_the_key(broker: Mosquitto, devices: Callable[..., FakeDevice],
                                                                make_bundle: Callable[..., Path], edgectl: Edgectl,
                                                                tmp_path: Path) -> None:
    devices("cam-1", keyring=Keyring([SigningKey.generate().private_key.public_key()]))
    forger = SigningKey.generate()
    forger.write(tmp_path / "forged")
    code, out, _ = edgectl("push", make_bundle(name="det"), "--device", "cam-1", "--key", tmp_path / "forged",
                           "--wait", "--timeout", 20, "--broker", broker.url)
    assert code == 1
    assert "device cam-1: rejected: signature: signed with unknown key" in flat(out)


def test_push_wait_times_out_naming_the_unfinished_devices(broker: Mosquitto, devices: Callable[..., FakeDevice],
                                                           make_bundle: Callable[..., Path], key_dir: Path,
                                                           edgectl: Edgectl) -> None:
    devices("cam-1")
    devices("cam-2", behaviour="silent")
    started = time.monotonic()
    code, out, _ = edgectl("push", make_bundle(name="det"), "--device", "cam-1", "--device", "cam-2",
                           "--device", "cam-7", "--key", key_dir, "--wait", "--timeout", 1, "--broker", broker.url)
    assert code == 1
    assert time.monotonic() - started < 10
    text = flat(out)
    assert "device cam-1: committed v1" in text
    assert "device cam-2: unfinished: did not finish within 1 s (no state for this model)" in text
    assert "device cam-7: pending: never seen on this broker" in text


@pytest.mark.parametrize("target", [("--group", "lab"), ("--device", "cam-1", "--device", "cam-2")])
def test_push_wait_with_no_known_target_stops_before_publishing(broker: Mosquitto, make_bundle: Callable[..., Path],
                                                                key_dir: Path, edgectl: Edgectl,
                                                                target: tuple[str, ...]) -> None:
    """No targeted device ever reported a status (not started yet, or a broker that keeps retained
    messages from wildcard subscriptions): --wait has nothing to follow and says so."""
    set_inventory(edgectl, key_dir, "lab", "cam-1", "cam-2", login=["--broker", broker.url])
    code, out, err = edgectl("push", make_bundle(name="det"), *target, "--key", key_dir, "--wait", "--timeout", 20,
                             "--broker", broker.url)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("edgectl: error: push --wait: none of the 2 ")
    assert "ever reported a status on this broker" in err and "nothing was published" in err
    inbox = Inbox()
    t = client(broker.url, inbox)
    t.subscribe([*T.all_deployments(), T.all_chunks()], wait=5)
    assert inbox.quiet(0.5) == []
    t.stop()


def test_rollback_wait_confirms(broker: Mosquitto, devices: Callable[..., FakeDevice], make_bundle: Callable[..., Path],
                                key: SigningKey, key_dir: Path, edgectl: Edgectl) -> None:
    dev = devices("cam-1", keyring=Keyring([key.private_key.public_key()]))
    for version in (1, 2):
        code, _, err = edgectl("push", make_bundle(name="det", version=version), "--device", "cam-1", "--key", key_dir,
                               "--wait", "--timeout", 20, "--broker", broker.url)
        assert code == 0, err
    code, out, _ = edgectl("rollback", "--device", "cam-1", "--model", "det", "--key", key_dir, "--wait",
                           "--timeout", 10, "--broker", broker.url)
    assert code == 0
    assert "device cam-1: rolled back: restored v1" in flat(out)
    assert dev.models["det"].active is not None and dev.models["det"].active.version == 1


def test_rollback_wait_reports_a_refusal(broker: Mosquitto, devices: Callable[..., FakeDevice], key: SigningKey,
                                         key_dir: Path, edgectl: Edgectl) -> None:
    devices("cam-1", keyring=Keyring([key.private_key.public_key()]))
    code, out, _ = edgectl("rollback", "--device", "cam-1", "--model", "det", "--key", key_dir, "--wait",
                           "--timeout", 10, "--broker", broker.url)
    assert code == 1
    assert "device cam-1: not rolled back: nothing to roll back to" in flat(out)


def test_fleet_status(broker: Mosquitto, devices: Callable[..., FakeDevice], make_bundle: Callable[..., Path],
                      key_dir: Path, edgectl: Edgectl) -> None:
    devices("cam-1", groups=("lab",))
    devices("cam-2", groups=("north",), behaviour="reject", reason="too slow")
    announce_offline(broker.url, "cam-3", ("lab",))
    for d in ("cam-1", "cam-2"):
        edgectl("push", make_bundle(name="det", version=4), "--device", d, "--key", key_dir, "--wait",
                "--timeout", 20, "--broker", broker.url)
    code, out, _ = edgectl("fleet", "status", "--json", "--broker", broker.url)
    assert code == 0
    rows = {d["device_id"]: d for d in json.loads(out)["devices"]}
    assert set(rows) == {"cam-1", "cam-2", "cam-3"}
    assert (rows["cam-1"]["online"], rows["cam-3"]["online"]) == (True, False)
    assert rows["cam-1"]["models"]["det"]["phase"] == "COMMITTED"
    assert rows["cam-1"]["models"]["det"]["active"]["version"] == 4
    assert rows["cam-2"]["models"]["det"]["last_outcome"]["result"] == "rejected"
    code, out, _ = edgectl("fleet", "status", "--group", "lab", "--broker", broker.url)
    assert code == 0
    text = flat(out)
    assert "cam-1" in text and "cam-3" in text and "cam-2" not in text
    assert "det v4 COMMITTED" in text and "2 device(s), 1 online" in text


def test_fleet_observer_sync_sees_every_retained_document(broker: Mosquitto, devices: Callable[..., FakeDevice]) -> None:
    for i in range(30):
        announce_offline(broker.url, f"node-{i:02d}", ("g",))
    observer = FleetObserver(T)
    t = client(broker.url, observer.handle)
    try:
        observer.attach(t)
        assert len(observer.devices()) == 30  # complete at return, without a settle delay to guess
        assert observer.claiming("g") == [f"node-{i:02d}" for i in range(30)]
    finally:
        t.stop()


# ---------------------------------------------------------------------- broker options


def test_broker_option_errors_are_one_line(tmp_path: Path, edgectl: Edgectl) -> None:
    cases = [
        (["--broker", "http://x"], "expected mqtt://host[:port] or mqtts://host[:port]"),
        (["--username", "op", "--password-file", tmp_path / "nope"], "--password-file: cannot read secret file"),
        (["--key-file", tmp_path / "k"], "--key-file needs --cert"),
        (["--ca", tmp_path / "missing.pem", "--broker", "mqtts://127.0.0.1:1"], "--ca"),
        (["--prefix", "a/+/b"], "--prefix"),
        (["--broker", "mqtt://127.0.0.1:1", "--broker", "mqtts://127.0.0.1:2"], "--broker: broker urls: "
                                                                                "mqtt://127.0.0.1:1 and mqtts://127.0.0.1:2 mix"),
        (["--broker", "mqtt://127.0.0.1:1", "--broker", "mqtt:/x"], "--broker: expected mqtt://host[:port]"),
        (["--group", "line.2"], "invalid group 'line.2': expected 1-64 letters, digits, '_' or '-', starting with a "
                                "letter or digit (no '.': some brokers refuse it in a topic)"),
    ]
    for options, fragment in cases:
        broker = [] if "--broker" in options else ["--broker", "mqtt://127.0.0.1:1"]  # the option, not the broker, is wrong
        code, _, err = edgectl("fleet", "status", *broker, *options)
        assert code == 2, options
        lines = err.strip().splitlines()
        assert len(lines) == 1 and fragment in lines[0], (options, err)


def test_broker_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import argparse

    monkeypatch.setenv("EDGEFLEET_BROKER", "mqtts://fleet.example:18883")
    parser = argparse.ArgumentParser()
    add_broker_args(parser)
    (tmp_path / "pw").write_text("secret\n")
    args = parser.parse_args(["--username", "op", "--password-file", str(tmp_path / "pw")])
    s = settings_from_args(args)
    assert (s.host, s.port, s.tls, s.username, s.password) == ("fleet.example", 18883, True, "op", "secret")


def test_the_whole_flow_through_the_shipped_acl(acl_broker: AclBroker, make_bundle: Callable[..., Path],
                                                key: SigningKey, key_dir: Path, tmp_path: Path,
                                                edgectl: Edgectl) -> None:
    creds = {name: {"username": name, "password": pw} for name, pw in acl_broker.passwords.items()}
    keyring = Keyring([key.private_key.public_key()])
    a = FakeDevice(acl_broker.url, "dev-a", groups=("lab",), keyring=keyring, credentials=creds["dev-a"]).start()
    b = FakeDevice(acl_broker.url, "dev-b", groups=("lab",), keyring=keyring, credentials=creds["dev-b"]).start()
    (tmp_path / "op.pw").write_text(acl_broker.passwords[OPERATOR] + "\n")
    login = ["--broker", acl_broker.operator_url, "--username", OPERATOR, "--password-file", tmp_path / "op.pw"]
    try:
        set_inventory(edgectl, key_dir, "lab", "dev-a", "dev-b", login=login)
        code, out, err = edgectl("push", make_bundle(name="acl-m"), "--group", "lab", "--key", key_dir, "--wait",
                                 "--timeout", 20, "--json", *login)
        assert code == 0, err
        assert {d["verdict"] for d in json.loads(out.splitlines()[-1])["devices"]} == {"committed"}
        code, out, _ = edgectl("fleet", "status", "--json", "--group", "lab", *login)
        assert code == 0 and {d["device_id"] for d in json.loads(out)["devices"]} == {"dev-a", "dev-b"}
        code, _, err = edgectl("fleet", "status", "--broker", acl_broker.operator_url, "--username", OPERATOR,
                               "--password-file", tmp_path / "op.pw", "--connect-timeout", 1, "--username", "dev-a")
        assert code == 2 and "refused the connection" in err
    finally:
        a.stop()
        b.stop()


def test_push_refuses_a_model_name_that_some_brokers_refuse(make_bundle: Callable[..., Path], key_dir: Path,
                                                            edgectl: Edgectl) -> None:
    # a bundle written by an earlier release may carry a '.': refused before anything is published
    code, _, err = edgectl("push", make_bundle("dense_f32", name="det.v2"), "--device", "cam-1", "--key", key_dir,
                           "--broker", "mqtt://127.0.0.1:1")
    assert code == 2
    assert err.strip().splitlines() == ["edgectl: error: model name 'det.v2': expected 1-64 letters, digits, '_' or "
                                        "'-', starting with a letter or digit (no '.': some brokers refuse it in a "
                                        "topic)"]
