"""A training stage with and without the frozen-block feature cache (``cache_frozen_features``),
interleaved A B A B in one run, on the same data, model and settings: wall time of the whole stage
(the cache's fills included), the ratio of medians, and the figures each run ends with (they must
agree: the cache is exact).

  reward  the reward stage on synthetic pairs: held-out accuracy and loss, train loss.
  ppo     the PPO stage with a rule reward: per-step score, KL and losses (the non-generation
          phases are what the cache shortens; generation is untouched).

    python benchmarks/feature_cache.py                                  # reward, tiny 4-block model
    python benchmarks/feature_cache.py --model offline:smollm2-135m-instruct --pairs 48 \
        --trainable-layers 10 --epochs 2
    python benchmarks/feature_cache.py --stage ppo --model offline:smollm2-135m-instruct \
        --trainable-layers 10 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pairs(n: int) -> list[dict]:
    topics = ["the sea", "a mountain", "the city at night", "bread", "a bicycle", "rain", "the moon", "a library"]
    out = []
    for i in range(n):
        topic = topics[i % len(topics)]
        good = f"Here are a few lines about {topic}, kept short and clear as asked, with one concrete detail."
        bad = f"{topic} {topic} {topic}. I do not know what to say about {topic}, sorry, maybe ask again later."
        out.append({"prompt": f"Write two sentences about {topic} (request {i}).", "chosen": good, "rejected": bad})
    return out


def run_stage(args, cached: bool, model: str, data: Path, prompts: Path, out: Path) -> dict:
    """One run of the stage; the figures it ends with."""
    from alignkit.config import from_dict

    if args.stage == "reward":
        from alignkit.reward.train import RewardTrainConfig, train

        manifest = train(from_dict(RewardTrainConfig, {
            "model": model, "data": str(data), "output_dir": str(out), "trainable_layers": args.trainable_layers,
            "epochs": args.epochs, "batch_size": args.batch_size, "eval_fraction": 0.25, "save_steps": 100000,
            "eval_steps": 100000, "learning_rate": 1e-4, "max_length": 256, "cache_frozen_features": cached,
            "report_to": []}))
        return {k: manifest["metrics"][k] for k in ("eval_accuracy_after", "eval_loss_after", "train_loss")
                if manifest["metrics"].get(k) is not None}
    from alignkit.rlhf.ppo import PPOConfig, read_metrics, train

    train(from_dict(PPOConfig, {
        "model": model, "reward_model": None, "reward_function": "alignkit.rlhf.rule_rewards:digit_fraction",
        "prompts": str(prompts), "output_dir": str(out), "total_steps": args.steps, "rollout_batch_size": 8,
        "mini_batch_size": 4, "ppo_epochs": 2, "learning_rate": 1e-5, "max_new_tokens": 32, "save_steps": 1000,
        "trainable_layers": args.trainable_layers, "cache_frozen_features": cached, "report_to": []}))
    last = read_metrics(out)[-1]
    return {f"step{last['step']}/{k}": last[k] for k in ("score", "kl", "pg_loss", "vf_loss")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=("reward", "ppo"), default="reward")
    ap.add_argument("--steps", type=int, default=3, help="PPO steps")
    ap.add_argument("--model", default=None, help="backbone (default: a tiny random 4-block Llama built here)")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--trainable-layers", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="A B pairs (interleaved)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from alignkit.models import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="rm-cache-bench-"))
    model = args.model or str(build_tiny_model(work / "tiny", num_layers=4))
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs(args.pairs)))
    times = {"plain": [], "cached": []}
    results = {}
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in pairs(args.pairs)))
    for rep in range(args.repeats):
        for name in (("plain", "cached") if rep % 2 == 0 else ("cached", "plain")):
            t0 = time.perf_counter()
            results[name] = run_stage(args, name == "cached", model, data, prompts, work / f"{name}-{rep}")
            times[name].append(time.perf_counter() - t0)
            print(f"{name:7} run {rep}: {times[name][-1]:.1f} s", flush=True)
    plain, cached = statistics.median(times["plain"]), statistics.median(times["cached"])
    print(f"\n{args.stage}: median wall time: plain {plain:.1f} s, cached {cached:.1f} s; speed-up {plain / cached:.2f}x")
    for key in results["plain"]:
        print(f"{key}: plain {results['plain'][key]:.6f}, cached {results['cached'][key]:.6f}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    with open(out / "feature_cache.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "stage": args.stage, "model": args.model or "tiny-4",
                            "pairs": args.pairs, "trainable_layers": args.trainable_layers, "epochs": args.epochs,
                            "plain_s": times["plain"], "cached_s": times["cached"], "speedup": plain / cached}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
