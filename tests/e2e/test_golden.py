"""Golden vectors that hold on every interpreter (converter/bundle/golden.py, converter/tflite/interpreters.py).

The int8 bundles of the tiny digits CNN give outputs on which LiteRT with XNNPACK and tflite-runtime
2.14 differ by up to nine steps of the output's scale. Each test packages with `edgectl package`, as a
user would, and checks the result with real interpreters and real agents (LiteRT and tflite-runtime
backends, each in its own process).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.lifecycle.validate import ValidationRequest, run_checks
from edgefleet.bundle import GOLDEN_FILE, MANIFEST_FILE, Bundle, load_golden
from edgefleet.converter.cli import main
from edgefleet.converter.convert.data import quantize_input
from edgefleet.converter.tflite.interpreters import available, by_name, run_all
from edgefleet.errors import ProtocolError
from edgefleet.protocol import Deployment, parse_json
from edgefleet.testing.agentproc import AgentProcess
from tests.support.convert_support import WORK, bundle_files_absent, converted, digits, digits_npz

pytestmark = pytest.mark.skipif({i.name for i in available()} != {"litert", "litert-no-xnnpack", "tflite",
                                                                   "tflite-no-xnnpack"},
                                reason="needs ai-edge-litert and tflite-runtime")


def run(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    """edgectl in this process: exit code, stdout, stderr."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def model_file(mode: str) -> Path:
    """The tiny CNN converted in `mode` (int8: float in/out; int8-full: int8 in/out), as a .tflite file."""
    path = WORK / f"golden-{mode}.tflite"
    if not path.exists():
        path.write_bytes(converted(mode).model)
    return path


def package(capsys: pytest.CaptureFixture[str], model: Path, out: Path, data: Path, *extra: Any) -> Bundle:
    rc, _, err = run(capsys, "package", model, "-o", out, "--name", "digits", "--version", "1", "--data", data,
                     "--latency-runs", "3", "--json", *extra)
    assert rc == 0, err
    return Bundle.load(out)


def ops(model: bytes) -> list[dict[str, Any]]:
    """Operators with their input and output tensor details, read by LiteRT itself."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    tensors = {d["index"]: d for d in interpreter.get_tensor_details()}
    return [{"op": o["op_name"], "inputs": [tensors[i] for i in o["inputs"] if i >= 0],
             "outputs": [tensors[i] for i in o["outputs"]]} for o in interpreter._get_ops_details()]


def disagreement(model: bytes, x: np.ndarray, spec: Any) -> np.ndarray:
    """Per sample, the largest |LiteRT with XNNPACK - tflite-runtime| over the output, in real units."""
    xq = quantize_input(x, spec.inputs[0])[:, None]
    litert, tflite = run_all(model, [xq], by_name(["litert", "tflite"]))
    assert litert.outputs is not None and tflite.outputs is not None, (litert.problem, tflite.problem)
    q = spec.outputs[0].quantization
    a, b = litert.outputs[0].astype(np.float64), tflite.outputs[0].astype(np.float64)
    if q is not None:
        a, b = (a - q.zero_point) * q.scale, (b - q.zero_point) * q.scale
    return np.abs(a - b).reshape(len(x), -1).max(axis=1)  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", ["int8", "int8-full"])
def test_tolerance_is_stated_steps_of_the_producing_tensors(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                            mode: str) -> None:
    """The output comes out of SOFTMAX (int8, scale 1/256), behind a DEQUANTIZE for float I/O: 2 steps of
    the softmax output plus 2 steps of its input (the logits) times the softmax's slope 1/2."""
    model = model_file(mode)
    bundle = package(capsys, model, tmp_path / "b", digits_npz())
    graph = ops(model.read_bytes())
    softmax = [o for o in graph if o["op"] == "SOFTMAX"]
    assert len(softmax) == 1
    out_scale = softmax[0]["outputs"][0]["quantization"][0]
    in_scale = softmax[0]["inputs"][0]["quantization"][0]
    assert out_scale == pytest.approx(1 / 256) and in_scale > 0.01
    if mode == "int8":
        assert graph[-1]["op"] == "DEQUANTIZE" and bundle.deployment.model.outputs[0].dtype == "float32"
    else:
        assert bundle.deployment.model.outputs[0].quantization is not None
    spec = bundle.deployment.model
    assert spec.tolerances is None  # one output: the document stays readable by older agents
    assert spec.tolerance.atol == pytest.approx(2 * out_scale + 2 * 0.5 * in_scale, rel=1e-12)
    assert spec.tolerance.rtol == 0.0
    assert bundle.report is not None
    rule = bundle.report["golden_check"]["tolerances"][0]
    assert rule["scale"] == pytest.approx(out_scale) and rule["steps"] == pytest.approx(spec.tolerance.atol / out_scale)
    assert "2 steps of int8 scale" in rule["rule"] and "SOFTMAX" in rule["rule"]
    checked = {i["name"] for i in bundle.report["golden_check"]["interpreters"]}
    assert checked == {"litert", "litert-no-xnnpack", "tflite", "tflite-no-xnnpack"}


def test_int8_output_tolerance_uses_the_manifest_scale(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                       zoo: Callable[[str], Path]) -> None:
    """A model made elsewhere (the zoo's int8 dense model, int8 in and out, random golden inputs): the
    output tensor is the producing one, so its scale in the manifest is the step."""
    model = zoo("dense_int8")
    rc, _, err = run(capsys, "package", model, "-o", tmp_path / "b", "--name", "m", "--version", "1",
                     "--latency-runs", "3")
    assert rc == 0, err
    spec = Bundle.load(tmp_path / "b").deployment.model
    last = ops(model.read_bytes())[-1]
    out_scale = spec.outputs[0].quantization.scale  # type: ignore[union-attr]
    expected = 2 * out_scale
    if last["op"] in ("SOFTMAX", "LOGISTIC"):
        expected += 2 * {"SOFTMAX": 0.5, "LOGISTIC": 0.25}[last["op"]] * last["inputs"][0]["quantization"][0]
    assert spec.tolerance.atol == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("mode", ["int8", "int8-full"])
def test_worst_inputs_as_golden_are_accepted_on_litert_and_tflite(capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path, mode: str) -> None:
    """Repackaged with the digits on which LiteRT and tflite-runtime differ most, the bundle installs on
    agents of both backends; the tolerance does not depend on the samples and covers every digit."""
    model = model_file(mode)
    x, y = digits()
    default = package(capsys, model, tmp_path / "default", digits_npz())
    spec = default.deployment.model
    gaps = disagreement(model.read_bytes(), x, spec)
    old_rule = 2 * spec.outputs[0].quantization.scale if spec.outputs[0].quantization else 1e-4
    assert gaps.max() > old_rule  # the fleet problem is real for this model: the old tolerance fails
    assert gaps.max() <= spec.tolerance.atol  # any digit as a golden sample would hold
    worst = np.argsort(-gaps, kind="stable")[:8]
    data = tmp_path / "worst.npz"
    np.savez(data, x=x[worst], y=y[worst])
    bundle = package(capsys, model, tmp_path / "worst", data, "--golden-samples", "8")
    assert bundle.deployment.model.tolerance == spec.tolerance
    inputs, _ = load_golden(bundle.golden, 1, 1)
    stored = {tuple(np.asarray(v).ravel().tolist()) for v in inputs[0]}
    assert tuple(quantize_input(x[worst[:1]], spec.inputs[0]).ravel().tolist()) in stored
    for backend in ("litert", "tflite"):
        agent = AgentProcess(tmp_path / f"agent-{backend}", runtime={"backend": backend})
        result = agent.cli("install", str(tmp_path / "worst"), "--json")
        assert result.returncode == 0, (backend, result.stdout, result.stderr)
        answer = json.loads(result.stdout)
        assert answer["phase"] == "PROBATION", (backend, answer)


def test_golden_outputs_beyond_the_tolerance_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A reference whose outputs sit more than the tolerance from what the interpreters compute: one
    line naming the interpreter, the output and the tolerance; exit 2; nothing written."""
    import edgefleet.converter.bundle.writer as bundle_module

    model = model_file("int8")
    atol = package(capsys, model, tmp_path / "ok", digits_npz()).deployment.model.tolerance.atol
    honest = bundle_module.run_samples

    def shifted(loaded: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return [y + np.float32(1.5 * atol) for y in honest(loaded, inputs)]

    monkeypatch.setattr(bundle_module, "run_samples", shifted)
    out = tmp_path / "shifted"
    rc, _, err = run(capsys, "package", model, "-o", out, "--name", "digits", "--version", "1",
                     "--data", digits_npz(), "--latency-runs", "3")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgectl: error: golden check: litert ")
    assert "differs from the reference by" in lines[0] and f"beyond its tolerance {atol:.6g}" in lines[0]
    assert bundle_files_absent(out)


def test_an_interpreter_that_cannot_run_the_model_refuses_the_bundle(capsys: pytest.CaptureFixture[str],
                                                                     tmp_path: Path) -> None:
    """`--quantize dynamic` writes FULLY_CONNECTED version 12, which tflite-runtime 2.14 does not have."""
    model = model_file("dynamic")
    out = tmp_path / "b"
    rc, _, err = run(capsys, "package", model, "-o", out, "--name", "m", "--version", "1", "--latency-runs", "3")
    assert rc == 2 and bundle_files_absent(out)
    assert err.count("\n") == 1 and "golden check: tflite (tflite-runtime" in err
    assert "FULLY_CONNECTED' version '12'" in err and "--interpreters" in err
    rc, _, err = run(capsys, "package", model, "-o", out, "--name", "m", "--version", "1", "--latency-runs", "3",
                     "--interpreters", "litert,litert-no-xnnpack")
    assert rc == 0, err
    report = Bundle.load(out).report
    assert report is not None
    assert [i["name"] for i in report["golden_check"]["interpreters"]] == ["litert", "litert-no-xnnpack"]
    # the float output's tolerance is 4 x what the two interpreters disagree by, or the floor (1e-4 x
    # max(1, max |y|)) when they agree more closely: how closely depends on the CPU's kernels
    measured = report["golden_check"]["interpreters"][1]["max_abs_error"][0]
    bundle = Bundle.load(out)
    tol = bundle.deployment.model.tolerance
    _, golden_out = load_golden(bundle.golden, 1, 1)
    floor = 1e-4 * max(1.0, float(np.max(np.abs(golden_out[0]))))
    assert measured > 0 and tol.atol == pytest.approx(max(floor, 4 * measured), rel=1e-5)
    rc, _, err = run(capsys, "package", model, "-o", tmp_path / "c", "--name", "m", "--version", "1",
                     "--interpreters", "litert,gpu")
    assert rc == 2 and "unknown interpreter 'gpu'" in err and not (tmp_path / "c").exists()


def test_float_tolerance_comes_from_the_cross_interpreter_measurement(capsys: pytest.CaptureFixture[str],
                                                                       tmp_path: Path) -> None:
    """A float model: interpreters differ in the last bits; the tolerance is 4 x the largest disagreement,
    floored at 1e-4 x max(1, max |y|), with a relative 1e-3 on top."""
    model = model_file("none")
    bundle = package(capsys, model, tmp_path / "b", digits_npz())
    assert bundle.report is not None
    check = bundle.report["golden_check"]
    x, _ = digits()
    gaps = disagreement(model.read_bytes(), x[:check["candidates"]], bundle.deployment.model)
    measured = max(i["max_abs_error"][0] for i in check["interpreters"])
    assert measured >= gaps.max() * (1 - 1e-5) and gaps.max() > 0
    tol = bundle.deployment.model.tolerance
    assert tol.atol == pytest.approx(max(4 * measured, 1e-4), rel=1e-5) and tol.rtol == 1e-3
    assert check["tolerances"][0]["scale"] is None


def test_golden_samples_include_the_worst_candidates(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Half the golden samples are the candidates where the interpreters differ most, the rest random."""
    model = model_file("int8")
    bundle = package(capsys, model, tmp_path / "b", digits_npz(), "--golden-samples", "6")
    assert bundle.report is not None
    check = bundle.report["golden_check"]
    assert check["candidates"] == 128 and len(check["chosen"]) == 6 and len(set(check["chosen"])) == 6
    x, _ = digits()
    gaps = disagreement(model.read_bytes(), x[:128], bundle.deployment.model)
    ranked = check["chosen_for_disagreement"]
    assert len(ranked) == 3 and check["chosen"][:3] == ranked
    assert gaps[ranked].min() >= np.sort(gaps)[-3] > 0  # the three largest disagreements
    inputs, _ = load_golden(bundle.golden, 1, 1)
    expected = quantize_input(x[check["chosen"]], bundle.deployment.model.inputs[0])[:, None]
    assert np.array_equal(inputs[0], expected)


def _two_output_bundle(make_bundle: Callable[..., Path]) -> tuple[Path, dict[str, Any]]:
    path = make_bundle("two_in_two_out")
    return path, parse_json((path / MANIFEST_FILE).read_bytes())


@pytest.mark.parametrize("tight, passes", [(0, False), (1, True)])
def test_agent_applies_each_outputs_own_tolerance(make_bundle: Callable[..., Path], tmp_path: Path,
                                                  tight: int, passes: bool) -> None:
    """Golden output 0 shifted by 0.01: accepted when output 0's own tolerance allows it, refused naming
    output 0 when only output 1's does."""
    from edgefleet.bundle import dump_golden

    path, doc = _two_output_bundle(make_bundle)
    inputs, outputs = load_golden((path / GOLDEN_FILE).read_bytes(), 2, 2)
    outputs[0] = outputs[0] + np.float32(0.01)
    golden = tmp_path / "golden.npz"
    golden.write_bytes(dump_golden(inputs, outputs))
    loose, strict = {"atol": 0.05, "rtol": 0.0}, {"atol": 1e-4, "rtol": 0.0}
    doc["model"]["tolerances"] = [strict, loose] if tight == 0 else [loose, strict]
    doc["model"]["tolerance"] = loose
    Deployment.from_dict(doc)  # a valid document
    result = run_checks(ValidationRequest(model_path=str(path / "model.tflite"), golden_path=str(golden),
                                          deployment=doc, latency_runs=2))
    assert result["ok"] is passes, result
    if not passes:
        assert "output 0 differs by 0.0099" in result["reason"] and "tolerance 0.0001" in result["reason"]


def test_tolerances_field_is_optional_and_checked(make_bundle: Callable[..., Path]) -> None:
    _, doc = _two_output_bundle(make_bundle)
    assert "tolerances" not in doc["model"]  # written only when outputs need different ones
    assert Deployment.from_dict(doc).model.output_tolerance(1) == Deployment.from_dict(doc).model.tolerance
    doc["model"]["tolerances"] = [{"atol": 0.1}]
    with pytest.raises(ProtocolError, match="tolerances: 1 given for 2 outputs"):
        Deployment.from_dict(doc)
    doc["model"]["tolerances"] = [{"atol": 0.1}, {"atol": -1}]
    with pytest.raises(ProtocolError, match=r"model.tolerances\[1\].atol"):
        Deployment.from_dict(doc)
