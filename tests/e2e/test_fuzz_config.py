"""Generated agent configuration files: every one is either a usable configuration or a one-line error
naming the key, never another exception and never a value the agent cannot work with.

Cases are built from the schema itself (agent/config.py's dataclasses), with some keys given values
of the wrong type, out of range (negative, zero, NaN, infinities, beyond 64 bits), unknown keys,
tables where a value belongs and the other way round, odd strings, and plain random text. A few of
them then go through the real `edge-agent` command line.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import typing
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from edgefleet.agent.config import AgentConfig, parse_config
from edgefleet.errors import ConfigError, ProtocolError
from edgefleet.protocol import Topics
from edgefleet.testing.agentproc import toml as to_toml  # one TOML writer for every test
from edgefleet.transport import parse_url
from tests.support import ROOT
from tests.support.fuzzing import CASES, E2E, FUZZ, TIMEOUT_S

pytestmark = pytest.mark.timeout(TIMEOUT_S)


def leaves(cls: type = AgentConfig, prefix: str = "") -> dict[str, Any]:
    """Every configurable key (dotted) and its type."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.update(leaves(tp, f"{key}."))  # type: ignore[arg-type]
        else:
            out[key] = tp
    return out


KEYS = leaves()
NAME = st.builds(lambda a, b: a + b, st.sampled_from("abcXYZ019"), st.text("abz09_-", max_size=12))
ODD_TEXT = st.sampled_from(["", " ", "..", "../../etc", "a\x00b", "\x7f", "é", "mqtt://", "mqtt://h:99999",
                            "mqtts://[::1]:8883", "mqtt://user:pw@h", "http://h", "x" * 2000, "\ud7ff", "nan"])
NUMBERS = st.sampled_from([0, -1, 1, -(2**63), 2**63 - 1, 2**63, 2**100, 65536, 70000, 2**31, 2**43,
                           0.0, -0.0, -1.5, 1e-300, 1e308, math.nan, math.inf, -math.inf, 0.5, 1.0, 1.0000001])


def _unwrap(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) \
        and len(args) == 1 else tp


def valid_value(key: str, tp: Any, draw: Any) -> Any:
    """A value the key takes (the schema's type, a sane magnitude)."""
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if key in ("device_id",):
        return draw(NAME)
    if key == "groups":
        return draw(st.lists(NAME, max_size=3))
    if key == "mqtt.url":
        return draw(st.sampled_from(["mqtt://127.0.0.1:1883", "mqtts://broker.example:8883", "mqtt://h"]))
    if key == "mqtt.urls":
        return draw(st.lists(st.sampled_from(["mqtt://127.0.0.1:1883", "mqtt://h", "mqtt://g:1884"]), min_size=1,
                             max_size=3, unique=True))
    if key == "api.port":
        return draw(st.integers(1, 65535))
    if origin is typing.Literal:
        return draw(st.sampled_from(typing.get_args(tp)))
    if origin is tuple:
        return [str(p) for p in draw(st.lists(st.sampled_from(["/etc/k1.pub", "k2.pub"]), max_size=2))]
    if tp is bool:
        return draw(st.booleans())
    if tp is int:
        return draw(st.integers(1, 1000))
    if tp is float:
        return draw(st.floats(0.0, 1.0) if "rate" in key or "fraction" in key else st.floats(0.01, 1000.0))
    if tp is Path:
        return draw(st.sampled_from(["/tmp/edgefleet-x", "rel/path", "/run/edge-agent/api.sock"]))
    return draw(st.text(max_size=20))


EDGES: dict[str, list[Any]] = {
    "mqtt.url": ["mqtt://h:65535", "mqtt://h:65536", "mqtt://h:99999", "mqtt://h:0", "mqtts://h:", "mqtt://:1"],
    "api.port": [0, 65535, 65536, -1], "mqtt.keepalive_s": [65535, 65536, 2**31], "device_id": ["..", "a/b", "x" * 65, "cam.7"],
    "groups": [["a b"], [".."], ["g"] * 3], "validation.memory_mb": [2**20, 2**20 + 1, 2**43],
    "runtime.num_threads": [1024, 1025, 2**31], "mqtt.reconnect_min_s": [120.0], "mqtt.reconnect_max_s": [0.5],
    "mqtt.prefix": ["", "a/+/b", "#", "$SYS", "a//b", "/a", "edgefleet/"],
}
"""Values at the edge of what each key takes."""


def bad_value(key: str, draw: Any) -> Any:
    """A value the key may not take: its edge cases, numbers out of range, or anything."""
    if key in EDGES and draw(st.booleans()):
        return draw(st.sampled_from(EDGES[key]))
    if _unwrap(KEYS[key]) in (int, float) and draw(st.booleans()):
        return draw(NUMBERS)
    return draw(st.one_of(NUMBERS, ODD_TEXT, st.booleans(), st.lists(NUMBERS | ODD_TEXT, max_size=3),
                          st.dictionaries(st.sampled_from(["a", "url", "x"]), NUMBERS, max_size=2),
                          st.text(max_size=30), st.integers(), st.floats()))


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key."""
    head, _, rest = key.partition(".")
    if rest:
        section = data.setdefault(head, {})
        if not isinstance(section, dict):
            data[head] = section = {}
        section[rest] = value
    else:
        data[head] = value


def config_case(draw: Any) -> tuple[str, str]:
    """(TOML text, what was done)."""
    if draw(st.integers(0, 19)) == 0:
        return draw(st.text(max_size=300)), "random text"
    data: dict[str, Any] = {}
    for key in draw(st.lists(st.sampled_from(sorted(KEYS)), max_size=8, unique=True)):
        set_key(data, key, valid_value(key, KEYS[key], draw))
    what = []
    for _ in range(draw(st.sampled_from([0, 1, 1, 1, 2, 3]))):
        kind = draw(st.sampled_from(["value", "value", "edge", "unknown key", "unknown section", "table for value"]))
        if kind in ("value", "edge"):
            key = draw(st.sampled_from(sorted(EDGES if kind == "edge" else KEYS)))
            set_key(data, key, bad_value(key, draw))
        elif kind == "unknown key":
            section = draw(st.sampled_from(["", "mqtt", "security", "health", "api"]))
            key = (f"{section}." if section else "") + draw(st.sampled_from(["urll", "timeout", "x", "Device_id"]))
            set_key(data, key, 1)
        elif kind == "unknown section":
            key = draw(st.sampled_from(["mqqt", "logging", "Runtime"])) + ".x"
            set_key(data, key, 1)
        else:
            key = draw(st.sampled_from(sorted(KEYS)))
            set_key(data, key, {"value": 1})
        what.append(f"{kind} {key}")
    return to_toml(data), "; ".join(what) or "valid"


def usable(config: AgentConfig) -> str | None:
    """What the agent could not work with in an accepted configuration, or None."""
    for key in KEYS:
        value: Any = config
        for part in key.split("."):
            value = getattr(value, part)
        if isinstance(value, float) and not math.isfinite(value):
            return f"{key} = {value}"
    if config.mqtt.keepalive_s > 65535:
        return f"mqtt.keepalive_s = {config.mqtt.keepalive_s} does not fit MQTT's 16-bit keep alive"
    if (config.validation.memory_mb << 20) >= 2**63:
        return f"validation.memory_mb = {config.validation.memory_mb} does not fit an address-space limit"
    if config.runtime.num_threads is not None and config.runtime.num_threads >= 2**31:
        return f"runtime.num_threads = {config.runtime.num_threads} does not fit the interpreter's int"
    try:
        Topics(config.mqtt.prefix)
    except ProtocolError as err:
        return str(err)
    if config.mqtt.url is not None:
        try:
            if not 0 < parse_url(config.mqtt.url)[2] <= 65535:
                return f"mqtt.url = {config.mqtt.url}: no such port"
        except ConfigError as err:
            return str(err)
    return None


def test_generated_config_files() -> None:
    tally: Counter[str] = Counter()

    @FUZZ
    @given(data=st.data())
    def case(data: Any) -> None:
        text, what = config_case(data.draw)
        try:
            config = parse_config(text)
        except ConfigError as err:
            message = str(err)
            assert message and "\n" not in message.strip(), (what, message)
            head = message.split(":", 1)[0]
            assert head == "config" or head.split(".")[0].split("[")[0] in KEYS or \
                head.split(".")[0] in {k.split(".")[0] for k in KEYS} or \
                head.split("[")[0] in KEYS or "unknown key" in message, (what, message)
            tally["refused"] += 1
        else:
            problem = usable(config)
            assert problem is None, f"{what}: accepted an unusable configuration: {problem}\n{text}"
            tally["accepted"] += 1
        tally["cases"] += 1

    case()
    assert tally["cases"] >= CASES and tally["refused"] > CASES // 4 and tally["accepted"] > CASES // 10, tally


def test_generated_config_files_through_the_cli(tmp_path: Path) -> None:
    """The real command line: a refused config exits 2 with the same one-line error, and runs nothing."""
    seen: Counter[str] = Counter()

    @settings(E2E, max_examples=max(6, E2E.max_examples // 2))
    @given(data=st.data())
    def case(data: Any) -> None:
        text, what = config_case(data.draw)
        try:
            parse_config(text)
        except ConfigError as err:
            expected = str(err).removeprefix("config: ")
        else:
            assume(False)
        path = tmp_path / "agent.toml"
        path.write_text(text)
        for command in ("check-config", "run") if seen["cases"] < 2 else ("check-config",):
            res = subprocess.run([sys.executable, "-m", "edgefleet.agent.cli", "--config", str(path), command],
                                 capture_output=True, text=True, cwd=ROOT, timeout=60)
            assert res.returncode == 2, (what, command, res.stdout, res.stderr)
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("edge-agent: error: "), (what, res.stderr)
            assert lines[0].endswith(expected), (expected, lines[0])
        seen["cases"] += 1

    case()
    assert seen["cases"] >= 4, seen
