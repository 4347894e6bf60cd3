"""Hand-checked tests of rlhf/ppo_core.py (the PPO math). Arithmetic is written out in comments."""

import math

import pytest
import torch

from alignkit.rlhf.ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    apply_missing_eos_penalty,
    compute_rewards,
    entropy_from_logits,
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    response_mask_after_eos,
)

T_ = torch.tensor


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=tol, rtol=0)


def garbage_like(x, mask, fill):
    """x with every masked-out position replaced by `fill` (a big number, inf or nan)."""
    return torch.where(mask.bool(), x, torch.full_like(x, fill))


# ------------------------------------------------------------------------------------------
# response_mask_after_eos
# ------------------------------------------------------------------------------------------


def test_mask_keeps_first_eos_and_drops_after_and_padding():
    eos, pad = 2, 0
    ids = T_([
        [5, 6, 2, 0, 0],   # ends at t=2 then padding
        [5, 2, 7, 2, 0],   # tokens after the first EOS (7, 2) are garbage, not the reply
        [5, 6, 7, 8, 9],   # never ends: all real, ended=False
        [2, 0, 0, 0, 0],   # empty reply: just the EOS, which the policy chose
    ])
    mask, ended = response_mask_after_eos(ids, eos, pad)
    assert mask.dtype == torch.bool
    assert mask.int().tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0],
    ]
    assert ended.tolist() == [True, True, False, True]


def test_mask_pad_equal_to_eos_keeps_the_first():
    mask, ended = response_mask_after_eos(T_([[5, 6, 2, 2, 2], [5, 6, 7, 8, 9]]), eos_token_id=2, pad_token_id=2)
    assert mask.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert ended.tolist() == [True, False]


def test_mask_several_eos_ids():
    # ChatML: <|im_end|>=3 and eos=2 both stop; the first of either ends the reply.
    mask, ended = response_mask_after_eos(T_([[5, 3, 2, 0], [5, 6, 2, 0], [5, 6, 7, 0]]), [2, 3], 0)
    assert mask.int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    assert ended.tolist() == [True, True, False]


# ------------------------------------------------------------------------------------------
# masked statistics and whitening
# ------------------------------------------------------------------------------------------


def test_masked_mean_and_var_by_hand():
    x = T_([[1.0, 2.0, 3.0, 100.0], [4.0, -50.0, 7.0, 9.0]])
    m = T_([[1, 1, 1, 0], [1, 0, 0, 0]])
    # real entries 1,2,3,4: mean 10/4 = 2.5
    close(masked_mean(x, m), 2.5)
    # per row: (1+2+3)/3 = 2, 4/1 = 4
    close(masked_mean(x, m, dim=1), [2.0, 4.0])
    # squared deviations 2.25+0.25+0.25+2.25 = 5 ; biased 5/4, unbiased 5/3
    close(masked_var(x, m, unbiased=False), 1.25)
    close(masked_var(x, m), 5 / 3)
    # nan / inf in padding must not leak (nan * 0 would be nan)
    for fill in (float("nan"), float("inf"), -1e30):
        xg = garbage_like(x, m, fill)
        close(masked_mean(xg, m), 2.5)
        close(masked_var(xg, m), 5 / 3)


def test_masked_mean_empty_row_is_zero_and_var_needs_entries():
    x = T_([[1.0, 2.0], [3.0, 4.0]])
    m = T_([[1, 1], [0, 0]])
    close(masked_mean(x, m, dim=1), [1.5, 0.0])
    with pytest.raises(ValueError):
        masked_var(x, torch.zeros_like(m))
    with pytest.raises(ValueError):
        masked_var(x, T_([[1, 0], [0, 0]]))


def test_whiten_uses_only_masked_entries():
    torch.manual_seed(0)
    x = torch.randn(4, 9, dtype=torch.float64) * 3 + 5
    m = torch.ones(4, 9, dtype=torch.bool)
    m[0, 6:] = False
    m[2, 3:] = False
    m[3, 1:] = False
    xg = garbage_like(x, m, 1e6)  # huge padding: would wreck mean/std if counted
    w = masked_whiten(xg, m)
    real = w[m]
    close(real.mean(), 0.0, 1e-9)
    close(real.std(unbiased=True), 1.0, 1e-6)
    assert (w[~m] == 0).all()
    # same result as whitening the real entries alone
    ref = (x[m] - x[m].mean()) / x[m].std()
    close(real, ref, 1e-6)

    # shift_mean=False keeps the mean, rescales the spread
    w2 = masked_whiten(xg, m, shift_mean=False)
    close(w2[m].mean(), x[m].mean(), 1e-9)
    close(w2[m].std(), 1.0, 1e-6)


def test_whiten_small_by_hand():
    # real entries 1,2,3,4: mean 2.5, unbiased var 5/3, std sqrt(5/3) = 1.2909944
    x = T_([[1.0, 2.0, 3.0, 4.0, 99.0]], dtype=torch.float64)
    m = T_([[1, 1, 1, 1, 0]])
    s = math.sqrt(5 / 3)
    close(masked_whiten(x, m), [[-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s, 0.0]], 1e-6)
    close(masked_whiten(x, m, shift_mean=False), [[2.5 - 1.5 / s, 2.5 - 0.5 / s, 2.5 + 0.5 / s, 2.5 + 1.5 / s, 0.0]],
          1e-6)


# ------------------------------------------------------------------------------------------
# logprobs and entropy
# ------------------------------------------------------------------------------------------


def test_logprobs_from_logits_matches_naive():
    torch.manual_seed(1)
    B, T, V = 3, 5, 11
    logits = torch.randn(B, T, V, dtype=torch.float64) * 4
    labels = torch.randint(0, V, (B, T))
    got = logprobs_from_logits(logits, labels)
    # naive 1: log_softmax + gather; naive 2: the definition, scalar by scalar
    naive = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(got, naive, 1e-12)
    b, t = 1, 3
    z = logits[b, t].tolist()
    by_hand = z[labels[b, t]] - math.log(sum(math.exp(v) for v in z))
    close(got[b, t], by_hand, 1e-12)


def test_logprobs_gradient_matches_naive():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 4))
    w = torch.randn(2, 4)
    (logprobs_from_logits(logits, labels) * w).sum().backward()
    g = logits.grad.clone()
    logits.grad = None
    (torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * w).sum().backward()
    close(g, logits.grad, 1e-6)


def test_logprobs_half_precision_upcasts():
    torch.manual_seed(3)
    logits = (torch.randn(2, 6, 300) * 5).to(torch.bfloat16)
    labels = torch.randint(0, 300, (2, 6))
    got = logprobs_from_logits(logits, labels)
    assert got.dtype == torch.float32
    ref = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    close(got, ref, 1e-5)


def test_entropy_from_logits():
    # uniform over 4 -> log 4; near one-hot -> ~0; random -> -sum p log p
    close(entropy_from_logits(torch.zeros(1, 1, 4)), [[math.log(4)]], 1e-6)
    close(entropy_from_logits(T_([[[100.0, 0.0, 0.0]]])), [[0.0]], 1e-6)
    torch.manual_seed(4)
    z = torch.randn(2, 3, 9, dtype=torch.float64)
    p = torch.softmax(z, -1)
    close(entropy_from_logits(z), -(p * p.log()).sum(-1), 1e-12)


# ------------------------------------------------------------------------------------------
# KL penalty, rewards, missing EOS
# ------------------------------------------------------------------------------------------


def test_kl_kinds_by_hand():
    lp = T_([[-1.0, -2.0]], dtype=torch.float64)
    ref = T_([[-1.5, -1.0]], dtype=torch.float64)
    # d = lp - ref = [0.5, -1.0]
    close(kl_penalty(lp, ref, "k1"), [[0.5, -1.0]])
    close(kl_penalty(lp, ref, "abs"), [[0.5, 1.0]])
    close(kl_penalty(lp, ref, "mse"), [[0.125, 0.5]])  # 0.5 * d^2
    # k3 = exp(-d) - 1 + d: e^-0.5 - 0.5 = 0.6065307 - 0.5 = 0.1065307 ; e^1 - 2 = 0.7182818
    close(kl_penalty(lp, ref, "k3"), [[math.exp(-0.5) - 0.5, math.e - 2.0]])
    assert (kl_penalty(lp, ref, "k3") >= 0).all()
    # equal policies: 0 for every kind
    for kind in ("k1", "abs", "mse", "k3"):
        close(kl_penalty(lp, lp, kind), [[0.0, 0.0]])
    with pytest.raises(ValueError):
        kl_penalty(lp, ref, "full")


def test_k3_is_unbiased_estimate_of_kl():
    # tokens sampled from p: E_p[k1] = E_p[k3] = KL(p || q)
    torch.manual_seed(5)
    p = torch.softmax(torch.randn(6, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(6, dtype=torch.float64), -1)
    exact = (p * (p / q).log()).sum()
    idx = torch.multinomial(p, 200_000, replacement=True)
    lp, lq = p.log()[idx], q.log()[idx]
    close(kl_penalty(lp, lq, "k1").mean(), exact, 0.02)
    close(kl_penalty(lp, lq, "k3").mean(), exact, 0.02)


def test_compute_rewards_by_hand():
    score = T_([2.0, -1.0], dtype=torch.float64)
    mask = T_([[1, 1, 1, 0], [1, 1, 0, 0]])
    ref = torch.zeros(2, 4, dtype=torch.float64)
    lp = T_([[0.2, -0.1, 0.3, 9.0], [0.5, 0.4, 9.0, 9.0]], dtype=torch.float64)  # 9.0 = padding garbage
    rewards, non_score, kl = compute_rewards(score, lp, ref, mask, kl_coef=0.1, kl_kind="k1")
    # kl = d (k1); non_score = -0.1 * d; score lands on the last real token (t=2 in row 0, t=1 in row 1)
    close(kl, [[0.2, -0.1, 0.3, 0.0], [0.5, 0.4, 0.0, 0.0]])
    close(non_score, [[-0.02, 0.01, -0.03, 0.0], [-0.05, -0.04, 0.0, 0.0]])
    close(rewards, [[-0.02, 0.01, -0.03 + 2.0, 0.0], [-0.05, -0.04 - 1.0, 0.0, 0.0]])
    # padding values must not matter
    r2, _, _ = compute_rewards(score, garbage_like(lp, mask, float("nan")), garbage_like(ref, mask, 1e9), mask,
                               0.1, "k1")
    close(r2, rewards)
    # tensor coefficient, other kind: mse = 0.5 d^2 -> row 1 t=0: -0.1 * 0.125 = -0.0125
    r3, _, kl3 = compute_rewards(score, lp, ref, mask, torch.tensor(0.1, dtype=torch.float64), "mse")
    close(kl3[1, 0], 0.125)
    close(r3[1, 0], -0.0125)


def test_compute_rewards_rejects_empty_row():
    with pytest.raises(ValueError):
        compute_rewards(T_([1.0]), torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), 0.1)


def test_missing_eos_penalty():
    scores = T_([1.0, 0.5, -0.3])
    ended = T_([True, False, False])
    # subtract (default): 0.5 - 1 = -0.5 ; -0.3 - 1 = -1.3 ; the ended row is untouched
    close(apply_missing_eos_penalty(scores, ended, 1.0), [1.0, -0.5, -1.3])
    # replace: every unfinished row scores -penalty, whatever the RM said
    close(apply_missing_eos_penalty(scores, ended, 1.0, replace=True), [1.0, -1.0, -1.0])
    close(apply_missing_eos_penalty(scores, ended, 0.0), scores)
    assert scores.tolist() == pytest.approx([1.0, 0.5, -0.3])  # not modified in place
    with pytest.raises(ValueError):
        apply_missing_eos_penalty(scores, ended, -1.0)


def test_mask_and_penalty_pipeline():
    ids = T_([[5, 2, 0], [5, 6, 7]])
    mask, ended = response_mask_after_eos(ids, 2, 0)
    scores = apply_missing_eos_penalty(T_([0.3, 0.3]), ended, 0.5)
    close(scores, [0.3, -0.2])
    rewards, _, _ = compute_rewards(scores, torch.zeros(2, 3), torch.zeros(2, 3), mask, 0.05)
    close(rewards, [[0.0, 0.3, 0.0], [0.0, 0.0, -0.2]])


# ------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------

# T=3, gamma=0.9, lam=0.8 (gamma*lam = 0.72), r = [0, 0, 1], V = [0.5, 0.4, 0.6], V after end = 0
#   t=2: delta = 1 + 0.9*0   - 0.6 = 0.4              A2 = 0.4
#   t=1: delta = 0 + 0.9*0.6 - 0.4 = 0.14             A1 = 0.14 + 0.72*0.4   = 0.428
#   t=0: delta = 0 + 0.9*0.4 - 0.5 = -0.14            A0 = -0.14 + 0.72*0.428 = 0.16816
#   returns = A + V = [0.66816, 0.828, 1.0]
GAE_R = [0.0, 0.0, 1.0]
GAE_V = [0.5, 0.4, 0.6]
GAE_A = [0.16816, 0.428, 0.4]
GAE_RET = [0.66816, 0.828, 1.0]


def test_gae_by_hand():
    r = T_([GAE_R], dtype=torch.float64)
    v = T_([GAE_V], dtype=torch.float64)
    adv, ret = gae(r, v, torch.ones(1, 3), gamma=0.9, lam=0.8)
    close(adv, [GAE_A], 1e-12)
    close(ret, [GAE_RET], 1e-12)


def test_gae_special_cases():
    r = T_([GAE_R], dtype=torch.float64)
    v = T_([GAE_V], dtype=torch.float64)
    m = torch.ones(1, 3)
    # lam=1, gamma=1: A_t = sum_{k>=t} r_k - V_t (Monte Carlo) = [1-0.5, 1-0.4, 1-0.6]
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    close(adv, [[0.5, 0.6, 0.4]], 1e-12)
    close(ret, [[1.0, 1.0, 1.0]], 1e-12)
    # lam=0: one-step TD errors: delta = [0+0.9*0.4-0.5, 0+0.9*0.6-0.4, 1-0.6] = [-0.14, 0.14, 0.4]
    adv, _ = gae(r, v, m, gamma=0.9, lam=0.0)
    close(adv, [[-0.14, 0.14, 0.4]], 1e-12)


def test_gae_ignores_padding_and_post_eos_positions():
    # row 0: the hand case followed by 2 padded positions full of garbage
    # row 1: the hand case with a masked hole at t=1 (skipped, not a step)
    # row 2: a single real token: A = r - V = 2 - 0.5 = 1.5
    r = T_([[0.0, 0.0, 1.0, 50.0, 50.0],
            [0.0, 77.0, 0.0, 1.0, 0.0],
            [2.0, 3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    v = T_([[0.5, 0.4, 0.6, 9.0, 9.0],
            [0.5, -8.0, 0.4, 0.6, 4.0],
            [0.5, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    m = T_([[1, 1, 1, 0, 0],
            [1, 0, 1, 1, 0],
            [1, 0, 0, 0, 0]])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8)
    close(adv[0], GAE_A + [0.0, 0.0], 1e-12)
    close(ret[0], GAE_RET + [0.0, 0.0], 1e-12)
    close(adv[1], [GAE_A[0], 0.0, GAE_A[1], GAE_A[2], 0.0], 1e-12)
    close(adv[2], [1.5, 0, 0, 0, 0], 1e-12)
    close(ret[2], [2.0, 0, 0, 0, 0], 1e-12)
    # changing anything masked changes nothing
    adv2, ret2 = gae(garbage_like(r, m, float("nan")), garbage_like(v, m, float("inf")), m, 0.9, 0.8)
    close(adv2, adv, 0)
    close(ret2, ret, 0)


def test_gae_does_not_track_gradients():
    v = torch.tensor([GAE_V], requires_grad=True)
    adv, ret = gae(torch.tensor([GAE_R]), v, torch.ones(1, 3), 0.9, 0.8)
    assert not adv.requires_grad and not ret.requires_grad


# ------------------------------------------------------------------------------------------
# PPO losses
# ------------------------------------------------------------------------------------------

# eps = 0.2, old logprob 0, new logprob log(rho):
#   a: A=+1, rho=1.1 (inside)        pg1=-1.1, pg2=-1.1          -> -1.1  unclipped
#   b: A=+1, rho=1.5 (above 1.2)     pg1=-1.5, pg2=-1.2          -> -1.2  CLIPPED (pg2 > pg1)
#   c: A=-2, rho=0.5 (below 0.8)     pg1= 1.0, pg2= 2*0.8=1.6    ->  1.6  CLIPPED
#   d: A=+1, rho=0.5 (below, but A>0) pg1=-0.5, pg2=-0.8         -> -0.5  unclipped (gradient still flows)
#   loss = (-1.1 - 1.2 + 1.6 - 0.5) / 4 = -1.2 / 4 = -0.3 ; clipfrac = 2/4 = 0.5
#   approx_kl = mean((rho-1) - log rho)
#     = (0.1 - ln1.1 + 0.5 - ln1.5 + 2*(-0.5 + ln2)) / 4 = (0.0046898 + 0.0945349 + 0.3862944) / 4 = 0.1213798
#   d loss / d newlogp = max-branch derivative / 4: a: -A*rho/4 = -0.275 ; b, c: 0 (clipped) ; d: -0.5/4 = -0.125
POL_RHO = [1.1, 1.5, 0.5, 0.5]
POL_ADV = [1.0, 1.0, -2.0, 1.0]


def test_policy_loss_by_hand():
    new = torch.tensor([[math.log(x) for x in POL_RHO]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 4, dtype=torch.float64)
    adv = T_([POL_ADV], dtype=torch.float64)
    loss, clipfrac, approx_kl = ppo_policy_loss(new, old, adv, torch.ones(1, 4), clip_range=0.2)
    close(loss, -0.3, 1e-12)
    close(clipfrac, 0.5)
    expected_kl = sum((x - 1) - math.log(x) for x in POL_RHO) / 4
    close(approx_kl, expected_kl, 1e-12)
    close(approx_kl, 0.1213798, 1e-7)
    loss.backward()
    close(new.grad, [[-0.275, 0.0, 0.0, -0.125]], 1e-12)


def test_policy_loss_on_policy_equals_minus_mean_advantage():
    # rho = 1 everywhere (first PPO epoch): loss = -mean(A), nothing clipped, KL 0
    adv = T_([[1.0, -3.0, 2.0]])
    lp = T_([[-0.3, -1.2, -2.0]])
    loss, clipfrac, kl = ppo_policy_loss(lp, lp, adv, torch.ones(1, 3), 0.2)
    close(loss, 0.0)  # -(1 - 3 + 2)/3
    close(clipfrac, 0.0)
    close(kl, 0.0)


def test_policy_loss_ignores_masked_tokens():
    new = torch.tensor([[math.log(x) for x in POL_RHO] + [80.0, float("nan")]], dtype=torch.float64,
                       requires_grad=True)
    old = torch.tensor([[0.0] * 4 + [-80.0, 3.0]], dtype=torch.float64)
    adv = T_([POL_ADV + [1e6, float("inf")]], dtype=torch.float64)
    m = T_([[1, 1, 1, 1, 0, 0]])
    loss, clipfrac, approx_kl = ppo_policy_loss(new, old, adv, m, 0.2)
    close(loss, -0.3, 1e-12)
    close(clipfrac, 0.5)
    close(approx_kl, 0.1213798, 1e-7)
    loss.backward()  # garbage in padding must not turn gradients into nan either
    close(new.grad, [[-0.275, 0.0, 0.0, -0.125, 0.0, 0.0]], 1e-12)


# eps = 0.2, V_old = 0:
#   a: V=0.1,  R=1  (inside)     vf1=0.81, V_clip=0.1,  vf2=0.81  -> 0.81 unclipped
#   b: V=0.5,  R=1  (outside)    vf1=0.25, V_clip=0.2,  vf2=0.64  -> 0.64 CLIPPED
#   c: V=0.5,  R=0  (outside)    vf1=0.25, V_clip=0.2,  vf2=0.04  -> 0.25 unclipped (moved too far, but clip term smaller)
#   d: V=-0.5, R=1  (outside)    vf1=2.25, V_clip=-0.2, vf2=1.44  -> 2.25 unclipped
#   loss = 0.5 * (0.81 + 0.64 + 0.25 + 2.25) / 4 = 0.5 * 3.95 / 4 = 0.49375 ; clipfrac = 1/4
#   d loss / dV = 0.5 * 2 (V - R) / 4 on unclipped: a: (0.1-1)/4 = -0.225 ; b: 0 ; c: 0.5/4 = 0.125 ; d: -1.5/4 = -0.375
VAL_V = [0.1, 0.5, 0.5, -0.5]
VAL_R = [1.0, 1.0, 0.0, 1.0]


def test_value_loss_by_hand():
    v = torch.tensor([VAL_V], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 4, dtype=torch.float64)
    ret = T_([VAL_R], dtype=torch.float64)
    loss, clipfrac = ppo_value_loss(v, old, ret, torch.ones(1, 4), clip_range_value=0.2)
    close(loss, 0.49375, 1e-12)
    close(clipfrac, 0.25)
    loss.backward()
    close(v.grad, [[-0.225, 0.0, 0.125, -0.375]], 1e-12)
    # no clipping: 0.5 * (0.81 + 0.25 + 0.25 + 2.25) / 4 = 0.445
    loss_nc, cf_nc = ppo_value_loss(v.detach(), old, ret, torch.ones(1, 4), None)
    close(loss_nc, 0.445, 1e-12)
    close(cf_nc, 0.0)


def test_value_loss_ignores_masked_tokens():
    v = torch.tensor([VAL_V + [float("nan"), 1e8]], dtype=torch.float64, requires_grad=True)
    old = T_([[0.0] * 4 + [5.0, float("inf")]], dtype=torch.float64)
    ret = T_([VAL_R + [-1e8, 2.0]], dtype=torch.float64)
    m = T_([[1, 1, 1, 1, 0, 0]])
    loss, clipfrac = ppo_value_loss(v, old, ret, m, 0.2)
    close(loss, 0.49375, 1e-12)
    close(clipfrac, 0.25)
    loss.backward()
    close(v.grad, [[-0.225, 0.0, 0.125, -0.375, 0.0, 0.0]], 1e-12)


def test_losses_accept_float_masks():
    m = torch.ones(1, 4, dtype=torch.float32)
    new = torch.tensor([[math.log(x) for x in POL_RHO]])
    loss, _, _ = ppo_policy_loss(new, torch.zeros(1, 4), T_([POL_ADV]), m, 0.2)
    close(loss, -0.3, 1e-6)


# ------------------------------------------------------------------------------------------
# KL controllers
# ------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_by_hand():
    c = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # kl 9: err = 9/6 - 1 = 0.5 -> clipped to 0.2 ; beta = 0.2 * (1 + 0.2*256/10000) = 0.2 * 1.00512 = 0.201024
    close(c.update(9.0, n_steps=256), 0.201024, 1e-12)
    # kl 5.4: err = 0.9 - 1 = -0.1 ; beta = 0.201024 * (1 - 0.1*0.0256) = 0.201024 * 0.99744 = 0.20050937856
    close(c.update(torch.tensor(5.4), n_steps=256), 0.20050937856, 1e-7)
    # kl 0 (far below): err clipped to -0.2 ; beta *= 1 - 0.2*0.0256 = 0.99488
    close(c.update(0.0, 256), 0.20050937856 * 0.99488, 1e-7)
    # kl on target: no change
    before = c.value
    close(c.update(6.0, 256), before, 1e-12)


def test_kl_controllers_state_dict_roundtrip():
    c = AdaptiveKLController(0.1, 6.0, 1000)
    c.update(12.0, 64)
    state = c.state_dict()
    c2 = AdaptiveKLController(0.5, 1.0, 5)
    c2.load_state_dict(state)
    assert (c2.value, c2.target, c2.horizon) == (c.value, c.target, c.horizon)
    assert c2.update(3.0, 64) == c.update(3.0, 64)

    f = FixedKLController(0.05)
    assert f.update(100.0, 64) == 0.05
    f2 = FixedKLController(1.0)
    f2.load_state_dict(f.state_dict())
    assert f2.value == 0.05
    with pytest.raises(ValueError):
        f2.load_state_dict(c.state_dict())
    with pytest.raises(ValueError):
        c2.load_state_dict(f.state_dict())
