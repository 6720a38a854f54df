"""Running a model on every interpreter installed on the host, each in its own process.

The golden vectors of a bundle must hold on every interpreter a board may run: LiteRT with its default
delegate (XNNPACK, as agents serve by default), LiteRT's builtin kernels without XNNPACK
(`runtime.use_xnnpack = false`), and tflite-runtime with and without its delegate. Their integer kernels
round differently (XNNPACK requantizes in float32, the builtin kernels in fixed point), and an older
tflite-runtime lacks newer op versions, so each is asked directly.

Each backend runs in a child Python (`python -m edgefleet.converter.tflite.interpreters WORKDIR BACKEND`) that imports
numpy and the agent's runtime only: tflite_runtime must never share a process with TensorFlow, and a
model that crashes an interpreter kills only that child. The children of different backends run at
the same time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from numpy.typing import NDArray


@dataclass(frozen=True)
class Interpreter:
    """One way a board can run a model: a backend and whether its default delegate (XNNPACK) is on."""

    name: str
    backend: str
    use_xnnpack: bool
    description: str


INTERPRETERS: tuple[Interpreter, ...] = (
    Interpreter("litert", "litert", True, "LiteRT with its default delegate (XNNPACK)"),
    Interpreter("litert-no-xnnpack", "litert", False, "LiteRT's builtin kernels, XNNPACK off"),
    Interpreter("tflite", "tflite", True, "tflite-runtime with its default delegate (XNNPACK)"),
    Interpreter("tflite-no-xnnpack", "tflite", False, "tflite-runtime's builtin kernels, XNNPACK off"),
)
NAMES = tuple(i.name for i in INTERPRETERS)
_MODULES = {"litert": "ai_edge_litert", "tflite": "tflite_runtime"}
DEFAULT_TIMEOUT_S = 600.0


class InterpreterError(Exception):
    """A child could not be started or did not answer (not the model's fault)."""


def by_name(names: Sequence[str]) -> tuple[Interpreter, ...]:
    """The interpreters named (in the canonical order); ValueError naming an unknown one."""
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown interpreter {unknown[0]!r}; expected {', '.join(NAMES)}")
    return tuple(i for i in INTERPRETERS if i.name in names)


def from_option(text: str) -> tuple[Interpreter, ...]:
    """The `--interpreters` value: `auto` (every one installed here), `none`, or a comma-separated list.

    Raises ValueError naming an unknown interpreter or one whose backend is not installed.
    """
    text = text.strip()
    if text == "auto":
        return available()
    if text == "none":
        return ()
    chosen = by_name([n.strip() for n in text.split(",") if n.strip()])
    missing = [i for i in chosen if i not in available()]
    if missing:
        raise ValueError(f"{missing[0].name}: {_MODULES[missing[0].backend]} is not installed on this host")
    return chosen


OPTION_HELP = ("interpreters the golden vectors must hold on, each run in its own process: auto (default: every "
               f"one installed here), none, or a comma-separated list of {', '.join(NAMES)}")


def option(text: str) -> tuple[Interpreter, ...]:
    """argparse type of `--interpreters`."""
    import argparse

    try:
        return from_option(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def available() -> tuple[Interpreter, ...]:
    """The interpreters whose backend is installed here (found without importing it into this process)."""
    return tuple(i for i in INTERPRETERS if importlib.util.find_spec(_MODULES[i.backend]) is not None)


@dataclass
class Run:
    """What one interpreter did with the samples: outputs stacked over samples, or why it could not."""

    interpreter: Interpreter
    outputs: list[NDArray[Any]] | None = None
    problem: str | None = None
    seconds: float = 0.0


def run_all(model: bytes, inputs: Sequence[NDArray[Any]], interpreters: Sequence[Interpreter], *,
            timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Run]:
    """Run every sample (axis 0 of each input, one invoke each) on each interpreter; one child per backend."""
    import numpy as np

    if not interpreters:
        return []
    with tempfile.TemporaryDirectory(prefix="edgectl-interpreters-") as tmp:
        work = Path(tmp)
        (work / "model.tflite").write_bytes(model)
        np.savez(work / "inputs.npz", **{f"input_{i}": np.ascontiguousarray(x) for i, x in enumerate(inputs)})
        backends = list(dict.fromkeys(i.backend for i in interpreters))
        (work / "request.json").write_text(json.dumps(
            {b: [{"name": i.name, "use_xnnpack": i.use_xnnpack} for i in interpreters if i.backend == b]
             for b in backends}))
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        children: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for backend in backends:
                children[backend] = subprocess.Popen(
                    [sys.executable, "-m", "edgefleet.converter.tflite.interpreters", str(work), backend],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=work)
            deadline = time.monotonic() + timeout_s
            failures: dict[str, str] = {}
            for backend, child in children.items():
                try:
                    _, err = child.communicate(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.communicate()
                    failures[backend] = f"did not finish within {timeout_s:g} s (the model hangs or is too slow)"
                    continue
                if child.returncode < 0:
                    failures[backend] = f"crashed with {signal.Signals(-child.returncode).name}"
                elif child.returncode != 0:
                    lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
                    failures[backend] = f"exited with code {child.returncode}: {lines[-1] if lines else 'no message'}"
        finally:
            for child in children.values():
                if child.poll() is None:
                    child.kill()
                    child.wait()
        return [_collect(work, i, failures.get(i.backend)) for i in interpreters]


def _collect(work: Path, interpreter: Interpreter, failure: str | None) -> Run:
    answer = work / f"{interpreter.name}.json"
    if not answer.exists():
        if not (work / f"{interpreter.name}.started").exists():
            return Run(interpreter, problem=f"not run: the {interpreter.backend} child {failure or 'stopped'} "
                                            "on another configuration first")
        return Run(interpreter, problem=failure or "gave no answer")
    info = json.loads(answer.read_text())
    import numpy as np

    if info.get("problem"):
        return Run(interpreter, problem=str(info["problem"]), seconds=float(info.get("seconds", 0.0)))
    with np.load(work / f"{interpreter.name}.npz", allow_pickle=False) as z:
        outputs = [z[f"output_{j}"] for j in range(int(info["outputs"]))]
    return Run(interpreter, outputs=outputs, seconds=float(info.get("seconds", 0.0)))


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0][:300]


def _child(work: Path, backend: str) -> int:
    """The child's work: every configuration of one backend, answers written beside the request."""
    import numpy as np

    from edgefleet.runtime import load_model

    configs: list[dict[str, Any]] = json.loads((work / "request.json").read_text())[backend]
    with np.load(work / "inputs.npz", allow_pickle=False) as z:
        inputs = [z[f"input_{i}"] for i in range(len(z.files))]
    model_path = str(work / "model.tflite")
    for config in configs:
        name = config["name"]
        (work / f"{name}.started").touch()  # a crash from here on is this configuration's
        started = time.perf_counter()
        answer: dict[str, Any] = {}
        try:
            model = load_model(model_path, backend, use_xnnpack=bool(config["use_xnnpack"]))
        except Exception as err:  # RuntimeBackendError with the interpreter's reason, or an import failure
            answer["problem"] = _first_line(err)
        else:
            results: list[list[NDArray[Any]]] = [[] for _ in model.outputs]
            for s in range(len(inputs[0]) if inputs else 0):
                try:
                    outs = model.run([x[s] for x in inputs])
                except Exception as err:  # the interpreter raises RuntimeError/ValueError at invoke
                    answer["problem"] = f"fails on sample {s}: {_first_line(err)}"
                    break
                for j, y in enumerate(outs):
                    results[j].append(y)
            if "problem" not in answer:
                np.savez(work / f"{name}.npz", **{f"output_{j}": np.stack(r) for j, r in enumerate(results)})
                answer["outputs"] = len(results)
        answer["seconds"] = time.perf_counter() - started
        (work / f"{name}.json").write_text(json.dumps(answer))
    return 0


if __name__ == "__main__":
    if "tensorflow" in sys.modules:  # never alongside tflite_runtime (docs/architecture.md)
        raise SystemExit("edgefleet.converter.tflite.interpreters: TensorFlow is loaded in the interpreter child")
    sys.exit(_child(Path(sys.argv[1]), sys.argv[2]))
