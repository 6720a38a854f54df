"""`edgectl broker check` against real engines: Mosquitto (plain, the shipped ACL config, a lax ACL),
NATS, amqtt, and a private RabbitMQ 3.10 node, the engine whose missing retained-on-wildcard delivery
the check exists to catch. What no engine here does (a refused payload, no retained messages at all)
is in tests/unit/test_broker_check.py, on a stand-in."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet.converter.fleet.brokercheck import RABBITMQ_NOTE
from edgefleet.testing.broker import Inbox, Mosquitto, client, write_password_file
from edgefleet.testing.nats import NatsCluster
from edgefleet.testing.rabbitmq import RabbitMq, rabbitmq_version
from tests.support.broker import OPERATOR, AclBroker
from tests.support.engines import Engine

Edgectl = Callable[..., tuple[int, str, str]]
# Every engine's measured verdicts and the start of each measured value (retained after restart: PERSISTENT).
DELIVERED = ("ok", "delivered to a '+' subscription")
EXPECTED = {
    "mosquitto": {"MQTT versions": ("ok", "5 and 3.1.1"), "retained on wildcard": DELIVERED,
                  "QoS 1 subscriptions": ("ok", "at least 128 (none refused)"),
                  "max payload": ("ok", "4 MiB accepted (the largest tried)")},
    "nats": {"MQTT versions": ("warn", "3.1.1 only"), "retained on wildcard": DELIVERED,
             "QoS 1 subscriptions": ("ok", "63 granted, subscription 64"),
             "max payload": ("ok", "4 MiB accepted (the largest tried)")},
    "amqtt": {"MQTT versions": ("warn", "3.1.1 only"), "retained on wildcard": DELIVERED,
              "QoS 1 subscriptions": ("ok", "at least 128 (none refused)"),
              "max payload": ("ok", "4 MiB accepted (the largest tried)")},
    # RabbitMQ 3.10.8 with rabbitmq_mqtt: an MQTT 5 CONNECT is closed without a CONNACK
    "rabbitmq": {"MQTT versions": ("warn", "3.1.1 only (5: connection to "),
                 "retained on wildcard": ("fail", "none on a '+' subscription; delivered on the exact topic"),
                 "QoS 1 subscriptions": ("ok", "at least 128 (none refused)"),
                 "max payload": ("ok", "4 MiB accepted (the largest tried)")},
}


# Whether an engine keeps retained messages across a restart (amqtt keeps them in memory only).
PERSISTENT = {"mosquitto": True, "nats": True, "amqtt": False, "rabbitmq": True}
MARKER = "edgefleet/sync/edgectl-broker-check/restart"


def check(edgectl: Edgectl, url: str, *args: object) -> tuple[int, dict[str, Any]]:
    """`edgectl broker check --json` against `url`: the exit code and the report."""
    code, out, err = edgectl("broker", "check", "--broker", url, "--timeout", 3, "--json", *args)
    assert code in (0, 1), err
    return code, json.loads(out)


def verdicts(report: dict[str, Any]) -> dict[str, str]:
    return {c["check"]: c["verdict"] for c in report["checks"]}


def values(report: dict[str, Any]) -> dict[str, str]:
    return {c["check"]: c["value"] for c in report["checks"]}


def assert_expected(report: dict[str, Any], engine: str) -> None:
    """The report holds `engine`'s measured verdicts (EXPECTED)."""
    for name, (verdict, value) in EXPECTED[engine].items():
        found = next(c for c in report["checks"] if c["check"] == name)
        assert (found["verdict"], found["value"][:len(value)]) == (verdict, value), found


def retained_probes(url: str, protocol: str = "auto") -> list[str]:
    """Retained messages left under the hosts' sync area (where the probes live)."""
    inbox = Inbox()
    t = client(url, inbox, protocol=protocol)
    try:
        t.subscribe("edgefleet/sync/#", wait=5)
        return [m.topic for m in inbox.quiet(0.5) if m.retain and m.payload]
    finally:
        t.stop()


def test_each_engine_gets_its_own_verdicts_and_keeps_no_probe(engine: Engine, edgectl: Edgectl) -> None:
    code, report = check(edgectl, engine.url)
    assert code == 0, report
    assert report["ok"] is True
    assert_expected(report, engine.name)
    assert verdicts(report)["retained after restart"] == "skip"
    assert verdicts(report)["device ACL"] == "skip"
    assert report["leftovers"] == []
    assert retained_probes(engine.url, engine.protocol) == []


def test_persistence_is_checked_across_a_restart(engine: Engine, edgectl: Edgectl) -> None:
    code, report = check(edgectl, engine.url, "--before-restart")
    assert code == 0
    assert values(report)["retained after restart"] == "marker left"
    assert retained_probes(engine.url, engine.protocol) == [MARKER]
    engine.server.restart()
    code, report = check(edgectl, engine.url, "--after-restart")
    found = next(c for c in report["checks"] if c["check"] == "retained after restart")
    if PERSISTENT[engine.name]:
        assert (code, found["verdict"]) == (0, "ok"), found
        assert found["value"].startswith("marker kept, left ")
    else:  # amqtt keeps retained messages in memory only
        assert (code, found["verdict"]) == (1, "fail"), found
        assert "devices that were offline get nothing" in found["meaning"]
    assert retained_probes(engine.url, engine.protocol) == []  # the marker is cleared once looked at
    code, report = check(edgectl, engine.url, "--after-restart")
    assert code == 1 and verdicts(report)["retained after restart"] == "fail"


def test_the_table_and_the_exit_code(broker: Mosquitto, edgectl: Edgectl) -> None:
    code, out, err = edgectl("broker", "check", "--broker", broker.url, "--timeout", 3)
    assert code == 0, err
    text = " ".join(out.split())
    assert "retained on wildcard │ ok │ delivered to a '+' subscription" in text
    assert f"broker {broker.url} (checked with MQTT 5) has what edgefleet needs" in text
    assert err == ""  # the probes' refusals are the table's to report, not log lines


def logins(tmp_path: Path, acl_broker: AclBroker, device: str) -> list[object]:
    operator_file = tmp_path / "operator.password"
    operator_file.write_text(acl_broker.passwords[OPERATOR])
    device_file = tmp_path / f"{device}.password"
    device_file.write_text(acl_broker.passwords[device])
    return ["--username", OPERATOR, "--password-file", operator_file, "--device-broker", acl_broker.url,
            "--device-user", device, "--device-password-file", device_file]


def test_the_shipped_acl_gives_a_device_what_it_needs_and_nothing_else(acl_broker: AclBroker, edgectl: Edgectl,
                                                                        tmp_path: Path) -> None:
    code, report = check(edgectl, acl_broker.operator_url, *logins(tmp_path, acl_broker, "dev-a"))
    assert code == 0, report
    assert {k: v for k, v in verdicts(report).items() if k.startswith("device ACL")} == {
        "device ACL: own topics": "ok", "device ACL: other devices": "ok", "device ACL: deployments": "ok"}


def test_a_lax_acl_is_caught(tmp_path: Path, edgectl: Edgectl) -> None:
    """Every user may read and write the whole prefix: a device could forge reports and clear documents."""
    etc = tmp_path / "etc"
    etc.mkdir()
    write_password_file(etc / "passwd", {OPERATOR: "op-secret", "dev-a": "dev-secret"})
    (etc / "acl").write_text("pattern readwrite edgefleet/#\n")
    (tmp_path / "op").write_text("op-secret")
    (tmp_path / "dev").write_text("dev-secret")
    with Mosquitto(tmp_path / "broker", anonymous=False,
                   general=f"password_file {etc / 'passwd'}\nacl_file {etc / 'acl'}") as b:
        code, report = check(edgectl, b.url, "--username", OPERATOR, "--password-file", tmp_path / "op",
                             "--device-user", "dev-a", "--device-password-file", tmp_path / "dev")
    assert code == 1
    assert {k: v for k, v in verdicts(report).items() if k.startswith("device ACL")} == {
        "device ACL: own topics": "ok", "device ACL: other devices": "fail", "device ACL: deployments": "fail"}
    found = values(report)
    assert found["device ACL: other devices"] == "may publish another device's events"
    assert found["device ACL: deployments"] == ("may publish a group document, its own deployment document, "
                                                "a chunk, the channel heartbeat")


def test_a_wrong_device_password_fails_the_own_topics_row(acl_broker: AclBroker, edgectl: Edgectl,
                                                          tmp_path: Path) -> None:
    args = logins(tmp_path, acl_broker, "dev-b")
    (tmp_path / "dev-b.password").write_text("not the password")
    code, report = check(edgectl, acl_broker.operator_url, *args)
    assert code == 1
    found = next(c for c in report["checks"] if c["check"] == "device ACL: own topics")
    assert found["verdict"] == "fail" and found["value"].startswith("cannot connect as dev-b: ")


def test_bad_input_is_one_line_and_exit_2(broker: Mosquitto, edgectl: Edgectl, tmp_path: Path) -> None:
    code, out, err = edgectl("broker", "check", "--broker", broker.url, "--device-password-file", tmp_path / "x")
    assert (code, out) == (2, "")
    assert err.strip() == ("edgectl: error: --device-password-file and --device-broker need --device-user")
    code, out, err = edgectl("broker", "check", "--broker", broker.url, "--device-user", "a/b")
    assert code == 2 and err.count("\n") == 1 and "--device-user: invalid device 'a/b'" in err
    code, out, err = edgectl("broker", "check", "--broker", "mqtt://127.0.0.1:1", "--timeout", 1)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("edgectl: error: cannot use the broker mqtt://127.0.0.1:1: cannot connect")


def test_every_node_given_is_checked(nats_cluster: NatsCluster, edgectl: Edgectl) -> None:
    nodes = nats_cluster.urls[:2]  # two make the point; each node of a replicated cluster takes seconds
    code, out, err = edgectl("broker", "check", "--broker", nodes[0], "--broker", nodes[1], "--timeout", 3, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] is True
    assert [b["broker"] for b in report["brokers"]] == nodes
    for node in report["brokers"]:
        assert verdicts(node)["retained on wildcard"] == "ok"
        assert values(node)["QoS 1 subscriptions"].startswith("63 granted, subscription 64 refused")


def retained_on(url: str, topic: str) -> bool:
    """Whether a retained message is kept on exactly `topic` (RabbitMQ 3.10 sends none to `#`)."""
    inbox = Inbox()
    t = client(url, inbox, protocol="3.1.1")
    try:
        t.subscribe(topic, wait=5)
        return any(m.topic == topic and m.retain and m.payload for m in inbox.quiet(0.5))
    finally:
        t.stop()


def test_rabbitmq_3_10_is_caught_as_unsupported(rabbitmq_broker: RabbitMq, edgectl: Edgectl) -> None:
    """The verdicts on a private RabbitMQ node: retained messages are kept (across a restart too) and
    delivered on their exact topic, but never to a '+' subscription, so the check fails naming the
    consequences, as JSON and in the table, with exit code 1."""
    assert rabbitmq_version().startswith("3.10.")
    url = rabbitmq_broker.url
    code, report = check(edgectl, url, "--before-restart")
    assert (code, report["ok"], report["protocol"]) == (1, False, "3.1.1"), report
    assert_expected(report, "rabbitmq")
    wildcard = next(c for c in report["checks"] if c["check"] == "retained on wildcard")
    assert wildcard["meaning"] == f"unsupported: edgefleet subscribes with '+' to retained documents. {RABBITMQ_NOTE}"
    assert [c["check"] for c in report["checks"] if c["verdict"] == "fail"] == ["retained on wildcard"]
    assert values(report)["retained after restart"] == "marker left"
    assert report["leftovers"] == []
    assert retained_on(url, MARKER)

    rabbitmq_broker.restart()
    code, report = check(edgectl, url, "--after-restart")
    assert code == 1
    assert_expected(report, "rabbitmq")
    restart = next(c for c in report["checks"] if c["check"] == "retained after restart")
    assert restart["verdict"] == "ok" and restart["value"].startswith("marker kept, left "), restart
    assert not retained_on(url, MARKER)  # cleared once found

    code, out, err = edgectl("broker", "check", "--broker", url, "--timeout", 3)
    assert code == 1, err
    text = " ".join(out.split())
    assert "retained on wildcard │ fail │ none on a '+' subscription; delivered on the exact topic" in text
    assert f"broker {url} (checked with MQTT 3.1.1) fails retained on wildcard" in text
