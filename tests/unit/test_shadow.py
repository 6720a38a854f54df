"""Shadow probation's parts with fakes: comparing outputs, sampling off the request path, the verdicts, and
how a signed policy combines with the agent's defaults."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.config import AgentConfig, ShadowConfig
from edgefleet.agent.lifecycle.shadow import ShadowLimits, judge
from edgefleet.agent.serving.shadow import Comparator, ShadowFigures, ShadowRunner
from edgefleet.protocol.documents import ShadowPolicy

SCORES = np.array([[0.1, 0.7, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1]], dtype=np.float32)


def test_classifiers_agree_on_the_top_class_whatever_the_scores() -> None:
    cmp = Comparator(classes=(0, 0))
    softer = np.array([[0.2, 0.4, 0.2, 0.2], [0.5, 0.3, 0.1, 0.1]], dtype=np.float32)
    assert cmp.agree([SCORES], [softer])
    assert not cmp.agree([SCORES], [SCORES[:, [1, 2, 3, 0]]])  # one instance of two moved is a disagreement
    assert not cmp.agree([SCORES], [SCORES[:1]])  # another batch size


def test_top_classes_are_compared_by_label_name_when_both_have_labels() -> None:
    labels = ("cat", "dog", "bird", "fish")
    # the same scores under a label list in another order: the client would read other names
    assert not Comparator(classes=(0, 0), active_labels=labels,
                          candidate_labels=("dog", "cat", "bird", "fish")).agree([SCORES], [SCORES])
    # permuted columns with the labels permuted alike: the same answers
    assert Comparator(classes=(0, 0), active_labels=labels, candidate_labels=("fish", "cat", "dog", "bird")).agree(
        [SCORES], [SCORES[:, [3, 0, 1, 2]]])


def test_other_outputs_agree_within_their_tolerance() -> None:
    a = np.array([[1.0, 2.0]], dtype=np.float32)
    cmp = Comparator(tolerances=((0.01, 0.0),))
    assert cmp.agree([a], [a + 0.005])
    assert not cmp.agree([a], [a + 0.05])
    assert not cmp.agree([a], [a, a])  # another number of outputs
    assert not cmp.agree([a], [a.reshape(2, 1)])


class _Fake:
    """A candidate run whose answer, time and failure the test sets; it can be held to fill the queue."""

    def __init__(self, answer: list[Any], seconds: float = 0.002) -> None:
        self.answer, self.seconds = answer, seconds
        self.fail: str | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.calls = 0

    def __call__(self, inputs: Any, batch_dim: bool) -> tuple[list[Any], float]:
        self.gate.wait(5)
        self.calls += 1
        if self.fail:
            raise RuntimeError(self.fail)
        return self.answer, self.seconds


def _runner(run: _Fake, *, rate: float = 1.0, queue_size: int = 4, draws: list[float] | None = None,
            active_ms: float | None = 1.0) -> ShadowRunner:
    values = iter(draws) if draws is not None else None
    return ShadowRunner("m-v2", "m-v1", run, Comparator(classes=(0, 0)), sample_rate=rate, queue_size=queue_size,
                        active_p50_ms=lambda _window: active_ms,
                        draw=(lambda: next(values)) if values is not None else (lambda: 0.0))


def test_only_the_sampled_share_is_queued() -> None:
    run = _Fake([SCORES])
    r = _runner(run, rate=0.2, draws=[0.1, 0.5, 0.19, 0.2, 0.9])
    r.start()
    try:
        for _ in range(5):
            r.offer([np.zeros((2, 8), np.float32)], True, [SCORES], [None])
        deadline = time.monotonic() + 5
        while r.figures().samples < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        f = r.figures()
        assert (f.samples, f.agreed, f.dropped) == (2, 2, 0)
    finally:
        r.stop()


def test_a_busy_candidate_never_holds_up_the_request_thread() -> None:
    run = _Fake([SCORES])
    run.gate.clear()  # the candidate is stuck on its first sample
    r = _runner(run, queue_size=2)
    r.start()
    try:
        started = time.monotonic()
        for _ in range(50):
            r.offer([np.zeros((2, 8), np.float32)], True, [SCORES], [None])
        assert time.monotonic() - started < 0.5
        assert r.figures().dropped >= 45
    finally:
        run.gate.set()
        r.stop()
    assert run.calls <= 3


def test_inputs_are_copied_when_sampled() -> None:
    seen: list[Any] = []
    r = ShadowRunner("m-v2", "m-v1", lambda inputs, b: (seen.append(inputs[0].copy()), ([SCORES], 0.001))[1],
                     Comparator(classes=(0, 0)), sample_rate=1.0, queue_size=4)
    x = np.zeros((2, 8), np.float32)
    r.offer([x], True, [SCORES], [None])
    x[:] = 7.0  # the caller reuses its buffer once answered
    r.compare(*r._queue.get_nowait())
    assert float(seen[0].max()) == 0.0


def test_a_failing_candidate_counts_as_disagreeing_and_its_error_is_kept() -> None:
    run = _Fake([SCORES])
    run.fail = "invoke failed: gather index out of bounds"
    r = _runner(run)
    assert r.compare([np.zeros((2, 8), np.float32)], True, [SCORES], [None]) is False
    f = r.figures()
    assert (f.samples, f.agreed, f.errors) == (1, 0, 1) and "gather index" in (f.last_error or "")


def test_latency_ratio_is_the_candidates_median_over_the_actives() -> None:
    r = _runner(_Fake([SCORES], seconds=0.003), active_ms=1.5)
    for _ in range(3):
        r.compare([np.zeros((2, 8), np.float32)], True, [SCORES], [None])
    f = r.figures()
    assert f.candidate_p50_ms == pytest.approx(3.0) and f.latency_ratio == pytest.approx(2.0)


def _limits(**kw: Any) -> ShadowLimits:
    base = dict(sample_rate=0.2, min_samples=100, min_agreement=0.98, atol=None, rtol=None, max_latency_ratio=1.5,
                latency_slack_ms=1.0, window_s=60.0, queue_size=16)
    return ShadowLimits(**{**base, **kw})  # type: ignore[arg-type]


def _figures(samples: int, agreed: int, *, elapsed: float = 10.0, cand: float | None = 1.0,
             active: float | None = 1.0) -> ShadowFigures:
    return ShadowFigures(deployment_id="m-v2", samples=samples, agreed=agreed, errors=0, dropped=0,
                         elapsed_s=elapsed, candidate_p50_ms=cand, active_p50_ms=active)


def test_verdicts() -> None:
    limits = _limits()
    assert limits.max_disagreements == 2
    assert judge(limits, _figures(50, 48)) is None  # 2 disagreements may still pass: keep collecting
    early = judge(limits, _figures(3, 0))
    assert early is not None and not early.passed and not early.retry
    assert "disagreed with the active model on 3 of 3" in early.reason and early.figures["agreement"] == 0.0
    passed = judge(limits, _figures(100, 99))
    assert passed is not None and passed.passed and passed.figures["agreement"] == 0.99
    slow = judge(limits, _figures(100, 100, cand=4.0, active=1.0))
    assert slow is not None and not slow.passed and "4.00x" in slow.reason
    # microsecond models: a large ratio within the slack is noise
    tiny = judge(limits, _figures(100, 100, cand=0.04, active=0.01))
    assert tiny is not None and tiny.passed
    quiet = judge(limits, _figures(7, 7, elapsed=60.0))
    assert quiet is not None and not quiet.passed and quiet.retry
    assert "not enough traffic: 7 of 100 requests compared in 60 s" in quiet.reason


def test_a_signed_policy_only_tightens_the_agents_thresholds() -> None:
    config = AgentConfig(shadow=ShadowConfig(min_samples=200, min_agreement=0.98, max_latency_ratio=1.5, atol=0.01))
    loose = ShadowLimits.effective(config, ShadowPolicy(min_samples=10, min_agreement=0.5, max_latency_ratio=3.0,
                                                        atol=0.1))
    assert (loose.min_samples, loose.min_agreement, loose.max_latency_ratio, loose.atol) == (200, 0.98, 1.5, 0.01)
    strict = ShadowLimits.effective(config, ShadowPolicy(min_samples=500, min_agreement=0.999, max_latency_ratio=1.1,
                                                         rtol=0.001, sample_rate=0.5, window_s=30))
    assert (strict.min_samples, strict.min_agreement, strict.max_latency_ratio, strict.rtol) == (500, 0.999, 1.1, 0.001)
    assert (strict.sample_rate, strict.window_s) == (0.5, 30)  # not thresholds: the policy's own
    defaults = ShadowLimits.effective(config, ShadowPolicy())
    assert (defaults.sample_rate, defaults.window_s) == (0.2, 600.0)
