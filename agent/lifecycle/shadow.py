"""Shadow probation: before the switch, the candidate must agree with the active model on live requests
(docs/architecture.md, "The update lifecycle"; docs/operations.md, "Shadow probation").

`judge` reads what the shadow run measured (agent/serving/shadow.py) and returns a `ShadowVerdict`
(activate, reject) or None to keep collecting. It decides only; the lifecycle acts on the verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.serving.shadow import ShadowFigures
from edgefleet.protocol.documents import ShadowPolicy


@dataclass(frozen=True)
class ShadowLimits:
    """The agent's `[shadow]` defaults after a deployment's signed `policy.shadow` has set its own.

    Thresholds only tighten: more samples, higher agreement, smaller tolerances and latency ratio win.
    The sample rate and the window are the policy's when it gives them (they cost time and CPU, they
    lower no bar)."""

    sample_rate: float
    min_samples: int
    min_agreement: float
    atol: float | None
    rtol: float | None
    max_latency_ratio: float
    latency_slack_ms: float
    window_s: float
    queue_size: int

    @classmethod
    def effective(cls, config: AgentConfig, policy: ShadowPolicy) -> ShadowLimits:
        """Config defaults, with the policy's values in their place (thresholds: only if stricter)."""
        c, p = config.shadow, policy
        return cls(
            sample_rate=p.sample_rate if p.sample_rate is not None else c.sample_rate,
            min_samples=max(c.min_samples, p.min_samples or 0),
            min_agreement=max(c.min_agreement, p.min_agreement or 0.0),
            atol=_smallest(c.atol, p.atol),
            rtol=_smallest(c.rtol, p.rtol),
            max_latency_ratio=min(c.max_latency_ratio, p.max_latency_ratio or math.inf),
            latency_slack_ms=c.latency_slack_ms,
            window_s=p.window_s if p.window_s is not None else c.window_s,
            queue_size=c.queue_size,
        )

    @property
    def max_disagreements(self) -> int:
        """Disagreements `min_samples` may hold and still pass: one more rejects at once."""
        return math.floor((1.0 - self.min_agreement) * self.min_samples + 1e-9)


def _smallest(*values: float | None) -> float | None:
    given = [v for v in values if v is not None]
    return min(given) if given else None


@dataclass(frozen=True)
class ShadowVerdict:
    """The end of a shadow run: activate (`passed`) or reject, why, and the figures it rests on."""

    passed: bool
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)
    retry: bool = False
    """The rejection says nothing against the model (not enough traffic): no version floor is raised."""


def figures_of(run: ShadowFigures, limits: ShadowLimits) -> dict[str, Any]:
    """The figures events, outcomes and the state document carry (rounded; None when not known yet)."""
    agreement, ratio = run.agreement, run.latency_ratio
    return {
        "samples": run.samples, "min_samples": limits.min_samples,
        "agreement": round(agreement, 4) if agreement is not None else None,
        "min_agreement": limits.min_agreement, "disagreements": run.samples - run.agreed, "errors": run.errors,
        "dropped": run.dropped,
        "latency_ratio": round(ratio, 3) if ratio is not None else None,
        "candidate_p50_ms": round(run.candidate_p50_ms, 4) if run.candidate_p50_ms is not None else None,
        "active_p50_ms": round(run.active_p50_ms, 4) if run.active_p50_ms is not None else None,
        "elapsed_s": round(run.elapsed_s, 1), "window_s": limits.window_s,
    }


def judge(limits: ShadowLimits, run: ShadowFigures) -> ShadowVerdict | None:
    """Reject as soon as the disagreements can no longer pass, decide at `min_samples`, reject when the
    window ends first; None: keep collecting."""
    figures = figures_of(run, limits)
    disagreements = run.samples - run.agreed
    errors = f" ({run.errors} failed: {run.last_error})" if run.errors else ""
    if disagreements > limits.max_disagreements:
        agreement = run.agreed / run.samples
        return ShadowVerdict(False, f"shadow: the candidate disagreed with the active model on {disagreements} of "
                                    f"{run.samples} live requests{errors} (agreement {agreement:.1%}, at least "
                                    f"{limits.min_agreement:.1%} over {limits.min_samples} needed)", figures)
    if run.samples >= limits.min_samples:
        ratio = run.latency_ratio
        cand, active = run.candidate_p50_ms, run.active_p50_ms
        if ratio is not None and cand is not None and active is not None and ratio > limits.max_latency_ratio \
                and cand - active > limits.latency_slack_ms:
            return ShadowVerdict(False, f"shadow: the candidate's median invoke {cand:.3f} ms is {ratio:.2f}x the "
                                        f"active model's {active:.3f} ms (limit {limits.max_latency_ratio:g}x)",
                                 figures)
        return ShadowVerdict(True, "", figures)
    if run.elapsed_s >= limits.window_s:
        return ShadowVerdict(False, f"shadow: not enough traffic: {run.samples} of {limits.min_samples} requests "
                                    f"compared in {limits.window_s:g} s (sample rate {limits.sample_rate:g}); "
                                    "push again when the device is busier", figures, retry=True)
    return None
