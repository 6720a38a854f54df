"""The drift reference, the PSI and the agent's window: binning shared by both halves, the score's noise
under no drift, the carrier inside golden.npz, the window's bound and the events' hysteresis."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edgefleet.agent.config import DriftConfig
from edgefleet.agent.serving.drift import DriftMonitor
from edgefleet.bundle import dump_golden, load_golden
from edgefleet.converter.fleet.history.ingest import drift_score
from edgefleet.drift import (
    REFERENCE_ARRAY,
    DriftReference,
    bin_counts,
    channel_rows,
    layout_for,
    load_reference,
    padded_edges,
    psi,
    reference_array,
    tensor_reference,
    top1_reference,
)
from edgefleet.errors import ProtocolError
from edgefleet.protocol import TensorSpec


def test_bins_agree_with_searchsorted() -> None:
    rng = np.random.default_rng(0)
    edges = [(-1.0, 0.0, 1.0), (0.5,), (-2.0, 2.0)]
    rows = np.round(rng.normal(size=(500, 3)) * 2) / 2  # values on the edges too
    counts = bin_counts(rows, padded_edges(edges))
    for c, e in enumerate(edges):
        expected = np.bincount(np.searchsorted(e, rows[:, c], side="right"), minlength=len(e) + 1)
        assert counts[c, :len(e) + 1].tolist() == expected.tolist()
        assert counts[c, len(e) + 1:].sum() == 0


def test_psi_by_hand_and_its_noise_under_no_drift() -> None:
    assert psi(np.array([[5, 5]]), np.array([[0.5, 0.5]]))[0] == pytest.approx(0.0)
    p, q = np.array([0.2, 0.8]), np.array([0.5, 0.5])
    assert psi(p[None], q[None])[0] == pytest.approx(float(np.sum((p - q) * np.log(p / q))))
    # the reasoning behind drift.min_samples: under no drift E[PSI] ~ (bins - 1) / n
    rng = np.random.default_rng(1)
    q10 = np.full(10, 0.1)
    for n in (200, 1000):
        scores = [psi(np.bincount(rng.integers(0, 10, n), minlength=10)[None], q10[None])[0] for _ in range(300)]
        assert np.mean(scores) == pytest.approx(9 / n, rel=0.25)
        assert max(scores) < 0.25  # the 99.9th percentile of chi2(9) / n is 0.14 at n = 200


def test_layouts_bound_the_reference() -> None:
    assert layout_for((-1, 8)) == "feature" and layout_for((1, 8, 8, 1)) == "feature"
    assert layout_for((1, 224, 224, 3)) == "channel" and layout_for((1, 4096)) == "tensor"
    image = np.random.default_rng(2).integers(0, 255, size=(20, 224, 224, 3)).astype(np.float64)
    rows = channel_rows(image, "channel")
    assert rows.shape[1] == 3 and rows.shape[0] <= 20 * 4096
    ref = tensor_reference("img", image, "channel")
    assert ref.channels == 3 and len(reference_array(DriftReference(samples=20, inputs=(ref,)))) < 4096


def test_reference_rides_in_golden_npz_and_old_readers_ignore_it() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 8))
    y = rng.random(size=(300, 4))
    ref = DriftReference(samples=300, inputs=(tensor_reference("x", x, "feature"),),
                         outputs=(top1_reference("scores", y),))
    data = dump_golden([x[:2, None]], [y[:2, None]], {REFERENCE_ARRAY: reference_array(ref)})
    assert load_reference(data) == ref
    inputs, outputs = load_golden(data, 1, 1)  # the agent's golden check reads only its arrays
    assert inputs[0].shape == (2, 1, 8) and outputs[0].shape == (2, 1, 4)
    assert load_reference(dump_golden([x[:2, None]], [y[:2, None]])) is None
    bad = dump_golden([x[:2, None]], [y[:2, None]], {REFERENCE_ARRAY: np.frombuffer(b'{"samples": 0}', np.uint8)})
    with pytest.raises(ProtocolError, match="samples"):
        load_reference(bad)


def _monitor(window: int = 200, min_samples: int = 100) -> tuple[DriftMonitor, Any]:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2000, 8))
    ref = DriftReference(samples=2000, inputs=(tensor_reference("x", x, "feature"),),
                         outputs=(top1_reference("scores", x[:, :4]),))
    spec_in = TensorSpec(name="x", dtype="float32", shape=(-1, 8))
    spec_out = TensorSpec(name="scores", dtype="float32", shape=(-1, 4))
    monitor = DriftMonitor(ref, [spec_in], [spec_out], ("scores",),
                           DriftConfig(sample_rate=1.0, window=window, min_samples=min_samples), seed=0)
    return monitor, rng


def _feed(monitor: DriftMonitor, rng: Any, n: int, shift: bool) -> list[Any]:
    crossings = []
    for _ in range(n):
        x = rng.normal(size=(1, 8)).astype(np.float32)
        if shift:
            x = x * 0.5 + 0.3
        monitor.offer([x], [x[:, :4]])
        crossings += monitor.update()
    return crossings


def test_window_judges_only_when_full_enough_and_forgets_in_eighths() -> None:
    monitor, rng = _monitor()
    assert _feed(monitor, rng, 99, shift=True) == []  # below min_samples: no score, no event
    assert monitor.figures().inputs == {"x": None}
    _feed(monitor, rng, 1000, shift=False)
    assert 175 <= monitor.samples <= 200 + 25  # between 7/8 of the window and the window plus one block
    figures = monitor.figures()
    assert figures.inputs["x"] is not None and figures.inputs["x"] < 0.1 and figures.drifting == ()


def test_hysteresis_one_event_per_crossing_and_a_recovery() -> None:
    monitor, rng = _monitor()
    assert _feed(monitor, rng, 400, shift=False) == []  # in distribution: nothing
    raised = _feed(monitor, rng, 400, shift=True)
    assert [(c.key, c.drifted) for c in raised if c.key == "x"] == [("x", True)]
    assert "x" in monitor.figures().drifting
    back = _feed(monitor, rng, 400, shift=False)
    assert [(c.key, c.drifted) for c in back if c.key == "x"] == [("x", False)]
    assert back[0].score < 0.8 * 0.25


def test_sampling_keeps_the_configured_share() -> None:
    monitor, _ = _monitor(window=100_000)
    monitor.rate = 0.1
    x = np.zeros((1, 8), np.float32)
    for _ in range(5000):
        monitor.offer([x], [x[:, :4]])
        monitor.update()
    assert 400 <= monitor.samples <= 600  # 10 % of 5,000, within about 4 standard deviations
    assert monitor.dropped == 0


def test_history_reads_the_agents_drift_figures() -> None:
    assert drift_score({"inputs": {"x": 0.31, "y": None}, "outputs": 0.02, "samples": 400, "drifting": ["x"]}) == 0.31
    assert drift_score({"inputs": {"x": None}, "samples": 12}) is None
    assert drift_score(0.2) == 0.2


def test_package_with_calibration_records_a_signed_reference(capsys: Any, tmp_path: Any, zoo: Any) -> None:
    import json

    from edgefleet.bundle import Bundle
    from edgefleet.converter.cli import main
    from edgefleet.protocol import Keyring, SigningKey, load_public_key

    SigningKey.generate().write(tmp_path / "keys")
    rng = np.random.default_rng(6)
    np.savez(tmp_path / "cal.npz", x=rng.normal(size=(600, 8)).astype(np.float32))
    out = tmp_path / "b"
    rc = main([str(a) for a in ("package", zoo("dense_int8"), "-o", out, "--name", "int8", "--version", "1",
                                "--key", tmp_path / "keys", "--calibration", tmp_path / "cal.npz", "--json")])
    _, err = capsys.readouterr()
    assert rc == 0, err
    bundle = Bundle.load(out, Keyring([load_public_key(tmp_path / "keys")]))  # the golden digest is signed
    ref = load_reference(bundle.golden)
    assert ref is not None and ref.samples == 600
    (x_ref,) = ref.inputs
    assert x_ref.layout == "feature" and x_ref.channels == 8
    # the int8 input is binned in real values: the calibration data's own quantiles, within a step
    assert abs(x_ref.mean[0]) < 0.2 and 0.8 < x_ref.std[0] < 1.2
    assert [o.kind for o in ref.outputs] == ["top1"] and abs(sum(ref.outputs[0].freq[0]) - 1) < 1e-3
    report = json.loads((out / "report.json").read_text())
    assert report["drift_reference"]["samples"] == 600 and report["drift_reference"]["bytes"] < 8192
    # without data there is nothing to compare with, and the bundle says so
    rc = main([str(a) for a in ("package", zoo("dense_int8"), "-o", tmp_path / "c", "--name", "int8",
                                "--version", "1", "--json")])
    capsys.readouterr()
    assert rc == 0 and load_reference(Bundle.load(tmp_path / "c").golden) is None
