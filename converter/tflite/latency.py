"""Bare interpreter latency of a .tflite model on this host, for `inspect`, `diff` and the benchmark.

"Bare" means the inputs are set once and only ``interpreter.invoke()`` is timed: no tensor copies,
no quantization of inputs, no serving path. That isolates what the model's kernels cost, which is
what structured pruning and quantization change. The interpreter is LiteRT with its default delegate
(XNNPACK), as the agent serves it, on one thread; no TensorFlow is imported.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

DEFAULT_RUNS = 50
DEFAULT_WARMUP = 5
# One thread: the figure then depends on the kernels, not on how busy the other cores are, and it is
# what a small board running one model per core sees.
DEFAULT_THREADS = 1


def bare_latency(model: bytes, *, runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP, xnnpack: bool = True,
                 num_threads: int | None = DEFAULT_THREADS, backend: str = "auto", seed: int = 0) -> dict[str, Any]:
    """p50/p95/mean of `runs` invokes after `warmup` untimed ones, on seeded random inputs.

    Returns ``{"error": reason}`` instead of figures when this host's interpreter cannot load or run the
    model (an op it does not know, for instance): inspecting such a model is still useful.
    """
    return compare_latency({"model": model}, runs=runs, rounds=1, warmup=warmup, xnnpack=xnnpack,
                           num_threads=num_threads, backend=backend, seed=seed)["model"]


def compare_latency(models: dict[str, bytes], *, runs: int = DEFAULT_RUNS, rounds: int = 5,
                    warmup: int = DEFAULT_WARMUP, xnnpack: bool = True, num_threads: int | None = DEFAULT_THREADS,
                    backend: str = "auto", seed: int = 0) -> dict[str, dict[str, Any]]:
    """Bare latency of several models measured in turns: `rounds` blocks of `runs` / `rounds` invokes each.

    Interleaving spreads a busy moment of a shared machine over every model instead of landing on one,
    so the ratio of two p50s means something even when the absolute figures drift.
    """
    from edgefleet.converter.convert.data import random_inputs
    from edgefleet.converter.tflite.native import captured_native_output
    from edgefleet.runtime import load_model

    results: dict[str, dict[str, Any]] = {}
    ready: dict[str, Any] = {}
    for name, model in models.items():
        try:
            with captured_native_output():  # LiteRT announces its XNNPACK delegate on stderr
                loaded = load_model(model, backend, num_threads=num_threads, use_xnnpack=xnnpack)
                interpreter = loaded.interpreter
                details = interpreter.get_input_details()
                values = random_inputs(loaded.inputs, 1, seed)
                for d, v in zip(details, values, strict=True):
                    interpreter.set_tensor(d["index"], np.asarray(v).reshape(d["shape"]).astype(d["dtype"], copy=False))
                for _ in range(max(0, warmup)):
                    interpreter.invoke()
        except Exception as err:  # interpreters and odd input dtypes fail with many exception types
            text = str(err).strip().splitlines()
            results[name] = {"error": text[0] if text else type(err).__name__}
            continue
        ready[name] = (loaded.backend, interpreter.invoke)
    rounds = max(1, min(rounds, runs))
    per_round = max(1, runs // rounds)
    times: dict[str, list[float]] = {name: [] for name in ready}
    for _ in range(rounds):
        for name, (_, invoke) in ready.items():
            block = times[name]
            for _ in range(per_round):
                start = time.perf_counter_ns()
                invoke()
                block.append((time.perf_counter_ns() - start) / 1e6)
    for name, (backend_name, _) in ready.items():
        t = np.asarray(times[name])
        results[name] = {"backend": backend_name, "xnnpack": xnnpack, "threads": num_threads, "runs": len(t),
                         "warmup": warmup, "p50_ms": round(float(np.percentile(t, 50)), 4),
                         "p95_ms": round(float(np.percentile(t, 95)), 4), "mean_ms": round(float(t.mean()), 4)}
    return {name: results[name] for name in models}
