"""DPO (rlhf/dpo.py) trained for real on the tiny model.

The preference is one a 2-layer random model can learn and generalise: the chosen reply is made of
numbers, the rejected one of words. The eval pairs have prompts and replies the training pairs do
not, so a held-out implicit-reward accuracy well above chance means the preference was learned.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from alignkit.config import ConfigError, from_dict
from alignkit.runstore import read_manifest
from alignkit.rlhf.dpo import DPOStageConfig, train

PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?", "Write a short poem about the sea.",
           "Answer in one word.", "Summarise the text below.", "Translate the sentence into French.", "Explain photosynthesis."]
WORDS = ["Good.", "Bad.", "Yes.", "No.", "I cannot help with that.", "The sea is wide and blue.", "Eat a balanced diet."]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run far faster on one thread of a shared 2-core machine
    yield
    torch.set_num_threads(before)


def write_pairs(path: Path, n: int, seed: int, conversational: bool = False) -> Path:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"{rng.choice(PROMPTS)} ({seed}-{i})"
        chosen = " ".join(str(rng.randrange(100)) for _ in range(rng.randint(1, 3)))
        rejected = rng.choice(WORDS)
        if conversational:  # the annotation export's shape
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}], "item_id": f"item-{i}"})
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpo_data")
    return write_pairs(d / "train.jsonl", 64, seed=1, conversational=True), write_pairs(d / "heldout.jsonl", 24, seed=2)


def dpo_config(tiny_model, pairs, out, **overrides):
    train_file, heldout = pairs
    cfg = {"model": str(tiny_model), "data": str(train_file), "eval_data": str(heldout), "output_dir": str(out),
           "learning_rate": 1e-3, "epochs": 2, "batch_size": 8, "max_length": 128, "warmup_ratio": 0.0,
           "eval_steps": 1000, "save_steps": 8, "logging_steps": 4}
    cfg.update(overrides)
    return from_dict(DPOStageConfig, cfg)


def test_dpo_learns_a_preference_that_generalises(tiny_model, pairs, tmp_path, monkeypatch):
    out = tmp_path / "dpo"
    monkeypatch.chdir(tmp_path)
    manifest = train(dpo_config(tiny_model, pairs, out))
    m = manifest["metrics"]
    assert m["eval_reward_accuracy_before"] <= 0.5  # pi == pi_ref: every implicit reward is 0, ties count as wrong
    assert m["eval_reward_accuracy_after"] >= 0.7, m
    assert m["eval_reward_margin_after"] > m["eval_reward_margin_before"]
    assert m["eval_after"]["loss"] < m["eval_before"]["loss"]
    assert read_manifest(out)["status"] == "completed"
    assert read_manifest(out)["notes"]["split_sizes"] == {"train": 64, "eval": 24}
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer_config.json").exists()
    assert list((out / "checkpoints").glob("checkpoint-*"))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert not (tmp_path / "runs").exists()  # transformers' default TensorBoard dir in the working directory
    # completed with the same config and inputs: a no-op
    again = train(dpo_config(tiny_model, pairs, out))
    assert again["metrics"] == read_manifest(out)["metrics"]


def test_dpo_lora_ipo_with_precomputed_reference(tiny_model, pairs, tmp_path):
    """LoRA: the reference is the policy with its adapter disabled; the saved model is merged."""
    out = tmp_path / "dpo_lora"
    manifest = train(dpo_config(tiny_model, pairs, out, loss_type=["ipo"], beta=0.5, precompute_ref_log_probs=True,
                                learning_rate=3e-3, **{"lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0}}))
    m = manifest["metrics"]
    assert m["eval_reward_accuracy_after"] >= 0.7, m
    assert not (out / "model" / "adapter_config.json").exists()  # merged into a plain model
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")


def test_dpo_trainable_layers_trains_only_the_top_blocks(tiny_model, pairs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dpo_top"
    manifest = train(dpo_config(tiny_model, pairs, out, trainable_layers=1, learning_rate=3e-3))
    assert manifest["metrics"]["eval_reward_accuracy_after"] >= 0.7, manifest["metrics"]
    before = dict(AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters())
    after = dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())
    n = len([k for k in before if k.endswith("self_attn.q_proj.weight")])
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(f"layers.{n - 1}." in k or k == "model.norm.weight" for k in changed), changed
    assert not any("embed" in k for k in changed)
    with pytest.raises(ConfigError, match="trainable_layers"):
        dpo_config(tiny_model, pairs, tmp_path / "x", trainable_layers=1, lora={"enabled": True}).check()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error message; QLoRA itself needs a GPU")
def test_qlora_on_cpu_is_a_clear_error(tiny_model, pairs, tmp_path):
    with pytest.raises(ConfigError, match="CUDA"):
        train(dpo_config(tiny_model, pairs, tmp_path / "q", qlora=True))
    assert not (tmp_path / "q").exists()  # nothing half-written


def test_unknown_loss_type_is_a_clear_error(tiny_model, pairs, tmp_path):
    with pytest.raises(ConfigError, match="loss_type"):
        train(dpo_config(tiny_model, pairs, tmp_path / "x", loss_type=["nonsense"]))


def test_cpu_fused_head_scores_only_labelled_tokens_with_the_same_result(tiny_model, monkeypatch):
    """The CPU speed-up for TRL's fused LM head (alignkit.training) keeps the per-token log-probs
    and the gradient: compare against TRL's own every-position path on one batch."""
    import trl.trainer.utils as trl_utils
    from transformers import AutoModelForCausalLM
    from trl.kernels.chunked_logprob import _use_triton as trl_decision
    from trl.trainer.utils import add_fused_lm_head

    from alignkit.training import score_only_labelled_tokens_on_cpu

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    add_fused_lm_head(model)
    ids = torch.randint(5, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :7] = -100  # the prompt
    labels[1, 10:] = -100  # padding
    results = []
    for patched in (False, True):
        if patched:
            assert score_only_labelled_tokens_on_cpu() is True
            assert trl_utils._use_triton(torch.device("cpu")) is True
        else:
            monkeypatch.setattr(trl_utils, "_use_triton", trl_decision)
            assert trl_utils._use_triton(torch.device("cpu")) is False
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        results.append((out.log_probs.detach(), model.lm_head.weight.grad.clone()))
    (lp_all, grad_all), (lp_labelled, grad_labelled) = results
    assert torch.allclose(lp_all, lp_labelled, atol=1e-5) and (lp_labelled[labels[:, 1:] == -100] == 0).all()
    assert torch.allclose(grad_all, grad_labelled, atol=1e-5) and grad_all.abs().sum() > 0


def test_pairs_per_prompt_keeps_the_clearest_pairs_of_each_prompt(tmp_path):
    """A ranking of k replies exports k(k-1)/2 pairs per prompt; pairs_per_prompt=1 trains on the one
    with the largest margin (best vs worst), and the held-out pairs stay whole."""
    from alignkit.rlhf.dpo import prepare_data

    rows = []
    for prompt in ("p1", "p2", "p3", "p4", "p5", "p6"):
        for chosen, rejected, margin in (("a", "b", 1 / 3), ("a", "d", 1.0), ("b", "d", 2 / 3), ("c", "d", 1 / 3)):
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": f"{prompt} {chosen}"}],
                         "rejected": [{"role": "assistant", "content": f"{prompt} {rejected}"}], "margin": margin})
    data = tmp_path / "ranked.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = {"data": str(data), "eval_fraction": 0.34, "output_dir": str(tmp_path / "dpo")}
    everything = prepare_data(from_dict(DPOStageConfig, base))
    clearest = prepare_data(from_dict(DPOStageConfig, {**base, "pairs_per_prompt": 1}))
    n_train_prompts = len({p["prompt"][0]["content"] for p in everything["train"]})
    assert len(everything["train"]) == 4 * n_train_prompts and clearest["not_clearest"] == 3 * n_train_prompts
    assert [p["rejected"][0]["content"].split()[1] for p in clearest["train"]] == ["d"] * n_train_prompts
    assert [p["chosen"][0]["content"].split()[1] for p in clearest["train"]] == ["a"] * n_train_prompts
    assert clearest["eval"] == everything["eval"] and len(clearest["eval"]) == 4 * (6 - n_train_prompts)
    two = prepare_data(from_dict(DPOStageConfig, {**base, "pairs_per_prompt": 2}))
    assert [p["rejected"][0]["content"].split()[1] for p in two["train"]][:2] == ["d", "d"]
    with pytest.raises(ConfigError, match="pairs_per_prompt"):
        from_dict(DPOStageConfig, {**base, "pairs_per_prompt": 0}).check()
