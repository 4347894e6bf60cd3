"""Batched reward scoring: the API that PPO, evals and ``alignkit reward eval`` call.

A saved reward model is a normal Hugging Face sequence-classification directory plus its tokenizer
(``<reward run>/model``). Its first output column is the reward; multi-aspect models (see
``docs/reward.md``) carry extra columns after it, one per aspect, named in ``config.id2label``.

The text that is scored is exactly the text the model was trained on: the conversation
``prompt + [assistant reply]`` rendered by the tokenizer's chat template
(:func:`conversation_ids`, shared with ``reward/train.py``). Batches are padded on the RIGHT: the
model reads the reward at the last non-pad token, and right padding leaves every real token's
position id unchanged, so a batched score equals the one-at-a-time score (left padding would
shift the position ids of a model that derives them from the sequence index, as Llama does).

    scorer = RewardScorer("runs/quickstart/reward/model")
    scorer.score([[{"role": "user", "content": "hi"}]], ["hello!"])   # -> [0.73]
"""

from __future__ import annotations

from pathlib import Path

import torch

Messages = list[dict[str, str]]


def as_messages(prompt: Messages | str) -> Messages:
    """A prompt given as plain text becomes one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def conversation_ids(tokenizer, prompt: Messages | str, response: str) -> list[int]:
    """Token ids of ``prompt + [assistant: response]`` through the chat template (no truncation).

    The template's text is tokenised without adding special tokens again: templates that start
    with a BOS token already put it in the text.
    """
    messages = as_messages(prompt) + [{"role": "assistant", "content": response}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def truncate_left(ids: list[int], max_length: int | None) -> list[int]:
    """Keep the last ``max_length`` tokens: the reply (read at the last token) survives, the
    oldest prompt tokens go."""
    return ids if max_length is None or len(ids) <= max_length else ids[-max_length:]


class RewardScorer:
    """Scores (prompt, response) pairs with a saved reward model, in padded batches.

    Args:
        model_dir: a reward model directory (``<reward run>/model``) or a reward run directory
            (its ``model/`` is used).
        device: ``"cuda"``, ``"cpu"`` ...; default: CUDA when available.
        batch_size: sequences per forward pass.
        max_length: longer conversations are cut from the left (oldest prompt tokens first).
        dtype: default bf16 on CUDA when supported, fp32 on CPU.
        aspect_weights: for a multi-aspect reward model, ``{"reward": w, "<aspect>": w, ...}``:
            :meth:`score` returns the weighted sum of the heads (None: the reward head alone).
    """

    def __init__(self, model_dir: str | Path, device: str | None = None, batch_size: int = 16,
                 max_length: int = 1024, dtype: torch.dtype | None = None,
                 aspect_weights: dict[str, float] | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").exists() and (model_dir / "model" / "config.json").exists():
            model_dir = model_dir / "model"
        if not (model_dir / "config.json").exists():
            raise FileNotFoundError(f"{model_dir}: not a reward model directory (no config.json)")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype is None:
            dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
        self.device, self.batch_size, self.max_length = torch.device(device), batch_size, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if self.tokenizer.pad_token is None:
            raise ValueError(f"{model_dir}: the tokenizer has no pad token (a reward model saved by alignkit has one)")
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        id2label = getattr(self.model.config, "id2label", None) or {}
        # Multi-aspect models: column 0 is the reward, the rest are aspect heads.
        self.aspects = [str(id2label[i]).removeprefix("aspect:") for i in sorted(id2label, key=int)[1:]] \
            if self.model.config.num_labels > 1 else []
        self.weights = None
        if aspect_weights:
            heads = ["reward", *self.aspects]
            unknown = sorted(set(aspect_weights) - set(heads))
            if unknown:
                from alignkit.config import ConfigError

                raise ConfigError(f"aspect_weights: {', '.join(unknown)} not among this reward model's heads "
                                 f"({', '.join(heads)}; {model_dir})")
            self.weights = torch.tensor([float(aspect_weights.get(h, 0.0)) for h in heads])

    def encode(self, prompts: list[Messages] | list[str], responses: list[str]) -> list[list[int]]:
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        return [truncate_left(conversation_ids(self.tokenizer, p, r), self.max_length) for p, r in zip(prompts, responses)]

    @torch.no_grad()
    def score_tensors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, all_heads: bool = False) -> torch.Tensor:
        """Rewards ``[B]`` (fp32, on CPU) for already tokenised, RIGHT-padded inputs (same tokenizer).

        ``all_heads=True`` returns ``[B, 1 + n_aspects]`` (reward, then aspect predictions).
        """
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                            use_cache=False).logits.float().cpu()
        return logits if all_heads else logits[:, 0]

    def _score_ids(self, ids: list[list[int]], all_heads: bool = False) -> torch.Tensor:
        out = []
        # Sort by length so each batch pads little; results are put back in the caller's order.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = [ids[i] for i in order[start : start + self.batch_size]]
            batch = self.tokenizer.pad({"input_ids": chunk}, padding=True, return_tensors="pt")
            out.append(self.score_tensors(batch["input_ids"], batch["attention_mask"], all_heads=all_heads))
        if not out:
            return torch.zeros((0, 1 + len(self.aspects)) if all_heads else (0,))
        scores = torch.cat(out)
        result = torch.empty_like(scores)
        result[torch.tensor(order)] = scores
        return result

    def score(self, prompts: list[Messages] | list[str], responses: list[str]) -> list[float]:
        """One reward per (prompt, response): ``prompts[i]`` is a message list or plain text. With
        ``aspect_weights``, the weighted sum of the heads: ``w_reward * reward + sum_a w_a * aspect_a``
        (aspect heads predict the 1..5 ratings scaled to -1..1; heads not named weigh 0)."""
        if self.weights is None:
            return self._score_ids(self.encode(prompts, responses)).tolist()
        return (self._score_ids(self.encode(prompts, responses), all_heads=True) @ self.weights).tolist()

    def score_all_heads(self, prompts: list[Messages] | list[str], responses: list[str]) -> list[list[float]]:
        """``[reward, aspect_1, ...]`` per (prompt, response) (aspects listed in ``self.aspects``)."""
        return self._score_ids(self.encode(prompts, responses), all_heads=True).tolist()
