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
other frozen blocks pass them through. Sequences must be right-padded (the features of a
sequence's real tokens do not depend on padding after them, nor on the batch).
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
    def __init__(self, model, trainable_layers: int):
        blocks = list(transformer_blocks(model))
        if not 1 <= trainable_layers < len(blocks):
            raise ValueError(f"feature cache: trainable_layers must leave frozen blocks below (1..{len(blocks) - 1})")
        self.model = model
        self.lower, self.first_trainable = blocks[: len(blocks) - trainable_layers], blocks[len(blocks) - trainable_layers]
        if any(p.requires_grad for b in self.lower for p in b.parameters()) or any(
                p.requires_grad for p in model.get_input_embeddings().parameters()):
            raise ValueError("feature cache: the embeddings and the lower blocks must be frozen (freeze_lower_layers)")
        self.features: dict[tuple[int, ...], torch.Tensor] = {}
        self._batch = None  # (input_ids, attention_mask) of the forward pass in progress
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
            self._batch = (ids, kwargs.get("attention_mask"))

        self._hook = self.model.register_forward_pre_hook(remember_batch, with_kwargs=True)
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
        ids, mask = self._batch
        if mask is None:
            mask = torch.ones_like(ids)
        lengths = mask.sum(1)
        positions = torch.arange(ids.shape[1], device=ids.device)
        if not torch.equal(mask.bool(), positions[None, :] < lengths[:, None]):
            raise ValueError("feature cache: the batch is not right-padded")
        out = torch.zeros_like(hidden_states)
        missing = [i for i in range(len(ids)) if tuple(ids[i, : lengths[i]].tolist()) not in self.features]
        if missing:  # not prefilled: compute them now, once, with the real lower blocks
            batch = self._batch
            self.__exit__()
            try:
                self.prefill([ids[i, : lengths[i]].tolist() for i in missing],
                             pad_token_id=self.model.config.pad_token_id or 0)
            finally:
                self.__enter__()
                self._batch = batch
        for i in range(len(ids)):
            out[i, : lengths[i]] = self.features[tuple(ids[i, : lengths[i]].tolist())]
        return out


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states
