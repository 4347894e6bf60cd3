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


# ------------------------------------------------------------------------------ clear one-line errors

@pytest.mark.parametrize("stage,args,expected", [
    ("sft", ["batch_size=0"], "batch_size: expected a number >= 1, got 0"),
    ("sft", ["val_fraction=1.5"], "val_fraction: expected a number in [0, 1), got 1.5"),
    ("sft", ["val_fraction=0.6", "heldout_fraction=0.5"], "must leave examples to train on"),
    ("sft", ["lr_scheduler=cosnie"], "lr_scheduler: unknown 'cosnie'; expected one of linear, cosine"),
    ("sft", ["learning_rate=0"], "learning_rate: expected a positive number, got 0"),
    ("reward train", ["grad_accum=0"], "grad_accum: expected a number >= 1, got 0"),
    ("align ppo", ["mini_batch_size=0", "reward_function=x:y"], "mini_batch_size: expected a number >= 1, got 0"),
    ("eval", ["models={a: x}", "samples_per_prompt=0"], "samples_per_prompt: expected a number >= 1, got 0"),
    ("annotate generate", ["batch_size=0"], "batch_size: expected a number >= 1, got 0"),
])
def test_bad_values_are_one_line_errors(stage, args, expected, tmp_path, capsys):
    where = "run_dir" if stage.startswith("annotate") else "output_dir"
    rc = main([*stage.split(), f"{where}={tmp_path / 'out'}", *args])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_non_utf8_data_and_config_files_name_the_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"instruction": "Hi", "input": "", "output": "Hello"}\n{"instruction": "caf\xe9", "output": "x"}\n')
    rc = main(["sft", f"data={data}", f"output_dir={tmp_path / 'sft'}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{data}:2:" in err and "not UTF-8 text (byte 0xe9" in err and "Traceback" not in err
    config = tmp_path / "c.yaml"
    config.write_bytes(b"max_steps: 2\n# r\xe9sum\xe9\n")
    rc = main(["sft", "--config", str(config), f"output_dir={tmp_path / 'sft'}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{config}: line 2: not UTF-8 text" in err
    assert not (tmp_path / "sft").exists()


def test_a_wrong_argilla_key_is_a_clear_error(tmp_path, argilla_server, monkeypatch, capsys):
    monkeypatch.setenv("ARGILLA_API_URL", argilla_server.url)
    monkeypatch.setenv("ARGILLA_API_KEY", "not-the-key")
    candidates = tmp_path / "annotate" / "candidates"
    candidates.mkdir(parents=True)
    (candidates / "candidates.jsonl").write_text(json.dumps(
        {"item_id": "i0", "prompt": [{"role": "user", "content": "Q"}], "responses": ["a", "b"]}) + "\n")
    rc = main(["annotate", "push", f"run_dir={tmp_path / 'annotate'}", "dataset=wrong-key"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and "not-the-key" not in err
    assert "API key" in err and argilla_server.url in err


# ------------------------------------------------------------------------------ degenerate intervals, stale reports

def test_win_rate_intervals_hold_their_estimate_and_error_bars_are_never_negative():
    from alignkit.evals.stats import tie_aware_interval
    from alignkit.plots import error_bars

    for n in range(1, 41):  # every split of up to 40 prompts into wins, ties and losses
        for wins in range(n + 1):
            for ties in range(n - wins + 1):
                lo, hi = tie_aware_interval(wins, ties, n - wins - ties)
                rate = (wins + ties / 2) / n
                assert lo <= rate <= hi, (wins, ties, n)
    assert tie_aware_interval(0, 2, 1)[0] <= 1 / 3  # the case that crashed matplotlib: 0.33333333333333337
    assert (error_bars([(1 / 3, 0.33333333333333337, 0.5), (0.5, None, None)]) >= 0).all()


def test_an_eval_that_fails_leaves_no_earlier_report_behind(tiny_model, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(2)))
    rules = tmp_path / "rules.py"
    rules.write_text("def fine(prompts, replies):\n    return [0.0] * len(replies)\n"
                     "def broken(prompts, replies):\n    raise RuntimeError('the rule broke')\n")
    args = ["eval", f"models={{sft: {tiny_model}}}", f"prompts={prompts}", f"output_dir={tmp_path / 'eval'}",
            "max_new_tokens=4", "compute_kl=false"]
    assert main([*args, f"reward_function={rules}:fine"]) == 0
    assert (tmp_path / "eval" / "report.html").exists()
    with pytest.raises(RuntimeError, match="the rule broke"):
        main([*args, f"reward_function={rules}:broken"])
    assert read_manifest(tmp_path / "eval")["status"] == "failed"
    assert not (tmp_path / "eval" / "report.html").exists() and not (tmp_path / "eval" / "eval.json").exists()
