"""``alignkit export``: a trained model (any stage's output, merged or a LoRA adapter) as

- ``hf``: one merged Hugging Face directory (LoRA folded in; safetensors, tokenizer, chat template);
- ``gguf``: one GGUF file for llama.cpp, LM Studio and transformers (Llama-family models);
- ``ollama``: that GGUF file and a ``Modelfile`` with the chat template, for ``ollama create``.

The GGUF targets read the file back with transformers' GGUF loader before they finish and record
the largest next-token log-prob difference from the source model in ``export.json`` (a GGUF whose
tokenizer differs from the source's, or an f32 file off by more than 1e-4, stops the export).
The output directory is built beside its final place and renamed into it, so an interrupted export
never leaves half a model.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path

from alignkit.errors import AlignkitError
from alignkit.gguf_export import QUANTS, ExportError, check_writable, plain_chat_template, write_gguf

log = logging.getLogger(__name__)

TARGETS = ("hf", "gguf", "ollama")
HF_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
# prompts the read-back check scores; the chat-formatted one exercises the special tokens
CHECK_TEXTS = ("Give three tips for staying healthy.", "What is 12 + 30? Answer with a number.")
F32_TOLERANCE = 1e-4


def source_config(path: str):
    """The model config of a model directory, or of a LoRA adapter's base model."""
    from transformers import AutoConfig

    if (Path(path) / "adapter_config.json").exists():
        from peft import PeftConfig

        path = PeftConfig.from_pretrained(path).base_model_name_or_path
    return AutoConfig.from_pretrained(path)


def is_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or [])


def load_for_export(path: str):
    """(model in fp32 with any LoRA adapter merged in, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    classifier = is_classifier(source_config(path))
    if (Path(path) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

        loader = AutoPeftModelForSequenceClassification if classifier else AutoPeftModelForCausalLM
        loaded = loader.from_pretrained(path, dtype=torch.float32).merge_and_unload()
    else:
        loader = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
        loaded = loader.from_pretrained(path, dtype=torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: no tokenizer could be read there ({str(e).splitlines()[0]}); every alignkit "
                          "stage saves one beside its model") from None
    return loaded.eval(), tokenizer


def chatml_modelfile(tokenizer, gguf_name: str) -> str:
    """An Ollama Modelfile whose TEMPLATE renders conversations as the model's own Jinja template
    does. Ollama templates are Go templates, so the Jinja one cannot be copied: ChatML (with or
    without a default system prompt) is translated, and checked by rendering both on samples."""
    start, end = "<|im_start|>", "<|im_end|>"

    def chatml(messages):
        return "".join(f"{start}{m['role']}\n{m['content']}{end}\n" for m in messages) + f"{start}assistant\n"

    def jinja(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    user = [{"role": "user", "content": "U"}]
    rendered, expected = jinja(user), chatml(user)
    default_system = None
    if rendered != expected:
        head = rendered[: len(rendered) - len(expected)]
        prefix = f"{start}system\n"
        if not (rendered.endswith(expected) and head.startswith(prefix) and head.endswith(f"{end}\n")):
            raise ExportError("the Ollama Modelfile translates ChatML chat templates (<|im_start|>role ...); this "
                              "model's template renders a user turn as " + repr(rendered[:120]) +
                              ". Use --to gguf: llama.cpp reads the Jinja template from the file.")
        default_system = head[len(prefix): -len(end) - 1]
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                    {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    if jinja(conversation) != chatml(conversation):
        raise ExportError("the chat template is ChatML for one user turn but not for a whole conversation; "
                          "use --to gguf")
    lines = ["# Ollama model: ollama create NAME -f Modelfile   (then: ollama run NAME)", f"FROM ./{gguf_name}",
             'TEMPLATE """{{- if .System }}' + start + "system\n{{ .System }}" + end + "\n{{ end }}"
             '{{- range .Messages }}{{- if ne .Role "system" }}' + start + "{{ .Role }}\n{{ .Content }}" + end +
             "\n{{ end }}{{- end }}" + start + 'assistant\n"""']
    if default_system:
        lines.append(f'SYSTEM """{default_system}"""')
    lines += [f'PARAMETER stop "{end}"', f'PARAMETER stop "{start}"']
    return "\n".join(lines) + "\n"


def check_gguf(model, tokenizer, gguf_path: Path, quant: str) -> dict:
    """Read the GGUF back with transformers' loader; compare tokenization and next-token
    log-probs with the source model on :data:`CHECK_TEXTS` (plain and chat-formatted)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    read_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    read_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    texts = list(CHECK_TEXTS)
    if tokenizer.chat_template:
        texts.append(tokenizer.apply_chat_template([{"role": "user", "content": CHECK_TEXTS[0]}],
                                                   tokenize=False, add_generation_prompt=True))
    worst = top_worst = kl_sum = agree = positions = 0.0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if read_tokenizer(text)["input_ids"] != ids:
            raise ExportError(f"{gguf_path}: the GGUF's tokenizer splits {text[:60]!r} differently from the source's")
        with torch.no_grad():
            batch = torch.tensor([ids])
            source, read = (torch.log_softmax(m(batch).logits[0], -1) for m in (model, read_model))
        top = source.topk(10, dim=-1).indices
        worst = max(worst, (source - read).abs().max().item())
        top_worst = max(top_worst, (source.gather(-1, top) - read.gather(-1, top)).abs().max().item())
        kl_sum += (source.exp() * (source - read)).sum().item()
        agree += (source.argmax(-1) == read.argmax(-1)).sum().item()
        positions += len(ids)
    if quant == "f32" and worst > F32_TOLERANCE:
        raise ExportError(f"{gguf_path}: read back, log-probs differ from the source by {worst:.2e} "
                          f"(f32 must be within {F32_TOLERANCE:g})")
    if tokenizer.chat_template and read_tokenizer.chat_template != plain_chat_template(tokenizer.chat_template):
        raise ExportError(f"{gguf_path}: the chat template did not survive the round trip")
    return {"texts": len(texts), "positions": int(positions), "max_abs_logprob_diff": worst,
            "max_abs_logprob_diff_top10": top_worst, "mean_kl": kl_sum / positions,
            "top1_agreement": agree / positions}


def export(model: str, to: str, out: Path, quant: str | None = None, check: bool = True,
           force: bool = False, push_to_hub: str | None = None) -> dict:
    """Export ``model`` to ``out`` (a directory) as ``to``; returns what ``export.json`` records."""
    from alignkit.models import resolve_model
    from alignkit.runstore import atomic_write_json, hash_path

    if to not in TARGETS:
        raise ExportError(f"--to {to!r}: expected one of {', '.join(TARGETS)}")
    quant = quant or ("f32" if to == "hf" else "f16")
    allowed = tuple(HF_DTYPES) if to == "hf" else QUANTS
    if quant not in allowed:
        raise ExportError(f"--quant {quant!r} for --to {to}: expected one of {', '.join(allowed)}")
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it")

    started = time.monotonic()
    source = Path(resolve_model(model))
    config = source_config(str(source))
    if to != "hf":
        if is_classifier(config):
            raise ExportError(f"{source}: a {config.architectures[0]} (a reward model?) exports to --to hf only; "
                              "GGUF and Ollama hold generative models")
        check_writable(config)
    loaded, tokenizer = load_for_export(str(source))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    record = {"source": str(source), "to": to, "quant": quant}
    try:
        if to == "hf":
            import torch

            loaded.to(getattr(torch, HF_DTYPES[quant])).save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        else:
            gguf_path = write_gguf(loaded, tokenizer, tmp / f"model-{quant}.gguf", quant, name=source.name)
            if check:
                record["check"] = check_gguf(loaded, tokenizer, gguf_path, quant)
            if to == "ollama":
                (tmp / "Modelfile").write_text(chatml_modelfile(tokenizer, gguf_path.name), encoding="utf-8")
        record["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": hash_path(p)}
                           for p in sorted(tmp.iterdir()) if p.is_file()}
        record["seconds"] = round(time.monotonic() - started, 1)
        atomic_write_json(tmp / "export.json", record)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if push_to_hub:
        _push(out, push_to_hub)
        record["pushed_to"] = push_to_hub
        atomic_write_json(out / "export.json", record)
    return record


def _push(folder: Path, repo: str) -> None:
    """Upload the export folder to a Hub model repo (created if missing; the token comes from
    ``HF_TOKEN`` or ``huggingface-cli login``, never from argv)."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model",
                          commit_message="alignkit export")
    except Exception as e:  # offline, no token, no rights: the export itself is done and kept
        raise AlignkitError(f"--push-to-hub {repo}: {type(e).__name__}: {e}. The export is complete in {folder}; "
                            "push it later with `huggingface-cli upload`.") from None


def _run(args) -> int:
    out = Path(args.out) if args.out else Path(str(Path(args.model)).rstrip("/") + f"-{args.to}")
    record = export(args.model, args.to, out, quant=args.quant, check=not args.no_check, force=args.force,
                    push_to_hub=args.push_to_hub)
    print(f"exported {record['source']} -> {out} ({args.to}, {record['quant']}, {record['seconds']} s)")
    if "check" in record:
        c = record["check"]
        print(f"read back with transformers on {c['positions']} positions: next-token log-probs within "
              f"{c['max_abs_logprob_diff']:.1e} (top-10 tokens {c['max_abs_logprob_diff_top10']:.1e}), "
              f"KL {c['mean_kl']:.1e}, same top token {c['top1_agreement']:.1%}")
    if args.to == "ollama":
        print(f"run it: ollama create alignkit-model -f {out / 'Modelfile'} && ollama run alignkit-model")
    elif args.to == "gguf":
        gguf_file = next(n for n in record["files"] if n.endswith(".gguf"))
        print(f"run it: llama-cli -m {out / gguf_file} -cnv   (llama.cpp applies the chat template in the file)")
    return 0


def configure_cli(p) -> None:
    p.description = ("Export a trained model (a stage's model/, merged or a LoRA adapter) as a merged Hugging Face\n"
                     "directory, one GGUF file (llama.cpp, LM Studio) or an Ollama model (GGUF + Modelfile). GGUF exports\n"
                     "are read back with transformers before they finish; export.json records the difference.")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ("examples:\n"
                "  alignkit export --model runs/quickstart/dpo/model --to hf --out exports/dpo-hf\n"
                "  alignkit export --model runs/quickstart/dpo/model --to gguf --quant q8_0\n"
                "  alignkit export --model runs/quickstart/dpo/model --to ollama --out exports/dpo-ollama\n"
                "GGUF export writes Llama-family models (Llama, Mistral, SmolLM) with byte-level BPE tokenizers;\n"
                "for other architectures export --to hf and use llama.cpp's convert_hf_to_gguf.py.")
    p.add_argument("--model", required=True, help="a model directory (a stage's model/, merged or a LoRA adapter), "
                                                  "offline:NAME or a Hub id")
    p.add_argument("--to", required=True, choices=TARGETS, help="hf: merged HF directory; gguf: one GGUF file; "
                                                                "ollama: GGUF + Modelfile")
    p.add_argument("--quant", choices=sorted(set(QUANTS) | set(HF_DTYPES)), default=None,
                   help="weights: hf takes f32 (default), f16, bf16; gguf/ollama take f32, f16 (default), q8_0")
    p.add_argument("--out", default=None, help="output directory (default: the model path + '-TO')")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-check", action="store_true", help="skip reading the GGUF back with transformers")
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="upload the output directory to this Hub model repo (token from HF_TOKEN or a login)")
    p.set_defaults(func=_run)
