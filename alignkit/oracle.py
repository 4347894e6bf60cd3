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
* :func:`find_constraint` -- recovers the constraint dict from the instruction's own words, so
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
from typing import Any, Iterable

__all__ = [
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

# type -> {parameter: python type}
CONSTRAINT_TYPES: dict[str, dict[str, type]] = {
    "max_words": {"n": int},
    "lowercase": {},
    "bullets": {"n": int},
    "starts_with": {"phrase": str},
    "ends_with": {"phrase": str},
    "include_keyword": {"keyword": str},
}

_WORD_RE = re.compile(r"[^\W_]+(?:['\u2019.,-][^\W_]+)*")
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
# Validation


def validate_constraint(constraint: Any) -> dict:
    """Check a constraint dict; return it unchanged, or raise ValueError naming the bad field.

    The dict must have a ``type`` from :data:`CONSTRAINT_TYPES` and exactly that type's
    parameters: ``n`` a positive int (not a bool), ``phrase``/``keyword`` a string containing at
    least one letter or digit. Unknown extra fields are errors too (they are usually typos).
    """
    if not isinstance(constraint, dict):
        raise ValueError(f"constraint must be a dict with a 'type' field, got {type(constraint).__name__}")
    if "type" not in constraint:
        raise ValueError("constraint field 'type' is missing; expected one of " + ", ".join(CONSTRAINT_TYPES))
    ctype = constraint["type"]
    if not isinstance(ctype, str) or ctype not in CONSTRAINT_TYPES:
        raise ValueError(f"constraint field 'type' is {ctype!r}; expected one of " + ", ".join(CONSTRAINT_TYPES))
    params = CONSTRAINT_TYPES[ctype]
    for key in constraint:
        if key != "type" and key not in params:
            raise ValueError(f"constraint field {key!r} is not a parameter of type {ctype!r}"
                             + (f" (expected: {', '.join(params)})" if params else " (it takes none)"))
    for key, kind in params.items():
        if key not in constraint:
            raise ValueError(f"constraint field {key!r} is missing for type {ctype!r}")
        value = constraint[key]
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"constraint field {key!r} must be a positive integer, got {value!r}")
        elif not isinstance(value, str) or not _WORD_RE.search(value):
            raise ValueError(f"constraint field {key!r} must be a string with at least one word, got {value!r}")
    return constraint


# --------------------------------------------------------------------------------------------
# Helpers


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text)


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


# --------------------------------------------------------------------------------------------
# Plain-words phrasing, both ways

_UNITS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
          "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_NUMBER_WORDS: dict[str, int] = {w: i + 1 for i, w in enumerate(_UNITS)}
for _t, _tw in enumerate(_TENS):
    _NUMBER_WORDS[_tw] = 20 + 10 * _t
    for _u in range(9):
        _NUMBER_WORDS[f"{_tw}-{_UNITS[_u]}"] = 20 + 10 * _t + _u + 1
_NUMBER_WORDS["a hundred"] = _NUMBER_WORDS["one hundred"] = 100
# digits, "(a|one) hundred", "twenty[-five]" ... "ninety[-nine]", "one" ... "nineteen" (longest first)
_NUM = (r"(\d+|(?:a|one)\s+hundred|(?:" + "|".join(_TENS) + r")(?:[\s-](?:" + "|".join(_UNITS[:9]) + r"))?|"
        + "|".join(sorted(_UNITS, key=len, reverse=True)) + r")")


def _parse_number(raw: str) -> int:
    raw = " ".join(raw.lower().split())
    if raw not in _NUMBER_WORDS and not raw.isdigit():
        raw = raw.replace(" ", "-")
    return int(raw) if raw.isdigit() else _NUMBER_WORDS[raw]
_Q = "[\"\u201c]"  # opening quote
_UQ = "[\"\u201d]"  # closing quote
_REPLY = r"(?:your\s+|the\s+)?(?:answer|reply|response)"
_LEAD = r"(?:(?:the\s+)?(?:exact\s+)?(?:phrase|words?|sentence)\s+)?"

# Sentences that describe_constraint writes, by type; {n}, {phrase}, {keyword} are filled in.
TEMPLATES: dict[str, list[str]] = {
    "max_words": [
        "Answer in at most {n} words.",
        "Use no more than {n} words.",
        "Keep your answer to {n} words or fewer.",
    ],
    "lowercase": [
        "Write your whole answer in lowercase letters.",
        "Use only lowercase letters, with no capitals at all.",
        "Reply in all lowercase.",
    ],
    "bullets": [
        'Answer with exactly {n} bullet points, each on its own line starting with "- ".',
        'Format your answer as exactly {n} bullet points that start with "- ".',
        'Give exactly {n} bullet points (lines beginning with "- ") and nothing else.',
    ],
    "starts_with": [
        'Start your answer with "{phrase}"',
        'Begin your reply with the exact phrase "{phrase}"',
        'Your answer must begin with "{phrase}"',
    ],
    "ends_with": [
        'End your answer with "{phrase}"',
        'Finish your reply with the exact phrase "{phrase}"',
        'Your answer must end with "{phrase}"',
    ],
    "include_keyword": [
        'Include the word "{keyword}" in your answer.',
        'Make sure to use the word "{keyword}".',
        'Your answer must mention the word "{keyword}".',
    ],
}

# Phrasings that only the demo's test prompts use (never a training or validation prompt), so the
# evaluation can tell a model that learnt the constraint from one that learnt the wording.
HELDOUT_TEMPLATES: dict[str, list[str]] = {
    "max_words": [
        "Do not go over {n} words.",
        "Stay within {n} words.",
    ],
    "lowercase": [
        "Avoid capital letters entirely.",
        "Type everything in small letters.",
    ],
    "bullets": [
        'Reply as a dash list of exactly {n} items, one per line beginning with "- ".',
        'List {n} points, each on a new line that starts with "- ", with no other text.',
    ],
    "starts_with": [
        'Open your reply with "{phrase}"',
        'The first words of your answer should be "{phrase}"',
    ],
    "ends_with": [
        'Close your response with "{phrase}"',
        'The last words of your answer should be "{phrase}"',
    ],
    "include_keyword": [
        'Work the word "{keyword}" into your reply.',
        'Somewhere in your answer, use the term "{keyword}".',
    ],
}

_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("max_words", re.compile(r"\b(?:at\s+most|no\s+more\s+than|not\s+more\s+than|up\s+to|a\s+maximum\s+of|maximum)\s+"
                             + _NUM + r"\s+words?\b", re.I)),
    ("max_words", re.compile(r"\b" + _NUM + r"\s+words?\s+or\s+(?:fewer|less)\b", re.I)),
    ("max_words", re.compile(r"\b(?:(?:do\s+not|don't|never)\s+(?:go\s+over|exceed)|stay\s+(?:within|under)|limit\s+\w+\s+to)\s+"
                             + _NUM + r"\s+words?\b", re.I)),
    ("lowercase", re.compile(r"\b(?:all\s+)?lower[\s-]?case\b|\bno\s+capital(?:\s+letter)?s\b"
                             r"|\b(?:do\s+not|don't)\s+use\s+(?:any\s+)?capital(?:\s+letter)?s\b"
                             r"|\bavoid\s+(?:any\s+|all\s+)?capital(?:\s+letter)?s\b|\bin\s+small\s+letters\b", re.I)),
    ("bullets", re.compile(r"\b(?:exactly\s+)?" + _NUM + r"\s+bullet(?:\s+point)?s?\b", re.I)),
    ("bullets", re.compile(r"\b(?:exactly\s+)?" + _NUM + r"\s+(?:items|points|lines)\b[^.]*?" + _Q + r"- " + _UQ, re.I)),
    ("starts_with", re.compile(r"\b(?:start|begin)s?\s+(?:with\s+)?" + _REPLY + r"\s+with\s+" + _LEAD + _Q + r"(.+?)" + _UQ, re.I)),
    ("starts_with", re.compile(_REPLY + r"\s+(?:must|should)\s+(?:start|begin)\s+with\s+" + _LEAD + _Q + r"(.+?)" + _UQ, re.I)),
    ("starts_with", re.compile(r"\bopens?\s+" + _REPLY + r"\s+with\s+" + _LEAD + _Q + r"(.+?)" + _UQ
                               + r"|\bfirst\s+words?\s+of\s+" + _REPLY + r"\s+(?:must|should)\s+be\s+" + _Q + r"(.+?)" + _UQ, re.I)),
    ("ends_with", re.compile(r"\b(?:end|finish|close|conclude)s?\s+" + _REPLY + r"\s+with\s+" + _LEAD + _Q + r"(.+?)" + _UQ, re.I)),
    ("ends_with", re.compile(_REPLY + r"\s+(?:must|should)\s+(?:end|finish|close)\s+with\s+" + _LEAD + _Q + r"(.+?)" + _UQ, re.I)),
    ("ends_with", re.compile(r"\blast\s+words?\s+of\s+" + _REPLY + r"\s+(?:must|should)\s+be\s+" + _Q + r"(.+?)" + _UQ, re.I)),
    ("include_keyword", re.compile(r"\b(?:include|use|mention|contain)s?\s+the\s+(?:key)?(?:word|term)\s+"
                                   + r"[\"\u201c'\u2018](.+?)[\"\u201d'\u2019]", re.I)),
    ("include_keyword", re.compile(r"\bwork\s+the\s+(?:key)?(?:word|term)\s+[\"\u201c'\u2018](.+?)[\"\u201d'\u2019]\s+into\b"
                                   r"|\bsomewhere\s+in\s+(?:your\s+|the\s+)?(?:answer|reply|response),?\s+(?:use|say|include)\s+"
                                   r"the\s+(?:key)?(?:word|term)\s+[\"\u201c'\u2018](.+?)[\"\u201d'\u2019]", re.I)),
]


def describe_constraint(constraint: dict, variant: int = 0, held_out: bool = False) -> str:
    """The constraint as a plain-words sentence (``variant`` picks one of the phrasings in
    :data:`TEMPLATES`, or in :data:`HELDOUT_TEMPLATES` with ``held_out``, modulo their number).
    :func:`find_constraint` parses every phrasing back:
    ``find_constraint(describe_constraint(c, v, h)) == c``. Phrases are quoted verbatim, so a
    ``starts_with``/``ends_with`` sentence carries no period of its own."""
    validate_constraint(constraint)
    options = (HELDOUT_TEMPLATES if held_out else TEMPLATES)[constraint["type"]]
    return options[variant % len(options)].format(**{k: v for k, v in constraint.items() if k != "type"})


def _prompt_str(prompt: str | Iterable) -> str:
    if isinstance(prompt, str):
        return prompt
    parts = []
    for m in prompt or []:
        if isinstance(m, dict) and m.get("role", "user") == "user":
            parts.append(str(m.get("content", "")))
        elif isinstance(m, str):
            parts.append(m)
    return "\n\n".join(parts)


def _first_group(m: re.Match) -> str:
    """The captured text of whichever alternative of a pattern matched."""
    return next(g for g in m.groups() if g is not None).strip()


def find_constraint(prompt_text: str | list) -> dict | None:
    """Recover the constraint dict from the instruction's plain words, or None.

    Recognised (case-insensitive; numbers as digits or words, "three", "twenty-five", up to a hundred):

    * max_words: "at most / no more than / up to / a maximum of N words", "N words or fewer/less";
    * lowercase: "lowercase" / "lower case" / "lower-case", "no capitals", "do not use capital letters";
    * bullets: "(exactly) N bullet points";
    * starts_with: 'start/begin your answer/reply/response with (the exact phrase) "X"',
      'your answer must begin with "X"';
    * ends_with: 'end/finish/close your answer with (the exact phrase) "X"', 'your answer must end with "X"';
    * include_keyword: 'include/use/mention the word "X"'.

    When several match, the earliest in the text wins. ``prompt_text`` may be a list of chat
    messages (user turns are searched)."""
    text = _prompt_str(prompt_text)
    best: tuple[int, dict] | None = None
    for ctype, pat in _PATTERNS:
        m = pat.search(text)
        if not m:
            continue
        if ctype in ("max_words", "bullets"):
            n = _parse_number(m.group(1))
            if n < 1:
                continue
            c: dict = {"type": ctype, "n": n}
        elif ctype == "lowercase":
            c = {"type": ctype}
        elif ctype == "include_keyword":
            c = {"type": ctype, "keyword": _first_group(m)}
        else:
            c = {"type": ctype, "phrase": _first_group(m)}
        try:
            validate_constraint(c)
        except ValueError:
            continue
        if best is None or m.start() < best[0]:
            best = (m.start(), c)
    return best[1] if best else None
