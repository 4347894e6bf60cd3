"""Agreement measures of one question, and the count-table formulas under them.

:func:`question_agreement` turns one question's ratings into its statistics (Fleiss' kappa under
the unequal-counts policy, Krippendorff's alpha, pairwise Cohen's kappa, each annotator's
agreement with the leave-one-out majority, the least-agreed items); the module docstring of
:mod:`alignkit.annotation.agreement` says what each one means. The formulas work on count tables
(items x categories) and take a weight per item, so one vectorised call gives the point
estimate (weights of ones) or a whole batch of bootstrap replicates (multinomial weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from alignkit.config import ConfigError

MAX_CATEGORIES = 200          # more distinct answers than this: free text, agreement skipped
LANDIS_KOCH = (               # (upper bound, label) - Landis & Koch (1977)
    (0.0, "poor"),
    (0.20, "slight"),
    (0.40, "fair"),
    (0.60, "moderate"),
    (0.80, "substantial"),
    (1.0 + 1e-9, "almost perfect"),
)


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
# One question
# ----------------------------------------------------------------------------------------

@dataclass
class _Ratings:
    """One question's ratings, per rating (``item``: index into ``items``, ``annotator``: code,
    ``cat``: category index) and per item (``counts``: items x categories, ``m_i``: ratings per
    item, ``multi``: items with at least two ratings, the only ones agreement is defined on)."""

    item: np.ndarray
    annotator: np.ndarray
    cat: np.ndarray
    items: np.ndarray             # codes into item_names
    counts: np.ndarray
    m_i: np.ndarray
    multi: np.ndarray


def question_agreement(q, it, an, vcode, item_names, ann_names, val_names, *, ordinal,
                       n_boot, rng, lowest_k):
    """Statistics of question ``q`` from its ratings (item codes ``it``, annotator codes ``an``,
    value codes ``vcode``): (JSON-ready dict, per-item agreement or None when skipped).
    ``ordinal`` None detects 1..5 ratings. ``rng`` is drawn from by Fleiss' bootstrap, then by
    Krippendorff's (nominal, then ordinal): that order fixes every interval for a seed."""
    ordinal, cats_used, labels = _ordered_categories(q, vcode, val_names, ordinal)
    K = len(labels)
    out: dict = {"question": q, "type": "ordinal" if ordinal else "nominal", "categories": labels}
    if K > MAX_CATEGORIES:
        out["skipped"] = (f"{K} distinct answers (more than {MAX_CATEGORIES}); looks like free "
                          f"text, agreement is not computed")
        out["fleiss_kappa"], out["ci"], out["n_items"], out["n_raters"] = None, [None, None], 0, 0
        return out, None
    lut = np.full(len(val_names), -1, dtype=np.int64)
    lut[cats_used] = np.arange(K)
    r = _count_table(it, an, lut[vcode], K)
    out["category_counts"] = {lab: int(c) for lab, c in zip(labels, r.counts.sum(0))}
    out["n_ratings"] = int(len(r.cat))
    out["n_annotators"] = int(len(np.unique(an)))
    out["raters_per_item"] = {str(k): int(v) for k, v in
                              zip(*np.unique(r.m_i, return_counts=True))}
    p_item = _item_agreement(r)
    out["observed_agreement"] = float(np.nanmean(p_item)) if r.multi.any() else None
    out["unanimous_fraction"] = float((p_item[r.multi] == 1).mean()) if r.multi.any() else None
    out.update(_fleiss(r, item_names, ann_names, n_boot, rng))
    out.update(_krippendorff(r, ordinal, n_boot, rng))
    out["pairwise_cohen_kappa"] = _pairwise_cohen(r, ann_names, K)
    out["annotators"] = _loo_majority(r, ann_names)
    out["lowest_items"] = _lowest_items(r, q, p_item, item_names, ann_names, labels, ordinal, lowest_k)
    return out, p_item


def _ordered_categories(q, vcode, val_names, ordinal):
    """(ordinal, category codes, labels): the question's answers in rank order (numeric for an
    ordinal question, else alphabetical)."""
    cats_used = np.unique(vcode)
    labels = [val_names[c] for c in cats_used]
    if ordinal is None:
        ordinal = _is_rating_scale(labels)
    elif ordinal and not _is_rating_scale(labels):
        # declared ordinal: accept any numeric scale
        try:
            [float(x) for x in labels]
        except ValueError:
            raise ConfigError(f"question {q!r} was declared ordinal but has non-numeric "
                             f"values: {labels[:5]}") from None
    if ordinal:
        order = np.argsort([float(x) for x in labels], kind="stable")
    else:
        order = np.argsort(labels, kind="stable")
    return ordinal, cats_used[order], [labels[i] for i in order]


def _count_table(it, an, cat, K) -> _Ratings:
    item_u, item_local = np.unique(it, return_inverse=True)
    item_local = item_local.ravel()
    N_all = len(item_u)
    counts = np.bincount(item_local * K + cat, minlength=N_all * K).reshape(N_all, K)
    m_i = counts.sum(1)
    return _Ratings(item_local, an, cat, item_u, counts, m_i, m_i >= 2)


def _item_agreement(r: _Ratings):
    """Per item (all raters): the fraction of rater pairs that agree; NaN for single ratings."""
    with np.errstate(invalid="ignore", divide="ignore"):
        p_item = ((r.counts * (r.counts - 1)).sum(1) / (r.m_i * (r.m_i - 1.0)))
    p_item[~r.multi] = np.nan
    return p_item


def _fleiss(r: _Ratings, item_names, ann_names, n_boot, rng) -> dict:
    """Fleiss' kappa with the unequal-counts policy (see the agreement module's docstring)."""
    counts, m_i, multi = r.counts, r.m_i, r.multi
    n_single = int((~multi).sum())
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
        fleiss_counts[more] = _keep_m_ratings(r, more, m, item_names, ann_names)[more]
    table = fleiss_counts[fleiss_items]
    N_all = len(counts)
    out = {"n_items": int(fleiss_items.sum()), "n_raters": m, "n_items_total": int(N_all),
           "n_items_excluded": int(N_all - fleiss_items.sum()), "n_items_subsampled": int(more.sum()),
           "exclusions": exclusions}
    out["unequal_counts_policy"] = (
        f"Fleiss' kappa needs the same number of raters per item; used m={m}, the most common "
        f"count. {int(more.sum())} item(s) with more raters kept {m} ratings chosen by a fixed "
        f"hash of (item, annotator); {int(fewer.sum())} item(s) with fewer raters and "
        f"{n_single} item(s) with a single rating were left out of kappa. All other statistics "
        f"use every rating.")
    if len(table) and m >= 2 and counts.shape[1] >= 1:
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
    return out


def _keep_m_ratings(r: _Ratings, more, m, item_names, ann_names):
    """Count table of the over-rated items ``more`` with m ratings each, chosen by a fixed hash of
    (item, annotator): deterministic, and biased towards no annotator name."""
    rsel = more[r.item]
    r_items, r_ann, r_cat = r.item[rsel], r.annotator[rsel], r.cat[rsel]
    h = _mix64(_string_hash(item_names[r.items[r_items]].tolist())
               ^ _mix64(_string_hash(ann_names[r_ann].tolist())))
    o = np.lexsort((h, r_items))
    r_items, r_cat = r_items[o], r_cat[o]
    start = np.r_[0, np.flatnonzero(np.diff(r_items)) + 1]
    rank = np.arange(len(r_items)) - np.repeat(start, np.diff(np.r_[start, len(r_items)]))
    keep = rank < m
    sub = np.zeros(r.counts.shape, dtype=np.int64)
    np.add.at(sub, (r_items[keep], r_cat[keep]), 1)
    return sub


def _krippendorff(r: _Ratings, ordinal, n_boot, rng) -> dict:
    """Krippendorff's alpha (nominal; ordinal too for ordinal questions) with bootstrap CIs, on
    all items with at least two ratings (unequal counts are fine)."""
    out = {}
    pats_a, inv_a = _patterns(r.counts[r.multi])
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
    return out


def _pairwise_cohen(r: _Ratings, ann_names, K) -> list[dict]:
    """Cohen's kappa of every annotator pair on the items both answered, sorted by names."""
    rsel = r.multi[r.item]
    ri, ra, rc = r.item[rsel], r.annotator[rsel], r.cat[rsel]
    o = np.lexsort((ra, ri))
    ri, ra, rc = ri[o], ra[o], rc[o]
    # a grid per item (rows) of its raters (columns, annotators in code order) and their answers
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
    return sorted(pairs.values(), key=lambda d: (d["annotator_a"], d["annotator_b"]))


def _loo_majority(r: _Ratings, ann_names) -> list[dict]:
    """Per annotator: how often its answer matches the majority of the item's other raters
    (items with fewer than two other raters, or a tied majority, are skipped)."""
    counts, cat, an, item_local = r.counts, r.cat, r.annotator, r.item
    # For rating r on item i with answer c: the others' counts are counts[i] minus one at c.
    # v1 = top count of item, k1 = number of answers with v1, v2 = best count below v1.
    cnt = counts[item_local]                              # only gathers rows: R x K
    v1 = counts.max(1)
    k1 = (counts == v1[:, None]).sum(1)
    v2 = np.where(counts < v1[:, None], counts, 0).max(1)
    own = cnt[np.arange(len(cat)), cat] if len(cat) else np.zeros(0, np.int64)
    del cnt
    ri_v1, ri_k1, ri_v2 = v1[item_local], k1[item_local], v2[item_local]
    enough = (r.m_i[item_local] - 1) >= 2                 # at least two other raters
    is_top = own == ri_v1
    match = is_top & (ri_k1 == 1) & (ri_v1 - 1 > ri_v2)
    # not top: others' top is v1 held by k1 answers -> mismatch if k1 == 1 else tie.
    # top & k1 > 1: others' top is v1 held by k1-1 answers -> mismatch if k1 == 2 else tie.
    # top & k1 == 1: match if v1 - 1 > v2, tie if equal.
    tie = np.where(~is_top, ri_k1 > 1,
                   np.where(ri_k1 > 1, ri_k1 > 2, ri_v1 - 1 == ri_v2))
    compared = enough & ~tie
    A = len(ann_names)
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
    return sorted(annot, key=lambda d: d["annotator"])


def _lowest_items(r: _Ratings, q, p_item, item_names, ann_names, labels, ordinal, lowest_k) -> list[dict]:
    """The ``lowest_k`` least-agreed items (ordinal ties broken by the spread of the ratings),
    with every rater's answer."""
    counts, K = r.counts, len(labels)
    cand = np.flatnonzero(r.multi)
    spread = np.zeros(len(counts))
    if ordinal and K:
        nz = counts > 0
        spread = (K - 1 - np.argmax(nz[:, ::-1], 1)) - np.argmax(nz, 1)   # max rank - min rank
    lowest = []
    if lowest_k and len(cand):
        names = item_names[r.items[cand]].astype(str)
        o = np.lexsort((names, -spread[cand], p_item[cand]))[:lowest_k]
        pick = cand[o]
        rsel = np.isin(r.item, pick)
        by_item: dict = {}
        for li, a, c in zip(r.item[rsel].tolist(), r.annotator[rsel].tolist(), r.cat[rsel].tolist()):
            by_item.setdefault(li, {})[ann_names[a]] = labels[c]
        for li in pick.tolist():
            lowest.append({"item_id": item_names[r.items[li]], "question": q,
                           "agreement": float(p_item[li]), "n_raters": int(r.m_i[li]),
                           "values": dict(sorted(by_item.get(li, {}).items()))})
    return lowest
