"""Reliability, kill -9 and resume (issue 13): every stage and the loop, killed by SIGKILL in the
middle of a real run, finishes when the same command runs again, and ends where an
uninterrupted run ends.

The training stages are killed at their first complete checkpoint and must resume from a
checkpoint and reach the uninterrupted run's final metrics; the eval is killed once the first
model's replies are cached and must end with the same figures; the loop is killed in its reward
stage and must finish without redoing what completed. (test_ppo.py and test_sft.py hold finer
checks of PPO's metrics step by step and of SFT's fresh start after a changed config;
test_online_rl.py kills GRPO and RLOO, and test_loop.py a loop in its RLOO stage.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.runstore import read_manifest

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["max_length=64", "eval_steps=1000", "logging_steps=1000", "warmup_ratio=0", "save_total_limit=3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, real_data):
    d = tmp_path_factory.mktemp("kill_data")
    pairs = [{"prompt": f"Is {i} even?", "chosen": "Yes." if i % 2 == 0 else "No.",
              "rejected": "No." if i % 2 == 0 else "Yes."} for i in range(48)]
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:40]))
    (d / "heldout.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[40:]))
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(16)))
    return {"dir": d, "alpaca": real_data / "alpaca_libre" / "alpaca_libre_ok_400.json"}


def stage_args(stage: str, tiny_model, data) -> tuple[list[str], str, list[str]]:
    """(command, the glob of a complete checkpoint, the manifest metrics that must match)."""
    d = data["dir"]
    if stage == "sft":
        return (["sft", f"model={tiny_model}", f"data={data['alpaca']}", "on_bad_record=drop", "max_examples=120",
                 "max_steps=40", "save_steps=4", "batch_size=2", "learning_rate=2e-3", *TRAIN],
                "checkpoints/checkpoint-*/trainer_state.json", ["eval_loss_after", "global_step"])
    if stage == "reward":
        return (["reward", "train", f"model={tiny_model}", f"data={d / 'pairs.jsonl'}", f"eval_data={d / 'heldout.jsonl'}",
                 "max_steps=40", "save_steps=4", "batch_size=2", "grad_accum=1", "learning_rate=1e-3", *TRAIN],
                "checkpoints/checkpoint-*/trainer_state.json", ["eval_loss_after", "eval_accuracy_after"])
    if stage == "dpo":
        return (["align", "dpo", f"model={tiny_model}", f"data={d / 'pairs.jsonl'}", f"eval_data={d / 'heldout.jsonl'}",
                 "max_steps=40", "save_steps=4", "batch_size=2", "grad_accum=1", "learning_rate=1e-3", *TRAIN],
                "checkpoints/checkpoint-*/trainer_state.json",
                ["eval_reward_accuracy_after", "eval_reward_margin_after"])
    return (["align", "ppo", f"model={tiny_model}", "reward_model=null",
             "reward_function=alignkit.rlhf.rule_rewards:digit_fraction",
             f"prompts={d / 'prompts.jsonl'}", "total_steps=16", "save_steps=2", "rollout_batch_size=4",
             "mini_batch_size=2", "max_new_tokens=8", "learning_rate=1e-3", "seed=3", "save_total_limit=3"],
            "checkpoints/step-*/trainer_state.pt", ["score_last", "kl_last", "steps"])


def kill_when(args: list[str], cwd: Path, ready, what: str, timeout: float = 300, command: list[str] | None = None,
              env: dict | None = None) -> None:
    """Run ``alignkit ARGS`` (or ``command``) in a child process and SIGKILL it, and every process
    under it, as soon as ``ready()`` is true: the workers of ``torchrun`` and ``accelerate launch``
    run in their own process groups, and killing the launcher alone leaves them training."""
    import psutil

    env = env or {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command or [sys.executable, "-m", "alignkit.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
            if time.time() > deadline:
                pytest.fail(f"no {what} within {timeout:.0f} s")
            time.sleep(0.02)
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in tree:
            p.kill()
        psutil.wait_procs(tree, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo"])
def test_a_killed_training_stage_resumes_and_ends_where_an_uninterrupted_run_ends(stage, tiny_model, data, tmp_path):
    args, checkpoint, compared = stage_args(stage, tiny_model, data)
    assert main([*args, f"output_dir={tmp_path / 'reference'}"]) == 0
    reference = read_manifest(tmp_path / "reference")["metrics"]

    out = tmp_path / "killed"
    kill_when([*args, f"output_dir={out}"], tmp_path, lambda: any(out.glob(checkpoint)), "a complete checkpoint")
    assert read_manifest(out)["status"] == "running"  # what a crash leaves: never "completed"

    assert main([*args, f"output_dir={out}"]) == 0  # the same command again
    m = read_manifest(out)
    assert m["status"] == "completed" and m["notes"].get("resumed_from"), m["notes"]
    for key in compared:
        assert m["metrics"][key] == pytest.approx(reference[key], rel=1e-4, abs=1e-5), key


@pytest.mark.slow
def test_a_killed_eval_reuses_what_it_finished_and_ends_with_the_same_figures(tiny_model, data, tmp_path):
    from alignkit.models import build_tiny_model

    second = build_tiny_model(tmp_path / "second", seed=1)
    args = ["eval", f"models={{first: {tiny_model}, second: {second}}}", "baseline=first", "oracle=false",
            f"prompts={data['dir'] / 'prompts.jsonl'}", "max_new_tokens=24", "batch_size=4", "samples_per_prompt=2",
            "reward_function=alignkit.rlhf.rule_rewards:digit_fraction"]
    assert main([*args, f"output_dir={tmp_path / 'reference'}"]) == 0
    out = tmp_path / "killed"
    kill_when([*args, f"output_dir={out}"], tmp_path, lambda: (out / "cache" / "first.json").exists(),
              "the first model's cached replies")
    assert read_manifest(out)["status"] == "running" and not (out / "eval.json").exists()

    assert main([*args, f"output_dir={out}"]) == 0
    got, want = (json.loads((d / "eval.json").read_text()) for d in (out, tmp_path / "reference"))
    for name in ("first", "second"):
        assert got["models"][name]["reward"] == want["models"][name]["reward"]
        assert got["models"][name]["length"] == want["models"][name]["length"]
    assert got["models"]["second"]["win_rate"] == want["models"]["second"]["win_rate"]


@pytest.mark.slow
def test_a_killed_loop_finishes_without_redoing_what_completed(tmp_path, tiny_model, argilla_server, monkeypatch):
    from tests.test_loop import TINY_LOOP

    monkeypatch.setenv("ARGILLA_API_URL", argilla_server.url)
    monkeypatch.setenv("ARGILLA_API_KEY", argilla_server.api_key)
    loop = tmp_path / "loop"
    args = ["run", str(ROOT / "configs" / "quickstart.yaml"), f"run_dir={loop}", f"model={tiny_model}", *TINY_LOOP,
            "annotate.common.dataset=loop-killed", "reward.max_steps=40", "reward.save_steps=2"]
    kill_when(args, tmp_path, lambda: any((loop / "reward").glob("checkpoints/checkpoint-*/trainer_state.json")),
              "the reward model's first checkpoint", timeout=600)
    before = {stage: (loop / stage / "manifest.json").read_bytes() for stage in ("sft", "annotate/export")}
    assert read_manifest(loop / "reward")["status"] == "running"

    assert main(args) == 0
    for stage in ("sft", "annotate/candidates", "annotate/export", "reward", "reward_eval", "dpo", "ppo", "eval"):
        assert read_manifest(loop / stage)["status"] == "completed", stage
    assert {stage: (loop / stage / "manifest.json").read_bytes() for stage in before} == before  # not redone
    assert read_manifest(loop / "reward")["notes"].get("resumed_from")
