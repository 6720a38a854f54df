"""Validation of a model in a child process (docs/architecture.md, "The update lifecycle").

The parent forks a child from a preloaded fork server, with a time limit and an address-space
limit, and receives the result over a pipe. The child opens the files it needs, enters its sandbox
(agent/lifecycle/sandbox.py: cleared environment, private TMPDIR, no network, and where the kernel allows it no
view of the state or credentials directories), loads the model with the backend and delegate settings
the serving path uses, runs the serving path's warm-up on zeros (edgefleet.runtime.warm_up), checks the
input/output signature against the document, runs the golden inputs and compares with the golden
outputs, and times the model (and the currently active one, for a fair baseline). A model that
crashes or hangs the interpreter, on any of these, kills only the child.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import resource
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.errors import DeploymentRejected
from edgefleet.tensors import beyond_tolerance


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
    state_dir: str | None = None
    """Hidden from the child where the kernel allows it (it reads the files above through descriptors)."""


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


def run_checks(req: ValidationRequest, stage: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The child's work; returns {"ok": bool, "reason": str, ...figures}. `stage` hears each step's name
    before it starts, so a timeout or a crash can say where it happened."""
    from edgefleet.bundle import load_golden
    from edgefleet.errors import EdgefleetError
    from edgefleet.runtime import load_model, warm_up

    model_doc = req.deployment["model"]
    stage("model load")
    try:
        model = load_model(req.model_path, req.backend, num_threads=req.num_threads, use_xnnpack=req.use_xnnpack)
    except EdgefleetError as err:
        return {"ok": False, "reason": f"model does not load: {err}"}
    for kind, actual, expected in (("inputs", model.inputs, model_doc["inputs"]),
                                   ("outputs", model.outputs, model_doc["outputs"])):
        problem = _signature_problem(kind, actual, expected)
        if problem:
            return {"ok": False, "reason": f"signature mismatch: {problem}"}
    # exactly what activation does before it swaps the model in, so a model that hangs or crashes
    # there is refused here, under this child's limits, and never on the agent's loop thread
    stage("warm-up on zeros")
    try:
        warm_up(model.interpreter)
    except Exception as err:  # the interpreter raises RuntimeError/ValueError with its own message
        return {"ok": False, "reason": f"warm-up on zeros: invoke failed: {str(err).splitlines()[0] if str(err) else err!r}"}
    stage("golden samples")
    try:
        inputs, outputs = load_golden(Path(req.golden_path).read_bytes(), len(model.inputs), len(model.outputs))
    except EdgefleetError as err:
        return {"ok": False, "reason": str(err)}
    default = model_doc.get("tolerance", {})
    per_output = model_doc.get("tolerances") or [default] * len(outputs)
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
            atol, rtol = float(per_output[j].get("atol", 1e-4)), float(per_output[j].get("rtol", 1e-3))
            worst = max(worst, float(err_abs.max()) if err_abs.size else 0.0)
            if np.any(beyond_tolerance(a, b, atol, rtol)):
                return {"ok": False, "reason": f"golden sample {s}: output {j} differs by {float(err_abs.max()):.6g}"
                                               f" (tolerance {atol:g} + {rtol:g}*|y|)",
                        "max_abs_error": float(err_abs.max())}
    sample = [x[0] for x in inputs]
    stage("latency measurement")
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
            preload = ["numpy", "edgefleet.agent.lifecycle.validate", "edgefleet.bundle", "edgefleet.runtime"]
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


def _child(conn: Any, work: Callable[[dict[str, Any], Callable[[str], None]], dict[str, Any]],
           payload: dict[str, Any], files: dict[str, str], hide: list[str], tmpdir: str, memory_mb: int) -> None:
    _die_with_the_agent()
    try:
        # opened before the sandbox covers the state directory; read through /proc/self/fd from here on
        for key, path in files.items():
            payload[key] = f"/proc/self/fd/{os.open(path, os.O_RDONLY | os.O_CLOEXEC)}"
    except OSError as err:
        conn.send({"ok": False, "reason": f"cannot read {err.filename}: {err.strerror}"})
        conn.close()
        return
    from edgefleet.agent.lifecycle import sandbox

    figures = sandbox.apply(tmpdir, hide)
    limit = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        result = work(payload, lambda name: conn.send(("stage", name)))
    except MemoryError:
        result = {"ok": False, "reason": f"model needs more than the {memory_mb} MB validation memory limit"}
    except Exception as err:  # anything unexpected is still a rejection with a reason, never a crash
        result = {"ok": False, "reason": f"validation error: {type(err).__name__}: {err}"}
    conn.send({**result, **figures})
    conn.close()


def _check_request(payload: dict[str, Any], stage: Callable[[str], None]) -> dict[str, Any]:
    return run_checks(ValidationRequest(**payload), stage)


def validate(req: ValidationRequest, *, timeout_s: float, memory_mb: int,
             heartbeat: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the checks in a child process; return its figures or raise DeploymentRejected with the reason."""
    payload = dict(req.__dict__)
    if req.baseline_model_path is not None and not os.path.isfile(req.baseline_model_path):
        payload["baseline_model_path"] = None  # the baseline is informative: its absence rejects nothing
    files = {key: path for key in ("model_path", "golden_path", "baseline_model_path")
             if (path := payload[key]) is not None}
    hide = [d for d in (req.state_dir, os.environ.get("CREDENTIALS_DIRECTORY")) if d]
    result = run_in_child(_check_request, payload, files=files, hide=hide, timeout_s=timeout_s,
                          memory_mb=memory_mb, heartbeat=heartbeat)
    if not result.get("ok"):
        raise DeploymentRejected(str(result.get("reason", "validation failed")), step="VALIDATING",
                                 details={k: v for k, v in result.items() if k not in ("ok", "reason")})
    return result


def run_in_child(work: Callable[[dict[str, Any], Callable[[str], None]], dict[str, Any]], payload: dict[str, Any], *,
                 files: dict[str, str], hide: list[str], timeout_s: float, memory_mb: int,
                 heartbeat: Callable[[], None] | None = None) -> dict[str, Any]:
    """`work(payload, stage)` in a sandboxed child forked from the fork server; return its answer.

    `work` is a module-level function (the child imports it by name). Each path of `files` is opened
    read-only before the sandbox and replaced in `payload` by a /proc/self/fd path; the directories
    of `hide` are covered where the kernel allows it. A timeout or a death of the child raises
    DeploymentRejected (step VALIDATING) naming the stage it was in.
    """
    ctx = _forkserver()
    receive, send = ctx.Pipe(duplex=False)
    tmpdir = tempfile.mkdtemp(prefix="edge-agent-validate-")
    proc = ctx.Process(target=_child, args=(send, work, payload, files, hide, tmpdir, memory_mb),
                       name="edge-agent-validate", daemon=True)
    stage = "start"
    result: dict[str, Any] | None = None
    try:
        proc.start()
        send.close()
        deadline = time.monotonic() + timeout_s
        while result is None:
            if heartbeat is not None:
                heartbeat()  # paced by the notifier: cheap to call on every message
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise DeploymentRejected(f"validation timed out after {timeout_s:g}s during the {stage} "
                                         "(model hangs or is too slow)", step="VALIDATING", details={"stage": stage})
            if receive.poll(min(1.0, left)):
                try:
                    message = receive.recv()
                except (EOFError, OSError):
                    break  # the child died without answering
                if isinstance(message, tuple):
                    stage = str(message[1])
                else:
                    result = message
            elif not proc.is_alive():
                if receive.poll(0):
                    continue  # it answered and exited between the poll above and this check (a busy parent)
                break
    finally:
        receive.close()
        if proc.pid is not None:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        shutil.rmtree(tmpdir, ignore_errors=True)
    if result is None:
        code = proc.exitcode
        if code is not None and code < 0:
            sig = signal.Signals(-code).name
            raise DeploymentRejected(f"validation child crashed with {sig} during the {stage} (model crashes the "
                                     "interpreter)", step="VALIDATING", details={"stage": stage})
        raise DeploymentRejected(f"validation child exited with code {code} without an answer during the {stage}",
                                 step="VALIDATING", details={"stage": stage})
    return result
