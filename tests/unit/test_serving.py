"""The serving path with real interpreters: conversions for the caller, batches, bad requests, swaps."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.serving.models import Serving
from edgefleet.bundle import MODEL_FILE, Bundle
from edgefleet.errors import RequestError, RuntimeBackendError
from edgefleet.protocol.documents import Deployment
from edgefleet.runtime import LoadedModel, load_model

ROOT = Path(__file__).resolve().parents[2]


def _serve(serving: Serving, bundle: Path, name: str = "m") -> Deployment:
    deployment = Bundle.load(bundle).deployment
    serving.activate(name, bundle / MODEL_FILE, deployment)
    return deployment


def _reference(bundle: Path) -> LoadedModel:
    return load_model(bundle / MODEL_FILE)


def _rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)


def test_float_model_answers_like_the_interpreter(make_bundle: Callable[..., Path]) -> None:
    bundle = make_bundle("dense_f32", version=3)
    serving = Serving()
    _serve(serving, bundle)
    x = _rows(1)
    expected = _reference(bundle).run([x])[0]
    p = serving.predict("m", [x])
    assert p.version == 3 and p.name == "m" and not p.raw
    assert p.outputs[0].dtype == np.float32
    np.testing.assert_array_equal(p.outputs[0], expected)
    np.testing.assert_array_equal(serving.predict_raw("m", [x])[0], expected)
    served = serving.served("m")
    assert served is not None and served.version == 3 and served.backend == "litert"
    assert served.stats.count == 2 and served.stats.errors == 0
    assert serving.names() == ["m"]


def test_int8_model_takes_floats_and_returns_floats(make_bundle: Callable[..., Path]) -> None:
    bundle = make_bundle("dense_int8")
    serving = Serving()
    _serve(serving, bundle)
    ref = _reference(bundle)
    qin, qout = ref.inputs[0].quantization, ref.outputs[0].quantization
    assert qin is not None and qout is not None
    x = np.array([[0.3, -1.2, 0.05, 2.0, -0.5, 0.0, 1.1, -3.9]], np.float32)
    q = np.clip(np.round(x / qin.scale) + qin.zero_point, -128, 127).astype(np.int8)
    raw = ref.run([q])[0]
    expected = (raw.astype(np.float32) - qout.zero_point) * qout.scale
    p = serving.predict("m", [x])
    assert p.outputs[0].dtype == np.float32 and not p.raw
    np.testing.assert_allclose(p.outputs[0], expected, rtol=0, atol=1e-6)
    # the model's own dtype goes in untouched and the answer stays in the model's dtype
    native = serving.predict("m", [q])
    assert native.raw and native.outputs[0].dtype == np.int8
    np.testing.assert_array_equal(native.outputs[0], raw)
    # raw=True keeps integer outputs for float callers too
    np.testing.assert_array_equal(serving.predict("m", [x], raw=True).outputs[0], raw)


def test_normalisation_is_applied_for_float_inputs(make_bundle: Callable[..., Path]) -> None:
    mean = tuple(float(v) for v in np.linspace(-1, 1, 8))
    bundle = make_bundle("dense_f32", mean=mean, std=(2.0,))
    serving = Serving()
    _serve(serving, bundle)
    x = _rows(2, seed=4) * 3
    expected = _reference(bundle).run([(x - np.array(mean, np.float32)) / np.float32(2.0)])[0]
    np.testing.assert_allclose(serving.predict("m", [x]).outputs[0], expected, rtol=1e-6)
    # JSON-style integers are numbers too: normalised the same way
    ints = np.arange(8).reshape(1, 8)
    expected_ints = _reference(bundle).run([(ints.astype(np.float32) - np.array(mean, np.float32)) / 2.0])[0]
    np.testing.assert_allclose(serving.predict("m", [ints.tolist()]).outputs[0], expected_ints, rtol=1e-6)


def test_top_k_uses_the_labels(make_bundle: Callable[..., Path]) -> None:
    labels = ("cat", "dog", "bird", "fish")
    bundle = make_bundle("dense_f32", labels=labels, top_k=2)
    serving = Serving()
    _serve(serving, bundle)
    x = _rows(3, seed=9)
    p = serving.predict("m", [x])
    assert p.top_k is not None and len(p.top_k) == 3
    for row, top in zip(p.outputs[0], p.top_k, strict=True):
        order = np.argsort(-row)[:2]
        assert [t["index"] for t in top] == order.tolist()
        assert [t["label"] for t in top] == [labels[i] for i in order]
        assert [t["score"] for t in top] == pytest.approx(row[order].tolist())


def test_no_top_k_without_labels(make_bundle: Callable[..., Path]) -> None:
    serving = Serving()
    _serve(serving, make_bundle("dense_f32"))
    assert serving.predict("m", [_rows(1)]).top_k is None


def test_dynamic_batch_runs_once(make_bundle: Callable[..., Path]) -> None:
    bundle = make_bundle("dense_f32")
    serving = Serving()
    _serve(serving, bundle)
    ref = _reference(bundle)
    x = _rows(5, seed=2)
    p = serving.predict("m", [x])
    assert p.outputs[0].shape == (5, 4)
    expected = np.concatenate([ref.run([x[i:i + 1]])[0] for i in range(5)])
    np.testing.assert_allclose(p.outputs[0], expected, rtol=1e-5, atol=1e-7)
    stats = serving.served("m").stats  # type: ignore[union-attr]
    assert stats.count == 1
    # back to one instance: the interpreter is resized again
    np.testing.assert_allclose(serving.predict("m", [x[:1]]).outputs[0], expected[:1], rtol=1e-5, atol=1e-7)


def test_fixed_batch_model_is_invoked_per_instance(zoo: Callable[[str], Path], make_bundle: Callable[..., Path]) -> None:
    bundle = make_bundle("dense_f32_batch1")
    serving = Serving()
    _serve(serving, bundle)
    ref = _reference(bundle)
    assert ref.inputs[0].shape == (1, 8)
    x = _rows(3, seed=5)
    p = serving.predict("m", [x])
    expected = np.concatenate([ref.run([x[i:i + 1]])[0] for i in range(3)])
    np.testing.assert_array_equal(p.outputs[0], expected)
    assert serving.served("m").stats.count == 3  # type: ignore[union-attr]
    # one instance without its batch dimension is accepted in-process
    single = serving.predict("m", [x[0]])
    assert single.outputs[0].shape == (1, 4)
    np.testing.assert_array_equal(single.outputs[0], expected[:1])


def test_inputs_by_name(make_bundle: Callable[..., Path]) -> None:
    serving = Serving()
    _serve(serving, make_bundle("dense_f32"))
    served = serving.served("m")
    assert served is not None
    full = served.inputs[0].name
    short = full.split(":")[0].removeprefix("serving_default_")
    x = _rows(1)
    by_position = serving.predict("m", [x]).outputs[0]
    np.testing.assert_array_equal(serving.predict("m", {short: x}).outputs[0], by_position)
    np.testing.assert_array_equal(serving.predict("m", {full: x}).outputs[0], by_position)
    np.testing.assert_array_equal(serving.predict("m", x).outputs[0], by_position)  # a lone array
    batch = _rows(3, seed=6)
    np.testing.assert_array_equal(serving.predict("m", batch).outputs[0], serving.predict("m", [batch]).outputs[0])


BAD_REQUESTS: list[tuple[str, Any, int, str]] = [
    ("wrong shape", [np.zeros((1, 7), np.float32)], 400, "shape [1, 7]"),
    ("wrong rank", [np.zeros((1, 2, 8), np.float32)], 400, "does not fit"),
    ("strings", [[["a"] * 8]], 400, "strings"),
    ("booleans", [np.ones((1, 8), bool)], 400, "booleans"),
    ("ragged", [[[1.0] * 8, [1.0] * 7]], 400, "not a rectangular array"),
    ("nulls", [[[None] * 8]], 400, "expected numbers"),
    ("too many inputs", [np.zeros((1, 8), np.float32)] * 2, 400, "takes 1 input"),
    ("unknown input name", {"nope": np.zeros((1, 8), np.float32)}, 400, "unknown input 'nope'"),
    ("empty batch", [np.zeros((0, 8), np.float32)], 400, "empty batch"),
    ("batch above the limit", [np.zeros((9, 8), np.float32)], 413, "above the limit of 8"),
]


@pytest.mark.parametrize(("label", "inputs", "status", "message"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_are_refused_with_a_reason(make_bundle: Callable[..., Path], label: str, inputs: Any,
                                                status: int, message: str) -> None:
    serving = Serving(max_batch=8)
    _serve(serving, make_bundle("dense_f32"))
    with pytest.raises(RequestError) as info:
        serving.predict("m", inputs)
    assert info.value.status == status
    assert message in str(info.value)
    stats = serving.served("m").stats  # type: ignore[union-attr]
    assert stats.errors == 0  # a caller's mistake is not the model's error
    assert serving.predict("m", [_rows(1)]).outputs[0].shape == (1, 4)  # and it still serves


def test_int8_model_refuses_integers_out_of_range(make_bundle: Callable[..., Path]) -> None:
    serving = Serving()
    _serve(serving, make_bundle("dense_int8"))
    with pytest.raises(RequestError, match="outside the int8 range"):
        serving.predict("m", [[[300] * 8]])
    with pytest.raises(RequestError, match="NaN"):
        serving.predict("m", [np.full((1, 8), np.nan, np.float32)])


def test_fast_path_refuses_wrong_dtype_and_shape(make_bundle: Callable[..., Path]) -> None:
    serving = Serving()
    _serve(serving, make_bundle("dense_f32"))
    with pytest.raises(RequestError, match="FLOAT64"):
        serving.predict_raw("m", [np.zeros((1, 8), np.float64)])
    with pytest.raises(RequestError, match="does not fit"):
        serving.predict_raw("m", [np.zeros((1, 9), np.float32)])
    with pytest.raises(RequestError, match="takes 1 input"):
        serving.predict_raw("m", [])
    assert serving.served("m").stats.errors == 0  # type: ignore[union-attr]
    assert serving.predict_raw("m", [np.zeros((3, 8), np.float32)])[0].shape == (3, 4)


def test_unknown_model_is_404_and_nothing_loaded_is_503(make_bundle: Callable[..., Path]) -> None:
    serving = Serving()
    with pytest.raises(RequestError) as none:
        serving.predict("m", [_rows(1)])
    assert none.value.status == 503
    _serve(serving, make_bundle("dense_f32"))
    for call in (lambda: serving.predict("other", [_rows(1)]), lambda: serving.predict_raw("other", [_rows(1)])):
        with pytest.raises(RequestError) as unknown:
            call()
        assert unknown.value.status == 404 and "serving: m" in str(unknown.value)


def test_failed_activation_keeps_the_old_model(make_bundle: Callable[..., Path], tmp_path: Path) -> None:
    bundle = make_bundle("dense_f32")
    serving = Serving()
    deployment = _serve(serving, bundle)
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00not a model" * 100)
    with pytest.raises(RuntimeBackendError):
        serving.activate("m", junk, dataclasses.replace(deployment, model=dataclasses.replace(deployment.model,
                                                                                              version=2)))
    assert serving.predict("m", [_rows(1)]).version == 1


def test_deactivate_stops_serving_the_name(make_bundle: Callable[..., Path]) -> None:
    serving = Serving()
    _serve(serving, make_bundle("dense_f32"), name="a")
    _serve(serving, make_bundle("dense_f32_v2", version=2), name="b")
    assert serving.names() == ["a", "b"]
    serving.deactivate("a")
    serving.deactivate("a")  # a second time is harmless
    assert serving.names() == ["b"] and serving.served("a") is None
    with pytest.raises(RequestError) as info:
        serving.predict("a", [_rows(1)])
    assert info.value.status == 404
    assert serving.predict("b", [_rows(1)]).version == 2


def test_swaps_under_load_never_fail_a_request(make_bundle: Callable[..., Path]) -> None:
    v1, v2 = make_bundle("dense_f32", version=1), make_bundle("dense_f32_v2", version=2)
    d1, d2 = Bundle.load(v1).deployment, Bundle.load(v2).deployment
    x = _rows(1, seed=11)
    expected = {1: _reference(v1).run([x])[0], 2: _reference(v2).run([x])[0]}
    assert not np.array_equal(expected[1], expected[2])
    serving = Serving()
    serving.activate("m", v1 / MODEL_FILE, d1)
    stop = threading.Event()
    failures: list[BaseException] = []
    seen: dict[int, int] = {1: 0, 2: 0}

    def hammer(raw: bool) -> None:
        while not stop.is_set():
            try:
                if raw:
                    out = serving.predict_raw("m", [x])[0]
                    version = next(v for v, y in expected.items() if np.array_equal(out, y))
                else:
                    p = serving.predict("m", [x])
                    version = p.version
                    np.testing.assert_array_equal(p.outputs[0], expected[version])
                seen[version] += 1
            except BaseException as err:  # StopIteration included: an answer from neither model
                failures.append(err)
                return

    threads = [threading.Thread(target=hammer, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    for i in range(16):
        version = 2 if i % 2 == 0 else 1
        serving.activate("m", (v2 if version == 2 else v1) / MODEL_FILE, d2 if version == 2 else d1)
        stop.wait(0.03)
    stop.set()
    for t in threads:
        t.join(10)
    assert failures == []
    assert seen[1] > 0 and seen[2] > 0
    assert serving.predict("m", [x]).version == 1


_HANG_CHILD = r"""
import dataclasses, json, os, sys, threading, time
from pathlib import Path
import numpy as np
from edgefleet.bundle import Bundle
from edgefleet.agent.serving.models import Serving

hang, good = Path(sys.argv[1]), Path(sys.argv[2])
deployment = Bundle.load(good).deployment
serving = Serving(warm_up=False)
serving.activate("m", hang, deployment)
x = np.zeros((1, 8), np.float32)
threading.Thread(target=serving.predict, args=("m", [x]), daemon=True).start()
stats = serving.served("m").stats
tick = threading.Event()
while not stats.in_flight():
    tick.wait(0.005)
first_age = stats.oldest_in_flight_s()
tick.wait(0.3)
age = stats.oldest_in_flight_s()
queued = {}
def late():
    queued["version"] = serving.predict("m", [x]).version
waiter = threading.Thread(target=late, daemon=True)
waiter.start()
tick.wait(0.1)
queued_before_swap = "version" in queued
v2 = dataclasses.replace(deployment, model=dataclasses.replace(deployment.model, version=2))
serving.activate("m", good / "model.tflite", v2)
waiter.join(5)
print(json.dumps({"first_age": first_age, "age": age, "in_flight": len(stats.in_flight()),
                  "queued_before_swap": queued_before_swap, "queued_version": queued.get("version"),
                  "fresh_version": serving.predict("m", [x]).version}), flush=True)
os._exit(0)  # the hung invoke never returns
"""


def test_a_hung_invoke_is_visible_and_a_swap_rescues_queued_requests(
        zoo: Callable[[str], Path], make_bundle: Callable[..., Path]) -> None:
    good = make_bundle("dense_f32")
    out = subprocess.run([sys.executable, "-c", _HANG_CHILD, str(zoo("hang_f32")), str(good)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["in_flight"] == 1  # the hung invoke stays visible to a watchdog
    assert report["age"] >= report["first_age"] + 0.25  # and its age keeps growing
    assert report["queued_before_swap"] is False  # the queued request waited behind the hung one
    assert report["queued_version"] == 2  # then moved to the model that replaced it
    assert report["fresh_version"] == 2


def test_non_finite_or_out_of_range_floats_are_refused(make_bundle) -> None:  # type: ignore[no-untyped-def]
    import warnings

    from edgefleet.agent.serving.models import Serving
    from edgefleet.bundle import Bundle
    from edgefleet.errors import RequestError

    bundle = Bundle.load(make_bundle("dense_f32", version=1))
    serving = Serving()
    serving.activate("m", bundle.path / "model.tflite", bundle.deployment)
    for bad in ([[1e39] + [0.0] * 7], [[float("nan")] * 8], [[float("inf")] + [0.0] * 7]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(RequestError, match="finite and within the float32 range"):
                serving.predict("m", [bad], batch_dim=True)
    assert serving.served("m").stats.errors == 0  # type: ignore[union-attr]
