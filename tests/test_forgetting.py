"""The forgetting check: the evaluate metric computes perplexity exactly, and a model over-trained
on one narrow text is flagged for a higher general-text perplexity in eval.json, the report and
the loop's summary."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignkit.cli import main
from alignkit.evals.forgetting import METRIC, load_general_text
from alignkit.loop.index import eval_summary


def test_the_metric_is_exp_of_the_mean_token_nll(tiny_model):
    import evaluate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = ["The sea is wide and blue.", "Give three tips for staying healthy, please.", "Yes."]
    result = evaluate.load(str(METRIC)).compute(predictions=texts, model=model, tokenizer=tok, batch_size=2)
    total, tokens, per_text = 0.0, 0, []
    for text in texts:  # one text at a time, no padding: transformers' own shifted loss
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        n = ids.shape[1] - 1
        total, tokens = total + loss * n, tokens + n
        per_text.append(loss)
    assert result["tokens"] == tokens
    assert result["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert result["per_text_nll"] == pytest.approx(per_text, rel=1e-5)


def test_builtin_general_text_ships_with_the_package():
    texts = load_general_text("builtin", None)
    assert len(texts) == 200 and all(len(t.split()) >= 50 for t in texts)


def test_a_model_over_trained_on_one_narrow_text_is_flagged(tiny_model, tmp_path):
    narrow = tmp_path / "narrow.jsonl"
    narrow.write_text("".join(json.dumps({"text": "The cat sat on the mat. " * 8}) + "\n" for _ in range(16)))
    assert main(["sft", f"model={tiny_model}", f"data={narrow}", f"output_dir={tmp_path / 'sft'}", "max_steps=40",
                 "learning_rate=3e-3", "batch_size=4", "save_steps=1000", "eval_steps=1000", "max_length=64",
                 "lr_scheduler=constant", "warmup_ratio=0"]) == 0
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say hello."}) + "\n" + json.dumps({"prompt": "Name a colour."}) + "\n")
    out = tmp_path / "eval"
    assert main(["eval", f"models={{base: {tiny_model}, narrow: {tmp_path / 'sft' / 'model'}}}", "baseline=base",
                 f"prompts={prompts}", f"output_dir={out}", "max_new_tokens=4", "general_text_max=40",
                 "report_samples=1"]) == 0
    result = json.loads((out / "eval.json").read_text())
    f = result["forgetting"]
    assert f["reference"] == "base" and f["texts"] == 40
    assert f["models"]["base"]["change"] == 0 and not f["models"]["base"]["flagged"]
    narrow_model = f["models"]["narrow"]
    assert narrow_model["change"] > 0.5 and narrow_model["nll_diff"]["ci"][0] > 0 and narrow_model["flagged"]
    assert "Forgetting (general text)" in (out / "report.html").read_text()
    assert "FLAGGED" in eval_summary(result)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["narrow/general_perplexity_change"] == pytest.approx(narrow_model["change"])

    # a reference outside the evaluated models (the loop's starting model) is measured too
    out2 = tmp_path / "eval2"
    assert main(["eval", f"models={{narrow: {tmp_path / 'sft' / 'model'}}}", "baseline=narrow",
                 f"prompts={prompts}", f"output_dir={out2}", "max_new_tokens=4", "general_text_max=40",
                 f"forgetting_reference={tiny_model}", "report_samples=1"]) == 0
    f2 = json.loads((out2 / "eval.json").read_text())["forgetting"]
    assert f2["reference"] == "base" and f2["models"]["narrow"]["flagged"]
    assert f2["models"]["narrow"]["perplexity"] == pytest.approx(narrow_model["perplexity"], rel=1e-6)


def test_bad_general_text_fails_before_anything_is_written(tiny_model, tmp_path, capsys):
    bad = tmp_path / "general.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 3}) + "\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    assert main(["eval", f"models={{m: {tiny_model}}}", "baseline=m", f"prompts={prompts}",
                 f"output_dir={tmp_path / 'e'}", f"general_text={bad}"]) == 2
    assert "general.jsonl:2" in capsys.readouterr().err and not (tmp_path / "e").exists()
