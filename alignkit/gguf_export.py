"""Write a Hugging Face Llama-family causal LM as one GGUF file (llama.cpp's format, read by Ollama,
LM Studio and transformers' GGUF loader), with its tokenizer and chat template, through the `gguf`
package that llama.cpp publishes.

What llama.cpp expects and a plain tensor dump would get wrong:
- the query and key projections are stored with each head's rotary halves interleaved
  (transformers keeps them as two halves; readers undo this when loading);
- one-dimensional tensors (the RMS norms) stay float32 at every quantisation;
- the vocabulary is a token list with a type per token (normal, control, user-defined), the BPE
  merges, and the special token ids; the chat template goes in as Jinja, without transformers'
  ``{% generation %}`` markers, which only transformers' renderer knows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from alignkit.errors import AlignkitError

# the quantisations we write: name -> (GGML type for matrices, llama.cpp file type)
QUANTS = ("f32", "f16", "q8_0")
LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


class ExportError(AlignkitError):
    """A model this exporter cannot write (yet), with what to do instead."""


def check_writable(config) -> None:
    """Stop before writing anything when the model is not a plain Llama-family causal LM."""
    architectures = list(getattr(config, "architectures", None) or [])
    if not set(architectures) & set(LLAMA_ARCHITECTURES):
        raise ExportError(
            f"GGUF export writes Llama-family causal LMs ({', '.join(LLAMA_ARCHITECTURES)}); this model is "
            f"{', '.join(architectures) or config.model_type}. Export it with --to hf and convert that directory "
            "with llama.cpp's convert_hf_to_gguf.py, which knows more architectures.")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not written yet (only plain RoPE)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ExportError(f"GGUF export: {flag}=true is not written yet")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"GGUF export: activation {config.hidden_act!r} is not Llama's silu")


def interleave_rotary_halves(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """transformers' q/k rows per head are [first halves..., second halves...]; llama.cpp's RoPE
    pairs neighbouring rows, so each head's two halves are interleaved row by row."""
    head_dim = weight.shape[0] // n_heads
    return (weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _encode_tensor(data: np.ndarray, quant: str):
    """(array to write, GGML type or None for the array's own dtype) for one tensor."""
    import gguf

    if data.ndim == 1 or quant == "f32":
        return data.astype(np.float32), None
    if quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data.astype(np.float32), q8), q8
    return data.astype(np.float16), None  # f16, and q8_0 rows too short for a 32-value block


def _tokenizer_model(tokenizer) -> tuple[list[str], dict]:
    """The backend tokenizer's BPE merges and its description, refusing kinds not written yet."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    pre = json.dumps(spec.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or "ByteLevel" not in pre:
        raise ExportError("GGUF export writes byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3 style); this one is "
                          f"{model.get('type')} with pre-tokenizer {pre[:80]}. Use --to hf and llama.cpp's converter.")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return merges, spec


def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for how text is split before BPE: SmolLM splits digits one by one."""
    pre = json.dumps(spec.get("pre_tokenizer") or {})
    return "smollm" if '"Digits"' in pre and '"individual_digits": true' in pre else "gpt-2"


def plain_chat_template(template: str) -> str:
    """The chat template without transformers' {% generation %} markers (Jinja elsewhere rejects them)."""
    return re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", template)


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    import gguf

    merges, spec = _tokenizer_model(tokenizer)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ExportError(f"tokenizer has token id {max(by_id)} but the model's embeddings have {vocab_size} rows")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows no token uses (vocabularies padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(token_id)
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    writer.add_add_eos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(plain_chat_template(tokenizer.chat_template))


def write_gguf(model, tokenizer, path: Path, quant: str = "f32", name: str = "alignkit-model") -> Path:
    """Write ``model`` (a transformers Llama-family causal LM, fp32 or fp16 weights) and its
    tokenizer to the GGUF file ``path``. Returns ``path``."""
    import gguf

    if quant not in QUANTS:
        raise ExportError(f"GGUF quantisation {quant!r}: expected one of {', '.join(QUANTS)}")
    config = model.config
    check_writable(config)
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    vocab_size = model.get_input_embeddings().num_embeddings
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    tied = getattr(config, "tie_word_embeddings", False)

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, vocab_size)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for hf_name, data in state.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by the reader / the same tensor as the embeddings
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"GGUF export: no GGUF name for tensor {hf_name}")
        if gguf_name.endswith("attn_q.weight"):
            data = interleave_rotary_halves(data, n_heads)
        elif gguf_name.endswith("attn_k.weight"):
            data = interleave_rotary_halves(data, n_kv)
        array, raw_dtype = _encode_tensor(data, quant)
        writer.add_tensor(gguf_name, array, raw_dtype=raw_dtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
