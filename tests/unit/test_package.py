"""`edgectl package`: bundling existing TFLite models, golden vectors, TFLite metadata, bad input."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import flatbuffers
import numpy as np
import pytest

from edgefleet.bundle import Bundle, load_golden
from edgefleet.converter.cli import main
from edgefleet.converter.tflite.metadata import parse_metadata
from edgefleet.protocol import Keyring, SigningKey, load_public_key
from edgefleet.runtime import load_model
from tests.support.convert_support import bundle_files_absent, converted, digits


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def metadata_buffer(mean: list[float], std: list[float], labels_file: str) -> bytes:
    """A TFLITE_METADATA flatbuffer (tflite-support schema) with normalisation and a labels file."""
    b = flatbuffers.Builder(0)

    def floats(values: list[float]) -> int:
        b.StartVector(4, len(values), 4)
        for v in reversed(values):
            b.PrependFloat32(v)
        return b.EndVector()

    def tables(offsets: list[int]) -> int:
        b.StartVector(4, len(offsets), 4)
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()

    def table(size: int, refs: dict[int, int], small: dict[int, int] | None = None) -> int:
        """A table of `size` slots: `refs` maps slots to objects built before it, `small` to one-byte values."""
        b.StartObject(size)
        for slot, value in (small or {}).items():
            b.PrependUint8Slot(slot, value, 0)
        for slot, offset in refs.items():
            b.PrependUOffsetTRelativeSlot(slot, offset, 0)
        return b.EndObject()

    norm = table(2, {0: floats(mean), 1: floats(std)})
    unit = table(2, {1: norm}, small={0: 1})  # ProcessUnitOptions.NormalizationOptions
    tensor_in = table(7, {4: tables([unit])})
    labels = table(4, {0: b.CreateString(labels_file)}, small={2: 2})  # TENSOR_AXIS_LABELS
    tensor_out = table(7, {6: tables([labels])})
    subgraph = table(7, {2: tables([tensor_in]), 3: tables([tensor_out])})
    root = table(8, {3: tables([subgraph])})
    b.Finish(root, file_identifier=b"M001")
    return bytes(b.Output())


def with_metadata(model: bytes, meta: bytes, labels_file: str, labels: list[str]) -> bytes:
    """The model with a TFLITE_METADATA entry and a zip holding the labels appended, as tflite-support does."""
    from ai_edge_litert import schema_py_generated as schema

    m = schema.ModelT.InitFromPackedBuf(model, 0)
    buf = schema.BufferT()
    buf.data = np.frombuffer(meta, dtype=np.uint8)
    m.buffers.append(buf)
    entry = schema.MetadataT()
    entry.name = "TFLITE_METADATA"
    entry.buffer = len(m.buffers) - 1
    m.metadata = [*(m.metadata or []), entry]
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(labels_file, "\n".join(labels) + "\n")
    return bytes(b.Output()) + archive.getvalue()


def test_metadata_parser_reads_normalisation_and_packed_labels(zoo) -> None:  # type: ignore[no-untyped-def]
    meta = metadata_buffer([127.5], [127.5], "labels.txt")
    model = with_metadata(zoo("dense_f32").read_bytes(), meta, "labels.txt", ["a", "b", "c", "d"])
    parsed = parse_metadata(meta, model)
    assert parsed.mean == (127.5,) and parsed.std == (127.5,)
    assert parsed.labels == ("a", "b", "c", "d") and parsed.labels_file == "labels.txt"
    with pytest.raises(ValueError, match="M001"):
        parse_metadata(b"\x00" * 16)


def test_package_takes_pre_and_post_processing_from_metadata(capsys, tmp_path, zoo) -> None:  # type: ignore[no-untyped-def]
    meta = metadata_buffer([0.5, 1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 1.0], [2.0], "classes.txt")
    model = with_metadata(zoo("dense_f32").read_bytes(), meta, "classes.txt", ["cat", "dog", "cow", "hen"])
    path = tmp_path / "with_meta.tflite"
    path.write_bytes(model)
    load_model(model)  # LiteRT still loads a model with metadata and a zip appended
    rc, _, err = run(capsys, "package", path, "-o", tmp_path / "b", "--name", "animals", "--version", "1")
    assert rc == 0, err
    spec = Bundle.load(tmp_path / "b").deployment.model
    assert spec.preprocessing.mean == (0.5, 1.0) * 4 and spec.preprocessing.std == (2.0,)
    assert spec.postprocessing.labels == ("cat", "dog", "cow", "hen")
    # Options win over metadata.
    labels = tmp_path / "l.txt"
    labels.write_text("w\nx\ny\nz\n")
    rc, _, err = run(capsys, "package", path, "-o", tmp_path / "b2", "--name", "animals", "--version", "2",
                     "--labels", labels, "--input-mean", "3")
    assert rc == 0, err
    spec = Bundle.load(tmp_path / "b2").deployment.model
    assert spec.postprocessing.labels == ("w", "x", "y", "z") and spec.preprocessing.mean == (3.0,)


def test_package_random_golden_inputs_signed(capsys, tmp_path, zoo) -> None:  # type: ignore[no-untyped-def]
    SigningKey.generate().write(tmp_path / "keys")
    out = tmp_path / "b"
    rc, stdout, err = run(capsys, "package", zoo("dense_int8"), "-o", out, "--name", "int8", "--version", "4",
                          "--key", tmp_path / "keys", "--golden-samples", "5", "--json")
    assert rc == 0, err
    assert json.loads(stdout)["signed_by"] is not None
    bundle = Bundle.load(out, Keyring([load_public_key(tmp_path / "keys")]))
    inputs, outputs = load_golden(bundle.golden, 1, 1)
    assert inputs[0].dtype == np.int8 and inputs[0].shape[0] == 5
    assert inputs[0].min() < -64 and inputs[0].max() > 64  # spread over the dtype's range
    model = load_model(bundle.model)
    np.testing.assert_array_equal(model.run([inputs[0][0]])[0], outputs[0][0])


def test_package_a_converted_int8_full_model_with_float_data(capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = converted("int8-full")
    path = tmp_path / "digits_int8.tflite"
    path.write_bytes(result.model)
    x, y = digits()
    np.savez(tmp_path / "d.npz", x=x[:300], y=y[:300])
    out = tmp_path / "b"
    rc, _, err = run(capsys, "package", path, "-o", out, "--name", "digits", "--version", "1",
                     "--data", tmp_path / "d.npz", "--latency-runs", "5")
    assert rc == 0, err
    bundle = Bundle.load(out)
    spec = bundle.deployment.model.inputs[0]
    assert spec.dtype == "int8" and spec.quantization is not None
    inputs, _ = load_golden(bundle.golden, 1, 1)
    q = spec.quantization
    chosen = bundle.report["golden_check"]["chosen"]  # type: ignore[index]  # 8 of the first 128 samples
    assert len(chosen) == 8 and max(chosen) < 128
    want = np.clip(np.round(x[chosen] / q.scale + q.zero_point), -128, 127).astype(np.int8)
    np.testing.assert_array_equal(inputs[0][:, 0], want)
    report = bundle.report
    assert report is not None and report["validation"]["samples"] == 300
    assert report["validation"]["accuracy"] > 0.85
    assert bundle.deployment.model.metrics["accuracy"] == report["validation"]["accuracy"]


@pytest.mark.parametrize("case", ["missing", "corrupt", "not tflite", "data shape", "exists"])
def test_package_bad_input(capsys, tmp_path, zoo, case) -> None:  # type: ignore[no-untyped-def]
    model: Path = zoo("dense_f32")
    extra: list[object] = []
    out = tmp_path / "out"
    if case == "missing":
        model = tmp_path / "missing.tflite"
    elif case == "corrupt":
        model = tmp_path / "corrupt.tflite"
        data = bytearray(zoo("dense_f32").read_bytes())
        model.write_bytes(bytes(data[: len(data) // 3]))
    elif case == "not tflite":
        model = tmp_path / "text.tflite"
        model.write_text("hello, not a model at all")
    elif case == "data shape":
        np.savez(tmp_path / "d.npz", x=np.zeros((4, 5), np.float32))
        extra = ["--data", tmp_path / "d.npz"]
    elif case == "exists":
        out.mkdir()
        (out / "keep").write_text("x")
    rc, stdout, err = run(capsys, "package", model, "-o", out, "--name", "m", "--version", "1", *extra)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgectl: error: ") and "Traceback" not in err + stdout
    if case == "exists":
        assert (out / "keep").read_text() == "x"
    else:
        assert bundle_files_absent(out)
