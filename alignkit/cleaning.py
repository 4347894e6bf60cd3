"""Cleaning training records before a stage trains on them: duplicates out, personal data masked.

- **Exact duplicates**: records whose text is the same after normalisation (case, accents,
  punctuation, spacing); the first is kept.
- **Near duplicates**: records whose word-trigram sets overlap by at least a Jaccard threshold
  (0.9 by default), estimated with MinHash and found with locality-sensitive hashing
  (``datasketch``), so the cost grows with the number of records, not its square. Preference pairs
  are compared only with pairs of the same prompt, on their two replies: pairs that rank different
  replies to one prompt are not duplicates.
- **Personal information and secrets**: e-mail addresses, phone numbers, payment-card numbers
  (Luhn-checked), IBANs (mod-97-checked), IPv4/IPv6 addresses, and API keys or tokens (the known
  prefixes of OpenAI, Anthropic, GitHub, Hugging Face, AWS, Google and Slack keys, and long values
  assigned to ``api_key``/``token``/``secret``/``password``) are replaced by ``[EMAIL]``,
  ``[PHONE]``, ``[CREDIT_CARD]``, ``[IBAN]``, ``[IP_ADDRESS]``, ``[API_KEY]``. Checksums and
  validators keep ordinary numbers (prices, dates, versions, counts) untouched.

The report counts each kind and keeps a few cleaned excerpts around the replacements (never the
original values, which would put the personal data into the manifest).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Callable, Iterable

from alignkit.data import normalize_text

log = logging.getLogger(__name__)

NEAR_DUPLICATE_THRESHOLD = 0.9
SAMPLES_KEPT = 5
_MIN_WORDS_FOR_NEAR = 8  # shorter texts are compared exactly only: a few words overlap by chance

_KEY_PREFIXES = (r"sk-ant-[A-Za-z0-9_-]{20,}", r"sk-(?:proj-)?[A-Za-z0-9_-]{20,}", r"gh[pousr]_[A-Za-z0-9]{30,}",
                 r"github_pat_[A-Za-z0-9_]{30,}", r"hf_[A-Za-z0-9]{30,}", r"AKIA[0-9A-Z]{16}",
                 r"AIza[0-9A-Za-z_-]{35}", r"xox[abprs]-[A-Za-z0-9-]{10,}")
API_KEY = re.compile(r"(?<![A-Za-z0-9])(?:" + "|".join(_KEY_PREFIXES) + r")")
ASSIGNED_SECRET = re.compile(r"(?i)\b((?:api[_-]?key|access[_-]?token|auth[_-]?token|token|secret|password)"
                             r"\s*[:=]\s*['\"]?)([A-Za-z0-9_\-/+=.]{12,})")
EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")
IPV6 = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]\d{2,4}){1,4}(?![\w-])")


def _luhn(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def _iban_valid(text: str) -> bool:
    s = text.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _ip_valid(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _phone_valid(text: str) -> bool:
    digits, groups = re.sub(r"\D", "", text), re.findall(r"\d+", text)
    if not 9 <= len(digits) <= 15:  # E.164 allows 15; ISO dates (2024-01-31) have too few
        return False
    if text.startswith("+") or "(" in text:
        return True
    # without a country code or an area code in brackets: three groups or more, and a run of
    # two-digit numbers only when it starts with a trunk 0 (06 12 34 56 78, not "92 55 27 41 16")
    return len(groups) >= 3 and (any(len(g) > 2 for g in groups) or groups[0].startswith("0"))


# (kind, pattern, validator of the match or None, group to replace: 0 for the whole match)
PII_RULES: tuple[tuple[str, re.Pattern, Callable[[str], bool] | None, int], ...] = (
    ("api_key", API_KEY, None, 0),
    ("api_key", ASSIGNED_SECRET, lambda v: bool(re.search(r"\d", v)) and bool(re.search(r"[A-Za-z]", v)), 2),
    ("email", EMAIL, None, 0),
    ("iban", IBAN, _iban_valid, 0),
    ("credit_card", CARD, lambda v: _luhn(re.sub(r"\D", "", v)), 0),
    ("ip_address", IPV4, _ip_valid, 0),
    # two hex groups and a digit at least: a bare "::" (Python's [::-1], "A : B :: C") and C++
    # names like Cafe::Bad parse as addresses too
    ("ip_address", IPV6, lambda v: len(re.findall(r"[0-9A-Fa-f]+", v)) >= 2 and bool(re.search(r"\d", v))
     and _ip_valid(v), 0),
    ("phone", PHONE, _phone_valid, 0),
)
PLACEHOLDERS = {"api_key": "[API_KEY]", "email": "[EMAIL]", "iban": "[IBAN]", "credit_card": "[CREDIT_CARD]",
                "ip_address": "[IP_ADDRESS]", "phone": "[PHONE]"}


def scrub_text(text: str) -> tuple[str, dict[str, int]]:
    """``text`` with personal data and secrets replaced by placeholders, and the count per kind."""
    counts: dict[str, int] = {}
    for kind, pattern, valid, group in PII_RULES:
        def replace(m: re.Match) -> str:
            value = m.group(group)
            if valid is not None and not valid(value):
                return m.group(0)
            counts[kind] = counts.get(kind, 0) + 1
            return m.group(0)[: m.start(group) - m.start(0)] + PLACEHOLDERS[kind]
        text = pattern.sub(replace, text)
    return text, counts


TEXT_FIELDS = ("prompt", "completion", "chosen", "rejected", "messages")


def scrub_record(record: dict) -> tuple[dict, dict[str, int]]:
    """A normalised record (SFT example or preference pair) with every text scrubbed."""
    counts: dict[str, int] = {}

    def scrub(value):
        if isinstance(value, str):
            cleaned, found = scrub_text(value)
            for k, n in found.items():
                counts[k] = counts.get(k, 0) + n
            return cleaned
        if isinstance(value, list):
            return [{**m, "content": scrub(m["content"])} if isinstance(m, dict) and "content" in m else scrub(m)
                    for m in value]
        return value

    out = {k: scrub(v) if k in TEXT_FIELDS or k == "text" else v for k, v in record.items()}
    return out, counts


def record_text(record: dict, fields: Iterable[str]) -> str:
    parts = []
    for field in fields:
        value = record.get(field)
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, list):
            parts += [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return "\n".join(parts)


def _shingles(text: str) -> set[str]:
    words = normalize_text(text).split()
    return {" ".join(words[i:i + 3]) for i in range(max(len(words) - 2, 1))}


def clean_records(records: list[dict], kind: str, threshold: float = NEAR_DUPLICATE_THRESHOLD) -> tuple[list[dict], dict]:
    """(cleaned records, report) for ``kind`` "sft" (examples) or "preference" (pairs)."""
    from datasketch import MinHash, MinHashLSH

    if not 0 < threshold <= 1:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    if kind == "preference":
        def bucket(r):
            return normalize_text(record_text(r, ("prompt",)))

        def compared(r):
            return record_text(r, ("chosen", "rejected"))
    else:
        def bucket(r):
            return ""

        def compared(r):
            return record_text(r, ("prompt", "completion", "text"))
    # LSH finds candidates with a looser threshold (it misses some pairs just above its own), and
    # the exact Jaccard of the trigram sets decides
    lsh = MinHashLSH(threshold=max(threshold - 0.15, 0.3), num_perm=128)
    seen_exact, kept_sets, kept = set(), {}, []
    report = {"exact_duplicates": 0, "near_duplicates": 0, "pii": {}, "records_changed": 0, "samples": [],
              "near_duplicate_threshold": threshold}
    for i, record in enumerate(records):
        group, text = bucket(record), compared(record)
        exact_key = (group, normalize_text(text))
        if exact_key in seen_exact:
            report["exact_duplicates"] += 1
            continue
        seen_exact.add(exact_key)
        shingles = _shingles(text)
        if len(normalize_text(text).split()) >= _MIN_WORDS_FOR_NEAR:
            signature = MinHash(num_perm=128)
            signature.update_batch([s.encode() for s in shingles])
            near = [j for j in lsh.query(signature) if kept_sets[j][0] == group
                    and len(shingles & kept_sets[j][1]) / len(shingles | kept_sets[j][1]) >= threshold]
            if near:
                report["near_duplicates"] += 1
                continue
            lsh.insert(str(i), signature)
            kept_sets[str(i)] = (group, shingles)
        cleaned, counts = scrub_record(record)
        if counts:
            report["records_changed"] += 1
            for k, n in counts.items():
                report["pii"][k] = report["pii"].get(k, 0) + n
            if len(report["samples"]) < SAMPLES_KEPT:
                report["samples"].append({"record": i, "kinds": sorted(counts),
                                          "cleaned": _excerpt(record_text(cleaned, TEXT_FIELDS + ("text",)))})
        kept.append(cleaned)
    report["kept"] = len(kept)
    return kept, report


def _excerpt(text: str, width: int = 60) -> str:
    """The cleaned text around its first placeholder."""
    at = min((text.find(p) for p in PLACEHOLDERS.values() if p in text), default=0)
    start = max(at - width, 0)
    return ("..." if start else "") + text[start: at + width] + ("..." if at + width < len(text) else "")


def clean_for_stage(records: list[dict], kind: str, enabled: bool, threshold: float) -> tuple[list[dict], dict]:
    """:func:`clean_records` when a stage's ``clean`` is on; else the records as they are."""
    if not enabled:
        return records, {"enabled": False}
    kept, report = clean_records(records, kind, threshold)
    return kept, {"enabled": True, **report}


def log_cleaning(stage: str, report: dict, what: str = "records") -> None:
    if not report.get("enabled"):
        log.info("%s: cleaning off (clean=false)", stage)
        return
    pii = ", ".join(f"{n} {k}" for k, n in sorted(report["pii"].items())) or "none"
    log.info("%s: cleaning kept %d %s: %d exact and %d near duplicates dropped; personal data masked: %s",
             stage, report["kept"], what, report["exact_duplicates"], report["near_duplicates"], pii)
