"""Frozen lower blocks run once per sequence (feature-based fine-tuning, exact).

With ``trainable_layers: k`` only the top k transformer blocks (and the head) train; the
embeddings and the blocks below are frozen, so their output for a given sequence never changes.
:class:`FrozenBlockCache` computes that output once per distinct sequence (in batches, before
training) and, while active, serves it in place of the lower blocks' forward passes: every epoch
and every evaluation after the first then costs the top k blocks only. The top blocks receive
the same hidden states as before, so losses and gradients are the same (to float rounding: a test
checks 1e-5).

How: the model keeps every module (checkpoints and saving are unchanged); while the cache is
active the lowest frozen block's ``forward`` returns the cached features of the batch and the
other frozen blocks pass them through. Each row's real tokens must be one contiguous run, at
positions 0, 1, ... : right padding with the default positions (the reward model), or left
padding with positions counted over real tokens (PPO, as ``generate`` does). The features of a
sequence's real tokens then do not depend on its padding, nor on the batch.

Several models whose embeddings and lower blocks hold the same weights (PPO's policy, its frozen
reference and a value model started from the same checkpoint) can share one ``features`` store:
one lower pass then serves all of them.
"""

from __future__ import annotations

import logging
import time

import torch

from alignkit.training import transformer_blocks

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised inside the first trainable block to end a feature-only forward pass."""


class FrozenBlockCache:
    def __init__(self, model, trainable_layers: int, features: dict | None = None):
        blocks = list(transformer_blocks(model))
        if not 1 <= trainable_layers < len(blocks):
            raise ValueError(f"feature cache: trainable_layers must leave frozen blocks below (1..{len(blocks) - 1})")
        self.model = model
        self.lower, self.first_trainable = blocks[: len(blocks) - trainable_layers], blocks[len(blocks) - trainable_layers]
        if any(p.requires_grad for b in self.lower for p in b.parameters()) or any(
                p.requires_grad for p in model.get_input_embeddings().parameters()):
            raise ValueError("feature cache: the embeddings and the lower blocks must be frozen (freeze_lower_layers)")
        self.features: dict[tuple[int, ...], torch.Tensor] = {} if features is None else features
        self.backbone = getattr(model, model.base_model_prefix)  # what every caller's forward goes through
        self._batch = None  # (input_ids, attention_mask, position_ids) of the forward pass in progress
        self._hook = None

    # ---- filling

    @torch.no_grad()
    def prefill(self, sequences: list[list[int]], pad_token_id: int, batch_size: int = 16) -> float:
        """Compute and keep the features of every distinct sequence; returns the seconds taken."""
        t0 = time.perf_counter()
        todo = sorted({tuple(s) for s in sequences} - set(self.features), key=len)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(todo), batch_size):
                batch = todo[start: start + batch_size]
                width = max(map(len, batch))
                ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long, device=device)
                mask = torch.zeros_like(ids)
                for i, s in enumerate(batch):
                    ids[i, : len(s)] = torch.tensor(s, device=device)
                    mask[i, : len(s)] = 1
                hidden = self._lower_features(ids, mask)
                for i, s in enumerate(batch):
                    self.features[s] = hidden[i, : len(s)].clone()
        finally:
            self.model.train(was_training)
        return time.perf_counter() - t0

    def _lower_features(self, ids, mask) -> torch.Tensor:
        """The input of the first trainable block: the model's own forward, stopped there."""
        captured = {}

        def stop(hidden_states, *args, **kwargs):
            captured["hidden"] = hidden_states
            raise _Stop

        self.first_trainable.forward = stop
        try:
            self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        except _Stop:
            pass
        finally:
            del self.first_trainable.forward
        return captured["hidden"]

    # ---- serving

    def __enter__(self):
        def remember_batch(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._batch = (ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))

        self._hook = self.backbone.register_forward_pre_hook(remember_batch, with_kwargs=True)
        self.lower[0].forward = self._cached
        for block in self.lower[1:]:
            block.forward = _pass_through
        return self

    def __exit__(self, *exc):
        self._hook.remove()
        for block in self.lower:
            del block.forward
        self._batch = None
        return False

    def _cached(self, hidden_states, *args, **kwargs):
        ids, mask, positions = self._batch
        spans = _real_spans(ids, mask, positions)
        keys = [tuple(ids[i, a:b].tolist()) for i, (a, b) in enumerate(spans)]
        missing = [list(k) for k in keys if k not in self.features]
        if missing:  # not prefilled: compute them now, once, with the real lower blocks
            batch = self._batch
            self.__exit__()
            try:
                self.prefill(missing, pad_token_id=self.model.config.pad_token_id or 0)
            finally:
                self.__enter__()
                self._batch = batch
        out = torch.zeros_like(hidden_states)
        for i, ((a, b), key) in enumerate(zip(spans, keys)):
            out[i, a:b] = self.features[key]
        return out


def real_tokens(ids: torch.Tensor, mask: torch.Tensor | None) -> list[list[int]]:
    """Each row's real tokens (the contiguous run its attention mask marks)."""
    spans = _real_spans(ids, mask, None, any_padding=True)
    return [ids[i, a:b].tolist() for i, (a, b) in enumerate(spans)]


def _real_spans(ids, mask, positions, any_padding: bool = False) -> list[tuple[int, int]]:
    """(start, end) of each row's real tokens; refuses rows the cache cannot serve exactly."""
    if mask is None:
        mask = torch.ones_like(ids)
    spans = []
    for i, row in enumerate(mask.bool()):
        where = row.nonzero().flatten()
        a, b = (int(where[0]), int(where[-1]) + 1) if len(where) else (0, 0)
        if not bool(row[a:b].all()):
            raise ValueError("feature cache: a row's real tokens are not contiguous")
        if positions is not None:
            if not torch.equal(positions[i, a:b].cpu(), torch.arange(b - a)):
                raise ValueError("feature cache: positions must count 0, 1, ... over each row's real tokens")
        elif a != 0 and not any_padding:
            raise ValueError("feature cache: the batch is not right-padded (and no position ids count over real tokens)")
        spans.append((a, b))
    return spans


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states
