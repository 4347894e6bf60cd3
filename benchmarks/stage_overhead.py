"""What alignkit's SFT, reward and DPO stages cost over the plain TRL script a user would write.

For each stage, two programs train the same model on the same data for the same steps, each in a
fresh process, interleaved A B, B A, A B, ... so that warm caches and a noisy machine favour
neither:

  plain TRL   load model and tokenizer, build TRL's trainer (SFTTrainer, RewardTrainer,
              DPOTrainer) with the same batch size, length limit, learning rate, steps and compute
              settings (precision, no gradient checkpointing), train, save the model (the baseline)
  plain TRL + head patch (``--with-patch``; SFT and DPO) the same script with alignkit's CPU
              LM-head patch applied (:func:`alignkit.training.score_only_labelled_tokens_on_cpu`), so
              the ratio to it is the stage's overhead alone
  alignkit    ``alignkit <stage> --config FILE``: data checks and cleaning, the split, the "before"
              and "after" evaluations on 8 held-out examples, manifest, atomic save

Printed per stage: training tokens/s (the non-pad tokens TRL counts, over the trainer's own
train_runtime) and wall time (process start to exit), the medians of each, and the ratios
alignkit / plain. A JSON line goes to ``benchmarks/results/stage_overhead.jsonl``.

Data: with ``../shared/data`` beside the project, alpaca_libre instructions (SFT) and HH-RLHF
harmless pairs (reward, DPO), which have real length distributions; otherwise the shipped demo
instructions and synthetic pairs.

  python benchmarks/stage_overhead.py                                   # tiny model, all stages
  python benchmarks/stage_overhead.py --model offline:smollm2-135m-instruct --stages sft --pairs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "stage_overhead.jsonl"
EVAL_EXAMPLES = 8  # what alignkit holds out for its before/after evaluation (plain TRL evaluates nothing)
PROGRAMS = ["plain", "alignkit", "patched"]
NAMES = {"plain": "plain TRL", "patched": "plain TRL + head patch"}
LEARNING_RATE = {"sft": 2e-5, "reward": 1e-5, "dpo": 5e-6}


# ----------------------------------------------------------------------------------------------
# the two programs (run in a child process: ``--child plain|alignkit``)


def plain_trl(stage: str, model_path: str, data: str, out: Path, args, patched: bool = False) -> dict:
    """The script a TRL user writes: no checks, no split, no evaluation, save at the end.
    ``patched``: with alignkit's one change to TRL's code path (the LM head scores only labelled
    positions on CPU too), which separates that speed-up from everything else the stage does."""
    import torch

    if patched:
        from alignkit.training import score_only_labelled_tokens_on_cpu

        score_only_labelled_tokens_on_cpu()
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    dataset = load_dataset("json", data_files=data, split="train")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    common = dict(output_dir=str(out / "checkpoints"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                  learning_rate=LEARNING_RATE[stage], max_length=args.max_length, logging_steps=min(10, args.steps),
                  save_strategy="no", eval_strategy="no", report_to=[], seed=0, data_seed=0, use_cpu=not torch.cuda.is_available(),
                  # the stage's compute settings: TRL defaults to bf16 autocast and gradient checkpointing,
                  # alignkit to fp32 on CPU (bf16 is slower there) and no checkpointing
                  bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(), gradient_checkpointing=False)
    if stage == "sft":
        from trl import SFTConfig, SFTTrainer

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), processing_class=tokenizer, train_dataset=dataset)
    elif stage == "reward":
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = RewardTrainer(model=model, args=RewardConfig(**common), processing_class=tokenizer, train_dataset=dataset)
    else:
        from trl import DPOConfig, DPOTrainer

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        trainer = DPOTrainer(model=model, args=DPOConfig(**common), processing_class=tokenizer, train_dataset=dataset)
    result = trainer.train()
    trainer.save_model(str(out / "model"))
    tokens = [h["num_tokens"] for h in trainer.state.log_history if "num_tokens" in h][-1]
    return {"tokens": tokens, "train_s": result.metrics["train_runtime"]}


def alignkit_stage(stage: str, model_path: str, data: str, out: Path, args, **overrides) -> dict:
    """The stage through its command line, as a user runs it (in a fresh process), with ``overrides``
    of its config keys. It trains on the same records as plain TRL (``data``) and evaluates before
    and after on the ``EVAL_EXAMPLES`` records of ``<data>.eval.jsonl``."""
    held_out = str(Path(data).with_suffix(".eval.jsonl"))
    config = {"model": model_path, "output_dir": str(out), "max_steps": args.steps, "batch_size": args.batch_size,
              "max_length": args.max_length, "learning_rate": LEARNING_RATE[stage], "logging_steps": min(10, args.steps),
              # SFT reads its split from the records' own field; reward and DPO take separate eval data
              **({"data": str(Path(data).with_suffix(".split.jsonl"))} if stage == "sft" else
                 {"data": data, "eval_data": held_out, "eval_fraction": 0.0}),
              **overrides}
    path = out.parent / f"{out.name}.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    verb = ["align", "dpo"] if stage == "dpo" else [stage] if stage == "sft" else ["reward", "train"]
    subprocess.run([sys.executable, "-m", "alignkit.cli", *verb, "--config", str(path)], check=True,
                   stdout=subprocess.DEVNULL)
    manifest = json.loads((out / "manifest.json").read_text())
    history = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    tokens = [h["num_tokens"] for h in history if "num_tokens" in h and "loss" in h][-1]
    return {"tokens": tokens, "train_s": manifest["metrics"]["train_runtime_s"]}


# ----------------------------------------------------------------------------------------------
# data


def write_data(stage: str, path: Path, n: int) -> None:
    """``n`` training records in TRL's conversational format at ``path``, which both programs
    train on, and ``EVAL_EXAMPLES`` more for alignkit's evaluations at ``<path>.eval.jsonl``; for
    SFT also all of them with their ``split`` at ``<path>.split.jsonl`` (the stage's input)."""
    total = n + EVAL_EXAMPLES
    if stage == "sft":
        from alignkit.data import load_sft_examples

        source = SHARED / "alpaca_libre" / "alpaca_libre_ok.json"
        examples, _ = load_sft_examples(str(source) if source.exists() else "demo", on_bad_record="drop")
        rows = [{"prompt": e["prompt"], "completion": e["completion"]} for e in examples if "prompt" in e][:total]
    else:
        from alignkit.preferences import load_preferences

        source = SHARED / "hh_rlhf_harmless" / "test.jsonl.gz"
        if source.exists():
            pairs = load_preferences(str(source)).pairs
        else:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from reward_throughput import synthetic_pairs

            pairs = synthetic_pairs(total)
        rows = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs][:total]
    if len(rows) < total:
        raise SystemExit(f"{stage}: only {len(rows)} records for {total} needed")

    def write(target: Path, records: list[dict]) -> None:
        target.write_text("".join(json.dumps(r) + "\n" for r in records))

    write(path, rows[:n])
    write(path.with_suffix(".eval.jsonl"), rows[n:])
    if stage == "sft":
        write(path.with_suffix(".split.jsonl"), [{**r, "split": "train" if i < n else "validation"} for i, r in enumerate(rows)])


# ----------------------------------------------------------------------------------------------


def run_child(program: str, stage: str, model_path: str, data: Path, out: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", program, "--stages", stage, "--model", model_path, "--data", str(data),
           "--out", str(out), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    return {**result, "wall_s": wall, "tps": result["tokens"] / result["train_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model name or dir (default: a tiny model built here)")
    ap.add_argument("--stages", default="sft,reward,dpo")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=3, help="A/B pairs per stage (medians over them)")
    ap.add_argument("--with-patch", action="store_true", help="also run plain TRL with alignkit's CPU LM-head patch (SFT, DPO)")
    ap.add_argument("--child", choices=PROGRAMS, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.child:
        if args.child == "alignkit":
            result = alignkit_stage(args.stages, args.model, args.data, Path(args.out), args)
        else:
            result = plain_trl(args.stages, args.model, args.data, Path(args.out), args, patched=args.child == "patched")
        print("RESULT " + json.dumps(result))
        return

    from alignkit.models import build_tiny_model, resolve_model

    tmp = Path(tempfile.mkdtemp(prefix="stage_overhead_"))
    model_path = resolve_model(args.model) if args.model else str(build_tiny_model(tmp / "tiny", hidden_size=128))
    n_rows = args.steps * args.batch_size  # one pass: both programs see each record once, in the same order
    print(f"model {args.model or 'tiny (built here)'}; {args.steps} steps x batch {args.batch_size}; max_length "
          f"{args.max_length}; {args.pairs} interleaved pairs per stage; data from "
          f"{'../shared/data' if SHARED.exists() else 'the demo and synthetic pairs'}")
    record = {"date": time.strftime("%Y-%m-%d"), "model": args.model or "tiny", "steps": args.steps,
              "batch_size": args.batch_size, "max_length": args.max_length, "pairs": args.pairs,
              "data": "shared" if SHARED.exists() else "demo/synthetic"}
    for stage in args.stages.split(","):
        data = tmp / f"{stage}.jsonl"
        write_data(stage, data, n_rows)
        programs = [p for p in PROGRAMS if p != "patched" or (args.with_patch and stage != "reward")]
        runs: dict[str, list[dict]] = {p: [] for p in programs}
        for i in range(args.pairs):
            for program in (programs if i % 2 == 0 else programs[::-1]):
                r = run_child(program, stage, model_path, data, tmp / f"{stage}_{program}_{i}", args)
                runs[program].append(r)
                print(f"  {stage:6} {program:8} pair {i}: {r['tps']:8.0f} tokens/s, train {r['train_s']:6.1f} s, "
                      f"wall {r['wall_s']:6.1f} s", flush=True)
        med = {p: {k: statistics.median(r[k] for r in rs) for k in ("tps", "train_s", "wall_s")} for p, rs in runs.items()}
        ratios = {base: {"tokens_per_s": med["alignkit"]["tps"] / med[base]["tps"],
                         "wall": med["alignkit"]["wall_s"] / med[base]["wall_s"]} for base in programs if base != "alignkit"}
        for program in programs:
            print(f"{stage}: median {program:8} {med[program]['tps']:8.0f} tokens/s, wall {med[program]['wall_s']:6.1f} s")
        for base, r in ratios.items():
            print(f"{stage}: alignkit / {NAMES[base]}: tokens/s {r['tokens_per_s']:.2f}x, wall {r['wall']:.2f}x")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:  # a line per stage, written as soon as the stage is measured
            f.write(json.dumps({**record, "stage": stage, "medians": med, "ratios": ratios, "runs": runs}) + "\n")
        print(f"{stage}: appended to {RESULTS.relative_to(ROOT)}\n")


if __name__ == "__main__":
    main()
