"""What a .tflite file holds, read from its flatbuffer without TensorFlow.

The schema comes from LiteRT's generated ``schema_py_generated`` (plain ``flatbuffers`` code; importing
it does not load an interpreter). Used by ``inspect``, ``diff`` and the convert report.
"""

from __future__ import annotations

import importlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from edgefleet.converter.tflite.metadata import METADATA_NAME, ModelMetadata, parse_metadata
from edgefleet.errors import UsageError
from edgefleet.protocol import Quantization, TensorSpec, split

log = logging.getLogger(__name__)

_DTYPES = {
    0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 5: "string", 6: "bool", 7: "int16",
    8: "complex64", 9: "int8", 10: "float64", 11: "complex128", 12: "uint64", 15: "uint32", 16: "uint16",
    17: "int4", 18: "bfloat16",
}
_NUMPY = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "uint8": np.uint8, "int64": np.int64,
          "int16": np.int16, "int8": np.int8, "float64": np.float64, "uint16": np.uint16, "uint32": np.uint32}


@cache
def _schema() -> Any:
    for name in ("ai_edge_litert.schema_py_generated", "tflite_runtime.schema_py_generated",
                 "tensorflow.lite.python.schema_py_generated"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise UsageError("reading .tflite files needs ai-edge-litert (pip install 'edgefleet[litert]')")


@cache
def _op_names() -> dict[int, str]:
    ops = _schema().BuiltinOperator
    return {v: k for k, v in vars(ops).items() if not k.startswith("_") and isinstance(v, int)}


@dataclass(frozen=True)
class OperatorInfo:
    """One operator kind in the model: builtin name (or custom code), version, how many nodes use it."""

    name: str
    version: int
    count: int

    def to_dict(self) -> dict[str, Any]:
        """JSON value."""
        return {"name": self.name, "version": self.version, "count": self.count}


@dataclass(frozen=True)
class WeightInfo:
    """A constant tensor with two or more dimensions (a kernel): how much of it is zero, how it is stored."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    sparsity: float
    encoding: str  # "dense" or "sparse" (TFLite sparse tensor format)

    def to_dict(self) -> dict[str, Any]:
        """JSON value."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "sparsity": round(self.sparsity, 4), "encoding": self.encoding}


@dataclass(frozen=True)
class ModelInfo:
    """A summary of one .tflite file."""

    size: int
    wire_size: int
    chunks: int
    operators: tuple[OperatorInfo, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weights: tuple[WeightInfo, ...]
    quantization: str
    metadata: ModelMetadata | None = None
    min_runtime_version: str | None = None
    float_ops: tuple[str, ...] = field(default=())
    params: int = 0  # elements of the weight tensors (kernels, biases, other float/8-bit constants)
    macs: int = 0  # multiply-accumulates of one invoke in Conv/DepthwiseConv/FullyConnected ops
    macs_by_op: tuple[tuple[str, int], ...] = field(default=())

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all kernels, weighted by size."""
        total = sum(int(np.prod(w.shape)) for w in self.weights)
        zeros = sum(w.sparsity * int(np.prod(w.shape)) for w in self.weights)
        return zeros / total if total else 0.0

    @property
    def sparse_encoded(self) -> bool:
        """Whether any kernel uses TFLite's sparse tensor format."""
        return any(w.encoding == "sparse" for w in self.weights)

    def to_dict(self) -> dict[str, Any]:
        """JSON value for reports and `inspect --json`."""
        return {
            "bytes": self.size, "wire_bytes": self.wire_size, "chunks": self.chunks,
            "quantization": self.quantization, "sparsity": round(self.sparsity, 4),
            "sparse_encoding": self.sparse_encoded, "min_runtime_version": self.min_runtime_version,
            "operators": [o.to_dict() for o in self.operators],
            "inputs": [tensor_dict(t) for t in self.inputs], "outputs": [tensor_dict(t) for t in self.outputs],
            "weights": [w.to_dict() for w in self.weights],
            "float_ops": list(self.float_ops),
            "params": self.params, "macs": self.macs, "macs_by_op": dict(self.macs_by_op),
            "metadata": self.metadata.to_dict() if self.metadata else None,
        }


def tensor_dict(spec: TensorSpec) -> dict[str, Any]:
    """JSON value of a tensor spec (as in the deployment document)."""
    q = spec.quantization
    return {"name": spec.name, "dtype": spec.dtype, "shape": list(spec.shape),
            "quantization": {"scale": q.scale, "zero_point": q.zero_point} if q else None}


def _buffer(model: Any, raw: bytes, index: int) -> bytes:
    if not model.buffers or index >= len(model.buffers):
        return b""
    buf = model.buffers[index]
    if buf.offset > 1:  # models over 2 GB keep buffers after the flatbuffer
        return raw[buf.offset:buf.offset + buf.size]
    return b"" if buf.data is None else np.asarray(buf.data, dtype=np.uint8).tobytes()


def _spec(tensor: Any) -> TensorSpec:
    shape = tensor.shapeSignature if tensor.shapeSignature is not None else tensor.shape
    q = tensor.quantization
    quant = None
    if q is not None and q.scale is not None and len(q.scale) == 1 and float(q.scale[0]) > 0:
        quant = Quantization(scale=float(q.scale[0]), zero_point=int(q.zeroPoint[0]) if q.zeroPoint is not None else 0)
    name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
    return TensorSpec(name=name, dtype=_DTYPES.get(tensor.type, f"type{tensor.type}"),  # type: ignore[arg-type]
                      shape=tuple(int(d) for d in (shape if shape is not None else [])), quantization=quant)


def _zero_fraction(tensor: Any, data: bytes, dtype: str, elements: int) -> float:
    np_type = _NUMPY.get(dtype)
    if np_type is None or not data or elements == 0:
        return 0.0
    values = np.frombuffer(data, dtype=np_type)
    q = tensor.quantization
    zero: Any = 0
    if dtype in ("int8", "uint8", "int16") and q is not None and q.zeroPoint is not None and len(q.zeroPoint):
        zp = np.asarray(q.zeroPoint)
        # Per-channel weights all share zero point 0 in practice; a single value covers the rest.
        zero = int(zp[0]) if np.all(zp == zp[0]) else None
    nonzero = int(np.count_nonzero(values != zero)) if zero is not None else int(np.count_nonzero(values))
    return 1.0 - nonzero / elements


def _guess_mode(model: Any, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                weights: list[WeightInfo], constant: set[int]) -> str:
    graph = model.subgraphs[0]
    activations = {_DTYPES.get(t.type) for i, t in enumerate(graph.tensors or []) if i not in constant}
    kernels = {w.dtype for w in weights}
    io = {t.dtype for t in (*inputs, *outputs)}
    if "int16" in activations and "int8" in kernels:
        return "int16x8"
    if activations & {"int8", "uint8"}:
        return "int8-full" if io <= {"int8", "uint8"} else "int8"
    if "int8" in kernels:
        return "dynamic"
    if "float16" in kernels:
        return "float16"
    return "none"


def read_model(data: bytes, *, chunk_size: int | None = None) -> ModelInfo:
    """Summarise a .tflite file; raise UsageError when the bytes are not a TFLite flatbuffer."""
    schema = _schema()
    if len(data) >= 8 and data[4:8] != b"TFL3":
        raise UsageError("not a TFLite model (the file identifier is not TFL3)")
    try:
        if len(data) < 8:
            raise ValueError("shorter than a flatbuffer header")
        model = schema.ModelT.InitFromPackedBuf(data, 0)
        graph = model.subgraphs[0]
    except Exception as err:  # a cut-off or corrupt flatbuffer fails deep in the generated code with any error
        raise UsageError(f"truncated or not a TFLite flatbuffer ({len(data)} bytes)") from err
    names = _op_names()
    ops: Counter[tuple[str, int]] = Counter()
    for graph_ in model.subgraphs:
        for op in graph_.operators or []:
            code = model.operatorCodes[op.opcodeIndex]
            builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
            name = names.get(builtin, f"OP_{builtin}")
            if name == "CUSTOM":
                custom = code.customCode
                name = f"CUSTOM:{custom.decode() if isinstance(custom, bytes) else custom}"
            ops[(name, int(code.version))] += 1
    tensors = graph.tensors or []
    constant = {i for i, t in enumerate(tensors) if _buffer(model, data, t.buffer)}
    weights = []
    for i in sorted(constant):
        t = tensors[i]
        shape = tuple(int(d) for d in (t.shape if t.shape is not None else []))
        if len(shape) < 2:
            continue
        dtype = _DTYPES.get(t.type, f"type{t.type}")
        elements = int(np.prod(shape))
        encoding = "sparse" if t.sparsity is not None else "dense"
        sparsity = _zero_fraction(t, _buffer(model, data, t.buffer), dtype, elements)
        name = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
        weights.append(WeightInfo(name=name, shape=shape, dtype=dtype, sparsity=sparsity, encoding=encoding))
    inputs = tuple(_spec(tensors[i]) for i in graph.inputs)
    outputs = tuple(_spec(tensors[i]) for i in graph.outputs)
    meta, runtime = None, None
    for entry in model.metadata or []:
        entry_name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        if entry_name == METADATA_NAME:
            try:
                meta = parse_metadata(_buffer(model, data, entry.buffer), data)
            except (ValueError, IndexError) as err:
                log.warning("ignoring unreadable TFLite metadata: %s", err)
        elif entry_name == "min_runtime_version":
            runtime = _buffer(model, data, entry.buffer).rstrip(b"\0").decode("ascii", "replace") or None
    artifact, _ = split(data, chunk_size) if chunk_size else split(data)
    params, macs = _compute(model, names, constant)
    return ModelInfo(
        size=len(data), wire_size=artifact.wire_size, chunks=len(artifact.chunks),
        operators=tuple(OperatorInfo(n, v, c) for (n, v), c in sorted(ops.items())),
        inputs=inputs, outputs=outputs, weights=tuple(weights),
        quantization=_guess_mode(model, inputs, outputs, weights, constant),
        metadata=meta, min_runtime_version=runtime, float_ops=_float_ops(model, names, constant),
        params=params, macs=sum(macs.values()), macs_by_op=tuple(sorted(macs.items())),
    )


def _dims(tensor: Any) -> list[int]:
    # A dynamic dimension (the batch, -1 in the signature) counts once: one invoke of one sample.
    return [max(1, int(d)) for d in (tensor.shape if tensor.shape is not None else [])]


_BIAS_OPS = {"CONV_2D": 2, "DEPTHWISE_CONV_2D": 2, "FULLY_CONNECTED": 2, "CONV_3D": 2, "TRANSPOSE_CONV": 3}


def _compute(model: Any, names: dict[int, str], constant: set[int]) -> tuple[int, dict[str, int]]:
    """Parameters, and the multiply-accumulates per operator kind, of the main subgraph.

    MACs come from shapes: CONV_2D and CONV_3D cost (output elements) x (kernel elements per output
    channel), DEPTHWISE_CONV_2D (output elements) x kh x kw, FULLY_CONNECTED (output elements) x
    (input features), TRANSPOSE_CONV (input elements) x kh x kw x output channels. Other operators
    (pooling, element-wise) are not counted. Parameters are the elements of every constant tensor
    except integer index/shape constants; int32 biases of the ops above count.
    """
    graph = model.subgraphs[0]
    tensors = graph.tensors or []
    macs: dict[str, int] = {}
    biases: set[int] = set()
    for op in graph.operators or []:
        code = model.operatorCodes[op.opcodeIndex]
        name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "")
        ins = [int(i) for i in (op.inputs if op.inputs is not None else [])]
        outs = [int(i) for i in (op.outputs if op.outputs is not None else [])]
        if name in _BIAS_OPS and len(ins) > _BIAS_OPS[name] and ins[_BIAS_OPS[name]] >= 0:
            biases.add(ins[_BIAS_OPS[name]])
        if not outs or len(ins) < 2:
            continue
        out = _dims(tensors[outs[0]])
        if name == "TRANSPOSE_CONV":
            if len(ins) < 3:
                continue
            w, x = _dims(tensors[ins[1]]), _dims(tensors[ins[2]])
            count = int(np.prod(x)) * int(np.prod(w[:-1]))
        else:
            w = _dims(tensors[ins[1]])
            if name == "CONV_2D":
                count = int(np.prod(out)) * int(np.prod(w[1:]))
            elif name == "CONV_3D":
                count = int(np.prod(out)) * int(np.prod(w[:-1]))
            elif name == "DEPTHWISE_CONV_2D":
                count = int(np.prod(out)) * int(np.prod(w[1:3]))
            elif name == "FULLY_CONNECTED":
                count = int(np.prod(out)) * w[-1]
            else:
                continue
        macs[name] = macs.get(name, 0) + count
    params = 0
    for i in constant:
        t = tensors[i]
        dtype = _DTYPES.get(t.type, "")
        if dtype in ("int32", "int64", "bool", "string") and i not in biases:
            continue
        params += int(np.prod(t.shape)) if t.shape is not None and len(t.shape) else 1
    return params, macs


_BOUNDARY_OPS = {"QUANTIZE", "DEQUANTIZE"}


def _float_ops(model: Any, names: dict[int, str], constant: set[int]) -> tuple[str, ...]:
    """Operators (other than quantize/dequantize at the edges) that compute on float tensors."""
    graph = model.subgraphs[0]
    tensors = graph.tensors or []
    found = []
    for op in graph.operators or []:
        code = model.operatorCodes[op.opcodeIndex]
        name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
        if name in _BOUNDARY_OPS:
            continue
        used = [i for i in [*(op.inputs if op.inputs is not None else []), *(op.outputs if op.outputs is not None else [])]
                if i >= 0 and i not in constant]
        if any(tensors[i].type in (0, 1, 10) for i in used):
            found.append(name)
    return tuple(dict.fromkeys(found))


@dataclass(frozen=True)
class OutputSource:
    """Where a model output's values come from, for golden tolerances (converter/bundle/golden.py).

    `quantized` is the last quantized tensor on the way to the output: the output itself when it is
    quantized, or the input of the DEQUANTIZE that produces a float output. `op` is the operator that
    writes `quantized` and `op_input` that operator's first input, when it is quantized too.
    """

    output: TensorSpec
    quantized: TensorSpec | None = None
    op: str | None = None
    op_input: TensorSpec | None = None


def output_sources(data: bytes) -> tuple[OutputSource, ...]:
    """For each output of the main subgraph, the quantized tensor behind it and the op that writes it."""
    schema = _schema()
    try:
        model = schema.ModelT.InitFromPackedBuf(data, 0)
        graph = model.subgraphs[0]
    except Exception as err:  # a corrupt flatbuffer fails deep in the generated code with any error
        raise UsageError(f"truncated or not a TFLite flatbuffer ({len(data)} bytes)") from err
    names = _op_names()
    tensors = graph.tensors or []
    writer: dict[int, Any] = {}
    for op in graph.operators or []:
        for i in op.outputs if op.outputs is not None else []:
            writer[int(i)] = op

    def op_name(op: Any) -> str:
        code = model.operatorCodes[op.opcodeIndex]
        return names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")

    def first_input(op: Any) -> int | None:
        ins = [int(i) for i in (op.inputs if op.inputs is not None else []) if i >= 0]
        return ins[0] if ins else None

    sources = []
    for out in graph.outputs if graph.outputs is not None else []:
        spec = _spec(tensors[out])
        index: int | None = int(out)
        if spec.quantization is None and index in writer and op_name(writer[index]) == "DEQUANTIZE":
            index = first_input(writer[index])
        quantized = _spec(tensors[index]) if index is not None else None
        if quantized is None or quantized.quantization is None:
            sources.append(OutputSource(output=spec))
            continue
        op = writer.get(index)  # type: ignore[arg-type]
        op_input = None
        if op is not None and (i := first_input(op)) is not None:
            candidate = _spec(tensors[i])
            op_input = candidate if candidate.quantization is not None else None
        sources.append(OutputSource(output=spec, quantized=quantized, op=op_name(op) if op is not None else None,
                                    op_input=op_input))
    return tuple(sources)
