"""Hostile `.tflite` files made from a good one: bit flips, truncations, edited flatbuffers, huge arenas.

The flatbuffer edits use LiteRT's generated schema (`ai_edge_litert.schema_py_generated`, no
TensorFlow): the model is unpacked into its object form, one field is set to an absurd value, and
it is packed again, so the file is a well-formed flatbuffer that lies about its tensors. Every file
keeps the good model's input/output signature where it can, so the validation child gets as far as
loading, allocating and invoking it instead of stopping at the signature check.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import flatbuffers

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1


@dataclass(frozen=True)
class Hostile:
    """One hostile model file and how it was made."""

    kind: str
    """bitflip, truncate, flatbuffer or arena."""
    name: str
    """What exactly was done, e.g. ``bitflip@17.3`` or ``shape:t0=[2147483647, 8]``."""
    data: bytes


def _schema() -> Any:
    import ai_edge_litert.schema_py_generated as schema

    return schema


def unpack(model: bytes) -> Any:
    """The object form (ModelT) of a TFLite flatbuffer."""
    s = _schema()
    return s.ModelT.InitFromObj(s.Model.GetRootAs(model, 0))


def pack(obj: Any) -> bytes:
    """A ModelT packed back into a TFLite flatbuffer (with the TFL3 identifier)."""
    builder = flatbuffers.Builder(4096)
    builder.Finish(obj.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def bit_flips(model: bytes, count: int, seed: int = 0) -> list[Hostile]:
    """`count` single-bit flips: half in the first 64 bytes (root offset, file identifier, vtables),
    spread evenly, the other half at random positions over the rest of the file."""
    rng = random.Random(seed)
    head = min(64, len(model))
    step = max(1, 2 * head // max(1, count))
    positions = [(i, rng.randrange(8)) for i in range(0, head, step)][: (count + 1) // 2]
    while len(positions) < count:
        positions.append((rng.randrange(head, len(model)), rng.randrange(8)))
    out = []
    for pos, bit in positions:
        data = bytearray(model)
        data[pos] ^= 1 << bit
        out.append(Hostile("bitflip", f"bitflip@{pos}.{bit}", bytes(data)))
    return out


def truncations(model: bytes, count: int, seed: int = 0) -> list[Hostile]:
    """`count` prefixes of the model: lengths spread evenly over the file interleaved with tiny ones and
    the file less its last byte, then random lengths. (An empty file cannot even be described by a
    document.)"""
    rng = random.Random(seed)
    n = len(model)
    spaced = [n * k // count for k in range(1, count)]
    tiny = [1, 4, 8, 16, 32, n - 1]
    lengths = [x for pair in zip(spaced, tiny, strict=False) for x in pair] + spaced[len(tiny):] + tiny[len(spaced):]
    ordered = list(dict.fromkeys(x for x in lengths if 0 < x < n))
    seen = set(ordered)
    while len(ordered) < count and len(seen) < n - 1:
        x = rng.randrange(1, n)
        if x not in seen:
            seen.add(x)
            ordered.append(x)
    return [Hostile("truncate", f"truncate@{x}", model[:x]) for x in ordered[:count]]


Edit = Callable[[Any], None]


def _tensor(sg: int, t: int) -> Callable[[Any], Any]:
    return lambda m: m.subgraphs[sg].tensors[t]


def _edits(m: Any) -> Iterator[tuple[str, Edit]]:
    """Named edits of a model's object form; each leaves a well-formed flatbuffer that lies."""
    sg = m.subgraphs[0]
    n_tensors = len(sg.tensors)
    inp, out = int(sg.inputs[0]), int(sg.outputs[0])
    op_outputs = [int(o) for op in sg.operators for o in op.outputs]
    inner = [t for t in op_outputs if t != out]
    weights = [i for i, t in enumerate(sg.tensors) if m.buffers[t.buffer].data is not None]
    absurd_shapes = [
        [INT32_MAX, 8], [1, INT32_MAX], [INT32_MAX, INT32_MAX], [65536, 65536, 65536], [-1, 8], [-7, 8],
        [0, 8], [], [1] * 64, [2**20, 2**20],
    ]
    for t in (inp, out, *inner[:2], *weights[:2]):
        for shape in absurd_shapes:
            def set_shape(mm: Any, t: int = t, shape: list[int] = shape) -> None:
                mm.subgraphs[0].tensors[t].shape = list(shape)
            yield f"shape:t{t}={shape}", set_shape
    for t in (inp, *weights[:1]):
        for sig in ([-1, INT32_MAX], [INT32_MAX, -1], [-1, -1, -1]):
            def set_signature(mm: Any, t: int = t, sig: list[int] = sig) -> None:
                mm.subgraphs[0].tensors[t].shapeSignature = list(sig)
            yield f"shape_signature:t{t}={sig}", set_signature
    for t in (inp, out, *weights[:2]):
        for index in (len(m.buffers), 10**6, UINT32_MAX):
            def set_buffer(mm: Any, t: int = t, index: int = index) -> None:
                mm.subgraphs[0].tensors[t].buffer = index
            yield f"buffer_index:t{t}={index}", set_buffer
    for b in [sg.tensors[w].buffer for w in weights[:2]]:
        def cut(mm: Any, b: int = b) -> None:
            mm.buffers[b].data = mm.buffers[b].data[:3]
        yield f"buffer_data:b{b}=3 bytes", cut
        for offset, size in ((2**40, 512), (16, 2**40), (UINT32_MAX, UINT32_MAX), (2**63, 2**63)):
            def external(mm: Any, b: int = b, offset: int = offset, size: int = size) -> None:
                mm.buffers[b].data = None
                mm.buffers[b].offset = offset
                mm.buffers[b].size = size
            yield f"buffer_offset:b{b}=({offset},{size})", external
    for which in ("inputs", "outputs"):
        for index in (n_tensors, 10**6, -5):
            def set_operand(mm: Any, which: str = which, index: int = index) -> None:
                op = mm.subgraphs[0].operators[0]
                values = list(getattr(op, which))
                values[0] = index
                setattr(op, which, values)
            yield f"op_{which}[0]={index}", set_operand
    for index in (len(m.operatorCodes), 10**6):
        def set_opcode(mm: Any, index: int = index) -> None:
            mm.subgraphs[0].operators[0].opcodeIndex = index
        yield f"opcode_index={index}", set_opcode
    for code in (9999, 127):
        def set_builtin(mm: Any, code: int = code) -> None:
            mm.operatorCodes[0].builtinCode = code
            mm.operatorCodes[0].deprecatedBuiltinCode = min(code, 127)
        yield f"builtin_code={code}", set_builtin

    def version(mm: Any) -> None:
        mm.operatorCodes[0].version = 10**6
    yield "op_version=1000000", version
    for dtype in (99, 9, 8):  # unknown, STRING, COMPLEX64 on an input
        def set_type(mm: Any, dtype: int = dtype) -> None:
            mm.subgraphs[0].tensors[inp].type = dtype
        yield f"tensor_type:t{inp}={dtype}", set_type

    def cycle(mm: Any) -> None:
        op = mm.subgraphs[0].operators[0]
        op.inputs = [int(op.outputs[0]), *list(op.inputs)[1:]]
    yield "cycle:op0 reads its own output", cycle

    def no_subgraph(mm: Any) -> None:
        mm.subgraphs = []
    yield "subgraphs=[]", no_subgraph

    def no_ops(mm: Any) -> None:
        mm.subgraphs[0].operators = []
    yield "operators=[]", no_ops

    def schema_version(mm: Any) -> None:
        mm.version = 99
    yield "schema_version=99", schema_version


def flatbuffer_edits(model: bytes) -> list[Hostile]:
    """Every named edit of `model`, packed (edits the packer itself refuses are left out)."""
    out = []
    names = [name for name, _ in _edits(unpack(model))]
    for i, name in enumerate(names):
        obj = unpack(model)
        _, edit = list(_edits(obj))[i]
        try:
            edit(obj)
            data = pack(obj)
        except (ValueError, OverflowError, TypeError, Exception):  # e.g. a value the packer cannot encode
            continue
        out.append(Hostile("flatbuffer", name, data))
    return out


def sample_edits(edits: list[Hostile], per_kind: int) -> list[Hostile]:
    """The last (most extreme) `per_kind` edits of each field of each tensor or buffer."""
    by_kind: dict[str, list[Hostile]] = {}
    for h in edits:
        by_kind.setdefault(h.name.split("=")[0], []).append(h)
    return [h for group in by_kind.values() for h in group[-per_kind:]]


def huge_arenas(model: bytes, batches: tuple[int, ...] = (2**22, 2**24, 2**26)) -> list[Hostile]:
    """The model with its default input batch set so large that allocating tensors needs gigabytes.

    The shape signature keeps the dynamic batch, so the model still presents the document's
    signature; the first allocation is what hurts.
    """
    out = []
    for batch in batches:
        obj = unpack(model)
        sg = obj.subgraphs[0]
        t = sg.tensors[int(sg.inputs[0])]
        t.shape = [batch, *list(t.shape)[1:]]
        out.append(Hostile("arena", f"arena:batch={batch}", pack(obj)))
    return out


def hostile_set(model: bytes, *, flips: int, cuts: int, seed: int = 0, arenas: bool = True,
                extra: tuple[Hostile, ...] = ()) -> list[Hostile]:
    """A mixed set: `flips` bit flips, `cuts` truncations, every flatbuffer edit and the huge arenas."""
    files = bit_flips(model, flips, seed) + truncations(model, cuts, seed) + flatbuffer_edits(model)
    if arenas:
        files += huge_arenas(model)
    return files + list(extra)


def outcome_kind(reason: str | None) -> str:
    """A short class for a rejection reason (for the tally of what the hostile files did)."""
    text = reason or ""
    if "crashed with" in text:
        return "killed by " + text.split("crashed with ")[1].split(" ")[0]
    for needle, kind in (
        ("timed out", "timeout"),
        ("exited with code", "child exited"),
        ("validation memory limit", "memory limit"),
        ("does not load", "load refused"),
        ("signature mismatch", "signature mismatch"),
        ("invoke failed", "invoke failed"),
        ("differs by", "golden mismatch"),
        ("not finite", "non-finite output"),
        ("shape", "golden shape"),
        ("validation error", "validation error"),
    ):
        if needle in text:
            return kind
    return "other: " + text[:60]


def tally(kinds: list[str]) -> str:
    """`kind: count` pairs, most frequent first (not KEY=value: bench/run_all.py reads those as figures)."""
    return ", ".join(f"{k}: {n}" for k, n in Counter(kinds).most_common())
