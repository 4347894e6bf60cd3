"""DPO stage: direct preference optimisation of the SFT policy with TRL's DPOTrainer.

Reads like the stage: load the preference pairs (any format ``alignkit.data.load_preferences``
parses: the annotation export, TRL preference JSONL, HH-RLHF transcripts), split off a seeded eval
set (or read ``eval_data``) and check its prompts for leakage into the training pairs, build the
policy (full, LoRA or QLoRA) and its reference, measure the implicit DPO reward on the eval set,
train with checkpoints (resuming the last one), measure again, save the model and the manifest.

The implicit reward of a reply is ``beta * (log pi(y|x) - log pi_ref(y|x))`` (Rafailov et al.
2023); the manifest records, on the eval pairs, before and after training, the fraction of pairs
whose chosen reply gets the higher reward (``reward_accuracy``; a tie counts as wrong, so it is 0
before training, when pi = pi_ref) and the mean reward margin chosen - rejected.

Reference model: with LoRA/QLoRA it is the policy with its adapter disabled (no second copy);
with full fine-tuning a second, frozen copy; with ``precompute_ref_log_probs`` the reference
log-probs are computed once before training and no reference is kept.

Launch: ``alignkit align dpo --config configs/dpo.yaml [KEY=VALUE ...]``; several processes:
``torchrun --nproc_per_node 2 -m alignkit.cli align dpo --config ...``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.config import ConfigError, check_range, doc, to_dict
from alignkit.data import check_leakage, prompt_text, seeded_split
from alignkit.preferences import SOURCES_HELP, load_preference_sources, load_preferences, source_inputs, weighted
from alignkit.cleaning import clean_for_stage, log_cleaning
from alignkit.models import load_tokenizer, match_tokenizer, resolve_model, use_text_format
from alignkit.runstore import is_main_process, stage_run
from alignkit.training import (LoraOptions, TrainerConfig, evaluate_once, even_eval_batch_size, freeze_lower_layers,
                               lora_config, qlora_config, qlora_problem, save_trained_model,
                               score_only_labelled_tokens_on_cpu, stage_callbacks, train_from_last_checkpoint,
                               trainer_arguments, use_bf16)

log = logging.getLogger("alignkit.dpo")

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class DPOStageConfig(TrainerConfig):
    """The DPO stage's keys: those of every TRL stage (:class:`TrainerConfig`) and its own below."""

    # model
    model: str = doc("policy to align (and, frozen, the reference): the SFT stage's model directory", "runs/quickstart/sft/model")
    lora: LoraOptions = field(default_factory=LoraOptions, metadata={"help": "LoRA options (the reference is the policy with the adapter disabled)"})
    qlora: bool = doc("4-bit quantised base + LoRA (needs CUDA and bitsandbytes)", False)
    precompute_ref_log_probs: bool = doc("compute the reference log-probs once before training (no reference in memory)", False)
    # data
    data: str | list = doc("preference pairs: the annotation export, TRL preference JSONL ({prompt, chosen, rejected}), "
                           "HH-RLHF transcripts, an HF dataset dir or Hub name" + SOURCES_HELP,
                           "runs/quickstart/annotate/export/pairs.jsonl")
    eval_data: str | None = doc("held-out preference pairs; default: eval_fraction of data, split with seed", None)
    eval_fraction: float = doc("fraction of the prompts (with all their pairs) held out for the before/after "
                               "implicit-reward evaluation", 0.1)
    on_bad_pair: str = doc("well-formed but useless pairs (identical or empty replies): 'drop' (counted) or 'error'", "drop")
    max_pairs: int | None = doc("use only the first N pairs (smoke runs)", None)
    pairs_per_prompt: int | None = doc("train on at most N pairs per prompt, those with the largest margin (a ranking "
                                       "of k replies gives k(k-1)/2 pairs; 1 keeps the clearest, usually best vs worst); "
                                       "with several sources, N per prompt of each source (a prompt annotated in two "
                                       "rounds of the loop keeps the clearest pair of each); "
                                       "held-out pairs are all kept; null: every pair", None)
    max_length: int = doc("truncate prompt + reply to this many tokens (the end of long replies is cut)", 512)
    # loss
    loss_type: list[str] = doc("DPO loss(es): sigmoid (DPO), ipo, hinge (SLiC), robust, exo_pair, nca_pair, bco_pair, "
                               "sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, sft; several "
                               "are summed with loss_weights", default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = doc("weights of the losses in loss_type (default: 1 each)", None)
    beta: float = doc("DPO beta: strength of the implicit KL constraint to the reference (IPO: tau)", 0.1)
    label_smoothing: float = doc("robust DPO: assumed label-flip probability in [0, 0.5); exo_pair: epsilon", 0.0)
    # optimisation (the shared keys, with DPO's defaults)
    learning_rate: float = doc("peak learning rate (full fine-tuning wants ~5e-7..5e-6; LoRA ~1e-5..1e-4)", 5e-6)
    warmup_ratio: float = doc("fraction of steps spent warming up the learning rate", 0.1)
    batch_size: int = doc("pairs per device per step", 4)
    # run
    output_dir: str = doc("this stage's run directory", "runs/quickstart/dpo")

    def check(self) -> None:
        unknown = [t for t in self.loss_type if t not in LOSS_TYPES]
        if unknown or not self.loss_type:
            raise ConfigError(f"dpo: loss_type {unknown or self.loss_type}: expected one or more of {', '.join(LOSS_TYPES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ConfigError(f"dpo: {len(self.loss_weights)} loss_weights for {len(self.loss_type)} loss types")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError("dpo: eval_fraction must be in [0, 1)")
        check_range(self, 1, "pairs_per_prompt")
        if self.trainable_layers is not None and self.qlora:  # (with lora.enabled the config cannot be built)
            raise ConfigError("dpo: trainable_layers and qlora are alternatives (both limit what trains): set one")
        if self.qlora:
            problem = qlora_problem("dpo")  # no GPU or no bitsandbytes: say so before anything is written
            if problem:
                raise ConfigError(problem)


def _as_trl_pair(p: dict) -> dict:
    return {"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}


def prepare_data(cfg: DPOStageConfig) -> dict:
    """Load, check and split the pairs; nothing is written here, so bad input leaves no trace."""
    prefs = load_preference_sources(cfg.data, on_bad_pair=cfg.on_bad_pair)
    prefs.check_one_layout(cfg.standard_as_chat)
    pairs, cleaning = clean_for_stage(prefs.pairs, "preference", cfg.clean, cfg.near_duplicate_threshold)
    pairs = pairs[: cfg.max_pairs] if cfg.max_pairs else pairs
    if cfg.eval_data:
        held = load_preferences(cfg.eval_data, on_bad_pair=cfg.on_bad_pair).pairs
        train_pairs, eval_pairs = pairs, clean_for_stage(held, "preference", cfg.clean, cfg.near_duplicate_threshold)[0]
    else:
        # Split over prompts, not pairs: the annotation export holds several pairs per prompt
        # (k replies ranked), and a split over pairs would put one prompt on both sides.
        keys = sorted({prompt_text(p["prompt"]) for p in pairs})
        held = set(seeded_split(keys, {"train": 0, "eval": cfg.eval_fraction}, cfg.seed)["eval"])
        train_pairs = [p for p in pairs if prompt_text(p["prompt"]) not in held]
        eval_pairs = [p for p in pairs if prompt_text(p["prompt"]) in held]
    n_before = len(train_pairs)
    if cfg.pairs_per_prompt:
        train_pairs = clearest_pairs(train_pairs, cfg.pairs_per_prompt)
    if not train_pairs:
        raise ConfigError(f"{cfg.data}: no training pairs left after the split ({len(pairs)} pairs)")
    if not eval_pairs:
        raise ConfigError(f"{cfg.data}: no eval pairs ({len(pairs)} pairs, eval_fraction {cfg.eval_fraction}); "
                          "raise eval_fraction or give eval_data")
    leakage = check_leakage([p["prompt"] for p in eval_pairs], [p["prompt"] for p in train_pairs])
    not_clearest = n_before - len(train_pairs)
    train_pairs = weighted(train_pairs, cfg.seed)  # after the split: held-out pairs count once each
    return {"train": [_as_trl_pair(p) for p in train_pairs], "eval": [_as_trl_pair(p) for p in eval_pairs],
            "format": prefs.format, "standard": prefs.standard, "dropped": prefs.dropped, "leakage": leakage,
            "cleaning": cleaning, "not_clearest": not_clearest, "sources": prefs.sources}


def clearest_pairs(pairs: list[dict], n: int) -> list[dict]:
    """At most ``n`` pairs per prompt and source (pairs read from a list of sources carry their
    ``source``: each source's replies to a prompt were ranked on their own), largest ``margin``
    first (a pair without one counts as 0; equal margins keep the file's order), in the order the
    kept pairs had."""
    by_prompt: dict[tuple, list[int]] = {}
    for i, p in enumerate(pairs):
        by_prompt.setdefault((p.get("source"), prompt_text(p["prompt"])), []).append(i)
    keep = set()
    for idx in by_prompt.values():
        keep.update(sorted(idx, key=lambda i: -float(pairs[i].get("margin") or 0.0))[:n])
    return [p for i, p in enumerate(pairs) if i in keep]


def _implicit_reward_metrics(metrics: dict) -> dict:
    return {
        "reward_accuracy": metrics.get("eval_rewards/accuracies"),
        "reward_margin": metrics.get("eval_rewards/margins"),
        "reward_chosen": metrics.get("eval_rewards/chosen"),
        "reward_rejected": metrics.get("eval_rewards/rejected"),
        "loss": metrics.get("eval_loss"),
    }


def train(cfg: DPOStageConfig, force: bool = False) -> dict:
    cfg.check()
    data = prepare_data(cfg)  # before any heavy import or write: bad input fails fast and leaves nothing

    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    model_path = resolve_model(cfg.model)
    out = Path(cfg.output_dir)
    inputs = {**source_inputs(cfg.data), "eval_data": cfg.eval_data, "model": model_path}
    with stage_run("dpo", out, to_dict(cfg), inputs, force) as run:
        if run.skipped:
            if is_main_process():
                print(f"dpo: already completed in {out} (use --force to run again)")
            return run.previous
        run.clear_for_fresh_start("checkpoints", "initial_eval.json", "log_history.jsonl")  # forced, or another config or input
        log_cleaning("dpo", data["cleaning"], "pairs")
        run.notes.update({"format": data["format"], "dropped_pairs": data["dropped"], "cleaning": data["cleaning"], "leakage": data["leakage"],
                          "pairs_per_prompt": {"limit": cfg.pairs_per_prompt, "left_out": data["not_clearest"]},
                          "split_sizes": {"train": len(data["train"]), "eval": len(data["eval"])},
                          **({"sources": data["sources"]} if data["sources"] else {})})
        log.info("dpo: %d train / %d eval pairs (%s); dropped %s; eval prompts also in training: %d exact, %d normalised",
                 len(data["train"]), len(data["eval"]), data["format"], data["dropped"],
                 data["leakage"]["exact_duplicates"], data["leakage"]["normalized_duplicates"])

        bf16 = use_bf16(cfg.bf16)
        dtype = torch.bfloat16 if bf16 else torch.float32
        tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
        run.notes["text_format"] = use_text_format(tokenizer, data["standard"], cfg.standard_as_chat)
        quantization_config = qlora_config(dtype, "dpo") if cfg.qlora else None
        load_kw = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quantization_config, **load_kw)
        match_tokenizer(model, tokenizer)
        run.notes["parameters"] = freeze_lower_layers(model, cfg.trainable_layers)
        peft_config, ref_model = None, None
        if cfg.lora.enabled or cfg.qlora:
            peft_config = lora_config(cfg.lora, "CAUSAL_LM")
        elif not cfg.precompute_ref_log_probs:
            # Our own frozen copy, built like the policy (TRL would reload it from the path, without
            # the embeddings that match_tokenizer may have grown).
            ref_model = AutoModelForCausalLM.from_pretrained(model_path, **load_kw)
            match_tokenizer(ref_model, tokenizer)

        args = DPOConfig(
            **trainer_arguments(cfg, out, bf16, even_eval_batch_size(len(data["eval"]), cfg.batch_size)),
            loss_type=list(cfg.loss_type), loss_weights=cfg.loss_weights, beta=cfg.beta,
            label_smoothing=cfg.label_smoothing, precompute_ref_log_probs=cfg.precompute_ref_log_probs,
        )
        # Datasets live in files under the run directory, written by the main process first: TRL's
        # tokenisation and reference log-prob caches then sit beside them, shared by every rank (an
        # in-memory dataset would put them in a per-process temp dir that the other ranks cannot see).
        with args.main_process_first(local=False, desc="dpo datasets"):
            train_ds = _shared_dataset(data["train"], out / "data" / "train")
            eval_ds = _shared_dataset(data["eval"], out / "data" / "eval")
        score_only_labelled_tokens_on_cpu()
        trainer = DPOTrainer(
            model=model, ref_model=ref_model, args=args, processing_class=tokenizer, peft_config=peft_config,
            train_dataset=train_ds, eval_dataset=eval_ds,
            callbacks=stage_callbacks(cfg, out, "dpo"),
        )

        # TRL drops pairs whose prompt alone fills max_length, silently: count them.
        run.notes["dropped_too_long"] = {"train": len(data["train"]) - len(trainer.train_dataset),
                                         "eval": len(data["eval"]) - len(trainer.eval_dataset)}
        if any(run.notes["dropped_too_long"].values()):
            log.warning("dpo: pairs dropped because the prompt fills max_length=%d: %s", cfg.max_length,
                        run.notes["dropped_too_long"])

        initial = evaluate_once(trainer, out / "initial_eval.json")  # a resumed run reports the same "before"
        result = train_from_last_checkpoint(trainer, run, "dpo", merge_at_end=peft_config is not None and cfg.lora.merge)
        final = trainer.evaluate()

        model_dir = out / "model"
        save_trained_model(trainer, tokenizer, model_dir, merge=peft_config is not None and cfg.lora.merge)
        run.add_output("model", model_dir)
        run.add_output("checkpoints", out / "checkpoints")
        run.add_output("tensorboard", out / "tensorboard")
        before, after = _implicit_reward_metrics(initial), _implicit_reward_metrics(final)
        run.metrics.update({
            "eval_before": before, "eval_after": after,
            "eval_reward_accuracy_before": before["reward_accuracy"], "eval_reward_accuracy_after": after["reward_accuracy"],
            "eval_reward_margin_before": before["reward_margin"], "eval_reward_margin_after": after["reward_margin"],
            "train_loss": result.training_loss, "global_step": result.global_step,
            "train_runtime_s": result.metrics.get("train_runtime"),
            "train_pairs_per_second": result.metrics.get("train_samples_per_second"),
        })
        if is_main_process():
            print(f"dpo: done. eval reward accuracy {before['reward_accuracy']:.3f} -> {after['reward_accuracy']:.3f}, "
                  f"margin {before['reward_margin']:.4f} -> {after['reward_margin']:.4f}\n"
                  f"  model:    {model_dir}\n  manifest: {out / 'manifest.json'}")
    return run.manifest("completed")


def _shared_dataset(rows: list[dict], path: Path):
    """An Arrow dataset saved at ``path`` (rewritten by the main process only when its rows changed)."""
    import hashlib

    from datasets import Dataset, load_from_disk

    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    stamp = path / "rows.sha256"
    if is_main_process() and not (stamp.exists() and stamp.read_text() == digest):
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        Dataset.from_list(rows).save_to_disk(str(tmp))
        (tmp / "rows.sha256").write_text(digest)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return load_from_disk(str(path))
