"""Tests for annotation/agreement.py (inter-annotator agreement), its measures, gate, report and CLI verb."""

import argparse
import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from alignkit.annotation import agreement as ag
from alignkit.annotation import agreement_measures as measures
from alignkit.annotation.agreement_report import write_report
from alignkit.annotation.cli import configure_cli
from alignkit.annotation.gate import GateError, gate
from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def long_rows(matrix, question="q", annotators=None, items=None):
    """items x raters matrix (None = not answered) -> long-format rows."""
    rows = []
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v is None:
                continue
            rows.append({"item_id": items[i] if items else f"i{i}",
                         "annotator": annotators[j] if annotators else f"r{j + 1}",
                         "question": question, "value": v})
    return rows


def synthetic(n_items=300, n_ann=5, questions=("preference",), ordinal=(), seed=0,
              noisy="ann_4", p_correct=0.8):
    """Annotators who mostly agree with a hidden truth, and one who answers at random."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in questions:
        for i in range(n_items):
            if q in ordinal:
                truth = int(rng.integers(1, 6))
            else:
                truth = ["response_1", "response_2"][int(rng.integers(0, 2))]
            for a in range(n_ann):
                name = f"ann_{a}"
                if q in ordinal:
                    v = truth if rng.random() < p_correct else int(np.clip(truth + rng.choice([-1, 1]), 1, 5))
                    if name == noisy:
                        v = int(rng.integers(1, 6))
                else:
                    v = truth if rng.random() < p_correct else \
                        ("response_2" if truth == "response_1" else "response_1")
                    if name == noisy:
                        v = ["response_1", "response_2"][int(rng.integers(0, 2))]
                rows.append({"item_id": f"item-{i}", "annotator": name, "question": q,
                             "value": v, "status": "submitted"})
    return rows


# --------------------------------------------------------------------------------------
# Hand-computed case
# --------------------------------------------------------------------------------------

HAND = [  # 4 items x 3 raters (r1, r2, r3), categories A/B
    ["A", "A", "A"],
    ["A", "A", "B"],
    ["A", "B", "B"],
    ["B", "B", "B"],
]


def test_hand_computed_fleiss_cohen_and_loo():
    # Counts per item (A, B): (3,0) (2,1) (1,2) (0,3); m = 3 raters.
    # Per-item agreement P_i = (sum_j n_ij^2 - m) / (m (m - 1)):
    #   (9 + 0 - 3)/6 = 1,  (4 + 1 - 3)/6 = 1/3,  (1 + 4 - 3)/6 = 1/3,  (0 + 9 - 3)/6 = 1
    #   P_bar = (1 + 1/3 + 1/3 + 1) / 4 = 2/3       (= observed agreement)
    # Category shares: p_A = (3+2+1+0)/12 = 1/2, p_B = 1/2 -> P_e = 1/4 + 1/4 = 1/2
    # kappa = (P_bar - P_e) / (1 - P_e) = (2/3 - 1/2) / (1/2) = 1/3
    res = ag.compute_agreement(long_rows(HAND), n_bootstrap=200)
    q = res["questions"]["q"]
    assert q["fleiss_kappa"] == pytest.approx(1 / 3, abs=1e-12)
    assert q["observed_agreement"] == pytest.approx(2 / 3, abs=1e-12)
    assert q["n_items"] == 4 and q["n_raters"] == 3 and q["n_items_excluded"] == 0
    assert q["category_counts"] == {"A": 6, "B": 6}
    assert q["type"] == "nominal"
    assert q["band"] == "fair"
    lo, hi = q["ci"]
    assert lo <= q["fleiss_kappa"] <= hi

    # Cohen r1 vs r2: pairs AA, AA, AB, BB -> p_o = 3/4;
    # r1 marginals A=3, B=1; r2 marginals A=2, B=2 -> p_e = (3*2 + 1*2)/16 = 1/2
    # kappa = (3/4 - 1/2) / (1/2) = 1/2
    pairs = {(p["annotator_a"], p["annotator_b"]): p for p in q["pairwise_cohen_kappa"]}
    assert set(pairs) == {("r1", "r2"), ("r1", "r3"), ("r2", "r3")}
    assert pairs[("r1", "r2")]["cohen_kappa"] == pytest.approx(0.5, abs=1e-12)
    assert pairs[("r1", "r2")]["n_items"] == 4
    # r1 vs r3: AA, AB, AB, BB -> p_o = 1/2; r1 A3 B1, r3 A1 B3 -> p_e = (3+3)/16 = 3/8
    # kappa = (1/2 - 3/8) / (5/8) = 1/5
    assert pairs[("r1", "r3")]["cohen_kappa"] == pytest.approx(0.2, abs=1e-12)

    # Leave-one-out majority (two other raters each; a 1-1 split is a tie and is skipped)
    #   r1: item1 others AA -> match; item2 others A,B tie; item3 others BB, r1=A -> miss;
    #       item4 match -> 2 / 3
    #   r2: item1 match; item2 others A,B tie; item3 others A,B tie; item4 match -> 2 / 2
    #   r3: item1 match; item2 others AA, r3=B -> miss; item3 others A,B tie; item4 match -> 2/3
    ann = {a["annotator"]: a for a in q["annotators"]}
    assert ann["r1"]["loo_majority_agreement"] == pytest.approx(2 / 3)
    assert (ann["r1"]["n_items_compared"], ann["r1"]["n_ties_excluded"]) == (3, 1)
    assert ann["r2"]["loo_majority_agreement"] == 1.0
    assert (ann["r2"]["n_items_compared"], ann["r2"]["n_ties_excluded"]) == (2, 2)
    assert ann["r3"]["loo_majority_agreement"] == pytest.approx(2 / 3)

    # Lowest agreement: items 2 and 3 (P_i = 1/3), ordered by item id
    low = q["lowest_items"]
    assert [x["item_id"] for x in low[:2]] == ["i1", "i2"]
    assert low[0]["agreement"] == pytest.approx(1 / 3)
    assert low[0]["values"] == {"r1": "A", "r2": "A", "r3": "B"}


def test_loo_majority_matches_brute_force():
    rng = np.random.default_rng(3)
    rows = []
    for i in range(150):
        for a in rng.choice(7, size=int(rng.integers(1, 7)), replace=False):
            rows.append({"item_id": i, "annotator": f"a{a}", "question": "q",
                         "value": int(rng.integers(0, 3))})
    res = ag.compute_agreement(rows, n_bootstrap=0)
    by_item = {}
    for r in rows:
        by_item.setdefault(r["item_id"], {})[r["annotator"]] = r["value"]
    expect = {}
    for answers in by_item.values():
        for a, v in answers.items():
            others = [x for b, x in answers.items() if b != a]
            if len(others) < 2:
                continue
            c = {k: others.count(k) for k in set(others)}
            top = max(c.values())
            winners = [k for k, n in c.items() if n == top]
            if len(winners) > 1:
                continue
            e = expect.setdefault(a, [0, 0])
            e[0] += winners[0] == v
            e[1] += 1
    for a in res["questions"]["q"]["annotators"]:
        m, n = expect.get(a["annotator"], [0, 0])
        assert (a["n_matches"], a["n_items_compared"]) == (m, n)


# --------------------------------------------------------------------------------------
# statsmodels cross-checks (point estimate and the vectorised bootstrap path)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_matches_statsmodels(seed):
    rng = np.random.default_rng(seed)
    n_items, n_raters, n_cat = 200, 4, 3 + seed % 3
    data = rng.integers(0, n_cat, (n_items, n_raters))
    data[: n_items // 2, 1] = data[: n_items // 2, 0]  # some real agreement
    table, _ = aggregate_raters(data)
    expected = fleiss_kappa(table, method="fleiss")
    rows = long_rows([[f"c{v}" for v in r] for r in data.tolist()])
    random.Random(seed).shuffle(rows)  # row order must not matter
    got = ag.compute_agreement(rows, n_bootstrap=0)["questions"]["q"]["fleiss_kappa"]
    assert got == pytest.approx(expected, abs=1e-9)
    # vectorised kappa from counts, unit weights
    assert measures.fleiss_kappa_weighted(table, np.ones(n_items))[0] == pytest.approx(expected, abs=1e-9)
    # vectorised kappa of bootstrap resamples == statsmodels on the resampled tables
    idx = rng.integers(0, n_items, (20, n_items))
    w = np.stack([np.bincount(r, minlength=n_items) for r in idx])
    vec = measures.fleiss_kappa_weighted(table, w)
    ref = [fleiss_kappa(table[r], method="fleiss") for r in idx]
    np.testing.assert_allclose(vec, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("n_patterns_forced", [False, True])
def test_bootstrap_weights_both_paths(n_patterns_forced):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 2, (500, 5))
    table, _ = aggregate_raters(data)
    pats, inv = measures._patterns(table)
    assert (pats[inv] == table).all()
    if n_patterns_forced:  # every item its own pattern -> index-draw path
        pats, inv = table, np.arange(len(table))
        chunks = list(measures._bootstrap_weights(inv, 5000, 50, np.random.default_rng(1)))
        chunks = [c[:, :len(table)] for c in chunks]
    else:
        chunks = list(measures._bootstrap_weights(inv, len(pats), 50, np.random.default_rng(1)))
    w = np.concatenate(chunks)
    assert w.shape[0] == 50 and (w.sum(1) == len(table)).all()
    # weighted kappa over patterns == statsmodels on the expanded resampled table
    for row in w[:5]:
        expanded = np.repeat(pats, row.astype(int), axis=0)
        assert measures.fleiss_kappa_weighted(pats, row)[0] == pytest.approx(
            fleiss_kappa(expanded), abs=1e-9)


def test_bootstrap_ci_is_deterministic_and_sensible():
    rows = synthetic(n_items=400)
    a = ag.compute_agreement(rows, n_bootstrap=300, seed=7)["questions"]["preference"]
    b = ag.compute_agreement(rows, n_bootstrap=300, seed=7)["questions"]["preference"]
    c = ag.compute_agreement(rows, n_bootstrap=300, seed=8)["questions"]["preference"]
    assert a["ci"] == b["ci"] and a["ci"] != c["ci"]
    lo, hi = a["ci"]
    assert lo < a["fleiss_kappa"] < hi and hi - lo < 0.15
    # the percentile CI of the vectorised bootstrap agrees with a naive loop
    table = np.array([[0]])  # placeholder to keep names short below
    by_item = {}
    for r in rows:
        by_item.setdefault(r["item_id"], []).append(r["value"])
    table, _ = aggregate_raters(np.array(list(by_item.values())))
    rng = np.random.default_rng(0)
    naive = [fleiss_kappa(table[rng.integers(0, len(table), len(table))]) for _ in range(300)]
    assert np.percentile(naive, 2.5) == pytest.approx(lo, abs=0.03)
    assert np.percentile(naive, 97.5) == pytest.approx(hi, abs=0.03)


# --------------------------------------------------------------------------------------
# Unequal rater counts
# --------------------------------------------------------------------------------------

def test_unequal_rater_counts_policy():
    matrix = [  # raters r1..r4; None = did not rate
        ["A", "A", "B", None],     # 3 raters
        ["A", "A", "A", None],     # 3
        ["B", "B", "A", None],     # 3
        ["B", "B", "B", None],     # 3
        ["A", "B", "A", "A"],      # 4 -> trimmed to 3
        ["A", "B", None, None],    # 2 -> left out of kappa
        ["A", None, None, None],   # 1 -> left out of everything
    ]
    rows = long_rows(matrix, annotators=["r1", "r2", "r3", "r4"])
    q = ag.compute_agreement(rows, n_bootstrap=100)["questions"]["q"]
    assert q["n_raters"] == 3
    assert q["n_items_total"] == 7
    assert q["n_items"] == 5
    assert q["n_items_subsampled"] == 1
    assert q["n_items_excluded"] == 2
    reasons = {e["reason"]: e["n_items"] for e in q["exclusions"]}
    assert reasons == {"only one rating (no agreement possible)": 1,
                       "fewer than 3 raters (the usual number)": 1}
    assert "m=3" in q["unequal_counts_policy"]
    # kappa equals statsmodels on the 4 complete items + one 3-of-4 subset of item 5
    base = [[1, 2], [3, 0], [1, 2], [0, 3]]   # (A, B) counts of items 1-4
    candidates = [fleiss_kappa(np.array(base + [sub])) for sub in ([3, 0], [2, 1])]
    assert any(abs(q["fleiss_kappa"] - k) < 1e-12 for k in candidates)
    # alpha / observed agreement use every item with >= 2 ratings (6 items), incl. all 4 of item 5
    assert q["raters_per_item"] == {"1": 1, "2": 1, "3": 4, "4": 1}
    # deterministic regardless of row order
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    q2 = ag.compute_agreement(shuffled, n_bootstrap=100)["questions"]["q"]
    assert q2["fleiss_kappa"] == q["fleiss_kappa"]


def test_modal_count_tie_prefers_larger_and_excludes_smaller():
    matrix = [["A", "B", None], ["A", "A", None], ["B", "B", "B"], ["A", "A", "B"]]
    q = ag.compute_agreement(long_rows(matrix), n_bootstrap=0)["questions"]["q"]
    assert q["n_raters"] == 3 and q["n_items"] == 2 and q["n_items_excluded"] == 2


# --------------------------------------------------------------------------------------
# Krippendorff's alpha
# --------------------------------------------------------------------------------------

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C:
# 4 observers x 12 units, values 1-5, nan = missing. Reported: nominal .743, ordinal .815.
K2011 = np.array([
    [1, 2, 3, 3, 2, 1, 4, 1, 2, np.nan, np.nan, np.nan],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, np.nan, 3],
    [np.nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, np.nan],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, np.nan],
])


def test_krippendorff_alpha_textbook_example():
    assert measures.krippendorff_alpha(K2011, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert measures.krippendorff_alpha(K2011, "ordinal") == pytest.approx(0.815, abs=5e-4)
    # same numbers through compute_agreement (unit 12 has a single value and is ignored)
    rows = []
    for r, obs in enumerate(K2011):
        for u, v in enumerate(obs):
            if not np.isnan(v):
                rows.append({"item_id": f"u{u}", "annotator": "ABCD"[r], "question": "rating",
                             "value": int(v)})
    q = ag.compute_agreement(rows, n_bootstrap=200)["questions"]["rating"]
    assert q["type"] == "ordinal"
    assert q["krippendorff_alpha_ordinal"] == pytest.approx(0.8153875037548814, abs=1e-12)
    assert q["krippendorff_alpha_nominal"] == pytest.approx(0.743421052631579, abs=1e-12)
    lo, hi = q["krippendorff_alpha_ordinal_ci"]
    assert lo <= q["krippendorff_alpha_ordinal"] <= hi


def test_krippendorff_alpha_hand_computed_small_case():
    # 2 coders, 3 units: (1,1), (1,2), (2,2), nominal.
    # coincidences: o_11 = 2 (unit 1) + 0, o_12 = o_21 = 1 (unit 2), o_22 = 2 (unit 3)
    # n_1 = 3, n_2 = 3, n = 6; D_o ~ o_12 + o_21 = 2; D_e ~ n_1 n_2 + n_2 n_1 = 18
    # alpha = 1 - (n - 1) * 2 / 18 = 1 - 10/18 = 4/9
    data = [[1, 1, 2], [1, 2, 2]]
    assert measures.krippendorff_alpha(data, "nominal") == pytest.approx(4 / 9, abs=1e-12)
    # ordinal with two values: delta^2(1,2) = (n_1 + n_2 - (n_1 + n_2)/2)^2 = 9 -> same alpha
    assert measures.krippendorff_alpha(data, "ordinal") == pytest.approx(4 / 9, abs=1e-12)


def test_weighted_alpha_equals_repeated_units():
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 3, (30, 5))
    w = rng.integers(0, 4, 30)
    expanded = np.repeat(counts, w, axis=0)
    for metric in ("nominal", "ordinal"):
        a = measures.krippendorff_alpha_weighted(counts, w, metric)[0]
        b = measures.krippendorff_alpha_weighted(expanded, np.ones(len(expanded)), metric)[0]
        assert a == pytest.approx(b, abs=1e-12)


def test_ordinal_detection_and_declaration():
    rows = synthetic(n_items=60, questions=("helpfulness", "preference"),
                     ordinal=("helpfulness",))
    res = ag.compute_agreement(rows, n_bootstrap=50)
    assert res["questions"]["helpfulness"]["type"] == "ordinal"
    assert res["questions"]["helpfulness"]["categories"] == ["1", "2", "3", "4", "5"]
    assert res["questions"]["preference"]["type"] == "nominal"
    assert "krippendorff_alpha_ordinal" not in res["questions"]["preference"]
    res = ag.compute_agreement(rows, n_bootstrap=0, ordinal_questions=[])
    assert res["questions"]["helpfulness"]["type"] == "nominal"
    with pytest.raises(ValueError, match="non-numeric"):
        ag.compute_agreement(rows, n_bootstrap=0, ordinal_questions=["preference"])
    with pytest.raises(ValueError, match="not in the data"):
        ag.compute_agreement(rows, n_bootstrap=0, ordinal_questions=["nope"])


# --------------------------------------------------------------------------------------
# Values, status, duplicates
# --------------------------------------------------------------------------------------

def test_value_types_rank_lists_and_status():
    rows = [
        # rank lists from JSONL and the same ranking serialised into a CSV cell
        {"item_id": 1, "annotator": "a", "question": "rank", "value": ["b", "a", "c"]},
        {"item_id": 1, "annotator": "b", "question": "rank", "value": '["b", "a", "c"]'},
        {"item_id": 1, "annotator": "c", "question": "rank", "value": ["a", "b", "c"]},
        # 3 and "3" and 3.0 are the same answer
        {"item_id": 1, "annotator": "a", "question": "score", "value": 3},
        {"item_id": 1, "annotator": "b", "question": "score", "value": "3"},
        {"item_id": 1, "annotator": "c", "question": "score", "value": 3.0},
        # drafts / discarded are ignored; empty status counts as submitted
        {"item_id": 1, "annotator": "d", "question": "score", "value": 1, "status": "draft"},
        {"item_id": 1, "annotator": "e", "question": "score", "value": 1, "status": "discarded"},
        {"item_id": 1, "annotator": "f", "question": "score", "value": 3, "status": ""},
        {"item_id": 1, "annotator": "g", "question": "score", "value": "", "status": "submitted"},
    ]
    res = ag.compute_agreement(rows, n_bootstrap=0)
    rank = res["questions"]["rank"]
    assert rank["category_counts"] == {"a > b > c": 1, "b > a > c": 2}
    score = res["questions"]["score"]
    assert score["category_counts"] == {"3": 4}
    assert score["observed_agreement"] == 1.0
    assert res["data"]["n_rows_ignored_status"] == 2
    assert res["data"]["n_rows_ignored_empty_value"] == 1


def test_duplicates_keep_latest():
    rows = [
        {"item_id": 1, "annotator": "a", "question": "q", "value": "x", "updated_at": "2024-05-02"},
        {"item_id": 1, "annotator": "a", "question": "q", "value": "y", "updated_at": "2024-05-01"},
        {"item_id": 1, "annotator": "b", "question": "q", "value": "x", "updated_at": "2024-05-01"},
        {"item_id": 1, "annotator": "c", "question": "q", "value": "y"},
        {"item_id": 1, "annotator": "c", "question": "q", "value": "x"},
    ]
    res = ag.compute_agreement(rows, n_bootstrap=0)
    assert res["data"]["n_rows_ignored_duplicate"] == 2
    assert res["questions"]["q"]["category_counts"] == {"x": 3}


# --------------------------------------------------------------------------------------
# Loading and malformed input
# --------------------------------------------------------------------------------------

def write_csv(path, rows, fields=("item_id", "annotator", "question", "value", "status")):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()})


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_load_csv_and_jsonl_agree(tmp_path):
    rows = synthetic(n_items=50)
    write_csv(tmp_path / "a.csv", rows)
    write_jsonl(tmp_path / "a.jsonl", rows)
    a = ag.compute_agreement(ag.load_annotations(tmp_path / "a.csv"), n_bootstrap=0)
    b = ag.compute_agreement(ag.load_annotations(tmp_path / "a.jsonl"), n_bootstrap=0)
    assert a["questions"]["preference"]["fleiss_kappa"] == pytest.approx(
        b["questions"]["preference"]["fleiss_kappa"], abs=1e-12)
    assert ag.load_annotations(tmp_path / "a.csv")[0]["_line"] == 2


@pytest.mark.parametrize("name,content,expect", [
    ("bad.csv", "item_id,annotator,value\n1,a,x\n", ["bad.csv:1", "'question'"]),
    ("bad.csv", "item_id,annotator,question,value\n1,a,q,x\n2,,q,y\n", ["bad.csv:3", "'annotator'"]),
    ("bad.csv", "item_id,annotator,question,value\n1,a,q,x\n2,b,q,y,extra\n", ["bad.csv:3", "cells"]),
    ("bad.jsonl", '{"item_id":1,"annotator":"a","question":"q","value":1}\n\n'
                  '{"item_id":2,"annotator":"a","value":1}\n', ["bad.jsonl:3", "'question'"]),
    ("bad.jsonl", '{"item_id":1,"annotator":"a","question":"q","value":1}\n{"item_id": 2,\n',
     ["bad.jsonl:2", "invalid JSON"]),
    ("bad.jsonl", '[1, 2]\n', ["bad.jsonl:1", "JSON object"]),
    ("bad.jsonl", '{"item_id":null,"annotator":"a","question":"q","value":1}\n',
     ["bad.jsonl:1", "'item_id'"]),
])
def test_malformed_input_errors(tmp_path, name, content, expect):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(ag.AnnotationFileError) as e:
        ag.load_annotations(p)
    for s in expect:
        assert s in str(e.value)
    assert str(p) in str(e.value)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        ag.load_annotations("/nonexistent/nope.csv")


# --------------------------------------------------------------------------------------
# Gate and CLI
# --------------------------------------------------------------------------------------

def test_gate():
    res = ag.compute_agreement(synthetic(n_items=200, questions=("a", "b")), n_bootstrap=0)
    ka = res["questions"]["a"]["fleiss_kappa"]
    assert gate(res, ka - 0.01) == (True, [])
    ok, failures = gate(res, 0.99)
    assert not ok and len(failures) == 2 and failures[0].startswith("a:")
    ok, failures = gate(res, 0.99, questions=["b"])
    assert not ok and len(failures) == 1 and failures[0].startswith("b:")
    ok, failures = gate(res, 0.1, questions=["missing"])
    assert not ok and "not found" in failures[0]


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "alignkit.annotation.cli", "agreement", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_cli_end_to_end(tmp_path, fmt):
    rows = synthetic(n_items=120, questions=("preference", "helpfulness"),
                     ordinal=("helpfulness",))
    path = tmp_path / f"annotations.{fmt}"
    (write_csv if fmt == "csv" else write_jsonl)(path, rows)
    out = tmp_path / "out"
    p = run_cli("--annotations", path, "--out", out, "--bootstrap", 100, "--seed", 1)
    assert p.returncode == 0, p.stderr
    assert "preference" in p.stdout and "helpfulness" in p.stdout and "kappa" in p.stdout
    data = json.loads((out / "agreement.json").read_text())
    for q in ("preference", "helpfulness"):
        r = data["questions"][q]
        for key in ("fleiss_kappa", "ci", "n_items", "n_raters", "observed_agreement",
                    "n_items_excluded", "category_counts", "pairwise_cohen_kappa", "annotators"):
            assert key in r, key
        assert len(r["ci"]) == 2 and r["n_items"] == 120 and r["n_raters"] == 5
    assert data["questions"]["helpfulness"]["krippendorff_alpha_ordinal"] is not None
    assert [a["annotator"] for a in data["annotators"] if a["flagged"]] == ["ann_4"]
    assert (out / "report.md").read_text().startswith("# Annotation agreement report")
    assert "<table id='summary'>" in (out / "report.html").read_text()


def test_cli_gate_exit_code(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, synthetic(n_items=100, questions=("preference", "harmless")))
    p = run_cli("--annotations", path, "--out", tmp_path / "o1", "--bootstrap", 50,
                "--min-kappa", 0.95, "--questions", "harmless")
    assert p.returncode == 3
    assert "harmless" in p.stderr and "preference" not in p.stderr
    assert "Gate FAILED" in (tmp_path / "o1" / "report.html").read_text()
    p = run_cli("--annotations", path, "--out", tmp_path / "o2", "--bootstrap", 50,
                "--min-kappa", 0.0)
    assert p.returncode == 0, p.stderr
    assert "gate passed" in p.stdout
    assert json.loads((tmp_path / "o2" / "agreement.json").read_text())["gate"]["passed"] is True


def test_cli_bad_input_exit_code(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("item_id,annotator,question\n1,a,q\n")
    p = run_cli("--annotations", path, "--out", tmp_path / "o")
    assert p.returncode == 2
    assert p.stderr.startswith("alignkit: error: ") and "a.csv:1" in p.stderr and "'value'" in p.stderr


def test_agreement_verb_with_plain_argparse(tmp_path):
    path = tmp_path / "a.jsonl"
    write_jsonl(path, synthetic(n_items=40))
    parser = argparse.ArgumentParser(prog="alignkit annotate")
    configure_cli(parser)
    args = parser.parse_args(["agreement", "--annotations", str(path), "--out",
                              str(tmp_path / "o"), "--bootstrap", "20", "--min-kappa", "0.99"])
    with pytest.raises(GateError) as e:
        args.func(args)
    assert e.value.exit_code == 3 and "agreement gate failed (min_kappa 0.99" in str(e.value)
    assert (tmp_path / "o" / "report.html").exists()


def test_html_escapes_user_text(tmp_path):
    evil = "<script>alert(1)</script>"
    rows = long_rows([["A", "B", "A"], ["B", "B", "A"], ["A", "A", "A"]],
                     question=f"q{evil}", annotators=[evil, "x&y", "z"],
                     items=[evil, "i2", "i3"])
    res = ag.compute_agreement(rows, n_bootstrap=20)
    write_report(res, tmp_path)
    text = (tmp_path / "report.html").read_text()
    assert evil not in text and "&lt;script&gt;" in text
    assert "http://" not in text and "https://" not in text and "<link" not in text
    json.loads((tmp_path / "agreement.json").read_text())


def test_degenerate_all_same_answer():
    rows = long_rows([["A", "A"], ["A", "A"]])
    res = ag.compute_agreement(rows, n_bootstrap=20)
    q = res["questions"]["q"]
    assert q["fleiss_kappa"] is None and q["observed_agreement"] == 1.0
    ok, failures = gate(res, 0.2)
    assert not ok and "undefined" in failures[0]


# --------------------------------------------------------------------------------------
# Browser check of the HTML report
# --------------------------------------------------------------------------------------

def test_html_report_in_chromium(tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: install Debian's browser with "
                    f"`apt-get update && apt-get install -y chromium` (never `playwright install`)")
    from playwright.sync_api import sync_playwright

    rows = synthetic(n_items=250, questions=("preference", "helpfulness", "harmlessness"),
                     ordinal=("helpfulness",), n_ann=6)
    # one item with an extra rater, one with too few: exercises the policy section
    rows.append({"item_id": "item-0", "annotator": "ann_extra", "question": "preference",
                 "value": "response_1"})
    rows = [r for r in rows if not (r["item_id"] == "item-1" and r["annotator"] in ("ann_0", "ann_1"))]
    res = ag.compute_agreement(rows, n_bootstrap=200)
    passed, failures = gate(res, 0.4)
    res["gate"] = {"min_kappa": 0.4, "passed": passed, "failures": failures}
    res["source"] = "synthetic <test> data"
    paths = write_report(res, tmp_path / "report")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(paths["html"].resolve().as_uri())
            page.wait_for_load_state("load")
            imgs = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.complete, e.naturalWidth, e.alt])")
            assert len(imgs) >= 5  # kappa plot, annotator plot, 3 heatmaps
            for complete, width, alt in imgs:
                assert complete and width > 0, f"image did not load: {alt}"
            n_rows = page.eval_on_selector_all("#summary tbody tr", "els => els.length")
            assert n_rows == 3
            header = page.inner_text("#summary thead")
            assert "Fleiss" in header and "95% interval" in header
            assert "preference" in page.inner_text("#summary")
            assert "Gate" in page.inner_text("#verdict")
            assert page.eval_on_selector_all("#lowest table.lowest", "els => els.length") == 3
            assert page.eval_on_selector_all("#lowest tbody tr", "els => els.length") == 60
            assert "ann_4" in page.inner_text("#annotators")
            assert "check this annotator" in page.inner_text("#annotators")
            assert "most common number" in page.inner_text("#policy")
            assert all(u.startswith(("file:", "data:")) for u in requests), requests
            shot = tmp_path / "agreement_report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("AGREEMENT_SCREENSHOT"):
                page.screenshot(path=os.environ["AGREEMENT_SCREENSHOT"], full_page=True)
        finally:
            browser.close()


def test_direct_rows_missing_field_error():
    rows = long_rows(HAND)
    rows[3] = dict(rows[3], annotator=None, _line=5)
    with pytest.raises(ValueError, match="5: missing field 'annotator'"):
        ag.compute_agreement(rows, n_bootstrap=0)
