"""SFT stage: supervised fine-tuning on instruction data with TRL's SFTTrainer.

Reads like the stage: load and check the data, split it (train / validation / held-out prompts),
check held-out prompts for leakage, build the model (full, top blocks only, LoRA or QLoRA), measure
validation loss, train with checkpoints (resuming the last one), measure again, save the model and
the manifest.

Launch: ``alignkit sft --config configs/sft.yaml [KEY=VALUE ...]``; on several processes:
``torchrun --nproc_per_node 2 -m alignkit.cli sft --config ...`` or ``accelerate launch``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from alignkit.config import ConfigError, add_config_args, check_range, doc, load_config, to_dict
from alignkit.data import DEMO_DATA, DataError, check_leakage, load_prompts, load_sft_examples, prompt_text, seeded_split
from alignkit.cleaning import clean_for_stage, log_cleaning
from alignkit.models import DEFAULT_MODEL, load_tokenizer, match_tokenizer, resolve_model, use_text_format
from alignkit.runstore import atomic_write_json, is_main_process, stage_run, write_jsonl
from alignkit.training import (TrainerConfig, evaluate_once, freeze_lower_layers, lora_config, qlora_config,
                               save_trained_model, score_only_labelled_tokens_on_cpu, stage_callbacks,
                               train_from_last_checkpoint, trainer_arguments, use_bf16)

log = logging.getLogger("alignkit.sft")


@dataclass
class SFTStageConfig(TrainerConfig):
    """The SFT stage's keys: those of every TRL stage (:class:`TrainerConfig`) and its own below."""

    # model (the shared model key, with SFT's default: the base model, not an SFT run's)
    model: str = doc("base model: a local dir, a Hub id, or offline:smollm2-135m-instruct", DEFAULT_MODEL)
    qlora: bool = doc("4-bit quantised base + LoRA (needs CUDA and bitsandbytes)", False)
    # data
    data: str = doc("instruction data: Alpaca JSON/JSONL, prompt/completion or messages JSONL, plain {text} JSONL (language modelling), an HF dataset dir or Hub name; 'demo' is the shipped demo set", "demo")
    data_format: str = doc("auto, alpaca, prompt_completion, messages or text", "auto")
    on_bad_record: str = doc("a record with a missing/empty/mistyped field: 'error' stops, 'drop' skips it and counts it in the manifest", "error")
    max_examples: int | None = doc("use only the first N examples (smoke runs)", None)
    # split
    # (records with a "split" field -- train, validation or test -- are split by it instead; the demo's are)
    val_fraction: float = doc("fraction of examples kept for validation (loss, and every choice of settings)", 0.1)
    heldout_fraction: float = doc("fraction of prompts held out as the test set: read only by the final evaluation", 0.1)
    extra_heldout: str | None = doc("another prompt file to be checked for leakage into the training data", None)
    # loss
    packing: bool | None = doc("lay the examples of a batch end to end in one row, without padding (TRL's padding-free "
                               "best-fit packing); pays only with a variable-length attention kernel: null = on with "
                               "attn_implementation flash_attention_2/3, off otherwise (docs/foundation.md, Packing)", None)
    attn_implementation: str | None = doc("transformers attention kernel: sdpa, eager, flash_attention_2 (CUDA, needs "
                                          "flash-attn), flex_attention ...; null = transformers' default (sdpa)", None)
    completion_only_loss: bool = doc("compute the loss on the reply only, not on the prompt", True)
    # run
    output_dir: str = doc("this stage's run directory", "runs/quickstart/sft")
    record_seen_examples: bool = doc("write a hash of every example each rank trained on (for distributed checks)", False)

    def __post_init__(self):
        super().__post_init__()
        check_range(self, 0, "val_fraction", "heldout_fraction", high=1)
        if self.val_fraction + self.heldout_fraction >= 1:
            raise ConfigError(f"val_fraction + heldout_fraction must leave examples to train on, got "
                              f"{self.val_fraction} + {self.heldout_fraction}")
        check_range(self, 1, "max_examples")
        if self.trainable_layers is not None and self.qlora:
            raise ConfigError("sft: trainable_layers and qlora are alternatives (both limit what trains): set one")


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def prepare_data(cfg: SFTStageConfig) -> dict:
    """Load, check and split the data; nothing is written here, so bad input leaves no trace."""
    examples, dropped = load_sft_examples(cfg.data, cfg.data_format, on_bad_record=cfg.on_bad_record)
    examples, cleaning = clean_for_stage(examples, "sft", cfg.clean, cfg.near_duplicate_threshold)
    if cfg.max_examples:
        examples = examples[: cfg.max_examples]
    splits, split_source = split_examples(examples, cfg)
    if not splits["train"]:
        raise ValueError(f"{cfg.data}: too few examples ({len(examples)}) to train after the split")
    if not splits["validation"]:
        splits["validation"] = splits["train"][:1]
    if len({"text" in e for e in examples}) > 1:
        raise DataError(cfg.data, None, "text", "plain-text records (language modelling) and prompt/completion "
                                                "records are mixed: give one kind per data set")
    standard = sum("standard" in e for e in examples)
    if 0 < standard < len(examples) and not cfg.standard_as_chat:
        raise DataError(cfg.data, None, "prompt", f"{standard} of {len(examples)} records are standard (plain-string "
                                                  "prompt and completion), the rest conversational: give one kind per data set, "
                                                  "or set standard_as_chat=true to put all in the chat template")
    train_prompts = [e.get("prompt") or e["text"] for e in splits["train"]]  # text: the whole text is checked
    leakage = {"heldout_split": check_leakage([e.get("prompt") or e["text"] for e in splits["heldout"]], train_prompts)}
    if cfg.extra_heldout:
        leakage["extra_heldout"] = check_leakage([p["prompt"] for p in load_prompts(cfg.extra_heldout)], train_prompts)
    return {"splits": splits, "split_source": split_source, "leakage": leakage, "n_examples": len(examples),
            "dropped": dropped, "standard": standard == len(examples), "cleaning": cleaning}


def split_examples(examples: list[dict], cfg: SFTStageConfig) -> tuple[dict[str, list[dict]], str]:
    """Train / validation / held-out (test) examples, and where the split came from: the records'
    own ``split`` field when they carry one (the demo data: whole topics held out), else a seeded
    random cut by ``val_fraction`` and ``heldout_fraction``."""
    marked = sum("split" in e for e in examples)
    if not marked:
        return seeded_split(examples, {"train": 0, "validation": cfg.val_fraction,
                                       "heldout": cfg.heldout_fraction}, cfg.seed), "random"
    if marked < len(examples):
        raise DataError(cfg.data, None, "split", f"{marked} of {len(examples)} records carry a split field: "
                                                 "give every record one (train, validation or test) or none")
    by_name = {"train": "train", "validation": "validation", "heldout": "test"}
    return {name: [e for e in examples if e["split"] == own] for name, own in by_name.items()}, "data"


def prompt_records(examples: list[dict], prefix: str) -> list[dict]:
    """Evaluation prompt records: id, prompt, reference answer, and the example's slice and
    constraint when it has them. Plain-text (language modelling) examples have no prompt: none."""
    return [{"id": f"{prefix}-{i}", "prompt": e["prompt"], "reference": e["completion"][0]["content"],
             **{k: e[k] for k in ("slice", "constraint") if k in e}}
            for i, e in enumerate(examples) if "prompt" in e]


def use_packing(setting: bool | None, attention: str) -> bool:
    """``packing`` resolved for the model's attention kernel: None means on with a variable-length
    kernel (flash attention), off otherwise. Packing on a dense kernel (sdpa, eager) is honoured,
    with a warning: the packed row gets a block-diagonal mask over its whole length, so attention
    costs grow with the square of the row instead of each example's."""
    varlen = "flash" in attention  # flash_attention_2/3, and the Hub's flash kernels
    if setting is None:
        return varlen
    if setting and not varlen:
        log.warning("sft: packing with attention %r: a packed row is attended with a dense block-diagonal mask, which "
                    "can cost more than the padding it saves (on CPU it trained slower than padded batches); packing "
                    "pays with attn_implementation=flash_attention_2 on CUDA (docs/foundation.md, Packing)", attention)
    return setting


def _messages_only(examples: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([{"text": e["text"]} if "text" in e else {"prompt": e["prompt"], "completion": e["completion"]}
                              for e in examples])


class _RecordingCollator:
    """Wraps the collator to remember which examples this rank trained on (not evaluated on)."""

    def __init__(self, collator, model, sink: list):
        self.collator, self.model, self.sink = collator, model, sink

    def __call__(self, features):
        if self.model.training:
            self.sink.extend(_sha(f["input_ids"]) for f in features)
        return self.collator(features)


def train(cfg: SFTStageConfig, force: bool = False) -> dict:
    data = prepare_data(cfg)  # before any heavy import or write: bad input fails fast and leaves nothing

    import torch
    from trl import SFTConfig, SFTTrainer

    model_path = resolve_model(cfg.model)
    out = Path(cfg.output_dir)
    data_path = DEMO_DATA if cfg.data == "demo" else cfg.data
    with stage_run("sft", out, to_dict(cfg), {"data": data_path, "model": model_path, "extra_heldout": cfg.extra_heldout}, force) as run:
        if run.skipped:
            log.info("sft: already completed in %s (use --force to run again)", out)
            return run.previous
        run.clear_for_fresh_start("checkpoints", "initial_eval.json", "log_history.jsonl")  # forced, or another config or input
        splits = data["splits"]
        if is_main_process():
            write_jsonl(out / "heldout_prompts.jsonl", prompt_records(splits["heldout"], "heldout"))
            write_jsonl(out / "validation_prompts.jsonl", prompt_records(splits["validation"], "validation"))
            write_jsonl(out / "train_prompts.jsonl", [{"prompt": prompt_text(e["prompt"]),
                                                       **({"constraint": e["constraint"]} if "constraint" in e else {})}
                                                      for e in splits["train"] if "prompt" in e])
        for name in ("train", "validation", "heldout"):
            run.add_output(f"{name}_prompts", out / f"{name}_prompts.jsonl")
        run.notes["split_source"] = data["split_source"]
        run.notes["leakage"] = data["leakage"]
        run.notes["split_sizes"] = {k: len(v) for k, v in splits.items()}
        run.notes["dropped_records"] = data["dropped"]
        run.notes["cleaning"] = data["cleaning"]
        log_cleaning("sft", data["cleaning"])
        leak = data["leakage"]["heldout_split"]
        log.info("sft: %d examples -> %s; held-out leakage: %d exact, %d normalised duplicates",
                 data["n_examples"], run.notes["split_sizes"], leak["exact_duplicates"], leak["normalized_duplicates"])

        bf16 = use_bf16(cfg.bf16)
        dtype = torch.bfloat16 if bf16 else torch.float32
        tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
        run.notes["text_format"] = use_text_format(tokenizer, data["standard"], cfg.standard_as_chat)
        quantization_config = None
        if cfg.qlora:
            quantization_config = qlora_config(dtype, "sft")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, quantization_config=quantization_config,
            **({"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}))
        run.notes["packing"] = packing = use_packing(cfg.packing, model.config._attn_implementation)
        match_tokenizer(model, tokenizer)
        if cfg.trainable_layers is not None:  # (never with LoRA: these counts precede PEFT's wrapping)
            run.notes["parameters"] = freeze_lower_layers(model, cfg.trainable_layers)
        peft_config = None
        if cfg.lora.enabled or cfg.qlora:
            peft_config = lora_config(cfg.lora, "CAUSAL_LM")

        args = SFTConfig(**trainer_arguments(cfg, out, bf16), packing=packing,
                         completion_only_loss=cfg.completion_only_loss, disable_tqdm=False)
        score_only_labelled_tokens_on_cpu()
        trainer = SFTTrainer(
            model=model, args=args, processing_class=tokenizer, peft_config=peft_config,
            train_dataset=_messages_only(splits["train"]), eval_dataset=_messages_only(splits["validation"]),
            callbacks=stage_callbacks(cfg, out, "sft"),
        )
        seen: list[str] = []
        if cfg.record_seen_examples:
            trainer.data_collator = _RecordingCollator(trainer.data_collator, trainer.model, seen)

        initial = evaluate_once(trainer, out / "initial_eval.json")  # a resumed run reports the same "before"
        result = train_from_last_checkpoint(trainer, run, "sft", merge_at_end=cfg.lora.merge and peft_config is not None)
        if cfg.record_seen_examples:
            atomic_write_json(out / f"seen_examples_rank{os.environ.get('RANK', '0')}.json", seen)
        final = trainer.evaluate()

        model_dir = out / "model"
        save_trained_model(trainer, tokenizer, model_dir, merge=cfg.lora.merge and peft_config is not None)
        run.add_output("model", model_dir)
        run.add_output("checkpoints", out / "checkpoints")
        run.add_output("tensorboard", out / "tensorboard")
        logged_tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h]
        run.metrics.update({
            "train_tokens": logged_tokens[-1] if logged_tokens else None,
            "train_tokens_per_second": (logged_tokens[-1] / result.metrics["train_runtime"]
                                        if logged_tokens and result.metrics.get("train_runtime") else None),
            "eval_loss_before": initial.get("eval_loss"), "eval_loss_after": final.get("eval_loss"),
            "train_loss": result.training_loss, "global_step": result.global_step,
            "train_runtime_s": result.metrics.get("train_runtime"),
            "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        })
        if is_main_process():
            print(f"sft: done. eval loss {initial.get('eval_loss'):.4f} -> {final.get('eval_loss'):.4f}\n"
                  f"  model:    {model_dir}\n  manifest: {out / 'manifest.json'}")
    return run.manifest("completed")


def _handler(args) -> int:
    cfg = load_config(SFTStageConfig, args.config, args.overrides)
    train(cfg, force=args.force)
    return 0


def configure_cli(p) -> None:
    p.description = ("Supervised fine-tuning (full, LoRA or QLoRA) with TRL's SFTTrainer. An interrupted run "
                     "resumes from its last checkpoint when run again; a completed one is skipped.")
    add_config_args(p, SFTStageConfig, "configs/sft.yaml")
    p.set_defaults(func=_handler)
