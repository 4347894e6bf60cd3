"""PPO's bookkeeping against the bugs a review of RLHF implementations lists: each test here fails
under one of them (the KL penalty off because the reference is the live policy; log-probs or
values read one position late; advantages whitened over padding; the learning rate logged one
step ahead; the scheduler or the adaptive KL controller not restored on resume; a LoRA policy
that does not learn)."""

from __future__ import annotations


import pytest
import torch
import yaml

from alignkit.config import from_dict
from alignkit.generation import positions_of
from alignkit.rlhf import ppo_core as core
from alignkit.rlhf.ppo import PPOConfig, PPORecipe, Rollout, read_metrics, train
from alignkit.rlhf.ppo_models import TokenValueModel, response_logprobs, response_values
from alignkit.runstore import read_manifest
from tests.test_kill_resume import kill_when
from tests.test_ppo import ROOT, assert_same_metrics, ppo_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def policy(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, tok


def left_padded(tok, texts):
    ids = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([[tok.pad_token_id] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    return input_ids, mask


def test_response_logprobs_are_the_sampling_distributions_own(policy):
    """Teacher-forced log-probs of sampled replies equal the log-softmax of generate's scores at
    the sampled tokens: read one position late, they would not."""
    model, tok = policy
    queries, qmask = left_padded(tok, ["Give three tips.", "What is the capital of France? Answer:"])
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(input_ids=queries, attention_mask=qmask, do_sample=True, max_new_tokens=8, min_new_tokens=8,
                             top_k=0, top_p=1.0, temperature=0.7, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id, eos_token_id=None)
    responses = out.sequences[:, queries.shape[1]:]
    sampled = torch.log_softmax(torch.stack(out.scores, dim=1).float(), -1).gather(-1, responses[..., None])[..., 0]
    ids = torch.cat([queries, responses], 1)
    am = torch.cat([qmask, torch.ones_like(responses)], 1)
    with torch.no_grad():
        teacher, _ = response_logprobs(model, ids, am, queries.shape[1], temperature=0.7)
    assert torch.allclose(teacher, sampled, atol=1e-4)


def test_values_see_the_state_before_each_token_and_not_the_token(tiny_model, policy):
    """V for reply token j is read where token j is predicted: changing token j leaves it alone
    and changes the value of token j + 1 (read one position late, it would see token j)."""
    from transformers import AutoModelForSequenceClassification

    _, tok = policy
    head = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).eval()
    head.config.pad_token_id = tok.pad_token_id
    value = TokenValueModel(head)
    queries, qmask = left_padded(tok, ["Give three tips.", "Say hi"])
    reply = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    changed = reply.clone()
    changed[:, 2] = 99
    ctx = queries.shape[1]
    with torch.no_grad():
        a, b = (response_values(value, torch.cat([queries, r], 1), torch.cat([qmask, torch.ones_like(r)], 1), ctx)
                for r in (reply, changed))
    assert a.shape == reply.shape
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)  # tokens 0..2 are predicted before token 2 is seen
    assert not torch.allclose(a[:, 3], b[:, 3], atol=1e-4)
    # and the value at j is the value model's output at position ctx + j - 1
    with torch.no_grad():
        full = value(torch.cat([queries, reply], 1), torch.cat([qmask, torch.ones_like(reply)], 1),
                     positions_of(torch.cat([qmask, torch.ones_like(reply)], 1)))
    assert torch.allclose(a, full[:, ctx - 1: ctx - 1 + reply.shape[1]])


def test_advantages_are_whitened_over_real_tokens_only():
    """A rollout with padding after EOS: the whitened advantages have mean 0 and variance 1 over
    the real tokens (whitening over the padding too would give neither)."""
    torch.manual_seed(0)
    recipe = PPORecipe.__new__(PPORecipe)
    recipe.cfg = from_dict(PPOConfig, {"model": "x", "reward_model": None, "reward_function": "m:f", "prompts": "p"})
    recipe.kl_ctl = core.FixedKLController(0.05)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    r = Rollout(prompts=[], input_ids=torch.zeros(3, 8, dtype=torch.long), attention_mask=torch.ones(3, 8),
                context_len=2, mask=mask, ended=torch.tensor([False, True, True]))
    r.scores = torch.tensor([1.0, -2.0, 0.5])
    r.old_logprobs, r.ref_logprobs = torch.randn(3, 6), torch.randn(3, 6)
    r.old_values = torch.randn(3, 6) * 5 + 3
    recipe.advantages(r)
    real = r.advantages[mask]
    assert real.mean().abs() < 1e-5
    assert real.var() == pytest.approx(1.0, abs=1e-4)


def test_kl_to_the_reference_is_positive_after_the_first_update(tiny_model, prompt_file, tmp_path):
    """The reference is the frozen starting policy: from step 2 on the sampled KL is clearly
    positive (with the live policy as its own reference it would be exactly 0 every step)."""
    train(from_dict(PPOConfig, ppo_config(tiny_model, prompt_file, tmp_path / "run", total_steps=6, save_steps=100)))
    rows = read_metrics(tmp_path / "run")
    assert abs(rows[0]["kl"]) < 1e-5  # step 1 samples from the reference itself
    assert all(r["kl"] > 1e-3 for r in rows[1:]), [r["kl"] for r in rows]


def test_logged_learning_rate_is_the_one_the_step_used(tiny_model, prompt_file, tmp_path):
    cfg = ppo_config(tiny_model, prompt_file, tmp_path / "run", total_steps=6, save_steps=100, warmup_steps=2,
                     lr_schedule="linear", learning_rate=1e-3)
    train(from_dict(PPOConfig, cfg))
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run")]
    # step s (1-based) trains with factor min(1, s / warmup) * (1 - (s - 1) / total)
    expected = [1e-3 * min(1.0, s / 2) * (1 - (s - 1) / 6) for s in range(1, 7)]
    assert lrs == pytest.approx(expected, rel=1e-6)


def test_resume_restores_the_schedule_and_the_adaptive_kl_controller(tiny_model, prompt_file, tmp_path):
    steps, every = 8, 3
    cfg = ppo_config(tiny_model, prompt_file, tmp_path / "reference", total_steps=steps, save_steps=every,
                     warmup_steps=3, lr_schedule="linear", adaptive_kl=True, kl_target=0.5, kl_horizon=200.0)
    train(from_dict(PPOConfig, cfg))
    reference = read_metrics(tmp_path / "reference")
    assert len({r["kl_coef"] for r in reference}) > 2 and len({r["lr"] for r in reference}) > 2  # both move

    out = tmp_path / "killed"
    cfg_killed = dict(cfg, output_dir=str(out))
    config_file = tmp_path / "ppo.yaml"
    config_file.write_text(yaml.safe_dump(cfg_killed))
    first = out / "checkpoints" / f"step-{every:06d}"
    kill_when(["align", "ppo", "--config", str(config_file)], ROOT, first.exists, "its first checkpoint", 240)
    manifest = train(from_dict(PPOConfig, cfg_killed))
    assert "resumed_from" in manifest["notes"] and read_manifest(out)["status"] == "completed"
    assert_same_metrics(read_metrics(out), reference)  # kl_coef and lr included


def test_a_lora_policy_learns_the_rule(tiny_model, prompt_file, tmp_path):
    """LoRA on every linear layer and the (tied) output head: on the random tiny model, adapters on
    the blocks alone moved the policy by a KL of 0.3 nats in 16 steps even at a learning rate of 0.1
    (the digits' logits live in the head); with the head adapted it learns (seeds 0/2/3 at 2e-2:
    +0.13, +0.05, +0.02; seed 0 at 1e-2: +0.11)."""
    cfg = ppo_config(tiny_model, prompt_file, tmp_path / "lora", learning_rate=1e-2, seed=0,
                     lora={"enabled": True, "r": 8, "alpha": 16,
                           "target_modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"})
    manifest = train(from_dict(PPOConfig, cfg))
    rows = read_metrics(tmp_path / "lora")
    first, last = (sum(r["score"] for r in part) / len(part) for part in (rows[:4], rows[-4:]))
    assert last > first + 0.05, (first, last)
    assert all(r["kl"] < 12.0 for r in rows)
    assert manifest["status"] == "completed" and (tmp_path / "lora" / "model" / "config.json").exists()
