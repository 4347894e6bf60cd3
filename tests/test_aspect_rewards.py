"""A multi-aspect reward model's heads, combined by documented weights, are the reward PPO
optimises and eval reports; eval shows each aspect's own score per model."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.cli import main
from alignkit.config import ConfigError, from_dict
from alignkit.rlhf.ppo import PPOConfig, read_metrics, train
from alignkit.scoring import RewardScorer

PROMPTS = ["Count to ten.", "Give three tips.", "Name a colour.", "Say hi.", "What is 2+2?", "Write a poem.",
           "Explain rain.", "Answer in one word."]


@pytest.fixture(scope="module")
def aspect_model(tiny_model, tmp_path_factory):
    """A reward model with a reward head and two aspect heads (random, as a fresh head is)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("aspects") / "model"
    torch.manual_seed(0)
    labels = ["reward", "aspect:digits", "aspect:tone"]
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3,
                                                            id2label=dict(enumerate(labels)),
                                                            label2id={l: i for i, l in enumerate(labels)})
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_the_weighted_heads_are_the_score(aspect_model):
    prompts, replies = PROMPTS[:4], ["1 2 3", "Eat well.", "Blue.", "Hello there!"]
    heads = torch.tensor(RewardScorer(aspect_model).score_all_heads(prompts, replies))
    weighted = RewardScorer(aspect_model, aspect_weights={"reward": 0.5, "digits": 2.0, "tone": -1.0})
    assert weighted.score(prompts, replies) == pytest.approx((heads @ torch.tensor([0.5, 2.0, -1.0])).tolist(), abs=1e-5)
    assert RewardScorer(aspect_model).score(prompts, replies) == pytest.approx(heads[:, 0].tolist(), abs=1e-6)
    with pytest.raises(ConfigError, match="kindness not among .* heads .*reward, digits, tone"):
        RewardScorer(aspect_model, aspect_weights={"kindness": 1.0})


def test_ppo_optimises_the_weighted_scalar(tiny_model, aspect_model, tmp_path):
    """Step 1 samples the same replies whatever the weights (same seed, same initial policy), so its
    logged score is linear in the weights: score(reward + digits) = score(reward) + score(digits)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = {}
        for name, weights in (("reward", {"reward": 1.0}), ("digits", {"digits": 1.0}),
                              ("both", {"reward": 1.0, "digits": 1.0})):
            train(from_dict(PPOConfig, {
                "model": str(tiny_model), "reward_model": str(aspect_model), "aspect_weights": weights,
                "prompts": str(prompts), "output_dir": str(tmp_path / name), "seed": 3, "total_steps": 2,
                "rollout_batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "learning_rate": 1e-3,
                "max_new_tokens": 8, "save_steps": 100}))
            first[name] = read_metrics(tmp_path / name)[0]["score"]
    finally:
        torch.set_num_threads(before)
    assert first["reward"] != pytest.approx(first["digits"], abs=1e-4)
    assert first["both"] == pytest.approx(first["reward"] + first["digits"], abs=1e-5)


def test_eval_reports_each_aspect(tiny_model, aspect_model, tmp_path):
    from alignkit.models import build_tiny_model

    second = build_tiny_model(tmp_path / "second", seed=1)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    out = tmp_path / "eval"
    assert main(["eval", f"models={{sft: {tiny_model}, dpo: {second}}}", f"prompts={prompts}", f"output_dir={out}",
                 f"reward_model={aspect_model}", "aspect_weights={reward: 1.0, tone: 0.5}", "max_new_tokens=6",
                 "general_text=null", "report_samples=1"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert set(result["aspects"]["models"]) == {"sft", "dpo"}
    assert set(result["aspects"]["models"]["sft"]) == {"digits", "tone"}
    assert result["aspects"]["weights"] == {"reward": 1.0, "tone": 0.5}
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    scorer = RewardScorer(aspect_model)
    heads = torch.tensor(scorer.score_all_heads([r["prompt"] for r in rows], [r["responses"]["sft"]["text"] for r in rows]))
    logged = [r["responses"]["sft"]["rewards"]["reward_model"] for r in rows]
    assert logged == pytest.approx((heads[:, 0] + 0.5 * heads[:, 2]).tolist(), abs=1e-4)  # the weighted reward
    assert result["aspects"]["models"]["sft"]["tone"]["mean"] == pytest.approx(heads[:, 2].mean().item(), abs=1e-4)
    page = (out / "report.html").read_text()
    assert "Reward model aspects" in page and "<table id=aspects>" in page
