"""The PPO stage's config: :class:`PPOConfig`, the shared training fields
(:class:`alignkit.training.TrainingConfig`) plus PPO's own, grouped as the recipe uses them; and
what follows from the config and the step alone (prompt order, learning-rate factor).

YAML files stay flat (``configs/ppo.yaml``); every key is listed by ``alignkit align ppo --help``
and in docs/alignment.md.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field

from alignkit.config import ConfigError, check_range, doc
from alignkit.rlhf.ppo_core import KL_KINDS
from alignkit.training import LoraOptions, TrainingConfig


@dataclass
class PPOConfig(TrainingConfig):
    """PPO's keys: the shared training keys (``TrainingConfig``, redeclared here only where PPO
    changes the default or the meaning) and PPO's own."""

    # shared fields, with PPO's defaults and meaning
    model: str = doc("policy to align: the SFT stage's model directory, or any causal LM", "runs/quickstart/sft/model")
    lora: LoraOptions = field(default_factory=LoraOptions,
                              metadata={"help": "LoRA on the policy (the reference is then the policy with its adapter disabled)"})
    trainable_layers: int | None = doc("train only the top N transformer blocks of the policy and of the value model "
                                       "(embeddings and lower blocks frozen): less compute per update; null = all "
                                       "(not with lora)", None)
    cache_frozen_features: bool = doc("with trainable_layers: run the frozen lower blocks once per sampled sequence "
                                      "and step, shared by the policy, the reference and (when it starts from the same "
                                      "weights) the value model, instead of once per forward pass (exact)", True)
    bf16: bool | None = doc("bf16 autocast; default: on for CUDA GPUs that support it, off on CPU", None)
    output_dir: str = doc("this stage's run directory", "runs/quickstart/ppo")
    seed: int = doc("seed for initialisation, prompt order, minibatch shuffles and sampling", 0)
    learning_rate: float = doc("policy learning rate (AdamW)", 3e-6)
    save_steps: int = doc("checkpoint every N steps (a rerun resumes from the last one)", 20)
    # inputs
    reward_model: str | None = doc(
        "reward model directory (the reward stage's <run>/model), scored with alignkit.scoring.RewardScorer; "
        "set to null when reward_function is used", "runs/quickstart/reward/model")
    aspect_weights: dict | None = doc(
        "a multi-aspect reward model's heads combined into PPO's score: {reward: 1.0, helpfulness: 0.5, ...} "
        "(aspect heads predict the 1..5 ratings scaled to -1..1; 5 is always the good end; unnamed heads weigh 0); "
        "null: the reward head alone", None)
    reward_function: str | None = doc(
        "a rule reward instead of a reward model: 'module:function' or 'path/file.py:function', called as "
        "f(prompts: list[str], responses: list[str]) -> list[float] (see rlhf/rule_rewards.py)", None)
    value_model: str | None = doc(
        "initialises the value model (a sequence-classification model; its score head is applied per token); "
        "default: reward_model, or, with a rule reward, the policy with a freshly initialised head", None)
    prompts: str = doc("prompt file (any format alignkit.data.load_prompts reads), e.g. the SFT stage's "
                       "train_prompts.jsonl", "runs/quickstart/sft/train_prompts.jsonl")
    prompt_field: str | None = doc("field holding the prompt when it is not prompt/instruction/turns/question/text", None)
    max_prompts: int | None = doc("use only the first N prompts (smoke runs)", None)
    # schedule
    total_steps: int = doc("PPO steps (one step = rollout + ppo_epochs of updates)", 100)
    rollout_batch_size: int = doc("prompts sampled per rank per step (global batch = this x processes)", 8)
    mini_batch_size: int = doc("samples per rank per optimiser step; must divide rollout_batch_size", 4)
    grad_accum: int = doc("micro-batches per minibatch (gradient accumulation); must divide mini_batch_size", 1)
    ppo_epochs: int = doc("passes over each rollout batch", 2)
    value_learning_rate: float | None = doc("value model learning rate; default: learning_rate", None)
    lr_schedule: str = doc("'constant' or 'linear' (decay to 0 at total_steps); stepped once per PPO step", "constant")
    warmup_steps: int = doc("PPO steps of linear learning-rate warm-up", 0)
    adam_eps: float = doc("AdamW epsilon (1e-5 as in N+ details)", 1e-5)
    max_grad_norm: float = doc("clip each model's gradient norm to this", 1.0)
    # generation
    max_prompt_length: int = doc("prompts longer than this many tokens keep their last tokens", 256)
    max_new_tokens: int = doc("reply length limit; a reply cut here gets the missing-EOS penalty", 64)
    temperature: float = doc("sampling temperature (log-probs are computed with the same temperature)", 1.0)
    top_k: int = doc("sample from the k most likely tokens (0: off)", 0)
    top_p: float = doc("nucleus sampling mass (1.0: off)", 1.0)
    generation_batch_size: int | None = doc("prompts per generate() call; default: the whole rollout batch", None)
    forward_batch_size: int | None = doc("sequences per no-grad forward pass (log-probs, values); default: all", None)
    # rewards
    kl_coef: float = doc("beta: weight of the per-token KL penalty (initial value when adaptive)", 0.05)
    adaptive_kl: bool = doc("adapt beta towards kl_target (Ziegler et al. 2019) instead of keeping it fixed", False)
    kl_target: float = doc("adaptive KL: target KL per sequence (nats)", 6.0)
    kl_horizon: float = doc("adaptive KL: horizon in samples (larger = slower adaptation)", 10000.0)
    kl_estimator: str = doc("per-token KL estimator in the reward: k1 (log-ratio, InstructGPT), k3, abs or mse", "k1")
    missing_eos_penalty: float | None = doc(
        "subtracted from the score of a reply that never produced an EOS (null: no penalty)", 1.0)
    missing_eos_replace: bool = doc("replace such a score by -missing_eos_penalty instead of subtracting", False)
    whiten_rewards: bool = doc("scale per-token rewards to unit variance (mean kept) before GAE", False)
    # PPO
    gamma: float = doc("discount factor (1.0: none, usual for RLHF)", 1.0)
    lam: float = doc("GAE lambda", 0.95)
    clip_range: float = doc("policy ratio clip epsilon", 0.2)
    clip_range_value: float | None = doc("value clip epsilon around the rollout's values (null: no clipping)", 0.2)
    vf_coef: float = doc("weight of the value loss in the total loss", 0.1)
    whiten_advantages: bool = doc("normalise advantages per rollout batch (per rank)", True)

    def check(self) -> None:
        """What ``__post_init__`` leaves unchecked; called before anything is written."""
        check_range(self, 1, "total_steps", "rollout_batch_size", "mini_batch_size", "grad_accum", "ppo_epochs",
                    "max_new_tokens", "max_prompt_length", "generation_batch_size", "forward_batch_size")
        check_range(self, 0, "warmup_steps", "kl_coef", "top_k", "vf_coef")
        if (self.reward_model is None) == (self.reward_function is None):
            raise ConfigError("ppo: set exactly one of reward_model and reward_function")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ConfigError(f"ppo: mini_batch_size {self.mini_batch_size} must divide rollout_batch_size {self.rollout_batch_size}")
        if self.mini_batch_size % self.grad_accum:
            raise ConfigError(f"ppo: grad_accum {self.grad_accum} must divide mini_batch_size {self.mini_batch_size}")
        if self.temperature <= 0:
            raise ConfigError("ppo: temperature must be > 0 (PPO needs a sampling policy)")
        if self.kl_estimator not in KL_KINDS:
            raise ConfigError(f"ppo: kl_estimator must be one of {', '.join(KL_KINDS)}")
        if self.lr_schedule not in ("constant", "linear"):
            raise ConfigError("ppo: lr_schedule must be 'constant' or 'linear'")
        if self.total_steps < 1 or self.save_steps < 1 or self.ppo_epochs < 1:
            raise ConfigError("ppo: total_steps, save_steps and ppo_epochs must be >= 1")


# --------------------------------------------------------------------------------------------
# Prompt order and learning-rate schedule: pure functions of the config and the step


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return tuple(order)


def prompts_for_step(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Indices of the prompts a rank uses at ``step`` (1-based): a stream of seeded shuffles of its
    shard, one per epoch. Stateless, so a resumed run picks the same prompts."""
    return [_epoch_order(n, seed, pos // n)[pos % n] for pos in range((step - 1) * batch, step * batch)]


def lr_factor_of(cfg: PPOConfig):
    """The learning-rate multiplier as a function of the PPO steps done (a plain function, so
    ``LambdaLR`` keeps it out of its state dict)."""
    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        decay = 1.0 - step / cfg.total_steps if cfg.lr_schedule == "linear" else 1.0
        return warm * max(decay, 0.0)

    return lr_factor
