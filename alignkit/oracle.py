"""A rule-based oracle for verifiable instructions.

Each demo instruction (``alignkit/demo/instructions.jsonl``) carries one *verifiable constraint*
that is stated in plain words in the instruction, e.g. "Explain what a rainbow is. Answer in at
most 25 words." and stored as a dict, e.g. ``{"type": "max_words", "n": 25}``. This module checks
replies against such constraints, so a simulated annotator can rank sampled replies and the
evaluation can report an oracle pass rate, with no human in the loop.

Constraint types (the dict's ``type`` and its parameters):

======================  ======================  ===================================================
type                    parameters              strict rule (:func:`passes`)
======================  ======================  ===================================================
``max_words``           ``n`` (int >= 1)        the reply has at most ``n`` words
``lowercase``           (none)                  the reply has letters and none is uppercase
``bullets``             ``n`` (int >= 1)        the reply is exactly ``n`` lines starting with
                                                ``"- "`` (blank lines allowed, no other lines)
``starts_with``         ``phrase`` (str)        the reply begins with the phrase
``ends_with``           ``phrase`` (str)        the reply ends with the phrase
``include_keyword``     ``keyword`` (str)       the keyword appears as a word (``-s``/``-es`` ok)
======================  ======================  ===================================================

Phrase and keyword comparisons ignore case and collapse runs of whitespace.

API:

* :func:`constraint_score` -- a graded score in [0, 1] (partial credit, so that rankings of
  several imperfect replies still carry signal), times a quality factor that penalises empty,
  content-free or repetitive replies.
* :func:`passes` -- the strict check; ``passes(r, c)`` is true exactly when
  ``constraint_score(r, c) == 1.0``.
* :func:`find_constraint` (from :mod:`alignkit.constraints`, like the next one) -- recovers the constraint dict from the instruction's own words, so
  prompts stored without a ``constraint`` field still work.
* :func:`describe_constraint` -- the plain-words sentence for a constraint (the phrasings that
  :func:`find_constraint` understands; the demo generator uses it).
* :func:`oracle_preference` -- ``score(reply_a) - score(reply_b)`` in [-1, 1].
* :func:`validate_constraint` -- raises :class:`ValueError` naming the bad field.

Words are runs of letters or digits, optionally joined by an apostrophe, hyphen, period or comma
("don't", "well-made", "4,500", "a.m"); bullet markers and other punctuation are not words.
"""

from __future__ import annotations

import math
import re

from alignkit.constraints import (CONSTRAINT_TYPES, HELDOUT_TEMPLATES, TEMPLATES, WORD_RE, describe_constraint,
                                  find_constraint, validate_constraint)

__all__ = [  # the phrasing half lives in alignkit.constraints; it is part of this API too
    "CONSTRAINT_TYPES",
    "TEMPLATES",
    "HELDOUT_TEMPLATES",
    "constraint_score",
    "passes",
    "find_constraint",
    "describe_constraint",
    "oracle_preference",
    "validate_constraint",
    "count_words",
]

_BULLET_RE = re.compile(r"^- \S")  # the requested marker, followed by content
_OTHER_BULLET_RE = re.compile(r"^(?:[*\u2022+\u2013\u2014]\s+\S|-\S|\d{1,2}[.)]\s+\S)")

# Replies with fewer words than this of their own (not counting a required phrase) are
# "content-free" and get half credit at most.
MIN_OWN_WORDS = 3
# Replies this long or longer are checked for repeated word trigrams.
REPEAT_MIN_WORDS = 12
# A distinct-trigram ratio at or above this is normal text; below it, credit shrinks in proportion.
REPEAT_OK_RATIO = 0.7
# Same idea for single words (catches "the the the the ..." in short replies).
UNIGRAM_OK_RATIO = 0.4


# --------------------------------------------------------------------------------------------
# Helpers


def _words(text: str) -> list[str]:
    return WORD_RE.findall(text)


def count_words(text: str) -> int:
    """Number of words in ``text`` (see the module docstring for what counts as a word)."""
    return len(_words(text))


def _norm(text: str) -> str:
    """Lowercase and collapse whitespace (for phrase comparisons)."""
    return " ".join(text.lower().split())


def _norm_words(text: str) -> list[str]:
    return [w.lower() for w in _words(text)]


def _contains_seq(hay: list[str], needle: list[str]) -> bool:
    k = len(needle)
    return any(hay[i:i + k] == needle for i in range(len(hay) - k + 1))


def _quality(reply: str, constraint: dict) -> float:
    """Penalty factor in [0, 1] for degenerate replies, independent of the constraint's rule.

    * no words at all: 0.0 (an empty reply satisfies "at most 25 words" only vacuously);
    * fewer than :data:`MIN_OWN_WORDS` words besides a required start/end phrase: at most 0.5
      (so "Hope this helps!" alone does not beat a real answer that ends with it);
    * repetition: with :data:`REPEAT_MIN_WORDS` words or more, the share of distinct word
      trigrams below :data:`REPEAT_OK_RATIO` scales the factor down proportionally; likewise the
      share of distinct words below :data:`UNIGRAM_OK_RATIO` (for replies of 4+ words).
    """
    words = _norm_words(reply)
    if not words:
        return 0.0
    factor = 1.0
    own = len(words)
    if constraint["type"] in ("starts_with", "ends_with"):
        own -= len(_norm_words(constraint["phrase"]))
    if own < MIN_OWN_WORDS:
        factor = min(factor, 0.5)
    if len(words) >= 4:
        uni = len(set(words)) / len(words)
        factor = min(factor, uni / UNIGRAM_OK_RATIO)
    if len(words) >= REPEAT_MIN_WORDS:
        tri = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
        ratio = len(set(tri)) / len(tri)
        factor = min(factor, ratio / REPEAT_OK_RATIO)
    return max(0.0, min(1.0, factor))


# --------------------------------------------------------------------------------------------
# Per-type graded rules: each returns 1.0 exactly when the strict rule holds.


def _score_max_words(reply: str, n: int) -> float:
    """1.0 within ``n`` words; beyond that ``(n / words) ** 2`` (30 words for n=25: 0.69;
    40 words: 0.39; 100 words: 0.06), so shorter overshoots always rank higher."""
    w = count_words(reply)
    return 1.0 if w <= n else (n / w) ** 2


def _score_lowercase(reply: str) -> float:
    """Share of uppercase among cased letters, ``u``: score ``(1 - u) ** 15``.

    A single stray capital in a long reply (u = 0.005) scores about 0.93, ordinary sentence case
    (u = 3-5%) about 0.45-0.63, title-like capitalisation (u = 10%) about 0.2, all caps 0.0.
    Strictly decreasing in ``u``. No letters at all scores 0.0."""
    upper = sum(1 for ch in reply if ch.isupper())
    lower = sum(1 for ch in reply if ch.islower())
    if upper + lower == 0:
        return 0.0
    return (1.0 - upper / (upper + lower)) ** 15


def _score_bullets(reply: str, n: int) -> float:
    """``format * (0.5 + 0.5 * count)`` where

    * ``format`` = credit per non-blank line / number of non-blank lines; a line starting with
      ``"- "`` plus text earns 1, another list marker (``*``, ``•``, ``+``, ``1.``, ``1)``,
      ``-`` without a space) earns 0.5, anything else (a preamble, a closing remark) 0;
    * ``count`` = ``max(0, 1 - |k - n| / n)`` with ``k`` the number of list lines of any marker.

    So the right format with a wrong count keeps at least half credit, and a reply with no list
    lines scores 0.0."""
    lines = [ln.strip() for ln in reply.splitlines() if ln.strip()]
    if not lines:
        return 0.0
    credit, k = 0.0, 0
    for ln in lines:
        if _BULLET_RE.match(ln):
            credit += 1.0
            k += 1
        elif _OTHER_BULLET_RE.match(ln):
            credit += 0.5
            k += 1
    if k == 0:
        return 0.0
    fmt = credit / len(lines)
    count = max(0.0, 1.0 - abs(k - n) / n)
    return fmt * (0.5 + 0.5 * count)


def _score_edge(reply: str, phrase: str, at_start: bool) -> float:
    """Shared rule for ``starts_with`` / ``ends_with``:

    * 1.0: the reply (ignoring surrounding whitespace, case and whitespace runs) begins/ends with
      the phrase exactly, punctuation included;
    * 0.8: its first/last words are the phrase's words but the punctuation differs
      ("Sure," for "Sure!", "Hope this helps." for "Hope this helps!");
    * 0.5: the phrase's words appear elsewhere in the reply;
    * otherwise ``0.5 * m / len(phrase words)`` where ``m`` is how many of the phrase's
      leading (starts_with) or trailing (ends_with) words the reply's edge matches.
    """
    text, target = _norm(reply), _norm(phrase)
    if at_start:
        exact = text.startswith(target) and not (
            target[-1].isalnum() and len(text) > len(target) and text[len(target)].isalnum())
    else:
        exact = text.endswith(target) and not (
            target[0].isalnum() and len(text) > len(target) and text[-len(target) - 1].isalnum())
    if exact:
        return 1.0
    rw, pw = _norm_words(reply), _norm_words(phrase)
    k = len(pw)
    edge = rw[:k] if at_start else rw[-k:] if k <= len(rw) else rw
    if edge == pw:
        return 0.8
    if _contains_seq(rw, pw):
        return 0.5
    m = 0
    pairs = zip(rw, pw) if at_start else zip(reversed(rw), reversed(pw))
    for a, b in pairs:
        if a != b:
            break
        m += 1
    return 0.5 * m / k


def _keyword_re(keyword: str) -> re.Pattern:
    parts = [re.escape(w) for w in _norm_words(keyword)]
    body = r"\W+".join(parts)
    return re.compile(r"(?<![^\W_])" + body + r"(?:s|es)?(?![^\W_])", re.IGNORECASE)


def _score_keyword(reply: str, keyword: str) -> float:
    """1.0 if the keyword occurs as a whole word (any case, plural ``-s``/``-es`` allowed);
    0.5 if a word shares the keyword's stem -- its first ``max(4, ceil(0.7 * len(keyword)))``
    letters ("scattering" for "scatter", but not "scathing"); else 0.0.
    Multi-word keywords match as a sequence of words."""
    if _keyword_re(keyword).search(reply):
        return 1.0
    kw = _norm_words(keyword)
    if len(kw) != 1:
        return 0.0
    stem_len = max(4, math.ceil(0.7 * len(kw[0])))
    if len(kw[0]) < stem_len:
        return 0.0
    stem = kw[0][:stem_len]
    return 0.5 if any(w.startswith(stem) for w in _norm_words(reply)) else 0.0


def _rule_score(reply: str, c: dict) -> float:
    t = c["type"]
    if t == "max_words":
        return _score_max_words(reply, c["n"])
    if t == "lowercase":
        return _score_lowercase(reply)
    if t == "bullets":
        return _score_bullets(reply, c["n"])
    if t == "starts_with":
        return _score_edge(reply, c["phrase"], at_start=True)
    if t == "ends_with":
        return _score_edge(reply, c["phrase"], at_start=False)
    if t == "include_keyword":
        return _score_keyword(reply, c["keyword"])
    raise AssertionError(t)  # unreachable after validation


# --------------------------------------------------------------------------------------------
# Public API


def constraint_score(reply: str, constraint: dict) -> float:
    """Graded score in [0, 1] of how well ``reply`` obeys ``constraint``.

    The score is the type's rule score (see the ``_score_*`` docstrings: partial credit for near
    misses) times :func:`_quality`'s penalty for empty, content-free or repetitive replies.
    It equals 1.0 exactly when :func:`passes` is true. Raises ValueError on a malformed
    constraint (see :func:`validate_constraint`)."""
    validate_constraint(constraint)
    if not isinstance(reply, str):
        raise ValueError(f"reply must be a string, got {type(reply).__name__}")
    score = _rule_score(reply, constraint) * _quality(reply, constraint)
    return float(max(0.0, min(1.0, score)))


def passes(reply: str, constraint: dict) -> bool:
    """Strict check: the type's rule holds (table in the module docstring) and the reply is not
    degenerate (it has words, at least three of its own besides a required phrase, and is not
    repetitive)."""
    return constraint_score(reply, constraint) >= 1.0


def oracle_preference(prompt_text: str | list, reply_a: str, reply_b: str, constraint: dict | None = None) -> float:
    """``constraint_score(reply_a) - constraint_score(reply_b)``, in [-1, 1].

    Positive means ``reply_a`` is preferred. When ``constraint`` is None it is recovered from the
    prompt with :func:`find_constraint`; a prompt with no recognisable constraint gives 0.0 (a
    tie: the oracle has no opinion). ``prompt_text`` may also be a list of chat messages, whose
    user turns are searched."""
    if constraint is None:
        constraint = find_constraint(prompt_text)
        if constraint is None:
            return 0.0
    return constraint_score(reply_a, constraint) - constraint_score(reply_b, constraint)
