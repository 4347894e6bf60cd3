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

from alignkit.config import ConfigError, check_range, doc, to_dict
from alignkit.data import DataError, load_prompts, prompt_text, read_dataset_rows
from alignkit.distributed import wait_for_all
from alignkit.evals.results import ASPECTS, REWARD_MODEL, RULE, aspect_scores, flat_metrics, generation_rows, per_reply, with_groups
from alignkit.rewards import load_reward_function
from alignkit.runstore import atomic_write_json, is_main_process, stage_run, write_jsonl
from alignkit.trackers import Tracker, TrackingConfig

log = logging.getLogger("alignkit.eval")



@dataclass
class EvalConfig(TrackingConfig):
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
    aspect_weights: dict | None = doc("a multi-aspect reward model's heads combined into the reward the win rates "
                                      "use, as in PPO ({reward: 1.0, helpfulness: 0.5, ...}; null: the reward head); "
                                      "each aspect's own score is reported per model either way", None)
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
    general_text: str | None = doc("forgetting check: perplexity on general text no stage trains on; 'builtin' (200 "
                                   "passages shipped with alignkit, see alignkit/demo/README.md), a {text} JSONL file, "
                                   "or null to skip", "builtin")
    general_text_max: int | None = doc("use only the first N general texts (null: all)", None)
    forgetting_reference: str | None = doc("the model the perplexities are compared to: a name in models or a model "
                                           "(dir, offline:NAME, Hub id), e.g. the model the loop started from; "
                                           "default: the KL reference", None)
    forgetting_threshold: float = doc("flag a model whose general-text perplexity rose by more than this fraction "
                                      "(with the paired per-text difference's interval above 0)", 0.1)
    confidence: float = doc("confidence level of every interval", 0.95)
    report_samples: int = doc("prompts shown side by side in report.html", 12)
    device: str | None = doc("cuda, cpu, ...; default: CUDA when available", None)
    cpu_threads: int | None = doc("torch CPU threads during the eval (null: torch's default); on a shared, "
                                  "oversubscribed CPU, 1 can be several times faster than 2", None)
    trust_remote_code: bool = doc("allow model code from the Hub (off unless you trust it)", False)

    def __post_init__(self):
        super().__post_init__()
        check_range(self, 1, "samples_per_prompt", "max_new_tokens", "batch_size", "reward_batch_size",
                    "reward_max_length", "max_prompts", "max_prompt_length", "cpu_threads")
        check_range(self, 0, "top_k", "report_samples", "forgetting_threshold")
        check_range(self, 1, "general_text_max")
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


def forgetting_models(cfg: EvalConfig, paths: dict[str, str]) -> tuple[str, dict[str, str]]:
    """(the reference's name, name -> path of every model the forgetting check measures)."""
    from alignkit.generation import model_dir_of
    from alignkit.models import resolve_model

    spec = cfg.forgetting_reference or cfg.kl_reference or cfg.baseline
    if spec in paths:
        return spec, dict(paths)
    path = resolve_model(model_dir_of(spec))
    named = next((n for n, p in paths.items() if p == path), None)
    label = "base" if "base" not in paths else "reference"  # in the loop: the model it started from
    return (named, dict(paths)) if named else (label, {label: path, **paths})


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
        if is_main_process():
            atomic_write_json(cached, data)
        results[name] = data
    del ref
    return results


# --------------------------------------------------------------------------------------------
# Scoring


def _score(cfg: EvalConfig, prompts: list[dict], gens: dict[str, dict]) -> dict[str, dict[str, list[float]]]:
    """source -> model -> one score per reply."""
    k = cfg.samples_per_prompt
    scores: dict[str, dict[str, list[float]]] = {}
    if cfg.reward_model:
        from alignkit.scoring import RewardScorer

        scorer = RewardScorer(cfg.reward_model, device=cfg.device, batch_size=cfg.reward_batch_size,
                              max_length=cfg.reward_max_length, aspect_weights=cfg.aspect_weights)
        messages = per_reply([p["prompt"] for p in prompts], k)
        if scorer.aspects:  # every head once: the (weighted) reward and each aspect's own score
            import torch

            heads = {name: torch.tensor(scorer.score_all_heads(messages, g["texts"])) for name, g in gens.items()}
            scores[REWARD_MODEL] = {name: (h @ scorer.weights if scorer.weights is not None else h[:, 0]).tolist()
                                    for name, h in heads.items()}
            scores[ASPECTS] = {name: {a: h[:, 1 + i].tolist() for i, a in enumerate(scorer.aspects)}
                               for name, h in heads.items()}
        else:
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

    general_texts, forgetting_paths, forgetting_ref = None, {}, None
    if cfg.general_text:
        from alignkit.evals.forgetting import general_text_file, load_general_text

        general_texts = load_general_text(cfg.general_text, cfg.general_text_max)
        forgetting_ref, forgetting_paths = forgetting_models(cfg, paths)

    out = Path(cfg.output_dir)
    inputs = {"prompts": prompts_file(cfg.prompts), "reward_model": cfg.reward_model,
              **{f"model:{n}": p for n, p in paths.items()}}
    if general_texts:
        inputs["general_text"] = general_text_file(cfg.general_text)
        if forgetting_ref not in paths:
            inputs["forgetting_reference"] = forgetting_paths[forgetting_ref]
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
        if force:  # every process must then see the cache gone, or they would not generate in step
            if is_main_process():
                shutil.rmtree(out / "cache", ignore_errors=True)
            wait_for_all()
        # an earlier run's results must not outlive it: a crash below leaves no stale report
        run.clear_for_fresh_start("eval.json", "generations.jsonl", "report.html")
        import torch

        threads = torch.get_num_threads()
        if cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        try:
            gens = _generate_all(cfg, prompts, paths, run)
        finally:
            torch.set_num_threads(threads)
        scores = _score(cfg, prompts, gens)
        aspects = scores.pop(ASPECTS, None)
        k = cfg.samples_per_prompt
        constraints, oracle = _oracle(prompts, gens, k) if cfg.oracle else ([None] * len(prompts), None)
        result = {**with_groups(cfg, prompts, gens, scores, constraints, oracle), "prompts": prompts_file(cfg.prompts)}
        if aspects:
            result["aspects"] = aspect_scores(aspects, k, cfg.confidence, cfg.aspect_weights)
        if general_texts:
            from alignkit.evals.forgetting import forgetting

            hashes = {p: (run.inputs.get(f"model:{n}") or run.inputs.get("forgetting_reference") or {}).get("hash") or p
                      for n, p in forgetting_paths.items()}
            result["forgetting"] = forgetting(forgetting_paths, forgetting_ref, general_texts, cfg.forgetting_threshold,
                                              cfg.confidence, cfg.batch_size, cfg.device, cfg.trust_remote_code,
                                              out / "cache", lambda path, texts: _fingerprint(hashes[path], texts, cfg.device))
        rows = generation_rows(prompts, gens, scores, constraints, oracle, k)

        from alignkit.evals.human import load_results
        from alignkit.evals.report import write_report

        for key in ("eval.json", "generations.jsonl", "report.html"):
            run.add_output(key.split(".")[0], out / key)
        run.metrics.update(flat_metrics(result))
        if is_main_process():  # under a launcher every process computed the same result
            atomic_write_json(out / "eval.json", result)
            write_jsonl(out / "generations.jsonl", rows)
            # human evaluations of these very replies (the same generations) stay in the report
            write_report(result, rows, out / "report.html", samples=cfg.report_samples, human=load_results(out))
            tracker = Tracker(cfg, out, config)
            tracker.log(run.metrics, step=0)
            tracker.close()
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
