"""The constraints of verifiable instructions as data, and their plain-words phrasing both ways.

A constraint is a dict, e.g. ``{"type": "max_words", "n": 25}`` (the types and their parameters:
:data:`CONSTRAINT_TYPES`; the rules that check a reply against one: :mod:`alignkit.oracle`).
:func:`describe_constraint` writes the sentence an instruction states it in, and
:func:`find_constraint` reads it back from an instruction's words, so prompts stored without a
``constraint`` field still work. :data:`TEMPLATES` are the demo's phrasings; :data:`HELDOUT_TEMPLATES`
are the ones only its test prompts use.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

# type -> {parameter: python type}
CONSTRAINT_TYPES: dict[str, dict[str, type]] = {
    "max_words": {"n": int},
    "lowercase": {},
    "bullets": {"n": int},
    "starts_with": {"phrase": str},
    "ends_with": {"phrase": str},
    "include_keyword": {"keyword": str},
}

WORD_RE = re.compile(r"[^\W_]+(?:['\u2019.,-][^\W_]+)*")


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
        elif not isinstance(value, str) or not WORD_RE.search(value):
            raise ValueError(f"constraint field {key!r} must be a string with at least one word, got {value!r}")
    return constraint


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
