"""evals/stats.py against hand-computed cases (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest

from alignkit.evals import stats

Z = 1.959963984540054  # the 97.5% normal quantile


def test_win_rate_without_ties_has_the_wilson_interval():
    # 8 wins, 2 losses -> 0.8; Wilson, p = 0.8, n = 10, z² = 3.841459:
    #   denom  = 1 + z²/n = 1.3841459
    #   center = (0.8 + z²/20) / denom = 0.9920730 / 1.3841459 = 0.716738
    #   half   = z / denom * sqrt(0.8*0.2/10 + z²/400) = 1.416009 * sqrt(0.0256036) = 0.226577
    w = stats.win_rate([1] * 8 + [0] * 2, [0] * 8 + [1] * 2)
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (8, 0, 2, 10)
    assert w["win_rate"] == pytest.approx(0.8)
    lo, hi = w["ci"]
    assert lo == pytest.approx(0.716738 - 0.226577, abs=1e-5)
    assert hi == pytest.approx(0.716738 + 0.226577, abs=1e-5)
    # the same numbers straight from the formula
    p, n = 0.8, 10
    center = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    assert (lo, hi) == pytest.approx((center - half, center + half))


def test_win_rate_counts_ties_half_and_only_decisive_prompts_are_uncertain():
    # diffs: 7 wins, 2 ties, 1 loss -> (7 + 2/2) / 10 = 0.8
    model = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    base = [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    w = stats.win_rate(model, base)
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (7, 2, 1, 10)
    assert w["win_rate"] == pytest.approx(0.8)
    # m = 8 decisive prompts, q = 7/8; Wilson(7, 8), z²/m = 0.4801824:
    #   denom  = 1.4801824
    #   center = (0.875 + 0.2400912) / denom = 0.753348
    #   half   = z / denom * sqrt(0.875*0.125/8 + z²/256) = 1.324137 * sqrt(0.0286776) = 0.224234
    #   q in [0.529114, 0.977582]  ->  0.5 + 8/10 * (q - 0.5) = [0.523291, 0.882066]
    lo, hi = w["ci"]
    assert lo == pytest.approx(0.523291, abs=1e-5)
    assert hi == pytest.approx(0.882066, abs=1e-5)
    # narrower than a Wilson interval that counts each tie as half a coin-flip success
    plain = stats.wilson_interval(8, 10)
    assert plain[0] < lo and hi < plain[1]
    # the quickstart case from docs/evaluation.md: 15 wins, 28 ties, 4 losses of 47
    assert stats.tie_aware_interval(15, 28, 4) == pytest.approx([0.52695, 0.66773], abs=1e-5)


def test_win_rate_edges():
    # all ties -> 0.5 and nothing decisive to be unsure about
    assert stats.win_rate([3, 3, 3], [3, 3, 3])["win_rate"] == 0.5
    assert stats.win_rate([3, 3, 3], [3, 3, 3])["ci"] == [0.5, 0.5]
    assert stats.win_rate([], [])["ci"] == [None, None]
    # all wins -> 1.0, but the Wilson interval is not zero-width: n = 4, p = 1:
    #   center = (1 + z²/8) / (1 + z²/4) = 1.480182 / 1.960365 = 0.755055
    #   half   = z/(1+z²/4) * sqrt(z²/64) = 0.999793 * 0.244995 = 0.244945  -> [0.51011, 1]
    w = stats.win_rate([2, 2, 2, 2], [1, 1, 1, 1])
    assert w["win_rate"] == 1.0
    assert w["ci"][0] == pytest.approx(0.755055 - 0.244945, abs=1e-5)
    assert w["ci"][1] == pytest.approx(1.0)
    # ties within a tolerance
    assert stats.win_rate([1.0, 2.0], [1.05, 1.0], tie_tolerance=0.1)["ties"] == 1
    with pytest.raises(ValueError):
        stats.win_rate([1, 2], [1])


def test_length_controlled_win_rate_removes_a_pure_length_effect():
    # The model is longer by l = 0, 2, 4, 6 words and its reward difference is exactly
    # d = -0.5 + 0.5·l = -0.5, 0.5, 1.5, 2.5: it wins 3 of 4 only by being longer.
    # OLS: mean l = 3, mean d = 1; Σ(l-3)(d-1) = (-3)(-1.5) + (-1)(-0.5) + (1)(0.5) + (3)(1.5) = 10,
    #      Σ(l-3)² = 9 + 1 + 1 + 9 = 20 -> slope b = 0.5, intercept a = 1 - 0.5·3 = -0.5.
    # Adjusted d - b·l = -0.5 for every prompt: 4 losses -> LC win rate 0.
    model_r, base_r = [-0.5, 0.5, 1.5, 2.5], [0, 0, 0, 0]
    model_len, base_len = [10, 12, 14, 16], [10, 10, 10, 10]
    assert stats.win_rate(model_r, base_r)["win_rate"] == 0.75
    lc = stats.length_controlled_win_rate(model_r, base_r, model_len, base_len)
    assert lc["slope"] == pytest.approx(0.5)
    assert lc["intercept"] == pytest.approx(-0.5)
    assert lc["win_rate"] == 0.0 and lc["losses"] == 4
    assert lc["slope_estimated"] and lc["mean_length_difference"] == 3.0


def test_length_controlled_win_rate_with_noise():
    # l = -2, 0, 2, 4 and d = -1, 1, 1, 3 (raw: 3 wins, 1 loss = 0.75).
    # mean l = 1, mean d = 1; deviations l: -3, -1, 1, 3; d: -2, 0, 0, 2
    # slope = (6 + 0 + 0 + 6) / (9 + 1 + 1 + 9) = 12/20 = 0.6; intercept = 1 - 0.6 = 0.4
    # adjusted = d - 0.6·l = -1+1.2, 1-0, 1-1.2, 3-2.4 = 0.2, 1.0, -0.2, 0.6 -> 3 wins, 1 loss = 0.75
    lc = stats.length_controlled_win_rate([-1, 1, 1, 3], [0, 0, 0, 0], [8, 10, 12, 14], [10, 10, 10, 10])
    assert lc["slope"] == pytest.approx(0.6)
    assert lc["intercept"] == pytest.approx(0.4)
    assert (lc["wins"], lc["losses"], lc["win_rate"]) == (3, 1, 0.75)
    # Wilson with 3 of 4: same arithmetic as above with p = 0.75
    assert lc["ci"] == pytest.approx(stats.wilson_interval(3, 4))


def test_length_controlled_win_rate_without_length_variation_is_the_plain_win_rate():
    # every length difference is 5: the slope cannot be estimated -> b = 0, adjusted = raw
    lc = stats.length_controlled_win_rate([1, 0, 2], [0, 1, 2], [6, 6, 6], [1, 1, 1])
    assert not lc["slope_estimated"] and lc["slope"] == 0.0
    # raw diffs 1, -1, 0 -> 1 win, 1 loss, 1 tie = 0.5
    assert lc["win_rate"] == stats.win_rate([1, 0, 2], [0, 1, 2])["win_rate"] == 0.5


def test_distinct_n():
    # unigrams: the cat the cat | a dog -> 6 in all, distinct {the, cat, a, dog} = 4 -> 4/6
    # bigrams (never across replies): (the cat) (cat the) (the cat) | (a dog) -> 4, distinct 3 -> 3/4
    texts = ["The cat the cat", "a dog"]
    assert stats.distinct_n(texts, 1) == pytest.approx(4 / 6)
    assert stats.distinct_n(texts, 2) == pytest.approx(3 / 4)
    assert stats.distinct_n(["", "one"], 2) == 0.0  # no bigrams at all
    assert stats.distinct_n(["a b c", "d e f"], 2) == 1.0


def test_mean_ci_and_proportion():
    # 1..5: mean 3, s = sqrt(10/4) = 1.581139, se = s/sqrt(5) = 0.707107, t(0.975, 4) = 2.776445
    # half = 1.963243 -> [1.036757, 4.963243]
    m = stats.mean_ci([1, 2, 3, 4, 5])
    assert m["mean"] == 3.0 and m["std"] == pytest.approx(1.581139, abs=1e-6)
    assert m["ci"] == pytest.approx([1.036757, 4.963243], abs=1e-6)
    assert stats.mean_ci([2.0])["ci"] == [None, None]
    assert stats.mean_ci([])["mean"] is None
    p = stats.proportion([True, False, True, True])
    assert p["rate"] == 0.75 and p["ci"] == pytest.approx(stats.wilson_interval(3, 4))


def test_proportion_over_prompts_uses_the_prompts_as_units():
    # 6 prompts x 2 replies, passing 2,1,1,0,2,1 -> rate 7/12; per-prompt fractions
    # 1,.5,.5,0,1,.5: mean .583333, s = sqrt(.708333/5) = .376386, t(0.975, 5) = 2.570582,
    # half = 2.570582 * .376386 / sqrt(6) = .394993 -> [.188340, .978327]
    p = stats.proportion_over_prompts([2, 1, 1, 0, 2, 1], k=2)
    assert p["rate"] == pytest.approx(7 / 12) and p["k"] == 7 and p["n"] == 12
    assert p["ci"] == pytest.approx([0.188340, 0.978327], abs=1e-6)
    # one reply per prompt: the Wilson interval of stats.proportion
    assert stats.proportion_over_prompts([1, 0, 1, 1], k=1) == stats.proportion([True, False, True, True])
    # 2 prompts: t(0.975, 1) = 12.7 makes the interval wider than [0, 1]: clipped
    assert stats.proportion_over_prompts([2, 1], k=2)["ci"] == [0.0, 1.0]
    with pytest.raises(ValueError, match="between 0 and k=2"):
        stats.proportion_over_prompts([3, 1], k=2)


def test_eval_numbers_with_several_replies_per_prompt_are_per_prompt_means():
    from alignkit.evals.evaluate import EvalConfig
    from alignkit.evals.results import compute_results, generation_rows

    cfg = EvalConfig(models={"sft": "a", "dpo": "b"}, baseline="sft", prompts="held.jsonl", samples_per_prompt=2)
    prompts = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"q{i}"}], "text": f"q{i}"} for i in range(3)]
    # replies are prompt-major: prompt i owns replies 2i and 2i+1
    gens = {"sft": {"texts": list("abcdef"), "n_tokens": [1, 3, 2, 2, 5, 5], "finished": [True] * 5 + [False],
                    "log_ratio": [0.0] * 6},
            "dpo": {"texts": ["a", "x", "y", "z", "e", "f"], "n_tokens": [1, 1, 1, 1, 1, 1], "finished": [True] * 6,
                    "log_ratio": [0.5, 1.5, 1.0, 1.0, 0.0, 0.0]}}
    # replies 0, 4 and 5 are identical to the baseline's: they score as the baseline's (1, 2, 2)
    scores = {"reward_model": {"sft": [1.0, 1.0, 0.0, 0.0, 2.0, 2.0], "dpo": [1.0000001, 3.0, 1.0, -2.0, 5.0, 5.0]}}
    constraints = [{"type": "x"}, None, {"type": "x"}]
    oracle = {"sft": [0.0, 1.0, None, None, 1.0, 1.0], "dpo": [1.0, 1.0, None, None, 1.0, 0.0]}
    result = compute_results(cfg, prompts, gens, scores, constraints, oracle)
    assert result["n_prompts"] == 3 and result["samples_per_prompt"] == 2
    dpo, sft = result["models"]["dpo"], result["models"]["sft"]
    # per-prompt means (paired): dpo 2.0, -0.5, 2.0 vs sft 1.0, 0.0, 2.0 -> win, loss, tie
    w = dpo["win_rate"]["reward_model"]
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (1, 1, 1, 3) and w["win_rate"] == 0.5
    assert dpo["identical_replies"] == 3
    # the mean reward uses the model's own scores: (2.00000005 - 0.5 + 5) / 3
    assert dpo["reward"]["reward_model"]["mean"] == pytest.approx(6.50000005 / 3)
    assert dpo["reward"]["reward_model"]["n"] == 3
    assert sft["length"]["tokens"]["mean"] == 3.0 and sft["length"]["tokens"]["n"] == 3  # prompts 2, 2, 5
    assert sft["length"]["finished_fraction"] == pytest.approx(5 / 6)  # over replies
    assert dpo["kl"]["mean"] == pytest.approx(2 / 3) and dpo["kl"]["n"] == 3  # prompts 1, 1, 0
    # oracle on prompts 0 and 2: dpo passes 2 of 2 and 1 of 2 replies; per-prompt scores 1, .5 vs sft .5, 1
    o = dpo["oracle"]
    assert o["n"] == 2 and o["pass"]["rate"] == 0.75 and (o["pass"]["k"], o["pass"]["n"]) == (3, 4)
    assert o["score"]["mean"] == 0.75
    assert (o["win_rate"]["wins"], o["win_rate"]["losses"]) == (1, 1)
    rows = generation_rows(prompts, gens, scores, constraints, oracle, k=2)
    assert [(r["id"], r["sample"]) for r in rows] == [("p0", 0), ("p0", 1), ("p1", 0), ("p1", 1), ("p2", 0), ("p2", 1)]
    assert rows[3]["responses"]["dpo"] == {"text": "z", "n_tokens": 1, "n_words": 1, "finished": True,
                                           "rewards": {"reward_model": -2.0}, "log_ratio_to_reference": 1.0}
    assert rows[5]["responses"]["dpo"]["oracle_score"] == 0.0
