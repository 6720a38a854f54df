"""Canonical JSON: the exact bytes that signatures cover, and a strict JSON reader."""

from __future__ import annotations

import json
import math
from typing import Any

from edgefleet.errors import ProtocolError

MAX_DOCUMENT_BYTES = 1 << 20


def canonical_json(obj: Any) -> bytes:
    """Serialise with sorted keys, no spaces, UTF-8 and no NaN: the same value always gives the same bytes."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ProtocolError(f"duplicate field {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ProtocolError(f"{name} is not allowed in a document")


def _finite(text: str) -> float:
    # 1e400 is valid JSON but overflows to infinity, which canonical_json (and so every signature
    # check) cannot encode
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(f"number {text[:24]} is out of range")
    return value


def parse_json(data: bytes | str, *, limit: int = MAX_DOCUMENT_BYTES) -> Any:
    """Parse JSON strictly: size-limited, UTF-8, no duplicate keys, no NaN, Infinity or overflowing numbers."""
    if len(data) > limit:
        raise ProtocolError(f"document is {len(data)} bytes, above the limit of {limit}")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants, parse_float=_finite)
        if "\\ud" in text or "\\uD" in text:
            # a \uD800-\uDFFF escape without its pair reads as a lone surrogate, which no UTF-8 encoder
            # (so no signature check, no event, no state file) can write back
            canonical_json(value)
        return value
    except UnicodeEncodeError as err:
        raise ProtocolError("document holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)") from err
    except UnicodeDecodeError as err:
        raise ProtocolError(f"document is not UTF-8: {err.reason} at byte {err.start}") from err
    except RecursionError as err:
        raise ProtocolError("document is nested too deeply") from err
    except json.JSONDecodeError as err:
        raise ProtocolError(f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from err
    except ValueError as err:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise ProtocolError(f"malformed JSON: {str(err).split(':')[0]}") from err
