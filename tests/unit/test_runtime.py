"""Interpreter backends: auto order, each backend on a real model, no TensorFlow unless chosen."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.errors import RuntimeBackendError
from edgefleet.runtime import load_model, resolve_backend

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
import numpy as np
from edgefleet.runtime import load_model, resolve_backend
backend = sys.argv[2]
m = load_model(sys.argv[1], backend)
y = m.run([np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8)])[0]
print(json.dumps({"backend": m.backend, "y": y.tolist(), "tf": "tensorflow" in sys.modules,
                  "modules": sorted(k for k in sys.modules if k.split(".")[0] in ("tensorflow", "keras"))[:5]}))
"""


def _probe(model: Path, backend: str) -> dict[str, Any]:
    """Load and run a model in a fresh process (tflite_runtime must never share a process with TF)."""
    res = subprocess.run([sys.executable, "-c", PROBE, str(model), backend], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_auto_prefers_litert_and_never_imports_tensorflow(zoo: Any) -> None:
    out = _probe(zoo("dense_f32"), "auto")
    assert out["backend"] == "litert"
    assert out["tf"] is False and out["modules"] == []


def test_all_backends_agree(zoo: Any) -> None:
    results = {b: _probe(zoo("dense_f32"), b) for b in ("litert", "tflite", "tensorflow")}
    assert {b: r["backend"] for b, r in results.items()} == {"litert": "litert", "tflite": "tflite",
                                                             "tensorflow": "tensorflow"}
    assert results["tflite"]["tf"] is False
    assert results["tensorflow"]["tf"] is True  # only the explicit fallback pays for TensorFlow
    ref = np.array(results["litert"]["y"])
    for r in results.values():
        np.testing.assert_allclose(np.array(r["y"]), ref, atol=1e-5)


def test_unknown_backend() -> None:
    with pytest.raises(RuntimeBackendError, match="unknown backend 'gpu'"):
        resolve_backend("gpu")


def test_garbage_model_is_a_clear_error() -> None:
    with pytest.raises(RuntimeBackendError, match="litert cannot load the model"):
        load_model(b"\x00" * 64, "litert")


def test_dynamic_batch_and_shape_check(zoo: Any) -> None:
    m = load_model(zoo("dense_f32"), "litert")
    assert m.inputs[0].shape == (-1, 8)
    assert m.run([np.zeros((3, 8), np.float32)])[0].shape == (3, 4)
    with pytest.raises(RuntimeBackendError, match=r"shape \[1, 5\] does not fit \[-1, 8\]"):
        m.run([np.zeros((1, 5), np.float32)])


def test_without_xnnpack(zoo: Any) -> None:
    a = load_model(zoo("dense_f32"), "litert", use_xnnpack=True)
    b = load_model(zoo("dense_f32"), "litert", use_xnnpack=False)
    x = np.ones((1, 8), np.float32)
    np.testing.assert_allclose(a.run([x])[0], b.run([x])[0], atol=1e-5)
