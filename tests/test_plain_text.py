"""Standard (plain-string) records train as plain text, token for token as TRL trains them natively,
unless a chat template is asked for (``standard_as_chat=true``); the saved model carries the
plain-text template, so later stages read prompts the way training did."""

from __future__ import annotations

import json

import pytest

from alignkit.cli import main
from alignkit.data import DataError
from alignkit.models import PLAIN_TEXT_TEMPLATE, load_tokenizer, use_text_format
from alignkit.preferences import load_preferences
from alignkit.runstore import read_manifest
from alignkit.scoring import conversation_ids

STEP = ["max_steps=1", "batch_size=2", "grad_accum=1", "save_steps=1000", "eval_steps=1000", "max_length=64"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def completions(n=12):
    return [{"prompt": f"Question {i}: is {i} even?\nAnswer:", "completion": " yes" if i % 2 == 0 else " no"}
            for i in range(n)]


def test_sft_standard_records_tokenise_as_trl_does_natively(tiny_model, tmp_path):
    """Our path (records as turns + the plain-text template) and TRL's own path for standard
    strings give the same input ids and the same labels (the prompt masked out)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from transformers import AutoModelForCausalLM

    rows = completions(4)
    ours_tok = load_tokenizer(str(tiny_model))
    assert use_text_format(ours_tok, standard_data=True, standard_as_chat=False) == "plain"
    native_tok = load_tokenizer(str(tiny_model))
    args = SFTConfig(output_dir=str(tmp_path / "x"), report_to=[], completion_only_loss=True, max_length=64,
                     bf16=False, use_cpu=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    as_turns = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                   "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows])
    ours = SFTTrainer(model=model, args=args, processing_class=ours_tok, train_dataset=as_turns).train_dataset
    native = SFTTrainer(model=model, args=args, processing_class=native_tok,
                        train_dataset=Dataset.from_list(rows)).train_dataset
    for a, b in zip(ours, native):
        assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]  # labels: -100 over the prompt
    assert native[0]["input_ids"][-1] == ours_tok.eos_token_id  # the reply ends with EOS


def test_sft_on_standard_data_saves_the_plain_template_unless_chat_is_asked_for(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "pc.jsonl", completions())
    assert main(["sft", f"model={tiny_model}", f"data={data}", f"output_dir={tmp_path / 'plain'}", *STEP]) == 0
    assert read_manifest(tmp_path / "plain")["notes"]["text_format"] == "plain"
    saved = load_tokenizer(str(tmp_path / "plain" / "model"))
    assert saved.chat_template == PLAIN_TEXT_TEMPLATE
    prompt = json.loads((tmp_path / "plain" / "heldout_prompts.jsonl").read_text().splitlines()[0])["prompt"]
    rendered = saved.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("Question ") and rendered.endswith("Answer:")  # no role markers

    assert main(["sft", f"model={tiny_model}", f"data={data}", f"output_dir={tmp_path / 'chat'}", *STEP,
                 "standard_as_chat=true"]) == 0
    assert read_manifest(tmp_path / "chat")["notes"]["text_format"] == "chat"
    assert "<|im_start|>" in load_tokenizer(str(tmp_path / "chat" / "model")).chat_template


@pytest.mark.parametrize("stage", ["reward train", "align dpo"])
def test_standard_preferences_train_as_plain_text(stage, tiny_model, tmp_path):
    rows = [{"prompt": f"Is {i} even? Answer:", "chosen": " yes" if i % 2 == 0 else " no",
             "rejected": " no" if i % 2 == 0 else " yes"} for i in range(8)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    assert main([*stage.split(), f"model={tiny_model}", f"data={data}", f"output_dir={out}", "eval_fraction=0.25",
                 *STEP]) == 0
    assert read_manifest(out)["notes"]["text_format"] == "plain"
    tok = load_tokenizer(str(out / "model"))
    pair = load_preferences(data).pairs[0]
    ids = conversation_ids(tok, pair["prompt"], pair["chosen"][0]["content"])  # what the scorer reads
    assert ids == tok("Is 0 even? Answer: yes", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_implicit_standard_pairs_keep_the_text_whole(tmp_path):
    data = write_jsonl(tmp_path / "i.jsonl", [{"chosen": "The sky is blue.", "rejected": "The sky is green."}])
    (pair,) = load_preferences(data).pairs
    assert pair["prompt"][0]["content"] + pair["chosen"][0]["content"] == "The sky is blue."


def test_mixed_standard_and_conversational_records_are_refused(tmp_path):
    user = [{"role": "user", "content": "Hi"}]
    data = write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": "Hi", "chosen": "a", "rejected": "b"},
        {"prompt": user, "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]}])
    with pytest.raises(DataError, match="one kind per file"):
        load_preferences(data).check_one_layout(standard_as_chat=False)
    load_preferences(data).check_one_layout(standard_as_chat=True)  # all in the chat template: fine
    sft_data = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Hi", "completion": "a"},
                                                  {"messages": user + [{"role": "assistant", "content": "b"}]}])
    from alignkit.sft.train import SFTStageConfig, prepare_data

    with pytest.raises(DataError, match="one kind per data set"):
        prepare_data(SFTStageConfig(data=str(sft_data)))
    assert not prepare_data(SFTStageConfig(data=str(sft_data), standard_as_chat=True))["standard"]
