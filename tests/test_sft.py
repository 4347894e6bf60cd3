"""SFT stage end to end on a tiny real model: training, no-op re-runs, resume after a kill,
malformed input, LoRA, and two real processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alignkit.cli import main
from alignkit.runstore import read_manifest

ROOT = Path(__file__).resolve().parent.parent
FAST = ["max_length=96", "batch_size=4", "eval_steps=1000", "logging_steps=5", "learning_rate=2e-3", "warmup_ratio=0"]


def sft(tmp_path: Path, model: Path, data: Path | str, *extra: str, out: str = "sft") -> int:
    return main(["sft", f"model={model}", f"data={data}", f"output_dir={tmp_path / out}", *FAST, *extra])


def test_sft_on_alpaca_libre_lowers_validation_loss_and_rerun_is_noop(tmp_path, tiny_model, real_data):
    data = real_data / "alpaca_libre" / "alpaca_libre_ok_400.json"
    assert sft(tmp_path, tiny_model, data, "on_bad_record=drop", "max_examples=240", "max_steps=30",
               "save_steps=15", "val_fraction=0.1", "heldout_fraction=0.1") == 0
    m = read_manifest(tmp_path / "sft")
    assert m["status"] == "completed"
    assert m["metrics"]["eval_loss_after"] < m["metrics"]["eval_loss_before"]
    assert m["inputs"]["data"]["hash"].startswith("sha256:")
    assert m["notes"]["split_sizes"] == {"train": 192, "validation": 24, "heldout": 24}
    assert m["notes"]["leakage"]["heldout_split"]["n_heldout"] == 24
    heldout = [json.loads(line) for line in (tmp_path / "sft" / "heldout_prompts.jsonl").read_text().splitlines()]
    assert len(heldout) == 24 and heldout[0]["prompt"][0]["role"] == "user"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model")

    # Same config and inputs: a no-op that leaves the manifest untouched.
    before = (tmp_path / "sft" / "manifest.json").read_text()
    assert sft(tmp_path, tiny_model, data, "on_bad_record=drop", "max_examples=240", "max_steps=30",
               "save_steps=15", "val_fraction=0.1", "heldout_fraction=0.1") == 0
    assert (tmp_path / "sft" / "manifest.json").read_text() == before


def test_sft_split_is_deterministic_and_leakage_is_reported(tmp_path, tiny_model):
    from alignkit.sft.train import SFTStageConfig, prepare_data

    from alignkit.data import check_leakage

    rows = [{"instruction": f"Question number {i}?", "input": "", "output": f"Answer {i}."} for i in range(50)]
    rows += [{"instruction": "question NUMBER 3 ?!", "input": "", "output": "dup"}]  # normalised duplicate of #3
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    a = prepare_data(SFTStageConfig(data=str(path), seed=1))
    b = prepare_data(SFTStageConfig(data=str(path), seed=1))
    c = prepare_data(SFTStageConfig(data=str(path), seed=2))
    assert a["splits"] == b["splits"] and a["splits"] != c["splits"]
    report = check_leakage([[{"role": "user", "content": "Question number 3?"}], "new prompt", "question   number 4"],
                           [r["instruction"] for r in rows])
    assert report["exact_duplicates"] == 1 and report["normalized_duplicates"] == 1


MALFORMED = {
    "bad_json.jsonl": ('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "c", "output": }\n', 2, None),
    "missing_output.jsonl": ('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "c", "input": ""}\n', 2, "output"),
    "empty_instruction.json": ('[\n  {"instruction": "a", "input": "", "output": "b"},\n  {"instruction": "  ", "input": "", "output": "b"}\n]', 3, "instruction"),
    "wrong_type.jsonl": ('{"instruction": "a", "input": "", "output": "b"}\n\n{"instruction": "a", "input": "", "output": 42}\n', 3, "output"),
    "not_an_object.jsonl": ('{"instruction": "a", "input": "", "output": "b"}\n["a", "b"]\n', 2, None),
    "bad_role.jsonl": ('{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}\n', 1, "messages[1].role"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_input_names_line_and_field_and_writes_nothing(tmp_path, tiny_model, capsys, name):
    text, line, field = MALFORMED[name]
    path = tmp_path / name
    path.write_text(text)
    assert sft(tmp_path, tiny_model, path, "max_steps=1") == 2
    err = capsys.readouterr().err
    assert f"{path}:{line}:" in err, err
    if field:
        assert f"field '{field}'" in err, err
    assert not (tmp_path / "sft").exists(), "a failed input check must leave no run directory"


def test_sft_lora_merges_adapters_into_a_plain_model(tmp_path, tiny_model, real_data):
    data = real_data / "alpaca_libre" / "alpaca_libre_ok_400.json"
    assert sft(tmp_path, tiny_model, data, "on_bad_record=drop", "max_examples=40", "max_steps=4",
               "save_steps=100", "lora.enabled=true", "lora.r=4", "lora.alpha=8") == 0
    model_dir = tmp_path / "sft" / "model"
    assert (model_dir / "config.json").exists() and not (model_dir / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed, "merging the trained adapters must change some base weights"


def test_sft_trainable_layers_trains_only_the_top_block(tmp_path, tiny_model, real_data):
    from alignkit.sft.train import SFTStageConfig
    from transformers import AutoModelForCausalLM

    from alignkit.config import ConfigError, from_dict

    data = real_data / "alpaca_libre" / "alpaca_libre_ok_400.json"
    assert sft(tmp_path, tiny_model, data, "on_bad_record=drop", "max_examples=40", "max_steps=3",
               "save_steps=100", "trainable_layers=1") == 0
    params = read_manifest(tmp_path / "sft")["notes"]["parameters"]
    assert params["trainable_layers"] == 1 and params["trainable_parameters"] < params["total_parameters"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = dict(base.named_parameters())
    after = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model").named_parameters())
    top = f"layers.{base.config.num_hidden_layers - 1}."
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(top in k or k == "model.norm.weight" for k in changed), changed  # embeddings frozen too
    for alternative in ({"lora": {"enabled": True}}, {"qlora": True}):  # both limit what trains
        with pytest.raises(ConfigError, match="trainable_layers"):
            from_dict(SFTStageConfig, {"trainable_layers": 1, **alternative})


def test_sft_packing_trains_and_warns_on_a_dense_attention_kernel(tmp_path, tiny_model, real_data, caplog):
    data = real_data / "alpaca_libre" / "alpaca_libre_ok_400.json"
    with caplog.at_level(logging.WARNING, logger="alignkit.sft"):
        assert sft(tmp_path, tiny_model, data, "on_bad_record=drop", "max_examples=40", "max_steps=3",
                   "save_steps=100", "packing=true") == 0
    m = read_manifest(tmp_path / "sft")
    assert m["status"] == "completed" and m["notes"]["packing"] is True
    assert "dense block-diagonal mask" in caplog.text  # sdpa on CPU: packing is honoured, with a warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignkit.sft"):  # the default: off with sdpa
        assert sft(tmp_path, tiny_model, data, "on_bad_record=drop", "max_examples=40", "max_steps=3",
                   "save_steps=100", out="default") == 0
    assert read_manifest(tmp_path / "default")["notes"]["packing"] is False and "block-diagonal" not in caplog.text


def test_packing_defaults_to_on_with_variable_length_attention_only():
    from alignkit.sft.train import use_packing

    assert use_packing(None, "flash_attention_2") and use_packing(None, "kernels-community/flash-attn3")
    assert not use_packing(None, "sdpa") and not use_packing(None, "eager")
    assert use_packing(True, "sdpa") and not use_packing(False, "flash_attention_2")  # a setting is honoured


def test_qlora_without_cuda_is_a_clear_error(tmp_path, tiny_model, real_data):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the CPU error path does not apply")
    data = real_data / "alpaca_libre" / "alpaca_libre_ok_400.json"
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        sft(tmp_path, tiny_model, data, "on_bad_record=drop", "max_examples=20", "max_steps=1", "qlora=true")
    assert read_manifest(tmp_path / "sft")["status"] == "failed"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "alignkit.cli", *args]


def test_killed_sft_resumes_from_its_checkpoint(tmp_path, tiny_model, real_data):
    data = real_data / "alpaca_libre" / "alpaca_libre_ok_400.json"
    args = ["sft", f"model={tiny_model}", f"data={data}", f"output_dir={tmp_path / 'sft'}", *FAST,
            "on_bad_record=drop", "max_examples=200", "max_steps=120", "save_steps=4", "batch_size=2",
            "save_total_limit=3"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_cli(*args), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = tmp_path / "sft" / "checkpoints"
    deadline = time.time() + 300
    # Kill at the first complete checkpoint: the tiny model trains fast, so poll often.
    while not list(checkpoints.glob("checkpoint-*/trainer_state.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert read_manifest(tmp_path / "sft")["status"] == "running"  # what a crash leaves: never "completed"

    done = subprocess.run(_cli(*args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    m = read_manifest(tmp_path / "sft")
    assert m["status"] == "completed" and m["metrics"]["global_step"] == 120
    resumed = int(m["notes"]["resumed_from"].rsplit("-", 1)[1])
    assert 4 <= resumed < 120, m["notes"]

    # A changed config starts afresh instead of resuming another run's checkpoints.
    again = subprocess.run(_cli(*args[:-3], "max_steps=8", "save_steps=4", "batch_size=2"), cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    m = read_manifest(tmp_path / "sft")
    assert m["metrics"]["global_step"] == 8 and "resumed_from" not in m["notes"]


def test_two_cpu_processes_train_on_different_data(tmp_path, tiny_model, real_data):
    data = real_data / "alpaca_libre" / "alpaca_libre_ok_400.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "alignkit.cli", "sft", f"model={tiny_model}", f"data={data}", f"output_dir={tmp_path / 'sft'}",
           *FAST, "on_bad_record=drop", "max_examples=80", "max_steps=4", "save_steps=100", "batch_size=2",
           "record_seen_examples=true"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert read_manifest(tmp_path / "sft")["status"] == "completed"
    seen0 = json.loads((tmp_path / "sft" / "seen_examples_rank0.json").read_text())
    seen1 = json.loads((tmp_path / "sft" / "seen_examples_rank1.json").read_text())
    # Up to 4 steps x batch 2 on each rank (a batch fetched before train mode starts is not counted).
    assert 4 <= len(seen0) <= 8 and 4 <= len(seen1) <= 8
    assert not set(seen0) & set(seen1), "the two ranks must train on different examples"


SFT_LAYOUTS = {  # TRL's SFT layouts (plus Alpaca), eight records each
    "language-modelling": lambda i: {"text": f"The number {i} is {'even' if i % 2 == 0 else 'odd'}."},
    "conversational-language-modelling": lambda i: {"messages": [
        {"role": "user", "content": f"Is {i} even?"}, {"role": "assistant", "content": "Yes." if i % 2 == 0 else "No."}]},
    "prompt-completion": lambda i: {"prompt": f"Is {i} even?", "completion": "Yes." if i % 2 == 0 else "No."},
    "conversational-prompt-completion": lambda i: {"prompt": [{"role": "user", "content": f"Is {i} even?"}],
                                                   "completion": [{"role": "assistant", "content": "Yes."}]},
    "alpaca": lambda i: {"instruction": f"Is {i} even?", "input": "", "output": "Yes." if i % 2 == 0 else "No."},
}


@pytest.mark.parametrize("layout", list(SFT_LAYOUTS))
def test_each_sft_layout_trains(layout, tmp_path, tiny_model):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(SFT_LAYOUTS[layout](i)) + "\n" for i in range(10)))
    assert sft(tmp_path, tiny_model, data, "max_steps=1", "save_steps=100", "val_fraction=0.2",
               "heldout_fraction=0.2") == 0
    m = read_manifest(tmp_path / "sft")
    assert m["status"] == "completed" and m["metrics"]["global_step"] == 1
    heldout = (tmp_path / "sft" / "heldout_prompts.jsonl").read_text().splitlines()
    assert len(heldout) == (0 if layout == "language-modelling" else 2)  # plain text has no prompts to hold out


def test_bad_plain_text_records_and_mixed_layouts_are_clear_errors(tmp_path, tiny_model, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": ""}) + "\n")
    assert sft(tmp_path, tiny_model, data) == 2
    assert f"{data}:2: field 'text' is empty" in capsys.readouterr().err
    data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"prompt": "Q", "completion": "A"}) + "\n")
    assert sft(tmp_path, tiny_model, data) == 2
    assert "are mixed" in capsys.readouterr().err
    assert not (tmp_path / "sft").exists()
