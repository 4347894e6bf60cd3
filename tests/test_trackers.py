"""report_to: the TRL stages, PPO and eval send their metrics to the trackers named, here MLflow
with a local file store (a real tracker, no server), and refuse one that is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow  # installed with the test extra
import pytest

from alignkit.cli import main
from alignkit.runstore import read_manifest


def logged(store: Path, run_name: str) -> dict[str, list[float]]:
    """metric name -> the values the run of that name logged, read back through MLflow's client."""
    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.info.run_name == run_name]
    assert len(runs) == 1, [r.info.run_name for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    run = runs[0]
    return {key: [m.value for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics}


@pytest.fixture
def store(tmp_path, monkeypatch):
    path = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", path.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store for cases like this one
    return path


def test_sft_and_ppo_and_eval_log_to_mlflow(tmp_path, tiny_model, store):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Is {i} even?", "completion": "Yes." if i % 2 == 0 else "No."}) + "\n"
                            for i in range(16)))
    assert main(["sft", f"model={tiny_model}", f"data={data}", f"output_dir={tmp_path / 'sft'}", "max_steps=4",
                 "logging_steps=1", "batch_size=2", "max_length=32", "eval_steps=1000", "save_steps=100",
                 "report_to=[mlflow, tensorboard]", "run_name=sft-run"]) == 0
    sft = logged(store, "sft-run")
    assert len(sft["loss"]) == 4 and all(v == v for v in sft["loss"])  # one finite loss per step
    assert any((tmp_path / "sft" / "tensorboard").iterdir())  # both trackers at once

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(8)))
    assert main(["align", "ppo", f"model={tiny_model}", "reward_model=null", f"prompts={prompts}",
                 "reward_function=alignkit.rlhf.rule_rewards:digit_fraction", f"output_dir={tmp_path / 'ppo'}",
                 "total_steps=3", "rollout_batch_size=4", "mini_batch_size=2", "max_new_tokens=6", "save_steps=100",
                 "report_to=[mlflow]", "run_name=ppo-run"]) == 0
    ppo = logged(store, "ppo-run")
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert ppo["ppo/score"] == pytest.approx([r["score"] for r in rows])  # the same numbers as metrics.jsonl
    assert not (tmp_path / "ppo" / "tensorboard").exists()  # not asked for

    assert main(["eval", f"models={{sft: {tmp_path / 'sft' / 'model'}}}", f"prompts={prompts}", "max_new_tokens=4",
                 f"output_dir={tmp_path / 'eval'}", "reward_function=alignkit.rlhf.rule_rewards:digit_fraction",
                 "report_to=[mlflow]", "run_name=eval-run"]) == 0
    assert logged(store, "eval-run")["sft/reward_mean"] == [read_manifest(tmp_path / "eval")["metrics"]["sft/reward_mean"]]


def test_a_tracker_that_is_not_installed_or_unknown_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec  # wandb is absent here; make it absent wherever this runs
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    assert main(["sft", f"output_dir={tmp_path / 'sft'}", "report_to=[wandb]"]) == 2
    assert "report_to: wandb is not installed; pip install wandb" in capsys.readouterr().err
    assert main(["sft", f"output_dir={tmp_path / 'sft'}", "report_to=[tensorbored]"]) == 2
    assert "report_to: unknown tracker 'tensorbored'" in capsys.readouterr().err
    assert not (tmp_path / "sft").exists()
