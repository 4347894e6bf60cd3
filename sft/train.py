"""SFT stage: supervised fine-tuning on instruction data with TRL's SFTTrainer.

Reads like the stage: load and check the data, split it (train / validation / held-out prompts),
check held-out prompts for leakage, build the model (full, LoRA or QLoRA), measure validation loss,
train with checkpoints (resuming the last one), measure again, save the model and the manifest.

Launch: ``alignkit sft --config configs/sft.yaml [KEY=VALUE ...]``; on several processes:
``torchrun --nproc_per_node 2 -m alignkit.cli sft --config ...`` or ``accelerate launch``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.config import add_config_args, doc, load_config, to_dict
from alignkit.data import DEMO_DATA, check_leakage, load_prompts, load_sft_examples, prompt_text, seeded_split
from alignkit.models import DEFAULT_MODEL, load_tokenizer, match_tokenizer, resolve_model
from alignkit.runstore import atomic_write_json, is_main_process, stage_run, write_jsonl
from alignkit.training import (LoraOptions, evaluate_once, latest_checkpoint, lora_config, qlora_config, save_trained_model,
                               score_only_labelled_tokens_on_cpu, tensorboard_callback)

log = logging.getLogger("alignkit.sft")


@dataclass
class SFTStageConfig:
    model: str = doc("base model: a local dir, a Hub id, or offline:smollm2-135m-instruct", DEFAULT_MODEL)
    data: str = doc("instruction data: Alpaca JSON/JSONL, prompt/completion or messages JSONL, an HF dataset dir or Hub name; 'demo' is the shipped demo set", "demo")
    data_format: str = doc("auto, alpaca, prompt_completion or messages", "auto")
    on_bad_record: str = doc("a record with a missing/empty/mistyped field: 'error' stops, 'drop' skips it and counts it in the manifest", "error")
    output_dir: str = doc("this stage's run directory", "runs/quickstart/sft")
    seed: int = doc("seed for the split, initialisation of adapters and data order", 0)
    max_examples: int | None = doc("use only the first N examples (smoke runs)", None)
    val_fraction: float = doc("fraction of examples kept for validation loss", 0.1)
    heldout_fraction: float = doc("fraction of prompts held out for evaluation (never trained on)", 0.1)
    extra_heldout: str | None = doc("another prompt file to be checked for leakage into the training data", None)
    max_length: int = doc("truncate tokenised examples to this many tokens", 512)
    packing: bool = doc("pack several examples into one sequence of max_length tokens", False)
    completion_only_loss: bool = doc("compute the loss on the reply only, not on the prompt", True)
    lora: LoraOptions = field(default_factory=LoraOptions, metadata={"help": "LoRA options"})
    qlora: bool = doc("4-bit quantised base + LoRA (needs CUDA and bitsandbytes)", False)
    epochs: float = doc("passes over the training data", 1.0)
    max_steps: int = doc("stop after this many optimiser steps (-1: run the epochs)", -1)
    learning_rate: float = doc("peak learning rate", 2e-5)
    lr_scheduler: str = doc("transformers scheduler name", "cosine")
    warmup_ratio: float = doc("fraction of steps spent warming up the learning rate", 0.03)
    weight_decay: float = doc("AdamW weight decay", 0.0)
    batch_size: int = doc("examples per device per step", 4)
    grad_accum: int = doc("gradient accumulation steps", 1)
    eval_steps: int = doc("validate every N steps", 50)
    save_steps: int = doc("checkpoint every N steps (resume starts from the last one)", 50)
    save_total_limit: int = doc("checkpoints kept", 2)
    logging_steps: int = doc("log every N steps", 10)
    gradient_checkpointing: bool = doc("trade compute for memory", False)
    bf16: bool | None = doc("bf16 training; default: on for CUDA GPUs that support it, off on CPU", None)
    trust_remote_code: bool = doc("allow model code from the Hub (off unless you trust it)", False)
    record_seen_examples: bool = doc("write a hash of every example each rank trained on (for distributed checks)", False)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def prepare_data(cfg: SFTStageConfig) -> dict:
    """Load, check and split the data; nothing is written here, so bad input leaves no trace."""
    examples, dropped = load_sft_examples(cfg.data, cfg.data_format, on_bad_record=cfg.on_bad_record)
    if cfg.max_examples:
        examples = examples[: cfg.max_examples]
    splits = seeded_split(examples, {"train": 0, "validation": cfg.val_fraction, "heldout": cfg.heldout_fraction}, cfg.seed)
    if not splits["train"]:
        raise ValueError(f"{cfg.data}: too few examples ({len(examples)}) to train after the split")
    if not splits["validation"]:
        splits["validation"] = splits["train"][:1]
    train_prompts = [e["prompt"] for e in splits["train"]]
    leakage = {"heldout_split": check_leakage([e["prompt"] for e in splits["heldout"]], train_prompts)}
    if cfg.extra_heldout:
        leakage["extra_heldout"] = check_leakage([p["prompt"] for p in load_prompts(cfg.extra_heldout)], train_prompts)
    return {"splits": splits, "leakage": leakage, "n_examples": len(examples), "dropped": dropped}


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
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model_path = resolve_model(cfg.model)
    out = Path(cfg.output_dir)
    data_path = DEMO_DATA if cfg.data == "demo" else cfg.data
    with stage_run("sft", out, to_dict(cfg), {"data": data_path, "model": model_path, "extra_heldout": cfg.extra_heldout}, force) as run:
        if run.skipped:
            log.info("sft: already completed in %s (use --force to run again)", out)
            return run.previous
        if not run.resuming and is_main_process():
            # A fresh start (forced, or a changed config or input) must not pick up old checkpoints.
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            (out / "initial_eval.json").unlink(missing_ok=True)
        splits = data["splits"]
        if is_main_process():
            write_jsonl(out / "heldout_prompts.jsonl",
                        [{"id": f"heldout-{i}", "prompt": e["prompt"], "reference": e["completion"][0]["content"]}
                         for i, e in enumerate(splits["heldout"])])
            write_jsonl(out / "train_prompts.jsonl", [{"prompt": prompt_text(e["prompt"])} for e in splits["train"]])
        run.add_output("train_prompts", out / "train_prompts.jsonl")
        run.add_output("heldout_prompts", out / "heldout_prompts.jsonl")
        run.notes["leakage"] = data["leakage"]
        run.notes["split_sizes"] = {k: len(v) for k, v in splits.items()}
        run.notes["dropped_records"] = data["dropped"]
        leak = data["leakage"]["heldout_split"]
        log.info("sft: %d examples -> %s; held-out leakage: %d exact, %d normalised duplicates",
                 data["n_examples"], run.notes["split_sizes"], leak["exact_duplicates"], leak["normalized_duplicates"])

        cuda = torch.cuda.is_available()
        bf16 = cfg.bf16 if cfg.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
        dtype = torch.bfloat16 if bf16 else torch.float32
        tokenizer = load_tokenizer(model_path, cfg.trust_remote_code)
        quantization_config = None
        if cfg.qlora:
            quantization_config = qlora_config(dtype, "sft")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, quantization_config=quantization_config)
        match_tokenizer(model, tokenizer)
        peft_config = None
        if cfg.lora.enabled or cfg.qlora:
            peft_config = lora_config(cfg.lora, "CAUSAL_LM")

        args = SFTConfig(
            output_dir=str(out / "checkpoints"), seed=cfg.seed, data_seed=cfg.seed,
            num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
            lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
            per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum, eval_strategy="steps", eval_steps=cfg.eval_steps,
            save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
            logging_steps=cfg.logging_steps, report_to="none",  # TensorBoard: our callback below
            bf16=bf16, gradient_checkpointing=cfg.gradient_checkpointing, use_cpu=not cuda,
            max_length=cfg.max_length, packing=cfg.packing, completion_only_loss=cfg.completion_only_loss,
            dataset_num_proc=None, dataloader_num_workers=0, disable_tqdm=False,
        )
        score_only_labelled_tokens_on_cpu()
        trainer = SFTTrainer(
            model=model, args=args, processing_class=tokenizer, peft_config=peft_config,
            train_dataset=Dataset.from_list(splits["train"]), eval_dataset=Dataset.from_list(splits["validation"]),
            callbacks=[tensorboard_callback(out / "tensorboard")],
        )
        seen: list[str] = []
        if cfg.record_seen_examples:
            trainer.data_collator = _RecordingCollator(trainer.data_collator, trainer.model, seen)

        initial = evaluate_once(trainer, out / "initial_eval.json")  # a resumed run reports the same "before"
        resume_from = latest_checkpoint(out / "checkpoints")
        resume_from = str(resume_from) if resume_from else None
        if resume_from:
            log.info("sft: resuming from %s", resume_from)
            run.notes["resumed_from"] = resume_from
        result = trainer.train(resume_from_checkpoint=resume_from)
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
