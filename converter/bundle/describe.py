"""What `edgectl inspect` and `edgectl diff` show about a .tflite file or a bundle, as one JSON-ready dict."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edgefleet.bundle import MODEL_FILE, Bundle, load_golden
from edgefleet.converter.tflite.info import read_model, tensor_dict
from edgefleet.errors import ProtocolError, UsageError
from edgefleet.protocol import Keyring


def describe_tflite(path: Path) -> dict[str, Any]:
    """Everything `inspect` shows about a model file."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UsageError(f"{path}: {err.strerror}") from err
    try:
        info = read_model(data)
    except UsageError as err:
        raise UsageError(f"{path}: {err}") from err
    return {"path": str(path), "kind": "tflite", "model": info.to_dict()}


def describe_bundle(path: Path, pubkey: str | None = None) -> dict[str, Any]:
    """Everything `inspect` shows about a bundle; raises ProtocolError/SignatureError when it is not intact."""
    keyring = Keyring.from_files([pubkey]) if pubkey else None
    try:
        bundle = Bundle.load(path, keyring=keyring)
    except ProtocolError as err:
        raise type(err)(f"{path}: {err}") from err
    spec = bundle.deployment.model
    info = read_model(bundle.model, chunk_size=spec.artifact.chunk_size)
    for kind, ours, theirs in (("inputs", info.inputs, spec.inputs), ("outputs", info.outputs, spec.outputs)):
        got = [(t.dtype, tuple(t.shape)) for t in ours]
        want = [(t.dtype, tuple(t.shape)) for t in theirs]
        if got != want:
            raise ProtocolError(f"{path}: the model's {kind} {got} differ from the manifest's {want} (altered bundle?)")
    inputs, _ = load_golden(bundle.golden, len(spec.inputs), len(spec.outputs))
    dep = bundle.deployment
    return {
        "path": str(path), "kind": "bundle",
        "model": info.to_dict(),
        "manifest": {
            "name": spec.name, "version": spec.version, "deployment_id": dep.deployment_id,
            "issued_at": dep.issued_at, "expires_at": dep.expires_at, "expired": dep.expires_at <= time.time(),
            "chunk_size": spec.artifact.chunk_size, "chunks": len(spec.artifact.chunks),
            "wire_bytes": spec.artifact.wire_size, "golden_samples": int(len(inputs[0])),
            "tolerance": {"atol": spec.tolerance.atol, "rtol": spec.tolerance.rtol},
            "inputs": [tensor_dict(t) for t in spec.inputs], "outputs": [tensor_dict(t) for t in spec.outputs],
            "preprocessing": {"mean": list(spec.preprocessing.mean) if spec.preprocessing.mean else None,
                              "std": list(spec.preprocessing.std) if spec.preprocessing.std else None},
            "postprocessing": {"labels": list(spec.postprocessing.labels) if spec.postprocessing.labels else None,
                               "top_k": spec.postprocessing.top_k},
            "metrics": dict(spec.metrics),
            "policy": {k: v for k, v in vars(dep.policy).items()},
        },
        "files": {"model.tflite": "ok", "golden.npz": "ok", "report.json": "ok" if bundle.report is not None else "missing"},
        "signature": {
            "signed": dep.signature is not None, "key_id": dep.key_id,
            "verified": True if keyring else None,
            "note": None if keyring else ("pass --pubkey to verify" if dep.signature else "unsigned bundle"),
        },
        "report": bundle.report,
    }



def model_file(result: dict[str, Any]) -> Path:
    """The .tflite file a description was made from (a bundle's model file)."""
    path = Path(result["path"])
    return path / MODEL_FILE if result["kind"] == "bundle" else path
