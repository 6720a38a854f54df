"""Sample data for conversion: loading .npz files, checking them against the model, splitting them.

An ``.npz`` holds ``x`` (what the model takes, already normalised, samples on axis 0) and optionally
``y`` (integer class labels). One file is split with a fixed seed, stratified by label, into fine-tune,
calibration and validation sets; or each set comes from its own file.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefleet.errors import UsageError
from edgefleet.protocol import TensorSpec


@dataclass(frozen=True)
class Dataset:
    """Samples `x` and optional integer labels `y`, with where they came from (for messages)."""

    x: NDArray[Any]
    y: NDArray[Any] | None
    source: str

    def __len__(self) -> int:
        return len(self.x)

    def take(self, n: int) -> Dataset:
        """The first `n` samples."""
        return replace(self, x=self.x[:n], y=None if self.y is None else self.y[:n])


@dataclass(frozen=True)
class Splits:
    """The three sets a conversion uses; any may be missing."""

    fine_tune: Dataset | None = None
    calibration: Dataset | None = None
    validation: Dataset | None = None
    held_out: bool = True
    """False when the validation set is a split of --data, which the float model may have been trained on."""

    def sizes(self) -> dict[str, int]:
        """Sample counts for the report."""
        return {name: len(ds) if ds is not None else 0 for name, ds in
                (("fine_tune", self.fine_tune), ("calibration", self.calibration), ("validation", self.validation))}


def load_npz(path: str | os.PathLike[str], option: str = "--data") -> Dataset:
    """Read `x` and optional `y` from an .npz; raise UsageError naming the file and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{option} {p}: no such file")
    try:
        with np.load(p, allow_pickle=False) as npz:
            if "x" not in npz.files:
                raise UsageError(f"{option} {p}: no array named 'x' (found: {', '.join(npz.files) or 'none'})")
            x = npz["x"]
            y = npz["y"] if "y" in npz.files else None
    except UsageError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise UsageError(f"{option} {p}: not a readable .npz file ({err})") from err
    if x.ndim < 1 or len(x) == 0:
        raise UsageError(f"{option} {p}: 'x' holds no samples")
    if y is not None:
        if y.dtype.kind not in "iu":
            raise UsageError(f"{option} {p}: 'y' must hold integer class labels, not {y.dtype}")
        if y.ndim != 1 or len(y) != len(x):
            raise UsageError(f"{option} {p}: 'y' has shape {list(y.shape)}; expected ({len(x)},), one label per sample")
    return Dataset(x=x, y=None if y is None else y.astype(np.int64), source=f"{option} {p}")


def check_inputs(ds: Dataset, spec: TensorSpec) -> Dataset:
    """Check `ds.x` fits the model input `spec` (batch axis free); return it in a dtype the model takes."""
    want = tuple(spec.shape[1:])
    got = tuple(ds.x.shape[1:])
    if len(want) != len(got) or any(w not in (-1, g) for w, g in zip(want, got, strict=True)):
        shown = ["N", *("?" if d == -1 else d for d in want)]
        raise UsageError(f"{ds.source}: x has shape {list(ds.x.shape)}, the model input {spec.name!r} "
                         f"takes [{', '.join(map(str, shown))}]")
    kind = ds.x.dtype.kind
    if spec.dtype.startswith("float"):
        if kind != "f":
            raise UsageError(f"{ds.source}: x is {ds.x.dtype}, the model input takes {spec.dtype} "
                             "(convert and normalise the samples first)")
        x = ds.x.astype(spec.dtype, copy=False)
    elif kind == "f" and spec.quantization is not None:
        x = ds.x.astype(np.float32, copy=False)  # quantized with the input's scale and zero point later
    elif ds.x.dtype == np.dtype(spec.dtype):
        x = ds.x
    else:
        raise UsageError(f"{ds.source}: x is {ds.x.dtype}, the model input takes {spec.dtype}")
    if kind == "f" and not np.all(np.isfinite(x)):
        raise UsageError(f"{ds.source}: x contains NaN or infinite values")
    return replace(ds, x=x)


def check_labels(ds: Dataset, classes: int | None) -> None:
    """Raise UsageError unless every label is a class index of the model's output."""
    if ds.y is None:
        return
    if classes is None or classes < 2:
        raise UsageError(f"{ds.source}: has labels 'y' but the model output has no class axis")
    low, high = int(ds.y.min()), int(ds.y.max())
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        raise UsageError(f"{ds.source}: label {bad} is out of range; the model has {classes} classes (0..{classes - 1})")


def split(ds: Dataset, *, seed: int = 0, validation: float = 0.2, calibration: float = 0.2) -> Splits:
    """Split one data set into fine-tune / calibration / validation, stratified by label when there are labels."""
    if len(ds) < 3:
        raise UsageError(f"{ds.source}: {len(ds)} samples are too few to split; need at least 3")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(ds.y == c) for c in np.unique(ds.y)] if ds.y is not None else [np.arange(len(ds))]
    parts: dict[str, list[NDArray[Any]]] = {"val": [], "cal": [], "fit": []}
    for idx in groups:
        idx = rng.permutation(idx)
        n_val = int(round(len(idx) * validation))
        n_cal = int(round(len(idx) * calibration))
        parts["val"].append(idx[:n_val])
        parts["cal"].append(idx[n_val:n_val + n_cal])
        parts["fit"].append(idx[n_val + n_cal:])

    def subset(key: str, role: str) -> Dataset | None:
        idx = rng.permutation(np.concatenate(parts[key]))
        if len(idx) == 0:
            return None
        return Dataset(x=ds.x[idx], y=None if ds.y is None else ds.y[idx], source=f"{ds.source} ({role} split)")

    return Splits(fine_tune=subset("fit", "fine-tune"), calibration=subset("cal", "calibration"),
                  validation=subset("val", "validation"), held_out=False)


def row_digests(x: NDArray[Any]) -> set[bytes]:
    """A digest of every sample's bytes (dtype, shape and values), to find exact duplicates across sets."""
    x = np.ascontiguousarray(x)
    head = f"{x.dtype.str}{x.shape[1:]}".encode()
    return {hashlib.blake2b(head + x[i].tobytes(), digest_size=16).digest() for i in range(len(x))}


def overlap(evaluation: Dataset, others: Sequence[Dataset | None]) -> int:
    """How many evaluation samples also appear, byte for byte, in any of `others` (fine-tune, calibration).

    Compare sets after `check_inputs`, which casts every set to the input's dtype, so that the same
    values stored as float64 in one file and float32 in another still match.
    """
    seen: set[bytes] = set()
    for ds in others:
        if ds is not None:
            seen |= row_digests(ds.x)
    if not seen:
        return 0
    x = np.ascontiguousarray(evaluation.x)
    head = f"{x.dtype.str}{x.shape[1:]}".encode()
    return sum(hashlib.blake2b(head + x[i].tobytes(), digest_size=16).digest() in seen for i in range(len(x)))


def quantize_input(x: NDArray[Any], spec: TensorSpec) -> NDArray[Any]:
    """Samples as the model input takes them: float cast, or quantized with the input's scale/zero point."""
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return x.astype(dtype, copy=False)
    if x.dtype.kind != "f":
        return x.astype(dtype, copy=False)
    if spec.quantization is None:
        raise UsageError(f"input {spec.name!r} is {spec.dtype} without quantization parameters; "
                         "give integer samples")
    info = np.iinfo(dtype)
    q = np.round(x / spec.quantization.scale + spec.quantization.zero_point)
    out: NDArray[Any] = np.clip(q, info.min, info.max).astype(dtype)
    return out


def dequantize_output(y: NDArray[Any], spec: TensorSpec) -> NDArray[Any]:
    """Real values of an output tensor (integer outputs mapped back with their scale/zero point)."""
    if spec.quantization is not None and np.dtype(spec.dtype).kind in "iu":
        return (y.astype(np.float32) - spec.quantization.zero_point) * spec.quantization.scale
    return y.astype(np.float32, copy=False)


def random_inputs(specs: Sequence[TensorSpec], samples: int, seed: int = 0) -> list[NDArray[Any]]:
    """Random golden inputs, one invoke's tensor per sample: uniform over each integer dtype, normal for floats."""
    rng = np.random.default_rng(seed)
    out = []
    for s in specs:
        shape = tuple(1 if d == -1 else d for d in s.shape)
        dtype = np.dtype(s.dtype)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            out.append(rng.integers(info.min, info.max, size=(samples, *shape), endpoint=True).astype(dtype))
        elif dtype.kind == "b":
            out.append(rng.integers(0, 1, size=(samples, *shape), endpoint=True).astype(bool))
        else:
            out.append(rng.normal(size=(samples, *shape)).astype(dtype))
    return out


def load_labels(path: str | os.PathLike[str], classes: int | None) -> tuple[str, ...]:
    """Class names, one per line; their count must match the model's classes."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise UsageError(f"--labels {p}: no such file") from err
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"--labels {p}: cannot read it as UTF-8 text ({err})") from err
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not labels:
        raise UsageError(f"--labels {p}: no labels in the file")
    if classes is not None and len(labels) != classes:
        raise UsageError(f"--labels {p}: {len(labels)} labels, the model has {classes} output classes")
    return labels


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """A scalar or comma-separated per-channel list of floats."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise UsageError(f"{option}: expected a number or comma-separated numbers, got {text!r}") from err
    if not all(np.isfinite(values)):
        raise UsageError(f"{option}: values must be finite")
    return values


def check_normalisation(mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
                        spec: TensorSpec) -> None:
    """Mean/std must be a scalar or one value per channel (last axis) of the input."""
    channels = spec.shape[-1] if spec.shape else 1
    for option, values in (("--input-mean", mean), ("--input-std", std)):
        if values is None:
            continue
        if len(values) not in (1, channels):
            raise UsageError(f"{option}: {len(values)} values; give one, or one per channel ({channels})")
    if std is not None and any(v == 0 for v in std):
        raise UsageError("--input-std: must not contain 0")


def classes_of(spec: TensorSpec) -> int | None:
    """Number of classes of a classifier output (last axis), or None when it has none."""
    if len(spec.shape) >= 2 and spec.shape[-1] > 1:
        return int(spec.shape[-1])
    return None
