"""The update lifecycle: verification, validation in a child process, activation, probation, rollback.

The serving path is a small fake here (its own tests use the real one); the store, the validation
child and the interpreters are real.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.config import parse_config
from edgefleet.agent.lifecycle.machine import Lifecycle
from edgefleet.agent.lifecycle.store import Store
from edgefleet.bundle import GOLDEN_FILE, MANIFEST_FILE, MODEL_FILE, dump_golden, load_golden
from edgefleet.protocol import Deployment, Event, Keyring, Phase, Signed, SigningKey
from edgefleet.testing.agentproc import toml
from tests.support.helpers import read_manifest, rewrite_manifest, swap_file


@dataclass
class Snap:
    p95_ms: float | None


@dataclass
class FakeStats:
    count: int = 0
    errors: int = 0
    p95_ms: float | None = None
    flights: list[float] = field(default_factory=list)

    def snapshot(self, window_s: float | None = None) -> Snap:
        return Snap(self.p95_ms)

    def in_flight(self) -> list[float]:
        return list(self.flights)


@dataclass
class FakeServed:
    version: int
    stats: FakeStats = field(default_factory=FakeStats)


class FakeServing:
    """Records what would be served; loads nothing."""

    def __init__(self) -> None:
        self.models: dict[str, FakeServed] = {}
        self.history: list[tuple[str, int | None]] = []

    def activate(self, name: str, model_path: Path, deployment: Deployment) -> None:
        assert model_path.is_file()
        self.models[name] = FakeServed(deployment.model.version)
        self.history.append((name, deployment.model.version))

    def deactivate(self, name: str) -> None:
        self.models.pop(name, None)
        self.history.append((name, None))

    def served(self, name: str) -> FakeServed | None:
        return self.models.get(name)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def env(tmp_path: Path) -> Any:
    class Env:
        key = SigningKey.generate()
        clock = Clock()
        serving = FakeServing()
        events: list[Event] = []

        def config(self, **sections: dict[str, Any]) -> Any:
            pub = tmp_path / "keys"
            if not pub.exists():
                self.key.write(pub)
            base: dict[str, dict[str, Any]] = {
                "security": {"trusted_keys": [str(pub / "edgefleet.pub")]},
                "validation": {"timeout_s": 20},
                "health": {"probation_s": 30, "min_requests": 10},
            }
            for name, values in sections.items():
                base.setdefault(name, {}).update(values)
            return parse_config(f'device_id = "dev-1"\nstate_dir = "{tmp_path / "state"}"\n' + toml(base))

        def lifecycle(self, serving: Any = "default", **sections: dict[str, Any]) -> Lifecycle:
            cfg = self.config(**sections)
            return Lifecycle(cfg, Store.from_config(cfg), keyring=Keyring.from_files(cfg.security.trusted_keys),
                             serving=self.serving if serving == "default" else serving,
                             emit=self.events.append, clock=self.clock)

    return Env()


def _install(lc: Lifecycle, bundle: Path) -> str:
    raw = read_manifest(bundle)
    return lc.install_bundle(raw, (bundle / MODEL_FILE).read_bytes(), (bundle / GOLDEN_FILE).read_bytes())


def _steps(events: list[Event]) -> list[str]:
    return [e.step for e in events]


def test_install_goes_to_probation_then_commits(env: Any, make_bundle: Any) -> None:
    lc = env.lifecycle()
    b1 = make_bundle("dense_f32", version=1, key=env.key)
    assert _install(lc, b1) == "PROBATION"
    assert _steps(env.events) == ["VERIFYING", "VALIDATING", "ACTIVATING", "PROBATION"]
    assert env.events[-1].details["p95_ms"] > 0
    assert env.serving.history == [("m", 1)]
    on_disk = json.loads((lc.store.root / "state.json").read_text())
    assert on_disk["models"]["m"]["phase"] == "PROBATION" and on_disk["running"] is False
    lc.tick()
    assert lc.state.record("m").phase == "PROBATION"  # the window has not passed
    env.serving.models["m"].stats.count = 25
    env.clock.now += 31
    lc.tick()
    rec = lc.state.record("m")
    assert rec.phase == "COMMITTED" and rec.last_outcome is not None and rec.last_outcome.result == "committed"
    assert env.events[-1].step == "COMMITTED" and env.events[-1].ok


def _committed_v1(env: Any, make_bundle: Any, **sections: dict[str, Any]) -> Lifecycle:
    lc = env.lifecycle(**sections)
    assert _install(lc, make_bundle("dense_f32", version=1, key=env.key)) == "PROBATION"
    env.clock.now += 3600
    lc.tick()
    assert lc.state.record("m").phase == "COMMITTED"
    env.events.clear()
    return lc


def _tamper(kind: str, bundle: Path, env: Any, zoo: Any) -> None:
    key = env.key
    if kind == "truncated":
        data = (bundle / MODEL_FILE).read_bytes()
        swap_file(bundle, MODEL_FILE, data[: len(data) // 2], key)
    elif kind == "random bytes":
        swap_file(bundle, MODEL_FILE, np.random.default_rng(1).bytes(3000), key)
    elif kind == "other signature":
        swap_file(bundle, MODEL_FILE, zoo("other_signature").read_bytes(), key)
    elif kind == "golden mismatch":
        raw = read_manifest(bundle)
        ins, outs = load_golden((bundle / GOLDEN_FILE).read_bytes(), 1, 1)
        swap_file(bundle, GOLDEN_FILE, dump_golden(ins, [outs[0] + 0.25]), key)
        assert raw["model"]["golden"] != read_manifest(bundle)["model"]["golden"]
    elif kind == "hangs":
        swap_file(bundle, MODEL_FILE, zoo("hang_f32").read_bytes(), key)
    elif kind == "eats memory":
        swap_file(bundle, MODEL_FILE, zoo("memhog_f32").read_bytes(), key)
    elif kind == "unsigned":
        rewrite_manifest(bundle, lambda raw: None, key=None)
    elif kind == "forged":
        rewrite_manifest(bundle, lambda raw: None, key=SigningKey.generate())
    elif kind == "altered after signing":
        raw = read_manifest(bundle)
        raw["policy"] = {"allow_downgrade": True}
        (bundle / MANIFEST_FILE).write_text(json.dumps(raw))
    elif kind == "expired":
        rewrite_manifest(bundle, lambda raw: raw.update(issued_at=1000, expires_at=2000), key)
    elif kind == "not yet valid":
        future = int(env.clock.now) + 86400
        rewrite_manifest(bundle, lambda raw: raw.update(issued_at=future, expires_at=future + 10), key)
    elif kind == "hash mismatch":
        data = bytearray((bundle / MODEL_FILE).read_bytes())
        data[100] ^= 0xFF
        (bundle / MODEL_FILE).write_bytes(bytes(data))
    elif kind == "malformed":
        rewrite_manifest(bundle, lambda raw: raw["model"].update(version="two"), key)
    elif kind == "unknown field":
        rewrite_manifest(bundle, lambda raw: raw.update(extra=True), key)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize("kind, reason", [
    ("truncated", "model does not load"),
    ("random bytes", "model does not load"),
    ("other signature", "signature mismatch: inputs[0] shape is [-1, 5]"),
    ("golden mismatch", "golden sample 0: output 0 differs"),
    ("hangs", "validation timed out"),
    ("eats memory", "warm-up on zeros: invoke failed"),  # the serving path's warm-up, run in the child first
    ("unsigned", "signature: document is not signed"),
    ("forged", "signature: signed with unknown key"),
    ("altered after signing", "signature: signature does not match"),
    ("expired", "document expired"),
    ("not yet valid", "document not yet valid"),
    ("hash mismatch", "SHA-256 does not match"),
    ("malformed", "model.version: expected an integer"),
    ("unknown field", "extra: unknown field"),
])
def test_bad_deployments_are_rejected_and_the_old_model_keeps_serving(
        env: Any, make_bundle: Any, zoo: Any, kind: str, reason: str) -> None:
    limits = {"timeout_s": 3, "memory_mb": 400} if kind in ("hangs", "eats memory") else {}
    lc = _committed_v1(env, make_bundle, validation=limits)
    b2 = make_bundle("dense_f32_v2", version=2, key=env.key)
    _tamper(kind, b2, env, zoo)
    started = time.monotonic()
    assert _install(lc, b2) == "REJECTED"
    assert time.monotonic() - started < 15
    rec = lc.state.record("m")
    assert rec.active is not None and rec.active.version == 1
    assert env.serving.models["m"].version == 1 and env.serving.history[-1] == ("m", 1)
    last = env.events[-1]
    assert last.step == "REJECTED" and not last.ok and reason in (last.reason or "")
    if kind in DOCUMENT_REFUSALS:
        # a document that is not authentic, or not valid now, is answered by an event and saves nothing
        assert last.details.get("refused") is True
        assert rec.phase == "COMMITTED" and rec.last_outcome is not None and rec.last_outcome.result == "committed"
        assert rec.floor == -1
        return
    assert rec.last_outcome is not None and reason in (rec.last_outcome.reason or "")
    env.events.clear()
    assert _install(lc, b2) == "REJECTED"
    if kind == "hash mismatch":
        # the artifact is not the one the document names: nothing is learnt about version 2 itself,
        # so the genuine artifact may still be installed (and this one is refused again)
        assert lc.state.record("m").floor == -1
        assert "SHA-256 does not match" in (env.events[-1].reason or "")
    else:
        # the signed model itself failed: its version is under the floor and never tried again
        assert lc.state.record("m").floor == 2
        assert [e.step for e in env.events] == ["REJECTED"] and "version floor 2" in (env.events[-1].reason or "")


DOCUMENT_REFUSALS = ("unsigned", "forged", "altered after signing", "expired", "not yet valid", "malformed",
                     "unknown field")


def test_not_yet_valid_is_retried_once_the_clock_catches_up(env: Any, make_bundle: Any) -> None:
    lc = _committed_v1(env, make_bundle)
    b2 = make_bundle("dense_f32_v2", version=2, key=env.key)
    soon = int(env.clock.now) + 3600
    rewrite_manifest(b2, lambda raw: raw.update(issued_at=soon, expires_at=soon + 86400), env.key)
    assert _install(lc, b2) == "REJECTED"
    assert "is the clock synchronised?" in (lc.last_refusal or "")
    assert lc.state.record("m").floor == -1
    env.clock.now = soon + 10  # NTP has set the clock
    assert _install(lc, b2) == "PROBATION"


def test_updates_beyond_the_hourly_cap_are_put_off_not_refused(env: Any, make_bundle: Any) -> None:
    lc = env.lifecycle(health={"max_updates_per_hour": 2})
    docs = [read_manifest(make_bundle("dense_f32", version=v, key=env.key)) for v in (1, 2, 3)]
    for raw in docs[:2]:
        signed = lc.precheck(lc.authenticate(raw, None))
        assert signed is not None
        lc.begin(signed)  # as a download would
    from edgefleet.errors import DeploymentRejected

    with pytest.raises(DeploymentRejected, match="2 updates of m in the last hour") as info:
        lc.precheck(lc.authenticate(docs[2], None))
    assert info.value.retry  # put off: not remembered as rejected
    env.clock.now += 3601
    assert lc.precheck(lc.authenticate(docs[2], None)) is not None


def test_too_slow_for_the_latency_limit(env: Any, make_bundle: Any) -> None:
    _committed_v1(env, make_bundle)
    lc = env.lifecycle(validation={"max_latency_ms": 0.5})  # same state directory, stricter config
    assert _install(lc, make_bundle("slow_f32", version=2, key=env.key)) == "REJECTED"
    assert "too slow: p95 latency" in (lc.state.record("m").last_outcome.reason or "")  # type: ignore[union-attr]
    assert "above the limit of 0.5 ms" in (lc.state.record("m").last_outcome.reason or "")  # type: ignore[union-attr]
    # the same limit from the signed policy of the deployment
    lc = env.lifecycle()
    b3 = make_bundle("slow_f32", version=3, key=env.key)
    rewrite_manifest(b3, lambda raw: raw.update(policy={"max_latency_ms": 0.5}), env.key)
    assert _install(lc, b3) == "REJECTED"
    assert lc.state.record("m").active.version == 1  # type: ignore[union-attr]


def test_downgrade_needs_signed_permission(env: Any, make_bundle: Any) -> None:
    lc = env.lifecycle()
    assert _install(lc, make_bundle("dense_f32", version=5, key=env.key)) == "PROBATION"
    old = make_bundle("dense_f32_v2", version=3, key=env.key)
    assert _install(lc, old) == "REJECTED"
    assert "not above the active version 5" in (lc.last_refusal or "")
    stale = make_bundle("dense_f32_v2", version=3, key=env.key)
    rewrite_manifest(stale, lambda raw: raw.update(policy={"allow_downgrade": True}, issued_at=raw["issued_at"] - 60),
                     env.key)
    assert _install(lc, stale) == "REJECTED"  # a permission older than what runs is a replay
    assert "must be issued after the active version's document" in (lc.last_refusal or "")
    allowed = make_bundle("dense_f32_v2", version=3, key=env.key)
    rewrite_manifest(allowed, lambda raw: raw.update(policy={"allow_downgrade": True}, issued_at=raw["issued_at"] + 1),
                     env.key)
    assert _install(lc, allowed) == "PROBATION"
    assert lc.state.record("m").active.version == 3  # type: ignore[union-attr]


def test_size_limits(env: Any, make_bundle: Any) -> None:
    lc = env.lifecycle(security={"max_artifact_bytes": 1000})
    assert _install(lc, make_bundle("dense_f32", version=1, key=env.key)) == "REJECTED"
    assert "above the limit of 1000" in (lc.last_refusal or "")
    assert "m" not in lc.state.models


def test_same_document_twice_is_a_no_op(env: Any, make_bundle: Any) -> None:
    lc = env.lifecycle()
    b1 = make_bundle("dense_f32", version=1, key=env.key)
    _install(lc, b1)
    env.events.clear()
    assert _install(lc, b1) == "PROBATION"
    assert env.events == [] and env.serving.history == [("m", 1)]


@pytest.mark.parametrize("fault, reason", [
    (lambda s: setattr(s, "errors", 5) or setattr(s, "count", 20), "error rate 25.0% over 20 requests"),
    (lambda s: setattr(s, "count", 20) or setattr(s, "p95_ms", 50.0), "p95 latency 50.000 ms is"),
    (lambda s: setattr(s, "count", 20) or setattr(s, "p95_ms", 2.5), "p95 latency 2.500 ms is 2.50x"),
    (lambda s: s.flights.append(time.monotonic() - 60), "an invocation hung for"),
])
def test_probation_rolls_back_on_live_evidence(env: Any, make_bundle: Any, fault: Any, reason: str) -> None:
    lc = _committed_v1(env, make_bundle)
    env.serving.models["m"].stats.count = 100
    env.serving.models["m"].stats.p95_ms = 1.0
    assert _install(lc, make_bundle("dense_f32_v2", version=2, key=env.key)) == "PROBATION"
    assert lc.state.record("m").probation.baseline_p95_ms == 1.0  # type: ignore[union-attr]
    fault(env.serving.models["m"].stats)
    lc.tick()
    rec = lc.state.record("m")
    assert rec.phase == "ROLLED_BACK" and rec.active is not None and rec.active.version == 1
    assert env.serving.history[-1] == ("m", 1)
    assert rec.last_outcome is not None and reason in (rec.last_outcome.reason or "")
    event = env.events[-1]
    assert event.step == "ROLLED_BACK" and reason in (event.reason or "") and event.details["restored_version"] == 1
    assert rec.last_outcome.figures  # the figures that triggered it travel with the outcome
    assert (lc.unhealthy is not None) == ("hung" in reason)
    assert rec.floor == 2  # version 2 failed here: never again without a newer signed permission


def test_small_latency_differences_are_noise(env: Any, make_bundle: Any) -> None:
    lc = _committed_v1(env, make_bundle)
    env.serving.models["m"].stats.count = 100
    env.serving.models["m"].stats.p95_ms = 0.01  # a 10 µs model
    _install(lc, make_bundle("dense_f32_v2", version=2, key=env.key))
    stats = env.serving.models["m"].stats
    stats.count, stats.p95_ms = 50, 0.5  # 50x slower, yet only half a millisecond: within the slack
    lc.tick()
    assert lc.state.record("m").phase == "PROBATION"
    env.clock.now += 31
    lc.tick()
    assert lc.state.record("m").phase == "COMMITTED"


def test_probation_tolerates_few_errors_and_commits(env: Any, make_bundle: Any) -> None:
    lc = _committed_v1(env, make_bundle)
    assert _install(lc, make_bundle("dense_f32_v2", version=2, key=env.key)) == "PROBATION"
    stats = env.serving.models["m"].stats
    stats.count, stats.errors = 100, 2
    lc.tick()
    assert lc.state.record("m").phase == "PROBATION"
    env.clock.now += 31
    lc.tick()
    rec = lc.state.record("m")
    assert rec.phase == "COMMITTED" and rec.previous is not None and rec.previous.version == 1


def test_policy_tightens_but_never_loosens(env: Any, make_bundle: Any) -> None:
    lc = _committed_v1(env, make_bundle)
    b2 = make_bundle("dense_f32_v2", version=2, key=env.key)
    rewrite_manifest(b2, lambda raw: raw.update(policy={"max_error_rate": 0.01, "probation_s": 5}), env.key)
    assert _install(lc, b2) == "PROBATION"
    stats = env.serving.models["m"].stats
    stats.count, stats.errors = 100, 2  # 2 % passes the config's 5 % but not the policy's 1 %
    lc.tick()
    assert lc.state.record("m").phase == "ROLLED_BACK"
    assert "above the limit of 1.0%" in (lc.state.record("m").last_outcome.reason or "")  # type: ignore[union-attr]
    # probation_s = 5 in the policy does not shorten the config's 30 s
    b3 = make_bundle("dense_f32_v2", version=3, key=env.key)
    rewrite_manifest(b3, lambda raw: raw.update(policy={"probation_s": 5}), env.key)
    _install(lc, b3)
    env.clock.now += 10
    lc.tick()
    assert lc.state.record("m").phase == "PROBATION"


def test_boot_counter_rolls_back_a_model_that_kills_the_agent(env: Any, make_bundle: Any) -> None:
    lc = _committed_v1(env, make_bundle, health={"max_boot_failures": 2})
    lc.boot()
    assert _install(lc, make_bundle("dense_f32_v2", version=2, key=env.key)) == "PROBATION"
    # the agent dies (no shutdown): a new one starts on the same state directory
    lc2 = env.lifecycle()
    lc2.boot()
    rec = lc2.state.record("m")
    assert rec.phase == "PROBATION" and rec.probation.boot_failures == 1  # type: ignore[union-attr]
    lc3 = env.lifecycle()
    lc3.boot()
    rec = lc3.state.record("m")
    assert rec.phase == "ROLLED_BACK" and rec.active.version == 1  # type: ignore[union-attr]
    assert "agent died 2 time(s) during probation" in (rec.last_outcome.reason or "")  # type: ignore[union-attr]
    assert env.serving.history[-1] == ("m", 1)


def test_clean_restarts_do_not_count_as_deaths(env: Any, make_bundle: Any) -> None:
    lc = env.lifecycle()
    lc.boot()
    _install(lc, make_bundle("dense_f32", version=1, key=env.key))
    for _ in range(4):
        lc.shutdown()
        lc = env.lifecycle()
        lc.boot()
    rec = lc.state.record("m")
    assert rec.phase == "PROBATION" and rec.probation.boot_failures == 0  # type: ignore[union-attr]


def test_interrupted_steps_fall_back_to_the_active_model(env: Any, make_bundle: Any) -> None:
    lc = _committed_v1(env, make_bundle)
    raw = read_manifest(make_bundle("dense_f32_v2", version=2, key=env.key))
    lc.begin(Signed.parse(Deployment, raw), Phase.VALIDATING)
    lc2 = env.lifecycle()
    lc2.boot()
    rec = lc2.state.record("m")
    assert rec.phase == "COMMITTED" and rec.pending is None and rec.active.version == 1  # type: ignore[union-attr]


def test_manual_rollback_and_last_known_good(env: Any, make_bundle: Any) -> None:
    lc = _committed_v1(env, make_bundle)
    assert _install(lc, make_bundle("dense_f32_v2", version=2, key=env.key)) == "PROBATION"
    # v3 arrives while v2 is still on probation: last-known-good stays v1, never the untested v2
    assert _install(lc, make_bundle("dense_f32", version=3, key=env.key)) == "PROBATION"
    assert lc.state.record("m").previous.version == 1  # type: ignore[union-attr]
    lc.rollback("m", "operator", manual=True)
    rec = lc.state.record("m")
    assert rec.active.version == 1 and rec.previous is None  # type: ignore[union-attr]
    from edgefleet.errors import Conflict

    with pytest.raises(Conflict, match="no previous version"):
        lc.rollback("m", "again", manual=True)


def test_a_rejected_update_during_probation_keeps_the_probation_going(env: Any, make_bundle: Any) -> None:
    lc = _committed_v1(env, make_bundle)
    assert _install(lc, make_bundle("dense_f32_v2", version=2, key=env.key)) == "PROBATION"
    bad = make_bundle("dense_f32", version=3, key=env.key)
    rewrite_manifest(bad, lambda raw: None, key=SigningKey.generate())
    assert _install(lc, bad) == "REJECTED"
    assert lc.state.record("m").phase == "PROBATION"
    rec = lc.state.record("m")
    # a forged document changes nothing saved: v1's outcome is still the last one
    assert rec.active.version == 2 and rec.last_outcome.result == "committed"  # type: ignore[union-attr]
    env.clock.now += 31
    lc.tick()
    assert lc.state.record("m").phase == "COMMITTED"


def test_first_model_failing_probation_leaves_nothing_served(env: Any, make_bundle: Any) -> None:
    lc = env.lifecycle()
    _install(lc, make_bundle("dense_f32", version=1, key=env.key))
    stats = env.serving.models["m"].stats
    stats.count, stats.errors = 20, 20
    lc.tick()
    rec = lc.state.record("m")
    assert rec.phase == "ROLLED_BACK" and rec.active is None and "m" not in env.serving.models


def test_several_models_side_by_side(env: Any, make_bundle: Any) -> None:
    lc = env.lifecycle()
    assert _install(lc, make_bundle("dense_f32", name="alpha", version=1, key=env.key)) == "PROBATION"
    assert _install(lc, make_bundle("dense_int8", name="beta", version=7, key=env.key)) == "PROBATION"
    env.serving.models["alpha"].stats.count = 20
    env.serving.models["alpha"].stats.errors = 20
    lc.tick()
    assert lc.state.record("alpha").phase == "ROLLED_BACK"
    assert lc.state.record("beta").phase == "PROBATION" and lc.state.record("beta").active.version == 7  # type: ignore[union-attr]
    doc = lc.document()
    assert set(doc.models) == {"alpha", "beta"} and doc.models["beta"].active.version == 7  # type: ignore[union-attr]


def test_old_blobs_are_pruned_but_needed_ones_kept(env: Any, make_bundle: Any) -> None:
    lc = env.lifecycle(store={"keep_blobs": 0})
    for v in range(1, 5):
        _install(lc, make_bundle("dense_f32" if v % 2 else "dense_f32_v2", version=v, key=env.key))
        env.clock.now += 3600
        lc.tick()
    rec = lc.state.record("m")
    needed = {rec.active.sha256, rec.active.golden_sha256, rec.previous.sha256, rec.previous.golden_sha256}  # type: ignore[union-attr]
    assert {p.name for p in lc.store.blobs_on_disk()} == needed


def test_state_file_survives_a_torn_write(env: Any, make_bundle: Any) -> None:
    lc = _committed_v1(env, make_bundle)
    _install(lc, make_bundle("dense_f32_v2", version=2, key=env.key))
    path = lc.store.state_path
    path.write_bytes(path.read_bytes()[:20])  # as if the disk lied about the last write
    again = env.lifecycle()  # reads state.json.bak: the state before the activation of v2
    again.boot()
    rec = again.state.record("m")
    assert rec.phase == "COMMITTED" and rec.active.version == 1  # type: ignore[union-attr]
    assert env.serving.history[-1] == ("m", 1)
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]


def test_a_reissued_document_for_the_running_model_is_adopted(env: Any, make_bundle: Any) -> None:
    lc = _committed_v1(env, make_bundle)
    bundle = make_bundle("dense_f32", version=1, key=env.key)  # same model and version, new deployment id
    rewrite_manifest(bundle, lambda raw: raw.update(issued_at=raw["issued_at"] + 1), env.key)
    raw = read_manifest(bundle)
    assert lc.precheck(lc.authenticate(raw, None)) is None  # nothing to install...
    rec = lc.state.record("m")
    assert rec.active.deployment_id == raw["deployment_id"] and rec.phase == "COMMITTED"  # type: ignore[union-attr]
    assert env.events[-1].details.get("adopted") is True and env.events[-1].step == "COMMITTED"
    assert env.serving.history == [("m", 1)]  # ...and nothing reloaded


def test_the_active_document_is_parsed_once_per_record(env: Any, make_bundle: Any, monkeypatch: Any) -> None:
    lc = _committed_v1(env, make_bundle)
    assert _install(lc, make_bundle("dense_f32_v2", version=2, key=env.key)) == "PROBATION"
    parses: list[Any] = []
    real = Deployment.from_dict.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(Deployment, "from_dict", classmethod(lambda cls, value: parses.append(1) or real(cls, value)))
    for _ in range(5):  # probation reads the active document on every tick
        env.clock.now += 1
        lc.tick()
    assert lc.state.record("m").phase == "PROBATION" and parses == []  # kept from the install
    reread = env.lifecycle()  # a record read back from state.json: parsed on first use, then kept
    active = reread.state.record("m").active
    assert active is not None and active.doc is active.doc and active.doc.model.version == 2
    assert len(parses) == 1


def test_actions_raise_domain_errors_and_report_results(env: Any, make_bundle: Any) -> None:
    from edgefleet.agent import actions
    from edgefleet.errors import Conflict, InvalidInput, NotFound

    lc = env.lifecycle()
    with pytest.raises(InvalidInput, match=r"name the model to roll back \(models: none\)"):
        actions.rollback(lc, None)
    result = actions.install_path(lc, make_bundle("dense_f32", version=1, key=env.key))
    assert result.to_dict() == {"model": "m", "phase": "PROBATION", "version": 1, "bundle_version": 1} and result.ok
    lc.commit("m")
    with pytest.raises(NotFound, match="unknown model 'nope'"):
        actions.rollback(lc, "nope")
    with pytest.raises(Conflict, match="m: no previous version to roll back to"):
        actions.rollback(lc, None)  # the only model; nothing kept before it
    assert lc.state.record("m").phase == "COMMITTED"  # a refused action changes nothing
    assert actions.install_path(lc, make_bundle("dense_f32_v2", version=2, key=env.key)).version == 2
    rolled = actions.rollback(lc, "m", reason="ordered by command c-1", ordered_at=123)
    assert rolled == actions.Result("m", Phase.ROLLED_BACK, 1) and not rolled.ok
    assert env.events[-1].reason == "ordered by command c-1" and lc.state.record("m").floor == 2
    forged = make_bundle("dense_f32_v2", version=3, key=SigningKey.generate())
    refused = actions.install_path(lc, forged)
    assert refused.phase is Phase.REJECTED and "signature" in (refused.reason or "")
    assert actions.status(lc).models["m"].phase is Phase.ROLLED_BACK
    with pytest.raises(InvalidInput, match="not a bundle directory"):
        actions.install_path(lc, forged.parent / "no-such-bundle")
