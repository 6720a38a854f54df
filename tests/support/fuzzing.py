"""Hypothesis profiles and the hostile-input strategies of the fuzz suites.

Profiles (chosen with ``EDGEFLEET_FUZZ``): ``ci`` (the default) runs 1,000 cases per property with a
fixed seed, so CI sees the same cases every time; ``long`` runs ``EDGEFLEET_FUZZ_EXAMPLES`` (default
20,000) fresh random cases per property for local runs. The profiles are applied per test with
``@FUZZ`` and never loaded globally, so other hypothesis tests keep their own settings.

Strategies produce *plans* (what to break and how); the tests apply them to fresh documents so every
case carries its own deployment or command id and is reported on its own.
"""

from __future__ import annotations

import copy
import os
import random
import re
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from edgefleet.protocol import check_name

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
           HealthCheck.large_base_example]
settings.register_profile("edgefleet-fuzz-ci", max_examples=1000, derandomize=True, database=None,
                          deadline=None, suppress_health_check=_HEALTH, print_blob=True)
settings.register_profile("edgefleet-fuzz-long", max_examples=int(os.environ.get("EDGEFLEET_FUZZ_EXAMPLES", "20000")),
                          derandomize=False, database=None, deadline=None, suppress_health_check=_HEALTH,
                          print_blob=True)
PROFILE = "edgefleet-fuzz-long" if os.environ.get("EDGEFLEET_FUZZ") == "long" else "edgefleet-fuzz-ci"
FUZZ = settings.get_profile(PROFILE)
"""The settings every fuzz property runs with."""
CASES = FUZZ.max_examples
"""Cases each property must have run (checked after the run)."""
E2E = settings(FUZZ, max_examples=12 if PROFILE.endswith("ci") else 60)
"""The few cases that go through a real agent process and a real broker."""
TIMEOUT_S = max(300, CASES // 10 + 120)
"""Per-test time limit (pytest-timeout): the long profile needs more than the suite's default 300 s."""

# --- values -------------------------------------------------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=24))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=10)

ESCAPES = [
    "..", ".", "../state", "../../etc/passwd", "..%2f..%2fetc", "%2e%2e", "%2e%2e%2f%2e%2e", "a/../b", "/etc/passwd",
    "a\\..\\b", "\u2024\u2024", "\uff0e\uff0e", "\u2025", "\u2215etc\u2215passwd", "\u2044tmp", "a\x00b", "\x00",
    "..\x00", "", " ", "\t", "m\n", "m/", "/m", "+", "#", "$SYS", "m/+", "\u00e9", "\uff4d", "m\u200b",
    "m" * 65, "a" * 300, "b" * 5000, ".hidden", "-rf", "con", "lock", "state.json", "blobs", "partial",
]
"""Names built to escape a directory or to look like a safe one."""
NAMES = st.sampled_from(ESCAPES) | st.text(max_size=80) | st.text(alphabet="./%2e\\\x00\u2024\uff0e", max_size=12)


# --- deployment documents -----------------------------------------------------------------------

REQUIRED = [
    ("schema",), ("deployment_id",), ("issued_at",), ("expires_at",), ("model",), ("model", "name"),
    ("model", "version"), ("model", "artifact"), ("model", "golden"), ("model", "inputs"), ("model", "outputs"),
    ("model", "artifact", "sha256"), ("model", "artifact", "size"), ("model", "artifact", "chunk_size"),
    ("model", "artifact", "chunks"), ("model", "golden", "chunks"), ("model", "artifact", "chunks", 0, "sha256"),
    ("model", "artifact", "chunks", 0, "size"), ("model", "artifact", "chunks", 0, "wire_size"),
    ("model", "inputs", 0, "dtype"), ("model", "inputs", 0, "shape"), ("model", "outputs", 0, "name"),
]
FREE_FORM = ("metrics",)
"""Subtrees whose keys and scalar values are free (converter metrics)."""


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON value (object keys and list indexes)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths(v, (*prefix, i))
    return out


def get(doc: Any, path: tuple[Any, ...]) -> Any:
    """The value at `path`."""
    for p in path:
        doc = doc[p]
    return doc


def put(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    """Set the value at `path`."""
    get(doc, path[:-1])[path[-1]] = value


def remove(doc: Any, path: tuple[Any, ...]) -> None:
    """Delete the value at `path`."""
    del get(doc, path[:-1])[path[-1]]


def wrong_type(value: Any, draw: Callable[[Any], Any]) -> Any:
    """A value of a JSON type that a field holding `value` never accepts."""
    if isinstance(value, bool):
        options: list[Any] = [0, 1, "true", [], {}]
    elif isinstance(value, int):
        options = [str(value), 0.5 + value, [value], {"v": value}, True]
    elif isinstance(value, float):
        options = [str(value), [value], {"v": value}, True]
    elif isinstance(value, str):
        options = [1, 2.5, [value], {"v": value}, False]
    elif isinstance(value, list):
        options = ["x", 3, {"0": value[0] if value else 1}, True]
    else:
        options = [[value], "x", 7, False]
    return draw(st.sampled_from(options))


def _is_free(path: tuple[Any, ...]) -> bool:
    return any(p in FREE_FORM for p in path)


def break_document(doc: dict[str, Any], draw: Callable[[Any], Any], *, now: int) -> tuple[dict[str, Any], str, bool]:
    """Damage a valid (unsigned) deployment document; returns (doc, what was done, must be rejected)."""
    doc = copy.deepcopy(doc)
    kind = draw(st.sampled_from([
        "missing", "unknown field", "wrong type", "bad name", "bad sha", "out of range", "downgrade",
        "expired", "not yet valid", "schema", "dtype", "policy", "sizes", "anything", "anything", "anything",
    ]))
    if kind == "missing":
        path = draw(st.sampled_from(REQUIRED))
        remove(doc, path)
        return doc, f"missing {path}", True
    if kind == "unknown field":
        where = draw(st.sampled_from([p for p in [(), *paths(doc)] if isinstance(get(doc, p), dict)
                                      and not _is_free(p) and (not p or p[-1] not in FREE_FORM)]))
        name = draw(st.text(min_size=1, max_size=12).filter(lambda s: s not in get(doc, where)))
        get(doc, where)[name] = draw(JSON)
        return doc, f"unknown field {name!r} at {where}", True
    if kind == "wrong type":
        path = draw(st.sampled_from([p for p in paths(doc) if not _is_free(p)]))
        put(doc, path, wrong_type(get(doc, path), draw))
        return doc, f"wrong type at {path}", True
    if kind == "bad name":
        name = draw(NAMES.filter(lambda s: check_name(s) is not None))
        doc["model"]["name"] = name
        return doc, f"model name {name!r}", True
    if kind == "bad sha":
        path = draw(st.sampled_from([p for p in paths(doc) if p and p[-1] == "sha256"]))
        put(doc, path, draw(st.sampled_from(["", "0" * 63, "G" * 64, "A" * 64, "../" + "0" * 61, "0" * 65])))
        return doc, f"bad digest at {path}", True
    if kind == "out of range":
        path, value = draw(st.sampled_from([
            (("model", "version"), -1), (("issued_at",), -5), (("model", "artifact", "size"), 0),
            (("model", "artifact", "chunk_size"), 0), (("model", "artifact", "chunks", 0, "size"), -3),
            (("model", "artifact", "chunks", 0, "wire_size"), 0), (("model", "tolerance", "atol"), -1.0),
            (("model", "postprocessing", "top_k"), 0), (("model", "artifact", "chunk_size"), 64 << 20),
        ]))
        put(doc, path, value)
        return doc, f"{path} = {value}", True
    if kind == "downgrade":
        doc["model"]["version"] = draw(st.sampled_from([0, 1]))
        return doc, "version not above the active one", True
    if kind == "expired":
        doc["issued_at"], doc["expires_at"] = now - 7200, now - draw(st.integers(1, 3600))
        return doc, "expired", True
    if kind == "not yet valid":
        doc["issued_at"] = now + draw(st.integers(3600, 10**9))
        doc["expires_at"] = doc["issued_at"] + 3600
        return doc, "issued in the future", True
    if kind == "schema":
        doc["schema"] = draw(st.sampled_from(["edgefleet.deployment/2", "", "edgefleet.command/1"]) | st.text())
        return doc, "wrong schema", True
    if kind == "dtype":
        doc["model"]["inputs"][0]["dtype"] = draw(st.sampled_from(["float64", "complex64", "object", "", "F32",
                                                                   "f" * 200_000]))
        return doc, "unknown dtype", True
    if kind == "policy":
        key, value = draw(st.sampled_from([("max_error_rate", 1.5), ("max_error_rate", -0.1), ("probation_s", -1),
                                           ("max_latency_ratio", 0), ("hang_timeout_s", -2), ("allow_downgrade", 1)]))
        doc.setdefault("policy", {})[key] = value
        return doc, f"policy.{key} = {value}", True
    if kind == "sizes":
        choice = draw(st.sampled_from(["sum", "expires before issued", "no chunks", "chunk too big"]))
        if choice == "sum":
            doc["model"]["artifact"]["size"] += draw(st.integers(1, 1000))
        elif choice == "expires before issued":
            doc["expires_at"] = doc["issued_at"] - 1
        elif choice == "no chunks":
            doc["model"]["artifact"]["chunks"] = []
        else:
            doc["model"]["artifact"]["chunks"][0]["size"] = doc["model"]["artifact"]["chunk_size"] + 1
        return doc, choice, True
    path = draw(st.sampled_from(paths(doc)))
    put(doc, path, draw(JSON))
    return doc, f"anything at {path}", False


def break_text(text: bytes, draw: Callable[[Any], Any]) -> tuple[bytes, str]:
    """Damage the JSON text of a signed document (things no dict can express)."""
    kind = draw(st.sampled_from(["truncate", "duplicate key", "nan", "huge number", "not utf-8", "bom", "trailing",
                                 "deep", "oversized", "flip byte"]))
    if kind == "truncate":
        return text[:draw(st.integers(1, len(text) - 1))], kind  # empty would withdraw, not break
    if kind == "duplicate key":
        return b'{"schema":"x",' + text[1:], kind
    if kind in ("nan", "huge number"):  # a number JSON can carry but no float can hold
        value = draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity"] if kind == "nan" else
                                     [b"1e400", b"-1e400", b"1" + b"0" * 400 + b".0", b"1e-400", b"9" * 5000]))
        return re.sub(rb'"atol":[-0-9.eE+]+', b'"atol":' + value, text, count=1), kind
    if kind == "not utf-8":
        return text[:20] + b"\xff\xfe" + text[20:], kind
    if kind == "bom":
        return b"\xef\xbb\xbf" + text, kind
    if kind == "trailing":
        return text + draw(st.sampled_from([b"x", b"{}", b" ,", b"\x00"])), kind
    if kind == "deep":
        depth = draw(st.integers(500, 100_000))
        return text[:-1] + b',"deep":' + b"[" * depth + b"]" * depth + b"}", kind
    if kind == "oversized":
        return text[:-1] + b',"pad":"' + b"x" * (1 << 20) + b'"}', kind
    pos = draw(st.integers(0, len(text) - 1))
    return text[:pos] + bytes([text[pos] ^ (1 << draw(st.integers(0, 7)))]) + text[pos + 1:], kind


def break_signature(doc: dict[str, Any], draw: Callable[[Any], Any], sign: Callable[[dict[str, Any]], dict[str, Any]],
                    other: Callable[[dict[str, Any]], dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """A document whose signature must not verify."""
    kind = draw(st.sampled_from(["unsigned", "unknown key", "altered", "key id of another key", "garbage signature",
                                 "short signature", "signature type"]))
    if kind == "unsigned":
        return doc, kind
    if kind == "unknown key":
        return other(doc), kind
    signed = sign(doc)
    if kind == "altered":
        signed["issued_at"] -= 1
    elif kind == "key id of another key":
        signed["key_id"] = other(doc)["key_id"]
    elif kind == "garbage signature":
        signed["signature"] = draw(st.text(max_size=100))
    elif kind == "short signature":
        signed["signature"] = signed["signature"][:20]
    else:
        signed["signature"] = draw(st.sampled_from([None, 5, [], {}]))
    return signed, kind


# --- commands -----------------------------------------------------------------------------------

def break_command(cmd: dict[str, Any], draw: Callable[[Any], Any], *, now: int) -> tuple[dict[str, Any], str, bool]:
    """Damage a valid (unsigned) command; returns (command, what was done, must be refused)."""
    cmd = copy.deepcopy(cmd)
    kind = draw(st.sampled_from(["missing", "unknown field", "wrong type", "other device", "expired", "future",
                                 "too long", "action", "rollback without model", "bad model", "schema", "anything"]))
    if kind == "missing":
        key = draw(st.sampled_from(["schema", "command_id", "device_id", "action", "issued_at", "expires_at"]))
        del cmd[key]
    elif kind == "unknown field":
        cmd[draw(st.text(min_size=1, max_size=10).filter(lambda s: s not in cmd))] = draw(JSON)
    elif kind == "wrong type":
        key = draw(st.sampled_from(sorted(cmd)))
        cmd[key] = wrong_type(cmd[key], draw)
    elif kind == "other device":
        cmd["device_id"] = draw(st.sampled_from(["dev-2", "dev-10", "DEV-1", "dev-1 "]) | NAMES)
    elif kind == "expired":
        cmd["issued_at"], cmd["expires_at"] = now - 600, now - draw(st.integers(1, 500))
    elif kind == "future":
        cmd["issued_at"] = now + draw(st.integers(3600, 10**8))
        cmd["expires_at"] = cmd["issued_at"] + 60
    elif kind == "too long":
        cmd["expires_at"] = cmd["issued_at"] + draw(st.integers(86401, 10**9))
    elif kind == "action":
        cmd["action"] = draw(st.sampled_from(["reboot", "ROLLBACK", "", "install", "delete"]) | st.text(max_size=8))
    elif kind == "rollback without model":
        cmd["action"] = "rollback"
        cmd.pop("model", None)
    elif kind == "bad model":
        cmd["action"] = "rollback"
        cmd["model"] = draw(NAMES)
    elif kind == "schema":
        cmd["schema"] = draw(st.sampled_from(["edgefleet.deployment/1", "edgefleet.command/2", ""]))
    else:
        key = draw(st.sampled_from(sorted(cmd)))
        cmd[key] = draw(JSON)
        return cmd, f"anything at {key}", False
    return cmd, kind, True


# --- chunk payloads -----------------------------------------------------------------------------

def break_chunk(true_payload: bytes, wire_size: int, draw: Callable[[Any], Any]) -> tuple[bytes, str]:
    """A payload for a chunk topic that is not the chunk: wrong length, right length but wrong bytes, bombs."""
    import zlib

    kind = draw(st.sampled_from(["random", "same length", "flip", "truncate", "extend", "empty", "bomb",
                                 "other zlib", "rotated"]))
    if kind == "random":
        data = draw(st.binary(max_size=4096))
    elif kind == "same length":
        data = draw(st.binary(min_size=wire_size, max_size=wire_size))
    elif kind == "flip":
        pos = draw(st.integers(0, len(true_payload) - 1))
        data = bytearray(true_payload)
        data[pos] ^= 1 << draw(st.integers(0, 7))
        data = bytes(data)
    elif kind == "truncate":
        data = true_payload[:draw(st.integers(0, len(true_payload) - 1))]
    elif kind == "extend":
        data = true_payload + draw(st.binary(min_size=1, max_size=64))
    elif kind == "empty":
        data = b"\x00"
    elif kind == "bomb":  # a prefix of a stream that inflates to 64 MiB, cut to the expected length
        data = zlib.compress(b"\x00" * (64 << 20), 9)[:wire_size]
    elif kind == "other zlib":
        data = zlib.compress(draw(st.binary(min_size=1, max_size=2048)))
    else:
        k = draw(st.integers(1, max(1, len(true_payload) - 1)))
        data = true_payload[k:] + true_payload[:k]
    if data == true_payload:
        data = data + b"\x00"
    return data, kind


# --- topics -------------------------------------------------------------------------------------

def topic_for(draw: Callable[[Any], Any], prefix: str = "edgefleet") -> tuple[str, str | None]:
    """(topic, the name level that was fuzzed or None) for a message the agent may be handed."""
    name = draw(NAMES)
    kind = draw(st.sampled_from(["device model", "group model", "chunk", "cmd", "other device", "random",
                                 "wrong prefix", "deep"]))
    if kind == "device model":
        return f"{prefix}/devices/dev-1/models/{name}", name
    if kind == "group model":
        return f"{prefix}/groups/lab/models/{name}", name
    if kind == "chunk":
        return f"{prefix}/chunks/{name}", name
    if kind == "cmd":
        return f"{prefix}/devices/{name}/cmd", name
    if kind == "other device":
        return f"{prefix}/devices/{name}/models/m", name
    if kind == "wrong prefix":
        return f"{name}/devices/dev-1/models/m", name
    if kind == "deep":
        return f"{prefix}/devices/dev-1/models/m/{name}", name
    return draw(st.text(max_size=200)), None


def mqtt_topic_ok(topic: str) -> bool:
    """Whether MQTT lets a client publish to this topic name (what can reach a real agent)."""
    try:
        encoded = topic.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return 0 < len(encoded) <= 65535 and not any(c in topic for c in "+#\x00")


def shuffled(items: list[Any], seed: int) -> list[Any]:
    """A deterministic shuffle."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out
