"""PPO stage: align the SFT policy against a reward model (or a rule reward) with our own PPO.

One recipe, top to bottom, on torch + transformers + accelerate (TRL no longer ships PPO). The math
lives in :mod:`alignkit.rlhf.ppo_core` (tested by hand); this file is the loop around it. Each PPO step:

1. **Rollout.** Take this rank's next ``rollout_batch_size`` prompts, left-pad them and sample
   replies in one batched ``generate`` call (temperature, top-k/top-p, ``max_new_tokens``).
   Everything after the first EOS is masked out.
2. **Score.** The reward model (``alignkit.scoring.RewardScorer``) or the rule reward scores each
   (prompt, reply); replies that never produced an EOS are penalised.
3. **Evaluate the rollout** without gradients: log-probs of the sampled tokens under the policy
   (the "old" log-probs) and under the frozen reference, per-token values from the value model.
4. **Rewards and advantages.** ``r_t = -beta * KL_t`` per token plus the score on the last token
   (InstructGPT); GAE; advantages whitened.
5. **Update.** ``ppo_epochs`` passes over shuffled minibatches (gradient accumulation inside a
   minibatch): clipped policy loss + ``vf_coef`` * clipped value loss; gradients clipped.
6. **Bookkeeping.** Adapt the KL coefficient (if adaptive), reduce metrics across ranks, log them
   (``metrics.jsonl`` + TensorBoard), checkpoint every ``save_steps``.

Models: the policy (full or LoRA); a frozen reference (a second copy, or with LoRA the same model
with its adapter disabled); a value model initialised from the reward model (a
sequence-classification model whose score head is applied to every token's hidden state); the
frozen reward model or rule. Dropout is switched off everywhere (N+ details): with dropout the
"old" log-probs would not be those of the policy that sampled.

Reproducibility and resume: prompt order and minibatch shuffles are pure functions of (seed, step,
rank); sampling uses the global RNGs, whose states (python, numpy, torch, per rank) are saved in
every checkpoint with the weights, both optimisers, schedulers, the KL controller and the step. A
killed run started again with the same command continues from its last checkpoint and produces the
same next-step metrics as a run that was never interrupted.

Launch: ``alignkit align ppo --config configs/ppo.yaml [KEY=VALUE ...]``; several processes:
``torchrun --nproc_per_node 2 -m alignkit.cli align ppo --config ...`` (each rank its own shard of
prompts; metrics are averaged across ranks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignkit.config import doc, to_dict
from alignkit.data import load_prompts, prompt_text
from alignkit.models import load_tokenizer, match_tokenizer, resolve_model
from alignkit.rewards import load_reward_function
from alignkit.runstore import atomic_write_text, stage_run
from alignkit.training import LoraOptions, freeze_lower_layers, lora_config, save_model_atomically
from alignkit.rlhf import ppo_core as core

log = logging.getLogger("alignkit.ppo")


# --------------------------------------------------------------------------------------------
# Config


@dataclass
class PPOConfig:
    # inputs and outputs
    policy: str = doc("policy to align: the SFT stage's model directory, or any causal LM", "runs/quickstart/sft/model")
    reward_model: str | None = doc(
        "reward model directory (the reward stage's <run>/model), scored with alignkit.scoring.RewardScorer; "
        "set to null when reward_function is used", "runs/quickstart/reward/model")
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
    output_dir: str = doc("this stage's run directory", "runs/quickstart/ppo")
    seed: int = doc("seed for initialisation, prompt order, minibatch shuffles and sampling", 0)
    # schedule
    total_steps: int = doc("PPO steps (one step = rollout + ppo_epochs of updates)", 100)
    rollout_batch_size: int = doc("prompts sampled per rank per step (global batch = this x processes)", 8)
    mini_batch_size: int = doc("samples per rank per optimiser step; must divide rollout_batch_size", 4)
    grad_accum: int = doc("micro-batches per minibatch (gradient accumulation); must divide mini_batch_size", 1)
    ppo_epochs: int = doc("passes over each rollout batch", 2)
    learning_rate: float = doc("policy learning rate (AdamW)", 3e-6)
    value_learning_rate: float | None = doc("value model learning rate; default: learning_rate", None)
    lr_schedule: str = doc("'constant' or 'linear' (decay to 0 at total_steps); stepped once per PPO step", "constant")
    warmup_steps: int = doc("PPO steps of linear learning-rate warm-up", 0)
    weight_decay: float = doc("AdamW weight decay", 0.0)
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
    # models and infrastructure
    lora: LoraOptions = field(default_factory=LoraOptions,
                              metadata={"help": "LoRA on the policy (the reference is then the policy with its adapter disabled)"})
    trainable_layers: int | None = doc("train only the top N transformer blocks of the policy and of the value model "
                                       "(embeddings and lower blocks frozen): less compute per update; null = all "
                                       "(not with lora)", None)
    gradient_checkpointing: bool = doc("trade compute for memory in the training forward passes", False)
    bf16: bool | None = doc("bf16 autocast; default: on for CUDA GPUs that support it, off on CPU", None)
    save_steps: int = doc("checkpoint every N steps (a rerun resumes from the last one)", 20)
    keep_checkpoints: int = doc("checkpoints kept on disk", 2)
    tensorboard: bool = doc("also write metrics to <output_dir>/tensorboard", True)
    trust_remote_code: bool = doc("allow model code from the Hub (off unless you trust it)", False)

    def check(self) -> None:
        from alignkit.config import ConfigError

        if (self.reward_model is None) == (self.reward_function is None):
            raise ConfigError("ppo: set exactly one of reward_model and reward_function")
        if self.rollout_batch_size % self.mini_batch_size:
            raise ConfigError(f"ppo: mini_batch_size {self.mini_batch_size} must divide rollout_batch_size {self.rollout_batch_size}")
        if self.mini_batch_size % self.grad_accum:
            raise ConfigError(f"ppo: grad_accum {self.grad_accum} must divide mini_batch_size {self.mini_batch_size}")
        if self.temperature <= 0:
            raise ConfigError("ppo: temperature must be > 0 (PPO needs a sampling policy)")
        if self.kl_estimator not in core.KL_KINDS:
            raise ConfigError(f"ppo: kl_estimator must be one of {', '.join(core.KL_KINDS)}")
        if self.lr_schedule not in ("constant", "linear"):
            raise ConfigError("ppo: lr_schedule must be 'constant' or 'linear'")
        if self.total_steps < 1 or self.save_steps < 1 or self.ppo_epochs < 1:
            raise ConfigError("ppo: total_steps, save_steps and ppo_epochs must be >= 1")
        if self.trainable_layers is not None and self.lora.enabled:
            raise ConfigError("ppo: trainable_layers and lora are alternatives (both limit what trains): set one")


# --------------------------------------------------------------------------------------------
# Inputs: prompts and the reward


class Reward:
    """Scores (prompt, reply) pairs with a reward model or a rule; returns a float tensor ``[B]``."""

    def __init__(self, cfg: PPOConfig, device):
        self.rule = load_reward_function(cfg.reward_function) if cfg.reward_function else None
        self.scorer = None
        if cfg.reward_model:
            from alignkit.scoring import RewardScorer

            self.scorer = RewardScorer(resolve_model(cfg.reward_model), device=str(device))

    def __call__(self, prompts: list[list[dict]], replies: list[str]) -> torch.Tensor:
        if self.rule is not None:
            scores = self.rule([prompt_text(p) for p in prompts], replies)
        else:
            scores = self.scorer.score(prompts, replies)
        scores = torch.tensor([float(s) for s in scores], dtype=torch.float32)
        if scores.shape != (len(replies),) or not torch.isfinite(scores).all():
            raise ValueError(f"reward: expected {len(replies)} finite scores, got {scores.tolist()}")
        return scores


def encode_prompts(tokenizer, prompts: list[dict], max_len: int) -> list[list[int]]:
    """Chat-template each prompt with the assistant turn opened; keep the last ``max_len`` tokens."""
    out = []
    for p in prompts:
        text = tokenizer.apply_chat_template(p["prompt"], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(ids[-max_len:])
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return tuple(order)


def prompts_for_step(n: int, batch: int, step: int, seed: int) -> list[int]:
    """Indices of the prompts a rank uses at ``step`` (1-based): a stream of seeded shuffles of its
    shard, one per epoch. Stateless, so a resumed run picks the same prompts."""
    return [_epoch_order(n, seed, pos // n)[pos % n] for pos in range((step - 1) * batch, step * batch)]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


# --------------------------------------------------------------------------------------------
# Models


class TokenValueModel(torch.nn.Module):
    """A sequence-classification model read at every token: ``V_t = score_head(h_t)[0]``.

    Initialised from the reward model, the value of a state starts out as the reward model's
    judgement of the text so far (InstructGPT, N+ details). Only ``self.model`` is registered, so
    ``state_dict`` keys are those of the underlying model.
    """

    def __init__(self, seq_cls_model):
        super().__init__()
        self.model = seq_cls_model
        head_name = next((n for n in ("score", "classifier", "v_head") if hasattr(seq_cls_model, n)), None)
        if head_name is None:
            raise ValueError(f"{type(seq_cls_model).__name__}: no score/classifier head to use as a value head")
        self.head_name = head_name

    def forward(self, input_ids, attention_mask, position_ids):
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        return getattr(self.model, self.head_name)(hidden)[..., 0].float()


def disable_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def build_models(cfg: PPOConfig, policy_path: str, value_path: str, tokenizer, dtype):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kw = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    policy = AutoModelForCausalLM.from_pretrained(policy_path, **kw)
    match_tokenizer(policy, tokenizer)
    ref = None
    if cfg.lora.enabled:
        from peft import get_peft_model

        if cfg.lora.dropout:
            log.info("ppo: lora.dropout=%s is not used: dropout stays off in PPO (see the module docstring)", cfg.lora.dropout)
        policy = get_peft_model(policy, lora_config(dataclasses.replace(cfg.lora, dropout=0.0), "CAUSAL_LM"))
    else:
        ref = AutoModelForCausalLM.from_pretrained(policy_path, **kw)
        match_tokenizer(ref, tokenizer)
        ref.requires_grad_(False).eval()
    num_labels = {} if _is_seq_cls(value_path) else {"num_labels": 1}
    value = AutoModelForSequenceClassification.from_pretrained(value_path, **kw, **num_labels)
    if value.get_input_embeddings().num_embeddings < len(tokenizer):
        value.resize_token_embeddings(len(tokenizer))
    value.config.pad_token_id = tokenizer.pad_token_id
    _check_same_vocab(value_path, tokenizer)
    freeze_lower_layers(policy, cfg.trainable_layers)
    freeze_lower_layers(value, cfg.trainable_layers)
    for m in (policy, value, ref):
        if m is not None:
            disable_dropout(m)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        value.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:
            policy.enable_input_require_grads()
    return policy, ref, TokenValueModel(value)


def _is_seq_cls(path: str) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return False
    archs = json.loads(cfg.read_text()).get("architectures") or []
    return any("SequenceClassification" in a for a in archs)


def _check_same_vocab(value_path: str, tokenizer) -> None:
    """The value model reads the policy's tokens: its tokenizer must be the policy's."""
    if not (Path(value_path) / "tokenizer_config.json").exists():
        return
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(value_path)
    mine = tokenizer.get_vocab()
    if any(mine.get(t) != i for t, i in other.get_vocab().items()):
        raise ValueError(f"value model {value_path}: its tokenizer differs from the policy's; initialise the value "
                         "model from a reward model trained on the policy's tokenizer (or set value_model)")


# --------------------------------------------------------------------------------------------
# Forward passes


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as ``generate`` does for left-padded prompts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model, input_ids, attention_mask, context_len: int, temperature: float,
                      with_entropy: bool = False):
    """Log-probs ``[B, T]`` of the response tokens (positions ``context_len:``) and optionally the
    entropy of the policy at each of them, with logits divided by the sampling temperature."""
    # Only the positions that predict a response token go through the LM head (the prompt's would be discarded).
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_of(attention_mask),
                   use_cache=False, logits_to_keep=input_ids.shape[1] - context_len + 1).logits
    logits = logits[:, :-1].float() / temperature
    logprobs = core.logprobs_from_logits(logits, input_ids[:, context_len:])
    entropy = core.entropy_from_logits(logits) if with_entropy else None
    return logprobs, entropy


def response_values(value_model, input_ids, attention_mask, context_len: int):
    values = value_model(input_ids, attention_mask, position_ids_of(attention_mask))
    return values[:, context_len - 1 : -1]


def chunks(n: int, size: int | None):
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# --------------------------------------------------------------------------------------------
# Checkpoints


def rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict:
    """The weights that training changes (all of them, or the LoRA adapters)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict, what: str) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise ValueError(f"checkpoint {what}: does not match the model (missing {missing[:3]}, unexpected {unknown[:3]}); "
                         "was it written with another config?")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def latest_checkpoint(root: Path) -> Path | None:
    done = [p for p in root.glob("step-*") if (p / "trainer_state.pt").exists()] if root.exists() else []
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None


# --------------------------------------------------------------------------------------------
# The recipe


def train(cfg: PPOConfig, force: bool = False) -> dict:
    cfg.check()
    prompts_all = load_prompts(cfg.prompts, field=cfg.prompt_field)  # bad input fails before anything is written
    if cfg.max_prompts:
        prompts_all = prompts_all[: cfg.max_prompts]
    if cfg.reward_function:
        load_reward_function(cfg.reward_function)  # a bad spec fails here, before anything is written

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cuda = torch.cuda.is_available()
    bf16 = cfg.bf16 if cfg.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if bf16 else "no")
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    device = accelerator.device

    policy_path = resolve_model(cfg.policy)
    value_path = resolve_model(cfg.value_model or cfg.reward_model or cfg.policy)
    if cfg.reward_model:
        resolve_model(cfg.reward_model)  # a clear error now, not after the models are loaded
    if len(prompts_all) < world:
        raise ValueError(f"{cfg.prompts}: {len(prompts_all)} prompts for {world} processes")
    out = Path(cfg.output_dir)
    inputs = {"policy": policy_path, "prompts": cfg.prompts, "reward_model": cfg.reward_model,
              "value_model": cfg.value_model}
    with stage_run("ppo", out, to_dict(cfg), inputs, force) as run:
        if run.skipped:
            if main:
                print(f"ppo: already completed in {out} (use --force to run again)")
            return run.previous
        ckpt_root = out / "checkpoints"
        metrics_path = out / "metrics.jsonl"
        if main and (force or not run.resuming):
            # a forced run, or leftovers of a run with another config or inputs: start from scratch
            shutil.rmtree(ckpt_root, ignore_errors=True)
            shutil.rmtree(out / "tensorboard", ignore_errors=True)
            metrics_path.unlink(missing_ok=True)
        accelerator.wait_for_everyone()

        # ---- models, tokenizer, optimisers
        set_seed(cfg.seed)  # same initialisation (LoRA, fresh value head) on every rank
        tokenizer = load_tokenizer(policy_path, cfg.trust_remote_code, padding_side="left")
        model_dtype = torch.float32  # trainable weights stay fp32; bf16 comes from autocast
        policy, ref, value = build_models(cfg, policy_path, value_path, tokenizer, model_dtype)
        if ref is not None:
            ref.to(device)
        reward = Reward(cfg, device)
        opt_p = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        opt_v = torch.optim.AdamW([p for p in value.parameters() if p.requires_grad],
                                  lr=cfg.value_learning_rate or cfg.learning_rate, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)

        def lr_factor(step: int) -> float:  # step = PPO steps done
            warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
            decay = 1.0 - step / cfg.total_steps if cfg.lr_schedule == "linear" else 1.0
            return warm * max(decay, 0.0)

        sched_p = torch.optim.lr_scheduler.LambdaLR(opt_p, lr_factor)
        sched_v = torch.optim.lr_scheduler.LambdaLR(opt_v, lr_factor)
        policy, value, opt_p, opt_v = accelerator.prepare(policy, value, opt_p, opt_v)
        raw_policy, raw_value = accelerator.unwrap_model(policy), accelerator.unwrap_model(value)
        kl_ctl = (core.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                  else core.FixedKLController(cfg.kl_coef))

        # ---- this rank's prompts
        shard = prompts_all[rank::world]
        shard_ids = encode_prompts(tokenizer, shard, cfg.max_prompt_length)
        eos_ids = sorted({tokenizer.eos_token_id} | ({tokenizer.convert_tokens_to_ids("<|im_end|>")}
                                                    if "<|im_end|>" in tokenizer.get_vocab() else set()))
        pad_id = tokenizer.pad_token_id

        # ---- resume
        start_step = 0
        ckpt = latest_checkpoint(ckpt_root)
        if ckpt is not None:
            state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
            if state["world_size"] != world:
                raise ValueError(f"{ckpt}: written by {state['world_size']} processes, resumed with {world}; "
                                 "resume with the same number of processes")
            load_trainable_state(raw_policy, torch.load(ckpt / "policy.pt"), "policy")
            load_trainable_state(raw_value, torch.load(ckpt / "value.pt"), "value")
            opt_p.load_state_dict(state["policy_optimizer"])
            opt_v.load_state_dict(state["value_optimizer"])
            sched_p.load_state_dict(state["policy_scheduler"])
            sched_v.load_state_dict(state["value_scheduler"])
            kl_ctl.load_state_dict(state["kl_controller"])
            start_step = state["step"]
            set_rng_state(torch.load(ckpt / f"rng_rank{rank}.pt", weights_only=False))
            run.notes["resumed_from"] = str(ckpt)
            if main:
                log.info("ppo: resuming from %s (step %d)", ckpt, start_step)
                if metrics_path.exists():  # drop rows logged after the checkpoint by the killed run
                    rows = [line for line in metrics_path.read_text().splitlines()
                            if line.strip() and json.loads(line)["step"] <= start_step]
                    atomic_write_text(metrics_path, "".join(r + "\n" for r in rows))
        else:
            set_seed(cfg.seed + 1000 * rank)  # sampling differs across ranks
        accelerator.wait_for_everyone()

        writer = None
        if main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

        gen_config = _generation_config(cfg, pad_id, eos_ids)
        history: list[dict] = []
        for step in range(start_step + 1, cfg.total_steps + 1):
            t_step = time.perf_counter()
            # 1. rollout ------------------------------------------------------------------
            idx = prompts_for_step(len(shard), cfg.rollout_batch_size, step, cfg.seed + rank)
            batch_prompts = [shard[i] for i in idx]
            queries, query_mask = left_pad([shard_ids[i] for i in idx], pad_id)
            queries, query_mask = queries.to(device), query_mask.to(device)
            context_len = queries.shape[1]
            raw_policy.eval()
            t_gen = time.perf_counter()
            with torch.no_grad(), accelerator.autocast():
                responses = []
                for sl in chunks(len(idx), cfg.generation_batch_size):
                    gen = raw_policy.generate(input_ids=queries[sl], attention_mask=query_mask[sl],
                                              generation_config=gen_config)
                    responses.append(gen[:, context_len:])
            width = max(r.shape[1] for r in responses)
            responses = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=pad_id) for r in responses])
            gen_time = time.perf_counter() - t_gen
            # everything after the first EOS is padding; a sampled pad token before it is a real token
            mask, ended = core.response_mask_after_eos(responses, eos_ids, None)
            responses = torch.where(mask, responses, torch.full_like(responses, pad_id))
            input_ids = torch.cat([queries, responses], dim=1)
            attention_mask = torch.cat([query_mask, mask.long()], dim=1)

            # 2. score --------------------------------------------------------------------
            replies = [tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(responses.cpu(), mask.cpu())]
            raw_scores = reward([p["prompt"] for p in batch_prompts], replies).to(device)
            scores = raw_scores
            if cfg.missing_eos_penalty is not None:
                scores = core.apply_missing_eos_penalty(raw_scores, ended, cfg.missing_eos_penalty, cfg.missing_eos_replace)

            # 3. evaluate the rollout -----------------------------------------------------
            with torch.no_grad(), accelerator.autocast():
                old_logprobs, ref_logprobs, old_values, entropy = [], [], [], []
                for sl in chunks(len(idx), cfg.forward_batch_size):
                    lp, ent = response_logprobs(raw_policy, input_ids[sl], attention_mask[sl], context_len,
                                                cfg.temperature, with_entropy=True)
                    if ref is None:
                        with raw_policy.disable_adapter():
                            rlp, _ = response_logprobs(raw_policy, input_ids[sl], attention_mask[sl], context_len, cfg.temperature)
                    else:
                        rlp, _ = response_logprobs(ref, input_ids[sl], attention_mask[sl], context_len, cfg.temperature)
                    old_logprobs.append(lp), ref_logprobs.append(rlp), entropy.append(ent)
                    old_values.append(response_values(raw_value, input_ids[sl], attention_mask[sl], context_len))
                old_logprobs, ref_logprobs = torch.cat(old_logprobs), torch.cat(ref_logprobs)
                old_values, entropy = torch.cat(old_values).float(), torch.cat(entropy)

            # 4. rewards and advantages ---------------------------------------------------
            rewards, non_score, kl = core.compute_rewards(scores, old_logprobs, ref_logprobs, mask, kl_ctl.value,
                                                          cfg.kl_estimator)
            if cfg.whiten_rewards:
                rewards = core.masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = core.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:
                advantages = core.masked_whiten(advantages, mask)

            # 5. PPO update ---------------------------------------------------------------
            policy.train(), value.train()
            stats = {"pg_loss": [], "vf_loss": [], "pg_clipfrac": [], "vf_clipfrac": [], "approx_kl": []}
            micro = cfg.mini_batch_size // cfg.grad_accum
            grad_norms_p, grad_norms_v = [], []
            for epoch in range(cfg.ppo_epochs):
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + epoch * 31 + rank)
                order = torch.randperm(len(idx), generator=g).to(device)
                for mb in order.split(cfg.mini_batch_size):
                    for k, mi in enumerate(mb.split(micro)):
                        last = k == cfg.grad_accum - 1
                        with contextlib.ExitStack() as stack:
                            if not last:  # no gradient all-reduce until the minibatch's last micro-batch
                                stack.enter_context(accelerator.no_sync(policy))
                                stack.enter_context(accelerator.no_sync(value))
                            with accelerator.autocast():
                                new_lp, _ = response_logprobs(policy, input_ids[mi], attention_mask[mi], context_len,
                                                              cfg.temperature)
                                new_v = response_values(value, input_ids[mi], attention_mask[mi], context_len)
                            pg_loss, pg_clip, approx_kl = core.ppo_policy_loss(
                                new_lp, old_logprobs[mi], advantages[mi], mask[mi], cfg.clip_range)
                            vf_loss, vf_clip = core.ppo_value_loss(
                                new_v.float(), old_values[mi], returns[mi], mask[mi], cfg.clip_range_value)
                            accelerator.backward((pg_loss + cfg.vf_coef * vf_loss) / cfg.grad_accum)
                        for key, v in (("pg_loss", pg_loss), ("vf_loss", vf_loss), ("pg_clipfrac", pg_clip),
                                       ("vf_clipfrac", vf_clip), ("approx_kl", approx_kl)):
                            stats[key].append(float(v.detach()))
                    grad_norms_p.append(float(accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)))
                    grad_norms_v.append(float(accelerator.clip_grad_norm_(value.parameters(), cfg.max_grad_norm)))
                    opt_p.step(), opt_v.step()
                    opt_p.zero_grad(set_to_none=True), opt_v.zero_grad(set_to_none=True)
            sched_p.step(), sched_v.step()

            # 6. bookkeeping --------------------------------------------------------------
            seq_kl = core.masked_sum(kl, mask, dim=1)
            local = {
                "score": raw_scores.mean(), "score_with_penalty": scores.mean(),
                "reward_total": core.masked_sum(rewards, mask, dim=1).mean(),
                "non_score_reward": core.masked_sum(non_score, mask, dim=1).mean(),
                "kl": seq_kl.mean(), "kl_per_token": core.masked_mean(kl, mask),
                "entropy": core.masked_mean(entropy, mask),
                "response_length": mask.sum(1).float().mean(), "eos_fraction": ended.float().mean(),
                "value_mean": core.masked_mean(old_values, mask),
                "grad_norm_policy": torch.tensor(sum(grad_norms_p) / len(grad_norms_p)),
                "grad_norm_value": torch.tensor(sum(grad_norms_v) / len(grad_norms_v)),
                **{k: torch.tensor(sum(v) / len(v)) for k, v in stats.items()},
            }
            step_time = time.perf_counter() - t_step
            local["time/step_s"] = torch.tensor(step_time)
            local["time/generation_share"] = torch.tensor(gen_time / step_time)
            keys = list(local)
            vec = torch.stack([local[k].detach().float().reshape(()).to(device) for k in keys])
            vec = accelerator.reduce(vec, reduction="mean") if world > 1 else vec
            metrics = {"step": step, **{k: round(float(v), 7) for k, v in zip(keys, vec.cpu())}}
            metrics["kl_coef"] = kl_ctl.value  # the beta used in this step's rewards
            metrics["lr"] = sched_p.get_last_lr()[0]
            metrics["samples"] = step * cfg.rollout_batch_size * world
            kl_ctl.update(metrics["kl"], cfg.rollout_batch_size * world)
            history.append(metrics)
            if main:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics) + "\n")
                if writer is not None:
                    for k, v in metrics.items():
                        if k != "step":
                            writer.add_scalar(k if "/" in k else f"ppo/{k}", v, step)
                    writer.flush()
                log.info("ppo step %d/%d: score %.4f kl %.4f entropy %.3f len %.1f clip %.3f vf_loss %.4f gen %.0f%%",
                         step, cfg.total_steps, metrics["score"], metrics["kl"], metrics["entropy"],
                         metrics["response_length"], metrics["pg_clipfrac"], metrics["vf_loss"],
                         100 * metrics["time/generation_share"])
            if step % cfg.save_steps == 0 and step < cfg.total_steps:
                save_checkpoint(ckpt_root, step, accelerator, raw_policy, raw_value, opt_p, opt_v, sched_p, sched_v,
                                kl_ctl, cfg.keep_checkpoints)

        # ---- outputs
        if writer is not None:
            writer.close()
        # DDP keeps replicas identical; check it rather than trust it (a mismatch means a sync bug)
        checksum = torch.stack([p.detach().double().sum() for p in raw_policy.parameters() if p.requires_grad]).sum()
        sums = accelerator.gather(checksum.reshape(1).to(device)).cpu()
        run.notes["ranks_in_sync"] = bool(torch.allclose(sums, sums[0].expand_as(sums), rtol=0, atol=1e-9))
        model_dir = out / "model"
        accelerator.wait_for_everyone()
        if main:
            save_policy(raw_policy, tokenizer, model_dir, merge=cfg.lora.enabled and cfg.lora.merge)
        accelerator.wait_for_everyone()
        rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()] if metrics_path.exists() else history
        run.add_output("model", model_dir)
        run.add_output("metrics", metrics_path)
        run.add_output("checkpoints", ckpt_root)
        if cfg.tensorboard:
            run.add_output("tensorboard", out / "tensorboard")
        run.metrics.update(summarise(rows))
        run.notes["processes"] = world
        run.notes["distributed_type"] = str(accelerator.distributed_type)
        run.notes["prompts"] = len(prompts_all)
        if main:
            print(f"ppo: done. score {run.metrics['score_first']:.4f} -> {run.metrics['score_last']:.4f}, "
                  f"KL {run.metrics['kl_last']:.4f}\n  model:   {model_dir}\n  metrics: {metrics_path}")
    return run.manifest("completed")


def _generation_config(cfg: PPOConfig, pad_id: int, eos_ids: list[int]):
    from transformers import GenerationConfig

    # Every sampling knob is set explicitly so that a model's generation_config.json (which may set
    # top_k, top_p, repetition_penalty ...) cannot silently change the policy we sample from.
    return GenerationConfig(
        do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=0, repetition_penalty=1.0, num_beams=1, pad_token_id=pad_id, eos_token_id=eos_ids,
        use_cache=True,
    )


def summarise(rows: list[dict]) -> dict:
    """Manifest metrics: the first and last steps (mean of up to 3 steps each) and the last step."""
    if not rows:
        return {}
    k = min(3, max(1, len(rows) // 3))

    def mean(part, key):
        return sum(r[key] for r in part) / len(part)

    first, last = rows[:k], rows[-k:]
    return {
        "steps": rows[-1]["step"], "samples": rows[-1]["samples"],
        "score_first": mean(first, "score"), "score_last": mean(last, "score"),
        "kl_last": rows[-1]["kl"], "kl_max": max(r["kl"] for r in rows), "kl_coef_last": rows[-1]["kl_coef"],
        "entropy_last": rows[-1]["entropy"], "response_length_last": rows[-1]["response_length"],
        "eos_fraction_last": rows[-1]["eos_fraction"],
        "generation_time_share": sum(r["time/generation_share"] for r in rows) / len(rows),
    }


def save_checkpoint(root: Path, step: int, accelerator, policy, value, opt_p, opt_v, sched_p, sched_v, kl_ctl,
                    keep: int) -> None:
    """Write ``checkpoints/step-N`` atomically: every rank adds its RNG state to a temp directory,
    then rank 0 renames it. A checkpoint without ``trainer_state.pt`` is never used."""
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if main:
        torch.save(trainable_state(policy), tmp / "policy.pt")
        torch.save(trainable_state(value), tmp / "value.pt")
        torch.save({
            "step": step, "world_size": accelerator.num_processes,
            "policy_optimizer": opt_p.state_dict(), "value_optimizer": opt_v.state_dict(),
            "policy_scheduler": sched_p.state_dict(), "value_scheduler": sched_v.state_dict(),
            "kl_controller": kl_ctl.state_dict(),
        }, tmp / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted((p for p in root.glob("step-*") if (p / "trainer_state.pt").exists()),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        log.info("ppo: checkpoint %s", final)
    accelerator.wait_for_everyone()


def save_policy(policy, tokenizer, model_dir: Path, merge: bool) -> None:
    """Save the final policy (main process only). The merge is in place, not into a copy as
    ``alignkit.training.save_trained_model`` does: training is over and nothing uses the adapters
    again, so the copy would only double the memory."""
    model = policy.merge_and_unload() if merge else policy
    save_model_atomically(model, tokenizer, model_dir, padding_side="right")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = ["PPOConfig", "train", "read_metrics", "load_reward_function", "TokenValueModel"]
