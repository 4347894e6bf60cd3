"""Candidate responses for annotation: sample k replies per prompt from a model.

    alignkit annotate generate --config configs/annotate.yaml [KEY=VALUE ...]

Reads like the stage: load the prompts (a prompt file, or an SFT run's held-out / training
prompts), load the model (the SFT output by default, or any name ``alignkit.models.resolve_model``
takes), sample ``k`` replies per prompt in left-padded batches with a fixed seed, write
``candidates.jsonl`` and the manifest (which records every generation setting).

Each line of ``candidates.jsonl``::

    {"item_id": "heldout-3", "prompt": [{"role": "user", "content": ...}],
     "responses": ["...", "..."], "constraint": {"type": "max_words", "n": 25}}

``constraint`` is kept from the prompt record when it has one (the demo data carries verifiable
constraints), or recovered from the instruction's words by ``alignkit.oracle.find_constraint``;
it is absent when neither finds one.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

from alignkit.config import check_range, doc, to_dict
from alignkit.data import DataError, load_prompts, prompt_text, read_dataset_rows
from alignkit.distributed import gather_by_index, my_batches
from alignkit.runstore import is_main_process, stage_run, write_jsonl

log = logging.getLogger("alignkit.annotate.generate")


@dataclass
class GenerateConfig:
    run_dir: str = doc("the annotation run directory; outputs go to <run_dir>/candidates", "runs/quickstart/annotate")
    model: str = doc("model to sample from: an SFT output dir, a local model dir, a Hub id or offline:...",
                     "runs/quickstart/sft/model")
    prompts: str = doc("a prompt file (JSONL/JSON: prompt, instruction, turns or messages records) or an SFT "
                       "run dir (its heldout_prompts.jsonl / train_prompts.jsonl are read)", "runs/quickstart/sft")
    prompts_split: str = doc("for an SFT run dir: train (default), validation, heldout or both (train and heldout); held-out prompts are the test set kept for the final evaluation, so preference data from them leaks into the models it evaluates", "train")
    max_prompts: int | None = doc("use only the first N prompts (smoke runs)", None)
    k: int = doc("responses sampled per prompt (binary uses 2; ranking shows all k)", 2)
    max_new_tokens: int = doc("tokens generated per response at most", 64)
    do_sample: bool = doc("sample (true) or decode greedily (false; then the k responses are identical)", True)
    temperature: float = doc("sampling temperature", 1.0)
    top_p: float = doc("nucleus sampling: keep the smallest token set with this much probability", 0.95)
    top_k: int = doc("sample among the k most likely tokens only (0: no limit)", 50)
    repetition_penalty: float = doc("penalty > 1 discourages repeating tokens", 1.0)
    batch_size: int = doc("prompts per generate() call (each expands to k sequences)", 8)
    seed: int = doc("sampling seed (each batch is seeded with seed + batch index)", 0)
    trust_remote_code: bool = doc("allow model code from the Hub", False)
    output: str | None = doc("output file; default <run_dir>/candidates/candidates.jsonl", None)

    def out_path(self) -> Path:
        return Path(self.output) if self.output else Path(self.run_dir) / "candidates" / "candidates.jsonl"


def _constraint_of(rec) -> dict | None:
    if isinstance(rec, dict) and isinstance(rec.get("constraint"), dict):
        return rec["constraint"]
    return None


def load_candidate_prompts(source: str, split: str = "train", max_prompts: int | None = None) -> list[dict]:
    """Prompts as ``{"item_id", "prompt": messages, "constraint"?}`` from a file or an SFT run dir."""
    from alignkit.oracle import find_constraint

    path = Path(source)
    files: list[tuple[str, Path]] = []
    if path.is_dir() and ((path / "heldout_prompts.jsonl").exists() or (path / "train_prompts.jsonl").exists()):
        if split not in ("heldout", "train", "validation", "both"):
            raise DataError(source, None, "prompts_split", f"expected train, validation, heldout or both, got {split!r}")
        for name in (("heldout", "train") if split == "both" else (split,)):
            f = path / f"{name}_prompts.jsonl"
            if f.exists() and f.stat().st_size > 0:
                files.append((name, f))
        if not files:
            raise DataError(source, None, None, f"no {split} prompts in this SFT run dir")
    else:
        files.append(("", path))
    out: list[dict] = []
    seen: set[str] = set()
    for prefix, f in files:
        prompts = load_prompts(f)
        raw = [rec for _, rec in read_dataset_rows(f)]
        for p, rec in zip(prompts, raw):
            item_id = p["id"]
            if prefix and not item_id.startswith(prefix):
                item_id = f"{prefix}-{item_id}"
            n, base = 1, item_id
            while item_id in seen:  # ids must be unique: they name the records in Argilla
                n += 1
                item_id = f"{base}#{n}"
            seen.add(item_id)
            item = {"item_id": item_id, "prompt": p["prompt"]}
            constraint = _constraint_of(rec) or find_constraint(prompt_text(p["prompt"]))
            if constraint:
                item["constraint"] = constraint
            out.append(item)
    return out[:max_prompts] if max_prompts else out


def generate(cfg: GenerateConfig, force: bool = False) -> dict:
    """Sample the candidates and write them with a manifest; returns the manifest."""
    check_range(cfg, 1, "k", "max_new_tokens", "batch_size", "max_prompts")
    items = load_candidate_prompts(cfg.prompts, cfg.prompts_split, cfg.max_prompts)  # bad input fails here
    if not items:
        raise DataError(cfg.prompts, None, None, "no prompts")

    import torch

    from alignkit.generation import generate_sharing_prompts
    from alignkit.models import device_and_dtype, load_causal_lm, load_tokenizer, resolve_model

    model_path = resolve_model(cfg.model)
    out = cfg.out_path()
    stage_dir = out.parent
    with stage_run("annotate-generate", stage_dir, to_dict(cfg), {"prompts": cfg.prompts, "model": model_path}, force) as run:
        if run.skipped:
            log.info("generate: already completed in %s (use --force to sample again)", stage_dir)
            return run.previous
        device, dtype = device_and_dtype()
        tok = load_tokenizer(model_path, cfg.trust_remote_code, padding_side="left")
        model = load_causal_lm(model_path, tok, cfg.trust_remote_code, dtype=dtype).to(device).eval()
        gen_kwargs = dict(
            max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, num_return_sequences=cfg.k,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        if cfg.do_sample:
            gen_kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        if cfg.repetition_penalty != 1.0:
            gen_kwargs["repetition_penalty"] = cfg.repetition_penalty
        # The model's own generation defaults, overridden by ours (what model.generate(**gen_kwargs) does).
        gen_config = copy.deepcopy(model.generation_config)
        gen_config.update(**gen_kwargs, return_dict_in_generate=True)
        from tqdm import tqdm

        # Batch b is seeded with seed + b, so N processes (each sampling every N-th batch) write
        # what one process writes.
        starts = list(range(0, len(items), cfg.batch_size))
        mine = {}
        for b in tqdm(my_batches(len(starts)), desc="generating", unit="batch", disable=not is_main_process()):
            batch = items[starts[b] : starts[b] + cfg.batch_size]
            texts = [tok.apply_chat_template(it["prompt"], tokenize=False, add_generation_prompt=True) for it in batch]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            torch.manual_seed(cfg.seed + b)
            seqs = generate_sharing_prompts(model, enc["input_ids"], enc["attention_mask"], gen_config).sequences
            new = seqs[:, enc["input_ids"].shape[1]:]
            decoded = tok.batch_decode(new, skip_special_tokens=True)
            mine[b] = [{"item_id": it["item_id"], "prompt": it["prompt"],
                        "responses": [d.strip() for d in decoded[i * cfg.k : (i + 1) * cfg.k]],
                        **({"constraint": it["constraint"]} if "constraint" in it else {})} for i, it in enumerate(batch)]
        every = gather_by_index(mine)
        rows = [row for b in range(len(starts)) for row in every[b]]
        if is_main_process():
            write_jsonl(out, rows)
        run.add_output("candidates", out)
        run.notes["generation"] = {**{k: v for k, v in gen_kwargs.items() if k not in ("pad_token_id", "eos_token_id")},
                                   "padding_side": "left", "seed": cfg.seed, "batch_size": cfg.batch_size,
                                   "device": device, "dtype": str(dtype).replace("torch.", ""), "model": model_path}
        run.metrics.update({
            "n_items": len(rows), "responses_per_item": cfg.k,
            "n_with_constraint": sum("constraint" in r for r in rows),
            "n_empty_responses": sum(1 for r in rows for x in r["responses"] if not x),
            "n_items_with_identical_responses": sum(len(set(r["responses"])) < len(r["responses"]) for r in rows),
        })
        if is_main_process():
            print(f"generate: {len(rows)} prompts x {cfg.k} responses -> {out}")
    return run.manifest("completed")
