"""Inter-annotator agreement for the annotation stage.

    alignkit annotate agreement --annotations FILE --out DIR [--min-kappa X]
        [--questions q1,q2] [--ordinal q1,q2] [--bootstrap N] [--seed S]
    python -m alignkit.annotation.agreement --annotations FILE --out DIR ...   (same options)

Input is a long-format table, one row per item x annotator x question, with columns
``item_id, annotator, question, value`` (CSV or JSONL). Extra columns are ignored, except
``status``: a row whose status is present and non-empty but not "submitted" (Argilla's
drafts, discarded and pending responses) is dropped, and ``updated_at``: when the same
annotator answered the same item/question twice, the latest ``updated_at`` (then the last
row in the file) wins.

Values may be strings ("response_1"), numbers, or rank lists (["b", "a", "c"]); every value
is turned into a canonical string (a rank list becomes "b > a > c") and compared as a
nominal category. A question whose values are all integers in 1..5 is treated as an ordinal
rating (or name it with ``--ordinal``) and gets Krippendorff's alpha (ordinal) as well.

What is computed, per question (see ``compute_agreement``):
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

Exit codes of the CLI: 0 ok, 2 bad input, 3 a gated question is below ``--min-kappa``.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as _dt
import html
import io
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from alignkit.errors import AlignkitError

REQUIRED_FIELDS = ("item_id", "annotator", "question", "value")
MAX_CATEGORIES = 200          # more distinct answers than this: free text, agreement skipped
FLAG_MARGIN = 0.15            # annotator flagged if LOO agreement < median - FLAG_MARGIN ...
FLAG_MIN_ITEMS = 10           # ... and it was measured on at least this many items
HEATMAP_MAX_ANNOTATORS = 25   # heatmaps show the annotators with the most ratings
HEATMAP_MIN_SHARED = 5        # pairs sharing fewer items are greyed out in the heatmaps
LANDIS_KOCH = (               # (upper bound, label) - Landis & Koch (1977)
    (0.0, "poor"),
    (0.20, "slight"),
    (0.40, "fair"),
    (0.60, "moderate"),
    (0.80, "substantial"),
    (1.0 + 1e-9, "almost perfect"),
)


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
    rows: list[dict] = []
    if _file_format(path) == "csv":
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
    else:
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
        if all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            return " > ".join(_canon(v) or "" for v in value)
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


def _is_rating_scale(categories) -> bool:
    """All values are integers in 1..5 (a Likert-style rating)."""
    try:
        return all(str(int(c)) == c and 1 <= int(c) <= 5 for c in categories)
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------
# Kappa / alpha from count tables (vectorised; used for point estimates and bootstrap)
# ----------------------------------------------------------------------------------------

def fleiss_kappa_weighted(table, weights):
    """Fleiss' kappa of ``table`` (items x categories, same row sum m) for each row of
    ``weights`` (replicates x items): the kappa of the table in which item i appears
    ``weights[b, i]`` times. ``weights`` of ones reproduces statsmodels' ``fleiss_kappa``.
    Returns an array of shape (replicates,); NaN where chance agreement is 1."""
    table = np.asarray(table, dtype=float)
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    m = table[0].sum() if len(table) else 0.0
    p_item = ((table * table).sum(1) - m) / (m * (m - 1.0))        # per-item agreement
    n_items = w.sum(1)
    p_bar = (w @ p_item) / n_items
    p_cat = (w @ table) / (n_items * m)[:, None]
    p_exp = (p_cat * p_cat).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        kappa = (p_bar - p_exp) / (1.0 - p_exp)
    kappa[np.isclose(p_exp, 1.0, rtol=0, atol=1e-12)] = np.nan
    return kappa


def _delta2(n_c, metric):
    """Krippendorff's squared difference matrix for each row of marginals ``n_c`` (B x K)."""
    B, K = n_c.shape
    if metric == "nominal":
        d = 1.0 - np.eye(K)
        return np.broadcast_to(d, (B, K, K))
    if metric == "ordinal":
        # delta2(c, k) = (sum_{g=c..k} n_g - (n_c + n_k) / 2)^2, categories in rank order
        cum = np.concatenate([np.zeros((B, 1)), np.cumsum(n_c, 1)], 1)   # cum[:, j] = sum_{g<j}
        lo = np.minimum.outer(np.arange(K), np.arange(K))
        hi = np.maximum.outer(np.arange(K), np.arange(K))
        s = cum[:, hi + 1] - cum[:, lo]
        d = s - (n_c[:, :, None] + n_c[:, None, :]) / 2.0
        return d * d
    raise ValueError(f"unknown metric {metric!r}")


def krippendorff_alpha_weighted(counts, weights, metric="nominal"):
    """Krippendorff's alpha from a per-unit value-count table ``counts`` (units x values,
    values in rank order for 'ordinal'; row sums may differ, units with fewer than two
    values are ignored) for each row of ``weights`` (replicates x units).

    Coincidences: o_ck = sum_u (n_uc n_uk - [c=k] n_uc) / (m_u - 1);  n_c = sum_k o_ck;
    alpha = 1 - (n - 1) * sum_ck o_ck d2_ck / sum_ck n_c n_k d2_ck   (Krippendorff 2011).
    """
    counts = np.asarray(counts, dtype=float)
    m = counts.sum(1)
    keep = m >= 2
    counts, m = counts[keep], m[keep]
    w = np.atleast_2d(np.asarray(weights, dtype=float))[:, keep]
    U, K = counts.shape
    if metric == "nominal":  # no K x K matrices needed: disagreeing pairs per unit
        d_unit = (m * m - (counts * counts).sum(1)) / (m - 1.0)
        n_c = w @ counts
        n = n_c.sum(1)
        d_obs = w @ d_unit
        d_exp = n * n - (n_c * n_c).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            alpha = 1.0 - (n - 1.0) * d_obs / d_exp
        alpha[d_exp <= 0] = np.nan
        return alpha
    coinc = (counts[:, :, None] * counts[:, None, :]
             - counts[:, :, None] * np.eye(K)[None]) / (m - 1.0)[:, None, None]
    o = (w @ coinc.reshape(U, K * K)).reshape(-1, K, K)
    n_c = o.sum(2)
    n = n_c.sum(1)
    d2 = _delta2(n_c, metric)
    d_obs = (o * d2).sum((1, 2))
    d_exp = (n_c[:, :, None] * n_c[:, None, :] * d2).sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        alpha = 1.0 - (n - 1.0) * d_obs / d_exp
    alpha[d_exp <= 0] = np.nan
    return alpha


def krippendorff_alpha(data, metric="nominal", missing=None):
    """Krippendorff's alpha for reliability data laid out as raters x units (``missing``
    marks absent values; NaN always counts as missing). Convenience wrapper for tests and
    one-off use; values are ranked by sorting for the ordinal metric."""
    arr = np.asarray(data, dtype=object)
    vals = [(r, u, v) for r, row in enumerate(arr) for u, v in enumerate(row)
            if v is not missing and v != missing and not (isinstance(v, float) and math.isnan(v))]
    levels = sorted({v for _, _, v in vals})
    index = {v: i for i, v in enumerate(levels)}
    counts = np.zeros((arr.shape[1], len(levels)))
    for _, u, v in vals:
        counts[u, index[v]] += 1
    return float(krippendorff_alpha_weighted(counts, np.ones(len(counts)), metric)[0])


def cohen_kappa_from_confusion(conf):
    """Cohen's kappa from a K x K confusion matrix (rows rater A, columns rater B)."""
    conf = np.asarray(conf, dtype=float)
    n = conf.sum()
    if n == 0:
        return float("nan")
    po = np.trace(conf) / n
    pe = (conf.sum(1) @ conf.sum(0)) / (n * n)
    if abs(1.0 - pe) < 1e-12:
        return float("nan")
    return float((po - pe) / (1.0 - pe))


def _bootstrap_weights(pattern_inverse, n_patterns, n_boot, rng, chunk=None):
    """Yield (b x n_patterns) arrays: how many times each item pattern appears in b bootstrap
    resamples of the items. Resampling N items with replacement is a multinomial draw over
    items, and pooling identical items makes it a multinomial over patterns."""
    n_items = len(pattern_inverse)
    freq = np.bincount(pattern_inverse, minlength=n_patterns)
    done = 0
    if n_patterns <= 4096:
        while done < n_boot:
            b = min(256, n_boot - done)
            yield rng.multinomial(n_items, freq / n_items, size=b).astype(float)
            done += b
        return
    chunk = chunk or max(1, int(2e7 // max(n_items, 1)))
    while done < n_boot:
        b = min(chunk, n_boot - done)
        pick = pattern_inverse[rng.integers(0, n_items, size=(b, n_items))]
        flat = pick + (np.arange(b) * n_patterns)[:, None]
        yield np.bincount(flat.ravel(), minlength=b * n_patterns).reshape(b, n_patterns).astype(float)
        done += b


def _patterns(table):
    """Unique rows of an integer count table: (unique_rows, inverse)."""
    table = np.asarray(table, dtype=np.int64)
    if table.size == 0:
        return table, np.zeros(0, dtype=np.int64)
    base = int(table.max()) + 1
    if table.shape[1] * math.log(base) < 62 * math.log(2):
        code = table @ (base ** np.arange(table.shape[1], dtype=np.int64))
        _, first, inverse = np.unique(code, return_index=True, return_inverse=True)
        return table[first], inverse.ravel()
    uniq, inverse = np.unique(table, axis=0, return_inverse=True)
    return uniq, inverse.ravel()


def _percentile_ci(reps, level=0.95):
    reps = reps[np.isfinite(reps)]
    if len(reps) < 2:
        return [None, None]
    lo, hi = np.percentile(reps, [50 * (1 - level), 100 - 50 * (1 - level)])
    return [float(lo), float(hi)]


def landis_koch(kappa) -> str:
    """Landis & Koch (1977) verbal band for a kappa value."""
    if kappa is None or not np.isfinite(kappa):
        return "undefined"
    if kappa < 0:
        return "poor"
    for upper, label in LANDIS_KOCH[1:]:
        if kappa <= upper:
            return label
    return "almost perfect"


def _mix64(x):
    """splitmix64 finaliser: a fixed, data-independent hash for deterministic subsampling."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


def _string_hash(strings):
    """Stable 63-bit hash of each string (independent of PYTHONHASHSEED)."""
    import zlib
    return np.array([zlib.crc32(s.encode()) | (zlib.adler32(s.encode()) << 32)
                     for s in strings], dtype=np.uint64)


# ----------------------------------------------------------------------------------------
# Agreement
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
    import pandas as pd
    notes = Counter()
    n = len(rows)
    cols = {k: [r.get(k) for r in rows] for k in ("item_id", "annotator", "question")}
    keep = np.ones(n, dtype=bool)
    # status: present, non-empty and not "submitted" -> ignored
    statuses = [r.get("status") for r in rows]
    st_codes, st_uniques = pd.factorize(np.asarray(statuses, dtype=object))
    st_ok = np.array([str(u).strip().lower() in ("submitted", "") for u in st_uniques] + [True],
                     dtype=bool)                   # last entry: code -1 (no status)
    keep &= st_ok[st_codes]
    notes["rows_ignored_status"] = int(n - keep.sum())
    # values -> canonical strings (lists and dicts are unhashable: serialise first)
    raw = [r.get("value") for r in rows]
    try:
        v_codes, v_uniques = pd.factorize(np.asarray(raw, dtype=object))
    except TypeError:
        raw = [json.dumps(v, sort_keys=True, default=str) if isinstance(v, (list, dict, tuple))
               else v for v in raw]
        v_codes, v_uniques = pd.factorize(np.asarray(raw, dtype=object))
    canon = [_canon(u) for u in v_uniques]
    val_names = sorted({c for c in canon if c is not None})
    vindex = {c: i for i, c in enumerate(val_names)}
    v_remap = np.array([vindex[c] if c is not None else -1 for c in canon] + [-1], dtype=np.int64)
    v_a = v_remap[v_codes]
    empty = keep & (v_a < 0)
    notes["rows_ignored_empty_value"] = int(empty.sum())
    keep &= ~empty
    codes = {}
    names = {}
    for k in ("item_id", "annotator", "question"):
        names[k], codes[k] = _factorize_str(cols[k])
        bad = np.flatnonzero(keep & (codes[k] < 0))
        if len(bad):
            where = rows[bad[0]].get("_line", f"row {bad[0]}")
            raise ValueError(f"{where}: missing field '{k}'")
    item_names, ann_names, q_names = names["item_id"], names["annotator"], names["question"]
    sel = np.flatnonzero(keep)
    it_a, an_a, q_a, v_a = codes["item_id"][sel], codes["annotator"][sel], codes["question"][sel], v_a[sel]
    # Deduplicate (question, item, annotator): keep the latest updated_at, then the last row.
    order_keys = [sel]
    ts = [rows[i].get("updated_at") for i in sel]
    if any(t not in (None, "") for t in ts):   # ISO timestamps sort as strings
        _, ts_rank = np.unique(np.array(["" if t is None else str(t) for t in ts], dtype=str),
                               return_inverse=True)
        order_keys.append(ts_rank.ravel())
    key = (q_a * len(item_names) + it_a) * max(len(ann_names), 1) + an_a
    order = np.lexsort(tuple(order_keys) + (key,))
    key_sorted = key[order]
    last = np.ones(len(sel), dtype=bool)
    last[:-1] = key_sorted[:-1] != key_sorted[1:]
    kept = np.sort(order[last])
    notes["rows_ignored_duplicate"] = int(len(sel) - len(kept))
    it_a, an_a, q_a, v_a = it_a[kept], an_a[kept], q_a[kept], v_a[kept]
    # questions in order of first appearance (keeps the author's order in the report)
    first_q = np.unique(q_a, return_index=True)
    per_q = {}
    for q_code in first_q[0][np.argsort(first_q[1])]:
        m = q_a == q_code
        per_q[str(q_names[q_code])] = (it_a[m], an_a[m], v_a[m])
    return per_q, item_names, ann_names, val_names, notes


def _question_agreement(q, it, an, vcode, item_names, ann_names, val_names, *, ordinal,
                        n_boot, rng, lowest_k):
    out: dict = {"question": q}
    cats_used = np.unique(vcode)
    labels = [val_names[c] for c in cats_used]
    if ordinal is None:
        ordinal = _is_rating_scale(labels)
    elif ordinal and not _is_rating_scale(labels):
        # declared ordinal: accept any numeric scale
        try:
            [float(x) for x in labels]
        except ValueError:
            raise ValueError(f"question {q!r} was declared ordinal but has non-numeric "
                             f"values: {labels[:5]}") from None
    if ordinal:
        order = np.argsort([float(x) for x in labels], kind="stable")
    else:
        order = np.argsort(labels, kind="stable")
    cats_used = cats_used[order]
    labels = [labels[i] for i in order]
    K = len(labels)
    out["type"] = "ordinal" if ordinal else "nominal"
    out["categories"] = labels
    if K > MAX_CATEGORIES:
        out["skipped"] = (f"{K} distinct answers (more than {MAX_CATEGORIES}); looks like free "
                          f"text, agreement is not computed")
        out["fleiss_kappa"], out["ci"], out["n_items"], out["n_raters"] = None, [None, None], 0, 0
        return out, None
    lut = np.full(len(val_names), -1, dtype=np.int64)
    lut[cats_used] = np.arange(K)
    cat = lut[vcode]

    # Items of this question, and the full count table (all raters).
    item_u, item_local = np.unique(it, return_inverse=True)
    item_local = item_local.ravel()
    N_all = len(item_u)
    counts = np.bincount(item_local * K + cat, minlength=N_all * K).reshape(N_all, K)
    m_i = counts.sum(1)
    multi = m_i >= 2
    n_single = int((~multi).sum())
    out["category_counts"] = {lab: int(c) for lab, c in zip(labels, counts.sum(0))}
    out["n_ratings"] = int(len(cat))
    out["n_annotators"] = int(len(np.unique(an)))
    out["raters_per_item"] = {str(k): int(v) for k, v in
                              zip(*np.unique(m_i, return_counts=True))}

    # Per-item agreement (all raters): fraction of rater pairs that agree.
    with np.errstate(invalid="ignore", divide="ignore"):
        p_item = ((counts * (counts - 1)).sum(1) / (m_i * (m_i - 1.0)))
    p_item[~multi] = np.nan
    out["observed_agreement"] = float(np.nanmean(p_item)) if multi.any() else None
    out["unanimous_fraction"] = float((p_item[multi] == 1).mean()) if multi.any() else None

    # ---- Fleiss' kappa with the unequal-counts policy --------------------------------
    exclusions = []
    if n_single:
        exclusions.append({"reason": "only one rating (no agreement possible)",
                           "n_items": n_single})
    if multi.any():
        vals_m, freq_m = np.unique(m_i[multi], return_counts=True)
        m = int(vals_m[freq_m == freq_m.max()].max())   # modal rater count, ties -> larger
    else:
        m = 0
    fewer = multi & (m_i < m)
    more = m_i > m
    if fewer.any():
        exclusions.append({"reason": f"fewer than {m} raters (the usual number)",
                           "n_items": int(fewer.sum())})
    fleiss_items = multi & ~fewer
    fleiss_counts = counts.copy()
    if more.any():
        # keep m ratings per over-rated item, chosen by a fixed hash of (item, annotator)
        rsel = more[item_local]
        r_items, r_ann, r_cat = item_local[rsel], an[rsel], cat[rsel]
        h = _mix64(_string_hash(item_names[item_u[r_items]].tolist())
                   ^ _mix64(_string_hash(ann_names[r_ann].tolist())))
        o = np.lexsort((h, r_items))
        r_items, r_cat = r_items[o], r_cat[o]
        start = np.r_[0, np.flatnonzero(np.diff(r_items)) + 1]
        rank = np.arange(len(r_items)) - np.repeat(start, np.diff(np.r_[start, len(r_items)]))
        keep = rank < m
        sub = np.zeros((N_all, K), dtype=np.int64)
        np.add.at(sub, (r_items[keep], r_cat[keep]), 1)
        fleiss_counts[more] = sub[more]
    table = fleiss_counts[fleiss_items]
    out["n_items"] = int(fleiss_items.sum())
    out["n_raters"] = m
    out["n_items_total"] = int(N_all)
    out["n_items_excluded"] = int(N_all - fleiss_items.sum())
    out["n_items_subsampled"] = int(more.sum())
    out["exclusions"] = exclusions
    out["unequal_counts_policy"] = (
        f"Fleiss' kappa needs the same number of raters per item; used m={m}, the most common "
        f"count. {int(more.sum())} item(s) with more raters kept {m} ratings chosen by a fixed "
        f"hash of (item, annotator); {int(fewer.sum())} item(s) with fewer raters and "
        f"{n_single} item(s) with a single rating were left out of kappa. All other statistics "
        f"use every rating.")

    if len(table) and m >= 2 and K >= 1:
        from statsmodels.stats.inter_rater import fleiss_kappa
        with np.errstate(invalid="ignore", divide="ignore"):
            kappa = float(fleiss_kappa(table, method="fleiss"))
        if not np.isfinite(kappa):
            kappa = float("nan")
        pats, inv = _patterns(table)
        reps = np.concatenate([fleiss_kappa_weighted(pats, w)
                               for w in _bootstrap_weights(inv, len(pats), n_boot, rng)]) \
            if n_boot > 0 else np.array([])
        out["fleiss_kappa"] = kappa if np.isfinite(kappa) else None
        out["ci"] = _percentile_ci(reps) if np.isfinite(kappa) else [None, None]
        out["fleiss_observed_agreement"] = float(
            (((table * table).sum(1) - m) / (m * (m - 1.0))).mean())
        out["fleiss_expected_agreement"] = float(((table.sum(0) / table.sum()) ** 2).sum())
    else:
        out["fleiss_kappa"], out["ci"] = None, [None, None]
    out["band"] = landis_koch(out["fleiss_kappa"])

    # ---- Krippendorff's alpha (all items with >= 2 ratings, unequal counts are fine) -------
    pats_a, inv_a = _patterns(counts[multi])
    for metric in (["nominal", "ordinal"] if ordinal else ["nominal"]):
        if not len(pats_a):
            out[f"krippendorff_alpha_{metric}"], out[f"krippendorff_alpha_{metric}_ci"] = None, [None, None]
            continue
        point = krippendorff_alpha_weighted(pats_a, np.bincount(inv_a, minlength=len(pats_a)),
                                            metric)[0]
        reps = np.concatenate([krippendorff_alpha_weighted(pats_a, w, metric)
                               for w in _bootstrap_weights(inv_a, len(pats_a), n_boot, rng)]) \
            if n_boot > 0 else np.array([])
        out[f"krippendorff_alpha_{metric}"] = float(point) if np.isfinite(point) else None
        out[f"krippendorff_alpha_{metric}_ci"] = _percentile_ci(reps) if np.isfinite(point) else [None, None]

    # ---- Pairwise Cohen's kappa ----------------------------------------------------------
    rsel = multi[item_local]
    ri, ra, rc = item_local[rsel], an[rsel], cat[rsel]
    o = np.lexsort((ra, ri))
    ri, ra, rc = ri[o], ra[o], rc[o]
    starts = np.r_[0, np.flatnonzero(np.diff(ri)) + 1] if len(ri) else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, len(ri)])
    slot = np.arange(len(ri)) - np.repeat(starts, sizes)
    n_it = len(starts)
    M = int(sizes.max()) if n_it else 0
    grid_a = np.full((n_it, M), -1, dtype=np.int64)
    grid_c = np.full((n_it, M), -1, dtype=np.int64)
    row_of = np.repeat(np.arange(n_it), sizes)
    grid_a[row_of, slot] = ra
    grid_c[row_of, slot] = rc
    A = len(ann_names)
    pk, pc1, pc2 = [], [], []
    for s in range(M):
        for t in range(s + 1, M):
            ok = grid_a[:, t] >= 0          # slot s < t filled whenever t is (sorted fill)
            a1, a2 = grid_a[ok, s], grid_a[ok, t]   # a1 < a2 (annotators sorted in item)
            pk.append(a1 * A + a2)
            pc1.append(grid_c[ok, s])
            pc2.append(grid_c[ok, t])
    pairs = {}
    if pk:
        pk, pc1, pc2 = np.concatenate(pk), np.concatenate(pc1), np.concatenate(pc2)
        ukeys, pinv = np.unique(pk, return_inverse=True)
        conf = np.bincount(pinv.ravel() * K * K + pc1 * K + pc2,
                           minlength=len(ukeys) * K * K).reshape(-1, K, K)
        for key, cm in zip(ukeys.tolist(), conf):
            a1, a2 = ann_names[key // A], ann_names[key % A]
            kap = cohen_kappa_from_confusion(cm)
            pairs[(a1, a2)] = {"annotator_a": a1, "annotator_b": a2, "n_items": int(cm.sum()),
                               "cohen_kappa": kap if np.isfinite(kap) else None,
                               "observed_agreement": float(np.trace(cm) / cm.sum())}
    out["pairwise_cohen_kappa"] = sorted(pairs.values(),
                                         key=lambda d: (d["annotator_a"], d["annotator_b"]))

    # ---- Leave-one-out majority ------------------------------------------------------------
    # For rating r on item i with answer c: the others' counts are counts[i] minus one at c.
    # v1 = top count of item, k1 = number of answers with v1, v2 = best count below v1.
    cnt = counts[item_local]                              # only gathers rows: R x K
    v1 = counts.max(1)
    k1 = (counts == v1[:, None]).sum(1)
    v2 = np.where(counts < v1[:, None], counts, 0).max(1)
    own = cnt[np.arange(len(cat)), cat] if len(cat) else np.zeros(0, np.int64)
    del cnt
    ri_v1, ri_k1, ri_v2 = v1[item_local], k1[item_local], v2[item_local]
    enough = (m_i[item_local] - 1) >= 2                   # at least two other raters
    is_top = own == ri_v1
    match = is_top & (ri_k1 == 1) & (ri_v1 - 1 > ri_v2)
    # not top: others' top is v1 held by k1 answers -> mismatch if k1 == 1 else tie.
    # top & k1 > 1: others' top is v1 held by k1-1 answers -> mismatch if k1 == 2 else tie.
    # top & k1 == 1: match if v1 - 1 > v2, tie if equal.
    tie = np.where(~is_top, ri_k1 > 1,
                   np.where(ri_k1 > 1, ri_k1 > 2, ri_v1 - 1 == ri_v2))
    compared = enough & ~tie
    n_cmp = np.bincount(an[compared], minlength=A)
    n_match = np.bincount(an[compared & match], minlength=A)
    n_tie = np.bincount(an[enough & tie], minlength=A)
    n_rat = np.bincount(an, minlength=A)
    annot = []
    for a in np.flatnonzero(n_rat):
        annot.append({"annotator": ann_names[a], "n_ratings": int(n_rat[a]),
                      "n_items_compared": int(n_cmp[a]), "n_ties_excluded": int(n_tie[a]),
                      "n_matches": int(n_match[a]),
                      "loo_majority_agreement": float(n_match[a] / n_cmp[a]) if n_cmp[a] else None})
    out["annotators"] = sorted(annot, key=lambda d: d["annotator"])

    # ---- Lowest-agreement items -------------------------------------------------------------
    cand = np.flatnonzero(multi)
    spread = np.zeros(N_all)
    if ordinal and K:
        nz = counts > 0
        spread = (K - 1 - np.argmax(nz[:, ::-1], 1)) - np.argmax(nz, 1)   # max rank - min rank
    lowest = []
    if lowest_k and len(cand):
        names = item_names[item_u[cand]].astype(str)
        o = np.lexsort((names, -spread[cand], p_item[cand]))[:lowest_k]
        pick = cand[o]
        rsel = np.isin(item_local, pick)
        by_item: dict = {}
        for li, a, c in zip(item_local[rsel].tolist(), an[rsel].tolist(), cat[rsel].tolist()):
            by_item.setdefault(li, {})[ann_names[a]] = labels[c]
        for li in pick.tolist():
            lowest.append({"item_id": item_names[item_u[li]], "question": q,
                           "agreement": float(p_item[li]), "n_raters": int(m_i[li]),
                           "values": dict(sorted(by_item.get(li, {}).items()))})
    out["lowest_items"] = lowest
    return out, p_item


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
            raise ValueError(f"--ordinal names question(s) not in the data: {', '.join(unknown)}")
    questions = {}
    for q, (it, an, v) in per_q.items():
        ordinal = None if declared is None else (q in declared)
        res, _ = _question_agreement(q, it, an, v, item_names, ann_names, val_names,
                                     ordinal=ordinal, n_boot=int(n_bootstrap), rng=rng,
                                     lowest_k=lowest_k)
        questions[q] = res

    # pooled annotator reliability over questions
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


# ----------------------------------------------------------------------------------------
# Gate
# ----------------------------------------------------------------------------------------

def gate(result, min_kappa, questions=None):
    """(passed, failures): every gated question's Fleiss' kappa must be >= ``min_kappa``.
    ``questions`` limits the gate to those names (a missing name is a failure); an
    undefined kappa (e.g. every rater always gave the same answer) is a failure too."""
    qres = result["questions"]
    names = list(qres) if questions is None else [str(q) for q in questions]
    failures = []
    for q in names:
        r = qres.get(q)
        if r is None:
            failures.append(f"{q}: question not found in the annotations")
        elif r.get("fleiss_kappa") is None:
            why = r.get("skipped") or "Fleiss' kappa is undefined (not enough variation or items)"
            failures.append(f"{q}: {why}")
        elif r["fleiss_kappa"] < min_kappa:
            failures.append(f"{q}: Fleiss' kappa {r['fleiss_kappa']:.3f} < {min_kappa:g}")
    return (not failures), failures


# ----------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------

def _json_clean(x):
    if isinstance(x, dict):
        return {str(k): _json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_clean(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _fmt(x, nd=3):
    return "–" if x is None else f"{x:.{nd}f}"


def _fmt_ci(ci):
    return "–" if not ci or ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _fig_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


BAND_COLORS = {"poor": "#b91c1c", "slight": "#dc2626", "fair": "#ea580c", "moderate": "#ca8a04",
               "substantial": "#16a34a", "almost perfect": "#15803d", "undefined": "#6b7280"}


def _plots(result):
    import matplotlib
    matplotlib.use("Agg", force=False) if matplotlib.get_backend().lower() != "agg" else None
    import matplotlib.pyplot as plt
    plots = {}
    qs = [r for r in result["questions"].values() if r.get("fleiss_kappa") is not None]
    if qs:
        fig, ax = plt.subplots(figsize=(7.5, 0.5 + 0.45 * len(qs)))
        names = [r["question"] for r in qs][::-1]
        ks = np.array([r["fleiss_kappa"] for r in qs][::-1])
        lo = np.array([r["ci"][0] if r["ci"][0] is not None else k for r, k in zip(qs[::-1], ks)])
        hi = np.array([r["ci"][1] if r["ci"][1] is not None else k for r, k in zip(qs[::-1], ks)])
        for x0, x1, c in [(-1, 0, "#fde2e2"), (0, .2, "#fee9d6"), (.2, .4, "#fef3c7"),
                          (.4, .6, "#fef9c3"), (.6, .8, "#dcfce7"), (.8, 1, "#bbf7d0")]:
            ax.axvspan(x0, x1, color=c, zorder=0)
        ax.barh(names, ks, color=[BAND_COLORS[landis_koch(k)] for k in ks], height=0.55, zorder=2)
        ax.errorbar(ks, names, xerr=[ks - lo, hi - ks], fmt="none", ecolor="#111827",
                    capsize=4, lw=1.2, zorder=3)
        gate_t = (result.get("gate") or {}).get("min_kappa")
        if gate_t is not None:
            ax.axvline(gate_t, color="#1d4ed8", ls="--", lw=1.2, zorder=4,
                       label=f"gate κ ≥ {gate_t:g}")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlim(min(-0.05, float(np.nanmin(lo)) - 0.05), 1.0)
        ax.set_xlabel("Fleiss' κ with 95% bootstrap CI  (bands: Landis & Koch)")
        ax.grid(axis="x", alpha=.3, zorder=1)
        for s in ("top", "right"):
            ax.spines[s].set_visible(False)
        plots["kappa"] = _fig_png(fig)
    ann = [a for a in result["annotators"] if a["loo_majority_agreement"] is not None]
    if ann:
        ann = sorted(ann, key=lambda a: a["loo_majority_agreement"])[:40]
        fig, ax = plt.subplots(figsize=(7.5, 0.6 + 0.32 * len(ann)))
        ys = [str(a["annotator"]) for a in ann]
        vs = [a["loo_majority_agreement"] for a in ann]
        colors = ["#dc2626" if a["flagged"] else "#2563eb" if a["n_items_compared"] >= FLAG_MIN_ITEMS
                  else "#9ca3af" for a in ann]
        ax.barh(ys, vs, color=colors, height=.6)
        med = result.get("annotator_median_agreement")
        if med is not None:
            ax.axvline(med, color="#111827", ls=":", lw=1, label=f"median {med:.2f}")
            ax.axvline(med - FLAG_MARGIN, color="#dc2626", ls="--", lw=1,
                       label=f"flag line {med - FLAG_MARGIN:.2f}")
            ax.legend(loc="lower right", fontsize=8)
        for y, v, a in zip(ys, vs, ann):
            few = " - too few to judge" if a["n_items_compared"] < FLAG_MIN_ITEMS else ""
            ax.text(min(v + 0.01, 0.80), y, f"{v:.2f} (n={a['n_items_compared']}{few})",
                    va="center", fontsize=7.5)
        ax.set_xlim(0, 1.0)
        ax.set_xlabel("agreement with the majority of the other annotators")
        for s in ("top", "right"):
            ax.spines[s].set_visible(False)
        plots["annotators"] = _fig_png(fig)
    heat = {}
    for q, r in result["questions"].items():
        pairs = r.get("pairwise_cohen_kappa") or []
        if not pairs:
            continue
        n_by = {a["annotator"]: a["n_ratings"] for a in r["annotators"]}
        names = sorted(n_by, key=lambda a: (-n_by[a], a))[:HEATMAP_MAX_ANNOTATORS]
        names.sort()
        idx = {a: i for i, a in enumerate(names)}
        mat = np.full((len(names), len(names)), np.nan)
        for p in pairs:
            i, j = idx.get(p["annotator_a"]), idx.get(p["annotator_b"])
            if i is None or j is None or p["cohen_kappa"] is None or p["n_items"] < HEATMAP_MIN_SHARED:
                continue
            mat[i, j] = mat[j, i] = p["cohen_kappa"]
        np.fill_diagonal(mat, 1.0)
        sz = 1.6 + 0.42 * len(names)
        fig, ax = plt.subplots(figsize=(sz + 1.2, sz))
        cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#e5e7eb")
        im = ax.imshow(np.ma.masked_invalid(mat), cmap=cmap, vmin=-0.2, vmax=1.0)
        ax.set_xticks(range(len(names)), [str(n) for n in names], rotation=60, ha="right",
                      fontsize=8)
        ax.set_yticks(range(len(names)), [str(n) for n in names], fontsize=8)
        if len(names) <= 12:
            for i in range(len(names)):
                for j in range(len(names)):
                    if i != j and np.isfinite(mat[i, j]):
                        ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(str(q), fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Cohen's κ")
        heat[q] = _fig_png(fig)
    plots["heatmaps"] = heat
    return plots


def _e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


CSS = """
body{font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f8fafc;color:#0f172a;line-height:1.45}
main{max-width:1060px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.6rem;margin:0 0 4px}h2{font-size:1.2rem;margin:34px 0 8px;border-bottom:1px solid #e2e8f0;padding-bottom:4px}
.sub{color:#475569;font-size:.9rem}
.explain{color:#334155;font-size:.92rem;background:#fff;border-left:4px solid #93c5fd;padding:8px 12px;margin:8px 0 14px}
table{border-collapse:collapse;width:100%;background:#fff;font-size:.88rem;box-shadow:0 1px 2px rgba(0,0,0,.05)}
th,td{padding:6px 9px;border-bottom:1px solid #e2e8f0;text-align:left;vertical-align:top}
th{background:#f1f5f9;font-weight:600;white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.chip{display:inline-block;border-radius:10px;padding:1px 8px;color:#fff;font-size:.78rem;white-space:nowrap}
.verdict{padding:12px 16px;border-radius:6px;font-weight:600;margin:16px 0}
.pass{background:#dcfce7;color:#14532d;border:1px solid #86efac}.fail{background:#fee2e2;color:#7f1d1d;border:1px solid #fca5a5}
img{max-width:100%;background:#fff;border:1px solid #e2e8f0;border-radius:4px}
.grid{display:flex;flex-wrap:wrap;gap:12px}.grid img{max-width:48%}
.flag{color:#b91c1c;font-weight:600}code{background:#f1f5f9;padding:0 4px;border-radius:3px}
.ans{display:inline-block;background:#f1f5f9;border:1px solid #e2e8f0;border-radius:4px;padding:0 6px;margin:1px 2px;font-size:.8rem;white-space:nowrap}
details{margin:6px 0}summary{cursor:pointer;padding:6px 2px}table.lowest td:first-child{white-space:nowrap}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}.card{background:#fff;border:1px solid #e2e8f0;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:1.3rem}.card span{color:#64748b;font-size:.8rem}
"""


def _chip(band):
    return f'<span class="chip" style="background:{BAND_COLORS.get(band, "#6b7280")}">{_e(band)}</span>'


def _render_html(result, plots) -> str:
    qres = result["questions"]
    d = result["data"]
    h = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
         "<meta name='viewport' content='width=device-width,initial-scale=1'>",
         "<title>Annotation agreement report</title><style>", CSS, "</style></head><body><main>",
         "<h1>Annotation agreement report</h1>",
         f"<div class='sub'>Source: <code>{_e(result.get('source', '(in memory)'))}</code> · "
         f"generated {_e(result.get('generated_at', ''))} · {_e(result['settings']['n_bootstrap'])} bootstrap resamples, seed {_e(result['settings']['seed'])}</div>"]
    g = result.get("gate")
    if g:
        if g["passed"]:
            h.append(f"<div class='verdict pass' id='verdict'>Gate PASSED: every checked question has "
                     f"Fleiss' κ ≥ {g['min_kappa']:g}.</div>")
        else:
            items = "".join(f"<li>{_e(f)}</li>" for f in g["failures"])
            h.append(f"<div class='verdict fail' id='verdict'>Gate FAILED (minimum κ "
                     f"{g['min_kappa']:g}):<ul>{items}</ul></div>")
    h.append("<div class='cards'>"
             f"<div class='card'><b>{d['n_items']}</b><span>items</span></div>"
             f"<div class='card'><b>{d['n_annotators']}</b><span>annotators</span></div>"
             f"<div class='card'><b>{d['n_questions']}</b><span>questions</span></div>"
             f"<div class='card'><b>{d['n_rows_used']}</b><span>answers used</span></div></div>")

    h.append("<h2>Summary</h2><div class='explain'><b>κ (kappa)</b> measures how much annotators "
             "agree beyond what chance alone would give: 1 = perfect agreement, 0 = no better than "
             "guessing, below 0 = systematic disagreement. The <b>95% interval</b> shows how much "
             "κ could move with a different sample of items - a wide interval means too few items "
             "to be sure. <b>Raw agreement</b> is the plain share of annotator pairs giving the same "
             "answer (it looks high when one answer dominates; κ corrects for that). For 1–5 ratings, "
             "<b>α ordinal</b> (Krippendorff) also gives partial credit for near misses (4 vs 5 "
             "counts less against agreement than 1 vs 5). For comparison, published preference data "
             "typically reaches κ 0.4–0.6; InstructGPT labelers agreed 72.6% of the time.</div>")
    h.append("<table id='summary'><thead><tr><th>Question</th><th>Type</th><th>Items</th>"
             "<th>Raters / item</th><th>Fleiss' κ</th><th>95% interval</th><th>Meaning</th>"
             "<th>Raw agreement</th><th>α ordinal</th><th>Items left out of κ</th></tr></thead><tbody>")
    for q, r in qres.items():
        if r.get("skipped"):
            h.append(f"<tr><td>{_e(q)}</td><td colspan='9'>skipped: {_e(r['skipped'])}</td></tr>")
            continue
        h.append(f"<tr><td>{_e(q)}</td><td>{_e(r['type'])}</td><td class='num'>{r['n_items']}</td>"
                 f"<td class='num'>{r['n_raters']}</td><td class='num'><b>{_fmt(r['fleiss_kappa'])}</b></td>"
                 f"<td class='num'>{_fmt_ci(r['ci'])}</td><td>{_chip(r['band'])}</td>"
                 f"<td class='num'>{_fmt(r.get('observed_agreement'))}</td>"
                 f"<td class='num'>{_fmt(r.get('krippendorff_alpha_ordinal'))}</td>"
                 f"<td class='num'>{r['n_items_excluded']}</td></tr>")
    h.append("</tbody></table><p class='sub'>Meaning follows Landis &amp; Koch (1977): &lt;0 poor, "
             "0–0.20 slight, 0.21–0.40 fair, 0.41–0.60 moderate, 0.61–0.80 substantial, "
             "0.81–1 almost perfect.</p>")
    if plots.get("kappa"):
        h.append(f"<img id='kappa-plot' alt='Fleiss kappa per question with 95% intervals' "
                 f"src='data:image/png;base64,{plots['kappa']}'>")

    h.append("<h2>Annotators</h2><div class='explain'>For each answer, we look at what the "
             "<i>other</i> annotators of the same item chose by majority, and count how often this "
             "annotator matched it. Items with fewer than two other annotators, or where the others "
             "are split evenly, are skipped. An annotator far below the rest may have misread the "
             f"guidelines or be answering carelessly: {_e(result['annotator_flag_rule'])} "
             "(shown in red).</div>")
    if plots.get("annotators"):
        h.append(f"<img id='annotator-plot' alt='Annotator agreement with majority' "
                 f"src='data:image/png;base64,{plots['annotators']}'>")
    h.append("<table id='annotators'><thead><tr><th>Annotator</th><th>Answers</th>"
             "<th>Items compared</th><th>Matches majority</th><th>Ties skipped</th><th></th>"
             "</tr></thead><tbody>")
    for a in sorted(result["annotators"], key=lambda a: (a["loo_majority_agreement"] is None,
                                                         a["loo_majority_agreement"] or 0)):
        h.append(f"<tr><td>{_e(a['annotator'])}</td><td class='num'>{a['n_ratings']}</td>"
                 f"<td class='num'>{a['n_items_compared']}</td>"
                 f"<td class='num'>{_fmt(a['loo_majority_agreement'])}</td>"
                 f"<td class='num'>{a['n_ties_excluded']}</td>"
                 f"<td>{'<span class=flag>check this annotator</span>' if a['flagged'] else ''}</td></tr>")
    h.append("</tbody></table>")

    if plots.get("heatmaps"):
        h.append("<h2>Annotator pairs</h2><div class='explain'>Cohen's κ for every pair of "
                 "annotators, on the items both answered. A row that is red across the board "
                 "points at one annotator who disagrees with everyone; grey means the pair shared "
                 f"fewer than {HEATMAP_MIN_SHARED} items (or κ is undefined)."
                 + (f" Only the {HEATMAP_MAX_ANNOTATORS} annotators with the most answers are shown; "
                    "all pairs are in agreement.json." if len(result["annotators"]) >
                    HEATMAP_MAX_ANNOTATORS else "") + "</div><div class='grid'>")
        for q, png in plots["heatmaps"].items():
            h.append(f"<img class='heatmap' alt='Pairwise Cohen kappa for {_e(q)}' "
                     f"src='data:image/png;base64,{png}'>")
        h.append("</div>")

    h.append("<h2>Items to adjudicate</h2><div class='explain'>Per question, the items where "
             "annotators agreed least (agreement = share of annotator pairs that gave the same "
             "answer; for ratings, ties are broken by the spread of the scores). These are worth a "
             "second look: the item may be ambiguous, or the guidelines unclear.</div><div id='lowest'>")
    first = True
    for q, r in qres.items():
        low = r.get("lowest_items") or []
        if not low:
            continue
        h.append(f"<details{' open' if first else ''}><summary><b>{_e(q)}</b> "
                 f"<span class='sub'>({len(low)} items, agreement {low[0]['agreement']:.2f}–"
                 f"{low[-1]['agreement']:.2f})</span></summary><table class='lowest'><thead><tr>"
                 "<th>Item</th><th>Agreement</th><th>Raters</th><th>Answers</th></tr></thead><tbody>")
        first = False
        for it in low:
            vals = " ".join(f"<span class='ans'>{_e(a)}: <b>{_e(v)}</b></span>"
                            for a, v in it["values"].items())
            h.append(f"<tr><td>{_e(it['item_id'])}</td><td class='num'>{_fmt(it['agreement'], 2)}"
                     f"</td><td class='num'>{it['n_raters']}</td><td>{vals}</td></tr>")
        h.append("</tbody></table></details>")
    h.append("</div>")

    h.append("<h2>Items with an unusual number of annotators</h2><div class='explain' id='policy'>"
             "Fleiss' κ needs every item to have the same number of annotators. We use the most "
             "common number (m). Items that have <i>more</i> than m annotators keep m of them, "
             "picked by a fixed rule (a hash of item and annotator name, so the choice is "
             "repeatable and does not favour any annotator). Items with <i>fewer</i> than m "
             "annotators are left out of κ, and items with only one answer are left out of "
             "everything. Raw agreement, α, the pair table and the annotator table still use every "
             "answer of every item with at least two answers.</div>")
    h.append("<table id='exclusions'><thead><tr><th>Question</th><th>m</th><th>Items</th>"
             "<th>Trimmed to m</th><th>Left out of κ</th><th>Why</th><th>Raters per item</th>"
             "</tr></thead><tbody>")
    for q, r in qres.items():
        if r.get("skipped"):
            continue
        why = "; ".join(f"{x['n_items']}: {x['reason']}" for x in r["exclusions"]) or "none"
        dist = ", ".join(f"{k}×{v}" for k, v in r["raters_per_item"].items())
        h.append(f"<tr><td>{_e(q)}</td><td class='num'>{r['n_raters']}</td>"
                 f"<td class='num'>{r['n_items_total']}</td><td class='num'>{r['n_items_subsampled']}</td>"
                 f"<td class='num'>{r['n_items_excluded']}</td><td>{_e(why)}</td>"
                 f"<td class='sub'>{_e(dist)} <span class='sub'>(raters×items)</span></td></tr>")
    h.append("</tbody></table>")
    h.append(f"<h2>Data</h2><p class='sub'>{d['n_rows']} rows read; {d['n_rows_used']} used; "
             f"{d['n_rows_ignored_status']} ignored because their status was not “submitted”; "
             f"{d['n_rows_ignored_empty_value']} with an empty value; "
             f"{d['n_rows_ignored_duplicate']} duplicates (same annotator, item and question; the "
             f"latest was kept). Full numbers: <code>agreement.json</code>.</p>")
    h.append("</main></body></html>")
    return "\n".join(h)


def _md(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _render_md(result) -> str:
    lines = ["# Annotation agreement report", ""]
    if result.get("source"):
        lines += [f"Source: `{result['source']}`", ""]
    g = result.get("gate")
    if g:
        lines += [f"**Gate {'PASSED' if g['passed'] else 'FAILED'}** (minimum Fleiss' κ "
                  f"{g['min_kappa']:g})"] + [f"- {f}" for f in g["failures"]] + [""]
    lines += ["| question | type | items | raters/item | Fleiss' κ | 95% CI | meaning | raw agreement "
              "| α ordinal | left out of κ |", "|---|---|---:|---:|---:|---|---|---:|---:|---:|"]
    for q, r in result["questions"].items():
        if r.get("skipped"):
            lines.append(f"| {_md(q)} | skipped: {r['skipped']} |||||||||")
            continue
        lines.append(f"| {_md(q)} | {r['type']} | {r['n_items']} | {r['n_raters']} | "
                     f"{_fmt(r['fleiss_kappa'])} | {_fmt_ci(r['ci'])} | {r['band']} | "
                     f"{_fmt(r.get('observed_agreement'))} | "
                     f"{_fmt(r.get('krippendorff_alpha_ordinal'))} | {r['n_items_excluded']} |")
    lines += ["", "κ: agreement beyond chance (1 perfect, 0 chance). Meaning: Landis & Koch (1977). "
              "Raw agreement: share of annotator pairs giving the same answer.", "",
              "## Unequal annotator counts", ""]
    for q, r in result["questions"].items():
        if not r.get("skipped"):
            lines.append(f"- **{_md(q)}**: {r['unequal_counts_policy']}")
    lines += ["", "## Annotators (agreement with the leave-one-out majority)", "",
              f"{result['annotator_flag_rule']}.", "",
              "| annotator | answers | items compared | matches majority | flagged |",
              "|---|---:|---:|---:|---|"]
    for a in result["annotators"]:
        lines.append(f"| {_md(a['annotator'])} | {a['n_ratings']} | {a['n_items_compared']} | "
                     f"{_fmt(a['loo_majority_agreement'])} | {'**yes**' if a['flagged'] else ''} |")
    lines += ["", "## Lowest-agreement items", "", "| item | question | agreement | answers |",
              "|---|---|---:|---|"]
    for it in result["lowest_items"]:
        vals = _md(", ".join(f"{a}: {v}" for a, v in it["values"].items()))
        lines.append(f"| {_md(it['item_id'])} | {_md(it['question'])} | {it['agreement']:.2f} | {vals} |")
    return "\n".join(lines) + "\n"


def write_report(result, out_dir) -> dict:
    """Write agreement.json, report.md and a self-contained report.html into ``out_dir``.
    Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(result)
    result.setdefault("generated_at", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    clean = _json_clean(result)
    paths = {"json": out / "agreement.json", "md": out / "report.md", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(clean, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                             encoding="utf-8")
    paths["md"].write_text(_render_md(clean), encoding="utf-8")
    paths["html"].write_text(_render_html(clean, _plots(clean)), encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------

def _csv_list(s):
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def summary_table(result) -> str:
    rows = [("question", "type", "items", "m", "kappa", "95% CI", "meaning", "raw", "alpha_ord")]
    for q, r in result["questions"].items():
        if r.get("skipped"):
            rows.append((q, "skipped", "", "", "", "", "", "", ""))
            continue
        rows.append((q, r["type"], str(r["n_items"]), str(r["n_raters"]), _fmt(r["fleiss_kappa"]),
                     _fmt_ci(r["ci"]), r["band"], _fmt(r.get("observed_agreement")),
                     _fmt(r.get("krippendorff_alpha_ordinal"))))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]])


def run_agreement(args) -> int:
    """Handler of ``alignkit annotate agreement``; returns the exit code."""
    try:
        rows = load_annotations(args.annotations)
        result = compute_agreement(rows, ordinal_questions=_csv_list(args.ordinal),
                                   n_bootstrap=args.bootstrap, seed=args.seed)
    except (AnnotationFileError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["source"] = str(args.annotations)
    questions = _csv_list(args.questions)
    if questions:
        missing = [q for q in questions if q not in result["questions"]]
        if missing and args.min_kappa is None:
            print(f"error: --questions names question(s) not in the data: {', '.join(missing)}",
                  file=sys.stderr)
            return 2
    code = 0
    if args.min_kappa is not None:
        passed, failures = gate(result, args.min_kappa, questions)
        result["gate"] = {"min_kappa": args.min_kappa, "questions": questions or
                          list(result["questions"]), "passed": passed, "failures": failures}
        code = 0 if passed else 3
    paths = write_report(result, args.out)
    print(summary_table(result))
    flagged = [a["annotator"] for a in result["annotators"] if a["flagged"]]
    if flagged:
        print(f"annotators to check: {', '.join(map(str, flagged))}")
    print(f"report: {paths['html']}")
    if args.min_kappa is not None:
        if code:
            print(f"GATE FAILED (min kappa {args.min_kappa:g}):", file=sys.stderr)
            for f in result["gate"]["failures"]:
                print(f"  {f}", file=sys.stderr)
        else:
            print(f"gate passed (min kappa {args.min_kappa:g})")
    return code


def _add_arguments(p):
    p.add_argument("--annotations", required=True, metavar="FILE",
                   help="long-format table (CSV or JSONL): item_id, annotator, question, value")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="directory for agreement.json, report.md, report.html")
    p.add_argument("--min-kappa", type=float, default=None, metavar="X",
                   help="fail (exit code 3) when a question's Fleiss' kappa is below X")
    p.add_argument("--questions", default=None, metavar="Q1,Q2",
                   help="questions the --min-kappa gate applies to (default: all)")
    p.add_argument("--ordinal", default=None, metavar="Q1,Q2",
                   help="questions that are ordinal ratings (default: auto-detect 1..5 integers)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for the confidence intervals (default 1000)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="bootstrap seed (default 0)")


def register_cli(annotate_subparsers):
    """Add ``agreement`` to the ``alignkit annotate`` sub-commands."""
    p = annotate_subparsers.add_parser(
        "agreement", help="inter-annotator agreement report (Fleiss' kappa, alpha, ...)",
        description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    p.set_defaults(func=run_agreement)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["agreement"]:
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="python -m alignkit.annotation.agreement",
                                     description="Inter-annotator agreement report.")
    _add_arguments(parser)
    args = parser.parse_args(argv)
    return run_agreement(args)


if __name__ == "__main__":
    sys.exit(main())
