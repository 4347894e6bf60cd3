"""The numbers of ``eval.json``, computed from the per-reply values the eval stage collects
(replies are prompt-major: prompt i's k replies are rows i*k .. i*k+k-1), and the rows of
``generations.jsonl``. Pure functions of the values and the stage's config (``cfg``, an :class:`EvalConfig`): each figure
is checkable by hand (docs/evaluation.md)."""

from __future__ import annotations

from alignkit.evals import stats

RULE = "rule"
REWARD_MODEL = "reward_model"
ASPECTS = "aspects"  # a multi-aspect reward model's own heads, reported beside the reward


def aspect_scores(aspects: dict[str, dict[str, list[float]]], k: int, conf: float, weights: dict | None) -> dict:
    """model -> aspect -> mean prediction over prompts (each prompt's replies averaged first) with
    a Student-t interval; on the -1..1 scale of the training targets (ratings 1..5)."""
    def means(values):
        return [sum(values[i * k:(i + 1) * k]) / k for i in range(len(values) // k)]

    return {"weights": weights, "scale": "predicted rating, 1..5 mapped to -1..1 (5 = best)",
            "models": {name: {a: stats.mean_ci(means(v), conf) for a, v in per_aspect.items()}
                       for name, per_aspect in aspects.items()}}


def per_reply(values: list, k: int) -> list:
    """Per-prompt values repeated for each of the prompt's ``k`` replies (replies are prompt-major)."""
    return [v for v in values for _ in range(k)]


def per_prompt_means(values: list[float], k: int) -> list[float]:
    """Mean of each prompt's ``k`` consecutive per-reply values."""
    return [sum(values[i:i + k]) / k for i in range(0, len(values), k)]


def words(text: str) -> int:
    return len(text.split())


def compute_results(cfg, prompts: list[dict], gens: dict[str, dict],
                    scores: dict[str, dict[str, list[float]]], constraints: list, oracle: dict | None) -> dict:
    """Every number in eval.json, from the per-reply values.

    The prompt is the unit of every interval and every win, tie or loss: with several replies per
    prompt, each per-prompt number is first the mean over the prompt's replies.
    """
    conf = cfg.confidence
    k = cfg.samples_per_prompt
    base = cfg.baseline
    ref_name = cfg.kl_reference or cfg.baseline
    exact_kl = cfg.do_sample and cfg.temperature == 1.0 and cfg.top_p >= 1.0 and cfg.top_k == 0
    word_len = {n: [words(t) for t in g["texts"]] for n, g in gens.items()}
    has_oracle = oracle is not None and any(c is not None for c in constraints)
    oracle_idx = [i for i, c in enumerate(constraints) if c is not None] if has_oracle else []

    def means(values: list[float]) -> list[float]:
        return per_prompt_means(values, k)

    models = {}
    for name, g in gens.items():
        m: dict = {
            "model": cfg.models[name],
            "length": {"tokens": stats.mean_ci(means(g["n_tokens"]), conf), "words": stats.mean_ci(means(word_len[name]), conf),
                       "finished_fraction": sum(g["finished"]) / len(g["finished"])},
            "diversity": {"distinct_1": stats.distinct_n(g["texts"], 1), "distinct_2": stats.distinct_n(g["texts"], 2)},
            "reward": {src: stats.mean_ci(means(s[name]), conf) for src, s in scores.items()},
            "generation": {"seconds": g.get("seconds"), "generated_tokens": g.get("generated_tokens")},
        }
        if name != base:
            # The same reply in another batch can score 1e-7 apart (padding): identical replies tie.
            same = [a == b for a, b in zip(g["texts"], gens[base]["texts"])]
            paired = {src: means([sb if eq else sm for sm, sb, eq in zip(s[name], s[base], same)])
                      for src, s in scores.items()}
            m["identical_replies"] = sum(same)
            m["win_rate"] = {src: stats.win_rate(paired[src], means(s[base]), conf) for src, s in scores.items()}
            m["lc_win_rate"] = {src: stats.length_controlled_win_rate(paired[src], means(s[base]), means(word_len[name]),
                                                                      means(word_len[base]), conf)
                                for src, s in scores.items()}
        if g.get("log_ratio") is not None:
            m["kl"] = {**stats.mean_ci(means(g["log_ratio"]), conf), "reference": ref_name,
                       "estimator": "sampled (unbiased)" if exact_kl else
                       "log-ratio on non-exact samples (greedy, tempered or truncated): not an unbiased KL estimate"}
        else:
            m["kl"] = {"mean": None, "ci": [None, None], "reference": ref_name,
                       "note": g.get("kl_note") or "compute_kl is off"}
        if has_oracle:
            replies = {n: [oracle[n][i * k:(i + 1) * k] for i in oracle_idx] for n in (name, base)}
            vals = [sum(r) / k for r in replies[name]]
            o = {"n": len(vals), "score": stats.mean_ci(vals, conf),
                 "pass": stats.proportion_over_prompts([sum(v >= 1.0 for v in r) for r in replies[name]], k, conf)}
            if name != base:
                o["win_rate"] = stats.win_rate(vals, [sum(r) / k for r in replies[base]], conf)
                # paired: per prompt, this model's share of passing replies minus the baseline's
                o["pass_gain"] = stats.mean_ci([sum(v >= 1.0 for v in a) / k - sum(v >= 1.0 for v in b) / k
                                                for a, b in zip(replies[name], replies[base])], conf)
            m["oracle"] = o
        models[name] = m
    primary = REWARD_MODEL if REWARD_MODEL in scores else (RULE if RULE in scores else None)
    return {
        "n_prompts": len(prompts),
        "samples_per_prompt": k,
        "prompts": cfg.prompts,
        "baseline": base,
        "kl_reference": ref_name,
        "reward_sources": {**({REWARD_MODEL: cfg.reward_model} if REWARD_MODEL in scores else {}),
                           **({RULE: cfg.reward_function} if RULE in scores else {})},
        "primary_reward": primary,
        "oracle_prompts": len(oracle_idx),
        "confidence": conf,
        "length_unit_for_lc": "words (whitespace-separated)",
        "generation": {"seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample,
                       "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                       "batch_size": cfg.batch_size, "samples_per_prompt": k},
        "models": models,
    }


def with_groups(cfg, prompts: list[dict], gens: dict[str, dict], scores: dict,
                constraints: list, oracle: dict | None) -> dict:
    """:func:`compute_results`, plus the same figures per slice (the prompts' ``slice`` field,
    e.g. the demo test set's demo and held-out phrasings) and per constraint type."""
    result = compute_results(cfg, prompts, gens, scores, constraints, oracle)
    groups = {"slices": [p.get("slice") for p in prompts],
              "by_constraint_type": [c["type"] if c else None for c in constraints]}
    for key, labels in groups.items():
        names = sorted({label for label in labels if label is not None})
        if not names or (key == "slices" and len(names) < 2 and None not in labels):
            continue  # no labels, or one slice that is the whole set
        result[key] = {}
        for label in names:
            keep = [i for i, x in enumerate(labels) if x == label]
            sub = compute_results(cfg, *_subset(keep, cfg.samples_per_prompt, prompts, gens, scores, constraints, oracle))
            result[key][label] = {"n_prompts": len(keep), "models": sub["models"]}
    return result


def _subset(keep: list[int], k: int, prompts, gens, scores, constraints, oracle) -> tuple:
    """The inputs of compute_results restricted to the prompts ``keep`` (k replies each)."""
    replies = [i * k + j for i in keep for j in range(k)]
    n_replies = len(prompts) * k

    def cut(values):
        return [values[r] for r in replies] if isinstance(values, (list, tuple)) and len(values) == n_replies else values

    return ([prompts[i] for i in keep],
            {name: {key: cut(v) for key, v in g.items()} for name, g in gens.items()},
            {src: {name: cut(v) for name, v in s.items()} for src, s in scores.items()},
            [constraints[i] for i in keep],
            {name: cut(v) for name, v in oracle.items()} if oracle is not None else None)


def flat_metrics(result: dict) -> dict:
    """The headline numbers for the manifest: ``<model>/<metric>``."""
    out = {}
    primary = result["primary_reward"]
    for name, m in result["models"].items():
        if primary:
            out[f"{name}/reward_mean"] = m["reward"][primary]["mean"]
            if "win_rate" in m:
                out[f"{name}/win_rate"] = m["win_rate"][primary]["win_rate"]
                out[f"{name}/lc_win_rate"] = m["lc_win_rate"][primary]["win_rate"]
        out[f"{name}/kl"] = m["kl"]["mean"]
        out[f"{name}/words_mean"] = m["length"]["words"]["mean"]
        out[f"{name}/distinct_2"] = m["diversity"]["distinct_2"]
        if "oracle" in m:
            out[f"{name}/oracle_pass_rate"] = m["oracle"]["pass"]["rate"]
    for name, f in (result.get("forgetting") or {}).get("models", {}).items():
        out[f"{name}/general_perplexity"] = f["perplexity"]
        out[f"{name}/general_perplexity_change"] = f["change"]
    return out


def generation_rows(prompts, gens, scores, constraints, oracle, k: int = 1) -> list[dict]:
    """One row per prompt and sample: the prompt, and each model's reply ``sample`` with its scores."""
    rows = []
    for i, p in enumerate(prompts):
        for j in range(k):
            reply = i * k + j
            row = {"id": p["id"], "sample": j, "prompt": p["prompt"]}
            if "reference" in p:
                row["reference"] = p["reference"]
            if constraints and constraints[i] is not None:
                row["constraint"] = constraints[i]
            row["responses"] = {}
            for name, g in gens.items():
                text = g["texts"][reply]
                r = {"text": text, "n_tokens": g["n_tokens"][reply], "n_words": words(text),
                     "finished": g["finished"][reply], "rewards": {src: s[name][reply] for src, s in scores.items()}}
                if g.get("log_ratio") is not None:
                    r["log_ratio_to_reference"] = g["log_ratio"][reply]
                if oracle is not None and constraints[i] is not None:
                    r["oracle_score"] = oracle[name][reply]
                row["responses"][name] = r
            rows.append(row)
    return rows
