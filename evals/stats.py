"""The statistics of ``alignkit eval``: pure functions on lists of numbers, checkable by hand.

* :func:`mean_ci` -- mean with a Student-t 95% interval.
* :func:`win_rate` -- per-prompt comparison of a model with a baseline (ties count half), with a
  Wilson interval on the prompts where one side won, scaled by their share.
* :func:`length_controlled_win_rate` -- the win rate after removing the part of each per-prompt
  reward difference that a linear fit attributes to the length difference.
* :func:`distinct_n` -- corpus-level distinct-n (Li et al., 2016).
* :func:`proportion_over_prompts` -- a pass rate with an interval over prompts when each prompt
  has several replies.

See ``docs/evaluation.md`` for what each number means and why these estimators.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as _st

from alignkit.stats import wilson_interval


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict:
    """``{"mean", "ci": [lo, hi], "std", "n"}``: mean ± t(n-1) · s / sqrt(n), s the sample std.

    With one value the interval is ``[None, None]``; with none the mean is None too.
    """
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return {"mean": None, "ci": [None, None], "std": None, "n": 0}
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "ci": [None, None], "std": None, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(_st.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "ci": [mean - half, mean + half], "std": sd, "n": n}


def outcomes(diffs: Sequence[float], tie_tolerance: float = 0.0) -> list[float]:
    """Per-prompt outcome of a difference ``model - baseline``: 1 win, 0.5 tie, 0 loss."""
    return [1.0 if d > tie_tolerance else 0.0 if d < -tie_tolerance else 0.5 for d in diffs]


def win_rate(model_scores: Sequence[float], baseline_scores: Sequence[float], confidence: float = 0.95,
             tie_tolerance: float = 0.0) -> dict:
    """How often the model's score beats the baseline's on the same prompt.

    ``win_rate = (wins + ties / 2) / n``; a tie is ``|difference| <= tie_tolerance``. See
    :func:`tie_aware_interval` for the interval.
    """
    if len(model_scores) != len(baseline_scores):
        raise ValueError(f"win_rate: {len(model_scores)} model scores but {len(baseline_scores)} baseline scores")
    diffs = [float(a) - float(b) for a, b in zip(model_scores, baseline_scores)]
    return _summarise(diffs, confidence, tie_tolerance)


def tie_aware_interval(wins: int, ties: int, losses: int, confidence: float = 0.95) -> list[float | None]:
    """Interval for ``(wins + ties/2) / n`` that treats a tie as the certain 0.5 it is.

    With ``m = wins + losses`` decisive prompts, ``win_rate = 0.5 + (m/n)·(q - 0.5)`` where
    ``q = wins / m`` is the chance of winning a prompt that is not a tie. Conditioning on the
    number of ties (as the sign test does), only ``q`` is uncertain; its Wilson interval on ``m``
    trials, mapped through that line, is the interval::

        [lo, hi] = 0.5 + (m/n) · (wilson(wins, m) - 0.5)

    Without ties it is the Wilson interval on ``n``. With ties it is narrower than a Wilson
    interval on ``n`` that counts each tie as half a success, which would charge every tie the
    variance of a coin flip: with 28 ties among 47 prompts it is 1.9 times as wide
    (docs/evaluation.md has the numbers). When every prompt is a tie (``m = 0``) the interval is ``[0.5, 0.5]``: on these prompts
    the two models cannot be told apart.
    """
    n, m = wins + ties + losses, wins + losses
    if n == 0:
        return [None, None]
    if m == 0:
        return [0.5, 0.5]
    lo, hi = wilson_interval(wins, m, confidence)
    rate = (wins + ties / 2) / n  # the ends may miss it by rounding when wins or losses is 0: clamp
    return [min(0.5 + m / n * (lo - 0.5), rate), max(0.5 + m / n * (hi - 0.5), rate)]


def _summarise(diffs: list[float], confidence: float, tie_tolerance: float) -> dict:
    o = outcomes(diffs, tie_tolerance)
    n = len(o)
    wins, ties = sum(1 for v in o if v == 1.0), sum(1 for v in o if v == 0.5)
    score = wins + 0.5 * ties
    return {
        "win_rate": score / n if n else None,
        "ci": tie_aware_interval(wins, ties, n - wins - ties, confidence),
        "wins": wins, "ties": ties, "losses": n - wins - ties, "n": n,
        "mean_difference": sum(diffs) / n if n else None,
    }


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Ordinary least squares ``y ≈ intercept + slope · x`` -> ``(intercept, slope)``.

    ``slope = Σ(x-x̄)(y-ȳ) / Σ(x-x̄)²``, ``intercept = ȳ - slope·x̄``; when all ``x`` are equal
    the slope cannot be estimated and is 0.
    """
    n = len(x)
    if n == 0:
        return 0.0, 0.0
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    if sxx == 0:
        return my, 0.0
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    return my - slope * mx, slope


def length_controlled_win_rate(model_scores: Sequence[float], baseline_scores: Sequence[float],
                               model_lengths: Sequence[float], baseline_lengths: Sequence[float],
                               confidence: float = 0.95, tie_tolerance: float = 1e-9) -> dict:
    """Win rate with the length effect regressed out.

    Per prompt ``i``: reward difference ``d_i = r_model - r_base`` and length difference
    ``l_i = len_model - len_base``. Fit ``d_i ≈ a + b·l_i`` by least squares (:func:`linear_fit`);
    ``b`` is the reward the scorer gives per extra unit of length. The length-adjusted difference
    is ``d_i - b·l_i``: what the difference would have been at equal lengths, if length acted
    linearly. The length-controlled win rate is the win rate of those adjusted differences (ties,
    within ``tie_tolerance`` to absorb rounding, count half), with :func:`tie_aware_interval`.
    ``intercept`` (``a``) is the estimated mean reward difference at zero length difference.

    When all length differences are equal, ``b`` cannot be estimated: ``b = 0`` and the result
    equals the plain win rate (``slope_estimated`` is then false).
    """
    n = len(model_scores)
    if not (len(baseline_scores) == len(model_lengths) == len(baseline_lengths) == n):
        raise ValueError("length_controlled_win_rate: all four sequences must have the same length")
    d = [float(a) - float(b) for a, b in zip(model_scores, baseline_scores)]
    dl = [float(a) - float(b) for a, b in zip(model_lengths, baseline_lengths)]
    intercept, slope = linear_fit(dl, d)
    adjusted = [di - slope * li for di, li in zip(d, dl)]
    out = _summarise(adjusted, confidence, tie_tolerance)
    out.update(slope=slope, intercept=intercept, slope_estimated=len(set(dl)) > 1,
               mean_length_difference=sum(dl) / n if n else None)
    return out


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams, pooled over all ``texts`` (lowercased whitespace words).

    1.0 means no n-gram repeats anywhere in the set; low values mean repetitive or mode-collapsed
    replies. 0.0 when there are no n-grams at all.
    """
    grams: list[tuple[str, ...]] = []
    for t in texts:
        grams.extend(ngrams(t.lower().split(), n))
    return len(set(grams)) / len(grams) if grams else 0.0


def proportion(flags: Sequence[bool], confidence: float = 0.95) -> dict:
    """``{"rate", "ci", "k", "n"}`` for a list of yes/no outcomes (Wilson interval)."""
    n, k = len(flags), sum(1 for f in flags if f)
    return {"rate": k / n if n else None, "ci": wilson_interval(k, n, confidence), "k": k, "n": n}


def proportion_over_prompts(passed: Sequence[int], k: int, confidence: float = 0.95) -> dict:
    """``{"rate", "ci", "k", "n"}`` when each prompt has ``k`` yes/no outcomes, ``passed[i]`` of them yes.

    ``rate = sum(passed) / (k · len(passed))``; ``k`` and ``n`` in the result count outcomes. With
    ``k = 1`` this is :func:`proportion` (Wilson interval). With ``k > 1`` the replies to one prompt
    are not independent (a hard prompt is hard for every reply), so the interval is the Student-t
    interval (:func:`mean_ci`) of the per-prompt fractions ``passed[i] / k``, clipped to [0, 1]:
    the prompts are the independent units.
    """
    if k < 1 or any(not 0 <= p <= k for p in passed):
        raise ValueError(f"proportion_over_prompts: each count must be between 0 and k={k}")
    if k == 1:
        return proportion([p == 1 for p in passed], confidence)
    n = len(passed) * k
    total = sum(passed)
    lo, hi = mean_ci([p / k for p in passed], confidence)["ci"]
    ci = [max(0.0, lo), min(1.0, hi)] if lo is not None else [None, None]
    return {"rate": total / n if n else None, "ci": ci, "k": total, "n": n}
