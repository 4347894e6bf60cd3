"""Reliability of the shared run machinery (issue 13): no secrets from the command line in a
manifest, strict-JSON manifests, a stage with a NaN loss or zero steps ends failed, one run per
stage directory at a time."""

from __future__ import annotations

import fcntl
import json
import math
import os
import sys

import pytest

from alignkit.cli import main
from alignkit.errors import RunLockedError, TrainingDivergedError
from alignkit.runstore import LOCK, read_manifest, redact_argv, stage_run
from alignkit.training import check_finite


def strict_loads(text: str):
    return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


# ------------------------------------------------------------------------------ secrets in argv

def test_manifest_command_masks_secret_arguments(tmp_path, monkeypatch):
    argv = ["alignkit", "run", "annotate.common.password=pw1", "api_key=key2", "hf_token=tok3",
            "--password", "pw4", "--api-key", "key5", "--password=pw6", "--argilla-api-key=key7",
            "max_new_tokens=64", "output_dir=runs/x"]
    monkeypatch.setattr(sys, "argv", argv)
    with stage_run("demo", tmp_path / "stage", {"k": 1}, {}):
        pass
    text = (tmp_path / "stage" / "manifest.json").read_text()
    for secret in ("pw1", "key2", "tok3", "pw4", "key5", "pw6", "key7"):
        assert secret not in text
    command = read_manifest(tmp_path / "stage")["command"]
    assert command[2:5] == ["annotate.common.password=***", "api_key=***", "hf_token=***"]
    assert command[5:9] == ["--password", "***", "--api-key", "***"]
    assert command[-2:] == ["max_new_tokens=64", "output_dir=runs/x"]  # not secrets: kept
    assert redact_argv(["--config", "c.yaml"]) == ["--config", "c.yaml"]


# ------------------------------------------------------------------------------ strict JSON

def test_manifest_is_strict_json_with_non_finite_metrics(tmp_path):
    out = tmp_path / "stage"
    with stage_run("demo", out, {"k": 1}, {}) as run:
        run.metrics.update(loss=float("nan"), best=float("inf"), curve=[1.0, float("-inf")], nested={"x": math.nan})
    m = strict_loads((out / "manifest.json").read_text())
    assert m["metrics"] == {"loss": None, "best": None, "curve": [1.0, None], "nested": {"x": None}}


def test_check_finite_names_stage_step_value_and_hint():
    check_finite("ppo", 3, {"pg_loss": 0.5, "score": 1}, ("pg_loss", "vf_loss", "score"))  # finite or absent: fine
    with pytest.raises(TrainingDivergedError, match=r"ppo: training diverged at step 3: vf_loss = nan; lower learning_rate"):
        check_finite("ppo", 3, {"pg_loss": 0.5, "vf_loss": float("nan")}, ("pg_loss", "vf_loss", "score"))


def test_reward_training_on_a_nan_margin_fails(tiny_model, tmp_path):
    pairs = [{"prompt": f"Question {i}?", "chosen": "Good.", "rejected": "Bad.", "margin": 1.0} for i in range(4)]
    pairs[1]["margin"] = float("nan")
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))  # json.dumps writes NaN
    eval_file.write_text("".join(json.dumps({**p, "prompt": f"Held out {i}?", "margin": 1.0}) + "\n"
                                 for i, p in enumerate(pairs)))
    out = tmp_path / "reward"
    rc = main(["reward", "train", f"model={tiny_model}", f"data={train_file}", f"eval_data={eval_file}",
               f"output_dir={out}", "max_length=32", "batch_size=4", "max_steps=2", "logging_steps=1",
               "eval_steps=1000", "save_steps=1000", "warmup_ratio=0"])
    assert rc != 0
    m = read_manifest(out)
    assert m["status"] == "failed" and "TrainingDivergedError" in m["error"] and "loss = nan" in m["error"]
    assert not (out / "model").exists()


def test_sft_with_zero_steps_fails(tiny_model, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": f"{i}."}) + "\n"
                            for i in range(20)))
    out = tmp_path / "sft"
    rc = main(["sft", f"model={tiny_model}", f"data={data}", f"output_dir={out}", "max_length=32", "batch_size=4",
               "eval_steps=1000", "max_steps=-1", "epochs=0"])
    assert rc != 0
    assert "zero optimiser steps" in capsys.readouterr().err
    m = read_manifest(out)
    assert m["status"] == "failed" and "zero optimiser steps" in m["error"]
    assert not (out / "model").exists()


# ------------------------------------------------------------------------------ one run per directory

def test_stage_run_refuses_a_locked_directory_and_proceeds_after_release(tmp_path):
    out = tmp_path / "stage"
    out.mkdir()
    holder = open(out / LOCK, "w")  # another open file description: flock conflicts even in this process
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.write("424242\n")
    holder.flush()
    with pytest.raises(RunLockedError, match=r"stage.*PID 424242"):
        with stage_run("demo", out, {"k": 1}, {}):
            pytest.fail("the body must not run while another run holds the lock")
    assert read_manifest(out) is None  # refused before anything was read or written
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    with stage_run("demo", out, {"k": 1}, {}) as run:
        assert not run.skipped
        assert (out / LOCK).read_text().strip() == str(os.getpid())  # the holder's PID, for the next one
        with pytest.raises(RunLockedError, match=f"PID {os.getpid()}"):
            with stage_run("demo", out, {"k": 1}, {}):
                pass
    assert read_manifest(out)["status"] == "completed"
    with stage_run("demo", out, {"k": 1}, {}) as run:  # released on exit: a skipped run takes it too
        assert run.skipped
