"""PPO's models and their forward passes: the policy, the frozen reference, the per-token value
model and the reward (a reward model or a rule).

Dropout is switched off everywhere (N+ details): with dropout the "old" log-probs would not be
those of the policy that sampled. The forward passes read left-padded prompts followed by the
sampled responses, with positions counted over real tokens, as ``generate`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path

import torch

from alignkit.config import ConfigError
from alignkit.data import prompt_text
from alignkit.distributed import env_flag
from alignkit.generation import positions_of
from alignkit.models import match_tokenizer, resolve_model
from alignkit.rewards import load_reward_function
from alignkit.rlhf import ppo_core as core
from alignkit.training import FSDP_MERGE, freeze_lower_layers, gather_full_state_dict, lora_config, save_model_atomically

log = logging.getLogger("alignkit.ppo")


def check_engine(cfg, accelerator) -> None:
    """Refuse the launches PPO cannot run: DeepSpeed (PPO's own ``Accelerator`` would quietly fall
    back to DDP on it; ZeRO would need an engine for the policy and one for the value model), and a
    LoRA merge at the end under FSDP (a sharded model cannot be merged yet)."""
    if env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError("ppo: DeepSpeed is not supported for PPO yet (its policy and value model would need "
                          "a DeepSpeed engine each); launch it with configs/accelerate/fsdp.yaml (FSDP2) "
                          "or plain DDP instead: see docs/distributed.md")
    if accelerator.is_fsdp2 and cfg.lora.enabled and cfg.lora.merge:
        raise ConfigError(FSDP_MERGE.format(stage="ppo"))


class Reward:
    """Scores (prompt, reply) pairs with a reward model or a rule; returns a float tensor ``[B]``."""

    def __init__(self, cfg, device):
        self.rule = load_reward_function(cfg.reward_function) if cfg.reward_function else None
        self.scorer = None
        if cfg.reward_model:
            from alignkit.scoring import RewardScorer

            self.scorer = RewardScorer(resolve_model(cfg.reward_model), device=str(device),
                                       aspect_weights=cfg.aspect_weights)

    def __call__(self, prompts: list[list[dict]], replies: list[str]) -> torch.Tensor:
        if self.rule is not None:
            scores = self.rule([prompt_text(p) for p in prompts], replies)
        else:
            scores = self.scorer.score(prompts, replies)
        scores = torch.tensor([float(s) for s in scores], dtype=torch.float32)
        if scores.shape != (len(replies),) or not torch.isfinite(scores).all():
            raise ValueError(f"reward: expected {len(replies)} finite scores, got {scores.tolist()}")
        return scores


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


def build_models(cfg, policy_path: str, value_path: str, tokenizer, dtype):
    """``(policy, reference, value model)``; the reference is None with LoRA (the policy with its
    adapter disabled serves as the reference, so no second copy is held)."""
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


def generation_config_of(cfg, pad_id: int, eos_ids: list[int]):
    from transformers import GenerationConfig

    # Every sampling knob is set explicitly so that a model's generation_config.json (which may set
    # top_k, top_p, repetition_penalty ...) cannot silently change the policy we sample from.
    return GenerationConfig(
        do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=0, repetition_penalty=1.0, num_beams=1, pad_token_id=pad_id, eos_token_id=eos_ids,
        use_cache=True,
    )


# --------------------------------------------------------------------------------------------
# Forward passes over prompt + response (position ids: see alignkit.generation.positions_of)


def response_logprobs(model, input_ids, attention_mask, context_len: int, temperature: float,
                      with_entropy: bool = False):
    """Log-probs ``[B, T]`` of the response tokens (positions ``context_len:``) and optionally the
    entropy of the policy at each of them, with logits divided by the sampling temperature."""
    # Only the positions that predict a response token go through the LM head (the prompt's would be discarded).
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_of(attention_mask),
                   use_cache=False, logits_to_keep=input_ids.shape[1] - context_len + 1).logits
    logits = logits[:, :-1].float() / temperature
    logprobs = core.logprobs_from_logits(logits, input_ids[:, context_len:])
    entropy = core.entropy_from_logits(logits) if with_entropy else None
    return logprobs, entropy


def response_values(value_model, input_ids, attention_mask, context_len: int):
    """Values ``[B, T]``: ``V`` at the position before each response token (the state it is sampled in)."""
    values = value_model(input_ids, attention_mask, positions_of(attention_mask))
    return values[:, context_len - 1 : -1]


def chunks(n: int, size: int | None) -> list[slice]:
    """Slices of ``range(n)`` of at most ``size`` (None: one slice)."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def save_policy(policy, tokenizer, model_dir: Path, merge: bool, accelerator) -> None:
    """Save the final policy (every rank calls it; the main process writes). The merge is in place,
    not into a copy as ``alignkit.training.save_trained_model`` does: training is over and nothing
    uses the adapters again, so the copy would only double the memory."""
    full = gather_full_state_dict(policy, accelerator, merge)  # under FSDP: the shards, gathered
    if accelerator.is_main_process:
        model = policy.merge_and_unload() if merge else policy
        save_model_atomically(model, tokenizer, model_dir, padding_side="right", state_dict=full)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------
# Frozen lower blocks run once per sampled sequence (alignkit.feature_cache)


def feature_caches(cfg, models: list) -> list:
    """Frozen-block caches for the policy, the reference and the value model (None entries are
    skipped); models whose embeddings and lower blocks hold the same weights share one store, so
    one lower pass per step serves all of them. Empty without ``trainable_layers`` or with LoRA."""
    k = cfg.trainable_layers
    models = [m for m in models if m is not None]
    if not (cfg.cache_frozen_features and k and not cfg.lora.enabled and k < models[0].config.num_hidden_layers):
        return []
    from alignkit.feature_cache import FrozenBlockCache

    caches = []
    for model in models:
        twin = next((c for c in caches if _same_frozen_weights(c.model, model, k)), None)
        caches.append(FrozenBlockCache(model, k, twin.features if twin else None))
    return caches


@contextlib.contextmanager
def cached_lower_blocks(caches: list, input_ids, attention_mask, pad_id: int, batch_size: int | None, autocast):
    """While active, the step's forward passes read the frozen blocks' output of its sequences,
    computed here once per store (the last step's are dropped first). No caches: nothing happens."""
    from alignkit.feature_cache import real_tokens

    with contextlib.ExitStack() as active:
        if caches:
            sequences = real_tokens(input_ids, attention_mask)
            stores = {}
            for cache in caches:
                stores.setdefault(id(cache.features), cache)
            with autocast():
                for cache in stores.values():
                    cache.features.clear()
                    cache.prefill(sequences, pad_id, batch_size=batch_size or len(sequences))
            for cache in caches:
                active.enter_context(cache)
        yield


def _same_frozen_weights(a, b, trainable_layers: int) -> bool:
    """Whether two models' embeddings and frozen lower blocks hold the same weights."""
    from alignkit.training import transformer_blocks

    blocks_a, blocks_b = transformer_blocks(a), transformer_blocks(b)
    if len(blocks_a) != len(blocks_b):
        return False
    n = len(blocks_a) - trainable_layers
    for ma, mb in [(a.get_input_embeddings(), b.get_input_embeddings())] + list(zip(blocks_a[:n], blocks_b[:n])):
        pa, pb = list(ma.parameters()), list(mb.parameters())
        if len(pa) != len(pb) or not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(pa, pb)):
            return False
    return True
