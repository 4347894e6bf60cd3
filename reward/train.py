"""Reward stage: a reward model trained with the pairwise ranking loss (TRL's RewardTrainer).

Reads like the stage: load and check the preference pairs, split them by prompt (seeded) unless a
separate eval file is given, check the held-out prompts for leakage, tokenise every pair through the
chat template and count (then drop or truncate) the pairs longer than ``max_length``, build a
sequence-classification model (full or LoRA), train with checkpoints (resuming the last one), save
the model and the manifest.

The loss, per pair (Ouyang et al. 2022; Touvron et al. 2023 for the margin)::

    loss = -log sigmoid(r_chosen - r_rejected - margin_scale * margin)        (margin from the data)
         + center_rewards_coefficient * mean((r_chosen + r_rejected)^2)     (optional centring)

TRL's RewardTrainer computes exactly this when the dataset has a ``margin`` column and
``center_rewards_coefficient`` is set, so the single-reward path is TRL's code, unchanged. The one
subclass below exists for the optional multi-aspect heads only: it reads the reward from logit
column 0, hands TRL's loss that column, and adds a masked MSE on the aspect columns.

Launch: ``alignkit reward train --config configs/reward.yaml [KEY=VALUE ...]``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.config import ConfigError, check_range, doc, to_dict
from alignkit.data import DataError, check_leakage, seeded_split
from alignkit.preferences import SOURCES_HELP, load_preference_sources, load_preferences, source_inputs, weighted
from alignkit.cleaning import clean_for_stage, log_cleaning
from alignkit.models import load_tokenizer, resolve_model, use_text_format
from alignkit.runstore import is_main_process, stage_run, write_jsonl
from alignkit.scoring import conversation_ids, truncate_left
from alignkit.training import (LoraOptions, TrainerConfig, evaluate_once, even_eval_batch_size, freeze_lower_layers,
                               lora_config, save_trained_model, stage_callbacks, train_from_last_checkpoint,
                               trainer_arguments, use_bf16)

log = logging.getLogger("alignkit.reward")


@dataclass
class RewardTrainConfig(TrainerConfig):
    """The reward stage's keys: those of every TRL stage (:class:`TrainerConfig`) and its own below."""

    # model
    model: str = doc("backbone: an SFT run's model dir, a Hub id, or offline:smollm2-135m-instruct "
                     "(any model that AutoModelForSequenceClassification can load)", "runs/quickstart/sft/model")
    lora: LoraOptions = field(default_factory=LoraOptions, metadata={"help": "LoRA options (the score head is fully "
        "trained). <output_dir>/model is always a plain merged model (what RewardScorer loads); lora.merge=false "
        "also saves the adapters alone to <output_dir>/adapter"})
    backbone_layers: int | None = doc("keep only the backbone's lowest N transformer blocks (and its embeddings): a "
                                      "smaller reward model that costs N/L of the full one everywhere it runs (training, "
                                      "PPO's scores and value model, evaluation); trainable_layers then counts from its "
                                      "new top; null: every block", None)
    aspects: bool = doc("also train one head per aspect rating found in the data (aspects_chosen/aspects_rejected)", False)
    # data
    data: str | list = doc("preference pairs: annotation export JSONL, TRL preference JSONL (plain or conversational, "
                           "optional margin), HH-RLHF transcripts (.jsonl/.jsonl.gz), an HF dataset dir or Hub name"
                           + SOURCES_HELP, "runs/quickstart/annotate/export/pairs.jsonl")
    eval_data: str | None = doc("separate held-out pairs; default: hold out eval_fraction of the prompts of `data`", None)
    max_pairs: int | None = doc("use only the first N pairs of `data` (smoke runs)", None)
    eval_fraction: float = doc("fraction of PROMPTS held out (all pairs of a prompt go to the same side)", 0.1)
    on_bad_pair: str = doc("pairs with identical or empty replies: 'drop' skips and counts them, 'error' stops", "drop")
    max_length: int = doc("token limit for prompt + reply (chat template included)", 1024)
    overlength: str = doc("pairs whose chosen or rejected side is longer than max_length: 'drop' (counted in the "
                          "manifest) or 'truncate' (cut from the left: the oldest prompt tokens go, the replies stay)", "drop")
    # loss
    use_margin: bool = doc("use the data's `margin` in the loss: -log sigmoid(r_c - r_r - margin_scale*margin); "
                           "false = plain Bradley-Terry", True)
    margin_scale: float = doc("multiplier on the data's margin (in reward units)", 1.0)
    center_rewards_coefficient: float | None = doc("weight of mean((r_c + r_r)^2), pulling rewards towards zero mean "
                                                   "(Eisenstein et al. 2023 recommend 0.01); null = off", None)
    aspect_loss_weight: float = doc("weight of the aspect heads' MSE (ratings 1..5 scaled to -1..1)", 0.5)
    cache_frozen_features: bool = doc("with trainable_layers (and no LoRA): run the frozen lower blocks once per "
                                      "sequence before training and reuse their output in every epoch and evaluation "
                                      "(exact: the same losses and gradients); costs hidden_size x tokens floats of memory",
                                      True)
    # schedule and optimisation (the shared keys, with the reward stage's defaults)
    epochs: float = doc("passes over the training pairs (one is usual for reward models: they overfit fast)", 1.0)
    learning_rate: float = doc("peak learning rate", 1e-5)
    lr_scheduler: str = doc("transformers scheduler name", "linear")
    batch_size: int = doc("pairs per device per step (each pair is two sequences)", 4)
    eval_steps: int = doc("evaluate held-out accuracy every N steps", 50)
    # run
    output_dir: str = doc("this stage's run directory (the model goes to <output_dir>/model)", "runs/quickstart/reward")

    def __post_init__(self):
        super().__post_init__()
        if self.overlength not in ("drop", "truncate"):
            raise ConfigError(f"overlength: expected 'drop' or 'truncate', got {self.overlength!r}")
        if self.on_bad_pair not in ("drop", "error"):
            raise ConfigError(f"on_bad_pair: expected 'drop' or 'error', got {self.on_bad_pair!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction: expected a number in [0, 1), got {self.eval_fraction}")
        check_range(self, 1, "backbone_layers")
        if self.backbone_layers and self.trainable_layers and self.trainable_layers > self.backbone_layers:
            raise ConfigError(f"trainable_layers ({self.trainable_layers}) must not exceed backbone_layers "
                              f"({self.backbone_layers})")


# --------------------------------------------------------------------------------------------
# Data: load, split by prompt, margins, aspects (no tokenizer needed, nothing written)


def _prompt_key(pair: dict) -> str:
    return json.dumps(pair["prompt"], sort_keys=True)


def split_by_prompt(pairs: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded held-out split over unique prompts, so no held-out prompt is ever trained on (an
    annotation export holds several pairs per prompt: a split over pairs would leak prompts)."""
    keys = list(dict.fromkeys(_prompt_key(p) for p in pairs))
    if eval_fraction <= 0 or len(keys) < 2:
        return pairs, []
    parts = seeded_split(keys, {"train": 0, "eval": eval_fraction}, seed)
    held = set(parts["eval"] or parts["train"][:1])
    return [p for p in pairs if _prompt_key(p) not in held], [p for p in pairs if _prompt_key(p) in held]


def aspect_names(pairs: list[dict]) -> list[str]:
    names: set[str] = set()
    for p in pairs:
        for key in ("aspects_chosen", "aspects_rejected"):
            value = p.get(key)
            if value is None:
                continue
            if not isinstance(value, dict):
                raise DataError(key, None, key, f"expected a mapping aspect -> rating, got {value!r} (item {p.get('item_id')})")
            names.update(value)
    return sorted(names)


def aspect_target(ratings: dict | None, names: list[str]) -> list[float]:
    """Ratings 1..5 -> -1..1 per aspect; NaN where the aspect was not rated (masked in the loss)."""
    out = []
    for name in names:
        value = (ratings or {}).get(name)
        if value is None:
            out.append(math.nan)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError("aspects", None, name, f"expected a numeric rating, got {value!r}")
        else:
            out.append((float(value) - 3.0) / 2.0)
    return out


def prepare_data(cfg: RewardTrainConfig) -> dict:
    """Load, check and split the pairs. Bad input raises here, before anything is written."""
    data = load_preference_sources(cfg.data, on_bad_pair=cfg.on_bad_pair)
    data.check_one_layout(cfg.standard_as_chat)
    pairs, cleaning = clean_for_stage(data.pairs, "preference", cfg.clean, cfg.near_duplicate_threshold)
    pairs = pairs[: cfg.max_pairs] if cfg.max_pairs else pairs
    dropped = {"data": data.dropped}
    if cfg.eval_data:
        held = load_preferences(cfg.eval_data, on_bad_pair=cfg.on_bad_pair)
        train_pairs, eval_pairs = pairs, clean_for_stage(held.pairs, "preference", cfg.clean, cfg.near_duplicate_threshold)[0]
        dropped["eval_data"] = held.dropped
    else:
        train_pairs, eval_pairs = split_by_prompt(pairs, cfg.eval_fraction, cfg.seed)
    if not train_pairs:
        raise DataError(cfg.data, None, None, f"too few pairs ({len(pairs)}) to train after the held-out split")
    leakage = check_leakage([p["prompt"] for p in eval_pairs], [p["prompt"] for p in train_pairs])
    train_pairs = weighted(train_pairs, cfg.seed)  # after the split: held-out pairs count once each
    with_margin = sum("margin" in p for p in train_pairs + eval_pairs)
    names = aspect_names(train_pairs) if cfg.aspects else []
    if cfg.aspects and not names:
        raise DataError(cfg.data, None, "aspects_chosen", "aspects=true but no pair carries aspect ratings")
    return {"train": train_pairs, "eval": eval_pairs, "dropped": dropped, "format": data.format,
            "standard": data.standard, "leakage": leakage, "cleaning": cleaning,
            "n_pairs": len(pairs), "with_margin": with_margin, "aspects": names, "sources": data.sources}


# --------------------------------------------------------------------------------------------
# Tokenisation: the same text the scorer reads (alignkit/scoring.py), with the length policy applied


def tokenize_pairs(pairs: list[dict], tokenizer, cfg: RewardTrainConfig, use_margin: bool,
                   aspects: list[str]) -> tuple[list[dict], int]:
    """Rows for TRL's RewardTrainer (already tokenised: ``chosen_ids``, ``rejected_ids``, ``margin``)
    and the number of pairs longer than ``max_length`` (dropped or truncated per ``overlength``).

    TRL would drop over-long pairs silently; tokenising here lets us count them and choose."""
    rows, overlong = [], 0
    for p in pairs:
        c = conversation_ids(tokenizer, p["prompt"], p["chosen"][0]["content"])
        r = conversation_ids(tokenizer, p["prompt"], p["rejected"][0]["content"])
        if max(len(c), len(r)) > cfg.max_length:
            overlong += 1
            if cfg.overlength == "drop":
                continue
            c, r = truncate_left(c, cfg.max_length), truncate_left(r, cfg.max_length)
        row = {"chosen_ids": c, "rejected_ids": r}
        if use_margin:
            row["margin"] = cfg.margin_scale * float(p.get("margin", 0.0))
        if aspects:
            row["aspects_chosen_t"] = aspect_target(p.get("aspects_chosen"), aspects)
            row["aspects_rejected_t"] = aspect_target(p.get("aspects_rejected"), aspects)
        rows.append(row)
    return rows, overlong


# --------------------------------------------------------------------------------------------
# The multi-aspect extension of TRL's trainer (used for the plain case too: it then defers to TRL)


def _make_trainer_class():
    import torch
    from transformers.modeling_outputs import SequenceClassifierOutput
    from trl import RewardTrainer

    class AspectRewardTrainer(RewardTrainer):
        """RewardTrainer whose model may have extra logit columns (aspect heads).

        Column 0 is the reward: TRL's own ``compute_loss`` (pairwise loss, margin, centring, metrics)
        sees only that column; the aspect columns add ``aspect_loss_weight * MSE`` over rated aspects.
        Without aspects this is TRL's ``compute_loss`` unchanged."""

        aspect_loss_weight: float = 0.0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            targets = inputs.pop("aspect_targets", None)
            if targets is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            margin = {"margin": inputs.pop("margin")} if "margin" in inputs else {}
            outputs = model(**inputs, use_cache=False)
            logits = outputs.logits
            reward_only = SequenceClassifierOutput(logits=logits[:, :1])
            loss = super().compute_loss(lambda **_: reward_only, {**inputs, **margin}, False, num_items_in_batch)
            rated = ~torch.isnan(targets)
            if rated.any():
                err = (logits[:, 1:].float() - torch.nan_to_num(targets)) ** 2
                loss = loss + self.aspect_loss_weight * err[rated].mean()
            return (loss, outputs) if return_outputs else loss

    return AspectRewardTrainer


class _AspectCollator:
    """TRL's preference collator plus the aspect targets: ``[2B, K]`` (chosen rows, then rejected)."""

    def __init__(self, base):
        self.base = base

    def __call__(self, examples):
        import torch

        keys = ("chosen_ids", "rejected_ids", "margin")
        batch = self.base([{k: e[k] for k in keys if k in e} for e in examples])
        batch["aspect_targets"] = torch.tensor([e["aspects_chosen_t"] for e in examples]
                                               + [e["aspects_rejected_t"] for e in examples], dtype=torch.float32)
        return batch


# --------------------------------------------------------------------------------------------
# The recipe


def backbone_overrides(model_path: str, layers: int | None) -> dict:
    """Config overrides that load only the lowest ``layers`` blocks (the upper blocks' weights are
    simply not read); {} for the whole backbone."""
    if not layers:
        return {}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    total = config.num_hidden_layers
    if layers > total:
        raise ConfigError(f"backbone_layers: {layers}, but {model_path} has {total} blocks")
    overrides = {"num_hidden_layers": layers}
    if isinstance(getattr(config, "layer_types", None), list):  # per-block attention kinds (sliding/full)
        overrides["layer_types"] = config.layer_types[:layers]
    return overrides


def train(cfg: RewardTrainConfig, force: bool = False) -> dict:
    data = prepare_data(cfg)  # bad input fails here and leaves nothing behind

    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl import RewardConfig
    from trl.trainer.reward_trainer import DataCollatorForPreference, suppress_seqcls_warning

    model_path = resolve_model(cfg.model)
    backbone = backbone_overrides(model_path, cfg.backbone_layers)  # before any write: a bad size leaves nothing
    out = Path(cfg.output_dir)
    inputs = {**source_inputs(cfg.data), "eval_data": cfg.eval_data, "model": model_path}
    with stage_run("reward", out, to_dict(cfg), inputs, force) as run:
        if run.skipped:
            log.info("reward: already completed in %s (use --force to run again)", out)
            return run.previous
        run.clear_for_fresh_start("checkpoints", "initial_eval.json", "log_history.jsonl")  # forced, or another config or input

        tokenizer = load_tokenizer(model_path, cfg.trust_remote_code, padding_side="right")
        run.notes["text_format"] = use_text_format(tokenizer, data["standard"], cfg.standard_as_chat)
        use_margin = cfg.use_margin and data["with_margin"] > 0
        aspects = data["aspects"]
        train_rows, overlong_train = tokenize_pairs(data["train"], tokenizer, cfg, use_margin, aspects)
        eval_rows, overlong_eval = tokenize_pairs(data["eval"], tokenizer, cfg, use_margin, aspects)
        log_cleaning("reward", data["cleaning"], "pairs")
        run.notes.update({
            "format": data["format"], "n_pairs": data["n_pairs"], "cleaning": data["cleaning"], "dropped_pairs": data["dropped"],
            "split_sizes": {"train": len(data["train"]), "eval": len(data["eval"])},
            "overlength": {"policy": cfg.overlength, "max_length": cfg.max_length,
                           "train": overlong_train, "eval": overlong_eval},
            "pairs_used": {"train": len(train_rows), "eval": len(eval_rows)},
            "margin": {"used": use_margin, "pairs_with_margin": data["with_margin"],
                       "note": "pairs without a margin get 0" if use_margin else
                       ("use_margin=false" if cfg.use_margin is False else "no pair carries a margin: plain Bradley-Terry")},
            "aspects": aspects, "leakage": data["leakage"],
            **({"sources": data["sources"]} if data["sources"] else {}),
        })
        log.info("reward: %d pairs (%s) -> train %d, held out %d; longer than %d tokens: %d train, %d held out (%s)",
                 data["n_pairs"], data["format"], len(train_rows), len(eval_rows), cfg.max_length,
                 overlong_train, overlong_eval, "dropped" if cfg.overlength == "drop" else "truncated")
        if not train_rows:
            raise DataError(cfg.data, None, None, f"every training pair is longer than max_length={cfg.max_length} "
                                                  "tokens; raise max_length or set overlength=truncate")
        if is_main_process():  # the held-out pairs, for `alignkit reward eval`
            write_jsonl(out / "heldout_pairs.jsonl", data["eval"])
        run.add_output("heldout_pairs", out / "heldout_pairs.jsonl")

        bf16 = use_bf16(cfg.bf16)
        labels = ["reward"] + [f"aspect:{a}" for a in aspects]
        set_seed(cfg.seed)  # the new score head is initialised at random: seed it
        with suppress_seqcls_warning():
            model = AutoModelForSequenceClassification.from_pretrained(
                model_path, num_labels=len(labels), dtype=torch.bfloat16 if bf16 else torch.float32,
                trust_remote_code=cfg.trust_remote_code, **backbone)
        # (alignkit.models.match_tokenizer also sets a generation_config, which these models lack)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        if aspects:  # TRL refuses num_labels != 1; our compute_loss reads column 0 as the reward
            model.config.num_labels = 1
        run.notes["parameters"] = freeze_lower_layers(model, cfg.trainable_layers)
        peft_config = None
        if cfg.lora.enabled:
            # SEQ_CLS makes PEFT train the (new) score head fully, beside the adapters.
            peft_config = lora_config(cfg.lora, "SEQ_CLS")

        has_eval = bool(eval_rows)
        shared = trainer_arguments(cfg, out, bf16, even_eval_batch_size(len(eval_rows), cfg.batch_size))
        if not has_eval:  # eval_fraction=0 and no eval_data: nothing to evaluate on
            shared["eval_strategy"] = "no"
        args = RewardConfig(**shared, center_rewards_coefficient=cfg.center_rewards_coefficient,
                            remove_unused_columns=False)
        collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
        trainer = _make_trainer_class()(
            model=model, args=args, processing_class=tokenizer, peft_config=peft_config,
            data_collator=_AspectCollator(collator) if aspects else collator,
            train_dataset=Dataset.from_list(train_rows), eval_dataset=Dataset.from_list(eval_rows) if has_eval else None,
            callbacks=stage_callbacks(cfg, out, "reward"),
        )
        trainer.aspect_loss_weight = cfg.aspect_loss_weight
        # Our length policy ran first, so TRL's silent length filter must have dropped nothing.
        assert len(trainer.train_dataset) == len(train_rows), "TRL dropped pairs that alignkit did not count"
        if aspects:
            model.config.id2label = dict(enumerate(labels))
            model.config.label2id = {label: i for i, label in enumerate(labels)}

        cache = None
        if (cfg.cache_frozen_features and cfg.trainable_layers and peft_config is None
                and not trainer.accelerator.is_fsdp2  # the frozen blocks are sharded too: no cache
                and cfg.trainable_layers < model.config.num_hidden_layers):
            from alignkit.feature_cache import FrozenBlockCache

            cache = FrozenBlockCache(model, cfg.trainable_layers)
            seconds = cache.prefill([r[k] for r in train_rows + eval_rows for k in ("chosen_ids", "rejected_ids")],
                                    tokenizer.pad_token_id, batch_size=2 * cfg.batch_size)
            run.notes["feature_cache"] = {"sequences": len(cache.features), "prefill_s": round(seconds, 1)}
            log.info("reward: frozen blocks' features of %d sequences computed once in %.1f s", len(cache.features), seconds)
        with cache or contextlib.nullcontext():
            # Held-out accuracy before training, measured once (a resumed run reports the same figure).
            initial = evaluate_once(trainer, out / "initial_eval.json") if has_eval else {}
            result = train_from_last_checkpoint(trainer, run, "reward", merge_at_end=peft_config is not None)
            final = trainer.evaluate() if has_eval else {}
        del cache

        model_dir = out / "model"
        if peft_config is not None and not cfg.lora.merge:  # the adapters alone, beside the merged model
            save_trained_model(trainer, tokenizer, out / "adapter", merge=False, padding_side="right")
            run.add_output("adapter", out / "adapter")
        save_trained_model(trainer, tokenizer, model_dir, merge=peft_config is not None, padding_side="right")
        run.add_output("model", model_dir)
        run.add_output("checkpoints", out / "checkpoints")
        run.add_output("tensorboard", out / "tensorboard")
        run.metrics.update({
            "eval_accuracy_before": initial.get("eval_accuracy"), "eval_accuracy_after": final.get("eval_accuracy"),
            "eval_loss_before": initial.get("eval_loss"), "eval_loss_after": final.get("eval_loss"),
            "eval_mean_reward_gap_after": final.get("eval_margin"),
            "train_loss": result.training_loss, "global_step": result.global_step,
            "train_runtime_s": result.metrics.get("train_runtime"),
            "train_pairs_per_second": result.metrics.get("train_samples_per_second"),
        })
        if is_main_process():
            acc = final.get("eval_accuracy")
            print(f"reward: done. held-out accuracy {initial.get('eval_accuracy', float('nan')):.3f} -> "
                  f"{acc if acc is not None else float('nan'):.3f} on {len(eval_rows)} pairs\n"
                  f"  model:    {model_dir}\n  manifest: {out / 'manifest.json'}\n"
                  f"  next:     alignkit reward eval --config configs/reward_eval.yaml")
    return run.manifest("completed")
