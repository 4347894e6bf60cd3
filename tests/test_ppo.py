"""PPO (rlhf/ppo.py) trained for real on the tiny model with a rule reward it can learn.

The reward is ``alignkit.rlhf.rule_rewards:digit_fraction`` (the share of the reply's characters that are
digits): about a fifth of the tiny model's vocabulary is numbers, so a random policy scores ~0.2
with a dense, per-token signal, and PPO lifts it within a few steps, for every seed we tried
(0-3: +0.13 to +0.16 over 16 steps). A reward that needs the policy to discover EOS first (brevity +
missing-EOS penalty) learned only for some seeds within that budget. One uninterrupted run is the reference for three checks: the reward
rises while the KL to the reference stays bounded, a second run with the same seed reproduces its
metrics, and a run killed after a checkpoint and started again continues with the same metrics.

Tiny models are slowed down badly by thread contention on a shared 2-core machine, so these runs
use one torch thread (restored afterwards).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from alignkit.config import ConfigError, from_dict
from alignkit.rlhf.ppo import PPOConfig, read_metrics, train
from alignkit.runstore import read_manifest
from tests.test_kill_resume import kill_when

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?", "Write a short poem about the sea.",
           "Answer in one word.", "Summarise the text below.", "Translate the sentence into French.",
           "Explain photosynthesis.", "Count to ten."]
STEPS, SAVE_EVERY = 16, 4
KL_BOUND = 12.0  # nats per sequence; with beta 0.05 the tiny policy stays below ~6 (seeds 0-3)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def ppo_config(tiny_model, prompt_file, out_dir, **overrides) -> dict:
    cfg = {
        "model": str(tiny_model), "reward_model": None, "reward_function": "alignkit.rlhf.rule_rewards:digit_fraction",
        "prompts": str(prompt_file), "output_dir": str(out_dir), "seed": 3,
        "total_steps": STEPS, "rollout_batch_size": 16, "mini_batch_size": 8, "grad_accum": 2, "ppo_epochs": 2,
        "learning_rate": 5e-3, "max_new_tokens": 12, "kl_coef": 0.05, "missing_eos_penalty": None,
        "save_steps": SAVE_EVERY, "save_total_limit": 3,
    }
    cfg.update(overrides)
    return cfg


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def assert_same_metrics(a: list[dict], b: list[dict], tol: float = 1e-5) -> None:
    a, b = comparable(a), comparable(b)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=tol, rel=tol), f"step {ra['step']}: {k} {ra[k]} != {rb[k]}"


@pytest.fixture(scope="module")
def reference_run(tiny_model, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo") / "reference"
    t0 = time.perf_counter()
    train(from_dict(PPOConfig, ppo_config(tiny_model, prompt_file, out)))
    return out, time.perf_counter() - t0


def test_ppo_learns_the_rule_and_stays_close_to_the_reference(reference_run):
    out, seconds = reference_run
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first = sum(r["score"] for r in rows[:4]) / 4
    last = sum(r["score"] for r in rows[-4:]) / 4
    assert last > first + 0.07, f"reward did not rise: first 4 steps {first:.3f}, last 4 steps {last:.3f}"
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # step 1 samples from the reference itself
    assert max(r["kl"] for r in rows) < KL_BOUND
    for key in ("score", "kl", "entropy", "pg_clipfrac", "vf_loss", "response_length", "time/generation_share"):
        assert all(key in r and r[key] == r[key] for r in rows), key  # present and not NaN

    manifest = read_manifest(out)
    assert manifest["status"] == "completed"
    assert manifest["metrics"]["score_last"] > manifest["metrics"]["score_first"]
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer_config.json").exists()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000004", "step-000008", "step-000012"]
    for f in ("policy.pt", "value.pt", "trainer_state.pt", "rng_rank0.pt"):
        assert (out / "checkpoints" / "step-000012" / f).exists()
    print(f"PPO reference run: {STEPS} steps in {seconds:.1f}s; reward {first:.3f} -> {last:.3f}")

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")  # the output is a plain HF model


def test_completed_run_is_a_no_op(reference_run, tiny_model, prompt_file):
    out, _ = reference_run
    before = (out / "metrics.jsonl").read_text()
    t0 = time.perf_counter()
    train(from_dict(PPOConfig, ppo_config(tiny_model, prompt_file, out)))
    assert time.perf_counter() - t0 < 5
    assert (out / "metrics.jsonl").read_text() == before


def test_same_seed_reproduces_the_metrics(reference_run, tiny_model, prompt_file, tmp_path):
    out, _ = reference_run
    # a shorter run: with a constant learning rate its steps are the reference run's first steps
    train(from_dict(PPOConfig, ppo_config(tiny_model, prompt_file, tmp_path / "again", total_steps=6)))
    assert_same_metrics(read_metrics(tmp_path / "again"), read_metrics(out)[:6])
    # and another seed gives another run
    train(from_dict(PPOConfig, ppo_config(tiny_model, prompt_file, tmp_path / "other", total_steps=2, seed=4)))
    assert read_metrics(tmp_path / "other")[0]["score"] != read_metrics(out)[0]["score"]


def test_trainable_layers_freezes_policy_and_value_below_the_top(tiny_model, prompt_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "top"
    train(from_dict(PPOConfig, ppo_config(tiny_model, prompt_file, out, total_steps=2, trainable_layers=1)))
    before = dict(AutoModelForCausalLM.from_pretrained(tiny_model).named_parameters())
    after = dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())
    n = len([k for k in before if k.endswith("self_attn.q_proj.weight")])
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(f"layers.{n - 1}." in k or k == "model.norm.weight" for k in changed), changed
    with pytest.raises(ConfigError, match="trainable_layers"):
        from_dict(PPOConfig, ppo_config(tiny_model, prompt_file, out, trainable_layers=1,
                                        lora={"enabled": True})).check()


def test_config_mistakes_are_config_errors(tiny_model, prompt_file, tmp_path):
    with pytest.raises(ConfigError, match="mini_batch_size 3 must divide"):
        from_dict(PPOConfig, ppo_config(tiny_model, prompt_file, tmp_path, mini_batch_size=3)).check()
    with pytest.raises(ConfigError, match="unknown key.*policy"):  # the shared key is `model`, as in SFT/reward/DPO
        from_dict(PPOConfig, {"policy": str(tiny_model)})


def test_a_run_killed_before_its_first_checkpoint_or_with_a_torn_metrics_line_reruns_cleanly(
        tiny_model, prompt_file, tmp_path):
    out = tmp_path / "torn"
    cfg = ppo_config(tiny_model, prompt_file, out, total_steps=3, save_steps=100)
    train(from_dict(PPOConfig, cfg))
    reference = read_metrics(out)
    # what a run killed before its first checkpoint leaves, its last line torn by a full disk
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
    for d in (out / "checkpoints").glob("*"):
        import shutil

        shutil.rmtree(d)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "score": 0.')
    manifest = train(from_dict(PPOConfig, cfg))  # the same command again
    assert manifest["status"] == "completed" and "resumed_from" not in manifest["notes"]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]  # each step once: no rows appended twice
    assert_same_metrics(rows, reference)


def test_killed_run_resumes_with_the_same_metrics(reference_run, tiny_model, prompt_file, tmp_path):
    ref_out, _ = reference_run
    out = tmp_path / "killed"
    cfg = ppo_config(tiny_model, prompt_file, out)
    config_file = tmp_path / "ppo.yaml"
    config_file.write_text(yaml.safe_dump(cfg))
    first_ckpt = out / "checkpoints" / f"step-{SAVE_EVERY:06d}"
    kill_when(["align", "ppo", "--config", str(config_file)], ROOT, first_ckpt.exists, "its first checkpoint", 240)
    assert read_manifest(out)["status"] == "running"  # a crash, as far as the run store can tell
    killed_rows = read_metrics(out)
    assert len(killed_rows) < STEPS

    manifest = train(from_dict(PPOConfig, cfg))  # the same command again resumes
    assert manifest["notes"]["resumed_from"].startswith(str(out / "checkpoints"))
    resumed_step = int(Path(manifest["notes"]["resumed_from"]).name.split("-")[1])
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # rows after the checkpoint were replaced
    reference = read_metrics(ref_out)
    # the step right after the checkpoint, and all the ones after it, match the uninterrupted run
    assert_same_metrics(rows[resumed_step:], reference[resumed_step:])
    assert_same_metrics(rows, reference)
