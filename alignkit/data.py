"""Data formats every stage reads, normalised to TRL's conversational formats.

Instruction data (SFT) becomes prompt/completion conversations::

    {"prompt": [{"role": "user", "content": ...}], "completion": [{"role": "assistant", "content": ...}]}

Preference data (reward, DPO) is read by :mod:`alignkit.preferences`.

Bad input raises :class:`DataError` naming the file, the line and the field, before anything is
written.
"""

from __future__ import annotations

import gzip
import json
import random
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterable

from alignkit.config import NotUtf8Error, decode_utf8
from alignkit.errors import AlignkitError

Messages = list[dict[str, str]]


class DataError(AlignkitError, ValueError):
    """A record that cannot be used, located by file, line and field (exit 2)."""

    def __init__(self, source: str | Path, line: int | None, field: str | None, message: str,
                 drop_reason: str | None = None):
        self.source, self.line, self.field, self.message = str(source), line, field, message
        self.drop_reason = drop_reason  # set when a "drop" policy may skip the record instead
        where = self.source + (f":{line}" if line is not None else "")
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {message}")


# --------------------------------------------------------------------------------------------
# Reading records with their line numbers


def _open_text(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return decode_utf8(raw)
    except NotUtf8Error as e:
        raise DataError(path, e.line, None, str(e)) from None


def _json_array_with_lines(text: str, path: Path) -> list[tuple[int, Any]]:
    """Parse a JSON array, remembering the line each element starts on."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    out = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise DataError(path, text.count("\n", 0, pos) + 1, None, "unterminated JSON array")
        if text[pos] == "]":
            return out
        line = text.count("\n", 0, pos) + 1
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(path, text.count("\n", 0, e.pos) + 1, None, f"invalid JSON: {e.msg}") from None
        out.append((line, obj))
        pos = end


def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """Records of a JSON array or JSONL file (optionally .gz) as ``(line_number, record)``."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    text = _open_text(path)
    if text.lstrip().startswith("["):
        return _json_array_with_lines(text, path)
    records = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(path, i, None, f"invalid JSON: {e.msg} (column {e.colno})") from None
    if not records:
        raise DataError(path, None, None, "no records found")
    return records


DEMO_DATA = Path(__file__).resolve().parent / "demo" / "instructions.jsonl"


def read_dataset_rows(source: str | Path, split: str = "train") -> list[tuple[int | None, Any]]:
    """Rows of a local file, a local HF dataset directory, a Hub dataset name, or ``demo`` (the
    instruction data shipped with alignkit)."""
    p = DEMO_DATA if str(source) == "demo" else Path(str(source))
    if p.is_file():
        return read_records(p)
    import datasets

    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(p))
        else:
            ds = datasets.load_dataset(str(p))
    else:
        if "/" not in str(source) and not str(source).replace("-", "").replace("_", "").isalnum():
            raise DataError(source, None, None, "not a file, a dataset directory or a Hub dataset name")
        try:
            ds = datasets.load_dataset(str(source))
        except Exception as e:  # the Hub is unreachable, or no such dataset
            raise DataError(source, None, None, f"could not load as a local file or Hub dataset: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(source, None, None, f"no split '{split}' (has {', '.join(ds)})")
        ds = ds[split]
    return [(None, dict(r)) for r in ds]


def _require_text(rec: dict, key: str, path, line, allow_empty: bool = False) -> str:
    if key not in rec:
        raise DataError(path, line, key, "missing")
    value = rec[key]
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str):
        raise DataError(path, line, key, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(path, line, key, "is empty")
    return value


def require_dict(rec: Any, path, line) -> dict:
    if not isinstance(rec, dict):
        raise DataError(path, line, None, f"expected a JSON object, got {type(rec).__name__}")
    return rec


def check_messages(value: Any, path, line, key: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise DataError(path, line, key, "expected a non-empty list of {role, content} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(path, line, f"{key}[{i}]", "expected an object with 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant"):
            raise DataError(path, line, f"{key}[{i}].role", f"unknown role {m['role']!r}")
        if not isinstance(m["content"], str):
            raise DataError(path, line, f"{key}[{i}].content", "expected a string")
    return [{"role": m["role"], "content": m["content"]} for m in value]


# --------------------------------------------------------------------------------------------
# Instruction data (SFT)

SFT_FORMATS = ("auto", "alpaca", "prompt_completion", "messages", "text")


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The user turn of an Alpaca record: the instruction, then its input (if any)."""
    instruction, input_text = instruction.strip(), (input_text or "").strip()
    return f"{instruction}\n\n{input_text}" if input_text else instruction


def detect_sft_format(rec: dict) -> str:
    if "messages" in rec:
        return "messages"
    if "instruction" in rec:
        return "alpaca"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    if "text" in rec and "output" not in rec:
        return "text"
    return "alpaca"  # the documented default: errors then name the missing Alpaca fields


DATA_SPLITS = ("train", "validation", "test")


def _protocol_fields(rec: dict, path, line) -> dict:
    """A record's own split (train / validation / test), evaluation slice and checkable
    constraint, kept beside the example when present (the demo data carry all three)."""
    out = {}
    if "split" in rec:
        if rec["split"] not in DATA_SPLITS:
            raise DataError(path, line, "split", f"expected one of {', '.join(DATA_SPLITS)}, got {rec['split']!r}")
        out["split"] = rec["split"]
    if "slice" in rec:
        out["slice"] = _require_text(rec, "slice", path, line)
    if isinstance(rec.get("constraint"), dict):
        out["constraint"] = rec["constraint"]
    return out


def sft_example(rec: Any, fmt: str, path, line) -> dict:
    """One record as ``{"prompt", "completion"}`` chat messages (or ``{"text"}`` for language
    modelling), plus its ``split``, ``slice`` and ``constraint`` when the record has them."""
    rec = require_dict(rec, path, line)
    return {**_sft_messages(rec, fmt, path, line), **_protocol_fields(rec, path, line)}


def _sft_messages(rec: dict, fmt: str, path, line) -> dict:
    if fmt == "auto":
        fmt = detect_sft_format(rec)
    if fmt == "alpaca":
        instruction = _require_text(rec, "instruction", path, line)
        input_text = _require_text(rec, "input", path, line, allow_empty=True) if "input" in rec else ""
        output = _require_text(rec, "output", path, line)
        prompt = [{"role": "user", "content": alpaca_prompt(instruction, input_text)}]
        if rec.get("system"):
            prompt.insert(0, {"role": "system", "content": _require_text(rec, "system", path, line)})
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": output}]}
    if fmt == "prompt_completion":
        prompt, completion = rec.get("prompt"), rec.get("completion")
        if prompt is None:
            raise DataError(path, line, "prompt", "missing")
        if completion is None:
            raise DataError(path, line, "completion", "missing")
        standard = isinstance(prompt, str) and isinstance(completion, str)
        prompt = [{"role": "user", "content": _require_text(rec, "prompt", path, line)}] if isinstance(prompt, str) else check_messages(prompt, path, line, "prompt")
        completion = [{"role": "assistant", "content": _require_text(rec, "completion", path, line)}] if isinstance(completion, str) else check_messages(completion, path, line, "completion")
        return {"prompt": prompt, "completion": completion, **({"standard": True} if standard else {})}
    if fmt == "messages":
        if "messages" not in rec:
            raise DataError(path, line, "messages", "missing")
        messages = check_messages(rec["messages"], path, line, "messages")
        if messages[-1]["role"] != "assistant":
            raise DataError(path, line, "messages", "the last message must be the assistant's reply to learn")
        if not messages[-1]["content"].strip():
            raise DataError(path, line, f"messages[{len(messages) - 1}].content", "is empty")
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    if fmt == "text":  # language modelling on plain text (domain adaptation): every token is learnt
        return {"text": _require_text(rec, "text", path, line)}
    raise DataError(path, line, None, f"unknown format {fmt!r}; expected one of {', '.join(SFT_FORMATS)}")


def load_sft_examples(source: str | Path, fmt: str = "auto", split: str = "train",
                      on_bad_record: str = "error") -> tuple[list[dict], dict[str, int]]:
    """Instruction data from Alpaca JSON/JSONL, prompt/completion JSONL, chat-messages JSONL,
    a local HF dataset directory or a Hub dataset name, as prompt/completion conversations.

    Returns the examples and the count of dropped records per reason. A file that is not valid
    JSON always raises. A record with a missing, empty or mistyped field raises when
    ``on_bad_record="error"``, or is dropped and counted when ``"drop"``.
    """
    if fmt not in SFT_FORMATS:
        raise DataError(source, None, None, f"unknown format {fmt!r}; expected one of {', '.join(SFT_FORMATS)}")
    if on_bad_record not in ("error", "drop"):
        raise ValueError("on_bad_record must be 'error' or 'drop'")
    examples, dropped = [], {}
    for line, rec in read_dataset_rows(source, split):
        try:
            examples.append(sft_example(rec, fmt, source, line))
        except DataError as e:
            if on_bad_record == "error":
                raise DataError(e.source, e.line, e.field,
                                e.message + " (set on_bad_record=drop to skip and count such records)") from None
            reason = f"{e.field or 'record'} {e.message}"
            dropped[reason] = dropped.get(reason, 0) + 1
    if not examples:
        raise DataError(source, None, None, f"no usable examples (dropped: {dropped})")
    return examples, dropped


# --------------------------------------------------------------------------------------------
# Prompt files (evaluation, candidate generation)

PROMPT_FIELDS = ("prompt", "instruction", "turns", "question", "text")


def load_prompts(source: str | Path, field: str | None = None, split: str = "train") -> list[dict]:
    """Prompts as ``{"id", "prompt": messages, "turns": [str, ...]}``.

    Accepts records with a ``prompt`` (string or messages), ``instruction`` (+ optional ``input``),
    MT-Bench ``turns`` (the first turn is the prompt; later turns are kept), or a bare JSON string
    per line. ``field`` names the field to read when it is none of those.
    """
    prompts = []
    for i, (line, rec) in enumerate(read_dataset_rows(source, split)):
        ident = str(i)
        if isinstance(rec, str):
            text, turns = rec, [rec]
        elif isinstance(rec, dict):
            ident = str(rec.get("id", rec.get("question_id", rec.get("item_id", i))))
            key = field or next((k for k in PROMPT_FIELDS if k in rec), None)
            if key is None or key not in rec:
                raise DataError(source, line, field or "prompt", f"missing (looked for {', '.join(PROMPT_FIELDS)})")
            value = rec[key]
            if key == "instruction":
                input_text = rec.get("input") or ""
                instances = rec.get("instances")
                if not input_text and isinstance(instances, list) and instances and isinstance(instances[0], dict):
                    input_text = instances[0].get("input") or ""  # self-instruct: the task's first instance
                text = alpaca_prompt(_require_text(rec, "instruction", source, line), input_text)
                turns = [text]
            elif isinstance(value, list) and value and all(isinstance(t, str) for t in value):
                turns, text = value, value[0]
            elif isinstance(value, list):
                msgs = check_messages(value, source, line, key)
                prompts.append({"id": ident, "prompt": msgs, "turns": [m["content"] for m in msgs if m["role"] == "user"]})
                continue
            elif isinstance(value, str):
                text, turns = value, [value]
            else:
                raise DataError(source, line, key, f"expected a string or a list, got {type(value).__name__}")
        else:
            raise DataError(source, line, None, f"expected a JSON string or object, got {type(rec).__name__}")
        if not text.strip():
            raise DataError(source, line, field or "prompt", "is empty")
        prompts.append({"id": ident, "prompt": [{"role": "user", "content": text}], "turns": turns})
    return prompts


# --------------------------------------------------------------------------------------------
# Splits and leakage


def seeded_split(items: list, fractions: dict[str, float], seed: int) -> dict[str, list]:
    """Deterministic split: shuffle with ``seed``, cut by fractions; the first key takes the rest."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    names = list(fractions)
    sizes = {n: int(round(fractions[n] * len(items))) for n in names[1:]}
    out, start = {}, 0
    for n in names[1:]:
        out[n] = [items[i] for i in order[start : start + sizes[n]]]
        start += sizes[n]
    out[names[0]] = [items[i] for i in order[start:]]
    return {n: out[n] for n in names}


def normalize_text(text: str) -> str:
    """Case-, accent-, punctuation- and whitespace-insensitive form for duplicate checks."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def prompt_text(prompt: Messages | str) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt if m["role"] != "system")


def check_leakage(heldout: Iterable[Messages | str], training: Iterable[Messages | str], max_examples: int = 10) -> dict:
    """Held-out prompts that also occur in training data, exactly or after normalisation."""
    train_texts = [prompt_text(p) for p in training]
    exact_set = {t.strip() for t in train_texts}
    norm_set = {normalize_text(t) for t in train_texts}
    exact, normalized, examples = 0, 0, []
    heldout = list(heldout)
    for p in heldout:
        t = prompt_text(p)
        if t.strip() in exact_set:
            exact += 1
            examples.append({"kind": "exact", "prompt": t[:200]})
        elif normalize_text(t) in norm_set:
            normalized += 1
            examples.append({"kind": "normalized", "prompt": t[:200]})
    return {
        "n_heldout": len(heldout),
        "exact_duplicates": exact,
        "normalized_duplicates": normalized,
        "leaked_fraction": (exact + normalized) / len(heldout) if heldout else 0.0,
        "examples": examples[:max_examples],
    }
