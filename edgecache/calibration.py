"""Thresholds from labeled scores, with a confidence margin on the false-hit rate.

A semantic hit is a bet: the neighbour's cached answer also answers this question. The
operator states how often that bet may be wrong (``max_false_hit_rate``: the share of
non-duplicate pairs that would be served a hit) and calibration turns it into a score
threshold. Choosing the threshold whose *observed* rate on the calibration pairs equals the
target gives a rate on new pairs that exceeds it about half the time, so instead each
candidate threshold carries a one-sided upper confidence bound on its false-hit rate
(Clopper-Pearson by default, Wilson optionally) and the policy takes the lowest threshold
whose bound is within the target. With ``confidence=0.95`` the chosen threshold's true
false-hit rate is within the target with probability at least 95 %, provided new traffic is
distributed like the calibration pairs (it is not a guarantee under distribution shift:
re-calibrate on your own labeled pairs with ``edgecache calibrate``).

Convention: a pair is a hit when ``score > threshold``. Scores may be ``-inf`` (refused
by a guard): those never hit. Pure: stdlib only.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from statistics import NormalDist
from typing import Any

__all__ = [
    "Calibration",
    "CalibrationRow",
    "calibrate",
    "clopper_pearson_upper",
    "wilson_upper",
]

METHODS = ("clopper-pearson", "wilson")


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _beta_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of the incomplete beta function, by the modified Lentz method."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return result


def _regularized_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(1.0 - x, b, a) / b


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k >= n:
        return 1.0
    return _regularized_beta(1.0 - p, n - k, k + 1)


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on a rate after ``k`` events in ``n`` trials.

    The largest p with P(X <= k | n, p) >= 1 - confidence (exact; conservative).
    """
    if n <= 0:
        return 1.0
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    alpha = 1.0 - confidence
    if k == n:
        return 1.0
    if k == 0:
        return 1.0 - alpha ** (1.0 / n)
    lo, hi = k / n, min(1.0, 1.25 * wilson_upper(k, n, confidence) + 1.0 / n)
    if _binomial_cdf(k, n, hi) > alpha:    # the Wilson bracket missed (tiny n): search all of it
        hi = 1.0
    # Solve CDF(p) = alpha (the CDF falls as p rises) by Newton steps kept inside [lo, hi],
    # bisecting when a step would leave it. d/dp P(X <= k) = -n * C(n-1, k) p^k (1-p)^(n-1-k).
    log_c = math.lgamma(n) - math.lgamma(k + 1) - math.lgamma(n - k)
    p = (lo + hi) / 2
    for _ in range(200):
        f = _binomial_cdf(k, n, p) - alpha
        if f > 0:
            lo = p
        else:
            hi = p
        slope = -n * math.exp(log_c + k * math.log(p) + (n - 1 - k) * math.log1p(-p))
        step = p - f / slope if slope < 0 else -1.0
        if abs(step - p) < 1e-12 * max(p, 1e-6) or hi - lo < 1e-13:
            return min(1.0, max(p, step))
        p = step if lo < step < hi else (lo + hi) / 2
    return hi


def wilson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Wilson score upper bound on a rate after ``k`` events in ``n`` trials."""
    if n <= 0:
        return 1.0
    z = NormalDist().inv_cdf(confidence)
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z * z / n))


@dataclass(frozen=True, slots=True)
class CalibrationRow:
    """One candidate threshold: its false hits on the calibration non-duplicates, the upper
    confidence bound on its false-hit rate, and its hit rate on the calibration duplicates."""

    threshold: float
    false_hits: int
    upper_bound: float
    hit_rate: float


@dataclass(frozen=True, slots=True)
class Calibration:
    """Candidate thresholds, strictest first (upper bounds rising), from one labeled sample.

    negatives/positives: sample sizes. confidence: of the one-sided bound. method:
    ``clopper-pearson`` or ``wilson``.
    """

    rows: tuple[CalibrationRow, ...]
    negatives: int
    positives: int
    confidence: float
    method: str = "clopper-pearson"

    @property
    def min_rate(self) -> float:
        """The smallest target this table supports (the bound of its strictest threshold)."""
        return self.rows[0].upper_bound if self.rows else 1.0

    def row_for(self, max_false_hit_rate: float) -> CalibrationRow:
        """The loosest threshold whose bound is within the target; ValueError when none is."""
        if not self.rows or max_false_hit_rate < self.rows[0].upper_bound:
            raise ValueError(
                f"max_false_hit_rate {max_false_hit_rate:g} is below what this calibration supports "
                f"({self.min_rate:.4g} at {self.confidence:.0%} confidence with {self.negatives} "
                "non-duplicate pairs): calibrate on more labeled pairs or raise the target")
        best = self.rows[0]
        for row in self.rows:
            if row.upper_bound <= max_false_hit_rate:
                best = row
            else:
                break
        return best

    def threshold_for(self, max_false_hit_rate: float) -> float:
        return self.row_for(max_false_hit_rate).threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "confidence": self.confidence,
            "negatives": self.negatives, "positives": self.positives,
            "columns": ["threshold", "false_hits", "upper_bound", "hit_rate"],
            "rows": [[round(r.threshold, 6), r.false_hits, round(r.upper_bound, 6), round(r.hit_rate, 5)]
                     for r in self.rows],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        rows = tuple(CalibrationRow(float(t), int(k), float(u), float(h)) for t, k, u, h in data["rows"])
        if any(b.upper_bound < a.upper_bound or b.threshold > a.threshold for a, b in pairwise(rows)):
            raise ValueError("calibration rows must go from strict to loose")
        return cls(rows, int(data["negatives"]), int(data["positives"]), float(data["confidence"]),
                   str(data.get("method", "clopper-pearson")))


def calibrate(scores: Sequence[float], labels: Sequence[int], *, confidence: float = 0.95,
              method: str = "clopper-pearson", max_rate: float = 0.2, max_rows: int = 400) -> Calibration:
    """Candidate thresholds from scores of labeled pairs (label 1: duplicate, hit allowed).

    Each candidate is a non-duplicate's score, so a hit at ``score > threshold`` lets through
    exactly the non-duplicates above it. Candidates stop where the bound passes ``max_rate``;
    at most ``max_rows`` are kept (every one of the strictest, then evenly spread).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    if len(scores) != len(labels):
        raise ValueError("scores and labels differ in length")
    bound = clopper_pearson_upper if method == "clopper-pearson" else wilson_upper
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    n_neg, n_pos = len(neg), len(pos)
    neg_ascending = sorted(-s for s in neg)
    if n_neg == 0:
        raise ValueError("calibration needs non-duplicate pairs (label 0)")
    thresholds = sorted({s for s in neg if math.isfinite(s)}, reverse=True)
    if not thresholds:
        raise ValueError("calibration needs a non-duplicate pair with a finite score")
    # Candidate i lets through the non-duplicates strictly above thresholds[i]; the bound rises
    # with their count, so find the last candidate within max_rate by bisection, then thin.
    false_hits = [bisect_left(neg_ascending, -t) for t in thresholds]   # count of neg > t
    lo, hi = 0, len(thresholds) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if bound(false_hits[mid], n_neg, confidence) <= max_rate:
            lo = mid
        else:
            hi = mid - 1
    keep = list(range(lo + 1))
    if len(keep) > max_rows:
        head, tail = keep[: max_rows // 2], keep[max_rows // 2:]
        step = (len(tail) - 1) / (max_rows - len(head) - 1)
        keep = head + [tail[round(i * step)] for i in range(max_rows - len(head))]
    pos_ascending = sorted(-s for s in pos)
    rows = tuple(CalibrationRow(thresholds[i], false_hits[i], bound(false_hits[i], n_neg, confidence),
                                bisect_left(pos_ascending, -thresholds[i]) / n_pos if n_pos else 0.0)
                 for i in keep)
    return Calibration(rows, n_neg, n_pos, confidence, method)
