"""Paired statistics for the accuracy gate: the same samples through the float and the converted model.

Only the discordant pairs carry information about the difference: `b` samples the float model gets
right and the converted one wrong, `c` the other way round, out of `n`. The accuracy drop is
``(b - c) / n``.

- ``mcnemar_exact_p``: the exact McNemar test, a two-sided binomial test of `b` out of `b + c` at 1/2
  (H0: both models are equally accurate).
- ``drop_interval``: Tango's score interval for the difference of paired proportions. It is used
  instead of the exact conditional interval (Clopper-Pearson on ``b / (b + c)`` scaled by
  ``(b + c) / n``) because that one treats the number of disagreements as fixed: with no
  disagreement it collapses to [0, 0] whatever `n` is, which claims certainty that 50 samples do not
  give. The score interval accounts for the disagreement rate and keeps close to its nominal coverage
  with a handful of discordant pairs (Tango 1998; Fagerland, Lydersen & Laake 2013).
- ``clopper_pearson``: the exact interval of a single proportion (top-1 agreement with the float model).
- ``samples_to_settle``: how many evaluation samples, at the rates observed, would put the interval
  on one side of a limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from scipy import optimize, stats

CONFIDENCE = 0.95
# Beyond this many samples an evaluation set is not a practical request; say so instead.
MAX_SETTLE_SAMPLES = 10_000_000


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: twice the smaller binomial tail of `b` out of `b + c` at 1/2."""
    d = b + c
    if d == 0:
        return 1.0
    return float(min(1.0, 2.0 * stats.binom.cdf(min(b, c), d, 0.5)))


def clopper_pearson(k: float, n: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided interval of a proportion `k / n`."""
    if n <= 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    low = 0.0 if k <= 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k >= n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def _restricted_p01(b: float, c: float, n: float, delta: float) -> float:
    """Maximum-likelihood P(converted-only correct) when the drop p10 - p01 is held at `delta`.

    Setting the derivative of b·log(t + δ) + c·log(t) + m·log(1 − 2t − δ) to zero gives
    2n·t² − B·t − c·δ(1 − δ) = 0 with B = b(1 − δ) + c(1 − 3δ) − 2mδ; the positive root is the maximum.
    """
    m = n - b - c
    big_b = b * (1 - delta) + c * (1 - 3 * delta) - 2 * m * delta
    disc = max(0.0, big_b * big_b + 8 * n * c * delta * (1 - delta))
    t = (big_b + math.sqrt(disc)) / (4 * n)
    return min(max(t, max(0.0, -delta)), (1 - delta) / 2)


def score(b: float, c: float, n: float, delta: float) -> float:
    """Tango's score statistic for H0: drop = `delta` (positive when the observed drop is smaller)."""
    num = b - c - n * delta
    if num == 0:
        return 0.0
    t = _restricted_p01(b, c, n, delta)
    var = n * (2 * t + delta - delta * delta)
    if var <= 0:
        return math.copysign(math.inf, num)
    return num / math.sqrt(var)


def drop_interval(b: float, c: float, n: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided score interval of the drop ``(b - c) / n`` (fractions, not points)."""
    if n <= 0:
        return -1.0, 1.0
    z = float(stats.norm.ppf(1 - (1 - confidence) / 2))
    est = (b - c) / n
    eps = 1e-12
    if est <= -1 + eps:
        low = -1.0
    else:
        low = float(optimize.brentq(lambda d: score(b, c, n, d) - z, -1 + eps, est, xtol=1e-12))
    if est >= 1 - eps:
        high = 1.0
    else:
        high = float(optimize.brentq(lambda d: score(b, c, n, d) + z, est, 1 - eps, xtol=1e-12))
    return low, high


def samples_to_settle(b: int, c: int, n: int, limit: float, confidence: float = CONFIDENCE) -> int | None:
    """Evaluation samples that would put the drop interval wholly on one side of `limit` (a fraction),
    assuming the discordance rates observed; None when the estimate sits on the limit or it needs more
    than MAX_SETTLE_SAMPLES."""
    if n <= 0 or (b - c) / n == limit:
        return None

    def settled(size: float) -> bool:
        f = size / n
        low, high = drop_interval(b * f, c * f, size, confidence)
        return low > limit or high <= limit

    return _smallest_settling(n, settled)


def agreement_to_settle(k: int, n: int, limit: float, confidence: float = CONFIDENCE) -> int | None:
    """Like samples_to_settle for a single proportion `k / n` (top-1 agreement) against `limit`."""
    if n <= 0 or k / n == limit:
        return None

    def settled(size: float) -> bool:
        low, high = clopper_pearson(k * size / n, size, confidence)
        return high < limit or low >= limit

    return _smallest_settling(n, settled)


def _smallest_settling(n: int, settled: Callable[[float], bool]) -> int | None:
    """The smallest sample count (at least `n`) at which `settled` holds, with the same observed rates:
    doubling until it does, then bisecting; None beyond MAX_SETTLE_SAMPLES."""
    if settled(n):
        return n
    low_n, high_n = float(n), float(n)
    while not settled(high_n):
        low_n, high_n = high_n, high_n * 2
        if high_n > MAX_SETTLE_SAMPLES:
            return None
    while high_n - low_n > 1:
        mid = (low_n + high_n) / 2
        low_n, high_n = (low_n, mid) if settled(mid) else (mid, high_n)
    return int(math.ceil(high_n))
