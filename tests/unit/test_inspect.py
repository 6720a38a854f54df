"""`edgectl inspect`, `diff` and `keygen`, the flatbuffer reader, and the commands that must not load TensorFlow."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgefleet.converter.cli import main
from edgefleet.converter.tflite.info import read_model
from edgefleet.protocol import SigningKey
from edgefleet.runtime import load_model
from tests.support.convert_support import converted

ROOT = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("name", ["dense_f32", "dense_int8", "other_signature"])
def test_reader_signature_matches_litert(zoo, name) -> None:  # type: ignore[no-untyped-def]
    data = zoo(name).read_bytes()
    info = read_model(data)
    loaded = load_model(data)
    assert info.inputs == loaded.inputs and info.outputs == loaded.outputs
    assert {o.name for o in info.operators} >= {"FULLY_CONNECTED"}
    assert all(o.version >= 1 and o.count >= 1 for o in info.operators)
    assert info.size == len(data) and 0 < info.wire_size <= len(data)


@pytest.mark.parametrize("mode", ["int8-full", "int16x8", "float16"])
def test_reader_on_converted_models(mode: str) -> None:
    result = converted(mode)
    info = read_model(result.model)
    loaded = load_model(result.model)
    assert info.inputs == loaded.inputs and info.outputs == loaded.outputs
    assert info.quantization == mode
    assert [o["name"] for o in result.report["operators"]] == [o.name for o in info.operators]


def test_reader_counts_zeros_in_kernels(zoo) -> None:  # type: ignore[no-untyped-def]
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    data = zoo("dense_f32").read_bytes()
    m = schema.ModelT.InitFromPackedBuf(data, 0)
    graph = m.subgraphs[0]
    kernel = next(t for t in graph.tensors if len(t.shape) == 2 and m.buffers[t.buffer].data is not None
                  and int(np.prod(t.shape)) == 16 * 8)
    values = np.frombuffer(m.buffers[kernel.buffer].data.tobytes(), np.float32).copy()
    values[: 3 * len(values) // 4] = 0.0
    m.buffers[kernel.buffer].data = np.frombuffer(values.tobytes(), np.uint8)
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    info = read_model(bytes(b.Output()))
    sparsity = {w.shape: w.sparsity for w in info.weights}
    assert sparsity[tuple(kernel.shape)] == pytest.approx(0.75)


def test_inspect_tflite_json(capsys, zoo) -> None:  # type: ignore[no-untyped-def]
    rc, out, err = run(capsys, "inspect", zoo("dense_int8"), "--json")
    assert rc == 0, err
    model = json.loads(out)["model"]
    assert model["quantization"] == "int8-full"
    assert model["inputs"][0]["dtype"] == "int8" and model["inputs"][0]["quantization"]["scale"] > 0
    assert any(op["name"] == "FULLY_CONNECTED" for op in model["operators"])


def test_inspect_bundle_checks_files_and_signature(capsys, tmp_path, make_bundle) -> None:  # type: ignore[no-untyped-def]
    key, other = SigningKey.generate(), SigningKey.generate()
    key.write(tmp_path / "k")
    other.write(tmp_path / "other")
    bundle = make_bundle("dense_f32", key=key, labels=["a", "b", "c", "d"])
    rc, out, err = run(capsys, "inspect", bundle, "--pubkey", tmp_path / "k" / "edgefleet.pub", "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["signature"] == {"signed": True, "key_id": key.key_id, "verified": True, "note": None}
    assert result["manifest"]["postprocessing"]["labels"] == ["a", "b", "c", "d"]
    rc, _, err = run(capsys, "inspect", bundle, "--pubkey", tmp_path / "other")
    assert rc == 2 and "unknown key" in err
    rc, out, _ = run(capsys, "inspect", bundle)
    assert rc == 0 and "not verified" in out


@pytest.mark.parametrize("target", ["model.tflite", "golden.npz", "manifest.json"])
def test_inspect_tampered_bundle_is_exit_2(capsys, tmp_path, make_bundle, target) -> None:  # type: ignore[no-untyped-def]
    key = SigningKey.generate()
    key.write(tmp_path / "k")
    bundle = make_bundle("dense_f32", key=key)
    path = bundle / target
    if target == "manifest.json":
        path.write_text(path.read_text().replace('"top_k":5', '"top_k":6'))
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    rc, out, err = run(capsys, "inspect", bundle, "--pubkey", tmp_path / "k")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edgectl: error: {bundle}")
    assert ("SHA-256" in err or "signature" in err) and out == ""


def test_diff_shows_what_an_update_changes(capsys, make_bundle) -> None:  # type: ignore[no-untyped-def]
    a = make_bundle("dense_f32", version=1)
    same_model = make_bundle("dense_f32", version=2, labels=["w", "x", "y", "z"])
    other = make_bundle("other_signature", version=3)
    rc, out, err = run(capsys, "diff", a, same_model, "--json")
    assert rc == 0, err
    result = json.loads(out)
    rows = {r["field"]: r for r in result["rows"]}
    assert rows["version"]["changed"] and (rows["version"]["a"], rows["version"]["b"]) == (1, 2)
    assert not rows["bytes on disk"]["changed"] and rows["labels"]["changed"]
    assert result["update"]["new_chunks"] == 0 and result["update"]["new_wire_bytes"] == 0
    assert not result["signature_changed"]
    rc, out, _ = run(capsys, "diff", a, other, "--json")
    result = json.loads(out)
    assert result["signature_changed"] and result["update"]["new_chunks"] >= 1
    rc, out, _ = run(capsys, "diff", a, other)
    assert rc == 0 and "signature changes" in out


def test_keygen_writes_a_private_key_0600_and_never_overwrites(capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rc, out, err = run(capsys, "keygen", "-o", tmp_path / "keys", "--json")
    assert rc == 0, err
    result = json.loads(out)
    private, public = Path(result["private_key"]), Path(result["public_key"])
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert SigningKey.load(private).key_id == result["key_id"]
    before = private.read_bytes()
    rc, _, err = run(capsys, "keygen", "-o", tmp_path / "keys")
    assert rc == 2 and "refusing to overwrite" in err and private.read_bytes() == before and public.exists()


def test_light_commands_do_not_import_tensorflow(tmp_path, zoo, make_bundle) -> None:  # type: ignore[no-untyped-def]
    bundle = make_bundle("dense_f32")
    other = make_bundle("dense_f32_v2")
    script = f"""
import json, sys, time
from edgefleet.converter.cli import main
started = time.perf_counter()
codes = [
    main(["--help"]),
    main(["convert", "--help"]),
    main(["keygen", "-o", {str(tmp_path / 'k')!r}]),
    main(["inspect", {str(zoo('dense_f32'))!r}, "--json"]),
    main(["inspect", {str(bundle)!r}, "--json"]),
    main(["package", {str(zoo('dense_f32'))!r}, "-o", {str(tmp_path / 'pk')!r}, "--name", "m", "--version", "1",
          "--latency-runs", "5"]),
    main(["diff", {str(bundle)!r}, {str(other)!r}]),
]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras"))
print("RESULT", json.dumps({{"codes": codes, "heavy": heavy, "seconds": time.perf_counter() - started}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    assert result["codes"] == [0, 0, 0, 0, 0, 0, 0], proc.stderr[-2000:]
    assert result["heavy"] == []
