"""Writing bundles: golden vectors from the converted model, chunked artifacts, a signed manifest.

A bundle is written into a temporary directory beside its destination and renamed into place at the
end, so a failed or interrupted run leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgefleet.bundle import GOLDEN_FILE, MANIFEST_FILE, MODEL_FILE, REPORT_FILE, dump_golden
from edgefleet.converter.bundle import golden
from edgefleet.converter.bundle.reference import REFERENCE_SAMPLES, build_reference
from edgefleet.converter.tflite.interpreters import Interpreter
from edgefleet.drift import REFERENCE_ARRAY, DriftReference, reference_array
from edgefleet.errors import EdgefleetError, UsageError
from edgefleet.protocol import (
    DEFAULT_CHUNK_SIZE,
    DEPLOYMENT_SCHEMA,
    Deployment,
    ModelSpec,
    Policy,
    Postprocessing,
    Preprocessing,
    SigningKey,
    TensorSpec,
    Tolerance,
    canonical_json,
    split,
)
from edgefleet.protocol.documents import new_deployment_id
from edgefleet.runtime import LoadedModel, load_model
from edgefleet.tensors import distinct_names, label_binding_problem, labelled_output, signature_names

DEFAULT_EXPIRY_S = 90 * 24 * 3600


class BundleError(EdgefleetError):
    """A bundle cannot be written (bad inputs, destination taken, model does not run)."""


@dataclass
class BundleSpec:
    """Everything a bundle carries besides the model bytes."""

    name: str
    version: int
    golden_inputs: list[NDArray[Any]]
    """Candidate golden inputs, stacked over samples (axis 0 of each input)."""
    golden_samples: int | None = None
    """How many of the candidates to keep as golden vectors (converter/bundle/golden.py chooses them); None: all."""
    seed: int = 0
    """Seed of the random part of that choice."""
    labels: Sequence[str] | None = None
    labels_output: str | None = None
    """The output the labels name classes of; None: the first whose last dimension fits them."""
    top_k: int = 5
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    policy: Policy = field(default_factory=Policy)
    chunk_size: int = DEFAULT_CHUNK_SIZE
    expires_in_s: int = DEFAULT_EXPIRY_S
    target: str | None = None
    """``device:ID`` or ``group:NAME`` signed into the manifest, so `push` can publish it without the key."""
    reference_inputs: list[NDArray[Any]] | None = None
    """Calibration samples stacked like `golden_inputs`, for the drift reference (converter/bundle/reference.py)
    carried in golden.npz; None: the bundle carries none and its boards watch no drift."""
    reference_source: dict[str, Any] = field(default_factory=dict)
    """Where those samples came from, recorded in the reference."""


def label_problem(model: LoadedModel, labels: Sequence[str], output: str | None) -> str | None:
    """Why `labels` do not fit the output they are bound to (`output`, or the default one), or None.

    Outputs are named as the agent names them (edgefleet.tensors.distinct_names), so the name given
    here is the one the agent resolves on the board.
    """
    names = distinct_names(model.outputs, signature_names(model.interpreter, "outputs"))
    return label_binding_problem(model.outputs, names, labels, output)


def run_samples(model: LoadedModel, inputs: list[NDArray[Any]]) -> list[NDArray[Any]]:
    """Run the model once per sample (axis 0 of every input) and stack the outputs the same way."""
    n = len(inputs[0])
    results: list[list[NDArray[Any]]] = [[] for _ in model.outputs]
    for s in range(n):
        outs = model.run([x[s] for x in inputs])
        for j, y in enumerate(outs):
            results[j].append(y)
    return [np.stack(r) for r in results]


def tolerance_for(outputs: Sequence[TensorSpec], golden: Sequence[NDArray[Any]]) -> Tolerance:
    """How far another runtime's outputs may drift from the host's: two quantization steps, or 1e-4 of range."""
    atol = 0.0
    for spec, y in zip(outputs, golden, strict=True):
        if spec.quantization is not None:
            atol = max(atol, 2.0 * spec.quantization.scale)
        elif y.dtype.kind == "f":
            atol = max(atol, 1e-4 * max(1.0, float(np.max(np.abs(y))) if y.size else 1.0))
        else:
            atol = max(atol, 1.0)
    return Tolerance(atol=float(f"{atol:.6g}"), rtol=1e-3)


def build_deployment(model_bytes: bytes, golden_bytes: bytes, spec: BundleSpec, inputs: Sequence[TensorSpec],
                     outputs: Sequence[TensorSpec], tolerance: Tolerance, *, now: int | None = None,
                     tolerances: Sequence[Tolerance] | None = None) -> Deployment:
    """The (unsigned) deployment document for a model and its golden vectors."""
    artifact, _ = split(model_bytes, spec.chunk_size)
    golden, _ = split(golden_bytes, spec.chunk_size)
    issued = int(time.time()) if now is None else now
    labels = tuple(spec.labels) if spec.labels is not None else None
    return Deployment(
        schema=DEPLOYMENT_SCHEMA,
        deployment_id=new_deployment_id(spec.name, spec.version),
        issued_at=issued,
        expires_at=issued + spec.expires_in_s,
        model=ModelSpec(
            name=spec.name, version=spec.version, artifact=artifact, golden=golden,
            inputs=tuple(inputs), outputs=tuple(outputs), tolerance=tolerance,
            tolerances=tuple(tolerances) if tolerances is not None else None,
            preprocessing=Preprocessing(
                mean=tuple(float(v) for v in spec.mean) if spec.mean is not None else None,
                std=tuple(float(v) for v in spec.std) if spec.std is not None else None,
            ),
            postprocessing=Postprocessing(labels=labels, top_k=spec.top_k, output=spec.labels_output),
            metrics=dict(spec.metrics),
        ),
        policy=spec.policy,
        target=spec.target,
    )


def write_bundle(out: str | os.PathLike[str], model_bytes: bytes, spec: BundleSpec, *,
                 key: SigningKey | None = None, overwrite: bool = False,
                 interpreters: Sequence[Interpreter] = ()) -> Deployment:
    """Run the golden inputs through the model, then write the bundle atomically; return its document.

    The candidate inputs also run on each of `interpreters` in its own process (converter/bundle/golden.py):
    a model one of them cannot run, or that disagrees beyond the tolerance, is refused (GoldenCheckError,
    exit 2) before anything is written. `edgectl convert` and `edgectl package` pass every interpreter
    installed on the host; without any, tolerances of float outputs fall back to their floor.
    """
    dest = Path(out)
    if dest.exists() and not overwrite:
        raise BundleError(f"{dest} already exists (use --force to replace it)")
    try:
        model = load_model(model_bytes, "auto")
    except EdgefleetError as err:
        raise BundleError(f"the model does not load: {err}") from err
    if len(spec.golden_inputs) != len(model.inputs):
        raise BundleError(f"golden inputs: model takes {len(model.inputs)} inputs, got {len(spec.golden_inputs)}")
    if spec.labels_output is not None and not spec.labels:
        raise UsageError("--labels-output: needs --labels (or labels in the model's metadata)")
    problem = label_problem(model, spec.labels, spec.labels_output) if spec.labels else None
    if problem is not None:
        raise UsageError(f"--labels: {problem}")  # before anything is written: exit 2
    golden_inputs = [np.ascontiguousarray(x) if s.dtype == "string" else np.ascontiguousarray(x, dtype=np.dtype(s.dtype))
                     for x, s in zip(spec.golden_inputs, model.inputs, strict=True)]
    try:
        reference = run_samples(model, golden_inputs)
    except Exception as err:  # the interpreter reports a failing invoke as RuntimeError/ValueError
        raise BundleError(f"the model fails on the golden inputs: {err}") from err
    checked = golden.plan(model_bytes, model.outputs, golden_inputs, reference, interpreters,
                          samples=spec.golden_samples, seed=spec.seed)
    chosen = np.asarray(checked.indices, dtype=np.intp)
    drift = drift_reference(model, spec)
    golden_bytes = dump_golden([x[chosen] for x in golden_inputs], [y[chosen] for y in reference],
                               {REFERENCE_ARRAY: reference_array(drift)} if drift is not None else None)
    tolerance, tolerances = golden.manifest_tolerances(checked.tolerances)
    deployment = build_deployment(model_bytes, golden_bytes, spec, model.inputs, model.outputs, tolerance,
                                  tolerances=tolerances)
    manifest = key.sign(deployment.to_dict()) if key else deployment.to_dict()
    deployment = Deployment.from_dict(manifest)
    files = {
        MODEL_FILE: model_bytes,
        GOLDEN_FILE: golden_bytes,
        MANIFEST_FILE: canonical_json(manifest),
        REPORT_FILE: canonical_json({**spec.report, "golden_check": checked.to_dict(),
                                     "drift_reference": drift_summary(drift)}),
    }
    write_directory_atomically(dest, files, overwrite=overwrite)
    return deployment


def drift_reference(model: LoadedModel, spec: BundleSpec) -> DriftReference | None:
    """The drift reference of `spec.reference_inputs` (at most REFERENCE_SAMPLES of them), or None."""
    if not spec.reference_inputs:
        return None
    if len(spec.reference_inputs) != len(model.inputs):
        raise BundleError(f"calibration data: model takes {len(model.inputs)} inputs, got {len(spec.reference_inputs)}")
    inputs = [np.ascontiguousarray(x[:REFERENCE_SAMPLES], dtype=np.dtype(s.dtype))
              for x, s in zip(spec.reference_inputs, model.inputs, strict=True)]
    try:
        outputs = run_samples(model, inputs)
    except Exception as err:  # the interpreter reports a failing invoke as RuntimeError/ValueError
        raise BundleError(f"the model fails on the calibration data: {err}") from err
    names = distinct_names(model.outputs, signature_names(model.interpreter, "outputs"))
    labelled = labelled_output(model.outputs, names, spec.labels, spec.labels_output) if spec.labels else None
    return build_reference(model, inputs, outputs, labelled_output=labelled, source=spec.reference_source)


def drift_summary(ref: DriftReference | None) -> dict[str, Any] | None:
    """The report's `drift_reference` section: what the boards will compare live traffic with."""
    if ref is None:
        return None
    return {"samples": ref.samples, "bytes": len(canonical_json(ref.to_dict())), "source": ref.source,
            "inputs": [{"name": r.name, "layout": r.layout, "channels": r.channels,
                        "mean": [round(v, 4) for v in r.mean[:8]], "std": [round(v, 4) for v in r.std[:8]]}
                       for r in ref.inputs],
            "outputs": [{"name": r.name, "kind": r.kind, "channels": r.channels,
                         **({"top1_freq": list(r.freq[0])} if r.kind == "top1" else {})} for r in ref.outputs]}


def write_directory_atomically(dest: Path, files: dict[str, bytes], *, overwrite: bool = False) -> None:
    """Create `dest` holding `files`, all or nothing: written in a temporary sibling, fsynced, renamed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        if dest.exists():
            if not overwrite:
                raise BundleError(f"{dest} already exists (use --force to replace it)")
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
