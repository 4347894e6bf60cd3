"""SFT throughput: padded vs packed batches, and alignkit's overhead over a plain TRL loop.

All three runs train the same model on the same data with the same settings, in this process,
one after the other, so the ratios compare like with like on a noisy machine:

  plain TRL, padded   SFTTrainer built by hand (the baseline)
  plain TRL, packed   the same with packing=True
  alignkit sft        the stage (data checks, split, leakage, manifest, saving), padded

Tokens are the real (non-pad) tokens the trainer consumed. On CUDA it also prints model FLOPs
utilisation (6 x parameters x tokens/s over the GPU's peak bf16 FLOP/s).

  python benchmarks/sft_throughput.py                       # tiny model, demo data (CPU-friendly)
  python benchmarks/sft_throughput.py --model offline:smollm2-135m-instruct --steps 10
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import peak_flops  # noqa: E402  (benchmarks/common.py)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def plain_trl(model_path: str, examples: list[dict], args, packing: bool, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from alignkit.models import load_tokenizer, match_tokenizer
    from alignkit.training import use_bf16

    cuda = torch.cuda.is_available()
    bf16 = use_bf16(None)  # what the alignkit run below uses, so the two compare like with like
    tok = load_tokenizer(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16 if bf16 else torch.float32)
    match_tokenizer(model, tok)
    cfg = SFTConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                    learning_rate=2e-5, max_length=args.max_length, packing=packing, logging_steps=1,
                    save_strategy="no", eval_strategy="no", report_to=[], bf16=bf16, use_cpu=not cuda,
                    gradient_checkpointing=False, completion_only_loss=True, seed=0, disable_tqdm=True)
    t0 = time.perf_counter()
    trainer = SFTTrainer(model=model, args=cfg, processing_class=tok, train_dataset=Dataset.from_list(examples))
    result = trainer.train()
    wall = time.perf_counter() - t0
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h][-1]
    n_params = sum(p.numel() for p in model.parameters())
    return {"tokens": tokens, "train_s": result.metrics["train_runtime"], "wall_s": wall, "params": n_params}


def alignkit_sft(model_path: str, data: str, args, n_examples: int, out: Path) -> dict:
    from alignkit.sft.train import SFTStageConfig, train

    cfg = SFTStageConfig(model=model_path, data=data, output_dir=str(out), max_steps=args.steps,
                         batch_size=args.batch_size, max_length=args.max_length, eval_steps=10**6,
                         save_steps=10**6, logging_steps=1, max_examples=n_examples, val_fraction=0.0,
                         heldout_fraction=0.0, warmup_ratio=0.0, learning_rate=2e-5)
    t0 = time.perf_counter()
    manifest = train(cfg, force=True)
    wall = time.perf_counter() - t0
    m = manifest["metrics"]
    return {"tokens": m["train_tokens"], "train_s": m["train_runtime_s"], "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model name or dir (default: a tiny model built here)")
    ap.add_argument("--data", default="demo", help="instruction data (default: the shipped demo set)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    from alignkit.data import load_sft_examples
    from alignkit.models import build_tiny_model, resolve_model

    tmp = Path(tempfile.mkdtemp(prefix="sft_bench_"))
    model_path = resolve_model(args.model) if args.model else str(build_tiny_model(tmp / "tiny", hidden_size=128))
    examples, _ = load_sft_examples(args.data, on_bad_record="drop")
    n = min(len(examples), args.steps * args.batch_size)
    examples = examples[:n]
    print(f"model {args.model or 'tiny (built here)'}; {n} examples; {args.steps} steps x batch {args.batch_size}; "
          f"max_length {args.max_length}")

    runs = {
        "plain TRL, padded": plain_trl(model_path, examples, args, False, tmp / "padded"),
        "plain TRL, packed": plain_trl(model_path, examples, args, True, tmp / "packed"),
        "alignkit sft, padded": alignkit_sft(model_path, args.data, args, n, tmp / "alignkit"),
    }
    peak = peak_flops()
    params = runs["plain TRL, padded"]["params"]
    print(f"\n{'run':24} {'tokens':>8} {'train s':>8} {'tokens/s':>9} {'wall s':>7}" + ("   MFU" if peak else ""))
    for name, r in runs.items():
        r["tps"] = r["tokens"] / r["train_s"]
        mfu = f"  {6 * params * r['tps'] / peak:5.1%}" if peak else ""
        print(f"{name:24} {int(r['tokens']):8d} {r['train_s']:8.2f} {r['tps']:9.0f} {r['wall_s']:7.1f}{mfu}")
    base = runs["plain TRL, padded"]
    print(f"\npacked / padded tokens/s:               {runs['plain TRL, packed']['tps'] / base['tps']:.2f}x")
    print(f"alignkit / plain TRL tokens/s (training): {runs['alignkit sft, padded']['tps'] / base['tps']:.2f}x")
    print(f"alignkit / plain TRL wall time (all in):  {runs['alignkit sft, padded']['wall_s'] / base['wall_s']:.2f}x")


if __name__ == "__main__":
    main()
