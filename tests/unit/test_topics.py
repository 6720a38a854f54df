"""Topics: every topic and subscription is built in edgefleet/protocol/topics.py and parsed back there.

The round trip covers every builder `Topics` has (a new builder without a case here fails the
suite), and a scan of the package's source finds topics joined by hand anywhere else.
"""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
from paho.mqtt.client import topic_matches_sub

from edgefleet.errors import ProtocolError
from edgefleet.protocol import Route, Topics

ROOT = Path(__file__).resolve().parents[2]
SHA = "0123456789abcdef" * 4
HA = "homeassistant"

LEAVES = ("cmd", "status", "availability", "state", "events", "telemetry", "logs")

# builder name -> (concrete topics it builds, the Route each parses back to)
CONCRETE: dict[str, Callable[[Topics], list[tuple[str, Route]]]] = {
    "chunk": lambda t: [(t.chunk(SHA), Route("chunk", sha256=SHA))],
    "group_model": lambda t: [(t.group_model("line-1", "digits"), Route("group_model", group="line-1", model="digits"))],
    "device_model": lambda t: [(t.device_model("dev-1", "digits"),
                                Route("device_model", device="dev-1", model="digits"))],
    **{leaf: partial(lambda leaf, t: [(getattr(t, leaf)("dev-1"), Route(leaf, device="dev-1"))], leaf)
       for leaf in LEAVES},
    "logs_recent": lambda t: [(t.logs_recent("dev-1"), Route("logs_recent", device="dev-1"))],
    "timestamp": lambda t: [(t.timestamp(), Route("timestamp"))],
    "inventory": lambda t: [(t.inventory(), Route("inventory"))],
    "sync": lambda t: [(t.sync("edgectl-0a1b2c3d4e"), Route("sync", client="edgectl-0a1b2c3d4e"))],
}

# builder name -> (subscription filters it builds, concrete topics each must match, topics it must not)
FILTERS: dict[str, Callable[[Topics], list[tuple[str, list[str], list[str]]]]] = {
    "device_models": lambda t: [(t.device_models("dev-1"), [t.device_model("dev-1", "a"), t.device_model("dev-1", "b")],
                                 [t.device_model("dev-2", "a"), t.group_model("dev-1", "a"), t.cmd("dev-1")])],
    "group_models": lambda t: [(t.group_models("line-1"), [t.group_model("line-1", "a")],
                                [t.group_model("line-2", "a"), t.device_model("line-1", "a")])],
    "all_device_models": lambda t: [(t.all_device_models("digits"), [t.device_model("d1", "digits"),
                                     t.device_model("d2", "digits")],
                                     [t.device_model("d1", "other"), t.group_model("g", "digits")])],
    "all_devices": lambda t: [(t.all_devices(leaf), [getattr(t, leaf)("d1"), getattr(t, leaf)("d2")],
                               [t.cmd("d1") if leaf != "cmd" else t.status("d1"), t.device_model("d1", leaf)])
                              for leaf in ("status", "state", "events", "telemetry", "logs")],
    "all_deployments": lambda t: [(f, [t.device_model("d", "m") if "/devices/" in f else t.group_model("g", "m")],
                                   [t.chunk(SHA), t.status("d")]) for f in t.all_deployments()],
    "all_chunks": lambda t: [(t.all_chunks(), [t.chunk(SHA)], [t.inventory(), t.device_model("chunks", "m")])],
}

MATCHERS = {"parse", "chunk_id", "device_leaf", "parse_discovery"}
OTHER_BUILDERS = {"discovery", "shared"}  # outside the prefix: tested on their own below
SCRATCH = {"probe", "probes"}  # broker check's test messages, not the contract: tested on their own below


@pytest.fixture(params=["edgefleet", "fleet/site-a"])
def topics(request: pytest.FixtureRequest) -> Topics:
    return Topics(request.param)


def test_every_builder_has_a_round_trip_case() -> None:
    public = {name for name, _ in inspect.getmembers(Topics, inspect.isfunction) if not name.startswith("_")}
    assert public - MATCHERS - OTHER_BUILDERS - SCRATCH == set(CONCRETE) | set(FILTERS)


def test_probe_topics_are_one_runs_and_not_the_contract(topics: Topics) -> None:
    probes = topics.probes("check-1")
    for mine in (topics.probe("check-1", "a"), topics.probe("check-1", "retained")):
        assert topic_matches_sub(probes, mine), mine
        with pytest.raises(ProtocolError, match="not part of the contract"):
            topics.parse(mine)
    for other in (topics.probe("check-2", "a"), topics.sync("check-1"), topics.inventory()):
        assert not topic_matches_sub(probes, other), other


def test_every_built_topic_parses_back_to_what_built_it(topics: Topics) -> None:
    for name, build in CONCRETE.items():
        for topic, route in build(topics):
            assert topics.parse(topic) == route, name
            assert topic.startswith(topics.prefix + "/")
            # the fast matchers agree with parse
            assert topics.chunk_id(topic) == route.sha256
            assert topics.device_leaf(topic) == ((route.device, route.kind) if route.kind in LEAVES else None)
            with pytest.raises(ProtocolError):
                Topics("elsewhere").parse(topic)


def test_every_filter_matches_what_it_subscribes_to_and_nothing_else(topics: Topics) -> None:
    for name, build in FILTERS.items():
        for topic_filter, matching, other in build(topics):
            for topic in matching:
                assert topic_matches_sub(topic_filter, topic), (name, topic_filter, topic)
                topics.parse(topic)  # and what it receives is part of the contract
            for topic in other:
                assert not topic_matches_sub(topic_filter, topic), (name, topic_filter, topic)


def test_shared_subscriptions_wrap_a_filter() -> None:
    t = Topics()
    shared = Topics.shared("collectors", t.all_devices("telemetry"))
    assert shared == "$share/collectors/edgefleet/devices/+/telemetry"
    for bad in ("", "a/b", "+", "#"):
        with pytest.raises(ProtocolError, match="share name"):
            Topics.shared(bad, t.all_devices("telemetry"))


def test_discovery_topics_parse_back() -> None:
    topic = Topics.discovery(HA, "sensor", "dev-1", "model_cls_p95")
    assert topic == "homeassistant/sensor/dev-1/model_cls_p95/config"
    assert Topics.parse_discovery(HA, topic) == Route("discovery", device="dev-1", component="sensor",
                                                      object_id="model_cls_p95")
    for other in ("homeassistant/sensor/dev-1/x/state", "elsewhere/sensor/dev-1/x/config",
                  "homeassistant/sensor/../x/config", "homeassistant/sen.sor/dev-1/x/config"):
        with pytest.raises(ProtocolError):
            Topics.parse_discovery(HA, other)


@pytest.mark.parametrize("topic", [
    "edgefleet/chunks/" + SHA.upper(), "edgefleet/chunks/" + SHA + "/x", "edgefleet/chunks/", "other/chunks/" + SHA,
    "edgefleet/devices/d/telemetry/x", "edgefleet/devices/../telemetry", "edgefleet/devices/d/secrets",
    "edgefleet/devices/d/logs/old", "edgefleet/devices/d/logs/recent/x",
    "edgefleet/sync/a/b", "edgefleet/sync/..",
])
def test_matchers_refuse_what_is_not_the_contract(topic: str) -> None:
    t = Topics()
    assert t.chunk_id(topic) is None and t.device_leaf(topic) is None
    with pytest.raises(ProtocolError):
        t.parse(topic)


# --- no topic is joined by hand outside topics.py ---------------------------------------------------

TOPICS_MODULE = ROOT / "edgefleet" / "protocol" / "topics.py"
PACKAGE_DIRS = ("agent", "converter", "edgefleet")
# The contract's topic levels (docs/protocol.md §1) and MQTT's shared-subscription head, as they appear in
# the literal parts of an f-string that joins a topic.
_LEVELS = re.compile(r"(^|/)(devices|groups|chunks|sync)/|/(models|cmd|status|availability|state|events|telemetry"
                     r"|logs|timestamp|inventory)(/|$)|\$share/|(^|/)[+#](/|$)")


def _names_a_prefix(node: ast.AST) -> bool:
    return ast.unparse(node).rstrip("()").lower().endswith("prefix")


def hand_built_topics(source: str) -> Iterator[tuple[int, str]]:
    """(line, code) of every topic built outside Topics: an f-string with topic levels or a prefix and
    a '/', or a prefix concatenated with a string holding a '/'."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.JoinedStr):
            literal = "".join(v.value if isinstance(v, ast.Constant) else "{P}" if _names_a_prefix(v.value) else "{}"
                              for v in node.values if isinstance(v, (ast.Constant, ast.FormattedValue)))
            # a topic has no spaces and is joined from values; one that starts with '/' is a URL path or a file
            joined = [w for w in literal.split() if "{" in w and not w.startswith("/")]
            if any(_LEVELS.search(w) or ("{P}" in w and "/" in w) for w in joined):
                yield node.lineno, ast.unparse(node)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            sides = (node.left, node.right)
            slash = any(isinstance(s, ast.Constant) and isinstance(s.value, str) and "/" in s.value for s in sides)
            if slash and any(_names_a_prefix(s) for s in sides):
                yield node.lineno, ast.unparse(node)


@pytest.mark.parametrize("code", [
    'x = f"{self.topics.prefix}/devices/{device}/models/+"',
    'x = f"{topics.prefix}/sync/{client_id}"',
    'x = topics.prefix + "/devices/"',
    'x = f"$share/{share}/{filt}"',
    'x = f"{p}/groups/{g}/models/+"',
    'x = f"{base}/chunks/{sha}"',
    'x = f"{self.prefix}/{leaf}"',
    'log(f"subscribing to {prefix}/devices/+/status")',
])
def test_the_scan_finds_hand_built_topics(code: str) -> None:
    assert list(hand_built_topics(code)), code


@pytest.mark.parametrize("code", [
    'x = f"/v1/models/{name}/metadata"', 'x = f"{key}: unknown key"', 'x = f"{prefix}.{name}"',
    'x = f"{self.state_dir}/state.json"', 'x = topics.device_model(d, m)',
    'x = f"unknown route {path!r}: the agent serves /v2/models/NAME[/ready]"',
])
def test_the_scan_leaves_other_strings_alone(code: str) -> None:
    assert not list(hand_built_topics(code)), code


def test_no_topic_is_built_outside_topics_py() -> None:
    found = []
    for folder in PACKAGE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == TOPICS_MODULE:
                continue
            for line, code in hand_built_topics(path.read_text(encoding="utf-8")):
                found.append(f"{path.relative_to(ROOT)}:{line}: {code}")
    assert not found, "topics built by hand (use edgefleet.protocol.Topics):\n" + "\n".join(found)
