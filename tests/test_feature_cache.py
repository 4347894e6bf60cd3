"""Frozen lower blocks computed once per sequence: the same loss and gradients as the plain
forward (to 1e-5), the cached features really are what the top blocks read, and the reward stage
trains to the same model with the cache as without it."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit.cli import main
from alignkit.feature_cache import FrozenBlockCache
from alignkit.runstore import read_manifest
from alignkit.training import freeze_lower_layers

LAYERS, TRAINABLE = 4, 2


@pytest.fixture(scope="module")
def deep_tiny(tmp_path_factory):
    from alignkit.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny4") / "model", num_layers=LAYERS)


def reward_model(path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = 0
    freeze_lower_layers(model, TRAINABLE)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (7, 12, 5, 9)]
    ids = torch.zeros(4, 12, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return seqs, ids, mask


def loss_and_grads(model, ids, mask):
    model.train()
    model.zero_grad()
    scores = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    loss = -torch.nn.functional.logsigmoid(scores[0::2] - scores[1::2]).mean()  # pairs (0, 1), (2, 3)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_cached_features_give_the_same_loss_and_gradients(deep_tiny):
    seqs, ids, mask = batch()
    plain_loss, plain_grads = loss_and_grads(reward_model(deep_tiny), ids, mask)
    model = reward_model(deep_tiny)
    cache = FrozenBlockCache(model, TRAINABLE)
    cache.prefill(seqs[:3], pad_token_id=0, batch_size=2)  # the fourth is computed when first met
    with cache:
        cached_loss, cached_grads = loss_and_grads(model, ids, mask)
    assert len(cache.features) == 4
    assert cached_loss == pytest.approx(plain_loss, abs=1e-5)
    assert plain_grads.keys() == cached_grads.keys() and len(plain_grads) > 0
    for name in plain_grads:
        assert torch.allclose(cached_grads[name], plain_grads[name], atol=1e-5), name
    assert "forward" not in vars(model.model.layers[0])  # the model is itself again

    # the top blocks really read the cache: corrupt it and the loss moves
    for key in cache.features:
        cache.features[key] = cache.features[key] + 1.0
    with cache:
        assert loss_and_grads(model, ids, mask)[0] != pytest.approx(plain_loss, abs=1e-3)


def test_refusals(deep_tiny):
    model = reward_model(deep_tiny)
    with pytest.raises(ValueError, match="leave frozen blocks"):
        FrozenBlockCache(model, LAYERS)
    unfrozen = reward_model(deep_tiny)
    unfrozen.requires_grad_(True)
    with pytest.raises(ValueError, match="must be frozen"):
        FrozenBlockCache(unfrozen, TRAINABLE)
    seqs, ids, mask = batch()
    with FrozenBlockCache(model, TRAINABLE), pytest.raises(ValueError, match="right-padded"):
        model(input_ids=ids, attention_mask=mask.flip(1))


def test_the_reward_stage_trains_the_same_model_with_the_cache(deep_tiny, tmp_path):
    from safetensors.torch import load_file

    rows = [{"prompt": f"Is {i} even?", "chosen": "Yes." if i % 2 == 0 else "No.",
             "rejected": "No." if i % 2 == 0 else "Yes."} for i in range(16)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"model={deep_tiny}", f"data={data}", f"trainable_layers={TRAINABLE}", "epochs=2", "batch_size=4",
              "eval_fraction=0.25", "save_steps=1000", "eval_steps=2", "learning_rate=1e-3", "max_length=64"]
    assert main(["reward", "train", *common, f"output_dir={tmp_path / 'cached'}"]) == 0
    assert main(["reward", "train", *common, f"output_dir={tmp_path / 'plain'}", "cache_frozen_features=false"]) == 0
    cached, plain = read_manifest(tmp_path / "cached"), read_manifest(tmp_path / "plain")
    assert cached["notes"]["feature_cache"]["sequences"] == 32 and "feature_cache" not in plain["notes"]
    for key in ("eval_accuracy_after", "eval_loss_after", "train_loss"):
        if key in plain["metrics"]:
            assert cached["metrics"][key] == pytest.approx(plain["metrics"][key], abs=1e-5), key
    a = load_file(tmp_path / "cached" / "model" / "model.safetensors")
    b = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_ppo_with_the_cache_logs_the_same_metrics(deep_tiny, tmp_path):
    """PPO with trainable_layers: policy, reference and value model (all from the same weights)
    share one lower pass per step; the run's metrics match the uncached run's."""
    from alignkit.config import from_dict
    from alignkit.rlhf.ppo import PPOConfig, read_metrics, train

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in
                               ["Count to ten.", "Give three tips.", "Name a colour.", "Say hi.", "What is 2+2?",
                                "Write a poem.", "Explain rain.", "Answer in one word."]))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        manifests = {}
        for name, cached in (("cached", True), ("plain", False)):
            manifests[name] = train(from_dict(PPOConfig, {
                "model": str(deep_tiny), "reward_model": None, "reward_function": "alignkit.rlhf.rule_rewards:digit_fraction",
                "prompts": str(prompts), "output_dir": str(tmp_path / name), "seed": 3, "total_steps": 4,
                "rollout_batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 2, "learning_rate": 5e-3,
                "max_new_tokens": 10, "save_steps": 100, "trainable_layers": TRAINABLE, "cache_frozen_features": cached}))
    finally:
        torch.set_num_threads(before)
    assert manifests["cached"]["notes"]["feature_cache_stores"] == 1  # one store serves all three models
    assert manifests["plain"]["notes"]["feature_cache_stores"] == 0
    a, b = read_metrics(tmp_path / "cached"), read_metrics(tmp_path / "plain")
    assert len(a) == len(b) == 4
    for ra, rb in zip(a, b):
        for key in ("score", "kl", "pg_loss", "vf_loss", "value_mean", "approx_kl", "entropy"):
            assert ra[key] == pytest.approx(rb[key], abs=1e-4, rel=1e-4), (ra["step"], key)
