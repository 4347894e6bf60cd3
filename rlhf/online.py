"""GRPO and RLOO stages: critic-free online RL on TRL's ``GRPOTrainer`` and ``RLOOTrainer``.

Both sample ``num_generations`` replies per prompt and score them with the same reward PPO uses
(:class:`alignkit.rlhf.ppo_models.Reward`: a reward model through the scoring API, its aspect heads
by ``aspect_weights``, or a rule); GRPO's advantage is the reward minus its group's mean (scaled by
the group's spread), RLOO's the reward minus the mean of the other replies to the same prompt. No
value model. The KL to the frozen reference weighs ``beta``. The rest is every TRL stage's:
manifest, checkpoints and resume, TensorBoard and trackers, several processes under
``accelerate launch``.

Launch: ``alignkit align grpo|rloo --config configs/grpo.yaml [KEY=VALUE ...]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.config import ConfigError, doc, to_dict
from alignkit.data import load_prompts
from alignkit.models import load_tokenizer, resolve_model
from alignkit.runstore import is_main_process, stage_run
from alignkit.training import (LoraOptions, TrainerConfig, freeze_lower_layers, lora_config, save_trained_model,
                               stage_callbacks, train_from_last_checkpoint, trainer_arguments, use_bf16)

log = logging.getLogger("alignkit.online")
METHODS = ("grpo", "rloo")


@dataclass
class OnlineRLConfig(TrainerConfig):
    """GRPO's and RLOO's keys: those of every TRL stage and the ones below."""

    model: str = doc("policy to align (and, frozen, the reference): the SFT stage's model directory", "runs/quickstart/sft/model")
    lora: LoraOptions = field(default_factory=LoraOptions, metadata={"help": "LoRA on the policy"})
    data: str = doc("prompts: an SFT run's train_prompts.jsonl or any prompt file alignkit.data.load_prompts reads",
                    "runs/quickstart/sft/train_prompts.jsonl")
    reward_model: str | None = doc("reward model directory (the reward stage's <run>/model); null with reward_function",
                                   "runs/quickstart/reward/model")
    aspect_weights: dict | None = doc("a multi-aspect reward model's heads combined into the reward, as in PPO "
                                      "({reward: 1.0, helpfulness: 0.5, ...}); null: the reward head", None)
    reward_function: str | None = doc("a rule reward instead: 'module:function' or 'file.py:function', "
                                      "f(prompts, responses) -> list[float]", None)
    num_generations: int = doc("replies sampled per prompt (the group each reply is compared with)", 4)
    batch_size: int = doc("replies per device per step (a multiple of num_generations)", 8)
    max_new_tokens: int = doc("stop a reply after this many tokens", 48)
    temperature: float = doc("sampling temperature", 1.0)
    beta: float = doc("weight of the KL to the reference (0: no reference model is loaded)", 0.05)
    max_steps: int = doc("optimiser steps", 10)
    learning_rate: float = doc("peak learning rate", 1e-5)
    lr_scheduler: str = doc("transformers scheduler name", "constant")
    warmup_ratio: float = doc("fraction of steps spent warming up the learning rate", 0.0)
    logging_steps: int = doc("log every N steps", 1)
    save_steps: int = doc("checkpoint every N steps", 5)
    output_dir: str = doc("this stage's run directory", "runs/quickstart/grpo")

    def __post_init__(self):
        super().__post_init__()
        if bool(self.reward_model) == bool(self.reward_function):
            raise ConfigError("grpo/rloo: set exactly one of reward_model and reward_function")
        if self.num_generations < 2:
            raise ConfigError("grpo/rloo: num_generations must be >= 2 (a reply is compared with its group)")
        if self.batch_size % self.num_generations:
            raise ConfigError(f"grpo/rloo: batch_size {self.batch_size} must be a multiple of num_generations "
                              f"{self.num_generations}")


def reward_function(cfg: OnlineRLConfig, device: str):
    """TRL's reward-function signature around PPO's reward (the scoring API or a rule)."""
    from types import SimpleNamespace

    from alignkit.rlhf.ppo_models import Reward

    reward = Reward(SimpleNamespace(reward_model=cfg.reward_model, reward_function=cfg.reward_function,
                                    aspect_weights=cfg.aspect_weights), device)

    def alignkit_reward(prompts, completions, **kwargs) -> list[float]:
        replies = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(x) for x in reward(list(prompts), replies)]

    return alignkit_reward


def train(cfg: OnlineRLConfig, method: str, force: bool = False) -> dict:
    if method not in METHODS:
        raise ConfigError(f"online RL method {method!r}: expected one of {', '.join(METHODS)}")
    prompts = load_prompts(cfg.data)  # bad input fails here, before anything is written
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    model_path = resolve_model(cfg.model)
    out = Path(cfg.output_dir)
    inputs = {"data": cfg.data, "model": model_path, "reward_model": cfg.reward_model}
    with stage_run(method, out, {**to_dict(cfg), "method": method}, inputs, force) as run:
        if run.skipped:
            log.info("%s: already completed in %s (use --force to run again)", method, out)
            return run.previous
        run.clear_for_fresh_start("checkpoints", "log_history.jsonl")
        tokenizer = load_tokenizer(model_path, cfg.trust_remote_code, padding_side="left")
        bf16 = use_bf16(cfg.bf16)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                     trust_remote_code=cfg.trust_remote_code)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
        run.notes["parameters"] = freeze_lower_layers(model, cfg.trainable_layers)
        peft_config = lora_config(cfg.lora, "CAUSAL_LM") if cfg.lora.enabled else None
        shared = trainer_arguments(cfg, out, bf16)
        for key in ("max_length", "eval_steps", "dataset_num_proc"):  # not GRPO/RLOO keys
            shared.pop(key)
        shared["eval_strategy"] = "no"
        common = dict(num_generations=cfg.num_generations, max_completion_length=cfg.max_new_tokens,
                      temperature=cfg.temperature, beta=cfg.beta, **shared)
        if method == "grpo":
            from trl import GRPOConfig as Config, GRPOTrainer as Trainer
        else:
            from trl import RLOOConfig as Config, RLOOTrainer as Trainer
        device = "cuda" if torch.cuda.is_available() else "cpu"
        trainer = Trainer(model=model, reward_funcs=[reward_function(cfg, device)], args=Config(**common),
                          train_dataset=Dataset.from_list([{"prompt": p["prompt"]} for p in prompts]),
                          processing_class=tokenizer, peft_config=peft_config,
                          callbacks=stage_callbacks(cfg, out, method))
        result = train_from_last_checkpoint(trainer, run, method, merge_at_end=peft_config is not None and cfg.lora.merge)
        model_dir = out / "model"
        save_trained_model(trainer, tokenizer, model_dir, merge=peft_config is not None and cfg.lora.merge)
        run.add_output("model", model_dir)
        run.add_output("checkpoints", out / "checkpoints")
        rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
        kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
        run.metrics.update({"reward_first": rewards[0] if rewards else None, "reward_last": rewards[-1] if rewards else None,
                            "kl_last": kls[-1] if kls else None, "global_step": result.global_step,
                            "train_runtime_s": result.metrics.get("train_runtime")})
        if is_main_process():
            print(f"{method}: done. reward {run.metrics['reward_first']} -> {run.metrics['reward_last']}\n"
                  f"  model:    {model_dir}\n  manifest: {out / 'manifest.json'}")
    return run.manifest("completed")


def train_grpo(cfg: OnlineRLConfig, force: bool = False) -> dict:
    return train(cfg, "grpo", force)


def train_rloo(cfg: OnlineRLConfig, force: bool = False) -> dict:
    return train(cfg, "rloo", force)
