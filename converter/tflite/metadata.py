"""TFLite model metadata (the ``TFLITE_METADATA`` flatbuffer of tflite-support), read without its package.

Only what travels with a bundle is read: input normalisation (``NormalizationOptions`` mean/std of the
first input) and class labels (the output's ``TENSOR_AXIS_LABELS`` associated file, which the metadata
writer packs into a zip archive appended to the model file). Field slots follow tflite-support's
``metadata_schema.fbs`` (schema 1.x, file identifier ``M001``).
"""

from __future__ import annotations

import io
import logging
import zipfile
from dataclasses import dataclass
from typing import Any

import flatbuffers
from flatbuffers import number_types
from flatbuffers.table import Table

log = logging.getLogger(__name__)

METADATA_NAME = "TFLITE_METADATA"
FILE_IDENTIFIER = b"M001"

# Slots of the tables we read: ModelMetadata, SubGraphMetadata, TensorMetadata, ProcessUnit,
# NormalizationOptions, AssociatedFile.
_MODEL_SUBGRAPHS = 3
_SUBGRAPH_INPUTS, _SUBGRAPH_OUTPUTS = 2, 3
_TENSOR_PROCESS_UNITS, _TENSOR_FILES = 4, 6
_UNIT_OPTIONS_TYPE, _UNIT_OPTIONS = 0, 1
_NORMALIZATION = 1  # ProcessUnitOptions union member index
_NORM_MEAN, _NORM_STD = 0, 1
_FILE_NAME, _FILE_TYPE = 0, 2
TENSOR_AXIS_LABELS = 2


@dataclass(frozen=True)
class ModelMetadata:
    """What a TFLite model's metadata says about pre- and post-processing."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    labels: tuple[str, ...] | None = None
    labels_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON value for reports."""
        return {"mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None,
                "labels": len(self.labels) if self.labels else None, "labels_file": self.labels_file}


def _slot(table: Table, slot: int) -> int:
    return int(table.Offset(4 + 2 * slot))


def _tables(table: Table, slot: int) -> list[Table]:
    off = _slot(table, slot)
    if not off:
        return []
    start = table.Vector(off)
    return [Table(table.Bytes, table.Indirect(start + 4 * i)) for i in range(table.VectorLen(off))]


def _table(table: Table, slot: int) -> Table | None:
    off = _slot(table, slot)
    return Table(table.Bytes, table.Indirect(table.Pos + off)) if off else None


def _string(table: Table, slot: int) -> str | None:
    off = _slot(table, slot)
    return table.String(table.Pos + off).decode("utf-8", "replace") if off else None


def _floats(table: Table, slot: int) -> tuple[float, ...] | None:
    off = _slot(table, slot)
    if not off:
        return None
    return tuple(float(v) for v in table.GetVectorAsNumpy(number_types.Float32Flags, off))


def _byte(table: Table, slot: int) -> int:
    off = _slot(table, slot)
    return int(table.Get(number_types.Uint8Flags, table.Pos + off)) if off else 0


def parse_metadata(buf: bytes, model_file: bytes | None = None) -> ModelMetadata:
    """Parse a TFLITE_METADATA buffer; `model_file` (the whole .tflite) is where label files are packed."""
    data = bytearray(buf)
    if len(data) < 8 or bytes(data[4:8]) != FILE_IDENTIFIER:
        raise ValueError("not a TFLite metadata buffer (file identifier is not M001)")
    root = Table(data, flatbuffers.encode.Get(flatbuffers.packer.uoffset, data, 0))
    subgraphs = _tables(root, _MODEL_SUBGRAPHS)
    if not subgraphs:
        return ModelMetadata()
    mean = std = None
    for tensor in _tables(subgraphs[0], _SUBGRAPH_INPUTS)[:1]:
        for unit in _tables(tensor, _TENSOR_PROCESS_UNITS):
            if _byte(unit, _UNIT_OPTIONS_TYPE) == _NORMALIZATION:
                options = _table(unit, _UNIT_OPTIONS)
                if options is not None:
                    mean, std = _floats(options, _NORM_MEAN), _floats(options, _NORM_STD)
    labels_file = None
    for tensor in _tables(subgraphs[0], _SUBGRAPH_OUTPUTS)[:1]:
        for f in _tables(tensor, _TENSOR_FILES):
            if _byte(f, _FILE_TYPE) == TENSOR_AXIS_LABELS and labels_file is None:
                labels_file = _string(f, _FILE_NAME)
    labels = _packed_labels(model_file, labels_file) if labels_file and model_file else None
    return ModelMetadata(mean=mean, std=std, labels=labels, labels_file=labels_file)


def _packed_labels(model_file: bytes, name: str) -> tuple[str, ...] | None:
    # The metadata writer appends a zip archive to the flatbuffer; zipfile finds it from the end.
    try:
        with zipfile.ZipFile(io.BytesIO(model_file)) as archive:
            text = archive.read(name).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError) as err:
        log.warning("labels file %s named in the metadata cannot be read: %s", name, err)
        return None
    return tuple(line.strip() for line in text.splitlines() if line.strip())
