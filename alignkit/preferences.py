"""Preference data (reward model, DPO) in every layout TRL documents, plus HH-RLHF transcripts and
the annotation export, normalised to::

    {"prompt": [...messages], "chosen": [{"role": "assistant", ...}], "rejected": [...], "margin": float?}

Bad input raises :class:`alignkit.data.DataError` naming the file, the line and the field.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.data import DataError, Messages, check_messages, read_dataset_rows, require_dict


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh_transcript(text: str) -> Messages:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` -> chat messages."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not an HH-RLHF transcript (expected '\\n\\nHuman: ... \\n\\nAssistant: ...')")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def split_hh_pair(chosen: str, rejected: str) -> tuple[Messages, str, str]:
    """An HH-RLHF pair -> (shared prompt messages, chosen final reply, rejected final reply)."""
    c, r = parse_hh_transcript(chosen), parse_hh_transcript(rejected)
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise ValueError("a transcript does not end with an Assistant turn")
    if c[:-1] != r[:-1]:
        raise ValueError("chosen and rejected transcripts do not share the same prompt")
    return c[:-1], c[-1]["content"], r[-1]["content"]


def _as_reply(value: Any, path, line, key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        msgs = check_messages(value, path, line, key)
        if msgs[-1]["role"] != "assistant":
            raise DataError(path, line, key, "the last message must be the assistant's reply")
        return msgs[-1]["content"]
    raise DataError(path, line, key, f"expected a string or a list of messages, got {type(value).__name__}")


PAIR_DROP_REASONS = ("identical_replies", "empty_reply", "prompt_mismatch")


STANDARD_FORMATS = ("preference", "preference-implicit")  # prompt and replies as plain strings


@dataclass
class PreferenceData:
    pairs: list[dict]
    dropped: dict[str, int]
    format: str  # the layouts read, joined with "+"

    source: str = ""
    # several sources (load_preference_sources): per source, its path, weight and pair counts
    sources: list[dict] | None = None

    @property
    def standard(self) -> bool:
        """Every record was standard (plain strings): trained as plain text unless asked otherwise."""
        return set(self.format.split("+")) <= set(STANDARD_FORMATS)

    def check_one_layout(self, standard_as_chat: bool) -> None:
        """Plain text and chat cannot be trained together: a file mixing standard and conversational
        records needs ``standard_as_chat`` (TRL refuses such a file too)."""
        formats = set(self.format.split("+"))
        if not standard_as_chat and formats & set(STANDARD_FORMATS) and formats - set(STANDARD_FORMATS):
            raise DataError(self.source, None, "prompt", f"mixes standard (plain-string) and conversational records "
                                                         f"({', '.join(sorted(formats))}): give one kind per file, or "
                                                         "set standard_as_chat=true to put all in the chat template")


def _implicit_prompt_pair(chosen: Any, rejected: Any, path, line) -> tuple[Messages, str, str, str]:
    """(prompt, chosen reply, rejected reply, format) of a pair whose prompt is the part the two
    share, as TRL reads its implicit-prompt datasets:

    * conversational: two conversations with the same turns before a final assistant turn;
    * HH-RLHF transcripts (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``), parsed into turns;
    * standard: two texts; the longest common prefix, cut back to a word boundary, is the prompt.
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        c, r = check_messages(chosen, path, line, "chosen"), check_messages(rejected, path, line, "rejected")
        for key, msgs in (("chosen", c), ("rejected", r)):
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                raise DataError(path, line, key, "expected a conversation ending with the assistant's reply")
        if c[:-1] != r[:-1]:
            raise DataError(path, line, "chosen", "chosen and rejected do not share the turns before the reply",
                            drop_reason="prompt_mismatch")
        return c[:-1], c[-1]["content"], r[-1]["content"], "preference-conversational-implicit"
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        raise DataError(path, line, "prompt", "missing, and chosen/rejected are neither two texts nor two conversations")
    if HH_TURN.match(chosen) and HH_TURN.match(rejected):
        try:
            prompt, c_reply, r_reply = split_hh_pair(chosen, rejected)
        except ValueError as e:
            mismatch = "share the same prompt" in str(e)
            raise DataError(path, line, "chosen", str(e), drop_reason="prompt_mismatch" if mismatch else None) from None
        return prompt, c_reply, r_reply, "hh-rlhf"
    n = len(os.path.commonprefix([chosen, rejected]))
    if n < min(len(chosen), len(rejected)):  # the texts part in the middle of a word: the word is the reply's
        n = max(chosen.rfind(" ", 0, n + 1), chosen.rfind("\n", 0, n + 1), 0)
    if not chosen[:n].strip():
        raise DataError(path, line, "prompt", "missing, and chosen and rejected share no text to take as the prompt",
                        drop_reason="prompt_mismatch")
    # the replies keep the whitespace that parts them from the prompt, as TRL's prompt extraction
    # does: trained as plain text, prompt + reply must give back the original text
    return ([{"role": "user", "content": chosen[:n]}], chosen[n:], rejected[n:],
            "preference-implicit")


def preference_pair(rec: Any, path, line) -> tuple[dict, str]:
    """One record -> (normalised pair, detected format). Malformed records raise DataError."""
    rec = require_dict(rec, path, line)
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise DataError(path, line, key, "missing")
    if "prompt" not in rec:  # an implicit prompt: what chosen and rejected share
        prompt, chosen, rejected, fmt = _implicit_prompt_pair(rec["chosen"], rec["rejected"], path, line)
    else:
        p = rec["prompt"]
        if isinstance(p, str):
            if not p.strip():
                raise DataError(path, line, "prompt", "is empty")
            prompt = [{"role": "user", "content": p}]
            fmt = "preference"
        else:
            prompt = check_messages(p, path, line, "prompt")
            fmt = "preference-conversational"
        chosen = _as_reply(rec["chosen"], path, line, "chosen")
        rejected = _as_reply(rec["rejected"], path, line, "rejected")
    pair = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }
    if "margin" in rec and rec["margin"] is not None:
        if isinstance(rec["margin"], bool) or not isinstance(rec["margin"], (int, float)):
            raise DataError(path, line, "margin", f"expected a number, got {rec['margin']!r}")
        pair["margin"] = float(rec["margin"])
    for key in ("aspects_chosen", "aspects_rejected", "item_id"):
        if key in rec:
            pair[key] = rec[key]
    return pair, fmt


def load_preferences(source: str | Path, on_bad_pair: str = "drop", split: str = "train") -> PreferenceData:
    """Preference pairs from TRL preference JSONL (plain or conversational, optional ``margin``),
    HH-RLHF transcripts, or an alignkit annotation export.

    Structurally broken records (missing field, wrong type, bad JSON) always raise. Pairs that are
    well formed but useless (identical replies, an empty reply, HH-RLHF transcripts whose prompts
    differ) are dropped and counted when ``on_bad_pair="drop"``, or raise when ``"error"``.
    """
    if on_bad_pair not in ("drop", "error"):
        raise ValueError("on_bad_pair must be 'drop' or 'error'")
    pairs, dropped, formats = [], {r: 0 for r in PAIR_DROP_REASONS}, set()
    for line, rec in read_dataset_rows(source, split):
        try:
            pair, fmt = preference_pair(rec, source, line)
        except DataError as e:
            if e.drop_reason is None or on_bad_pair == "error":
                raise
            dropped[e.drop_reason] += 1
            continue
        formats.add(fmt)
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        reason = None
        if not chosen.strip() or not rejected.strip():
            reason = "empty_reply"
            field = "chosen" if not chosen.strip() else "rejected"
        elif chosen.strip() == rejected.strip():
            reason, field = "identical_replies", "rejected"
        if reason:
            if on_bad_pair == "error":
                raise DataError(source, line, field, reason.replace("_", " "))
            dropped[reason] += 1
            continue
        pairs.append(pair)
    if not pairs:
        raise DataError(source, None, None, f"no usable preference pairs (dropped: {dropped})")
    return PreferenceData(pairs=pairs, dropped=dropped, format="+".join(sorted(formats)), source=str(source))


# --------------------------------------------------------------------------------------------
# Several sources: an annotation export, arena picks, API thumbs, other files, each with a weight


@dataclass
class PreferenceSource:
    path: str
    weight: float = 1.0
    name: str = ""


SOURCES_HELP = ("; or a list of sources, each a path or {path, weight, name} (e.g. the annotation export and "
                "the chat's picks and thumbs pairs): read in order, a pair already read from an earlier source "
                "dropped, training pairs resampled by weight (2: twice per epoch, 0.5: a seeded half); each "
                "source and its counts go in the manifest")


def preference_sources(data: str | list, key: str = "data") -> list[PreferenceSource]:
    """A stage's ``data``: one source (a path, dataset dir or Hub name) or a list of them, each a
    path or ``{path, weight (default 1), name (default the file name)}``."""
    from alignkit.config import ConfigError

    items = data if isinstance(data, list) else [data]
    if not items:
        raise ConfigError(f"{key}: an empty list of preference sources")
    out = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]" if isinstance(data, list) else key
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or set(item) - {"path", "weight", "name"}:
            raise ConfigError(f"{where}: expected a path or {{path, weight, name}}, got {item!r}")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 100:
            raise ConfigError(f"{where}.weight: expected a number above 0 and at most 100, got {weight!r}")
        name = str(item.get("name") or Path(item["path"].rstrip("/")).name or item["path"])
        out.append(PreferenceSource(item["path"], float(weight), name))
    names = [s.name for s in out]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{key}: two sources are named {name!r}: give them names ({{path, name}})")
    return out


def source_inputs(data: str | list, key: str = "data") -> dict[str, str]:
    """The manifest inputs of a ``data`` value: ``{key: path}`` for one source, ``{key:NAME: path}`` for several."""
    if not isinstance(data, list):
        return {key: data}
    return {f"{key}:{s.name}": s.path for s in preference_sources(data, key)}


def pair_key(pair: dict) -> tuple:
    return (json.dumps(pair["prompt"], sort_keys=True), pair["chosen"][0]["content"].strip(),
            pair["rejected"][0]["content"].strip())


def load_preference_sources(data: str | list, on_bad_pair: str = "drop", key: str = "data") -> PreferenceData:
    """:func:`load_preferences` of one source, or of several: their pairs in the order given, each
    tagged with its ``source`` and ``weight``; a pair already read from an earlier source (same
    prompt, chosen and rejected replies) is dropped and counted as ``duplicate_across_sources``.
    ``sources`` holds each one's path, weight, pairs read, pairs kept and drops."""
    if not isinstance(data, list):
        return load_preferences(data, on_bad_pair)
    seen: set[tuple] = set()
    pairs, formats, summary = [], set(), []
    dropped = {r: 0 for r in PAIR_DROP_REASONS} | {"duplicate_across_sources": 0}
    for src in preference_sources(data, key):
        part = load_preferences(src.path, on_bad_pair)
        formats.update(part.format.split("+"))
        kept = 0
        for pair in part.pairs:
            k = pair_key(pair)
            if k in seen:
                dropped["duplicate_across_sources"] += 1
                continue
            seen.add(k)
            pairs.append({**pair, "source": src.name, "weight": src.weight})
            kept += 1
        for reason, n in part.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + n
        summary.append({"name": src.name, "path": src.path, "weight": src.weight, "pairs": len(part.pairs),
                        "kept": kept, "duplicates": len(part.pairs) - kept, "dropped": part.dropped})
    return PreferenceData(pairs=pairs, dropped=dropped, format="+".join(sorted(formats)),
                          source=" + ".join(s["path"] for s in summary), sources=summary)


def weighted(pairs: list[dict], seed: int) -> list[dict]:
    """Training pairs resampled by their source's ``weight``: each pair appears ``floor(weight)``
    times, and once more with probability ``weight - floor(weight)`` (seeded), so that over an
    epoch a source of weight 2 counts twice and one of weight 0.5 half. Unweighted pairs pass as they are."""
    if all(p.get("weight", 1.0) == 1.0 for p in pairs):
        return pairs
    rng = random.Random(seed)
    out = []
    for p in pairs:
        w = p.get("weight", 1.0)
        out.extend([p] * (math.floor(w) + (rng.random() < w - math.floor(w))))
    return out
