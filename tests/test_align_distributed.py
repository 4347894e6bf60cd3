"""DPO and PPO as two real processes (torchrun, gloo on the CPU): the distributed code paths run.

Each test launches ``python -m torch.distributed.run --nproc_per_node 2 -m alignkit.cli align ...``
(torchrun sets OMP_NUM_THREADS=1 per process) and checks that the stage completed with two
processes. For PPO, each rank samples its own shard of prompts, metrics are averaged across ranks,
and the policy replicas must be identical at the end (DDP all-reduces the gradients).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignkit.runstore import read_manifest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def torchrun(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "alignkit.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def test_ppo_two_processes(tiny_model, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(12)))
    config = tmp_path / "ppo.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model), "reward_model": None, "reward_function": "alignkit.rlhf.rule_rewards:brevity",
        "prompts": str(prompts), "output_dir": str(tmp_path / "ppo"), "total_steps": 3, "save_steps": 2,
        "rollout_batch_size": 4, "mini_batch_size": 2, "grad_accum": 2, "ppo_epochs": 1,
        "learning_rate": 1e-3, "max_new_tokens": 8, "adaptive_kl": True, "kl_target": 1.0,
    }))
    torchrun(["align", "ppo", "--config", str(config)], cwd=tmp_path)
    out = tmp_path / "ppo"
    manifest = read_manifest(out)
    assert manifest["status"] == "completed"
    assert manifest["notes"]["processes"] == 2
    assert "MULTI_CPU" in manifest["notes"]["distributed_type"]
    assert manifest["notes"]["ranks_in_sync"] is True
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one row per step, written by rank 0 only
    assert rows[-1]["samples"] == 3 * 4 * 2
    assert rows[1]["kl_coef"] != rows[0]["kl_coef"]  # the adaptive controller moved, identically on both ranks
    ckpt = out / "checkpoints" / "step-000002"
    assert (ckpt / "rng_rank0.pt").exists() and (ckpt / "rng_rank1.pt").exists()
    assert (out / "model" / "config.json").exists()


def test_dpo_two_processes(tiny_model, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"{i} {i + 1}", "rejected": "No."}) + "\n"
                             for i in range(20)))
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_model), "data": str(pairs), "output_dir": str(tmp_path / "dpo"), "eval_fraction": 0.2,
        "learning_rate": 1e-3, "epochs": 1, "batch_size": 4, "max_length": 64, "precompute_ref_log_probs": True,
        "save_steps": 1, "eval_steps": 100, "logging_steps": 1,
    }))
    torchrun(["align", "dpo", "--config", str(config)], cwd=tmp_path)
    manifest = read_manifest(tmp_path / "dpo")
    assert manifest["status"] == "completed"
    assert manifest["metrics"]["global_step"] == 2  # 16 train pairs / (4 per rank x 2 ranks)
    assert manifest["metrics"]["eval_reward_accuracy_after"] is not None
    assert (tmp_path / "dpo" / "model" / "config.json").exists()
