"""Eval stage: generate from several models on held-out prompts, score, compare, report.

Reads like the stage: load the prompts and check every input, then per model (the KL reference
first) generate replies with the same seeds, and the per-token log-ratio to the reference on
those replies; score every reply with the reward model and/or a rule reward and the demo's
constraint oracle; compute the statistics (:mod:`alignkit.evals.stats`); write ``eval.json``,
``generations.jsonl``, ``report.html`` and the manifest.

Launch: ``alignkit eval --config configs/eval.yaml [KEY=VALUE ...]``. What every number means:
``docs/evaluation.md``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from alignkit.config import ConfigError, doc, to_dict
from alignkit.data import DataError, load_prompts, prompt_text, read_dataset_rows
from alignkit.evals import stats
from alignkit.rewards import load_reward_function
from alignkit.runstore import atomic_write_json, stage_run, write_jsonl

log = logging.getLogger("alignkit.eval")

RULE = "rule"
REWARD_MODEL = "reward_model"


@dataclass
class EvalConfig:
    models: dict[str, str] = doc(
        "models to evaluate, name -> model (a model dir, a stage run dir holding model/, offline:NAME or a Hub id), "
        "e.g. {base: offline:smollm2-135m-instruct, sft: runs/quickstart/sft/model, dpo: runs/quickstart/dpo/model}",
        default_factory=dict)
    baseline: str = doc("the model (a name in models) that win rates compare against", "sft")
    kl_reference: str | None = doc("the model (a name in models) the KL is measured to; default: the baseline", None)
    prompts: str = doc("held-out prompts: an SFT run dir (its heldout_prompts.jsonl) or a prompt file of any shape "
                       "alignkit.data.load_prompts reads (prompt/instruction/turns fields, messages, bare strings)",
                       "runs/quickstart/sft")
    prompt_field: str | None = doc("read the prompt from this field when it is not prompt/instruction/turns/question/text", None)
    max_prompts: int | None = doc("evaluate only the first N prompts (null: all)", None)
    reward_model: str | None = doc("reward model dir (a reward run dir or its model/) scored with alignkit.scoring.RewardScorer; null for none", None)
    reward_function: str | None = doc("rule reward 'module:function' or 'file.py:function', (prompts: list[str], responses: list[str]) -> list[float]; null for none", None)
    output_dir: str = doc("this stage's run directory", "runs/quickstart/eval")
    seed: int = doc("generation seed: every model uses the same seeds (seed + batch index) on the same prompts", 0)
    samples_per_prompt: int = doc(
        "replies sampled per prompt and model; every per-prompt number (reward, length, KL, oracle) is the mean over "
        "them before models are compared, so a win rate compares what each model tends to say, not one draw "
        "(at temperature 1 a single draw per prompt makes win rates noisy)", 1)
    max_new_tokens: int = doc("stop a reply after this many tokens (it also stops at EOS)", 128)
    do_sample: bool = doc("sample (true) or greedy (false); the KL estimate is exact only when sampling at temperature 1 without top-p/top-k", True)
    temperature: float = doc("sampling temperature", 1.0)
    top_p: float = doc("nucleus sampling mass (1.0: off)", 1.0)
    top_k: int = doc("sample among the k likeliest tokens (0: off)", 0)
    batch_size: int = doc("prompts per generation batch (left-padded)", 8)
    max_prompt_length: int | None = doc("keep only the last N prompt tokens (null: no truncation)", 1024)
    reward_batch_size: int = doc("sequences per reward-model forward pass", 16)
    reward_max_length: int = doc("reward model input limit in tokens (longer conversations lose their oldest tokens)", 1024)
    compute_kl: bool = doc("estimate KL(model || reference) on each model's own replies (needs a shared vocabulary)", True)
    oracle: bool = doc("score replies with the demo's constraint oracle on prompts that state a checkable constraint", True)
    confidence: float = doc("confidence level of every interval", 0.95)
    report_samples: int = doc("prompts shown side by side in report.html", 12)
    device: str | None = doc("cuda, cpu, ...; default: CUDA when available", None)
    cpu_threads: int | None = doc("torch CPU threads during the eval (null: torch's default); on a shared, "
                                  "oversubscribed CPU, 1 can be several times faster than 2", None)
    trust_remote_code: bool = doc("allow model code from the Hub (off unless you trust it)", False)

    def __post_init__(self):
        self.models = {str(k): str(v) for k, v in (self.models or {}).items()}
        if not self.models:
            raise ConfigError("eval: models is empty; give name -> model dir, e.g. models.sft=runs/quickstart/sft/model")
        for key in ("baseline", "kl_reference"):
            value = getattr(self, key)
            if value is not None and value not in self.models:
                raise ConfigError(f"eval: {key} {value!r} is not one of the models ({', '.join(self.models)})")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError("eval: max_prompts must be >= 1 (or null for all)")
        if not 0 < self.confidence < 1:
            raise ConfigError("eval: confidence must be between 0 and 1")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.samples_per_prompt < 1:
            raise ConfigError("eval: max_new_tokens, batch_size and samples_per_prompt must be >= 1")
        if self.samples_per_prompt > 1 and not self.do_sample:
            raise ConfigError("eval: samples_per_prompt > 1 needs do_sample: true (greedy replies would all be the same)")


# --------------------------------------------------------------------------------------------
# Inputs


def prompts_file(source: str) -> str:
    """An SFT run directory stands for its held-out prompts."""
    p = Path(source)
    if p.is_dir() and (p / "heldout_prompts.jsonl").exists():
        return str(p / "heldout_prompts.jsonl")
    return source


def load_eval_prompts(cfg: EvalConfig) -> list[dict]:
    """Prompts as ``{"id", "prompt": messages, "text", "reference"?, "constraint"?}``."""
    source = prompts_file(cfg.prompts)
    if not Path(source).exists() and (source.count("/") > 1 or source.startswith((".", "/", "~"))):
        raise DataError(source, None, "prompts", "not found: give an SFT run dir (holding heldout_prompts.jsonl) "
                                                 "or a prompt file")
    prompts = load_prompts(source, field=cfg.prompt_field)
    try:  # keep a reference answer / stored constraint when the file has them (same order as load_prompts)
        raw = [rec for _, rec in read_dataset_rows(source)]
    except Exception:  # noqa: BLE001 - extras only
        raw = []
    out = []
    for i, p in enumerate(prompts[: cfg.max_prompts] if cfg.max_prompts else prompts):
        rec = raw[i] if i < len(raw) and isinstance(raw[i], dict) else {}
        item = {"id": p["id"], "prompt": p["prompt"], "text": prompt_text(p["prompt"])}
        if isinstance(rec.get("reference"), str):
            item["reference"] = rec["reference"]
        elif isinstance(rec.get("output"), str) and rec.get("output"):
            item["reference"] = rec["output"]
        if isinstance(rec.get("constraint"), dict):
            item["constraint"] = rec["constraint"]
        if isinstance(rec.get("slice"), str) and rec["slice"]:
            item["slice"] = rec["slice"]
        out.append(item)
    if not out:
        raise DataError(source, None, None, "no prompts")
    return out


def resolve_models(cfg: EvalConfig) -> dict[str, str]:
    """name -> what from_pretrained takes; a missing directory is an error naming the model."""
    from alignkit.generation import model_dir_of
    from alignkit.models import resolve_model

    resolved = {}
    for name, spec in cfg.models.items():
        spec = model_dir_of(spec)
        looks_local = not spec.startswith("offline:") and (spec.startswith((".", "/", "~")) or os.sep in spec
                                                            or Path(spec).exists())
        if looks_local and not Path(spec).expanduser().exists():
            raise FileNotFoundError(f"eval: model {name!r}: {spec}: directory not found (train that stage first, "
                                    f"or remove {name!r} from models)")
        try:
            resolved[name] = resolve_model(spec)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"eval: model {name!r}: {e}") from None
    return resolved


# --------------------------------------------------------------------------------------------
# Generation (+ per-token log-ratio to the reference), one model in memory besides the reference


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _generate_all(cfg: EvalConfig, prompts: list[dict], paths: dict[str, str], run) -> dict[str, dict]:
    """Per model: texts, token counts, finished flags and (when computed) log p_model - log p_ref.

    Each model's results are cached under ``cache/`` keyed by the model's hash, the prompts and
    the generation settings, so an interrupted eval resumes after the models it finished.
    """
    import torch

    from alignkit.generation import encode_prompt, generate, load_policy, same_vocabulary, sequence_logprobs

    ref_name = cfg.kl_reference or cfg.baseline
    order = [ref_name] + [n for n in cfg.models if n != ref_name]
    gen_kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, temperature=cfg.temperature,
                      top_p=cfg.top_p, top_k=cfg.top_k, batch_size=cfg.batch_size, seed=cfg.seed,
                      num_return_sequences=cfg.samples_per_prompt, max_prompt_length=cfg.max_prompt_length)
    messages = [p["prompt"] for p in prompts]
    k = cfg.samples_per_prompt
    cache_dir = run.dir / "cache"
    ref_hash = run.inputs.get(f"model:{ref_name}", {}).get("hash")
    ref = None  # (model, tokenizer), loaded on demand
    results: dict[str, dict] = {}

    def load(name: str):
        return load_policy(paths[name], device=cfg.device, trust_remote_code=cfg.trust_remote_code)

    for name in order:
        key = _fingerprint(run.inputs.get(f"model:{name}", {}).get("hash") or paths[name], ref_hash, messages,
                           gen_kwargs, cfg.compute_kl, cfg.device)
        cached = cache_dir / f"{name}.json"
        if cached.exists():
            data = json.loads(cached.read_text())
            if data.get("key") == key:
                log.info("eval: %s: reusing generations from %s", name, cached)
                results[name] = data
                continue
        log.info("eval: %s: generating %d replies (%s)", name, len(prompts) * k, paths[name])
        model, tok = load(name)
        if name == ref_name:
            ref = model, tok
        # The model's own log-probs of its replies come from the logits generation computes anyway
        # (a second forward pass over every reply cost as much as generating it).
        out = generate(model, tok, messages, **gen_kwargs, return_logprobs=cfg.compute_kl and name != ref_name)
        log.info("eval: %s: %d tokens in %.1fs", name, out.generated_tokens, out.seconds)
        data = {"key": key, "texts": out.texts, "n_tokens": out.n_tokens, "finished": out.finished,
                "seconds": out.seconds, "generated_tokens": out.generated_tokens, "log_ratio": None, "kl_note": None}
        if name == ref_name:
            data["log_ratio"] = [0.0] * len(out.texts)  # KL of the reference to itself
        elif cfg.compute_kl:
            if ref is None:
                ref = load(ref_name)
            if same_vocabulary(tok, ref[1]):
                lp_model = out.logprobs
                ref_prompt_ids = [encode_prompt(ref[1], m) for m in messages for _ in range(k)]
                if cfg.max_prompt_length:
                    ref_prompt_ids = [r[-cfg.max_prompt_length:] for r in ref_prompt_ids]
                lp_ref = sequence_logprobs(ref[0], ref_prompt_ids, out.response_ids, ref[1].pad_token_id, cfg.batch_size)
                data["log_ratio"] = [a - b for a, b in zip(lp_model, lp_ref)]
            else:
                data["kl_note"] = f"{name} and {ref_name} have different vocabularies: no per-token KL"
        if name != ref_name:
            del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        atomic_write_json(cached, data)
        results[name] = data
    del ref
    return results


# --------------------------------------------------------------------------------------------
# Scoring


def per_reply(values: list, k: int) -> list:
    """Per-prompt values repeated for each of the prompt's ``k`` replies (replies are prompt-major)."""
    return [v for v in values for _ in range(k)]


def per_prompt_means(values: list[float], k: int) -> list[float]:
    """Mean of each prompt's ``k`` consecutive per-reply values."""
    return [sum(values[i:i + k]) / k for i in range(0, len(values), k)]


def _score(cfg: EvalConfig, prompts: list[dict], gens: dict[str, dict]) -> dict[str, dict[str, list[float]]]:
    """source -> model -> one score per reply."""
    k = cfg.samples_per_prompt
    scores: dict[str, dict[str, list[float]]] = {}
    if cfg.reward_model:
        from alignkit.scoring import RewardScorer

        scorer = RewardScorer(cfg.reward_model, device=cfg.device, batch_size=cfg.reward_batch_size,
                              max_length=cfg.reward_max_length)
        messages = per_reply([p["prompt"] for p in prompts], k)
        scores[REWARD_MODEL] = {name: [float(s) for s in scorer.score(messages, g["texts"])]
                                for name, g in gens.items()}
        del scorer
    if cfg.reward_function:
        fn = load_reward_function(cfg.reward_function)
        scores[RULE] = {}
        for name, g in gens.items():
            values = list(fn(per_reply([p["text"] for p in prompts], k), list(g["texts"])))
            if len(values) != len(g["texts"]):
                raise ValueError(f"reward_function {cfg.reward_function}: returned {len(values)} scores for {len(g['texts'])} replies")
            scores[RULE][name] = [float(v) for v in values]
    return scores


def _oracle(prompts: list[dict], gens: dict[str, dict], k: int) -> tuple[list[dict | None], dict[str, list[float | None]]]:
    """The constraint of each prompt, and model -> the oracle's score of each reply (None: no constraint)."""
    from alignkit.oracle import constraint_score, find_constraint

    constraints = [p.get("constraint") or find_constraint(p["prompt"]) for p in prompts]
    per_model = {name: [constraint_score(t, c) if c else None for t, c in zip(g["texts"], per_reply(constraints, k))]
                 for name, g in gens.items()}
    return constraints, per_model


def words(text: str) -> int:
    return len(text.split())


def compute_results(cfg: EvalConfig, prompts: list[dict], gens: dict[str, dict],
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
        "prompts": prompts_file(cfg.prompts),
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


def with_groups(cfg: EvalConfig, prompts: list[dict], gens: dict[str, dict], scores: dict,
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


# --------------------------------------------------------------------------------------------
# The stage


def evaluate(cfg: EvalConfig, force: bool = False) -> dict:
    prompts = load_eval_prompts(cfg)  # bad input fails here, before anything is written
    paths = resolve_models(cfg)
    if cfg.reward_function:
        load_reward_function(cfg.reward_function)
    if cfg.reward_model and not Path(cfg.reward_model).exists():
        raise FileNotFoundError(f"eval: reward_model {cfg.reward_model}: directory not found")
    if not cfg.reward_model and not cfg.reward_function:
        log.warning("eval: no reward_model or reward_function: only lengths, KL, diversity and the oracle")

    out = Path(cfg.output_dir)
    inputs = {"prompts": prompts_file(cfg.prompts), "reward_model": cfg.reward_model,
              **{f"model:{n}": p for n, p in paths.items()}}
    rule_file = (cfg.reward_function or "").rpartition(":")[0]
    if rule_file.endswith(".py"):
        inputs["reward_function"] = rule_file
    config = to_dict(cfg)
    # The run store redacts values of keys that look secret, and its pattern also matches
    # "max_new_tokens"; a redacted value would no longer tell runs apart, so the manifest also
    # records a hash of the full config (no secrets in it) to decide "same config".
    config["config_sha256"] = _fingerprint(config)
    with stage_run("eval", out, config, inputs, force) as run:
        if run.skipped:
            log.info("eval: already completed in %s (use --force to run again)", out)
            return json.loads((out / "eval.json").read_text())
        if force:
            shutil.rmtree(out / "cache", ignore_errors=True)
        import torch

        threads = torch.get_num_threads()
        if cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        try:
            gens = _generate_all(cfg, prompts, paths, run)
        finally:
            torch.set_num_threads(threads)
        scores = _score(cfg, prompts, gens)
        k = cfg.samples_per_prompt
        constraints, oracle = _oracle(prompts, gens, k) if cfg.oracle else ([None] * len(prompts), None)
        result = with_groups(cfg, prompts, gens, scores, constraints, oracle)
        rows = generation_rows(prompts, gens, scores, constraints, oracle, k)

        from alignkit.evals.report import write_report

        atomic_write_json(out / "eval.json", result)
        write_jsonl(out / "generations.jsonl", rows)
        write_report(result, rows, out / "report.html", samples=cfg.report_samples)
        for key in ("eval.json", "generations.jsonl", "report.html"):
            run.add_output(key.split(".")[0], out / key)
        run.metrics.update(flat_metrics(result))
        _log_summary(result)
    return result


def _log_summary(result: dict) -> None:
    primary = result["primary_reward"]
    for name, m in result["models"].items():
        parts = [f"{name:>10}"]
        if primary:
            r = m["reward"][primary]
            parts.append(f"reward {r['mean']:.3f}")
            if "win_rate" in m:
                parts.append(f"win {m['win_rate'][primary]['win_rate']:.2f} (LC {m['lc_win_rate'][primary]['win_rate']:.2f})")
        if m["kl"]["mean"] is not None:
            parts.append(f"KL {m['kl']['mean']:.2f}")
        parts.append(f"words {m['length']['words']['mean']:.1f}")
        if "oracle" in m:
            parts.append(f"oracle pass {m['oracle']['pass']['rate']:.2f}")
        log.info("eval: %s", " | ".join(parts))
