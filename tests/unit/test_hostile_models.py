"""Hostile model files: bit flips (header and vtables included), truncations, flatbuffers edited to lie
about tensor shapes, buffers and operators, and models that need huge arenas or never finish.

Each file travels inside a correctly signed deployment whose manifest describes its bytes truthfully,
so nothing but validation can catch it. Validation must refuse it in the child process (the crash,
hang or allocation failure stays there), and the agent must keep serving the previous model with the
same answers. A file whose golden outputs stay within the bundle's tolerance (a flip in bytes nobody reads, or in the last bits of a weight) is
legitimately activated; it is rolled back before the next file. The tally of what happened (signals,
timeouts, reasons) is printed.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.bundle import GOLDEN_FILE, MANIFEST_FILE
from edgefleet.protocol import SigningKey, parse_json
from edgefleet.testing.hostile import (
    Hostile,
    bit_flips,
    flatbuffer_edits,
    huge_arenas,
    outcome_kind,
    sample_edits,
    tally,
    truncations,
)
from edgefleet.testing.reliability import (
    AgentWith,
    build_bundle,
    fast_tmp,
    hostile_document,
    run_hostile_through_agent,
    zoo_model,
)
from edgefleet.testing.waiting import wait_for
from tests.support.inproc import InProcessAgent

LIMITS = {"timeout_s": 3, "memory_mb": 512, "latency_runs": 5}


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Path, SigningKey, Path]]:
    root = fast_tmp("edgefleet-hostile-")
    key = SigningKey.generate()
    yield root, key, build_bundle(root / "v1", "dense_f32", version=1, key=key)
    shutil.rmtree(root, ignore_errors=True)


def ci_files() -> list[Hostile]:
    """A mixed set of about sixty hostile files made from dense_f32."""
    base = zoo_model("dense_f32").read_bytes()
    return [*bit_flips(base, 16), *truncations(base, 10), *sample_edits(flatbuffer_edits(base), 1),
            *huge_arenas(base), Hostile("arena", "memhog_f32 (a loop that doubles a tensor)",
                                        zoo_model("memhog_f32").read_bytes()),
            Hostile("arena", "hang_f32 (a loop that never ends)", zoo_model("hang_f32").read_bytes())]


def test_hostile_models_are_refused_in_the_validation_child(world: tuple[Path, SigningKey, Path]) -> None:
    root, key, v1 = world
    agent = InProcessAgent.create(root / "inproc", v1, key, mqtt=False, validation=LIMITS, store={"keep_blobs": 2})
    agent.boot()
    lc = agent.daemon.lifecycle
    base = parse_json((v1 / MANIFEST_FILE).read_bytes())
    golden = (v1 / GOLDEN_FILE).read_bytes()
    expected = agent.predict()
    files = ci_files()
    kinds: Counter[str] = Counter()
    started = time.monotonic()
    for i, hostile in enumerate(files):
        raw = hostile_document(base, hostile.data, version=100 + i, dep_id=f"hostile-{i}", key=key)
        mark = len(agent.events)
        phase = lc.install_bundle(raw, hostile.data, golden)
        event = agent.events[-1]
        if phase == "REJECTED":
            assert event.step == "REJECTED" and not event.ok and event.reason, hostile.name
            assert event.details["failed_step"] in ("VALIDATING", "ACTIVATING"), (hostile.name, event.reason)
            kinds[outcome_kind(event.reason)] += 1
        else:  # validation proved it computes the golden outputs: activated, so roll it back
            assert phase == "PROBATION" and [e.step for e in agent.events[mark:]][-1] == "PROBATION", hostile.name
            kinds["accepted: golden outputs within tolerance"] += 1
            lc.rollback("m", "hostile test: back to v1", manual=True)
        served = agent.daemon.serving.served("m")
        assert served is not None and served.version == 1, hostile.name
        assert agent.predict() == expected, hostile.name
    print(f"\n{len(files)} hostile models in {time.monotonic() - started:.1f} s: {tally(list(kinds.elements()))}")
    assert len(files) >= 50
    assert sum(n for k, n in kinds.items() if not k.startswith("accepted")) >= 0.8 * len(files), kinds
    assert kinds["load refused"] > 20 and kinds["timeout"] >= 1, kinds
    assert any(k.startswith("killed by SIG") for k in kinds), kinds  # a child crashed; the agent did not
    # refused models leave no pile of blobs behind
    state = lc.state
    unreferenced = {p.name for p in lc.store.blobs_on_disk()} - lc.store.referenced(state)
    assert len(unreferenced) <= lc.store.keep_blobs, f"{len(unreferenced)} blobs of refused models kept"


def test_hostile_models_through_a_real_agent(world: tuple[Path, SigningKey, Path], tmp_path: Path) -> None:
    root, key, v1 = world
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "edgefleet.pub").write_bytes(key.public_pem())
    agent = AgentWith(tmp_path / "agent", validation=LIMITS, health={"probation_s": 0.5, "min_requests": 1},
                      security={"trusted_keys": [str(tmp_path / "keys" / "edgefleet.pub")]})
    assert agent.cli("install", str(v1)).returncode == 0
    agent.start()
    try:
        wait_for(lambda: agent.client.admin("status")["state"]["models"]["m"]["phase"] == "COMMITTED",
                 timeout=30, what="v1 committed")
        names = {"truncate@225", "bitflip@8.6", "buffer_offset:b2=(9223372036854775808,9223372036854775808)",
                 "arena:batch=16777216", "memhog_f32 (a loop that doubles a tensor)", "hang_f32 (a loop that never ends)",
                 "tensor_type:t0=8"}
        files = [h for h in ci_files() if h.name in names]
        report = run_hostile_through_agent(agent, v1, files, key, tmp_path)
        print("\n" + report.summary())
        assert report.ran == len(names) == len(files)
        assert report.agent_crashes == 0 and "lost the previous model" not in report.kinds, report.kinds
        assert report.rejected >= len(files) - 1, report.kinds
        assert agent.proc is not None and agent.proc.poll() is None
        assert agent.client.health()["agent"]["models"]["m"]["version"] == 1
        assert "Traceback" not in agent.log(), agent.log()[-3000:]
    finally:
        agent.kill()


def test_full_hostile_set_is_large_enough_for_the_bench() -> None:
    """The bench's short profile runs every edit, 100 flips and 60 truncations: well over 200 files."""
    base = zoo_model("dense_f32").read_bytes()
    edits = flatbuffer_edits(base)
    assert len(edits) >= 80 and len({h.data for h in edits}) == len(edits)
    assert len(bit_flips(base, 100)) + len(truncations(base, 60)) + len(edits) + 5 >= 200
    assert all(h.data != base for h in edits + bit_flips(base, 100) + truncations(base, 60))
