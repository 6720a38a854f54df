"""Faults with real processes and a real Mosquitto: SIGKILL over many update cycles, the broker killed
during a download and during probation, frozen with SIGSTOP, a full disk, and clocks that are wrong."""

from __future__ import annotations

from pathlib import Path

from tests.killing import KillLoop
from tests.reliability import build_bundle

KILL_CYCLES = 14


def test_sigkill_at_random_points_over_many_update_cycles(tmp_path: Path) -> None:
    bundles = [build_bundle(tmp_path / "a", "dense_f32", version=1), build_bundle(tmp_path / "b", "dense_f32_v2",
                                                                                   version=1)]
    loop = KillLoop(tmp_path / "loop", bundles, seed=8)
    report = loop.run(KILL_CYCLES)
    print("\n" + report.summary())
    assert not report.problems, "\n".join(report.problems)
    assert report.kills == report.cycles == KILL_CYCLES
    assert report.corrupt_states == report.lost_models == report.api_failures == 0
    assert len(report.by) >= 3, report.by  # crash points and timed kills both happened
    assert len(report.versions_seen) >= 3, report.versions_seen  # updates went through between the kills
