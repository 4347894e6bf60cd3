"""Inter-annotator agreement for the annotation stage.

    alignkit annotate agreement --annotations FILE --out DIR [--min-kappa X]
        [--questions q1,q2] [--ordinal q1,q2] [--bootstrap N] [--seed S]

Input is a long-format table, one row per item x annotator x question, with columns
``item_id, annotator, question, value`` (CSV or JSONL). Extra columns are ignored, except
``status``: a row whose status is present and non-empty but not "submitted" (Argilla's
drafts, discarded and pending responses) is dropped, and ``updated_at``: when the same
annotator answered the same item/question twice, the latest ``updated_at`` (then the last
row in the file) wins.

Values may be strings ("response_1"), numbers, or rank lists (["b", "a", "c"]; ties as inner
lists, [["b", "a"], "c"]); every value is turned into a canonical string (a rank list becomes
"b > a > c", or "b = a > c") and compared as a
nominal category. A question whose values are all integers in 1..5 is treated as an ordinal
rating (or name it with ``--ordinal``) and gets Krippendorff's alpha (ordinal) as well.

What is computed, per question (``compute_agreement``; the measures are in
``alignkit.annotation.agreement_measures``):
  * Fleiss' kappa (statsmodels ``aggregate_raters`` + ``fleiss_kappa``) with a 95% percentile
    bootstrap CI over items. The bootstrap is vectorised: items with the same category-count
    row are pooled, each replicate is a multinomial draw of pattern counts, and kappa is
    computed from the weighted counts in numpy (checked against statsmodels to 1e-9).
  * Unequal rater counts (Fleiss needs the same number of raters on every item). Policy:
    m = the most common number of raters per item (ties -> the larger m). Items with more
    than m raters keep m of them, chosen by a fixed hash of (item, annotator) - deterministic
    and not biased towards any annotator name. Items with fewer than m raters are left out of
    Fleiss' kappa only. Items with a single rating are left out of everything. The counts
    are reported (``n_items_subsampled``, ``n_items_excluded``, ``exclusions``). Every other
    statistic (observed agreement, Krippendorff's alpha, Cohen's kappa, leave-one-out
    majority) uses all ratings of all items with at least two raters.
  * Observed agreement: per item, the fraction of rater pairs that gave the same answer;
    averaged over items.
  * Krippendorff's alpha, nominal for every question, ordinal for ordinal questions
    (coincidence-matrix form of Krippendorff 2011; missing data handled natively).
  * Pairwise Cohen's kappa between annotators on the items both answered.
  * Each annotator's agreement with the leave-one-out majority (the most common answer of
    the *other* raters of the item; items with fewer than two other raters or a tied
    majority are skipped).
  * Per-item agreement and the ``lowest_k`` least-agreed items for adjudication.

The gate on the result is ``alignkit.annotation.gate``, the report (agreement.json, report.md,
report.html) ``alignkit.annotation.agreement_report``. Exit codes of the CLI: 0 ok, 2 bad input,
3 a gated question is below ``--min-kappa``.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
from alignkit.annotation.agreement_measures import question_agreement
from alignkit.config import ConfigError
from alignkit.errors import AlignkitError

REQUIRED_FIELDS = ("item_id", "annotator", "question", "value")
FLAG_MARGIN = 0.15            # annotator flagged if LOO agreement < median - FLAG_MARGIN ...
FLAG_MIN_ITEMS = 10           # ... and it was measured on at least this many items


class AnnotationFileError(AlignkitError, ValueError):
    """Malformed annotation file; the message names the file, the line and the field."""


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------

def _file_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    with open(path, encoding="utf-8-sig") as f:
        head = f.read(4096).lstrip()
    return "jsonl" if head.startswith("{") else "csv"


def load_annotations(path) -> list[dict]:
    """Read a long-format annotation table (CSV or JSONL) into a list of dicts.

    Every row must have non-empty ``item_id``, ``annotator`` and ``question`` and a ``value``
    field (an empty value means "not answered" and is skipped later). Raises
    ``AnnotationFileError`` ("FILE:LINE: missing field 'annotator'") on malformed input and
    ``FileNotFoundError`` when the file does not exist. Each row gets ``_line`` (its line
    number) so later messages can point back to the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found")
    return _load_csv(path) if _file_format(path) == "csv" else _load_jsonl(path)


def _load_csv(path: Path) -> list[dict]:
    rows: list[dict] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise AnnotationFileError(f"{path}:1: empty file, expected a header with "
                                      f"columns {', '.join(REQUIRED_FIELDS)}")
        for field in REQUIRED_FIELDS:
            if field not in header:
                raise AnnotationFileError(
                    f"{path}:1: missing field '{field}' in the CSV header "
                    f"(found: {', '.join(h for h in header if h)})")
        start = 1
        for row in reader:
            line = start + 1
            start = reader.line_num
            if None in row:  # more cells than header columns
                raise AnnotationFileError(
                    f"{path}:{line}: {len(header) + len(row[None])} cells but the header "
                    f"has {len(header)} columns")
            if all(v in (None, "") for v in row.values()):
                continue  # blank line
            for field in REQUIRED_FIELDS:
                if row.get(field) is None:
                    raise AnnotationFileError(f"{path}:{line}: missing field '{field}'")
                if field != "value" and row[field].strip() == "":
                    raise AnnotationFileError(f"{path}:{line}: missing field '{field}' "
                                              f"(empty)")
            row["_line"] = line
            rows.append(row)
    return rows


def _load_jsonl(path: Path) -> list[dict]:
    rows: list[dict] = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise AnnotationFileError(f"{path}:{line_no}: invalid JSON ({e.msg}, "
                                          f"column {e.colno})") from None
            if not isinstance(row, dict):
                raise AnnotationFileError(f"{path}:{line_no}: expected a JSON object, "
                                          f"got {type(row).__name__}")
            for field in REQUIRED_FIELDS:
                if field not in row:
                    raise AnnotationFileError(f"{path}:{line_no}: missing field '{field}'")
                if field != "value" and (row[field] is None or str(row[field]).strip() == ""):
                    raise AnnotationFileError(f"{path}:{line_no}: missing field '{field}' "
                                              f"(empty)")
            row["_line"] = line_no
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------
# Value canonicalisation
# ----------------------------------------------------------------------------------------

def _canon(value):
    """Canonical string for a value, or None for "not answered"."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (list, tuple)):
        def plain(v):
            return isinstance(v, (str, int, float)) and not isinstance(v, bool)

        if all(plain(v) or (isinstance(v, (list, tuple)) and v and all(map(plain, v))) for v in value):
            # a rank list, best first; slots that share a rank are joined by " = "
            return " > ".join(" = ".join(_canon(x) or "" for x in v) if isinstance(v, (list, tuple)) else _canon(v) or ""
                              for v in value)
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    s = str(value).strip()
    if s == "":
        return None
    if s[0] in "[{":  # a rank list / structure serialised into a CSV cell
        try:
            return _canon(json.loads(s))
        except (ValueError, RecursionError):
            return s
    try:
        f = float(s)
    except ValueError:
        return s
    if math.isfinite(f) and f.is_integer() and s.lstrip("+-").replace(".", "", 1).isdigit():
        return str(int(f))
    return s


# ----------------------------------------------------------------------------------------
# Rows -> per-question codes
# ----------------------------------------------------------------------------------------

def _factorize_str(col):
    """Codes for a column of ids, equal when str() is equal; names sorted, so results do not
    depend on row order. Missing (None/NaN) gets code -1."""
    import pandas as pd
    codes, uniques = pd.factorize(np.asarray(col, dtype=object), use_na_sentinel=True)
    names = np.array([str(u) for u in uniques], dtype=object)
    sorted_names, remap = np.unique(names.astype(str), return_inverse=True)
    remap = np.append(remap.ravel(), -1)            # code -1 stays -1
    return sorted_names.astype(object), remap[codes]


def _prepare(rows):
    """Columnar, deduplicated view of the rows. Returns (per-question dict, item names,
    annotator names, value names, notes)."""
    notes = Counter()
    n = len(rows)
    keep = _submitted(rows)
    notes["rows_ignored_status"] = int(n - keep.sum())
    v_a, val_names = _value_codes(rows)
    empty = keep & (v_a < 0)
    notes["rows_ignored_empty_value"] = int(empty.sum())
    keep &= ~empty
    codes = {}
    names = {}
    for k in ("item_id", "annotator", "question"):
        names[k], codes[k] = _factorize_str([r.get(k) for r in rows])
        bad = np.flatnonzero(keep & (codes[k] < 0))
        if len(bad):
            where = rows[bad[0]].get("_line", f"row {bad[0]}")
            raise AnnotationFileError(f"{where}: missing field '{k}'")
    item_names, ann_names, q_names = names["item_id"], names["annotator"], names["question"]
    sel = np.flatnonzero(keep)
    it_a, an_a, q_a, v_a = codes["item_id"][sel], codes["annotator"][sel], codes["question"][sel], v_a[sel]
    kept = _latest_answers(rows, sel, (q_a * len(item_names) + it_a) * max(len(ann_names), 1) + an_a)
    notes["rows_ignored_duplicate"] = int(len(sel) - len(kept))
    it_a, an_a, q_a, v_a = it_a[kept], an_a[kept], q_a[kept], v_a[kept]
    # questions in order of first appearance (keeps the author's order in the report)
    first_q = np.unique(q_a, return_index=True)
    per_q = {}
    for q_code in first_q[0][np.argsort(first_q[1])]:
        m = q_a == q_code
        per_q[str(q_names[q_code])] = (it_a[m], an_a[m], v_a[m])
    return per_q, item_names, ann_names, val_names, notes


def _submitted(rows):
    """Mask of the rows to use: status absent, empty or "submitted"."""
    import pandas as pd
    statuses = [r.get("status") for r in rows]
    st_codes, st_uniques = pd.factorize(np.asarray(statuses, dtype=object))
    st_ok = np.array([str(u).strip().lower() in ("submitted", "") for u in st_uniques] + [True],
                     dtype=bool)                   # last entry: code -1 (no status)
    return st_ok[st_codes]


def _value_codes(rows):
    """(code per row, -1 for "not answered"; sorted canonical value names)."""
    import pandas as pd
    raw = [r.get("value") for r in rows]
    try:
        v_codes, v_uniques = pd.factorize(np.asarray(raw, dtype=object))
    except TypeError:  # lists and dicts are unhashable: serialise first
        raw = [json.dumps(v, sort_keys=True, default=str) if isinstance(v, (list, dict, tuple))
               else v for v in raw]
        v_codes, v_uniques = pd.factorize(np.asarray(raw, dtype=object))
    canon = [_canon(u) for u in v_uniques]
    val_names = sorted({c for c in canon if c is not None})
    vindex = {c: i for i, c in enumerate(val_names)}
    v_remap = np.array([vindex[c] if c is not None else -1 for c in canon] + [-1], dtype=np.int64)
    return v_remap[v_codes], val_names


def _latest_answers(rows, sel, key):
    """Positions in ``sel`` to keep, one per (question, item, annotator) ``key``: the latest
    ``updated_at``, then the last row."""
    order_keys = [sel]
    ts = [rows[i].get("updated_at") for i in sel]
    if any(t not in (None, "") for t in ts):   # ISO timestamps sort as strings
        _, ts_rank = np.unique(np.array(["" if t is None else str(t) for t in ts], dtype=str),
                               return_inverse=True)
        order_keys.append(ts_rank.ravel())
    order = np.lexsort(tuple(order_keys) + (key,))
    key_sorted = key[order]
    last = np.ones(len(sel), dtype=bool)
    last[:-1] = key_sorted[:-1] != key_sorted[1:]
    return np.sort(order[last])


# ----------------------------------------------------------------------------------------
# Agreement
# ----------------------------------------------------------------------------------------

def compute_agreement(rows, *, ordinal_questions=None, n_bootstrap=1000, seed=0,
                      lowest_k=20) -> dict:
    """Inter-annotator agreement for long-format rows (dicts with item_id, annotator,
    question, value; ``status`` other than "submitted" is dropped).

    ``ordinal_questions``: None auto-detects 1..5 integer ratings; a list names exactly the
    ordinal questions. Returns a JSON-serialisable dict: ``questions`` (name -> statistics,
    see the module docstring), ``annotators`` (pooled over questions), ``lowest_items``
    (the ``lowest_k`` least-agreed item/question pairs), ``data`` (row accounting) and
    ``settings``.
    """
    per_q, item_names, ann_names, val_names, notes = _prepare(rows)
    rng = np.random.default_rng(seed)
    declared = None if ordinal_questions is None else {str(q) for q in ordinal_questions}
    if declared:
        unknown = sorted(declared - set(per_q))
        if unknown:
            raise ConfigError(f"--ordinal names question(s) not in the data: {', '.join(unknown)}")
    questions = {}
    for q, (it, an, v) in per_q.items():
        ordinal = None if declared is None else (q in declared)
        res, _ = question_agreement(q, it, an, v, item_names, ann_names, val_names,
                                    ordinal=ordinal, n_boot=int(n_bootstrap), rng=rng,
                                    lowest_k=lowest_k)
        questions[q] = res
    annotators, median = _pooled_annotators(questions)
    allowest = [x for res in questions.values() for x in res.get("lowest_items", [])]
    allowest.sort(key=lambda d: (d["agreement"], -d["n_raters"], str(d["item_id"]), d["question"]))
    return {
        "questions": questions,
        "annotators": annotators,
        "annotator_median_agreement": median,
        "annotator_flag_rule": (f"flagged when agreement with the leave-one-out majority is "
                                f"more than {FLAG_MARGIN:.2f} below the median annotator, "
                                f"measured on at least {FLAG_MIN_ITEMS} items"),
        "lowest_items": allowest[:lowest_k],
        "data": {"n_rows": len(rows), "n_rows_used": int(sum(len(v[0]) for v in per_q.values())),
                 "n_rows_ignored_status": notes["rows_ignored_status"],
                 "n_rows_ignored_empty_value": notes["rows_ignored_empty_value"],
                 "n_rows_ignored_duplicate": notes["rows_ignored_duplicate"],
                 "n_items": int(len(item_names)), "n_annotators": int(len(ann_names)),
                 "n_questions": len(questions)},
        "settings": {"n_bootstrap": int(n_bootstrap), "seed": seed, "lowest_k": lowest_k,
                     "ci_level": 0.95, "ci_method": "percentile bootstrap over items",
                     "ordinal_questions": sorted(declared) if declared is not None else "auto"},
    }


def _pooled_annotators(questions) -> tuple[list[dict], float | None]:
    """Each annotator's leave-one-out agreement pooled over questions, flagged when far below
    the median annotator; (annotators, that median)."""
    pooled: dict = {}
    for res in questions.values():
        for a in res.get("annotators", []):
            p = pooled.setdefault(a["annotator"], {"annotator": a["annotator"], "n_ratings": 0,
                                                   "n_items_compared": 0, "n_matches": 0,
                                                   "n_ties_excluded": 0})
            for k in ("n_ratings", "n_items_compared", "n_matches", "n_ties_excluded"):
                p[k] += a[k]
    annotators = sorted(pooled.values(), key=lambda d: d["annotator"])
    for a in annotators:
        a["loo_majority_agreement"] = (a["n_matches"] / a["n_items_compared"]
                                       if a["n_items_compared"] else None)
    measured = [a["loo_majority_agreement"] for a in annotators
                if a["loo_majority_agreement"] is not None and a["n_items_compared"] >= FLAG_MIN_ITEMS]
    median = float(np.median(measured)) if measured else None
    for a in annotators:
        a["flagged"] = bool(median is not None and a["loo_majority_agreement"] is not None
                            and a["n_items_compared"] >= FLAG_MIN_ITEMS
                            and a["loo_majority_agreement"] < median - FLAG_MARGIN)
    return annotators, median
