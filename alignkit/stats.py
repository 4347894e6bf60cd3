"""Intervals more than one stage reports: pure functions, checkable by hand."""

from __future__ import annotations

import math

from scipy import stats as _st


def _z(confidence: float) -> float:
    return float(_st.norm.ppf(0.5 + confidence / 2))


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> list[float | None]:
    """Wilson score interval for a proportion ``p = successes / n`` (``successes`` may be a
    half-integer when ties count half)::

        center = (p + z²/2n) / (1 + z²/n)
        half   = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²)

    Unlike the normal (Wald) interval it stays inside [0, 1] and is not zero-width at p = 0 or 1.
    """
    if n <= 0:
        return [None, None]
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return [max(0.0, center - half), min(1.0, center + half)]
