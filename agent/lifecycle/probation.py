"""Probation: after activation, live evidence decides whether a model stays (docs/architecture.md,
"The update lifecycle").

`judge` reads what the serving path measured since the switch and returns a `Verdict` (roll back,
commit) or None to keep watching. It decides only; the lifecycle acts on the verdict.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.lifecycle.store import Probation
from edgefleet.protocol.documents import Deployment


class StatsLike(Protocol):
    """What probation reads from the serving path."""

    @property
    def count(self) -> int: ...  # noqa: D102
    @property
    def errors(self) -> int: ...  # noqa: D102
    def snapshot(self, window_s: float | None = None) -> Any: ...  # noqa: D102
    def in_flight(self) -> list[float]: ...  # noqa: D102


class ServedLike(Protocol):
    """A model the serving path holds."""

    @property
    def stats(self) -> StatsLike: ...  # noqa: D102


@dataclass(frozen=True)
class Limits:
    """Probation limits after a deployment's signed policy has tightened the config's."""

    probation_s: float
    max_error_rate: float
    max_latency_ratio: float
    hang_timeout_s: float
    min_requests: int
    latency_slack_ms: float

    @classmethod
    def effective(cls, config: AgentConfig, doc: Deployment) -> Limits:
        """Config limits, tightened (never loosened) by the policy."""
        h, p = config.health, doc.policy
        return cls(
            probation_s=max(h.probation_s, p.probation_s or 0.0),
            max_error_rate=min(h.max_error_rate, p.max_error_rate if p.max_error_rate is not None else 1.0),
            max_latency_ratio=min(h.max_latency_ratio, p.max_latency_ratio or float("inf")),
            hang_timeout_s=min(h.hang_timeout_s, p.hang_timeout_s or float("inf")),
            min_requests=h.min_requests,
            latency_slack_ms=h.latency_slack_ms,
        )


class Decision(str, Enum):
    """What probation decided."""

    ROLLBACK = "rollback"
    COMMIT = "commit"


@dataclass(frozen=True)
class Verdict:
    """The end of a probation: the decision, why (empty for a commit), and the figures it rests on
    (saved in the outcome and sent with the event)."""

    decision: Decision
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def hung(self) -> bool:
        """An invocation hung: the stuck thread keeps its interpreter, only a restart frees it."""
        return "hung_s" in self.figures


def judge(limits: Limits, probation: Probation, served: ServedLike | None, now: float) -> Verdict | None:
    """Roll back on live evidence, commit once the window passed, else None (keep watching).

    `now` is wall-clock time (probation's start is saved, so it survives a restart); hangs are measured
    on the monotonic clock, as the serving path records invocations.
    """
    assert probation.started_at is not None
    elapsed = now - probation.started_at
    figures: dict[str, Any] = {"elapsed_s": round(elapsed, 3)}
    if served is not None:
        stats = served.stats
        mono = time.monotonic()
        hung = [mono - t for t in stats.in_flight() if mono - t > limits.hang_timeout_s]
        if hung:
            figures["hung_s"] = round(max(hung), 3)
            return Verdict(Decision.ROLLBACK, f"an invocation hung for {max(hung):.1f}s (limit "
                                              f"{limits.hang_timeout_s:g}s)", figures)
        count, errors = stats.count, stats.errors
        figures.update(requests=count, errors=errors)
        judged = count >= limits.min_requests or (elapsed >= limits.probation_s and count > 0)
        if judged:
            rate = errors / count
            figures["error_rate"] = round(rate, 4)
            if rate > limits.max_error_rate:
                return Verdict(Decision.ROLLBACK, f"error rate {rate:.1%} over {count} requests is above the "
                                                  f"limit of {limits.max_error_rate:.1%}", figures)
        snap = stats.snapshot(None)
        p95 = getattr(snap, "p95_ms", None)
        base = probation.baseline_p95_ms
        if p95 is not None:
            figures["p95_ms"] = round(float(p95), 4)
        if base is not None:
            figures["baseline_p95_ms"] = round(base, 4)
        if count >= limits.min_requests and p95 is not None and base is not None and base > 0:
            ratio = float(p95) / base
            figures["latency_ratio"] = round(ratio, 3)
            if ratio > limits.max_latency_ratio and float(p95) - base > limits.latency_slack_ms:
                return Verdict(Decision.ROLLBACK, f"p95 latency {float(p95):.3f} ms is {ratio:.2f}x the previous "
                                                  f"model's {base:.3f} ms (limit {limits.max_latency_ratio:g}x)",
                               figures)
    if elapsed >= limits.probation_s:
        return Verdict(Decision.COMMIT, "", figures)
    return None
