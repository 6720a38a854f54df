"""A lean, strict `.npy` codec for the binary API path.

`np.load` parses the header with `ast.literal_eval` (about 32 µs here); a request's header is a small
dict of three known keys, so it is matched with a regular expression instead, and the data is
viewed with `np.frombuffer` (under a microsecond). Only plain numeric and boolean dtypes are
accepted: no objects, strings or records, so nothing in a body is ever executed or unpickled.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefleet.errors import RequestError

MAGIC = b"\x93NUMPY"
CONTENT_TYPE = "application/x-npy"
MAX_HEADER = 4096
_CANONICAL = re.compile(
    r"\{'descr': '([^']*)', 'fortran_order': (True|False), 'shape': \(([0-9, ]*)\), \}[ ]*\n?")
_ITEM = re.compile(r"'(\w+)'\s*:\s*('[^']*'|True|False|\([^)]*\))")
_REST = re.compile(r"\s*\{[\s,]*\}\s*")
_DESCR = re.compile(r"[<>|=]?[biuf][1248]")
_dtypes: dict[str, np.dtype[Any]] = {}
_shapes: dict[str, tuple[int, ...]] = {}
_parsed: dict[bytes, tuple[np.dtype[Any], tuple[int, ...], int, bool]] = {}
_headers: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _bad(what: str) -> RequestError:
    return RequestError(f"npy body: {what}")


def _dtype(descr: str) -> np.dtype[Any]:
    dtype = _dtypes.get(descr)
    if dtype is None:
        if not _DESCR.fullmatch(descr):
            raise _bad(f"dtype {descr!r} is not supported (plain numbers or booleans only)")
        try:
            dtype = np.dtype(descr)
        except TypeError as err:
            raise _bad(f"dtype {descr!r} is not supported") from err
        if len(_dtypes) < 64:
            _dtypes[descr] = dtype
    return dtype


def _shape(text: str) -> tuple[int, ...]:
    shape = _shapes.get(text)
    if shape is not None:
        return shape
    parts = [p.strip() for p in text.split(",")]
    if parts and parts[-1] == "":
        parts.pop()
    if not all(p.isdigit() for p in parts):
        raise _bad(f"shape ({text}) is not a tuple of non-negative integers")
    shape = tuple(int(p) for p in parts)
    if len(_shapes) < 256:
        _shapes[text] = shape
    return shape


def _header_fields(header: str) -> tuple[str, bool, str]:
    m = _CANONICAL.fullmatch(header)
    if m:
        return m.group(1), m.group(2) == "True", m.group(3)
    # other writers order or space the same three keys differently
    fields: dict[str, str] = {}
    for item in _ITEM.finditer(header):
        if item.group(1) in fields:
            raise _bad(f"header repeats {item.group(1)!r}")
        fields[item.group(1)] = item.group(2)
    if set(fields) != {"descr", "fortran_order", "shape"} or not _REST.fullmatch(_ITEM.sub(",", header)):
        raise _bad("header is not a dict of exactly 'descr', 'fortran_order' and 'shape'")
    descr, fortran, shape = fields["descr"], fields["fortran_order"], fields["shape"]
    if not descr.startswith("'") or fortran not in ("True", "False") or not shape.startswith("("):
        raise _bad("header values have the wrong types")
    return descr[1:-1], fortran == "True", shape[1:-1]


def loads(data: bytes | bytearray | memoryview) -> NDArray[Any]:
    """One array from `.npy` bytes; raise RequestError saying what is wrong with them."""
    if isinstance(data, memoryview):
        data = data.tobytes()
    if data[:6] != MAGIC or len(data) < 10:
        raise _bad("not a .npy file (bad magic bytes)")
    major = data[6]
    if major == 1:
        size, start = data[8] | data[9] << 8, 10
    elif major in (2, 3) and len(data) >= 12:
        size, start = int.from_bytes(data[8:12], "little"), 12
    else:
        raise _bad(f"format version {major} is not supported" if major not in (2, 3) else "truncated header")
    if size > MAX_HEADER:
        raise _bad(f"header of {size} bytes is above the limit of {MAX_HEADER}")
    end = start + size
    if len(data) < end:
        raise _bad("truncated header")
    raw = bytes(data[6:end])  # version byte included: v3 headers are UTF-8
    parsed = _parsed.get(raw)
    if parsed is None:
        parsed = _parse_header(raw[start - 6:], major)
        if len(_parsed) < 256:
            _parsed[raw] = parsed
    dtype, shape, count, fortran = parsed
    if len(data) - end != count * dtype.itemsize:
        raise _bad(f"shape {list(shape)} of {dtype.name} needs {count * dtype.itemsize} data bytes, "
                   f"got {len(data) - end}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    if fortran:
        return arr.reshape(shape[::-1]).T.copy(order="C")
    return arr.reshape(shape)


def _parse_header(raw: bytes, major: int) -> tuple[np.dtype[Any], tuple[int, ...], int, bool]:
    """dtype, shape, element count and Fortran order of a header (the same header is parsed once)."""
    try:
        text = raw.decode("utf-8" if major == 3 else "latin-1")
    except UnicodeDecodeError as err:
        raise _bad("header is not valid text") from err
    descr, fortran, shape_text = _header_fields(text)
    dtype = _dtype(descr)
    shape = _shape(shape_text)
    count = 1
    for d in shape:
        count *= d
    return dtype, shape, count, fortran


def header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    """The `.npy` (version 1.0) header for a C-ordered array, padded to 64 bytes as numpy pads it."""
    key = (dtype.str, shape)
    cached = _headers.get(key)
    if cached is not None:
        return cached
    shape_text = "(" + "".join(f"{d}, " for d in shape).rstrip(" ")
    if len(shape) != 1:
        shape_text = shape_text.rstrip(",")
    text = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': {shape_text}), }}"
    pad = 64 - (10 + len(text) + 1) % 64
    body = (text + " " * (pad % 64) + "\n").encode("latin-1")
    out = MAGIC + b"\x01\x00" + len(body).to_bytes(2, "little") + body
    if len(_headers) < 256:
        _headers[key] = out
    return out


def dumps(arr: NDArray[Any]) -> bytes:
    """`.npy` bytes of `arr` (C order), readable by np.load."""
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"cannot encode dtype {arr.dtype} as npy here")
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # np.ascontiguousarray would turn a 0-d array into 1-d
    return header(arr.dtype, arr.shape) + arr.tobytes()
