"""Reading a bundle directory (docs/protocol.md §3): the manifest, the model and its golden vectors."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefleet.errors import ProtocolError
from edgefleet.protocol.canonical import parse_json
from edgefleet.protocol.documents import Artifact, Deployment
from edgefleet.protocol.signing import Keyring

MODEL_FILE = "model.tflite"
GOLDEN_FILE = "golden.npz"
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.json"
BUNDLE_FILES = (MANIFEST_FILE, MODEL_FILE, GOLDEN_FILE, REPORT_FILE)


@dataclass(frozen=True)
class Bundle:
    """A bundle read from disk, its files checked against the manifest."""

    path: Path
    deployment: Deployment
    raw_manifest: dict[str, Any]
    model: bytes
    golden: bytes
    report: dict[str, Any] | None

    @classmethod
    def load(cls, path: str | os.PathLike[str], keyring: Keyring | None = None) -> Bundle:
        """Read and check a bundle; raise ProtocolError naming the file that is missing or altered."""
        p = Path(path)
        if not p.is_dir():
            raise ProtocolError(f"{p}: not a bundle directory")
        raw = parse_json(_read(p / MANIFEST_FILE))
        deployment = Deployment.from_dict(raw)
        if keyring:
            keyring.verify(raw)
        model = _read(p / MODEL_FILE)
        golden = _read(p / GOLDEN_FILE)
        check_artifact(MODEL_FILE, model, deployment.model.artifact)
        check_artifact(GOLDEN_FILE, golden, deployment.model.golden)
        report_path = p / REPORT_FILE
        report = parse_json(_read(report_path), limit=64 << 20) if report_path.exists() else None
        return cls(p, deployment, raw, model, golden, report)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise ProtocolError(f"{path}: missing") from err
    except OSError as err:
        raise ProtocolError(f"{path}: {err.strerror}") from err


def read_bundle_files(path: Path) -> tuple[Any, bytes, bytes]:
    """The raw manifest, model and golden bytes of a bundle directory, unchecked (the lifecycle checks)."""
    if not path.is_dir():
        raise ProtocolError(f"{path}: not a bundle directory")
    try:
        raw = parse_json((path / MANIFEST_FILE).read_bytes())
        return raw, (path / MODEL_FILE).read_bytes(), (path / GOLDEN_FILE).read_bytes()
    except OSError as err:
        raise ProtocolError(f"{path}: {err.strerror}: {err.filename}") from err


def check_artifact(label: str, data: bytes, artifact: Artifact) -> None:
    """Raise ProtocolError unless `data` has the artifact's size and SHA-256."""
    if len(data) != artifact.size:
        raise ProtocolError(f"{label}: {len(data)} bytes, the manifest says {artifact.size} (altered bundle?)")
    if hashlib.sha256(data).hexdigest() != artifact.sha256:
        raise ProtocolError(f"{label}: SHA-256 does not match the manifest (altered bundle?)")


def load_golden(data: bytes, n_inputs: int, n_outputs: int) -> tuple[list[NDArray[Any]], list[NDArray[Any]]]:
    """Golden vectors: `input_{i}` and `output_{j}` arrays, each stacked over samples on axis 0."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            inputs = [npz[f"input_{i}"] for i in range(n_inputs)]
            outputs = [npz[f"output_{j}"] for j in range(n_outputs)]
    except KeyError as err:
        raise ProtocolError(f"golden vectors: missing array {err}") from err
    except (ValueError, OSError, EOFError) as err:
        raise ProtocolError(f"golden vectors: not a valid .npz file ({err})") from err
    counts = {len(a) for a in inputs + outputs}
    if len(counts) != 1:
        raise ProtocolError("golden vectors: inputs and outputs have different sample counts")
    return inputs, outputs


def dump_golden(inputs: list[NDArray[Any]], outputs: list[NDArray[Any]],
                extra: dict[str, NDArray[Any]] | None = None) -> bytes:
    """The bytes of a golden.npz holding these stacked samples, and `extra` arrays beside them (the drift
    reference, edgefleet/drift.py), which readers of the goldens ignore."""
    buf = io.BytesIO()
    arrays = {f"input_{i}": a for i, a in enumerate(inputs)}
    arrays.update({f"output_{j}": a for j, a in enumerate(outputs)})
    arrays.update(extra or {})
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()
