"""Strict conversion between JSON values and frozen dataclasses.

Every document on the wire is a dataclass. `parse` accepts exactly the declared fields with exactly
the declared types and names the offending field (as a path such as ``model.artifact.chunks[3].size``)
in the error; `dump` produces the JSON value, leaving out fields that are ``None``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Iterable
from enum import Enum
from functools import cache
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from edgefleet.errors import ProtocolError

T = TypeVar("T")
Check = Callable[[Any], "str | None"]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def check_name(value: Any) -> str | None:
    """A model, device or group name: safe as a path component and as an MQTT topic level."""
    if not isinstance(value, str) or not NAME_RE.match(value) or ".." in value:
        return "expected 1-64 characters of letters, digits, '_', '.', '-' (starting with a letter or digit, no '..')"
    return None


PORTABLE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
NAME_RULE = "1-64 letters, digits, '_' or '-', starting with a letter or digit (no '.': some brokers refuse it in a topic)"


def check_portable_name(value: Any) -> str | None:
    """A device, group or model name given out from now on: a topic level that every supported broker takes.

    `check_name` is what a receiver accepts (names made by earlier releases, with '.', keep working where
    they work); the tools and the agent's configuration make only these. NATS splits subjects at '.' (2.9
    refuses such a topic, later releases rewrite it to '//'), and Home Assistant ids are [a-zA-Z0-9_-]."""
    if not isinstance(value, str) or not PORTABLE_NAME_RE.match(value):
        return f"expected {NAME_RULE}"
    return None


def check_id(value: Any) -> str | None:
    """A deployment or command id."""
    if not isinstance(value, str) or not ID_RE.match(value) or ".." in value:
        return "expected 1-128 characters of letters, digits, '_', '.', ':', '-' (no '..')"
    return None


def check_target(value: Any) -> str | None:
    """Whom a signed document is for: ``device:{name}`` or ``group:{name}``."""
    if isinstance(value, str):
        kind, _, name = value.partition(":")
        if kind in ("device", "group") and check_name(name) is None:
            return None
    return "expected 'device:NAME' or 'group:NAME'"


def check_sha256(value: Any) -> str | None:
    """A lowercase hex SHA-256 digest."""
    if not isinstance(value, str) or not SHA256_RE.match(value):
        return "expected a SHA-256 digest as 64 lowercase hex characters"
    return None


def non_negative(value: Any) -> str | None:
    """A number that is zero or more."""
    return None if value >= 0 else f"expected a value >= 0, got {value}"


def positive(value: Any) -> str | None:
    """A number above zero."""
    return None if value > 0 else f"expected a value > 0, got {value}"


def fraction(value: Any) -> str | None:
    """A number in [0, 1]."""
    return None if 0 <= value <= 1 else f"expected a value between 0 and 1, got {value}"


def at_most(limit: int) -> Check:
    """A number no larger than `limit` (the hard limit of what consumes it)."""
    def check(value: Any) -> str | None:
        return None if value <= limit else f"expected at most {limit}, got {value}"
    return check


def _first(problems: Iterable[str | None]) -> str | None:
    return next((p for p in problems if p), None)


def all_of(*checks: Check) -> Check:
    """Every check in turn; the first problem found."""
    return lambda value: _first(check(value) for check in checks)


def each(item: Check) -> Check:
    """Every element of a list passes `item`; the first problem found."""
    return lambda values: _first(item(value) for value in values)


def checked(check: Check, **kwargs: Any) -> Any:
    """A dataclass field whose value must also pass `check` (which returns an error text or None).

    The check sits with its field, for wire documents and the agent's configuration alike; `field_check`
    reads it back and the parser runs it on every value that is not None."""
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata["check"] = check
    return dataclasses.field(metadata=metadata, **kwargs)


def field_check(field: dataclasses.Field[Any]) -> Check | None:
    """The check `checked` declared on a field, or None."""
    return field.metadata.get("check")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if isinstance(tp, type) and issubclass(tp, Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "an object"
    if dataclasses.is_dataclass(tp):
        return "an object"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _fail(path: str, message: str) -> ProtocolError:
    return ProtocolError(f"{path or 'document'}: {message}")


Converter = Callable[[Any, str], Any]


@cache
def _converter(tp: Any) -> Converter:
    """The function that checks and converts a JSON value to `tp`, built once per annotation."""
    origin = get_origin(tp)
    if tp is Any:
        return lambda value, path: value
    if origin in (Union, types.UnionType):
        return _union_converter(tp)
    if origin is Literal:
        allowed = get_args(tp)
        boolean = any(isinstance(a, bool) for a in allowed)

        def literal(value: Any, path: str) -> Any:
            if value not in allowed or isinstance(value, bool) != boolean:
                raise _fail(path, f"expected {_type_name(tp)}, got {value!r}")
            return value
        return literal
    if isinstance(tp, type) and issubclass(tp, Enum):
        members = {m.value: m for m in tp}

        def member(value: Any, path: str) -> Any:
            if not isinstance(value, str) or value not in members:
                raise _fail(path, f"expected {_type_name(tp)}, got {value!r}")
            return members[value]
        return member
    if origin is tuple:
        (item_type,) = [a for a in get_args(tp) if a is not Ellipsis]
        item = _converter(item_type)

        def sequence(value: Any, path: str) -> Any:
            if not isinstance(value, list):
                raise _fail(path, f"expected a list, got {_json_kind(value)}")
            return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))
        return sequence
    if origin is dict:
        value_type = _converter(get_args(tp)[1])

        def mapping(value: Any, path: str) -> Any:
            if not isinstance(value, dict):
                raise _fail(path, f"expected an object, got {_json_kind(value)}")
            return {k: value_type(v, f"{path}.{k}" if path else k) for k, v in value.items()}
        return mapping
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return lambda value, path: parse(tp, value, path)
    if tp in _SCALARS:
        accepts, what, convert = _SCALARS[tp]

        def scalar(value: Any, path: str) -> Any:
            if not accepts(value):
                raise _fail(path, f"expected {what}, got {_json_kind(value)}")
            return convert(value)
        return scalar
    raise TypeError(f"unsupported annotation {tp!r}")


def _union_converter(tp: Any) -> Converter:
    options = [_converter(o) for o in get_args(tp) if o is not type(None)]
    nullable = type(None) in get_args(tp)

    def union(value: Any, path: str) -> Any:
        if value is None:
            if nullable:
                return None
            raise _fail(path, f"expected {_type_name(tp)}, got null")
        errors = []
        for option in options:
            try:
                return option(value, path)
            except ProtocolError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise _fail(path, f"expected {_type_name(tp)}")
    return union


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _to_float(value: Any) -> float:
    # an integer of hundreds of digits is valid JSON but no double: refused like any other bad value
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise ProtocolError(f"number {str(value)[:24]}... is out of range")
    return result


_SCALARS: dict[Any, tuple[Callable[[Any], bool], str, Callable[[Any], Any]]] = {
    bool: (lambda v: isinstance(v, bool), "true or false", lambda v: v),
    int: (_is_int, "an integer", lambda v: v),
    float: (_is_number, "a number", _to_float),
    str: (lambda v: isinstance(v, str), "a string", lambda v: v),
}


def _nullable(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


@cache
def _plan(cls: type) -> tuple[list[tuple[str, Converter, Check | None, bool, bool]], frozenset[str]]:
    """Per field: name, converter, check, whether it has no default, whether it may be null."""
    hints = _hints(cls)
    plan = [(f.name, _converter(hints[f.name]), field_check(f),
             f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, _nullable(hints[f.name]))
            for f in dataclasses.fields(cls)]
    return plan, frozenset(f.name for f in dataclasses.fields(cls))


def parse(cls: type[T], value: Any, path: str = "") -> T:
    """Build `cls` from a JSON value, rejecting unknown, missing and mistyped fields by name."""
    if not isinstance(value, dict):
        raise _fail(path, f"expected an object, got {_json_kind(value)}")
    plan, names = _plan(cls)  # type: ignore[arg-type]
    if not names.issuperset(value):
        unknown = sorted(set(value) - names)
        where = f"{path}." if path else ""
        raise ProtocolError(f"{where}{unknown[0]}: unknown field")
    kwargs: dict[str, Any] = {}
    for name, convert, check, required, nullable in plan:
        sub = f"{path}.{name}" if path else name
        if name not in value:
            if required:
                if not nullable:
                    raise _fail(sub, "missing field")
                kwargs[name] = None  # `dump` leaves None out, so a missing nullable field reads back as None
            continue
        converted = convert(value[name], sub)
        if check is not None and converted is not None:
            problem = check(converted)
            if problem:
                raise _fail(sub, problem)
        kwargs[name] = converted
    try:
        return cls(**kwargs)
    except ProtocolError as err:
        raise ProtocolError(f"{path}.{err}" if path else str(err)) from err


def dump(obj: Any) -> Any:
    """The JSON value of a dataclass document (``None`` fields left out)."""
    names = _field_names(type(obj))  # type: ignore[arg-type]
    if names is not None:
        out = {}
        for name in names:
            v = getattr(obj, name)
            if v is not None:
                out[name] = dump(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [dump(v) for v in obj]
    if isinstance(obj, dict):
        return {k: dump(v) for k, v in obj.items()}
    if isinstance(obj, Enum):
        return obj.value
    return obj


@cache
def _field_names(cls: type) -> tuple[str, ...] | None:
    """The fields of a dataclass type, None for any other type."""
    return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else None
