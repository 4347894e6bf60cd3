"""The math of PPO for RLHF: masks, whitening, log-probs, KL penalties, GAE, clipped losses, KL control.

Pure torch, no model code, so every piece can be checked by hand (see ``tests/test_ppo_core.py``).
Written from the literature, not from another library:

* Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences" and Ouyang et al. 2022
  (InstructGPT): reward = RM score - beta * KL(pi || pi_ref) per token; adaptive KL controller.
* Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation" (GAE); Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (clipped
  surrogate objective).
* Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR
  Summarization" (called "N+ details" below): EOS trick, truncation after EOS, whitening,
  value clipping, the definitions of clip fraction.
* Schulman 2020, "Approximating KL Divergence" (blog): the k1 / k2 / k3 estimators.

Conventions used everywhere:

* Tensors are ``[B, T]`` over *response* tokens (the prompt is not included).
* ``mask`` is bool or float ``[B, T]``; 1 = a real response token, 0 = padding or a token after the
  first EOS. Masked positions never influence a result: values there are selected away with
  ``torch.where`` (not multiplied by 0, which would let a NaN/inf in padding leak through as
  ``nan * 0 = nan``), and per-token outputs are 0 there.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

__all__ = [
    "response_mask_after_eos", "masked_mean", "masked_sum", "masked_var", "masked_whiten",
    "logprobs_from_logits", "entropy_from_logits", "kl_penalty", "KL_KINDS", "compute_rewards",
    "apply_missing_eos_penalty", "gae", "ppo_policy_loss", "ppo_value_loss", "AdaptiveKLController",
    "FixedKLController"
]

Number = Union[float, int]


def _bool_mask(mask: torch.Tensor, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    mask = mask.bool() if mask.dtype != torch.bool else mask
    if like is not None and mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match tensor shape {tuple(like.shape)}")
    return mask


# --------------------------------------------------------------------------------------------
# Masks


def response_mask_after_eos(
    response_ids: torch.Tensor,
    eos_token_id: Union[int, list, tuple, None],
    pad_token_id: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mask of real response tokens: 1 up to *and including* the first EOS, 0 after it.

    ``mask[b, t] = 1  iff  no EOS in response_ids[b, :t]  and  response_ids[b, t] is not padding``

    where a token is "padding" if it equals ``pad_token_id`` and is not an EOS (so ``pad == eos``,
    a common setup, still keeps the first EOS). The EOS itself is kept because the policy chose to
    stop there: its log-prob must be trained, and the sequence score is credited to it (N+ details,
    "EOS trick": everything after the first EOS is truncated/padded and ignored).

    ``eos_token_id`` may be an int or a list of ints (several stop tokens, e.g. ChatML's
    ``<|im_end|>`` and the tokenizer's EOS).

    Returns ``(mask, ended)``: ``mask`` bool ``[B, T]``; ``ended`` bool ``[B]``, True where the row
    contains an EOS (a reply that stopped by itself rather than being cut at max length).
    """
    if response_ids.dim() != 2:
        raise ValueError(f"response_ids must be [B, T], got shape {tuple(response_ids.shape)}")
    if eos_token_id is None:
        is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    elif isinstance(eos_token_id, (list, tuple)):
        is_eos = torch.isin(response_ids, torch.tensor(list(eos_token_id), device=response_ids.device))
    else:
        is_eos = response_ids == int(eos_token_id)
    # number of EOS strictly before t (exclusive cumsum): 0 means t is at or before the first EOS
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = eos_before == 0
    if pad_token_id is not None:
        mask &= (response_ids != int(pad_token_id)) | is_eos
    ended = is_eos.any(dim=1)
    return mask, ended


# --------------------------------------------------------------------------------------------
# Masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """``sum_t x_t * m_t`` over ``dim`` (all elements if None); masked entries never contribute."""
    m = _bool_mask(mask, x)
    xz = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return xz.sum() if dim is None else xz.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean over real entries: ``sum(x * m) / sum(m)`` over ``dim`` (all elements if None).

    Where a slice has no real entry the result is 0 (the count is clamped to 1), not NaN: a
    batch whose responses are all empty must not turn a loss into NaN and poison the optimizer.
    This is a *token-level* mean (every real token weighs the same, as in N+ details), not a mean
    of per-sequence means.
    """
    m = _bool_mask(mask, x)
    count = m.sum() if dim is None else m.sum(dim=dim)
    return masked_sum(x, m, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the real entries (all of them together, a scalar).

    ``mu = masked_mean(x, m)``; ``var = sum(m * (x - mu)^2) / N``, with Bessel's correction
    ``var *= N / (N - 1)`` when ``unbiased``; ``N = sum(m)``.

    Raises ``ValueError`` when there are no real entries (or only one and ``unbiased``): the
    variance is undefined there and silently returning 0 would make whitening divide by ~0.
    """
    m = _bool_mask(mask, x)
    n = int(m.sum().item())
    if n == 0:
        raise ValueError("masked_var: mask has no real entries")
    if unbiased and n < 2:
        raise ValueError("masked_var: unbiased variance needs at least 2 real entries")
    mu = masked_mean(x, m)
    var = masked_sum((x - mu) ** 2, m) / n
    if unbiased:
        var = var * (n / (n - 1))
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise with statistics of the real entries only.

    ``y = (x - mu) / sqrt(var + eps)``; with ``shift_mean=False`` the mean is added back,
    ``y = (x - mu) / sqrt(var + eps) + mu`` (only the scale changes, used for rewards, whose sign
    carries meaning; N+ details whitens rewards without shifting and advantages with shifting).
    ``mu`` and ``var`` (unbiased) come from ``masked_mean``/``masked_var``, so padding cannot drag
    them. Masked positions of the output are 0.
    """
    m = _bool_mask(mask, x)
    mu = masked_mean(x, m)
    var = masked_var(x, m, unbiased=True)
    y = (x - mu) * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mu
    return torch.where(m, y, torch.zeros((), dtype=y.dtype, device=y.device))


# --------------------------------------------------------------------------------------------
# Log-probs and entropy


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision logsumexp over a 50k+ vocabulary loses several bits; compute in fp32 (fp64 stays).
    return torch.float64 if dtype == torch.float64 else torch.float32


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label: ``log softmax(logits)[..., label] = z_label - logsumexp(z)``.

    ``logits`` ``[B, T, V]`` (already aligned with ``labels`` ``[B, T]``, i.e. the logits at
    position t-1 predict token t, and already divided by the sampling temperature if one was used:
    N+ details notes that forgetting the temperature makes the "old" log-probs disagree with the
    sampler's). Returns ``[B, T]`` in fp32 (fp64 for fp64 input); differentiable.

    Memory: a plain ``log_softmax(logits).gather(...)`` materialises another ``[B, T, V]`` tensor
    (in fp32: 2 GB for B=8, T=1024, V=64k) and autograd keeps it for backward. We gather the label
    logit and subtract a ``logsumexp`` one batch row at a time, so the temporaries are at most
    ``[T, V]``; for fp32 input autograd saves only views of ``logits`` (no extra ``[B, T, V]``), and
    under ``torch.no_grad()`` (rollouts, reference model) the peak is one ``[T, V]`` row. Half
    precision input is upcast row by row; with grad enabled those fp32 rows are saved for backward.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align")
    dt = _compute_dtype(logits.dtype)
    labels = labels.long()
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        row = row_logits.to(dt)
        picked = row.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row, dim=-1))
    if not rows:
        return torch.zeros(labels.shape, dtype=dt, device=logits.device)
    return torch.stack(rows)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical at each position: ``H = logsumexp(z) - sum_v softmax(z)_v * z_v``.

    (Equal to ``-sum p log p`` with ``log p = z - logsumexp(z)``, but never forms ``log p`` of tiny
    probabilities, so no ``0 * -inf``.) ``[..., V] -> [...]`` in fp32; computed one leading row at a
    time for the same memory reason as ``logprobs_from_logits``.
    """
    dt = _compute_dtype(logits.dtype)
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)
        squeeze = True
    else:
        squeeze = False
    rows = []
    for row_logits in logits:
        z = row_logits.to(dt)
        p = torch.softmax(z, dim=-1)
        rows.append(torch.logsumexp(z, dim=-1) - (p * z).sum(dim=-1))
    out = torch.stack(rows) if rows else torch.zeros(logits.shape[:-1], dtype=dt, device=logits.device)
    return out.squeeze(0) if squeeze else out


# --------------------------------------------------------------------------------------------
# KL penalty and rewards

KL_KINDS = ("k1", "abs", "mse", "k3")


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from the sampled token, ``d = logp - logp_ref``:

    * ``"k1"``:  ``d``                         unbiased, can be negative per token (InstructGPT's).
    * ``"abs"``: ``|d|``                       always >= 0, biased.
    * ``"mse"``: ``0.5 * d^2``                 Schulman's k2; low variance, biased.
    * ``"k3"``:  ``(exp(-d) - 1) + d``         Schulman's k3 = (r - 1) - log r with r = p_ref / p;
      unbiased and always >= 0.

    Tokens are sampled from ``pi``, which is what makes k1 and k3 unbiased for KL(pi || pi_ref)
    (Schulman 2020). In k3 ``-d`` is clamped to <= 20 before ``exp`` so one token the policy has
    made very unlikely relative to the reference cannot overflow to inf.
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "mse":
        return 0.5 * d.square()
    if kind == "k3":
        neg = (-d).clamp(max=20.0)
        return torch.expm1(neg) - neg
    raise ValueError(f"unknown KL kind {kind!r}; expected one of {KL_KINDS}")


def _last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (rows must have at least one)."""
    m = _bool_mask(mask)
    if not bool(m.any(dim=1).all()):
        empty = (~m.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"rows {empty} have no real response token; the score would have nowhere to go")
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    return torch.where(m, positions, torch.full_like(positions, -1)).max(dim=1).values


def compute_rewards(
    score: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: Union[Number, torch.Tensor],
    kl_kind: str = "k1",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token rewards for PPO (Ziegler et al. 2019; InstructGPT eq. 2):

    ``r_t = -beta * KL_t  +  [t == last real token] * score``,  ``KL_t = kl_penalty(logp_t, logp_ref_t)``

    The reward model scores whole sequences, so the score is a sparse reward at the final token
    (the EOS when the reply ended); the KL term is dense, one per token. Masked positions get 0.

    ``score`` ``[B]``; ``logprobs``/``ref_logprobs``/``mask`` ``[B, T]``; ``kl_coef`` a float or a
    0-d tensor (beta, e.g. ``controller.value``). Returns ``(rewards, non_score_reward, kl)``, all
    ``[B, T]``: ``non_score_reward = -beta * KL_t`` and ``kl`` the per-token KL (both 0 where
    masked), for logging. Raises ``ValueError`` if a row has no real token.
    """
    m = _bool_mask(mask, logprobs)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = torch.where(m, kl_penalty(logprobs, ref_logprobs, kl_kind), zero)
    non_score_reward = -kl_coef * kl
    last = _last_real_index(m)
    rewards = non_score_reward.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += score.to(rewards.dtype)
    return rewards, non_score_reward, kl


def apply_missing_eos_penalty(
    scores: torch.Tensor, ended: torch.Tensor, penalty: float, replace: bool = False
) -> torch.Tensor:
    """Penalise replies that never produced an EOS (cut off at the generation length limit).

    Default (``replace=False``): the penalty is **subtracted**, ``s' = s - penalty`` where not ended;
    the reward model's judgement of the content is kept and the policy is still pushed to stop.
    With ``replace=True`` the score is **replaced** by the constant ``s' = -penalty``, as in
    lm-human-preferences / N+ details ("EOS trick", penalty reward -1 -> ``penalty=1.0,
    replace=True``): a truncated reply is scored as bad however good its prefix looks, which is
    stronger but ignores the RM on those rows.

    ``penalty`` must be >= 0 (a negative one would reward rambling). Returns a new tensor.
    """
    if penalty < 0:
        raise ValueError(f"missing-EOS penalty must be >= 0, got {penalty}")
    ended = ended.bool()
    if replace:
        penalised = torch.full_like(scores, -float(penalty))
    else:
        penalised = scores - penalty
    return torch.where(ended, scores, penalised)


# --------------------------------------------------------------------------------------------
# Advantages


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), right to left over real tokens:

    ``delta_t = r_t + gamma * V_{t'} - V_t``,   ``A_t = delta_t + gamma * lam * A_{t'}``

    where ``t'`` is the next *real* token after ``t`` (masked positions are skipped, not treated as
    steps) and ``V_{t'} = A_{t'} = 0`` after the last real token: the episode ends there (the
    bootstrap value of a terminal state is 0; a value head's output on padding is meaningless).
    Returns ``(advantages, returns)`` with ``returns = advantages + values`` (the value targets,
    i.e. TD(lambda) returns); both are 0 at masked positions. Inputs are treated as constants
    (computed without grad): advantages and returns are targets, not things to backprop into.
    Advantages are *not* whitened here; call ``masked_whiten`` on them (N+ details does, per batch).
    """
    m = _bool_mask(mask, rewards)
    if values.shape != rewards.shape:
        raise ValueError(f"values {tuple(values.shape)} and rewards {tuple(rewards.shape)} differ in shape")
    with torch.no_grad():
        rewards = rewards.detach()
        values = values.detach()
        zero = torch.zeros((), dtype=values.dtype, device=values.device)
        B, T = rewards.shape
        next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
        next_adv = torch.zeros(B, dtype=values.dtype, device=values.device)
        advantages = torch.zeros_like(values)
        for t in reversed(range(T)):
            real = m[:, t]
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            adv_t = delta + gamma * lam * next_adv
            adv_t = torch.where(real, adv_t, zero)
            advantages[:, t] = adv_t
            # carry only across real tokens, so a masked gap is invisible to the recursion
            next_value = torch.where(real, values[:, t], next_value)
            next_adv = torch.where(real, adv_t, next_adv)
        returns = torch.where(m, advantages + values, zero)
    return advantages, returns


# --------------------------------------------------------------------------------------------
# Losses


def ppo_policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise:

    ``rho_t = exp(logp_new - logp_old)``
    ``L = masked_mean( max( -A_t * rho_t,  -A_t * clip(rho_t, 1 - eps, 1 + eps) ) )``

    (the max of the negated terms is the min of the objective: a pessimistic bound).
    Returns ``(loss, clipfrac, approx_kl)``; the last two are detached diagnostics:

    * ``clipfrac``: fraction of real tokens where the *clipped* term is strictly larger, i.e. where
      clipping actually removed the gradient (N+ details' ``pg_clipfrac``). Tokens with
      ``|rho - 1| > eps`` whose unclipped term still wins (moving back toward the trust region) are
      not counted: clipping did nothing there.
    * ``approx_kl``: masked mean of Schulman's k3, ``(rho - 1) - log rho``, an unbiased, non-negative
      estimate of ``KL(pi_old || pi_new)`` on tokens sampled from ``pi_old``.

    ``advantages`` and ``old_logprobs`` are used as constants (detached).
    """
    m = _bool_mask(mask, new_logprobs)
    zero = torch.zeros((), dtype=new_logprobs.dtype, device=new_logprobs.device)
    # select before exp so garbage in padding cannot overflow into inf * 0 = nan
    log_ratio = torch.where(m, new_logprobs - old_logprobs.detach(), zero)
    ratio = torch.exp(log_ratio)
    adv = torch.where(m, advantages.detach(), zero)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(pg1, pg2), m)
    with torch.no_grad():
        clipfrac = masked_mean((pg2 > pg1).to(ratio.dtype), m)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, m)
    return loss, clipfrac, approx_kl


def ppo_value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: Optional[float],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (PPO2 baselines; kept by N+ details):

    ``V_clip = V_old + clip(V_new - V_old, -eps, +eps)``
    ``L = 0.5 * masked_mean( max( (V_new - R)^2, (V_clip - R)^2 ) )``

    The max makes it pessimistic like the policy loss: a value prediction may not move more than
    ``eps`` from the one used to compute the advantages in a single PPO epoch. ``clip_range_value``
    ``None`` disables clipping (plain ``0.5 * masked_mean((V_new - R)^2)``).
    Returns ``(loss, clipfrac)``; ``clipfrac`` is the fraction of real tokens where the clipped
    term is strictly larger (so the gradient was removed). ``old_values`` and ``returns`` are
    constants.
    """
    m = _bool_mask(mask, new_values)
    zero = torch.zeros((), dtype=new_values.dtype, device=new_values.device)
    v = torch.where(m, new_values, zero)
    v_old = torch.where(m, old_values.detach(), zero)
    ret = torch.where(m, returns.detach(), zero)
    vf1 = (v - ret).square()
    if clip_range_value is None:
        return 0.5 * masked_mean(vf1, m), torch.zeros((), dtype=v.dtype, device=v.device)
    v_clipped = v_old + torch.clamp(v - v_old, -clip_range_value, clip_range_value)
    vf2 = (v_clipped - ret).square()
    loss = 0.5 * masked_mean(torch.maximum(vf1, vf2), m)
    with torch.no_grad():
        clipfrac = masked_mean((vf2 > vf1).to(v.dtype), m)
    return loss, clipfrac


# --------------------------------------------------------------------------------------------
# KL coefficient controllers


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, sec. 2.2; used by InstructGPT's PPO).

    After each batch with observed KL ``kl`` over ``n_steps`` samples:

    ``e = clip(kl / target - 1, -0.2, 0.2)``,   ``beta <- beta * (1 + e * n_steps / horizon)``

    The proportional error is clipped so one odd batch can move beta by at most
    ``0.2 * n_steps / horizon`` (relative). ``kl`` should be the mean per-*sequence* KL (sum over
    tokens), the quantity ``target`` is stated in (Ziegler et al. use target 6 nats).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: Union[float, torch.Tensor], n_steps: int) -> float:
        """Apply one update; returns the new coefficient."""
        kl = float(current_kl.item() if isinstance(current_kl, torch.Tensor) else current_kl)
        err = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"kind": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", "adaptive") != "adaptive":
            raise ValueError(f"cannot load a {state.get('kind')!r} KL controller state into AdaptiveKLController")
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


class FixedKLController:
    """Constant KL coefficient; ``update`` is a no-op (same interface as ``AdaptiveKLController``)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: Union[float, torch.Tensor], n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", "fixed") != "fixed":
            raise ValueError(f"cannot load a {state.get('kind')!r} KL controller state into FixedKLController")
        self.value = float(state["value"])
