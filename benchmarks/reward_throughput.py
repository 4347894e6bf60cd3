"""Reward model throughput: training pairs/s, scoring pairs/s, batched vs one pair at a time.

    python benchmarks/reward_throughput.py                      # tiny random model: runs anywhere
    python benchmarks/reward_throughput.py --model offline:smollm2-135m-instruct --pairs 64
    python benchmarks/reward_throughput.py --data ../shared/data/hh_rlhf_harmless/test.jsonl.gz

Training runs the real path (alignkit's RewardTrainer subclass, TRL's loss) for a few warm-up steps,
then times ``--steps`` more. Scoring times ``RewardScorer.score`` over the same pairs batched and
one pair at a time, in the same run, and prints the ratio (absolute times are noisy on shared
machines; the ratio is the figure to compare). On CUDA it also prints model FLOPs utilisation
(training ~ 6 * params * tokens, scoring ~ 2 * params * tokens, against the GPU's dense bf16 peak).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
from common import peak_flops  # noqa: E402  (benchmarks/common.py)


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "the sea is wide and blue waves are calling you eat a balanced diet exercise and sleep well".split()
    pairs = []
    for i in range(n):
        reply = " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))
        pairs.append({"prompt": [{"role": "user", "content": f"Question {i}: " + " ".join(rng.choice(words) for _ in range(12))}],
                      "chosen": [{"role": "assistant", "content": reply + " Good."}],
                      "rejected": [{"role": "assistant", "content": reply + " Bad."}]})
    return pairs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="backbone (default: a tiny random Llama built on the spot)")
    ap.add_argument("--data", default=None, help="preference file (default: synthetic pairs)")
    ap.add_argument("--pairs", type=int, default=128, help="pairs to score (and to draw training batches from)")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per training step; sequences per scoring batch is 2x")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (after 2 warm-up steps)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--single", type=int, default=None, help="pairs scored one at a time (default: min(pairs, 32))")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from alignkit.reward.train import RewardTrainConfig, _make_trainer_class, tokenize_pairs
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from alignkit.preferences import load_preferences
    from alignkit.models import build_tiny_model, load_tokenizer, resolve_model
    from alignkit.scoring import RewardScorer
    from alignkit.training import use_bf16

    tmp = Path(tempfile.mkdtemp(prefix="reward_bench_"))
    model_path = resolve_model(args.model) if args.model else str(build_tiny_model(tmp / "tiny"))
    pairs = load_preferences(args.data).pairs[: args.pairs] if args.data else synthetic_pairs(args.pairs)
    cuda = torch.cuda.is_available()
    bf16 = use_bf16(None)  # the stage's default
    dtype = torch.bfloat16 if bf16 else torch.float32
    threads = torch.get_num_threads()

    tokenizer = load_tokenizer(model_path, padding_side="right")
    cfg = RewardTrainConfig(max_length=args.max_length, overlength="truncate")
    rows, overlong = tokenize_pairs(pairs, tokenizer, cfg, use_margin=False, aspects=[])
    tokens_per_pair = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows) / len(rows)

    # ---- training: the real trainer, timed after warm-up
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=dtype)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    warmup = 2
    train_args = RewardConfig(output_dir=str(tmp / "ckpt"), max_steps=warmup, per_device_train_batch_size=args.batch_size,
                              learning_rate=1e-5, bf16=bf16, gradient_checkpointing=False, use_cpu=not cuda,
                              report_to=[], save_strategy="no", logging_steps=10_000, disable_tqdm=True,
                              max_length=args.max_length, remove_unused_columns=False, dataloader_num_workers=0)
    trainer = _make_trainer_class()(model=model, args=train_args, processing_class=tokenizer,
                                    data_collator=DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id),
                                    train_dataset=Dataset.from_list(rows))
    trainer.train()
    trainer.args.max_steps = args.steps
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    train_pairs_s = args.steps * args.batch_size / train_s

    # ---- scoring: batched vs one at a time, same pairs, same run
    trainer.save_model(str(tmp / "rm"))
    tokenizer.save_pretrained(tmp / "rm")
    del trainer, model
    scorer = RewardScorer(tmp / "rm", batch_size=2 * args.batch_size, max_length=args.max_length)
    prompts = [p["prompt"] for p in pairs]
    chosen = [p["chosen"][0]["content"] for p in pairs]
    rejected = [p["rejected"][0]["content"] for p in pairs]
    scorer.score(prompts[:4] * 2, chosen[:4] + rejected[:4])  # warm-up
    t0 = time.perf_counter()
    scorer.score(prompts + prompts, chosen + rejected)
    batched_s = time.perf_counter() - t0
    n_single = args.single or min(len(pairs), 32)
    t0 = time.perf_counter()
    for p, c, r in zip(prompts[:n_single], chosen[:n_single], rejected[:n_single]):
        scorer.score([p], [c])
        scorer.score([p], [r])
    single_s = time.perf_counter() - t0
    batched_pairs_s, single_pairs_s = len(pairs) / batched_s, n_single / single_s

    figures = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({threads} threads)",
        "dtype": str(dtype).replace("torch.", ""), "model": args.model or "tiny random Llama (2 layers, hidden 64)",
        "params": n_params, "pairs": len(rows), "mean_tokens_per_pair": round(tokens_per_pair, 1),
        "truncated_pairs": overlong, "batch_size_pairs": args.batch_size,
        "train_pairs_per_s": round(train_pairs_s, 2), "train_step_s": round(train_s / args.steps, 4),
        "score_batched_pairs_per_s": round(batched_pairs_s, 2), "score_single_pairs_per_s": round(single_pairs_s, 2),
        "batched_over_single": round(batched_pairs_s / single_pairs_s, 2),
    }
    peak = peak_flops()
    if peak:
        figures["train_mfu"] = round(6 * n_params * tokens_per_pair * train_pairs_s / peak, 4)
        figures["score_mfu"] = round(2 * n_params * tokens_per_pair * batched_pairs_s / peak, 4)
    elif cuda:
        figures["mfu"] = "unknown GPU peak: add it to benchmarks/common.py"
    for k, v in figures.items():
        print(f"{k:28s} {v}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
