"""The shared package: data formats, config loading, the run store, tiny models."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field

import pytest

from alignkit.config import ConfigError, doc, load_config, parse_overrides
from alignkit.data import DataError, load_prompts, load_sft_examples, normalize_text, read_records, seeded_split
from alignkit.preferences import load_preferences, parse_hh_transcript, split_hh_pair
from alignkit.runstore import atomic_write_json, read_manifest, redact, stage_run


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------ data formats

def test_alpaca_json_and_jsonl_become_prompt_completion(tmp_path):
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5"}, {"instruction": "Hi?", "input": "", "output": "Hello."}]
    for path in (write(tmp_path, "a.json", json.dumps(rows, indent=2)),
                 write(tmp_path, "a.jsonl", "\n".join(json.dumps(r) for r in rows))):
        examples, dropped = load_sft_examples(path)
        assert dropped == {}
        assert examples[0] == {"prompt": [{"role": "user", "content": "Add.\n\n2 and 3"}],
                               "completion": [{"role": "assistant", "content": "5"}]}
        assert examples[1]["prompt"][0]["content"] == "Hi?"


def test_prompt_completion_and_messages_formats(tmp_path):
    pc = write(tmp_path, "pc.jsonl", json.dumps({"prompt": "Say hi", "completion": "hi"}) + "\n")
    msgs = write(tmp_path, "m.jsonl", json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}) + "\n")
    assert load_sft_examples(pc)[0][0]["completion"][0]["content"] == "hi"
    ex = load_sft_examples(msgs)[0][0]
    assert [m["role"] for m in ex["prompt"]] == ["system", "user"] and ex["completion"][0]["content"] == "A"


def test_json_array_errors_carry_the_element_line(tmp_path):
    path = write(tmp_path, "a.json", '[\n {"instruction": "a", "output": "b"},\n\n {"instruction": "a", "output": ""}\n]')
    with pytest.raises(DataError) as e:
        load_sft_examples(path)
    assert e.value.line == 4 and e.value.field == "output"
    examples, dropped = load_sft_examples(path, on_bad_record="drop")
    assert len(examples) == 1 and dropped == {"output is empty": 1}


def test_local_hf_dataset_dir(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"instruction": "a", "input": "", "output": "b"}]).save_to_disk(str(tmp_path / "ds"))
    assert load_sft_examples(tmp_path / "ds")[0][0]["completion"][0]["content"] == "b"


def test_demo_data_is_shipped_and_loads():
    examples, dropped = load_sft_examples("demo")
    assert len(examples) >= 300 and dropped == {}


def test_hub_name_without_hub_is_a_clear_error():
    with pytest.raises(DataError, match="could not load"):
        load_sft_examples("someone/no-such-dataset")


def test_hh_rlhf_transcripts_split_into_prompt_and_final_replies(real_data):
    c = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken..."
    r = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: No."
    prompt, chosen, rejected = split_hh_pair(c, r)
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
    assert chosen == "Why did the chicken..." and rejected == "No."
    with pytest.raises(ValueError):
        parse_hh_transcript("no markers here")
    data = load_preferences(real_data / "hh_rlhf_harmless" / "test_200.jsonl.gz")
    assert data.format == "hh-rlhf" and len(data.pairs) + sum(data.dropped.values()) == 200
    assert all(p["prompt"][-1]["role"] == "user" for p in data.pairs)


def test_preference_formats_and_bad_pairs(tmp_path):
    rows = [
        {"prompt": "Q1", "chosen": "good", "rejected": "bad", "margin": 2},
        {"prompt": [{"role": "user", "content": "Q2"}], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]},
        {"prompt": "Q3", "chosen": "same", "rejected": "same"},
        {"prompt": "Q4", "chosen": "", "rejected": "x"},
    ]
    path = write(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in rows))
    data = load_preferences(path)
    assert len(data.pairs) == 2 and data.pairs[0]["margin"] == 2.0
    assert data.dropped == {"identical_replies": 1, "empty_reply": 1, "prompt_mismatch": 0}
    with pytest.raises(DataError) as e:
        load_preferences(path, on_bad_pair="error")
    assert e.value.line == 3
    missing = write(tmp_path, "m.jsonl", json.dumps({"prompt": "Q", "chosen": "a"}))
    with pytest.raises(DataError, match="rejected"):
        load_preferences(missing)


def test_prompt_files_of_every_shape(real_data, tmp_path):
    mt = load_prompts(real_data / "mt_bench" / "question.jsonl")
    assert len(mt) == 80 and len(mt[0]["turns"]) == 2 and mt[0]["id"] == "81"
    si = load_prompts(real_data / "self_instruct" / "user_oriented_instructions_60.jsonl")
    assert len(si) == 60 and si[0]["prompt"][0]["content"]
    oa = load_prompts(real_data / "oasst_prompts" / "prompt_lottery_en_60_text.jsonl")
    assert len(oa) == 60 and isinstance(oa[0]["prompt"][0]["content"], str)
    custom = write(tmp_path, "c.jsonl", json.dumps({"query": "What?"}))
    assert load_prompts(custom, field="query")[0]["prompt"][0]["content"] == "What?"
    with pytest.raises(DataError, match="prompt"):
        load_prompts(custom)


def test_read_records_reports_bad_json_line(tmp_path):
    path = write(tmp_path, "x.jsonl", '{"a": 1}\n{"a": \n')
    with pytest.raises(DataError) as e:
        read_records(path)
    assert e.value.line == 2 and "invalid JSON" in str(e.value)


def test_seeded_split_and_normalisation():
    items = list(range(100))
    a = seeded_split(items, {"train": 0, "val": 0.1, "test": 0.2}, seed=3)
    assert a == seeded_split(items, {"train": 0, "val": 0.1, "test": 0.2}, seed=3)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (70, 10, 20)
    assert sorted(a["train"] + a["val"] + a["test"]) == items
    assert normalize_text("  Héllo,   WORLD!! ") == normalize_text("hello world")


# ------------------------------------------------------------------------------ config

@dataclass
class Inner:
    r: int = doc("rank", 8)


@dataclass
class Outer:
    name: str = doc("a name", "x")
    lr: float = doc("learning rate", 1e-3)
    flag: bool = doc("a flag", False)
    limit: int | None = doc("optional", None)
    inner: Inner = field(default_factory=Inner)


def test_config_yaml_overrides_and_errors(tmp_path):
    path = write(tmp_path, "c.yaml", "name: y\nlr: 1e-4\ninner:\n  r: 4\n")
    cfg = load_config(Outer, path, ["flag=true", "inner.r=16", "limit=3"])
    assert (cfg.name, cfg.lr, cfg.flag, cfg.limit, cfg.inner.r) == ("y", 1e-4, True, 3, 16)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(Outer, path, ["nmae=z"])
    with pytest.raises(ConfigError, match="lr: expected a number"):
        load_config(Outer, path, ["lr=fast"])
    with pytest.raises(ConfigError, match="inner: unknown key"):
        load_config(Outer, path, ["inner.q=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["oops"])


# ------------------------------------------------------------------------------ run store

def test_stage_run_lifecycle_skip_force_and_failure(tmp_path):
    data = write(tmp_path, "in.txt", "v1")
    out = tmp_path / "stage"
    with stage_run("demo", out, {"k": 1, "api_key": "sekrit"}, {"data": data}) as run:
        assert not run.skipped
        assert read_manifest(out)["status"] == "running"
        run.metrics["m"] = 1.5
    m = read_manifest(out)
    assert m["status"] == "completed" and m["metrics"] == {"m": 1.5}
    assert "sekrit" not in (out / "manifest.json").read_text()
    with stage_run("demo", out, {"k": 1, "api_key": "sekrit"}, {"data": data}) as run:
        assert run.skipped
    with stage_run("demo", out, {"k": 1, "api_key": "sekrit"}, {"data": data}, force=True) as run:
        assert not run.skipped
    data.write_text("v2")  # changed input: runs again
    with pytest.raises(RuntimeError):
        with stage_run("demo", out, {"k": 1}, {"data": data}) as run:
            assert not run.skipped
            raise RuntimeError("boom")
    m = read_manifest(out)
    assert m["status"] == "failed" and "boom" in m["error"]
    with stage_run("demo", out, {"k": 1}, {"data": data}) as run:
        assert run.resuming  # the failed attempt had the same config and inputs


def test_a_completed_stage_that_runs_again_says_which_config_keys_and_inputs_changed(tmp_path, caplog):
    data, out = write(tmp_path, "in.txt", "v1"), tmp_path / "stage"
    with stage_run("demo", out, {"opt": {"lr": 1e-4, "beta": 0.1}, "api_key": "sekrit"}, {"data": data}):
        pass
    data.write_text("v2")
    with caplog.at_level(logging.INFO, logger="alignkit.runstore"):
        with stage_run("demo", out, {"opt": {"lr": 2e-4, "beta": 0.1}, "api_key": "other"}, {"data": data}) as run:
            assert not run.skipped
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "running again because config opt.lr, input data changed" in said
    assert "beta" not in said and "api_key" not in said  # redacted secrets compare equal: never named


def test_atomic_write_never_exposes_partial_files(tmp_path):
    path = tmp_path / "m.json"
    big = {"x": "y" * 200_000}
    seen_bad = []

    def reader():
        for _ in range(300):
            if path.exists():
                try:
                    json.loads(path.read_text())
                except json.JSONDecodeError:
                    seen_bad.append(1)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(50):
        atomic_write_json(path, {**big, "i": i})
    t.join()
    assert not seen_bad and json.loads(path.read_text())["i"] == 49
    assert not list(tmp_path.glob(".*tmp"))


def test_redact_hides_secrets_at_any_depth():
    assert redact({"a": {"ARGILLA_API_KEY": "k", "hf_token": "t", "ok": [{"password": "p"}]}, "b": 1}) == \
        {"a": {"ARGILLA_API_KEY": "***", "hf_token": "***", "ok": [{"password": "***"}]}, "b": 1}


def test_tiny_model_generates_with_its_chat_template(tiny_model):
    from alignkit.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_model), padding_side="left")
    assert tok.pad_token_id != tok.eos_token_id
    model = load_causal_lm(str(tiny_model), tok)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    batch = tok([text, text + " a b c"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


def test_every_trl_preference_shape_loads_with_its_prompt(tmp_path):
    """TRL's four preference layouts: explicit or implicit prompt, standard or conversational; an
    implicit prompt is what chosen and rejected share (the last turns, or the common text)."""
    user = [{"role": "user", "content": "What colour is the sky?"}]
    shapes = {
        "preference": {"prompt": "What colour is the sky?", "chosen": "Blue.", "rejected": "Green."},
        "preference-conversational": {"prompt": user, "chosen": [{"role": "assistant", "content": "Blue."}],
                                      "rejected": [{"role": "assistant", "content": "Green."}]},
        "preference-implicit": {"chosen": "What colour is the sky? Blue.", "rejected": "What colour is the sky? Green."},
        "preference-conversational-implicit": {"chosen": user + [{"role": "assistant", "content": "Blue."}],
                                               "rejected": user + [{"role": "assistant", "content": "Green."}]},
    }
    for fmt, rec in shapes.items():
        data = load_preferences(write(tmp_path, f"{fmt}.jsonl", json.dumps(rec)))
        assert data.format == fmt
        (pair,) = data.pairs
        assert pair["prompt"] == user, fmt
        # (an implicit standard pair keeps the space before its replies: prompt + reply is the text)
        assert pair["chosen"][0]["content"].strip() == "Blue." and pair["rejected"][0]["content"].strip() == "Green.", fmt
    # bad records of the implicit shapes still name file, line and field
    bad = write(tmp_path, "bad.jsonl", "\n".join([
        json.dumps(shapes["preference"]),
        json.dumps({"chosen": user + [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "user", "content": "x"}]}),
    ]))
    with pytest.raises(DataError) as e:
        load_preferences(bad)
    assert e.value.line == 2 and e.value.field == "rejected" and "ending with the assistant's reply" in str(e.value)
    unrelated = write(tmp_path, "u.jsonl", json.dumps({"chosen": "Blue.", "rejected": "Green."}) + "\n"
                      + json.dumps(shapes["preference-implicit"]))
    data = load_preferences(unrelated)  # nothing shared: no prompt, dropped and counted
    assert len(data.pairs) == 1 and data.dropped["prompt_mismatch"] == 1
    with pytest.raises(DataError, match="share no text"):
        load_preferences(unrelated, on_bad_pair="error")


# ------------------------------------------------------------------------------ command line

def test_every_command_and_subcommand_prints_its_help():
    """`alignkit X --help` and `alignkit X Y --help` must answer, not crash (a bare % in a help
    string made `alignkit reward --help` raise inside argparse)."""
    import argparse

    from alignkit.cli import VERBS, build_parser

    def subparsers(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from action.choices.items()

    checked = []
    for verb in VERBS:
        for name, verb_parser in subparsers(build_parser([verb])):
            if name != verb:
                continue
            for sub_name, sub_parser in [(verb, verb_parser), *subparsers(verb_parser)]:
                assert "usage:" in sub_parser.format_help(), sub_name
                checked.append(sub_name)
    assert {"reward", "train", "eval", "dpo", "ppo", "sft"} <= set(checked)
