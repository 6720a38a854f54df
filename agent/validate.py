"""Validation of a model in a child process (DESIGN.md, "Update lifecycle": Validating).

The parent forks a child from a preloaded fork server, with a time limit and an address-space
limit, and receives the result over a pipe. The child loads the model with the backend and delegate settings the
serving path uses, checks the input/output signature against the document, runs the golden inputs and
compares with the golden outputs, and times the model (and the currently active one, for a fair
baseline). A model that crashes or hangs the interpreter kills only the child.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import resource
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import DeploymentRejected


@dataclass(frozen=True)
class ValidationRequest:
    """What the child is asked to check."""

    model_path: str
    golden_path: str
    deployment: dict[str, Any]
    backend: str = "auto"
    num_threads: int | None = None
    use_xnnpack: bool = True
    latency_runs: int = 50
    baseline_model_path: str | None = None


def _dequantize(y: np.ndarray[Any, Any], spec: dict[str, Any]) -> np.ndarray[Any, Any]:
    q = spec.get("quantization")
    out: np.ndarray[Any, Any] = y.astype(np.float64)
    if q and y.dtype.kind in "iu":
        out = (out - q["zero_point"]) * q["scale"]
    return out


def _signature_problem(kind: str, actual: Sequence[Any], expected: Sequence[dict[str, Any]]) -> str | None:
    if len(actual) != len(expected):
        return f"model has {len(actual)} {kind}, the document says {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if a.dtype != e["dtype"]:
            return f"{kind}[{i}] dtype is {a.dtype}, the document says {e['dtype']}"
        if list(a.shape) != list(e["shape"]):
            return f"{kind}[{i}] shape is {list(a.shape)}, the document says {list(e['shape'])}"
        aq = a.quantization
        eq = e.get("quantization")
        if (aq is None) != (eq is None):
            return f"{kind}[{i}] quantization differs from the document"
        if aq is not None and eq is not None and (
            aq.zero_point != eq["zero_point"] or abs(aq.scale - eq["scale"]) > 1e-6 * abs(eq["scale"])
        ):
            return f"{kind}[{i}] quantization (scale {aq.scale}, zero point {aq.zero_point}) differs from the document"
    return None


def _time_model(model: Any, sample: list[np.ndarray[Any, Any]], runs: int) -> dict[str, float]:
    for _ in range(min(5, runs)):
        model.run(sample)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model.run(sample)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "max_ms": float(ms.max())}


def run_checks(req: ValidationRequest) -> dict[str, Any]:
    """The child's work; returns {"ok": bool, "reason": str, ...figures}."""
    from agent.bundle import load_golden
    from agent.errors import EdgefleetError
    from agent.runtime import load_model

    model_doc = req.deployment["model"]
    try:
        model = load_model(req.model_path, req.backend, num_threads=req.num_threads, use_xnnpack=req.use_xnnpack)
    except EdgefleetError as err:
        return {"ok": False, "reason": f"model does not load: {err}"}
    for kind, actual, expected in (("inputs", model.inputs, model_doc["inputs"]),
                                   ("outputs", model.outputs, model_doc["outputs"])):
        problem = _signature_problem(kind, actual, expected)
        if problem:
            return {"ok": False, "reason": f"signature mismatch: {problem}"}
    try:
        inputs, outputs = load_golden(Path(req.golden_path).read_bytes(), len(model.inputs), len(model.outputs))
    except EdgefleetError as err:
        return {"ok": False, "reason": str(err)}
    tol = model_doc.get("tolerance", {})
    atol, rtol = float(tol.get("atol", 1e-4)), float(tol.get("rtol", 1e-3))
    worst = 0.0
    for s in range(len(inputs[0])):
        sample = [x[s] for x in inputs]
        try:
            got = model.run(sample)
        except Exception as err:  # the interpreter raises RuntimeError with its own message
            return {"ok": False, "reason": f"golden sample {s}: invoke failed: {str(err).splitlines()[0]}"}
        for j, (g, want) in enumerate(zip(got, outputs, strict=True)):
            spec = model_doc["outputs"][j]
            if g.shape != want[s].shape:
                return {"ok": False, "reason": f"golden sample {s}: output {j} shape {list(g.shape)} "
                                               f"!= {list(want[s].shape)}"}
            a, b = _dequantize(g, spec), _dequantize(want[s], spec)
            err_abs = np.abs(a - b)
            if not np.all(np.isfinite(a)):
                return {"ok": False, "reason": f"golden sample {s}: output {j} is not finite"}
            excess = err_abs - (atol + rtol * np.abs(b))
            worst = max(worst, float(err_abs.max()) if err_abs.size else 0.0)
            if np.any(excess > 0):
                return {"ok": False, "reason": f"golden sample {s}: output {j} differs by {float(err_abs.max()):.6g}"
                                               f" (tolerance {atol:g} + {rtol:g}*|y|)",
                        "max_abs_error": float(err_abs.max())}
    sample = [x[0] for x in inputs]
    result: dict[str, Any] = {"ok": True, "reason": "ok", "backend": model.backend, "samples": len(inputs[0]),
                              "max_abs_error": worst, **_time_model(model, sample, req.latency_runs)}
    if req.baseline_model_path:
        try:
            base = load_model(req.baseline_model_path, req.backend, num_threads=req.num_threads,
                              use_xnnpack=req.use_xnnpack)
            figures = _time_model(base, sample, req.latency_runs)
            result["baseline_p50_ms"] = figures["p50_ms"]
            result["baseline_p95_ms"] = figures["p95_ms"]
        except Exception as err:  # the baseline is informative; its failure must not reject the new model
            result["baseline_error"] = str(err).splitlines()[0] if str(err) else type(err).__name__
    return result


_context: Any = None
_context_lock = threading.Lock()


def _forkserver() -> Any:
    """The multiprocessing context whose server has numpy and the interpreters imported once.

    Every validation is then a fork of that server (milliseconds), not a new Python that imports
    numpy and an interpreter again (a second or more on a board); the agent itself, which runs
    threads, is never forked.
    """
    global _context
    with _context_lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            preload = ["numpy", "agent.validate", "agent.bundle", "agent.runtime"]
            for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
                if importlib.util.find_spec(module.split(".")[0]) is not None:
                    preload.append(module)
            ctx.set_forkserver_preload(preload)
            _context = ctx
        return _context


def _die_with_the_agent() -> None:
    """A validation that hangs must not outlive an agent that was killed (outside systemd nothing else
    would reap it). The fork server stays up while any of its children holds its "alive" pipe, so this
    child lets go of it, and asks the kernel to kill it when the fork server (its parent) goes, which
    happens as soon as the agent is gone."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        server._forkserver_alive_fd = None  # type: ignore[attr-defined]
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the systemd unit's KillMode=mixed still cleans up


def _child(conn: Any, request: dict[str, Any], memory_mb: int) -> None:
    _die_with_the_agent()
    limit = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        result = run_checks(ValidationRequest(**request))
    except MemoryError:
        result = {"ok": False, "reason": f"model needs more than the {memory_mb} MB validation memory limit"}
    except Exception as err:  # anything unexpected is still a rejection with a reason, never a crash
        result = {"ok": False, "reason": f"validation error: {type(err).__name__}: {err}"}
    conn.send(result)
    conn.close()


def validate(req: ValidationRequest, *, timeout_s: float, memory_mb: int,
             heartbeat: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the checks in a child process; return its figures or raise DeploymentRejected with the reason."""
    ctx = _forkserver()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, req.__dict__, memory_mb), name="edge-agent-validate", daemon=True)
    proc.start()
    send.close()
    deadline = time.monotonic() + timeout_s
    result: dict[str, Any] | None = None
    try:
        while result is None:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise DeploymentRejected(f"validation timed out after {timeout_s:g}s (model hangs or is too slow)",
                                         step="VALIDATING")
            if receive.poll(min(1.0, left)):
                try:
                    result = receive.recv()
                except (EOFError, OSError):
                    break  # the child died without answering
            elif not proc.is_alive():
                if receive.poll(0):
                    continue  # it answered and exited between the poll above and this check (a busy parent)
                break
            elif heartbeat is not None:
                heartbeat()
    finally:
        receive.close()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if result is None:
        code = proc.exitcode
        if code is not None and code < 0:
            sig = signal.Signals(-code).name
            raise DeploymentRejected(f"validation child crashed with {sig} (model crashes the interpreter)",
                                     step="VALIDATING")
        raise DeploymentRejected(f"validation child exited with code {code} without an answer", step="VALIDATING")
    if not result.get("ok"):
        raise DeploymentRejected(str(result.get("reason", "validation failed")), step="VALIDATING",
                                 details={k: v for k, v in result.items() if k not in ("ok", "reason")})
    return result
