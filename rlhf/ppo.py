"""PPO stage: align the SFT policy against a reward model (or a rule reward) with our own PPO.

One recipe, :class:`PPORecipe`, on torch + transformers + accelerate (TRL no longer ships PPO);
its methods are the phases of a step, in the order they run. The config is
:mod:`alignkit.rlhf.ppo_config`, the math :mod:`alignkit.rlhf.ppo_core` (tested by hand), the
models and their forward passes :mod:`alignkit.rlhf.ppo_models`, the checkpoint files
:mod:`alignkit.rlhf.ppo_checkpoints`. Each PPO step:

1. **Rollout.** Take this rank's next ``rollout_batch_size`` prompts, left-pad them and sample
   replies in one batched ``generate`` call (temperature, top-k/top-p, ``max_new_tokens``).
   Everything after the first EOS is masked out.
2. **Score.** The reward model (``alignkit.scoring.RewardScorer``) or the rule reward scores each
   (prompt, reply); replies that never produced an EOS are penalised.
3. **Evaluate the rollout** without gradients: log-probs of the sampled tokens under the policy
   (the "old" log-probs) and under the frozen reference, per-token values from the value model.
   With ``trainable_layers`` the frozen lower blocks run once per sequence for steps 3 and 5.
4. **Rewards and advantages.** ``r_t = -beta * KL_t`` per token plus the score on the last token
   (InstructGPT); GAE; advantages whitened.
5. **Update.** ``ppo_epochs`` passes over shuffled minibatches (gradient accumulation inside a
   minibatch): clipped policy loss + ``vf_coef`` * clipped value loss; gradients clipped.
6. **Bookkeeping.** Adapt the KL coefficient (if adaptive), reduce metrics across ranks, log them
   (``metrics.jsonl`` + TensorBoard), checkpoint every ``save_steps``.

Models: the policy (full or LoRA); a frozen reference (a second copy, or with LoRA the policy with
its adapter disabled); a value model initialised from the reward model (its score head applied to
every token's hidden state); the frozen reward model or rule. Dropout is off everywhere (N+
details): with dropout the "old" log-probs would not be those of the policy that sampled.

Reproducibility and resume: prompt order and minibatch shuffles are pure functions of (seed, step,
rank); sampling uses the global RNGs, whose states (python, numpy, torch, per rank) are saved in
every checkpoint with the weights, both optimisers, schedulers, the KL controller and the step. A
killed run started again with the same command continues from its last checkpoint and produces the
same next-step metrics as a run that was never interrupted.

Launch: ``alignkit align ppo --config configs/ppo.yaml [KEY=VALUE ...]``; several processes:
``torchrun --nproc_per_node 2 -m alignkit.cli align ppo ...`` (a shard of prompts per rank).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from alignkit.config import to_dict
from alignkit.data import load_prompts
from alignkit.generation import encode_prompt, left_pad, stop_token_ids
from alignkit.models import load_tokenizer, resolve_model
from alignkit.rewards import load_reward_function
from alignkit.rlhf import ppo_core as core
from alignkit.rlhf.ppo_checkpoints import (MARKER, PREFIX, keep_metrics_up_to, read_checkpoint, replicas_in_sync,
                                           write_checkpoint)
from alignkit.rlhf.ppo_config import PPOConfig, lr_factor_of, prompts_for_step
from alignkit.rlhf.ppo_models import (Reward, TokenValueModel, build_models, cached_lower_blocks, check_engine, chunks,
                                      feature_caches, generation_config_of, response_logprobs, response_values, save_policy)
from alignkit.runstore import stage_run
from alignkit.trackers import Tracker
from alignkit.training import check_finite, latest_checkpoint, use_bf16

log = logging.getLogger("alignkit.ppo")


# --------------------------------------------------------------------------------------------
# The recipe


@dataclass
class Rollout:
    """One step's samples and what the step computes from them, filled in phase by phase.

    Per-token tensors are ``[B, T]`` over the response tokens (``ppo_core``'s convention)."""

    prompts: list[dict]  # this step's prompt records (alignkit.data.load_prompts)
    input_ids: torch.Tensor  # [B, P + T]: the left-padded prompt, then the reply (padding after its first EOS)
    attention_mask: torch.Tensor  # [B, P + T]
    context_len: int  # P: where the replies start
    mask: torch.Tensor  # bool [B, T]: reply tokens up to and including the first EOS
    ended: torch.Tensor  # bool [B]: the reply produced an EOS
    seconds: dict[str, float] = field(default_factory=dict)  # each phase's time (benchmarks/align_throughput.py)
    # score()
    raw_scores: torch.Tensor | None = None  # [B] the reward model's or rule's scores
    scores: torch.Tensor | None = None  # [B] with the missing-EOS penalty: what PPO optimises
    # evaluate_rollout()
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    # advantages()
    rewards: torch.Tensor | None = None
    non_score: torch.Tensor | None = None  # the KL part of the rewards
    kl: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.context_len:]


class PPORecipe:
    """The PPO stage on this process: :meth:`setup`, then :meth:`train` (which runs the phases of a
    step, each a method), then :meth:`save_model` and :meth:`report`. See the module docstring."""

    def __init__(self, cfg: PPOConfig, prompts: list[dict]):
        from accelerate import Accelerator

        self.cfg, self.prompts = cfg, prompts
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                                       mixed_precision="bf16" if use_bf16(cfg.bf16) else "no")
        check_engine(cfg, self.accelerator)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.main, self.device = self.accelerator.is_main_process, self.accelerator.device
        self.policy_path = resolve_model(cfg.model)
        self.value_path = resolve_model(cfg.value_model or cfg.reward_model or cfg.model)
        if cfg.reward_model:
            resolve_model(cfg.reward_model)  # a clear error now, not after the models are loaded
        if len(prompts) < self.world:
            raise ValueError(f"{cfg.prompts}: {len(prompts)} prompts for {self.world} processes")
        self.out = Path(cfg.output_dir)
        self.ckpt_root, self.metrics_path = self.out / "checkpoints", self.out / "metrics.jsonl"
        self.inputs = {"model": self.policy_path, "prompts": cfg.prompts, "reward_model": cfg.reward_model,
                       "value_model": cfg.value_model}

    # ---- before the first step

    def setup(self, run) -> None:
        """Models, tokenizer, optimisers, schedulers, the KL controller and this rank's prompts."""
        from accelerate.utils import set_seed

        cfg, self.run = self.cfg, run
        set_seed(cfg.seed)  # same initialisation (LoRA, fresh value head) on every rank
        self.tokenizer = load_tokenizer(self.policy_path, cfg.trust_remote_code, padding_side="left")
        model_dtype = torch.float32  # trainable weights stay fp32; bf16 comes from autocast
        policy, self.ref, value = build_models(cfg, self.policy_path, self.value_path, self.tokenizer, model_dtype)
        if self.ref is not None:
            self.ref.to(self.device)
        self.reward = Reward(cfg, self.device)
        # fused: one kernel per step for all tensors (the TRL stages' default too); FSDP2's sharded
        # parameters keep torch's default implementation
        adamw = functools.partial(torch.optim.AdamW, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                                  fused=None if self.accelerator.is_fsdp2 else True)
        opt_p = adamw([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)
        opt_v = adamw([p for p in value.parameters() if p.requires_grad], lr=cfg.value_learning_rate or cfg.learning_rate)
        lr_factor = lr_factor_of(cfg)
        self.sched_p = torch.optim.lr_scheduler.LambdaLR(opt_p, lr_factor)
        self.sched_v = torch.optim.lr_scheduler.LambdaLR(opt_v, lr_factor)
        # one model per prepare: FSDP2 shards one model (with its optimiser) per call
        self.policy, self.opt_p = self.accelerator.prepare(policy, opt_p)
        self.value, self.opt_v = self.accelerator.prepare(value, opt_v)
        self.raw_policy = self.accelerator.unwrap_model(self.policy)
        self.raw_value: TokenValueModel = self.accelerator.unwrap_model(self.value)
        self.sharded = self.accelerator.is_fsdp2
        if self.sharded and cfg.trainable_layers and cfg.cache_frozen_features:
            log.info("ppo: cache_frozen_features is off under FSDP (the frozen blocks are sharded too)")
        self.feature_caches = [] if self.sharded else feature_caches(cfg, [self.raw_policy, self.ref, self.raw_value.model])
        self.run.notes["feature_cache_stores"] = len({id(c.features) for c in self.feature_caches})
        self.kl_ctl = (core.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else core.FixedKLController(cfg.kl_coef))

        self.shard = self.prompts[self.rank::self.world]  # this rank's prompts
        self.shard_ids = [encode_prompt(self.tokenizer, p["prompt"])[-cfg.max_prompt_length:] for p in self.shard]
        self.eos_ids = stop_token_ids(self.raw_policy, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        self.gen_config = generation_config_of(cfg, self.pad_id, self.eos_ids)

    def resume(self) -> int:
        """Continue from the newest complete checkpoint, if any: weights, optimisers, schedulers,
        KL controller and RNG states. Returns the number of steps already done."""
        from accelerate.utils import set_seed

        start_step = 0
        ckpt = latest_checkpoint(self.ckpt_root, prefix=PREFIX, marker=MARKER)
        if ckpt is not None:
            state = read_checkpoint(ckpt, self.accelerator, {"policy": self.raw_policy, "value": self.raw_value})
            self.opt_p.load_state_dict(state["policy_optimizer"])
            self.opt_v.load_state_dict(state["value_optimizer"])
            self.sched_p.load_state_dict(state["policy_scheduler"])
            self.sched_v.load_state_dict(state["value_scheduler"])
            self.kl_ctl.load_state_dict(state["kl_controller"])
            start_step = state["step"]
            self.run.notes["resumed_from"] = str(ckpt)
            if self.main:
                log.info("ppo: resuming from %s (step %d)", ckpt, start_step)
        else:
            set_seed(self.cfg.seed + 1000 * self.rank)  # sampling differs across ranks
        if self.main and self.metrics_path.exists():
            keep_metrics_up_to(self.metrics_path, start_step)
        self.accelerator.wait_for_everyone()
        return start_step

    # ---- one step

    def train(self) -> None:
        """Resume if there is a checkpoint, then run the remaining PPO steps."""
        cfg = self.cfg
        start_step = self.resume()
        self.tracker = Tracker(cfg, self.out, to_dict(cfg), start_step) if self.main else None
        self.history: list[dict] = []
        try:
            self.steps(start_step)
        finally:
            if self.tracker is not None:
                self.tracker.close()

    def steps(self, start_step: int) -> None:
        cfg = self.cfg
        for step in range(start_step + 1, cfg.total_steps + 1):
            t_step = time.perf_counter()
            rollout = self.rollout(step)
            with timed(rollout, "reward"):
                self.score(rollout)
            with contextlib.ExitStack() as cached:
                with timed(rollout, "frozen_features"):
                    cached.enter_context(cached_lower_blocks(self.feature_caches, rollout.input_ids, rollout.attention_mask,
                                                             self.pad_id, cfg.forward_batch_size, self.accelerator.autocast))
                self.evaluate_rollout(rollout)
                with timed(rollout, "advantages"):
                    self.advantages(rollout)
                with timed(rollout, "update"):
                    stats = self.update(step, rollout)
            metrics = self.metrics(step, rollout, stats, t_step)
            self.kl_ctl.update(metrics["kl"], cfg.rollout_batch_size * self.world)
            self.log(metrics)  # first, so metrics.jsonl shows the step that diverged
            check_finite("ppo", step, metrics, ("pg_loss", "vf_loss", "score"))
            if step % cfg.save_steps == 0 and step < cfg.total_steps:
                self.save_checkpoint(step)

    def rollout(self, step: int) -> Rollout:
        """Sample a reply to each of this rank's prompts for ``step``, in batched ``generate`` calls."""
        cfg, pad_id = self.cfg, self.pad_id
        idx = prompts_for_step(len(self.shard), cfg.rollout_batch_size, step, cfg.seed + self.rank)
        queries, query_mask = left_pad([self.shard_ids[i] for i in idx], pad_id)
        queries, query_mask = queries.to(self.device), query_mask.to(self.device)
        context_len = queries.shape[1]
        self.raw_policy.eval()
        t_gen = time.perf_counter()
        with torch.no_grad(), self.accelerator.autocast():
            responses = []
            for sl in chunks(len(idx), cfg.generation_batch_size):
                gen = self.raw_policy.generate(input_ids=queries[sl], attention_mask=query_mask[sl],
                                               generation_config=self.gen_config)
                responses.append(gen[:, context_len:])
        width = max(r.shape[1] for r in responses)
        responses = torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=pad_id) for r in responses])
        generation_s = time.perf_counter() - t_gen
        # everything after the first EOS is padding; a sampled pad token before it is a real token
        mask, ended = core.response_mask_after_eos(responses, self.eos_ids, None)
        responses = torch.where(mask, responses, torch.full_like(responses, pad_id))
        return Rollout(prompts=[self.shard[i] for i in idx], input_ids=torch.cat([queries, responses], dim=1),
                       attention_mask=torch.cat([query_mask, mask.long()], dim=1), context_len=context_len,
                       mask=mask, ended=ended, seconds={"generation": generation_s})

    def score(self, rollout: Rollout) -> None:
        """The reward of each reply, and the score PPO optimises (with the missing-EOS penalty)."""
        cfg = self.cfg
        replies = [self.tokenizer.decode(r[m], skip_special_tokens=True)
                   for r, m in zip(rollout.responses.cpu(), rollout.mask.cpu())]
        rollout.raw_scores = self.reward([p["prompt"] for p in rollout.prompts], replies).to(self.device)
        rollout.scores = rollout.raw_scores
        if cfg.missing_eos_penalty is not None:
            rollout.scores = core.apply_missing_eos_penalty(rollout.raw_scores, rollout.ended, cfg.missing_eos_penalty,
                                                            cfg.missing_eos_replace)

    @torch.no_grad()
    def evaluate_rollout(self, rollout: Rollout) -> None:
        """Log-probs of the replies under the policy ("old") and the reference, the policy's
        entropy and the values, in no-grad batches of ``forward_batch_size``, one model at a time."""
        cfg, ids, am, ctx = self.cfg, rollout.input_ids, rollout.attention_mask, rollout.context_len
        parts = chunks(len(ids), cfg.forward_batch_size)

        def each_part(forward):
            return [forward(sl) for sl in parts]

        def reference(sl):
            if self.ref is not None:
                return response_logprobs(self.ref, ids[sl], am[sl], ctx, cfg.temperature)[0]
            with self.raw_policy.disable_adapter():  # LoRA: the reference is the policy without its adapter
                return response_logprobs(self.raw_policy, ids[sl], am[sl], ctx, cfg.temperature)[0]

        with self.accelerator.autocast():
            with timed(rollout, "old_logprobs"):
                old = each_part(lambda sl: response_logprobs(self.raw_policy, ids[sl], am[sl], ctx, cfg.temperature, True))
            with timed(rollout, "ref_logprobs"):
                rollout.ref_logprobs = torch.cat(each_part(reference))
            with timed(rollout, "values"):
                rollout.old_values = torch.cat(each_part(lambda sl: response_values(self.raw_value, ids[sl], am[sl], ctx))).float()
        rollout.old_logprobs, rollout.entropy = torch.cat([lp for lp, _ in old]), torch.cat([e for _, e in old])

    def advantages(self, rollout: Rollout) -> None:
        """Per-token rewards (KL penalty + the score on the last token), GAE advantages and returns."""
        cfg, mask = self.cfg, rollout.mask
        rollout.rewards, rollout.non_score, rollout.kl = core.compute_rewards(
            rollout.scores, rollout.old_logprobs, rollout.ref_logprobs, mask, self.kl_ctl.value, cfg.kl_estimator)
        if cfg.whiten_rewards:
            rollout.rewards = core.masked_whiten(rollout.rewards, mask, shift_mean=False)
        rollout.advantages, rollout.returns = core.gae(rollout.rewards, rollout.old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            rollout.advantages = core.masked_whiten(rollout.advantages, mask)

    def update(self, step: int, rollout: Rollout) -> dict[str, list[float]]:
        """``ppo_epochs`` passes over seeded shuffles of the rollout in minibatches, one optimiser
        step of each model per minibatch; then the schedulers step. Returns the per-micro-batch
        losses and statistics and the per-minibatch gradient norms."""
        cfg, accelerator = self.cfg, self.accelerator
        self.policy.train(), self.value.train()
        stats = {"pg_loss": [], "vf_loss": [], "pg_clipfrac": [], "vf_clipfrac": [], "approx_kl": [],
                 "grad_norm_policy": [], "grad_norm_value": []}
        micro = cfg.mini_batch_size // cfg.grad_accum
        for epoch in range(cfg.ppo_epochs):
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + epoch * 31 + self.rank)
            order = torch.randperm(cfg.rollout_batch_size, generator=g).to(self.device)
            for mb in order.split(cfg.mini_batch_size):
                for k, mi in enumerate(mb.split(micro)):
                    with contextlib.ExitStack() as stack:
                        if k != cfg.grad_accum - 1:  # no gradient all-reduce until the minibatch's last micro-batch
                            stack.enter_context(accelerator.no_sync(self.policy))
                            stack.enter_context(accelerator.no_sync(self.value))
                        losses = self._backward(rollout, mi)
                    for key, v in losses.items():
                        stats[key].append(float(v.detach()))
                stats["grad_norm_policy"].append(float(accelerator.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)))
                stats["grad_norm_value"].append(float(accelerator.clip_grad_norm_(self.value.parameters(), cfg.max_grad_norm)))
                self.opt_p.step(), self.opt_v.step()
                self.opt_p.zero_grad(set_to_none=True), self.opt_v.zero_grad(set_to_none=True)
        stats["lr"] = [self.sched_p.get_last_lr()[0]]  # the rate this step trained with, before the schedule moves on
        self.sched_p.step(), self.sched_v.step()
        return stats

    def _backward(self, rollout: Rollout, mi: torch.Tensor) -> dict[str, torch.Tensor]:
        """Clipped policy + value loss of the micro-batch ``mi`` (row indices), back-propagated."""
        cfg, r = self.cfg, rollout
        with self.accelerator.autocast():
            new_lp, _ = response_logprobs(self.policy, r.input_ids[mi], r.attention_mask[mi], r.context_len, cfg.temperature)
            new_v = response_values(self.value, r.input_ids[mi], r.attention_mask[mi], r.context_len)
        pg_loss, pg_clip, approx_kl = core.ppo_policy_loss(new_lp, r.old_logprobs[mi], r.advantages[mi], r.mask[mi],
                                                           cfg.clip_range)
        vf_loss, vf_clip = core.ppo_value_loss(new_v.float(), r.old_values[mi], r.returns[mi], r.mask[mi],
                                               cfg.clip_range_value)
        self.accelerator.backward((pg_loss + cfg.vf_coef * vf_loss) / cfg.grad_accum)
        return {"pg_loss": pg_loss, "vf_loss": vf_loss, "pg_clipfrac": pg_clip, "vf_clipfrac": vf_clip,
                "approx_kl": approx_kl}

    def metrics(self, step: int, rollout: Rollout, stats: dict[str, list[float]], t_step: float) -> dict:
        """This step's metrics (docs/alignment.md lists them), averaged across ranks."""
        cfg, r, mask = self.cfg, rollout, rollout.mask
        local = {
            "score": r.raw_scores.mean(), "score_with_penalty": r.scores.mean(),
            "reward_total": core.masked_sum(r.rewards, mask, dim=1).mean(),
            "non_score_reward": core.masked_sum(r.non_score, mask, dim=1).mean(),
            "kl": core.masked_sum(r.kl, mask, dim=1).mean(), "kl_per_token": core.masked_mean(r.kl, mask),
            "entropy": core.masked_mean(r.entropy, mask),
            "response_length": mask.sum(1).float().mean(), "eos_fraction": r.ended.float().mean(),
            "value_mean": core.masked_mean(r.old_values, mask),
            "grad_norm_policy": _mean(stats["grad_norm_policy"]), "grad_norm_value": _mean(stats["grad_norm_value"]),
            **{k: _mean(stats[k]) for k in ("pg_loss", "vf_loss", "pg_clipfrac", "vf_clipfrac", "approx_kl")},
        }
        step_time = time.perf_counter() - t_step
        local["time/step_s"] = torch.tensor(step_time)
        local["time/generation_share"] = torch.tensor(r.seconds["generation"] / step_time)
        local.update({f"time/{phase}_s": torch.tensor(seconds) for phase, seconds in r.seconds.items()})
        keys = list(local)
        vec = torch.stack([local[k].detach().float().reshape(()).to(self.device) for k in keys])
        vec = self.accelerator.reduce(vec, reduction="mean") if self.world > 1 else vec
        metrics = {"step": step, **{k: round(float(v), 7) for k, v in zip(keys, vec.cpu())}}
        metrics["kl_coef"] = self.kl_ctl.value  # the beta used in this step's rewards
        metrics["lr"] = stats["lr"][0]
        metrics["samples"] = step * cfg.rollout_batch_size * self.world
        return metrics

    def log(self, metrics: dict) -> None:
        """Append the step's metrics to ``metrics.jsonl`` and TensorBoard (main process), and say how it went."""
        self.history.append(metrics)
        if not self.main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        step = metrics["step"]
        self.tracker.log({k if "/" in k else f"ppo/{k}": v for k, v in metrics.items() if k != "step"}, step)
        log.info("ppo step %d/%d: score %.4f kl %.4f entropy %.3f len %.1f clip %.3f vf_loss %.4f gen %.0f%%",
                 step, self.cfg.total_steps, metrics["score"], metrics["kl"], metrics["entropy"],
                 metrics["response_length"], metrics["pg_clipfrac"], metrics["vf_loss"],
                 100 * metrics["time/generation_share"])

    def save_checkpoint(self, step: int) -> None:
        """``checkpoints/step-N``: what :meth:`resume` reads back (see ``ppo_checkpoints``)."""
        state = {"step": step, "world_size": self.world, "sharded": self.sharded,
                 "policy_optimizer": self.opt_p.state_dict(), "value_optimizer": self.opt_v.state_dict(),
                 "policy_scheduler": self.sched_p.state_dict(), "value_scheduler": self.sched_v.state_dict(),
                 "kl_controller": self.kl_ctl.state_dict()}
        write_checkpoint(self.ckpt_root, step, self.accelerator, {"policy": self.raw_policy, "value": self.raw_value},
                         state, self.cfg.save_total_limit)

    # ---- after the last step

    def save_model(self) -> Path:
        """Check that the ranks ended in sync, then save the policy (merged, with LoRA and
        ``lora.merge``) to ``<run>/model``."""
        if not self.sharded:  # under FSDP each rank holds other shards: nothing to compare
            self.run.notes["ranks_in_sync"] = replicas_in_sync(self.raw_policy, self.accelerator)
        model_dir = self.out / "model"
        self.accelerator.wait_for_everyone()
        save_policy(self.raw_policy, self.tokenizer, model_dir, self.cfg.lora.enabled and self.cfg.lora.merge,
                    self.accelerator)
        return model_dir

    def report(self, model_dir: Path) -> None:
        """Outputs, summary metrics and notes for the manifest."""
        run, metrics_path = self.run, self.metrics_path
        rows = read_metrics(self.out) if metrics_path.exists() else self.history
        for key, path in (("model", model_dir), ("metrics", metrics_path), ("checkpoints", self.ckpt_root)):
            run.add_output(key, path)
        if "tensorboard" in self.cfg.report_to:
            run.add_output("tensorboard", self.out / "tensorboard")
        run.metrics.update(summarise(rows))
        run.notes.update(processes=self.world, distributed_type=str(self.accelerator.distributed_type),
                         prompts=len(self.prompts))
        if self.main:
            print(f"ppo: done. score {run.metrics['score_first']:.4f} -> {run.metrics['score_last']:.4f}, "
                  f"KL {run.metrics['kl_last']:.4f}\n  model:   {model_dir}\n  metrics: {metrics_path}")


@contextlib.contextmanager
def timed(rollout: Rollout, phase: str):
    """Add the time the block takes to ``rollout.seconds[phase]``."""
    t0 = time.perf_counter()
    yield
    rollout.seconds[phase] = rollout.seconds.get(phase, 0.0) + time.perf_counter() - t0


def _mean(values: list[float]) -> torch.Tensor:
    return torch.tensor(sum(values) / len(values))


def train(cfg: PPOConfig, force: bool = False) -> dict:
    """Run the PPO stage (see the module docstring); returns its manifest."""
    cfg.check()
    prompts = load_prompts(cfg.prompts, field=cfg.prompt_field)  # bad input fails before anything is written
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    if cfg.reward_function:
        load_reward_function(cfg.reward_function)  # a bad spec fails here, before anything is written
    recipe = PPORecipe(cfg, prompts)
    with stage_run("ppo", recipe.out, to_dict(cfg), recipe.inputs, force) as run:
        if run.skipped:
            if recipe.main:
                print(f"ppo: already completed in {recipe.out} (use --force to run again)")
            return run.previous
        # a forced run, or leftovers of a run with another config or inputs: start from scratch
        run.clear_for_fresh_start("checkpoints", "tensorboard", "metrics.jsonl")
        recipe.accelerator.wait_for_everyone()
        recipe.setup(run)
        recipe.train()
        recipe.report(recipe.save_model())
    return run.manifest("completed")


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
        "seconds_per_step": {key[5:-2]: sum(r.get(key, 0.0) for r in rows) / len(rows)
                             for key in rows[-1] if key.startswith("time/") and key.endswith("_s")},
    }


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__ = ["PPOConfig", "PPORecipe", "train", "read_metrics", "load_reward_function", "TokenValueModel"]

