"""alignkit export: merged HF directories, GGUF files read back with transformers' GGUF loader
(independently of the exporter's own check), Ollama Modelfiles, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

from alignkit import gguf_export
from alignkit.cli import main
from alignkit.errors import AlignkitError
from alignkit.gguf_export import ExportError

# measured on the tiny model and SmolLM2-135M (docs/foundation.md "Export"); asserted with headroom
TOLERANCES = {"f16": {"mean_kl": 1e-4, "top1": 0.95}, "q8_0": {"mean_kl": 1e-2, "top1": 0.9}}
TEXTS = ["What is the capital of France? Answer in one word.", "Count: 1, 2, 3, 45, 678!",
         "  leading spaces\nand a newline, émigré café"]


def read_back(folder, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tok, model


def compare(source_dir, folder, name):
    """(same tokenization on every text, max |log-prob diff|, mean KL, top-1 agreement) of the GGUF
    against the source model, on plain and chat-formatted texts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source_dir)
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    gguf_tok, gguf_model = read_back(folder, name)
    texts = TEXTS + [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                             add_generation_prompt=True) for t in TEXTS[:2]]
    same, worst, kl, agree, n = True, 0.0, 0.0, 0, 0
    for text in texts:
        ids = tok(text)["input_ids"]
        same &= gguf_tok(text)["input_ids"] == ids
        with torch.no_grad():
            a, b = (torch.log_softmax(m(torch.tensor([ids])).logits[0], -1) for m in (model, gguf_model))
        worst = max(worst, (a - b).abs().max().item())
        kl += (a.exp() * (a - b)).sum().item()
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        n += len(ids)
    return same, worst, kl / n, agree / n


def export(*args):
    return main(["export", *map(str, args)])


def test_gguf_f32_round_trip_tiny(tiny_model, tmp_path):
    out = tmp_path / "gguf"
    assert export("--model", tiny_model, "--to", "gguf", "--quant", "f32", "--out", out) == 0
    same, worst, kl, agree = compare(tiny_model, out, "model-f32.gguf")
    assert same and worst < 1e-4 and agree == 1.0
    tok, _ = read_back(out, "model-f32.gguf")
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<pad>", "<s>")
    assert "{% generation %}" not in tok.chat_template and "<|im_start|>" in tok.chat_template
    record = json.loads((out / "export.json").read_text())
    assert record["check"]["max_abs_logprob_diff"] < 1e-4 and record["files"]["model-f32.gguf"]["bytes"] > 0
    assert not list(tmp_path.glob(".*tmp*")), "temp dir left behind"


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_quantised_within_stated_tolerance(tiny_model, tmp_path, quant):
    out = tmp_path / quant
    assert export("--model", tiny_model, "--to", "gguf", "--quant", quant, "--out", out) == 0
    same, worst, kl, agree = compare(tiny_model, out, f"model-{quant}.gguf")
    assert same and worst > 0  # really quantised
    assert kl < TOLERANCES[quant]["mean_kl"] and agree >= TOLERANCES[quant]["top1"]
    size = (out / f"model-{quant}.gguf").stat().st_size
    assert export("--model", tiny_model, "--to", "gguf", "--quant", "f32", "--out", tmp_path / "f32") == 0
    assert size < (tmp_path / "f32" / "model-f32.gguf").stat().st_size


def test_the_read_back_check_catches_unpermuted_rotary_weights(tiny_model, tmp_path, monkeypatch):
    """Written as transformers lays q/k out, the file loads but computes something else: the
    exporter's own read-back check must stop it."""
    monkeypatch.setattr(gguf_export, "interleave_rotary_halves", lambda weight, n_heads: weight)
    with pytest.raises(ExportError, match="log-probs differ"):
        from alignkit.export import export as run_export

        run_export(str(tiny_model), "gguf", tmp_path / "bad", quant="f32")
    assert not (tmp_path / "bad").exists()


def test_hf_export_merges_a_lora_adapter(tiny_model, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter change something
            p.data.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(adapter)

    assert export("--model", adapter, "--to", "hf", "--out", tmp_path / "hf") == 0
    merged_dir = tmp_path / "hf"
    assert (merged_dir / "model.safetensors").exists() and not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), adapter).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(merged_dir)(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        got, want, before = merged(ids).logits, reference(ids).logits, plain(ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, before, atol=1e-3)

    assert export("--model", adapter, "--to", "hf", "--quant", "f16", "--out", tmp_path / "hf16") == 0
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["dtype"] == "float16"


def test_ollama_modelfile_for_chatml(tiny_model, tmp_path):
    out = tmp_path / "ollama"
    assert export("--model", tiny_model, "--to", "ollama", "--out", out) == 0
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in modelfile and (out / "model-f16.gguf").exists()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "{{ .Content }}<|im_end|>" in modelfile
    assert "SYSTEM" not in modelfile  # the tiny template adds no default system prompt


def test_ollama_keeps_a_default_system_prompt_and_refuses_other_templates(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from alignkit.export import chatml_modelfile

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
                         "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert 'SYSTEM """Be brief."""' in chatml_modelfile(tok, "m.gguf")
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    with pytest.raises(ExportError, match="ChatML"):
        chatml_modelfile(tok, "m.gguf")


def test_refusals_leave_nothing_behind(tiny_model, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    # a reward model is not a generative model
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    rm.save_pretrained(tmp_path / "rm")
    assert export("--model", tmp_path / "rm", "--to", "hf", "--out", tmp_path / "rm-hf") == 2
    assert "no tokenizer" in capsys.readouterr().err
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "rm")
    assert export("--model", tmp_path / "rm", "--to", "gguf", "--out", tmp_path / "rm-gguf") == 2
    assert "exports to --to hf only" in capsys.readouterr().err
    assert not (tmp_path / "rm-gguf").exists()
    assert export("--model", tmp_path / "rm", "--to", "hf", "--out", tmp_path / "rm-hf") == 0

    # an architecture the GGUF writer does not know
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=600)).save_pretrained(tmp_path / "gpt2")
    assert export("--model", tmp_path / "gpt2", "--to", "gguf", "--out", tmp_path / "gpt2-gguf") == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel" in err and "convert_hf_to_gguf" in err

    # no silent overwrite; a bad quant for the target
    (tmp_path / "taken").mkdir()
    assert export("--model", tiny_model, "--to", "hf", "--out", tmp_path / "taken") == 2
    assert "--force" in capsys.readouterr().err
    assert export("--model", tiny_model, "--to", "hf", "--quant", "q8_0", "--out", tmp_path / "q") == 2
    assert not (tmp_path / "q").exists()


def test_push_to_hub_failure_keeps_the_export_and_no_token(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue123")
    from alignkit.export import export as run_export

    with pytest.raises(AlignkitError, match="export is complete") as failure:
        run_export(str(tiny_model), "hf", tmp_path / "hf", push_to_hub="someone/model")
    assert (tmp_path / "hf" / "model.safetensors").exists()
    assert "hf_secretvalue123" not in str(failure.value)
    assert "hf_secretvalue123" not in (tmp_path / "hf" / "export.json").read_text()


@pytest.mark.slow
def test_gguf_round_trip_smollm(offline_cache, tmp_path):
    """The offline default (SmolLM2-135M, 30 blocks, GQA, tied embeddings, ChatML with a default
    system prompt) at each quantisation."""
    _, model_dir = offline_cache
    for quant in ("f32", "f16", "q8_0"):
        out = tmp_path / quant
        target = "ollama" if quant == "q8_0" else "gguf"
        assert export("--model", model_dir, "--to", target, "--quant", quant, "--out", out, "--no-check") == 0
        same, worst, kl, agree = compare(model_dir, out, f"model-{quant}.gguf")
        assert same
        if quant == "f32":
            assert worst < 1e-4
        else:
            assert kl < TOLERANCES[quant]["mean_kl"] and agree >= TOLERANCES[quant]["top1"]
        (out / f"model-{quant}.gguf").unlink()  # 135M parameters per file: keep the temp dir small
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in (tmp_path / "q8_0" / "Modelfile").read_text()


def llama_cpp_compare(source_dir, gguf_file):
    """(same tokens, mean KL, top-1 agreement, chat prompt rendered the same) of llama.cpp running
    the GGUF against transformers running the source model."""
    import numpy as np
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source_dir)
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    llm = Llama(model_path=str(gguf_file), logits_all=True, n_ctx=512, verbose=False)
    messages = [{"role": "user", "content": TEXTS[0]}]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=tok.eos_token,
                                    bos_token=tok.bos_token or "", add_generation_prompt=True)
    same_chat = formatter(messages=messages).prompt == chat
    same, kl, agree, n = True, 0.0, 0, 0
    for text in TEXTS + [chat]:
        ids = tok(text)["input_ids"]
        same &= llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.reset()
        llm.eval(ids)
        theirs = torch.log_softmax(torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float64), -1)
        with torch.no_grad():
            ours = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        kl += (ours.exp() * (ours - theirs)).sum().item()
        agree += (ours.argmax(-1) == theirs.argmax(-1)).sum().item()
        n += len(ids)
    llm.close()
    return same, kl / n, agree / n, same_chat


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_llama_cpp_runs_the_gguf(tiny_model, tmp_path, quant):
    """llama.cpp itself (llama-cpp-python, an optional install: it compiles llama.cpp, ~7 min on 2
    cores) loads the file, splits text into the same tokens, renders the same chat prompt from the
    template in the file and predicts the same next tokens."""
    pytest.importorskip("llama_cpp")
    assert export("--model", tiny_model, "--to", "gguf", "--quant", quant, "--out", tmp_path / quant) == 0
    same, kl, agree, same_chat = llama_cpp_compare(tiny_model, tmp_path / quant / f"model-{quant}.gguf")
    assert same and same_chat
    assert kl < (1e-4 if quant == "f32" else 2e-2) and agree >= (0.99 if quant == "f32" else 0.85)
